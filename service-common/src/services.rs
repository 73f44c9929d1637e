//! The Service maps: frontends (`{addr, port, proto, scope, slot}`, slot 0
//! the header), backends (`id -> address`) and reverse NAT (`id ->
//! frontend`), as the agent writes them and the datapath reads them.

use bytemuck::{Pod, Zeroable};

use crate::{FAMILY_IPV4, MapAddr, map_addr_v4};

/// Default capacity of the frontends map (header plus one entry per backend slot).
pub const FRONTENDS_MAX_ENTRIES: u32 = 65_536;
/// Default capacity of the backends map.
pub const BACKENDS_MAX_ENTRIES: u32 = 65_536;
/// Capacity of the reverse-NAT map and of the per-frontend stats array:
/// rev-NAT ids are allocated in `1..REVNAT_MAX_ENTRIES`.
pub const REVNAT_MAX_ENTRIES: u32 = 65_536;

/// Scope of a frontend entry: matches every client. The only scope used
/// until traffic policies split a Service's backends by origin.
pub const SCOPE_ALL: u8 = 0;
/// Scope of a frontend entry that only in-cluster traffic (pods, and the
/// node's processes through socket-LB) looks up: the cluster-wide backends
/// of an external frontend of an `externalTrafficPolicy: Local` Service,
/// whose [`SCOPE_ALL`] entry lists local backends only. kube-proxy sends
/// such in-cluster traffic to the Service's cluster-wide endpoints too.
/// It has its own rev-NAT id; its header is looked up only after the
/// [`SCOPE_ALL`] one, which has [`FRONTEND_FLAG_EXTERNAL_LOCAL`].
pub const SCOPE_INTERNAL: u8 = 1;

/// Frontend kind flag: a ClusterIP (`spec.clusterIPs`).
pub const FRONTEND_FLAG_CLUSTER_IP: u16 = 1 << 0;
/// Frontend kind flag: a node address with a `nodePort`.
pub const FRONTEND_FLAG_NODE_PORT: u16 = 1 << 1;
/// Frontend kind flag: an allowed `spec.externalIPs` address.
pub const FRONTEND_FLAG_EXTERNAL_IP: u16 = 1 << 2;
/// Frontend kind flag: a `status.loadBalancer.ingress[].ip`.
pub const FRONTEND_FLAG_LOAD_BALANCER: u16 = 1 << 3;
/// Only node-local backends are listed (traffic policy `Local`, e.g.
/// `internalTrafficPolicy: Local` on a ClusterIP frontend): without
/// backends (no local endpoint), a new flow is dropped, counted as
/// `DropNoLocalEndpoint`, as kube-proxy drops it, rather than refused.
pub const FRONTEND_FLAG_LOCAL_ONLY: u16 = 1 << 4;
/// `sessionAffinity: ClientIP`: a client's new flows go to the backend its
/// entry in the affinity map names while it is younger than
/// `FrontendValue::affinity_timeout_secs` (see [`crate::affinity`]).
pub const FRONTEND_FLAG_AFFINITY: u16 = 1 << 5;
/// Backends are the serving+terminating fallback (no endpoint was ready).
pub const FRONTEND_FLAG_TERMINATING_FALLBACK: u16 = 1 << 6;
/// An external frontend (NodePort, LoadBalancer, externalIP) of a Service
/// with `externalTrafficPolicy: Local`: traffic from the network keeps the
/// client's source address, so it is never SNATed; should a backend on
/// another node be chosen all the same, the packet is dropped (counted as
/// `DropExternalLocal`) rather than SNATed or sent on with a source the
/// backend's node cannot answer. Without backends (no local endpoint) a
/// new flow from the network is dropped too, not refused. Traffic from
/// pods and the node uses the frontend's [`SCOPE_INTERNAL`] entry, with
/// the Service's cluster-wide backends, when there is one (kube-proxy
/// treats in-cluster traffic to these frontends as `Cluster`).
pub const FRONTEND_FLAG_EXTERNAL_LOCAL: u16 = 1 << 7;
/// A LoadBalancer frontend with `loadBalancerSourceRanges`: a new flow is
/// admitted only from a client inside one of the ranges in the
/// source-ranges trie (see [`crate::source_ranges`]), from the network,
/// from pods and from the node alike.
pub const FRONTEND_FLAG_SOURCE_RANGES: u16 = 1 << 8;
/// Frontend kinds served to traffic from the network (NodePort,
/// LoadBalancer, externalIP); the others only to pods and the node.
pub const FRONTEND_FLAGS_EXTERNAL: u16 =
    FRONTEND_FLAG_NODE_PORT | FRONTEND_FLAG_LOAD_BALANCER | FRONTEND_FLAG_EXTERNAL_IP;

