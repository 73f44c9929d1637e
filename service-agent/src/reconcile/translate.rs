//! The pure translation from Kubernetes objects to the frontends the
//! datapath must serve, each with its backends. No kernel, no I/O: it takes
//! a [`ClusterState`] and returns plain data, so it is tested with fixtures.

use std::net::IpAddr;

use service_common::{
    AFFINITY_TIMEOUT_DEFAULT_SECS, BACKEND_STATE_ACTIVE, BACKEND_STATE_NOT_SERVING,
    BACKEND_STATE_TERMINATING, FRONTEND_FLAG_AFFINITY, FRONTEND_FLAG_CLUSTER_IP,
    FRONTEND_FLAG_EXTERNAL_IP, FRONTEND_FLAG_EXTERNAL_LOCAL, FRONTEND_FLAG_LOAD_BALANCER,
    FRONTEND_FLAG_LOCAL_ONLY, FRONTEND_FLAG_NODE_PORT, FRONTEND_FLAG_TERMINATING_FALLBACK,
    FRONTEND_FLAGS_EXTERNAL, SCOPE_ALL, SCOPE_INTERNAL, affinity_timeout,
};

use super::{
    cluster::{ClusterState, ObjectName},
    records::{
        AddressType, EndpointRecord, NodeHint, ServicePortRecord, ServiceRecord, ServiceType,
        SessionAffinity, SliceRecord, TrafficPolicy,
    },
};

/// What the translation needs to know about the node it runs on (which
/// endpoints are on this node, the sources already know).
#[derive(Clone, Debug, Default)]
pub struct NodeContext {
    /// The node addresses NodePorts are served on, of both families (a
    /// Service gets NodePorts on those of the families of its clusterIPs).
    pub nodeport_addresses: Vec<IpAddr>,
    /// `spec.externalIPs` are served only inside these CIDRs (IPv4 and
    /// IPv6 ones).
    pub external_ip_cidrs: Vec<ipnet::IpNet>,
}

/// One frontend (address, port, protocol) the datapath must serve.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DesiredFrontend {
    /// Frontend address.
    pub addr: IpAddr,
    /// Frontend port.
    pub port: u16,
    /// IP protocol (`PROTO_TCP` or `PROTO_UDP`).
    pub proto: u8,
    /// `FRONTEND_FLAG_*` bits.
    pub flags: u16,
    /// Backends taking new flows (the frontend's slots), sorted by address
    /// and port, without duplicates.
    pub backends: Vec<DesiredBackend>,
    /// Backends kept in the backends map for the flows they already have,
    /// but taking no new ones (not in the slots): serving and terminating
    /// while other endpoints are ready, listed but not serving, or left out
    /// by a traffic policy or topology hints. Sorted, without duplicates,
    /// none of them in `backends`.
    pub draining: Vec<DesiredBackend>,
    /// `sessionAffinity: ClientIP`: its timeout in seconds (then `flags`
    /// has `FRONTEND_FLAG_AFFINITY`); 0 when affinity is off.
    pub affinity_timeout_secs: u32,
    /// `loadBalancerSourceRanges` of the frontend's family (LoadBalancer
    /// frontends only), as network prefixes; empty admits every client.
    /// The desired state sets `FRONTEND_FLAG_SOURCE_RANGES` from it.
    pub source_ranges: Vec<ipnet::IpNet>,
    /// `SCOPE_ALL`, or `SCOPE_INTERNAL` for the in-cluster entry of an
    /// external frontend of an `externalTrafficPolicy: Local` Service (the
    /// Service's cluster-wide backends, for pods and the node).
    pub scope: u8,
}

/// A backend of a frontend: an endpoint address with the resolved target port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DesiredBackend {
    /// Endpoint address.
    pub addr: IpAddr,
    /// Target port, resolved through the EndpointSlice's port names.
    pub port: u16,
    /// The endpoint runs on this node.
    pub node_local: bool,
    /// What the endpoint's conditions say about its flows.
    pub state: BackendState,
}

/// A backend's state as the backends map holds it (`BACKEND_STATE_*`),
/// from its endpoint's conditions. Ordered from most to least serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendState {
    /// Ready: takes new flows.
    Active,
    /// Serving and terminating: keeps its flows (they drain); takes new
    /// ones only as the all-terminating fallback (KEP-1669).
    Terminating,
    /// Listed in an EndpointSlice but not serving: its TCP flows drain,
    /// its UDP flows move to another backend.
    NotServing,
}

impl BackendState {
    /// The `BACKEND_STATE_*` value of the backends map.
    pub const fn map_value(self) -> u8 {
        match self {
            BackendState::Active => BACKEND_STATE_ACTIVE,
            BackendState::Terminating => BACKEND_STATE_TERMINATING,
            BackendState::NotServing => BACKEND_STATE_NOT_SERVING,
        }
    }
}

/// Why a Service programs nothing on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NotProgrammed {
    /// `type: ExternalName`: DNS only.
    ExternalName,
    /// `clusterIP: None`: DNS only.
    Headless,
}

/// A health-check node port to serve: what a load balancer probes to tell
/// whether this node has endpoints of an `externalTrafficPolicy: Local`
/// Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    /// The Service.
    pub service: ObjectName,
    /// `spec.healthCheckNodePort`.
    pub port: u16,
    /// This node's ready endpoints of the Service (each address once).
    pub local_endpoints: usize,
}

/// The outcome of translating a whole [`ClusterState`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Translation {
    /// Every frontend to program, in a stable order.
    pub frontends: Vec<DesiredFrontend>,
    /// Services that program nothing by design.
    pub not_programmed: Vec<(ObjectName, NotProgrammed)>,
    /// Health-check node ports to serve, one per Service that has one.
    pub health_checks: Vec<HealthCheck>,
    /// One line per object or field skipped as invalid.
    pub skipped: Vec<String>,
    /// One line per field set to something the agent does not serve (an
    /// SCTP port, ignored): logged, counted in
    /// `service_agent_unsupported_fields`, shown by `list`.
    pub unsupported: Vec<String>,
}

impl Translation {
    /// A 64-bit fingerprint (SipHash) of the whole translation: the agent
    /// keeps it instead of the translation to tell whether a Service
    /// changed.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::hash::DefaultHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }
}

/// Translates every Service with its EndpointSlices.
pub fn translate(cluster: &ClusterState, node: &NodeContext) -> Translation {
    let mut out = Translation::default();
    for (name, service) in &cluster.services {
        translate_service(cluster, node, name, service, &mut out);
    }
    out
}

/// Translates one Service (nothing when it does not exist).
pub fn translate_one(cluster: &ClusterState, node: &NodeContext, name: &ObjectName) -> Translation {
    let mut out = Translation::default();
    if let Some(service) = cluster.services.get(name) {
        translate_service(cluster, node, name, service, &mut out);
    }
    out
}

fn translate_service(
    cluster: &ClusterState,
    node: &NodeContext,
    name: &ObjectName,
    service: &ServiceRecord,
    out: &mut Translation,
) {
    out.skipped.extend(service.problems.iter().cloned());
    out.unsupported.extend(service.unsupported.iter().cloned());
    let slices: Vec<(&ObjectName, &SliceRecord)> = cluster.slices_of(name).collect();
    for (_, slice) in &slices {
        out.skipped.extend(slice.problems.iter().cloned());
    }
    if service.service_type == ServiceType::ExternalName {
        out.not_programmed
            .push((name.clone(), NotProgrammed::ExternalName));
        return;
    }
    if service.headless {
        out.not_programmed
            .push((name.clone(), NotProgrammed::Headless));
        return;
    }
    let semantics = FrontendSemantics::of(name, service, out);
    if service.cluster_ips.is_empty() {
        out.skipped
            .push(format!("Service {name}: no usable clusterIP"));
        return;
    }
    skip_other_family(name, service, out);
    for service_port in service.ports.iter() {
        let port_label = &*service_port.name;
        // (An unsupported protocol is in `service.unsupported` already.)
        let Some(proto) = service_port.protocol.number() else {
            continue;
        };
        let Some(port) = valid_port(service_port.port) else {
            out.skipped.push(format!(
                "Service {name} port {port_label:?}: invalid port {}",
                service_port.port
            ));
            continue;
        };
        let node_port = match service_port.node_port {
            Some(node_port) if service.service_type.has_node_ports() => {
                let valid = valid_port(node_port);
                if valid.is_none() {
                    out.skipped.push(format!(
                        "Service {name} port {port_label:?}: invalid nodePort {node_port}"
                    ));
                }
                valid
            }
            _ => None,
        };
        // One set of frontends per family of the Service's clusterIPs,
        // each with the endpoints of the EndpointSlices of that family
        // (kube-proxy runs one proxier per family the same way).
        for &cluster_ip in service.cluster_ips.iter() {
            let same_family = |ip: &&IpAddr| ip.is_ipv4() == cluster_ip.is_ipv4();
            let listed = endpoints_for_port(
                &slices,
                service_port,
                proto,
                AddressType::of(cluster_ip),
                name,
                cluster.node_zone(),
                out,
            );
            let mut frontends: Vec<(IpAddr, u16, u16)> =
                vec![(cluster_ip, port, FRONTEND_FLAG_CLUSTER_IP)];
            if let Some(node_port) = node_port {
                frontends.extend(
                    node.nodeport_addresses
                        .iter()
                        .filter(same_family)
                        .map(|addr| (*addr, node_port, FRONTEND_FLAG_NODE_PORT)),
                );
            }
            if service.service_type == ServiceType::LoadBalancer {
                frontends.extend(
                    service
                        .load_balancer_ips
                        .iter()
                        .filter(same_family)
                        .map(|ip| (*ip, port, FRONTEND_FLAG_LOAD_BALANCER)),
                );
            }
            for ip in service.external_ips.iter().filter(same_family) {
                if node.external_ip_cidrs.iter().any(|cidr| cidr.contains(ip)) {
                    frontends.push((*ip, port, FRONTEND_FLAG_EXTERNAL_IP));
                } else {
                    out.skipped.push(format!(
                        "Service {name}: externalIP {ip} is outside --external-ip-cidrs, not served"
                    ));
                }
            }
            // ClusterIP frontends follow internalTrafficPolicy; NodePort,
            // LoadBalancer and externalIP ones externalTrafficPolicy.
            let internal = select_backends(&listed, service.internal_traffic_policy);
            let external = if frontends
                .iter()
                .any(|(_, _, kind)| *kind != FRONTEND_FLAG_CLUSTER_IP)
            {
                select_backends(&listed, service.external_traffic_policy)
            } else {
                PortBackends::default()
            };
            // Pods and the node reaching an external frontend of an
            // `externalTrafficPolicy: Local` Service get its cluster-wide
            // endpoints, as kube-proxy sends them to its cluster chain:
            // listed in the frontend's in-cluster scope.
            let in_cluster = semantics
                .external_local
                .then(|| select_backends(&listed, TrafficPolicy::Cluster));
            for (addr, port, kind) in frontends {
                let (chosen, policy) = if kind == FRONTEND_FLAG_CLUSTER_IP {
                    (&internal, service.internal_traffic_policy)
                } else {
                    (&external, service.external_traffic_policy)
                };
                let mut flags = kind | chosen.fallback_flag();
                if policy == TrafficPolicy::Local {
                    flags |= FRONTEND_FLAG_LOCAL_ONLY;
                }
                out.frontends.push(semantics.apply(DesiredFrontend {
                    addr,
                    port,
                    proto,
                    flags,
                    backends: chosen.backends.clone(),
                    draining: chosen.draining.clone(),
                    affinity_timeout_secs: 0,
                    source_ranges: Vec::new(),
                    scope: SCOPE_ALL,
                }));
                if let Some(cluster) = in_cluster
                    .as_ref()
                    .filter(|_| kind != FRONTEND_FLAG_CLUSTER_IP)
                {
                    out.frontends.push(semantics.in_cluster(DesiredFrontend {
                        addr,
                        port,
                        proto,
                        flags: kind | cluster.fallback_flag(),
                        backends: cluster.backends.clone(),
                        draining: cluster.draining.clone(),
                        affinity_timeout_secs: 0,
                        source_ranges: Vec::new(),
                        scope: SCOPE_INTERNAL,
                    }));
                }
            }
        }
    }
    health_check(name, service, &slices, out);
}

