//! The cluster's objects as the agent keeps them: compact records with
//! what translation needs and nothing more (no metadata, no managed
//! fields, addresses parsed). Sources build them from the API's objects
//! and drop the objects at once; the agent's memory grows with these.

use std::net::IpAddr;

use super::cluster::ObjectName;

/// `spec.type` of a Service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    /// `ClusterIP` (the default).
    #[default]
    ClusterIp,
    /// `NodePort`.
    NodePort,
    /// `LoadBalancer`.
    LoadBalancer,
    /// `ExternalName`: DNS only.
    ExternalName,
}

impl ServiceType {
    /// The type named `name` (`None`: the default, ClusterIP); `None` for
    /// an unknown name.
    pub fn parse(name: Option<&str>) -> Option<Self> {
        match name.unwrap_or("ClusterIP") {
            "ClusterIP" => Some(ServiceType::ClusterIp),
            "NodePort" => Some(ServiceType::NodePort),
            "LoadBalancer" => Some(ServiceType::LoadBalancer),
            "ExternalName" => Some(ServiceType::ExternalName),
            _ => None,
        }
    }

    /// Whether the Service has node ports.
    pub fn has_node_ports(self) -> bool {
        matches!(self, ServiceType::NodePort | ServiceType::LoadBalancer)
    }
}

/// The protocol of a Service or EndpointSlice port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortProtocol {
    /// TCP (also when unset).
    Tcp,
    /// UDP.
    Udp,
    /// A protocol the datapath does not serve (e.g. SCTP), by name.
    Unsupported(Box<str>),
}

impl PortProtocol {
    /// The protocol named `name` (`None`: TCP, the API's default).
    pub fn parse(name: Option<&str>) -> Self {
        match name.unwrap_or("TCP") {
            "TCP" => PortProtocol::Tcp,
            "UDP" => PortProtocol::Udp,
            other => PortProtocol::Unsupported(other.into()),
        }
    }

    /// The IP protocol number, for served protocols.
    pub fn number(&self) -> Option<u8> {
        match self {
            PortProtocol::Tcp => Some(service_common::PROTO_TCP),
            PortProtocol::Udp => Some(service_common::PROTO_UDP),
            PortProtocol::Unsupported(_) => None,
        }
    }

    /// The protocol's name as the API spells it.
    pub fn name(&self) -> &str {
        match self {
            PortProtocol::Tcp => "TCP",
            PortProtocol::Udp => "UDP",
            PortProtocol::Unsupported(name) => name,
        }
    }
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortRecord {
    /// `name` (empty when unnamed): matched against EndpointSlice port names.
    pub name: Box<str>,
    /// `protocol`.
    pub protocol: PortProtocol,
    /// `port`, as given (checked by translation).
    pub port: i32,
    /// `nodePort`, as given.
    pub node_port: Option<i32>,
}

/// `spec.ipFamilyPolicy` of a Service: how many address families its
/// clusterIPs have (the API server allocates them; the agent checks the
/// addresses it is given against it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpFamilyPolicy {
    /// `SingleStack`: one clusterIP, of the first of `ipFamilies`.
    SingleStack,
    /// `PreferDualStack`: one clusterIP per family where the cluster has
    /// both, else one.
    PreferDualStack,
    /// `RequireDualStack`: one clusterIP of each family.
    RequireDualStack,
}

impl IpFamilyPolicy {
    /// The policy named `name`; `None` for an unknown name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "SingleStack" => Some(IpFamilyPolicy::SingleStack),
            "PreferDualStack" => Some(IpFamilyPolicy::PreferDualStack),
            "RequireDualStack" => Some(IpFamilyPolicy::RequireDualStack),
            _ => None,
        }
    }
}

/// `spec.externalTrafficPolicy` or `spec.internalTrafficPolicy`: which
/// endpoints a frontend's traffic may reach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TrafficPolicy {
    /// `Cluster` (the default): every endpoint of the Service.
    #[default]
    Cluster,
    /// `Local`: only this node's endpoints; none means the traffic is
    /// dropped (or refused), never sent to another node.
    Local,
}

