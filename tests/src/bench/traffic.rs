//! Real traffic in the namespace topology: a client pod and three backend
//! pods running real HTTP servers ([`crate::topology::SingleNode`],
//! [`crate::traffic::BackendServer`]), the ClusterIP being the last of
//! 1, 1k or 10k Services, programmed in turn by our agent and by
//! kube-proxy's iptables and nftables rule sets. Each combination gets a
//! fresh topology, so only one of them is ever active in the node, and
//! everything is removed when it is done (guards that clean up on drop).
//!
//! - New connections per second: client threads each open a connection,
//!   send one request (`Connection: close`), read the answer, and start
//!   over, for a fixed time.
//! - Requests per second: client threads each keep one connection open
//!   and send request after request on it.
//!
//! Our datapath is measured twice: with TC only (every packet of the pod's
//! connection through `from_pod`/`to_pod`), and with socket-LB on as users
//! get it by default, where the pod's `connect()` goes straight to a
//! backend and its packets need no translation. Socket-LB applies per
//! cgroup, so the clients run as a process of their own (this binary again,
//! `--traffic-client`), inside the client pod's namespace and, for the
//! socket-LB rows, inside a cgroup made for the run that the agent attaches
//! to (never the machine's root cgroup). Every balancer's clients run the
//! same way.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
    sys::{Stats, enable_stats},
};

use super::{
    agent::{AgentSource, BenchAgent},
    kube_proxy::{KubeProxyMode, LoadedRules},
    report::{Better, Figure, Group},
    services::{SERVICE_PORT, ServiceSet, TARGET_PORT},
};
use crate::{
    cgroup::TestCgroup,
    netns::enter_on_spawn,
    pins::PinDir,
    scenario::backend_name,
    topology::SingleNode,
    traffic::{BackendServer, HttpConnection, http_get},
};

/// Backend pods (pods 1..=3; pod 0 is the client).
const BACKEND_PODS: usize = 3;
/// Synthetic endpoints of every other Service.
const ENDPOINTS: u32 = 10;

/// How much traffic to send.
#[derive(Clone, Debug)]
pub struct TrafficConfig {
    /// Service counts (the target is the last Service).
    pub sizes: Vec<u32>,
    /// Runs per figure and mode.
    pub runs: usize,
    /// Length of one run.
    pub run_time: Duration,
    /// Client threads.
    pub clients: usize,
}

/// Who programs the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Balancer {
    /// Our agent and eBPF datapath, TC only (socket-LB off).
    Ours,
    /// Our agent with socket-LB on (the default users get) for the client.
    OursSocketLb,
    /// kube-proxy's rules.
    KubeProxy(KubeProxyMode),
}

impl Balancer {
    const ALL: [Balancer; 4] = [
        Balancer::Ours,
        Balancer::OursSocketLb,
        Balancer::KubeProxy(KubeProxyMode::Iptables),
        Balancer::KubeProxy(KubeProxyMode::Nftables),
    ];

    fn name(self) -> &'static str {
        match self {
            Balancer::Ours => "ours (TC)",
            Balancer::OursSocketLb => "ours (socket-LB)",
            Balancer::KubeProxy(mode) => mode.name(),
        }
    }
}

/// What programs the node while a test bed lives.
enum Programmed {
    /// The agent, then its pin folder (dropped in this order), and the
    /// programs on the client pod's device.
    Agent {
        _agent: BenchAgent,
        _pin: PinDir,
        client_programs: ClientPrograms,
    },
    /// kube-proxy's rules.
    Rules { _rules: LoadedRules },
}

/// A topology with servers and one balancer active. Fields drop in order:
/// the balancer first, then the servers, the client's cgroup, then the
/// namespaces.
struct TestBed {
    _programmed: Programmed,
    _servers: Vec<BackendServer>,
    /// The cgroup the clients run in, for socket-LB.
    cgroup: Option<TestCgroup>,
    topology: SingleNode,
}