/// Reports the LoadBalancer ingress IPs and externalIPs of a family the
/// Service has no clusterIP of: not served, as kube-proxy does not serve
/// them (its proxier of a family only sees Services with a clusterIP of
/// that family).
fn skip_other_family(name: &ObjectName, service: &ServiceRecord, out: &mut Translation) {
    let has_family = |ip: &IpAddr| {
        service
            .cluster_ips
            .iter()
            .any(|cluster_ip| cluster_ip.is_ipv4() == ip.is_ipv4())
    };
    let load_balancer_ips = if service.service_type == ServiceType::LoadBalancer {
        &service.load_balancer_ips[..]
    } else {
        &[]
    };
    for (field, ips) in [
        ("LoadBalancer ingress IP", load_balancer_ips),
        ("externalIP", &service.external_ips[..]),
    ] {
        for ip in ips.iter().filter(|ip| !has_family(ip)) {
            out.skipped.push(format!(
                "Service {name}: {field} {ip}: the Service has no {} clusterIP (spec.ipFamilies), not served",
                if ip.is_ipv4() { "IPv4" } else { "IPv6" }
            ));
        }
    }
}

/// The health-check node port of a Service with `externalTrafficPolicy:
/// Local` and `spec.healthCheckNodePort` (which the API server sets only for
/// LoadBalancer Services, and which load balancers probe to find the nodes
/// with local endpoints), added to `out`.
fn health_check(
    name: &ObjectName,
    service: &ServiceRecord,
    slices: &[(&ObjectName, &SliceRecord)],
    out: &mut Translation,
) {
    let Some(port) = service.health_check_node_port else {
        return;
    };
    if service.external_traffic_policy != TrafficPolicy::Local
        || !service.service_type.has_node_ports()
    {
        return;
    }
    // Of the primary family: a dual-stack endpoint has an address in each.
    let family = service
        .cluster_ips
        .first()
        .map_or(AddressType::Ipv4, |ip| AddressType::of(*ip));
    match valid_port(port) {
        Some(port) => out.health_checks.push(HealthCheck {
            service: name.clone(),
            port,
            local_endpoints: local_ready_endpoints(slices, family),
        }),
        None => out.skipped.push(format!(
            "Service {name}: invalid healthCheckNodePort {port}"
        )),
    }
}

/// The Service fields that shape each of its frontends beyond its
/// backends: session affinity, `externalTrafficPolicy: Local` (the
/// datapath side: no SNAT, see [`FRONTEND_FLAG_EXTERNAL_LOCAL`]) and
/// `loadBalancerSourceRanges`. Checked once per Service; what is invalid
/// is reported in [`Translation::skipped`].
struct FrontendSemantics {
    /// `sessionAffinity: ClientIP`: the timeout in seconds; 0: off.
    affinity_timeout_secs: u32,
    /// `externalTrafficPolicy: Local` on a NodePort or LoadBalancer Service.
    external_local: bool,
    /// The valid `loadBalancerSourceRanges` of both families, as network
    /// prefixes.
    source_ranges: Vec<ipnet::IpNet>,
}

impl FrontendSemantics {
    /// Reads and checks the fields of `service` (`name`), reporting what
    /// is invalid in `out`:
    /// - a `timeoutSeconds` outside `1..=86400` (which the API server
    ///   refuses, so only a file can bring one) keeps affinity on with the
    ///   default timeout, 10800 s: the Service asked for affinity, and the
    ///   default is what the API would have given it;
    /// - an entry of `loadBalancerSourceRanges` that is no CIDR is left
    ///   out, as kube-proxy leaves it out (the others still apply; with no
    ///   valid entry at all, every client is admitted, as by kube-proxy);
    ///   IPv6 ranges apply to IPv6 frontends only and IPv4 ranges to IPv4
    ///   ones (kube-proxy sorts the ranges by family the same way).
    fn of(name: &ObjectName, service: &ServiceRecord, out: &mut Translation) -> Self {
        let affinity_timeout_secs = match service.session_affinity {
            SessionAffinity::None => 0,
            SessionAffinity::ClientIp { timeout_seconds } => affinity_timeout(timeout_seconds)
                .unwrap_or_else(|invalid| {
                    out.skipped.push(format!(
                        "Service {name}: sessionAffinityConfig.clientIP.timeoutSeconds {invalid} \
                         is outside 1..=86400: session affinity uses the default, \
                         {AFFINITY_TIMEOUT_DEFAULT_SECS} s"
                    ));
                    AFFINITY_TIMEOUT_DEFAULT_SECS
                }),
        };
        let mut source_ranges = Vec::new();
        for range in service.load_balancer_source_ranges.iter() {
            match range.parse::<ipnet::IpNet>() {
                Ok(net) => source_ranges.push(net.trunc()),
                Err(_) => out.skipped.push(format!(
                    "Service {name}: loadBalancerSourceRanges entry {range:?} is not a CIDR, ignored"
                )),
            }
        }
        source_ranges.sort_unstable();
        source_ranges.dedup();
        FrontendSemantics {
            affinity_timeout_secs,
            external_local: service.external_traffic_policy == TrafficPolicy::Local
                && service.service_type.has_node_ports(),
            source_ranges,
        }
    }

    /// `frontend` with the Service's affinity, with
    /// [`FRONTEND_FLAG_EXTERNAL_LOCAL`] if it is an external frontend of an
    /// `externalTrafficPolicy: Local` Service, and with the source ranges
    /// if it is a LoadBalancer frontend.
    fn apply(&self, mut frontend: DesiredFrontend) -> DesiredFrontend {
        if self.affinity_timeout_secs != 0 {
            frontend.flags |= FRONTEND_FLAG_AFFINITY;
            frontend.affinity_timeout_secs = self.affinity_timeout_secs;
        }
        if self.external_local && frontend.flags & FRONTEND_FLAGS_EXTERNAL != 0 {
            frontend.flags |= FRONTEND_FLAG_EXTERNAL_LOCAL;
        }
        if frontend.flags & FRONTEND_FLAG_LOAD_BALANCER != 0 {
            frontend.source_ranges = self
                .source_ranges
                .iter()
                .filter(|range| range.addr().is_ipv4() == frontend.addr.is_ipv4())
                .copied()
                .collect();
        }
        frontend
    }

    /// `frontend`, the in-cluster entry ([`SCOPE_INTERNAL`]) of an
    /// external frontend of an `externalTrafficPolicy: Local` Service, with
    /// the Service's affinity; its source ranges are those of the
    /// [`SCOPE_ALL`] entry, which the datapath checks first.
    fn in_cluster(&self, frontend: DesiredFrontend) -> DesiredFrontend {
        let mut frontend = self.apply(frontend);
        frontend.flags &= !FRONTEND_FLAG_EXTERNAL_LOCAL;
        frontend.source_ranges.clear();
        frontend
    }
}

/// The backends of one Service port, by what they take.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PortBackends {
    /// Taking new flows.
    backends: Vec<DesiredBackend>,
    /// Kept for their flows only.
    draining: Vec<DesiredBackend>,
    /// `backends` are the serving and terminating fallback.
    fallback: bool,
}

impl PortBackends {
    /// [`FRONTEND_FLAG_TERMINATING_FALLBACK`] if the backends are the
    /// fallback, else nothing.
    fn fallback_flag(&self) -> u16 {
        if self.fallback {
            FRONTEND_FLAG_TERMINATING_FALLBACK
        } else {
            0
        }
    }
}

/// An endpoint listed for a Service port, with what endpoint selection
/// reads of its topology hints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ListedEndpoint {
    /// The backend it becomes.
    backend: DesiredBackend,
    /// It has a `forNodes` hint.
    has_node_hints: bool,
    /// Its `forNodes` hint names this node.
    for_this_node: bool,
    /// It has a `forZones` hint.
    has_zone_hints: bool,
    /// Its `forZones` hint names this node's zone.
    for_this_zone: bool,
}

