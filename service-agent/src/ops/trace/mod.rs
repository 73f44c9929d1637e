//! `service-agent trace`: runs one packet through the real programs of the
//! embedded object (BPF_PROG_TEST_RUN) against a snapshot of the live
//! pinned maps ([`crate::datapath::snapshot`]), never the live maps
//! themselves, and reports what the datapath would do with it: the
//! verdict, the frontend it matched, the backend chosen, the packet as it
//! leaves each program, the conntrack entries it creates or touches, and
//! the reverse translation of the backend's reply, run on the state the
//! packet left.

pub mod packet;
pub mod render;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Serialize;
use service_common::{
    BACKEND_FLAG_NODE_LOCAL, CT_DIR_FORWARD, CT_DIR_HAIRPIN_REPLY, CT_DIR_REPLY, CT_DIR_SNAT,
    CT_DIR_SNAT_REPLY, CT_FLAG_DEAD, CT_FLAG_HAIRPIN, CT_FLAG_SNAT, CT_STATE_FIN_FORWARD,
    CT_STATE_FIN_REPLY, CT_STATE_RST, CT_STATE_SEEN_REPLY, ConntrackKey, ConntrackValue,
    PROG_FROM_NETWORK, PROG_FROM_NETWORK_TC, PROG_FROM_POD, PROG_TO_NETWORK, PROG_TO_POD,
    PROTO_TCP, SCOPE_ALL, TCP_FLAG_ACK, TCP_FLAG_SYN, hairpin_addr, mono_seconds,
};

use super::{
    list::{ListedBackend, flag_names, listed_backend},
    status,
};
use crate::datapath::{
    attach::NodePortMode,
    model::{frontend_label, ip_from_map, map_addr},
    snapshot::{PacketTuple, Snapshot},
};
use crate::error::{Context as _, Error};
use packet::{PacketView, describe, tcp_flag_names};

/// Where the traced packet enters the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// From a pod: `from_pod` (TC ingress on the pod's host-side device).
    Pod,
    /// From the network: `from_network` on XDP or on TC ingress.
    Network(NodePortMode),
}

/// What to trace.
#[derive(Clone, Debug)]
pub struct TraceRequest {
    /// The packet's addresses, ports and protocol.
    pub tuple: PacketTuple,
    /// TCP flags (`TCP_FLAG_*` bits; ignored for UDP).
    pub tcp_flags: u8,
    /// Where it enters.
    pub entry: Entry,
    /// Folder of the live pinned maps.
    pub pin_path: PathBuf,
}

/// What `trace` found.
#[derive(Debug, Serialize)]
pub struct Trace {
    /// The packet traced, as it enters.
    pub packet: PacketView,
    /// `from pod` or `from network (XDP)` / `from network (TC)`.
    pub entry: String,
    /// What happened, in one word: `translated`, `untouched`, `dropped`,
    /// `refused` (answered with a TCP RST or ICMP unreachable).
    pub outcome: String,
    /// The frontend the destination matched, if any.
    pub frontend: Option<TracedFrontend>,
    /// The backend the flow goes to, if translated.
    pub backend: Option<TracedBackend>,
    /// The packet through each program it crosses, in order.
    pub stages: Vec<Stage>,
    /// The conntrack entries of the flow after the packet, with what the
    /// packet did to each.
    pub conntrack: Vec<TracedEntry>,
    /// The backend's reply, run through the reverse path.
    pub reply: Option<Reply>,
    /// Datapath event counters the packet and its reply moved (the
    /// snapshot's own, which start at zero).
    pub events: Vec<(String, u64)>,
    /// What the snapshot cannot reproduce exactly, and other remarks.
    pub notes: Vec<String>,
}

/// The frontend a packet matched.
#[derive(Debug, Serialize)]
pub struct TracedFrontend {
    /// The Service, from the agent's status file; empty when unknown.
    pub service: String,
    /// `address:port/PROTOCOL`.
    pub frontend: String,
    /// Kinds and options, e.g. `ClusterIP`.
    pub flags: Vec<&'static str>,
    /// Reverse-NAT id.
    pub rev_nat_id: u32,
    /// Its backends in slot order (the ones new flows pick from).
    pub backends: Vec<ListedBackend>,
}

