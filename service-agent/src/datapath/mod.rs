//! The kernel side as the agent sees it: the embedded eBPF object and its
//! program names, [`load`]ing it with its maps pinned ([`bpffs`]),
//! [`attach`]ing its programs to devices and cgroups ([`cgroup`]), the
//! node's [`addresses`], and the maps: their contents as plain data
//! ([`model`]) and the kernel maps that hold them ([`maps`]). Nothing here
//! depends on the reconciler above it.

pub mod addresses;
pub mod attach;
pub mod bpffs;
pub mod cgroup;
pub mod load;
pub mod maps;
pub mod model;
pub mod sys;

pub use load::{load, load_with_sizes};

/// The eBPF object built from `service-ebpf` by the build script.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("SERVICE_EBPF_OBJECT"));

/// Default folder the maps (and later the links) are pinned in.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/service-lb";

/// Name of the "from pod" program (TC ingress on a pod's host-side device).
pub const PROG_FROM_POD: &str = "from_pod";
/// Name of the "to pod" program (TC egress on a pod's host-side device).
pub const PROG_TO_POD: &str = "to_pod";

/// Name of the "from network" XDP program (external devices).
pub const PROG_FROM_NETWORK: &str = "from_network";
/// Name of the "from network" TC ingress program (`--nodeport-mode tc`).
pub const PROG_FROM_NETWORK_TC: &str = "from_network_tc";
/// Name of the "to network" TC egress program (external devices).
pub const PROG_TO_NETWORK: &str = "to_network";
/// Name of the TC benchmark floor program (returns its verdict, nothing else).
pub const PROG_BENCH_FLOOR_TC: &str = "bench_floor_tc";
/// Name of the XDP benchmark floor program (passes, nothing else).
pub const PROG_BENCH_FLOOR_XDP: &str = "bench_floor_xdp";

/// Name of the socket-LB `connect4` program (cgroup, `--cgroup-path`).
pub const PROG_SOCK_CONNECT4: &str = "sock_connect4";
/// Name of the socket-LB `sendmsg4` program (unconnected UDP).
pub const PROG_SOCK_SENDMSG4: &str = "sock_sendmsg4";
/// Name of the socket-LB `recvmsg4` program (UDP answers from the frontend).
pub const PROG_SOCK_RECVMSG4: &str = "sock_recvmsg4";
/// Name of the socket-LB `getpeername4` program (the frontend as peer).
pub const PROG_SOCK_GETPEER4: &str = "sock_getpeer4";

/// Capacities of the maps, set when they are created. Maps that already
/// exist under the pin folder keep the size they were created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Frontends map: one header plus one slot per backend, per frontend.
    pub frontends: u32,
    /// Backends map.
    pub backends: u32,
    /// Reverse-NAT map and per-frontend stats: the number of frontends.
    pub revnat: u32,
    /// Conntrack LRU map: two entries per flow.
    pub conntrack: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            frontends: service_common::FRONTENDS_MAX_ENTRIES,
            backends: service_common::BACKENDS_MAX_ENTRIES,
            revnat: service_common::REVNAT_MAX_ENTRIES,
            conntrack: service_common::CONNTRACK_MAX_ENTRIES,
        }
    }
}