/// Key of the frontends map. Slot 0 is the frontend header; slots
/// `1..=count` each name one backend.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FrontendKey {
    /// Frontend address, network byte order (see [`MapAddr`]).
    pub addr: MapAddr,
    /// Frontend port, network byte order.
    pub port: u16,
    /// Backend slot, host byte order: 0 is the header, 1..=count the backends.
    pub slot: u16,
    /// Address family: [`FAMILY_IPV4`] or [`crate::FAMILY_IPV6`].
    pub family: u8,
    /// IP protocol: [`crate::PROTO_TCP`], [`crate::PROTO_UDP`] or [`crate::PROTO_SCTP`].
    pub proto: u8,
    /// Lookup scope: [`SCOPE_ALL`] or [`SCOPE_INTERNAL`].
    pub scope: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FrontendKey>() == 24);

impl FrontendKey {
    /// The header key (slot 0) of the frontend `addr:port` (network byte
    /// order) of `family` and `proto`, in `scope`.
    #[inline(always)]
    pub const fn header(addr: MapAddr, family: u8, port: u16, proto: u8, scope: u8) -> Self {
        FrontendKey {
            addr,
            port,
            slot: 0,
            family,
            proto,
            scope,
            _pad: 0,
        }
    }

    /// The header key of the IPv4 frontend `addr:port` (network byte
    /// order) in scope [`SCOPE_ALL`]: what a packet or socket looks up.
    #[inline(always)]
    pub const fn v4(addr: [u8; 4], port: u16, proto: u8) -> Self {
        Self::header(map_addr_v4(addr), FAMILY_IPV4, port, proto, SCOPE_ALL)
    }

    /// The same frontend's header key in scope `scope`.
    #[inline(always)]
    pub const fn with_scope(self, scope: u8) -> Self {
        FrontendKey { scope, ..self }
    }

    /// The same frontend's key of backend slot `slot` (0: the header).
    #[inline(always)]
    pub const fn with_slot(self, slot: u16) -> Self {
        FrontendKey { slot, ..self }
    }
}

/// Value of the frontends map. In the header (slot 0) `count`, `rev_nat_id`,
/// `flags` and `affinity_timeout_secs` are set and `backend_id` is 0; in a
/// backend slot only `backend_id` is set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FrontendValue {
    /// Backend slot: the backend's id in the backends map (host byte order).
    pub backend_id: u32,
    /// Header: reverse-NAT id of this frontend (host byte order).
    pub rev_nat_id: u32,
    /// Header: number of backend slots, 0 when the Service has no usable endpoint.
    pub count: u16,
    /// Header: `FRONTEND_FLAG_*` bits.
    pub flags: u16,
    /// Header: `sessionAffinity` timeout in seconds, 0 when affinity is off.
    pub affinity_timeout_secs: u32,
}
const _: () = assert!(core::mem::size_of::<FrontendValue>() == 16);

/// Index of the backends map (an array): a backend id, host byte order,
/// never 0, below the map's capacity.
pub type BackendId = u32;

