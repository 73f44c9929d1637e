//! Typed access to the datapath's maps, either taken from a freshly loaded
//! object (the agent) or opened from their pins (`service-agent list`).

use std::{collections::BTreeMap, io, os::fd::AsFd as _, path::Path};

use aya::{
    Ebpf, Pod,
    maps::{
        Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
};
use service_common::{
    BackendValue, DatapathConfig, DatapathCounter, FrontendKey, FrontendStats, FrontendValue,
    MAP_BACKENDS, MAP_CONFIG, MAP_COUNTERS, MAP_FRONTEND_STATS, MAP_FRONTENDS, MAP_REVNAT,
    MAP_SOURCE_RANGES, RevNatId, RevNatValue, SOURCE_RANGE_ALLOW, SourceRangeKey,
    SourceRangePrefix, SourceRangeValue,
};

use super::{
    model::{BatchFailure, MapName, MapOp, MapReader, MapState, MapWriter},
    sys,
};
use crate::error::{Context as _, Error};

/// The maps the agent programs.
pub struct ServiceMaps {
    /// Frontends map.
    pub frontends: HashMap<MapData, FrontendKey, FrontendValue>,
    /// Backends map: an array indexed by backend id, an all-zero entry
    /// where no backend has the id.
    pub backends: Array<MapData, BackendValue>,
    /// Reverse-NAT map.
    pub revnat: HashMap<MapData, RevNatId, RevNatValue>,
    /// `loadBalancerSourceRanges` trie (no batch operations: written and
    /// read one entry at a time).
    pub source_ranges: LpmTrie<MapData, SourceRangePrefix, SourceRangeValue>,
    /// Whether the kernel takes batch writes (`BPF_MAP_UPDATE_BATCH`,
    /// kernel 5.6); cleared at the first refusal, after which every entry
    /// is written with its own call.
    batches: bool,
}

/// A failed map write.
#[derive(Debug, thiserror::Error)]
#[error("{}", describe(*.map, .source))]
pub struct MapWriteError {
    /// The map written.
    pub map: MapName,
    /// The kernel's answer (E2BIG when a hash map is full).
    pub source: io::Error,
}

/// `writing the frontends map failed: the map is full (E2BIG)`, or the
/// kernel's own words for other errors.
fn describe(map: MapName, error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::E2BIG) => format!("writing the {map} map failed: the map is full (E2BIG)"),
        Some(libc::ENOMEM) => format!("writing the {map} map failed: out of memory (ENOMEM)"),
        _ => format!("writing the {map} map failed: {error}"),
    }
}

/// The I/O error inside an aya map error.
pub(crate) fn io_error(error: MapError) -> io::Error {
    match error {
        MapError::SyscallError(e) => e.io_error,
        MapError::KeyNotFound => io::Error::from_raw_os_error(libc::ENOENT),
        other => io::Error::other(other.to_string()),
    }
}

impl ServiceMaps {
    /// Takes the maps out of a loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> crate::Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name).ok_or_else(|| Error::MissingMap {
                map: name.to_owned(),
            })
        };
        Ok(ServiceMaps {
            frontends: HashMap::try_from(take(MAP_FRONTENDS)?)?,
            backends: Array::try_from(take(MAP_BACKENDS)?)?,
            revnat: HashMap::try_from(take(MAP_REVNAT)?)?,
            source_ranges: LpmTrie::try_from(take(MAP_SOURCE_RANGES)?)?,
            batches: true,
        })
    }

    /// Opens the maps pinned under `pin_path`.
    pub fn open_pinned(pin_path: &Path) -> crate::Result<Self> {
        Ok(ServiceMaps {
            frontends: HashMap::try_from(open_pinned(pin_path, MAP_FRONTENDS)?)?,
            backends: Array::try_from(open_pinned(pin_path, MAP_BACKENDS)?)?,
            revnat: HashMap::try_from(open_pinned(pin_path, MAP_REVNAT)?)?,
            source_ranges: LpmTrie::try_from(open_pinned(pin_path, MAP_SOURCE_RANGES)?)?,
            batches: true,
        })
    }
}

