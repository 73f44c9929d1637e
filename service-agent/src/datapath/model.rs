//! The maps' contents as plain data ([`MapState`]), the writes that change
//! them ([`MapOp`]), and the narrow traits through which they are written
//! and read ([`MapWriter`], [`MapReader`]): implemented by the kernel maps
//! ([`super::maps::ServiceMaps`]) and by [`MapState`] in memory, so the
//! reconciler above is tested without a kernel.

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

/// Reads the maps' whole contents (for adoption and repairs).
pub trait MapReader {
    /// The maps' contents.
    fn read_state(&self) -> anyhow::Result<MapState>;
}

impl MapReader for MapState {
    fn read_state(&self) -> anyhow::Result<MapState> {
        Ok(self.clone())
    }
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

/// `TCP`, `UDP` or the number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        service_common::PROTO_TCP => "TCP".to_owned(),
        service_common::PROTO_UDP => "UDP".to_owned(),
        service_common::PROTO_SCTP => "SCTP".to_owned(),
        other => other.to_string(),
    }
}

/// A frontend as `address:port/PROTOCOL`, the label used in the status
/// file and the metrics.
pub fn frontend_label(addr: impl std::fmt::Display, port: u16, proto: u8) -> String {
    format!("{addr}:{port}/{}", proto_name(proto))
}
