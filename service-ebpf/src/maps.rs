//! The maps of the datapath. Keys and values come from `service-common`;
//! every map is pinned by name under the agent's `--pin-path` so a restarted
//! agent adopts them and `service-agent list` can read them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use service_common::{
    BACKENDS_MAX_ENTRIES, BackendId, BackendValue, CONNTRACK_MAX_ENTRIES, COUNTERS_MAX_ENTRIES,
    ConntrackKey, ConntrackValue, DatapathConfig, DatapathCounter, FRONTENDS_MAX_ENTRIES,
    FrontendKey, FrontendStats, FrontendValue, REVNAT_MAX_ENTRIES, RevNatId, RevNatValue,
};

/// Frontends: `{addr, port, proto, scope, slot}` to header or backend slot.
#[map(name = "SVC_FRONTENDS")]
pub static FRONTENDS: HashMap<FrontendKey, FrontendValue> =
    HashMap::pinned(FRONTENDS_MAX_ENTRIES, 0);

/// Backends: id to address and port.
#[map(name = "SVC_BACKENDS")]
pub static BACKENDS: HashMap<BackendId, BackendValue> = HashMap::pinned(BACKENDS_MAX_ENTRIES, 0);

/// Reverse NAT: frontend id to the frontend address replies come from.
#[map(name = "SVC_REVNAT")]
pub static REVNAT: HashMap<RevNatId, RevNatValue> = HashMap::pinned(REVNAT_MAX_ENTRIES, 0);

/// Connection tracking: one forward and one reply entry per flow.
#[map(name = "SVC_CONNTRACK")]
pub static CONNTRACK: LruHashMap<ConntrackKey, ConntrackValue> =
    LruHashMap::pinned(CONNTRACK_MAX_ENTRIES, 0);

/// Per-CPU counters per frontend, indexed by rev-NAT id.
#[map(name = "SVC_FE_STATS")]
pub static FRONTEND_STATS: PerCpuArray<FrontendStats> = PerCpuArray::pinned(REVNAT_MAX_ENTRIES, 0);

/// Per-CPU datapath event counters, indexed by `DatapathCounter`.
#[map(name = "SVC_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS_MAX_ENTRIES, 0);

/// Node-wide settings written by the agent (one entry).
#[map(name = "SVC_CONFIG")]
pub static CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

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
