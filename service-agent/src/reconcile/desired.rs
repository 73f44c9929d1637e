//! The desired map contents, kept per Service so one Service's change is
//! laid out and diffed on its own: [`DesiredState::set_service`] returns just
//! the ordered writes for that Service. Rev-NAT and backend ids stay stable
//! while their frontend or backend lives (and across agent restarts, by
//! adopting the ids found in the maps); backends shared by several Services
//! are reference-counted and deleted when the last one lets go.
//!
//! Memory: a frontend is kept as its header and the list of its backend
//! ids (its slots and rev-NAT entry follow from them), a backend once
//! however many Services use it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use service_common::{
    BACKEND_FLAG_NODE_LOCAL, BackendId, BackendValue, FRONTEND_FLAG_SOURCE_RANGES, FrontendKey,
    FrontendValue, IdCursors, MapAddr, RevNatId, RevNatValue, SourceRangeKey,
};

use super::{
    backend_table::{BackendTable, BackendUse},
    cluster::ObjectName,
    diff::{Writes, diff},
    translate::{DesiredBackend, DesiredFrontend},
};
use crate::datapath::model::{MapName, MapState, map_addr};

/// Identity of a frontend (address, port in network order, family,
/// protocol, scope): what a rev-NAT id is allocated for. The family tells
/// an IPv4 address from the IPv6 address with the same first 4 bytes.
pub type FrontendIdentity = (MapAddr, u16, u8, u8, u8);
/// Identity of a backend (address, port in network order, family): what a
/// backend id is allocated for.
type BackendIdentity = (MapAddr, u16, u8);

/// The identity of the frontend a frontends-map key belongs to.
pub fn frontend_identity(key: &FrontendKey) -> FrontendIdentity {
    (key.addr, key.port, key.family, key.proto, key.scope)
}

/// The identity of the desired frontend `frontend`.
fn desired_identity(frontend: &DesiredFrontend) -> FrontendIdentity {
    let (addr, family) = map_addr(frontend.addr);
    (
        addr,
        frontend.port.to_be(),
        family,
        frontend.proto,
        frontend.scope,
    )
}

/// Allocates small integer ids to keys and keeps them stable while the key
/// lives, so an unchanged Service keeps its entries byte for byte. Ids are
/// handed out round-robin, so a freed id is not reused at once.
#[derive(Clone, Debug)]
struct IdAllocator<K> {
    ids: BTreeMap<K, u32>,
    /// One bit per id in `0..limit`: set when taken.
    used: Vec<u64>,
    taken: u32,
    next: u32,
    limit: u32,
    /// Whether released ids go to `held` instead of being free again.
    holds_released: bool,
    /// Ids no key has that are not handed out until [`IdAllocator::reuse`]:
    /// conntrack entries may still name them.
    held: BTreeSet<u32>,
}

impl<K: Ord + Clone> IdAllocator<K> {
    /// Ids are handed out in `1..limit`; a released id is free again at once.
    fn new(limit: u32) -> Self {
        IdAllocator {
            ids: BTreeMap::new(),
            used: vec![0; (limit as usize).div_ceil(64)],
            taken: 0,
            next: 1,
            limit,
            holds_released: false,
            held: BTreeSet::new(),
        }
    }

    /// Like [`IdAllocator::new`], but a released id is held until
    /// [`IdAllocator::reuse`] says nothing names it any more.
    fn holding_released(limit: u32) -> Self {
        IdAllocator {
            holds_released: true,
            ..Self::new(limit)
        }
    }

    /// The next id to try.
    fn cursor(&self) -> u32 {
        self.next
    }

    /// Goes on from `next` (a cursor a previous agent kept), if in range.
    fn resume(&mut self, next: u32) {
        if next != 0 && next < self.limit {
            self.next = next;
        }
    }

    /// Makes held ids free again.
    fn reuse(&mut self, ids: impl IntoIterator<Item = u32>) {
        for id in ids {
            self.held.remove(&id);
        }
    }

    /// Holds ids that no key has (found named by conntrack entries): they
    /// are not handed out until [`IdAllocator::reuse`]. Returns those now held.
    fn hold(&mut self, ids: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let mut held = Vec::new();
        for id in ids {
            if id != 0 && id < self.limit && !self.is_used(id) && self.held.insert(id) {
                held.push(id);
            }
        }
        held
    }

    /// Frees `id`, or holds it.
    fn free(&mut self, id: u32) {
        self.set_used(id, false);
        if self.holds_released {
            self.held.insert(id);
        }
    }

    fn is_used(&self, id: u32) -> bool {
        id < self.limit && self.used[id as usize / 64] & (1 << (id % 64)) != 0
    }

    fn set_used(&mut self, id: u32, used: bool) {
        let word = &mut self.used[id as usize / 64];
        let bit = 1 << (id % 64);
        if used && *word & bit == 0 {
            *word |= bit;
            self.taken += 1;
        } else if !used && *word & bit != 0 {
            *word &= !bit;
            self.taken -= 1;
        }
    }

    /// Records an id already in use (adopted from the maps).
    fn adopt(&mut self, key: K, id: u32) {
        if id != 0 && id < self.limit && !self.is_used(id) && !self.ids.contains_key(&key) {
            self.ids.insert(key, id);
            self.set_used(id, true);
        }
    }

    /// The key's id, allocating a free one if needed; `None` when all are taken.
    fn get_or_allocate(&mut self, key: &K) -> Option<u32> {
        if let Some(id) = self.ids.get(key) {
            return Some(*id);
        }
        if u64::from(self.taken) + self.held.len() as u64 >= u64::from(self.limit.saturating_sub(1))
        {
            return None;
        }
        // Hand out ids round-robin, so a freed id is not reused at once and
        // conntrack entries naming it cannot mistake a new backend for it.
        while self.next == 0
            || self.next >= self.limit
            || self.is_used(self.next)
            || self.held.contains(&self.next)
        {
            self.next = if self.next + 1 >= self.limit {
                1
            } else {
                self.next + 1
            };
        }
        let id = self.next;
        self.next = if id + 1 >= self.limit { 1 } else { id + 1 };
        self.set_used(id, true);
        self.ids.insert(key.clone(), id);
        Some(id)
    }

