//! Control plane: how fast Services get programmed, how fast one change
//! reaches the maps, how much memory the agent needs; and, next to it, how
//! long kube-proxy's tools take to load the same Services and the same
//! change.
//!
//! - Start to fully programmed: the agent binary on a file of N Services
//!   x 10 endpoints, from spawning the process to the end of its first
//!   full sync (its status file appears right after the last map write).
//! - Event to map: the agent's own pipeline ([`Pipeline`] over the real
//!   kernel maps, in this process): one EndpointSlice event (an endpoint
//!   turning not ready or ready again) handed to it, until its writes are
//!   in the maps. The file source's polling and re-parsing are not part of
//!   it (they would be with the Kubernetes source's watch).
//! - Peak RSS: `VmHWM` of the agent process once fully programmed.
//! - kube-proxy: wall time of `iptables-restore --noflush` and `nft -f` (the
//!   tools kube-proxy runs, process start included) on the rules of the
//!   same Services, then on the partial sync of one endpoint change. That
//!   is a lower bound for kube-proxy: its own computing is not counted.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use service_agent::{
    datapath::{
        self,
        maps::ServiceMaps,
        model::{MapReader as _, map_addr},
    },
    reconcile::{
        cluster::{Change, ClusterEvent, ObjectName},
        pipeline::Pipeline,
        sync::Syncer,
        translate::NodeContext,
    },
    source::file::{KINDS, parse_documents},
};
use service_common::{FAMILY_IPV4, FrontendKey, PROTO_TCP, SCOPE_ALL};

use super::{
    agent::{AgentSource, BenchAgent},
    api_server::ApiServer,
    kube_proxy::{KubeProxyMode, LoadedRules},
    report::{Better, Figure, Group},
    services::{NAMESPACE, SERVICE_PORT, ServiceSet},
    stats::quantile,
};
use crate::{
    netns::{NetNs, unique_prefix},
    pins::PinDir,
};

/// Endpoints per Service.
const ENDPOINTS: u32 = 10;
/// Conntrack capacity (flows) given to the agent: its default.
const CONNTRACK_FLOWS: u32 = service_common::CONNTRACK_MAX_ENTRIES / 2;

/// What to measure.
#[derive(Clone, Debug)]
pub struct ControlPlaneConfig {
    /// Services for the programming time, the change latency and the
    /// kube-proxy loads.
    pub services: u32,
    /// Service counts at which the agent's peak RSS is measured (the
    /// programming time is measured at `services` among them).
    pub rss_sizes: Vec<u32>,
    /// Endpoint changes for the latency percentiles.
    pub changes: usize,
    /// Loads of kube-proxy's rules per mode.
    pub load_runs: usize,
    /// One-change partial syncs per kube-proxy mode.
    pub change_runs: usize,
}

/// Measures everything; returns the figures.
pub fn run(config: &ControlPlaneConfig, workdir: &Path) -> anyhow::Result<Vec<Figure>> {
    let set = ServiceSet::new(config.services, ENDPOINTS);
    let mut starts = Vec::new();
    for &size in &config.rss_sizes {
        for source in SourceKind::ALL {
            let (programmed, rss_kib) = agent_start(size, source, workdir)?;
            starts.push((size, source, programmed, rss_kib));
        }
    }
    let latencies = change_latencies(&set, config.changes)?;
    let mut kube_proxy = Vec::new();
    for mode in KubeProxyMode::ALL {
        kube_proxy.push((mode, kube_proxy_times(mode, &set, config, workdir)?));
    }

    let mut figures = Vec::new();
    for (size, source, programmed, rss_kib) in starts {
        if size == config.services {
            let mut figure = Figure::new(
                Group::ControlPlane,
                &format!("start_to_programmed_{}", source.series()),
                format!(
                    "Start to fully programmed, {size} Services × {ENDPOINTS} endpoints, {}",
                    source.title()
                ),
                "s",
                Better::Lower,
            )
            .services(u64::from(size))
            .ours(programmed);
            for (mode, times) in &kube_proxy {
                figure = figure.competitor(mode.tool(), &times.load);
            }
            figures.push(figure.target("< 1 s", 1.0).note(format!(
                "agent binary, {}; kube-proxy: the tool's run only",
                source.note()
            )));
        }
        let mut rss = Figure::new(
            Group::ControlPlane,
            &format!("peak_rss_{}", source.series()),
            format!(
                "Agent peak RSS (VmHWM), {size} Services × {ENDPOINTS} endpoints, {}",
                source.title()
            ),
            "MiB",
            Better::Lower,
        )
        .services(u64::from(size))
        .ours(rss_kib as f64 / 1024.0);
        if size >= 100_000 {
            rss = rss.target("< 300 MiB", 300.0);
        }
        figures.push(rss.note("the whole process once fully programmed"));
    }

    for (label, q, target) in [("p50", 0.5, None), ("p99", 0.99, Some(5.0))] {
        let mut figure = Figure::new(
            Group::ControlPlane,
            &format!("change_latency_{label}"),
            format!(
                "One endpoint change to maps written, {} Services, {label} of {} changes",
                config.services, config.changes
            ),
            "ms",
            Better::Lower,
        )
        .services(u64::from(config.services))
        .ours(quantile(&latencies, q).unwrap_or(f64::NAN));
        for (mode, times) in &kube_proxy {
            if let Some(value) = quantile(&times.change, q) {
                figure = figure.competitor(mode.tool(), &[value]);
            }
        }
        if let Some(limit) = target {
            figure = figure.target("< 5 ms", limit);
        }
        figures.push(figure.note(
            "ours: the agent's pipeline in process over the kernel maps; kube-proxy: the tool's run on its partial sync",
        ));
    }
    Ok(figures)
}

