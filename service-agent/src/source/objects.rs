//! Services, EndpointSlices and Nodes as the sources read them: partial
//! types with only the fields the agent uses (everything else, managed
//! fields included, is skipped while parsing, never allocated), and their
//! conversion into the compact records the agent keeps. Both sources go
//! through these types, so they read objects the same way.

use std::{borrow::Cow, net::IpAddr};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::core::{ClusterResourceScope, NamespaceResourceScope};
use serde::{Deserialize, Deserializer};

use crate::reconcile::{
    cluster::ObjectName,
    records::{
        AddressType, EndpointRecord, IpFamilyPolicy, NodeHint, NodeRecord, PortProtocol,
        ServicePortRecord, ServiceRecord, ServiceType, SessionAffinity, SlicePortRecord,
        SliceRecord, TrafficDistribution, TrafficPolicy, ZoneHints,
    },
};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// EndpointSlice annotation with the time of the change that triggered it.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
/// Label naming the proxy that serves a Service (and its EndpointSlices):
/// set, the Service belongs to another proxy, as in kube-proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label the EndpointSlice controller puts on the slices of headless
/// Services: nothing to program.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The Node label holding its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The labels [`lean_meta`] keeps (every other label is dropped while
/// parsing).
const KEPT_LABELS: [&str; 4] = [
    SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    HEADLESS_LABEL,
    ZONE_LABEL,
];

/// Why an object is not this agent's to serve, from its labels, the same
/// rule for every source (kube-proxy's label selector: the kube source also
/// asks the API server to leave such objects out): a
/// `service.kubernetes.io/service-proxy-name` label (any value: another
/// proxy serves it), or `service.kubernetes.io/headless` (a headless
/// Service's slices program nothing). `None`: ours.
pub fn excluded_by_labels(metadata: &ObjectMeta) -> Option<String> {
    let labels = metadata.labels.as_ref()?;
    if let Some(proxy) = labels.get(SERVICE_PROXY_NAME_LABEL) {
        return Some(format!(
            "labelled {SERVICE_PROXY_NAME_LABEL}={proxy}: served by another proxy"
        ));
    }
    labels
        .contains_key(HEADLESS_LABEL)
        .then(|| format!("labelled {HEADLESS_LABEL}: headless, nothing to program"))
}

/// The metadata fields the agent reads.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct LeanMeta {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    labels: Option<std::collections::BTreeMap<String, String>>,
    annotations: Option<std::collections::BTreeMap<String, String>>,
    deletion_timestamp: Option<Time>,
}

/// Deserializes `metadata` keeping only the fields the agent reads (and of
/// the labels and annotations, only the ones it reads).
fn lean_meta<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    let meta = Option::<LeanMeta>::deserialize(deserializer)?.unwrap_or_default();
    let keep = |map: Option<std::collections::BTreeMap<String, String>>, keys: &[&str]| {
        let kept: std::collections::BTreeMap<String, String> = map?
            .into_iter()
            .filter(|(key, _)| keys.contains(&key.as_str()))
            .collect();
        (!kept.is_empty()).then_some(kept)
    };
    Ok(ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        resource_version: meta.resource_version,
        labels: keep(meta.labels, &KEPT_LABELS),
        annotations: keep(meta.annotations, &[TRIGGER_TIME_ANNOTATION]),
        deletion_timestamp: meta.deletion_timestamp,
        ..ObjectMeta::default()
    })
}

/// Deserializes a list that may be `null`.
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