impl MapReader for ServiceMaps {
    fn read_state(&self) -> crate::Result<MapState> {
        let mut state = MapState::default();
        read_all(&self.frontends, |k, v| {
            state.frontends.insert(k, v);
        })
        .map_err(Error::map("reading", MAP_FRONTENDS))?;
        read_backends(&self.backends, |k, v| {
            state.backends.insert(k, v);
        })
        .map_err(Error::map("reading", MAP_BACKENDS))?;
        read_all(&self.revnat, |k, v| {
            state.revnat.insert(k, v);
        })
        .map_err(Error::map("reading", MAP_REVNAT))?;
        for key in self.source_ranges.keys() {
            let key = key.map_err(Error::map("reading", MAP_SOURCE_RANGES))?;
            state.source_ranges.insert(SourceRangeKey {
                prefix_len: key.prefix_len(),
                data: key.data(),
            });
        }
        Ok(state)
    }
}

/// Reads every entry of a hash map: in batches where the kernel has them,
/// else one key at a time.
fn read_all<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    mut entry: impl FnMut(K, V),
) -> Result<(), MapError> {
    match sys::lookup_all(map.map().fd().as_fd(), &mut entry) {
        Ok(()) => Ok(()),
        Err(e) if sys::unsupported(&e) => {
            for item in map.iter() {
                let (key, value) = item?;
                entry(key, value);
            }
            Ok(())
        }
        Err(e) => Err(MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error: e,
        })),
    }
}

/// Reads every backend of the backends array (indexed by id; an all-zero
/// entry is no backend): in batches where the kernel has them, else one
/// index at a time.
fn read_backends(
    map: &Array<MapData, BackendValue>,
    mut entry: impl FnMut(u32, BackendValue),
) -> Result<(), MapError> {
    let mut existing = |id: u32, value: BackendValue| {
        if value.exists() {
            entry(id, value);
        }
    };
    match sys::lookup_all(map.map().fd().as_fd(), &mut existing) {
        Ok(()) => Ok(()),
        Err(e) if sys::unsupported(&e) => {
            for (id, value) in (0..).zip(map.iter()) {
                existing(id, value?);
            }
            Ok(())
        }
        Err(e) => Err(MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error: e,
        })),
    }
}

/// Writes backends to the backends array: an array entry is never removed,
/// so a delete writes the all-zero entry that is no backend. In batches
/// unless the kernel refused one; returns how many were done before a
/// failure, and the failure.
fn write_backends(
    map: &mut Array<MapData, BackendValue>,
    (mut ids, mut values): (Vec<u32>, Vec<BackendValue>),
    deletes: &[u32],
    batches: &mut bool,
) -> Result<(), (usize, io::Error)> {
    debug_assert!(ids.is_empty() || deletes.is_empty());
    ids.extend_from_slice(deletes);
    values.extend(deletes.iter().map(|_| BackendValue::default()));
    if *batches {
        match sys::update_batch(map.map().fd().as_fd(), &ids, &values) {
            Ok(()) => return Ok(()),
            Err(e) if e.done == 0 && sys::unsupported(&e.error) => {
                log::info!(
                    "the kernel refused a batch map write ({}); writing one entry at a time",
                    e.error
                );
                *batches = false;
            }
            Err(e) => return Err((e.done, e.error)),
        }
    }
    for (i, (id, value)) in ids.iter().zip(&values).enumerate() {
        map.set(*id, value, 0).map_err(|e| (i, io_error(e)))?;
    }
    Ok(())
}

impl MapWriter for ServiceMaps {
    type Error = MapWriteError;