/// The backend a traced flow goes to.
#[derive(Debug, Serialize)]
pub struct TracedBackend {
    /// `address:port`.
    pub backend: String,
    /// Backend id.
    pub id: u32,
    /// `new flow` (picked now, at random among the frontend's backends),
    /// `tracked` (the flow's backend in conntrack).
    pub choice: String,
    /// Runs on this node.
    pub node_local: bool,
}

/// One program run.
#[derive(Debug, Serialize)]
pub struct Stage {
    /// Program name.
    pub program: String,
    /// Its hook, e.g. `tc ingress`.
    pub hook: String,
    /// Its return value, named (e.g. `TC_ACT_UNSPEC (continue)`).
    pub verdict: String,
    /// The packet after it.
    pub output: PacketView,
    /// Whether it changed the packet.
    pub rewritten: bool,
}

/// The backend's reply and its reverse translation.
#[derive(Debug, Serialize)]
pub struct Reply {
    /// The reply as the backend sends it.
    pub packet: PacketView,
    /// The reply through each program of the way back.
    pub stages: Vec<Stage>,
    /// Whether the reply reaches the client from the address it sent to
    /// (the frontend) at the port it sent to.
    pub from_frontend: bool,
    /// Conntrack entries the reply changed.
    pub conntrack: Vec<TracedEntry>,
}

/// One conntrack entry and what the traced packet did to it.
#[derive(Clone, Debug, Serialize)]
pub struct TracedEntry {
    /// `created`, `updated` or `unchanged`.
    pub change: String,
    /// `forward` (the flow's master), `reply`, `hairpin-reply`, `snat`,
    /// `snat-reply`.
    pub direction: String,
    /// The tuple the entry matches, `SRC -> DST PROTO`.
    pub tuple: String,
    /// The `address:port` the entry translates to.
    pub translates_to: String,
    /// The flow's backend id.
    pub backend_id: u32,
    /// The flow's rev-NAT id.
    pub rev_nat_id: u32,
    /// SNAT port of an SNATed flow's master, else 0.
    pub snat_port: u16,
    /// `snat`, `hairpin`, `dead`.
    pub flags: Vec<&'static str>,
    /// The state bits seen: `seen-reply`, `fin-forward`, `fin-reply`, `rst`.
    pub state: Vec<&'static str>,
    /// Seconds since the entry was last used.
    pub idle_secs: i64,
    /// Seconds since the flow started.
    pub age_secs: i64,
}

