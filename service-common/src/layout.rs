//! The one table of the datapath's maps and programs: names, kinds, key
//! and value sizes, default capacities. The eBPF crate checks its map
//! definitions against it at compile time; the agent loads the programs
//! from it and checks pinned maps against it (a pinned map of another
//! layout is started afresh instead of misread).

use core::mem::size_of;

use crate::{
    AFFINITY_MAX_ENTRIES, AffinityKey, AffinityValue, BACKENDS_MAX_ENTRIES, BackendId,
    BackendValue, CONNTRACK_MAX_ENTRIES, COUNTERS_MAX_ENTRIES, ConntrackKey, ConntrackValue,
    DatapathConfig, FRAGMENTS_MAX_ENTRIES, FRONTENDS_MAX_ENTRIES, FragmentKey, FragmentValue,
    FrontendKey, FrontendStats, FrontendValue, IdCursors, REVNAT_MAX_ENTRIES, RevNatId,
    RevNatValue, SOCK_NAT_MAX_ENTRIES, SOURCE_RANGES_MAX_ENTRIES, SockNatKey, SockNatValue,
    SourceRangeKey, SourceRangeValue,
};

/// Name of the frontends map (`FrontendKey -> FrontendValue`).
pub const MAP_FRONTENDS: &str = "SVC_FRONTENDS";
/// Name of the backends map (an array: `BackendId` index -> `BackendValue`,
/// all zero where no backend has the id).
pub const MAP_BACKENDS: &str = "SVC_BACKENDS";
/// Name of the reverse-NAT map (`RevNatId -> RevNatValue`).
pub const MAP_REVNAT: &str = "SVC_REVNAT";
/// Name of the connection-tracking LRU map (`ConntrackKey -> ConntrackValue`).
pub const MAP_CONNTRACK: &str = "SVC_CONNTRACK";
/// Name of the IPv4 fragments LRU map (`FragmentKey -> FragmentValue`).
pub const MAP_FRAGMENTS: &str = "SVC_FRAGMENTS";
/// Name of the per-CPU per-frontend counters (`RevNatId` index -> `FrontendStats`).
pub const MAP_FRONTEND_STATS: &str = "SVC_FE_STATS";
/// Name of the per-CPU datapath event counters (`DatapathCounter` index -> u64).
pub const MAP_COUNTERS: &str = "SVC_COUNTERS";
/// Name of the datapath configuration array (one [`DatapathConfig`]).
pub const MAP_CONFIG: &str = "SVC_CONFIG";
/// Name of the socket-LB NAT LRU map (`SockNatKey -> SockNatValue`).
pub const MAP_SOCK_NAT: &str = "SVC_SOCK_NAT";
/// Name of the agent's id allocator array (one [`IdCursors`]); the
/// datapath never reads it.
pub const MAP_ID_CURSORS: &str = "SVC_ID_CURSORS";

/// Name of the session affinity LRU map (`AffinityKey -> AffinityValue`);
/// only the datapath writes it.
pub const MAP_AFFINITY: &str = "SVC_AFFINITY";
/// Name of the `loadBalancerSourceRanges` LPM trie (`SourceRangeKey ->
/// SourceRangeValue`).
pub const MAP_SOURCE_RANGES: &str = "SVC_SRC_RANGES";

/// The kind of a BPF map, as created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// `BPF_MAP_TYPE_HASH`.
    Hash,
    /// `BPF_MAP_TYPE_LRU_HASH`.
    LruHash,
    /// `BPF_MAP_TYPE_ARRAY`.
    Array,
    /// `BPF_MAP_TYPE_PERCPU_ARRAY` (the value size is one CPU's).
    PerCpuArray,
    /// `BPF_MAP_TYPE_LPM_TRIE` (the key size counts its 4-byte prefix length).
    LpmTrie,
}