impl TestBed {
    fn start(balancer: Balancer, size: u32, workdir: &Path) -> anyhow::Result<Self> {
        let topology = SingleNode::new("bt", BACKEND_PODS + 1)?;
        topology.pods[0].ns.exec(
            "sysctl",
            &["-qw", "net.ipv4.ip_local_port_range=1024 65000"],
        )?;
        let mut servers = Vec::new();
        for pod in 1..=BACKEND_PODS {
            servers.push(BackendServer::start(
                &topology.pods[pod].ns,
                &backend_name(pod),
                TARGET_PORT,
                7007,
            )?);
        }
        let backends: Vec<Ipv4Addr> = topology.pods[1..].iter().map(|p| p.ip).collect();
        let base = ServiceSet::new(size, ENDPOINTS);
        let last = base.last();
        let set = base.with_endpoints(last, backends);
        let cgroup = match balancer {
            Balancer::OursSocketLb => Some(TestCgroup::create()?),
            _ => None,
        };
        let programmed = match balancer {
            Balancer::Ours | Balancer::OursSocketLb => {
                let yaml = workdir.join(format!("traffic-{size}.yaml"));
                std::fs::write(&yaml, set.yaml())?;
                let pin = PinDir::new("bench-traffic")?;
                let mut agent = BenchAgent::start(
                    &topology.node,
                    &AgentSource::File(yaml.clone()),
                    pin.path(),
                    set.map_sizes(service_common::CONNTRACK_MAX_ENTRIES / 2),
                    cgroup.as_ref().map(TestCgroup::path),
                    &workdir.join(format!("agent-traffic-{size}.log")),
                )?;
                agent.wait_synced(Duration::from_secs(120))?;
                agent.wait_attached(BACKEND_PODS + 1, Duration::from_secs(10))?;
                let client_programs =
                    ClientPrograms::of(pin.path(), &topology.pods[0].host_device)?;
                Programmed::Agent {
                    _agent: agent,
                    _pin: pin,
                    client_programs,
                }
            }
            Balancer::KubeProxy(mode) => {
                let (rules, _) =
                    LoadedRules::load(&topology.node, mode, &mode.rules(&set), workdir)?;
                Programmed::Rules { _rules: rules }
            }
        };
        Ok(TestBed {
            _programmed: programmed,
            _servers: servers,
            cgroup,
            topology,
        })
    }

