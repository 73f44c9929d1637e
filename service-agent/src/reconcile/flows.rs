//! The agent's rules for tracked flows (`docs/design/flow-lifecycle.md`):
//!
//! - [`FlowChanges`]: what a sync changed that flows already tracked must
//!   follow, read from the writes it applied (so nothing is diffed twice):
//!   backends deleted or no longer serving, frontends deleted;
//! - [`reap`]: one walk of the conntrack map for such changes: the UDP
//!   entries of those backends are deleted at once, and every entry of a
//!   deleted frontend is marked dead (the datapath drops both directions);
//! - [`collect`]: one collector pass: expired flows are deleted with their
//!   companions, then orphans and dead flows past the close timeout, using
//!   the shared expiry and companion rules of `service_common::conntrack`.
//!
//! Both work on a [`ConntrackTable`], so they are tested without a kernel.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use service_common::{
    BACKEND_STATE_NOT_SERVING, BackendId, CT_FLAG_DEAD, ConntrackKey, ConntrackTimeouts,
    ConntrackValue, DatapathConfig, FAMILY_IPV6, MapAddr, PROTO_UDP, RevNatId, RevNatValue,
    is_companion, map_addr_v4, master_key, snat_key,
};

use crate::datapath::{
    conntrack::{ConntrackTable, SCAN_BATCH, ScanCursor},
    model::MapOp,
};

/// The changes of one or more syncs that existing conntrack entries must
/// follow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowChanges {
    /// Backends deleted from the backends map: every flow naming them is
    /// re-balanced by the datapath; their UDP entries are deleted at once.
    pub backends_deleted: BTreeSet<BackendId>,
    /// Backends now `NOT_SERVING`: their UDP entries are deleted at once
    /// (TCP flows drain).
    pub backends_not_serving: BTreeSet<BackendId>,
    /// Backends that left a frontend that stays, as (frontend's rev-NAT
    /// id, backend) while another Service keeps the backend (a selector or
    /// a port changed: a blue/green switch with a Service over both):
    /// the UDP entries of that frontend to that backend are deleted at
    /// once, as for a backend deleted (TCP flows go on, as with
    /// kube-proxy).
    pub backends_left: BTreeSet<(RevNatId, BackendId)>,
    /// Rev-NAT ids whose frontend was deleted: every entry naming them is
    /// marked dead, and the id is handed out again only once no entry
    /// names it.
    pub rev_nat_ids_released: BTreeSet<RevNatId>,
    /// Released rev-NAT ids whose flows go on under another frontend's id
    /// instead of dying: an in-cluster twin (`SCOPE_INTERNAL`) deleted
    /// while the frontend it doubled stays (`externalTrafficPolicy` from
    /// Local to Cluster), whose pods' flows that frontend serves alike.
    /// Only ids also in `rev_nat_ids_released` (their deletion applied)
    /// count.
    pub rev_nat_ids_moved: BTreeMap<RevNatId, RevNatId>,
}

impl FlowChanges {
    /// Records what the applied write `op` means for existing flows.
    pub fn record(&mut self, op: &MapOp) {
        match op {
            MapOp::DeleteBackend(id) => {
                self.backends_deleted.insert(*id);
            }
            MapOp::UpsertBackend(id, value) if value.state == BACKEND_STATE_NOT_SERVING => {
                self.backends_not_serving.insert(*id);
            }
            MapOp::DeleteRevNat(id) => {
                self.rev_nat_ids_released.insert(*id);
            }
            _ => {}
        }
    }

    /// Adds `other`'s changes.
    pub fn merge(&mut self, other: FlowChanges) {
        self.backends_deleted.extend(other.backends_deleted);
        self.backends_not_serving.extend(other.backends_not_serving);
        self.backends_left.extend(other.backends_left);
        self.rev_nat_ids_released.extend(other.rev_nat_ids_released);
        self.rev_nat_ids_moved.extend(other.rev_nat_ids_moved);
    }

    /// Whether nothing changed for existing flows.
    pub fn is_empty(&self) -> bool {
        !self.reaps_any_udp() && self.rev_nat_ids_released.is_empty()
    }

    /// Whether some UDP flows are to be deleted.
    pub fn reaps_any_udp(&self) -> bool {
        !(self.backends_deleted.is_empty()
            && self.backends_not_serving.is_empty()
            && self.backends_left.is_empty())
    }

    /// The id that the flows of released rev-NAT id `id` now name, if they
    /// go on (see `rev_nat_ids_moved`).
    fn moved_to(&self, id: RevNatId) -> Option<RevNatId> {
        self.rev_nat_ids_moved
            .get(&id)
            .copied()
            .filter(|_| self.rev_nat_ids_released.contains(&id))
    }

    /// Whether UDP flows of frontend `rev_nat_id` to backend `id` are to be
    /// deleted: the backend was deleted, stopped serving, or left that
    /// frontend.
    pub fn reaps_udp_of(&self, rev_nat_id: RevNatId, id: BackendId) -> bool {
        self.backends_deleted.contains(&id)
            || self.backends_not_serving.contains(&id)
            || self.backends_left.contains(&(rev_nat_id, id))
    }
}

/// Why an entry was deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeleteReason {
    /// Its flow was idle past its timeout (the master and its companions).
    Expired,
    /// Its flow's frontend was deleted, and the close timeout has passed
    /// since it was marked dead.
    Dead,
    /// Its flow is gone or moved on (its master is absent, or names other
    /// companions: a re-balanced flow's old reply entry, the SNAT port a
    /// reopened tuple let go of), and it was idle past its timeout or the
    /// close timeout, whichever is shorter.
    Orphan,
    /// A UDP entry of a backend deleted, no longer serving, or gone from
    /// the entry's frontend, deleted at once.
    Reaped,
}