/// Load and change times of one kube-proxy mode, in seconds and
/// milliseconds.
struct ToolTimes {
    /// Seconds per full load.
    load: Vec<f64>,
    /// Milliseconds per one-endpoint partial sync.
    change: Vec<f64>,
}

/// Loads `set` with `mode`'s tool `load_runs` times (a fresh namespace
/// each), then applies one-endpoint changes to the last load.
fn kube_proxy_times(
    mode: KubeProxyMode,
    set: &ServiceSet,
    config: &ControlPlaneConfig,
    workdir: &Path,
) -> anyhow::Result<ToolTimes> {
    let rules = mode.rules(set);
    let changed = set.count / 2;
    let endpoints = set.endpoints(changed);
    let without = set.clone().with_endpoints(changed, endpoints[1..].to_vec());
    let remove = workdir.join(format!("{}-remove.rules", mode.name()));
    std::fs::write(
        &remove,
        mode.change_rules(&without, changed, &endpoints[..1]),
    )?;
    let restore = workdir.join(format!("{}-restore.rules", mode.name()));
    std::fs::write(&restore, mode.change_rules(set, changed, &[]))?;

    let mut times = ToolTimes {
        load: Vec::new(),
        change: Vec::new(),
    };
    for run in 0..config.load_runs {
        let ns = NetNs::create(&unique_prefix("cp"))?;
        let (loaded, took) = LoadedRules::load(&ns, mode, &rules, workdir)?;
        times.load.push(took.as_secs_f64());
        if run + 1 == config.load_runs {
            for change in 0..config.change_runs {
                let file = if change % 2 == 0 { &remove } else { &restore };
                times
                    .change
                    .push(loaded.apply(file)?.as_secs_f64() * 1000.0);
            }
        }
        drop(loaded);
        drop(ns);
    }
    eprintln!(
        "   control plane: {} loads {} Services in {:.2?} s, one change in {:.1?} ms",
        mode.tool(),
        set.count,
        times.load,
        times.change
    );
    Ok(times)
}

/// Where the agent reads the Services from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SourceKind {
    /// A YAML file.
    File,
    /// The scripted API server over HTTP ([`ApiServer`]).
    Kube,
}

impl SourceKind {
    const ALL: [SourceKind; 2] = [SourceKind::File, SourceKind::Kube];

    fn series(self) -> &'static str {
        match self {
            SourceKind::File => "file",
            SourceKind::Kube => "kube",
        }
    }

    fn title(self) -> &'static str {
        match self {
            SourceKind::File => "file source",
            SourceKind::Kube => "Kubernetes source",
        }
    }

    fn note(self) -> &'static str {
        match self {
            SourceKind::File => "file source (reading the YAML included)",
            SourceKind::Kube => {
                "Kubernetes source: paged lists (500 per page) of API-server-shaped objects over HTTP on loopback, then watches"
            }
        }
    }
}

/// The node name the agent runs as with the Kubernetes source.
const NODE_NAME: &str = "bench-node";

/// Starts the agent on `size` Services from `source` in a namespace of its
/// own; returns the seconds from spawn to fully programmed and its peak
/// RSS (KiB).
fn agent_start(size: u32, source: SourceKind, workdir: &Path) -> anyhow::Result<(f64, u64)> {
    let set = ServiceSet::new(size, ENDPOINTS);
    let node = NetNs::create(&unique_prefix("cp"))?;
    let pin = PinDir::new("bench-cp")?;
    let (agent_source, server) = match source {
        SourceKind::File => {
            let yaml = workdir.join(format!("control-plane-{size}.yaml"));
            std::fs::write(&yaml, set.yaml())?;
            (AgentSource::File(yaml), None)
        }
        SourceKind::Kube => {
            let listener = node.run(|| std::net::TcpListener::bind("127.0.0.1:0"))??;
            let server = ApiServer::start(listener, &set, NODE_NAME)?;
            let kubeconfig = workdir.join(format!("kubeconfig-{size}"));
            server.write_kubeconfig(&kubeconfig)?;
            (
                AgentSource::Kube {
                    kubeconfig,
                    node_name: NODE_NAME.to_owned(),
                },
                Some(server),
            )
        }
    };
    let started = Instant::now();
    let mut agent = BenchAgent::start(
        &node,
        &agent_source,
        pin.path(),
        set.map_sizes(CONNTRACK_FLOWS),
        None,
        &workdir.join(format!(
            "agent-control-plane-{size}-{}.log",
            source.series()
        )),
    )?;
    let synced = agent.wait_synced(Duration::from_secs(600))?;
    let programmed = synced.duration_since(started).as_secs_f64();
    let rss_kib = agent.peak_rss_kib()?;
    check_programmed(&pin, &set)?;
    eprintln!(
        "   control plane: agent programmed {size} Services from the {} in {programmed:.3} s, peak RSS {} MiB",
        source.title(),
        rss_kib / 1024
    );
    drop(agent);
    drop(server);
    drop(pin);
    drop(node);
    Ok((programmed, rss_kib))
}