    /// Runs this binary's client mode (`--traffic-client ARGS`) inside the
    /// client pod's namespace and the bed's cgroup, if any; its output.
    fn run_client(&self, args: &[String]) -> anyhow::Result<String> {
        let mut command = Command::new(std::env::current_exe()?);
        command.arg(CLIENT_FLAG).args(args);
        enter_on_spawn(&self.topology.pods[0].ns.path(), &mut command)?;
        if let Some(cgroup) = &self.cgroup {
            cgroup.join_on_spawn(&mut command)?;
        }
        let output = command.output().context("running the traffic client")?;
        if !output.status.success() {
            bail!(
                "the traffic client failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// Measures `kind` (`connections` or `requests`) for `config.run_time`
    /// with `config.clients` threads: the rate per second and the failures.
    fn rate(
        &self,
        kind: &str,
        target: SocketAddr,
        config: &TrafficConfig,
    ) -> anyhow::Result<(f64, u64)> {
        let output = self.run_client(&[
            kind.to_owned(),
            target.to_string(),
            config.clients.to_string(),
            config.run_time.as_millis().to_string(),
        ])?;
        let mut fields = output.split_whitespace();
        let (Some(rate), Some(failed)) = (fields.next(), fields.next()) else {
            bail!("unexpected client output {output:?}");
        };
        Ok((rate.parse()?, failed.parse()?))
    }
}

/// The programs the agent attached to the client pod's device, found by
/// the tcx links it pinned: `from_pod` sees the client's packets, `to_pod`
/// the answers.
struct ClientPrograms {
    from_pod: u32,
    to_pod: u32,
}

impl ClientPrograms {
    fn of(pin_path: &Path, device: &str) -> anyhow::Result<Self> {
        let program_id = |direction: &str| -> anyhow::Result<u32> {
            let pin = pin_path.join("links").join(format!("{device}-{direction}"));
            let link = FdLink::from(
                PinnedLink::from_pin(&pin).with_context(|| format!("link {}", pin.display()))?,
            );
            Ok(link.info()?.program_id())
        };
        Ok(ClientPrograms {
            from_pod: program_id("ingress")?,
            to_pod: program_id("egress")?,
        })
    }

    /// Run time (ns) and runs of both programs so far, as the kernel's
    /// statistics count them (`bpf_stats`, on while the bench runs).
    fn stats(&self) -> anyhow::Result<[(f64, u64); 2]> {
        let mut out = [(0.0, 0); 2];
        for program in loaded_programs() {
            let program = program?;
            for (slot, id) in [self.from_pod, self.to_pod].into_iter().enumerate() {
                if program.id() == id {
                    out[slot] = (program.run_time().as_nanos() as f64, program.run_count());
                }
            }
        }
        Ok(out)
    }
}

/// The flag that runs the bench binary as the traffic client.
pub const CLIENT_FLAG: &str = "--traffic-client";

/// The traffic client (`bench --traffic-client KIND TARGET CLIENTS MILLIS`,
/// started by [`TestBed`] in the client pod's namespace and cgroup): KIND
/// `connections` or `requests` prints `RATE FAILED`; `spread TARGET COUNT`
/// prints one line per backend that answered, `NAME COUNT`, and the
/// failures as `failed COUNT`.
pub fn client_main(args: &[String]) -> anyhow::Result<()> {
    let target: SocketAddr = args.get(1).context("target")?.parse()?;
    match args.first().map(String::as_str) {
        Some("spread") => {
            let count: usize = args.get(2).context("count")?.parse()?;
            let mut answers = std::collections::BTreeMap::new();
            let mut failed = 0;
            for _ in 0..count {
                match http_get(target) {
                    Ok(name) => *answers.entry(name).or_insert(0) += 1,
                    Err(_) => failed += 1,
                }
            }
            for (name, count) in answers {
                println!("{name} {count}");
            }
            println!("failed {failed}");
        }
        Some(kind) => {
            let clients: usize = args.get(2).context("clients")?.parse()?;
            let run_time = Duration::from_millis(args.get(3).context("millis")?.parse()?);
            let (rate, failed) = match kind {
                "connections" => connection_rate(target, clients, run_time)?,
                "requests" => request_rate(target, clients, run_time)?,
                other => bail!("unknown client kind {other}"),
            };
            println!("{rate} {failed}");
        }
        None => bail!("usage: {CLIENT_FLAG} connections|requests|spread TARGET ..."),
    }
    Ok(())
}

/// The ClusterIP of the last of `size` Services.
fn target(size: u32) -> SocketAddr {
    SocketAddr::from((ServiceSet::cluster_ip(size - 1), SERVICE_PORT))
}

/// Measures every balancer at every size; returns the figures.
pub fn run(config: &TrafficConfig, workdir: &Path) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    // The kernel counts run time per program while this is held.
    let _stats = enable_stats(Stats::RunTime).context("enabling bpf_stats (BPF_ENABLE_STATS)")?;
    for &size in &config.sizes {
        // ns per packet of from_pod and to_pod on the client's device, over
        // the connection runs and over the request runs (TC only).
        let mut per_packet: [(Vec<f64>, Vec<f64>); 2] = Default::default();
        let mut connections: Vec<(Balancer, Vec<f64>, u64)> = Vec::new();
        let mut requests: Vec<(Balancer, Vec<f64>, u64)> = Vec::new();
        for balancer in Balancer::ALL {
            let started = Instant::now();
            let bed = TestBed::start(balancer, size, workdir)
                .with_context(|| format!("setting up {} with {size} Services", balancer.name()))?;
            let ready = started.elapsed();
            check_spread(&bed, target(size))
                .with_context(|| format!("{} with {size} Services", balancer.name()))?;
            let (mut conn_runs, mut conn_failed) = (Vec::new(), 0);
            let (mut req_runs, mut req_failed) = (Vec::new(), 0);
            let programs = match &bed._programmed {
                Programmed::Agent {
                    client_programs, ..
                } if balancer == Balancer::Ours => Some(client_programs),
                _ => None,
            };
            for _ in 0..config.runs {
                let before = programs.map(ClientPrograms::stats).transpose()?;
                let (rate, failed) = bed.rate("connections", target(size), config)?;
                conn_runs.push(rate);
                conn_failed += failed;
                let between = programs.map(ClientPrograms::stats).transpose()?;
                let (rate, failed) = bed.rate("requests", target(size), config)?;
                req_runs.push(rate);
                req_failed += failed;
                let after = programs.map(ClientPrograms::stats).transpose()?;
                if let (Some(before), Some(between), Some(after)) = (before, between, after) {
                    for (hook, costs) in per_packet.iter_mut().enumerate() {
                        costs.0.push(per_run(before[hook], between[hook]));
                        costs.1.push(per_run(between[hook], after[hook]));
                    }
                }
            }
            eprintln!(
                "   traffic: {:<8} {size:>6} Services: ready in {ready:.2?}, {:.0} conn/s, {:.0} req/s (medians)",
                balancer.name(),
                super::stats::median(&conn_runs).unwrap_or(f64::NAN),
                super::stats::median(&req_runs).unwrap_or(f64::NAN),
            );
            connections.push((balancer, conn_runs, conn_failed));
            requests.push((balancer, req_runs, req_failed));
        }
        for (series, label, unit, results) in [
            (
                "connections_per_second",
                "New TCP connections (one request each)",
                "conn/s",
                &connections,
            ),
            (
                "requests_per_second",
                "Requests on kept-alive connections",
                "req/s",
                &requests,
            ),
        ] {
            // One row for each of our two ways, against the same baselines.
            for (ours, way, suffix) in [
                (Balancer::Ours, "TC only", ""),
                (Balancer::OursSocketLb, "socket-LB (default)", "_socket_lb"),
            ] {
                let mut figure = Figure::new(
                    Group::Traffic,
                    &format!("{series}{suffix}"),
                    format!("{label}, ClusterIP = last of {size} Services, ours with {way}"),
                    unit,
                    Better::Higher,
                )
                .services(u64::from(size));
                let mut failures = Vec::new();
                for (balancer, runs, failed) in results.iter() {
                    figure = match balancer {
                        Balancer::KubeProxy(mode) => figure.competitor(mode.name(), runs),
                        b if *b == ours => figure.ours_runs(runs),
                        _ => continue,
                    };
                    if *failed > 0 {
                        failures.push(format!("{}: {failed} failed", balancer.name()));
                    }
                }
                if !failures.is_empty() {
                    figure = figure.note(failures.join(", "));
                }
                figures.push(figure);
            }
        }
        for (hook, name, costs) in [
            (
                "from_pod",
                "from_pod (client → ClusterIP, DNAT)",
                &per_packet[0],
            ),
            ("to_pod", "to_pod (answers, reverse DNAT)", &per_packet[1]),
        ] {
            for (traffic, suffix, runs) in [
                ("new connections", "connections", &costs.0),
                ("kept-alive requests", "requests", &costs.1),
            ] {
                if runs.is_empty() {
                    continue;
                }
                figures.push(
                    Figure::new(
                        Group::Traffic,
                        &format!("{hook}_kernel_ns_{suffix}"),
                        format!(
                            "{name} per packet over real traffic ({traffic}, {size} Services), kernel run time (bpf_stats)"
                        ),
                        "ns/packet",
                        Better::Lower,
                    )
                    .services(u64::from(size))
                    .ours_runs(runs),
                );
            }
        }
    }
    Ok(figures)
}

/// Mean run time per run between two readings of a program's statistics.
fn per_run(before: (f64, u64), after: (f64, u64)) -> f64 {
    (after.0 - before.0) / after.1.saturating_sub(before.1).max(1) as f64
}

/// Checks, before measuring, that requests through the ClusterIP succeed
/// and reach every backend pod (from the clients' namespace and cgroup).
fn check_spread(bed: &TestBed, target: SocketAddr) -> anyhow::Result<()> {
    let output = bed.run_client(&["spread".to_owned(), target.to_string(), "60".to_owned()])?;
    if !output.contains("failed 0") {
        bail!("requests to {target} failed: {output}");
    }
    for pod in 1..=BACKEND_PODS {
        if !output.contains(&format!("{} ", backend_name(pod))) {
            bail!(
                "{} never answered through {target}: {output}",
                backend_name(pod)
            );
        }
    }
    Ok(())
}

/// Connections per second (each with one request) from `clients` threads
/// of this process, for `run_time`, and how many failed.
fn connection_rate(
    target: SocketAddr,
    clients: usize,
    run_time: Duration,
) -> anyhow::Result<(f64, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..clients {
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match http_get(target) {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        }));
    }
    collect(threads, stop, run_time)
}

/// Requests per second on `clients` kept-alive connections of this
/// process, for `run_time`, and how many failed.
fn request_rate(
    target: SocketAddr,
    clients: usize,
    run_time: Duration,
) -> anyhow::Result<(f64, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..clients {
        let mut connection = HttpConnection::open_here(target)?;
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match connection.get() {
                    Ok(_) => ok += 1,
                    Err(_) => {
                        failed += 1;
                        break;
                    }
                }
            }
            (ok, failed)
        }));
    }
    collect(threads, stop, run_time)
}

/// Lets the client threads run for `run_time`, stops them, and returns the
/// rate of successes per second and the failures.
fn collect(
    threads: Vec<std::thread::JoinHandle<(u64, u64)>>,
    stop: Arc<AtomicBool>,
    run_time: Duration,
) -> anyhow::Result<(f64, u64)> {
    let started = Instant::now();
    std::thread::sleep(run_time);
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for thread in threads {
        let (o, f) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        ok += o;
        failed += f;
    }
    Ok((ok as f64 / started.elapsed().as_secs_f64(), failed))
}