impl TrafficPolicy {
    /// The policy named `name` (`None`: `Cluster`, the API's default);
    /// `None` for an unknown name.
    pub fn parse(name: Option<&str>) -> Option<Self> {
        match name.unwrap_or("Cluster") {
            "Cluster" => Some(TrafficPolicy::Cluster),
            "Local" => Some(TrafficPolicy::Local),
            _ => None,
        }
    }
}

/// `spec.trafficDistribution`. It only tells the EndpointSlice controller
/// which hints to write; like kube-proxy, translation follows the hints of
/// the endpoints, whatever this says. Kept to be shown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum TrafficDistribution {
    /// Unset.
    #[default]
    Unset,
    /// `PreferClose` (the older name of `PreferSameZone`).
    PreferClose,
    /// `PreferSameZone`.
    PreferSameZone,
    /// `PreferSameNode`.
    PreferSameNode,
    /// Any other value, by name (the API server rejects them; a file may
    /// hold one): reported, and the hints are still followed.
    Unknown(Box<str>),
}

impl TrafficDistribution {
    /// The value named `name`.
    pub fn parse(name: Option<&str>) -> Self {
        match name {
            None | Some("") => TrafficDistribution::Unset,
            Some("PreferClose") => TrafficDistribution::PreferClose,
            Some("PreferSameZone") => TrafficDistribution::PreferSameZone,
            Some("PreferSameNode") => TrafficDistribution::PreferSameNode,
            Some(other) => TrafficDistribution::Unknown(other.into()),
        }
    }
}

/// What the agent keeps of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRecord {
    /// `spec.type`.
    pub service_type: ServiceType,
    /// `clusterIP: None`.
    pub headless: bool,
    /// `spec.clusterIPs` (or `spec.clusterIP`), parsed and checked against
    /// `spec.ipFamilies` and `spec.ipFamilyPolicy`: at most one address per
    /// family, the primary family's first. Every frontend of a family
    /// exists only when this holds an address of that family (as in
    /// kube-proxy).
    pub cluster_ips: Box<[IpAddr]>,
    /// `spec.ports`.
    pub ports: Box<[ServicePortRecord]>,
    /// `status.loadBalancer.ingress[].ip`, without those of `ipMode: Proxy`.
    pub load_balancer_ips: Box<[IpAddr]>,
    /// `spec.externalIPs`, parsed.
    pub external_ips: Box<[IpAddr]>,
    /// `spec.sessionAffinity` with its timeout as given (checked by
    /// translation).
    pub session_affinity: SessionAffinity,
    /// `spec.loadBalancerSourceRanges`, trimmed, as given (parsed and
    /// checked by translation).
    pub load_balancer_source_ranges: Box<[Box<str>]>,
    /// `spec.externalTrafficPolicy`: which endpoints NodePort,
    /// LoadBalancer and externalIP frontends reach.
    pub external_traffic_policy: TrafficPolicy,
    /// `spec.internalTrafficPolicy`: which endpoints ClusterIP frontends
    /// (packets from pods and sockets of the node) reach.
    pub internal_traffic_policy: TrafficPolicy,
    /// `spec.healthCheckNodePort`, as given (checked by translation; only
    /// used with `externalTrafficPolicy: Local`).
    pub health_check_node_port: Option<i32>,
    /// `spec.trafficDistribution`.
    pub traffic_distribution: TrafficDistribution,
    /// Fields set to something the agent does not serve (e.g. an SCTP
    /// port), one line each: logged, counted and shown by `list`.
    pub unsupported: Box<[String]>,
    /// What could not be read (invalid addresses, a missing spec), one
    /// line each, reported with the Service.
    pub problems: Box<[String]>,
}

/// `spec.sessionAffinity` of a Service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SessionAffinity {
    /// `None` (the default), or a value the agent does not know.
    #[default]
    None,
    /// `ClientIP`, with `sessionAffinityConfig.clientIP.timeoutSeconds`
    /// as given (`None`: unset).
    ClientIp {
        /// The timeout in seconds, unchecked.
        timeout_seconds: Option<i64>,
    },
}