/// `kube::Resource` for a partial type of a built-in kind.
macro_rules! built_in_resource {
    ($type:ty, $kind:literal, $group:literal, $version:literal, $plural:literal, $scope:ty) => {
        impl kube::Resource for $type {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A `v1` Service, as far as the agent reads it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ServiceObject {
    /// `metadata`: name, namespace, resourceVersion.
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    /// `spec`.
    pub spec: Option<ServiceSpec>,
    /// `status`.
    pub status: Option<ServiceStatus>,
}
built_in_resource!(
    ServiceObject,
    "Service",
    "",
    "v1",
    "services",
    NamespaceResourceScope
);

/// `spec` of a Service.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `type`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// `clusterIP`.
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// `clusterIPs`.
    #[serde(rename = "clusterIPs", deserialize_with = "nullable")]
    pub cluster_ips: Vec<String>,
    /// `ipFamilies` (`IPv4`, `IPv6`), in the order of `clusterIPs`.
    #[serde(deserialize_with = "nullable")]
    pub ip_families: Vec<String>,
    /// `ipFamilyPolicy`.
    pub ip_family_policy: Option<String>,
    /// `ports`.
    #[serde(deserialize_with = "nullable")]
    pub ports: Vec<ServicePort>,
    /// `externalIPs`.
    #[serde(rename = "externalIPs", deserialize_with = "nullable")]
    pub external_ips: Vec<String>,
    /// `sessionAffinity` (`None` or `ClientIP`).
    pub session_affinity: Option<String>,
    /// `sessionAffinityConfig`.
    pub session_affinity_config: Option<SessionAffinityConfig>,
    /// `loadBalancerSourceRanges`.
    #[serde(deserialize_with = "nullable")]
    pub load_balancer_source_ranges: Vec<String>,
    /// `externalTrafficPolicy`.
    pub external_traffic_policy: Option<String>,
    /// `internalTrafficPolicy`.
    pub internal_traffic_policy: Option<String>,
    /// `healthCheckNodePort`.
    pub health_check_node_port: Option<i32>,
    /// `trafficDistribution`.
    pub traffic_distribution: Option<String>,
}

/// `spec.sessionAffinityConfig` of a Service.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SessionAffinityConfig {
    /// `clientIP`.
    #[serde(rename = "clientIP")]
    pub client_ip: Option<ClientIpConfig>,
}

/// `spec.sessionAffinityConfig.clientIP` of a Service.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ClientIpConfig {
    /// `timeoutSeconds`.
    pub timeout_seconds: Option<i64>,
}

/// A port of a Service.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// `name`.
    #[serde(default)]
    pub name: Option<String>,
    /// `protocol`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// `port` (required).
    pub port: i32,
    /// `nodePort`.
    #[serde(default)]
    pub node_port: Option<i32>,
}

/// `status` of a Service.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceStatus {
    /// `loadBalancer`.
    pub load_balancer: Option<LoadBalancerStatus>,
}

/// `status.loadBalancer` of a Service.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct LoadBalancerStatus {
    /// `ingress`.
    #[serde(deserialize_with = "nullable")]
    pub ingress: Vec<LoadBalancerIngress>,
}

/// One `status.loadBalancer.ingress` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct LoadBalancerIngress {
    /// `ip`.
    pub ip: Option<String>,
    /// `ipMode` (`VIP` or `Proxy`).
    pub ip_mode: Option<String>,
}

/// A `discovery.k8s.io/v1` EndpointSlice, as far as the agent reads it.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceObject {
    /// `metadata`: name, namespace, resourceVersion, the Service label,
    /// the trigger-time annotation.
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    /// `addressType` (required).
    pub address_type: String,
    /// `endpoints`.
    #[serde(default, deserialize_with = "nullable")]
    pub endpoints: Vec<Endpoint>,
    /// `ports`.
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<SlicePort>,
}
built_in_resource!(
    SliceObject,
    "EndpointSlice",
    "discovery.k8s.io",
    "v1",
    "endpointslices",
    NamespaceResourceScope
);

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// `addresses` (required).
    pub addresses: Vec<String>,
    /// `conditions`.
    #[serde(default)]
    pub conditions: Option<EndpointConditions>,
    /// `nodeName`.
    #[serde(default)]
    pub node_name: Option<String>,
    /// `hints`.
    #[serde(default)]
    pub hints: Option<EndpointHints>,
}

/// `hints` of an endpoint: where it should be preferred.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EndpointHints {
    /// `forZones`.
    #[serde(deserialize_with = "nullable")]
    pub for_zones: Vec<HintTarget>,
    /// `forNodes`.
    #[serde(deserialize_with = "nullable")]
    pub for_nodes: Vec<HintTarget>,
}

/// One entry of `hints.forZones` or `hints.forNodes`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct HintTarget {
    /// `name`: the zone or node.
    pub name: String,
}

/// `conditions` of an endpoint.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct EndpointConditions {
    /// `ready`.
    pub ready: Option<bool>,
    /// `serving`.
    pub serving: Option<bool>,
    /// `terminating`.
    pub terminating: Option<bool>,
}

/// A port of an EndpointSlice.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct SlicePort {
    /// `name`.
    pub name: Option<String>,
    /// `protocol`.
    pub protocol: Option<String>,
    /// `port`.
    pub port: Option<i32>,
}

