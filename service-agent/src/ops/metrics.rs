//! Prometheus metrics: kube-proxy's names where one exists, plus map fill
//! levels, write failures and per-frontend counters.
//!
//! A scrape costs the same whatever the maps hold: gauges and counters are
//! kept by the code that does the work (the pipeline sets them after each
//! sync; the conntrack collector sets the conntrack occupancy and its own
//! `conntrack_gc` figures), and the
//! only maps read at scrape time are the small per-CPU counter arrays,
//! through file descriptors opened once, the per-frontend ones in a few
//! batched calls. Nothing walks the conntrack map or reopens a pin.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text::encode},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use service_common::{DatapathCounter, FrontendKey, FrontendStats, RevNatId};

use crate::datapath::{
    MapSizes,
    maps::{CounterMaps, read_per_cpu_sums},
    model::{MapName, frontend_label, ip_from_map},
};

/// Labels naming one map.
type MapLabels = Vec<(&'static str, &'static str)>;

/// The label set of `map`.
fn map_labels(map: &'static str) -> MapLabels {
    vec![("map", map)]
}

/// The agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// `kubeproxy_sync_proxy_rules_duration_seconds`: time of one sync.
    pub sync_duration: Histogram,
    /// `kubeproxy_network_programming_duration_seconds`: from an endpoint
    /// change (the EndpointSlice's last-change-trigger-time) to programmed.
    pub network_programming: Histogram,
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds`.
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    /// Frontends programmed.
    pub frontends: Gauge,
    /// Backends programmed.
    pub backends: Gauge,
    /// Objects, fields or entries skipped as invalid or not fitting.
    pub skipped: Counter,
    /// Syncs in which a map write failed.
    pub sync_failures: Counter,
    /// Failed map writes, by map (each one stopped one Service's writes).
    map_write_failures: Family<MapLabels, Counter>,
    /// Services whose writes failed and wait for a repair.
    pub services_failed: Gauge,
    /// Fields of the current Services set to something the agent does not
    /// serve (an SCTP port, an IPv6 address), as `list` shows them.
    pub unsupported_fields: Gauge,
    /// Health-check node ports served (`externalTrafficPolicy: Local`).
    pub health_check_ports: Gauge,
    /// Entries the agent keeps in each map (conntrack: as last counted by
    /// the conntrack collector).
    map_entries: Family<MapLabels, Gauge>,
    /// The per-frontend counters' labels, by rev-NAT id (the counters'
    /// index), kept by the pipeline.
    frontends_by_id: Arc<Mutex<BTreeMap<RevNatId, FrontendKey>>>,
    /// The conntrack collector's figures.
    pub conntrack_gc: ConntrackGcMetrics,
    registry: Registry,
}

impl Metrics {
    /// Registers every metric. `sizes` are the maps' capacities; `counters`
    /// the per-CPU counter maps (none in tests without a kernel).
    pub fn new(sizes: MapSizes, counters: Option<CounterMaps>) -> Self {
        let mut registry = Registry::default();
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let network_programming = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let last_sync_timestamp = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Time one sync of the maps took",
            sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "Time from an endpoint change to the maps being programmed",
            network_programming.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the maps were last synced (Unix time)",
            last_sync_timestamp.clone(),
        );
        let ours = registry.sub_registry_with_prefix("service_agent");
        let frontends = Gauge::default();
        let backends = Gauge::default();
        let skipped = Counter::default();
        let sync_failures = Counter::default();
        let map_write_failures = Family::<MapLabels, Counter>::default();
        let services_failed = Gauge::default();
        let unsupported_fields = Gauge::default();
        let health_check_ports = Gauge::default();
        let map_entries = Family::<MapLabels, Gauge>::default();
        let map_capacity = Family::<MapLabels, Gauge>::default();
        ours.register("frontends", "Frontends programmed", frontends.clone());
        ours.register("backends", "Backends programmed", backends.clone());
        ours.register(
            "skipped_objects",
            "Objects, fields or entries skipped as invalid or not fitting",
            skipped.clone(),
        );
        ours.register(
            "sync_failures",
            "Syncs in which a map write failed",
            sync_failures.clone(),
        );
        ours.register(
            "map_write_failures",
            "Failed map writes by map; each stopped one Service's writes until a repair",
            map_write_failures.clone(),
        );
        ours.register(
            "services_failed",
            "Services whose map writes failed and wait for a repair",
            services_failed.clone(),
        );
        ours.register(
            "unsupported_fields",
            "Fields of the current Services set to something the agent does not serve (SCTP ports, IPv6 addresses); service-agent list names them",
            unsupported_fields.clone(),
        );
        ours.register(
            "health_check_ports",
            "Health-check node ports served for externalTrafficPolicy: Local Services",
            health_check_ports.clone(),
        );
        ours.register(
            "map_entries",
            "Entries the agent keeps in each BPF map (conntrack: as last counted by the conntrack collector)",
            map_entries.clone(),
        );
        ours.register(
            "map_capacity",
            "Capacity (max entries) of each BPF map",
            map_capacity.clone(),
        );
        for (map, capacity) in [
            (MapName::Frontends.as_str(), sizes.frontends),
            (MapName::Backends.as_str(), sizes.backends),
            (MapName::RevNat.as_str(), sizes.revnat),
            (
                MapName::SourceRanges.as_str(),
                service_common::SOURCE_RANGES_MAX_ENTRIES,
            ),
            ("conntrack", sizes.conntrack),
        ] {
            map_capacity
                .get_or_create(&map_labels(map))
                .set(i64::from(capacity));
        }
        for map in MapName::ALL {
            map_entries.get_or_create(&map_labels(map.as_str())).set(0);
            map_write_failures
                .get_or_create(&map_labels(map.as_str()))
                .inc_by(0);
        }
        let frontends_by_id = Arc::new(Mutex::new(BTreeMap::new()));
        if let Some(maps) = counters {
            ours.register_collector(Box::new(CounterCollector {
                maps,
                frontends_by_id: frontends_by_id.clone(),
            }));
        }
        let conntrack_gc = ConntrackGcMetrics::register(ours);
        Metrics {
            sync_duration,
            network_programming,
            last_sync_timestamp,
            frontends,
            backends,
            skipped,
            sync_failures,
            map_write_failures,
            services_failed,
            unsupported_fields,
            health_check_ports,
            map_entries,
            frontends_by_id,
            conntrack_gc,
            registry,
        }
    }

    /// Sets the entries the agent keeps in `map`.
    pub fn set_map_entries(&self, map: MapName, entries: usize) {
        self.map_entries
            .get_or_create(&map_labels(map.as_str()))
            .set(entries as i64);
    }

    /// Sets the conntrack map's occupancy (fed by the conntrack collector,
    /// which walks the map anyway; a scrape never does).
    pub fn set_conntrack_entries(&self, entries: u64) {
        self.map_entries
            .get_or_create(&map_labels("conntrack"))
            .set(entries as i64);
    }

    /// Counts a failed write to `map`.
    pub fn map_write_failed(&self, map: MapName) {
        self.map_write_failures
            .get_or_create(&map_labels(map.as_str()))
            .inc();
    }

    /// Updates the frontends whose counters are exported: `removed` rev-NAT
    /// ids first, then `added` ones.
    pub fn update_frontends(
        &self,
        removed: impl IntoIterator<Item = RevNatId>,
        added: impl IntoIterator<Item = (RevNatId, FrontendKey)>,
    ) {
        let mut frontends = self
            .frontends_by_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for id in removed {
            frontends.remove(&id);
        }
        frontends.extend(added);
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            log::warn!("encoding metrics: {e}");
        }
        out
    }
}

/// Reads the per-CPU counters at each scrape.
#[derive(Debug)]
struct CounterCollector {
    maps: CounterMaps,
    frontends_by_id: Arc<Mutex<BTreeMap<RevNatId, FrontendKey>>>,
}

impl Collector for CounterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let frontends: Vec<(RevNatId, FrontendKey)> = self
            .frontends_by_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(id, key)| (*id, *key))
            .collect();
        let sums: BTreeMap<u32, FrontendStats> =
            read_per_cpu_sums(&self.maps.frontend_stats, FrontendStats::add).unwrap_or_default();
        // One series per frontend address: the in-cluster entry of an
        // `externalTrafficPolicy: Local` frontend (its own rev-NAT id)
        // counts with it.
        let mut per_frontend: BTreeMap<String, FrontendStats> = BTreeMap::new();
        for (id, key) in &frontends {
            let label = frontend_label(
                ip_from_map(&key.addr, key.family),
                u16::from_be(key.port),
                key.proto,
            );
            let sum = per_frontend.entry(label).or_default();
            if let Some(stats) = sums.get(id) {
                sum.add(stats);
            }
        }
        for (name, help, value) in [
            (
                "frontend_packets",
                "Packets translated to a backend, per frontend",
                (|s: &FrontendStats| s.packets) as fn(&FrontendStats) -> u64,
            ),
            (
                "frontend_bytes",
                "Bytes of those packets, per frontend",
                |s| s.bytes,
            ),
            (
                "frontend_flows",
                "New flows that picked a backend, per frontend",
                |s| s.new_flows,
            ),
        ] {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (frontend, stats) in &per_frontend {
                ConstCounter::new(value(stats))
                    .encode(metric.encode_family(&[("frontend", frontend.as_str())])?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "datapath_events",
            "Datapath events (drops by reason, replies translated)",
            None,
            MetricType::Counter,
        )?;
        for counter in DatapathCounter::ALL {
            let Ok(per_cpu) = self.maps.datapath.get(&(counter as u32), 0) else {
                continue;
            };
            ConstCounter::new(per_cpu.iter().sum::<u64>())
                .encode(metric.encode_family(&[("event", counter.name())])?)?;
        }
        Ok(())
    }
}

/// The conntrack collector's metrics (`service_agent_conntrack_gc_*`).
#[derive(Debug)]
pub struct ConntrackGcMetrics {
    /// Passes over the whole map.
    pub passes: Counter,
    /// Time one pass took.
    pub pass_duration: Histogram,
    /// The time until the next pass, as last paced.
    pub interval: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Entries read, by passes and by walks for syncs' changes.
    pub scanned: Counter,
    /// Entries marked dead (their frontend was deleted).
    pub marked_dead: Counter,
    /// Entries deleted, by reason.
    deleted: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// The node's connected UDP sockets destroyed (`SOCK_DESTROY`) because
    /// socket-LB had sent them to a backend that left its Service.
    pub destroyed_sockets: Counter,
    /// Such sockets that could not be destroyed, and socket dumps that
    /// failed.
    pub socket_destroy_failures: Counter,
}

impl ConntrackGcMetrics {
    /// Registers the metrics in `registry`.
    fn register(registry: &mut Registry) -> Self {
        let metrics = ConntrackGcMetrics {
            passes: Counter::default(),
            pass_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 20)),
            interval: Gauge::default(),
            scanned: Counter::default(),
            marked_dead: Counter::default(),
            deleted: Family::default(),
            destroyed_sockets: Counter::default(),
            socket_destroy_failures: Counter::default(),
        };
        let gc = registry.sub_registry_with_prefix("conntrack_gc");
        gc.register(
            "passes",
            "Conntrack collector passes over the whole map",
            metrics.passes.clone(),
        );
        gc.register(
            "pass_duration_seconds",
            "Time one conntrack collector pass took",
            metrics.pass_duration.clone(),
        );
        gc.register(
            "interval_seconds",
            "Time until the next conntrack collector pass, as last paced",
            metrics.interval.clone(),
        );
        gc.register(
            "scanned_entries",
            "Conntrack entries read by the collector (passes and walks for sync changes)",
            metrics.scanned.clone(),
        );
        gc.register(
            "marked_dead_entries",
            "Conntrack entries marked dead because their frontend was deleted",
            metrics.marked_dead.clone(),
        );
        gc.register(
            "deleted_entries",
            "Entries deleted by the conntrack collector, by reason (conntrack: expired, dead, orphan, reaped; affinity: session-affinity entries of deleted frontends)",
            metrics.deleted.clone(),
        );
        gc.register(
            "destroyed_sockets",
            "The node's connected UDP sockets destroyed (SOCK_DESTROY) because socket-LB had sent them to a backend that left its Service",
            metrics.destroyed_sockets.clone(),
        );
        gc.register(
            "socket_destroy_failures",
            "Failures to find or destroy the node's connected UDP sockets of backends that left their Service",
            metrics.socket_destroy_failures.clone(),
        );
        metrics
    }

    /// The counter of entries deleted for `reason`.
    pub fn deleted(&self, reason: &'static str) -> Counter {
        self.deleted
            .get_or_create(&vec![("reason", reason)])
            .clone()
    }
}
