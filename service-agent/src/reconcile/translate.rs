//! The pure translation from Kubernetes objects to the frontends the
//! datapath must serve, each with its backends. No kernel, no I/O: it takes
//! a [`ClusterState`] and returns plain data, so it is tested with fixtures.

use std::net::IpAddr;

use service_common::{
    AFFINITY_TIMEOUT_DEFAULT_SECS, BACKEND_STATE_ACTIVE, BACKEND_STATE_NOT_SERVING,
    BACKEND_STATE_TERMINATING, FRONTEND_FLAG_AFFINITY, FRONTEND_FLAG_CLUSTER_IP,
    FRONTEND_FLAG_EXTERNAL_IP, FRONTEND_FLAG_EXTERNAL_LOCAL, FRONTEND_FLAG_LOAD_BALANCER,
    FRONTEND_FLAG_NODE_PORT, FRONTEND_FLAG_TERMINATING_FALLBACK, FRONTEND_FLAGS_EXTERNAL,
    affinity_timeout,
};

use super::{
    cluster::{ClusterState, ObjectName},
    records::{
        AddressType, EndpointRecord, ServicePortRecord, ServiceRecord, ServiceType,
        SessionAffinity, SliceRecord,
    },
};

/// What the translation needs to know about the node it runs on (which
/// endpoints are on this node, the sources already know).
#[derive(Clone, Debug, Default)]
pub struct NodeContext {
    /// The node addresses NodePorts are served on.
    pub nodeport_addresses: Vec<IpAddr>,
    /// `spec.externalIPs` are served only inside these CIDRs.
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
    /// while other endpoints are ready, or listed but not serving. Sorted,
    /// without duplicates, none of them in `backends`.
    pub draining: Vec<DesiredBackend>,
    /// `sessionAffinity: ClientIP`: its timeout in seconds (then `flags`
    /// has `FRONTEND_FLAG_AFFINITY`); 0 when affinity is off.
    pub affinity_timeout_secs: u32,
    /// `loadBalancerSourceRanges` (IPv4, LoadBalancer frontends only), as
    /// network prefixes; empty admits every client. The desired state sets
    /// `FRONTEND_FLAG_SOURCE_RANGES` from it.
    pub source_ranges: Vec<ipnet::Ipv4Net>,
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

/// The outcome of translating a whole [`ClusterState`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Translation {
    /// Every frontend to program, in a stable order.
    pub frontends: Vec<DesiredFrontend>,
    /// Services that program nothing by design.
    pub not_programmed: Vec<(ObjectName, NotProgrammed)>,
    /// One line per object or field skipped as invalid or unsupported.
    pub skipped: Vec<String>,
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
    let mut addrs = Vec::new();
    for &ip in service.cluster_ips.iter() {
        match ip {
            IpAddr::V4(_) => addrs.push(ip),
            IpAddr::V6(_) => out.skipped.push(format!(
                "Service {name}: clusterIP {ip}: IPv6 is not served yet"
            )),
        }
    }
    if addrs.is_empty() {
        out.skipped
            .push(format!("Service {name}: no usable clusterIP"));
        return;
    }
    for service_port in service.ports.iter() {
        let port_label = &*service_port.name;
        let Some(proto) = service_port.protocol.number() else {
            out.skipped.push(format!(
                "Service {name} port {port_label:?}: protocol {:?} is not served",
                service_port.protocol.name()
            ));
            continue;
        };
        let Some(port) = valid_port(service_port.port) else {
            out.skipped.push(format!(
                "Service {name} port {port_label:?}: invalid port {}",
                service_port.port
            ));
            continue;
        };
        let PortBackends {
            backends,
            draining,
            fallback,
        } = backends_for_port(&slices, service_port, proto, name, out);
        let mut frontends: Vec<(IpAddr, u16, u16)> = addrs
            .iter()
            .map(|addr| (*addr, port, FRONTEND_FLAG_CLUSTER_IP))
            .collect();
        if service.service_type.has_node_ports()
            && let Some(node_port) = service_port.node_port
        {
            match valid_port(node_port) {
                Some(node_port) => frontends.extend(
                    node.nodeport_addresses
                        .iter()
                        .filter(|addr| addr.is_ipv4())
                        .map(|addr| (*addr, node_port, FRONTEND_FLAG_NODE_PORT)),
                ),
                None => out.skipped.push(format!(
                    "Service {name} port {port_label:?}: invalid nodePort {node_port}"
                )),
            }
        }
        if service.service_type == ServiceType::LoadBalancer {
            for &ip in service.load_balancer_ips.iter() {
                match ip {
                    IpAddr::V4(_) => frontends.push((ip, port, FRONTEND_FLAG_LOAD_BALANCER)),
                    IpAddr::V6(_) => out.skipped.push(format!(
                        "Service {name}: LoadBalancer ingress IP {ip}: IPv6 is not served yet"
                    )),
                }
            }
        }
        for &ip in service.external_ips.iter() {
            match ip {
                IpAddr::V4(_) if node.external_ip_cidrs.iter().any(|cidr| cidr.contains(&ip)) => {
                    frontends.push((ip, port, FRONTEND_FLAG_EXTERNAL_IP))
                }
                IpAddr::V4(_) => out.skipped.push(format!(
                    "Service {name}: externalIP {ip} is outside --external-ip-cidrs, not served"
                )),
                IpAddr::V6(_) => out.skipped.push(format!(
                    "Service {name}: externalIP {ip}: IPv6 is not served yet"
                )),
            }
        }
        for (addr, port, kind) in frontends {
            let mut flags = kind;
            if fallback {
                flags |= FRONTEND_FLAG_TERMINATING_FALLBACK;
            }
            out.frontends.push(semantics.apply(DesiredFrontend {
                addr,
                port,
                proto,
                flags,
                backends: backends.clone(),
                draining: draining.clone(),
                affinity_timeout_secs: 0,
                source_ranges: Vec::new(),
            }));
        }
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
    /// The valid IPv4 `loadBalancerSourceRanges`, as network prefixes.
    source_ranges: Vec<ipnet::Ipv4Net>,
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
    ///   IPv6 ranges do not apply to IPv4 frontends (kube-proxy sorts the
    ///   ranges by family the same way).
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
                Ok(ipnet::IpNet::V4(net)) => source_ranges.push(net.trunc()),
                Ok(ipnet::IpNet::V6(_)) => {}
                Err(_) => out.skipped.push(format!(
                    "Service {name}: loadBalancerSourceRanges entry {range:?} is not a CIDR, ignored"
                )),
            }
        }
        source_ranges.sort_unstable();
        source_ranges.dedup();
        FrontendSemantics {
            affinity_timeout_secs,
            external_local: service.external_policy_local && service.service_type.has_node_ports(),
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
            frontend.source_ranges = self.source_ranges.clone();
        }
        frontend
    }
}

