//! The ordered writes that turn one map content into another.

use std::collections::BTreeMap;

use service_common::FrontendKey;

use crate::datapath::model::{MapOp, MapState};

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
