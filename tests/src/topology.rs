//! A one-node topology: a node namespace and pod namespaces, each pod joined
//! to the node by a veth pair (`lxcN` on the node, `eth0` in the pod), with
//! routing as a CNI would set it up.

use std::net::Ipv4Addr;

use anyhow::Context as _;

use crate::netns::{NetNs, unique_prefix};

/// A pod: its namespace, address and the node-side device.
pub struct Pod {
    /// The pod's namespace.
    pub ns: NetNs,
    /// The pod's address (on its `eth0`).
    pub ip: Ipv4Addr,
    /// The host-side device name in the node namespace (`lxcN`).
    pub host_device: String,
}

/// A node namespace with pods. Dropping it removes every namespace (and so
/// every device) it created; pods go first (field order), the node last.
pub struct SingleNode {
    /// The pods, in creation order.
    pub pods: Vec<Pod>,
    /// The node namespace.
    pub node: NetNs,
}

/// Prefix of the node-side pod device names.
pub const POD_DEVICE_PREFIX: &str = "lxc";

impl SingleNode {
    /// Creates a node with `pods` pods: pod `i` gets `10.200.i.2/24`, with
    /// the node side `10.200.i.1` as its default gateway.
    pub fn new(tag: &str, pods: usize) -> anyhow::Result<Self> {
        let prefix = unique_prefix(tag);
        let node = NetNs::create(&format!("{prefix}-node"))?;
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let mut topology = SingleNode {
            pods: Vec::new(),
            node,
        };
        for i in 0..pods {
            let ns = NetNs::create(&format!("{prefix}-pod{i}"))?;
            let host_device = format!("{POD_DEVICE_PREFIX}{i}");
            let ip = Ipv4Addr::new(10, 200, i as u8, 2);
            let gateway = Ipv4Addr::new(10, 200, i as u8, 1);
            topology
                .node
                .ip(&[
                    "link",
                    "add",
                    &host_device,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns.name(),
                ])
                .with_context(|| format!("creating the veth of pod {i}"))?;
            topology
                .node
                .ip(&["addr", "add", &format!("{gateway}/24"), "dev", &host_device])?;
            topology.node.ip(&["link", "set", &host_device, "up"])?;
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
            topology.pods.push(Pod {
                ns,
                ip,
                host_device,
            });
        }
        Ok(topology)
    }
}