/// A `v1` Node, as far as the agent reads it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct NodeObject {
    /// `metadata`: name, resourceVersion, deletionTimestamp.
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    /// `spec`.
    #[serde(default)]
    pub spec: Option<NodeSpec>,
    /// `status`.
    #[serde(default)]
    pub status: Option<NodeStatus>,
}
built_in_resource!(NodeObject, "Node", "", "v1", "nodes", ClusterResourceScope);

/// `spec` of a Node.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct NodeSpec {
    /// `taints`.
    #[serde(deserialize_with = "nullable")]
    pub taints: Vec<Taint>,
}

/// `status` of a Node.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct NodeStatus {
    /// `addresses`.
    #[serde(deserialize_with = "nullable")]
    pub addresses: Vec<NodeAddress>,
}

/// One of a Node's `status.addresses`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct NodeAddress {
    /// `type`: `InternalIP`, `ExternalIP`, `Hostname`, ...
    #[serde(rename = "type")]
    pub type_: String,
    /// `address`.
    pub address: String,
}

/// A taint of a Node.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Taint {
    /// `key`.
    pub key: String,
}

/// A document of a YAML file of objects: any kind, read in one pass with
/// the fields of every kind the agent takes (other kinds' fields are
/// skipped), then told apart by [`AnyObject::into_typed`].
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnyObject {
    /// `kind`.
    #[serde(default)]
    kind: Option<String>,
    #[serde(default, deserialize_with = "lean_meta")]
    metadata: ObjectMeta,
    /// `spec` (of a Node, only what a Service's spec shares with it:
    /// nothing, so a Node's taints are read by the kube source only).
    #[serde(default)]
    spec: Option<ServiceSpec>,
    #[serde(default)]
    status: Option<AnyStatus>,
    #[serde(default)]
    address_type: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    endpoints: Vec<Endpoint>,
    #[serde(default, deserialize_with = "nullable")]
    ports: Vec<SlicePort>,
    /// `items` of a `List`.
    #[serde(default, deserialize_with = "nullable")]
    items: Vec<AnyObject>,
}

/// `status` of a Service or a Node, read in one pass.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct AnyStatus {
    /// A Service's `loadBalancer`.
    load_balancer: Option<LoadBalancerStatus>,
    /// A Node's `addresses`.
    #[serde(deserialize_with = "nullable")]
    addresses: Vec<NodeAddress>,
}

/// An [`AnyObject`] told apart by its kind.
#[derive(Debug)]
pub enum TypedObject {
    /// A Service (boxed: the largest kind by far).
    Service(Box<ServiceObject>),
    /// An EndpointSlice.
    EndpointSlice(SliceObject),
    /// A Node (its labels, addresses and deletionTimestamp).
    Node(NodeObject),
    /// A `List` (also `ServiceList`, `EndpointSliceList`) and its items.
    List(Vec<AnyObject>),
    /// Another kind, ignored.
    Other,
}

impl AnyObject {
    /// The object by kind; an error for an EndpointSlice without
    /// `addressType`.
    pub fn into_typed(self) -> Result<TypedObject, String> {
        Ok(match self.kind.as_deref().unwrap_or("") {
            "Service" => TypedObject::Service(Box::new(ServiceObject {
                metadata: self.metadata,
                spec: self.spec,
                status: self.status.map(|status| ServiceStatus {
                    load_balancer: status.load_balancer,
                }),
            })),
            "Node" => TypedObject::Node(NodeObject {
                metadata: self.metadata,
                spec: None,
                status: self.status.map(|status| NodeStatus {
                    addresses: status.addresses,
                }),
            }),
            "EndpointSlice" => TypedObject::EndpointSlice(SliceObject {
                metadata: self.metadata,
                address_type: self.address_type.ok_or("missing field `addressType`")?,
                endpoints: self.endpoints,
                ports: self.ports,
            }),
            "List" | "ServiceList" | "EndpointSliceList" | "NodeList" => {
                TypedObject::List(self.items)
            }
            _ => TypedObject::Other,
        })
    }

    /// Whether `kind` is one the agent takes (so an object of it that does
    /// not parse is reported, and other kinds are ignored).
    pub fn is_taken_kind(kind: &str) -> bool {
        matches!(
            kind,
            "Service"
                | "EndpointSlice"
                | "Node"
                | "List"
                | "ServiceList"
                | "EndpointSliceList"
                | "NodeList"
        )
    }
}

