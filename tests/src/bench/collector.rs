//! The conntrack collector on a large map: the real eBPF object loaded with
//! a conntrack map of [`CollectorBenchConfig::capacity`] entries, filled
//! with [`CollectorBenchConfig::entries`] entries as the datapath writes
//! them (half ClusterIP flows of two entries, half flows SNATed to a
//! remote backend, of four), then one collector pass of the agent's own
//! code ([`collect`]) over the pinned map, timed by the wall clock and by
//! the thread's CPU clock (user and system time: the pass is mostly
//! `bpf(2)` calls). Two cases: half the flows idle past their timeout (the
//! pass deletes half the map, each flow with its companions), and every
//! flow live (the pass only reads). Next to it, the same map read once in
//! batches and nothing else: the floor a pass cannot beat.

use std::{os::fd::AsFd as _, time::Instant};

use anyhow::{Context as _, ensure};
use aya::maps::{HashMap, IterableMap as _, MapData};
use service_agent::{
    datapath::{
        self, MapSizes,
        conntrack::{ConntrackMap, SCAN_BATCH, monotonic_seconds},
        maps::open_pinned,
        sys,
    },
    reconcile::flows::{FlowRules, collect},
};
use service_common::{
    CT_DIR_FORWARD, CT_FLAG_SNAT, CT_STATE_SEEN_REPLY, ConntrackKey, ConntrackTimeouts,
    ConntrackValue, FAMILY_IPV4, MAP_CONNTRACK, MAP_REVNAT, PROTO_UDP, RevNatId, RevNatValue,
    companion_keys, map_addr_v4,
};

use super::report::{Better, Figure, Group};
use crate::pins::PinDir;

/// What to measure.
#[derive(Clone, Debug)]
pub struct CollectorBenchConfig {
    /// Capacity of the conntrack map.
    pub capacity: u32,
    /// Entries written before each pass.
    pub entries: u32,
    /// Passes per case (the map filled afresh before each).
    pub runs: usize,
}

/// Frontends the flows are spread over.
const FRONTENDS: u32 = 1000;
/// This node's SNAT address.
const SNAT: [u8; 4] = [10, 0, 0, 1];
/// The collector's rules: the default timeouts.
const RULES: FlowRules = FlowRules {
    timeouts: ConntrackTimeouts::DEFAULT,
    snat_v4: map_addr_v4(SNAT),
    snat_v6: [0; 16],
};

/// One measured pass.
struct Pass {
    wall: f64,
    cpu: f64,
    deleted: u64,
    /// Entries in the map when the pass started.
    entries: u64,
}

/// Measures both cases; returns the figures.
pub fn run(config: &CollectorBenchConfig) -> anyhow::Result<Vec<Figure>> {
    let pin = PinDir::new("collector")?;
    let sizes = MapSizes {
        conntrack: config.capacity,
        ..MapSizes::default()
    };
    // Loading creates and pins the maps; the object itself is not needed.
    drop(datapath::load_with_sizes(pin.path(), sizes).context("loading the eBPF object")?);
    let mut conntrack: HashMap<MapData, ConntrackKey, ConntrackValue> =
        HashMap::try_from(open_pinned(pin.path(), MAP_CONNTRACK)?)?;
    let mut revnat: HashMap<MapData, RevNatId, RevNatValue> =
        HashMap::try_from(open_pinned(pin.path(), MAP_REVNAT)?)?;
    for id in 1..=FRONTENDS {
        revnat.insert(id, frontend(id), 0)?;
    }

    let mut figures = Vec::new();
    for (case, series, expired_share) in [
        ("half the flows expired", "ct_gc_half_expired", 0.5),
        ("every flow live", "ct_gc_all_live", 0.0),
    ] {
        let mut passes = Vec::new();
        let mut floors = Vec::new();
        for run in 0..config.runs {
            eprintln!(
                "   collector: {case}, run {} of {}: filling {} entries",
                run + 1,
                config.runs,
                config.entries
            );
            let now = monotonic_seconds();
            fill(&mut conntrack, config.entries, expired_share, now)?;
            let written = count(&conntrack)?;
            ensure!(
                written >= u64::from(config.entries) * 99 / 100,
                "only {written} of {} entries stayed in the map",
                config.entries
            );
            floors.push(read_only_walk(&conntrack)?);
            let mut table = ConntrackMap::open(pin.path())?;
            let cpu_before = thread_cpu_seconds();
            let started = Instant::now();
            let report = collect(&mut table, &RULES, now).context("a collector pass")?;
            let pass = Pass {
                wall: started.elapsed().as_secs_f64(),
                cpu: thread_cpu_seconds() - cpu_before,
                deleted: report.deleted_total(),
                entries: written,
            };
            let expected = (written as f64 * expired_share) as u64;
            ensure!(
                pass.deleted.abs_diff(expected) <= written / 100,
                "the pass deleted {} entries, expected about {expected}",
                pass.deleted
            );
            passes.push(pass);
            clear(&mut conntrack)?;
        }
        let entries = f64::from(config.entries) / 1e6;
        let deleted = passes.iter().map(|p| p.deleted).max().unwrap_or(0);
        let walls: Vec<f64> = passes.iter().map(|p| p.wall).collect();
        let cpus: Vec<f64> = passes.iter().map(|p| p.cpu).collect();
        let rates: Vec<f64> = passes
            .iter()
            .map(|p| p.entries as f64 / p.wall / 1e6)
            .collect();
        let what = format!("{entries:.2}M entries, {case}");
        figures.push(
            Figure::new(
                Group::Conntrack,
                &format!("{series}_wall"),
                format!("Collector pass over {what}: wall time"),
                "s",
                Better::Lower,
            )
            .ours_runs(&walls)
            .reference("read only", &floors)
            .note(format!(
                "{deleted} entries deleted (each expired flow with its companions); read only: the same map read in batches of {SCAN_BATCH}, nothing judged or deleted"
            )),
        );
        figures.push(
            Figure::new(
                Group::Conntrack,
                &format!("{series}_cpu"),
                format!("Collector pass over {what}: CPU time"),
                "s",
                Better::Lower,
            )
            .ours_runs(&cpus)
            .note("the collector thread's CPU clock: user and system time (mostly bpf(2) calls)"),
        );
        figures.push(
            Figure::new(
                Group::Conntrack,
                &format!("{series}_rate"),
                format!("Collector pass over {what}: map entries per second"),
                "M entries/s",
                Better::Higher,
            )
            .ours_runs(&rates),
        );
    }
    Ok(figures)
}

