//! `service-agent trace` against a running agent: the backend a new flow
//! would take and the reverse translation of its reply; for a real open
//! connection, exactly the backend that answered it; from the network to a
//! NodePort whose backend is on another node, the SNAT and the reply
//! translated back. Every trace leaves the live maps byte for byte as they
//! were, conntrack and counters included. The same over IPv6, from a pod
//! to the IPv6 ClusterIP of the demo's dual-stack Service.

use std::{net::SocketAddr, path::Path, time::Duration};

use service_tests::{
    agent::{AgentProcess, trace_json, trace_text, wait_for_backends},
    pins::{PinDir, pinned_map_bytes},
    require_root,
    scenario::{
        BACKEND_HTTP_PORT, BACKEND_UDP_PORT, BACKENDS, CLUSTER_IP6, ClusterIpScenario, HTTP_PORT,
        UDP_PORT, backend_name, backend6_name, demo_yaml_path, http_frontend, udp_frontend,
        web_service_yaml,
    },
    topology::{
        CLIENT_IP, EXTERNAL_DEVICE, NODE_A_EXTERNAL_IP, NODE_A_IP, NODE_NETWORK_DEVICE,
        POD_DEVICE_PREFIX, TwoNodes,
    },
    traffic::HttpConnection,
};

/// Runs `trace` with `args` and checks that the live maps are unchanged.
fn trace_leaving_maps_alone(pin: &Path, args: &[&str]) -> serde_json::Value {
    let before = pinned_map_bytes(pin).expect("maps before");
    // The comparison has something to compare: the Service is programmed.
    for map in ["SVC_FRONTENDS", "SVC_BACKENDS", "SVC_REVNAT", "SVC_CONFIG"] {
        assert!(!before[map].is_empty(), "{map} read as empty");
    }
    let trace = trace_json(pin, args).expect("trace");
    let after = pinned_map_bytes(pin).expect("maps after");
    for (map, entries) in &before {
        assert!(
            after.get(map) == Some(entries),
            "trace {args:?} changed the live map {map}"
        );
    }
    trace
}

/// The `address:port` strings of a JSON list of backends.
fn backends_of(frontend: &serde_json::Value) -> Vec<String> {
    frontend["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| format!("{}:{}", b["address"].as_str().unwrap(), b["port"]))
        .collect()
}

/// The `[address]:port` strings of a JSON list of IPv6 backends.
fn backends6_of(frontend: &serde_json::Value) -> Vec<String> {
    frontend["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            let address: std::net::Ipv6Addr = b["address"].as_str().unwrap().parse().unwrap();
            SocketAddr::from((address, b["port"].as_u64().unwrap() as u16)).to_string()
        })
        .collect()
}

/// The last stage's output of a list of stages.
fn last_output(stages: &serde_json::Value) -> &serde_json::Value {
    &stages.as_array().and_then(|s| s.last()).expect("a stage")["output"]
}