/// What `service-agent trace` copies of a map from the live pinned maps
/// into its private snapshot before running a packet there: what one
/// packet (and its reply) can read, and nothing else. Every map of
/// [`MAPS`] names its rule, so no map can be added without deciding it;
/// each rule but [`TraceCopy::Nothing`] belongs to one map (its key and
/// value types), and the agent matches on every variant, so a new rule
/// cannot be left unimplemented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceCopy {
    /// The configuration entry (`SVC_CONFIG`), whole.
    Configuration,
    /// The header and backend slots of the packet's destination frontend,
    /// in every scope (`SVC_FRONTENDS`).
    DestinationFrontend,
    /// The backends the copied frontend slots and conntrack entries name
    /// (`SVC_BACKENDS`).
    NamedBackends,
    /// The rev-NAT entries of the copied frontends and conntrack entries
    /// (`SVC_REVNAT`).
    NamedRevNat,
    /// The entries of the packet's 5-tuple in every direction and the
    /// other entries of their flows (masters and companions), and, for a
    /// new flow from the network to a remote backend, the SNAT ports those
    /// backends hold (with their flows), which the port choice reads
    /// (`SVC_CONNTRACK`).
    PacketFlows,
    /// The fragment record of the packet's datagram, if any
    /// (`SVC_FRAGMENTS`).
    PacketFragment,
    /// The session affinity entry of the packet's source for the
    /// destination frontend, if any (`SVC_AFFINITY`).
    PacketAffinity,
    /// The `loadBalancerSourceRanges` entries of the destination frontend
    /// (`SVC_SRC_RANGES`).
    DestinationSourceRanges,
    /// Nothing: the map starts empty. For counters (the snapshot's own
    /// then tell what the traced packet did) and for maps that only
    /// programs the trace never runs read (socket-LB).
    Nothing,
}

/// One map of the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// Name, also its pin's file name.
    pub name: &'static str,
    /// Kind.
    pub kind: MapKind,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes (per CPU for per-CPU maps).
    pub value_size: u32,
    /// Default capacity.
    pub max_entries: u32,
    /// Whether the capacity is part of the layout (an array indexed by an
    /// enum, or a single entry): a pinned map of another capacity is started
    /// afresh. Otherwise the capacity is a setting (`--map-size-*`), and a
    /// pinned map keeps the capacity it was created with.
    pub fixed_capacity: bool,
    /// What `service-agent trace` copies of it into its snapshot.
    pub trace_copy: TraceCopy,
}

impl MapSpec {
    /// A map of `kind` with key `K` and value `V`.
    const fn of<K, V>(
        name: &'static str,
        kind: MapKind,
        max_entries: u32,
        fixed: bool,
        trace_copy: TraceCopy,
    ) -> Self {
        MapSpec {
            name,
            kind,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries,
            fixed_capacity: fixed,
            trace_copy,
        }
    }
}

/// Every map of the datapath.
pub const MAPS: [MapSpec; 12] = [
    MapSpec::of::<FrontendKey, FrontendValue>(
        MAP_FRONTENDS,
        MapKind::Hash,
        FRONTENDS_MAX_ENTRIES,
        false,
        TraceCopy::DestinationFrontend,
    ),
    MapSpec::of::<BackendId, BackendValue>(
        MAP_BACKENDS,
        MapKind::Array,
        BACKENDS_MAX_ENTRIES,
        false,
        TraceCopy::NamedBackends,
    ),
    MapSpec::of::<RevNatId, RevNatValue>(
        MAP_REVNAT,
        MapKind::Hash,
        REVNAT_MAX_ENTRIES,
        false,
        TraceCopy::NamedRevNat,
    ),
    MapSpec::of::<ConntrackKey, ConntrackValue>(
        MAP_CONNTRACK,
        MapKind::LruHash,
        CONNTRACK_MAX_ENTRIES,
        false,
        TraceCopy::PacketFlows,
    ),
    MapSpec::of::<FragmentKey, FragmentValue>(
        MAP_FRAGMENTS,
        MapKind::LruHash,
        FRAGMENTS_MAX_ENTRIES,
        false,
        TraceCopy::PacketFragment,
    ),
    MapSpec::of::<u32, FrontendStats>(
        MAP_FRONTEND_STATS,
        MapKind::PerCpuArray,
        REVNAT_MAX_ENTRIES,
        false,
        TraceCopy::Nothing,
    ),
    MapSpec::of::<u32, u64>(
        MAP_COUNTERS,
        MapKind::PerCpuArray,
        COUNTERS_MAX_ENTRIES,
        true,
        TraceCopy::Nothing,
    ),
    MapSpec::of::<u32, DatapathConfig>(
        MAP_CONFIG,
        MapKind::Array,
        1,
        true,
        TraceCopy::Configuration,
    ),
    MapSpec::of::<SockNatKey, SockNatValue>(
        MAP_SOCK_NAT,
        MapKind::LruHash,
        SOCK_NAT_MAX_ENTRIES,
        false,
        TraceCopy::Nothing,
    ),
    MapSpec::of::<u32, IdCursors>(MAP_ID_CURSORS, MapKind::Array, 1, true, TraceCopy::Nothing),
    MapSpec::of::<AffinityKey, AffinityValue>(
        MAP_AFFINITY,
        MapKind::LruHash,
        AFFINITY_MAX_ENTRIES,
        false,
        TraceCopy::PacketAffinity,
    ),
    MapSpec::of::<SourceRangeKey, SourceRangeValue>(
        MAP_SOURCE_RANGES,
        MapKind::LpmTrie,
        SOURCE_RANGES_MAX_ENTRIES,
        false,
        TraceCopy::DestinationSourceRanges,
    ),
];

