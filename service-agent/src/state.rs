//! The datapath's map contents as plain data ([`MapState`]), how a
//! translation becomes one (with stable ids), and the ordered list of writes
//! ([`MapOp`]) that turns the current contents into the desired ones.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use service_common::{
    BACKEND_FLAG_NODE_LOCAL, BACKEND_STATE_ACTIVE, BACKEND_STATE_TERMINATING, BackendId,
    BackendValue, FAMILY_IPV4, FAMILY_IPV6, FrontendKey, FrontendValue, MapAddr, RevNatId,
    RevNatValue, SCOPE_ALL,
};

use crate::translate::{DesiredBackend, DesiredFrontend};

/// The contents of the frontends, backends and reverse-NAT maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    /// Frontends map: headers (slot 0) and backend slots.
    pub frontends: BTreeMap<FrontendKey, FrontendValue>,
    /// Backends map.
    pub backends: BTreeMap<BackendId, BackendValue>,
    /// Reverse-NAT map.
    pub revnat: BTreeMap<RevNatId, RevNatValue>,
}

/// One write to the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// Insert or replace a backend.
    UpsertBackend(BackendId, BackendValue),
    /// Insert or replace a reverse-NAT entry.
    UpsertRevNat(RevNatId, RevNatValue),
    /// Insert or replace a frontend header or slot.
    UpsertFrontend(FrontendKey, FrontendValue),
    /// Delete a frontend header or slot.
    DeleteFrontend(FrontendKey),
    /// Delete a reverse-NAT entry.
    DeleteRevNat(RevNatId),
    /// Delete a backend.
    DeleteBackend(BackendId),
}

/// Something that applies [`MapOp`]s: the kernel maps, or a [`MapState`] in
/// memory (which is how the diff's ordering is tested without a kernel).
pub trait MapWriter {
    /// The error a write can fail with.
    type Error;
    /// Applies one write.
    fn apply(&mut self, op: &MapOp) -> Result<(), Self::Error>;
}

impl MapWriter for MapState {
    type Error = std::convert::Infallible;

    fn apply(&mut self, op: &MapOp) -> Result<(), Self::Error> {
        match *op {
            MapOp::UpsertBackend(id, value) => {
                self.backends.insert(id, value);
            }
            MapOp::UpsertRevNat(id, value) => {
                self.revnat.insert(id, value);
            }
            MapOp::UpsertFrontend(key, value) => {
                self.frontends.insert(key, value);
            }
            MapOp::DeleteFrontend(key) => {
                self.frontends.remove(&key);
            }
            MapOp::DeleteRevNat(id) => {
                self.revnat.remove(&id);
            }
            MapOp::DeleteBackend(id) => {
                self.backends.remove(&id);
            }
        }
        Ok(())
    }
}

impl MapState {
    /// Checks what the datapath relies on at every moment: each header's
    /// slots exist, each slot names an existing backend, and each header's
    /// rev-NAT entry exists. Returns the first violation.
    pub fn check_consistent(&self) -> Result<(), String> {
        for (key, value) in &self.frontends {
            if key.slot == 0 {
                for slot in 1..=value.count {
                    let slot_key = FrontendKey { slot, ..*key };
                    if !self.frontends.contains_key(&slot_key) {
                        return Err(format!("header {key:?} misses slot {slot}"));
                    }
                }
                if !self.revnat.contains_key(&value.rev_nat_id) {
                    return Err(format!(
                        "header {key:?} misses rev-NAT {}",
                        value.rev_nat_id
                    ));
                }
            } else if !self.backends.contains_key(&value.backend_id) {
                return Err(format!(
                    "slot {key:?} names missing backend {}",
                    value.backend_id
                ));
            }
        }
        Ok(())
    }
}

/// The writes that turn `current` into `desired`, ordered so the datapath
/// never sees a frontend pointing at something missing: backends, rev-NAT
/// entries, backend slots, then headers; deletions in the reverse order.
/// Entries that are already right are not touched.
pub fn diff(current: &MapState, desired: &MapState) -> Vec<MapOp> {
    let mut ops = Vec::new();
    let (backend_upserts, backend_deletes) = changes(&current.backends, &desired.backends);
    let (revnat_upserts, revnat_deletes) = changes(&current.revnat, &desired.revnat);
    let (frontend_upserts, frontend_deletes) = changes(&current.frontends, &desired.frontends);

    ops.extend(backend_upserts.map(|(k, v)| MapOp::UpsertBackend(*k, *v)));
    ops.extend(revnat_upserts.map(|(k, v)| MapOp::UpsertRevNat(*k, *v)));
    let (headers, slots): (Vec<_>, Vec<_>) = frontend_upserts.partition(|(k, _)| k.slot == 0);
    ops.extend(
        slots
            .into_iter()
            .map(|(k, v)| MapOp::UpsertFrontend(*k, *v)),
    );
    ops.extend(
        headers
            .into_iter()
            .map(|(k, v)| MapOp::UpsertFrontend(*k, *v)),
    );

    let (headers, slots): (Vec<&FrontendKey>, Vec<&FrontendKey>) =
        frontend_deletes.partition(|k| k.slot == 0);
    ops.extend(headers.into_iter().map(|k| MapOp::DeleteFrontend(*k)));
    ops.extend(slots.into_iter().map(|k| MapOp::DeleteFrontend(*k)));
    ops.extend(revnat_deletes.map(|k| MapOp::DeleteRevNat(*k)));
    ops.extend(backend_deletes.map(|k| MapOp::DeleteBackend(*k)));
    ops
}

