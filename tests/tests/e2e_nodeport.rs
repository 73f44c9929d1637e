//! End to end across two nodes: an external client reaches a Service through
//! node A's NodePort, a LoadBalancer IP and an allowed externalIP; backends
//! on node A answer directly (DNAT), backends on node B through SNAT to node
//! A's address, and every reply comes back from the address the client
//! used. Run with the "from network" program on XDP and on TC.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use service_agent::datapath::maps::datapath_counters;
use service_tests::{
    require_root,
    scenario::{
        TwoNodeOptions, TwoNodeScenario, WEB_LOAD_BALANCER_IP as LOAD_BALANCER_IP,
        WEB_NODE_PORT_TCP as NODE_PORT_TCP, WEB_NODE_PORT_UDP as NODE_PORT_UDP,
        WEB_PODS_PER_NODE as PODS_PER_NODE, two_node_web_yaml,
    },
    topology::{NODE_A_EXTERNAL_IP, TwoNodesOptions},
    traffic::{
        UdpEchoServer, echo_large_datagrams, http_get, spread, udp_receive_errors, udp_request,
    },
};

// Outside the client's own subnet, so the client routes them to node A.
const ALLOWED_EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 200);
const DENIED_EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 201);
/// NodePort of a Service without endpoints.
const EMPTY_NODE_PORT: u16 = 30090;
/// NodePort of the UDP echo Service "big", whose only backend is on node B.
const BIG_NODE_PORT: u16 = 30009;
/// The echo port of that backend.
const BIG_TARGET_PORT: u16 = 9009;

/// Service "web" (LoadBalancer) with its pods on both nodes and two
/// externalIPs, "big" and "empty".
fn service_yaml() -> String {
    let mut yaml = two_node_web_yaml(&format!(
        "  externalIPs: [\"{ALLOWED_EXTERNAL_IP}\", \"{DENIED_EXTERNAL_IP}\"]"
    ));
    // Service "big": UDP echo of large datagrams, its only endpoint on
    // node B (remote for the client, who reaches node A).
    yaml.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: big, namespace: demo}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.12\n  ports: [{{name: echo, protocol: UDP, port: 9, targetPort: {BIG_TARGET_PORT}, nodePort: {BIG_NODE_PORT}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: big-1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: big}}\naddressType: IPv4\nports: [{{name: echo, protocol: UDP, port: {BIG_TARGET_PORT}}}]\nendpoints:\n- {{addresses: [\"10.202.0.2\"], nodeName: node-b, conditions: {{ready: true}}}}\n"
    ));
    // A second Service, without any endpoint.
    yaml.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: empty, namespace: demo}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.11\n  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {EMPTY_NODE_PORT}}}]\n"
    ));
    yaml
}

/// Both nodes' agents on [`service_yaml`] in `nodeport_mode`, node A's
/// serving the allowed externalIP, once node A programmed the TCP NodePort.
fn start(tag: &str, nodeport_mode: &str, topology: TwoNodesOptions) -> TwoNodeScenario {
    let external_ips = format!("{ALLOWED_EXTERNAL_IP}/32");
    TwoNodeScenario::start_with(
        tag,
        PODS_PER_NODE,
        &service_yaml(),
        TwoNodeOptions {
            topology,
            agent_args: &["--nodeport-mode", nodeport_mode],
            agent_a_args: &["--external-ip-cidrs", &external_ips],
            ..TwoNodeOptions::default()
        },
        |_| Ok(()),
        (
            SocketAddr::from((NODE_A_EXTERNAL_IP, NODE_PORT_TCP)),
            "TCP",
            PODS_PER_NODE * 2,
        ),
    )
    .expect("two nodes programmed")
}

/// Shares of answers per node (`web-a*` vs `web-b*`).
fn node_shares(answers: &BTreeMap<String, usize>) -> (usize, usize) {
    answers.iter().fold((0, 0), |(a, b), (name, n)| {
        if name.starts_with("web-a") {
            (a + n, b)
        } else {
            (a, b + n)
        }
    })
}

fn check_frontend(setup: &TwoNodeScenario, frontend: SocketAddr, connections: usize) {
    // One request first, so a frontend that does not work fails fast.
    let first = setup
        .topology
        .client
        .run(move || http_get(frontend))
        .unwrap();
    assert!(first.is_ok(), "{frontend}: {first:?}\n{}", setup.logs());
    let started = std::time::Instant::now();
    let (answers, failures) =
        spread(&setup.topology.client, connections, frontend, http_get).expect("requests");
    eprintln!(
        "{frontend}: {connections} connections in {:?}, {} failed: {answers:?}",
        started.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{frontend}: {} of {connections} failed: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(3)],
        setup.logs()
    );
    let (a, b) = node_shares(&answers);
    let quarter = connections / 4;
    assert!(
        a >= quarter && b >= quarter,
        "{frontend}: node A answered {a}, node B {b} of {connections}: {answers:?}"
    );
}