/// Runs the trace.
pub fn trace(request: &TraceRequest) -> crate::Result<Trace> {
    let from_network = matches!(request.entry, Entry::Network(_));
    let snapshot = Snapshot::take(&request.pin_path, &request.tuple, from_network)?;
    let input = packet::build(&request.tuple, tcp_flags_for(request));
    let before = snapshot.conntrack()?;
    let mut notes = Vec::new();

    // The way in.
    let entry_program = match request.entry {
        Entry::Pod => PROG_FROM_POD,
        Entry::Network(NodePortMode::Xdp) => PROG_FROM_NETWORK,
        Entry::Network(NodePortMode::Tc) => PROG_FROM_NETWORK_TC,
    };
    let mut stages = vec![run_stage(&snapshot, entry_program, &input)?];
    let after_entry = snapshot.conntrack()?;
    let master_key = request.tuple.ct_key(CT_DIR_FORWARD);
    let master = after_entry.get(&master_key).copied();
    let backend = master.and_then(|m| snapshot.copied.backends.get(&m.backend_id).copied());
    let dropped = |stages: &[RunStage]| stages.iter().any(|s| s.verdict.contains("drop"));
    // From the network to a backend on another node, the packet leaves
    // through the external device, where `to_network` SNATs it.
    if from_network
        && !dropped(&stages)
        && stages[0].rewritten
        && backend.is_some_and(|b| b.flags & BACKEND_FLAG_NODE_LOCAL == 0)
    {
        let last = stages[0].output_bytes.clone();
        stages.push(run_stage(&snapshot, PROG_TO_NETWORK, &last)?);
    }
    let after = snapshot.conntrack()?;
    let forward_output = stages
        .last()
        .map(|s| s.output_bytes.clone())
        .unwrap_or_default();
    let outcome = outcome(&request.tuple, &stages, &forward_output);

    let frontend = traced_frontend(request, &snapshot);
    let traced_backend = match (master, outcome) {
        (Some(master), "translated") => {
            let tracked = before.get(&master_key).is_some_and(|old| {
                old.created == master.created && old.backend_id == master.backend_id
            });
            Some(TracedBackend {
                backend: SocketAddr::new(
                    ip_from_map(&master.nat_addr, master_key.family),
                    u16::from_be(master.nat_port),
                )
                .to_string(),
                id: master.backend_id,
                choice: if tracked { "tracked" } else { "new flow" }.to_owned(),
                node_local: backend.is_some_and(|b| b.flags & BACKEND_FLAG_NODE_LOCAL != 0),
            })
        }
        _ => None,
    };
    if let (Some(chosen), Some(frontend)) = (&traced_backend, &frontend)
        && chosen.choice == "new flow"
        && frontend.backends.len() > 1
    {
        notes.push(format!(
            "backend choice is random: {} is one possible choice among the {} backends of {} ({})",
            chosen.backend,
            frontend.backends.len(),
            frontend.frontend,
            frontend
                .backends
                .iter()
                .map(|b| format!("{}:{}", b.address, b.port))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if master.is_some_and(|m| m.flags & CT_FLAG_SNAT != 0)
        && traced_backend
            .as_ref()
            .is_some_and(|b| b.choice == "new flow")
    {
        notes.push(
            "the SNAT port is one possible choice too: a random start in the SNAT range, then the next port no live flow holds".to_owned(),
        );
    }
    notes.extend(frontend_notes(request, &frontend, outcome));
    let conntrack = diff_entries(&before, &after, &flow_keys(&request.tuple, &after));

    // The way back, on the state the packet left.
    let reply = if outcome == "translated" {
        Some(trace_reply(
            request,
            &snapshot,
            &forward_output,
            stages.len() > 1,
            &after,
        )?)
    } else {
        None
    };
    let events = snapshot
        .counters()?
        .into_iter()
        .filter(|(_, value)| *value != 0)
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    notes.push(
        "run in a private snapshot of the live maps: nothing was written to them, and no packet was sent".to_owned(),
    );
    Ok(Trace {
        packet: describe(&input),
        entry: entry_name(request.entry).to_owned(),
        outcome: outcome.to_owned(),
        frontend,
        backend: traced_backend,
        stages: stages.into_iter().map(|s| s.stage).collect(),
        conntrack,
        reply,
        events,
        notes,
    })
}

/// The TCP flags of the traced packet (none for UDP).
fn tcp_flags_for(request: &TraceRequest) -> u8 {
    if request.tuple.proto == PROTO_TCP {
        request.tcp_flags
    } else {
        0
    }
}

/// How the entry is shown.
fn entry_name(entry: Entry) -> &'static str {
    match entry {
        Entry::Pod => "from pod",
        Entry::Network(NodePortMode::Xdp) => "from network (XDP)",
        Entry::Network(NodePortMode::Tc) => "from network (TC)",
    }
}

/// A stage with the output's bytes kept for the next program.
struct RunStage {
    stage: Stage,
    output_bytes: Vec<u8>,
}

impl std::ops::Deref for RunStage {
    type Target = Stage;
    fn deref(&self) -> &Stage {
        &self.stage
    }
}

/// Runs `program` on `input` in the snapshot.
fn run_stage(snapshot: &Snapshot, program: &str, input: &[u8]) -> crate::Result<RunStage> {
    let (verdict, output) = snapshot
        .run(program, input)
        .with_context(|| format!("running {program} (BPF_PROG_TEST_RUN)"))?;
    Ok(RunStage {
        stage: Stage {
            program: program.to_owned(),
            hook: hook_name(program).to_owned(),
            verdict: verdict_name(program, verdict),
            output: describe(&output),
            rewritten: output != input,
        },
        output_bytes: output,
    })
}

/// The hook a program runs on.
fn hook_name(program: &str) -> &'static str {
    match program {
        PROG_FROM_POD | PROG_FROM_NETWORK_TC => "tc ingress",
        PROG_TO_POD | PROG_TO_NETWORK => "tc egress",
        PROG_FROM_NETWORK => "xdp",
        _ => "?",
    }
}

/// A program's return value, named.
pub fn verdict_name(program: &str, value: u32) -> String {
    if program == PROG_FROM_NETWORK {
        match value {
            0 => "XDP_ABORTED (drop)".to_owned(),
            1 => "XDP_DROP (drop)".to_owned(),
            2 => "XDP_PASS (continue)".to_owned(),
            3 => "XDP_TX (back out the device)".to_owned(),
            4 => "XDP_REDIRECT".to_owned(),
            other => format!("XDP verdict {other}"),
        }
    } else {
        match value as i32 {
            -1 => "TC_ACT_UNSPEC (continue)".to_owned(),
            0 => "TC_ACT_OK (continue)".to_owned(),
            2 => "TC_ACT_SHOT (drop)".to_owned(),
            7 => "TC_ACT_REDIRECT (sent back out the device it came in on)".to_owned(),
            other => format!("TC verdict {other}"),
        }
    }
}

/// The one-word outcome of the forward path.
fn outcome(tuple: &PacketTuple, stages: &[RunStage], output: &[u8]) -> &'static str {
    if stages.iter().any(|s| s.verdict.contains("drop")) {
        return "dropped";
    }
    if !stages.iter().any(|s| s.rewritten) {
        return "untouched";
    }
    // A refusal goes back to the client: a RST or an ICMP error.
    match packet::tuple_of(output) {
        Some(out) if out.daddr == tuple.saddr && out.dport == tuple.sport => "refused",
        None if describe(output).destination == tuple.saddr.to_string() => "refused",
        _ => "translated",
    }
}

