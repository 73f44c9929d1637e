//! `service-agent run`: load and attach the datapath, serve metrics and
//! health, then keep the maps in line with the source until SIGINT or
//! SIGTERM. Maps and program links stay pinned when the agent stops, so
//! traffic keeps flowing while it restarts.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use log::{error, info, warn};
use service_common::{ConntrackTimeouts, DatapathConfig, SnatPortRange, map_addr_v4};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc::unbounded_channel,
};

use crate::{
    datapath::{
        self, MapSizes,
        attach::{Attachments, DeviceSelection},
        cgroup::CgroupPath,
        conntrack::{ConntrackMap, PressureCounters},
        id_cursors::IdCursorMap,
        maps::{CounterMaps, ServiceMaps},
        model::{MapReader, MapWriter},
        snat_ports::Reservation,
    },
    ops::{self, health::Health, health_check_ports::HealthCheckPorts, metrics::Metrics, status},
    reconcile::{
        self,
        cluster::Kind,
        collector::CollectorSettings,
        flows::FlowRules,
        pipeline::Pipeline,
        sync::{SyncReport, Syncer},
        translate::NodeContext,
    },
    source::{self, SourceSpec},
};

/// Shortest time between two conntrack collector passes.
const COLLECTOR_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// How `run` was asked to behave.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Where Services and EndpointSlices come from.
    pub source: SourceSpec,
    /// Folder the maps and links are pinned in.
    pub pin_path: PathBuf,
    /// Pod devices to attach to.
    pub devices: DeviceSelection,
    /// This node's name: its endpoints are node-local, and the kube source
    /// watches its Node.
    pub node_name: Option<String>,
    /// This node, as translation sees it.
    pub node: NodeContext,
    /// Addresses health-check node ports listen on (empty: every address).
    pub health_check_addresses: Vec<std::net::IpAddr>,
    /// How often the file source and the devices are checked.
    pub poll_interval: Duration,
    /// How often the maps are fully compared with the desired state.
    pub resync_interval: Duration,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    /// Where `/healthz` is served.
    pub healthz_addr: SocketAddr,
    /// Capacities of the maps.
    pub map_sizes: MapSizes,
    /// This node's SNAT address for external flows to remote backends.
    pub snat_ipv4: Option<std::net::Ipv4Addr>,
    /// The cgroup the socket-LB programs are attached to, if any.
    pub cgroup_path: CgroupPath,
    /// Source ports of SNATed flows.
    pub snat_ports: SnatPortRange,
    /// Conntrack timeouts.
    pub ct_timeouts: ConntrackTimeouts,
    /// Longest time between two conntrack collector passes.
    pub ct_gc_max_interval: Duration,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let mut ebpf = datapath::load_with_sizes(&options.pin_path, options.map_sizes)?;
    datapath::maps::write_config(
        &mut ebpf,
        &DatapathConfig {
            snat_v4: options.snat_ipv4.map(|a| a.octets()).unwrap_or_default(),
            snat_ports: options.snat_ports,
            timeouts: options.ct_timeouts,
        },
    )?;
    info!(
        "NodePorts on {:?}, SNAT address {:?} ports {}-{}, conntrack timeouts {:?}",
        options.node.nodeport_addresses,
        options.snat_ipv4,
        options.snat_ports.min,
        options.snat_ports.max,
        options.ct_timeouts
    );
    if options.snat_ipv4.is_some() {
        reserve_snat_ports(options.snat_ports);
    }
    let maps = ServiceMaps::take_from(&mut ebpf)?;
    let counters = CounterMaps::take_from(&mut ebpf)?;
    let mut id_cursors = IdCursorMap::take_from(&mut ebpf)?;
    let kept_cursors = id_cursors.load();
    let syncer = Syncer::adopting_with_sizes(maps, options.node.clone(), options.map_sizes)
        .context("reading the pinned maps")?;
    info!("maps pinned in {}", options.pin_path.display());
    let link_dir = options.pin_path.join("links");
    std::fs::create_dir_all(&link_dir)
        .with_context(|| format!("creating {}", link_dir.display()))?;
    datapath::cgroup::configure(&mut ebpf, &options.cgroup_path, &link_dir)?;

    let metrics = Arc::new(Metrics::new(options.map_sizes, Some(counters)));
    // kube-proxy's bound: twice its sync period.
    let health = Arc::new(Health::new(2 * options.resync_interval));
    ops::server::serve(
        options.metrics_addr,
        options.healthz_addr,
        metrics.clone(),
        health.clone(),
    )
    .await?;

    let (events, mut incoming) = unbounded_channel();
    let kinds: &[Kind] = match &options.source {
        SourceSpec::File(path) => {
            source::file::spawn_watcher(
                path.clone(),
                options.poll_interval,
                options.node_name.clone(),
                events,
            );
            &source::file::KINDS
        }
        SourceSpec::Kube => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (kubeconfig or in-cluster)")?;
            let node_name = options.node_name.clone().unwrap_or_default();
            info!("watching the Kubernetes API as node {node_name:?}");
            source::kube::spawn_watchers(client, &node_name, events, health.clone());
            &source::kube::KINDS
        }
    };
    let (collector_news, mut news) = unbounded_channel();
    let collector = reconcile::collector::spawn(
        ConntrackMap::open(&options.pin_path)?,
        CollectorSettings {
            rules: FlowRules {
                timeouts: options.ct_timeouts,
                snat_addr: map_addr_v4(options.snat_ipv4.map(|a| a.octets()).unwrap_or_default()),
            },
            snat_ports: options.snat_ports,
            min_interval: COLLECTOR_MIN_INTERVAL.min(options.ct_gc_max_interval),
            max_interval: options.ct_gc_max_interval,
        },
        match PressureCounters::open(&options.pin_path) {
            Ok(counters) => Box::new(move || counters.read()),
            Err(e) => {
                warn!("the datapath's counters cannot be read ({e:#}): the conntrack collector only runs on its own pace");
                Box::new(|| None)
            }
        },
        Some(metrics.clone()),
        collector_news,
    )
    .context("starting the conntrack collector")?;
    // Health-check node ports listen on every address (as kube-proxy with no
    // --nodeport-addresses), or on the NodePort addresses the CIDRs chose.
    let health_check_ports = Arc::new(HealthCheckPorts::new(
        options.health_check_addresses.clone(),
        health.clone(),
    ));
    let mut pipeline = Pipeline::new(syncer, kinds)
        .with_health_check_ports(health_check_ports)
        .with_metrics(metrics)
        .with_health(health.clone())
        .with_collector(collector)
        .with_id_store(
            Box::new(move |cursors| id_cursors.store(cursors)),
            kept_cursors,
        );
    let mut failed_services = 0;
    let mut attachments = Attachments::default();
    let mut last_full_sync = Instant::now();

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut ticker = tokio::time::interval(options.poll_interval);
    loop {
        tokio::select! {
            event = incoming.recv() => {
                let Some(event) = event else {
                    error!("the source stopped");
                    break;
                };
                pipeline.handle(event);
                while let Ok(event) = incoming.try_recv() {
                    pipeline.handle(event);
                }
                let report = pipeline.flush();
                write_status(&options.pin_path, &pipeline, report.as_ref(), &mut failed_services);
            }
            Some(item) = news.recv() => pipeline.collector_news(item),
            _ = ticker.tick() => {
                if let Err(e) = attachments.scan(&mut ebpf, &options.devices, &link_dir) {
                    warn!("device scan failed: {e:#}");
                }
                if pipeline.repair_due() || last_full_sync.elapsed() >= options.resync_interval {
                    let report = pipeline.resync();
                    write_status(&options.pin_path, &pipeline, report.as_ref(), &mut failed_services);
                    last_full_sync = Instant::now();
                }
                health.beat(pipeline.is_synced());
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    info!(
        "stopping; maps and links stay pinned in {} (attached to: {})",
        options.pin_path.display(),
        attachments.devices().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// Rewrites the status file when a sync changed a Service or which
/// Services failed (`failed_services`: their number at the last write).
fn write_status<W: MapWriter + MapReader>(
    pin_path: &Path,
    pipeline: &Pipeline<W>,
    report: Option<&SyncReport>,
    failed_services: &mut usize,
) {
    let Some(report) = report else {
        return;
    };
    let failures = pipeline.syncer().failures();
    if report.services_changed == 0 && !report.failed() && failures.len() == *failed_services {
        return;
    }
    *failed_services = failures.len();
    if let Err(e) = status::write(
        pin_path,
        &status::statuses(
            pipeline.syncer().services(),
            pipeline.syncer().desired(),
            failures,
        ),
    ) {
        warn!("writing the status file: {e:#}");
    }
}

/// Keeps this network namespace's own sockets off the SNAT ports, and says so.
fn reserve_snat_ports(snat: SnatPortRange) {
    let snat = snat.effective();
    match datapath::snat_ports::reserve(snat) {
        Ok(Reservation::Disjoint { ephemeral }) => info!(
            "SNAT ports {}-{} lie outside the ephemeral range {}-{}: no host socket picks them",
            snat.min, snat.max, ephemeral.0, ephemeral.1
        ),
        Ok(Reservation::AlreadyReserved { ephemeral }) => info!(
            "SNAT ports {}-{} overlap the ephemeral range {}-{} and are reserved already (net.ipv4.ip_local_reserved_ports)",
            snat.min, snat.max, ephemeral.0, ephemeral.1
        ),
        Ok(Reservation::Reserved {
            ephemeral,
            reserved,
        }) => info!(
            "SNAT ports {}-{} overlap the ephemeral range {}-{}: reserved, so no host socket picks them (net.ipv4.ip_local_reserved_ports = {reserved})",
            snat.min, snat.max, ephemeral.0, ephemeral.1
        ),
        Err(e) => warn!(
            "could not keep host sockets off the SNAT ports {}-{} ({e:#}): a host socket may share a tuple with an SNATed flow",
            snat.min, snat.max
        ),
    }
}
