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

/// What the agent keeps of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRecord {
    /// `spec.type`.
    pub service_type: ServiceType,
    /// `clusterIP: None`.
    pub headless: bool,
    /// `spec.clusterIPs` (or `spec.clusterIP`), parsed.
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
    /// `spec.externalTrafficPolicy` is `Local` (whatever the type; the
    /// translation applies it to NodePort and LoadBalancer Services only,
    /// as kube-proxy does).
    pub external_policy_local: bool,
    /// `spec.loadBalancerSourceRanges`, trimmed, as given (parsed and
    /// checked by translation).
    pub load_balancer_source_ranges: Box<[Box<str>]>,
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
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation.
    pub trigger_time: Option<jiff::Timestamp>,
    /// What could not be read (invalid addresses), one line each,
    /// reported with its Service.
    pub problems: Box<[String]>,
}

/// What the agent keeps of its own Node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeRecord {
    /// The node has a `deletionTimestamp` or the
    /// `ToBeDeletedByClusterAutoscaler` taint: `/healthz` fails so load
    /// balancers stop sending traffic here.
    pub being_deleted: bool,
}
