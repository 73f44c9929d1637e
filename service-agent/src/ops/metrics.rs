//! Prometheus metrics: kube-proxy's names where one exists, plus map fill
//! levels and per-frontend counters read from the live per-CPU maps at
//! scrape time.

use std::path::PathBuf;

use aya::maps::{HashMap, MapData, PerCpuArray};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text::encode},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use service_common::{
    ConntrackKey, ConntrackValue, FrontendStats, MAP_CONNTRACK, MAP_FRONTEND_STATS,
};

use crate::datapath::{
    MapSizes,
    maps::{ServiceMaps, datapath_counters, open_pinned, sum_stats},
    model::{MapReader as _, frontend_label, ip_from_map},
};

/// The agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// `kubeproxy_sync_proxy_rules_duration_seconds`: time of one sync.
    pub sync_duration: Histogram,
    /// `kubeproxy_network_programming_duration_seconds`: from an endpoint
    /// change (the EndpointSlice's last-change-trigger-time) to programmed.
    pub network_programming: Histogram,
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds`.
    pub last_sync_timestamp: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Frontends programmed.
    pub frontends: Gauge,
    /// Backends programmed.
    pub backends: Gauge,
    /// Objects, fields or entries skipped as invalid or not fitting.
    pub skipped: Counter,
    /// Syncs that failed to write a map entry.
    pub sync_failures: Counter,
    /// The conntrack collector's figures.
    pub conntrack_gc: ConntrackGcMetrics,
    /// Conntrack entries, as last counted by the conntrack collector.
    conntrack_entries: Gauge,
    registry: Registry,
}

impl Metrics {
    /// Registers every metric; the datapath collector reads the maps
    /// pinned under `pin_path` at each scrape.
    pub fn new(pin_path: PathBuf, sizes: MapSizes) -> Self {
        let mut registry = Registry::default();
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let network_programming = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let last_sync_timestamp = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
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
        ours.register("frontends", "Frontends programmed", frontends.clone());
        ours.register("backends", "Backends programmed", backends.clone());
        ours.register(
            "skipped_objects",
            "Objects, fields or entries skipped as invalid or not fitting",
            skipped.clone(),
        );
        ours.register(
            "sync_failures",
            "Syncs that failed to write a map entry",
            sync_failures.clone(),
        );
        let conntrack_gc = ConntrackGcMetrics::register(ours);
        let conntrack_entries = Gauge::default();
        ours.register(
            "conntrack_entries",
            "Entries in the conntrack map, as last counted by the conntrack collector",
            conntrack_entries.clone(),
        );
        ours.register_collector(Box::new(DatapathCollector { pin_path, sizes }));
        Metrics {
            sync_duration,
            network_programming,
            last_sync_timestamp,
            frontends,
            backends,
            skipped,
            sync_failures,
            conntrack_gc,
            conntrack_entries,
            registry,
        }
    }

    /// Sets the conntrack map's occupancy (fed by the conntrack collector,
    /// which walks the map anyway).
    pub fn set_conntrack_entries(&self, entries: u64) {
        self.conntrack_entries.set(entries as i64);
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

/// Reads fill levels and counters from the pinned maps at each scrape.
#[derive(Debug)]
struct DatapathCollector {
    pin_path: PathBuf,
    sizes: MapSizes,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(maps) = ServiceMaps::open_pinned(&self.pin_path) else {
            return Ok(());
        };
        let Ok(state) = maps.read_state() else {
            return Ok(());
        };
        let conntrack_entries = open_pinned(&self.pin_path, MAP_CONNTRACK)
            .ok()
            .and_then(|map| HashMap::<MapData, ConntrackKey, ConntrackValue>::try_from(map).ok())
            .map(|map| map.keys().count())
            .unwrap_or(0);
        let fill = [
            ("frontends", state.frontends.len(), self.sizes.frontends),
            ("backends", state.backends.len(), self.sizes.backends),
            ("revnat", state.revnat.len(), self.sizes.revnat),
            ("conntrack", conntrack_entries, self.sizes.conntrack),
        ];
        let mut entries = encoder.encode_descriptor(
            "map_entries",
            "Entries in each BPF map",
            None,
            MetricType::Gauge,
        )?;
        for (map, count, _) in fill {
            ConstGauge::new(count as i64).encode(entries.encode_family(&[("map", map)])?)?;
        }
        let mut capacity = encoder.encode_descriptor(
            "map_capacity",
            "Capacity (max entries) of each BPF map",
            None,
            MetricType::Gauge,
        )?;
        for (map, _, max) in fill {
            ConstGauge::new(i64::from(max)).encode(capacity.encode_family(&[("map", map)])?)?;
        }

        let stats = open_pinned(&self.pin_path, MAP_FRONTEND_STATS)
            .ok()
            .and_then(|map| PerCpuArray::<MapData, FrontendStats>::try_from(map).ok());
        let per_frontend: Vec<(String, FrontendStats)> = state
            .frontends
            .iter()
            .filter(|(key, _)| key.slot == 0)
            .filter_map(|(key, header)| {
                let stats = sum_stats(stats.as_ref()?, header.rev_nat_id).ok()?;
                let label = frontend_label(
                    ip_from_map(&key.addr, key.family),
                    u16::from_be(key.port),
                    key.proto,
                );
                Some((label, stats))
            })
            .collect();
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
        if let Ok(counters) = datapath_counters(&self.pin_path) {
            let mut metric = encoder.encode_descriptor(
                "datapath_events",
                "Datapath events (drops by reason, replies translated)",
                None,
                MetricType::Counter,
            )?;
            for (event, value) in counters {
                ConstCounter::new(value).encode(metric.encode_family(&[("event", event)])?)?;
            }
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
            "Conntrack entries deleted by the collector, by reason (expired, dead, orphan, reaped)",
            metrics.deleted.clone(),
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
