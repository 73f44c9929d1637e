//! The kernel side as the agent sees it: the embedded eBPF object, loading
//! it with its maps pinned, attaching its programs to devices, and reading
//! and writing the maps.

pub mod addresses;
pub mod attach;
pub mod bpffs;
pub mod cgroup;
pub mod maps;

use std::path::Path;

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSockAddr, SchedClassifier, Xdp},
};

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

/// Loads the eBPF object with every map pinned under `pin_path` (bpffs is
/// mounted there if needed). Maps already pinned there are reused, so a new
/// agent adopts the live maps instead of starting empty. Both programs are
/// loaded into the kernel, not attached.
pub fn load(pin_path: &Path) -> anyhow::Result<Ebpf> {
    load_with_sizes(pin_path, MapSizes::default())
}

/// Unpins maps left by an agent whose map layout differs from this one's
/// (an upgrade that changed a key or value, or the number of counters):
/// aya would reuse a pinned map as it is, and entries of another layout
/// would be misread. Such a map starts empty, with a warning. A map whose
/// only difference is its capacity (`--map-size-*`) is kept, with a
/// warning that the new size applies once its pin is removed: dropping the
/// conntrack map would reset established flows.
fn drop_incompatible_pins(pin_path: &Path, sizes: MapSizes) {
    use core::mem::size_of;
    use service_common::*;
    // (name, key size, value size, capacity, whether the capacity is part
    // of the layout)
    let expected: [(&str, usize, usize, u32, bool); 7] = [
        (
            MAP_FRONTENDS,
            size_of::<FrontendKey>(),
            size_of::<FrontendValue>(),
            sizes.frontends,
            false,
        ),
        (
            MAP_BACKENDS,
            size_of::<BackendId>(),
            size_of::<BackendValue>(),
            sizes.backends,
            false,
        ),
        (
            MAP_REVNAT,
            size_of::<RevNatId>(),
            size_of::<RevNatValue>(),
            sizes.revnat,
            false,
        ),
        (
            MAP_CONNTRACK,
            size_of::<ConntrackKey>(),
            size_of::<ConntrackValue>(),
            sizes.conntrack,
            false,
        ),
        (
            MAP_FRONTEND_STATS,
            size_of::<u32>(),
            size_of::<FrontendStats>(),
            sizes.revnat,
            false,
        ),
        (
            MAP_COUNTERS,
            size_of::<u32>(),
            size_of::<u64>(),
            COUNTERS_MAX_ENTRIES,
            true,
        ),
        (
            MAP_CONFIG,
            size_of::<u32>(),
            size_of::<DatapathConfig>(),
            1,
            true,
        ),
    ];
    for (name, key_size, value_size, capacity, capacity_is_layout) in expected {
        let pin = pin_path.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&pin) else {
            continue;
        };
        let layout_differs = info.key_size() as usize != key_size
            || info.value_size() as usize != value_size
            || (capacity_is_layout && info.max_entries() != capacity);
        if layout_differs {
            log::warn!(
                "pinned map {} has another layout (key {} B, value {} B, {} entries): starting it afresh",
                pin.display(),
                info.key_size(),
                info.value_size(),
                info.max_entries()
            );
            let _ = std::fs::remove_file(&pin);
        } else if info.max_entries() != capacity {
            log::warn!(
                "pinned map {} keeps its capacity of {} entries (asked: {capacity}); remove the pin to resize it",
                pin.display(),
                info.max_entries()
            );
        }
    }
}

/// [`load`] with map capacities other than the defaults.
pub fn load_with_sizes(pin_path: &Path, sizes: MapSizes) -> anyhow::Result<Ebpf> {
    bpffs::ensure_pin_dir(pin_path)?;
    drop_incompatible_pins(pin_path, sizes);
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_path)
        .map_max_entries(service_common::MAP_FRONTENDS, sizes.frontends)
        .map_max_entries(service_common::MAP_BACKENDS, sizes.backends)
        .map_max_entries(service_common::MAP_REVNAT, sizes.revnat)
        .map_max_entries(service_common::MAP_FRONTEND_STATS, sizes.revnat)
        .map_max_entries(service_common::MAP_CONNTRACK, sizes.conntrack)
        .load(EBPF_OBJECT)
        .with_context(|| {
            format!(
                "loading the eBPF object with maps pinned in {}",
                pin_path.display()
            )
        })?;
    for name in [
        PROG_FROM_POD,
        PROG_TO_POD,
        PROG_FROM_NETWORK_TC,
        PROG_TO_NETWORK,
        PROG_BENCH_FLOOR_TC,
    ] {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?
            .try_into()
            .with_context(|| format!("program {name} is not a TC classifier"))?;
        program
            .load()
            .with_context(|| format!("the kernel refused program {name}"))?;
    }
    for name in [PROG_FROM_NETWORK, PROG_BENCH_FLOOR_XDP] {
        let xdp: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?
            .try_into()
            .with_context(|| format!("program {name} is not an XDP program"))?;
        xdp.load()
            .with_context(|| format!("the kernel refused program {name}"))?;
    }
    // The socket-LB programs need kernel 5.18 (`bpf_set_retval`): where the
    // kernel refuses them, the rest of the datapath still works, and
    // attaching them (`--cgroup-path`) fails with this reason.
    for name in [
        PROG_SOCK_CONNECT4,
        PROG_SOCK_SENDMSG4,
        PROG_SOCK_RECVMSG4,
        PROG_SOCK_GETPEER4,
    ] {
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?
            .try_into()
            .with_context(|| format!("program {name} is not a cgroup socket program"))?;
        if let Err(e) = program.load() {
            log::warn!(
                "the kernel refused program {name} ({e}); socket-LB (--cgroup-path) is unavailable"
            );
        }
    }
    Ok(ebpf)
}
