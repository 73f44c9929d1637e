//! The synthetic cluster every bench programs: `count` ClusterIP Services
//! on TCP port 80, each with its own endpoints on port 8080, laid out the
//! same way for our agent (YAML, or desired frontends written straight to
//! the maps) and for kube-proxy's rule sets ([`super::kube_proxy`]).
//!
//! Addresses: Service `i` has ClusterIP `10.96.0.0 + 1 + i`; its synthetic
//! endpoint `j` is `100.64.0.0 + i * backends + j` (never sent any traffic).
//! Any Service may be given other endpoints: the last one gets the real
//! pods with servers in the traffic bench, a changed one loses one.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use service_agent::{
    datapath::MapSizes,
    reconcile::{
        cluster::ObjectName,
        translate::{BackendState, DesiredBackend, DesiredFrontend},
    },
};
use service_common::{FRONTEND_FLAG_CLUSTER_IP, PROTO_TCP};

/// Namespace of every synthetic Service.
pub const NAMESPACE: &str = "bench";
/// The Services' port (TCP).
pub const SERVICE_PORT: u16 = 80;
/// The endpoints' port, named `http` in the EndpointSlices.
pub const TARGET_PORT: u16 = 8080;
/// Name of the Service port.
pub const PORT_NAME: &str = "http";
/// The pod network (kube-proxy's `--cluster-cidr`): the pods of
/// [`crate::topology::SingleNode`] are `10.200.i.2`.
pub const CLUSTER_CIDR: &str = "10.200.0.0/16";

const FIRST_CLUSTER_IP: u32 = u32::from_be_bytes([10, 96, 0, 1]);
const FIRST_ENDPOINT: u32 = u32::from_be_bytes([100, 64, 0, 0]);

/// A synthetic set of Services.
#[derive(Clone, Debug)]
pub struct ServiceSet {
    /// Number of Services.
    pub count: u32,
    /// Synthetic endpoints of each Service.
    pub endpoints_per_service: u32,
    /// Services whose endpoints are given instead.
    pub overrides: BTreeMap<u32, Vec<Ipv4Addr>>,
}

impl ServiceSet {
    /// `count` Services with `endpoints` synthetic endpoints each.
    pub fn new(count: u32, endpoints: u32) -> Self {
        ServiceSet {
            count,
            endpoints_per_service: endpoints,
            overrides: BTreeMap::new(),
        }
    }

    /// The same set, Service `i` served by `endpoints` instead.
    pub fn with_endpoints(mut self, i: u32, endpoints: Vec<Ipv4Addr>) -> Self {
        self.overrides.insert(i, endpoints);
        self
    }

    /// Index of the last Service (the one traffic goes to).
    pub fn last(&self) -> u32 {
        self.count - 1
    }

    /// Service `i`'s name.
    pub fn name(i: u32) -> String {
        format!("svc-{i}")
    }

    /// Service `i`'s `namespace/name`.
    pub fn object_name(i: u32) -> ObjectName {
        ObjectName::new(NAMESPACE, &Self::name(i))
    }

    /// Service `i`'s ClusterIP.
    pub fn cluster_ip(i: u32) -> Ipv4Addr {
        Ipv4Addr::from(FIRST_CLUSTER_IP + i)
    }

    /// Service `i`'s endpoint addresses.
    pub fn endpoints(&self, i: u32) -> Vec<Ipv4Addr> {
        match self.overrides.get(&i) {
            Some(given) => given.clone(),
            None => (0..self.endpoints_per_service)
                .map(|j| Ipv4Addr::from(FIRST_ENDPOINT + i * self.endpoints_per_service + j))
                .collect(),
        }
    }

    /// Total number of endpoints.
    pub fn total_endpoints(&self) -> usize {
        (0..self.count).map(|i| self.endpoints(i).len()).sum()
    }

    /// Service `i` as the agent's translation would produce it.
    pub fn frontend(&self, i: u32) -> DesiredFrontend {
        DesiredFrontend {
            addr: Self::cluster_ip(i).into(),
            port: SERVICE_PORT,
            proto: PROTO_TCP,
            flags: FRONTEND_FLAG_CLUSTER_IP,
            backends: self
                .endpoints(i)
                .into_iter()
                .map(|addr| DesiredBackend {
                    addr: addr.into(),
                    port: TARGET_PORT,
                    node_local: false,
                    state: BackendState::Active,
                })
                .collect(),
            draining: Vec::new(),
            affinity_timeout_secs: 0,
            source_ranges: Vec::new(),
            scope: service_common::SCOPE_ALL,
        }
    }

    /// Map capacities that hold the whole set with room to spare, and a
    /// conntrack map of `conntrack_flows` flows (two entries each).
    pub fn map_sizes(&self, conntrack_flows: u32) -> MapSizes {
        let endpoints = self.total_endpoints() as u32;
        MapSizes {
            frontends: self.count + endpoints + 1024,
            backends: endpoints + 1024,
            revnat: self.count + 1024,
            conntrack: conntrack_flows * 2,
            ..MapSizes::default()
        }
    }

    /// The whole set as Kubernetes YAML (a Service and an EndpointSlice per
    /// Service), for the agent's file source.
    pub fn yaml(&self) -> String {
        let mut out = String::with_capacity(
            self.count as usize * (400 + 70 * self.endpoints_per_service as usize),
        );
        for i in 0..self.count {
            let name = Self::name(i);
            let _ = write!(
                out,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec: {{clusterIP: {ip}, ports: [{{name: {PORT_NAME}, protocol: TCP, port: {SERVICE_PORT}, targetPort: {PORT_NAME}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-s1, namespace: {NAMESPACE}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: {PORT_NAME}, protocol: TCP, port: {TARGET_PORT}}}]\nendpoints:\n",
                ip = Self::cluster_ip(i),
            );
            for endpoint in self.endpoints(i) {
                let _ = writeln!(
                    out,
                    "- {{addresses: [\"{endpoint}\"], conditions: {{ready: true}}}}"
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use service_agent::{
        reconcile::translate::{NodeContext, translate},
        source::file::parse_documents,
    };

    #[test]
    fn the_yaml_translates_to_the_same_frontends() {
        let set = ServiceSet::new(3, 4).with_endpoints(2, vec![Ipv4Addr::new(10, 200, 1, 2)]);
        let parsed = parse_documents(&set.yaml(), None).unwrap();
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        let translation = translate(&parsed.into_cluster_state(), &NodeContext::default());
        assert!(translation.skipped.is_empty(), "{:?}", translation.skipped);
        let mut expected: Vec<DesiredFrontend> = (0..3).map(|i| set.frontend(i)).collect();
        let mut got = translation.frontends;
        expected.sort_by_key(|f| f.addr);
        got.sort_by_key(|f| f.addr);
        assert_eq!(got, expected);
        assert_eq!(set.total_endpoints(), 4 + 4 + 1);
    }

    #[test]
    fn addresses_do_not_overlap_at_the_largest_size() {
        let set = ServiceSet::new(100_000, 10);
        assert_eq!(
            ServiceSet::cluster_ip(99_999),
            Ipv4Addr::new(10, 97, 134, 160)
        );
        assert_eq!(set.endpoints(99_999)[9], Ipv4Addr::new(100, 79, 66, 63));
    }
}
