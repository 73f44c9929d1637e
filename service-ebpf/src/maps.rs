//! Every map of the datapath. Keys, values, names and capacities come from
//! `service-common`, whose map table ([`service_common::MAPS`]) each
//! definition is checked against at compile time (name, kind, key and
//! value sizes). Every map is pinned by name under the agent's
//! `--pin-path` so a restarted agent adopts them and `service-agent list`
//! can read them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use service_common::{
    AFFINITY_MAX_ENTRIES, AffinityKey, AffinityValue, BACKENDS_MAX_ENTRIES, BackendId,
    BackendValue, CONNTRACK_MAX_ENTRIES, COUNTERS_MAX_ENTRIES, ConntrackKey, ConntrackValue,
    DatapathConfig, DatapathCounter, FRAGMENTS_MAX_ENTRIES, FRONTENDS_MAX_ENTRIES, FragmentKey,
    FragmentValue, FrontendKey, FrontendStats, FrontendValue, IdCursors, MapKind,
    REVNAT_MAX_ENTRIES, RevNatId, RevNatValue, SOCK_NAT_MAX_ENTRIES, SOURCE_RANGES_MAX_ENTRIES,
    SockNatKey, SockNatValue, SourceRangeKey, SourceRangePrefix, SourceRangeValue, map_matches,
};

/// Asserts at compile time that the map named `$name` (the literal its
/// `#[map]` attribute carries) is in the shared table with key `$key`,
/// value `$value` and kind `$kind`.
macro_rules! check_map {
    ($name:literal, $key:ty, $value:ty, $kind:expr) => {
        const _: () = assert!(
            map_matches::<$key, $value>($name, $kind),
            concat!("map ", $name, " differs from service_common::MAPS")
        );
    };
}

/// Frontends: `{addr, port, proto, scope, slot}` to header or backend slot.
#[map(name = "SVC_FRONTENDS")]
pub static FRONTENDS: HashMap<FrontendKey, FrontendValue> =
    HashMap::pinned(FRONTENDS_MAX_ENTRIES, 0);
check_map!("SVC_FRONTENDS", FrontendKey, FrontendValue, MapKind::Hash);

/// Backends: id to address and port. An array, so the backend check every
/// packet of a tracked flow makes is an inlined index, not a hash lookup;
/// an all-zero entry is no backend (`BackendValue::exists`).
#[map(name = "SVC_BACKENDS")]
pub static BACKENDS: Array<BackendValue> = Array::pinned(BACKENDS_MAX_ENTRIES, 0);
check_map!("SVC_BACKENDS", BackendId, BackendValue, MapKind::Array);

/// Reverse NAT: frontend id to the frontend address replies come from.
#[map(name = "SVC_REVNAT")]
pub static REVNAT: HashMap<RevNatId, RevNatValue> = HashMap::pinned(REVNAT_MAX_ENTRIES, 0);
check_map!("SVC_REVNAT", RevNatId, RevNatValue, MapKind::Hash);

/// Connection tracking: every entry of every flow (see `conntrack`).
#[map(name = "SVC_CONNTRACK")]
pub static CONNTRACK: LruHashMap<ConntrackKey, ConntrackValue> =
    LruHashMap::pinned(CONNTRACK_MAX_ENTRIES, 0);
check_map!(
    "SVC_CONNTRACK",
    ConntrackKey,
    ConntrackValue,
    MapKind::LruHash
);

/// IPv4 fragments: the ports of a translated datagram's first fragment.
#[map(name = "SVC_FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> =
    LruHashMap::pinned(FRAGMENTS_MAX_ENTRIES, 0);
check_map!(
    "SVC_FRAGMENTS",
    FragmentKey,
    FragmentValue,
    MapKind::LruHash
);

/// Per-CPU counters per frontend, indexed by rev-NAT id.
#[map(name = "SVC_FE_STATS")]
pub static FRONTEND_STATS: PerCpuArray<FrontendStats> = PerCpuArray::pinned(REVNAT_MAX_ENTRIES, 0);
check_map!("SVC_FE_STATS", u32, FrontendStats, MapKind::PerCpuArray);

/// Per-CPU datapath event counters, indexed by `DatapathCounter`.
#[map(name = "SVC_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS_MAX_ENTRIES, 0);
check_map!("SVC_COUNTERS", u32, u64, MapKind::PerCpuArray);

/// Node-wide settings written by the agent (one entry).
#[map(name = "SVC_CONFIG")]
pub static CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);
check_map!("SVC_CONFIG", u32, DatapathConfig, MapKind::Array);

/// Socket-LB translations: per socket, frontend to backend (UDP) and
/// backend to frontend (every translated socket). See `sock`.
#[map(name = "SVC_SOCK_NAT")]
pub static SOCK_NAT: LruHashMap<SockNatKey, SockNatValue> =
    LruHashMap::pinned(SOCK_NAT_MAX_ENTRIES, 0);
check_map!("SVC_SOCK_NAT", SockNatKey, SockNatValue, MapKind::LruHash);

/// Where the agent's id allocators stand. Only the agent reads and writes
/// it; it is defined here so it is created and pinned with the others.
#[map(name = "SVC_ID_CURSORS")]
pub static ID_CURSORS: Array<IdCursors> = Array::pinned(1, 0);
check_map!("SVC_ID_CURSORS", u32, IdCursors, MapKind::Array);

/// Session affinity: per client and frontend, the backend it was given
/// and when (see `service_common::affinity`). Written by the datapath only.
#[map(name = "SVC_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(AFFINITY_MAX_ENTRIES, 0);
check_map!("SVC_AFFINITY", AffinityKey, AffinityValue, MapKind::LruHash);

/// `loadBalancerSourceRanges`: per LoadBalancer frontend, the client
/// prefixes it admits (see `service_common::source_ranges`).
#[map(name = "SVC_SRC_RANGES")]
pub static SOURCE_RANGES: LpmTrie<SourceRangePrefix, SourceRangeValue> =
    LpmTrie::pinned(SOURCE_RANGES_MAX_ENTRIES, 0);
check_map!(
    "SVC_SRC_RANGES",
    SourceRangeKey,
    SourceRangeValue,
    MapKind::LpmTrie
);

/// `BPF_ANY`: insert or replace.
pub const BPF_ANY: u64 = 0;
/// `BPF_NOEXIST`: insert only if the key is absent.
pub const BPF_NOEXIST: u64 = 1;

/// The node-wide settings (all zero, every default, until the agent
/// writes them), read in place. `None` never happens (index 0 of a
/// one-entry array) but the verifier wants it handled.
#[inline(always)]
pub fn config() -> Option<&'static DatapathConfig> {
    CONFIG.get(0)
}

/// Adds one to a datapath event counter.
#[inline(always)]
pub fn count(counter: DatapathCounter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *value += 1 };
    }
}

/// Accounts one forward packet (and possibly a new flow) to a frontend.
#[inline(always)]
pub fn account_frontend(rev_nat_id: RevNatId, bytes: u32, new_flow: bool) {
    if let Some(stats) = FRONTEND_STATS.get_ptr_mut(rev_nat_id) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += u64::from(bytes);
            if new_flow {
                (*stats).new_flows += 1;
            }
        }
    }
}