/// The spec of the map called `name`.
pub const fn map_spec(name: &str) -> Option<MapSpec> {
    let mut index = 0;
    while index < MAPS.len() {
        if names_equal(MAPS[index].name, name) {
            return Some(MAPS[index]);
        }
        index += 1;
    }
    None
}

/// Whether two names are equal (usable in constant checks).
pub const fn names_equal(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut index = 0;
    while index < a.len() {
        if a[index] != b[index] {
            return false;
        }
        index += 1;
    }
    true
}

/// Whether the map called `name` is in the table with key `K` and value
/// `V`: the eBPF crate asserts this for each of its map definitions.
pub const fn map_matches<K, V>(name: &str, kind: MapKind) -> bool {
    match map_spec(name) {
        Some(spec) => {
            spec.key_size == size_of::<K>() as u32
                && spec.value_size == size_of::<V>() as u32
                && spec.kind as u8 == kind as u8
        }
        None => false,
    }
}

/// Name of the "from pod" program (TC ingress on a pod's host-side device).
pub const PROG_FROM_POD: &str = "from_pod";
/// Name of the "to pod" program (TC egress on a pod's host-side device).
pub const PROG_TO_POD: &str = "to_pod";
/// Name of the "from network" XDP program (external devices).
pub const PROG_FROM_NETWORK: &str = "from_network";
/// Name of the "from network" TC ingress program (`--nodeport-mode tc`).
pub const PROG_FROM_NETWORK_TC: &str = "from_network_tc";
/// Name of the TC ingress program beside "from network" on XDP: it
/// translates the packets XDP deferred because their checksum is left to
/// offload (`--nodeport-mode xdp`).
pub const PROG_FROM_NETWORK_DEFERRED: &str = "from_network_deferred";
/// Name of the "to network" TC egress program (external devices).
pub const PROG_TO_NETWORK: &str = "to_network";
/// Name of the TC benchmark floor program (returns its verdict, nothing else).
pub const PROG_BENCH_FLOOR_TC: &str = "bench_floor_tc";
/// Name of the XDP benchmark floor program (passes, nothing else).
pub const PROG_BENCH_FLOOR_XDP: &str = "bench_floor_xdp";
/// Name of the TC benchmark bound program (a conntrack lookup, and a new
/// flow's two inserts, alone).
pub const PROG_BENCH_CONNTRACK_TC: &str = "bench_conntrack_tc";
/// Name of the XDP benchmark bound program (a conntrack lookup, and a new
/// SNATed flow's four inserts, alone).
pub const PROG_BENCH_CONNTRACK_XDP: &str = "bench_conntrack_xdp";
/// Name of the socket-LB `connect4` program (cgroup, `--cgroup-path`).
pub const PROG_SOCK_CONNECT4: &str = "sock_connect4";
/// Name of the socket-LB `sendmsg4` program (unconnected UDP).
pub const PROG_SOCK_SENDMSG4: &str = "sock_sendmsg4";
/// Name of the socket-LB `recvmsg4` program (UDP answers from the frontend).
pub const PROG_SOCK_RECVMSG4: &str = "sock_recvmsg4";
/// Name of the socket-LB `getpeername4` program (the frontend as peer).
pub const PROG_SOCK_GETPEER4: &str = "sock_getpeer4";
/// Name of the socket-LB `connect6` program (IPv6 frontends).
pub const PROG_SOCK_CONNECT6: &str = "sock_connect6";
/// Name of the socket-LB `sendmsg6` program (unconnected UDP over IPv6).
pub const PROG_SOCK_SENDMSG6: &str = "sock_sendmsg6";
/// Name of the socket-LB `recvmsg6` program (IPv6 UDP answers from the
/// frontend).
pub const PROG_SOCK_RECVMSG6: &str = "sock_recvmsg6";
/// Name of the socket-LB `getpeername6` program (the IPv6 frontend as peer).
pub const PROG_SOCK_GETPEER6: &str = "sock_getpeer6";

/// The program type of a datapath program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    /// TC classifier (tcx or clsact).
    Classifier,
    /// XDP.
    Xdp,
    /// cgroup socket-address hook (socket-LB); needs kernel 5.18, so a
    /// kernel refusing it leaves the rest of the datapath working.
    CgroupSockAddr,
}

