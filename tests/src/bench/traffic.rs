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

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    agent::{AgentSource, BenchAgent},
    kube_proxy::{KubeProxyMode, LoadedRules},
    report::{Better, Figure, Group},
    services::{SERVICE_PORT, ServiceSet, TARGET_PORT},
};
use crate::{
    netns::NetNs,
    pins::PinDir,
    scenario::backend_name,
    topology::SingleNode,
    traffic::{BackendServer, HttpConnection, http_get, spread},
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
    /// Our agent and eBPF datapath.
    Ours,
    /// kube-proxy's rules.
    KubeProxy(KubeProxyMode),
}

impl Balancer {
    const ALL: [Balancer; 3] = [
        Balancer::Ours,
        Balancer::KubeProxy(KubeProxyMode::Iptables),
        Balancer::KubeProxy(KubeProxyMode::Nftables),
    ];

    fn name(self) -> &'static str {
        match self {
            Balancer::Ours => "ours",
            Balancer::KubeProxy(mode) => mode.name(),
        }
    }
}

/// What programs the node while a test bed lives.
enum Programmed {
    /// The agent, then its pin folder (dropped in this order).
    Agent { _agent: BenchAgent, _pin: PinDir },
    /// kube-proxy's rules.
    Rules { _rules: LoadedRules },
}

/// A topology with servers and one balancer active. Fields drop in order:
/// the balancer first, then the servers, then the namespaces.
struct TestBed {
    _programmed: Programmed,
    _servers: Vec<BackendServer>,
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
        let programmed = match balancer {
            Balancer::Ours => {
                let yaml = workdir.join(format!("traffic-{size}.yaml"));
                std::fs::write(&yaml, set.yaml())?;
                let pin = PinDir::new("bench-traffic")?;
                let mut agent = BenchAgent::start(
                    &topology.node,
                    &AgentSource::File(yaml.clone()),
                    pin.path(),
                    set.map_sizes(service_common::CONNTRACK_MAX_ENTRIES / 2),
                    &workdir.join(format!("agent-traffic-{size}.log")),
                )?;
                agent.wait_synced(Duration::from_secs(120))?;
                agent.wait_attached(BACKEND_PODS + 1, Duration::from_secs(10))?;
                Programmed::Agent {
                    _agent: agent,
                    _pin: pin,
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
            topology,
        })
    }

    fn client(&self) -> &NetNs {
        &self.topology.pods[0].ns
    }
}

/// The ClusterIP of the last of `size` Services.
fn target(size: u32) -> SocketAddr {
    SocketAddr::from((ServiceSet::cluster_ip(size - 1), SERVICE_PORT))
}

/// Measures every balancer at every size; returns the figures.
pub fn run(config: &TrafficConfig, workdir: &Path) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for &size in &config.sizes {
        let mut connections: Vec<(Balancer, Vec<f64>, u64)> = Vec::new();
        let mut requests: Vec<(Balancer, Vec<f64>, u64)> = Vec::new();
        for balancer in Balancer::ALL {
            let started = Instant::now();
            let bed = TestBed::start(balancer, size, workdir)
                .with_context(|| format!("setting up {} with {size} Services", balancer.name()))?;
            let ready = started.elapsed();
            check_spread(bed.client(), target(size))
                .with_context(|| format!("{} with {size} Services", balancer.name()))?;
            let (mut conn_runs, mut conn_failed) = (Vec::new(), 0);
            let (mut req_runs, mut req_failed) = (Vec::new(), 0);
            for _ in 0..config.runs {
                let (rate, failed) = connection_rate(bed.client(), target(size), config)?;
                conn_runs.push(rate);
                conn_failed += failed;
                let (rate, failed) = request_rate(bed.client(), target(size), config)?;
                req_runs.push(rate);
                req_failed += failed;
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
            let mut figure = Figure::new(
                Group::Traffic,
                series,
                format!("{label}, ClusterIP = last of {size} Services"),
                unit,
                Better::Higher,
            )
            .services(u64::from(size));
            let mut failures = Vec::new();
            for (balancer, runs, failed) in results.iter() {
                figure = match balancer {
                    Balancer::Ours => figure.ours_runs(runs),
                    Balancer::KubeProxy(mode) => figure.competitor(mode.name(), runs),
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
    Ok(figures)
}

/// Checks, before measuring, that requests through the ClusterIP succeed
/// and reach every backend pod.
fn check_spread(client: &NetNs, target: SocketAddr) -> anyhow::Result<()> {
    let (answers, failures) = spread(client, 60, target, http_get)?;
    if !failures.is_empty() {
        bail!(
            "requests to {target} failed: {:?}",
            &failures[..failures.len().min(3)]
        );
    }
    for pod in 1..=BACKEND_PODS {
        if !answers.contains_key(&backend_name(pod)) {
            bail!(
                "{} never answered through {target}: {answers:?}",
                backend_name(pod)
            );
        }
    }
    Ok(())
}

/// Connections per second (each with one request) from `config.clients`
/// threads in `client`, and how many failed.
fn connection_rate(
    client: &NetNs,
    target: SocketAddr,
    config: &TrafficConfig,
) -> anyhow::Result<(f64, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..config.clients {
        let stop = stop.clone();
        threads.push(client.spawn(move || {
            let (mut ok, mut failed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match http_get(target) {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        })?);
    }
    collect(threads, stop, config.run_time)
}

/// Requests per second on `config.clients` kept-alive connections, and
/// how many failed.
fn request_rate(
    client: &NetNs,
    target: SocketAddr,
    config: &TrafficConfig,
) -> anyhow::Result<(f64, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..config.clients {
        let mut connection = HttpConnection::open(client, target)?;
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
    collect(threads, stop, config.run_time)
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
