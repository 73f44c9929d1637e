//! The ordered writes that turn one map content into another.

use std::collections::BTreeMap;

use crate::datapath::model::{MapOp, MapState};

/// The writes of one change, in
/// [`WriteStep`](crate::datapath::model::WriteStep) order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Writes {
    /// The writes, ordered by [`MapOp::step`].
    pub ops: Vec<MapOp>,
    /// Whether a write adds an entry the maps lack: such a change needs
    /// room, and fails when a map is full. Changes that only replace and
    /// delete go first, so they free room before others take it.
    pub needs_room: bool,
}

impl Writes {
    /// No writes.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// The writes that turn `current` into `desired`, ordered by
/// [`WriteStep`](crate::datapath::model::WriteStep)
/// so the datapath never sees a frontend pointing at something missing:
/// backends, rev-NAT entries, source ranges, backend slots, then headers;
/// deletions in the reverse order. Entries that are already right are not touched.
pub fn diff(current: &MapState, desired: &MapState) -> Writes {
    let mut ops = Vec::new();
    let mut needs_room = false;
    let mut upserts = |new: bool, op: MapOp| {
        needs_room |= new;
        ops.push(op);
    };
    for (id, value, new) in upserts_of(&current.backends, &desired.backends) {
        upserts(new, MapOp::UpsertBackend(*id, *value));
    }
    for (id, value, new) in upserts_of(&current.revnat, &desired.revnat) {
        upserts(new, MapOp::UpsertRevNat(*id, *value));
    }
    for key in desired.source_ranges.difference(&current.source_ranges) {
        upserts(true, MapOp::UpsertSourceRange(*key));
    }
    for (key, value, new) in upserts_of(&current.frontends, &desired.frontends) {
        upserts(new, MapOp::UpsertFrontend(*key, *value));
    }
    ops.extend(
        deletes_of(&current.frontends, &desired.frontends).map(|k| MapOp::DeleteFrontend(*k)),
    );
    ops.extend(deletes_of(&current.revnat, &desired.revnat).map(|k| MapOp::DeleteRevNat(*k)));
    ops.extend(
        current
            .source_ranges
            .difference(&desired.source_ranges)
            .map(|k| MapOp::DeleteSourceRange(*k)),
    );
    ops.extend(deletes_of(&current.backends, &desired.backends).map(|k| MapOp::DeleteBackend(*k)));
    // Stable: the order within a step stays the maps' key order.
    ops.sort_by_key(MapOp::step);
    Writes { ops, needs_room }
}

/// Entries of `desired` that `current` lacks (`true`) or holds differently
/// (`false`).
fn upserts_of<'a, K: Ord, V: PartialEq>(
    current: &'a BTreeMap<K, V>,
    desired: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = (&'a K, &'a V, bool)> {
    desired
        .iter()
        .filter_map(move |(k, v)| match current.get(k) {
            Some(old) if old == v => None,
            Some(_) => Some((k, v, false)),
            None => Some((k, v, true)),
        })
}

/// Keys of `current` that `desired` lacks.
fn deletes_of<'a, K: Ord, V>(
    current: &'a BTreeMap<K, V>,
    desired: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = &'a K> {
    current.keys().filter(move |k| !desired.contains_key(k))
}
