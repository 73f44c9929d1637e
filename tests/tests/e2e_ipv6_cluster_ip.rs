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
    net::{Ipv6Addr, SocketAddr},
    time::Duration,
};

use service_common::{CT_DIR_FORWARD, FAMILY_IPV6};
use service_tests::{
    agent::{AgentProcess, conntrack_entries, frontend_new_flows, wait_for_backends},
    cgroup::TestCgroup,
    pins::PinDir,
    require_root,
    scenario::{
        BACKEND_HTTP_PORT, BACKEND_UDP_PORT, BACKENDS, CLUSTER_IP, ClusterIpScenario, HTTP_PORT,
        UDP_PORT, backend6_name, dual_stack_web_yaml,
    },
    topology::{POD_DEVICE_PREFIX, SingleNode},
    traffic::{BackendServer, http_get, spread, udp_request, udp_stream_across_change},
};

/// The Service's IPv6 ClusterIP.
const CLUSTER_IP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// New flows per family and protocol: enough for three backends to answer.
const REQUESTS: usize = 30;

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
    std::fs::write(&yaml, dual_stack_web_yaml(&[1, 2, 3])).expect("writing the YAML");
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
        // Each UDP request comes from a new socket on an ephemeral port; a
        // port an earlier request's flow still holds continues that flow
        // (as conntrack does), so a run may count one or two flows fewer
        // (for 30 requests over 28k ports, in about 1.5% of runs: it
        // failed a CI run so).
        let least = if protocol == "UDP" {
            REQUESTS - 2
        } else {
            REQUESTS
        };
        assert!(
            frontend_new_flows(pin.path(), target, protocol) >= least as u64,
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

/// Issue 8's acceptance 2 over IPv6, with socket-LB on (as the DaemonSet
/// runs it): a pod's UDP socket *connected* to the IPv6 ClusterIP, which
/// no socket hook sees again after `connect`, follows its replaced
/// backend: socket-LB leaves pods' connected UDP sockets of both families
/// to the packet hooks, whose conntrack moves the flow. Every datagram
/// sent more than 1 s after the change is answered by the new backend.
#[test]
fn a_pods_connected_ipv6_udp_socket_follows_its_replaced_backend_with_socket_lb_on() {
    require_root!();
    let cgroup = TestCgroup::create().expect("test cgroup");
    let cgroup_path = cgroup.path().to_str().expect("UTF-8 path").to_owned();
    let mut scenario = ClusterIpScenario::start_dual_stack(
        "udpconn6",
        &dual_stack_web_yaml(&[1]),
        1,
        &["--cgroup-path", &cgroup_path],
    )
    .expect("scenario");
    let frontend = SocketAddr::new(CLUSTER_IP_V6.into(), UDP_PORT);
    wait_for_backends(
        &mut scenario.agent,
        scenario.pin.path(),
        frontend,
        "UDP",
        1,
        Duration::from_secs(20),
    )
    .expect("the IPv6 frontend is programmed");
    // 40 datagrams, 100 ms apart, from one connected socket of a process
    // in the client pod's namespace and in the cgroup socket-LB serves.
    let (run, changed_ms) = udp_stream_across_change(
        env!("CARGO_BIN_EXE_host-client"),
        scenario.client(),
        Some(&cgroup),
        frontend,
        40,
        || scenario.rewrite_yaml(&dual_stack_web_yaml(&[2])).unwrap(),
    );
    // (seconds after the change, answering backend)
    let datagrams: Vec<(f64, Option<String>)> = run["datagrams"]
        .as_array()
        .expect("datagrams")
        .iter()
        .map(|d| {
            (
                (d[0].as_f64().unwrap() - changed_ms) / 1000.0,
                d[1].as_str().map(str::to_owned),
            )
        })
        .collect();
    let (old, new) = (backend6_name(1), backend6_name(2));
    assert!(
        datagrams
            .iter()
            .any(|(sent, answer)| *sent < 0.0 && answer.as_deref() == Some(old.as_str())),
        "the old backend answered before the change: {datagrams:?}"
    );
    let late: Vec<_> = datagrams.iter().filter(|(sent, _)| *sent > 1.0).collect();
    assert!(late.len() >= 10, "{datagrams:?}");
    assert!(
        late.iter()
            .all(|(_, answer)| answer.as_deref() == Some(new.as_str())),
        "every datagram sent 1 s after the change is answered by {new}: {late:?}\n{}",
        scenario.agent.log()
    );
}
