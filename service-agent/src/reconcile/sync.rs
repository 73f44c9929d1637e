//! Keeping the maps in line with the cluster: per-Service translation,
//! per-Service writes in a safe order, and full repairs against what the
//! maps really hold. Generic over the maps ([`MapWriter`] + [`MapReader`]),
//! so it runs against the kernel maps in the agent and against an in-memory
//! [`MapState`](crate::datapath::model::MapState) in tests.
//!
//! One Service's failure does not stop the others: the writes of every
//! Service a sync touches go to the kernel together, one batch per
//! [`WriteStep`], and when a write fails (a full map), the rest of that
//! Service's writes are dropped (what was written is consistent: every step
//! only depends on earlier ones) while the other Services' writes go on.
//! Changes that need no new entry (deletions, replacements) go before those
//! that do, so a full map never blocks a deletion. A failed Service is
//! reported (log, metric, `list`) and retried by the next repair.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Instant,
};

use log::{error, info, warn};
use service_common::{BackendId, FrontendKey, RevNatId, SCOPE_ALL, SCOPE_INTERNAL};

use super::{
    cluster::{ClusterState, Dirty, ObjectName},
    desired::{DesiredState, EntryCounts, ServiceUpdate},
    diff::Writes,
    flows::FlowChanges,
    repair::{named_by, service_writes, stale_entries},
    translate::{HealthCheck, NodeContext, NotProgrammed, Translation, translate_one},
};
use crate::datapath::{
    MapSizes,
    model::{MapName, MapOp, MapReader, MapWriter, WriteStep, proto_name},
};

/// Services repaired together: their writes share the kernel batches
/// (about 5000 entries per map at 10 backends a Service), and only this
/// many Services' writes are held at once (4096 held 13 MiB at the first
/// sync of 100k Services).
const REPAIR_CHUNK: usize = 512;

/// A write that failed, and whose writes it stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteFailure {
    /// The Service whose writes stopped; `None` for stale entries no
    /// Service owns.
    pub service: Option<ObjectName>,
    /// The map the failing write went to.
    pub map: MapName,
    /// The kernel's answer.
    pub error: String,
}

impl std::fmt::Display for WriteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.service {
            Some(service) => write!(f, "service {service}: {}", self.error),
            None => write!(f, "stale entries: {}", self.error),
        }
    }
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Services whose translation changed.
    pub services_changed: usize,
    /// Map writes applied.
    pub writes: usize,
    /// Objects, fields or entries skipped as invalid or not fitting.
    pub skipped: usize,
    /// A Service's health-check node port (or its local endpoint count)
    /// changed, appeared or went.
    pub health_checks_changed: bool,
    /// Writes that failed, one per Service they stopped.
    pub failures: Vec<WriteFailure>,
    /// Rev-NAT ids of frontends no longer served (some may be served
    /// again in `frontends_added`).
    pub frontends_removed: Vec<RevNatId>,
    /// Frontends served now, by rev-NAT id.
    pub frontends_added: Vec<(RevNatId, FrontendKey)>,
    /// What the applied writes changed for flows already tracked.
    pub flows: FlowChanges,
}

impl SyncReport {
    /// Whether a write failed (a repair is due).
    pub fn failed(&self) -> bool {
        !self.failures.is_empty()
    }
}

/// The writes of one Service (or of stale entries, `owner` `None`),
/// applied as a unit: a failure drops its remaining writes.
#[derive(Debug)]
struct WriteGroup {
    owner: Option<ObjectName>,
    writes: Writes,
}

/// What the agent keeps of a Service's last translation (the frontends
/// themselves are in the desired state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSummary {
    /// [`Translation::fingerprint`]: a different one means the Service changed.
    pub fingerprint: u64,
    /// Why it programs nothing, if by design.
    pub not_programmed: Option<NotProgrammed>,
    /// Whether translation found frontends to serve.
    pub has_frontends: bool,
    /// What was skipped, and why.
    pub problems: Box<[String]>,
    /// Fields set to something the agent does not serve.
    pub unsupported: Box<[String]>,
    /// Its health-check node port, when it has one.
    pub health_check: Option<HealthCheck>,
}

/// Keeps the maps in line with the cluster state, writing only what changed.
pub struct Syncer<W> {
    writer: W,
    desired: DesiredState,
    node: NodeContext,
    /// What was kept of each Service's last translation.
    services: BTreeMap<ObjectName, ServiceSummary>,
    /// Services whose writes failed, until a repair writes them.
    failed: BTreeMap<ObjectName, WriteFailure>,
    /// A write failed: the desired state and the maps may differ.
    repair_due: bool,
    /// The number of unsupported fields over every Service.
    unsupported_fields: usize,
}