fn nodeport_lb_and_external_ips_reach_both_nodes(mode: &str, options: TwoNodesOptions) {
    let tag = if options.client_tx_offload {
        format!("np{mode}o")
    } else {
        format!("np{mode}")
    };
    let setup = start(&tag, mode, options);
    // NodePort, TCP: 200 new connections, both nodes' backends answer; a
    // reply from any other address than the one connected to would not
    // complete the handshake.
    check_frontend(
        &setup,
        SocketAddr::from((NODE_A_EXTERNAL_IP, NODE_PORT_TCP)),
        200,
    );
    // NodePort, UDP: each answer must come from the NodePort address.
    let udp = SocketAddr::from((NODE_A_EXTERNAL_IP, NODE_PORT_UDP));
    let (answers, failures) = spread(&setup.topology.client, 100, udp, udp_request).unwrap();
    assert!(failures.is_empty(), "UDP: {failures:?}\n{}", setup.logs());
    let (a, b) = node_shares(&answers);
    assert!(a >= 25 && b >= 25, "UDP node shares {a}/{b}");
    // The LoadBalancer IP and the allowed externalIP behave the same.
    check_frontend(&setup, SocketAddr::from((LOAD_BALANCER_IP, 80)), 100);
    check_frontend(&setup, SocketAddr::from((ALLOWED_EXTERNAL_IP, 80)), 100);
    // A NodePort without endpoints refuses a TCP connect at once.
    let empty = SocketAddr::from((NODE_A_EXTERNAL_IP, EMPTY_NODE_PORT));
    let (refused, took) = setup
        .topology
        .client
        .run(move || {
            let started = std::time::Instant::now();
            let result = std::net::TcpStream::connect_timeout(&empty, Duration::from_secs(2));
            (result.map(|_| ()).map_err(|e| e.kind()), started.elapsed())
        })
        .unwrap();
    assert_eq!(
        refused,
        Err(std::io::ErrorKind::ConnectionRefused),
        "{empty}"
    );
    // The bound: refused in well under a second, within 100 ms.
    assert!(took < Duration::from_millis(100), "refusal took {took:?}");
    // The externalIP outside --external-ip-cidrs is not served.
    let denied = setup
        .topology
        .client
        .run(|| http_get(SocketAddr::from((DENIED_EXTERNAL_IP, 80))))
        .unwrap();
    assert!(
        denied.is_err(),
        "the denied externalIP answered: {denied:?}"
    );
    if options.client_tx_offload && mode == "xdp" {
        // The client's partial checksums really went the deferred way.
        let deferred = datapath_counters(setup.pins[0].path())
            .unwrap()
            .into_iter()
            .find(|(name, _)| *name == "checksum_deferred")
            .unwrap()
            .1;
        assert!(deferred > 0, "XDP deferred no packet to TC");
    }
}

#[test]
fn xdp_nodeport_lb_and_external_ips_reach_both_nodes() {
    require_root!();
    nodeport_lb_and_external_ips_reach_both_nodes("xdp", TwoNodesOptions::default());
}

#[test]
fn tc_nodeport_lb_and_external_ips_reach_both_nodes() {
    require_root!();
    nodeport_lb_and_external_ips_reach_both_nodes("tc", TwoNodesOptions::default());
}

/// The client keeps its transmit checksum offload on, as containers and
/// kind nodes do: XDP sees partial checksums and defers those packets to
/// the TC program beside it.
const CLIENT_OFFLOAD_ON: TwoNodesOptions = TwoNodesOptions {
    client_tx_offload: true,
    dual_stack: false,
};

#[test]
fn xdp_nodeport_lb_and_external_ips_reach_both_nodes_with_client_offload_on() {
    require_root!();
    nodeport_lb_and_external_ips_reach_both_nodes("xdp", CLIENT_OFFLOAD_ON);
}

#[test]
fn tc_nodeport_lb_and_external_ips_reach_both_nodes_with_client_offload_on() {
    require_root!();
    nodeport_lb_and_external_ips_reach_both_nodes("tc", CLIENT_OFFLOAD_ON);
}

/// Issue 8, acceptance 3: 2000-byte UDP datagrams (two fragments on the
/// 1500-byte links) from the external client through node A's NodePort to
/// the only backend, on node B (DNAT and SNAT, then reverse SNAT and
/// reverse DNAT of the 2000-byte answers, fragments included): every one
/// answered whole, and no namespace counted a bad UDP checksum or a failed
/// reassembly.
fn large_datagrams_cross_a_nodeport_to_a_remote_backend(mode: &str) {
    let setup = start(&format!("npbig{mode}"), mode, TwoNodesOptions::default());
    let _echo =
        UdpEchoServer::start(&setup.topology.pods_b[0].ns, BIG_TARGET_PORT).expect("echo server");
    let frontend = SocketAddr::from((NODE_A_EXTERNAL_IP, BIG_NODE_PORT));
    let failures =
        echo_large_datagrams(&setup.topology.client, frontend, 20, 2000).expect("client thread");
    assert!(
        failures.is_empty(),
        "{} of 20 failed: {failures:?}\n{}",
        failures.len(),
        setup.logs()
    );
    for (what, ns) in [
        ("client", &setup.topology.client),
        ("backend", &setup.topology.pods_b[0].ns),
    ] {
        assert_eq!(
            udp_receive_errors(ns).unwrap(),
            (0, 0),
            "{what}: UDP checksum errors, reassembly failures"
        );
    }
}

#[test]
fn xdp_large_udp_datagrams_cross_a_nodeport_to_a_remote_backend() {
    require_root!();
    large_datagrams_cross_a_nodeport_to_a_remote_backend("xdp");
}

#[test]
fn tc_large_udp_datagrams_cross_a_nodeport_to_a_remote_backend() {
    require_root!();
    large_datagrams_cross_a_nodeport_to_a_remote_backend("tc");
}