/// The backends of one Service port, by what they take.
struct PortBackends {
    /// Taking new flows.
    backends: Vec<DesiredBackend>,
    /// Kept for their flows only.
    draining: Vec<DesiredBackend>,
    /// `backends` are the serving and terminating fallback.
    fallback: bool,
}

/// The backends of one Service port: every endpoint of every slice that
/// has a port of the same name and protocol, at that slice's port number
/// (this is how a named `targetPort` resolves per pod). Ready endpoints
/// take new flows; when none is ready, the serving and terminating ones do
/// (KEP-1669). Every other endpoint still listed is kept, draining: serving
/// and terminating ones as [`BackendState::Terminating`], the rest as
/// [`BackendState::NotServing`]. An address listed twice counts once, in
/// its most serving state.
fn backends_for_port(
    slices: &[(&ObjectName, &SliceRecord)],
    service_port: &ServicePortRecord,
    proto: u8,
    service: &ObjectName,
    out: &mut Translation,
) -> PortBackends {
    let wanted_name = &*service_port.name;
    let mut listed = Vec::new();
    for (slice_name, slice) in slices {
        if slice.address_type != AddressType::Ipv4 {
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
            if !endpoint.addr.is_ipv4() {
                continue;
            }
            listed.push(DesiredBackend {
                addr: endpoint.addr,
                port,
                node_local: endpoint.node_local,
                state: backend_state(endpoint),
            });
        }
    }
    // Each address and port once, in its most serving state.
    listed.sort_by_key(|b| (b.addr, b.port, b.state));
    listed.dedup_by(|later, first| later.addr == first.addr && later.port == first.port);
    let fallback = !listed.iter().any(|b| b.state == BackendState::Active)
        && listed.iter().any(|b| b.state == BackendState::Terminating);
    let new_flows = if fallback {
        BackendState::Terminating
    } else {
        BackendState::Active
    };
    let (backends, draining) = listed.into_iter().partition(|b| b.state == new_flows);
    PortBackends {
        backends,
        draining,
        fallback,
    }
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
            .map(|b| format!("{}:{}", b.addr, b.port))
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
        assert_eq!(t.skipped.len(), 5, "{:#?}", t.skipped);
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
            assert_ne!(of_kind(&t, kind).flags & FRONTEND_FLAG_EXTERNAL_LOCAL, 0);
        }
        let cluster_ip = of_kind(&t, FRONTEND_FLAG_CLUSTER_IP);
        assert_eq!(cluster_ip.flags & FRONTEND_FLAG_EXTERNAL_LOCAL, 0);
        let t = lb_service("  externalTrafficPolicy: Cluster");
        assert!(
            t.frontends
                .iter()
                .all(|f| f.flags & FRONTEND_FLAG_EXTERNAL_LOCAL == 0)
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
}