/// Checks that the pinned maps hold every Service with all its backends.
fn check_programmed(pin: &PinDir, set: &ServiceSet) -> anyhow::Result<()> {
    let state = ServiceMaps::open_pinned(pin.path())?.read_state()?;
    let headers: Vec<_> = state
        .frontends
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .collect();
    let complete = headers
        .iter()
        .filter(|(_, v)| u32::from(v.count) == set.endpoints_per_service)
        .count();
    if headers.len() != set.count as usize || complete != headers.len() {
        bail!(
            "the maps hold {} frontends ({complete} with all backends), expected {}",
            headers.len(),
            set.count
        );
    }
    Ok(())
}

/// Latencies (ms) of `changes` single-endpoint changes at `set`'s size,
/// through the agent's pipeline over the real kernel maps.
fn change_latencies(set: &ServiceSet, changes: usize) -> anyhow::Result<Vec<f64>> {
    let parsed = parse_documents(&set.yaml(), None).context("parsing the generated YAML")?;
    let pin = PinDir::new("bench-latency")?;
    let sizes = set.map_sizes(CONNTRACK_FLOWS);
    let mut ebpf = datapath::load_with_sizes(pin.path(), sizes)?;
    let maps = ServiceMaps::take_from(&mut ebpf)?;
    let syncer = Syncer::adopting_with_sizes(maps, NodeContext::default(), sizes)?;
    let mut pipeline = Pipeline::new(syncer, &KINDS);
    pipeline.handle(ClusterEvent::Service(Change::Replaced(parsed.services)));
    pipeline.handle(ClusterEvent::EndpointSlice(Change::Replaced(parsed.slices)));
    pipeline.handle(ClusterEvent::Node(Change::Replaced(parsed.nodes)));
    let report = pipeline
        .flush()
        .context("the first full sync did not run")?;
    if report.failed() {
        bail!("the first full sync failed: {report:?}");
    }

    let mut latencies = Vec::with_capacity(changes);
    let mut seed = 0x2545_f491_u32;
    for _ in 0..changes {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let service = seed % set.count;
        let endpoint = ((seed >> 8) % set.endpoints_per_service) as usize;
        let slice_name = ObjectName::new(NAMESPACE, &format!("{}-s1", ServiceSet::name(service)));
        let mut slice = pipeline
            .cluster
            .endpoint_slices()
            .get(&slice_name)
            .with_context(|| format!("no EndpointSlice {slice_name}"))?
            .clone();
        let mut endpoints = slice.endpoints.to_vec();
        endpoints[endpoint].ready = !endpoints[endpoint].ready;
        let expected = endpoints.iter().filter(|e| e.ready).count();
        slice.endpoints = endpoints.into();

        let started = Instant::now();
        pipeline.handle(ClusterEvent::EndpointSlice(Change::Applied(
            slice_name.clone(),
            slice,
        )));
        let report = pipeline.flush().context("a change caused no sync")?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);

        if report.failed() || report.writes == 0 {
            bail!("the change of {slice_name} was not written: {report:?}");
        }
        let (addr, family) = map_addr(ServiceSet::cluster_ip(service).into());
        debug_assert_eq!(family, FAMILY_IPV4);
        let key = FrontendKey {
            addr,
            port: SERVICE_PORT.to_be(),
            slot: 0,
            family,
            proto: PROTO_TCP,
            scope: SCOPE_ALL,
            _pad: 0,
        };
        let header = pipeline.syncer().writer().frontends.get(&key, 0)?;
        if usize::from(header.count) != expected {
            bail!(
                "after the change of {slice_name} the map lists {} backends, expected {expected}",
                header.count
            );
        }
    }
    eprintln!(
        "   control plane: {changes} endpoint changes at {} Services, p50 {:.3} ms, p99 {:.3} ms",
        set.count,
        quantile(&latencies, 0.5).unwrap_or(f64::NAN),
        quantile(&latencies, 0.99).unwrap_or(f64::NAN)
    );
    drop(ebpf);
    drop(pin);
    Ok(latencies)
}