    /// Frees (or holds) the key's id.
    fn release(&mut self, key: &K) {
        if let Some(id) = self.ids.remove(key) {
            self.free(id);
        }
    }

    /// Frees (or holds) the ids of every key and id not `live`.
    fn retain(&mut self, live: impl Fn(&K, u32) -> bool) {
        let mut freed = Vec::new();
        self.ids.retain(|key, id| {
            let keep = live(key, *id);
            if !keep {
                freed.push(*id);
            }
            keep
        });
        for id in freed {
            self.free(id);
        }
    }
}

/// One frontend as laid out in the maps: its header and, in slot order,
/// the ids of its backends. Its slots and rev-NAT entry follow from them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FrontendLayout {
    /// The header's key (slot 0).
    key: FrontendKey,
    /// The header.
    header: FrontendValue,
    /// Backend ids of slots `1..=header.count`.
    backends: Box<[BackendId]>,
    /// Backend ids kept in the backends map for the flows they have, with
    /// no slot (draining: terminating or not serving).
    draining: Box<[BackendId]>,
    /// Its entries of the source-ranges trie (`loadBalancerSourceRanges`,
    /// under its rev-NAT id); the header has `FRONTEND_FLAG_SOURCE_RANGES`
    /// exactly when there are some.
    source_ranges: Box<[SourceRangeKey]>,
}

impl FrontendLayout {
    /// Every backend id it keeps in the backends map: slots, then draining.
    fn backend_ids(&self) -> impl Iterator<Item = &BackendId> {
        self.backends.iter().chain(self.draining.iter())
    }
}

impl FrontendLayout {
    /// The reverse-NAT entry of this frontend.
    fn revnat(&self) -> RevNatValue {
        RevNatValue {
            addr: self.key.addr,
            port: self.key.port,
            family: self.key.family,
            _pad: 0,
        }
    }

    /// Its header and slots, in key order.
    fn entries(&self) -> impl Iterator<Item = (FrontendKey, FrontendValue)> + '_ {
        std::iter::once((self.key, self.header)).chain(self.backends.iter().zip(1..).map(
            |(id, slot)| {
                (
                    FrontendKey { slot, ..self.key },
                    FrontendValue {
                        backend_id: *id,
                        ..FrontendValue::default()
                    },
                )
            },
        ))
    }
}

/// Desired entries per map, kept up to date by [`DesiredState::set_service`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryCounts {
    /// Frontends (headers).
    pub frontends: usize,
    /// Entries of the frontends map: headers and slots.
    pub frontend_entries: usize,
    /// Backends.
    pub backends: usize,
    /// Entries of the source-ranges trie.
    pub source_ranges: usize,
}

impl EntryCounts {
    /// Desired entries of `map`.
    pub fn of(&self, map: MapName) -> usize {
        match map {
            MapName::Frontends => self.frontend_entries,
            MapName::Backends => self.backends,
            MapName::RevNat => self.frontends,
            MapName::SourceRanges => self.source_ranges,
        }
    }
}

/// The desired entries of one Service, per map.
#[derive(Clone, Debug, Default)]
pub struct ServiceEntries {
    /// Headers and slots.
    pub frontends: Vec<(FrontendKey, FrontendValue)>,
    /// Rev-NAT entries.
    pub revnat: Vec<(RevNatId, RevNatValue)>,
    /// Backends.
    pub backends: Vec<(BackendId, BackendValue)>,
    /// Source-ranges entries.
    pub source_ranges: Vec<SourceRangeKey>,
}

/// What [`DesiredState::set_service`] did.
#[derive(Clone, Debug, Default)]
pub struct ServiceUpdate {
    /// The ordered writes that take the maps from the Service's previous
    /// desired entries to the new ones.
    pub writes: Writes,
    /// One line per frontend or backend that could not be given entries.
    pub problems: Vec<String>,
}

/// The desired contents of the maps, by Service.
#[derive(Clone, Debug)]
pub struct DesiredState {
    revnat_ids: IdAllocator<FrontendIdentity>,
    backend_ids: IdAllocator<BackendIdentity>,
    /// Each Service's frontends.
    services: BTreeMap<ObjectName, Vec<FrontendLayout>>,
    /// Every backend some Service uses, by id.
    backends: BackendTable,
    /// Which Service serves each frontend (the first one to claim it).
    frontend_owners: BTreeMap<FrontendIdentity, ObjectName>,
    counts: EntryCounts,
}

impl DesiredState {
    /// An empty desired state that first adopts the ids used in `current`,
    /// allocating rev-NAT ids below `revnat_limit` and backend ids below
    /// `backend_limit`. Call [`DesiredState::release_unclaimed`] once every
    /// Service has been set.
    pub fn adopting(current: &MapState, revnat_limit: u32, backend_limit: u32) -> Self {
        let mut state = DesiredState {
            // A released rev-NAT id could rewrite a deleted frontend's
            // stale replies to a new frontend's address: it is held until
            // its flows are gone. A backend id needs no such care: the
            // datapath checks a flow's backend address, not only its id.
            revnat_ids: IdAllocator::holding_released(revnat_limit),
            backend_ids: IdAllocator::new(backend_limit),
            services: BTreeMap::new(),
            backends: BackendTable::default(),
            frontend_owners: BTreeMap::new(),
            counts: EntryCounts::default(),
        };
        for (key, value) in current.frontends.iter().filter(|(k, _)| k.slot == 0) {
            state
                .revnat_ids
                .adopt(frontend_identity(key), value.rev_nat_id);
        }
        for (id, value) in &current.backends {
            state
                .backend_ids
                .adopt((value.addr, value.port, value.family), *id);
        }
        state
    }

    /// Where the id allocators stand (kept across restarts).
    pub fn id_cursors(&self) -> IdCursors {
        IdCursors {
            next_rev_nat_id: self.revnat_ids.cursor(),
            next_backend_id: self.backend_ids.cursor(),
        }
    }

