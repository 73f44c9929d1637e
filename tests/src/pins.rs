//! bpffs pin folders for tests, removed (with every pin in them) on drop.

use std::path::{Path, PathBuf};

/// A pin folder under `/sys/fs/bpf/service-lb-test/`.
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// Creates a fresh pin folder named after `tag` and this process.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let path = PathBuf::from("/sys/fs/bpf/service-lb-test")
            .join(format!("{tag}-{}", crate::netns::unique_prefix("p")));
        let _ = std::fs::remove_dir_all(&path);
        service_agent::datapath::bpffs::ensure_pin_dir(&path)?;
        Ok(PinDir { path })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        service_agent::ops::status::remove(&self.path);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Every entry of a map as raw bytes: (key, value), sorted by key.
pub type MapBytes = Vec<(Vec<u8>, Vec<u8>)>;

/// The raw bytes of every entry of every map of the shared table pinned
/// under `pin_path`, by map name: keys with their values (for per-CPU maps,
/// every CPU's), read through the bpf syscall as the kernel holds them.
/// Reading changes nothing: syscall lookups do not mark LRU entries used.
/// Two dumps compare equal exactly when no map changed.
pub fn pinned_map_bytes(
    pin_path: &Path,
) -> anyhow::Result<std::collections::BTreeMap<&'static str, MapBytes>> {
    use anyhow::Context as _;
    use aya::maps::{MapData, MapInfo};
    use std::os::fd::{AsFd as _, AsRawFd as _};

    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let mut dump = std::collections::BTreeMap::new();
    for spec in &service_common::MAPS {
        let pin = pin_path.join(spec.name);
        let info = MapInfo::from_pin(&pin).with_context(|| format!("{}", pin.display()))?;
        let map = MapData::from_pin(&pin).with_context(|| format!("{}", pin.display()))?;
        let fd = map.fd().as_fd().as_raw_fd();
        let value_size = match spec.kind {
            service_common::MapKind::PerCpuArray => {
                info.value_size().next_multiple_of(8) as usize * cpus
            }
            _ => info.value_size() as usize,
        };
        let mut entries = Vec::new();
        let mut key: Option<Vec<u8>> = None;
        loop {
            let mut next = vec![0u8; info.key_size() as usize];
            if !raw_map_call(BPF_MAP_GET_NEXT_KEY, fd, key.as_deref(), next.as_mut_ptr())? {
                break;
            }
            let mut value = vec![0u8; value_size];
            // An entry deleted between the two calls is no entry.
            if raw_map_call(BPF_MAP_LOOKUP_ELEM, fd, Some(&next), value.as_mut_ptr())? {
                entries.push((next.clone(), value));
            }
            key = Some(next);
        }
        entries.sort();
        dump.insert(spec.name, entries);
    }
    Ok(dump)
}

/// `BPF_MAP_LOOKUP_ELEM` (linux/bpf.h).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
/// `BPF_MAP_GET_NEXT_KEY` (linux/bpf.h).
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The map-element part of `union bpf_attr` (linux/bpf.h).
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// One read-only map command on `fd` (`key` absent: the first key);
/// `Ok(false)` when the kernel answers ENOENT (no such entry, or no more).
fn raw_map_call(
    command: libc::c_long,
    fd: i32,
    key: Option<&[u8]>,
    out: *mut u8,
) -> std::io::Result<bool> {
    let attr = MapElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        value_or_next_key: out as u64,
        flags: 0,
    };
    // SAFETY: `attr` points at buffers of the map's key and value sizes
    // that outlive the call; both commands only write into `out`.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            &attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>(),
        )
    };
    if result == 0 {
        return Ok(true);
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENOENT) {
        Ok(false)
    } else {
        Err(error)
    }
}

/// Every session affinity entry of the `SVC_AFFINITY` map pinned under
/// `pin_path`, sorted by key: (client and frontend, backend chosen).
pub fn affinity_entries(
    pin_path: &Path,
) -> anyhow::Result<Vec<(service_common::AffinityKey, service_common::AffinityValue)>> {
    use aya::maps::{HashMap, MapData};

    let map = service_agent::datapath::maps::open_pinned(pin_path, service_common::MAP_AFFINITY)?;
    let map: HashMap<MapData, service_common::AffinityKey, service_common::AffinityValue> =
        HashMap::try_from(map)?;
    let mut entries = map.iter().collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|(key, _)| (key.rev_nat_id, key.family, key.client));
    Ok(entries)
}