/// The object's `namespace/name`, the namespace defaulting to `default`.
pub fn object_name(metadata: &ObjectMeta) -> Option<ObjectName> {
    let name = metadata.name.as_deref().filter(|name| !name.is_empty())?;
    Some(ObjectName::new(
        metadata.namespace.as_deref().unwrap_or(""),
        name,
    ))
}

/// Parses addresses, reporting the ones that are not IP addresses.
fn addresses<'a>(
    texts: impl IntoIterator<Item = &'a String>,
    what: impl Fn(&str) -> String,
    problems: &mut Vec<String>,
) -> Box<[IpAddr]> {
    texts
        .into_iter()
        .filter(|text| !text.is_empty())
        .filter_map(|text| match text.parse::<IpAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                problems.push(what(text));
                None
            }
        })
        .collect()
}

/// `IPv4` or `IPv6`, as `spec.ipFamilies` names the family of `addr`.
fn family_name(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// A Service's clusterIPs as Kubernetes defines them, and whether it is
/// headless (`None`: nothing to program). `clusterIPs` wins over
/// `clusterIP`, which must be its first entry; at most one address per
/// family (the primary family's first); `ipFamilies[i]` names the family
/// of `clusterIPs[i]`; `ipFamilyPolicy` (unset: `RequireDualStack` with
/// two families given, else `SingleStack`, as the API server defaults
/// it) says how many families there are. The API server refuses a
/// Service that breaks these rules, so only a file brings one: what
/// breaks them is reported in `problems` and left out (a second address
/// of a family, the second family of a `SingleStack` Service), and the
/// addresses, not `ipFamilies`, decide the families served.
fn cluster_ips(
    name: &ObjectName,
    spec: &ServiceSpec,
    problems: &mut Vec<String>,
) -> (bool, Box<[IpAddr]>) {
    let legacy = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty());
    let texts: Vec<&str> = if spec.cluster_ips.is_empty() {
        legacy.into_iter().collect()
    } else {
        spec.cluster_ips.iter().map(String::as_str).collect()
    };
    if let (Some(legacy), Some(first)) = (legacy, spec.cluster_ips.first())
        && legacy != first
        && (legacy.parse::<IpAddr>().ok()).is_none_or(|legacy| first.parse() != Ok(legacy))
    {
        problems.push(format!(
            "Service {name}: clusterIP {legacy:?} is not clusterIPs[0] {first:?} (Kubernetes requires them equal): nothing programmed"
        ));
        return (false, Box::default());
    }
    if texts.contains(&"None") {
        return (true, Box::default());
    }
    let mut ips: Vec<IpAddr> = Vec::with_capacity(2);
    for text in texts {
        match text.parse::<IpAddr>() {
            Ok(ip) if ips.iter().any(|kept| kept.is_ipv4() == ip.is_ipv4()) => {
                problems.push(format!(
                    "Service {name}: clusterIPs: {ip} is a second {} address (one per family), ignored",
                    family_name(ip)
                ));
            }
            Ok(ip) => ips.push(ip),
            Err(_) => problems.push(format!("Service {name}: invalid clusterIP {text:?}")),
        }
    }
    for (i, family) in spec.ip_families.iter().enumerate() {
        if family != "IPv4" && family != "IPv6" {
            problems.push(format!(
                "Service {name}: ipFamilies[{i}] {family:?} is no IP family, ignored"
            ));
            continue;
        }
        match ips.get(i) {
            Some(&ip) if family_name(ip) == family => {}
            Some(&ip) => problems.push(format!(
                "Service {name}: ipFamilies[{i}] {family} does not match clusterIPs[{i}] {ip}: the address decides"
            )),
            None => problems.push(format!(
                "Service {name}: ipFamilies[{i}] {family} has no clusterIP of its own: nothing served for it"
            )),
        }
    }
    let policy = match spec.ip_family_policy.as_deref() {
        None => None,
        Some(text) => IpFamilyPolicy::parse(text).or_else(|| {
            problems.push(format!(
                "Service {name}: ipFamilyPolicy {text:?} is not known, the clusterIPs decide"
            ));
            None
        }),
    };
    let policy = policy.unwrap_or(
        if spec.ip_families.len() == 2 || spec.cluster_ips.len() == 2 {
            IpFamilyPolicy::RequireDualStack
        } else {
            IpFamilyPolicy::SingleStack
        },
    );
    match (policy, &ips[..]) {
        (IpFamilyPolicy::SingleStack, [first, second]) => {
            problems.push(format!(
                "Service {name}: ipFamilyPolicy SingleStack with clusterIPs of both families: {second} ignored, served on {first} only"
            ));
            ips.truncate(1);
        }
        (IpFamilyPolicy::RequireDualStack, [only]) => problems.push(format!(
            "Service {name}: ipFamilyPolicy RequireDualStack but no clusterIP of the other family: served on {only} only"
        )),
        _ => {}
    }
    (false, ips.into())
}

