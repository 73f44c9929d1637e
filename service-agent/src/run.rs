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

use log::{error, info, warn};
use service_common::{ConntrackTimeouts, DatapathConfig, SnatPortRange};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc::unbounded_channel,
};

use crate::error::{Context as _, Error, IoContext as _};
use crate::{
    datapath::{
        self, MapSizes,
        addresses::{
            DetectedDevices, default_route_devices, detect_devices, local_addresses,
            nodeport_addresses,
        },
        attach::{Attachments, DeviceSelection},
        cgroup::CgroupPath,
        conntrack::{ConntrackMap, PressureCounters},
        id_cursors::IdCursorMap,
        maps::{CounterMaps, ServiceMaps},
        model::{MapReader, MapWriter},
        snat_ports::Reservation,
        sock_diag::{SocketLbSockets, TranslatedSockets},
    },
    ops::{self, health::Health, health_check_ports::HealthCheckPorts, metrics::Metrics, status},
    reconcile::{
        self,
        cluster::{Change, ClusterEvent, Kind},
        collector::CollectorSettings,
        flows::FlowRules,
        pipeline::Pipeline,
        records::NodeRecord,
        sync::{SyncReport, Syncer},
        translate::NodeContext,
    },
    source::{self, SourceSpec},
};

/// The node's sockets socket-LB translates, whose connected UDP ones the
/// collector destroys when their backend leaves its Service; none when
/// socket-LB is off. A failure to open them is logged: the agent runs on
/// without destroying sockets.
fn translated_sockets(options: &RunOptions) -> Option<Box<dyn TranslatedSockets>> {
    options.cgroup_path.0.as_ref()?;
    match SocketLbSockets::open(&options.pin_path) {
        Ok(sockets) => Some(Box::new(sockets)),
        Err(e) => {
            warn!(
                "socket-LB: the node's connected UDP sockets cannot be destroyed when their backend goes ({}): they stay on it until the application reconnects",
                e.report()
            );
            None
        }
    }
}

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
    /// This node's IPv6 SNAT address (written to the datapath's
    /// configuration; the datapath does not translate IPv6 yet).
    pub snat_ipv6: Option<std::net::Ipv6Addr>,
    /// The cgroup the socket-LB programs are attached to, if any.
    pub cgroup_path: CgroupPath,
    /// Socket-LB only for sockets of the agent's network namespace.
    pub socket_lb_host_namespace_only: bool,
    /// Source ports of SNATed flows.
    pub snat_ports: SnatPortRange,
    /// Conntrack timeouts.
    pub ct_timeouts: ConntrackTimeouts,
    /// Longest time between two conntrack collector passes.
    pub ct_gc_max_interval: Duration,
    /// No `--external-device`: the external devices, NodePort addresses
    /// and (without `--snat-ipv4`) the SNAT address are detected, and
    /// follow the node's addresses.
    pub auto_devices: Option<AutoDevices>,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(mut options: RunOptions) -> crate::Result<()> {
    let socket_lb_netns = if options.socket_lb_host_namespace_only {
        let cookie = datapath::netns::current_netns_cookie()?;
        info!("socket-LB limited to this network namespace (cookie {cookie})");
        Some(cookie)
    } else {
        None
    };
    let mut ebpf =
        datapath::load_with_options(&options.pin_path, options.map_sizes, socket_lb_netns)?;
    let maps = ServiceMaps::take_from(&mut ebpf)?;
    let counters = CounterMaps::take_from(&mut ebpf)?;
    let mut id_cursors = IdCursorMap::take_from(&mut ebpf)?;
    let kept_cursors = id_cursors.load();
    info!("maps pinned in {}", options.pin_path.display());
    let link_dir = options.pin_path.join("links");
    std::fs::create_dir_all(&link_dir).on_path("creating", &link_dir)?;
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
                .map_err(|source| Error::Kube {
                    action: "connecting (kubeconfig or in-cluster)".to_owned(),
                    source: Box::new(source),
                })?;
            let node_name = options.node_name.clone().unwrap_or_default();
            info!("watching the Kubernetes API as node {node_name:?}");
            source::kube::spawn_watchers(client, &node_name, events, health.clone());
            &source::kube::KINDS
        }
    };
    // Without --external-device, the external devices and the SNAT address
    // follow the Node's addresses: wait (a while) for the source's first
    // word on the Node, keeping the other events for the pipeline.
    let mut early_events = Vec::new();
    let mut auto = options.auto_devices.take();
    if let Some(auto) = &mut auto {
        let node = first_node(&mut incoming, &mut early_events, NODE_WAIT).await;
        if node.is_none() {
            warn!(
                "no Node object for this node (the source has none, or none came within {NODE_WAIT:?}): external devices from the default route only, until one comes"
            );
        }
        auto.detect(node.as_ref(), &mut options);
    }
    datapath::maps::write_config(&mut ebpf, &datapath_config(&options))?;
    info!(
        "external devices {:?}{}, NodePorts on {:?}, SNAT address {:?} (IPv6 {:?}) ports {}-{}, conntrack timeouts {:?}",
        options.devices.external,
        if auto.is_some() { " (detected)" } else { "" },
        options.node.nodeport_addresses,
        options.snat_ipv4,
        options.snat_ipv6,
        options.snat_ports.min,
        options.snat_ports.max,
        options.ct_timeouts
    );
    // `ip_local_port_range` and `ip_local_reserved_ports` (under
    // net.ipv4) govern the sockets of both families.
    if options.snat_ipv4.is_some() || options.snat_ipv6.is_some() {
        reserve_snat_ports(options.snat_ports);
    }
    let syncer = Syncer::adopting_with_sizes(maps, options.node.clone(), options.map_sizes)
        .context("reading the pinned maps")?;

    let (collector_news, mut news) = unbounded_channel();
    let collector = reconcile::collector::spawn(
        ConntrackMap::open(&options.pin_path)?,
        CollectorSettings {
            rules: FlowRules::of(&datapath_config(&options)),
            snat_ports: options.snat_ports,
            min_interval: COLLECTOR_MIN_INTERVAL.min(options.ct_gc_max_interval),
            max_interval: options.ct_gc_max_interval,
        },
        match PressureCounters::open(&options.pin_path) {
            Ok(counters) => Box::new(move || counters.read()),
            Err(e) => {
                warn!("the datapath's counters cannot be read ({}): the conntrack collector only runs on its own pace", e.report());
                Box::new(|| None)
            }
        },
        translated_sockets(&options),
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
    let mut last_detection = Instant::now();
    if !early_events.is_empty() {
        for event in early_events {
            pipeline.handle(event);
        }
        let report = pipeline.flush();
        write_status(
            &options.pin_path,
            &pipeline,
            report.as_ref(),
            &mut failed_services,
        );
    }

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
                if let Some(auto) = &mut auto
                    && last_detection.elapsed() >= DETECTION_INTERVAL
                {
                    last_detection = Instant::now();
                    let before = (options.node.clone(), options.snat_ipv4, options.snat_ipv6);
                    auto.detect(pipeline.cluster.node.as_ref(), &mut options);
                    // Flows SNATed before keep their address (the
                    // collector reads it from each flow's SNAT entry).
                    if options.snat_ipv6 != before.2 {
                        warn!(
                            "IPv6 SNAT address now {:?} (was {:?}): new flows use it, existing ones keep theirs",
                            options.snat_ipv6, before.2
                        );
                    }
                    if options.snat_ipv4 != before.1 {
                        warn!(
                            "SNAT address now {:?} (was {:?}): new flows use it, existing ones keep theirs",
                            options.snat_ipv4, before.1
                        );
                    }
                    if (options.snat_ipv4, options.snat_ipv6) != (before.1, before.2)
                        && let Err(e) = datapath::maps::write_config(&mut ebpf, &datapath_config(&options))
                    {
                        warn!("writing the new SNAT address: {}", e.report());
                    }
                    if options.node.nodeport_addresses != before.0.nodeport_addresses {
                        pipeline.set_node(options.node.clone());
                        let report = pipeline.flush();
                        write_status(&options.pin_path, &pipeline, report.as_ref(), &mut failed_services);
                    }
                }
                if let Err(e) = attachments.scan(&mut ebpf, &options.devices, &link_dir) {
                    warn!("device scan failed: {}", e.report());
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

/// How long the agent waits at start for the source's Node before choosing
/// its external devices and SNAT address without it.
const NODE_WAIT: Duration = Duration::from_secs(10);
/// How often external devices and addresses are detected again.
const DETECTION_INTERVAL: Duration = Duration::from_secs(2);

/// The datapath's configuration from the options.
fn datapath_config(options: &RunOptions) -> DatapathConfig {
    DatapathConfig {
        snat_v4: options.snat_ipv4.map(|a| a.octets()).unwrap_or_default(),
        snat_ports: options.snat_ports,
        timeouts: options.ct_timeouts,
        snat_v6: options.snat_ipv6.map(|a| a.octets()).unwrap_or_default(),
    }
}

/// Waits up to `wait` for the source's first Node event and returns this
/// node's record from it; every event received meanwhile goes to `early`.
async fn first_node(
    incoming: &mut tokio::sync::mpsc::UnboundedReceiver<ClusterEvent>,
    early: &mut Vec<ClusterEvent>,
    wait: Duration,
) -> Option<NodeRecord> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let event = tokio::time::timeout_at(deadline, incoming.recv())
            .await
            .ok()??;
        let node = match &event {
            ClusterEvent::Node(Change::Applied(_, node)) => Some(Some(node.clone())),
            ClusterEvent::Node(Change::Replaced(nodes)) => {
                Some(nodes.first().map(|(_, node)| node.clone()))
            }
            ClusterEvent::Node(Change::Deleted(_)) => Some(None),
            _ => None,
        };
        early.push(event);
        if let Some(node) = node {
            return node;
        }
    }
}

