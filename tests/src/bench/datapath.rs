//! Datapath cost per packet: the real programs of the real object run
//! through BPF_PROG_TEST_RUN against maps holding 1 to 100k Services.
//!
//! BPF_PROG_TEST_RUN with `repeat > 1` runs a program again and again on
//! the same packet, and our programs rewrite it in place (DNAT), so every
//! iteration after the first would miss the frontend. Each measurement is
//! therefore one run with `repeat = 1` on a fresh copy of the packet (the
//! kernel builds a new one from `data_in` at every call), and the figure is
//! the kernel-reported duration of that run: the program only, timed inside
//! the kernel, plus the fixed cost of the test harness around it, which the
//! pass-only floor program measured the same way shows.
//!
//! - New flow: every packet is a TCP SYN from a client address and port
//!   never seen before, so each run looks up the frontend, picks a backend
//!   and inserts the conntrack entries (and an SNAT entry on the NodePort
//!   path).
//! - Established: the flows are created first (untimed); each timed packet
//!   is an ACK of one of them, cycling through a pool of flows.
//! - Before measuring, the conntrack map is filled with flows to random
//!   Services (ten per Service, up to most of its capacity), so the large
//!   cases run against a conntrack map as full as a busy node's.
//!
//! Floor, new and established batches alternate, so drift in the machine
//! touches all three alike; each batch gives its median, and a figure is
//! the median of its batches, shown with the spread of the batches.
//!
//! A second measure runs beside it in batches of its own: the kernel's own
//! run-time statistics of each program (`bpf_stats`, `BPF_ENABLE_STATS`:
//! `run_time_ns` / `run_cnt`, the program alone, no test harness, timed by
//! the kernel around every run), read before and after each batch, so each
//! batch gives the mean cost of one run of the program itself. The
//! statistics are on only for those batches: the kernel's timing of every
//! run would also add to the BPF_PROG_TEST_RUN durations. Both measures
//! count the same floor program for their ratios, and every figure shows
//! the interquartile range of its batches: a target is judged met or missed
//! only where that spread stays clear of it.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{Program, ProgramInfo, TestRun, TestRunOptions},
    sys::{Stats, enable_stats},
};
use etherparse::PacketBuilder;
use service_agent::{
    datapath::{
        self, MapSizes, PROG_BENCH_CONNTRACK_TC, PROG_BENCH_CONNTRACK_XDP, PROG_BENCH_FLOOR_TC,
        PROG_BENCH_FLOOR_XDP, PROG_FROM_NETWORK, PROG_FROM_POD,
        maps::{ServiceMaps, write_config},
        model::{MapState, write_in_order},
    },
    reconcile::{
        desired::DesiredState,
        translate::{DesiredBackend, DesiredFrontend},
    },
};
use service_common::{DatapathConfig as NodeSettings, FRONTEND_FLAG_NODE_PORT, SnatPortRange};

use super::{
    report::{Better, Figure, Group},
    services::{SERVICE_PORT, ServiceSet},
    stats::median,
};
use crate::pins::PinDir;

/// `TC_ACT_UNSPEC` as BPF_PROG_TEST_RUN reports it: the packet continues.
const TC_CONTINUE: u32 = u32::MAX;
/// `XDP_PASS`.
const XDP_PASS: u32 = 2;
/// This node's address: the NodePort frontend and the SNAT address.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The NodePort of the probed Service.
const NODE_PORT: u16 = 30_080;
/// The IPv6 ClusterIP of the probed Service (its only IPv6 frontend).
const CLUSTER_IP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// Endpoints per Service.
const ENDPOINTS: u32 = 10;
/// Conntrack capacity in flows (two entries each): 1M, as a large node.
const CONNTRACK_FLOWS: u32 = 1_000_000;
/// Flows put in conntrack before measuring, per Service.
const PREFILL_FLOWS_PER_SERVICE: u32 = 10;

/// How much to measure.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// Service counts.
    pub sizes: Vec<u32>,
    /// Batches per figure.
    pub batches: usize,
    /// Packets per batch.
    pub packets: usize,
    /// Most flows put in conntrack before measuring.
    pub prefill_max: u32,
}