impl ServiceObject {
    /// The record the agent keeps; `None` without a name.
    pub fn into_record(self) -> Option<(ObjectName, ServiceRecord)> {
        let name = object_name(&self.metadata)?;
        let mut problems = Vec::new();
        let Some(spec) = self.spec else {
            problems.push(format!("Service {name}: no spec"));
            return Some((
                name,
                ServiceRecord {
                    problems: problems.into(),
                    ..ServiceRecord::default()
                },
            ));
        };
        let service_type = ServiceType::parse(spec.type_.as_deref()).unwrap_or_else(|| {
            problems.push(format!(
                "Service {name}: type {:?} is not known, served as ClusterIP",
                spec.type_.as_deref().unwrap_or("")
            ));
            ServiceType::ClusterIp
        });
        let (headless, cluster_ips) = cluster_ips(&name, &spec, &mut problems);
        let ports: Box<[ServicePortRecord]> = spec
            .ports
            .into_iter()
            .map(|port| ServicePortRecord {
                name: port.name.unwrap_or_default().into(),
                protocol: PortProtocol::parse(port.protocol.as_deref()),
                port: port.port,
                node_port: port.node_port,
            })
            .collect();
        let ingress = self
            .status
            .and_then(|status| status.load_balancer)
            .map(|lb| lb.ingress)
            .unwrap_or_default();
        // `ipMode: Proxy`: the load balancer proxies, traffic arrives for
        // the node, not for the LoadBalancer IP.
        let load_balancer_ips = addresses(
            ingress
                .iter()
                .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|ingress| ingress.ip.as_ref()),
            |ip| format!("Service {name}: LoadBalancer ingress IP {ip:?} is not an IP address"),
            &mut problems,
        );
        let external_ips = addresses(
            &spec.external_ips,
            |ip| format!("Service {name}: externalIP {ip:?} is not an IP address"),
            &mut problems,
        );
        let session_affinity = match spec.session_affinity.as_deref() {
            Some("ClientIP") => SessionAffinity::ClientIp {
                timeout_seconds: spec
                    .session_affinity_config
                    .and_then(|config| config.client_ip)
                    .and_then(|client_ip| client_ip.timeout_seconds),
            },
            None | Some("None") => SessionAffinity::None,
            Some(other) => {
                problems.push(format!(
                    "Service {name}: sessionAffinity {other:?} is not known, served without"
                ));
                SessionAffinity::None
            }
        };
        let load_balancer_source_ranges = spec
            .load_balancer_source_ranges
            .iter()
            .map(|range| range.trim())
            .filter(|range| !range.is_empty())
            .map(Box::from)
            .collect();
        let mut policy = |field: &str, value: Option<&str>| {
            TrafficPolicy::parse(value).unwrap_or_else(|| {
                problems.push(format!(
                    "Service {name}: {field} {:?} is not known, Cluster used",
                    value.unwrap_or("")
                ));
                TrafficPolicy::Cluster
            })
        };
        let external_traffic_policy = policy(
            "externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
        );
        let internal_traffic_policy = policy(
            "internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
        );
        let traffic_distribution = TrafficDistribution::parse(spec.traffic_distribution.as_deref());
        let mut unsupported = Vec::new();
        for port in ports.iter() {
            if let PortProtocol::Unsupported(protocol) = &port.protocol {
                unsupported.push(format!(
                    "Service {name} port {:?}: protocol {protocol} is not served",
                    &*port.name
                ));
            }
        }
        if let TrafficDistribution::Unknown(value) = &traffic_distribution {
            unsupported.push(format!(
                "Service {name}: trafficDistribution {value:?} is not known: endpoint hints are followed as for any value"
            ));
        }
        Some((
            name,
            ServiceRecord {
                service_type,
                headless,
                cluster_ips,
                ports,
                load_balancer_ips,
                external_ips,
                session_affinity,
                load_balancer_source_ranges,
                external_traffic_policy,
                internal_traffic_policy,
                health_check_node_port: spec.health_check_node_port,
                traffic_distribution,
                unsupported: unsupported.into(),
                problems: problems.into(),
            },
        ))
    }
}

