//! Typed access to the datapath's maps, either taken from a freshly loaded
//! object (the agent) or opened from their pins (`service-agent list`).

use std::path::Path;

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
};
use service_common::{
    BackendValue, DatapathConfig, DatapathCounter, FrontendKey, FrontendStats, FrontendValue,
    MAP_BACKENDS, MAP_CONFIG, MAP_COUNTERS, MAP_FRONTEND_STATS, MAP_FRONTENDS, MAP_REVNAT,
    RevNatId, RevNatValue,
};

use super::model::{MapOp, MapReader, MapState, MapWriter};

/// The three maps the agent programs.
pub struct ServiceMaps {
    /// Frontends map.
    pub frontends: HashMap<MapData, FrontendKey, FrontendValue>,
    /// Backends map: an array indexed by backend id, an all-zero entry
    /// where no backend has the id.
    pub backends: Array<MapData, BackendValue>,
    /// Reverse-NAT map.
    pub revnat: HashMap<MapData, RevNatId, RevNatValue>,
}

/// A failed map write.
#[derive(Debug, thiserror::Error)]
#[error("map write {op:?} failed: {source}")]
pub struct MapWriteError {
    /// The write that failed.
    pub op: MapOp,
    /// The kernel's answer (E2BIG/ENOMEM when a map is full).
    pub source: MapError,
}

impl ServiceMaps {
    /// Takes the maps out of a loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        Ok(ServiceMaps {
            frontends: HashMap::try_from(take(MAP_FRONTENDS)?)?,
            backends: Array::try_from(take(MAP_BACKENDS)?)?,
            revnat: HashMap::try_from(take(MAP_REVNAT)?)?,
        })
    }

    /// Opens the maps pinned under `pin_path`.
    pub fn open_pinned(pin_path: &Path) -> anyhow::Result<Self> {
        Ok(ServiceMaps {
            frontends: HashMap::try_from(open_pinned(pin_path, MAP_FRONTENDS)?)?,
            backends: Array::try_from(open_pinned(pin_path, MAP_BACKENDS)?)?,
            revnat: HashMap::try_from(open_pinned(pin_path, MAP_REVNAT)?)?,
        })
    }
}

impl MapReader for ServiceMaps {
    fn read_state(&self) -> anyhow::Result<MapState> {
        let mut state = MapState::default();
        for entry in self.frontends.iter() {
            let (key, value) = entry.context("reading the frontends map")?;
            state.frontends.insert(key, value);
        }
        for (id, entry) in (0..).zip(self.backends.iter()) {
            let value: BackendValue = entry.context("reading the backends map")?;
            if value.exists() {
                state.backends.insert(id, value);
            }
        }
        for entry in self.revnat.iter() {
            let (key, value) = entry.context("reading the rev-NAT map")?;
            state.revnat.insert(key, value);
        }
        Ok(state)
    }
}

impl MapWriter for ServiceMaps {
    type Error = MapWriteError;

    fn apply(&mut self, op: &MapOp) -> Result<(), MapWriteError> {
        let result = match op {
            MapOp::UpsertBackend(id, value) => self.backends.set(*id, value, 0),
            MapOp::UpsertRevNat(id, value) => self.revnat.insert(id, value, 0),
            MapOp::UpsertFrontend(key, value) => self.frontends.insert(key, value, 0),
            MapOp::DeleteFrontend(key) => ignore_missing(self.frontends.remove(key)),
            MapOp::DeleteRevNat(id) => ignore_missing(self.revnat.remove(id)),
            // An array entry is never removed: zeroed, it is no backend.
            MapOp::DeleteBackend(id) => self.backends.set(*id, BackendValue::default(), 0),
        };
        result.map_err(|source| MapWriteError { op: *op, source })
    }
}

/// A delete of an entry that is already gone has done its job.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

/// Writes the node-wide datapath settings.
pub fn write_config(ebpf: &mut Ebpf, config: &DatapathConfig) -> anyhow::Result<()> {
    let mut array: Array<&mut MapData, DatapathConfig> = Array::try_from(
        ebpf.map_mut(MAP_CONFIG)
            .with_context(|| format!("map {MAP_CONFIG} missing from the eBPF object"))?,
    )?;
    array
        .set(0, config, 0)
        .context("writing the datapath configuration")
}

/// Opens one pinned map.
pub fn open_pinned(pin_path: &Path, name: &str) -> anyhow::Result<Map> {
    let path = pin_path.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "cannot open pinned map {} (is the agent running with this --pin-path?)",
            path.display()
        )
    })?;
    Map::from_map_data(data).with_context(|| format!("unexpected map type at {}", path.display()))
}

/// Per-frontend counters summed over CPUs, indexed by rev-NAT id.
pub fn frontend_stats(pin_path: &Path, rev_nat_id: RevNatId) -> anyhow::Result<FrontendStats> {
    let stats: PerCpuArray<MapData, FrontendStats> =
        PerCpuArray::try_from(open_pinned(pin_path, MAP_FRONTEND_STATS)?)?;
    sum_stats(&stats, rev_nat_id)
}

/// Sums one frontend's per-CPU counters.
pub fn sum_stats(
    stats: &PerCpuArray<MapData, FrontendStats>,
    rev_nat_id: RevNatId,
) -> anyhow::Result<FrontendStats> {
    let per_cpu = stats
        .get(&rev_nat_id, 0)
        .with_context(|| format!("reading stats of frontend {rev_nat_id}"))?;
    Ok(per_cpu
        .iter()
        .fold(FrontendStats::default(), |sum, cpu| FrontendStats {
            packets: sum.packets + cpu.packets,
            bytes: sum.bytes + cpu.bytes,
            new_flows: sum.new_flows + cpu.new_flows,
        }))
}

/// The datapath event counters summed over CPUs, by name.
pub fn datapath_counters(pin_path: &Path) -> anyhow::Result<Vec<(&'static str, u64)>> {
    sum_counters(&PerCpuArray::try_from(open_pinned(
        pin_path,
        MAP_COUNTERS,
    )?)?)
}

/// The datapath event counters of the counters map `counters`, summed over
/// CPUs, by name.
pub fn sum_counters(
    counters: &PerCpuArray<MapData, u64>,
) -> anyhow::Result<Vec<(&'static str, u64)>> {
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
