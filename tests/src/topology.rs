//! Topologies of network namespaces: one node with pods, or two nodes with
//! pods and an external client. Each pod is joined to its node by a veth
//! pair (`lxcN` on the node, `eth0` in the pod), with routing as a CNI would
//! set it up. Dual-stack topologies give every veth end an IPv6 address
//! too ([`ipv6_of`] its IPv4 one, without duplicate address detection so
//! it is usable at once) and route both families.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;

use crate::netns::{NetNs, unique_prefix};

/// A pod: its namespace, address and the node-side device.
pub struct Pod {
    /// The pod's namespace.
    pub ns: NetNs,
    /// The pod's address (on its `eth0`).
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address (`ipv6_of(ip)`), in dual-stack topologies.
    pub ip6: Option<Ipv6Addr>,
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
        Self::build(tag, pods, false)
    }

    /// [`SingleNode::new`], dual-stack: pod `i` also gets
    /// `fd00:10:200:i::2/64`, with the node side `fd00:10:200:i::1` as its
    /// IPv6 default gateway.
    pub fn dual_stack(tag: &str, pods: usize) -> anyhow::Result<Self> {
        Self::build(tag, pods, true)
    }

    fn build(tag: &str, pods: usize, dual_stack: bool) -> anyhow::Result<Self> {
        let prefix = unique_prefix(tag);
        let node = new_node(&format!("{prefix}-node"), dual_stack)?;
        let pods = (0..pods)
            .map(|i| {
                add_pod(
                    &node,
                    &format!("{prefix}-pod{i}"),
                    [10, 200],
                    i,
                    false,
                    dual_stack,
                )
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(SingleNode { pods, node })
    }
}

/// The IPv6 address a dual-stack topology gives the veth end with IPv4
/// address `a.b.c.d`: `fd00:a:b:c::d`, the decimal numbers written as the
/// hexadecimal groups (10.201.0.2 is fd00:10:201:0::2), so a `/24` is a
/// `/64` and each address reads like its IPv4 one.
pub fn ipv6_of(v4: Ipv4Addr) -> Ipv6Addr {
    let group = |n: u8| u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex");
    let [a, b, c, d] = v4.octets();
    Ipv6Addr::new(0xfd00, group(a), group(b), group(c), 0, 0, 0, group(d))
}

/// Turns duplicate address detection off in `ns`, for the devices
/// created in it or moved into it from now on: their link-local addresses
/// are usable at once too (a tentative one would hold up neighbour
/// discovery, and so the first packets, for a second or more).
fn without_dad(ns: &NetNs) -> anyhow::Result<()> {
    ns.exec(
        "sysctl",
        &[
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ],
    )?;
    Ok(())
}

/// Adds `ipv6_of(v4)/64` to `device` in `ns`, usable at once (no
/// duplicate address detection).
fn add_ipv6(ns: &NetNs, device: &str, v4: Ipv4Addr) -> anyhow::Result<()> {
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/64", ipv6_of(v4)),
        "dev",
        device,
        "nodad",
    ])
}

/// A node namespace that forwards IPv4 (and IPv6 when `dual_stack`).
fn new_node(name: &str, dual_stack: bool) -> anyhow::Result<NetNs> {
    let node = NetNs::create(name)?;
    node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    if dual_stack {
        without_dad(&node)?;
        node.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
    }
    Ok(node)
}

/// Adds pod `index` to `node`: namespace `name`, address
/// `NET.index.2/24` on its `eth0`, the node side `NET.index.1` on
/// `lxcINDEX` as its default gateway. With `full_checksums`, the pod's
/// transmit checksum offload is off, so its packets carry complete
/// checksums as packets from a physical network do (XDP sees them so).
/// With `dual_stack`, both ends get their [`ipv6_of`] address too and the
/// pod an IPv6 default route through the node side.
fn add_pod(
    node: &NetNs,
    name: &str,
    net: [u8; 2],
    index: usize,
    full_checksums: bool,
    dual_stack: bool,
) -> anyhow::Result<Pod> {
    let ns = NetNs::create(name)?;
    if dual_stack {
        without_dad(&ns)?;
    }
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
    if dual_stack {
        add_ipv6(node, &host_device, gateway)?;
        add_ipv6(&ns, "eth0", ip)?;
        ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &ipv6_of(gateway).to_string(),
        ])?;
    }
    if full_checksums {
        ns.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
    }
    Ok(Pod {
        ns,
        ip,
        ip6: dual_stack.then(|| ipv6_of(ip)),
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
    /// Dual-stack: every veth end also gets its [`ipv6_of`] address
    /// (node A's `ext0` `fd00:10:99:0::1`, the client `fd00:10:99:0::2`,
    /// the node network `fd00:10:0:0::1` and `::2`, pods
    /// `fd00:10:201:i::2` and `fd00:10:202:i::2`), the nodes forward IPv6,
    /// and IPv6 routes mirror the IPv4 ones.
    pub dual_stack: bool,
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
        let dual_stack = options.dual_stack;
        let node_a = new_node(&format!("{prefix}-a"), dual_stack)?;
        let node_b = new_node(&format!("{prefix}-b"), dual_stack)?;
        let client = NetNs::create(&format!("{prefix}-client"))?;
        if dual_stack {
            without_dad(&client)?;
        }
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
        if dual_stack {
            add_ipv6(&node_a, EXTERNAL_DEVICE, NODE_A_EXTERNAL_IP)?;
            add_ipv6(&client, "eth0", CLIENT_IP)?;
            client.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &ipv6_of(NODE_A_EXTERNAL_IP).to_string(),
            ])?;
        }
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
            if dual_stack {
                add_ipv6(node, NODE_NETWORK_DEVICE, addr)?;
            }
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
        if dual_stack {
            for (node, pods, via) in [
                (&node_a, "fd00:10:202::/48", NODE_B_IP),
                (&node_b, "fd00:10:201::/48", NODE_A_IP),
            ] {
                node.ip(&["-6", "route", "add", pods, "via", &ipv6_of(via).to_string()])?;
            }
        }
        let pods_a = (0..pods_per_node)
            .map(|i| {
                add_pod(
                    &node_a,
                    &format!("{prefix}-a{i}"),
                    [10, 201],
                    i,
                    true,
                    dual_stack,
                )
            })
            .collect::<anyhow::Result<_>>()?;
        let pods_b = (0..pods_per_node)
            .map(|i| {
                add_pod(
                    &node_b,
                    &format!("{prefix}-b{i}"),
                    [10, 202],
                    i,
                    true,
                    dual_stack,
                )
            })
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
