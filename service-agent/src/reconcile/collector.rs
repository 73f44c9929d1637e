//! The conntrack collector: a thread of its own (it never blocks a sync)
//! that walks the conntrack map by the rules of [`super::flows`]:
//!
//! - at once, one walk for the changes of the syncs since its last walk
//!   ([`CollectorHandle::follow`]): UDP flows of backends gone or not
//!   serving deleted, flows of deleted frontends marked dead, and the
//!   node's connected UDP sockets socket-LB sent to those backends
//!   destroyed ([`crate::datapath::sock_diag`]);
//! - a pass every [`Pacer`] interval, shorter when passes free much of
//!   the map, longer when they free little, and early when the datapath
//!   signals pressure (SNAT ports exhausted, conntrack inserts failing).
//!
//! It keeps the rev-NAT ids of deleted frontends until no entry names them
//! and then tells the sync loop they are free again ([`CollectorNews`]).
//! Its first pass also deletes the session-affinity entries of frontends
//! that are gone from the rev-NAT map (deleted by an agent that stopped
//! before it could delete their clients' entries, so no sync will name
//! them again).

use std::{
    collections::BTreeSet,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use log::{info, warn};
use service_common::{RevNatId, SnatPortRange};

use super::flows::{DeleteReason, FlowChanges, FlowRules, WalkReport, collect, reap};
use crate::{
    datapath::{
        conntrack::{ConntrackTable, Pressure, monotonic_seconds},
        sock_diag::TranslatedSockets,
    },
    ops::metrics::Metrics,
};

/// How the collector is paced and what it judges by.
#[derive(Clone, Copy, Debug)]
pub struct CollectorSettings {
    /// Timeouts and the SNAT addresses.
    pub rules: FlowRules,
    /// The SNAT port range (named when ports run out).
    pub snat_ports: SnatPortRange,
    /// Shortest time between passes.
    pub min_interval: Duration,
    /// Longest time between passes (`--ct-gc-max-interval-secs`).
    pub max_interval: Duration,
}

/// What the collector tells the sync loop about rev-NAT ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CollectorNews {
    /// Entries name these ids though their frontend is gone (it went while
    /// no agent ran): they were marked dead, and the ids must not be handed
    /// out until they are drained.
    RevNatIdsInUse(Vec<RevNatId>),
    /// No entry names these ids of deleted frontends any more: they may be
    /// handed out again.
    RevNatIdsDrained(Vec<RevNatId>),
}

/// Paces the passes by how much of the map each one freed: a pass should
/// free about [`Pacer::TARGET_FRACTION`] of the capacity. One that freed
/// more brings the next pass closer (expired entries pile up faster than
/// thought), one that freed far less pushes it away (walking costs CPU for
/// nothing), within the bounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pacer {
    interval: Duration,
    min: Duration,
    max: Duration,
}

impl Pacer {
    /// The share of the capacity a pass should free.
    pub const TARGET_FRACTION: f64 = 0.05;
    /// The first interval (bounded): soon after start, to clear what a
    /// previous agent left.
    const FIRST: Duration = Duration::from_secs(10);

    /// A pacer between `min` and `max` (`max` at least `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Pacer {
            interval: Self::FIRST.clamp(min, max),
            min,
            max,
        }
    }

    /// The current interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The shortest interval.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The interval after a pass that deleted `deleted` entries of a map of
    /// `capacity`.
    pub fn after_pass(&mut self, deleted: u64, capacity: u32) -> Duration {
        let fraction = deleted as f64 / f64::from(capacity.max(1));
        let factor = if fraction > Self::TARGET_FRACTION {
            (Self::TARGET_FRACTION / fraction).max(0.25)
        } else if fraction < Self::TARGET_FRACTION / 4.0 {
            1.5
        } else {
            1.0
        };
        self.interval = self.interval.mul_f64(factor).clamp(self.min, self.max);
        self.interval
    }
}

