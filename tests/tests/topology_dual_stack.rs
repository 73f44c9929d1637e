//! The dual-stack topologies the IPv6 datapath tests will run in (issue
//! 10): every veth end has an IPv6 address beside its IPv4 one, and the
//! routes of both families carry TCP and UDP between namespaces. No agent
//! and no eBPF program: this checks the topology itself, so a failure of
//! an IPv6 end-to-end test later points at the datapath, not the set-up.

use std::net::{IpAddr, SocketAddr};

use service_tests::{
    require_root,
    topology::{CLIENT_IP, SingleNode, TwoNodes, TwoNodesOptions, ipv6_of},
    traffic::{BackendServer, http_get_peer_seen, udp_request},
};

#[test]
fn two_dual_stack_nodes_carry_tcp_and_udp_over_ipv6_from_the_client_and_across_nodes() {
    require_root!();
    let topology = TwoNodes::with_options(
        "dual",
        1,
        TwoNodesOptions {
            dual_stack: true,
            ..TwoNodesOptions::default()
        },
    )
    .expect("dual-stack topology");
    let (pod_a, pod_b) = (&topology.pods_a[0], &topology.pods_b[0]);
    let (a6, b6) = (
        pod_a.ip6.expect("pod a0 has an IPv6 address"),
        pod_b.ip6.expect("pod b0 has an IPv6 address"),
    );
    assert_eq!(a6.to_string(), "fd00:10:201::2");
    let _servers = [
        BackendServer::start_on(&pod_a.ns, "a0", a6.into(), 8080, 5353).expect("server on a0"),
        BackendServer::start_on(&pod_b.ns, "b0", b6.into(), 8080, 5353).expect("server on b0"),
        // IPv4 still works beside IPv6, on the same ports.
        BackendServer::start(&pod_b.ns, "b0-v4", 8080, 5353).expect("IPv4 server on b0"),
    ];
    // The external client reaches a pod of node A (its gateway) over
    // IPv6; the pod sees the client's own IPv6 address.
    let to_a = SocketAddr::new(a6.into(), 8080);
    let (name, peer) = topology
        .client
        .run(move || http_get_peer_seen(to_a))
        .expect("client thread")
        .expect("TCP over IPv6 from the client to pod a0");
    assert_eq!(name, "a0");
    assert_eq!(peer.parse::<IpAddr>(), Ok(ipv6_of(CLIENT_IP).into()));
    // A pod on node A reaches a pod on node B across the node network.
    let to_b = SocketAddr::new(b6.into(), 8080);
    let (name, peer) = pod_a
        .ns
        .run(move || http_get_peer_seen(to_b))
        .expect("pod thread")
        .expect("TCP over IPv6 from pod a0 to pod b0");
    assert_eq!(name, "b0");
    assert_eq!(peer.parse::<IpAddr>(), Ok(a6.into()));
    let udp_to_b = SocketAddr::new(b6.into(), 5353);
    let answer = pod_a
        .ns
        .run(move || udp_request(udp_to_b))
        .expect("pod thread")
        .expect("UDP over IPv6 from pod a0 to pod b0");
    assert_eq!(answer, "b0");
    // And IPv4, as before.
    let to_b4 = SocketAddr::new(pod_b.ip.into(), 8080);
    let (name, _) = pod_a
        .ns
        .run(move || http_get_peer_seen(to_b4))
        .expect("pod thread")
        .expect("TCP over IPv4 from pod a0 to pod b0");
    assert_eq!(name, "b0-v4");
}

#[test]
fn a_dual_stack_single_node_carries_tcp_over_ipv6_between_its_pods() {
    require_root!();
    let node = SingleNode::dual_stack("dual1", 2).expect("dual-stack node");
    let backend = &node.pods[1];
    let ip6 = backend.ip6.expect("an IPv6 address");
    assert_eq!(ip6.to_string(), "fd00:10:200:1::2");
    let _server =
        BackendServer::start_on(&backend.ns, "pod1", ip6.into(), 8080, 5353).expect("server");
    let target = SocketAddr::new(ip6.into(), 8080);
    let (name, peer) = node.pods[0]
        .ns
        .run(move || http_get_peer_seen(target))
        .expect("pod thread")
        .expect("TCP over IPv6 from pod0 to pod1");
    assert_eq!(name, "pod1");
    assert_eq!(
        peer.parse::<IpAddr>(),
        Ok(node.pods[0].ip6.expect("an IPv6 address").into())
    );
}