/// Which endpoints topology hints restrict a Cluster policy to
/// (kube-proxy's `topologyModeFromHints`, pkg/proxy/topology.go).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    /// Every ready endpoint.
    All,
    /// The ready endpoints hinted for this node.
    SameNode,
    /// The ready endpoints hinted for this node's zone.
    SameZone,
}

/// The topology mode the ready endpoints' hints give: hints are used only
/// when every ready endpoint has one of the kind and at least one names
/// this node (for `forNodes`) or its zone (`forZones`); node hints before
/// zone hints. Otherwise, and without ready endpoints, every endpoint.
fn topology_mode(listed: &[ListedEndpoint]) -> TopologyMode {
    let ready = || {
        listed
            .iter()
            .filter(|e| e.backend.state == BackendState::Active)
    };
    if ready().next().is_none() {
        return TopologyMode::All;
    }
    if ready().all(|e| e.has_node_hints) && ready().any(|e| e.for_this_node) {
        return TopologyMode::SameNode;
    }
    if ready().all(|e| e.has_zone_hints) && ready().any(|e| e.for_this_zone) {
        return TopologyMode::SameZone;
    }
    TopologyMode::All
}

/// The endpoints a frontend under `policy` gives new flows to, as
/// kube-proxy's `CategorizeEndpoints` chooses them: `Local`, this node's
/// ready endpoints, else this node's serving and terminating ones, else
/// none (no topology: the policy already keeps traffic on the node);
/// `Cluster`, the ready endpoints topology hints leave (see
/// [`topology_mode`]), else every serving and terminating one. Every other
/// listed endpoint drains: it keeps the flows it has.
fn select_backends(listed: &[ListedEndpoint], policy: TrafficPolicy) -> PortBackends {
    let (chosen, fallback): (Vec<DesiredBackend>, bool) = match policy {
        TrafficPolicy::Local => {
            let local_in = |state: BackendState| -> Vec<DesiredBackend> {
                listed
                    .iter()
                    .filter(|e| e.backend.node_local && e.backend.state == state)
                    .map(|e| e.backend)
                    .collect()
            };
            let ready = local_in(BackendState::Active);
            if ready.is_empty() {
                let terminating = local_in(BackendState::Terminating);
                let fallback = !terminating.is_empty();
                (terminating, fallback)
            } else {
                (ready, false)
            }
        }
        TrafficPolicy::Cluster => {
            let mode = topology_mode(listed);
            let ready: Vec<DesiredBackend> = listed
                .iter()
                .filter(|e| e.backend.state == BackendState::Active)
                .filter(|e| match mode {
                    TopologyMode::All => true,
                    TopologyMode::SameNode => e.for_this_node,
                    TopologyMode::SameZone => e.for_this_zone,
                })
                .map(|e| e.backend)
                .collect();
            if ready.is_empty() {
                let terminating: Vec<DesiredBackend> = listed
                    .iter()
                    .filter(|e| e.backend.state == BackendState::Terminating)
                    .map(|e| e.backend)
                    .collect();
                let fallback = !terminating.is_empty();
                (terminating, fallback)
            } else {
                (ready, false)
            }
        }
    };
    let draining = listed
        .iter()
        .map(|e| e.backend)
        .filter(|b| !chosen.contains(b))
        .collect();
    PortBackends {
        backends: chosen,
        draining,
        fallback,
    }
}

/// Every endpoint of one Service port in the slices of `family` (IPv4
/// slices serve the IPv4 frontends, IPv6 slices the IPv6 ones): every
/// endpoint of every such slice that
/// has a port of the same name and protocol, at that slice's port number
/// (this is how a named `targetPort` resolves per pod), with its state
/// ([`backend_state`]) and what its hints say about this node and `zone`.
/// An address listed twice counts once, in its most serving state. Sorted
/// by address and port.
fn endpoints_for_port(
    slices: &[(&ObjectName, &SliceRecord)],
    service_port: &ServicePortRecord,
    proto: u8,
    family: AddressType,
    service: &ObjectName,
    zone: Option<&str>,
    out: &mut Translation,
) -> Vec<ListedEndpoint> {
    let wanted_name = &*service_port.name;
    let mut listed = Vec::new();
    for (slice_name, slice) in slices {
        if slice.address_type != family {
            continue;
        }
        let slice_port = slice
            .ports
            .iter()
            .find(|p| &*p.name == wanted_name && p.protocol.number() == Some(proto));
        let Some(slice_port) = slice_port else {
            continue;
        };
        let Some(port) = slice_port.port.and_then(valid_port) else {
            out.skipped.push(format!(
                "EndpointSlice {} of {service}: port {wanted_name:?} has no valid number",
                slice_name.name()
            ));
            continue;
        };
        for endpoint in slice.endpoints.iter() {
            // (The sources keep only addresses of the slice's type.)
            if AddressType::of(endpoint.addr) != family {
                continue;
            }
            let zones = slice.zones_of(endpoint);
            listed.push(ListedEndpoint {
                backend: DesiredBackend {
                    addr: endpoint.addr,
                    port,
                    node_local: endpoint.node_local,
                    state: backend_state(endpoint),
                },
                has_node_hints: endpoint.node_hint != NodeHint::None,
                for_this_node: endpoint.node_hint == NodeHint::ThisNode,
                has_zone_hints: !zones.is_empty(),
                for_this_zone: zone.is_some_and(|zone| zones.iter().any(|z| &**z == zone)),
            });
        }
    }
    // Each address and port once, in its most serving state.
    listed.sort_by_key(|e| (e.backend.addr, e.backend.port, e.backend.state));
    listed.dedup_by(|later, first| {
        later.backend.addr == first.backend.addr && later.backend.port == first.backend.port
    });
    listed
}

/// The number of this node's ready endpoints of a Service in the slices
/// of `family` (each address once, whatever its ports): what its
/// health-check node port reports.
fn local_ready_endpoints(slices: &[(&ObjectName, &SliceRecord)], family: AddressType) -> usize {
    let mut addrs: Vec<IpAddr> = slices
        .iter()
        .filter(|(_, slice)| slice.address_type == family)
        .flat_map(|(_, slice)| slice.endpoints.iter())
        .filter(|e| e.node_local && e.ready)
        .map(|e| e.addr)
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs.len()
}

/// The backend state an endpoint's conditions give: ready is active;
/// serving and terminating is terminating; anything else (not ready and not
/// serving, or serving without terminating, which the API does not
/// produce) is not serving.
fn backend_state(endpoint: &EndpointRecord) -> BackendState {
    if endpoint.ready {
        BackendState::Active
    } else if endpoint.serving && endpoint.terminating {
        BackendState::Terminating
    } else {
        BackendState::NotServing
    }
}

/// A port number in 1..=65535.
fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|port| *port != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::file::parse_documents;
    use service_common::{PROTO_TCP, PROTO_UDP};

    /// The cluster state of a YAML text, as the file source reads it on
    /// node `node-a`.
    fn state_of(yaml: &str) -> ClusterState {
        parse_documents(yaml, Some("node-a"))
            .unwrap()
            .into_cluster_state()
    }

    fn translate_yaml(yaml: &str) -> Translation {
        translate(&state_of(yaml), &NodeContext::default())
    }

    fn backends(frontend: &DesiredFrontend) -> Vec<String> {
        frontend
            .backends
            .iter()
            .map(|b| std::net::SocketAddr::new(b.addr, b.port).to_string())
            .collect()
    }

    const SERVICE: &str = r#"
kind: Service
apiVersion: v1
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
    - {name: http, port: 80, targetPort: web}
    - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