    /// Goes on from where a previous agent's allocators stood, so ids it
    /// handed out (and conntrack entries may still name) are not handed
    /// out again soon. Out-of-range cursors are ignored.
    pub fn resume_ids(&mut self, cursors: &IdCursors) {
        self.revnat_ids.resume(cursors.next_rev_nat_id);
        self.backend_ids.resume(cursors.next_backend_id);
    }

    /// Makes released rev-NAT ids free again: no conntrack entry names
    /// them any more.
    pub fn reuse_rev_nat_ids(&mut self, ids: impl IntoIterator<Item = RevNatId>) {
        self.revnat_ids.reuse(ids);
    }

    /// Holds rev-NAT ids no frontend has but conntrack entries still name
    /// (found after a restart): they are not handed out until
    /// [`DesiredState::reuse_rev_nat_ids`]. Returns the ids now held (those
    /// in use by a frontend are not).
    pub fn hold_rev_nat_ids(&mut self, ids: impl IntoIterator<Item = RevNatId>) -> Vec<RevNatId> {
        self.revnat_ids.hold(ids)
    }

    /// Frees adopted ids that no Service claimed (their entries are stale).
    pub fn release_unclaimed(&mut self) {
        let owners = &self.frontend_owners;
        self.revnat_ids
            .retain(|identity, _| owners.contains_key(identity));
        let backends = &self.backends;
        self.backend_ids.retain(|identity, id| {
            backends
                .get(&id)
                .is_some_and(|b| (b.value.addr, b.value.port, b.value.family) == *identity)
        });
    }

    /// Names of the Services with entries.
    pub fn services(&self) -> impl Iterator<Item = &ObjectName> {
        self.services.keys()
    }

    /// Whether Service `name` has entries.
    pub fn has_service(&self, name: &ObjectName) -> bool {
        self.services.contains_key(name)
    }

    /// How many entries the desired state has, per map.
    pub fn counts(&self) -> EntryCounts {
        self.counts
    }

    /// The whole desired contents.
    pub fn maps(&self) -> MapState {
        let mut maps = MapState::default();
        for name in self.services.keys() {
            self.add_service_entries(name, &mut maps);
        }
        maps
    }

    fn add_service_entries(&self, name: &ObjectName, maps: &mut MapState) {
        for layout in self.services.get(name).into_iter().flatten() {
            maps.frontends.extend(layout.entries());
            maps.revnat
                .insert(layout.header.rev_nat_id, layout.revnat());
            maps.source_ranges
                .extend(layout.source_ranges.iter().copied());
            for id in layout.backend_ids() {
                if let Some(backend) = self.backends.get(id) {
                    maps.backends.insert(*id, backend.value);
                }
            }
        }
    }

    /// The desired entries of Service `name`, per map, in no particular
    /// order (a backend two of its frontends share is listed twice).
    pub fn service_entries(&self, name: &ObjectName) -> ServiceEntries {
        let mut entries = ServiceEntries::default();
        for layout in self.services.get(name).into_iter().flatten() {
            entries.frontends.extend(layout.entries());
            entries
                .revnat
                .push((layout.header.rev_nat_id, layout.revnat()));
            entries
                .source_ranges
                .extend(layout.source_ranges.iter().copied());
            entries.backends.extend(
                layout
                    .backend_ids()
                    .filter_map(|id| Some((*id, self.backends.get(id)?.value))),
            );
        }
        entries
    }

    /// Every source-ranges entry of every Service.
    pub fn source_ranges(&self) -> BTreeSet<SourceRangeKey> {
        self.services
            .values()
            .flatten()
            .flat_map(|layout| layout.source_ranges.iter().copied())
            .collect()
    }

    /// The Service serving the frontend with this identity.
    pub fn owner(&self, identity: &FrontendIdentity) -> Option<&ObjectName> {
        self.frontend_owners.get(identity)
    }

    /// The desired header of the frontend with this identity.
    pub fn header(&self, identity: &FrontendIdentity) -> Option<FrontendValue> {
        let owner = self.frontend_owners.get(identity)?;
        self.services
            .get(owner)?
            .iter()
            .find(|layout| frontend_identity(&layout.key) == *identity)
            .map(|layout| layout.header)
    }

    /// Whether some desired frontend has rev-NAT id `id`.
    pub fn has_revnat(&self, id: RevNatId) -> bool {
        self.revnat_ids.is_used(id)
    }

    /// Whether some Service uses backend `id`.
    pub fn has_backend(&self, id: BackendId) -> bool {
        self.backends.contains_key(&id)
    }

