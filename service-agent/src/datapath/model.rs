//! The maps' contents as plain data ([`MapState`]), the writes that change
//! them ([`MapOp`]), and the narrow traits through which they are written
//! and read ([`MapWriter`], [`MapReader`]): implemented by the kernel maps
//! ([`super::maps::ServiceMaps`]) and by [`MapState`] in memory, so the
//! reconciler above is tested without a kernel.

use std::{collections::BTreeMap, net::IpAddr};

use service_common::{
    BackendId, BackendValue, FAMILY_IPV4, FAMILY_IPV6, FRONTEND_FLAG_SOURCE_RANGES, FrontendKey,
    FrontendValue, MapAddr, RevNatId, RevNatValue, SourceRangeKey,
};

/// The contents of the frontends, backends, reverse-NAT and source-ranges
/// maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    /// Frontends map: headers (slot 0) and backend slots.
    pub frontends: BTreeMap<FrontendKey, FrontendValue>,
    /// Backends map.
    pub backends: BTreeMap<BackendId, BackendValue>,
    /// Reverse-NAT map.
    pub revnat: BTreeMap<RevNatId, RevNatValue>,
    /// `loadBalancerSourceRanges` trie: its keys (every value is
    /// `SOURCE_RANGE_ALLOW`).
    pub source_ranges: std::collections::BTreeSet<SourceRangeKey>,
}

/// One of the maps the agent programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapName {
    /// Frontend headers and backend slots.
    Frontends,
    /// Backends by id.
    Backends,
    /// Reverse NAT by id.
    RevNat,
    /// `loadBalancerSourceRanges` by rev-NAT id and client prefix.
    SourceRanges,
}

impl MapName {
    /// Every map, in the order metrics list them.
    pub const ALL: [MapName; 4] = [
        MapName::Frontends,
        MapName::Backends,
        MapName::RevNat,
        MapName::SourceRanges,
    ];

    /// Its name in logs, metrics and `list` (`frontends`, `backends`,
    /// `revnat`, `source_ranges`).
    pub fn as_str(self) -> &'static str {
        match self {
            MapName::Frontends => "frontends",
            MapName::Backends => "backends",
            MapName::RevNat => "revnat",
            MapName::SourceRanges => "source_ranges",
        }
    }
}

impl std::fmt::Display for MapName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One write to the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// Insert or replace a backend.
    UpsertBackend(BackendId, BackendValue),
    /// Insert or replace a reverse-NAT entry.
    UpsertRevNat(RevNatId, RevNatValue),
    /// Insert a source-ranges entry (its value is always the same).
    UpsertSourceRange(SourceRangeKey),
    /// Insert or replace a frontend header or slot.
    UpsertFrontend(FrontendKey, FrontendValue),
    /// Delete a frontend header or slot.
    DeleteFrontend(FrontendKey),
    /// Delete a reverse-NAT entry.
    DeleteRevNat(RevNatId),
    /// Delete a source-ranges entry.
    DeleteSourceRange(SourceRangeKey),
    /// Delete a backend.
    DeleteBackend(BackendId),
}

/// The steps of an ordered write, in order: every write of a step can go
/// to the kernel in one batch, and a step starts once the previous one is
/// done, so the datapath never sees a header counting a missing slot, a
/// slot naming a missing backend, a header naming a missing rev-NAT
/// entry, or a header whose `FRONTEND_FLAG_SOURCE_RANGES` finds none of
/// its ranges (which would drop every client).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WriteStep {
    /// Backends first: slots will name them.
    UpsertBackends,
    /// Then rev-NAT entries: headers will name them.
    UpsertRevNat,
    /// Then source ranges: headers will have them checked.
    UpsertSourceRanges,
    /// Then backend slots.
    UpsertSlots,
    /// Then headers, whose count makes the slots visible.
    UpsertHeaders,
    /// Deletions the other way round: headers of removed frontends,
    DeleteHeaders,
    /// then slots no header counts any more,
    DeleteSlots,
    /// then source ranges no header checks any more,
    DeleteSourceRanges,
    /// then rev-NAT entries no header names,
    DeleteRevNat,
    /// then backends no slot names.
    DeleteBackends,
}

impl WriteStep {
    /// Every step, in the order they run.
    pub const ORDER: [WriteStep; 10] = [
        WriteStep::UpsertBackends,
        WriteStep::UpsertRevNat,
        WriteStep::UpsertSourceRanges,
        WriteStep::UpsertSlots,
        WriteStep::UpsertHeaders,
        WriteStep::DeleteHeaders,
        WriteStep::DeleteSlots,
        WriteStep::DeleteSourceRanges,
        WriteStep::DeleteRevNat,
        WriteStep::DeleteBackends,
    ];
}

impl MapOp {
    /// The step of an ordered write this op belongs to.
    pub fn step(&self) -> WriteStep {
        match self {
            MapOp::UpsertBackend(..) => WriteStep::UpsertBackends,
            MapOp::UpsertRevNat(..) => WriteStep::UpsertRevNat,
            MapOp::UpsertSourceRange(..) => WriteStep::UpsertSourceRanges,
            MapOp::UpsertFrontend(key, _) if key.slot == 0 => WriteStep::UpsertHeaders,
            MapOp::UpsertFrontend(..) => WriteStep::UpsertSlots,
            MapOp::DeleteFrontend(key) if key.slot == 0 => WriteStep::DeleteHeaders,
            MapOp::DeleteFrontend(..) => WriteStep::DeleteSlots,
            MapOp::DeleteSourceRange(..) => WriteStep::DeleteSourceRanges,
            MapOp::DeleteRevNat(..) => WriteStep::DeleteRevNat,
            MapOp::DeleteBackend(..) => WriteStep::DeleteBackends,
        }
    }

