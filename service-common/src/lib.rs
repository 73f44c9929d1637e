//! Map keys and values shared by the eBPF datapath (`service-ebpf`) and the
//! agent (`service-agent`).
//!
//! Every type is `#[repr(C)]`, has its padding written out as named fields
//! (so `bytemuck::Pod` can be derived and no uninitialised byte ever reaches
//! a map key), and carries a size assertion. Byte order is documented per
//! field: "network" means the bytes as they stand in the packet header,
//! "host" means a plain native integer.
//!
//! Addresses are always 16 bytes with an explicit family so IPv6 needs no
//! layout change: an IPv4 address fills the first 4 bytes, the rest are zero.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Address family tag for IPv4 entries (`family` fields).
pub const FAMILY_IPV4: u8 = 4;
/// Address family tag for IPv6 entries (`family` fields).
pub const FAMILY_IPV6: u8 = 6;

/// IP protocol number of TCP (`proto` fields).
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP (`proto` fields).
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of SCTP (`proto` fields).
pub const PROTO_SCTP: u8 = 132;

/// A map address: 16 bytes in network byte order. IPv4 uses bytes 0..4 and
/// leaves 4..16 zero; the entry's `family` field says which one it is.
pub type MapAddr = [u8; 16];

/// Builds a [`MapAddr`] from an IPv4 address in network byte order.
#[inline(always)]
pub const fn map_addr_v4(octets: [u8; 4]) -> MapAddr {
    [
        octets[0], octets[1], octets[2], octets[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]
}

/// The IPv4 part of a [`MapAddr`] (bytes 0..4), network byte order.
#[inline(always)]
pub const fn map_addr_v4_octets(addr: &MapAddr) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}

// ---------------------------------------------------------------------------
// Frontends (the Service map)
// ---------------------------------------------------------------------------

/// Name of the frontends map (`FrontendKey -> FrontendValue`).
pub const MAP_FRONTENDS: &str = "SVC_FRONTENDS";
/// Name of the backends map (`BackendId -> BackendValue`).
pub const MAP_BACKENDS: &str = "SVC_BACKENDS";
/// Name of the reverse-NAT map (`RevNatId -> RevNatValue`).
pub const MAP_REVNAT: &str = "SVC_REVNAT";
/// Name of the connection-tracking LRU map (`ConntrackKey -> ConntrackValue`).
pub const MAP_CONNTRACK: &str = "SVC_CONNTRACK";
/// Name of the per-CPU per-frontend counters (`RevNatId` index -> `FrontendStats`).
pub const MAP_FRONTEND_STATS: &str = "SVC_FE_STATS";
/// Name of the per-CPU datapath event counters (`DatapathCounter` index -> u64).
pub const MAP_COUNTERS: &str = "SVC_COUNTERS";

/// Default capacity of the frontends map (header plus one entry per backend slot).
pub const FRONTENDS_MAX_ENTRIES: u32 = 65_536;
/// Default capacity of the backends map.
pub const BACKENDS_MAX_ENTRIES: u32 = 65_536;
/// Capacity of the reverse-NAT map and of the per-frontend stats array:
/// rev-NAT ids are allocated in `1..REVNAT_MAX_ENTRIES`.
pub const REVNAT_MAX_ENTRIES: u32 = 65_536;
/// Default capacity of the conntrack LRU map (two entries per flow).
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;

/// Scope of a frontend entry: matches every client. The only scope used
/// until traffic policies split a Service's backends by origin.
pub const SCOPE_ALL: u8 = 0;
/// Scope of a frontend entry that only in-cluster traffic looks up first
/// (used when `internalTrafficPolicy` and `externalTrafficPolicy` differ).
pub const SCOPE_INTERNAL: u8 = 1;