/// One program of the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramSpec {
    /// Name (the function's name in the eBPF crate).
    pub name: &'static str,
    /// Program type.
    pub kind: ProgramKind,
}

/// Every program of the datapath.
pub const PROGRAMS: [ProgramSpec; 18] = [
    ProgramSpec {
        name: PROG_FROM_POD,
        kind: ProgramKind::Classifier,
    },
    ProgramSpec {
        name: PROG_TO_POD,
        kind: ProgramKind::Classifier,
    },
    ProgramSpec {
        name: PROG_FROM_NETWORK,
        kind: ProgramKind::Xdp,
    },
    ProgramSpec {
        name: PROG_FROM_NETWORK_TC,
        kind: ProgramKind::Classifier,
    },
    ProgramSpec {
        name: PROG_FROM_NETWORK_DEFERRED,
        kind: ProgramKind::Classifier,
    },
    ProgramSpec {
        name: PROG_TO_NETWORK,
        kind: ProgramKind::Classifier,
    },
    ProgramSpec {
        name: PROG_BENCH_FLOOR_TC,
        kind: ProgramKind::Classifier,
    },
    ProgramSpec {
        name: PROG_BENCH_FLOOR_XDP,
        kind: ProgramKind::Xdp,
    },
    ProgramSpec {
        name: PROG_BENCH_CONNTRACK_TC,
        kind: ProgramKind::Classifier,
    },
    ProgramSpec {
        name: PROG_BENCH_CONNTRACK_XDP,
        kind: ProgramKind::Xdp,
    },
    ProgramSpec {
        name: PROG_SOCK_CONNECT4,
        kind: ProgramKind::CgroupSockAddr,
    },
    ProgramSpec {
        name: PROG_SOCK_SENDMSG4,
        kind: ProgramKind::CgroupSockAddr,
    },
    ProgramSpec {
        name: PROG_SOCK_RECVMSG4,
        kind: ProgramKind::CgroupSockAddr,
    },
    ProgramSpec {
        name: PROG_SOCK_GETPEER4,
        kind: ProgramKind::CgroupSockAddr,
    },
    ProgramSpec {
        name: PROG_SOCK_CONNECT6,
        kind: ProgramKind::CgroupSockAddr,
    },
    ProgramSpec {
        name: PROG_SOCK_SENDMSG6,
        kind: ProgramKind::CgroupSockAddr,
    },
    ProgramSpec {
        name: PROG_SOCK_RECVMSG6,
        kind: ProgramKind::CgroupSockAddr,
    },
    ProgramSpec {
        name: PROG_SOCK_GETPEER6,
        kind: ProgramKind::CgroupSockAddr,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_map_and_program_name_is_listed_once_and_fits_bpffs() {
        for (index, spec) in MAPS.iter().enumerate() {
            assert!(MAPS[..index].iter().all(|other| other.name != spec.name));
            // bpf object names hold 15 bytes; pins refuse dots.
            assert!(spec.name.len() <= 15 && !spec.name.contains('.'));
            assert_eq!(map_spec(spec.name), Some(*spec));
        }
        for (index, spec) in PROGRAMS.iter().enumerate() {
            assert!(
                PROGRAMS[..index]
                    .iter()
                    .all(|other| other.name != spec.name)
            );
        }
        assert_eq!(map_spec("SVC_NOPE"), None);
    }

    #[test]
    fn every_trace_copy_rule_but_nothing_belongs_to_one_map() {
        for (index, spec) in MAPS.iter().enumerate() {
            if spec.trace_copy != TraceCopy::Nothing {
                assert!(
                    MAPS[..index]
                        .iter()
                        .all(|other| other.trace_copy != spec.trace_copy),
                    "{} shares its trace copy rule",
                    spec.name
                );
            }
        }
    }

    #[test]
    fn maps_are_checked_by_name_kind_and_sizes() {
        assert!(map_matches::<ConntrackKey, ConntrackValue>(
            MAP_CONNTRACK,
            MapKind::LruHash
        ));
        assert!(!map_matches::<ConntrackKey, ConntrackValue>(
            MAP_CONNTRACK,
            MapKind::Hash
        ));
        assert!(!map_matches::<FrontendKey, ConntrackValue>(
            MAP_CONNTRACK,
            MapKind::LruHash
        ));
        assert!(map_matches::<SockNatKey, SockNatValue>(
            MAP_SOCK_NAT,
            MapKind::LruHash
        ));
        assert!(!map_matches::<u32, u32>("SVC_NOPE", MapKind::Array));
    }
}