impl SliceObject {
    /// The record the agent keeps; `None` without a name. Endpoints whose
    /// `nodeName` is `this_node` are node-local.
    pub fn into_record(self, this_node: Option<&str>) -> Option<(ObjectName, SliceRecord)> {
        let name = object_name(&self.metadata)?;
        let mut problems = Vec::new();
        let service = self
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
            .map(|service| ObjectName::new(name.namespace(), service));
        let owner = service
            .as_ref()
            .map_or_else(|| "no Service".to_owned(), ToString::to_string);
        let address_type = match self.address_type.as_str() {
            "IPv4" => AddressType::Ipv4,
            "IPv6" => AddressType::Ipv6,
            _ => AddressType::Other,
        };
        let mut endpoints = Vec::with_capacity(self.endpoints.len());
        let mut zone_hints: Vec<Box<str>> = Vec::new();
        if address_type != AddressType::Other {
            for endpoint in &self.endpoints {
                let conditions = endpoint.conditions.clone().unwrap_or_default();
                let ready = conditions.ready.unwrap_or(true);
                let serving = conditions.serving.unwrap_or(ready);
                let terminating = conditions.terminating.unwrap_or(false);
                let node_local = this_node.is_some() && endpoint.node_name.as_deref() == this_node;
                let hints = endpoint.hints.as_ref();
                let for_nodes = hints.map_or(&[][..], |hints| &hints.for_nodes);
                let node_hint = if for_nodes.is_empty() {
                    NodeHint::None
                } else if for_nodes
                    .iter()
                    .any(|node| this_node == Some(node.name.as_str()))
                {
                    NodeHint::ThisNode
                } else {
                    NodeHint::OtherNodes
                };
                let zones = ZoneHints {
                    start: u16::try_from(zone_hints.len()).unwrap_or(u16::MAX),
                    len: 0,
                };
                let zones = hints.map_or(zones, |hints| {
                    let mut zones = zones;
                    for zone in &hints.for_zones {
                        if usize::from(zones.start) + usize::from(zones.len)
                            >= usize::from(u16::MAX)
                        {
                            break;
                        }
                        zone_hints.push(zone.name.as_str().into());
                        zones.len += 1;
                    }
                    zones
                });
                for addr in addresses(
                    &endpoint.addresses,
                    |addr| {
                        format!(
                            "EndpointSlice {} of {owner}: invalid address {addr:?}",
                            name.name()
                        )
                    },
                    &mut problems,
                ) {
                    if (address_type == AddressType::Ipv4) != addr.is_ipv4() {
                        problems.push(format!(
                            "EndpointSlice {} of {owner}: address {addr} is not of its addressType {}",
                            name.name(),
                            self.address_type
                        ));
                        continue;
                    }
                    endpoints.push(EndpointRecord {
                        addr,
                        ready,
                        serving,
                        terminating,
                        node_local,
                        node_hint,
                        zone_hints: zones,
                    });
                }
            }
        }
        let trigger_time = self
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(TRIGGER_TIME_ANNOTATION))
            .and_then(|time| time.parse().ok());
        let ports = self
            .ports
            .into_iter()
            .map(|port| SlicePortRecord {
                name: port.name.unwrap_or_default().into(),
                protocol: PortProtocol::parse(port.protocol.as_deref()),
                port: port.port,
            })
            .collect();
        Some((
            name,
            SliceRecord {
                service,
                address_type,
                ports,
                endpoints: endpoints.into(),
                zone_hints: zone_hints.into(),
                trigger_time,
                problems: problems.into(),
            },
        ))
    }
}

