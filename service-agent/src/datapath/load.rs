//! Loading the embedded eBPF object with its maps pinned, after dropping
//! pins of another layout.

use std::path::Path;

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSockAddr, SchedClassifier, Xdp},
};

use super::{
    EBPF_OBJECT, MapSizes, PROG_BENCH_FLOOR_TC, PROG_BENCH_FLOOR_XDP, PROG_FROM_NETWORK,
    PROG_FROM_NETWORK_TC, PROG_FROM_POD, PROG_SOCK_CONNECT4, PROG_SOCK_GETPEER4,
    PROG_SOCK_RECVMSG4, PROG_SOCK_SENDMSG4, PROG_TO_NETWORK, PROG_TO_POD, bpffs,
};

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