/// The frontend the destination matched (scope "all", the one packets look
/// up), with its Service and backends.
fn traced_frontend(request: &TraceRequest, snapshot: &Snapshot) -> Option<TracedFrontend> {
    let key = request.tuple.frontend_key(SCOPE_ALL);
    let header = snapshot.copied.frontends.get(&key)?;
    let label = frontend_label(
        request.tuple.daddr,
        request.tuple.dport,
        request.tuple.proto,
    );
    let service = status::read(&request.pin_path)
        .unwrap_or_default()
        .into_iter()
        .find(|s| s.frontends.contains(&label))
        .map(|s| s.service)
        .unwrap_or_default();
    let backends = (1..=header.count)
        .filter_map(|slot| snapshot.copied.frontends.get(&key.with_slot(slot)))
        .filter_map(|slot| {
            let backend = snapshot.copied.backends.get(&slot.backend_id)?;
            Some(listed_backend(slot.backend_id, backend))
        })
        .collect();
    Some(TracedFrontend {
        service,
        frontend: label,
        flags: flag_names(header.flags),
        rev_nat_id: header.rev_nat_id,
        backends,
    })
}

/// Remarks on the frontend: none matched, or not for this entry.
fn frontend_notes(
    request: &TraceRequest,
    frontend: &Option<TracedFrontend>,
    outcome: &str,
) -> Vec<String> {
    let label = frontend_label(
        request.tuple.daddr,
        request.tuple.dport,
        request.tuple.proto,
    );
    match frontend {
        None if outcome == "untouched" => vec![format!(
            "{label} is no frontend and no tracked flow: the datapath leaves the packet alone"
        )],
        Some(frontend)
            if matches!(request.entry, Entry::Network(_))
                && !frontend
                    .flags
                    .iter()
                    .any(|f| ["NodePort", "LoadBalancer", "ExternalIP"].contains(f)) =>
        {
            vec![format!(
                "{label} is a {} frontend: not served to traffic from the network",
                frontend.flags.join(",")
            )]
        }
        Some(frontend) if frontend.backends.is_empty() => {
            vec![format!("{label} has no backend: new flows are refused")]
        }
        _ => Vec::new(),
    }
    .into_iter()
    .chain(
        (frontend.is_some() && outcome == "untouched" && matches!(request.entry, Entry::Pod))
            .then(|| format!("{label} matched, yet the packet was left alone")),
    )
    .collect()
}

/// The conntrack keys of the flow of `tuple` in `entries`: its master and
/// companions, and any entry that names the same flow.
fn flow_keys(
    tuple: &PacketTuple,
    entries: &BTreeMap<ConntrackKey, ConntrackValue>,
) -> Vec<ConntrackKey> {
    let master_key = tuple.ct_key(CT_DIR_FORWARD);
    let mut keys: Vec<ConntrackKey> = crate::datapath::snapshot::CT_DIRECTIONS
        .iter()
        .map(|direction| tuple.ct_key(*direction))
        .filter(|key| entries.contains_key(key))
        .collect();
    if let Some(master) = entries.get(&master_key) {
        let reply = service_common::reply_key(&master_key, master);
        let snat = service_common::snat_key(&master_key, master);
        let snat_addr = snat
            .and_then(|k| entries.get(&k))
            .map(|v| v.nat_addr)
            .unwrap_or_default();
        let snat_reply = service_common::snat_reply_key(&master_key, master, &snat_addr);
        keys.extend([Some(reply), snat, snat_reply].into_iter().flatten());
    }
    keys.retain(|key| entries.contains_key(key));
    keys.sort_by_key(|key| (key.direction != CT_DIR_FORWARD, key.direction, *key));
    keys.dedup();
    keys
}