/// `addressType` of an EndpointSlice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressType {
    /// `IPv4`.
    Ipv4,
    /// `IPv6`.
    Ipv6,
    /// `FQDN` or anything else: not served.
    Other,
}

impl AddressType {
    /// The address type of slices holding addresses of `addr`'s family.
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => AddressType::Ipv4,
            IpAddr::V6(_) => AddressType::Ipv6,
        }
    }
}

/// One port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortRecord {
    /// `name` (empty when unnamed): the Service port it serves.
    pub name: Box<str>,
    /// `protocol`.
    pub protocol: PortProtocol,
    /// `port`, as given.
    pub port: Option<i32>,
}

/// What an endpoint's `hints.forNodes` says about this node (the node's
/// name is known when the slice is read, so the names are not kept).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NodeHint {
    /// No `forNodes` hint.
    #[default]
    None,
    /// Hinted for other nodes only.
    OtherNodes,
    /// Hinted for this node (among others, maybe).
    ThisNode,
}

/// Where an endpoint's `hints.forZones` are: a range of
/// [`SliceRecord::zone_hints`] (empty: no zone hint).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZoneHints {
    /// Index of the first zone in [`SliceRecord::zone_hints`].
    pub start: u16,
    /// Number of zones.
    pub len: u16,
}

impl ZoneHints {
    /// Whether the endpoint has no zone hint.
    pub fn is_empty(self) -> bool {
        self.len == 0
    }
}

/// One address of an endpoint with the endpoint's conditions, API defaults
/// applied (`ready` unset means ready; `serving` unset follows `ready`;
/// `terminating` unset means not terminating).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointRecord {
    /// The address.
    pub addr: IpAddr,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.serving`.
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
    /// `nodeName` is this node.
    pub node_local: bool,
    /// `hints.forNodes`, as it concerns this node.
    pub node_hint: NodeHint,
    /// `hints.forZones`: where its zones are in the slice's
    /// [`SliceRecord::zone_hints`].
    pub zone_hints: ZoneHints,
}

/// What the agent keeps of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceRecord {
    /// The Service it belongs to (its `kubernetes.io/service-name` label,
    /// in its namespace).
    pub service: Option<ObjectName>,
    /// `addressType`.
    pub address_type: AddressType,
    /// `ports`.
    pub ports: Box<[SlicePortRecord]>,
    /// Every address of every endpoint.
    pub endpoints: Box<[EndpointRecord]>,
    /// The zone names of every endpoint's `hints.forZones`, one after the
    /// other ([`EndpointRecord::zone_hints`] says which are whose).
    pub zone_hints: Box<[Box<str>]>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation.
    pub trigger_time: Option<jiff::Timestamp>,
    /// What could not be read (invalid addresses), one line each,
    /// reported with its Service.
    pub problems: Box<[String]>,
}

impl SliceRecord {
    /// The zones of `endpoint`'s `hints.forZones`.
    pub fn zones_of(&self, endpoint: &EndpointRecord) -> &[Box<str>] {
        let start = usize::from(endpoint.zone_hints.start);
        self.zone_hints
            .get(start..start + usize::from(endpoint.zone_hints.len))
            .unwrap_or_default()
    }
}

/// What the agent keeps of its own Node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeRecord {
    /// The node has a `deletionTimestamp` or the
    /// `ToBeDeletedByClusterAutoscaler` taint: `/healthz` fails so load
    /// balancers stop sending traffic here.
    pub being_deleted: bool,
    /// The `topology.kubernetes.io/zone` label: endpoints hinted for this
    /// zone are preferred.
    pub zone: Option<Box<str>>,
    /// `status.addresses` of type `InternalIP`, parsed: the devices holding
    /// them are external devices, and the first IPv4 one is the SNAT
    /// address, unless flags say otherwise.
    pub internal_ips: Box<[IpAddr]>,
    /// `status.addresses` of type `ExternalIP`, parsed: the devices holding
    /// them are external devices too.
    pub external_ips: Box<[IpAddr]>,
}