/// A program the bench runs, and how its verdicts read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    /// TC "from pod": pod to ClusterIP.
    TcFromPod,
    /// TC "from pod": pod to an IPv6 ClusterIP.
    TcFromPodV6,
    /// XDP "from network": external client to NodePort.
    XdpFromNetwork,
    /// The pass-only TC program.
    FloorTc,
    /// The pass-only XDP program.
    FloorXdp,
    /// The TC bound: a conntrack lookup, and a new flow's two inserts, alone
    /// (`bench_conntrack_tc`).
    ConntrackTc,
    /// The XDP bound: a conntrack lookup, and a new SNATed flow's four
    /// inserts, alone (`bench_conntrack_xdp`).
    ConntrackXdp,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::TcFromPod | Hook::TcFromPodV6 => PROG_FROM_POD,
            Hook::XdpFromNetwork => PROG_FROM_NETWORK,
            Hook::FloorTc => PROG_BENCH_FLOOR_TC,
            Hook::FloorXdp => PROG_BENCH_FLOOR_XDP,
            Hook::ConntrackTc => PROG_BENCH_CONNTRACK_TC,
            Hook::ConntrackXdp => PROG_BENCH_CONNTRACK_XDP,
        }
    }

    /// The bound beside this path: the same packets through conntrack
    /// alone, what no design of a tracked flow can go below.
    fn bound(self) -> Option<Hook> {
        match self {
            Hook::TcFromPod => Some(Hook::ConntrackTc),
            Hook::XdpFromNetwork => Some(Hook::ConntrackXdp),
            _ => None,
        }
    }

    /// The pass-only program of the same hook type: this path's floor.
    fn floor(self) -> Hook {
        match self {
            Hook::XdpFromNetwork | Hook::FloorXdp | Hook::ConntrackXdp => Hook::FloorXdp,
            Hook::TcFromPod | Hook::TcFromPodV6 | Hook::FloorTc | Hook::ConntrackTc => {
                Hook::FloorTc
            }
        }
    }

    /// The verdict of a translated (or passed) packet.
    fn pass_verdict(self) -> u32 {
        match self {
            Hook::XdpFromNetwork | Hook::FloorXdp | Hook::ConntrackXdp => XDP_PASS,
            Hook::TcFromPod | Hook::TcFromPodV6 | Hook::FloorTc | Hook::ConntrackTc => TC_CONTINUE,
        }
    }

    /// The frontend the packets of this hook are sent to.
    fn destination(self, set: &ServiceSet) -> (IpAddr, u16) {
        match self {
            Hook::XdpFromNetwork | Hook::FloorXdp | Hook::ConntrackXdp => {
                (NODE_IP.into(), NODE_PORT)
            }
            Hook::TcFromPod | Hook::FloorTc | Hook::ConntrackTc => {
                (ServiceSet::cluster_ip(set.last()).into(), SERVICE_PORT)
            }
            Hook::TcFromPodV6 => (CLUSTER_IP_V6.into(), SERVICE_PORT),
        }
    }
}

/// The paths measured: series name, label, hook.
const PATHS: [(&str, &str, Hook); 3] = [
    ("tc_from_pod", "TC from pod → ClusterIP", Hook::TcFromPod),
    (
        "xdp_from_network",
        "XDP from network → NodePort",
        Hook::XdpFromNetwork,
    ),
    (
        "tc_from_pod_v6",
        "TC from pod → IPv6 ClusterIP",
        Hook::TcFromPodV6,
    ),
];

/// The IPv6 twin of an IPv4 endpoint address: `fd00:1::a.b.c.d`.
fn endpoint_v6(addr: IpAddr) -> IpAddr {
    let octets = match addr {
        IpAddr::V4(addr) => addr.octets(),
        IpAddr::V6(addr) => return addr.into(),
    };
    let low = |i: usize| u16::from_be_bytes([octets[i], octets[i + 1]]);
    Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, low(0), low(2)).into()
}

/// The object loaded with its maps pinned in a folder of its own, and the
/// desired state the Services were laid out with.
struct LoadedDatapath {
    ebpf: Ebpf,
    maps: ServiceMaps,
    desired: DesiredState,
    /// Dropped last: unpins the maps.
    _pin: PinDir,
}