    /// The map it writes.
    pub fn map(&self) -> MapName {
        match self {
            MapOp::UpsertBackend(..) | MapOp::DeleteBackend(..) => MapName::Backends,
            MapOp::UpsertRevNat(..) | MapOp::DeleteRevNat(..) => MapName::RevNat,
            MapOp::UpsertFrontend(..) | MapOp::DeleteFrontend(..) => MapName::Frontends,
            MapOp::UpsertSourceRange(..) | MapOp::DeleteSourceRange(..) => MapName::SourceRanges,
        }
    }
}

/// Reads the maps' whole contents (for adoption and repairs).
pub trait MapReader {
    /// The maps' contents.
    fn read_state(&self) -> crate::Result<MapState>;
}

impl MapReader for MapState {
    fn read_state(&self) -> crate::Result<MapState> {
        Ok(self.clone())
    }
}

/// A batch of writes that stopped early.
#[derive(Debug)]
pub struct BatchFailure<E> {
    /// Writes applied before the failing one (the rest were not).
    pub done: usize,
    /// Why the write at index `done` failed.
    pub error: E,
}

/// Something that applies [`MapOp`]s: the kernel maps, or a [`MapState`] in
/// memory (which is how the diff's ordering is tested without a kernel).
pub trait MapWriter {
    /// The error a write can fail with.
    type Error: std::fmt::Display;

    /// Applies `ops`, all of one [`WriteStep`], in order. On a failure,
    /// the writes before the failing one are applied and the rest are not.
    fn apply_batch(&mut self, ops: &[MapOp]) -> Result<(), BatchFailure<Self::Error>>;
}

/// Applies `ops` (in [`WriteStep`] order) through `writer`, one batch per
/// run of writes of the same step; stops at the first failure, reporting
/// how many writes were done before it.
pub fn write_in_order<W: MapWriter>(
    writer: &mut W,
    ops: &[MapOp],
) -> Result<(), BatchFailure<W::Error>> {
    let mut start = 0;
    while start < ops.len() {
        let step = ops[start].step();
        let end = ops[start..]
            .iter()
            .position(|op| op.step() != step)
            .map_or(ops.len(), |n| start + n);
        writer
            .apply_batch(&ops[start..end])
            .map_err(|failure| BatchFailure {
                done: start + failure.done,
                error: failure.error,
            })?;
        start = end;
    }
    Ok(())
}

impl MapWriter for MapState {
    type Error = std::convert::Infallible;

    fn apply_batch(&mut self, ops: &[MapOp]) -> Result<(), BatchFailure<Self::Error>> {
        for op in ops {
            self.apply(op);
        }
        Ok(())
    }
}

impl MapState {
    /// Applies one write.
    pub fn apply(&mut self, op: &MapOp) {
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
            MapOp::UpsertSourceRange(key) => {
                self.source_ranges.insert(key);
            }
            MapOp::DeleteSourceRange(key) => {
                self.source_ranges.remove(&key);
            }
        }
    }

    /// Whether the entry `op` writes or deletes is in the maps.
    pub fn contains(&self, op: &MapOp) -> bool {
        match op {
            MapOp::UpsertBackend(id, _) | MapOp::DeleteBackend(id) => {
                self.backends.contains_key(id)
            }
            MapOp::UpsertRevNat(id, _) | MapOp::DeleteRevNat(id) => self.revnat.contains_key(id),
            MapOp::UpsertFrontend(key, _) | MapOp::DeleteFrontend(key) => {
                self.frontends.contains_key(key)
            }
            MapOp::UpsertSourceRange(key) | MapOp::DeleteSourceRange(key) => {
                self.source_ranges.contains(key)
            }
        }
    }

    /// Entries per map.
    pub fn entries(&self, map: MapName) -> usize {
        match map {
            MapName::Frontends => self.frontends.len(),
            MapName::Backends => self.backends.len(),
            MapName::RevNat => self.revnat.len(),
            MapName::SourceRanges => self.source_ranges.len(),
        }
    }

    /// Checks what the datapath relies on at every moment: each header's
    /// slots exist, each slot names an existing backend, each header's
    /// rev-NAT entry exists, and a header with `FRONTEND_FLAG_SOURCE_RANGES`
    /// has source ranges. Returns the first violation.
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
                if value.flags & FRONTEND_FLAG_SOURCE_RANGES != 0
                    && !self
                        .source_ranges
                        .iter()
                        .any(|range| range.data.rev_nat_id() == value.rev_nat_id)
                {
                    return Err(format!("header {key:?} misses its source ranges"));
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

/// A frontend as `address:port/PROTOCOL` (`[address]:port/PROTOCOL` for
/// IPv6), the label used in the status file and the metrics.
pub fn frontend_label(addr: impl Into<IpAddr>, port: u16, proto: u8) -> String {
    let addr = std::net::SocketAddr::new(addr.into(), port);
    format!("{addr}/{}", proto_name(proto))
}