/// External devices, NodePort addresses and the SNAT address found again
/// and again (no `--external-device`): see
/// [`datapath::addresses::detect_devices`].
#[derive(Clone, Debug, Default)]
pub struct AutoDevices {
    /// `--nodeport-addresses`: with CIDRs, NodePorts are served on the
    /// local addresses inside them; without, on the external devices'.
    pub nodeport_cidrs: Vec<ipnet::IpNet>,
    /// `--snat-ipv4`, if given: never replaced by a detected address.
    pub snat_flag: Option<std::net::Ipv4Addr>,
    /// `--snat-ipv6`, if given: never replaced by a detected address.
    pub snat_flag_v6: Option<std::net::Ipv6Addr>,
    /// What the last detection found.
    last: DetectedDevices,
}

impl AutoDevices {
    /// Auto-detection keeping `--nodeport-addresses` CIDRs,
    /// `--snat-ipv4` and `--snat-ipv6`, if given.
    pub fn new(
        nodeport_cidrs: Vec<ipnet::IpNet>,
        snat_flag: Option<std::net::Ipv4Addr>,
        snat_flag_v6: Option<std::net::Ipv6Addr>,
    ) -> Self {
        AutoDevices {
            nodeport_cidrs,
            snat_flag,
            snat_flag_v6,
            last: DetectedDevices::default(),
        }
    }