"#;

    fn slice(name: &str, ports: &str, endpoints: &str) -> String {
        format!(
            "---\nkind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: {ports}\nendpoints: {endpoints}\n"
        )
    }

    #[test]
    fn named_target_port_resolves_per_slice_and_numbered_port_per_name() {
        let yaml = format!(
            "{SERVICE}{}{}",
            slice(
                "web-a",
                "[{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]",
                "[{addresses: [10.1.1.2], nodeName: node-a}]"
            ),
            slice(
                "web-b",
                "[{name: http, port: 9090}]",
                "[{addresses: [10.1.2.2], nodeName: node-b}]"
            ),
        );
        let t = translate_yaml(&yaml);
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        assert_eq!(t.frontends.len(), 2);
        let http = t.frontends.iter().find(|f| f.proto == PROTO_TCP).unwrap();
        assert_eq!(http.addr.to_string(), "10.96.0.10");
        assert_eq!(http.port, 80);
        assert_eq!(http.flags, FRONTEND_FLAG_CLUSTER_IP);
        assert_eq!(backends(http), ["10.1.1.2:8080", "10.1.2.2:9090"]);
        assert!(http.backends[0].node_local);
        assert!(!http.backends[1].node_local);
        let dns = t.frontends.iter().find(|f| f.proto == PROTO_UDP).unwrap();
        assert_eq!(dns.port, 53);
        assert_eq!(backends(dns), ["10.1.1.2:5353"]);
    }

    #[test]
    fn ready_unset_counts_as_ready_and_not_ready_is_excluded() {
        let yaml = format!(
            "{SERVICE}{}",
            slice(
                "web-a",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.1.1.2]}, {addresses: [10.1.1.3], conditions: {ready: false}}, {addresses: [10.1.1.4], conditions: {ready: true}}]"
            )
        );
        let t = translate_yaml(&yaml);
        let http = t.frontends.iter().find(|f| f.proto == PROTO_TCP).unwrap();
        assert_eq!(backends(http), ["10.1.1.2:8080", "10.1.1.4:8080"]);
    }

    #[test]
    fn terminating_serving_endpoints_are_the_fallback_when_none_is_ready() {
        let yaml = format!(
            "{SERVICE}{}",
            slice(
                "web-a",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.1.1.2], conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.1.1.3], conditions: {ready: false, serving: false, terminating: true}}]"
            )
        );
        let t = translate_yaml(&yaml);
        let http = t.frontends.iter().find(|f| f.proto == PROTO_TCP).unwrap();
        assert_eq!(backends(http), ["10.1.1.2:8080"]);
        assert_ne!(http.flags & FRONTEND_FLAG_TERMINATING_FALLBACK, 0);
    }

    /// Address:port and state of each draining backend.
    fn draining(frontend: &DesiredFrontend) -> Vec<(String, BackendState)> {
        frontend
            .draining
            .iter()
            .map(|b| (format!("{}:{}", b.addr, b.port), b.state))
            .collect()
    }

    fn http(t: &Translation) -> &DesiredFrontend {
        t.frontends.iter().find(|f| f.proto == PROTO_TCP).unwrap()
    }

    #[test]
    fn a_terminating_endpoint_drains_while_others_are_ready() {
        let yaml = format!(
            "{SERVICE}{}",
            slice(
                "web-a",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.1.1.2]}, {addresses: [10.1.1.3], conditions: {ready: false, serving: true, terminating: true}}]"
            )
        );
        let t = translate_yaml(&yaml);
        let http = http(&t);
        assert_eq!(backends(http), ["10.1.1.2:8080"]);
        assert!(
            http.backends
                .iter()
                .all(|b| b.state == BackendState::Active)
        );
        assert_eq!(
            draining(http),
            [("10.1.1.3:8080".to_owned(), BackendState::Terminating)]
        );
        assert_eq!(http.flags & FRONTEND_FLAG_TERMINATING_FALLBACK, 0);
    }

    #[test]
    fn a_listed_endpoint_that_does_not_serve_is_kept_as_not_serving() {
        let yaml = format!(
            "{SERVICE}{}",
            slice(
                "web-a",
                "[{name: http, port: 8080}]",
                // Not ready; not serving while terminating; serving without
                // terminating (inconsistent: `ready` wins).
                "[{addresses: [10.1.1.2]}, {addresses: [10.1.1.3], conditions: {ready: false}}, {addresses: [10.1.1.4], conditions: {ready: false, serving: false, terminating: true}}, {addresses: [10.1.1.5], conditions: {ready: false, serving: true}}]"
            )
        );
        let t = translate_yaml(&yaml);
        let http = http(&t);
        assert_eq!(backends(http), ["10.1.1.2:8080"]);
        assert_eq!(
            draining(http),
            [
                ("10.1.1.3:8080".to_owned(), BackendState::NotServing),
                ("10.1.1.4:8080".to_owned(), BackendState::NotServing),
                ("10.1.1.5:8080".to_owned(), BackendState::NotServing),
            ]
        );
    }

    #[test]
    fn in_the_terminating_fallback_not_serving_endpoints_still_drain() {
        let yaml = format!(
            "{SERVICE}{}",
            slice(
                "web-a",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.1.1.2], conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.1.1.3], conditions: {ready: false, serving: false, terminating: true}}]"
            )
        );
        let t = translate_yaml(&yaml);
        let http = http(&t);
        assert_eq!(backends(http), ["10.1.1.2:8080"]);
        assert_eq!(http.backends[0].state, BackendState::Terminating);
        assert_eq!(
            draining(http),
            [("10.1.1.3:8080".to_owned(), BackendState::NotServing)]
        );
    }

    #[test]
    fn an_endpoint_listed_twice_counts_once_in_its_most_serving_state() {
        let yaml = format!(
            "{SERVICE}{}{}",
            slice(
                "web-a",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.1.1.2], conditions: {ready: false}}, {addresses: [10.1.1.3], conditions: {ready: false}}]"
            ),
            slice(
                "web-b",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.1.1.2]}, {addresses: [10.1.1.3], conditions: {ready: false, serving: true, terminating: true}}]"
            ),
        );
        let t = translate_yaml(&yaml);
        let http = http(&t);
        assert_eq!(backends(http), ["10.1.1.2:8080"]);
        assert_eq!(
            draining(http),
            [("10.1.1.3:8080".to_owned(), BackendState::Terminating)]
        );
    }

    #[test]
    fn an_endpoint_gone_from_every_slice_is_no_backend_at_all() {
        let before = format!(
            "{SERVICE}{}",
            slice(
                "web-a",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.1.1.2]}, {addresses: [10.1.1.3], conditions: {ready: false}}]"
            )
        );
        assert_eq!(draining(http(&translate_yaml(&before))).len(), 1);
        let after = before.replace(", {addresses: [10.1.1.3], conditions: {ready: false}}", "");
        let t = translate_yaml(&after);
        assert_eq!(backends(http(&t)), ["10.1.1.2:8080"]);
        assert!(http(&t).draining.is_empty());
    }

    #[test]
    fn a_service_without_endpoints_still_gets_an_empty_frontend() {
        let t = translate_yaml(SERVICE);
        assert_eq!(t.frontends.len(), 2);
        assert!(t.frontends.iter().all(|f| f.backends.is_empty()));
    }

    #[test]
    fn duplicate_endpoints_across_slices_count_once() {
        let yaml = format!(
            "{SERVICE}{}{}",
            slice(
                "web-a",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.1.1.2]}]"
            ),
            slice(
                "web-b",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.1.1.2]}]"
            ),
        );
        let t = translate_yaml(&yaml);
        let http = t.frontends.iter().find(|f| f.proto == PROTO_TCP).unwrap();
        assert_eq!(backends(http), ["10.1.1.2:8080"]);
    }

    #[test]
    fn slices_of_other_services_or_namespaces_are_ignored() {
        let other = "---\nkind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata:\n  name: x\n  namespace: other\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.9.9.9]}]\n";
        let t = translate_yaml(&format!("{SERVICE}{other}"));
        assert!(t.frontends.iter().all(|f| f.backends.is_empty()));
    }

    #[test]
    fn node_ports_load_balancer_ips_and_allowed_external_ips_become_frontends() {
        let yaml = format!(
            r#"
kind: Service
apiVersion: v1
metadata: {{name: web, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [10.99.0.200, 10.99.0.201]
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]
status:
  loadBalancer:
    ingress: [{{ip: 10.99.0.100}}, {{ip: 10.99.0.101, ipMode: Proxy}}, {{hostname: lb.example.org}}]
{}"#,
            slice(
                "web-a",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.1.1.2]}]"
            )
        );
        let t = translate(
            &state_of(&yaml),
            &NodeContext {
                nodeport_addresses: vec!["10.99.0.1".parse().unwrap(), "10.0.0.1".parse().unwrap()],
                external_ip_cidrs: vec!["10.99.0.200/32".parse().unwrap()],
            },
        );
        let mut got: Vec<String> = t
            .frontends
            .iter()
            .map(|f| {
                format!(
                    "{}:{} {:#x} {}",
                    f.addr,
                    f.port,
                    f.flags,
                    backends(f).join(",")
                )
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                "10.0.0.1:30080 0x2 10.1.1.2:8080",
                "10.96.0.10:80 0x1 10.1.1.2:8080",
                "10.99.0.100:80 0x8 10.1.1.2:8080",
                "10.99.0.1:30080 0x2 10.1.1.2:8080",
                "10.99.0.200:80 0x4 10.1.1.2:8080",
            ]
        );
        // The externalIP outside the allowed CIDRs is reported, not served.
        assert_eq!(t.skipped.len(), 1, "{:?}", t.skipped);
        assert!(t.skipped[0].contains("10.99.0.201"));
    }

    #[test]
    fn a_cluster_ip_service_gets_no_node_ports() {
        let yaml = SERVICE.replace("targetPort: web}", "targetPort: web, nodePort: 30080}");
        let t = translate(
            &state_of(&yaml),
            &NodeContext {
                nodeport_addresses: vec!["10.99.0.1".parse().unwrap()],
                ..NodeContext::default()
            },
        );
        assert!(
            t.frontends
                .iter()
                .all(|f| f.flags == FRONTEND_FLAG_CLUSTER_IP)
        );
    }

    #[test]
    fn headless_and_external_name_program_nothing() {
        let yaml = r#"
kind: Service
apiVersion: v1
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
kind: Service
apiVersion: v1
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.org}
"#;
        let t = translate_yaml(yaml);
        assert!(t.frontends.is_empty());
        let kinds: Vec<_> = t
            .not_programmed
            .iter()
            .map(|(n, k)| (n.name(), *k))
            .collect();
        assert_eq!(
            kinds,
            [
                ("ext", NotProgrammed::ExternalName),
                ("headless", NotProgrammed::Headless)
            ]
        );
    }

    #[test]
    fn invalid_values_are_skipped_with_a_reason_and_the_rest_kept() {
        let yaml = format!(
            r#"
kind: Service
apiVersion: v1
metadata: {{name: web}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 70000}}, {{name: ok, port: 81}}, {{name: s, port: 82, protocol: SCTP}}]
---
kind: Service
apiVersion: v1
metadata: {{name: broken}}
spec: {{clusterIP: 10.96.0.300, ports: [{{port: 80}}]}}
{}"#,
            slice(
                "web-a",
                "[{name: ok, port: 8080}]",
                "[{addresses: [not-an-ip, 10.1.1.2]}]"
            )
        );
        let t = translate_yaml(&yaml);
        assert_eq!(t.frontends.len(), 1);
        assert_eq!(t.frontends[0].port, 81);
        assert_eq!(backends(&t.frontends[0]), ["10.1.1.2:8080"]);
        assert_eq!(t.skipped.len(), 4, "{:#?}", t.skipped);
        // The SCTP port is not invalid but not served: reported apart.
        assert_eq!(t.unsupported.len(), 1, "{:#?}", t.unsupported);
        assert!(t.unsupported[0].contains("SCTP"), "{:?}", t.unsupported);
    }

    /// A Service `web` of `type` with `spec_extra` added to its spec, one
    /// port `http` (80, nodePort 30080, UDP also served on 53), and one
    /// slice of `endpoints`.
    fn policy_yaml(service_type: &str, spec_extra: &str, endpoints: &str) -> String {
        format!(
            "kind: Service\napiVersion: v1\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: {service_type}\n  clusterIP: 10.96.0.10\n  externalIPs: [10.99.0.200]\n  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]\n{spec_extra}status: {{loadBalancer: {{ingress: [{{ip: 10.99.0.100}}]}}}}\n{}",
            slice("web-a", "[{name: http, port: 8080}]", endpoints)
        )
    }

    /// Translates `yaml` on node `node-a` with NodePorts on 10.0.0.1 and
    /// externalIPs allowed; returns `(flags, backends)` per frontend kind:
    /// ClusterIP, NodePort, LoadBalancer, externalIP.
    fn by_kind(yaml: &str) -> Vec<(u16, Vec<String>)> {
        let t = translate(
            &state_of(yaml),
            &NodeContext {
                nodeport_addresses: vec!["10.0.0.1".parse().unwrap()],
                external_ip_cidrs: vec!["10.99.0.0/24".parse().unwrap()],
            },
        );
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        [
            FRONTEND_FLAG_CLUSTER_IP,
            FRONTEND_FLAG_NODE_PORT,
            FRONTEND_FLAG_LOAD_BALANCER,
            FRONTEND_FLAG_EXTERNAL_IP,
        ]
        .iter()
        .map(|kind| {
            let f = t
                .frontends
                .iter()
                .find(|f| f.flags & kind != 0)
                .unwrap_or_else(|| panic!("no frontend of kind {kind:#x}: {:?}", t.frontends));
            (f.flags, backends(f))
        })
        .collect()
    }

    const LOCAL_AND_REMOTE: &str = "[{addresses: [10.1.1.2], nodeName: node-a}, {addresses: [10.1.2.2], nodeName: node-b}, {addresses: [10.1.1.3], nodeName: node-a, conditions: {ready: false}}]";

    #[test]
    fn external_traffic_policy_local_gives_external_frontends_only_local_ready_endpoints() {
        let got = by_kind(&policy_yaml(
            "LoadBalancer",
            "  externalTrafficPolicy: Local\n",
            LOCAL_AND_REMOTE,
        ));
        // ClusterIP keeps every ready endpoint; NodePort, LoadBalancer and
        // externalIP only the local ready one.
        assert_eq!(got[0].1, ["10.1.1.2:8080", "10.1.2.2:8080"]);
        assert_eq!(got[0].0 & FRONTEND_FLAG_LOCAL_ONLY, 0);
        for (flags, external) in &got[1..] {
            assert_eq!(external, &["10.1.1.2:8080"]);
            assert_ne!(flags & FRONTEND_FLAG_LOCAL_ONLY, 0);
        }
        // Cluster (and unset): every ready endpoint everywhere.
        let got = by_kind(&policy_yaml(
            "LoadBalancer",
            "  externalTrafficPolicy: Cluster\n",
            LOCAL_AND_REMOTE,
        ));
        assert!(
            got.iter()
                .all(|(_, b)| b == &["10.1.1.2:8080", "10.1.2.2:8080"])
        );
    }

    #[test]
    fn external_traffic_policy_local_falls_back_to_local_terminating_then_to_nothing() {
        let terminating = "[{addresses: [10.1.1.2], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.1.2.2], nodeName: node-b}]";
        let got = by_kind(&policy_yaml(
            "LoadBalancer",
            "  externalTrafficPolicy: Local\n",
            terminating,
        ));
        assert_eq!(got[1].1, ["10.1.1.2:8080"]);
        assert_ne!(got[1].0 & FRONTEND_FLAG_TERMINATING_FALLBACK, 0);
        // The ClusterIP has a ready endpoint: no fallback there.
        assert_eq!(got[0].1, ["10.1.2.2:8080"]);
        assert_eq!(got[0].0 & FRONTEND_FLAG_TERMINATING_FALLBACK, 0);
        // No local endpoint at all: programmed without backends (the
        // datapath drops or refuses), never sent to node-b.
        let remote_only = "[{addresses: [10.1.2.2], nodeName: node-b}]";
        let t = translate(
            &state_of(&policy_yaml(
                "NodePort",
                "  externalTrafficPolicy: Local\n",
                remote_only,
            )),
            &NodeContext {
                nodeport_addresses: vec!["10.0.0.1".parse().unwrap()],
                ..NodeContext::default()
            },
        );
        let node_port = t
            .frontends
            .iter()
            .find(|f| f.flags & FRONTEND_FLAG_NODE_PORT != 0)
            .unwrap();
        assert!(node_port.backends.is_empty());
        // The remote endpoint stays in the backends map for flows it has.
        assert_eq!(node_port.draining.len(), 1);
    }

    #[test]
    fn internal_traffic_policy_local_gives_cluster_ips_only_local_endpoints() {
        let got = by_kind(&policy_yaml(
            "LoadBalancer",
            "  internalTrafficPolicy: Local\n",
            LOCAL_AND_REMOTE,
        ));
        assert_eq!(got[0].1, ["10.1.1.2:8080"]);
        for (_, external) in &got[1..] {
            assert_eq!(external, &["10.1.1.2:8080", "10.1.2.2:8080"]);
        }
        let got = by_kind(&policy_yaml(
            "LoadBalancer",
            "  internalTrafficPolicy: Local\n",
            "[{addresses: [10.1.2.2], nodeName: node-b}]",
        ));
        assert!(got[0].1.is_empty(), "{got:?}");
        assert_eq!(got[1].1, ["10.1.2.2:8080"]);
    }

    #[test]
    fn unknown_traffic_policies_are_reported_and_cluster_is_used() {
        let t = translate_yaml(&policy_yaml(
            "NodePort",
            "  externalTrafficPolicy: Nearby\n  internalTrafficPolicy: local\n",
            LOCAL_AND_REMOTE,
        ));
        // (And the externalIP outside the default, empty, CIDRs.)
        assert_eq!(t.skipped.len(), 3, "{:?}", t.skipped);
        assert!(t.skipped[0].contains("Nearby"), "{:?}", t.skipped);
        assert!(t.frontends.iter().all(|f| f.backends.len() == 2));
    }

    /// Endpoint `addr` on `node` with `hints`.
    fn hinted(addr: &str, node: &str, hints: &str) -> String {
        format!("{{addresses: [{addr}], nodeName: {node}, hints: {hints}}}")
    }

    /// The ClusterIP's backends of `endpoints` seen from node-a in `zone`.
    fn cluster_ip_backends(
        zone: Option<&str>,
        distribution: &str,
        endpoints: &[String],
    ) -> Vec<String> {
        let node = zone.map_or(String::new(), |zone| {
            format!("---\nkind: Node\napiVersion: v1\nmetadata: {{name: node-a, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n")
        });
        let yaml = format!(
            "{}{node}",
            policy_yaml(
                "ClusterIP",
                distribution,
                &format!("[{}]", endpoints.join(", "))
            )
        );
        let t = translate_yaml(&yaml);
        backends(
            t.frontends
                .iter()
                .find(|f| f.flags == FRONTEND_FLAG_CLUSTER_IP)
                .unwrap_or_else(|| panic!("{t:?}")),
        )
    }

    #[test]
    fn zone_hints_keep_traffic_in_the_zone_when_every_ready_endpoint_has_one() {
        let endpoints = [
            hinted("10.1.1.2", "node-a", "{forZones: [{name: zone-a}]}"),
            hinted("10.1.2.2", "node-b", "{forZones: [{name: zone-b}]}"),
            hinted(
                "10.1.3.2",
                "node-c",
                "{forZones: [{name: zone-a}, {name: zone-c}]}",
            ),
        ];
        let both = ["10.1.1.2:8080", "10.1.3.2:8080"];
        assert_eq!(
            cluster_ip_backends(
                Some("zone-a"),
                "  trafficDistribution: PreferSameZone\n",
                &endpoints
            ),
            both
        );
        // PreferClose is the same; the hints decide, as in kube-proxy, so
        // unset too.
        assert_eq!(
            cluster_ip_backends(
                Some("zone-a"),
                "  trafficDistribution: PreferClose\n",
                &endpoints
            ),
            both
        );
        assert_eq!(cluster_ip_backends(Some("zone-a"), "", &endpoints), both);
        assert_eq!(
            cluster_ip_backends(Some("zone-b"), "", &endpoints),
            ["10.1.2.2:8080"]
        );
    }

    #[test]
    fn zone_hints_fall_back_to_every_endpoint() {
        let all = ["10.1.1.2:8080", "10.1.2.2:8080"];
        let a = hinted("10.1.1.2", "node-a", "{forZones: [{name: zone-a}]}");
        let b = hinted("10.1.2.2", "node-b", "{forZones: [{name: zone-b}]}");
        // No hint for this node's zone.
        assert_eq!(
            cluster_ip_backends(Some("zone-c"), "", &[a.clone(), b.clone()]),
            all
        );
        // This node has no zone label.
        assert_eq!(cluster_ip_backends(None, "", &[a.clone(), b.clone()]), all);
        // One ready endpoint without a hint.
        let plain = "{addresses: [10.1.2.2], nodeName: node-b}".to_owned();
        assert_eq!(
            cluster_ip_backends(Some("zone-a"), "", &[a.clone(), plain]),
            all
        );
        // A not-ready endpoint without hints does not matter.
        let not_ready = "{addresses: [10.1.3.2], conditions: {ready: false}}".to_owned();
        assert_eq!(
            cluster_ip_backends(Some("zone-a"), "", &[a.clone(), b.clone(), not_ready]),
            ["10.1.1.2:8080"]
        );
        // The zone's only endpoint is not ready: the hints still say zone-b
        // only for the ready ones, none of them for zone-a: all of them.
        let a_not_ready = "{addresses: [10.1.1.2], nodeName: node-a, conditions: {ready: false}, hints: {forZones: [{name: zone-a}]}}".to_owned();
        assert_eq!(
            cluster_ip_backends(Some("zone-a"), "", &[a_not_ready, b]),
            ["10.1.2.2:8080"]
        );
    }

    #[test]
    fn node_hints_come_before_zone_hints_and_fall_back_like_them() {
        let a = hinted(
            "10.1.1.2",
            "node-a",
            "{forNodes: [{name: node-a}], forZones: [{name: zone-b}]}",
        );
        let b = hinted(
            "10.1.2.2",
            "node-b",
            "{forNodes: [{name: node-b}], forZones: [{name: zone-b}]}",
        );
        assert_eq!(
            cluster_ip_backends(
                Some("zone-b"),
                "  trafficDistribution: PreferSameNode\n",
                &[a, b.clone()]
            ),
            ["10.1.1.2:8080"]
        );
        // No endpoint for this node: the zone hints apply.
        let c = hinted(
            "10.1.3.2",
            "node-c",
            "{forNodes: [{name: node-c}], forZones: [{name: zone-a}]}",
        );
        assert_eq!(
            cluster_ip_backends(Some("zone-b"), "", &[b.clone(), c.clone()]),
            ["10.1.2.2:8080"]
        );
        // Neither: all.
        assert_eq!(
            cluster_ip_backends(Some("zone-x"), "", &[b, c]),
            ["10.1.2.2:8080", "10.1.3.2:8080"]
        );
    }

    #[test]
    fn traffic_policy_local_comes_before_topology() {
        // The local endpoint is hinted for another zone: Local still takes
        // it (topology does not apply to Local), Cluster follows the hints.
        let endpoints = format!(
            "[{}, {}]",
            hinted("10.1.1.2", "node-a", "{forZones: [{name: zone-b}]}"),
            hinted("10.1.2.2", "node-b", "{forZones: [{name: zone-a}]}")
        );
        let yaml = format!(
            "{}---\nkind: Node\napiVersion: v1\nmetadata: {{name: node-a, labels: {{topology.kubernetes.io/zone: zone-a}}}}\n",
            policy_yaml("NodePort", "  externalTrafficPolicy: Local\n", &endpoints)
        );
        let got = by_kind_of(&yaml);
        assert_eq!(got.0, ["10.1.2.2:8080"]);
        assert_eq!(got.1, ["10.1.1.2:8080"]);
    }

    /// The ClusterIP's and the NodePort's backends.
    fn by_kind_of(yaml: &str) -> (Vec<String>, Vec<String>) {
        let t = translate(
            &state_of(yaml),
            &NodeContext {
                nodeport_addresses: vec!["10.0.0.1".parse().unwrap()],
                ..NodeContext::default()
            },
        );
        let of = |kind| backends(t.frontends.iter().find(|f| f.flags & kind != 0).unwrap());
        (of(FRONTEND_FLAG_CLUSTER_IP), of(FRONTEND_FLAG_NODE_PORT))
    }

    #[test]
    fn an_unknown_traffic_distribution_is_reported_as_unsupported_and_hints_still_apply() {
        let t = translate_yaml(&policy_yaml(
            "ClusterIP",
            "  trafficDistribution: PreferFarAway\n",
            LOCAL_AND_REMOTE,
        ));
        assert_eq!(t.unsupported.len(), 1, "{:?}", t.unsupported);
        assert!(t.unsupported[0].contains("PreferFarAway"));
    }

    #[test]
    fn health_check_node_ports_count_local_ready_endpoints_with_external_policy_local_only() {
        let with = |extra: &str, endpoints: &str| {
            translate(
                &state_of(&policy_yaml("LoadBalancer", extra, endpoints)),
                &NodeContext {
                    external_ip_cidrs: vec!["10.99.0.0/24".parse().unwrap()],
                    ..NodeContext::default()
                },
            )
        };
        let t = with(
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
            LOCAL_AND_REMOTE,
        );
        assert_eq!(
            t.health_checks,
            [HealthCheck {
                service: ObjectName::new("default", "web"),
                port: 32000,
                local_endpoints: 1,
            }]
        );
        let t = with(
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
            "[{addresses: [10.1.2.2], nodeName: node-b}]",
        );
        assert_eq!(t.health_checks[0].local_endpoints, 0);
        // Back to Cluster: no port.
        let t = with(
            "  externalTrafficPolicy: Cluster\n  healthCheckNodePort: 32000\n",
            LOCAL_AND_REMOTE,
        );
        assert!(t.health_checks.is_empty());
        // Invalid numbers are reported.
        for bad in ["0", "-1", "70000"] {
            let t = with(
                &format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {bad}\n"),
                LOCAL_AND_REMOTE,
            );
            assert!(t.health_checks.is_empty());
            assert_eq!(t.skipped.len(), 1, "{:?}", t.skipped);
            assert!(t.skipped[0].contains("healthCheckNodePort"));
        }
    }

    /// A LoadBalancer Service `lb` with a NodePort, an externalIP (allowed)
    /// and an ingress IP, one endpoint, and `extra` spec lines.
    fn lb_service(extra: &str) -> Translation {
        let yaml = format!(
            r#"
kind: Service
apiVersion: v1
metadata: {{name: lb, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalIPs: [10.99.0.200]
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]
{extra}
status:
  loadBalancer:
    ingress: [{{ip: 10.99.0.100}}]
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata:
  name: lb-a
  namespace: default
  labels: {{kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.1.1.2], nodeName: node-a}}]
"#
        );
        translate(
            &state_of(&yaml),
            &NodeContext {
                nodeport_addresses: vec!["10.99.0.1".parse().unwrap()],
                external_ip_cidrs: vec!["10.99.0.0/24".parse().unwrap()],
            },
        )
    }

    /// The frontend of kind `kind` (`FRONTEND_FLAG_*`).
    fn of_kind(t: &Translation, kind: u16) -> &DesiredFrontend {
        t.frontends
            .iter()
            .find(|f| f.flags & kind != 0)
            .unwrap_or_else(|| panic!("no frontend of kind {kind:#x}: {:#?}", t.frontends))
    }

    const KINDS: [u16; 4] = [
        FRONTEND_FLAG_CLUSTER_IP,
        FRONTEND_FLAG_NODE_PORT,
        FRONTEND_FLAG_LOAD_BALANCER,
        FRONTEND_FLAG_EXTERNAL_IP,
    ];

    #[test]
    fn client_ip_affinity_applies_to_every_frontend_with_its_timeout() {
        let t = lb_service("  sessionAffinity: ClientIP");
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        for kind in KINDS {
            let f = of_kind(&t, kind);
            assert_ne!(f.flags & FRONTEND_FLAG_AFFINITY, 0);
            assert_eq!(f.affinity_timeout_secs, 10_800, "the default");
        }
        let t = lb_service(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}}",
        );
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        assert!(
            t.frontends
                .iter()
                .all(|f| f.affinity_timeout_secs == 86_400)
        );
        let t = lb_service(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}",
        );
        assert!(t.frontends.iter().all(|f| f.affinity_timeout_secs == 2));
    }

    #[test]
    fn an_invalid_affinity_timeout_is_reported_and_the_default_used() {
        for invalid in ["-5", "0", "86401"] {
            let t = lb_service(&format!(
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {invalid}}}}}"
            ));
            assert_eq!(t.skipped.len(), 1, "{invalid}: {:?}", t.skipped);
            assert!(
                t.skipped[0].contains("default/lb")
                    && t.skipped[0].contains(&format!("timeoutSeconds {invalid}"))
                    && t.skipped[0].contains("1..=86400"),
                "{:?}",
                t.skipped
            );
            assert!(t.frontends.iter().all(|f| {
                f.flags & FRONTEND_FLAG_AFFINITY != 0 && f.affinity_timeout_secs == 10_800
            }));
        }
    }

    #[test]
    fn affinity_off_or_none_programs_no_affinity() {
        for spec in [
            "",
            "  sessionAffinity: None",
            "  sessionAffinity: None\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}",
        ] {
            let t = lb_service(spec);
            assert!(t.frontends.iter().all(|f| {
                f.flags & FRONTEND_FLAG_AFFINITY == 0 && f.affinity_timeout_secs == 0
            }));
        }
    }

    #[test]
    fn external_traffic_policy_local_marks_only_external_frontends() {
        let t = lb_service("  externalTrafficPolicy: Local");
        for kind in [
            FRONTEND_FLAG_NODE_PORT,
            FRONTEND_FLAG_LOAD_BALANCER,
            FRONTEND_FLAG_EXTERNAL_IP,
        ] {
            let external = of_kind(&t, kind);
            assert_ne!(external.flags & FRONTEND_FLAG_EXTERNAL_LOCAL, 0);
            assert_eq!(external.scope, SCOPE_ALL);
            // Its in-cluster entry (for pods and the node): the same
            // address, kind and affinity, the cluster-wide backends, no
            // Local flags, and no source ranges of its own.
            let in_cluster: Vec<&DesiredFrontend> = t
                .frontends
                .iter()
                .filter(|f| f.scope == SCOPE_INTERNAL && f.flags & kind != 0)
                .collect();
            assert_eq!(in_cluster.len(), 1, "{kind:#x}: {:#?}", t.frontends);
            let in_cluster = in_cluster[0];
            assert_eq!(
                (in_cluster.addr, in_cluster.port, in_cluster.proto),
                (external.addr, external.port, external.proto)
            );
            assert_eq!(
                in_cluster.flags & (FRONTEND_FLAG_EXTERNAL_LOCAL | FRONTEND_FLAG_LOCAL_ONLY),
                0
            );
            assert_eq!(in_cluster.backends, external.backends);
            assert!(in_cluster.source_ranges.is_empty());
        }
        let cluster_ip = of_kind(&t, FRONTEND_FLAG_CLUSTER_IP);
        assert_eq!(cluster_ip.flags & FRONTEND_FLAG_EXTERNAL_LOCAL, 0);
        assert_eq!(t.frontends.len(), 7);
        let t = lb_service("  externalTrafficPolicy: Cluster");
        assert!(
            t.frontends
                .iter()
                .all(|f| f.flags & FRONTEND_FLAG_EXTERNAL_LOCAL == 0 && f.scope == SCOPE_ALL)
        );
        // A ClusterIP Service's externalIPs: the policy does not apply (as
        // in kube-proxy, which reads it only for NodePort and LoadBalancer).
        let yaml = r#"
kind: Service
apiVersion: v1
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  externalIPs: [10.99.0.200]
  externalTrafficPolicy: Local
  ports: [{port: 80}]
"#;
        let t = translate(
            &state_of(yaml),
            &NodeContext {
                external_ip_cidrs: vec!["10.99.0.0/24".parse().unwrap()],
                ..NodeContext::default()
            },
        );
        assert!(
            t.frontends
                .iter()
                .all(|f| f.flags & FRONTEND_FLAG_EXTERNAL_LOCAL == 0)
        );
    }

    #[test]
    fn source_ranges_apply_to_load_balancer_frontends_only() {
        let t =
            lb_service("  loadBalancerSourceRanges: [10.0.0.0/8, ' 192.168.1.7/24 ', 10.0.0.0/8]");
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        let lb = of_kind(&t, FRONTEND_FLAG_LOAD_BALANCER);
        let ranges: Vec<String> = lb.source_ranges.iter().map(ToString::to_string).collect();
        // Host bits cleared, duplicates once, sorted.
        assert_eq!(ranges, ["10.0.0.0/8", "192.168.1.0/24"]);
        for kind in [
            FRONTEND_FLAG_CLUSTER_IP,
            FRONTEND_FLAG_NODE_PORT,
            FRONTEND_FLAG_EXTERNAL_IP,
        ] {
            assert!(of_kind(&t, kind).source_ranges.is_empty());
        }
    }

    #[test]
    fn an_invalid_source_range_is_reported_and_ignored_like_kube_proxy() {
        let t = lb_service(
            "  loadBalancerSourceRanges: [10.0.0.0/8, not-a-cidr, 10.1.2.3, 300.0.0.0/8, 'fd00::/8']",
        );
        let lb = of_kind(&t, FRONTEND_FLAG_LOAD_BALANCER);
        let ranges: Vec<String> = lb.source_ranges.iter().map(ToString::to_string).collect();
        // The valid IPv4 range stays; IPv6 ranges do not apply to IPv4.
        assert_eq!(ranges, ["10.0.0.0/8"]);
        assert_eq!(t.skipped.len(), 3, "{:?}", t.skipped);
        for (line, bad) in t
            .skipped
            .iter()
            .zip(["not-a-cidr", "10.1.2.3", "300.0.0.0/8"])
        {
            assert!(
                line.contains("default/lb")
                    && line.contains(&format!("{bad:?}"))
                    && line.contains("not a CIDR, ignored"),
                "{line}"
            );
        }
        // Nothing valid at all: every client admitted, as by kube-proxy.
        let t = lb_service("  loadBalancerSourceRanges: [nope]");
        assert!(
            of_kind(&t, FRONTEND_FLAG_LOAD_BALANCER)
                .source_ranges
                .is_empty()
        );
        assert_eq!(t.skipped.len(), 1);
    }

    /// A Service `web` with `families` spec lines (clusterIP(s), ipFamilies,
    /// ipFamilyPolicy), type LoadBalancer, one port (80 to 8080, nodePort
    /// 30080), externalIPs and ingress IPs of both families, and an IPv4
    /// and an IPv6 slice, each with a local and a remote endpoint.
    fn dual_stack_yaml(families: &str) -> String {
        format!(
            r#"
kind: Service
apiVersion: v1
metadata: {{name: web, namespace: default}}
spec:
  type: LoadBalancer
{families}
  externalIPs: [10.99.0.200, "2001:db8:99::200"]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [10.0.0.0/8, "2001:db8::/32"]
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]
status:
  loadBalancer:
    ingress: [{{ip: 10.99.0.100}}, {{ip: "2001:db8:99::100"}}]
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata:
  name: web-v4
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.1.1.2], nodeName: node-a}}, {{addresses: [10.1.2.2], nodeName: node-b}}]
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata:
  name: web-v6
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{{name: http, port: 8080}}]
endpoints:
  - addresses: ["fd00:1:1::2"]
    nodeName: node-a
  - addresses: [fd00:1:2::2]
    nodeName: node-b
