//! The full repair, planned against what the maps really hold: per Service,
//! the writes that take its entries from their actual to their desired
//! state; and the stale entries no Service wants, split into those that
//! can go first (nothing in the maps points at them: deleting them frees
//! room for the Services' writes) and those that must wait until the
//! entries pointing at them have been rewritten.

use std::collections::BTreeSet;

use service_common::{BackendId, FrontendKey, RevNatId};

use super::{
    cluster::ObjectName,
    desired::{DesiredState, frontend_identity},
    diff::Writes,
};
use crate::datapath::model::{MapOp, MapState};

/// The stale entries of a repair.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StaleEntries {
    /// Deletes nothing in the maps depends on, in [`MapOp::step`] order.
    pub first: Vec<MapOp>,
    /// Deletes of rev-NAT entries and backends that a frontend the repair
    /// rewrites still names, and of every stale source range (a header
    /// the repair rewrites may still have it checked); they run after the
    /// Services' writes.
    pub last: Vec<MapOp>,
}

/// The writes that take Service `name`'s entries from `actual` to
/// `desired`: its headers, its slots (also those beyond the desired count,
/// which are deleted), its rev-NAT entries and the backends it names.
pub fn service_writes(actual: &MapState, desired: &DesiredState, name: &ObjectName) -> Writes {
    let wanted = desired.service_entries(name);
    let mut writes = Writes::default();
    let mut upsert = |op: MapOp, current: Option<bool>| match current {
        // Already right.
        Some(true) => {}
        Some(false) => writes.ops.push(op),
        None => {
            writes.needs_room = true;
            writes.ops.push(op);
        }
    };
    let mut backends = wanted.backends;
    backends.sort_unstable_by_key(|(id, _)| *id);
    backends.dedup_by_key(|(id, _)| *id);
    for (id, value) in backends {
        upsert(
            MapOp::UpsertBackend(id, value),
            actual.backends.get(&id).map(|v| *v == value),
        );
    }
    for (id, value) in wanted.revnat {
        upsert(
            MapOp::UpsertRevNat(id, value),
            actual.revnat.get(&id).map(|v| *v == value),
        );
    }
    for key in wanted.source_ranges {
        upsert(
            MapOp::UpsertSourceRange(key),
            actual.source_ranges.contains(&key).then_some(true),
        );
    }
    let mut stale_slots = Vec::new();
    for (key, value) in &wanted.frontends {
        let current = actual.frontends.get(key);
        upsert(
            MapOp::UpsertFrontend(*key, *value),
            current.map(|v| v == value),
        );
        // Slots beyond the desired count that the maps still hold.
        if key.slot == 0
            && let Some(current) = current
        {
            stale_slots.extend(
                (value.count + 1..=current.count)
                    .map(|slot| FrontendKey { slot, ..*key })
                    .filter(|slot_key| actual.frontends.contains_key(slot_key))
                    .map(MapOp::DeleteFrontend),
            );
        }
    }
    writes.ops.extend(stale_slots);
    writes.ops.sort_by_key(MapOp::step);
    writes
}

/// The entries of `actual` that no Service wants.
pub fn stale_entries(actual: &MapState, desired: &DesiredState) -> StaleEntries {
    let mut stale = StaleEntries::default();
    // Rev-NAT ids and backends named by entries some Service keeps (and
    // will rewrite if they name the wrong thing).
    let mut named_revnat: BTreeSet<RevNatId> = BTreeSet::new();
    let mut named_backends: BTreeSet<BackendId> = BTreeSet::new();
    let mut frontends = Vec::new();
    for (key, value) in &actual.frontends {
        let identity = frontend_identity(key);
        let kept = desired.header(&identity).is_some_and(|header| {
            let actual_count = actual
                .frontends
                .get(&FrontendKey { slot: 0, ..*key })
                .map_or(0, |h| h.count);
            key.slot <= header.count.max(actual_count)
        });
        if !kept {
            // Headers go first, then the slots they counted; a slot no
            // kept header counts is not looked at by the datapath.
            frontends.push(MapOp::DeleteFrontend(*key));
        } else if key.slot == 0 {
            named_revnat.insert(value.rev_nat_id);
        } else {
            named_backends.insert(value.backend_id);
        }
    }
    stale.first.extend(frontends);
    for id in actual.revnat.keys().filter(|id| !desired.has_revnat(**id)) {
        let op = MapOp::DeleteRevNat(*id);
        if named_revnat.contains(id) {
            stale.last.push(op);
        } else {
            stale.first.push(op);
        }
    }
    for id in actual
        .backends
        .keys()
        .filter(|id| !desired.has_backend(**id))
    {
        let op = MapOp::DeleteBackend(*id);
        if named_backends.contains(id) {
            stale.last.push(op);
        } else {
            stale.first.push(op);
        }
    }
    let wanted_ranges = desired.source_ranges();
    stale.last.extend(
        actual
            .source_ranges
            .difference(&wanted_ranges)
            .map(|key| MapOp::DeleteSourceRange(*key)),
    );
    stale.first.sort_by_key(MapOp::step);
    stale.last.sort_by_key(MapOp::step);
    stale
}

/// Rev-NAT ids and backends the frontends of `services` name in `actual`.
pub fn named_by(
    actual: &MapState,
    desired: &DesiredState,
    services: &BTreeSet<&ObjectName>,
) -> (BTreeSet<RevNatId>, BTreeSet<BackendId>) {
    let mut revnat = BTreeSet::new();
    let mut backends = BTreeSet::new();
    for (key, value) in &actual.frontends {
        if desired
            .owner(&frontend_identity(key))
            .is_some_and(|owner| services.contains(owner))
        {
            if key.slot == 0 {
                revnat.insert(value.rev_nat_id);
            } else {
                backends.insert(value.backend_id);
            }
        }
    }
    (revnat, backends)
}
