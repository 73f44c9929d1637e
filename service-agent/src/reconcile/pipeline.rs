//! The agent's core loop body, without I/O: events from a source update the
//! [`ClusterState`], mark Services dirty, and syncs write what changed. The
//! first full sync waits until every watched kind has been listed once, so
//! a restarted agent never removes entries for objects it has not seen yet.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use log::info;
use service_common::IdCursors;

use super::{
    cluster::{ClusterEvent, ClusterState, Dirty, Kind, ObjectName},
    collector::{CollectorHandle, CollectorNews},
    sync::{SyncReport, SyncTimer, Syncer},
};
use crate::{
    datapath::model::{MapName, MapReader, MapWriter},
    ops::{
        health::Health,
        health_check_ports::{HealthCheckPorts, PortHealth},
        metrics::Metrics,
    },
};

/// The first retry of a failed repair waits this long; each further
/// failure doubles the wait, up to [`REPAIR_BACKOFF_MAX`].
const REPAIR_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest wait between repairs while writes keep failing.
const REPAIR_BACKOFF_MAX: Duration = Duration::from_secs(32);

/// Events in, map writes out.
pub struct Pipeline<W> {
    /// The objects as last seen.
    pub cluster: ClusterState,
    syncer: Syncer<W>,
    /// Kinds not listed yet: no full sync before they are.
    unlisted: BTreeSet<Kind>,
    dirty: Dirty,
    synced: bool,
    metrics: Option<Arc<Metrics>>,
    health: Option<Arc<Health>>,
    /// Newest trigger time already accounted for, per Service.
    trigger_seen: BTreeMap<ObjectName, jiff::Timestamp>,
    /// No repair before this (backoff while writes keep failing).
    repair_not_before: Instant,
    /// The wait after the next failed repair.
    repair_backoff: Duration,
    /// The conntrack collector, told what each sync changed for flows.
    collector: Option<CollectorHandle>,
    /// Where the id allocators' position is kept across restarts, and the
    /// position last kept there.
    id_store: Option<(IdCursorStore, IdCursors)>,
    /// The health-check node ports, opened and closed as Services want them.
    health_check_ports: Option<Arc<HealthCheckPorts>>,
}

/// Keeps the id allocators' position for the next agent.
pub type IdCursorStore = Box<dyn FnMut(&IdCursors) -> crate::Result<()> + Send>;