    /// The backends of Service `name`'s frontends (in slots or draining),
    /// as (the frontend's rev-NAT id, backend id).
    pub fn frontend_backends(
        &self,
        name: &ObjectName,
    ) -> impl Iterator<Item = (RevNatId, BackendId)> + '_ {
        self.services
            .get(name)
            .into_iter()
            .flatten()
            .flat_map(|layout| {
                layout
                    .backend_ids()
                    .map(move |id| (layout.header.rev_nat_id, *id))
            })
    }

    /// The frontends of Service `name`, as (key of the header, header).
    pub fn frontends_of(
        &self,
        name: &ObjectName,
    ) -> impl Iterator<Item = (&FrontendKey, &FrontendValue)> {
        self.services
            .get(name)
            .into_iter()
            .flatten()
            .map(|layout| (&layout.key, &layout.header))
    }

    /// Replaces the frontends of Service `name` (none removes it) and returns
    /// the ordered writes that take the maps from the previous desired state
    /// to the new one, touching nothing of other Services, plus one line per
    /// frontend or backend that could not be given entries.
    pub fn set_service(
        &mut self,
        name: &ObjectName,
        frontends: &[DesiredFrontend],
    ) -> ServiceUpdate {
        self.update_service(name, frontends, true)
    }

    /// [`DesiredState::set_service`] without working out the writes (a
    /// full sync compares with the maps' real contents instead).
    pub fn replace_service(
        &mut self,
        name: &ObjectName,
        frontends: &[DesiredFrontend],
    ) -> Vec<String> {
        self.update_service(name, frontends, false).problems
    }

    fn update_service(
        &mut self,
        name: &ObjectName,
        frontends: &[DesiredFrontend],
        with_writes: bool,
    ) -> ServiceUpdate {
        let old = self.services.remove(name).unwrap_or_default();
        let mut problems = Vec::new();
        // Kept as the Service's layouts: sized to fit (a pushed `Vec`
        // starts with room for four, and most Services have one frontend).
        let mut new = Vec::with_capacity(frontends.len());
        let mut new_backends: Vec<(BackendId, BackendValue)> = Vec::new();
        for frontend in frontends {
            let identity = desired_identity(frontend);
            if new
                .iter()
                .any(|l: &FrontendLayout| frontend_identity(&l.key) == identity)
            {
                problems.push(format!(
                    "{name} {}: listed twice, the first one kept",
                    SocketAddr::new(frontend.addr, frontend.port)
                ));
                continue;
            }
            if let Some(layout) = self.lay_out(name, frontend, &mut new_backends, &mut problems) {
                new.push(layout);
            }
        }
        new_backends.sort_by_key(|(id, _)| *id);
        new_backends.dedup_by_key(|(id, _)| *id);
        let mut old_ids: Vec<BackendId> =
            old.iter().flat_map(|l| l.backend_ids().copied()).collect();
        old_ids.sort_unstable();
        old_ids.dedup();

        let mut old_scoped = MapState::default();
        let mut new_scoped = MapState::default();
        if with_writes {
            for layout in &old {
                old_scoped.frontends.extend(layout.entries());
                old_scoped
                    .revnat
                    .insert(layout.header.rev_nat_id, layout.revnat());
                old_scoped
                    .source_ranges
                    .extend(layout.source_ranges.iter().copied());
            }
            for layout in &new {
                new_scoped.frontends.extend(layout.entries());
                new_scoped
                    .revnat
                    .insert(layout.header.rev_nat_id, layout.revnat());
                new_scoped
                    .source_ranges
                    .extend(layout.source_ranges.iter().copied());
            }
        }
        // Reference counts: the new backends first, then the old ones
        // released, so a backend this Service keeps never drops to 0.
        for (id, value) in &new_backends {
            if with_writes {
                new_scoped.backends.insert(*id, *value);
            }
            match self.backends.get_mut(id) {
                Some(used) => {
                    // Already written with this value: no write needed.
                    if with_writes && used.value == *value {
                        old_scoped.backends.insert(*id, *value);
                    }
                    used.value = *value;
                    used.services += 1;
                }
                None => {
                    self.backends.insert(
                        *id,
                        BackendUse {
                            value: *value,
                            services: 1,
                        },
                    );
                }
            }
        }
        for id in old_ids {
            let Some(used) = self.backends.get_mut(&id) else {
                continue;
            };
            used.services -= 1;
            if used.services == 0 {
                let value = used.value;
                self.backends.remove(&id);
                if with_writes {
                    old_scoped.backends.insert(id, value);
                }
                self.backend_ids
                    .release(&(value.addr, value.port, value.family));
            }
        }
        let writes = if with_writes {
            diff(&old_scoped, &new_scoped)
        } else {
            Writes::default()
        };

        let new_identities: Vec<FrontendIdentity> =
            new.iter().map(|l| frontend_identity(&l.key)).collect();
        for layout in &old {
            let identity = frontend_identity(&layout.key);
            if !new_identities.contains(&identity)
                && self.frontend_owners.get(&identity) == Some(name)
            {
                self.frontend_owners.remove(&identity);
                self.revnat_ids.release(&identity);
            }
        }
        self.counts.frontends = self.counts.frontends + new.len() - old.len();
        let entries = |layouts: &[FrontendLayout]| -> usize {
            layouts.iter().map(|l| 1 + l.backends.len()).sum()
        };
        self.counts.frontend_entries = self.counts.frontend_entries + entries(&new) - entries(&old);
        let ranges = |layouts: &[FrontendLayout]| -> usize {
            layouts.iter().map(|l| l.source_ranges.len()).sum()
        };
        self.counts.source_ranges = self.counts.source_ranges + ranges(&new) - ranges(&old);
        self.counts.backends = self.backends.len();
        if !new.is_empty() {
            self.services.insert(name.clone(), new);
        }
        ServiceUpdate { writes, problems }
    }

    /// Lays out one frontend: claims it for `service`, allocates its
    /// rev-NAT id and backend ids (adding the backends to `backends`).
    fn lay_out(
        &mut self,
        service: &ObjectName,
        frontend: &DesiredFrontend,
        backends: &mut Vec<(BackendId, BackendValue)>,
        problems: &mut Vec<String>,
    ) -> Option<FrontendLayout> {
        let identity = desired_identity(frontend);
        let (addr, port, family, _, _) = identity;
        let label = format!(
            "{service} {}",
            SocketAddr::new(frontend.addr, frontend.port)
        );
        match self.frontend_owners.get(&identity) {
            Some(owner) if owner != service => {
                problems.push(format!(
                    "{label}: already served by Service {owner}, skipped"
                ));
                return None;
            }
            Some(_) => {}
            None => {
                self.frontend_owners.insert(identity, service.clone());
            }
        }
        let Some(rev_nat_id) = self.revnat_ids.get_or_allocate(&identity) else {
            self.frontend_owners.remove(&identity);
            problems.push(format!("{label}: no free rev-NAT id (map full)"));
            return None;
        };
        let key = FrontendKey {
            addr,
            port,
            slot: 0,
            family,
            proto: frontend.proto,
            scope: frontend.scope,
            _pad: 0,
        };
        let mut ids = Vec::with_capacity(frontend.backends.len());
        for backend in &frontend.backends {
            let value = backend_value(backend);
            let Some(id) =
                self.backend_ids
                    .get_or_allocate(&(value.addr, value.port, value.family))
            else {
                problems.push(format!(
                    "{label}: backend {}: no free backend id (map full)",
                    SocketAddr::new(backend.addr, backend.port)
                ));
                continue;
            };
            if ids.len() == usize::from(u16::MAX) {
                problems.push(format!(
                    "{label}: more than {} backends, the rest left out",
                    u16::MAX
                ));
                break;
            }
            ids.push(id);
            backends.push((id, value));
        }
        // Draining backends are kept in the backends map for their flows,
        // without a slot.
        let mut draining = Vec::with_capacity(frontend.draining.len());
        for backend in &frontend.draining {
            let value = backend_value(backend);
            match self
                .backend_ids
                .get_or_allocate(&(value.addr, value.port, value.family))
            {
                Some(id) => {
                    draining.push(id);
                    backends.push((id, value));
                }
                None => problems.push(format!(
                    "{label}: backend {}: no free backend id (map full)",
                    SocketAddr::new(backend.addr, backend.port)
                )),
            }
        }
        let source_ranges: Box<[SourceRangeKey]> = frontend
            .source_ranges
            .iter()
            .map(|range| {
                SourceRangeKey::new(rev_nat_id, map_addr(range.network()).0, range.prefix_len())
            })
            .collect();
        let mut flags = frontend.flags & !FRONTEND_FLAG_SOURCE_RANGES;
        if !source_ranges.is_empty() {
            flags |= FRONTEND_FLAG_SOURCE_RANGES;
        }
        Some(FrontendLayout {
            key,
            header: FrontendValue {
                backend_id: 0,
                rev_nat_id,
                count: ids.len() as u16,
                flags,
                affinity_timeout_secs: frontend.affinity_timeout_secs,
            },
            backends: ids.into_boxed_slice(),
            draining: draining.into_boxed_slice(),
            source_ranges,
        })
    }
}