impl LoadedDatapath {
    fn load(sizes: MapSizes) -> anyhow::Result<Self> {
        let pin = PinDir::new("bench")?;
        let mut ebpf = datapath::load_with_sizes(pin.path(), sizes)?;
        let maps = ServiceMaps::take_from(&mut ebpf)?;
        write_config(
            &mut ebpf,
            &NodeSettings {
                snat_v4: NODE_IP.octets(),
                // Every port above the NodePort range (as Cilium's): the
                // tens of thousands of flows measured to the NodePort's ten
                // remote backends never crowd it, so each new flow's SNAT
                // port is found on the first tries, as on a node that is
                // not out of ports.
                snat_ports: SnatPortRange {
                    min: 32_768,
                    max: 65_535,
                },
                ..NodeSettings::default()
            },
        )?;
        Ok(LoadedDatapath {
            ebpf,
            maps,
            desired: DesiredState::adopting(&MapState::default(), sizes.revnat, sizes.backends),
            _pin: pin,
        })
    }

    /// Programs every Service of `set` with the agent's layout and ordered
    /// writes; the last one also gets a NodePort on [`NODE_IP`] and an IPv6
    /// ClusterIP ([`CLUSTER_IP_V6`], to IPv6 twins of its endpoints).
    fn program(&mut self, set: &ServiceSet) -> anyhow::Result<()> {
        for i in 0..set.count {
            let mut frontends = vec![set.frontend(i)];
            if i == set.last() {
                frontends.push(DesiredFrontend {
                    addr: NODE_IP.into(),
                    port: NODE_PORT,
                    flags: FRONTEND_FLAG_NODE_PORT,
                    ..set.frontend(i)
                });
                let v4 = set.frontend(i);
                frontends.push(DesiredFrontend {
                    addr: CLUSTER_IP_V6.into(),
                    backends: v4
                        .backends
                        .iter()
                        .map(|backend| DesiredBackend {
                            addr: endpoint_v6(backend.addr),
                            ..*backend
                        })
                        .collect(),
                    ..v4
                });
            }
            let update = self
                .desired
                .set_service(&ServiceSet::object_name(i), &frontends);
            if !update.problems.is_empty() {
                bail!("programming Service {i}: {:?}", update.problems);
            }
            write_in_order(&mut self.maps, &update.writes.ops)
                .map_err(|failure| anyhow::anyhow!("programming Service {i}: {}", failure.error))?;
        }
        Ok(())
    }

    /// Runs `hook` once on `packet`: its verdict and the kernel-reported
    /// duration in nanoseconds.
    fn run(&self, hook: Hook, packet: &[u8]) -> anyhow::Result<(u32, f64)> {
        let options = TestRunOptions {
            data_in: Some(packet),
            repeat: 1,
            ..TestRunOptions::default()
        };
        let program = self
            .ebpf
            .program(hook.program())
            .with_context(|| format!("program {}", hook.program()))?;
        let result = match program {
            Program::SchedClassifier(p) => p.test_run(options),
            Program::Xdp(p) => p.test_run(options),
            _ => bail!("{} is neither TC nor XDP", hook.program()),
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN of {}", hook.program()))?;
        Ok((result.return_value, result.duration.as_nanos() as f64))
    }

    /// Runs `hook` on each packet; fails on an unexpected verdict. Returns
    /// the durations.
    fn run_all(&self, hook: Hook, packets: &[Vec<u8>]) -> anyhow::Result<Vec<f64>> {
        packets
            .iter()
            .map(|packet| {
                let (verdict, ns) = self.run(hook, packet)?;
                if verdict != hook.pass_verdict() {
                    bail!("{} returned {verdict} (expected a pass)", hook.program());
                }
                Ok(ns)
            })
            .collect()
    }

    /// The kernel's statistics of `hook`'s program: its total run time in
    /// nanoseconds and its number of runs (counted while `bpf_stats` is on).
    fn kernel_stats(&self, hook: Hook) -> anyhow::Result<(f64, u64)> {
        let program = self
            .ebpf
            .program(hook.program())
            .with_context(|| format!("program {}", hook.program()))?;
        let info: ProgramInfo = match program {
            Program::SchedClassifier(p) => p.info(),
            Program::Xdp(p) => p.info(),
            _ => bail!("{} is neither TC nor XDP", hook.program()),
        }?;
        Ok((info.run_time().as_nanos() as f64, info.run_count()))
    }

    /// One batch of `hook` on every packet, with the kernel's statistics
    /// off: the median duration BPF_PROG_TEST_RUN reported.
    fn test_run_batch(&self, hook: Hook, packets: &[Vec<u8>]) -> anyhow::Result<f64> {
        Ok(batch_median(self.run_all(hook, packets)?))
    }

    /// One batch of `hook` on every packet with the kernel's statistics on
    /// (`stats`): the mean run time of the program they counted.
    fn kernel_batch(
        &self,
        hook: Hook,
        packets: &[Vec<u8>],
        _stats: &std::os::fd::OwnedFd,
    ) -> anyhow::Result<f64> {
        let (time_before, runs_before) = self.kernel_stats(hook)?;
        self.run_all(hook, packets)?;
        let (time_after, runs_after) = self.kernel_stats(hook)?;
        let runs = runs_after.saturating_sub(runs_before);
        if runs == 0 {
            bail!("bpf_stats counted no run of {}", hook.program());
        }
        Ok((time_after - time_before) / runs as f64)
    }
}

/// The per-batch costs of one program on one path, by both measures
/// (nanoseconds per packet).
#[derive(Default)]
struct Batches {
    /// Median of BPF_PROG_TEST_RUN's per-run durations, per batch.
    test_run: Vec<f64>,
    /// Mean run time the kernel's `bpf_stats` counted, per batch.
    kernel: Vec<f64>,
}

impl Batches {
    fn push(&mut self, test_run: f64, kernel: f64) {
        self.test_run.push(test_run);
        self.kernel.push(kernel);
    }