/// The collector's state, apart from its thread: what it walks, how it is
/// paced, and the rev-NAT ids it waits to see drained.
pub struct Collector<T> {
    table: T,
    settings: CollectorSettings,
    pacer: Pacer,
    /// Rev-NAT ids of deleted frontends whose entries may still exist.
    draining: BTreeSet<RevNatId>,
    /// Whether the affinity entries of frontends gone from the rev-NAT
    /// map were deleted (by the first pass, or a later one if that failed).
    stale_affinity_forgotten: bool,
    /// The node's sockets socket-LB translated (none: socket-LB is off,
    /// or netlink could not be opened).
    sockets: Option<Box<dyn TranslatedSockets>>,
    metrics: Option<Arc<Metrics>>,
}

impl<T: ConntrackTable> Collector<T> {
    /// A collector over `table`.
    pub fn new(table: T, settings: CollectorSettings, metrics: Option<Arc<Metrics>>) -> Self {
        Collector {
            table,
            pacer: Pacer::new(settings.min_interval, settings.max_interval),
            settings,
            draining: BTreeSet::new(),
            stale_affinity_forgotten: false,
            sockets: None,
            metrics,
        }
    }

    /// Has the collector destroy the node's connected UDP sockets that
    /// socket-LB sent to backends gone or not serving, through `sockets`.
    pub fn with_sockets(mut self, sockets: Box<dyn TranslatedSockets>) -> Self {
        self.sockets = Some(sockets);
        self
    }

    /// The table.
    pub fn table(&self) -> &T {
        &self.table
    }

    /// The pacer.
    pub fn pacer(&self) -> &Pacer {
        &self.pacer
    }

    /// One walk for `changes` at `now` (monotonic seconds).
    pub fn follow(&mut self, changes: &FlowChanges, now: u32) {
        if changes.is_empty() {
            return;
        }
        // The sockets first: an application waits on them, and a failed
        // conntrack walk must not keep them on a dead backend.
        self.destroy_sockets(changes);
        let started = Instant::now();
        let report = match reap(&mut self.table, changes, now) {
            Ok(report) => report,
            Err(e) => {
                warn!("conntrack: walking the map for the sync's changes failed: {e}");
                return;
            }
        };
        // Ids whose frontends went are drained once a pass finds no entry
        // naming them (at once if none did).
        self.draining
            .extend(changes.rev_nat_ids_released.iter().copied());
        // Their clients' affinity goes with them at once (the pass does
        // it again before handing the ids back, for entries a packet in
        // flight wrote meanwhile).
        self.forget_affinity(&changes.rev_nat_ids_released);
        self.record(&report, started.elapsed(), false);
        if report.deleted_total() > 0 || report.marked_dead > 0 || report.moved > 0 {
            info!(
                "conntrack: {} UDP entries of backends gone or not serving ({:?}) or gone from a frontend ((rev-NAT id, backend) {:?}) deleted, {} entries of deleted frontends (rev-NAT ids {:?}) marked dead, {} moved to the frontend their in-cluster twin doubled ({:?}), in {:.1} ms",
                report.deleted_total(),
                changes
                    .backends_deleted
                    .union(&changes.backends_not_serving)
                    .collect::<Vec<_>>(),
                changes.backends_left,
                report.marked_dead,
                changes.rev_nat_ids_released,
                report.moved,
                changes.rev_nat_ids_moved,
                started.elapsed().as_secs_f64() * 1000.0
            );
        }
    }

