//! End to end across two nodes (issue 9, agent side): which endpoints a
//! frontend reaches. `externalTrafficPolicy: Local`: the local backend sees
//! the external client's own address, the node without a local endpoint
//! does not serve the NodePort to it but does to its own pods (every
//! endpoint, as kube-proxy), and the health-check node port answers 200
//! on the node with an endpoint, 503 on the other, and closes when the
//! policy returns to Cluster. `internalTrafficPolicy: Local` from a pod on
//! each node. `PreferSameZone` with zone hints on two nodes in two zones.
//! And an agent started without device flags on a node with a default
//! route, which finds its external devices and serves a NodePort.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use service_tests::{
    agent::{list_table, metric},
    netns::NetNs,
    require_root,
    scenario::{TwoNodeOptions, TwoNodeScenario},
    topology::{
        CLIENT_IP, EXTERNAL_DEVICE, NODE_A_EXTERNAL_IP, NODE_A_IP, NODE_B_IP, NODE_NETWORK_DEVICE,
        TwoNodes,
    },
    traffic::{HttpConnection, http_get, http_get_path, http_get_peer_seen},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30080;
const HEALTH_CHECK_PORT: u16 = 32100;
const PODS_PER_NODE: usize = 2;
/// Requests per check.
const REQUESTS: usize = 20;
/// A Service with an SCTP port beside a TCP one.
const SCTP_SERVICE: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: signal, namespace: demo}\nspec:\n  clusterIP: 10.96.0.20\n  ports:\n  - {name: sctp, protocol: SCTP, port: 3868}\n  - {name: tcp, protocol: TCP, port: 3869}\n";

/// Service `web` of `service_type` with `spec_extra` (indented spec lines)
/// and one slice listing `endpoints` as (pod address, node, extra fields).
fn web_yaml(service_type: &str, spec_extra: &str, endpoints: &[(&str, &str, &str)]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\nspec:\n  type: {service_type}\n  clusterIP: {CLUSTER_IP}\n  ports:\n  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}\n{spec_extra}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: http, protocol: TCP, port: 8080}}\nendpoints:\n"
    );
    for (addr, node, extra) in endpoints {
        yaml.push_str(&format!(
            "- {{addresses: [\"{addr}\"], nodeName: {node}, conditions: {{ready: true}}{extra}}}\n"
        ));
    }
    yaml
}

