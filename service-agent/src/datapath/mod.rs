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
    maps::MapType,
    programs::{CgroupSockAddr, SchedClassifier, Xdp},
};
use service_common::{MAPS, MapKind, MapSpec, PROGRAMS, ProgramKind};
pub use service_common::{
    PROG_BENCH_FLOOR_TC, PROG_BENCH_FLOOR_XDP, PROG_FROM_NETWORK, PROG_FROM_NETWORK_TC,
    PROG_FROM_POD, PROG_SOCK_CONNECT4, PROG_SOCK_GETPEER4, PROG_SOCK_RECVMSG4, PROG_SOCK_SENDMSG4,
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
    /// IPv4 fragments LRU map: one entry per fragmented datagram in flight.
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

/// Loads the eBPF object with every map pinned under `pin_path` (bpffs is
/// mounted there if needed). Maps already pinned there are reused, so a new
/// agent adopts the live maps instead of starting empty. Both programs are
/// loaded into the kernel, not attached.
pub fn load(pin_path: &Path) -> anyhow::Result<Ebpf> {
    load_with_sizes(pin_path, MapSizes::default())
}

/// The aya map type of a map kind of the shared table.
fn map_type(kind: MapKind) -> MapType {
    match kind {
        MapKind::Hash => MapType::Hash,
        MapKind::LruHash => MapType::LruHash,
        MapKind::Array => MapType::Array,
        MapKind::PerCpuArray => MapType::PerCpuArray,
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
pub fn load_with_sizes(pin_path: &Path, sizes: MapSizes) -> anyhow::Result<Ebpf> {
    bpffs::ensure_pin_dir(pin_path)?;
    drop_incompatible_pins(pin_path, sizes);
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_path);
    for spec in MAPS.iter().filter(|spec| !spec.fixed_capacity) {
        loader.map_max_entries(spec.name, sizes.capacity(spec));
    }
    let mut ebpf = loader.load(EBPF_OBJECT).with_context(|| {
        format!(
            "loading the eBPF object with maps pinned in {}",
            pin_path.display()
        )
    })?;
    for spec in &PROGRAMS {
        let name = spec.name;
        let program = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?;
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
        loaded.with_context(|| format!("the kernel refused program {name}"))?;
    }
    Ok(ebpf)
}