"#
        )
    }

    /// A node with NodePort addresses and allowed externalIPs of both
    /// families.
    fn dual_stack_node() -> NodeContext {
        NodeContext {
            nodeport_addresses: vec![
                "10.99.0.1".parse().unwrap(),
                "2001:db8:99::1".parse().unwrap(),
            ],
            external_ip_cidrs: vec![
                "10.99.0.0/24".parse().unwrap(),
                "2001:db8:99::/64".parse().unwrap(),
            ],
        }
    }

    /// Every frontend as `address:port kind backends (draining)`, sorted.
    fn frontends(t: &Translation) -> Vec<String> {
        let mut out: Vec<String> = t
            .frontends
            .iter()
            .map(|f| {
                let kind = match f.flags & (FRONTEND_FLAG_CLUSTER_IP | FRONTEND_FLAGS_EXTERNAL) {
                    FRONTEND_FLAG_CLUSTER_IP => "ClusterIP",
                    FRONTEND_FLAG_NODE_PORT => "NodePort",
                    FRONTEND_FLAG_LOAD_BALANCER => "LoadBalancer",
                    _ => "ExternalIP",
                };
                let kind = if f.scope == SCOPE_INTERNAL {
                    format!("{kind} in-cluster")
                } else {
                    kind.to_owned()
                };
                let draining: Vec<String> = f
                    .draining
                    .iter()
                    .map(|b| std::net::SocketAddr::new(b.addr, b.port).to_string())
                    .collect();
                format!(
                    "{} {kind} {} ({})",
                    std::net::SocketAddr::new(f.addr, f.port),
                    backends(f).join(","),
                    draining.join(",")
                )
            })
            .collect();
        out.sort();
        out
    }

    const DUAL_STACK: &str = "  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00:96::10\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: PreferDualStack";

    #[test]
    fn a_dual_stack_service_gets_the_frontends_of_each_family_with_that_familys_endpoints() {
        let t = translate(&state_of(&dual_stack_yaml(DUAL_STACK)), &dual_stack_node());
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        // externalTrafficPolicy: Local: the external frontends take the
        // local endpoint of their family, the remote one drains; their
        // in-cluster entries take both.
        assert_eq!(
            frontends(&t),
            [
                "10.96.0.10:80 ClusterIP 10.1.1.2:8080,10.1.2.2:8080 ()",
                "10.99.0.100:80 LoadBalancer 10.1.1.2:8080 (10.1.2.2:8080)",
                "10.99.0.100:80 LoadBalancer in-cluster 10.1.1.2:8080,10.1.2.2:8080 ()",
                "10.99.0.1:30080 NodePort 10.1.1.2:8080 (10.1.2.2:8080)",
                "10.99.0.1:30080 NodePort in-cluster 10.1.1.2:8080,10.1.2.2:8080 ()",
                "10.99.0.200:80 ExternalIP 10.1.1.2:8080 (10.1.2.2:8080)",
                "10.99.0.200:80 ExternalIP in-cluster 10.1.1.2:8080,10.1.2.2:8080 ()",
                "[2001:db8:99::100]:80 LoadBalancer [fd00:1:1::2]:8080 ([fd00:1:2::2]:8080)",
                "[2001:db8:99::100]:80 LoadBalancer in-cluster [fd00:1:1::2]:8080,[fd00:1:2::2]:8080 ()",
                "[2001:db8:99::1]:30080 NodePort [fd00:1:1::2]:8080 ([fd00:1:2::2]:8080)",
                "[2001:db8:99::1]:30080 NodePort in-cluster [fd00:1:1::2]:8080,[fd00:1:2::2]:8080 ()",
                "[2001:db8:99::200]:80 ExternalIP [fd00:1:1::2]:8080 ([fd00:1:2::2]:8080)",
                "[2001:db8:99::200]:80 ExternalIP in-cluster [fd00:1:1::2]:8080,[fd00:1:2::2]:8080 ()",
                "[fd00:96::10]:80 ClusterIP [fd00:1:1::2]:8080,[fd00:1:2::2]:8080 ()",
            ]
        );
        // Each LoadBalancer frontend gets the source ranges of its family
        // (the datapath checks them on that entry before it takes the
        // in-cluster one).
        for f in t
            .frontends
            .iter()
            .filter(|f| f.flags & FRONTEND_FLAG_LOAD_BALANCER != 0 && f.scope == SCOPE_ALL)
        {
            let ranges: Vec<String> = f.source_ranges.iter().map(ToString::to_string).collect();
            let want = if f.addr.is_ipv4() {
                "10.0.0.0/8"
            } else {
                "2001:db8::/32"
            };
            assert_eq!(ranges, [want]);
        }
        // The health check counts the local endpoints of the primary
        // family: a dual-stack pod is one endpoint, not two.
        assert_eq!(t.health_checks[0].local_endpoints, 1);
        // Both families are served whole: nothing is reported.
        assert!(t.unsupported.is_empty(), "{:#?}", t.unsupported);
    }

    #[test]
    fn the_ipv6_family_may_come_first() {
        let families = "  clusterIP: fd00:96::10\n  clusterIPs: [\"fd00:96::10\", 10.96.0.10]\n  ipFamilies: [IPv6, IPv4]\n  ipFamilyPolicy: RequireDualStack";
        let t = translate(&state_of(&dual_stack_yaml(families)), &dual_stack_node());
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        // Four per family, and the in-cluster entries of the three
        // external ones.
        assert_eq!(t.frontends.len(), 14);
        // The primary family's frontends come first.
        assert_eq!(t.frontends[0].addr.to_string(), "fd00:96::10");
        // The health check counts the IPv6 slice's local endpoints.
        assert_eq!(t.health_checks[0].local_endpoints, 1);
    }

    #[test]
    fn a_single_stack_ipv4_service_gets_no_ipv6_frontend_and_no_ipv6_endpoint() {
        for families in [
            "  clusterIP: 10.96.0.10",
            "  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10]\n  ipFamilies: [IPv4]\n  ipFamilyPolicy: SingleStack",
            // PreferDualStack on a single-stack cluster: one family.
            "  clusterIPs: [10.96.0.10]\n  ipFamilies: [IPv4]\n  ipFamilyPolicy: PreferDualStack",
        ] {
            let t = translate(&state_of(&dual_stack_yaml(families)), &dual_stack_node());
            assert!(t.frontends.iter().all(|f| f.addr.is_ipv4()), "{families}");
            assert!(
                t.frontends
                    .iter()
                    .flat_map(|f| f.backends.iter().chain(&f.draining))
                    .all(|b| b.addr.is_ipv4())
            );
            assert_eq!(t.frontends.len(), 7);
            assert!(t.unsupported.is_empty(), "{:?}", t.unsupported);
            // The IPv6 externalIP and ingress IP have no clusterIP of their
            // family: reported, not served (as by kube-proxy).
            assert_eq!(t.skipped.len(), 2, "{families}: {:#?}", t.skipped);
            assert!(
                t.skipped[0].contains("LoadBalancer ingress IP 2001:db8:99::100")
                    && t.skipped[1].contains("externalIP 2001:db8:99::200")
                    && t.skipped
                        .iter()
                        .all(|line| line.contains("has no IPv6 clusterIP")),
                "{:#?}",
                t.skipped
            );
        }
    }

    #[test]
    fn a_single_stack_ipv6_service_gets_only_ipv6_frontends_and_endpoints() {
        let families = "  clusterIP: fd00:96::10\n  clusterIPs: [\"fd00:96::10\"]\n  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack";
        let t = translate(&state_of(&dual_stack_yaml(families)), &dual_stack_node());
        assert_eq!(
            frontends(&t),
            [
                "[2001:db8:99::100]:80 LoadBalancer [fd00:1:1::2]:8080 ([fd00:1:2::2]:8080)",
                "[2001:db8:99::100]:80 LoadBalancer in-cluster [fd00:1:1::2]:8080,[fd00:1:2::2]:8080 ()",
                "[2001:db8:99::1]:30080 NodePort [fd00:1:1::2]:8080 ([fd00:1:2::2]:8080)",
                "[2001:db8:99::1]:30080 NodePort in-cluster [fd00:1:1::2]:8080,[fd00:1:2::2]:8080 ()",
                "[2001:db8:99::200]:80 ExternalIP [fd00:1:1::2]:8080 ([fd00:1:2::2]:8080)",
                "[2001:db8:99::200]:80 ExternalIP in-cluster [fd00:1:1::2]:8080,[fd00:1:2::2]:8080 ()",
                "[fd00:96::10]:80 ClusterIP [fd00:1:1::2]:8080,[fd00:1:2::2]:8080 ()",
            ]
        );
        assert!(t.unsupported.is_empty(), "{:#?}", t.unsupported);
        assert_eq!(t.skipped.len(), 2, "{:#?}", t.skipped);
        assert!(
            t.skipped
                .iter()
                .all(|line| line.contains("has no IPv4 clusterIP"))
        );
        // IPv4 source ranges do not apply to the IPv6 LoadBalancer IP.
        let lb = of_kind(&t, FRONTEND_FLAG_LOAD_BALANCER);
        assert_eq!(lb.source_ranges.len(), 1);
        assert!(lb.source_ranges[0].addr().is_ipv6());
    }

    #[test]
    fn ipv6_node_ports_need_ipv6_node_addresses() {
        let families = "  clusterIPs: [\"fd00:96::10\"]\n  ipFamilies: [IPv6]";
        let t = translate(
            &state_of(&dual_stack_yaml(families)),
            &NodeContext {
                nodeport_addresses: vec!["10.99.0.1".parse().unwrap()],
                ..NodeContext::default()
            },
        );
        assert!(
            t.frontends
                .iter()
                .all(|f| f.flags & FRONTEND_FLAG_NODE_PORT == 0)
        );
    }

    #[test]
    fn a_dual_stack_service_with_one_familys_slices_only_has_empty_frontends_of_the_other() {
        let yaml = dual_stack_yaml(DUAL_STACK);
        let v4_only = &yaml[..yaml.find("---\nkind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata:\n  name: web-v6").unwrap()];
        let t = translate(&state_of(v4_only), &dual_stack_node());
        for f in &t.frontends {
            if f.addr.is_ipv4() {
                assert!(!f.backends.is_empty());
            } else {
                // IPv4 endpoints are never IPv6 backends.
                assert!(f.backends.is_empty() && f.draining.is_empty(), "{f:?}");
            }
        }
    }

    #[test]
    fn a_slice_address_of_the_other_family_is_reported_and_left_out() {
        let yaml = dual_stack_yaml(DUAL_STACK).replace("fd00:1:2::2", "10.1.3.3");
        let t = translate(&state_of(&yaml), &dual_stack_node());
        assert_eq!(t.skipped.len(), 1, "{:#?}", t.skipped);
        assert!(
            t.skipped[0].contains("web-v6")
                && t.skipped[0].contains("10.1.3.3 is not of its addressType IPv6"),
            "{:?}",
            t.skipped
        );
        let cluster_ip = |v4: bool| {
            t.frontends
                .iter()
                .find(|f| f.flags & FRONTEND_FLAG_CLUSTER_IP != 0 && f.addr.is_ipv4() == v4)
                .unwrap()
        };
        assert_eq!(backends(cluster_ip(false)), ["[fd00:1:1::2]:8080"]);
        assert_eq!(
            backends(cluster_ip(true)),
            ["10.1.1.2:8080", "10.1.2.2:8080"]
        );
    }

    /// What `families` programs: the clusterIPs served (in order), and the
    /// lines skipped about them.
    fn cluster_ips_of(families: &str) -> (Vec<String>, Vec<String>) {
        let t = translate(&state_of(&dual_stack_yaml(families)), &dual_stack_node());
        let mut ips: Vec<String> = Vec::new();
        for f in &t.frontends {
            if f.flags & FRONTEND_FLAG_CLUSTER_IP != 0 && !ips.contains(&f.addr.to_string()) {
                ips.push(f.addr.to_string());
            }
        }
        let skipped = t
            .skipped
            .into_iter()
            .filter(|line| !line.contains("clusterIP (spec.ipFamilies), not served"))
            .collect();
        (ips, skipped)
    }

    #[test]
    fn ip_family_policies_are_checked_as_kubernetes_defines_them() {
        // RequireDualStack, or unset with two families (the API server
        // defaults it to RequireDualStack): both.
        for families in [
            "  clusterIPs: [10.96.0.10, \"fd00:96::10\"]\n  ipFamilyPolicy: RequireDualStack",
            "  clusterIPs: [10.96.0.10, \"fd00:96::10\"]",
            "  clusterIPs: [10.96.0.10, \"fd00:96::10\"]\n  ipFamilies: [IPv4, IPv6]",
        ] {
            let (ips, skipped) = cluster_ips_of(families);
            assert_eq!(ips, ["10.96.0.10", "fd00:96::10"], "{families}");
            assert!(skipped.is_empty(), "{families}: {skipped:?}");
        }
        // SingleStack with two families: the first only.
        let (ips, skipped) = cluster_ips_of(
            "  clusterIPs: [\"fd00:96::10\", 10.96.0.10]\n  ipFamilyPolicy: SingleStack",
        );
        assert_eq!(ips, ["fd00:96::10"]);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].contains("SingleStack") && skipped[0].contains("10.96.0.10 ignored"));
        // RequireDualStack with one family: served on it, reported.
        let (ips, skipped) =
            cluster_ips_of("  clusterIP: 10.96.0.10\n  ipFamilyPolicy: RequireDualStack");
        assert_eq!(ips, ["10.96.0.10"]);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].contains("RequireDualStack"));
        // PreferDualStack with one family is what a single-stack cluster
        // gives: nothing to report.
        let (ips, skipped) =
            cluster_ips_of("  clusterIP: 10.96.0.10\n  ipFamilyPolicy: PreferDualStack");
        assert_eq!((ips.len(), skipped.len()), (1, 0), "{skipped:?}");
        // An unknown policy: reported, the addresses decide.
        let (ips, skipped) = cluster_ips_of(
            "  clusterIPs: [10.96.0.10, \"fd00:96::10\"]\n  ipFamilyPolicy: DualStackPlease",
        );
        assert_eq!(ips.len(), 2);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].contains("\"DualStackPlease\" is not known"));
    }

    #[test]
    fn ip_families_must_name_the_family_of_each_cluster_ip() {
        let (ips, skipped) = cluster_ips_of(
            "  clusterIPs: [10.96.0.10, \"fd00:96::10\"]\n  ipFamilies: [IPv6, IPv4]",
        );
        // The addresses decide; each mismatch is reported.
        assert_eq!(ips, ["10.96.0.10", "fd00:96::10"]);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[0].contains("ipFamilies[0] IPv6 does not match clusterIPs[0] 10.96.0.10"));
        // A family without its clusterIP, and a family that is none.
        let (ips, skipped) = cluster_ips_of(
            "  clusterIPs: [10.96.0.10]\n  ipFamilies: [IPv4, IPv6, IPv5]\n  ipFamilyPolicy: PreferDualStack",
        );
        assert_eq!(ips, ["10.96.0.10"]);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[0].contains("ipFamilies[1] IPv6 has no clusterIP of its own"));
        assert!(skipped[1].contains("\"IPv5\" is no IP family"));
    }

    #[test]
    fn invalid_or_inconsistent_cluster_ips_are_reported() {
        // clusterIP must be clusterIPs[0]: nothing is programmed otherwise
        // (which one was meant is unknown).
        let (ips, skipped) =
            cluster_ips_of("  clusterIP: 10.96.0.11\n  clusterIPs: [10.96.0.10, \"fd00:96::10\"]");
        assert!(ips.is_empty());
        assert!(skipped[0].contains("is not clusterIPs[0]"), "{skipped:?}");
        // The same address written another way is the same address.
        let (ips, skipped) = cluster_ips_of(
            "  clusterIP: \"fd00:96:0::10\"\n  clusterIPs: [\"fd00:96::10\", 10.96.0.10]",
        );
        assert_eq!((ips.len(), skipped.len()), (2, 0), "{skipped:?}");
        // An invalid IPv6 address, and a second address of one family.
        let (ips, skipped) = cluster_ips_of(
            "  clusterIPs: [10.96.0.10, \"fd00:96::zz\", 10.96.0.11, \"fd00:96::10\"]\n  ipFamilyPolicy: PreferDualStack",
        );
        assert_eq!(ips, ["10.96.0.10", "fd00:96::10"]);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[0].contains("invalid clusterIP \"fd00:96::zz\""));
        assert!(skipped[1].contains("10.96.0.11 is a second IPv4 address"));
        // Headless, of any family: nothing.
        let t = translate(
            &state_of(&dual_stack_yaml(
                "  clusterIP: None\n  clusterIPs: [None]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: PreferDualStack",
            )),
            &dual_stack_node(),
        );
        assert!(t.frontends.is_empty() && t.unsupported.is_empty());
        assert_eq!(t.not_programmed[0].1, NotProgrammed::Headless);
    }
}
