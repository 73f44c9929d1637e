//! End to end across two nodes, with the agent binary on each and real
//! TCP and UDP traffic, for the Service fields the datapath enforces
//! (issue 9): session affinity (`sessionAffinity: ClientIP`) holds for a
//! client's connections and spreads clients, switches off and on from the
//! watched file, and expires after the timeout idle; and
//! `loadBalancerSourceRanges` admits an allowed external client, drops a
//! disallowed one (and a pod outside the ranges), and follows an update
//! of the file without a restart. On one node: socket-LB keeps a host
//! process (the node, one client) on one backend with affinity.
//!
//! More clients than the topology has: extra addresses on the external
//! client's device, each a client of its own (UDP sockets bound to them).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use service_tests::{
    agent::list_json,
    cgroup::TestCgroup,
    require_root,
    scenario::{
        CLUSTER_IP, ClusterIpScenario, TwoNodeScenario, WEB_LOAD_BALANCER_IP as LOAD_BALANCER_IP,
        WEB_NODE_PORT_TCP as NODE_PORT_TCP, WEB_NODE_PORT_UDP as NODE_PORT_UDP,
        WEB_PODS_PER_NODE as PODS_PER_NODE, http_frontend, two_node_web_yaml, web_service_yaml,
    },
    topology::{CLIENT_IP, NODE_A_EXTERNAL_IP, TwoNodes},
    traffic::{http_get, run_host_client},
};

/// The LoadBalancer IP of Service "empty", which has no endpoints.
const EMPTY_LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 101);
/// Extra client addresses on the external client's device: 10.99.0.10 on.
const EXTRA_CLIENTS: u8 = 12;
/// How long a UDP client waits for an answer.
const UDP_TIMEOUT: Duration = Duration::from_millis(1000);

/// Service "web" (LoadBalancer: NodePorts, an ingress IP, a ClusterIP),
/// its pods on both nodes, with `spec_extra` (indented spec lines); and
/// "empty".
fn service_yaml(spec_extra: &str) -> String {
    let mut yaml = two_node_web_yaml(spec_extra);
    // Service "empty": a LoadBalancer IP without endpoints.
    yaml.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: empty, namespace: demo}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.11\n  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30090}}]\nstatus:\n  loadBalancer:\n    ingress: [{{ip: \"{EMPTY_LOAD_BALANCER_IP}\"}}]\n"
    ));
    yaml
}

/// `sessionAffinity: ClientIP` with `timeout` seconds.
fn affinity(timeout: u32) -> String {
    format!(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}"
    )
}

/// `loadBalancerSourceRanges: ranges`.
fn source_ranges(ranges: &[&str]) -> String {
    format!("  loadBalancerSourceRanges: [{}]", ranges.join(", "))
}

/// The extra client address `i` (0-based).
fn extra_client(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 10 + i)
}

/// Both agents on `yaml`, node A's NodePort programmed; the external
/// client gets [`EXTRA_CLIENTS`] more addresses.
fn start(tag: &str, yaml: &str) -> TwoNodeScenario {
    TwoNodeScenario::start(
        tag,
        PODS_PER_NODE,
        yaml,
        &[],
        |topology: &TwoNodes| {
            for i in 0..EXTRA_CLIENTS {
                topology.client.ip(&[
                    "addr",
                    "add",
                    &format!("{}/32", extra_client(i)),
                    "dev",
                    "eth0",
                ])?;
            }
            Ok(())
        },
        (
            SocketAddr::from((NODE_A_EXTERNAL_IP, NODE_PORT_TCP)),
            "TCP",
            PODS_PER_NODE * 2,
        ),
    )
    .expect("two nodes programmed")
}

