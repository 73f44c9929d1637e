//! End to end: host-originated traffic through socket-LB over IPv6 (issue
//! 10). A process in the node's network namespace and in the agent's
//! cgroup reaches the IPv6 ClusterIP of a dual-stack Service (and its IPv6
//! externalIP): `connect6` and `sendmsg6` send it straight to an IPv6
//! backend, and `getpeername6` and `recvmsg6` give it the frontend back as
//! its peer and as the source of UDP answers. The same process reaches the
//! Service's IPv4 ClusterIP through the IPv4 programs, and through its
//! IPv4-mapped address (`::ffff:10.96.0.10`) from unconnected dual-stack
//! IPv6 sockets;
//! an IPv6 frontend without endpoints refuses it at once. The Service
//! fields enforced per client, over IPv6 (the node is one client, by its
//! `--snat-ipv6` address): session affinity keeps the node on one IPv6
//! backend; `loadBalancerSourceRanges` refuses the node outside them and
//! serves it inside them once the file changes; an IPv6 externalIP outside
//! `--external-ip-cidrs` is not served.
//!
//! The topology is the dual-stack single node (`SingleNode::dual_stack`):
//! every backend pod serves on its IPv4 addresses as `web-N` and on its
//! IPv6 address as `web6-N`, so each answer tells the family it came over.
//! As in `e2e_host.rs`, socket-LB is attached to a cgroup made for the test
//! only.

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    time::{Duration, Instant},
};

use serde_json::Value;
use service_agent::datapath::maps::datapath_counters;
use service_common::FAMILY_IPV6;
use service_tests::{
    agent::{frontend_new_flows, list_json, listed_frontend, wait_for_backends},
    cgroup::{SOCKET_LB_HOOKS, TestCgroup},
    netns::NetNs,
    pins::affinity_entries,
    require_root,
    scenario::{
        BACKEND_HTTP_PORT, BACKEND_UDP_PORT, BACKENDS, CLUSTER_IP, CLUSTER_IP6, ClusterIpScenario,
        HTTP_PORT, UDP_PORT, backend_name, backend6_name, http_frontend, udp_frontend,
    },
    traffic::{host_client_answers, run_host_client},
};

/// The Service's IPv6 externalIP (inside `--external-ip-cidrs`).
const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 0x200);
/// The IPv6 ClusterIP of the Service without endpoints.
const EMPTY_CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11);
/// The node's IPv6 address (its side of pod 1's device), given as
/// `--snat-ipv6`: the client socket-LB takes the node for.
const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x200, 1, 0, 0, 0, 1);
/// An IPv6 LoadBalancer ingress IP of "web" (in the source-ranges test).
const LOAD_BALANCER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x98, 0, 0, 0, 0, 0x100);
/// An IPv6 externalIP of "web" outside `--external-ip-cidrs` (in the
/// source-ranges test).
const DISALLOWED_EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xaa, 0, 0, 0, 0, 1);

/// TCP connections (one GET each) from the host process.
const HTTP_CONNECTIONS: usize = 60;
/// UDP requests from new unconnected sockets, and from new connected ones.
const UDP_REQUESTS: usize = 30;
/// The longest a refused connect may take.
const REFUSAL_BOUND_MS: f64 = 100.0;

/// The dual-stack Service "web" (both families' endpoints on pods
/// 1..=3, an IPv6 externalIP), with `web_spec` (more lines of its spec,
/// indented) and `web_status` (its `status`, top-level lines), and the
/// IPv6-only Service "empty" without endpoints.
fn services_yaml(web_spec: &str, web_status: &str) -> String {
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "{CLUSTER_IP6}"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  externalIPs: ["{EXTERNAL_IP6}"]
  ports:
  - {{name: http, protocol: TCP, port: {HTTP_PORT}, targetPort: {BACKEND_HTTP_PORT}}}
  - {{name: echo, protocol: UDP, port: {UDP_PORT}, targetPort: {BACKEND_UDP_PORT}}}
{web_spec}
{web_status}
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: demo}}
spec:
  clusterIP: "{EMPTY_CLUSTER_IP6}"
  clusterIPs: ["{EMPTY_CLUSTER_IP6}"]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports:
  - {{name: http, protocol: TCP, port: {HTTP_PORT}, targetPort: {BACKEND_HTTP_PORT}}}
  - {{name: echo, protocol: UDP, port: {UDP_PORT}, targetPort: {BACKEND_UDP_PORT}}}
