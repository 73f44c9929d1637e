//! Keeping the maps in line with the cluster: per-Service translation,
//! per-Service writes in a safe order, and full repairs against what the
//! maps really hold. Generic over the maps ([`MapWriter`] + [`MapReader`]),
//! so it runs against the kernel maps in the agent and against an in-memory
//! [`MapState`] in tests.

use std::{collections::BTreeMap, time::Instant};

use log::{error, info, warn};

use super::{
    cluster::{ClusterState, Dirty, ObjectName},
    desired::DesiredState,
    diff::diff,
    flows::FlowChanges,
    translate::{NodeContext, Translation, translate_one},
};
use crate::datapath::{
    MapSizes,
    model::{MapOp, MapReader, MapWriter, proto_name},
};

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Services whose translation changed.
    pub services_changed: usize,
    /// Map writes applied.
    pub writes: usize,
    /// Objects, fields or entries skipped as invalid or not fitting.
    pub skipped: usize,
    /// Whether a write failed (a full repair is due).
    pub failed: bool,
    /// What the applied writes changed for flows already tracked.
    pub flows: FlowChanges,
}

/// Keeps the maps in line with the cluster state, writing only what changed.
pub struct Syncer<W> {
    writer: W,
    desired: DesiredState,
    node: NodeContext,
    /// The last translation of each Service.
    translations: BTreeMap<ObjectName, Translation>,
    /// A write failed: the desired state and the maps may differ.
    repair_due: bool,
}

