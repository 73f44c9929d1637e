//! Loading the embedded eBPF object with its maps pinned, after dropping
//! pins of another layout (checked against the shared table of maps).

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::MapType,
    programs::{CgroupSockAddr, SchedClassifier, Xdp},
};
use service_common::{MAPS, MapKind, PROGRAMS, ProgramKind};

use super::{EBPF_OBJECT, MapSizes, bpffs};
use crate::error::{Context as _, Error};

/// Loads the eBPF object with every map pinned under `pin_path` (bpffs is
/// mounted there if needed). Maps already pinned there are reused, so a new
/// agent adopts the live maps instead of starting empty. Both programs are
/// loaded into the kernel, not attached.
pub fn load(pin_path: &Path) -> crate::Result<Ebpf> {
    load_with_sizes(pin_path, MapSizes::default())
}

/// The aya map type of a map kind of the shared table.
pub fn map_type(kind: MapKind) -> MapType {
    match kind {
        MapKind::Hash => MapType::Hash,
        MapKind::LruHash => MapType::LruHash,
        MapKind::Array => MapType::Array,
        MapKind::PerCpuArray => MapType::PerCpuArray,
        MapKind::LpmTrie => MapType::LpmTrie,
    }
}

/// Unpins maps left by an agent whose map layout differs from this one's
/// (an upgrade that changed a map's kind, key or value, or the number of
/// counters), checked against the shared table ([`MAPS`]): aya would reuse
/// a pinned map as it is, and entries of another layout would be misread.
/// Such a map starts empty, with a warning. A map whose only difference is
/// its capacity (`--map-size-*`) is kept, with a warning that the new size
/// applies once its pin is removed: dropping the conntrack map would reset
/// established flows.
fn drop_incompatible_pins(pin_path: &Path, sizes: MapSizes) {
    for spec in &MAPS {
        let capacity = sizes.capacity(spec);
        let pin = pin_path.join(spec.name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&pin) else {
            continue;
        };
        let layout_differs = info.map_type().ok() != Some(map_type(spec.kind))
            || info.key_size() != spec.key_size
            || info.value_size() != spec.value_size
            || (spec.fixed_capacity && info.max_entries() != capacity);
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
pub fn load_with_sizes(pin_path: &Path, sizes: MapSizes) -> crate::Result<Ebpf> {
    load_with_options(pin_path, sizes, None)
}

/// The global of the socket-LB programs holding the one network namespace
/// they serve (0: all).
pub const SOCK_LB_HOST_NETNS_COOKIE: &str = "SOCK_LB_HOST_NETNS_COOKIE";

/// The global of the socket-LB programs holding the node's network
/// namespace (the loader's own; 0: unknown), so they leave pods' connected
/// UDP sockets to the packet hooks.
pub const NODE_NETNS_COOKIE: &str = "NODE_NETNS_COOKIE";

/// [`load_with_sizes`], with socket-LB limited to the network namespace of
/// cookie `socket_lb_netns` (`--socket-lb-host-namespace-only`), if given.
pub fn load_with_options(
    pin_path: &Path,
    sizes: MapSizes,
    socket_lb_netns: Option<u64>,
) -> crate::Result<Ebpf> {
    bpffs::ensure_pin_dir(pin_path)?;
    drop_incompatible_pins(pin_path, sizes);
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_path);
    let netns_cookie = socket_lb_netns.unwrap_or(0);
    loader.override_global(SOCK_LB_HOST_NETNS_COOKIE, &netns_cookie, true);
    // Without the cookie (a kernel before 5.14), every socket counts as
    // the node's: socket-LB translates pods' connected UDP sockets too.
    let node_cookie = super::netns::current_netns_cookie().unwrap_or_else(|e| {
        log::warn!(
            "{}: socket-LB translates pods' connected UDP sockets too",
            e.report()
        );
        0
    });
    loader.override_global(NODE_NETNS_COOKIE, &node_cookie, true);
    for spec in MAPS.iter().filter(|spec| !spec.fixed_capacity) {
        loader.map_max_entries(spec.name, sizes.capacity(spec));
    }
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(|source| Error::Load {
        pin_path: pin_path.to_owned(),
        source: Box::new(source),
    })?;
    for spec in &PROGRAMS {
        let name = spec.name;
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| Error::MissingProgram {
                program: name.to_owned(),
            })?;
        let loaded = match spec.kind {
            ProgramKind::Classifier => {
                let program: &mut SchedClassifier = program
                    .try_into()
                    .with_context(|| format!("program {name} is not a TC classifier"))?;
                program.load()
            }
            ProgramKind::Xdp => {
                let program: &mut Xdp = program
                    .try_into()
                    .with_context(|| format!("program {name} is not an XDP program"))?;
                program.load()
            }
            ProgramKind::CgroupSockAddr => {
                let program: &mut CgroupSockAddr = program
                    .try_into()
                    .with_context(|| format!("program {name} is not a cgroup socket program"))?;
                // The socket-LB programs need kernel 5.18
                // (`bpf_set_retval`): where the kernel refuses them, the
                // rest of the datapath still works, and attaching them
                // (`--cgroup-path`) fails with this reason.
                if let Err(e) = program.load() {
                    log::warn!(
                        "the kernel refused program {name} ({e}); socket-LB (--cgroup-path) is unavailable"
                    );
                }
                Ok(())
            }
        };
        loaded.map_err(|source| Error::ProgramLoad {
            program: name.to_owned(),
            source: Box::new(source),
        })?;
    }
    Ok(ebpf)
}
