//! End to end: pods reach an IPv6 ClusterIP through the packet datapath
//! (issue 10). A dual-stack node with four pods, three of them backends of
//! a dual-stack Service (an EndpointSlice per family), and the agent
//! binary with socket-LB limited to its own namespace
//! (`--socket-lb-host-namespace-only`), so the client pod's sockets are
//! left to `from_pod`/`to_pod`: real TCP and UDP clients in pod 0 reach all
//! three backends through `[fd00:96::10]`, and through the IPv4 ClusterIP
//! of the same Service, from the same pod, and every answer comes from the
//! frontend the client used (the TCP connection would not complete, and
//! the UDP client refuses an answer from any other address, otherwise).

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use service_common::{CT_DIR_FORWARD, FAMILY_IPV6};
use service_tests::{
    agent::{AgentProcess, conntrack_entries, frontend_new_flows, wait_for_backends},
    pins::PinDir,
    require_root,
    scenario::{BACKEND_HTTP_PORT, BACKEND_UDP_PORT, BACKENDS, CLUSTER_IP, HTTP_PORT, UDP_PORT},
    topology::{POD_DEVICE_PREFIX, SingleNode},
    traffic::{BackendServer, http_get, spread, udp_request},
};

/// The Service's IPv6 ClusterIP.
const CLUSTER_IP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// New flows per family and protocol: enough for three backends to answer.
const REQUESTS: usize = 30;

/// The dual-stack Service "web": both ClusterIPs, and an EndpointSlice per
/// family with the backend pods' addresses of that family.
fn dual_stack_yaml(topology: &SingleNode) -> String {
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: {CLUSTER_IP}
  clusterIPs: ["{CLUSTER_IP}", "{CLUSTER_IP_V6}"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
  - {{name: http, protocol: TCP, port: {HTTP_PORT}, targetPort: {BACKEND_HTTP_PORT}}}
  - {{name: echo, protocol: UDP, port: {UDP_PORT}, targetPort: {BACKEND_UDP_PORT}}}
"#
    );
    for (family, name) in [("IPv4", "web-v4"), ("IPv6", "web-v6")] {
        yaml.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: demo\n  labels: {{kubernetes.io/service-name: web}}\naddressType: {family}\nports:\n- {{name: http, protocol: TCP, port: {BACKEND_HTTP_PORT}}}\n- {{name: echo, protocol: UDP, port: {BACKEND_UDP_PORT}}}\nendpoints:\n"
        ));
        for pod in &topology.pods[1..=BACKENDS] {
            let addr: IpAddr = if family == "IPv4" {
                pod.ip.into()
            } else {
                pod.ip6.expect("dual-stack pod").into()
            };
            yaml.push_str(&format!("- {{addresses: [\"{addr}\"]}}\n"));
        }
    }
    yaml
}

#[test]
fn a_pod_reaches_every_backend_through_an_ipv6_cluster_ip_and_the_ipv4_one() {
    require_root!();
    let topology = SingleNode::dual_stack("v6cip", BACKENDS + 1).expect("dual-stack node");
    let mut servers = Vec::new();
    for pod in 1..=BACKENDS {
        let ns = &topology.pods[pod].ns;
        let name = format!("web-{pod}");
        let ip6 = topology.pods[pod].ip6.expect("dual-stack pod");
        servers.push(
            BackendServer::start(ns, &name, BACKEND_HTTP_PORT, BACKEND_UDP_PORT)
                .expect("IPv4 servers"),
        );
        servers.push(
            BackendServer::start_on(ns, &name, ip6.into(), BACKEND_HTTP_PORT, BACKEND_UDP_PORT)
                .expect("IPv6 servers"),
        );
    }
    let workdir = tempfile::tempdir().expect("work folder");
    let yaml = workdir.path().join("services.yaml");
    std::fs::write(&yaml, dual_stack_yaml(&topology)).expect("writing the YAML");
    let pin = PinDir::new("v6cip").expect("pin folder");
    let mut agent = AgentProcess::start_with_args(
        &topology.node,
        &yaml,
        pin.path(),
        &[
            "--pod-device-prefix",
            POD_DEVICE_PREFIX,
            "--socket-lb-host-namespace-only",
        ],
        &workdir.path().join("agent.log"),
    )
    .expect("starting the agent");
    let http_v6 = SocketAddr::new(CLUSTER_IP_V6.into(), HTTP_PORT);
    let udp_v6 = SocketAddr::new(CLUSTER_IP_V6.into(), UDP_PORT);
    wait_for_backends(
        &mut agent,
        pin.path(),
        http_v6,
        "TCP",
        BACKENDS,
        Duration::from_secs(20),
    )
    .expect("the IPv6 frontend is programmed");
    // The agent attaches to the pod devices in the tick it programs them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (0..=BACKENDS).any(|i| {
        !agent
            .log()
            .contains(&format!("to {POD_DEVICE_PREFIX}{i}\n"))
    }) {
        agent.check_running().expect("the agent runs");
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not attach to every pod device; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let client = &topology.pods[0].ns;
    let http_v4 = SocketAddr::new(CLUSTER_IP.into(), HTTP_PORT);
    let udp_v4 = SocketAddr::new(CLUSTER_IP.into(), UDP_PORT);
    for (target, request, protocol) in [
        (
            http_v6,
            http_get as fn(SocketAddr) -> anyhow::Result<String>,
            "TCP",
        ),
        (udp_v6, udp_request, "UDP"),
        (http_v4, http_get, "TCP"),
        (udp_v4, udp_request, "UDP"),
    ] {
        let (answers, failures) = spread(client, REQUESTS, target, request).expect("client");
        assert!(
            failures.is_empty(),
            "{target}: {} of {REQUESTS} failed: {failures:?}; log:\n{}",
            failures.len(),
            agent.log()
        );
        let expected: Vec<String> = (1..=BACKENDS).map(|pod| format!("web-{pod}")).collect();
        assert_eq!(
            answers.keys().cloned().collect::<Vec<_>>(),
            expected,
            "{target}: every backend answers ({answers:?})"
        );
        assert!(
            frontend_new_flows(pin.path(), target, protocol) >= REQUESTS as u64,
            "{target}: the frontend's new-flow counter"
        );
    }
    // The packet hooks translated the IPv6 flows (socket-LB keeps no
    // conntrack entries): a master entry per flow, tagged IPv6, to the
    // ClusterIP.
    let masters = conntrack_entries(pin.path())
        .expect("conntrack")
        .into_iter()
        .filter(|(key, _)| {
            key.family == FAMILY_IPV6
                && key.direction == CT_DIR_FORWARD
                && key.daddr == CLUSTER_IP_V6.octets()
        })
        .count();
    assert!(
        masters >= 2 * REQUESTS,
        "{masters} IPv6 flows tracked by the packet hooks"
    );
}