/// The entries `keys` of `after`, each with what changed since `before`.
fn diff_entries(
    before: &BTreeMap<ConntrackKey, ConntrackValue>,
    after: &BTreeMap<ConntrackKey, ConntrackValue>,
    keys: &[ConntrackKey],
) -> Vec<TracedEntry> {
    let now = now_seconds();
    keys.iter()
        .filter_map(|key| {
            let value = after.get(key)?;
            let change = match before.get(key) {
                None => "created",
                Some(old) if old != value => "updated",
                Some(_) => "unchanged",
            };
            Some(traced_entry(key, value, change, now))
        })
        .collect()
}

/// Monotonic seconds now, as conntrack entries count them.
fn now_seconds() -> u32 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the current time into `now`, which outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    mono_seconds(now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64)
}

/// One entry as shown.
fn traced_entry(key: &ConntrackKey, value: &ConntrackValue, change: &str, now: u32) -> TracedEntry {
    let endpoint = |addr, port: u16| {
        SocketAddr::new(ip_from_map(addr, key.family), u16::from_be(port)).to_string()
    };
    let bits = |bits: &[(u16, &'static str)], set: u16| {
        bits.iter()
            .filter(|(bit, _)| set & bit != 0)
            .map(|(_, name)| *name)
            .collect()
    };
    TracedEntry {
        change: change.to_owned(),
        direction: match key.direction {
            CT_DIR_FORWARD => "forward",
            CT_DIR_REPLY => "reply",
            CT_DIR_HAIRPIN_REPLY => "hairpin-reply",
            CT_DIR_SNAT => "snat",
            CT_DIR_SNAT_REPLY => "snat-reply",
            _ => "?",
        }
        .to_owned(),
        tuple: format!(
            "{} -> {} {}",
            endpoint(&key.saddr, key.sport),
            endpoint(&key.daddr, key.dport),
            crate::datapath::model::proto_name(key.proto)
        ),
        translates_to: endpoint(&value.nat_addr, value.nat_port),
        backend_id: value.backend_id,
        rev_nat_id: value.rev_nat_id,
        snat_port: u16::from_be(value.snat_port),
        flags: bits(
            &[
                (CT_FLAG_SNAT, "snat"),
                (CT_FLAG_HAIRPIN, "hairpin"),
                (CT_FLAG_DEAD, "dead"),
            ],
            value.flags,
        ),
        state: bits(
            &[
                (u16::from(CT_STATE_SEEN_REPLY), "seen-reply"),
                (u16::from(CT_STATE_FIN_FORWARD), "fin-forward"),
                (u16::from(CT_STATE_FIN_REPLY), "fin-reply"),
                (u16::from(CT_STATE_RST), "rst"),
            ],
            u16::from(value.state),
        ),
        idle_secs: i64::from(now.wrapping_sub(value.last_seen) as i32),
        age_secs: i64::from(now.wrapping_sub(value.created) as i32),
    }
}

/// Runs the backend's reply to `forward_output` (the packet as the
/// backend got it) back through the reverse path: `to_pod` to a pod
/// (`from_pod` again for a hairpin flow); from the network, `to_network`
/// on the way out, after `from_network` when the flow was SNATed
/// (`snated`).
fn trace_reply(
    request: &TraceRequest,
    snapshot: &Snapshot,
    forward_output: &[u8],
    snated: bool,
    before: &BTreeMap<ConntrackKey, ConntrackValue>,
) -> crate::Result<Reply> {
    let delivered = packet::tuple_of(forward_output).ok_or_else(|| {
        Error::Unexpected("the translated packet is no TCP/UDP packet".to_owned())
    })?;
    let reply_tuple = PacketTuple {
        saddr: delivered.daddr,
        sport: delivered.dport,
        daddr: delivered.saddr,
        dport: delivered.sport,
        ..delivered
    };
    let flags = if request.tuple.proto != PROTO_TCP {
        0
    } else if request.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN {
        TCP_FLAG_SYN | TCP_FLAG_ACK
    } else {
        TCP_FLAG_ACK
    };
    let input = packet::build(&reply_tuple, flags);
    let programs: &[&str] = match request.entry {
        Entry::Pod if map_addr(delivered.saddr).0 == hairpin_addr(delivered.family()) => {
            &[PROG_FROM_POD]
        }
        Entry::Pod => &[PROG_TO_POD],
        Entry::Network(mode) if snated => &[
            match mode {
                NodePortMode::Xdp => PROG_FROM_NETWORK,
                NodePortMode::Tc => PROG_FROM_NETWORK_TC,
            },
            PROG_TO_NETWORK,
        ],
        Entry::Network(_) => &[PROG_TO_NETWORK],
    };
    let mut stages: Vec<RunStage> = Vec::new();
    for program in programs {
        let last = stages
            .last()
            .map(|s| s.output_bytes.clone())
            .unwrap_or_else(|| input.clone());
        let stage = run_stage(snapshot, program, &last)?;
        let drop = stage.verdict.contains("drop");
        stages.push(stage);
        if drop {
            break;
        }
    }
    let output = stages
        .last()
        .map(|s| s.output_bytes.clone())
        .unwrap_or_default();
    let from_frontend = packet::tuple_of(&output).is_some_and(|out| {
        out.saddr == request.tuple.daddr
            && out.sport == request.tuple.dport
            && out.daddr == request.tuple.saddr
            && out.dport == request.tuple.sport
    }) && !stages.iter().any(|s| s.verdict.contains("drop"));
    let after = snapshot.conntrack()?;
    let changed: Vec<ConntrackKey> = after
        .iter()
        .filter(|(key, value)| before.get(key) != Some(value))
        .map(|(key, _)| *key)
        .collect();
    Ok(Reply {
        packet: describe(&input),
        stages: stages.into_iter().map(|s| s.stage).collect(),
        from_frontend,
        conntrack: diff_entries(before, &after, &changed),
    })
}

/// Where the pinned state says the agent attached "from network" on
/// `device` (any external device when `None`): XDP when an XDP link is
/// pinned for it, else TC ingress (`--nodeport-mode tc`, or a kernel
/// whose links are netlink filters).
pub fn pinned_nodeport_mode(pin_path: &Path, device: Option<&str>) -> NodePortMode {
    let links = pin_path.join("links");
    let xdp_pinned = match device {
        Some(device) => links.join(format!("{device}-xdp")).exists(),
        None => std::fs::read_dir(&links).is_ok_and(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().ends_with("-xdp"))
        }),
    };
    if xdp_pinned {
        NodePortMode::Xdp
    } else {
        NodePortMode::Tc
    }
}

