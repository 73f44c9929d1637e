//! Operations endpoints: Prometheus metrics (kube-proxy's names where one
//! exists, plus map fill levels and per-frontend counters read from the
//! live per-CPU maps at scrape time) and a kube-proxy-style `/healthz`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use aya::maps::{HashMap, MapData, PerCpuArray};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text::encode},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use service_common::{
    ConntrackKey, ConntrackValue, FrontendStats, MAP_CONNTRACK, MAP_FRONTEND_STATS,
};

use crate::{
    datapath::MapSizes,
    datapath::maps::{ServiceMaps, datapath_counters, open_pinned, sum_stats},
    state::ip_from_map,
    status::frontend_label,
    sync::MapReader as _,
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
        ours.register_collector(Box::new(DatapathCollector { pin_path, sizes }));
        Metrics {
            sync_duration,
            network_programming,
            last_sync_timestamp,
            frontends,
            backends,
            skipped,
            sync_failures,
            registry,
        }
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

/// What `/healthz` reports, like kube-proxy's: healthy once the maps have
/// been fully synced and while the sync loop keeps running.
#[derive(Debug, Default)]
pub struct Health {
    synced: AtomicBool,
    last_updated: Mutex<Option<SystemTime>>,
}

/// How long the sync loop may stay silent before `/healthz` answers 503.
const HEALTH_STALE_AFTER: Duration = Duration::from_secs(60);

impl Health {
    /// Records that the loop ran; `synced` once the first full sync is done.
    pub fn beat(&self, synced: bool) {
        if synced {
            self.synced.store(true, Ordering::Relaxed);
        }
        *self.last_updated.lock().expect("health lock") = Some(SystemTime::now());
    }

    /// The status code and JSON body of `/healthz`.
    pub fn report(&self) -> (StatusCode, String) {
        let now = SystemTime::now();
        let last = *self.last_updated.lock().expect("health lock");
        let healthy = self.synced.load(Ordering::Relaxed)
            && last.is_some_and(|t| now.duration_since(t).unwrap_or_default() < HEALTH_STALE_AFTER);
        let body = serde_json::json!({
            "lastUpdated": last.map(rfc3339).unwrap_or_default(),
            "currentTime": rfc3339(now),
            "nodeEligible": true,
        });
        let code = if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (code, body.to_string())
    }
}

fn rfc3339(time: SystemTime) -> String {
    jiff::Timestamp::try_from(time)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[derive(Clone)]
struct Endpoints {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

async fn metrics_handler(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    let body = tokio::task::spawn_blocking(move || endpoints.metrics.encode())
        .await
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

async fn healthz_handler(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    let (code, body) = endpoints.health.report();
    (
        code,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
}

/// Serves `/metrics` (and `/healthz`) on `metrics_addr`, and `/healthz` and
/// `/livez` on `healthz_addr`, until the runtime stops.
pub async fn serve(
    metrics_addr: SocketAddr,
    healthz_addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> anyhow::Result<()> {
    let endpoints = Endpoints { metrics, health };
    let metrics_router = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .with_state(endpoints.clone());
    let health_router = Router::new()
        .route("/healthz", get(healthz_handler))
        .route("/livez", get(healthz_handler))
        .with_state(endpoints);
    let metrics_listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("binding the metrics address {metrics_addr}"))?;
    let health_listener = tokio::net::TcpListener::bind(healthz_addr)
        .await
        .with_context(|| format!("binding the healthz address {healthz_addr}"))?;
    log::info!("metrics on http://{metrics_addr}/metrics, health on http://{healthz_addr}/healthz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(health_listener, health_router).await {
            log::error!("healthz server stopped: {e}");
        }
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics_listener, metrics_router).await {
            log::error!("metrics server stopped: {e}");
        }
    });
    Ok(())
}
