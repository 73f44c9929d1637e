//! The desired map contents, kept per Service so one Service's change is
//! laid out and diffed on its own: [`DesiredState::set_service`] returns just
//! the ordered writes for that Service. Rev-NAT and backend ids stay stable
//! while their frontend or backend lives (and across agent restarts, by
//! adopting the ids found in the maps); backends shared by several Services
//! are reference-counted and deleted when the last one lets go.

use std::collections::{BTreeMap, BTreeSet};

use service_common::{
    BACKEND_FLAG_NODE_LOCAL, BackendId, BackendValue, FrontendKey, FrontendValue, IdCursors,
    MapAddr, RevNatId, RevNatValue, SCOPE_ALL,
};

use super::{
    cluster::ObjectName,
    diff::diff,
    translate::{DesiredBackend, DesiredFrontend},
};
use crate::datapath::model::{MapOp, MapState, map_addr};

/// Identity of a frontend (address, port in network order, protocol,
/// scope): what a rev-NAT id is allocated for.
type FrontendIdentity = (MapAddr, u16, u8, u8);
/// Identity of a backend (address, port in network order, family): what a
/// backend id is allocated for.
type BackendIdentity = (MapAddr, u16, u8);

/// Allocates small integer ids to keys and keeps them stable while the key
/// lives, so an unchanged Service keeps its entries byte for byte. Ids are
/// handed out round-robin, so a freed id is not reused at once.
#[derive(Clone, Debug)]
struct IdAllocator<K> {
    ids: BTreeMap<K, u32>,
    used: BTreeSet<u32>,
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
            used: BTreeSet::new(),
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
            if id != 0 && id < self.limit && !self.used.contains(&id) && self.held.insert(id) {
                held.push(id);
            }
        }
        held
    }

    /// Frees `id`, or holds it.
    fn free(used: &mut BTreeSet<u32>, held: &mut BTreeSet<u32>, holds: bool, id: u32) {
        used.remove(&id);
        if holds {
            held.insert(id);
        }
    }

    /// Records an id already in use (adopted from the maps).
    fn adopt(&mut self, key: K, id: u32) {
        if id != 0 && id < self.limit && !self.used.contains(&id) {
            self.ids.insert(key, id);
            self.used.insert(id);
        }
    }

    /// The key's id, allocating a free one if needed; `None` when all are taken.
    fn get_or_allocate(&mut self, key: &K) -> Option<u32> {
        if let Some(id) = self.ids.get(key) {
            return Some(*id);
        }
        if (self.used.len() + self.held.len()) as u64 >= u64::from(self.limit.saturating_sub(1)) {
            return None;
        }
        while self.used.contains(&self.next) || self.held.contains(&self.next) || self.next == 0 {
            self.next = if self.next + 1 >= self.limit {
                1
            } else {
                self.next + 1
            };
        }
        let id = self.next;
        self.next = if id + 1 >= self.limit { 1 } else { id + 1 };
        self.used.insert(id);
        self.ids.insert(key.clone(), id);
        Some(id)
    }

    /// Frees (or holds) the key's id.
    fn release(&mut self, key: &K) {
        if let Some(id) = self.ids.remove(key) {
            Self::free(&mut self.used, &mut self.held, self.holds_released, id);
        }
    }

    /// Frees (or holds) the ids of every key not in `live`.
    fn retain(&mut self, live: impl Fn(&K) -> bool) {
        let (used, held, holds) = (&mut self.used, &mut self.held, self.holds_released);
        self.ids.retain(|key, id| {
            let keep = live(key);
            if !keep {
                Self::free(used, held, holds, *id);
            }
            keep
        });
    }
}

/// One Service's share of the maps.
#[derive(Clone, Debug, Default)]
struct Fragment {
    frontends: BTreeMap<FrontendKey, FrontendValue>,
    revnat: BTreeMap<RevNatId, RevNatValue>,
    backends: BTreeMap<BackendId, BackendValue>,
    identities: BTreeSet<FrontendIdentity>,
}