/// The TCP flags shown for a request.
pub fn request_flags(request: &TraceRequest) -> String {
    tcp_flag_names(tcp_flags_for(request))
}

#[cfg(test)]
mod tests {
    use super::*;
    use service_common::PROTO_UDP;

    #[test]
    fn verdicts_are_named_per_hook() {
        assert_eq!(
            verdict_name(PROG_FROM_POD, u32::MAX),
            "TC_ACT_UNSPEC (continue)"
        );
        assert_eq!(verdict_name(PROG_TO_POD, 2), "TC_ACT_SHOT (drop)");
        assert_eq!(verdict_name(PROG_FROM_NETWORK, 2), "XDP_PASS (continue)");
        assert_eq!(verdict_name(PROG_FROM_NETWORK, 1), "XDP_DROP (drop)");
        assert_eq!(verdict_name(PROG_FROM_NETWORK_TC, 9), "TC verdict 9");
    }

    #[test]
    fn udp_packets_carry_no_tcp_flags() {
        let request = TraceRequest {
            tuple: PacketTuple {
                saddr: [10, 0, 0, 1].into(),
                sport: 1,
                daddr: [10, 0, 0, 2].into(),
                dport: 2,
                proto: PROTO_UDP,
                ip_id: 0,
            },
            tcp_flags: TCP_FLAG_SYN,
            entry: Entry::Pod,
            pin_path: PathBuf::from("/nowhere"),
        };
        assert_eq!(request_flags(&request), "none");
    }
}