"#
    );
    for (family, name) in [("IPv4", "web-v4"), ("IPv6", "web-v6")] {
        yaml.push_str(&format!(
            r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: demo
  labels: {{kubernetes.io/service-name: web}}
addressType: {family}
ports:
- {{name: http, protocol: TCP, port: {BACKEND_HTTP_PORT}}}
- {{name: echo, protocol: UDP, port: {BACKEND_UDP_PORT}}}
endpoints:
"#
        ));
        for pod in 1..=BACKENDS {
            let address = if family == "IPv4" {
                format!("10.200.{pod}.2")
            } else {
                format!("fd00:10:200:{pod}::2")
            };
            yaml.push_str(&format!(
                "- {{addresses: [\"{address}\"], conditions: {{ready: true}}}}\n"
            ));
        }
    }
    yaml
}

/// [`start_with`] on the Services of `services_yaml("", "")`, the agent
/// with no further flags.
fn start(tag: &str, cgroup: &TestCgroup) -> ClusterIpScenario {
    start_with(tag, cgroup, &services_yaml("", ""), &[], &[])
}

/// The dual-stack scenario (both families' servers on pods 1..=3) with
/// the agent on `yaml`, socket-LB on `cgroup` (and `agent_args`); waits
/// until every frontend the tests use (and the TCP frontends
/// `more_frontends`, with all backends) is programmed and socket-LB
/// attached.
fn start_with(
    tag: &str,
    cgroup: &TestCgroup,
    yaml: &str,
    agent_args: &[&str],
    more_frontends: &[SocketAddr],
) -> ClusterIpScenario {
    let path = cgroup.path().to_str().expect("UTF-8 cgroup path");
    let mut args = vec![
        "--cgroup-path",
        path,
        "--external-ip-cidrs",
        "2001:db8:99::/64",
    ];
    args.extend_from_slice(agent_args);
    let mut scenario =
        ClusterIpScenario::start_dual_stack(tag, yaml, BACKENDS, &args).expect("scenario");
    let frontends = [
        (SocketAddr::from((CLUSTER_IP6, HTTP_PORT)), BACKENDS),
        (SocketAddr::from((EXTERNAL_IP6, HTTP_PORT)), BACKENDS),
        (SocketAddr::from((EMPTY_CLUSTER_IP6, HTTP_PORT)), 0),
    ];
    let more = more_frontends.iter().map(|frontend| (*frontend, BACKENDS));
    for (frontend, backends) in frontends.into_iter().chain(more) {
        wait_for_backends(
            &mut scenario.agent,
            scenario.pin.path(),
            frontend,
            "TCP",
            backends,
            Duration::from_secs(20),
        )
        .expect("frontend programmed");
    }
    scenario
        .agent
        .wait_for_log("socket-LB attached to cgroup", 1)
        .expect("socket-LB attached");
    scenario
}