    fn apply_batch(&mut self, ops: &[MapOp]) -> Result<(), BatchFailure<MapWriteError>> {
        let Some(first) = ops.first() else {
            return Ok(());
        };
        let map = first.map();
        let batches = &mut self.batches;
        let result = match map {
            MapName::Frontends => {
                let (upserts, deletes) = split(ops, |op| match *op {
                    MapOp::UpsertFrontend(k, v) => Some(Ok((k, v))),
                    MapOp::DeleteFrontend(k) => Some(Err(k)),
                    _ => None,
                });
                write(&mut self.frontends, &upserts, &deletes, batches)
            }
            MapName::Backends => {
                let (upserts, deletes) = split(ops, |op| match *op {
                    MapOp::UpsertBackend(k, v) => Some(Ok((k, v))),
                    MapOp::DeleteBackend(k) => Some(Err(k)),
                    _ => None,
                });
                write_backends(&mut self.backends, upserts, &deletes, batches)
            }
            MapName::RevNat => {
                let (upserts, deletes) = split(ops, |op| match *op {
                    MapOp::UpsertRevNat(k, v) => Some(Ok((k, v))),
                    MapOp::DeleteRevNat(k) => Some(Err(k)),
                    _ => None,
                });
                write(&mut self.revnat, &upserts, &deletes, batches)
            }
            MapName::SourceRanges => write_source_ranges(&mut self.source_ranges, ops),
        };
        result.map_err(|(done, source)| BatchFailure {
            done,
            error: MapWriteError { map, source },
        })
    }
}

/// Writes source-ranges entries one at a time (the trie has no batch
/// operations); returns how many were done before a failure, and the
/// failure.
fn write_source_ranges(
    map: &mut LpmTrie<MapData, SourceRangePrefix, SourceRangeValue>,
    ops: &[MapOp],
) -> Result<(), (usize, io::Error)> {
    for (i, op) in ops.iter().enumerate() {
        let result = match *op {
            MapOp::UpsertSourceRange(key) => map
                .insert(&Key::new(key.prefix_len, key.data), SOURCE_RANGE_ALLOW, 0)
                .map_err(io_error),
            MapOp::DeleteSourceRange(key) => {
                match map
                    .remove(&Key::new(key.prefix_len, key.data))
                    .map_err(io_error)
                {
                    // Already gone: done.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                    other => other,
                }
            }
            _ => {
                debug_assert!(false, "a batch mixes maps: {op:?}");
                Ok(())
            }
        };
        result.map_err(|e| (i, e))?;
    }
    Ok(())
}

/// The upserts (`Ok`) and deletes (`Err`) of one map among `ops`.
fn split<K, V>(
    ops: &[MapOp],
    typed: impl Fn(&MapOp) -> Option<Result<(K, V), K>>,
) -> ((Vec<K>, Vec<V>), Vec<K>) {
    let mut keys = Vec::new();
    let mut values = Vec::new();
    let mut deletes = Vec::new();
    for op in ops {
        match typed(op) {
            Some(Ok((k, v))) => {
                keys.push(k);
                values.push(v);
            }
            Some(Err(k)) => deletes.push(k),
            None => debug_assert!(false, "a batch mixes maps: {op:?}"),
        }
    }
    ((keys, values), deletes)
}

/// Writes the upserts or the deletes (a batch holds one kind) to `map`,
/// in batches unless the kernel refused one; returns how many were done
/// before a failure, and the failure.
fn write<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    (keys, values): &(Vec<K>, Vec<V>),
    deletes: &[K],
    batches: &mut bool,
) -> Result<(), (usize, io::Error)> {
    debug_assert!(keys.is_empty() || deletes.is_empty());
    if *batches {
        let fd = map.map().fd().as_fd();
        let result = if deletes.is_empty() {
            sys::update_batch(fd, keys, values)
        } else {
            sys::delete_batch(fd, deletes)
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.done == 0 && sys::unsupported(&e.error) => {
                log::info!(
                    "the kernel refused a batch map write ({}); writing one entry at a time",
                    e.error
                );
                *batches = false;
            }
            Err(e) => return Err((e.done, e.error)),
        }
    }
    for (i, (key, value)) in keys.iter().zip(values).enumerate() {
        map.insert(key, value, 0).map_err(|e| (i, io_error(e)))?;
    }
    for (i, key) in deletes.iter().enumerate() {
        match map.remove(key).map_err(io_error) {
            Ok(()) => {}
            // A delete of an entry that is already gone has done its job.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err((i, e)),
        }
    }
    Ok(())
}