/// Frontend kind flag: a ClusterIP (`spec.clusterIPs`).
pub const FRONTEND_FLAG_CLUSTER_IP: u16 = 1 << 0;
/// Frontend kind flag: a node address with a `nodePort`.
pub const FRONTEND_FLAG_NODE_PORT: u16 = 1 << 1;
/// Frontend kind flag: an allowed `spec.externalIPs` address.
pub const FRONTEND_FLAG_EXTERNAL_IP: u16 = 1 << 2;
/// Frontend kind flag: a `status.loadBalancer.ingress[].ip`.
pub const FRONTEND_FLAG_LOAD_BALANCER: u16 = 1 << 3;
/// Only node-local backends are listed (traffic policy `Local`).
pub const FRONTEND_FLAG_LOCAL_ONLY: u16 = 1 << 4;
/// `sessionAffinity: ClientIP`; see `FrontendValue::affinity_timeout_secs`.
pub const FRONTEND_FLAG_AFFINITY: u16 = 1 << 5;
/// Backends are the serving+terminating fallback (no endpoint was ready).
pub const FRONTEND_FLAG_TERMINATING_FALLBACK: u16 = 1 << 6;

/// Key of the frontends map. Slot 0 is the frontend header; slots
/// `1..=count` each name one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FrontendKey {
    /// Frontend address, network byte order (see [`MapAddr`]).
    pub addr: MapAddr,
    /// Frontend port, network byte order.
    pub port: u16,
    /// Backend slot, host byte order: 0 is the header, 1..=count the backends.
    pub slot: u16,
    /// Address family: [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// IP protocol: [`PROTO_TCP`], [`PROTO_UDP`] or [`PROTO_SCTP`].
    pub proto: u8,
    /// Lookup scope: [`SCOPE_ALL`] or [`SCOPE_INTERNAL`].
    pub scope: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FrontendKey>() == 24);

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

// ---------------------------------------------------------------------------
// Backends and reverse NAT
// ---------------------------------------------------------------------------

/// Key of the backends map: a backend id, host byte order, never 0.
pub type BackendId = u32;

/// Backend state: may take new flows.
pub const BACKEND_STATE_ACTIVE: u8 = 0;
/// Backend state: terminating; keeps existing flows, new ones only as fallback.
pub const BACKEND_STATE_TERMINATING: u8 = 1;

/// Backend flag: the backend runs on this node.
pub const BACKEND_FLAG_NODE_LOCAL: u8 = 1 << 0;

/// Value of the backends map: where a flow is DNATed to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct BackendValue {
    /// Backend address, network byte order (see [`MapAddr`]).
    pub addr: MapAddr,
    /// Backend port (the resolved `targetPort`), network byte order.
    pub port: u16,
    /// Address family: [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
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

/// Key of the reverse-NAT map and index of the per-frontend stats: host
/// byte order, never 0.
pub type RevNatId = u32;

/// Value of the reverse-NAT map: the frontend a reply is rewritten back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct RevNatValue {
    /// Frontend address, network byte order (see [`MapAddr`]).
    pub addr: MapAddr,
    /// Frontend port, network byte order.
    pub port: u16,
    /// Address family: [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<RevNatValue>() == 20);

// ---------------------------------------------------------------------------
// Connection tracking
// ---------------------------------------------------------------------------

/// Conntrack direction: the original direction, client to frontend
/// (before DNAT). Value: the backend.
pub const CT_DIR_FORWARD: u8 = 0;
/// Conntrack direction: the reply direction, backend to client (before the
/// reply's source is restored to the frontend). Value: the rev-NAT id.
pub const CT_DIR_REPLY: u8 = 1;
/// Conntrack direction: an SNATed flow leaving the node, client to backend
/// (after DNAT, before SNAT). Value: `snat_port`.
pub const CT_DIR_SNAT: u8 = 2;
/// Conntrack direction: a reply to an SNATed flow arriving, backend to this
/// node's SNAT address and port. Value: the client in `nat_addr`/`nat_port`.
pub const CT_DIR_SNAT_REPLY: u8 = 3;
/// Conntrack direction: the reply of a hairpin flow (a pod that reached
/// itself through a frontend), as the pod sends it: pod and target port to
/// [`HAIRPIN_IPV4`] and the client port. Value: the client (the pod
/// itself) in `nat_addr`/`nat_port`, the frontend in `rev_nat_id`, flag
/// [`CT_FLAG_HAIRPIN`]. Such a flow has this entry instead of a
/// [`CT_DIR_REPLY`] one.
pub const CT_DIR_HAIRPIN_REPLY: u8 = 4;