    /// Both measures of these batches beside `floor`'s: (label suffix,
    /// series suffix, ours, floor), BPF_PROG_TEST_RUN's then the kernel's.
    fn measures<'a>(
        &'a self,
        floor: &'a Batches,
    ) -> [(&'static str, &'static str, &'a [f64], &'a [f64]); 2] {
        [
            ("", "", &self.test_run, &floor.test_run),
            (
                ", kernel run time (bpf_stats)",
                "_kernel",
                &self.kernel,
                &floor.kernel,
            ),
        ]
    }
}

/// A TCP packet from client `k` (a distinct address and port per `k`) to
/// `destination`; a SYN, or an ACK of an open flow.
fn tcp_packet(k: u32, destination: (IpAddr, u16), syn: bool) -> Vec<u8> {
    let client = Ipv4Addr::from(u32::from_be_bytes([10, 128, 0, 0]) + k / 50_000);
    let port = 10_000 + (k % 50_000) as u16;
    let ethernet = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let ip = match destination.0 {
        IpAddr::V4(to) => ethernet.ipv4(client.octets(), to.octets(), 64),
        IpAddr::V6(to) => {
            let IpAddr::V6(from) = endpoint_v6(client.into()) else {
                unreachable!("endpoint_v6 gives IPv6")
            };
            ethernet.ipv6(from.octets(), to.octets(), 64)
        }
    };
    let mut builder = ip.tcp(port, destination.1, 1000, 64240);
    builder = if syn {
        builder.syn()
    } else {
        builder.ack(2000)
    };
    let mut out = Vec::with_capacity(64);
    builder
        .write(&mut out, &[])
        .expect("a TCP packet always builds");
    out
}

/// Hands out client numbers no flow has used yet.
struct Clients(u32);

impl Clients {
    fn take(&mut self, count: usize) -> std::ops::Range<u32> {
        let start = self.0;
        self.0 += count as u32;
        start..self.0
    }
}