fn backend_value(backend: &DesiredBackend) -> BackendValue {
    let (addr, family) = map_addr(backend.addr);
    BackendValue {
        addr,
        port: backend.port.to_be(),
        family,
        state: backend.state.map_value(),
        flags: if backend.node_local {
            BACKEND_FLAG_NODE_LOCAL
        } else {
            0
        },
        zone: 0,
        _pad: [0; 2],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{datapath::model::MapOp, reconcile::translate::BackendState};

    /// Sets a Service and returns its writes and problems.
    fn set(
        desired: &mut DesiredState,
        service: &ObjectName,
        frontends: &[DesiredFrontend],
    ) -> (Vec<MapOp>, Vec<String>) {
        let update = desired.set_service(service, frontends);
        (update.writes.ops, update.problems)
    }
    use service_common::{FRONTEND_FLAG_CLUSTER_IP, PROTO_TCP};

    fn name(n: &str) -> ObjectName {
        ObjectName::new("default", n)
    }

    fn frontend(vip: &str, backends: &[&str]) -> DesiredFrontend {
        DesiredFrontend {
            addr: vip.parse().unwrap(),
            port: 80,
            proto: PROTO_TCP,
            flags: FRONTEND_FLAG_CLUSTER_IP,
            backends: backends
                .iter()
                .map(|b| DesiredBackend {
                    addr: b.parse().unwrap(),
                    port: 8080,
                    node_local: false,
                    state: BackendState::Active,
                })
                .collect(),
            draining: Vec::new(),
            affinity_timeout_secs: 0,
            source_ranges: Vec::new(),
            scope: service_common::SCOPE_ALL,
        }
    }

    /// Applies `ops` to `maps` one by one, checking consistency after each.
    fn apply_checked(maps: &mut MapState, ops: &[MapOp]) {
        for op in ops {
            maps.apply(op);
            maps.check_consistent()
                .unwrap_or_else(|e| panic!("after {op:?}: {e}"));
        }
    }

    fn fresh() -> DesiredState {
        DesiredState::adopting(&MapState::default(), 100, 100)
    }

    #[test]
    fn a_service_lays_out_header_slots_backends_and_revnat() {
        let mut desired = fresh();
        let (ops, problems) = set(
            &mut desired,
            &name("web"),
            &[frontend("10.96.0.10", &["10.1.1.2", "10.1.2.2"])],
        );
        assert!(problems.is_empty());
        let mut maps = MapState::default();
        apply_checked(&mut maps, &ops);
        assert_eq!(maps, desired.maps());
        assert_eq!(maps.frontends.len(), 3);
        assert_eq!(maps.backends.len(), 2);
        let (key, header) = maps.frontends.iter().find(|(k, _)| k.slot == 0).unwrap();
        assert_eq!(key.addr[..4], [10, 96, 0, 10]);
        assert_eq!(key.port, 80u16.to_be());
        assert_eq!(header.count, 2);
        assert_eq!(maps.revnat[&header.rev_nat_id].port, 80u16.to_be());
    }

    #[test]
    fn ipv6_frontends_and_backends_carry_the_ipv6_family_tag() {
        let mut desired = fresh();
        let mut dual = vec![
            frontend("10.96.0.10", &["10.1.1.2"]),
            frontend("fd00:96::10", &["fd00:1:1::2", "fd00:1:2::2"]),
        ];
        dual[1].flags = service_common::FRONTEND_FLAG_LOAD_BALANCER;
        dual[1].source_ranges = vec!["2001:db8::/32".parse().unwrap()];
        let (ops, problems) = set(&mut desired, &name("web"), &dual);
        assert!(problems.is_empty(), "{problems:?}");
        let mut maps = MapState::default();
        apply_checked(&mut maps, &ops);
        let v6: std::net::Ipv6Addr = "fd00:96::10".parse().unwrap();
        let (key, header) = maps
            .frontends
            .iter()
            .find(|(k, _)| k.slot == 0 && k.family == service_common::FAMILY_IPV6)
            .unwrap();
        assert_eq!(key.addr, v6.octets());
        assert_eq!(header.count, 2);
        assert_ne!(header.flags & FRONTEND_FLAG_SOURCE_RANGES, 0);
        let revnat = maps.revnat[&header.rev_nat_id];
        assert_eq!(
            (revnat.addr, revnat.family),
            (v6.octets(), service_common::FAMILY_IPV6)
        );
        let v6_backends: Vec<std::net::IpAddr> = maps
            .backends
            .values()
            .filter(|b| b.family == service_common::FAMILY_IPV6)
            .map(|b| crate::datapath::model::ip_from_map(&b.addr, b.family))
            .collect();
        assert_eq!(
            v6_backends,
            [
                "fd00:1:1::2".parse::<std::net::IpAddr>().unwrap(),
                "fd00:1:2::2".parse().unwrap()
            ]
        );
        // The source range: 32 bits of rev-NAT id, then the /32 prefix.
        let range = maps.source_ranges.iter().next().unwrap();
        assert_eq!(range.prefix_len, 32 + 32);
        assert_eq!(range.data.rev_nat_id(), header.rev_nat_id);
        assert_eq!(range.data.addr[..4], [0x20, 0x01, 0x0d, 0xb8]);
    }

    #[test]
    fn an_ipv6_frontend_is_not_the_ipv4_one_with_the_same_first_bytes() {
        // 10.0.0.1 is stored as 0a 00 00 01 and twelve zeros, and so is
        // a00:1:: (only the family tells them apart).
        let mut desired = fresh();
        let (_, problems) = set(
            &mut desired,
            &name("v4"),
            &[frontend("10.0.0.1", &["10.1.1.2"])],
        );
        assert!(problems.is_empty());
        let (_, problems) = set(
            &mut desired,
            &name("v6"),
            &[frontend("a00:1::", &["fd00:1:1::2"])],
        );
        assert!(problems.is_empty(), "{problems:?}");
        let maps = desired.maps();
        let headers: Vec<u8> = maps
            .frontends
            .keys()
            .filter(|k| k.slot == 0)
            .map(|k| k.family)
            .collect();
        assert_eq!(headers.len(), 2);
        assert!(headers.contains(&service_common::FAMILY_IPV4));
        assert!(headers.contains(&service_common::FAMILY_IPV6));
        let ids: BTreeSet<RevNatId> = maps.revnat.keys().copied().collect();
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn changing_one_service_writes_only_its_entries_in_a_safe_order() {
        let mut desired = fresh();
        let mut maps = MapState::default();
        let (ops, _) = set(
            &mut desired,
            &name("web"),
            &[frontend(
                "10.96.0.10",
                &["10.1.1.2", "10.1.2.2", "10.1.3.2"],
            )],
        );
        apply_checked(&mut maps, &ops);
        let (ops, _) = set(
            &mut desired,
            &name("db"),
            &[frontend("10.96.0.11", &["10.1.9.2"])],
        );
        apply_checked(&mut maps, &ops);

        let (ops, _) = set(
            &mut desired,
            &name("web"),
            &[frontend("10.96.0.10", &["10.1.1.2", "10.1.3.2"])],
        );
        apply_checked(&mut maps, &ops);
        assert_eq!(maps, desired.maps());
        assert!(ops.iter().all(|op| match op {
            MapOp::UpsertFrontend(k, _) | MapOp::DeleteFrontend(k) => k.addr[3] == 10,
            _ => true,
        }));
        // The header shrinks before the last slot goes, the backend goes last.
        let header = ops
            .iter()
            .position(|op| matches!(op, MapOp::UpsertFrontend(k, _) if k.slot == 0))
            .unwrap();
        let slot_delete = ops
            .iter()
            .position(|op| matches!(op, MapOp::DeleteFrontend(k) if k.slot == 3))
            .unwrap();
        assert!(header < slot_delete);
        assert!(matches!(ops.last(), Some(MapOp::DeleteBackend(_))));
    }

    #[test]
    fn setting_the_same_service_again_writes_nothing() {
        let mut desired = fresh();
        let frontends = [frontend("10.96.0.10", &["10.1.1.2", "10.1.2.2"])];
        set(&mut desired, &name("web"), &frontends);
        let (ops, _) = set(&mut desired, &name("web"), &frontends);
        assert!(ops.is_empty(), "{ops:?}");
    }

    #[test]
    fn a_backend_shared_by_two_services_lives_until_both_let_go() {
        let mut desired = fresh();
        let mut maps = MapState::default();
        for service in ["a", "b"] {
            let vip = if service == "a" {
                "10.96.0.1"
            } else {
                "10.96.0.2"
            };
            let (ops, _) = set(
                &mut desired,
                &name(service),
                &[frontend(vip, &["10.1.1.2"])],
            );
            apply_checked(&mut maps, &ops);
        }
        assert_eq!(maps.backends.len(), 1);
        let (ops, _) = set(&mut desired, &name("a"), &[]);
        assert!(!ops.iter().any(|op| matches!(op, MapOp::DeleteBackend(_))));
        apply_checked(&mut maps, &ops);
        let (ops, _) = set(&mut desired, &name("b"), &[]);
        apply_checked(&mut maps, &ops);
        assert_eq!(maps, MapState::default());
        assert_eq!(desired.maps(), MapState::default());
    }

    #[test]
    fn a_frontend_claimed_twice_stays_with_its_first_service() {
        let mut desired = fresh();
        let mut maps = MapState::default();
        let (ops, _) = set(
            &mut desired,
            &name("a"),
            &[frontend("10.96.0.1", &["10.1.1.2"])],
        );
        apply_checked(&mut maps, &ops);
        let (ops, problems) = set(
            &mut desired,
            &name("b"),
            &[frontend("10.96.0.1", &["10.1.2.2"])],
        );
        assert!(ops.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
        // Removing the impostor leaves the owner's entries alone.
        let (ops, _) = set(&mut desired, &name("b"), &[]);
        assert!(ops.is_empty());
        assert_eq!(maps, desired.maps());
        assert_eq!(maps.backends.len(), 1);
    }

    #[test]
    fn adoption_keeps_ids_so_a_restarted_agent_rewrites_nothing() {
        let frontends = [
            frontend("10.96.0.10", &["10.1.1.2", "10.1.2.2"]),
            frontend("10.96.0.11", &["10.1.3.2"]),
        ];
        let mut first = fresh();
        set(&mut first, &name("web"), &frontends);
        let live = first.maps();

        let mut second = DesiredState::adopting(&live, 100, 100);
        set(&mut second, &name("web"), &frontends);
        second.release_unclaimed();
        assert!(diff(&live, &second.maps()).is_empty());
    }

    #[test]
    fn adoption_drops_what_no_service_claims() {
        let mut first = fresh();
        set(
            &mut first,
            &name("gone"),
            &[frontend("10.96.0.9", &["10.1.9.2"])],
        );
        set(
            &mut first,
            &name("web"),
            &[frontend("10.96.0.10", &["10.1.1.2"])],
        );
        let mut live = first.maps();

        let mut second = DesiredState::adopting(&live, 100, 100);
        set(
            &mut second,
            &name("web"),
            &[frontend("10.96.0.10", &["10.1.1.2"])],
        );
        second.release_unclaimed();
        let ops = diff(&live, &second.maps()).ops;
        apply_checked(&mut live, &ops);
        assert_eq!(live, second.maps());
        assert_eq!(live.backends.len(), 1);
        assert_eq!(live.revnat.len(), 1);
    }

    #[test]
    fn ids_run_out_cleanly_when_the_maps_are_full() {
        let mut desired = DesiredState::adopting(&MapState::default(), 3, 100);
        let mut problems = Vec::new();
        for (i, vip) in ["10.96.0.1", "10.96.0.2", "10.96.0.3"].iter().enumerate() {
            let service = format!("s{i}");
            let (_, p) = set(
                &mut desired,
                &name(&service),
                &[frontend(vip, &["10.1.1.2"])],
            );
            problems.extend(p);
        }
        let maps = desired.maps();
        assert_eq!(maps.revnat.len(), 2);
        assert_eq!(problems.len(), 1);
        maps.check_consistent().unwrap();
    }

    #[test]
    fn entry_counts_follow_the_desired_maps_with_or_without_writes() {
        let mut desired = fresh();
        let check = |desired: &DesiredState| {
            let maps = desired.maps();
            let counts = desired.counts();
            assert_eq!(counts.of(MapName::Frontends), maps.frontends.len());
            assert_eq!(counts.of(MapName::Backends), maps.backends.len());
            assert_eq!(counts.of(MapName::RevNat), maps.revnat.len());
        };
        set(
            &mut desired,
            &name("a"),
            &[frontend("10.96.0.1", &["10.1.1.2", "10.1.1.3"])],
        );
        desired.replace_service(&name("b"), &[frontend("10.96.0.2", &["10.1.1.2"])]);
        check(&desired);
        desired.replace_service(&name("a"), &[frontend("10.96.0.1", &["10.1.1.3"])]);
        check(&desired);
        set(&mut desired, &name("b"), &[]);
        check(&desired);
        assert_eq!(desired.counts().frontends, 1);
    }

    fn rev_nat_id(maps: &MapState, vip: u8) -> RevNatId {
        maps.frontends
            .iter()
            .find(|(k, _)| k.slot == 0 && k.addr[3] == vip)
            .map(|(_, v)| v.rev_nat_id)
            .unwrap()
    }

    #[test]
    fn a_released_rev_nat_id_is_held_until_its_flows_are_gone() {
        // Three rev-NAT ids (1, 2) and round-robin: without holding, the
        // third Service would get the first one's id back at once.
        let mut desired = DesiredState::adopting(&MapState::default(), 3, 100);
        set(
            &mut desired,
            &name("a"),
            &[frontend("10.96.0.1", &["10.1.1.2"])],
        );
        set(
            &mut desired,
            &name("b"),
            &[frontend("10.96.0.2", &["10.1.1.2"])],
        );
        let released = rev_nat_id(&desired.maps(), 1);
        set(&mut desired, &name("a"), &[]);
        let (_, problems) = set(
            &mut desired,
            &name("c"),
            &[frontend("10.96.0.3", &["10.1.1.2"])],
        );
        assert_eq!(
            problems.len(),
            1,
            "the held id was handed out: {problems:?}"
        );
        // Once no entry names it, it is free again.
        desired.reuse_rev_nat_ids([released]);
        let (_, problems) = set(
            &mut desired,
            &name("c"),
            &[frontend("10.96.0.3", &["10.1.1.2"])],
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(rev_nat_id(&desired.maps(), 3), released);
    }

    #[test]
    fn rev_nat_ids_named_only_by_flows_are_held_until_reused() {
        let mut desired = DesiredState::adopting(&MapState::default(), 4, 100);
        set(
            &mut desired,
            &name("a"),
            &[frontend("10.96.0.1", &["10.1.1.2"])],
        );
        let live = rev_nat_id(&desired.maps(), 1);
        // A restarted agent finds flows naming ids 2 (no frontend) and the
        // live one: only 2 is held.
        assert_eq!(desired.hold_rev_nat_ids([2, live, 0, 99]), [2]);
        set(
            &mut desired,
            &name("b"),
            &[frontend("10.96.0.2", &["10.1.1.2"])],
        );
        assert_eq!(rev_nat_id(&desired.maps(), 2), 3);
        desired.reuse_rev_nat_ids([2]);
        set(
            &mut desired,
            &name("c"),
            &[frontend("10.96.0.3", &["10.1.1.2"])],
        );
        assert_eq!(rev_nat_id(&desired.maps(), 3), 2);
    }

    #[test]
    fn draining_backends_stay_in_the_backends_map_without_a_slot() {
        use service_common::{
            BACKEND_STATE_ACTIVE, BACKEND_STATE_NOT_SERVING, BACKEND_STATE_TERMINATING,
        };
        let with_states = |slots: &[&str], draining: &[(&str, BackendState)]| {
            let mut f = frontend("10.96.0.10", slots);
            f.draining = draining
                .iter()
                .map(|(addr, state)| DesiredBackend {
                    state: *state,
                    ..frontend("10.96.0.10", &[addr]).backends[0]
                })
                .collect();
            f
        };
        let states = |maps: &MapState| -> BTreeMap<u8, u8> {
            maps.backends
                .values()
                .map(|b| (b.addr[3], b.state))
                .collect()
        };
        let mut desired = fresh();
        let mut maps = MapState::default();
        let (ops, _) = set(
            &mut desired,
            &name("web"),
            &[with_states(&["10.1.1.2", "10.1.1.3", "10.1.1.4"], &[])],
        );
        apply_checked(&mut maps, &ops);
        // .3 terminates (serving), .4 stops serving: both leave the slots,
        // keep their entries and change state; nothing is deleted.
        let (ops, _) = set(
            &mut desired,
            &name("web"),
            &[with_states(
                &["10.1.1.2"],
                &[
                    ("10.1.1.3", BackendState::Terminating),
                    ("10.1.1.4", BackendState::NotServing),
                ],
            )],
        );
        assert!(!ops.iter().any(|op| matches!(op, MapOp::DeleteBackend(_))));
        apply_checked(&mut maps, &ops);
        assert_eq!(maps, desired.maps());
        assert_eq!(
            states(&maps),
            BTreeMap::from([
                (2, BACKEND_STATE_ACTIVE),
                (3, BACKEND_STATE_TERMINATING),
                (4, BACKEND_STATE_NOT_SERVING)
            ])
        );
        assert_eq!(
            maps.frontends.iter().filter(|(k, _)| k.slot != 0).count(),
            1
        );
        // Gone from every slice: deleted.
        let (ops, _) = set(
            &mut desired,
            &name("web"),
            &[with_states(
                &["10.1.1.2"],
                &[("10.1.1.3", BackendState::Terminating)],
            )],
        );
        assert!(ops.iter().any(|op| matches!(op, MapOp::DeleteBackend(_))));
        apply_checked(&mut maps, &ops);
        assert_eq!(states(&maps).len(), 2);
    }

    #[test]
    fn a_restarted_agent_goes_on_after_the_last_ids_handed_out() {
        let mut first = fresh();
        first.set_service(&name("a"), &[frontend("10.96.0.1", &["10.1.1.2"])]);
        first.set_service(&name("b"), &[frontend("10.96.0.2", &["10.1.1.3"])]);
        first.set_service(&name("a"), &[]);
        let cursors = first.id_cursors();
        assert_eq!(
            cursors,
            IdCursors {
                next_rev_nat_id: 3,
                next_backend_id: 3
            }
        );
        // Only b's entries are left; a's ids (1) may still be named by
        // conntrack entries.
        let mut second = DesiredState::adopting(&first.maps(), 100, 100);
        second.resume_ids(&cursors);
        second.set_service(&name("b"), &[frontend("10.96.0.2", &["10.1.1.3"])]);
        second.set_service(&name("c"), &[frontend("10.96.0.3", &["10.1.1.4"])]);
        let maps = second.maps();
        assert_eq!(rev_nat_id(&maps, 3), 3);
        assert!(maps.backends.contains_key(&3));
        // Without the cursors it would have started again at 1.
        let mut forgetful = DesiredState::adopting(&first.maps(), 100, 100);
        forgetful.set_service(&name("b"), &[frontend("10.96.0.2", &["10.1.1.3"])]);
        forgetful.set_service(&name("c"), &[frontend("10.96.0.3", &["10.1.1.4"])]);
        assert_eq!(rev_nat_id(&forgetful.maps(), 3), 1);
        // Nonsense cursors are ignored.
        let mut third = DesiredState::adopting(&MapState::default(), 100, 100);
        third.resume_ids(&IdCursors {
            next_rev_nat_id: 100,
            next_backend_id: 0,
        });
        assert_eq!(third.id_cursors().next_rev_nat_id, 1);
    }

    #[test]
    fn source_ranges_are_written_before_the_header_checks_them_and_deleted_after() {
        let mut desired = fresh();
        let mut maps = MapState::default();
        let mut lb = frontend("10.99.0.100", &["10.1.1.2"]);
        lb.flags = service_common::FRONTEND_FLAG_LOAD_BALANCER;
        lb.source_ranges = vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.168.0.0/16".parse().unwrap(),
        ];
        let (ops, problems) = set(&mut desired, &name("lb"), std::slice::from_ref(&lb));
        assert!(problems.is_empty());
        apply_checked(&mut maps, &ops);
        assert_eq!(maps, desired.maps());
        assert_eq!(maps.source_ranges.len(), 2);
        let (_, header) = maps.frontends.iter().find(|(k, _)| k.slot == 0).unwrap();
        assert_ne!(header.flags & FRONTEND_FLAG_SOURCE_RANGES, 0);
        let range = maps.source_ranges.first().unwrap();
        assert_eq!(range.data.rev_nat_id(), header.rev_nat_id);
        assert_eq!(
            (range.prefix_len, &range.data.addr[..4]),
            (32 + 8, &[10, 0, 0, 0][..])
        );
        assert_eq!(desired.counts().of(MapName::SourceRanges), 2);
        // Changed: the new range lands before the old one goes.
        lb.source_ranges = vec!["172.16.0.0/12".parse().unwrap()];
        let (ops, _) = set(&mut desired, &name("lb"), std::slice::from_ref(&lb));
        apply_checked(&mut maps, &ops);
        assert_eq!(maps, desired.maps());
        // None: the header stops checking before the ranges go.
        lb.source_ranges.clear();
        let (ops, _) = set(&mut desired, &name("lb"), std::slice::from_ref(&lb));
        apply_checked(&mut maps, &ops);
        assert_eq!(maps, desired.maps());
        assert!(maps.source_ranges.is_empty());
        let (_, header) = maps.frontends.iter().find(|(k, _)| k.slot == 0).unwrap();
        assert_eq!(header.flags & FRONTEND_FLAG_SOURCE_RANGES, 0);
        // Deleted with its Service.
        lb.source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
        let (ops, _) = set(&mut desired, &name("lb"), std::slice::from_ref(&lb));
        apply_checked(&mut maps, &ops);
        let (ops, _) = set(&mut desired, &name("lb"), &[]);
        apply_checked(&mut maps, &ops);
        assert_eq!(maps, MapState::default());
        assert_eq!(desired.counts().of(MapName::SourceRanges), 0);
    }

    #[test]
    fn the_affinity_timeout_reaches_the_header() {
        let mut desired = fresh();
        let mut web = frontend("10.96.0.10", &["10.1.1.2"]);
        web.flags |= service_common::FRONTEND_FLAG_AFFINITY;
        web.affinity_timeout_secs = 10_800;
        let (ops, _) = set(&mut desired, &name("web"), &[web]);
        let mut maps = MapState::default();
        apply_checked(&mut maps, &ops);
        let (_, header) = maps.frontends.iter().find(|(k, _)| k.slot == 0).unwrap();
        assert_eq!(header.affinity_timeout_secs, 10_800);
        assert_ne!(header.flags & service_common::FRONTEND_FLAG_AFFINITY, 0);
    }
}