/// One UDP request from `source` (a new socket, so a new flow) to
/// `target`; the answering backend's name.
fn udp_from(source: Ipv4Addr, target: SocketAddr) -> anyhow::Result<String> {
    let socket = UdpSocket::bind(SocketAddr::from((source, 0)))?;
    socket.set_read_timeout(Some(UDP_TIMEOUT))?;
    socket.send_to(b"which backend?\n", target)?;
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    anyhow::ensure!(from == target, "answer from {from}, not {target}");
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

/// The backends that answered `count` HTTP requests (new connections) of
/// the external client's own address to `target`; panics on a failure.
fn http_answers(setup: &TwoNodeScenario, target: SocketAddr, count: usize) -> Vec<String> {
    setup
        .topology
        .client
        .run(move || {
            (0..count)
                .map(|_| http_get(target))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("{target}: {e:#}\n{}", setup.logs()))
}

/// The distinct answers.
fn distinct(answers: &[String]) -> BTreeSet<&str> {
    answers.iter().map(String::as_str).collect()
}

/// Polls `check` every 200 ms until it holds, for at most 15 s.
fn eventually(setup: &TwoNodeScenario, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within 15 s\n{}",
            setup.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn session_affinity_holds_spreads_switches_and_expires() {
    require_root!();
    let setup = start("e2e-affinity", &service_yaml(&affinity(10_800)));
    let node_port = SocketAddr::from((NODE_A_EXTERNAL_IP, NODE_PORT_TCP));
    let udp_node_port = SocketAddr::from((NODE_A_EXTERNAL_IP, NODE_PORT_UDP));

    let listing = list_json(setup.pins[0].path()).expect("list --json");
    for frontend in listing["frontends"].as_array().expect("frontends") {
        if frontend["service"] == "demo/web" {
            assert_eq!(frontend["affinity_timeout_secs"], 10_800, "{frontend}");
        }
    }
    // One client: 30 connections, one backend (NodePort, from the network).
    let answers = http_answers(&setup, node_port, 30);
    assert_eq!(distinct(&answers).len(), 1, "{answers:?}\n{}", setup.logs());
    // A pod: 30 connections to the ClusterIP, one backend (from a pod).
    let cluster_ip = SocketAddr::from((CLUSTER_IP, 80));
    let pod_answers = setup.topology.pods_a[0]
        .ns
        .run(move || {
            (0..30)
                .map(|_| http_get(cluster_ip))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .unwrap()
        .expect("pod requests");
    assert_eq!(distinct(&pod_answers).len(), 1, "{pod_answers:?}");
    // Many clients (UDP, over the NodePort): spread, each one sticking.
    let per_client = setup
        .topology
        .client
        .run(move || {
            (0..EXTRA_CLIENTS)
                .map(|i| {
                    (0..3)
                        .map(|_| udp_from(extra_client(i), udp_node_port))
                        .collect::<anyhow::Result<Vec<_>>>()
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("UDP clients: {e:#}\n{}", setup.logs()));
    for answers in &per_client {
        assert_eq!(distinct(answers).len(), 1, "one client moved: {answers:?}");
    }
    let firsts: BTreeSet<&str> = per_client.iter().map(|a| a[0].as_str()).collect();
    assert!(
        firsts.len() > 1,
        "{EXTRA_CLIENTS} clients all on {firsts:?}"
    );

    // Switched off: the same client spreads over the backends.
    setup.rewrite_yaml(&service_yaml("")).unwrap();
    eventually(&setup, "affinity off", || {
        distinct(&http_answers(&setup, node_port, 20)).len() > 1
    });

    // On again, with a 2 s timeout: the client sticks again...
    setup.rewrite_yaml(&service_yaml(&affinity(2))).unwrap();
    eventually(&setup, "affinity on again", || {
        distinct(&http_answers(&setup, node_port, 30)).len() == 1
    });
    // ...while it keeps connecting (within the timeout), and is balanced
    // afresh after being idle longer than the timeout: over 6 idle
    // periods the backends differ (all six the same: 4^-5).
    let mut after_idle = BTreeSet::new();
    for round in 0..6 {
        std::thread::sleep(Duration::from_millis(3_200));
        let answers = http_answers(&setup, node_port, 5);
        assert_eq!(distinct(&answers).len(), 1, "round {round}: {answers:?}");
        after_idle.insert(answers[0].clone());
    }
    assert!(
        after_idle.len() > 1,
        "the affinity never expired: {after_idle:?}\n{}",
        setup.logs()
    );
}

#[test]
fn source_ranges_admit_allowed_clients_drop_others_and_follow_updates() {
    require_root!();
    let allowed = CLIENT_IP;
    let other = extra_client(0);
    let ranges = |cidrs: &[&str]| service_yaml(&source_ranges(cidrs));
    let setup = start("e2e-ranges", &ranges(&[&format!("{allowed}/32")]));
    let lb_http = SocketAddr::from((LOAD_BALANCER_IP, 80));
    let lb_udp = SocketAddr::from((LOAD_BALANCER_IP, 7));
    let from = |source: Ipv4Addr| {
        setup
            .topology
            .client
            .run(move || udp_from(source, lb_udp))
            .unwrap()
    };
    // The allowed client (TCP and UDP), and the other one dropped.
    let answers = http_answers(&setup, lb_http, 5);
    assert_eq!(answers.len(), 5);
    assert!(from(allowed).is_ok(), "{}", setup.logs());
    assert!(
        from(other).is_err(),
        "a client outside the ranges was served"
    );
    // The NodePort of the same Service has no ranges (kube-proxy applies
    // them to LoadBalancer IPs only).
    let node_port = SocketAddr::from((NODE_A_EXTERNAL_IP, NODE_PORT_UDP));
    let other_node_port = setup
        .topology
        .client
        .run(move || udp_from(other, node_port))
        .unwrap();
    assert!(other_node_port.is_ok(), "{other_node_port:?}");
    // A pod outside the ranges is dropped as well.
    let pod = setup.topology.pods_a[0].ns.run(move || {
        let socket = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))?;
        socket.set_read_timeout(Some(UDP_TIMEOUT))?;
        socket.send_to(b"which backend?\n", lb_udp)?;
        let mut buf = [0u8; 512];
        socket.recv_from(&mut buf).map(|_| ())
    });
    assert!(pod.unwrap().is_err(), "a pod outside the ranges was served");

    // Updated in the file: now only the other client.
    setup
        .rewrite_yaml(&ranges(&[&format!("{other}/32")]))
        .unwrap();
    eventually(&setup, "the new range", || from(other).is_ok());
    assert!(from(allowed).is_err(), "the old range still admits");
    // Both, as two ranges.
    setup
        .rewrite_yaml(&ranges(&["10.99.0.2/32", "10.99.0.8/29"]))
        .unwrap();
    eventually(&setup, "two ranges", || {
        from(allowed).is_ok() && from(other).is_ok()
    });
    // An address inside neither.
    assert!(from(extra_client(6)).is_err());
    // `list` shows them from the pinned trie, on the LoadBalancer IP only.
    let listing = list_json(setup.pins[0].path()).expect("list --json");
    let frontends = listing["frontends"].as_array().expect("frontends");
    for frontend in frontends {
        let ranges: Vec<&str> = frontend["source_ranges"]
            .as_array()
            .expect("source_ranges")
            .iter()
            .filter_map(|r| r.as_str())
            .collect();
        if frontend["address"] == LOAD_BALANCER_IP.to_string() {
            assert_eq!(ranges, ["10.99.0.2/32", "10.99.0.8/29"], "{frontend}");
            assert!(frontend["flags"].to_string().contains("SourceRanges"));
        } else {
            assert!(ranges.is_empty(), "{frontend}");
        }
    }
}

/// A process of the node (socket-LB, `connect`) reaches a ClusterIP with
/// session affinity: the node is one client, so all its 30 connections
/// land on one backend; without affinity they spread.
#[test]
fn socket_lb_keeps_the_node_on_one_backend_with_affinity() {
    require_root!();
    let cgroup = TestCgroup::create().expect("test cgroup");
    let path = cgroup
        .path()
        .to_str()
        .expect("UTF-8 cgroup path")
        .to_owned();
    let with_affinity = web_service_yaml(&[1, 2, 3]).replacen(
        "spec:\n",
        &format!("spec:\n{}\n", affinity(10_800)),
        1,
    );
    let scenario = ClusterIpScenario::start_with_agent_args(
        "e2e-sockaff",
        &with_affinity,
        3,
        &["--cgroup-path", &path],
    )
    .expect("scenario");
    let host_answers = || {
        let report = run_host_client(
            env!("CARGO_BIN_EXE_host-client"),
            &scenario.topology.node,
            Some(&cgroup),
            &["http", &http_frontend().to_string(), "30"],
        );
        assert_eq!(
            report["runs"][0]["failures"].as_array().map(Vec::len),
            Some(0),
            "{report}"
        );
        report["runs"][0]["answers"]
            .as_object()
            .map(|answers| answers.keys().cloned().collect::<BTreeSet<String>>())
            .unwrap_or_default()
    };
    let answers = host_answers();
    assert_eq!(answers.len(), 1, "{answers:?}\n{}", scenario.agent.log());
    scenario
        .rewrite_yaml(&web_service_yaml(&[1, 2, 3]))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while host_answers().len() < 2 {
        assert!(Instant::now() < deadline, "affinity never switched off");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// On XDP (the default `--nodeport-mode`), a new connection to a
/// LoadBalancer IP without endpoints is refused at once, as on TC: XDP
/// leaves it to the TC program beside it, which answers with a RST.
#[test]
fn a_load_balancer_ip_without_endpoints_is_refused_on_xdp() {
    require_root!();
    let setup = start("e2e-lbempty", &service_yaml(""));
    let target = SocketAddr::from((EMPTY_LOAD_BALANCER_IP, 80));
    let (elapsed, result) = setup
        .topology
        .client
        .run(move || {
            let started = Instant::now();
            let result = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2));
            (started.elapsed(), result.map(|_| ()).map_err(|e| e.kind()))
        })
        .unwrap();
    assert_eq!(
        result,
        Err(std::io::ErrorKind::ConnectionRefused),
        "after {elapsed:?}\n{}",
        setup.logs()
    );
    assert!(
        elapsed < Duration::from_millis(500),
        "refused after {elapsed:?}"
    );
}