impl<W> Syncer<W>
where
    W: MapWriter + MapReader,
    W::Error: std::fmt::Display,
{
    /// A syncer over `writer` with the default map sizes, adopting the ids
    /// of what the maps hold now; the first [`Syncer::sync_full`] then
    /// removes whatever is stale.
    pub fn adopting(writer: W, node: NodeContext) -> anyhow::Result<Self> {
        Self::adopting_with_sizes(writer, node, MapSizes::default())
    }

    /// [`Syncer::adopting`] for maps of the given sizes (ids are allocated
    /// below the rev-NAT and backends capacities).
    pub fn adopting_with_sizes(
        writer: W,
        node: NodeContext,
        sizes: MapSizes,
    ) -> anyhow::Result<Self> {
        let current = writer.read_state()?;
        Ok(Syncer {
            desired: DesiredState::adopting(&current, sizes.revnat, sizes.backends),
            writer,
            node,
            translations: BTreeMap::new(),
            repair_due: true,
        })
    }

    /// The maps.
    pub fn writer(&self) -> &W {
        &self.writer
    }

    /// The last translation of each Service.
    pub fn translations(&self) -> &BTreeMap<ObjectName, Translation> {
        &self.translations
    }

    /// Whether a failed write left the maps to be repaired.
    pub fn repair_due(&self) -> bool {
        self.repair_due
    }

    /// Where the id allocators stand.
    pub fn id_cursors(&self) -> service_common::IdCursors {
        self.desired.id_cursors()
    }

    /// Goes on from where a previous agent's id allocators stood.
    pub fn resume_ids(&mut self, cursors: &service_common::IdCursors) {
        self.desired.resume_ids(cursors);
    }

    /// Makes released rev-NAT ids free again once no conntrack entry names
    /// them.
    pub fn reuse_rev_nat_ids(&mut self, ids: impl IntoIterator<Item = service_common::RevNatId>) {
        self.desired.reuse_rev_nat_ids(ids);
    }

    /// Holds rev-NAT ids conntrack entries still name though no frontend
    /// has them; returns those now held.
    pub fn hold_rev_nat_ids(
        &mut self,
        ids: impl IntoIterator<Item = service_common::RevNatId>,
    ) -> Vec<service_common::RevNatId> {
        self.desired.hold_rev_nat_ids(ids)
    }

    /// Sets this node's context; every Service is re-translated on the next sync.
    pub fn set_node(&mut self, node: NodeContext) {
        self.node = node;
    }

    /// Re-translates the `dirty` Services and writes what changed for each,
    /// Service by Service. A failed write stops the sync and marks a repair due.
    pub fn sync(&mut self, cluster: &ClusterState, dirty: &Dirty) -> SyncReport {
        self.update(cluster, dirty, true)
    }

    /// Re-translates the `dirty` Services into the desired state; with
    /// `write`, also writes each Service's changes to the maps.
    fn update(&mut self, cluster: &ClusterState, dirty: &Dirty, write: bool) -> SyncReport {
        let names: Vec<ObjectName> = match dirty {
            Dirty::Services(names) => names.iter().cloned().collect(),
            Dirty::All => cluster
                .services
                .keys()
                .chain(self.translations.keys())
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        let mut report = SyncReport::default();
        for name in names {
            let translation = translate_one(cluster, &self.node, &name);
            if self.translations.get(&name) == Some(&translation) {
                continue;
            }
            report.services_changed += 1;
            for line in &translation.skipped {
                warn!("skipped: {line}");
            }
            report.skipped += translation.skipped.len();
            let (ops, problems) = self.desired.set_service(&name, &translation.frontends);
            for line in &problems {
                error!("not programmed: {line}");
            }
            report.skipped += problems.len();
            log_change(&name, self.translations.get(&name), &translation);
            if translation == Translation::default() {
                self.translations.remove(&name);
            } else {
                self.translations.insert(name.clone(), translation);
            }
            if write && !self.apply(&ops, &mut report) {
                break;
            }
        }
        if report.writes > 0 {
            info!(
                "sync: {} services changed, {} map writes",
                report.services_changed, report.writes
            );
        }
        report
    }

    /// Re-translates everything and repairs the maps: compares the desired
    /// state with what the maps really hold and writes only the difference
    /// (so correct entries are not touched, and stale ones go).
    pub fn sync_full(&mut self, cluster: &ClusterState) -> SyncReport {
        let mut report = self.update(cluster, &Dirty::All, false);
        self.desired.release_unclaimed();
        let actual = match self.writer.read_state() {
            Ok(actual) => actual,
            Err(e) => {
                error!("reading the maps for a repair: {e:#}");
                report.failed = true;
                self.repair_due = true;
                return report;
            }
        };
        let ops = diff(&actual, &self.desired.maps());
        if !ops.is_empty() {
            info!(
                "repair: {} map entries differed from the desired state ({})",
                ops.len(),
                summarize(&ops)
            );
        }
        self.repair_due = false;
        self.apply(&ops, &mut report);
        report
    }

    /// Applies `ops` in order; on the first failure marks a repair due.
    fn apply(&mut self, ops: &[MapOp], report: &mut SyncReport) -> bool {
        for op in ops {
            if let Err(e) = self.writer.apply(op) {
                error!("{e}; the maps will be repaired");
                report.failed = true;
                self.repair_due = true;
                return false;
            }
            report.writes += 1;
            report.flows.record(op);
        }
        true
    }

    /// The frontend and backend counts of the desired state.
    pub fn desired_counts(&self) -> (usize, usize) {
        let maps = self.desired.maps();
        (
            maps.frontends.keys().filter(|k| k.slot == 0).count(),
            maps.backends.len(),
        )
    }
}

/// Logs what changed for one Service.
fn log_change(name: &ObjectName, before: Option<&Translation>, after: &Translation) {
    if after == &Translation::default() {
        if before.is_some() {
            info!("service {name} removed");
        }
        return;
    }
    let verb = if before.is_some() { "updated" } else { "added" };
    for (_, kind) in &after.not_programmed {
        info!("service {name} {verb}: {kind:?}, nothing to program");
    }
    for f in &after.frontends {
        info!(
            "service {name} {verb}: {}:{}/{} -> [{}]",
            f.addr,
            f.port,
            proto_name(f.proto),
            f.backends
                .iter()
                .map(|b| format!("{}:{}", b.addr, b.port))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

/// Counts of writes by kind, e.g. `+2 backends, -1 frontend entries`.
fn summarize(ops: &[MapOp]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for op in ops {
        let kind = match op {
            MapOp::UpsertBackend(..) => "+backends",
            MapOp::UpsertRevNat(..) => "+revnat",
            MapOp::UpsertFrontend(..) => "+frontend entries",
            MapOp::DeleteFrontend(..) => "-frontend entries",
            MapOp::DeleteRevNat(..) => "-revnat",
            MapOp::DeleteBackend(..) => "-backends",
        };
        *counts.entry(kind).or_default() += 1;
    }
    counts
        .iter()
        .map(|(kind, n)| format!("{}{n} {}", &kind[..1], &kind[1..]))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Times a sync for the metrics.
pub struct SyncTimer(Instant);

impl SyncTimer {
    /// Starts timing.
    pub fn start() -> Self {
        SyncTimer(Instant::now())
    }

    /// Seconds since the start.
    pub fn seconds(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        datapath::model::MapState, reconcile::cluster::ClusterEvent, source::file::parse_documents,
    };

    const BASE: &str = r#"
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
endpoints: [{addresses: [10.1.1.2]}, {addresses: [10.1.2.2]}]
---
kind: Service
apiVersion: v1
metadata: {name: db}
spec: {clusterIP: 10.96.0.20, ports: [{name: sql, port: 5432}]}
"#;

    fn syncer() -> Syncer<MapState> {
        Syncer::adopting(MapState::default(), NodeContext::default()).unwrap()
    }

    #[test]
    fn syncing_the_same_state_twice_writes_once_and_edits_write_little() {
        let mut syncer = syncer();
        let state = parse_documents(BASE).unwrap().state;
        let first = syncer.sync_full(&state);
        // web: 2 backends + 1 revnat + 2 slots + 1 header; db: revnat + header.
        assert_eq!(first.writes, 8);
        assert_eq!(syncer.sync(&state, &Dirty::All).writes, 0);
        assert_eq!(syncer.sync_full(&state).writes, 0);
        syncer.writer().check_consistent().unwrap();

        let fewer = parse_documents(&BASE.replace(", {addresses: [10.1.2.2]}", "")).unwrap();
        let report = syncer.sync(&fewer.state, &Dirty::All);
        // Header shrinks, slot 2 and the backend go; db is not touched.
        assert_eq!(report.writes, 3);
        assert_eq!(report.services_changed, 1);
        assert_eq!(syncer.writer().backends.len(), 1);
        syncer.writer().check_consistent().unwrap();
    }

    #[test]
    fn a_sync_reports_what_changed_for_tracked_flows() {
        let mut syncer = syncer();
        let state = parse_documents(BASE).unwrap().state;
        assert!(syncer.sync_full(&state).flows.is_empty());
        let maps = syncer.writer().clone();
        let backend_id = |last: u8| {
            *maps
                .backends
                .iter()
                .find(|(_, b)| b.addr[3] == 2 && b.addr[2] == last)
                .unwrap()
                .0
        };
        let db_rev_nat = maps
            .frontends
            .iter()
            .find(|(k, _)| k.slot == 0 && k.addr[3] == 20)
            .unwrap()
            .1
            .rev_nat_id;

        // 10.1.1.2 stops serving, 10.1.2.2 leaves, Service db is deleted.
        let changed = BASE
            .replace(
                "{addresses: [10.1.1.2]}, {addresses: [10.1.2.2]}",
                "{addresses: [10.1.1.2], conditions: {ready: false}}",
            )
            .replace(
                "kind: Service\napiVersion: v1\nmetadata: {name: db}",
                "kind: ConfigMap\napiVersion: v1\nmetadata: {name: db}",
            );
        let changed = parse_documents(&changed).unwrap().state;
        let report = syncer.sync(&changed, &Dirty::All);
        assert_eq!(report.services_changed, 2);
        assert_eq!(
            report.flows,
            FlowChanges {
                backends_deleted: [backend_id(2)].into(),
                backends_not_serving: [backend_id(1)].into(),
                rev_nat_ids_released: [db_rev_nat].into(),
            }
        );
        // Nothing changes again: nothing to report.
        assert!(syncer.sync(&changed, &Dirty::All).flows.is_empty());
    }

    #[test]
    fn events_mark_only_their_service_dirty() {
        let mut syncer = syncer();
        let mut state = parse_documents(BASE).unwrap().state;
        syncer.sync_full(&state);
        let mut slice = state.endpoint_slices().values().next().unwrap().clone();
        slice.endpoints.truncate(1);
        let dirty = state.apply(ClusterEvent::EndpointSlice(
            crate::reconcile::cluster::Change::Applied(slice),
        ));
        let names: Vec<String> = match &dirty {
            Dirty::Services(names) => names.iter().map(|n| n.to_string()).collect(),
            Dirty::All => panic!("a slice event marks its Service only"),
        };
        assert_eq!(names, ["default/web"]);
        let report = syncer.sync(&state, &dirty);
        assert_eq!(report.services_changed, 1);
        assert_eq!(syncer.writer().backends.len(), 1);
    }

    #[test]
    fn a_full_sync_repairs_drift_and_removes_stale_entries() {
        let state = parse_documents(BASE).unwrap().state;
        let mut syncer = syncer();
        syncer.sync_full(&state);
        let good = syncer.writer().clone();

        // Someone deletes a backend slot and adds a stray frontend behind our back.
        let mut drifted = good.clone();
        let slot = *drifted.frontends.keys().find(|k| k.slot == 2).unwrap();
        drifted.frontends.remove(&slot);
        let stray = service_common::FrontendKey {
            port: 9u16.to_be(),
            ..slot
        };
        drifted
            .frontends
            .insert(stray, service_common::FrontendValue::default());

        // A restarted agent adopts the drifted maps and repairs exactly that.
        let mut restarted = Syncer::adopting(drifted, NodeContext::default()).unwrap();
        let report = restarted.sync_full(&state);
        assert_eq!(report.writes, 2, "{report:?}");
        assert_eq!(restarted.writer(), &good);
    }
}