impl DeleteReason {
    /// Every reason.
    pub const ALL: [DeleteReason; 4] = [
        DeleteReason::Expired,
        DeleteReason::Dead,
        DeleteReason::Orphan,
        DeleteReason::Reaped,
    ];

    /// The reason's name in the metrics and the log.
    pub const fn name(self) -> &'static str {
        match self {
            DeleteReason::Expired => "expired",
            DeleteReason::Dead => "dead",
            DeleteReason::Orphan => "orphan",
            DeleteReason::Reaped => "reaped",
        }
    }

    /// The reason an entry goes with its expired master holding `master`.
    fn of_master(master: &ConntrackValue) -> Self {
        if master.is_dead() {
            DeleteReason::Dead
        } else {
            DeleteReason::Expired
        }
    }
}

/// What the collector needs to judge entries: the timeouts the datapath
/// honours, and this node's SNAT addresses, one per family (part of
/// SNATed flows' keys: used for a flow whose SNAT entry, which holds the
/// address the flow was given, is gone).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowRules {
    /// The conntrack timeouts (as written to the datapath's configuration).
    pub timeouts: ConntrackTimeouts,
    /// This node's IPv4 SNAT address (a [`MapAddr`] of an IPv4 address),
    /// network byte order (zero: none).
    pub snat_v4: MapAddr,
    /// This node's IPv6 SNAT address, network byte order (zero: none).
    pub snat_v6: MapAddr,
}

impl FlowRules {
    /// The rules of the datapath configured with `config`: its timeouts
    /// and SNAT addresses.
    pub fn of(config: &DatapathConfig) -> Self {
        FlowRules {
            timeouts: config.timeouts,
            snat_v4: map_addr_v4(config.snat_v4),
            snat_v6: config.snat_v6,
        }
    }

    /// This node's SNAT address for flows of `family` (`FAMILY_IPV4`,
    /// `FAMILY_IPV6`).
    pub fn snat_addr(&self, family: u8) -> &MapAddr {
        if family == FAMILY_IPV6 {
            &self.snat_v6
        } else {
            &self.snat_v4
        }
    }

    /// The address the flow of master `key` (holding `value`) was SNATed
    /// to, which its SNAT reply entry is keyed by: what its SNAT entry
    /// holds (the address the datapath used, which stays right after the
    /// node's address changed), else this node's SNAT address of the
    /// flow's family.
    fn snat_addr_of(
        &self,
        table: &impl ConntrackTable,
        key: &ConntrackKey,
        value: &ConntrackValue,
    ) -> MapAddr {
        snat_key(key, value)
            .and_then(|snat| table.get(&snat))
            .map_or(*self.snat_addr(key.family), |entry| entry.nat_addr)
    }

    /// Whether the non-master entry `value` of `proto` has been idle long
    /// enough at `now` to be judged an orphan: past its own timeout, or past
    /// the close timeout if that is shorter. An entry its flow no longer
    /// names can keep a long timeout of its own (a TCP SNAT reply entry
    /// that saw the handshake is "established" for a day) and would hold
    /// its SNAT port that long; the idle time guards an entry the datapath
    /// has just written before its master (within the same second).
    fn may_be_orphan(&self, proto: u8, value: &ConntrackValue, now: u32) -> bool {
        self.timeouts.is_expired(proto, value, now)
            || value.idle_longer_than(self.timeouts.close(), now)
    }
}

/// What one walk of the conntrack map found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalkReport {
    /// Entries read.
    pub scanned: u64,
    /// Entries deleted, by reason (companions deleted with their master
    /// included, whether read or not).
    pub deleted: BTreeMap<DeleteReason, u64>,
    /// Entries read and left in the map: its occupancy, as far as the walk
    /// could tell (flows created during the walk are not all seen).
    pub remaining: u64,
    /// Entries marked dead.
    pub marked_dead: u64,
    /// Entries given another frontend's rev-NAT id (their flows go on).
    pub moved: u64,
    /// Rev-NAT ids named by the entries left.
    pub rev_nat_ids_named: BTreeSet<RevNatId>,
    /// Rev-NAT ids whose entries were marked dead in this walk.
    pub rev_nat_ids_marked_dead: BTreeSet<RevNatId>,
}

impl WalkReport {
    /// Entries deleted, for every reason.
    pub fn deleted_total(&self) -> u64 {
        self.deleted.values().sum()
    }
}

/// Keys to delete, collected over one batch so they go in one call.
#[derive(Default)]
struct Deletions {
    keys: Vec<ConntrackKey>,
    seen: HashSet<ConntrackKey>,
}

impl Deletions {
    /// Adds `key` (once), counted under `reason`.
    fn add(&mut self, key: ConntrackKey, reason: DeleteReason, report: &mut WalkReport) {
        if self.seen.insert(key) {
            self.keys.push(key);
            *report.deleted.entry(reason).or_default() += 1;
        }
    }

    /// Whether `key` is already to be deleted.
    fn contains(&self, key: &ConntrackKey) -> bool {
        self.seen.contains(key)
    }

    /// Deletes the collected keys.
    fn flush(&mut self, table: &mut impl ConntrackTable) -> std::io::Result<()> {
        table.delete(&self.keys)?;
        self.keys.clear();
        self.seen.clear();
        Ok(())
    }
}