/// Measures every path at every size; returns the figures.
pub fn run(config: &DatapathConfig) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for &size in &config.sizes {
        let started = Instant::now();
        let set = ServiceSet::new(size, ENDPOINTS);
        let mut sizes = set.map_sizes(CONNTRACK_FLOWS);
        // The NodePort and the IPv6 ClusterIP of the last Service.
        sizes.frontends += 2 * (ENDPOINTS + 1);
        sizes.revnat += 2;
        sizes.backends += ENDPOINTS;
        let mut dp = LoadedDatapath::load(sizes)?;
        dp.program(&set)?;
        let programmed = started.elapsed();

        // Fill conntrack with flows to random Services, through the datapath.
        let mut clients = Clients(0);
        let prefill = (size * PREFILL_FLOWS_PER_SERVICE).min(config.prefill_max);
        let mut seed = 0x9e37_79b9_u32;
        for k in clients.take(prefill as usize) {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let service = seed % size;
            let packet = tcp_packet(
                k,
                (ServiceSet::cluster_ip(service).into(), SERVICE_PORT),
                true,
            );
            dp.run(Hook::TcFromPod, &packet)?;
        }
        eprintln!(
            "   datapath: {size} Services programmed in {programmed:.2?}, {prefill} flows in conntrack after {:.2?}",
            started.elapsed()
        );

        for (series, label, hook) in PATHS {
            // Each path next to the pass-only program of its own hook type.
            let destination = hook.destination(&set);
            // The established flows, opened once (untimed).
            let open: Vec<u32> = clients.take(config.packets).collect();
            for &k in &open {
                dp.run(hook, &tcp_packet(k, destination, true))?;
            }
            let established: Vec<Vec<u8>> = open
                .iter()
                .map(|&k| tcp_packet(k, destination, false))
                .collect();
            let (mut floor, mut new_runs, mut established_runs) =
                (Batches::default(), Batches::default(), Batches::default());
            // Beside the paths from pods and from the network, the bound
            // no design of a tracked flow can go below: the same packets
            // through conntrack alone.
            let bound_hook = hook.bound();
            let bound = bound_hook.is_some();
            let bound_hook = bound_hook.unwrap_or(hook);
            let (mut bound_new, mut bound_established) = (Batches::default(), Batches::default());
            // One batch of each first, not counted: warms caches and clocks.
            for batch in 0..=config.batches {
                let mut syns = || -> Vec<Vec<u8>> {
                    clients
                        .take(config.packets)
                        .map(|k| tcp_packet(k, destination, true))
                        .collect()
                };
                let (test_run_syns, kernel_syns) = (syns(), syns());
                let (bound_test_run_syns, bound_kernel_syns) = if bound {
                    (syns(), syns())
                } else {
                    (Vec::new(), Vec::new())
                };
                let floor_test_run = dp.test_run_batch(hook.floor(), &test_run_syns)?;
                let new_test_run = dp.test_run_batch(hook, &test_run_syns)?;
                let established_test_run = dp.test_run_batch(hook, &established)?;
                let bound_test_run = if bound {
                    Some((
                        dp.test_run_batch(bound_hook, &bound_test_run_syns)?,
                        dp.test_run_batch(bound_hook, &established)?,
                    ))
                } else {
                    None
                };
                // The kernel counts run time per program while this is held.
                let stats = enable_stats(Stats::RunTime)
                    .context("enabling bpf_stats (BPF_ENABLE_STATS)")?;
                let floor_kernel = dp.kernel_batch(hook.floor(), &kernel_syns, &stats)?;
                let new_kernel = dp.kernel_batch(hook, &kernel_syns, &stats)?;
                let established_kernel = dp.kernel_batch(hook, &established, &stats)?;
                let bound_kernel = if bound {
                    Some((
                        dp.kernel_batch(bound_hook, &bound_kernel_syns, &stats)?,
                        dp.kernel_batch(bound_hook, &established, &stats)?,
                    ))
                } else {
                    None
                };
                drop(stats);
                if batch > 0 {
                    floor.push(floor_test_run, floor_kernel);
                    new_runs.push(new_test_run, new_kernel);
                    established_runs.push(established_test_run, established_kernel);
                    if let (Some((new, est)), Some((new_kernel, est_kernel))) =
                        (bound_test_run, bound_kernel)
                    {
                        bound_new.push(new, new_kernel);
                        bound_established.push(est, est_kernel);
                    }
                }
            }
            if bound {
                figures.extend(bound_figures(
                    bound_hook,
                    size,
                    &floor,
                    [&bound_new, &bound_established],
                ));
            }
            for (kind, runs, times_floor) in [
                ("new flow", &new_runs, NEW_FLOW_TARGET),
                ("established flow", &established_runs, ESTABLISHED_TARGET),
            ] {
                let series = format!("{series}_{}", kind.replace(' ', "_"));
                for (measure, suffix, ours, floor) in runs.measures(&floor) {
                    let floor_median = super::stats::median(floor).unwrap_or(f64::NAN);
                    figures.push(
                        Figure::new(
                            Group::Datapath,
                            &format!("{series}{suffix}"),
                            format!("{label}, {kind}, {size} Services{measure}"),
                            "ns/packet",
                            Better::Lower,
                        )
                        .services(u64::from(size))
                        .ours_runs(ours)
                        .reference("floor", floor)
                        .target(
                            &format!("≤ {times_floor}× floor"),
                            times_floor * floor_median,
                        ),
                    );
                }
            }
        }
    }
    add_flatness(&mut figures, config);
    Ok(figures)
}