impl<W> Pipeline<W>
where
    W: MapWriter + MapReader,
{
    /// A pipeline that waits for a full list of each of `kinds` (its
    /// source's `KINDS`) before its first full sync.
    pub fn new(syncer: Syncer<W>, kinds: &[Kind]) -> Self {
        Pipeline {
            cluster: ClusterState::default(),
            syncer,
            unlisted: kinds.iter().copied().collect(),
            dirty: Dirty::none(),
            synced: false,
            metrics: None,
            health: None,
            trigger_seen: BTreeMap::new(),
            repair_not_before: Instant::now(),
            repair_backoff: REPAIR_BACKOFF_MIN,
            collector: None,
            id_store: None,
            health_check_ports: None,
        }
    }

    /// Opens and closes `ports` as the Services' health-check node ports
    /// come and go (the pipeline must then run inside the tokio runtime).
    pub fn with_health_check_ports(mut self, ports: Arc<HealthCheckPorts>) -> Self {
        self.health_check_ports = Some(ports);
        self
    }

    /// Keeps the id allocators' position in `store` after each sync that
    /// moved it; `kept` is the position kept there now (the syncer goes on
    /// from it).
    pub fn with_id_store(mut self, store: IdCursorStore, kept: IdCursors) -> Self {
        self.syncer.resume_ids(&kept);
        self.id_store = Some((store, self.syncer.id_cursors()));
        self
    }

    /// Tells `collector` what each sync changed for tracked flows.
    pub fn with_collector(mut self, collector: CollectorHandle) -> Self {
        self.collector = Some(collector);
        self
    }

    /// Takes the collector's news about rev-NAT ids in.
    pub fn collector_news(&mut self, news: CollectorNews) {
        match news {
            CollectorNews::RevNatIdsInUse(ids) => {
                let held = self.syncer.hold_rev_nat_ids(ids);
                if !held.is_empty() {
                    info!("rev-NAT ids {held:?} are held until no conntrack entry names them");
                }
            }
            CollectorNews::RevNatIdsDrained(ids) => self.syncer.reuse_rev_nat_ids(ids),
        }
    }

    /// Keeps `metrics` up to date after each sync.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Tells `health` whether this node is being deleted.
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// The syncer (and through it, the maps).
    pub fn syncer(&self) -> &Syncer<W> {
        &self.syncer
    }

    /// Whether the first full sync has happened.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Sets this node's context (its NodePort addresses changed): every
    /// Service is translated again on the next [`Pipeline::flush`].
    pub fn set_node(&mut self, node: super::translate::NodeContext) {
        self.syncer.set_node(node);
        self.dirty = Dirty::All;
    }

    /// Takes one event in; nothing is written until [`Pipeline::flush`].
    pub fn handle(&mut self, event: ClusterEvent) {
        if event.is_full_list() {
            self.unlisted.remove(&event.kind());
        }
        let is_node = event.kind() == Kind::Node;
        let dirty = self.cluster.apply(event);
        self.dirty.merge(dirty);
        if is_node && let Some(health) = &self.health {
            health.set_node_being_deleted(self.cluster.node_being_deleted());
        }
    }

    /// Writes what the events since the last flush changed. The first time
    /// every kind has been listed, this is a full sync that also removes
    /// stale entries left in the maps. `None` while still waiting for lists.
    pub fn flush(&mut self) -> Option<SyncReport> {
        if !self.unlisted.is_empty() {
            return None;
        }
        let timer = SyncTimer::start();
        let dirty = std::mem::replace(&mut self.dirty, Dirty::none());
        let report = if self.synced {
            if dirty == Dirty::none() {
                return None;
            }
            self.syncer.sync(&self.cluster, &dirty)
        } else {
            info!(
                "first full sync: {} services, {} endpoint slices",
                self.cluster.services.len(),
                self.cluster.endpoint_slices().len()
            );
            self.synced = true;
            self.syncer.sync_full(&self.cluster)
        };
        self.record(&report, &timer, &dirty);
        Some(report)
    }

    /// A full repair against the maps' real contents (periodic, and after
    /// a failed write). `None` before the first full sync.
    pub fn resync(&mut self) -> Option<SyncReport> {
        if !self.synced {
            return None;
        }
        let timer = SyncTimer::start();
        let report = self.syncer.sync_full(&self.cluster);
        // A health-check port that could not be opened (its port in use)
        // is tried again with each repair.
        if !report.health_checks_changed {
            self.update_health_check_ports();
        }
        if self.syncer.repair_due() {
            self.repair_not_before = Instant::now() + self.repair_backoff;
            self.repair_backoff = (self.repair_backoff * 2).min(REPAIR_BACKOFF_MAX);
        } else {
            self.repair_backoff = REPAIR_BACKOFF_MIN;
        }
        self.record(&report, &timer, &Dirty::none());
        Some(report)
    }

    /// Opens and closes the health-check node ports as the Services want
    /// them (a port that could not be opened is tried again).
    fn update_health_check_ports(&self) {
        if let Some(ports) = &self.health_check_ports {
            ports.update(self.health_check_wanted());
            if let Some(metrics) = &self.metrics {
                metrics.health_check_ports.set(ports.ports().len() as i64);
            }
        }
    }

    /// The health-check node ports the Services want, by port (a port two
    /// Services claim, which the API server never allows, goes to the
    /// first by name).
    pub fn health_check_wanted(&self) -> BTreeMap<u16, PortHealth> {
        let mut wanted = BTreeMap::new();
        for check in self.syncer.health_checks() {
            wanted.entry(check.port).or_insert_with(|| PortHealth {
                namespace: check.service.namespace().to_owned(),
                name: check.service.name().to_owned(),
                local_endpoints: check.local_endpoints,
            });
        }
        wanted
    }

    /// Whether a failed write left the maps to be repaired (and the
    /// backoff after the last failed repair has passed).
    pub fn repair_due(&self) -> bool {
        self.synced && self.syncer.repair_due() && Instant::now() >= self.repair_not_before
    }

    fn record(&mut self, report: &SyncReport, timer: &SyncTimer, dirty: &Dirty) {
        if let Some(collector) = &self.collector {
            collector.follow(&report.flows);
        }
        if report.health_checks_changed {
            self.update_health_check_ports();
        }
        if let Some((store, kept)) = &mut self.id_store {
            let now = self.syncer.id_cursors();
            if now != *kept {
                match store(&now) {
                    Ok(()) => *kept = now,
                    Err(e) => log::warn!("{}", e.report()),
                }
            }
        }
        let Some(metrics) = &self.metrics else {
            return;
        };
        metrics.sync_duration.observe(timer.seconds());
        metrics.last_sync_timestamp.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        metrics.skipped.inc_by(report.skipped as u64);
        if report.failed() {
            metrics.sync_failures.inc();
        }
        for failure in &report.failures {
            metrics.map_write_failed(failure.map);
        }
        metrics
            .services_failed
            .set(self.syncer.failures().len() as i64);
        metrics
            .unsupported_fields
            .set(self.syncer.unsupported_fields() as i64);
        let counts = self.syncer.desired_counts();
        metrics.frontends.set(counts.frontends as i64);
        metrics.backends.set(counts.backends as i64);
        for map in MapName::ALL {
            metrics.set_map_entries(map, counts.of(map));
        }
        metrics.update_frontends(
            report.frontends_removed.iter().copied(),
            report.frontends_added.iter().copied(),
        );
        if let Dirty::Services(names) = dirty {
            let now = jiff::Timestamp::now();
            for name in names {
                let newest = self
                    .cluster
                    .slices_of(name)
                    .filter_map(|(_, slice)| slice.trigger_time)
                    .max();
                if let Some(trigger) = newest
                    && self.trigger_seen.get(name) != Some(&trigger)
                {
                    self.trigger_seen.insert(name.clone(), trigger);
                    let seconds = now.duration_since(trigger).as_secs_f64();
                    if seconds >= 0.0 {
                        metrics.network_programming.observe(seconds);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::{
        datapath::model::MapState,
        reconcile::{cluster::Change, translate::NodeContext},
        source::file::{KINDS, parse_documents},
    };

    const WEB: &str = r#"
kind: Service
apiVersion: v1
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.1.2]}]
"#;

    /// The events of a file source reading `yaml`.
    fn events(yaml: &str) -> [ClusterEvent; 3] {
        let parsed = parse_documents(yaml, None).unwrap();
        [
            ClusterEvent::Service(Change::Replaced(parsed.services)),
            ClusterEvent::EndpointSlice(Change::Replaced(parsed.slices)),
            ClusterEvent::Node(Change::Replaced(parsed.nodes)),
        ]
    }

    #[test]
    fn health_check_ports_follow_the_external_traffic_policy() {
        let syncer = Syncer::adopting(MapState::default(), NodeContext::default()).unwrap();
        let mut pipeline = Pipeline::new(syncer, &KINDS);
        let local = WEB.replace(
            "spec: {clusterIP: 10.96.0.10,",
            "spec: {type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32000, clusterIP: 10.96.0.10,",
        );
        for event in events(&local) {
            pipeline.handle(event);
        }
        let report = pipeline.flush().unwrap();
        assert!(report.health_checks_changed);
        let wanted = pipeline.health_check_wanted();
        assert_eq!(wanted.keys().collect::<Vec<_>>(), [&32000]);
        // (The file source read without a node name: no endpoint is local.)
        assert_eq!(wanted[&32000].local_endpoints, 0);
        assert_eq!(wanted[&32000].name, "web");
        // The same again: nothing changed.
        for event in events(&local) {
            pipeline.handle(event);
        }
        assert!(
            pipeline
                .flush()
                .is_none_or(|report| !report.health_checks_changed)
        );
        // Back to Cluster: no port.
        for event in events(&local.replace(
            "externalTrafficPolicy: Local",
            "externalTrafficPolicy: Cluster",
        )) {
            pipeline.handle(event);
        }
        assert!(pipeline.flush().unwrap().health_checks_changed);
        assert!(pipeline.health_check_wanted().is_empty());
    }

    #[test]
    fn the_id_allocators_go_on_from_the_kept_position_and_keep_theirs() {
        let stored: Arc<Mutex<Vec<IdCursors>>> = Arc::default();
        let sink = stored.clone();
        let syncer = Syncer::adopting(MapState::default(), NodeContext::default()).unwrap();
        let kept = IdCursors {
            next_rev_nat_id: 7,
            next_backend_id: 9,
        };
        let mut pipeline = Pipeline::new(syncer, &KINDS).with_id_store(
            Box::new(move |cursors| {
                sink.lock().unwrap().push(*cursors);
                Ok(())
            }),
            kept,
        );
        for event in events(WEB) {
            pipeline.handle(event);
        }
        pipeline.flush().unwrap();
        let maps = pipeline.syncer().writer();
        assert_eq!(maps.revnat.keys().collect::<Vec<_>>(), [&7]);
        assert_eq!(maps.backends.keys().collect::<Vec<_>>(), [&9]);
        assert_eq!(
            *stored.lock().unwrap(),
            [IdCursors {
                next_rev_nat_id: 8,
                next_backend_id: 10
            }]
        );
        // A sync that hands out no id keeps nothing new.
        for event in events(WEB) {
            pipeline.handle(event);
        }
        pipeline.resync().unwrap();
        assert_eq!(stored.lock().unwrap().len(), 1);
    }
}
