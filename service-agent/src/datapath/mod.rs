//! The kernel side as the agent sees it: the embedded eBPF object and its
//! program names, [`load`]ing it with its maps pinned ([`bpffs`]),
//! [`attach`]ing its programs to devices and cgroups ([`cgroup`]), the
//! node's [`addresses`], and the maps: their contents as plain data
//! ([`model`]) and the kernel maps that hold them ([`maps`]), the conntrack
//! map as the collector walks it ([`conntrack`]), and the raw `bpf(2)`
//! batch calls aya lacks ([`sys`]), the id allocators' position kept across
//! restarts ([`id_cursors`]), the node's ephemeral ports kept off the
//! SNAT range ([`snat_ports`]), a private [`snapshot`] of what one
//! packet can read, to run it through the real programs without touching
//! the live maps, and the node's connected UDP sockets socket-LB sent to a
//! backend now gone, destroyed through netlink ([`sock_diag`]). Nothing
//! here depends on the reconciler above it.

pub mod addresses;
pub mod attach;
pub mod bpffs;
pub mod cgroup;
pub mod conntrack;
pub mod id_cursors;
pub mod load;
pub mod maps;
pub mod model;
pub mod netns;
pub mod snapshot;
pub mod snat_ports;
pub mod sock_diag;
pub mod sys;

pub use load::{load, load_with_options, load_with_sizes};
use service_common::MapSpec;
pub use service_common::{
    PROG_BENCH_CONNTRACK_TC, PROG_BENCH_CONNTRACK_XDP, PROG_BENCH_FLOOR_TC, PROG_BENCH_FLOOR_XDP,
    PROG_FROM_NETWORK, PROG_FROM_NETWORK_DEFERRED, PROG_FROM_NETWORK_TC, PROG_FROM_POD,
    PROG_SOCK_CONNECT4, PROG_SOCK_CONNECT6, PROG_SOCK_GETPEER4, PROG_SOCK_GETPEER6,
    PROG_SOCK_RECVMSG4, PROG_SOCK_RECVMSG6, PROG_SOCK_SENDMSG4, PROG_SOCK_SENDMSG6,
    PROG_TO_NETWORK, PROG_TO_POD,
};

/// The eBPF object built from `service-ebpf` by the build script.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("SERVICE_EBPF_OBJECT"));

/// Default folder the maps (and later the links) are pinned in.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/service-lb";

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
    /// Conntrack LRU map: two entries per flow (four when SNATed).
    pub conntrack: u32,
    /// Fragments LRU map: one entry per fragmented datagram (IPv4 or IPv6)
    /// in flight.
    pub fragments: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            frontends: service_common::FRONTENDS_MAX_ENTRIES,
            backends: service_common::BACKENDS_MAX_ENTRIES,
            revnat: service_common::REVNAT_MAX_ENTRIES,
            conntrack: service_common::CONNTRACK_MAX_ENTRIES,
            fragments: service_common::FRAGMENTS_MAX_ENTRIES,
        }
    }
}

impl MapSizes {
    /// The capacity the map of `spec` is created with: the setting for the
    /// maps sized by `--map-size-*`, the table's capacity for the others.
    pub fn capacity(&self, spec: &MapSpec) -> u32 {
        use service_common::{
            MAP_BACKENDS, MAP_CONNTRACK, MAP_FRAGMENTS, MAP_FRONTEND_STATS, MAP_FRONTENDS,
            MAP_REVNAT,
        };
        match spec.name {
            MAP_FRONTENDS => self.frontends,
            MAP_BACKENDS => self.backends,
            MAP_REVNAT | MAP_FRONTEND_STATS => self.revnat,
            MAP_CONNTRACK => self.conntrack,
            MAP_FRAGMENTS => self.fragments,
            _ => spec.max_entries,
        }
    }
}