/// The figures of `bound` (`bench_conntrack_tc` or `_xdp`) at `size`
/// Services (`runs`: new flows, then established ones), by both measures,
/// next to its hook's floor: the least a new or established flow costs
/// when its flow is tracked in a BPF hash map of the bench's size,
/// whatever else the design.
fn bound_figures(bound: Hook, size: u32, floor: &Batches, runs: [&Batches; 2]) -> Vec<Figure> {
    let (hook, inserts, series) = if bound == Hook::ConntrackXdp {
        ("XDP", "four inserts (SNAT)", "xdp")
    } else {
        ("TC", "two inserts", "tc")
    };
    let mut figures = Vec::new();
    for ((kind, what), runs) in [
        (
            "new flow",
            format!("parse, lookup, {inserts}: the least a new flow costs"),
        ),
        (
            "established flow",
            "parse, one lookup: the least an established flow costs".to_owned(),
        ),
    ]
    .into_iter()
    .zip(runs)
    {
        for (measure, suffix, ours, floor) in runs.measures(floor) {
            figures.push(
                Figure::new(
                    Group::Datapath,
                    &format!(
                        "{series}_conntrack_bound_{}{suffix}",
                        kind.replace(' ', "_")
                    ),
                    format!("{hook} conntrack alone ({what}), {size} Services{measure}"),
                    "ns/packet",
                    Better::Lower,
                )
                .services(u64::from(size))
                .ours_runs(ours)
                .reference("floor", floor)
                .note(format!(
                    "{}: the same packets, no translation, no backend choice, no clock, no counters",
                    bound.program()
                )),
            );
        }
    }
    figures
}

/// The spec's target for a new flow: at most this many times the floor.
const NEW_FLOW_TARGET: f64 = 6.0;
/// The spec's target for an established flow: at most this many times the floor.
const ESTABLISHED_TARGET: f64 = 3.0;

fn batch_median(samples: Vec<f64>) -> f64 {
    median(&samples).unwrap_or(f64::NAN)
}

/// The spec's flatness target per path and flow kind: the cost at the
/// largest size over the cost at 1 Service, within 10%.
fn add_flatness(figures: &mut Vec<Figure>, config: &DatapathConfig) {
    let (Some(&smallest), Some(&largest)) = (config.sizes.first(), config.sizes.last()) else {
        return;
    };
    if smallest == largest {
        return;
    }
    let mut flatness = Vec::new();
    for (series, label, _) in PATHS {
        for (kind, suffix, measure) in [
            ("new flow", "", ""),
            ("established flow", "", ""),
            ("new flow", "_kernel", " (bpf_stats)"),
            ("established flow", "_kernel", " (bpf_stats)"),
        ] {
            let series = format!("{series}_{}{suffix}", kind.replace(' ', "_"));
            let at = |size: u32| {
                figures
                    .iter()
                    .find(|f| f.series == series && f.services == Some(u64::from(size)))
                    .map(|f| f.ours)
            };
            if let (Some(small), Some(large)) = (at(smallest), at(largest)) {
                flatness.push(
                    Figure::new(
                        Group::Datapath,
                        &format!("{series}_flatness"),
                        format!(
                            "{label}, {kind}: cost at {largest} ÷ cost at {smallest} Services{measure}"
                        ),
                        "×",
                        Better::Lower,
                    )
                    .ours(large / small)
                    .target("≤ 1.10", 1.10),
                );
            }
        }
    }
    figures.extend(flatness);
}