/// Entries of `desired` that `current` lacks or holds differently, and keys
/// of `current` that `desired` lacks.
fn changes<'a, K: Ord, V: PartialEq>(
    current: &'a BTreeMap<K, V>,
    desired: &'a BTreeMap<K, V>,
) -> (
    impl Iterator<Item = (&'a K, &'a V)>,
    impl Iterator<Item = &'a K>,
) {
    let upserts = desired
        .iter()
        .filter(move |(k, v)| current.get(k) != Some(v));
    let deletes = current.keys().filter(move |k| !desired.contains_key(k));
    (upserts, deletes)
}

/// Identity of a frontend: what its rev-NAT id is allocated for.
type FrontendIdentity = (MapAddr, u16, u8, u8);
/// Identity of a backend: what its backend id is allocated for.
type BackendIdentity = (MapAddr, u16, u8);

/// Allocates small integer ids to keys and keeps them stable while the key
/// lives, so an unchanged Service keeps its entries byte for byte.
#[derive(Clone, Debug)]
struct IdAllocator<K> {
    ids: BTreeMap<K, u32>,
    used: BTreeSet<u32>,
    next: u32,
    limit: u32,
}

impl<K: Ord + Clone> IdAllocator<K> {
    /// Ids are handed out in `1..limit`.
    fn new(limit: u32) -> Self {
        IdAllocator {
            ids: BTreeMap::new(),
            used: BTreeSet::new(),
            next: 1,
            limit,
        }
    }

    /// Records an id already in use (adopted from the maps).
    fn adopt(&mut self, key: K, id: u32) {
        self.ids.insert(key, id);
        self.used.insert(id);
    }

    /// The key's id, allocating a free one if needed; `None` when all are taken.
    fn get_or_allocate(&mut self, key: &K) -> Option<u32> {
        if let Some(id) = self.ids.get(key) {
            return Some(*id);
        }
        if self.used.len() as u64 >= u64::from(self.limit - 1) {
            return None;
        }
        while self.used.contains(&self.next) || self.next == 0 {
            self.next = if self.next + 1 >= self.limit {
                1
            } else {
                self.next + 1
            };
        }
        let id = self.next;
        // Hand out ids round-robin, so a freed id is not reused at once and
        // conntrack entries naming it cannot mistake a new backend for it.
        self.next = if id + 1 >= self.limit { 1 } else { id + 1 };
        self.used.insert(id);
        self.ids.insert(key.clone(), id);
        Some(id)
    }

    /// Frees the ids of every key not in `live`.
    fn retain(&mut self, live: &BTreeSet<K>) {
        let used = &mut self.used;
        self.ids.retain(|key, id| {
            let keep = live.contains(key);
            if !keep {
                used.remove(id);
            }
            keep
        });
    }
}

/// Builds [`MapState`]s from translations, keeping rev-NAT and backend ids
/// stable across builds (and across agent restarts, by adopting the ids
/// found in the maps).
#[derive(Clone, Debug)]
pub struct StateBuilder {
    revnat_ids: IdAllocator<FrontendIdentity>,
    backend_ids: IdAllocator<BackendIdentity>,
}

/// Frontends that could not be given map entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildProblems {
    /// One line per frontend or backend left out, saying why.
    pub skipped: Vec<String>,
}

impl StateBuilder {
    /// A builder allocating rev-NAT ids below `revnat_limit` and backend ids
    /// below `backend_limit`, that first adopts the ids used in `current`.
    pub fn adopting(current: &MapState, revnat_limit: u32, backend_limit: u32) -> Self {
        let mut builder = StateBuilder {
            revnat_ids: IdAllocator::new(revnat_limit),
            backend_ids: IdAllocator::new(backend_limit),
        };
        for (key, value) in current.frontends.iter().filter(|(k, _)| k.slot == 0) {
            builder
                .revnat_ids
                .adopt((key.addr, key.port, key.proto, key.scope), value.rev_nat_id);
        }
        for (id, value) in &current.backends {
            builder
                .backend_ids
                .adopt((value.addr, value.port, value.family), *id);
        }
        builder
    }