    /// One pass at `now` (monotonic seconds); returns the news for the
    /// sync loop and the time until the next pass.
    pub fn pass(&mut self, now: u32) -> (Vec<CollectorNews>, Duration) {
        let started = Instant::now();
        let report = match collect(&mut self.table, &self.settings.rules, now) {
            Ok(report) => report,
            Err(e) => {
                warn!("conntrack: a collector pass failed: {e}");
                return (Vec::new(), self.pacer.interval());
            }
        };
        let took = started.elapsed();
        let next = self
            .pacer
            .after_pass(report.deleted_total(), self.table.capacity());
        self.record(&report, took, true);
        if !self.stale_affinity_forgotten {
            self.stale_affinity_forgotten = self.forget_stale_affinity();
        }
        let mut news = Vec::new();
        if !report.rev_nat_ids_marked_dead.is_empty() {
            warn!(
                "conntrack: {} entries named frontends that no longer exist (rev-NAT ids {:?}): marked dead",
                report.marked_dead, report.rev_nat_ids_marked_dead
            );
            self.draining
                .extend(report.rev_nat_ids_marked_dead.iter().copied());
            news.push(CollectorNews::RevNatIdsInUse(
                report.rev_nat_ids_marked_dead.iter().copied().collect(),
            ));
        }
        let drained: BTreeSet<RevNatId> = self
            .draining
            .iter()
            .filter(|id| !report.rev_nat_ids_named.contains(id))
            .copied()
            .collect();
        // An id is handed back only once no affinity entry names it either:
        // a new frontend given it must not inherit a deleted one's clients.
        if !drained.is_empty() && self.forget_affinity(&drained) {
            for id in &drained {
                self.draining.remove(id);
            }
            news.push(CollectorNews::RevNatIdsDrained(
                drained.into_iter().collect(),
            ));
        }
        if report.deleted_total() > 0 {
            info!(
                "conntrack: pass read {} entries in {:.1} ms, deleted {} ({}), {} left of {}; next pass in {:.0?}",
                report.scanned,
                took.as_secs_f64() * 1000.0,
                report.deleted_total(),
                DeleteReason::ALL
                    .iter()
                    .filter_map(|reason| {
                        let n = report.deleted.get(reason)?;
                        Some(format!("{} {n}", reason.name()))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                report.remaining,
                self.table.capacity(),
                next
            );
        }
        (news, next)
    }

    /// Destroys the node's connected UDP sockets socket-LB sent to a
    /// backend whose UDP flows `changes` reaps (gone, not serving, or gone
    /// from the socket's frontend); logs and counts what it did. A failure
    /// is a log line and a metric; a kernel without `SOCK_DESTROY` is said
    /// once.
    fn destroy_sockets(&mut self, changes: &FlowChanges) {
        let Some(sockets) = &mut self.sockets else {
            return;
        };
        if !changes.reaps_any_udp() {
            return;
        }
        let started = Instant::now();
        let report = sockets
            .destroy_translated_to(&|frontend, backend| changes.reaps_udp_of(frontend, backend));
        if let Some(e) = &report.unsupported {
            warn!(
                "socket-LB: the kernel cannot destroy sockets (SOCK_DESTROY: {e}; CONFIG_INET_DIAG_DESTROY, CONFIG_INET_UDP_DIAG): the node's connected UDP sockets stay on backends that left their Service until the application reconnects"
            );
        }
        for (socket, e) in &report.failed {
            match socket {
                Some(socket) => warn!(
                    "socket-LB: destroying the UDP socket {socket} of a backend gone, not serving or gone from its frontend failed: {e}"
                ),
                None => warn!("socket-LB: listing the node's connected UDP sockets failed: {e}"),
            }
        }
        if !report.destroyed.is_empty() {
            info!(
                "socket-LB: {} connected UDP sockets of backends gone or not serving ({:?}) or gone from their frontend ((rev-NAT id, backend) {:?}) destroyed in {:.1} ms (their owners see ECONNABORTED): {}",
                report.destroyed.len(),
                changes
                    .backends_deleted
                    .union(&changes.backends_not_serving)
                    .collect::<Vec<_>>(),
                changes.backends_left,
                started.elapsed().as_secs_f64() * 1000.0,
                report
                    .destroyed
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(metrics) = &self.metrics {
            let gc = &metrics.conntrack_gc;
            gc.destroyed_sockets.inc_by(report.destroyed.len() as u64);
            gc.socket_destroy_failures
                .inc_by(report.failed.len() as u64);
        }
    }

    /// Deletes the affinity entries of the frontends `rev_nat_ids`
    /// named; whether that worked (a failure is logged, and the ids stay
    /// draining so the next pass tries again).
    fn forget_affinity(&mut self, rev_nat_ids: &BTreeSet<RevNatId>) -> bool {
        if rev_nat_ids.is_empty() {
            return true;
        }
        match self.table.forget_affinity(rev_nat_ids) {
            Ok(deleted) => {
                if deleted > 0 {
                    info!(
                        "conntrack: {deleted} session-affinity entries of deleted frontends (rev-NAT ids {rev_nat_ids:?}) deleted"
                    );
                    if let Some(metrics) = &self.metrics {
                        metrics.conntrack_gc.deleted("affinity").inc_by(deleted);
                    }
                }
                true
            }
            Err(e) => {
                warn!(
                    "conntrack: deleting the session-affinity entries of rev-NAT ids {rev_nat_ids:?} failed: {e}"
                );
                false
            }
        }
    }

    /// Deletes the affinity entries naming rev-NAT ids absent from the
    /// rev-NAT map: their frontends are gone (deleted by an agent that
    /// stopped before it deleted these entries, or while none ran), and
    /// no conntrack entry or sync will name them again. Whether that
    /// worked (a failure is logged).
    fn forget_stale_affinity(&mut self) -> bool {
        // The affinity map first: a frontend created meanwhile has its
        // rev-NAT entry before any affinity entry can name it (rev-NAT
        // entries are written before the headers that make a frontend
        // visible), so it is never taken for a gone one.
        let named = self.table.affinity_rev_nat_ids();
        let frontends = self.table.frontends();
        let (named, frontends) = match (named, frontends) {
            (Ok(named), Ok(frontends)) => (named, frontends),
            (Err(e), _) | (_, Err(e)) => {
                warn!("conntrack: reading the session-affinity and rev-NAT maps failed: {e}");
                return false;
            }
        };
        let gone: BTreeSet<RevNatId> = named
            .into_iter()
            .filter(|id| !frontends.contains_key(id))
            .collect();
        self.forget_affinity(&gone)
    }

    /// Feeds the metrics with a walk's figures.
    fn record(&self, report: &WalkReport, took: Duration, pass: bool) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        let gc = &metrics.conntrack_gc;
        if pass {
            gc.passes.inc();
            gc.pass_duration.observe(took.as_secs_f64());
            gc.interval.set(self.pacer.interval().as_secs_f64());
            metrics.set_conntrack_entries(report.remaining);
        }
        gc.scanned.inc_by(report.scanned);
        for (reason, count) in &report.deleted {
            gc.deleted(reason.name()).inc_by(*count);
        }
        gc.marked_dead.inc_by(report.marked_dead);
    }
}

/// Whether the datapath signalled pressure between two readings of its
/// counters (SNAT ports ran out, conntrack inserts failed); says so in the
/// log. A pass then runs as soon as the pacing allows.
fn pressure_rose(before: &Pressure, now: &Pressure, snat_ports: &SnatPortRange) -> bool {
    let exhausted = now
        .snat_ports_exhausted
        .saturating_sub(before.snat_ports_exhausted);
    let failed = now
        .conntrack_insert_failed
        .saturating_sub(before.conntrack_insert_failed);
    if exhausted > 0 {
        let range = snat_ports.effective();
        warn!(
            "SNAT ports exhausted: {exhausted} new flows to backends on other nodes dropped (no free port in {}-{}); collecting conntrack now",
            range.min, range.max
        );
    }
    if failed > 0 {
        warn!("conntrack full: {failed} new flows could not be tracked; collecting conntrack now");
    }
    exhausted > 0 || failed > 0
}

/// The datapath's pressure signals, read once a second.
pub type PressureSource = Box<dyn FnMut() -> Option<Pressure> + Send>;

/// The running collector: send it the syncs' changes.
pub struct CollectorHandle {
    changes: mpsc::Sender<FlowChanges>,
}

impl CollectorHandle {
    /// Has the collector follow `changes` at once (one walk for all the
    /// changes sent since its last walk). Never blocks.
    pub fn follow(&self, changes: &FlowChanges) {
        if !changes.is_empty() {
            // A stopped collector has nothing left to follow.
            let _ = self.changes.send(changes.clone());
        }
    }
}

/// Starts the collector over `table` on its own thread; its news go to
/// `news`. `pressure` reads the datapath's counters; `sockets`, if any,
/// are the node's sockets socket-LB translated. The thread ends when
/// the handle is dropped.
pub fn spawn<T: ConntrackTable + Send + 'static>(
    table: T,
    settings: CollectorSettings,
    mut pressure: PressureSource,
    sockets: Option<Box<dyn TranslatedSockets>>,
    metrics: Option<Arc<Metrics>>,
    news: tokio::sync::mpsc::UnboundedSender<CollectorNews>,
) -> std::io::Result<CollectorHandle> {
    let (sender, changes) = mpsc::channel::<FlowChanges>();
    let mut collector = Collector::new(table, settings, metrics);
    if let Some(sockets) = sockets {
        collector = collector.with_sockets(sockets);
    }
    std::thread::Builder::new()
        .name("conntrack-gc".into())
        .spawn(move || {
            /// How often the datapath's counters are read.
            const PRESSURE_POLL: Duration = Duration::from_secs(1);
            let mut last_pressure = pressure();
            let mut last_pass = Instant::now();
            let mut next_pass = last_pass + collector.pacer().interval();
            loop {
                let wait = next_pass
                    .saturating_duration_since(Instant::now())
                    .min(PRESSURE_POLL);
                match changes.recv_timeout(wait) {
                    Ok(first) => {
                        let mut all = first;
                        while let Ok(more) = changes.try_recv() {
                            all.merge(more);
                        }
                        collector.follow(&all, monotonic_seconds());
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                let now_pressure = pressure();
                if let (Some(before), Some(now)) = (last_pressure, now_pressure)
                    && pressure_rose(&before, &now, &settings.snat_ports)
                {
                    next_pass = next_pass.min(last_pass + collector.pacer().min());
                }
                last_pressure = now_pressure.or(last_pressure);
                if Instant::now() >= next_pass {
                    let (news_now, interval) = collector.pass(monotonic_seconds());
                    for item in news_now {
                        let _ = news.send(item);
                    }
                    last_pass = Instant::now();
                    next_pass = last_pass + interval;
                }
            }
        })?;
    Ok(CollectorHandle { changes: sender })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::conntrack::MemoryConntrack;
    use service_common::{
        AffinityKey, AffinityValue, BackendId, CT_DIR_FORWARD, CT_DIR_REPLY, ConntrackKey,
        ConntrackTimeouts, ConntrackValue, MapAddr, PROTO_UDP, RevNatValue, map_addr_v4,
    };

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn passes_come_sooner_when_they_free_much_and_later_when_they_free_little() {
        let mut pacer = Pacer::new(SECOND, 300 * SECOND);
        assert_eq!(pacer.interval(), 10 * SECOND);
        // Half the map freed: a quarter of the interval (at most that much
        // shorter at once).
        assert_eq!(pacer.after_pass(500, 1000), 2500 * Duration::from_millis(1));
        // 10% freed: twice the target, half the interval.
        assert_eq!(pacer.after_pass(100, 1000), 1250 * Duration::from_millis(1));
        // Never below the minimum.
        assert_eq!(pacer.after_pass(1000, 1000), SECOND);
        // About the target: unchanged.
        assert_eq!(pacer.after_pass(30, 1000), SECOND);
        // Little freed: half as long again each time, up to the maximum.
        assert_eq!(pacer.after_pass(0, 1000), 1500 * Duration::from_millis(1));
        for _ in 0..30 {
            pacer.after_pass(1, 1000);
        }
        assert_eq!(pacer.interval(), 300 * SECOND);
        // Bounds given the wrong way round still bound.
        let short = Pacer::new(SECOND, Duration::ZERO);
        assert_eq!(short.interval(), SECOND);
    }

    fn settings() -> CollectorSettings {
        CollectorSettings {
            rules: FlowRules {
                timeouts: ConntrackTimeouts {
                    tcp_close: 3,
                    udp: 10,
                    ..ConntrackTimeouts::DEFAULT
                },
                snat_v4: map_addr_v4([10, 0, 0, 1]),
                snat_v6: MapAddr::default(),
            },
            snat_ports: SnatPortRange::DEFAULT,
            min_interval: SECOND,
            max_interval: 60 * SECOND,
        }
    }

    /// A table holding one UDP flow per rev-NAT id in `ids` (all but
    /// `deleted` with a frontend), last seen at 1000.
    fn table(ids: &[RevNatId], deleted: &[RevNatId]) -> MemoryConntrack {
        let mut table = MemoryConntrack::new(100, 4);
        for &id in ids {
            let frontend = [10, 96, 0, id as u8];
            let master = ConntrackKey::v4(
                [10, 1, 0, 2],
                40000u16.to_be(),
                frontend,
                53u16.to_be(),
                PROTO_UDP,
                CT_DIR_FORWARD,
            );
            let value =
                ConntrackValue::new(map_addr_v4([10, 200, 0, 2]), 5353u16.to_be(), 1, id, 1000);
            let reply = ConntrackKey::v4(
                [10, 200, 0, 2],
                5353u16.to_be(),
                [10, 1, 0, 2],
                40000u16.to_be(),
                PROTO_UDP,
                CT_DIR_REPLY,
            );
            table.entries.insert(master, value);
            table.entries.insert(
                reply,
                ConntrackValue::new(master.daddr, master.dport, 1, id, 1000),
            );
            if !deleted.contains(&id) {
                table.frontends.insert(
                    id,
                    RevNatValue {
                        addr: master.daddr,
                        port: master.dport,
                        family: master.family,
                        _pad: 0,
                    },
                );
            }
        }
        table
    }

    #[test]
    fn pressure_is_a_counter_that_moved() {
        let before = Pressure {
            snat_ports_exhausted: 4,
            conntrack_insert_failed: 1,
        };
        let range = SnatPortRange::DEFAULT;
        assert!(!pressure_rose(&before, &before, &range));
        for now in [
            Pressure {
                snat_ports_exhausted: 5,
                ..before
            },
            Pressure {
                conntrack_insert_failed: 2,
                ..before
            },
        ] {
            assert!(pressure_rose(&before, &now, &range));
        }
        // A counter that went back (the map recreated) is no pressure.
        assert!(!pressure_rose(&before, &Pressure::default(), &range));
    }

    #[test]
    fn a_deleted_frontend_s_id_is_drained_once_its_dead_flows_are_gone() {
        let mut collector = Collector::new(table(&[1, 2], &[1]), settings(), None);
        collector.follow(
            &FlowChanges {
                rev_nat_ids_released: [1, 3].into(),
                ..FlowChanges::default()
            },
            1001,
        );
        // Id 3 named nothing: drained by the first pass; id 1's flow is
        // dead but within the close timeout.
        let (news, _) = collector.pass(1002);
        assert_eq!(news, [CollectorNews::RevNatIdsDrained(vec![3])]);
        let (news, _) = collector.pass(1005);
        assert_eq!(news, [CollectorNews::RevNatIdsDrained(vec![1])]);
        assert_eq!(collector.table().entries.len(), 2);
        assert_eq!(collector.pass(1006).0, []);
    }

    /// An affinity entry of client 10.1.0.`client` for frontend `id`.
    fn affinity(client: u8, id: RevNatId) -> (AffinityKey, AffinityValue) {
        (
            AffinityKey::v4([10, 1, 0, client], id),
            AffinityValue {
                backend_id: 1,
                ..AffinityValue::default()
            },
        )
    }

    /// The affinity entries the collector's table holds.
    fn affinity_keys(collector: &Collector<MemoryConntrack>) -> Vec<AffinityKey> {
        collector.table().affinity.keys().copied().collect()
    }

    #[test]
    fn a_deleted_frontend_s_affinity_goes_before_its_id_is_handed_back() {
        let mut table = table(&[1, 2], &[1]);
        table
            .affinity
            .extend([affinity(2, 1), affinity(3, 1), affinity(2, 2)]);
        let mut collector = Collector::new(table, settings(), None);
        collector.follow(
            &FlowChanges {
                rev_nat_ids_released: [1].into(),
                ..FlowChanges::default()
            },
            1001,
        );
        // At once: frontend 1's clients are forgotten, frontend 2's kept.
        assert_eq!(affinity_keys(&collector), [affinity(2, 2).0]);
        // A packet in flight wrote one more for frontend 1: the pass that
        // hands id 1 back deletes it first.
        collector.table.affinity.extend([affinity(4, 1)]);
        let (news, _) = collector.pass(1005);
        assert_eq!(news, [CollectorNews::RevNatIdsDrained(vec![1])]);
        assert_eq!(affinity_keys(&collector), [affinity(2, 2).0]);
    }

    #[test]
    fn the_first_pass_forgets_the_affinity_of_frontends_gone_from_the_rev_nat_map() {
        // A restarted agent: frontend 7 was deleted (rev-NAT entry and
        // all) by an agent that stopped before it deleted its clients'
        // affinity entries; no conntrack entry names it, no sync will.
        let mut table = table(&[1, 2], &[]);
        table.affinity.extend([
            affinity(2, 1),
            affinity(2, 7),
            affinity(3, 7),
            affinity(3, 2),
        ]);
        let mut collector = Collector::new(table, settings(), None);
        let (news, _) = collector.pass(1001);
        assert_eq!(news, []);
        assert_eq!(
            affinity_keys(&collector),
            [affinity(2, 1).0, affinity(3, 2).0]
        );
    }

    #[test]
    fn ids_only_leftover_flows_name_are_reported_in_use_then_drained() {
        // A restarted agent: frontend 5 went while no agent ran.
        let mut collector = Collector::new(table(&[1, 5], &[5]), settings(), None);
        let (news, _) = collector.pass(1001);
        assert_eq!(news, [CollectorNews::RevNatIdsInUse(vec![5])]);
        let (news, _) = collector.pass(1005);
        assert_eq!(news, [CollectorNews::RevNatIdsDrained(vec![5])]);
    }

    /// Sockets through (rev-NAT id, backend) 1-5 x 1-5 that record which
    /// of them they were asked to destroy and report one destroyed socket
    /// and one failure each time.
    struct FakeSockets(Arc<std::sync::Mutex<Vec<Asked>>>);

    /// The (rev-NAT id, backend) pairs one call asked to destroy.
    type Asked = BTreeSet<(RevNatId, BackendId)>;

    impl TranslatedSockets for FakeSockets {
        fn destroy_translated_to(
            &mut self,
            reaped: &dyn Fn(RevNatId, BackendId) -> bool,
        ) -> crate::datapath::sock_diag::DestroyReport {
            let asked = (1..=5)
                .flat_map(|frontend| (1..=5).map(move |backend| (frontend, backend)))
                .filter(|&(frontend, backend)| reaped(frontend, backend))
                .collect();
            self.0.lock().unwrap().push(asked);
            crate::datapath::sock_diag::DestroyReport {
                destroyed: vec![crate::datapath::sock_diag::UdpSocketId {
                    family: libc::AF_INET as u8,
                    id: Default::default(),
                }],
                failed: vec![(None, std::io::Error::other("dump failed"))],
                unsupported: None,
            }
        }
    }

    #[test]
    fn sockets_of_backends_gone_or_not_serving_are_destroyed_and_counted() {
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let metrics = Arc::new(Metrics::new(crate::datapath::MapSizes::default(), None));
        let mut collector = Collector::new(table(&[1], &[]), settings(), Some(metrics.clone()))
            .with_sockets(Box::new(FakeSockets(asked.clone())));
        // A frontend deleted alone names no backend: no socket search.
        collector.follow(
            &FlowChanges {
                rev_nat_ids_released: [1].into(),
                ..FlowChanges::default()
            },
            1001,
        );
        assert!(asked.lock().unwrap().is_empty());
        collector.follow(
            &FlowChanges {
                backends_deleted: [3].into(),
                backends_not_serving: [4].into(),
                backends_left: [(2, 5)].into(),
                ..FlowChanges::default()
            },
            1001,
        );
        let every_frontend = |backend| (1..=5).map(move |frontend| (frontend, backend));
        let expected: BTreeSet<_> = every_frontend(3)
            .chain(every_frontend(4))
            .chain([(2, 5)])
            .collect();
        assert_eq!(*asked.lock().unwrap(), [expected]);
        assert_eq!(metrics.conntrack_gc.destroyed_sockets.get(), 1);
        assert_eq!(metrics.conntrack_gc.socket_destroy_failures.get(), 1);
    }
}