/// Key of the conntrack map: a flow's 5-tuple as seen in one direction.
/// A forward entry is keyed by the packet as the client sent it (destination
/// = frontend); a reply entry by the packet as the backend sends it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ConntrackKey {
    /// Source address, network byte order.
    pub saddr: MapAddr,
    /// Destination address, network byte order.
    pub daddr: MapAddr,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// Address family: [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// IP protocol.
    pub proto: u8,
    /// `CT_DIR_*`: which of a flow's entries this is.
    pub direction: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ConntrackKey>() == 40);

/// Value of the conntrack map.
///
/// Forward entries hold the backend the flow is pinned to, so the flow keeps
/// working even after its backend leaves the Service. Reply entries hold the
/// rev-NAT id used to restore the frontend as the reply's source. An SNATed
/// flow has two more: its SNAT port, and the client to restore as its
/// replies' destination. A hairpin flow's reply entry
/// ([`CT_DIR_HAIRPIN_REPLY`]) holds both the rev-NAT id and the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ConntrackValue {
    /// Forward: backend address to DNAT to; SNAT reply and hairpin reply:
    /// the client's address; else zero. Network byte order.
    pub nat_addr: MapAddr,
    /// Forward: backend port to DNAT to; SNAT reply and hairpin reply: the
    /// client's port; else zero. Network byte order.
    pub nat_port: u16,
    /// `CT_FLAG_*` bits.
    pub flags: u16,
    /// Backend the flow was pinned to (host byte order), for reaping by backend.
    pub backend_id: BackendId,
    /// Frontend of the flow (host byte order).
    pub rev_nat_id: RevNatId,
    /// SNAT entry: the source port the flow was given on this node's SNAT
    /// address, network byte order; else zero.
    pub snat_port: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<ConntrackValue>() == 32);

/// Conntrack flag on a forward entry: the flow is SNATed to this node's
/// address (a remote backend behind a NodePort, LoadBalancer or externalIP
/// frontend).
pub const CT_FLAG_SNAT: u16 = 1 << 0;
/// Conntrack flag on the forward and the [`CT_DIR_HAIRPIN_REPLY`] entry of
/// a hairpin flow: the backend is the client pod itself, so the flow's
/// source is SNATed to [`HAIRPIN_IPV4`]. (The datapath decides hairpin by
/// comparing the backend with the source; the flag records it.)
pub const CT_FLAG_HAIRPIN: u16 = 1 << 1;

/// Source address of hairpin flows, network byte order: a pod that reaches
/// a frontend whose chosen backend is the pod itself gets its packets back
/// from this link-local address (and its own client port) instead of from
/// its own address, which it would drop as a packet it never sent; its
/// replies go to this address, through its default gateway, where the
/// datapath translates them back. The address Cilium uses for the same
/// purpose (`IPV4_LOOPBACK`); it must not be any pod's or node's address.
pub const HAIRPIN_IPV4: [u8; 4] = [169, 254, 42, 1];

/// First source port handed out for SNAT (host byte order).
pub const SNAT_PORT_MIN: u16 = 32_768;
/// Last source port handed out for SNAT (host byte order).
pub const SNAT_PORT_MAX: u16 = 60_999;

/// Name of the datapath configuration array (one [`DatapathConfig`]).
pub const MAP_CONFIG: &str = "SVC_CONFIG";

/// Node-wide settings the agent gives the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DatapathConfig {
    /// IPv4 address replies of SNATed flows come back to (this node's
    /// address on the node network), network byte order; zero: no SNAT, so
    /// remote backends are not used for external traffic.
    pub snat_v4: [u8; 4],
    /// Reserved, always zero.
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 8);

// ---------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------

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

/// Index of a datapath event counter in [`MAP_COUNTERS`] (per-CPU `u64`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatapathCounter {
    /// A new flow to a frontend with no backend was dropped: from the
    /// network, or from a pod when no refusal could be built for it (a TCP
    /// RST, an inconsistent header, a helper failure).
    DropNoBackend = 0,
    /// A backend slot pointed at a missing slot or backend entry.
    DropBackendMissing = 1,
    /// A packet could not be rewritten (helper error).
    DropRewrite = 2,
    /// The conntrack entry for a new flow could not be inserted.
    ConntrackInsertFailed = 3,
    /// A reply was translated back to its frontend.
    ReplyTranslated = 4,
    /// A new flow to a frontend with no backend was refused: a TCP RST or an
    /// ICMP port unreachable went back to the client.
    RejectedNoBackend = 5,
}