/// The conntrack entries of a trace, as `(change, direction)`.
fn entries(conntrack: &serde_json::Value) -> Vec<(String, String)> {
    conntrack
        .as_array()
        .expect("conntrack")
        .iter()
        .map(|e| {
            (
                e["change"].as_str().unwrap().to_owned(),
                e["direction"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn trace_shows_a_new_flow_and_names_the_backend_an_open_connection_really_has() {
    require_root!();
    let scenario =
        ClusterIpScenario::start("trace", &web_service_yaml(&[1, 2, 3]), BACKENDS).unwrap();
    let pin = scenario.pin.path();
    let client = scenario.topology.pods[0].ip;
    let from = format!("{client}:40000");
    let to = http_frontend().to_string();

    // A new flow: one of the frontend's backends, its reply from the ClusterIP.
    let new = trace_leaving_maps_alone(pin, &["--from", &from, "--to", &to]);
    assert_eq!(new["outcome"], "translated", "{new:#}");
    assert_eq!(new["frontend"]["frontend"], "10.96.0.10:80/TCP");
    assert_eq!(new["frontend"]["service"], "demo/web");
    let expected: Vec<String> = (1..=BACKENDS)
        .map(|pod| format!("10.200.{pod}.2:{BACKEND_HTTP_PORT}"))
        .collect();
    let mut listed = backends_of(&new["frontend"]);
    listed.sort();
    assert_eq!(listed, expected);
    let chosen = new["backend"]["backend"].as_str().unwrap().to_owned();
    assert!(expected.contains(&chosen), "{chosen} is no backend");
    assert_eq!(new["backend"]["choice"], "new flow");
    let output = last_output(&new["stages"]);
    assert_eq!(output["source"], from.as_str());
    assert_eq!(output["destination"], chosen.as_str());
    assert_eq!(output["tcp_flags"], "SYN");
    assert_eq!(output["checksums_valid"], true);
    assert_eq!(
        entries(&new["conntrack"]),
        [
            ("created".to_owned(), "forward".to_owned()),
            ("created".to_owned(), "reply".to_owned())
        ]
    );
    assert!(
        new["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("one possible choice")),
        "{new:#}"
    );
    let text = trace_text(pin, &["--from", &from, "--to", &to]).unwrap();
    eprintln!("{text}");
    assert!(
        text.contains("is one possible choice among the 3 backends"),
        "{text}"
    );
    let reply = &new["reply"];
    assert_eq!(reply["packet"]["source"], chosen.as_str());
    assert_eq!(reply["stages"][0]["program"], "to_pod");
    let reply_out = last_output(&reply["stages"]);
    assert_eq!(reply_out["source"], to.as_str());
    assert_eq!(reply_out["destination"], from.as_str());
    assert_eq!(reply_out["tcp_flags"], "SYN,ACK");
    assert_eq!(reply["from_frontend"], true);

    // UDP alike: to the backends' UDP port, answered from the ClusterIP.
    let udp = trace_leaving_maps_alone(
        pin,
        &[
            "--from",
            &from,
            "--to",
            &udp_frontend().to_string(),
            "--proto",
            "udp",
        ],
    );
    assert_eq!(udp["frontend"]["frontend"], "10.96.0.10:7/UDP", "{udp:#}");
    let udp_backend = udp["backend"]["backend"].as_str().unwrap();
    assert!(udp_backend.ends_with(":7007"), "{udp_backend}");
    assert_eq!(last_output(&udp["stages"])["protocol"], "UDP");
    assert_eq!(
        last_output(&udp["reply"]["stages"])["source"],
        udp_frontend().to_string().as_str()
    );

    // A real connection, then the same 5-tuple probed as established: the
    // backend that answered, from conntrack.
    let mut connection = HttpConnection::open(scenario.client(), http_frontend()).unwrap();
    let answered = connection.get().unwrap();
    let pod = (1..=BACKENDS)
        .find(|pod| backend_name(*pod) == answered)
        .unwrap_or_else(|| panic!("unknown backend {answered:?}"));
    let local: SocketAddr = connection.local_addr().unwrap();
    assert!(
        pinned_map_bytes(pin).unwrap()["SVC_CONNTRACK"].len() >= 2,
        "the open connection's entries are in the dump"
    );
    let established = trace_leaving_maps_alone(
        pin,
        &["--from", &local.to_string(), "--to", &to, "--established"],
    );
    assert_eq!(established["outcome"], "translated", "{established:#}");
    assert_eq!(
        established["backend"]["backend"],
        format!("10.200.{pod}.2:{BACKEND_HTTP_PORT}").as_str()
    );
    assert_eq!(established["backend"]["choice"], "tracked");
    let forward = &established["conntrack"][0];
    assert_eq!(forward["direction"], "forward");
    assert_ne!(forward["change"], "created");
    assert!(
        forward["state"]
            .as_array()
            .unwrap()
            .contains(&"seen-reply".into()),
        "{forward:#}"
    );
    assert_eq!(
        last_output(&established["reply"]["stages"])["source"],
        to.as_str()
    );
    // The connection still works, on the same backend.
    assert_eq!(connection.get().unwrap(), answered);

    // The text form says the same.
    let text = trace_text(
        pin,
        &["--from", &local.to_string(), "--to", &to, "--established"],
    )
    .unwrap();
    eprintln!("{text}");
    assert!(
        text.contains(&format!("backend   10.200.{pod}.2:{BACKEND_HTTP_PORT} (id"))
            && text.contains("tracked"),
        "{text}"
    );
}

#[test]
fn trace_says_clearly_when_no_datapath_is_pinned() {
    require_root!();
    let pin = PinDir::new("trace-empty").unwrap();
    let error = trace_json(
        pin.path(),
        &["--from", "10.200.0.2:40000", "--to", "10.96.0.10:80"],
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("no datapath pinned in") && error.contains("is the agent running"),
        "{error}"
    );
}

/// A NodePort Service whose only endpoint is on node B.
fn remote_only_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: remote, namespace: demo}}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: remote-1
  namespace: demo
  labels: {{kubernetes.io/service-name: remote}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
- {{addresses: ["{REMOTE_BACKEND}"], nodeName: node-b, conditions: {{ready: true}}}}
"#
    )
}

const NODE_PORT: u16 = 30080;
const REMOTE_BACKEND: &str = "10.202.0.2";

#[test]
fn trace_from_the_network_shows_the_snat_to_a_remote_backend_and_the_reply_undone() {
    require_root!();
    let workdir = tempfile::Builder::new()
        .prefix("service-lb-")
        .tempdir()
        .unwrap();
    let yaml = workdir.path().join("services.yaml");
    std::fs::write(&yaml, remote_only_yaml()).unwrap();
    let topology = TwoNodes::new("trace-np", 1).unwrap();
    let pin = PinDir::new("trace-np").unwrap();
    let snat = NODE_A_IP.to_string();
    let mut agent = AgentProcess::start_with_args(
        &topology.node_a,
        &yaml,
        pin.path(),
        &[
            "--pod-device-prefix",
            POD_DEVICE_PREFIX,
            "--external-device",
            EXTERNAL_DEVICE,
            "--external-device",
            NODE_NETWORK_DEVICE,
            "--node-name",
            "node-a",
            "--snat-ipv4",
            &snat,
            "--snat-port-range",
            "20000-20099",
        ],
        &workdir.path().join("agent.log"),
    )
    .unwrap();
    let node_port = SocketAddr::from((NODE_A_EXTERNAL_IP, NODE_PORT));
    wait_for_backends(
        &mut agent,
        pin.path(),
        node_port,
        "TCP",
        1,
        Duration::from_secs(20),
    )
    .unwrap();
    // The XDP link the trace reads the hook from.
    let xdp_link = pin
        .path()
        .join("links")
        .join(format!("{EXTERNAL_DEVICE}-xdp"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !xdp_link.exists() {
        agent.check_running().unwrap();
        assert!(std::time::Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }

    let from = format!("{CLIENT_IP}:50000");
    let to = node_port.to_string();
    let backend = format!("{REMOTE_BACKEND}:8080");
    let trace = trace_leaving_maps_alone(
        pin.path(),
        &[
            "--from-network",
            "--device",
            EXTERNAL_DEVICE,
            "--from",
            &from,
            "--to",
            &to,
        ],
    );
    eprintln!(
        "{}",
        trace_text(
            pin.path(),
            &[
                "--from-network",
                "--device",
                EXTERNAL_DEVICE,
                "--from",
                &from,
                "--to",
                &to
            ],
        )
        .unwrap()
    );
    assert_eq!(trace["entry"], "from network (XDP)", "{trace:#}");
    assert_eq!(trace["outcome"], "translated");
    assert_eq!(trace["backend"]["backend"], backend.as_str());
    assert_eq!(trace["backend"]["node_local"], false);
    let stages = trace["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2, "{trace:#}");
    assert_eq!(stages[0]["program"], "from_network");
    assert_eq!(stages[0]["verdict"], "XDP_PASS (continue)");
    assert_eq!(stages[0]["output"]["source"], from.as_str());
    assert_eq!(stages[0]["output"]["destination"], backend.as_str());
    // SNAT on the way out: the node's address, a port of the range.
    assert_eq!(stages[1]["program"], "to_network");
    let snated: SocketAddr = stages[1]["output"]["source"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(snated.ip(), NODE_A_IP);
    assert!((20000..=20099).contains(&snated.port()), "{snated}");
    assert_eq!(stages[1]["output"]["destination"], backend.as_str());
    assert_eq!(stages[1]["output"]["checksums_valid"], true);
    let mut created = entries(&trace["conntrack"]);
    created.sort();
    assert_eq!(
        created,
        ["forward", "reply", "snat", "snat-reply"].map(|d| ("created".to_owned(), d.to_owned()))
    );
    // The reply: to the SNAT address and port, back to the client from the NodePort.
    let reply = &trace["reply"];
    assert_eq!(reply["packet"]["source"], backend.as_str());
    assert_eq!(reply["packet"]["destination"], snated.to_string().as_str());
    assert_eq!(reply["stages"][0]["program"], "from_network");
    assert_eq!(reply["stages"][0]["output"]["destination"], from.as_str());
    assert_eq!(reply["stages"][1]["program"], "to_network");
    assert_eq!(last_output(&reply["stages"])["source"], to.as_str());
    assert_eq!(last_output(&reply["stages"])["destination"], from.as_str());
    assert_eq!(reply["from_frontend"], true);

    // The same packet on the TC hook, as with --nodeport-mode tc.
    let tc = trace_leaving_maps_alone(
        pin.path(),
        &[
            "--from-network",
            "--nodeport-mode",
            "tc",
            "--from",
            &from,
            "--to",
            &to,
        ],
    );
    assert_eq!(tc["stages"][0]["program"], "from_network_tc");
    assert_eq!(tc["reply"]["from_frontend"], true);
}

/// IPv6 from a pod (the demo's dual-stack Service): a new TCP flow to the
/// IPv6 ClusterIP gets one of its IPv6 backends (`[addr]:port`, checksums
/// valid), forward and reply entries, and its reply comes back from the
/// ClusterIP; UDP alike; a real IPv6 connection probed as established
/// names exactly the backend that answered it. The live maps stay as they
/// were.
#[test]
fn trace_shows_ipv6_flows_from_a_pod_and_the_backend_of_an_open_ipv6_connection() {
    require_root!();
    let yaml = std::fs::read_to_string(demo_yaml_path()).expect("demo YAML");
    let scenario = ClusterIpScenario::start_dual_stack("trace6", &yaml, BACKENDS, &[]).unwrap();
    let pin = scenario.pin.path();
    let client = scenario.topology.pods[0].ip6.expect("dual-stack pod");
    let from = SocketAddr::from((client, 40000)).to_string();
    let http6 = SocketAddr::from((CLUSTER_IP6, HTTP_PORT));
    let to = http6.to_string();
    let backend6 = |pod: usize, port: u16| {
        let ip6 = scenario.topology.pods[pod].ip6.expect("dual-stack pod");
        SocketAddr::from((ip6, port)).to_string()
    };

    let new = trace_leaving_maps_alone(pin, &["--from", &from, "--to", &to]);
    assert_eq!(new["outcome"], "translated", "{new:#}");
    assert_eq!(new["frontend"]["frontend"], "[fd00:96::10]:80/TCP");
    assert_eq!(new["frontend"]["service"], "demo/web");
    let mut expected: Vec<String> = (1..=BACKENDS)
        .map(|pod| backend6(pod, BACKEND_HTTP_PORT))
        .collect();
    expected.sort();
    let mut listed = backends6_of(&new["frontend"]);
    listed.sort();
    assert_eq!(listed, expected);
    let chosen = new["backend"]["backend"].as_str().unwrap().to_owned();
    assert!(expected.contains(&chosen), "{chosen} is no IPv6 backend");
    let output = last_output(&new["stages"]);
    assert_eq!(output["source"], from.as_str());
    assert_eq!(output["destination"], chosen.as_str());
    assert_eq!(output["tcp_flags"], "SYN");
    assert_eq!(output["checksums_valid"], true, "{output:#}");
    assert_eq!(
        entries(&new["conntrack"]),
        [
            ("created".to_owned(), "forward".to_owned()),
            ("created".to_owned(), "reply".to_owned())
        ]
    );
    let reply = &new["reply"];
    assert_eq!(reply["stages"][0]["program"], "to_pod");
    let reply_out = last_output(&reply["stages"]);
    assert_eq!(reply_out["source"], to.as_str());
    assert_eq!(reply_out["destination"], from.as_str());
    assert_eq!(reply_out["tcp_flags"], "SYN,ACK");
    assert_eq!(reply_out["checksums_valid"], true, "{reply_out:#}");
    assert_eq!(reply["from_frontend"], true);
    let text = trace_text(pin, &["--from", &from, "--to", &to]).unwrap();
    eprintln!("{text}");
    assert!(
        text.contains(&format!("packet    {from} -> {to} TCP [SYN], from pod")),
        "{text}"
    );
    let backends_line = text
        .lines()
        .find(|line| line.trim_start().starts_with("backends:"))
        .expect("a backends line");
    for backend in &expected {
        assert!(backends_line.contains(backend.as_str()), "{backends_line}");
    }

    let udp6 = SocketAddr::from((CLUSTER_IP6, UDP_PORT)).to_string();
    let udp = trace_leaving_maps_alone(pin, &["--from", &from, "--to", &udp6, "--proto", "udp"]);
    assert_eq!(
        udp["frontend"]["frontend"], "[fd00:96::10]:7/UDP",
        "{udp:#}"
    );
    let udp_backend = udp["backend"]["backend"].as_str().unwrap();
    assert!(
        (1..=BACKENDS).any(|pod| backend6(pod, BACKEND_UDP_PORT) == udp_backend),
        "{udp_backend}"
    );
    assert_eq!(last_output(&udp["stages"])["checksums_valid"], true);
    assert_eq!(
        last_output(&udp["reply"]["stages"])["source"],
        udp6.as_str()
    );

    // A real IPv6 connection, probed as established: its backend.
    let mut connection = HttpConnection::open(scenario.client(), http6).unwrap();
    let answered = connection.get().unwrap();
    let pod = (1..=BACKENDS)
        .find(|pod| backend6_name(*pod) == answered)
        .unwrap_or_else(|| panic!("unknown IPv6 backend {answered:?}"));
    let local = connection.local_addr().unwrap().to_string();
    let established =
        trace_leaving_maps_alone(pin, &["--from", &local, "--to", &to, "--established"]);
    assert_eq!(established["outcome"], "translated", "{established:#}");
    assert_eq!(
        established["backend"]["backend"],
        backend6(pod, BACKEND_HTTP_PORT).as_str()
    );
    assert_eq!(established["backend"]["choice"], "tracked");
    assert_eq!(connection.get().unwrap(), answered);
}