/// Replaces the YAML `scenario`'s agent watches with `yaml`, then polls
/// `check` every 200 ms until it holds, for at most 15 s (`what` names
/// it).
fn rewrite_until(
    scenario: &mut ClusterIpScenario,
    yaml: &str,
    what: &str,
    mut check: impl FnMut(&ClusterIpScenario) -> bool,
) {
    scenario.rewrite_yaml(yaml).expect("rewriting the YAML");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check(scenario) {
        scenario.agent.check_running().expect("agent running");
        assert!(
            Instant::now() < deadline,
            "{what}: not within 15 s; agent log:\n{}",
            scenario.agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `host-client` with `args` in the node namespace, inside `cgroup`
/// (or outside any test cgroup); returns its runs.
fn host_client(node: &NetNs, cgroup: Option<&TestCgroup>, args: &[String]) -> Vec<Value> {
    let report = run_host_client(env!("CARGO_BIN_EXE_host-client"), node, cgroup, args);
    if let Some(cgroup) = cgroup {
        let name = cgroup.path().file_name().unwrap().to_str().unwrap();
        assert!(
            report["cgroup"].as_str().unwrap_or_default().contains(name),
            "host-client not in the test cgroup: {}",
            report["cgroup"]
        );
    }
    report["runs"].as_array().expect("runs").clone()
}

/// `KIND TARGET COUNT` for host-client.
fn run(kind: &str, target: SocketAddr, count: usize) -> Vec<String> {
    vec![kind.to_owned(), target.to_string(), count.to_string()]
}

/// The failures of one run.
fn failures(run: &Value) -> Vec<String> {
    run["failures"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| f.as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Asserts a run had no failure, `count` answers, and that every backend
/// named by `name` (pods 1..=3), and no one else, answered.
fn assert_spread_over(run: &Value, count: usize, name: fn(usize) -> String) {
    let failures = failures(run);
    assert!(
        failures.is_empty(),
        "{} to {} failed: {failures:?}",
        run["kind"],
        run["target"]
    );
    let answers = host_client_answers(run);
    assert_eq!(
        answers.values().sum::<u64>(),
        count as u64,
        "{} to {}: {answers:?}",
        run["kind"],
        run["target"]
    );
    let expected: Vec<String> = (1..=BACKENDS).map(name).collect();
    assert_eq!(
        answers.keys().cloned().collect::<Vec<_>>(),
        expected,
        "{} to {} answered by {answers:?}",
        run["kind"],
        run["target"]
    );
}

/// A host process in the cgroup reaches the IPv6 ClusterIP: 60 TCP
/// connections (each checking that `getpeername` gives the ClusterIP) and
/// UDP from unconnected and connected sockets (answers from
/// `[ClusterIP]:port`), all answered by the IPv6 servers of every
/// backend; the IPv6 externalIP too, and the Service's IPv4 ClusterIP by
/// the IPv4 servers. Outside the cgroup the IPv6 ClusterIP is unreachable
/// (the node has no route to it), so the translation is socket-LB's.
#[test]
fn host_process_reaches_an_ipv6_cluster_ip_through_socket_lb() {
    require_root!();
    let cgroup = TestCgroup::create().expect("test cgroup");
    let mut scenario = start("host6", &cgroup);
    for hook in SOCKET_LB_HOOKS {
        let ids = cgroup.attached_programs(hook).expect("BPF_PROG_QUERY");
        assert_eq!(ids.len(), 1, "hook {hook}: programs {ids:?}");
    }
    let http6 = SocketAddr::from((CLUSTER_IP6, HTTP_PORT));
    let udp6 = SocketAddr::from((CLUSTER_IP6, UDP_PORT));
    let external6 = SocketAddr::from((EXTERNAL_IP6, HTTP_PORT));
    let node = &scenario.topology.node;

    let mut args = run("http", http6, HTTP_CONNECTIONS);
    args.extend(run("udp", udp6, UDP_REQUESTS));
    args.extend(run("udp-connected", udp6, UDP_REQUESTS));
    args.extend(run("http", external6, UDP_REQUESTS));
    args.extend(run("http", http_frontend(), UDP_REQUESTS));
    let runs = host_client(node, Some(&cgroup), &args);
    assert_spread_over(&runs[0], HTTP_CONNECTIONS, backend6_name);
    assert_spread_over(&runs[1], UDP_REQUESTS, backend6_name);
    assert_spread_over(&runs[2], UDP_REQUESTS, backend6_name);
    assert_spread_over(&runs[3], UDP_REQUESTS, backend6_name);
    assert_spread_over(&runs[4], UDP_REQUESTS, backend_name);
    let pin = scenario.pin.path();
    assert!(
        frontend_new_flows(pin, http6, "TCP") >= HTTP_CONNECTIONS as u64,
        "IPv6 TCP flows not counted: {}",
        list_json(pin).expect("list")
    );
    assert!(frontend_new_flows(pin, udp6, "UDP") >= 2 * UDP_REQUESTS as u64);

    // Outside the cgroup nothing is rewritten: no route to the ClusterIP,
    // while a backend's IPv6 address is reachable directly.
    let ip6 = scenario.topology.pods[1].ip6.expect("dual-stack pod");
    let backend = SocketAddr::from((ip6, BACKEND_HTTP_PORT));
    let mut args = run("http", http6, 5);
    args.extend(run("udp", udp6, 5));
    args.extend(run("http-plain", backend, 5));
    let runs = host_client(node, None, &args);
    for run in &runs[..2] {
        assert!(
            host_client_answers(run).is_empty(),
            "{} outside the cgroup was answered: {run}",
            run["kind"]
        );
        assert_eq!(failures(run).len(), 5, "{run}");
    }
    assert_eq!(
        host_client_answers(&runs[2]).get(&backend6_name(1)),
        Some(&5),
        "{}",
        runs[2]
    );
    scenario.agent.check_running().expect("agent running");
}

/// `target` (an IPv4 socket address) as an IPv4-mapped IPv6 one,
/// `[::ffff:a.b.c.d]:port`: what a dual-stack IPv6 socket (not
/// `IPV6_V6ONLY`) connects or sends to in order to reach it.
fn v4_mapped(target: SocketAddr) -> SocketAddr {
    let SocketAddr::V4(v4) = target else {
        panic!("{target} is no IPv4 socket address");
    };
    SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
}

/// A host process in the cgroup reaches the Service's IPv4 ClusterIP
/// through its IPv4-mapped address on dual-stack IPv6 sockets: UDP from
/// unconnected sockets (which the kernel sends through its IPv4 path,
/// `sendmsg4`) answered from `[::ffff:10.96.0.10]:7` by the IPv4 servers
/// of every backend (the IPv6 ones answer as `web6-N`), and counted as
/// flows of the IPv4 frontend; TCP connections and connected UDP sockets
/// (`connect6` to the mapped address) likewise, each with the mapped
/// ClusterIP as its peer (`getpeername6`) and UDP answers from it. Outside
/// the cgroup the same addresses are unreachable, so the translation is
/// socket-LB's.
#[test]
fn host_process_reaches_an_ipv4_cluster_ip_through_its_ipv4_mapped_address() {
    require_root!();
    let cgroup = TestCgroup::create().expect("test cgroup");
    let scenario = start("host6map", &cgroup);
    let http = v4_mapped(http_frontend());
    let udp = v4_mapped(udp_frontend());
    assert_eq!(
        http.to_string(),
        format!("[::ffff:{CLUSTER_IP}]:{HTTP_PORT}")
    );
    let node = &scenario.topology.node;

    let mut args = run("udp", udp, UDP_REQUESTS);
    args.extend(run("http", http, HTTP_CONNECTIONS));
    args.extend(run("udp-connected", udp, UDP_REQUESTS));
    let runs = host_client(node, Some(&cgroup), &args);
    assert_spread_over(&runs[0], UDP_REQUESTS, backend_name);
    assert_spread_over(&runs[1], HTTP_CONNECTIONS, backend_name);
    assert_spread_over(&runs[2], UDP_REQUESTS, backend_name);
    let pin = scenario.pin.path();
    assert!(
        frontend_new_flows(pin, udp_frontend(), "UDP") >= 2 * UDP_REQUESTS as u64,
        "mapped UDP flows not counted on the IPv4 frontend: {}",
        list_json(pin).expect("list")
    );
    assert!(
        frontend_new_flows(pin, http_frontend(), "TCP") >= HTTP_CONNECTIONS as u64,
        "mapped TCP flows not counted on the IPv4 frontend: {}",
        list_json(pin).expect("list")
    );

    let mut args = run("http", http, 5);
    args.extend(run("udp", udp, 5));
    let runs = host_client(node, None, &args);
    for run in &runs {
        assert!(
            host_client_answers(run).is_empty(),
            "{} outside the cgroup was answered: {run}",
            run["kind"]
        );
        assert_eq!(failures(run).len(), 5, "{run}");
    }
}

/// An IPv6 Service without endpoints: the host process's `connect` and
/// `sendto` are refused at once (ECONNREFUSED, under 100 ms), and counted
/// as refusals.
#[test]
fn host_connect_to_an_ipv6_service_without_endpoints_is_refused() {
    require_root!();
    let cgroup = TestCgroup::create().expect("test cgroup");
    let scenario = start("host6rej", &cgroup);
    let mut args = run("http", SocketAddr::from((EMPTY_CLUSTER_IP6, HTTP_PORT)), 5);
    args.extend(run(
        "udp",
        SocketAddr::from((EMPTY_CLUSTER_IP6, UDP_PORT)),
        5,
    ));
    args.extend(run(
        "udp-connected",
        SocketAddr::from((EMPTY_CLUSTER_IP6, UDP_PORT)),
        5,
    ));
    let runs = host_client(&scenario.topology.node, Some(&cgroup), &args);
    for run in &runs {
        assert_eq!(
            run["error_kinds"],
            serde_json::json!({"ConnectionRefused": 5}),
            "{run}"
        );
        let slowest = run["slowest_failure_ms"].as_f64().unwrap_or(f64::MAX);
        assert!(
            slowest < REFUSAL_BOUND_MS,
            "refused after {slowest} ms: {run}"
        );
    }
    let counters: BTreeMap<_, _> = datapath_counters(scenario.pin.path())
        .expect("counters")
        .into_iter()
        .collect();
    assert!(
        counters.get("rejected_no_backend").copied().unwrap_or(0) >= 15,
        "{counters:?}"
    );
}

/// `sessionAffinity: ClientIP` with the default timeout, as lines of
/// "web"'s spec.
const AFFINITY: &str =
    "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 10800}}";

/// The backends that answered one run, by name.
fn answered_by(run: &Value) -> Vec<String> {
    host_client_answers(run).into_keys().collect()
}

/// Session affinity over IPv6: the node (one client, `--snat-ipv6`)
/// keeps one IPv6 backend for its 30 TCP connections to the IPv6
/// ClusterIP and another (or the same) one for its UDP requests from new
/// unconnected and connected sockets; the affinity map holds exactly the
/// node's two IPv6 entries, naming the backends that answered. With
/// affinity switched off in the file, the node's connections spread again.
#[test]
fn session_affinity_keeps_the_node_on_one_ipv6_backend() {
    require_root!();
    let cgroup = TestCgroup::create().expect("test cgroup");
    let node_ip6 = NODE_IP6.to_string();
    let mut scenario = start_with(
        "host6aff",
        &cgroup,
        &services_yaml(AFFINITY, ""),
        &["--snat-ipv6", &node_ip6],
        &[],
    );
    let http6 = SocketAddr::from((CLUSTER_IP6, HTTP_PORT));
    let udp6 = SocketAddr::from((CLUSTER_IP6, UDP_PORT));
    let mut args = run("http", http6, HTTP_CONNECTIONS);
    args.extend(run("udp", udp6, UDP_REQUESTS));
    args.extend(run("udp-connected", udp6, UDP_REQUESTS));
    let runs = host_client(&scenario.topology.node, Some(&cgroup), &args);
    for run in &runs {
        assert!(failures(run).is_empty(), "{run}");
        assert_eq!(answered_by(run).len(), 1, "not one backend: {run}");
    }
    let tcp_backend = answered_by(&runs[0]).remove(0);
    let udp_backend = answered_by(&runs[1]).remove(0);
    assert_eq!(
        answered_by(&runs[2]),
        std::slice::from_ref(&udp_backend),
        "{}",
        runs[2]
    );

    // The map: the node's entry for each IPv6 frontend, naming the
    // backend that answered.
    let pin = scenario.pin.path();
    let rev_nat_id = |frontend: SocketAddr, protocol: &str| {
        let listed = listed_frontend(pin, frontend, protocol).expect("frontend listed");
        assert_eq!(listed["affinity_timeout_secs"], 10_800, "{listed}");
        listed["rev_nat_id"].as_u64().expect("rev-NAT id") as u32
    };
    let expected = [
        (rev_nat_id(http6, "TCP"), &tcp_backend, BACKEND_HTTP_PORT),
        (rev_nat_id(udp6, "UDP"), &udp_backend, BACKEND_UDP_PORT),
    ];
    let entries = affinity_entries(pin).expect("affinity map");
    let node_entries: Vec<_> = entries
        .iter()
        .filter(|(key, _)| key.family == FAMILY_IPV6)
        .collect();
    assert_eq!(node_entries.len(), 2, "{entries:?}");
    for (rev_nat_id, backend, port) in expected {
        let pod: usize = backend
            .strip_prefix("web6-")
            .and_then(|pod| pod.parse().ok())
            .unwrap_or_else(|| panic!("{backend} is no IPv6 server"));
        let backend_ip6 = scenario.topology.pods[pod].ip6.expect("dual-stack pod");
        let (key, value) = node_entries
            .iter()
            .find(|(key, _)| key.rev_nat_id == rev_nat_id)
            .unwrap_or_else(|| panic!("no entry for rev-NAT id {rev_nat_id}: {entries:?}"));
        assert_eq!(Ipv6Addr::from(key.client), NODE_IP6, "{key:?}");
        assert_eq!(Ipv6Addr::from(value.addr), backend_ip6, "{value:?}");
        assert_eq!(u16::from_be(value.port), port, "{value:?}");
    }

    // Without affinity the node's connections spread again.
    rewrite_until(
        &mut scenario,
        &services_yaml("", ""),
        "affinity off",
        |scenario| {
            let runs = host_client(
                &scenario.topology.node,
                Some(&cgroup),
                &run("http", http6, 30),
            );
            answered_by(&runs[0]).len() > 1
        },
    );
}

/// `loadBalancerSourceRanges` and the externalIP allow-list over IPv6:
/// with ranges that leave the node's IPv6 address out, its TCP connects
/// and UDP sends to the IPv6 LoadBalancer IP are refused at once
/// (ECONNREFUSED, counted as `drop_source_range`), while the ClusterIP,
/// which ranges do not guard, serves it; once the file's ranges take the
/// node in, every backend serves it there. An IPv6 externalIP outside
/// `--external-ip-cidrs` is not programmed and not reached, one inside is.
#[test]
fn ipv6_source_ranges_and_external_ip_allow_list_decide_who_is_served() {
    require_root!();
    let cgroup = TestCgroup::create().expect("test cgroup");
    let node_ip6 = NODE_IP6.to_string();
    let web = |ranges: &str| {
        services_yaml(
            &format!("  type: LoadBalancer\n  loadBalancerSourceRanges: [{ranges}]"),
            &format!("status:\n  loadBalancer:\n    ingress: [{{ip: \"{LOAD_BALANCER_IP6}\"}}]"),
        )
        .replacen(
            &format!("externalIPs: [\"{EXTERNAL_IP6}\"]"),
            &format!("externalIPs: [\"{EXTERNAL_IP6}\", \"{DISALLOWED_EXTERNAL_IP6}\"]"),
            1,
        )
    };
    let lb_http = SocketAddr::from((LOAD_BALANCER_IP6, HTTP_PORT));
    let lb_udp = SocketAddr::from((LOAD_BALANCER_IP6, UDP_PORT));
    let mut scenario = start_with(
        "host6ranges",
        &cgroup,
        // The node's address is not in the IPv6 range; the IPv4 one is
        // another family's.
        &web("\"fd00:10:99::/64\", 10.0.0.0/8"),
        &["--snat-ipv6", &node_ip6],
        &[lb_http],
    );
    let pin = scenario.pin.path().to_owned();
    let listed = listed_frontend(&pin, lb_http, "TCP").expect("LoadBalancer IP listed");
    assert_eq!(
        listed["source_ranges"],
        serde_json::json!(["fd00:10:99::/64"]),
        "{listed}"
    );
    let disallowed = SocketAddr::from((DISALLOWED_EXTERNAL_IP6, HTTP_PORT));
    assert_eq!(listed_frontend(&pin, disallowed, "TCP"), None);

    let mut args = run("http", lb_http, 5);
    args.extend(run("udp", lb_udp, 5));
    args.extend(run(
        "http",
        SocketAddr::from((CLUSTER_IP6, HTTP_PORT)),
        UDP_REQUESTS,
    ));
    args.extend(run("http", disallowed, 5));
    args.extend(run(
        "http",
        SocketAddr::from((EXTERNAL_IP6, HTTP_PORT)),
        UDP_REQUESTS,
    ));
    let runs = host_client(&scenario.topology.node, Some(&cgroup), &args);
    for run in &runs[..2] {
        assert_eq!(
            run["error_kinds"],
            serde_json::json!({"ConnectionRefused": 5}),
            "outside the ranges: {run}"
        );
        let slowest = run["slowest_failure_ms"].as_f64().unwrap_or(f64::MAX);
        assert!(
            slowest < REFUSAL_BOUND_MS,
            "refused after {slowest} ms: {run}"
        );
    }
    let counters: BTreeMap<_, _> = datapath_counters(&pin)
        .expect("counters")
        .into_iter()
        .collect();
    assert!(
        counters.get("drop_source_range").copied().unwrap_or(0) >= 10,
        "{counters:?}"
    );
    assert_spread_over(&runs[2], UDP_REQUESTS, backend6_name);
    assert!(host_client_answers(&runs[3]).is_empty(), "{}", runs[3]);
    assert_eq!(failures(&runs[3]).len(), 5, "{}", runs[3]);
    assert_spread_over(&runs[4], UDP_REQUESTS, backend6_name);

    // Ranges that take the node in: served, by every backend.
    let cgroup = &cgroup;
    rewrite_until(
        &mut scenario,
        &web(&format!("\"{NODE_IP6}/128\"")),
        "the node admitted",
        |scenario| {
            let runs = host_client(
                &scenario.topology.node,
                Some(cgroup),
                &run("http", lb_http, 1),
            );
            failures(&runs[0]).is_empty()
        },
    );
    let mut args = run("http", lb_http, HTTP_CONNECTIONS);
    args.extend(run("udp", lb_udp, UDP_REQUESTS));
    let runs = host_client(&scenario.topology.node, Some(cgroup), &args);
    assert_spread_over(&runs[0], HTTP_CONNECTIONS, backend6_name);
    assert_spread_over(&runs[1], UDP_REQUESTS, backend6_name);
}
