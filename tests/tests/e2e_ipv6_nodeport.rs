//! End to end across two dual-stack nodes (issue 10): the external client
//! reaches an IPv6 NodePort on node A whose only backend runs on node B.
//! Node A DNATs the flow to the backend and SNATs it to its IPv6 SNAT
//! address (`--snat-ipv6`), so the replies come back through node A, which
//! gives them the client as destination again and the NodePort as source.
//! TCP and UDP, with the "from network" program on XDP (which hands IPv6
//! to the TC program beside it) and on TC.

use std::net::SocketAddr;

use service_tests::{
    require_root,
    scenario::{
        BACKEND_HTTP_PORT, BACKEND_UDP_PORT, TwoNodeOptions, TwoNodeScenario,
        dual_stack_remote_node_port_yaml,
    },
    topology::{NODE_A_EXTERNAL_IP, NODE_A_IP, TwoNodesOptions, ipv6_of},
    traffic::{BackendServer, http_get, spread, udp_request},
};

/// NodePort of the Service, TCP and UDP.
const NODE_PORT: u16 = 30_080;
/// New flows per protocol.
const REQUESTS: usize = 10;

fn ipv6_node_port_reaches_a_remote_backend(mode: &str) {
    let snat_v6 = ipv6_of(NODE_A_IP).to_string();
    let setup = TwoNodeScenario::start_with(
        &format!("np6{mode}"),
        1,
        &dual_stack_remote_node_port_yaml(NODE_PORT),
        TwoNodeOptions {
            topology: TwoNodesOptions {
                dual_stack: true,
                ..TwoNodesOptions::default()
            },
            agent_args: &[
                "--nodeport-mode",
                mode,
                "--nodeport-addresses",
                "10.99.0.0/24,fd00:10:99::/64",
            ],
            agent_a_args: &["--snat-ipv6", &snat_v6],
            ..TwoNodeOptions::default()
        },
        |_| Ok(()),
        (SocketAddr::from((NODE_A_EXTERNAL_IP, NODE_PORT)), "TCP", 1),
    )
    .expect("two nodes programmed");
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