impl NodeObject {
    /// The record the agent keeps; `None` without a name.
    pub fn into_record(self) -> Option<(ObjectName, NodeRecord)> {
        let name = object_name(&self.metadata)?;
        let tainted = self
            .spec
            .iter()
            .flat_map(|spec| &spec.taints)
            .any(|taint| taint.key == TO_BE_DELETED_TAINT);
        let zone = self
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(ZONE_LABEL))
            .filter(|zone| !zone.is_empty())
            .map(|zone| zone.as_str().into());
        let node_addresses = |kind: &str| -> Box<[IpAddr]> {
            self.status
                .iter()
                .flat_map(|status| &status.addresses)
                .filter(|address| address.type_ == kind)
                .filter_map(|address| address.address.parse().ok())
                .collect()
        };
        Some((
            name,
            NodeRecord {
                being_deleted: tainted || self.metadata.deletion_timestamp.is_some(),
                zone,
                internal_ips: node_addresses("InternalIP"),
                external_ips: node_addresses("ExternalIP"),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_fields_used_are_kept_and_addresses_are_parsed() {
        let service: ServiceObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "7",
                "labels": {"app": "web"}, "managedFields": [{"manager": "kubectl"}]},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "SCTP"}],
                "externalIPs": ["10.99.0.5", "nope"], "selector": {"app": "web"}},
            "status": {"loadBalancer": {"ingress": [{"ip": "10.99.0.1"},
                {"ip": "10.99.0.2", "ipMode": "Proxy"}, {"hostname": "lb.example.org"}]}}
        }))
        .unwrap();
        assert_eq!(service.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(service.metadata.labels, None);
        let (name, record) = service.into_record().unwrap();
        assert_eq!(name.to_string(), "shop/web");
        assert_eq!(record.service_type, ServiceType::LoadBalancer);
        assert_eq!(&*record.cluster_ips, [IpAddr::from([10, 96, 0, 10])]);
        assert_eq!(&*record.load_balancer_ips, [IpAddr::from([10, 99, 0, 1])]);
        assert_eq!(&*record.external_ips, [IpAddr::from([10, 99, 0, 5])]);
        assert_eq!(
            record.ports[0].protocol,
            PortProtocol::Unsupported("SCTP".into())
        );
        assert_eq!(record.problems.len(), 1, "{:?}", record.problems);
        assert!(record.problems[0].contains("\"nope\""));
    }

    #[test]
    fn affinity_traffic_policy_and_source_ranges_are_read_as_given() {
        let service: ServiceObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                "ports": [{"port": 80}],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": -5}},
                "externalTrafficPolicy": "Local",
                "loadBalancerSourceRanges": [" 10.0.0.0/8 ", "", "nope"]}
        }))
        .unwrap();
        let (_, record) = service.into_record().unwrap();
        assert_eq!(
            record.session_affinity,
            SessionAffinity::ClientIp {
                timeout_seconds: Some(-5)
            }
        );
        assert_eq!(record.external_traffic_policy, TrafficPolicy::Local);
        let ranges: Vec<&str> = record
            .load_balancer_source_ranges
            .iter()
            .map(|r| &**r)
            .collect();
        assert_eq!(ranges, ["10.0.0.0/8", "nope"]);
        assert!(record.problems.is_empty(), "{:?}", record.problems);
        // Defaults: no affinity (also without a config), Cluster, no ranges.
        let service: ServiceObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {"clusterIP": "10.96.0.10", "sessionAffinity": "None",
                "loadBalancerSourceRanges": null}
        }))
        .unwrap();
        let (_, record) = service.into_record().unwrap();
        assert_eq!(record.session_affinity, SessionAffinity::None);
        assert!(
            record.external_traffic_policy == TrafficPolicy::Cluster
                && record.load_balancer_source_ranges.is_empty()
        );
        let service: ServiceObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {"clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP"}
        }))
        .unwrap();
        let (_, record) = service.into_record().unwrap();
        assert_eq!(
            record.session_affinity,
            SessionAffinity::ClientIp {
                timeout_seconds: None
            }
        );
    }

    #[test]
    fn slice_endpoints_get_the_api_defaults_and_know_this_node() {
        let slice: SliceObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "web", "other": "x"},
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2024-01-02T03:04:05Z"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.1.1.2"], "nodeName": "node-a"},
                {"addresses": ["10.1.1.3", "bad"], "conditions": {"ready": false, "terminating": true}}
            ],
            "ports": null
        }))
        .unwrap();
        let (_, record) = slice.into_record(Some("node-a")).unwrap();
        assert_eq!(record.service.unwrap().to_string(), "shop/web");
        assert!(record.trigger_time.is_some());
        assert_eq!(record.endpoints.len(), 2);
        let local = record.endpoints[0];
        assert!(local.ready && local.serving && !local.terminating && local.node_local);
        let other = record.endpoints[1];
        assert!(!other.ready && !other.serving && other.terminating && !other.node_local);
        assert_eq!(record.problems.len(), 1);
    }

    #[test]
    fn service_policies_and_endpoint_hints_are_read() {
        let service: ServiceObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
                "healthCheckNodePort": 32000, "trafficDistribution": "PreferSameZone",
                "ports": [{"port": 80}]}
        }))
        .unwrap();
        let (_, record) = service.into_record().unwrap();
        assert_eq!(record.external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(record.internal_traffic_policy, TrafficPolicy::Local);
        assert_eq!(record.health_check_node_port, Some(32000));
        assert_eq!(
            record.traffic_distribution,
            TrafficDistribution::PreferSameZone
        );
        assert!(record.problems.is_empty() && record.unsupported.is_empty());

        let slice: SliceObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop"},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.1.1.2"], "hints": {"forZones": [{"name": "a"}, {"name": "b"}], "forNodes": [{"name": "node-a"}]}},
                {"addresses": ["10.1.1.3"], "hints": {"forZones": [{"name": "c"}], "forNodes": [{"name": "node-c"}]}},
                {"addresses": ["10.1.1.4"]}
            ]
        }))
        .unwrap();
        let (_, record) = slice.into_record(Some("node-a")).unwrap();
        let zones = |i: usize| -> Vec<&str> {
            record
                .zones_of(&record.endpoints[i])
                .iter()
                .map(|z| &**z)
                .collect()
        };
        assert_eq!(zones(0), ["a", "b"]);
        assert_eq!(zones(1), ["c"]);
        assert!(zones(2).is_empty());
        assert_eq!(record.endpoints[0].node_hint, NodeHint::ThisNode);
        assert_eq!(record.endpoints[1].node_hint, NodeHint::OtherNodes);
        assert_eq!(record.endpoints[2].node_hint, NodeHint::None);
    }

    #[test]
    fn the_label_rule_leaves_out_other_proxies_and_headless_objects() {
        let meta = |labels: serde_json::Value| -> ObjectMeta {
            serde_json::from_value::<ServiceObject>(
                serde_json::json!({"metadata": {"name": "x", "labels": labels}}),
            )
            .unwrap()
            .metadata
        };
        assert!(excluded_by_labels(&meta(serde_json::json!({"app": "x"}))).is_none());
        let other = meta(serde_json::json!({"service.kubernetes.io/service-proxy-name": "cilium"}));
        assert!(excluded_by_labels(&other).unwrap().contains("cilium"));
        let headless = meta(serde_json::json!({"service.kubernetes.io/headless": ""}));
        assert!(excluded_by_labels(&headless).unwrap().contains("headless"));
    }

    #[test]
    fn a_node_brings_its_zone_and_addresses() {
        let node: NodeObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "labels": {"topology.kubernetes.io/zone": "z1", "x": "y"}},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "10.0.0.1"},
                {"type": "InternalIP", "address": "fd00::1"},
                {"type": "ExternalIP", "address": "192.0.2.1"},
                {"type": "Hostname", "address": "a"},
                {"type": "InternalIP", "address": "bogus"}
            ]}
        }))
        .unwrap();
        let (_, record) = node.into_record().unwrap();
        assert_eq!(record.zone.as_deref(), Some("z1"));
        assert_eq!(
            &*record.internal_ips,
            [
                IpAddr::from([10, 0, 0, 1]),
                "fd00::1".parse::<IpAddr>().unwrap()
            ]
        );
        assert_eq!(&*record.external_ips, [IpAddr::from([192, 0, 2, 1])]);
    }

    #[test]
    fn a_node_is_being_deleted_with_a_deletion_timestamp_or_the_autoscaler_taint() {
        let node = |value| -> NodeRecord {
            serde_json::from_value::<NodeObject>(value)
                .unwrap()
                .into_record()
                .unwrap()
                .1
        };
        let plain = serde_json::json!({"metadata": {"name": "a"}, "spec": {"taints": null}});
        assert!(!node(plain).being_deleted);
        let deleting = serde_json::json!({"metadata": {"name": "a", "deletionTimestamp": "2024-01-02T03:04:05Z"}});
        assert!(node(deleting).being_deleted);
        let tainted = serde_json::json!({"metadata": {"name": "a"},
            "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}});
        assert!(node(tainted).being_deleted);
    }
}