/// The frontend of rev-NAT id `id`: 10.96.x.y:80.
fn frontend(id: RevNatId) -> RevNatValue {
    RevNatValue {
        addr: map_addr_v4([10, 96, (id >> 8) as u8, id as u8]),
        port: 80u16.to_be(),
        family: FAMILY_IPV4,
        _pad: 0,
    }
}

/// Writes flows until `entries` entries are written: flows alternate
/// between a ClusterIP flow (master and reply) and an SNATed one (four
/// entries); `expired_share` of them last seen long before `now`.
fn fill(
    conntrack: &mut HashMap<MapData, ConntrackKey, ConntrackValue>,
    entries: u32,
    expired_share: f64,
    now: u32,
) -> anyhow::Result<()> {
    let mut written = 0u32;
    let mut flow = 0u32;
    let expired_every = if expired_share > 0.0 {
        (1.0 / expired_share).round() as u32
    } else {
        0
    };
    while written < entries {
        let rev_nat_id = flow % FRONTENDS + 1;
        let client = 0x0a01_0000 + flow / 60_000;
        let client_port = (flow % 60_000 + 1024) as u16;
        let snated = flow % 2 == 1;
        let expired = expired_every != 0 && (flow / 2).is_multiple_of(expired_every);
        let last_seen = if expired { now - 1000 } else { now };
        let front = frontend(rev_nat_id);
        let master = ConntrackKey::new(
            map_addr_v4(client.to_be_bytes()),
            client_port.to_be(),
            front.addr,
            front.port,
            FAMILY_IPV4,
            PROTO_UDP,
            CT_DIR_FORWARD,
        );
        let backend = [10, 200, (flow >> 8) as u8, flow as u8];
        let mut value = ConntrackValue::new(
            map_addr_v4(backend),
            8080u16.to_be(),
            flow % 50_000 + 1,
            rev_nat_id,
            last_seen - 10,
        );
        value.last_seen = last_seen;
        value.state = CT_STATE_SEEN_REPLY;
        if snated {
            value = value
                .with_flags(CT_FLAG_SNAT)
                .with_snat_port(((flow / 2) % 10_000 + 20_000) as u16);
        }
        let [reply, snat, snat_reply] = companion_keys(&master, &value, &RULES.snat_v4);
        let entry = |nat_addr, nat_port| ConntrackValue {
            nat_addr,
            nat_port,
            snat_port: 0,
            ..value
        };
        conntrack.insert(master, value, 0)?;
        written += 1;
        if let Some(reply) = reply {
            conntrack.insert(reply, entry(master.daddr, master.dport), 0)?;
            written += 1;
        }
        if let (Some(snat), Some(snat_reply)) = (snat, snat_reply) {
            conntrack.insert(snat, entry(RULES.snat_v4, value.snat_port), 0)?;
            conntrack.insert(snat_reply, entry(master.saddr, master.sport), 0)?;
            written += 2;
        }
        flow += 1;
    }
    Ok(())
}

/// Entries in the map.
fn count(conntrack: &HashMap<MapData, ConntrackKey, ConntrackValue>) -> anyhow::Result<u64> {
    let mut total = 0;
    walk(conntrack, |n| total += n as u64)?;
    Ok(total)
}

/// Seconds one read of the whole map in batches takes.
fn read_only_walk(
    conntrack: &HashMap<MapData, ConntrackKey, ConntrackValue>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    walk(conntrack, |_| {})?;
    Ok(started.elapsed().as_secs_f64())
}

/// Reads the map in batches, handing each batch's size to `batch`.
fn walk(
    conntrack: &HashMap<MapData, ConntrackKey, ConntrackValue>,
    mut batch: impl FnMut(usize),
) -> anyhow::Result<()> {
    let mut keys = vec![ConntrackKey::default(); SCAN_BATCH];
    let mut values = vec![ConntrackValue::default(); SCAN_BATCH];
    let mut cursor = sys::BatchCursor::default();
    while !cursor.is_done() {
        let read = sys::lookup_batch(
            conntrack.map().fd().as_fd(),
            &mut cursor,
            &mut keys,
            &mut values,
        )?;
        batch(read);
    }
    Ok(())
}

/// Empties the map.
fn clear(conntrack: &mut HashMap<MapData, ConntrackKey, ConntrackValue>) -> anyhow::Result<()> {
    let keys: Vec<ConntrackKey> = conntrack.keys().collect::<Result<_, _>>()?;
    sys::delete_batch(conntrack.map().fd().as_fd(), &keys)?;
    Ok(())
}

/// The calling thread's CPU time (user and system), seconds.
fn thread_cpu_seconds() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; the clock always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}