    /// The map contents for `frontends`. Ids of frontends and backends that
    /// are gone are released for reuse.
    pub fn build(&mut self, frontends: &[DesiredFrontend]) -> (MapState, BuildProblems) {
        let mut state = MapState::default();
        let mut problems = BuildProblems::default();
        let mut live_frontends = BTreeSet::new();
        let mut live_backends = BTreeSet::new();
        for frontend in frontends {
            live_frontends.insert(frontend_identity(frontend));
            for backend in &frontend.backends {
                let (addr, family) = map_addr(backend.addr);
                live_backends.insert((addr, backend.port.to_be(), family));
            }
        }
        self.revnat_ids.retain(&live_frontends);
        self.backend_ids.retain(&live_backends);

        for frontend in frontends {
            let identity = frontend_identity(frontend);
            let Some(rev_nat_id) = self.revnat_ids.get_or_allocate(&identity) else {
                problems.skipped.push(format!(
                    "{} {}:{}: no free rev-NAT id (map full)",
                    frontend.service, frontend.addr, frontend.port
                ));
                continue;
            };
            let (addr, family) = map_addr(frontend.addr);
            let key = FrontendKey {
                addr,
                port: frontend.port.to_be(),
                slot: 0,
                family,
                proto: frontend.proto,
                scope: SCOPE_ALL,
                _pad: 0,
            };
            let mut slot: u16 = 0;
            for backend in &frontend.backends {
                let value = backend_value(backend);
                let Some(id) =
                    self.backend_ids
                        .get_or_allocate(&(value.addr, value.port, value.family))
                else {
                    problems.skipped.push(format!(
                        "{} backend {}:{}: no free backend id (map full)",
                        frontend.service, backend.addr, backend.port
                    ));
                    continue;
                };
                let Some(next) = slot.checked_add(1) else {
                    problems.skipped.push(format!(
                        "{}: more than {} backends, the rest left out",
                        frontend.service,
                        u16::MAX
                    ));
                    break;
                };
                slot = next;
                state.backends.insert(id, value);
                state.frontends.insert(
                    FrontendKey { slot, ..key },
                    FrontendValue {
                        backend_id: id,
                        ..FrontendValue::default()
                    },
                );
            }
            state.frontends.insert(
                key,
                FrontendValue {
                    backend_id: 0,
                    rev_nat_id,
                    count: slot,
                    flags: frontend.flags,
                    affinity_timeout_secs: 0,
                },
            );
            state.revnat.insert(
                rev_nat_id,
                RevNatValue {
                    addr,
                    port: frontend.port.to_be(),
                    family,
                    _pad: 0,
                },
            );
        }
        (state, problems)
    }
}

fn frontend_identity(frontend: &DesiredFrontend) -> FrontendIdentity {
    let (addr, _) = map_addr(frontend.addr);
    (addr, frontend.port.to_be(), frontend.proto, SCOPE_ALL)
}

fn backend_value(backend: &DesiredBackend) -> BackendValue {
    let (addr, family) = map_addr(backend.addr);
    BackendValue {
        addr,
        port: backend.port.to_be(),
        family,
        state: if backend.terminating {
            BACKEND_STATE_TERMINATING
        } else {
            BACKEND_STATE_ACTIVE
        },
        flags: if backend.node_local {
            BACKEND_FLAG_NODE_LOCAL
        } else {
            0
        },
        zone: 0,
        _pad: [0; 2],
    }
}

/// An address as stored in the maps, with its family tag.
pub fn map_addr(addr: IpAddr) -> (MapAddr, u8) {
    match addr {
        IpAddr::V4(v4) => (service_common::map_addr_v4(v4.octets()), FAMILY_IPV4),
        IpAddr::V6(v6) => (v6.octets(), FAMILY_IPV6),
    }
}

