//! One sync: translation, map-state build, diff, and ordered writes. Generic
//! over the [`MapWriter`], so it runs against the kernel maps in the agent
//! and against an in-memory [`MapState`] in tests.

use std::collections::BTreeMap;

use log::{error, info, warn};
use service_common::{BACKENDS_MAX_ENTRIES, REVNAT_MAX_ENTRIES};

use crate::{
    source::{ClusterState, ObjectName},
    state::{MapOp, MapState, MapWriter, StateBuilder, diff},
    translate::{DesiredFrontend, NodeContext, translate},
};

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Map writes applied.
    pub writes: usize,
    /// Frontends programmed after the sync.
    pub frontends: usize,
    /// Objects, fields or entries skipped as invalid or not fitting.
    pub skipped: usize,
    /// Whether a write failed (the sync is retried).
    pub failed: bool,
}

/// Keeps the maps in line with the cluster state, writing only what changed.
pub struct Syncer<W> {
    writer: W,
    /// What the maps hold, as far as this agent wrote or read them.
    mirror: MapState,
    builder: StateBuilder,
    node: NodeContext,
    /// The previous translation, by Service, to log what changed.
    previous: BTreeMap<ObjectName, Vec<DesiredFrontend>>,
}

impl<W: MapWriter> Syncer<W>
where
    W::Error: std::fmt::Display,
{
    /// A syncer for maps that currently hold `current` (read from the
    /// kernel on start, so ids and entries are adopted, not flushed).
    pub fn adopting(writer: W, current: MapState, node: NodeContext) -> Self {
        let builder = StateBuilder::adopting(&current, REVNAT_MAX_ENTRIES, BACKENDS_MAX_ENTRIES);
        Syncer {
            writer,
            mirror: current,
            builder,
            node,
            previous: BTreeMap::new(),
        }
    }

    /// The writer (the maps).
    pub fn writer(&self) -> &W {
        &self.writer
    }

    /// Replaces the mirror with the maps' real contents, after a failed write.
    pub fn resync_mirror(&mut self, actual: MapState) {
        self.mirror = actual;
    }

    /// Programs the maps for `cluster`.
    pub fn sync(&mut self, cluster: &ClusterState) -> SyncReport {
        let translation = translate(cluster, &self.node);
        for line in &translation.skipped {
            warn!("skipped: {line}");
        }
        let (desired, problems) = self.builder.build(&translation.frontends);
        for line in &problems.skipped {
            error!("not programmed: {line}");
        }
        let ops = diff(&self.mirror, &desired);
        let mut report = SyncReport {
            writes: 0,
            frontends: desired.frontends.keys().filter(|k| k.slot == 0).count(),
            skipped: translation.skipped.len() + problems.skipped.len(),
            failed: false,
        };
        for op in &ops {
            if let Err(e) = self.writer.apply(op) {
                error!("{e}; will retry");
                report.failed = true;
                break;
            }
            // Infallible for the in-memory mirror.
            let _ = self.mirror.apply(op);
            report.writes += 1;
        }
        self.log_changes(&translation.frontends);
        if !ops.is_empty() {
            info!(
                "sync: {} map writes ({}), {} frontends programmed",
                report.writes,
                summarize(&ops),
                report.frontends
            );
        }
        report
    }

    /// Logs, per Service, which frontends appeared, changed or went.
    fn log_changes(&mut self, frontends: &[DesiredFrontend]) {
        let mut current: BTreeMap<ObjectName, Vec<DesiredFrontend>> = BTreeMap::new();
        for frontend in frontends {
            current
                .entry(frontend.service.clone())
                .or_default()
                .push(frontend.clone());
        }
        for (service, now) in &current {
            match self.previous.get(service) {
                Some(before) if before == now => {}
                before => {
                    let verb = if before.is_some() { "updated" } else { "added" };
                    for f in now {
                        info!(
                            "service {service} {verb}: {}:{}/{} -> [{}]",
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
            }
        }
        for service in self.previous.keys().filter(|s| !current.contains_key(*s)) {
            info!("service {service} removed");
        }
        self.previous = current;
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

/// `TCP`, `UDP` or the number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        service_common::PROTO_TCP => "TCP".to_owned(),
        service_common::PROTO_UDP => "UDP".to_owned(),
        service_common::PROTO_SCTP => "SCTP".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::file::parse_documents;

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
"#;

    #[test]
    fn syncing_the_same_state_twice_writes_once_and_edits_write_little() {
        let mut syncer = Syncer::adopting(
            MapState::default(),
            MapState::default(),
            NodeContext::default(),
        );
        let state = parse_documents(BASE).unwrap().state;
        let first = syncer.sync(&state);
        assert_eq!(first.frontends, 1);
        // 2 backends + 1 revnat + 2 slots + 1 header.
        assert_eq!(first.writes, 6);
        assert_eq!(syncer.sync(&state).writes, 0);
        syncer.writer().check_consistent().unwrap();

        let fewer = parse_documents(&BASE.replace(", {addresses: [10.1.2.2]}", "")).unwrap();
        let report = syncer.sync(&fewer.state);
        // Header shrinks, slot 2 and the backend go.
        assert_eq!(report.writes, 3);
        assert_eq!(syncer.writer().backends.len(), 1);
        syncer.writer().check_consistent().unwrap();
    }
}
