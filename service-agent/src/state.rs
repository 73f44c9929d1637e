//! The datapath's map contents as plain data ([`MapState`]) and the ordered
//! list of writes ([`MapOp`]) that turns one content into another.

use std::{collections::BTreeMap, net::IpAddr};

use service_common::{
    BackendId, BackendValue, FAMILY_IPV4, FAMILY_IPV6, FrontendKey, FrontendValue, MapAddr,
    RevNatId, RevNatValue,
};

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