/// Writes the node-wide datapath settings.
pub fn write_config(ebpf: &mut Ebpf, config: &DatapathConfig) -> crate::Result<()> {
    let mut array: Array<&mut MapData, DatapathConfig> =
        Array::try_from(ebpf.map_mut(MAP_CONFIG).ok_or_else(|| Error::MissingMap {
            map: MAP_CONFIG.to_owned(),
        })?)?;
    array.set(0, config, 0).map_err(Error::map(
        "writing the datapath configuration into",
        MAP_CONFIG,
    ))
}

/// Opens one pinned map.
pub fn open_pinned(pin_path: &Path, name: &str) -> crate::Result<Map> {
    let path = pin_path.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "cannot open pinned map {} (is the agent running with this --pin-path?)",
            path.display()
        )
    })?;
    Map::from_map_data(data).with_context(|| format!("unexpected map type at {}", path.display()))
}

/// Sums one frontend's per-CPU counters.
pub fn sum_stats(
    stats: &PerCpuArray<MapData, FrontendStats>,
    rev_nat_id: RevNatId,
) -> crate::Result<FrontendStats> {
    let per_cpu = stats
        .get(&rev_nat_id, 0)
        .with_context(|| format!("reading stats of frontend {rev_nat_id}"))?;
    let mut sum = FrontendStats::default();
    per_cpu.iter().for_each(|cpu| sum.add(cpu));
    Ok(sum)
}

/// The datapath event counters summed over CPUs, by name.
pub fn datapath_counters(pin_path: &Path) -> crate::Result<Vec<(&'static str, u64)>> {
    sum_counters(&PerCpuArray::try_from(open_pinned(
        pin_path,
        MAP_COUNTERS,
    )?)?)
}

/// The datapath event counters of the counters map `counters`, summed over
/// CPUs, by name.
pub fn sum_counters(
    counters: &PerCpuArray<MapData, u64>,
) -> crate::Result<Vec<(&'static str, u64)>> {
    DatapathCounter::ALL
        .iter()
        .map(|counter| {
            let per_cpu = counters
                .get(&(*counter as u32), 0)
                .with_context(|| format!("reading counter {}", counter.name()))?;
            Ok((counter.name(), per_cpu.iter().sum()))
        })
        .collect()
}

/// The per-CPU counter maps read at scrape time, opened once.
pub struct CounterMaps {
    /// Per-frontend counters, indexed by rev-NAT id.
    pub frontend_stats: PerCpuArray<MapData, FrontendStats>,
    /// Datapath event counters, indexed by [`DatapathCounter`].
    pub datapath: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for CounterMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CounterMaps").finish_non_exhaustive()
    }
}

impl CounterMaps {
    /// Takes the counter maps out of a loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> crate::Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name).ok_or_else(|| Error::MissingMap {
                map: name.to_owned(),
            })
        };
        Ok(CounterMaps {
            frontend_stats: PerCpuArray::try_from(take(MAP_FRONTEND_STATS)?)?,
            datapath: PerCpuArray::try_from(take(MAP_COUNTERS)?)?,
        })
    }
}

/// Every index of a per-CPU array with its values summed over CPUs by
/// `add` (zero sums left out): in batches of thousands of entries per call
/// where the kernel has them, else one index at a time.
pub fn read_per_cpu_sums<V: Pod + Default + PartialEq>(
    map: &PerCpuArray<MapData, V>,
    add: impl Fn(&mut V, &V),
) -> Result<BTreeMap<u32, V>, MapError> {
    let mut sums = BTreeMap::new();
    let mut sum_of = |index: u32, per_cpu: &[V]| {
        let mut sum = V::default();
        for cpu in per_cpu {
            add(&mut sum, cpu);
        }
        if sum != V::default() {
            sums.insert(index, sum);
        }
    };
    let cpus = aya::util::nr_cpus().map_err(|(_, error)| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "nr_cpus",
            io_error: error,
        })
    })?;
    match sys::lookup_all_per_cpu(map.map().fd().as_fd(), cpus, &mut sum_of) {
        Ok(()) => Ok(sums),
        Err(e) if sys::unsupported(&e) => {
            for index in 0..map.len() {
                let per_cpu = map.get(&index, 0)?;
                sum_of(index, &per_cpu);
            }
            Ok(sums)
        }
        Err(e) => Err(MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error: e,
        })),
    }
}