    /// Detects the devices and addresses again from the node's own
    /// addresses, its default routes and `node` (the Node's addresses),
    /// and puts what changed into `options`, logging it.
    fn detect(&mut self, node: Option<&NodeRecord>, options: &mut RunOptions) {
        let local = match local_addresses() {
            Ok(local) => local,
            Err(e) => {
                warn!("detecting the external devices: {}", e.report());
                return;
            }
        };
        let node_ips: Vec<std::net::IpAddr> = node
            .map(|node| {
                node.internal_ips
                    .iter()
                    .chain(node.external_ips.iter())
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        let found = detect_devices(&local, &node_ips, &default_route_devices());
        if found != self.last {
            info!(
                "detected external devices {:?} (devices of the Node's addresses {node_ips:?} and of the default route), SNAT address {:?} (IPv6 {:?})",
                found.external, found.snat_ipv4, found.snat_ipv6
            );
            self.last = found.clone();
        }
        options.devices.external = found.external.clone();
        options.node.nodeport_addresses =
            nodeport_addresses(&local, &found.external, &self.nodeport_cidrs);
        options.snat_ipv4 = self.snat_flag.or(found.snat_ipv4);
        options.snat_ipv6 = self.snat_flag_v6.or(found.snat_ipv6);
    }
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
        status::statuses(
            pipeline.syncer().services(),
            pipeline.syncer().desired(),
            failures,
        ),
    ) {
        warn!("writing the status file: {}", e.report());
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
            "could not keep host sockets off the SNAT ports {}-{} ({}): a host socket may share a tuple with an SNATed flow",
            snat.min,
            snat.max,
            e.report()
        ),
    }
}
