//! Topologies of network namespaces: one node with pods, or two nodes with
//! pods and an external client. Each pod is joined to its node by a veth
//! pair (`lxcN` on the node, `eth0` in the pod), with routing as a CNI would
//! set it up.

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
        let node = new_node(&format!("{prefix}-node"))?;
        let pods = (0..pods)
            .map(|i| add_pod(&node, &format!("{prefix}-pod{i}"), [10, 200], i, false))
            .collect::<anyhow::Result<_>>()?;
        Ok(SingleNode { pods, node })
    }
}

/// A node namespace that forwards IPv4.
fn new_node(name: &str) -> anyhow::Result<NetNs> {
    let node = NetNs::create(name)?;
    node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    Ok(node)
}

/// Adds pod `index` to `node`: namespace `name`, address
/// `NET.index.2/24` on its `eth0`, the node side `NET.index.1` on
/// `lxcINDEX` as its default gateway. With `full_checksums`, the pod's
/// transmit checksum offload is off, so its packets carry complete
/// checksums as packets from a physical network do (XDP sees them so).
fn add_pod(
    node: &NetNs,
    name: &str,
    net: [u8; 2],
    index: usize,
    full_checksums: bool,
) -> anyhow::Result<Pod> {
    let ns = NetNs::create(name)?;
    let host_device = format!("{POD_DEVICE_PREFIX}{index}");
    let ip = Ipv4Addr::new(net[0], net[1], index as u8, 2);
    let gateway = Ipv4Addr::new(net[0], net[1], index as u8, 1);
    node.ip(&[
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
    .with_context(|| format!("creating the veth of pod {name}"))?;
    node.ip(&["addr", "add", &format!("{gateway}/24"), "dev", &host_device])?;
    node.ip(&["link", "set", &host_device, "up"])?;
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
    if full_checksums {
        ns.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
    }
    Ok(Pod {
        ns,
        ip,
        host_device,
    })
}

/// Address of node A on the external network (the client's gateway).
pub const NODE_A_EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// Address of the external client.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// Node A's address on the node network.
pub const NODE_A_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// Node B's address on the node network.
pub const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// Node A's external device (towards the client).
pub const EXTERNAL_DEVICE: &str = "ext0";
/// Each node's device on the node network.
pub const NODE_NETWORK_DEVICE: &str = "node0";

/// How [`TwoNodes`] is built.
#[derive(Clone, Copy, Debug, Default)]
pub struct TwoNodesOptions {
    /// Leave the external client's transmit checksum offload on, as every
    /// container and kind node has it: its TCP and UDP packets reach node
    /// A's `ext0` (and XDP there) with their checksum left to offload
    /// (`CHECKSUM_PARTIAL`, the field holding only the pseudo-header sum).
    pub client_tx_offload: bool,
}

/// Two nodes joined by the node network (`node0`, `10.0.0.0/24`), pods on
/// each (node A: `10.201.i.2`, node B: `10.202.i.2`, routed through the
/// other node's address), and an external client (`10.99.0.2`) on node A's
/// external device `ext0` (`10.99.0.1`). By default every sender has
/// transmit checksum offload off, so packets reaching XDP carry complete
/// checksums, as from a physical network; [`TwoNodesOptions`] can leave the
/// client's on. Dropping it removes every namespace.
pub struct TwoNodes {
    /// Pods of node A.
    pub pods_a: Vec<Pod>,
    /// Pods of node B.
    pub pods_b: Vec<Pod>,
    /// The external client.
    pub client: NetNs,
    /// Node A (the one the client reaches).
    pub node_a: NetNs,
    /// Node B.
    pub node_b: NetNs,
}

impl TwoNodes {
    /// Creates the topology with `pods_per_node` pods on each node.
    pub fn new(tag: &str, pods_per_node: usize) -> anyhow::Result<Self> {
        Self::with_options(tag, pods_per_node, TwoNodesOptions::default())
    }

    /// Creates the topology with `pods_per_node` pods on each node, built
    /// as `options` say.
    pub fn with_options(
        tag: &str,
        pods_per_node: usize,
        options: TwoNodesOptions,
    ) -> anyhow::Result<Self> {
        let prefix = unique_prefix(tag);
        let node_a = new_node(&format!("{prefix}-a"))?;
        let node_b = new_node(&format!("{prefix}-b"))?;
        let client = NetNs::create(&format!("{prefix}-client"))?;
        // The client on node A's external device.
        node_a.ip(&[
            "link",
            "add",
            EXTERNAL_DEVICE,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            client.name(),
        ])?;
        node_a.ip(&[
            "addr",
            "add",
            &format!("{NODE_A_EXTERNAL_IP}/24"),
            "dev",
            EXTERNAL_DEVICE,
        ])?;
        node_a.ip(&["link", "set", EXTERNAL_DEVICE, "up"])?;
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"])?;
        client.ip(&["link", "set", "eth0", "up"])?;
        client.ip(&[
            "route",
            "add",
            "default",
            "via",
            &NODE_A_EXTERNAL_IP.to_string(),
        ])?;
        if !options.client_tx_offload {
            client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
        }
        // The node network.
        node_a.ip(&[
            "link",
            "add",
            NODE_NETWORK_DEVICE,
            "type",
            "veth",
            "peer",
            "name",
            NODE_NETWORK_DEVICE,
            "netns",
            node_b.name(),
        ])?;
        for (node, addr) in [(&node_a, NODE_A_IP), (&node_b, NODE_B_IP)] {
            node.ip(&[
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                NODE_NETWORK_DEVICE,
            ])?;
            node.ip(&["link", "set", NODE_NETWORK_DEVICE, "up"])?;
            node.exec("ethtool", &["-K", NODE_NETWORK_DEVICE, "tx", "off"])?;
        }
        node_a.ip(&[
            "route",
            "add",
            "10.202.0.0/16",
            "via",
            &NODE_B_IP.to_string(),
        ])?;
        node_b.ip(&[
            "route",
            "add",
            "10.201.0.0/16",
            "via",
            &NODE_A_IP.to_string(),
        ])?;
        let pods_a = (0..pods_per_node)
            .map(|i| add_pod(&node_a, &format!("{prefix}-a{i}"), [10, 201], i, true))
            .collect::<anyhow::Result<_>>()?;
        let pods_b = (0..pods_per_node)
            .map(|i| add_pod(&node_b, &format!("{prefix}-b{i}"), [10, 202], i, true))
            .collect::<anyhow::Result<_>>()?;
        Ok(TwoNodes {
            pods_a,
            pods_b,
            client,
            node_a,
            node_b,
        })
    }
}