impl DatapathCounter {
    /// Every counter, in index order.
    pub const ALL: [DatapathCounter; 6] = [
        DatapathCounter::DropNoBackend,
        DatapathCounter::DropBackendMissing,
        DatapathCounter::DropRewrite,
        DatapathCounter::ConntrackInsertFailed,
        DatapathCounter::ReplyTranslated,
        DatapathCounter::RejectedNoBackend,
    ];

    /// The counter's name as shown by `service-agent list` and the metrics.
    pub const fn name(self) -> &'static str {
        match self {
            DatapathCounter::DropNoBackend => "drop_no_backend",
            DatapathCounter::DropBackendMissing => "drop_backend_missing",
            DatapathCounter::DropRewrite => "drop_rewrite",
            DatapathCounter::ConntrackInsertFailed => "conntrack_insert_failed",
            DatapathCounter::ReplyTranslated => "reply_translated",
            DatapathCounter::RejectedNoBackend => "rejected_no_backend",
        }
    }
}

/// Number of entries of the [`MAP_COUNTERS`] array.
pub const COUNTERS_MAX_ENTRIES: u32 = DatapathCounter::ALL.len() as u32;

// ---------------------------------------------------------------------------
// Socket-LB (cgroup socket hooks for host-originated traffic)
// ---------------------------------------------------------------------------

/// Name of the socket-LB NAT LRU map (`SockNatKey -> SockNatValue`).
pub const MAP_SOCK_NAT: &str = "SVC_SOCK_NAT";
/// Capacity of the socket-LB NAT LRU map: one reverse entry per socket
/// translated, plus one forward entry per UDP socket.
pub const SOCK_NAT_MAX_ENTRIES: u32 = 65_536;

/// Socket-LB direction: a UDP socket's frontend (key) to the backend it
/// was given (value), so every datagram the socket sends to that frontend
/// goes to the same backend, as conntrack keeps a pod's UDP flow on its
/// backend.
pub const SOCK_DIR_FORWARD: u8 = 0;
/// Socket-LB direction: a backend a socket was sent to (key) to the
/// frontend the application asked for (value), restored as the peer
/// address by `recvmsg4` and `getpeername4`.
pub const SOCK_DIR_REVERSE: u8 = 1;

/// Key of the socket-LB NAT map: one socket (by cookie) and one address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SockNatKey {
    /// The socket's cookie (`bpf_get_socket_cookie`), host byte order.
    pub cookie: u64,
    /// Forward: the frontend address; reverse: the backend address.
    /// Network byte order (see [`MapAddr`]).
    pub addr: MapAddr,
    /// Forward: the frontend port; reverse: the backend port. Network byte order.
    pub port: u16,
    /// Address family: [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// IP protocol: [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`SOCK_DIR_FORWARD`] or [`SOCK_DIR_REVERSE`].
    pub direction: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<SockNatKey>() == 32);

/// Value of the socket-LB NAT map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockNatValue {
    /// Forward: the backend address; reverse: the frontend address.
    /// Network byte order (see [`MapAddr`]).
    pub addr: MapAddr,
    /// Forward: the backend port; reverse: the frontend port. Network byte order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
    /// The backend (host byte order): a forward entry is only reused while
    /// this backend is still in the backends map with the same address.
    pub backend_id: BackendId,
    /// The frontend (host byte order).
    pub rev_nat_id: RevNatId,
    /// Explicit padding, always zero.
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<SockNatValue>() == 32);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all these types are `#[repr(C)]`, `Copy`, and have no implicit
    // padding (checked by the `bytemuck::Pod` derive), so any byte pattern of
    // their size is a valid value.
    unsafe impl aya::Pod for super::FrontendKey {}
    unsafe impl aya::Pod for super::FrontendValue {}
    unsafe impl aya::Pod for super::BackendValue {}
    unsafe impl aya::Pod for super::RevNatValue {}
    unsafe impl aya::Pod for super::ConntrackKey {}
    unsafe impl aya::Pod for super::ConntrackValue {}
    unsafe impl aya::Pod for super::FrontendStats {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::SockNatKey {}
    unsafe impl aya::Pod for super::SockNatValue {}
}