/// Walks the whole table, batch by batch, handing each entry to `visit`
/// with the deletions of its batch; a batch's deletions go in one call
/// before the next batch is read.
fn walk<T: ConntrackTable>(
    table: &mut T,
    report: &mut WalkReport,
    mut visit: impl FnMut(&mut T, &ConntrackKey, &ConntrackValue, &mut Deletions, &mut WalkReport),
) -> std::io::Result<()> {
    let mut cursor = ScanCursor::default();
    let mut batch = Vec::with_capacity(SCAN_BATCH);
    let mut deletions = Deletions::default();
    loop {
        let more = table.next_batch(&mut cursor, &mut batch)?;
        for (key, value) in &batch {
            report.scanned += 1;
            if !deletions.contains(key) {
                visit(table, key, value, &mut deletions, report);
            }
        }
        deletions.flush(table)?;
        if !more {
            return Ok(());
        }
    }
}

/// Marks the entry of `key` dead at `now` (its close timeout runs from
/// then), read again first so a flow that changed since it was read is
/// only marked if `still` holds for it. Whether it was marked.
fn mark_dead(
    table: &mut impl ConntrackTable,
    key: &ConntrackKey,
    now: u32,
    still: impl Fn(&ConntrackValue) -> bool,
) -> bool {
    let Some(mut value) = table.get(key) else {
        return false;
    };
    if value.is_dead() || !still(&value) {
        return false;
    }
    value.flags |= CT_FLAG_DEAD;
    value.last_seen = now;
    table.replace(key, &value)
}

/// Gives the entry of `key` the rev-NAT id `to` instead of `from` (read
/// again first, so only if it still names `from`), alive: a collector pass
/// that saw `from` gone before this walk may have marked it dead. Whether
/// it did.
fn move_rev_nat_id(
    table: &mut impl ConntrackTable,
    key: &ConntrackKey,
    from: RevNatId,
    to: RevNatId,
) -> bool {
    let Some(mut value) = table.get(key) else {
        return false;
    };
    if value.rev_nat_id != from {
        return false;
    }
    value.rev_nat_id = to;
    value.flags &= !CT_FLAG_DEAD;
    table.replace(key, &value)
}

/// One walk for the changes of the syncs since the last one: every entry
/// naming a released rev-NAT id is marked dead at `now`, unless its flows
/// moved to another frontend's id (`FlowChanges::rev_nat_ids_moved`), which
/// the entry then names; every other UDP entry naming a deleted or
/// not-serving backend, or a backend that left the entry's frontend
/// (`FlowChanges::backends_left`), is deleted (its flow's next datagram
/// picks a live backend of its frontend).
pub fn reap(
    table: &mut impl ConntrackTable,
    changes: &FlowChanges,
    now: u32,
) -> std::io::Result<WalkReport> {
    let mut report = WalkReport::default();
    if changes.is_empty() {
        return Ok(report);
    }
    let released = &changes.rev_nat_ids_released;
    walk(
        table,
        &mut report,
        |table, key, value, deletions, report| {
            let mut rev_nat_id = value.rev_nat_id;
            if let Some(to) = changes.moved_to(rev_nat_id) {
                if move_rev_nat_id(table, key, rev_nat_id, to) {
                    report.moved += 1;
                    rev_nat_id = to;
                }
            } else if released.contains(&value.rev_nat_id) {
                if mark_dead(table, key, now, |v| released.contains(&v.rev_nat_id)) {
                    report.marked_dead += 1;
                    report.rev_nat_ids_marked_dead.insert(value.rev_nat_id);
                }
            } else if key.proto == PROTO_UDP && changes.reaps_udp_of(rev_nat_id, value.backend_id) {
                deletions.add(*key, DeleteReason::Reaped, report);
                return;
            }
            report.remaining += 1;
            report.rev_nat_ids_named.insert(rev_nat_id);
        },
    )?;
    Ok(report)
}

/// One collector pass at `now`: deletes every expired master with its
/// companions (a dead one past the close timeout), and every other entry
/// whose master is absent, expired or names other companions once it is
/// idle past its timeout or the close timeout (orphans).
/// Entries still naming a frontend that no longer exists (their frontend
/// went while no agent ran) are marked dead, as a reap would have.
pub fn collect(
    table: &mut impl ConntrackTable,
    rules: &FlowRules,
    now: u32,
) -> std::io::Result<WalkReport> {
    let frontends = table.frontends()?;
    let mut report = WalkReport::default();
    let mut without_frontend: Vec<(ConntrackKey, RevNatId)> = Vec::new();
    walk(
        table,
        &mut report,
        |table, key, value, deletions, report| {
            if key.is_master() {
                if rules.timeouts.is_expired(key.proto, value, now) {
                    delete_flow(table, rules, &frontends, key, value, deletions, report);
                    return;
                }
            } else if rules.may_be_orphan(key.proto, value, now) {
                match judge_companion(table, rules, &frontends, key, value, now) {
                    Companion::Kept => {}
                    Companion::Orphan => {
                        deletions.add(*key, DeleteReason::Orphan, report);
                        return;
                    }
                    // The whole flow at once: its other entries need no
                    // lookup of the master again when they are read.
                    Companion::OfExpired(master, master_value) => {
                        delete_flow(
                            table,
                            rules,
                            &frontends,
                            &master,
                            &master_value,
                            deletions,
                            report,
                        );
                        return;
                    }
                }
            }
            report.remaining += 1;
            report.rev_nat_ids_named.insert(value.rev_nat_id);
            if !value.is_dead() && !frontends.contains_key(&value.rev_nat_id) {
                without_frontend.push((*key, value.rev_nat_id));
            }
        },
    )?;
    if !without_frontend.is_empty() {
        // Read after the walk: a frontend created during it is not taken
        // for a deleted one.
        let frontends = table.frontends()?;
        for (key, id) in without_frontend {
            if !frontends.contains_key(&id) && mark_dead(table, &key, now, |v| v.rev_nat_id == id) {
                report.marked_dead += 1;
                report.rev_nat_ids_marked_dead.insert(id);
            }
        }
    }
    Ok(report)
}