/// The address stored in a map entry, read back according to its family.
pub fn ip_from_map(addr: &MapAddr, family: u8) -> IpAddr {
    if family == FAMILY_IPV6 {
        IpAddr::from(*addr)
    } else {
        IpAddr::from(service_common::map_addr_v4_octets(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ObjectName;
    use service_common::{FRONTEND_FLAG_CLUSTER_IP, PROTO_TCP};

    fn frontend(vip: &str, backends: &[&str]) -> DesiredFrontend {
        DesiredFrontend {
            service: ObjectName {
                namespace: "default".into(),
                name: "web".into(),
            },
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
                    terminating: false,
                })
                .collect(),
        }
    }

    /// Applies `ops` to `state` one by one, checking consistency after each.
    fn apply_checked(state: &mut MapState, ops: &[MapOp]) {
        for op in ops {
            state.apply(op).unwrap();
            state
                .check_consistent()
                .unwrap_or_else(|e| panic!("after {op:?}: {e}"));
        }
    }

    #[test]
    fn build_lays_out_header_slots_backends_and_revnat() {
        let mut builder = StateBuilder::adopting(&MapState::default(), 100, 100);
        let (state, problems) = builder.build(&[frontend("10.96.0.10", &["10.1.1.2", "10.1.2.2"])]);
        assert!(problems.skipped.is_empty());
        assert_eq!(state.frontends.len(), 3);
        assert_eq!(state.backends.len(), 2);
        let (key, header) = state.frontends.iter().find(|(k, _)| k.slot == 0).unwrap();
        assert_eq!(key.addr[..4], [10, 96, 0, 10]);
        assert_eq!(key.port, 80u16.to_be());
        assert_eq!(header.count, 2);
        assert_eq!(state.revnat[&header.rev_nat_id].port, 80u16.to_be());
        state.check_consistent().unwrap();
    }

    #[test]
    fn diff_from_empty_then_back_to_empty_keeps_every_step_consistent() {
        let mut builder = StateBuilder::adopting(&MapState::default(), 100, 100);
        let (desired, _) = builder.build(&[
            frontend("10.96.0.10", &["10.1.1.2", "10.1.2.2", "10.1.3.2"]),
            frontend("10.96.0.11", &["10.1.1.2"]),
        ]);
        let mut current = MapState::default();
        apply_checked(&mut current, &diff(&MapState::default(), &desired));
        assert_eq!(current, desired);
        apply_checked(&mut current, &diff(&desired, &MapState::default()));
        assert_eq!(current, MapState::default());
    }

    #[test]
    fn removing_one_backend_touches_only_that_service_and_stays_consistent() {
        let mut builder = StateBuilder::adopting(&MapState::default(), 100, 100);
        let (before, _) = builder.build(&[
            frontend("10.96.0.10", &["10.1.1.2", "10.1.2.2", "10.1.3.2"]),
            frontend("10.96.0.11", &["10.1.9.2"]),
        ]);
        let (after, _) = builder.build(&[
            frontend("10.96.0.10", &["10.1.1.2", "10.1.3.2"]),
            frontend("10.96.0.11", &["10.1.9.2"]),
        ]);
        let ops = diff(&before, &after);
        let mut current = before.clone();
        apply_checked(&mut current, &ops);
        assert_eq!(current, after);
        assert!(ops.iter().all(|op| match op {
            MapOp::UpsertFrontend(k, _) | MapOp::DeleteFrontend(k) => k.addr[3] == 10,
            _ => true,
        }));
        assert!(ops.contains(&MapOp::DeleteBackend(2)));
        // The header shrinks before the last slot goes.
        let header_pos = ops
            .iter()
            .position(|op| matches!(op, MapOp::UpsertFrontend(k, _) if k.slot == 0))
            .unwrap();
        let slot_delete_pos = ops
            .iter()
            .position(|op| matches!(op, MapOp::DeleteFrontend(k) if k.slot == 3))
            .unwrap();
        assert!(header_pos < slot_delete_pos);
    }

    #[test]
    fn an_unchanged_translation_writes_nothing_and_ids_survive_adoption() {
        let mut builder = StateBuilder::adopting(&MapState::default(), 100, 100);
        let frontends = [
            frontend("10.96.0.10", &["10.1.1.2", "10.1.2.2"]),
            frontend("10.96.0.11", &["10.1.3.2"]),
        ];
        let (first, _) = builder.build(&frontends);
        let (second, _) = builder.build(&frontends);
        assert!(diff(&first, &second).is_empty());
        // A restarted agent adopts the ids it finds and rewrites nothing.
        let mut adopted = StateBuilder::adopting(&first, 100, 100);
        let (third, _) = adopted.build(&frontends);
        assert!(diff(&first, &third).is_empty());
    }

    #[test]
    fn ids_run_out_cleanly_when_the_maps_are_full() {
        let mut builder = StateBuilder::adopting(&MapState::default(), 3, 100);
        let (state, problems) = builder.build(&[
            frontend("10.96.0.1", &["10.1.1.2"]),
            frontend("10.96.0.2", &["10.1.1.2"]),
            frontend("10.96.0.3", &["10.1.1.2"]),
        ]);
        assert_eq!(state.revnat.len(), 2);
        assert_eq!(problems.skipped.len(), 1);
        state.check_consistent().unwrap();
    }
}