impl<W> Syncer<W>
where
    W: MapWriter + MapReader,
{
    /// A syncer over `writer` with the default map sizes, adopting the ids
    /// of what the maps hold now; the first [`Syncer::sync_full`] then
    /// removes whatever is stale.
    pub fn adopting(writer: W, node: NodeContext) -> crate::Result<Self> {
        Self::adopting_with_sizes(writer, node, MapSizes::default())
    }

    /// [`Syncer::adopting`] for maps of the given sizes (ids are allocated
    /// below the rev-NAT and backends capacities).
    pub fn adopting_with_sizes(
        writer: W,
        node: NodeContext,
        sizes: MapSizes,
    ) -> crate::Result<Self> {
        let current = writer.read_state()?;
        Ok(Syncer {
            desired: DesiredState::adopting(&current, sizes.revnat, sizes.backends),
            writer,
            node,
            services: BTreeMap::new(),
            failed: BTreeMap::new(),
            repair_due: true,
            unsupported_fields: 0,
        })
    }

    /// The maps.
    pub fn writer(&self) -> &W {
        &self.writer
    }

    /// What was kept of each Service's last translation.
    pub fn services(&self) -> &BTreeMap<ObjectName, ServiceSummary> {
        &self.services
    }

    /// The desired map contents.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// Services whose writes failed and wait for a repair.
    pub fn failures(&self) -> &BTreeMap<ObjectName, WriteFailure> {
        &self.failed
    }

    /// Whether a failed write left the maps to be repaired.
    pub fn repair_due(&self) -> bool {
        self.repair_due
    }

    /// The number of fields, over every Service, set to something the agent
    /// does not serve.
    pub fn unsupported_fields(&self) -> usize {
        self.unsupported_fields
    }

    /// Every health-check node port to serve.
    pub fn health_checks(&self) -> impl Iterator<Item = &HealthCheck> {
        self.services
            .values()
            .filter_map(|summary| summary.health_check.as_ref())
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

    /// Re-translates the `dirty` Services and writes what changed for each.
    /// A Service whose write fails is reported and left for the next
    /// repair; the others are written.
    pub fn sync(&mut self, cluster: &ClusterState, dirty: &Dirty) -> SyncReport {
        let (mut report, mut groups) = self.update(cluster, dirty, true);
        link_shared_backends(&mut groups);
        self.apply_groups(groups, &mut report, false);
        if report.writes > 0 {
            info!(
                "sync: {} services changed, {} map writes",
                report.services_changed, report.writes
            );
        }
        report
    }

    /// Re-translates the `dirty` Services into the desired state; returns
    /// the report so far and, with `keep_writes`, each changed Service's
    /// writes.
    fn update(
        &mut self,
        cluster: &ClusterState,
        dirty: &Dirty,
        keep_writes: bool,
    ) -> (SyncReport, Vec<WriteGroup>) {
        let names: Vec<ObjectName> = match dirty {
            Dirty::Services(names) => names.iter().cloned().collect(),
            Dirty::All => cluster
                .services
                .keys()
                .chain(self.services.keys())
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        let mut report = SyncReport::default();
        let mut groups = Vec::new();
        for name in names {
            let translation = translate_one(cluster, &self.node, &name);
            let fingerprint = translation.fingerprint();
            let before = self.services.get(&name);
            if before.is_some_and(|b| b.fingerprint == fingerprint) {
                continue;
            }
            let existed = before.is_some();
            report.services_changed += 1;
            for line in &translation.skipped {
                warn!("skipped: {line}");
            }
            report.skipped += translation.skipped.len();
            // Logged once per Service (and again only when it changes).
            for line in &translation.unsupported {
                warn!("not supported: {line}");
            }
            if before.and_then(|b| b.health_check.as_ref()) != translation.health_checks.first() {
                report.health_checks_changed = true;
            }
            self.unsupported_fields -= before.map_or(0, |b| b.unsupported.len());
            self.unsupported_fields += translation.unsupported.len();
            report.frontends_removed.extend(
                self.desired
                    .frontends_of(&name)
                    .map(|(_, header)| header.rev_nat_id),
            );
            let backends_before: BTreeSet<(RevNatId, BackendId)> =
                self.desired.frontend_backends(&name).collect();
            let twins_before: Vec<(FrontendKey, RevNatId)> = self
                .desired
                .frontends_of(&name)
                .filter(|(key, _)| key.scope == SCOPE_INTERNAL)
                .map(|(key, header)| (*key, header.rev_nat_id))
                .collect();
            let update = if keep_writes {
                self.desired.set_service(&name, &translation.frontends)
            } else {
                ServiceUpdate {
                    problems: self.desired.replace_service(&name, &translation.frontends),
                    ..ServiceUpdate::default()
                }
            };
            report.frontends_added.extend(
                self.desired
                    .frontends_of(&name)
                    .map(|(key, header)| (header.rev_nat_id, *key)),
            );
            // A backend gone from a frontend that stays, while another
            // Service keeps it (else its deletion says it all): that
            // frontend's UDP flows to it are reaped.
            if !backends_before.is_empty() {
                let after: BTreeSet<(RevNatId, BackendId)> =
                    self.desired.frontend_backends(&name).collect();
                let frontends_after: BTreeSet<RevNatId> = self
                    .desired
                    .frontends_of(&name)
                    .map(|(_, header)| header.rev_nat_id)
                    .collect();
                report
                    .flows
                    .backends_left
                    .extend(
                        backends_before
                            .difference(&after)
                            .filter(|(frontend, backend)| {
                                frontends_after.contains(frontend)
                                    && self.desired.has_backend(*backend)
                            }),
                    );
            }
            // An in-cluster twin gone while the frontend it doubled stays:
            // its pods' flows go on under that frontend.
            if !twins_before.is_empty() {
                let after: BTreeMap<FrontendKey, RevNatId> = self
                    .desired
                    .frontends_of(&name)
                    .map(|(key, header)| (*key, header.rev_nat_id))
                    .collect();
                for (twin, twin_id) in twins_before {
                    if let (None, Some(&id)) =
                        (after.get(&twin), after.get(&twin.with_scope(SCOPE_ALL)))
                    {
                        report.flows.rev_nat_ids_moved.insert(twin_id, id);
                    }
                }
            }
            for line in &update.problems {
                error!("not programmed: {line}");
            }
            report.skipped += update.problems.len();
            // A full sync (at start, every Service is new) logs a summary;
            // events log each Service they change.
            let level = if keep_writes {
                log::Level::Info
            } else {
                log::Level::Debug
            };
            log_change(level, &name, existed, &translation);
            if translation == Translation::default() {
                self.services.remove(&name);
            } else {
                self.services.insert(
                    name.clone(),
                    ServiceSummary {
                        fingerprint,
                        not_programmed: translation.not_programmed.first().map(|(_, why)| *why),
                        has_frontends: !translation.frontends.is_empty(),
                        problems: translation
                            .skipped
                            .into_iter()
                            .chain(update.problems)
                            .collect(),
                        unsupported: translation.unsupported.into(),
                        health_check: translation.health_checks.into_iter().next(),
                    },
                );
            }
            if keep_writes && !update.writes.is_empty() {
                groups.push(WriteGroup {
                    owner: Some(name),
                    writes: update.writes,
                });
            }
        }
        (report, groups)
    }

    /// Re-translates everything and repairs the maps: compares the desired
    /// state with what the maps really hold and writes only the difference
    /// (so correct entries are not touched, and stale ones go). Stale
    /// entries nothing points at go first, then the Services, a chunk at a
    /// time, then the stale entries that were still named.
    pub fn sync_full(&mut self, cluster: &ClusterState) -> SyncReport {
        let (mut report, _) = self.update(cluster, &Dirty::All, false);
        self.desired.release_unclaimed();
        let actual = match self.writer.read_state() {
            Ok(actual) => actual,
            Err(e) => {
                error!("reading the maps for a repair: {}", e.report());
                self.repair_due = true;
                return report;
            }
        };
        self.repair_due = false;
        let desired = &self.desired;
        self.failed.retain(|name, _| desired.has_service(name));
        let stale = stale_entries(&actual, &self.desired);
        let mut repaired = 0;
        if !stale.first.is_empty() {
            repaired += stale.first.len();
            let writes = Writes {
                ops: stale.first,
                needs_room: false,
            };
            self.apply_groups(
                vec![WriteGroup {
                    owner: None,
                    writes,
                }],
                &mut report,
                true,
            );
        }
        let names: Vec<ObjectName> = self.desired.services().cloned().collect();
        for chunk in names.chunks(REPAIR_CHUNK) {
            let mut groups = Vec::new();
            for name in chunk {
                let writes = service_writes(&actual, &self.desired, name);
                if writes.is_empty() {
                    self.failed.remove(name);
                } else {
                    repaired += writes.ops.len();
                    groups.push(WriteGroup {
                        owner: Some(name.clone()),
                        writes,
                    });
                }
            }
            self.apply_groups(groups, &mut report, true);
        }
        if !stale.last.is_empty() {
            // A Service whose writes failed still names what it named.
            let failed: BTreeSet<&ObjectName> = self.failed.keys().collect();
            let (revnat, backends) = named_by(&actual, &self.desired, &failed);
            let ops: Vec<MapOp> = stale
                .last
                .into_iter()
                .filter(|op| match op {
                    MapOp::DeleteRevNat(id) => !revnat.contains(id),
                    MapOp::DeleteBackend(id) => !backends.contains(id),
                    _ => true,
                })
                .collect();
            repaired += ops.len();
            self.apply_groups(
                vec![WriteGroup {
                    owner: None,
                    writes: Writes {
                        ops,
                        needs_room: false,
                    },
                }],
                &mut report,
                true,
            );
        }
        if report.services_changed > 0 {
            info!(
                "full sync: {} services changed (each one logged at debug level)",
                report.services_changed
            );
        }
        if repaired > 0 {
            info!(
                "repair: {repaired} map entries differed from the desired state, {} written",
                report.writes
            );
        }
        report
    }

    /// Applies the groups' writes, one kernel batch per [`WriteStep`]:
    /// first the groups that need no new entry, then the others. A failed
    /// write drops the rest of its group's writes and is recorded; the
    /// other groups go on. A Service written in full is no longer failed
    /// when it was removed or when `repairing` (after an update, a failed
    /// Service's entries may still differ from what it was told to write).
    fn apply_groups(&mut self, groups: Vec<WriteGroup>, report: &mut SyncReport, repairing: bool) {
        let (frees, needs): (Vec<WriteGroup>, Vec<WriteGroup>) =
            groups.into_iter().partition(|g| !g.writes.needs_room);
        for round in [frees, needs] {
            let failed = self.apply_round(&round, report);
            for (group, failure) in round.into_iter().zip(failed) {
                let Some(failure) = failure else {
                    if let Some(name) = &group.owner
                        && (repairing || !self.desired.has_service(name))
                    {
                        self.failed.remove(name);
                    }
                    continue;
                };
                error!("{failure}; its other writes are held back and retried by the next repair");
                self.repair_due = true;
                if let Some(name) = &failure.service {
                    self.failed.insert(name.clone(), failure.clone());
                }
                report.failures.push(failure);
            }
        }
    }

    /// Applies one round of groups step by step; returns each group's
    /// failure, if any.
    fn apply_round(
        &mut self,
        groups: &[WriteGroup],
        report: &mut SyncReport,
    ) -> Vec<Option<WriteFailure>> {
        let mut failures: Vec<Option<WriteFailure>> = vec![None; groups.len()];
        for step in WriteStep::ORDER {
            let mut batch = Vec::new();
            let mut owners = Vec::new();
            for (index, group) in groups.iter().enumerate() {
                if failures[index].is_some() {
                    continue;
                }
                for op in group.writes.ops.iter().filter(|op| op.step() == step) {
                    batch.push(*op);
                    owners.push(index);
                }
            }
            while !batch.is_empty() {
                let Err(failure) = self.writer.apply_batch(&batch) else {
                    report.writes += batch.len();
                    batch.iter().for_each(|op| report.flows.record(op));
                    break;
                };
                report.writes += failure.done;
                batch[..failure.done]
                    .iter()
                    .for_each(|op| report.flows.record(op));
                let index = owners[failure.done];
                failures[index] = Some(WriteFailure {
                    service: groups[index].owner.clone(),
                    map: batch[failure.done].map(),
                    error: failure.error.to_string(),
                });
                // Go on after the failed write, without the rest of its group.
                let rest: Vec<(MapOp, usize)> = batch[failure.done + 1..]
                    .iter()
                    .zip(&owners[failure.done + 1..])
                    .filter(|(_, owner)| failures[**owner].is_none())
                    .map(|(op, owner)| (*op, *owner))
                    .collect();
                (batch, owners) = rest.into_iter().unzip();
            }
        }
        failures
    }

    /// How many entries each map should hold.
    pub fn desired_counts(&self) -> EntryCounts {
        self.desired.counts()
    }
}

/// Makes each group write the backends its slots name that another group
/// of the same sync adds: backends shared by Services are written by
/// whichever Service's update came first, and that Service's writes may
/// run later (or fail).
fn link_shared_backends(groups: &mut [WriteGroup]) {
    let added: BTreeMap<u32, MapOp> = groups
        .iter()
        .flat_map(|g| g.writes.ops.iter())
        .filter_map(|op| match op {
            MapOp::UpsertBackend(id, _) => Some((*id, *op)),
            _ => None,
        })
        .collect();
    if added.is_empty() {
        return;
    }
    for group in groups.iter_mut() {
        let own: BTreeSet<u32> = group
            .writes
            .ops
            .iter()
            .filter_map(|op| match op {
                MapOp::UpsertBackend(id, _) => Some(*id),
                _ => None,
            })
            .collect();
        let missing: BTreeSet<u32> = group
            .writes
            .ops
            .iter()
            .filter_map(|op| match op {
                MapOp::UpsertFrontend(key, value) if key.slot != 0 => Some(value.backend_id),
                _ => None,
            })
            .filter(|id| added.contains_key(id) && !own.contains(id))
            .collect();
        if missing.is_empty() {
            continue;
        }
        group.writes.ops.extend(missing.iter().map(|id| added[id]));
        group.writes.ops.sort_by_key(MapOp::step);
        group.writes.needs_room = true;
    }
}

/// Logs what changed for one Service.
fn log_change(level: log::Level, name: &ObjectName, existed: bool, after: &Translation) {
    if !log::log_enabled!(level) {
        return;
    }
    if after == &Translation::default() {
        if existed {
            log::log!(level, "service {name} removed");
        }
        return;
    }
    let verb = if existed { "updated" } else { "added" };
    for (_, kind) in &after.not_programmed {
        log::log!(level, "service {name} {verb}: {kind:?}, nothing to program");
    }
    for f in &after.frontends {
        log::log!(
            level,
            "service {name} {verb}: {}/{} -> [{}]",
            SocketAddr::new(f.addr, f.port),
            proto_name(f.proto),
            f.backends
                .iter()
                .map(|b| SocketAddr::new(b.addr, b.port).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
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
        let state = parse_documents(BASE, None).unwrap().into_cluster_state();
        let first = syncer.sync_full(&state);
        // web: 2 backends + 1 revnat + 2 slots + 1 header; db: revnat + header.
        assert_eq!(first.writes, 8);
        assert_eq!(syncer.sync(&state, &Dirty::All).writes, 0);
        assert_eq!(syncer.sync_full(&state).writes, 0);
        syncer.writer().check_consistent().unwrap();

        let fewer = parse_documents(&BASE.replace(", {addresses: [10.1.2.2]}", ""), None)
            .unwrap()
            .into_cluster_state();
        let report = syncer.sync(&fewer, &Dirty::All);
        // Header shrinks, slot 2 and the backend go; db is not touched.
        assert_eq!(report.writes, 3);
        assert_eq!(report.services_changed, 1);
        assert_eq!(syncer.writer().backends.len(), 1);
        syncer.writer().check_consistent().unwrap();
    }

    #[test]
    fn a_sync_reports_what_changed_for_tracked_flows() {
        let mut syncer = syncer();
        let state = parse_documents(BASE, None).unwrap().into_cluster_state();
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
        let changed = parse_documents(&changed, None)
            .unwrap()
            .into_cluster_state();
        let report = syncer.sync(&changed, &Dirty::All);
        assert_eq!(report.services_changed, 2);
        assert_eq!(
            report.flows,
            FlowChanges {
                backends_deleted: [backend_id(2)].into(),
                backends_not_serving: [backend_id(1)].into(),
                rev_nat_ids_released: [db_rev_nat].into(),
                ..FlowChanges::default()
            }
        );
        // Nothing changes again: nothing to report.
        assert!(syncer.sync(&changed, &Dirty::All).flows.is_empty());
    }

    #[test]
    fn a_backend_leaving_one_service_while_another_keeps_it_is_reported_for_that_frontend() {
        // web and all share 10.1.1.2:8080; web's endpoints switch to
        // 10.1.2.2 (a blue/green switch), all keeps both.
        let all = r#"
---
kind: Service
apiVersion: v1
metadata: {name: all}
spec: {clusterIP: 10.96.0.30, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: {name: all-1, labels: {kubernetes.io/service-name: all}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.1.2]}, {addresses: [10.1.2.2]}]
"#;
        let mut syncer = syncer();
        let state = parse_documents(&format!("{BASE}{all}"), None)
            .unwrap()
            .into_cluster_state();
        syncer.sync_full(&state);
        let maps = syncer.writer().clone();
        let blue = *maps
            .backends
            .iter()
            .find(|(_, b)| b.addr[..4] == [10, 1, 1, 2])
            .unwrap()
            .0;
        let web_rev_nat = maps
            .frontends
            .iter()
            .find(|(k, _)| k.slot == 0 && k.addr[3] == 10)
            .unwrap()
            .1
            .rev_nat_id;
        let switched = format!("{BASE}{all}").replacen(
            "endpoints: [{addresses: [10.1.1.2]}, {addresses: [10.1.2.2]}]",
            "endpoints: [{addresses: [10.1.2.2]}]",
            1,
        );
        let switched = parse_documents(&switched, None)
            .unwrap()
            .into_cluster_state();
        let report = syncer.sync(&switched, &Dirty::All);
        assert_eq!(
            report.flows,
            FlowChanges {
                backends_left: [(web_rev_nat, blue)].into(),
                ..FlowChanges::default()
            }
        );
        // Gone from all too: deleted, which says it all.
        let gone = parse_documents(&switched_all_without_blue(&format!("{BASE}{all}")), None)
            .unwrap()
            .into_cluster_state();
        let report = syncer.sync(&gone, &Dirty::All);
        assert_eq!(
            report.flows,
            FlowChanges {
                backends_deleted: [blue].into(),
                ..FlowChanges::default()
            }
        );
    }

    /// `yaml` with 10.1.1.2 gone from both Services' endpoints.
    fn switched_all_without_blue(yaml: &str) -> String {
        yaml.replace(
            "endpoints: [{addresses: [10.1.1.2]}, {addresses: [10.1.2.2]}]",
            "endpoints: [{addresses: [10.1.2.2]}]",
        )
    }

    #[test]
    fn an_in_cluster_twin_gone_while_its_frontend_stays_moves_its_flows() {
        let lb = |policy: &str| {
            format!(
                r#"
kind: Service
apiVersion: v1
metadata: {{name: web}}
spec: {{type: LoadBalancer, clusterIP: 10.96.0.10, externalTrafficPolicy: {policy}, ports: [{{name: http, port: 80, nodePort: 30080}}]}}
status: {{loadBalancer: {{ingress: [{{ip: 10.98.0.1}}]}}}}
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.1.1.2]}}]
"#
            )
        };
        let state = |policy: &str| {
            parse_documents(&lb(policy), None)
                .unwrap()
                .into_cluster_state()
        };
        let mut syncer = syncer();
        syncer.sync_full(&state("Local"));
        let header = |scope: u8| {
            syncer
                .writer()
                .frontends
                .iter()
                .find(|(k, _)| k.slot == 0 && k.addr[3] == 1 && k.scope == scope)
                .map(|(_, v)| v.rev_nat_id)
        };
        let (lb_id, twin_id) = (header(SCOPE_ALL).unwrap(), header(SCOPE_INTERNAL).unwrap());
        assert_ne!(lb_id, twin_id);

        let report = syncer.sync(&state("Cluster"), &Dirty::All);
        assert!(report.flows.rev_nat_ids_released.contains(&twin_id));
        assert_eq!(
            report.flows.rev_nat_ids_moved,
            BTreeMap::from([(twin_id, lb_id)])
        );
        // Back to Local: a new twin, nothing released, nothing moved.
        let report = syncer.sync(&state("Local"), &Dirty::All);
        assert!(report.flows.rev_nat_ids_moved.is_empty());
        assert!(report.flows.rev_nat_ids_released.is_empty());
        // The Service deleted: its flows die (ClusterIP, LB, twin), none
        // moves.
        let report = syncer.sync(&ClusterState::default(), &Dirty::All);
        assert!(report.flows.rev_nat_ids_moved.is_empty());
        assert_eq!(report.flows.rev_nat_ids_released.len(), 3);
    }

    #[test]
    fn events_mark_only_their_service_dirty() {
        let mut syncer = syncer();
        let mut state = parse_documents(BASE, None).unwrap().into_cluster_state();
        syncer.sync_full(&state);
        let (name, slice) = state.endpoint_slices().iter().next().unwrap();
        let (name, mut slice) = (name.clone(), slice.clone());
        slice.endpoints = slice.endpoints[..1].into();
        let dirty = state.apply(ClusterEvent::EndpointSlice(
            crate::reconcile::cluster::Change::Applied(name, slice),
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
        let state = parse_documents(BASE, None).unwrap().into_cluster_state();
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

    /// In-memory maps with capacities, like the kernel's: an insert into a
    /// full map fails (E2BIG), replacing or deleting never does. Every
    /// write is checked against what the datapath relies on, one by one
    /// (the kernel applies a batch's writes one at a time too), and every
    /// batch is logged.
    struct BoundedMaps {
        maps: MapState,
        capacity: [usize; 4],
        batches: Vec<Vec<MapOp>>,
    }

    impl BoundedMaps {
        fn new(frontends: usize, backends: usize, revnat: usize) -> Self {
            BoundedMaps {
                maps: MapState::default(),
                // Source ranges: unbounded here.
                capacity: [frontends, backends, revnat, usize::MAX],
                batches: Vec::new(),
            }
        }
    }

    impl MapWriter for BoundedMaps {
        type Error = String;

        fn apply_batch(
            &mut self,
            ops: &[MapOp],
        ) -> Result<(), crate::datapath::model::BatchFailure<String>> {
            self.batches.push(ops.to_vec());
            let steps: BTreeSet<WriteStep> = ops.iter().map(MapOp::step).collect();
            assert_eq!(steps.len(), 1, "a batch mixes steps: {ops:?}");
            for (done, op) in ops.iter().enumerate() {
                let map = op.map();
                let index = MapName::ALL.iter().position(|m| *m == map).unwrap();
                let insert = matches!(
                    op,
                    MapOp::UpsertBackend(..)
                        | MapOp::UpsertRevNat(..)
                        | MapOp::UpsertFrontend(..)
                        | MapOp::UpsertSourceRange(..)
                ) && !self.maps.contains(op);
                if insert && self.maps.entries(map) >= self.capacity[index] {
                    return Err(crate::datapath::model::BatchFailure {
                        done,
                        error: format!("writing the {map} map failed: the map is full (E2BIG)"),
                    });
                }
                self.maps.apply(op);
                self.maps
                    .check_consistent()
                    .unwrap_or_else(|e| panic!("after {op:?}: {e}"));
            }
            Ok(())
        }
    }

    impl MapReader for BoundedMaps {
        fn read_state(&self) -> crate::Result<MapState> {
            Ok(self.maps.clone())
        }
    }

    /// `count` Services `s0..` with ClusterIP `10.96.1.i`, each with
    /// `endpoints` endpoints `10.2.i.j`, or the endpoints given in `custom`.
    fn services_yaml(count: usize, endpoints: usize, custom: &[(&str, &[&str])]) -> String {
        let mut out = String::new();
        for i in 0..count {
            let name = format!("s{i}");
            let addresses: Vec<String> = match custom.iter().find(|(n, _)| *n == name) {
                Some((_, given)) => given.iter().map(|a| (*a).to_owned()).collect(),
                None => (0..endpoints).map(|j| format!("10.2.{i}.{j}")).collect(),
            };
            out.push_str(&format!(
                "---\nkind: Service\napiVersion: v1\nmetadata: {{name: {name}}}\nspec: {{clusterIP: 10.96.1.{i}, ports: [{{name: http, port: 80}}]}}\n---\nkind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
                addresses
                    .iter()
                    .map(|a| format!("{{addresses: [{a}]}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        out
    }

    fn state(yaml: &str) -> ClusterState {
        parse_documents(yaml, None).unwrap().into_cluster_state()
    }

    /// Frontend address (last octet) -> backend addresses, from the maps.
    fn served(maps: &MapState) -> BTreeMap<u8, Vec<String>> {
        maps.frontends
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(key, header)| {
                let backends = (1..=header.count)
                    .map(|slot| {
                        let id = maps.frontends[&service_common::FrontendKey { slot, ..*key }]
                            .backend_id;
                        let b = maps.backends[&id];
                        crate::datapath::model::ip_from_map(&b.addr, b.family).to_string()
                    })
                    .collect();
                (key.addr[3], backends)
            })
            .collect()
    }

    #[test]
    fn writes_go_to_the_kernel_in_one_batch_per_step_checked_write_by_write() {
        let mut syncer =
            Syncer::adopting(BoundedMaps::new(1000, 1000, 1000), NodeContext::default()).unwrap();
        let first = state(&services_yaml(20, 3, &[]));
        let report = syncer.sync_full(&first);
        assert!(!report.failed(), "{report:?}");
        // Backends, rev-NAT, slots, headers: four batches for 20 Services.
        let steps: Vec<WriteStep> = syncer
            .writer()
            .batches
            .iter()
            .map(|b| b[0].step())
            .collect();
        assert_eq!(
            steps,
            [
                WriteStep::UpsertBackends,
                WriteStep::UpsertRevNat,
                WriteStep::UpsertSlots,
                WriteStep::UpsertHeaders
            ]
        );
        assert_eq!(report.writes, 20 * (3 + 1 + 3 + 1));

        // Half the Services lose an endpoint, half are deleted: every
        // deletion step is one batch, after the header updates.
        syncer.writer.batches.clear();
        let second = state(&services_yaml(10, 2, &[]));
        let report = syncer.sync(&second, &Dirty::All);
        assert!(!report.failed(), "{report:?}");
        let steps: Vec<WriteStep> = syncer
            .writer()
            .batches
            .iter()
            .map(|b| b[0].step())
            .collect();
        assert_eq!(
            steps,
            [
                WriteStep::UpsertHeaders,
                WriteStep::DeleteHeaders,
                WriteStep::DeleteSlots,
                WriteStep::DeleteRevNat,
                WriteStep::DeleteBackends
            ]
        );
        assert_eq!(syncer.writer().maps, syncer.desired.maps());
    }

    #[test]
    fn a_full_map_stops_only_the_service_that_fills_it_and_deletions_still_land() {
        // Room for 4 Services of 2 endpoints: 12 frontend entries.
        let mut syncer =
            Syncer::adopting(BoundedMaps::new(12, 100, 100), NodeContext::default()).unwrap();
        let before = state(&services_yaml(3, 2, &[]));
        assert!(!syncer.sync_full(&before).failed());

        // In one sync: s0 is deleted, s1 swaps an endpoint, and s3 arrives
        // with 10 endpoints, more than the frontends map holds.
        let mut yaml = services_yaml(4, 2, &[("s1", &["10.2.1.0", "10.9.9.9"])]);
        yaml = yaml.replacen("name: s0}", "name: gone}", 1);
        yaml = yaml.replacen(
            "endpoints: [{addresses: [10.2.3.0]}, {addresses: [10.2.3.1]}]",
            &format!(
                "endpoints: [{}]",
                (0..10)
                    .map(|j| format!("{{addresses: [10.2.3.{j}]}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            1,
        );
        let mut after = state(&yaml);
        after.apply(ClusterEvent::Service(
            crate::reconcile::cluster::Change::Deleted(ObjectName::new("default", "gone")),
        ));
        let report = syncer.sync(&after, &Dirty::All);

        // Only s3 failed, on the frontends map, and says so.
        assert_eq!(report.failures.len(), 1, "{report:?}");
        let failure = &report.failures[0];
        assert_eq!(failure.service, Some(ObjectName::new("default", "s3")));
        assert_eq!(failure.map, MapName::Frontends);
        assert!(failure.error.contains("full"), "{failure}");
        assert_eq!(
            syncer.failures().keys().collect::<Vec<_>>(),
            [&ObjectName::new("default", "s3")]
        );
        assert!(syncer.repair_due());
        // s0's entries are gone, s1 has its new endpoint, s2 is untouched,
        // and s3 is not visible (its header was never written).
        let maps = &syncer.writer().maps;
        assert_eq!(
            served(maps),
            BTreeMap::from([
                (1, vec!["10.2.1.0".to_owned(), "10.9.9.9".to_owned()]),
                (2, vec!["10.2.2.0".to_owned(), "10.2.2.1".to_owned()]),
            ])
        );

        // The repair retries s3, fails the same way, and keeps the others.
        let report = syncer.sync_full(&after);
        assert_eq!(report.failures.len(), 1, "{report:?}");
        assert_eq!(served(&syncer.writer().maps).len(), 2);

        // s3 shrinks to fit: the next sync writes it and clears the failure.
        let fits = state(&services_yaml(
            4,
            2,
            &[("s1", &["10.2.1.0", "10.9.9.9"]), ("s0", &[])],
        ));
        let mut fits = fits;
        fits.apply(ClusterEvent::Service(
            crate::reconcile::cluster::Change::Deleted(ObjectName::new("default", "s0")),
        ));
        syncer.sync(&fits, &Dirty::All);
        let report = syncer.sync_full(&fits);
        assert!(!report.failed(), "{report:?}");
        assert!(syncer.failures().is_empty());
        assert!(!syncer.repair_due());
        assert_eq!(served(&syncer.writer().maps).len(), 3);
        assert_eq!(syncer.writer().maps, syncer.desired.maps());
    }

    #[test]
    fn a_repair_deletes_stale_entries_first_so_the_services_fit() {
        // A previous agent left s0..s2 in maps with room for 3 Services;
        // now only s5 exists, and it needs room.
        let mut old =
            Syncer::adopting(BoundedMaps::new(9, 100, 100), NodeContext::default()).unwrap();
        assert!(!old.sync_full(&state(&services_yaml(3, 2, &[]))).failed());
        let mut leftover = BoundedMaps::new(9, 100, 100);
        leftover.maps = old.writer().maps.clone();

        let mut restarted = Syncer::adopting(leftover, NodeContext::default()).unwrap();
        let mut yaml = services_yaml(6, 2, &[]);
        for i in 0..5 {
            yaml = yaml.replacen(&format!("name: s{i}}}"), &format!("name: x{i}}}"), 1);
        }
        let mut now = state(&yaml);
        for i in 0..5 {
            now.apply(ClusterEvent::Service(
                crate::reconcile::cluster::Change::Deleted(ObjectName::new(
                    "default",
                    &format!("x{i}"),
                )),
            ));
        }
        let report = restarted.sync_full(&now);
        assert!(!report.failed(), "{report:?}");
        assert_eq!(
            served(&restarted.writer().maps),
            BTreeMap::from([(5, vec!["10.2.5.0".to_owned(), "10.2.5.1".to_owned()])])
        );
        assert_eq!(restarted.writer().maps, restarted.desired.maps());
        // The stale entries went in the first batches, before any insert.
        let first_insert = restarted
            .writer()
            .batches
            .iter()
            .position(|b| b[0].step() == WriteStep::UpsertBackends)
            .unwrap();
        assert!(
            restarted.writer().batches[..first_insert]
                .iter()
                .flatten()
                .all(|op| matches!(
                    op,
                    MapOp::DeleteFrontend(_) | MapOp::DeleteRevNat(_) | MapOp::DeleteBackend(_)
                ))
        );
        assert!(first_insert > 0);
    }
}