/// Deletes the expired master `key` with those of its companions that
/// still belong to it.
fn delete_flow(
    table: &impl ConntrackTable,
    rules: &FlowRules,
    frontends: &BTreeMap<RevNatId, RevNatValue>,
    key: &ConntrackKey,
    value: &ConntrackValue,
    deletions: &mut Deletions,
    report: &mut WalkReport,
) {
    let reason = DeleteReason::of_master(value);
    deletions.add(*key, reason, report);
    let snat_addr = rules.snat_addr_of(table, key, value);
    for companion in service_common::companion_keys(key, value, &snat_addr)
        .into_iter()
        .flatten()
    {
        // Only if it is this flow's: another flow may have taken its key.
        let belongs = table.get(&companion).is_some_and(|companion_value| {
            master_key(
                &companion,
                &companion_value,
                frontends.get(&companion_value.rev_nat_id),
            ) == Some(*key)
        });
        if belongs {
            deletions.add(companion, reason, report);
        }
    }
}

/// What an idle non-master entry is.
enum Companion {
    /// Its master lives and still names it.
    Kept,
    /// Its master is absent or names other companions.
    Orphan,
    /// Its master (key and value) names it and has expired.
    OfExpired(ConntrackKey, ConntrackValue),
}

/// Judges the idle non-master entry `key` by its master.
fn judge_companion(
    table: &impl ConntrackTable,
    rules: &FlowRules,
    frontends: &BTreeMap<RevNatId, RevNatValue>,
    key: &ConntrackKey,
    value: &ConntrackValue,
    now: u32,
) -> Companion {
    let Some(master) = master_key(key, value, frontends.get(&value.rev_nat_id)) else {
        return Companion::Orphan;
    };
    match table.get(&master) {
        Some(master_value)
            if is_companion(
                key,
                &master,
                &master_value,
                &rules.snat_addr_of(table, &master, &master_value),
            ) =>
        {
            if rules.timeouts.is_expired(master.proto, &master_value, now) {
                Companion::OfExpired(master, master_value)
            } else {
                Companion::Kept
            }
        }
        _ => Companion::Orphan,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::conntrack::MemoryConntrack;
    use service_common::{
        BACKEND_STATE_ACTIVE, BACKEND_STATE_TERMINATING, BackendValue, CT_DIR_FORWARD,
        CT_FLAG_SNAT, CT_STATE_FIN_FORWARD, CT_STATE_FIN_REPLY, CT_STATE_SEEN_REPLY, FAMILY_IPV4,
        FrontendKey, FrontendValue, PROTO_TCP, reply_key, snat_key, snat_reply_key,
    };

    const SNAT: [u8; 4] = [10, 0, 0, 1];
    /// The node's IPv6 SNAT address, fd00::10:0:0:1.
    const SNAT6: MapAddr = v6_of(SNAT);

    /// The IPv6 address the IPv6 flows use for the IPv4 one `v4`:
    /// `fd00::a.b.c.d`.
    const fn v6_of(v4: [u8; 4]) -> MapAddr {
        let [a, b, c, d] = v4;
        [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, a, b, c, d]
    }
    /// Short timeouts, as a test agent would run with.
    const TIMEOUTS: ConntrackTimeouts = ConntrackTimeouts {
        tcp_syn: 5,
        tcp_established: 100,
        tcp_fin: 20,
        tcp_close: 3,
        udp: 10,
        udp_stream: 30,
    };
    const RULES: FlowRules = FlowRules {
        timeouts: TIMEOUTS,
        snat_v4: map_addr_v4(SNAT),
        snat_v6: SNAT6,
    };

    /// One flow as the datapath writes it.
    #[derive(Clone, Copy)]
    struct Flow {
        /// `FAMILY_IPV4` or `FAMILY_IPV6` (every address below as
        /// [`v6_of`] it).
        family: u8,
        proto: u8,
        client_port: u16,
        /// Frontend: rev-NAT id; address 10.96.0.<id>, port 80.
        rev_nat_id: RevNatId,
        /// Backend: id; address 10.200.0.<id>, port 8080.
        backend_id: BackendId,
        /// SNAT port, if SNATed.
        snat_port: Option<u16>,
        state: u8,
        last_seen: u32,
    }

    impl Flow {
        fn udp(client_port: u16, backend_id: BackendId) -> Self {
            Flow {
                family: FAMILY_IPV4,
                proto: PROTO_UDP,
                client_port,
                rev_nat_id: 1,
                backend_id,
                snat_port: None,
                state: CT_STATE_SEEN_REPLY,
                last_seen: 1000,
            }
        }

        fn tcp(client_port: u16, backend_id: BackendId) -> Self {
            Flow {
                proto: PROTO_TCP,
                ..Self::udp(client_port, backend_id)
            }
        }

        /// The same flow over IPv6, to the IPv6 frontend with rev-NAT id
        /// 10 above (a frontend has one family).
        fn v6(self) -> Self {
            Flow {
                family: FAMILY_IPV6,
                rev_nat_id: self.rev_nat_id + 10,
                ..self
            }
        }

        /// The address of the flow's family for the IPv4 one `v4`.
        fn addr(&self, v4: [u8; 4]) -> MapAddr {
            if self.family == FAMILY_IPV6 {
                v6_of(v4)
            } else {
                map_addr_v4(v4)
            }
        }

        fn frontend(&self) -> RevNatValue {
            RevNatValue {
                addr: self.addr([10, 96, 0, self.rev_nat_id as u8]),
                port: 80u16.to_be(),
                family: self.family,
                _pad: 0,
            }
        }

        fn master(&self) -> (ConntrackKey, ConntrackValue) {
            let frontend = self.frontend();
            let key = ConntrackKey::new(
                self.addr([10, 1, 0, 2]),
                self.client_port.to_be(),
                frontend.addr,
                frontend.port,
                self.family,
                self.proto,
                CT_DIR_FORWARD,
            );
            // Created long before: a replied UDP flow is a stream.
            let mut value = ConntrackValue::new(
                self.addr([10, 200, 0, self.backend_id as u8]),
                8080u16.to_be(),
                self.backend_id,
                self.rev_nat_id,
                self.last_seen - 10,
            );
            value.last_seen = self.last_seen;
            value.state = self.state;
            if let Some(port) = self.snat_port {
                value = value.with_flags(CT_FLAG_SNAT).with_snat_port(port.to_be());
            }
            (key, value)
        }

        /// Every entry of the flow, the master first.
        fn entries(&self) -> Vec<(ConntrackKey, ConntrackValue)> {
            let (key, value) = self.master();
            let entry = |nat_addr, nat_port| ConntrackValue {
                nat_addr,
                nat_port,
                snat_port: 0,
                ..value
            };
            let mut entries = vec![
                (key, value),
                (reply_key(&key, &value), entry(key.daddr, key.dport)),
            ];
            if let Some(port) = self.snat_port {
                let snat = self.addr(SNAT);
                entries.push((snat_key(&key, &value).unwrap(), entry(snat, port.to_be())));
                entries.push((
                    snat_reply_key(&key, &value, &snat).unwrap(),
                    entry(key.saddr, key.sport),
                ));
            }
            entries
        }

        fn keys(&self) -> Vec<ConntrackKey> {
            self.entries().into_iter().map(|(k, _)| k).collect()
        }
    }

    /// A table (read three entries at a time, so flows straddle batches)
    /// holding `flows`, with their frontends.
    fn table(flows: &[Flow]) -> MemoryConntrack {
        let mut table = MemoryConntrack::new(1000, 3);
        for flow in flows {
            table.entries.extend(flow.entries());
            table.frontends.insert(flow.rev_nat_id, flow.frontend());
        }
        table
    }

    fn present(table: &MemoryConntrack, flow: &Flow) -> Vec<bool> {
        flow.keys()
            .iter()
            .map(|k| table.entries.contains_key(k))
            .collect()
    }

    fn deleted(report: &WalkReport, reason: DeleteReason) -> u64 {
        report.deleted.get(&reason).copied().unwrap_or(0)
    }

    #[test]
    fn an_expired_flow_goes_with_every_companion_and_a_live_one_stays() {
        let idle = Flow {
            snat_port: Some(20001),
            ..Flow::udp(40000, 1)
        };
        let live = Flow {
            last_seen: 1025,
            snat_port: Some(20002),
            ..Flow::udp(40001, 1)
        };
        // A TCP flow: established (100 s) while it is 31 s idle, closed
        // (3 s) once both sides sent a FIN.
        let established = Flow::tcp(40002, 2);
        let closed = Flow {
            state: CT_STATE_SEEN_REPLY | CT_STATE_FIN_FORWARD | CT_STATE_FIN_REPLY,
            ..Flow::tcp(40003, 2)
        };
        let mut table = table(&[idle, live, established, closed]);
        // At 1031 the idle UDP stream (30 s) and the closed flow are expired.
        let report = collect(&mut table, &RULES, 1031).unwrap();
        assert_eq!(present(&table, &idle), [false; 4]);
        assert_eq!(present(&table, &closed), [false; 2]);
        assert_eq!(present(&table, &live), [true; 4]);
        assert_eq!(present(&table, &established), [true; 2]);
        assert_eq!(deleted(&report, DeleteReason::Expired), 6);
        assert_eq!(report.deleted_total(), 6);
        assert_eq!(report.remaining, 6);
        assert_eq!(report.rev_nat_ids_named, BTreeSet::from([1]));
        // Nothing left to do.
        assert_eq!(
            collect(&mut table, &RULES, 1031).unwrap().deleted_total(),
            0
        );
    }

    #[test]
    fn ipv6_snated_flows_free_their_snat_ports_like_ipv4_ones_and_live_ones_keep_them() {
        // The rules as the agent makes them from the datapath's
        // configuration: an SNAT address per family.
        let rules = FlowRules::of(&DatapathConfig {
            snat_v4: SNAT,
            snat_v6: SNAT6,
            timeouts: TIMEOUTS,
            ..DatapathConfig::default()
        });
        assert_eq!(rules, RULES);
        let idle4 = Flow {
            snat_port: Some(20001),
            ..Flow::udp(40000, 1)
        };
        let idle6 = idle4.v6();
        let live6 = Flow {
            last_seen: 1025,
            snat_port: Some(20002),
            ..Flow::tcp(40001, 1)
        }
        .v6();
        let mut table = table(&[idle4, idle6, live6]);
        // The IPv6 flow's SNAT entry was evicted from the LRU map: its
        // SNAT reply entry is found by the node's IPv6 SNAT address.
        let (key, value) = idle6.master();
        table.entries.remove(&snat_key(&key, &value).unwrap());
        // At 1031 both idle UDP streams (30 s) are expired: each goes with
        // its reply, SNAT and SNAT reply entries (its SNAT port is free).
        let report = collect(&mut table, &rules, 1031).unwrap();
        assert_eq!(present(&table, &idle4), [false; 4]);
        assert_eq!(present(&table, &idle6), [false; 4]);
        assert_eq!(present(&table, &live6), [true; 4]);
        assert_eq!(deleted(&report, DeleteReason::Expired), 7);
        assert_eq!(report.deleted_total(), 7);
        assert_eq!(report.remaining, 4);

        // A live IPv6 flow whose other entries sit idle past the close
        // timeout (only the client sends): its SNAT entries are its
        // companions, no orphans, and stay with it.
        let (key, mut value) = live6.master();
        value.last_seen = 1040;
        table.entries.insert(key, value);
        let report = collect(&mut table, &rules, 1045).unwrap();
        assert_eq!(report.deleted_total(), 0, "{report:?}");
        assert_eq!(present(&table, &live6), [true; 4]);

        // Once it expires, its SNAT port goes with it.
        let report = collect(&mut table, &rules, 1040 + 101).unwrap();
        assert_eq!(present(&table, &live6), [false; 4]);
        assert_eq!(deleted(&report, DeleteReason::Expired), 4);
    }

    #[test]
    fn flows_snated_to_the_node_s_former_address_keep_and_free_their_snat_entries() {
        // The node's SNAT addresses changed (detected anew) since these
        // flows were SNATed: their SNAT entries name the old ones.
        let rules = FlowRules {
            snat_v4: map_addr_v4([10, 0, 0, 99]),
            snat_v6: v6_of([10, 0, 0, 99]),
            ..RULES
        };
        let live = |flow: Flow| Flow {
            last_seen: 1040,
            snat_port: Some(20003),
            ..flow
        };
        let (live4, live6) = (live(Flow::tcp(40003, 1)), live(Flow::tcp(40003, 1)).v6());
        let idle = |flow: Flow| Flow {
            snat_port: Some(20004),
            ..flow
        };
        let (idle4, idle6) = (idle(Flow::udp(40004, 1)), idle(Flow::udp(40004, 1)).v6());
        let mut table = table(&[live4, live6, idle4, idle6]);
        // Only the clients of the live flows send: their other entries sit
        // idle past the close timeout, still their flows' companions.
        for flow in [live4, live6] {
            let (key, mut value) = flow.master();
            value.last_seen = 1045;
            table.entries.insert(key, value);
        }
        let report = collect(&mut table, &rules, 1050).unwrap();
        assert_eq!(present(&table, &live4), [true; 4]);
        assert_eq!(present(&table, &live6), [true; 4]);
        // The idle ones expired, every entry with them.
        assert_eq!(present(&table, &idle4), [false; 4]);
        assert_eq!(present(&table, &idle6), [false; 4]);
        assert_eq!(deleted(&report, DeleteReason::Expired), 8);
        assert_eq!(report.deleted_total(), 8);
    }

    #[test]
    fn a_reply_entry_left_idle_by_a_one_way_flow_stays_while_its_master_lives() {
        let flow = Flow::udp(40000, 1);
        let mut table = table(&[flow]);
        // Only the master hears from the client.
        let (key, mut value) = flow.master();
        value.last_seen = 1040;
        table.entries.insert(key, value);
        let report = collect(&mut table, &RULES, 1045).unwrap();
        assert_eq!(report.deleted_total(), 0);
        assert_eq!(present(&table, &flow), [true; 2]);
    }

    #[test]
    fn expired_entries_whose_flow_is_gone_or_moved_on_are_orphans() {
        // A flow re-balanced from backend 1 to backend 2: its old reply
        // entry is no companion of the master any more.
        let before = Flow::udp(40000, 1);
        let after = Flow {
            last_seen: 1100,
            ..Flow::udp(40000, 2)
        };
        // An SNATed flow whose master is gone (LRU eviction), and one whose
        // frontend is gone too (no way back to a master).
        let masterless = Flow {
            snat_port: Some(20001),
            ..Flow::udp(40001, 1)
        };
        let frontendless = Flow {
            rev_nat_id: 7,
            snat_port: Some(20002),
            ..Flow::udp(40002, 1)
        };
        let mut table = table(&[before, masterless, frontendless]);
        table.entries.extend(after.entries());
        table.entries.remove(&masterless.master().0);
        table.entries.remove(&frontendless.master().0);
        table.frontends.remove(&7);
        // Idle no longer than the close timeout (3 s): all kept (the
        // frontendless ones marked dead).
        assert_eq!(
            collect(&mut table, &RULES, 1003).unwrap().deleted_total(),
            0
        );
        let report = collect(&mut table, &RULES, 1031).unwrap();
        assert_eq!(deleted(&report, DeleteReason::Orphan), 1 + 3 + 3);
        assert_eq!(report.deleted_total(), 7);
        assert_eq!(present(&table, &after), [true; 2]);
        assert_eq!(table.entries.len(), 2);
    }

    #[test]
    fn an_snat_port_a_reopened_tuple_let_go_of_is_freed_after_the_close_timeout() {
        // A TCP flow whose handshake went through SNAT port 20001 (its SNAT
        // reply entry saw a reply: "established", a day's timeout) ...
        let first = Flow {
            snat_port: Some(20001),
            ..Flow::tcp(40000, 1)
        };
        // ... then the client reused its port: a new flow on the same tuple
        // got port 20002 and rewrote the master and the SNAT entry.
        let reopened = Flow {
            snat_port: Some(20002),
            last_seen: 1001,
            ..first
        };
        let mut table = table(&[first]);
        table.entries.extend(reopened.entries());
        let leaked = first.keys()[3];
        assert!(table.entries.contains_key(&leaked));
        // Idle for the close timeout (3 s) or less: kept.
        assert_eq!(
            collect(&mut table, &RULES, 1003).unwrap().deleted_total(),
            0
        );
        let report = collect(&mut table, &RULES, 1004).unwrap();
        assert_eq!(deleted(&report, DeleteReason::Orphan), 1);
        assert!(!table.entries.contains_key(&leaked));
        assert_eq!(present(&table, &reopened), [true; 4]);
    }

    #[test]
    fn a_companion_another_flow_took_over_is_not_deleted_with_the_master() {
        let flow = Flow::udp(40000, 1);
        let mut table = table(&[flow]);
        // A live flow to another frontend (rev-NAT 2) from the same client
        // port to the same backend wrote the same reply key.
        let other = Flow {
            rev_nat_id: 2,
            last_seen: 1100,
            ..flow
        };
        table.entries.extend(other.entries());
        table.frontends.insert(2, other.frontend());
        let report = collect(&mut table, &RULES, 1031).unwrap();
        assert_eq!(report.deleted_total(), 1);
        assert!(!table.entries.contains_key(&flow.master().0));
        assert_eq!(present(&table, &other), [true; 2]);
    }

    #[test]
    fn a_deleted_frontend_s_flows_are_marked_dead_and_go_after_the_close_timeout() {
        let udp = Flow {
            snat_port: Some(20001),
            ..Flow::udp(40000, 1)
        };
        let tcp = Flow::tcp(40001, 2);
        let other = Flow {
            rev_nat_id: 2,
            ..Flow::tcp(40002, 2)
        };
        let mut table = table(&[udp, tcp, other]);
        let changes = FlowChanges {
            rev_nat_ids_released: BTreeSet::from([1]),
            ..FlowChanges::default()
        };
        let report = reap(&mut table, &changes, 1010).unwrap();
        assert_eq!(report.marked_dead, 6);
        assert_eq!(report.rev_nat_ids_marked_dead, BTreeSet::from([1]));
        assert_eq!(report.deleted_total(), 0);
        for (key, value) in &table.entries {
            let named = value.rev_nat_id == 1;
            assert_eq!(value.is_dead(), named, "{key:?}");
            if named {
                assert_eq!(
                    value.last_seen, 1010,
                    "the close timeout runs from the marking"
                );
            }
        }
        // Within the close timeout (3 s) they stay, to drop both directions.
        assert_eq!(
            collect(&mut table, &RULES, 1013).unwrap().deleted_total(),
            0
        );
        let report = collect(&mut table, &RULES, 1014).unwrap();
        assert_eq!(deleted(&report, DeleteReason::Dead), 6);
        assert_eq!(report.rev_nat_ids_named, BTreeSet::from([2]));
        assert_eq!(present(&table, &other), [true; 2]);
    }

    #[test]
    fn flows_of_a_deleted_in_cluster_twin_go_on_under_the_frontend_it_doubled() {
        let twin = Flow::tcp(40000, 1);
        let twin_udp = Flow::udp(40001, 1);
        let other = Flow {
            rev_nat_id: 2,
            ..Flow::tcp(40002, 2)
        };
        let mut table = table(&[twin, twin_udp, other]);
        // A collector pass saw the twin gone first and marked one entry.
        let early = twin.master().0;
        table.entries.get_mut(&early).unwrap().flags |= CT_FLAG_DEAD;
        let changes = FlowChanges {
            rev_nat_ids_released: BTreeSet::from([1]),
            rev_nat_ids_moved: BTreeMap::from([(1, 7)]),
            ..FlowChanges::default()
        };
        let report = reap(&mut table, &changes, 1010).unwrap();
        assert_eq!(report.marked_dead, 0);
        assert_eq!(report.moved, 4);
        assert_eq!(report.rev_nat_ids_named, BTreeSet::from([2, 7]));
        for (key, value) in &table.entries {
            assert!(!value.is_dead(), "{key:?}");
            assert_ne!(value.rev_nat_id, 1, "{key:?}");
        }
        // A move whose deletion was not applied changes nothing.
        let mut table = self::table(&[twin]);
        let unapplied = FlowChanges {
            rev_nat_ids_moved: BTreeMap::from([(1, 7)]),
            backends_deleted: BTreeSet::from([9]),
            ..FlowChanges::default()
        };
        let report = reap(&mut table, &unapplied, 1010).unwrap();
        assert_eq!(report.moved, 0);
        assert!(table.entries.values().all(|v| v.rev_nat_id == 1));
    }

    #[test]
    fn udp_flows_of_backends_gone_or_not_serving_are_reaped_and_tcp_flows_drain() {
        let gone = Flow {
            snat_port: Some(20001),
            ..Flow::udp(40000, 1)
        };
        let not_serving = Flow::udp(40001, 2);
        let staying = Flow::udp(40002, 3);
        let tcp = Flow::tcp(40003, 1);
        let mut table = table(&[gone, not_serving, staying, tcp]);
        let changes = FlowChanges {
            backends_deleted: BTreeSet::from([1]),
            backends_not_serving: BTreeSet::from([2]),
            ..FlowChanges::default()
        };
        let report = reap(&mut table, &changes, 1001).unwrap();
        assert_eq!(deleted(&report, DeleteReason::Reaped), 6);
        assert_eq!(report.marked_dead, 0);
        assert_eq!(present(&table, &gone), [false; 4]);
        assert_eq!(present(&table, &not_serving), [false; 2]);
        assert_eq!(present(&table, &staying), [true; 2]);
        assert_eq!(present(&table, &tcp), [true; 2]);
        assert_eq!(report.remaining, 4);
    }

    #[test]
    fn udp_flows_of_a_backend_that_left_one_frontend_are_reaped_there_only() {
        // Backend 1 left frontend 1 (a selector changed) and stays behind
        // frontend 2: frontend 1's UDP flows to it go, the rest stay.
        let left = Flow {
            snat_port: Some(20001),
            ..Flow::udp(40000, 1)
        };
        let other_frontend = Flow {
            rev_nat_id: 2,
            ..Flow::udp(40001, 1)
        };
        let other_backend = Flow::udp(40002, 3);
        let tcp = Flow::tcp(40003, 1);
        let mut table = table(&[left, other_frontend, other_backend, tcp]);
        table.frontends.insert(2, other_frontend.frontend());
        let changes = FlowChanges {
            backends_left: BTreeSet::from([(1, 1)]),
            ..FlowChanges::default()
        };
        assert!(!changes.is_empty());
        let report = reap(&mut table, &changes, 1001).unwrap();
        assert_eq!(deleted(&report, DeleteReason::Reaped), 4);
        assert_eq!(present(&table, &left), [false; 4]);
        assert_eq!(present(&table, &other_frontend), [true; 2]);
        assert_eq!(present(&table, &other_backend), [true; 2]);
        assert_eq!(present(&table, &tcp), [true; 2]);
    }

    #[test]
    fn flows_naming_a_frontend_that_no_longer_exists_are_marked_dead_by_a_pass() {
        // The frontend went while no agent ran: no reap marked its flows.
        let orphaned = Flow {
            rev_nat_id: 5,
            ..Flow::tcp(40000, 1)
        };
        let live = Flow::tcp(40001, 1);
        let mut table = table(&[orphaned, live]);
        table.frontends.remove(&5);
        let report = collect(&mut table, &RULES, 1001).unwrap();
        assert_eq!(report.marked_dead, 2);
        assert_eq!(report.rev_nat_ids_marked_dead, BTreeSet::from([5]));
        assert_eq!(report.rev_nat_ids_named, BTreeSet::from([1, 5]));
        assert!(orphaned.keys().iter().all(|k| table.entries[k].is_dead()));
        assert!(live.keys().iter().all(|k| !table.entries[k].is_dead()));
        // Gone after the close timeout; the id is then named by nothing.
        let report = collect(&mut table, &RULES, 1005).unwrap();
        assert_eq!(deleted(&report, DeleteReason::Dead), 2);
        assert_eq!(report.rev_nat_ids_named, BTreeSet::from([1]));
    }

    fn backend(state: u8) -> BackendValue {
        BackendValue {
            state,
            ..BackendValue::default()
        }
    }

    #[test]
    fn deleted_and_not_serving_backends_and_deleted_frontends_are_recorded() {
        let mut changes = FlowChanges::default();
        for op in [
            MapOp::UpsertBackend(1, backend(BACKEND_STATE_ACTIVE)),
            MapOp::UpsertBackend(2, backend(BACKEND_STATE_TERMINATING)),
            MapOp::UpsertBackend(3, backend(BACKEND_STATE_NOT_SERVING)),
            MapOp::DeleteBackend(4),
            MapOp::UpsertRevNat(5, RevNatValue::default()),
            MapOp::DeleteRevNat(6),
            MapOp::UpsertFrontend(FrontendKey::default(), FrontendValue::default()),
            MapOp::DeleteFrontend(FrontendKey::default()),
        ] {
            changes.record(&op);
        }
        assert_eq!(changes.backends_deleted, BTreeSet::from([4]));
        assert_eq!(changes.backends_not_serving, BTreeSet::from([3]));
        assert_eq!(changes.rev_nat_ids_released, BTreeSet::from([6]));
        assert!(changes.reaps_udp_of(9, 3) && changes.reaps_udp_of(9, 4));
        assert!(!changes.reaps_udp_of(9, 1) && !changes.reaps_udp_of(9, 2));
        // A backend that left one frontend: only that frontend's flows.
        changes.backends_left.insert((7, 1));
        assert!(changes.reaps_udp_of(7, 1) && !changes.reaps_udp_of(8, 1));

        let mut merged = FlowChanges::default();
        assert!(merged.is_empty());
        merged.merge(changes.clone());
        merged.merge(FlowChanges {
            backends_deleted: BTreeSet::from([9]),
            ..FlowChanges::default()
        });
        assert_eq!(merged.backends_deleted, BTreeSet::from([4, 9]));
        assert_eq!(merged.rev_nat_ids_released, changes.rev_nat_ids_released);
    }
}