/// A Node document for `name` in `zone` with `internal_ip`.
fn node_yaml(name: &str, zone: &str, internal_ip: Ipv4Addr) -> String {
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{topology.kubernetes.io/zone: {zone}}}\nstatus:\n  addresses: [{{type: InternalIP, address: \"{internal_ip}\"}}, {{type: Hostname, address: {name}}}]\n"
    )
}

/// `REQUESTS` GETs of `target` from `ns`, each on a new connection: the
/// answers by backend name, and the failures.
fn answers(ns: &NetNs, target: SocketAddr) -> (BTreeMap<String, usize>, Vec<String>) {
    ns.run(move || {
        let mut answers = BTreeMap::new();
        let mut failures = Vec::new();
        for _ in 0..REQUESTS {
            match http_get(target) {
                Ok(name) => *answers.entry(name).or_insert(0) += 1,
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        (answers, failures)
    })
    .expect("client thread")
}

/// Every one of `REQUESTS` GETs of `target` from `ns` answered by `only`.
fn assert_only(setup: &TwoNodeScenario, ns: &NetNs, target: SocketAddr, only: &str, what: &str) {
    let (answers, failures) = answers(ns, target);
    assert!(
        failures.is_empty(),
        "{what}: {} failed: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(3)],
        setup.logs()
    );
    assert_eq!(
        answers,
        BTreeMap::from([(only.to_owned(), REQUESTS)]),
        "{what}"
    );
}

/// A GET of `target` from `ns` fails (dropped or refused).
fn assert_not_served(ns: &NetNs, target: SocketAddr, what: &str) {
    let result = ns.run(move || http_get(target)).expect("client thread");
    assert!(result.is_err(), "{what}: answered {result:?}");
}

/// The status of `GET /healthz` on the health-check port at `node` from
/// `ns`; `None` when the connection fails.
fn health_check_status(ns: &NetNs, node: Ipv4Addr) -> Option<(u16, String)> {
    let target = SocketAddr::from((node, HEALTH_CHECK_PORT));
    ns.run(move || http_get_path(target, "/healthz").ok())
        .expect("client thread")
}

/// Waits until `check` holds, up to 10 s.
fn wait_until(what: &str, setup: &TwoNodeScenario, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "{what}\n{}", setup.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Node B answers the client (through node A, which routes its
/// node-network address) on its own addresses.
fn route_client_to_node_b(topology: &TwoNodes) -> anyhow::Result<()> {
    topology.node_b.ip(&[
        "route",
        "add",
        "10.99.0.0/24",
        "via",
        &NODE_A_IP.to_string(),
    ])
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_health_checks_follow_local_endpoints()
{
    require_root!();
    // The only endpoint is on node A, the node the client reaches.
    let local = |policy: &str| {
        web_yaml(
            "LoadBalancer",
            &format!(
                "  externalTrafficPolicy: {policy}\n  healthCheckNodePort: {HEALTH_CHECK_PORT}\n"
            ),
            &[("10.201.0.2", "node-a", "")],
        )
    };
    let node_port_a = SocketAddr::from((NODE_A_EXTERNAL_IP, NODE_PORT));
    let setup = TwoNodeScenario::start_with(
        "etpl",
        PODS_PER_NODE,
        &local("Local"),
        TwoNodeOptions::default(),
        route_client_to_node_b,
        (node_port_a, "TCP", 1),
    )
    .expect("two nodes programmed");
    let client = &setup.topology.client;
    // The local backend sees the client's own address: no SNAT.
    for _ in 0..REQUESTS {
        let (name, peer) = client
            .run(move || http_get_peer_seen(node_port_a))
            .unwrap()
            .unwrap_or_else(|e| panic!("NodePort on node A: {e:#}\n{}", setup.logs()));
        assert_eq!(name, "web-a0");
        assert_eq!(peer, CLIENT_IP.to_string());
    }
    // Node B has no local endpoint: its NodePort serves nobody, also
    // reached from the client (routed through node A).
    let node_port_b = SocketAddr::from((NODE_B_IP, NODE_PORT));
    assert_not_served(client, node_port_b, "NodePort on node B");
    // A pod on node B is in-cluster traffic: the same NodePort serves it
    // with the Service's cluster-wide endpoints, as kube-proxy does.
    let pod_b = &setup.topology.pods_b[0].ns;
    assert_only(
        &setup,
        pod_b,
        node_port_b,
        "web-a0",
        "a pod on node B to node B's NodePort",
    );
    // The health-check port: 200 with one local endpoint on node A, 503
    // with none on node B; any path, kube-proxy's body and header.
    wait_until("health-check ports open", &setup, || {
        health_check_status(client, NODE_A_EXTERNAL_IP).is_some()
            && health_check_status(client, NODE_B_IP).is_some()
    });
    let (code, body) = health_check_status(client, NODE_A_EXTERNAL_IP).unwrap();
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"service": {"namespace": "demo", "name": "web"}, "localEndpoints": 1, "serviceProxyHealthy": true})
    );
    let listed = list_table(setup.pins[0].path()).unwrap();
    assert!(
        listed.contains(&format!(
            "health-check node port {HEALTH_CHECK_PORT}: demo/web"
        )) && listed.contains("NodePort,InCluster"),
        "{listed}"
    );
    let (code, body) = health_check_status(client, NODE_B_IP).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(r#""localEndpoints":0"#), "{body}");
    // The node's own address on the node network answers too (every
    // address of the node).
    let (code, _) = health_check_status(&setup.topology.node_b, NODE_A_IP).unwrap();
    assert_eq!(code, 200);
    let weight = client
        .run(|| {
            let mut stream = std::net::TcpStream::connect_timeout(
                &SocketAddr::from((NODE_A_EXTERNAL_IP, HEALTH_CHECK_PORT)),
                Duration::from_secs(2),
            )?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            std::io::Write::write_all(
                &mut stream,
                b"GET /any/path HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )?;
            let mut text = String::new();
            std::io::Read::read_to_string(&mut stream, &mut text)?;
            anyhow::Ok(text)
        })
        .unwrap()
        .unwrap();
    assert!(
        weight
            .to_ascii_lowercase()
            .contains("x-load-balancing-endpoint-weight: 1"),
        "{weight}"
    );
    // Back to Cluster: the health-check port closes on both nodes, and
    // node B's NodePort serves the backend on node A.
    setup.rewrite_yaml(&local("Cluster")).unwrap();
    wait_until("health-check ports closed", &setup, || {
        health_check_status(client, NODE_A_EXTERNAL_IP).is_none()
            && health_check_status(client, NODE_B_IP).is_none()
    });
    wait_until("node B serves the NodePort", &setup, || {
        client.run(move || http_get(node_port_b)).unwrap().is_ok()
    });
    // And Local again: the port opens again.
    setup.rewrite_yaml(&local("Local")).unwrap();
    wait_until("health-check port open again", &setup, || {
        health_check_status(client, NODE_A_EXTERNAL_IP).is_some_and(|(code, _)| code == 200)
    });
}

/// Connections a pod keeps open to a Service whose
/// `externalTrafficPolicy` switches from Local to Cluster and back, all
/// through node B's NodePort (its endpoints are both on node A, so from
/// the pod on node B they go through the in-cluster entry while Local):
/// every connection keeps its backend. Eight connections over two
/// backends: were their flows killed and balanced afresh at the switch,
/// about half would land on the other backend, which resets them.
#[test]
fn a_pods_connections_outlive_switches_of_external_traffic_policy() {
    require_root!();
    let policy = |policy: &str| {
        web_yaml(
            "NodePort",
            &format!("  externalTrafficPolicy: {policy}\n"),
            &[("10.201.0.2", "node-a", ""), ("10.201.1.2", "node-a", "")],
        )
    };
    let node_port_b = SocketAddr::from((NODE_B_IP, NODE_PORT));
    let setup = TwoNodeScenario::start_with(
        "etpswitch",
        PODS_PER_NODE,
        &policy("Local"),
        TwoNodeOptions::default(),
        |_| Ok(()),
        (SocketAddr::from((NODE_A_EXTERNAL_IP, NODE_PORT)), "TCP", 2),
    )
    .expect("two nodes programmed");
    wait_until("node B programmed its in-cluster entry", &setup, || {
        list_table(setup.pins[1].path()).is_ok_and(|listed| listed.contains("NodePort,InCluster"))
    });
    let pod_b = &setup.topology.pods_b[0].ns;
    let mut kept: Vec<(HttpConnection, String)> = (0..8)
        .map(|_| {
            let mut connection =
                HttpConnection::open(pod_b, node_port_b).expect("the pod's connection");
            let backend = connection.get().expect("first answer");
            (connection, backend)
        })
        .collect();
    let backends: BTreeSet<&str> = kept.iter().map(|(_, b)| b.as_str()).collect();
    assert!(
        backends.is_subset(&BTreeSet::from(["web-a0", "web-a1"])),
        "{backends:?}"
    );
    for (to, applied) in [("Cluster", false), ("Local", true)] {
        setup.rewrite_yaml(&policy(to)).unwrap();
        // Applied once node B's listing shows the in-cluster entry gone
        // (or back).
        wait_until(
            &format!("externalTrafficPolicy {to} applied"),
            &setup,
            || {
                list_table(setup.pins[1].path())
                    .is_ok_and(|listed| listed.contains("NodePort,InCluster") == applied)
            },
        );
        for (connection, backend) in &mut kept {
            let answer = connection.get().unwrap_or_else(|e| {
                panic!(
                    "a connection to {backend} after the switch to {to}: {e:#}\n{}",
                    setup.logs()
                )
            });
            assert_eq!(&answer, backend, "after the switch to {to}");
        }
    }
}

#[test]
fn internal_traffic_policy_local_keeps_pods_on_their_node() {
    require_root!();
    let yaml = |endpoints: &[(&str, &str, &str)]| {
        web_yaml("ClusterIP", "  internalTrafficPolicy: Local\n", endpoints)
    };
    let both = [("10.201.1.2", "node-a", ""), ("10.202.1.2", "node-b", "")];
    let cluster_ip = SocketAddr::from((CLUSTER_IP, 80));
    let setup = TwoNodeScenario::start_with(
        "itpl",
        PODS_PER_NODE,
        &yaml(&both),
        TwoNodeOptions::default(),
        |_| Ok(()),
        (cluster_ip, "TCP", 1),
    )
    .expect("two nodes programmed");
    let pod_a = &setup.topology.pods_a[0].ns;
    let pod_b = &setup.topology.pods_b[0].ns;
    assert_only(&setup, pod_a, cluster_ip, "web-a1", "from a pod on node A");
    assert_only(&setup, pod_b, cluster_ip, "web-b1", "from a pod on node B");
    // Only node A has an endpoint: node B's pods reach nothing.
    setup.rewrite_yaml(&yaml(&both[..1])).unwrap();
    wait_until("node B without a local endpoint", &setup, || {
        pod_b.run(move || http_get(cluster_ip)).unwrap().is_err()
    });
    assert_not_served(pod_b, cluster_ip, "from a pod on node B");
    assert_only(&setup, pod_a, cluster_ip, "web-a1", "from a pod on node A");
}

#[test]
fn prefer_same_zone_keeps_traffic_in_each_nodes_zone() {
    require_root!();
    let hints = |zone: &str| format!(", hints: {{forZones: [{{name: {zone}}}]}}");
    let (hint_a, hint_b) = (hints("zone-a"), hints("zone-b"));
    let yaml = format!(
        "{}{}{}",
        web_yaml(
            "ClusterIP",
            "  trafficDistribution: PreferSameZone\n",
            &[
                ("10.201.1.2", "node-a", &hint_a),
                ("10.202.1.2", "node-b", &hint_b),
            ],
        ),
        node_yaml("node-a", "zone-a", NODE_A_IP),
        node_yaml("node-b", "zone-b", NODE_B_IP),
    ) + SCTP_SERVICE;
    let cluster_ip = SocketAddr::from((CLUSTER_IP, 80));
    let setup = TwoNodeScenario::start_with(
        "zone",
        PODS_PER_NODE,
        &yaml,
        TwoNodeOptions::default(),
        |_| Ok(()),
        (cluster_ip, "TCP", 1),
    )
    .expect("two nodes programmed");
    assert_only(
        &setup,
        &setup.topology.pods_a[0].ns,
        cluster_ip,
        "web-a1",
        "from zone-a",
    );
    assert_only(
        &setup,
        &setup.topology.pods_b[0].ns,
        cluster_ip,
        "web-b1",
        "from zone-b",
    );
    // The SCTP port is not served, and says so: in the log, in `list`, in
    // a metric.
    let listed = list_table(setup.pins[0].path()).unwrap();
    assert!(
        listed.contains("not supported: demo/signal: Service demo/signal port \"sctp\": protocol SCTP is not served"),
        "{listed}"
    );
    assert!(
        setup.agents[0]
            .log()
            .contains("not supported: Service demo/signal")
    );
    assert_eq!(
        metric(&setup.topology.node_a, "service_agent_unsupported_fields").unwrap(),
        Some(1.0)
    );
    // Node B moves to a zone without hinted endpoints: it falls back to
    // every endpoint.
    setup
        .rewrite_yaml(&yaml.replace(
            "name: node-b\n  labels: {topology.kubernetes.io/zone: zone-b}",
            "name: node-b\n  labels: {topology.kubernetes.io/zone: zone-c}",
        ))
        .unwrap();
    let pod_b = &setup.topology.pods_b[0].ns;
    wait_until("node B falls back to every endpoint", &setup, || {
        answers(pod_b, cluster_ip).0.len() == 2
    });
}

#[test]
fn an_agent_without_device_flags_detects_its_devices_and_serves_a_node_port() {
    require_root!();
    // Node A's default route leads out of ext0, towards the client; its
    // Node object holds its InternalIP on node0. Node B has no default
    // route, only its Node's InternalIP.
    let yaml = format!(
        "{}{}{}",
        web_yaml(
            "NodePort",
            "",
            &[("10.201.0.2", "node-a", ""), ("10.202.0.2", "node-b", "")],
        ),
        node_yaml("node-a", "zone-a", NODE_A_IP),
        node_yaml("node-b", "zone-a", NODE_B_IP),
    );
    let node_port = SocketAddr::from((NODE_A_EXTERNAL_IP, NODE_PORT));
    let setup = TwoNodeScenario::start_with(
        "autodev",
        PODS_PER_NODE,
        &yaml,
        TwoNodeOptions {
            detect_devices: true,
            ..TwoNodeOptions::default()
        },
        |topology| {
            topology.node_a.ip(&[
                "route",
                "add",
                "default",
                "via",
                &CLIENT_IP.to_string(),
                "dev",
                EXTERNAL_DEVICE,
            ])
        },
        (node_port, "TCP", 2),
    )
    .expect("two nodes programmed");
    let log_a = setup.agents[0].log();
    assert!(
        log_a.contains(&format!(
            "detected external devices [\"{EXTERNAL_DEVICE}\", \"{NODE_NETWORK_DEVICE}\"]"
        )) && log_a.contains(&format!("SNAT address Some({NODE_A_IP})")),
        "{log_a}"
    );
    let log_b = setup.agents[1].log();
    assert!(
        log_b.contains(&format!(
            "detected external devices [\"{NODE_NETWORK_DEVICE}\"]"
        )),
        "{log_b}"
    );
    // Both nodes' backends answer: node B's through SNAT to node A's
    // InternalIP.
    let (by_backend, failures) = answers(&setup.topology.client, node_port);
    assert!(failures.is_empty(), "{failures:?}\n{}", setup.logs());
    assert_eq!(
        by_backend.keys().collect::<Vec<_>>(),
        ["web-a0", "web-b0"],
        "{by_backend:?}"
    );
    // And the same on node A's address on the node network.
    let node_port_internal = SocketAddr::from((NODE_A_IP, NODE_PORT));
    let (_, failures) = answers(&setup.topology.node_b, node_port_internal);
    assert!(failures.is_empty(), "{failures:?}");
}
