//! End to end across two dual-stack nodes (issue 10): the external client
//! reaches an IPv6 NodePort on node A whose only backend runs on node B.
//! Node A DNATs the flow to the backend and SNATs it to its IPv6 SNAT
//! address (`--snat-ipv6`), so the replies come back through node A, which
//! gives them the client as destination again and the NodePort as source.
//! TCP and UDP, with the "from network" program on XDP (which hands IPv6
//! to the TC program beside it) and on TC; and 2000-byte UDP datagrams
//! with 2000-byte answers (two fragments each way, IPv6 fragment headers)
//! the same way, delivered whole.

use std::net::SocketAddr;

use service_tests::{
    agent::datapath_counter,
    require_root,
    scenario::{
        BACKEND_HTTP_PORT, BACKEND_UDP_PORT, REMOTE_BIG_NODE_PORT as BIG_NODE_PORT,
        REMOTE_BIG_TARGET_PORT as BIG_TARGET_PORT, TwoNodeScenario,
    },
    topology::{NODE_A_EXTERNAL_IP, ipv6_of},
    traffic::{
        BackendServer, UdpEchoServer, echo_large_datagrams, http_get, spread, udp_request,
        udp6_receive_errors,
    },
};

/// NodePort of the Service, TCP and UDP.
const NODE_PORT: u16 = 30_080;
/// New flows per protocol.
const REQUESTS: usize = 10;

/// The two dual-stack nodes with the Service programmed, "from network"
/// on `mode` (`xdp` or `tc`).
fn start(tag: &str, mode: &str) -> TwoNodeScenario {
    TwoNodeScenario::dual_stack_remote_node_port(tag, mode, NODE_PORT)
}

fn ipv6_node_port_reaches_a_remote_backend(mode: &str) {
    let setup = start("np6", mode);
    let pod = &setup.topology.pods_b[0];
    let _servers_v6 = BackendServer::start_on(
        &pod.ns,
        "web-b0",
        pod.ip6.expect("dual-stack pod").into(),
        BACKEND_HTTP_PORT,
        BACKEND_UDP_PORT,
    )
    .expect("IPv6 servers");
    let node_port = ipv6_of(NODE_A_EXTERNAL_IP);
    for (target, request) in [
        (
            SocketAddr::new(node_port.into(), NODE_PORT),
            http_get as fn(SocketAddr) -> anyhow::Result<String>,
        ),
        (SocketAddr::new(node_port.into(), NODE_PORT), udp_request),
    ] {
        let (answers, failures) =
            spread(&setup.topology.client, REQUESTS, target, request).expect("client");
        assert!(
            failures.is_empty(),
            "{mode}: {target}: {} of {REQUESTS} failed: {:?}\n{}",
            failures.len(),
            &failures[..failures.len().min(3)],
            setup.logs()
        );
        assert_eq!(
            answers.get("web-b0"),
            Some(&REQUESTS),
            "{mode}: {target}: {answers:?}"
        );
    }
}

#[test]
fn xdp_ipv6_node_port_reaches_a_remote_backend_through_snat() {
    require_root!();
    ipv6_node_port_reaches_a_remote_backend("xdp");
}

#[test]
fn tc_ipv6_node_port_reaches_a_remote_backend_through_snat() {
    require_root!();
    ipv6_node_port_reaches_a_remote_backend("tc");
}

/// 2000-byte UDP datagrams (two IPv6 fragments on the 1500-byte links)
/// from the external client through node A's IPv6 NodePort to the only
/// backend, on node B (DNAT and SNAT of both fragments, then reverse SNAT
/// and reverse DNAT of the 2000-byte answers' fragments): every one
/// answered whole, no namespace counted a bad UDP checksum or a failed
/// reassembly, and node A translated the later fragments.
fn large_datagrams_cross_an_ipv6_node_port_to_a_remote_backend(mode: &str) {
    let setup = start("n6big", mode);
    let pod = &setup.topology.pods_b[0];
    let _echo = UdpEchoServer::start_on(
        &pod.ns,
        pod.ip6.expect("dual-stack pod").into(),
        BIG_TARGET_PORT,
    )
    .expect("echo server");
    let frontend = SocketAddr::new(ipv6_of(NODE_A_EXTERNAL_IP).into(), BIG_NODE_PORT);
    let failures =
        echo_large_datagrams(&setup.topology.client, frontend, 20, 2000).expect("client thread");
    assert!(
        failures.is_empty(),
        "{mode}: {} of 20 failed: {failures:?}\n{}",
        failures.len(),
        setup.logs()
    );
    for (what, ns) in [("client", &setup.topology.client), ("backend", &pod.ns)] {
        assert_eq!(
            udp6_receive_errors(ns).unwrap(),
            (0, 0),
            "{mode}: {what}: UDP checksum errors, reassembly failures"
        );
    }
    // Each datagram's later fragment four times on node A: DNAT, SNAT,
    // reverse SNAT, reverse DNAT.
    let translated =
        datapath_counter(setup.pins[0].path(), "fragment_translated").expect("fragment counter");
    assert!(
        translated >= 4 * 20,
        "{mode}: {translated} later fragments translated on node A"
    );
}

#[test]
fn xdp_large_udp_datagrams_cross_an_ipv6_node_port_to_a_remote_backend() {
    require_root!();
    large_datagrams_cross_an_ipv6_node_port_to_a_remote_backend("xdp");
}

#[test]
fn tc_large_udp_datagrams_cross_an_ipv6_node_port_to_a_remote_backend() {
    require_root!();
    large_datagrams_cross_an_ipv6_node_port_to_a_remote_backend("tc");
}