/// The desired contents of the maps, by Service.
#[derive(Clone, Debug)]
pub struct DesiredState {
    revnat_ids: IdAllocator<FrontendIdentity>,
    backend_ids: IdAllocator<BackendIdentity>,
    services: BTreeMap<ObjectName, Fragment>,
    /// How many Services use each backend.
    backend_refs: BTreeMap<BackendId, usize>,
    /// Each backend's value as last written.
    backend_values: BTreeMap<BackendId, BackendValue>,
    /// Which Service serves each frontend (the first one to claim it).
    frontend_owners: BTreeMap<FrontendIdentity, ObjectName>,
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
            backend_refs: BTreeMap::new(),
            backend_values: BTreeMap::new(),
            frontend_owners: BTreeMap::new(),
        };
        for (key, value) in current.frontends.iter().filter(|(k, _)| k.slot == 0) {
            state
                .revnat_ids
                .adopt((key.addr, key.port, key.proto, key.scope), value.rev_nat_id);
        }
        for (id, value) in &current.backends {
            state
                .backend_ids
                .adopt((value.addr, value.port, value.family), *id);
        }
        state
    }

    /// Frees adopted ids that no Service claimed (their entries are stale).
    pub fn release_unclaimed(&mut self) {
        let owners = &self.frontend_owners;
        self.revnat_ids
            .retain(|identity| owners.contains_key(identity));
        let values = &self.backend_values;
        let backend_ids: BTreeSet<BackendIdentity> = values
            .values()
            .map(|v| (v.addr, v.port, v.family))
            .collect();
        self.backend_ids
            .retain(|identity| backend_ids.contains(identity));
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

    /// Names of the Services with entries.
    pub fn services(&self) -> impl Iterator<Item = &ObjectName> {
        self.services.keys()
    }

    /// The whole desired contents.
    pub fn maps(&self) -> MapState {
        let mut maps = MapState::default();
        for fragment in self.services.values() {
            maps.frontends.extend(fragment.frontends.iter());
            maps.revnat.extend(fragment.revnat.iter());
        }
        maps.backends = self.backend_values.clone();
        maps
    }

    /// Replaces the frontends of Service `name` (none removes it) and returns
    /// the ordered writes that take the maps from the previous desired state
    /// to the new one, touching nothing of other Services, plus one line per
    /// frontend or backend that could not be given entries.
    pub fn set_service(
        &mut self,
        name: &ObjectName,
        frontends: &[DesiredFrontend],
    ) -> (Vec<MapOp>, Vec<String>) {
        let old = self.services.remove(name).unwrap_or_default();
        let mut problems = Vec::new();
        let mut new = Fragment::default();
        for frontend in frontends {
            self.lay_out(name, frontend, &mut new, &mut problems);
        }

        // Reference counts: the new fragment's backends first, then the old
        // one's released, so a backend kept by this Service never drops to 0.
        for id in new.backends.keys() {
            *self.backend_refs.entry(*id).or_default() += 1;
        }
        let mut old_scoped = MapState {
            frontends: old.frontends,
            revnat: old.revnat,
            backends: BTreeMap::new(),
        };
        for (id, value) in &old.backends {
            let refs = self.backend_refs.entry(*id).or_default();
            *refs = refs.saturating_sub(1);
            if *refs == 0 {
                self.backend_refs.remove(id);
                old_scoped.backends.insert(*id, *value);
                self.backend_values.remove(id);
                self.backend_ids
                    .release(&(value.addr, value.port, value.family));
            }
        }
        // Backends whose value is already written need no write.
        for (id, value) in &new.backends {
            if self.backend_values.get(id) == Some(value) {
                old_scoped.backends.insert(*id, *value);
            }
            self.backend_values.insert(*id, *value);
        }
        let new_scoped = MapState {
            frontends: new.frontends.clone(),
            revnat: new.revnat.clone(),
            backends: new.backends.clone(),
        };
        let ops = diff(&old_scoped, &new_scoped);

        for identity in old.identities.difference(&new.identities) {
            if self.frontend_owners.get(identity) == Some(name) {
                self.frontend_owners.remove(identity);
                self.revnat_ids.release(identity);
            }
        }
        if !new.frontends.is_empty() || !new.identities.is_empty() {
            self.services.insert(name.clone(), new);
        }
        (ops, problems)
    }

    /// Adds one frontend's header, slots, rev-NAT entry and backends to `fragment`.
    fn lay_out(
        &mut self,
        service: &ObjectName,
        frontend: &DesiredFrontend,
        fragment: &mut Fragment,
        problems: &mut Vec<String>,
    ) {
        let (addr, family) = map_addr(frontend.addr);
        let port = frontend.port.to_be();
        let identity = (addr, port, frontend.proto, SCOPE_ALL);
        let label = format!("{service} {}:{}", frontend.addr, frontend.port);
        match self.frontend_owners.get(&identity) {
            Some(owner) if owner != service => {
                problems.push(format!(
                    "{label}: already served by Service {owner}, skipped"
                ));
                return;
            }
            Some(_) => {}
            None => {
                self.frontend_owners.insert(identity, service.clone());
            }
        }
        let Some(rev_nat_id) = self.revnat_ids.get_or_allocate(&identity) else {
            self.frontend_owners.remove(&identity);
            problems.push(format!("{label}: no free rev-NAT id (map full)"));
            return;
        };
        fragment.identities.insert(identity);
        let key = FrontendKey {
            addr,
            port,
            slot: 0,
            family,
            proto: frontend.proto,
            scope: SCOPE_ALL,
            _pad: 0,
        };
        // Draining backends are kept in the backends map for their flows,
        // without a slot.
        for backend in &frontend.draining {
            if let Some((id, value)) = self.backend_entry(&label, backend, problems) {
                fragment.backends.insert(id, value);
            }
        }
        let mut slot: u16 = 0;
        for backend in &frontend.backends {
            let Some((id, value)) = self.backend_entry(&label, backend, problems) else {
                continue;
            };
            let Some(next) = slot.checked_add(1) else {
                problems.push(format!(
                    "{label}: more than {} backends, the rest left out",
                    u16::MAX
                ));
                break;
            };
            slot = next;
            fragment.backends.insert(id, value);
            fragment.frontends.insert(
                FrontendKey { slot, ..key },
                FrontendValue {
                    backend_id: id,
                    ..FrontendValue::default()
                },
            );
        }
        fragment.frontends.insert(
            key,
            FrontendValue {
                backend_id: 0,
                rev_nat_id,
                count: slot,
                flags: frontend.flags,
                affinity_timeout_secs: 0,
            },
        );
        fragment.revnat.insert(
            rev_nat_id,
            RevNatValue {
                addr,
                port,
                family,
                _pad: 0,
            },
        );
    }

    /// The id and value of `backend` of frontend `label`, allocating its
    /// id if needed; `None` (with a line in `problems`) when no id is free.
    fn backend_entry(
        &mut self,
        label: &str,
        backend: &DesiredBackend,
        problems: &mut Vec<String>,
    ) -> Option<(BackendId, BackendValue)> {
        let value = backend_value(backend);
        let id = self
            .backend_ids
            .get_or_allocate(&(value.addr, value.port, value.family));
        if id.is_none() {
            problems.push(format!(
                "{label}: backend {}:{}: no free backend id (map full)",
                backend.addr, backend.port
            ));
        }
        Some((id?, value))
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
    use crate::{datapath::model::MapWriter as _, reconcile::translate::BackendState};
    use service_common::{FRONTEND_FLAG_CLUSTER_IP, PROTO_TCP};

    fn name(n: &str) -> ObjectName {
        ObjectName {
            namespace: "default".into(),
            name: n.into(),
        }
    }

    fn frontend(service: &str, vip: &str, backends: &[&str]) -> DesiredFrontend {
        DesiredFrontend {
            service: name(service),
            port_name: "http".into(),
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
        }
    }

    /// Applies `ops` to `maps` one by one, checking consistency after each.
    fn apply_checked(maps: &mut MapState, ops: &[MapOp]) {
        for op in ops {
            maps.apply(op).unwrap();
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
        let (ops, problems) = desired.set_service(
            &name("web"),
            &[frontend("web", "10.96.0.10", &["10.1.1.2", "10.1.2.2"])],
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
    fn changing_one_service_writes_only_its_entries_in_a_safe_order() {
        let mut desired = fresh();
        let mut maps = MapState::default();
        let (ops, _) = desired.set_service(
            &name("web"),
            &[frontend(
                "web",
                "10.96.0.10",
                &["10.1.1.2", "10.1.2.2", "10.1.3.2"],
            )],
        );
        apply_checked(&mut maps, &ops);
        let (ops, _) =
            desired.set_service(&name("db"), &[frontend("db", "10.96.0.11", &["10.1.9.2"])]);
        apply_checked(&mut maps, &ops);

        let (ops, _) = desired.set_service(
            &name("web"),
            &[frontend("web", "10.96.0.10", &["10.1.1.2", "10.1.3.2"])],
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

    /// `frontend` with its backends in `slots` taking new flows and
    /// `draining` ones (address, state) kept for their flows.
    fn with_states(
        service: &str,
        slots: &[&str],
        draining: &[(&str, BackendState)],
    ) -> DesiredFrontend {
        let mut f = frontend(service, "10.96.0.10", slots);
        f.draining = draining
            .iter()
            .map(|(addr, state)| DesiredBackend {
                state: *state,
                ..frontend(service, "10.96.0.10", &[addr]).backends[0]
            })
            .collect();
        f
    }

    /// Backend address (last octet) -> `BACKEND_STATE_*`, and the backend
    /// ids in the slots.
    fn backend_states(maps: &MapState) -> (BTreeMap<u8, u8>, BTreeSet<BackendId>) {
        let states = maps
            .backends
            .values()
            .map(|b| (b.addr[3], b.state))
            .collect();
        let slotted = maps
            .frontends
            .iter()
            .filter(|(k, _)| k.slot != 0)
            .map(|(_, v)| v.backend_id)
            .collect();
        (states, slotted)
    }

    #[test]
    fn draining_backends_stay_in_the_backends_map_without_a_slot() {
        use service_common::{
            BACKEND_STATE_ACTIVE, BACKEND_STATE_NOT_SERVING, BACKEND_STATE_TERMINATING,
        };
        let mut desired = fresh();
        let mut maps = MapState::default();
        let (ops, _) = desired.set_service(
            &name("web"),
            &[with_states(
                "web",
                &["10.1.1.2", "10.1.1.3", "10.1.1.4"],
                &[],
            )],
        );
        apply_checked(&mut maps, &ops);
        let ids: BTreeMap<u8, BackendId> = maps
            .backends
            .iter()
            .map(|(id, b)| (b.addr[3], *id))
            .collect();

        // .3 terminates (serving), .4 stops serving: both leave the slots,
        // keep their ids and change state; nothing is deleted.
        let (ops, _) = desired.set_service(
            &name("web"),
            &[with_states(
                "web",
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
        let (states, slotted) = backend_states(&maps);
        assert_eq!(
            states,
            BTreeMap::from([
                (2, BACKEND_STATE_ACTIVE),
                (3, BACKEND_STATE_TERMINATING),
                (4, BACKEND_STATE_NOT_SERVING)
            ])
        );
        assert_eq!(slotted, BTreeSet::from([ids[&2]]));
        let kept: BTreeMap<u8, BackendId> = maps
            .backends
            .iter()
            .map(|(id, b)| (b.addr[3], *id))
            .collect();
        assert_eq!(kept, ids);

        // Gone from every slice: deleted.
        let (ops, _) = desired.set_service(
            &name("web"),
            &[with_states(
                "web",
                &["10.1.1.2"],
                &[("10.1.1.3", BackendState::Terminating)],
            )],
        );
        assert!(ops.contains(&MapOp::DeleteBackend(ids[&4])));
        apply_checked(&mut maps, &ops);
        assert_eq!(backend_states(&maps).0.len(), 2);
    }

    #[test]
    fn setting_the_same_service_again_writes_nothing() {
        let mut desired = fresh();
        let frontends = [frontend("web", "10.96.0.10", &["10.1.1.2", "10.1.2.2"])];
        desired.set_service(&name("web"), &frontends);
        let (ops, _) = desired.set_service(&name("web"), &frontends);
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
            let (ops, _) =
                desired.set_service(&name(service), &[frontend(service, vip, &["10.1.1.2"])]);
            apply_checked(&mut maps, &ops);
        }
        assert_eq!(maps.backends.len(), 1);
        let (ops, _) = desired.set_service(&name("a"), &[]);
        assert!(!ops.iter().any(|op| matches!(op, MapOp::DeleteBackend(_))));
        apply_checked(&mut maps, &ops);
        let (ops, _) = desired.set_service(&name("b"), &[]);
        apply_checked(&mut maps, &ops);
        assert_eq!(maps, MapState::default());
        assert_eq!(desired.maps(), MapState::default());
    }

    #[test]
    fn a_frontend_claimed_twice_stays_with_its_first_service() {
        let mut desired = fresh();
        let mut maps = MapState::default();
        let (ops, _) =
            desired.set_service(&name("a"), &[frontend("a", "10.96.0.1", &["10.1.1.2"])]);
        apply_checked(&mut maps, &ops);
        let (ops, problems) =
            desired.set_service(&name("b"), &[frontend("b", "10.96.0.1", &["10.1.2.2"])]);
        assert!(ops.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
        // Removing the impostor leaves the owner's entries alone.
        let (ops, _) = desired.set_service(&name("b"), &[]);
        assert!(ops.is_empty());
        assert_eq!(maps, desired.maps());
        assert_eq!(maps.backends.len(), 1);
    }

    #[test]
    fn adoption_keeps_ids_so_a_restarted_agent_rewrites_nothing() {
        let frontends = [
            frontend("web", "10.96.0.10", &["10.1.1.2", "10.1.2.2"]),
            frontend("web", "10.96.0.11", &["10.1.3.2"]),
        ];
        let mut first = fresh();
        first.set_service(&name("web"), &frontends);
        let live = first.maps();

        let mut second = DesiredState::adopting(&live, 100, 100);
        second.set_service(&name("web"), &frontends);
        second.release_unclaimed();
        assert!(diff(&live, &second.maps()).is_empty());
    }

    #[test]
    fn adoption_drops_what_no_service_claims() {
        let mut first = fresh();
        first.set_service(
            &name("gone"),
            &[frontend("gone", "10.96.0.9", &["10.1.9.2"])],
        );
        first.set_service(
            &name("web"),
            &[frontend("web", "10.96.0.10", &["10.1.1.2"])],
        );
        let mut live = first.maps();

        let mut second = DesiredState::adopting(&live, 100, 100);
        second.set_service(
            &name("web"),
            &[frontend("web", "10.96.0.10", &["10.1.1.2"])],
        );
        second.release_unclaimed();
        let ops = diff(&live, &second.maps());
        apply_checked(&mut live, &ops);
        assert_eq!(live, second.maps());
        assert_eq!(live.backends.len(), 1);
        assert_eq!(live.revnat.len(), 1);
    }

    /// The rev-NAT id of the frontend on `vip`.
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
        desired.set_service(&name("a"), &[frontend("a", "10.96.0.1", &["10.1.1.2"])]);
        desired.set_service(&name("b"), &[frontend("b", "10.96.0.2", &["10.1.1.2"])]);
        let released = rev_nat_id(&desired.maps(), 1);
        desired.set_service(&name("a"), &[]);
        let (_, problems) =
            desired.set_service(&name("c"), &[frontend("c", "10.96.0.3", &["10.1.1.2"])]);
        assert_eq!(
            problems.len(),
            1,
            "the held id was handed out: {problems:?}"
        );
        // Once no entry names it, it is free again.
        desired.reuse_rev_nat_ids([released]);
        let (_, problems) =
            desired.set_service(&name("c"), &[frontend("c", "10.96.0.3", &["10.1.1.2"])]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(rev_nat_id(&desired.maps(), 3), released);
    }

    #[test]
    fn rev_nat_ids_named_only_by_flows_are_held_until_reused() {
        let mut desired = DesiredState::adopting(&MapState::default(), 4, 100);
        desired.set_service(&name("a"), &[frontend("a", "10.96.0.1", &["10.1.1.2"])]);
        let live = rev_nat_id(&desired.maps(), 1);
        // A restarted agent finds flows naming ids 2 (no frontend) and the
        // live one: only 2 is held.
        assert_eq!(desired.hold_rev_nat_ids([2, live, 0, 99]), [2]);
        desired.set_service(&name("b"), &[frontend("b", "10.96.0.2", &["10.1.1.2"])]);
        assert_eq!(rev_nat_id(&desired.maps(), 2), 3);
        desired.reuse_rev_nat_ids([2]);
        desired.set_service(&name("c"), &[frontend("c", "10.96.0.3", &["10.1.1.2"])]);
        assert_eq!(rev_nat_id(&desired.maps(), 3), 2);
    }

    #[test]
    fn a_restarted_agent_goes_on_after_the_last_ids_handed_out() {
        let mut first = fresh();
        first.set_service(&name("a"), &[frontend("a", "10.96.0.1", &["10.1.1.2"])]);
        first.set_service(&name("b"), &[frontend("b", "10.96.0.2", &["10.1.1.3"])]);
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
        second.set_service(&name("b"), &[frontend("b", "10.96.0.2", &["10.1.1.3"])]);
        second.set_service(&name("c"), &[frontend("c", "10.96.0.3", &["10.1.1.4"])]);
        let maps = second.maps();
        assert_eq!(rev_nat_id(&maps, 3), 3);
        assert!(maps.backends.contains_key(&3));
        // Without the cursors it would have started again at 1.
        let mut forgetful = DesiredState::adopting(&first.maps(), 100, 100);
        forgetful.set_service(&name("b"), &[frontend("b", "10.96.0.2", &["10.1.1.3"])]);
        forgetful.set_service(&name("c"), &[frontend("c", "10.96.0.3", &["10.1.1.4"])]);
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
    fn ids_run_out_cleanly_when_the_maps_are_full() {
        let mut desired = DesiredState::adopting(&MapState::default(), 3, 100);
        let mut problems = Vec::new();
        for (i, vip) in ["10.96.0.1", "10.96.0.2", "10.96.0.3"].iter().enumerate() {
            let service = format!("s{i}");
            let (_, p) =
                desired.set_service(&name(&service), &[frontend(&service, vip, &["10.1.1.2"])]);
            problems.extend(p);
        }
        let maps = desired.maps();
        assert_eq!(maps.revnat.len(), 2);
        assert_eq!(problems.len(), 1);
        maps.check_consistent().unwrap();
    }
}
