//! End to end with the agent binary (issue 8, acceptance 3): UDP datagrams
//! larger than the MTU (2000 bytes over 1500-byte links, so two IP
//! fragments each way) through a ClusterIP, answered with 2000 bytes: every
//! one is delivered whole, and no namespace counted a bad UDP checksum or a
//! failed reassembly. (The NodePort case with a backend on another node is
//! in e2e_nodeport.rs, whose two-node setup it shares.)

use std::net::{Ipv4Addr, SocketAddr};

use service_tests::{
    require_root,
    scenario::{BACKENDS, ClusterIpScenario, web_service_yaml},
    traffic::{UdpEchoServer, echo_large_datagrams, udp_receive_errors},
};

/// The ClusterIP of the Service "big" (UDP echo of large datagrams).
const BIG_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const BIG_PORT: u16 = 9;
const BIG_TARGET_PORT: u16 = 9009;
/// Datagrams sent, each from a new socket (a new flow).
const DATAGRAMS: usize = 20;
/// Bytes per datagram and per answer.
const DATAGRAM_LEN: usize = 2000;

/// Service "big": UDP `BIG_CLUSTER_IP:BIG_PORT` to port 9009 of every
/// backend pod.
fn big_service_yaml() -> String {
    let mut yaml = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: big, namespace: demo}}\nspec:\n  clusterIP: {BIG_CLUSTER_IP}\n  ports: [{{name: echo, protocol: UDP, port: {BIG_PORT}, targetPort: {BIG_TARGET_PORT}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: big-1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: big}}\naddressType: IPv4\nports: [{{name: echo, protocol: UDP, port: {BIG_TARGET_PORT}}}]\nendpoints:\n"
    );
    for pod in 1..=BACKENDS {
        yaml.push_str(&format!(
            "- addresses: [\"10.200.{pod}.2\"]\n  conditions: {{ready: true}}\n"
        ));
    }
    yaml
}

#[test]
fn udp_datagrams_larger_than_the_mtu_cross_a_cluster_ip_both_ways() {
    require_root!();
    let yaml = web_service_yaml(&[1, 2, 3]) + &big_service_yaml();
    let scenario = ClusterIpScenario::start("frag", &yaml, BACKENDS).expect("scenario");
    let _echo: Vec<UdpEchoServer> = (1..=BACKENDS)
        .map(|pod| {
            UdpEchoServer::start(&scenario.topology.pods[pod].ns, BIG_TARGET_PORT).expect("echo")
        })
        .collect();
    let frontend = SocketAddr::from((BIG_CLUSTER_IP, BIG_PORT));
    let failures = echo_large_datagrams(scenario.client(), frontend, DATAGRAMS, DATAGRAM_LEN)
        .expect("client thread");
    assert!(
        failures.is_empty(),
        "{} of {DATAGRAMS} 2000-byte datagrams failed: {failures:?}\nagent log:\n{}",
        failures.len(),
        scenario.agent.log()
    );
    // Both ends: no datagram dropped for its checksum, no datagram left
    // half reassembled (the counters count what the sockets never saw).
    for pod in 0..=BACKENDS {
        assert_eq!(
            udp_receive_errors(&scenario.topology.pods[pod].ns).unwrap(),
            (0, 0),
            "pod {pod}: UDP checksum errors, reassembly failures"
        );
    }
}