/// Backend state: ready; takes new flows (it is in its frontends' slots).
pub const BACKEND_STATE_ACTIVE: u8 = 0;
/// Backend state: serving and terminating. Its flows stay (drain); it takes
/// new flows only as the all-terminating fallback (KEP-1669).
pub const BACKEND_STATE_TERMINATING: u8 = 1;
/// Backend state: still in an EndpointSlice but not serving. Its TCP flows
/// drain; its UDP flows move to another backend on their next datagram.
pub const BACKEND_STATE_NOT_SERVING: u8 = 2;

/// Backend flag: the backend runs on this node.
pub const BACKEND_FLAG_NODE_LOCAL: u8 = 1 << 0;

/// Value of the backends map: where a flow is DNATed to.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct BackendValue {
    /// Backend address, network byte order (see [`MapAddr`]).
    pub addr: MapAddr,
    /// Backend port (the resolved `targetPort`), network byte order.
    pub port: u16,
    /// Address family: [`FAMILY_IPV4`] or [`crate::FAMILY_IPV6`]; never 0 in
    /// a live entry (an all-zero entry is no backend).
    pub family: u8,
    /// `BACKEND_STATE_*`.
    pub state: u8,
    /// `BACKEND_FLAG_*` bits.
    pub flags: u8,
    /// Zone index for topology-aware routing, 0 when unknown.
    pub zone: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<BackendValue>() == 24);

impl BackendValue {
    /// Whether this entry is a backend: the backends map is an array
    /// indexed by id, where an all-zero entry (family 0) is no backend.
    #[inline(always)]
    pub const fn exists(&self) -> bool {
        self.family != 0
    }
}

/// Key of the reverse-NAT map and index of the per-frontend stats: host
/// byte order, never 0.
pub type RevNatId = u32;

/// Value of the reverse-NAT map: the frontend a flow's replies come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct RevNatValue {
    /// Frontend address, network byte order (see [`MapAddr`]).
    pub addr: MapAddr,
    /// Frontend port, network byte order.
    pub port: u16,
    /// Address family: [`FAMILY_IPV4`] or [`crate::FAMILY_IPV6`].
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<RevNatValue>() == 20);

/// Where the agent's id allocators stand: the next rev-NAT and backend ids
/// they try (round-robin). Kept in a pinned map of one entry
/// ([`crate::MAP_ID_CURSORS`]), which only the agent reads and writes, so a
/// restarted agent goes on after the last ids handed out instead of
/// starting again at 1: an id is not reused while conntrack entries could
/// still name it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct IdCursors {
    /// The next rev-NAT id to try, host byte order; 0: unset.
    pub next_rev_nat_id: RevNatId,
    /// The next backend id to try, host byte order; 0: unset.
    pub next_backend_id: BackendId,
}
const _: () = assert!(core::mem::size_of::<IdCursors>() == 8);

/// Per-frontend counters, one per CPU, indexed by rev-NAT id; user space sums them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FrontendStats {
    /// Packets translated towards a backend (forward direction).
    pub packets: u64,
    /// Bytes of those packets (the skb length, L2 included).
    pub bytes: u64,
    /// New flows that picked a backend.
    pub new_flows: u64,
}
const _: () = assert!(core::mem::size_of::<FrontendStats>() == 24);

impl FrontendStats {
    /// Adds `other`'s counts (another CPU's, or another entry's of the
    /// same frontend) to these.
    pub fn add(&mut self, other: &FrontendStats) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_keys_are_built_alike_for_header_and_slots() {
        let header = FrontendKey::v4([10, 96, 0, 10], 80u16.to_be(), crate::PROTO_TCP);
        assert_eq!(header.slot, 0);
        assert_eq!(header.scope, SCOPE_ALL);
        assert_eq!(header.family, FAMILY_IPV4);
        assert_eq!(header.addr[..4], [10, 96, 0, 10]);
        let slot = header.with_slot(3);
        assert_eq!(slot, FrontendKey { slot: 3, ..header });
    }
}
