//! End to end: host-originated traffic through socket-LB. A process in the
//! node's network namespace (as a hostNetwork pod or a node daemon is)
//! reaches a ClusterIP: its `connect` and `sendmsg` go straight to a
//! backend through the agent's cgroup socket programs, and it sees the
//! ClusterIP as its peer and as the source of UDP answers.
//!
//! Each test makes its own cgroup v2 and gives it to the agent with
//! `--cgroup-path`: socket-LB is never attached to the machine's root
//! cgroup here, which would reach every process on the machine. The "host
//! process" is the `host-client` binary, started inside that cgroup and in
//! the node namespace; the same binary outside the cgroup shows what the
//! node does without socket-LB (no route to the ClusterIP).
//!
//! The socket programs cannot be run through `BPF_PROG_TEST_RUN`: the
//! kernel has no test run for `cgroup_sock_addr` programs, so this file is
//! their test.

use std::{collections::BTreeMap, net::SocketAddr};

use serde_json::Value;
use service_agent::datapath::{cgroup::link_pins, maps::datapath_counters};
use service_tests::{
    agent::{frontend_new_flows, list_json},
    cgroup::{SOCKET_LB_HOOKS, TestCgroup},
    netns::NetNs,
    require_root,
    scenario::{
        BACKEND_HTTP_PORT, BACKENDS, ClusterIpScenario, backend_name, http_frontend, udp_frontend,
        web_service_yaml,
    },
    topology::POD_DEVICE_PREFIX,
    traffic::{host_client_answers, run_host_client},
};

/// TCP connections (one GET each) from the host process.
const HTTP_CONNECTIONS: usize = 60;
/// UDP requests from new unconnected sockets, and from new connected ones.
const UDP_REQUESTS: usize = 30;
/// The longest a refused connect may take (the bound).
const REFUSAL_BOUND_MS: f64 = 100.0;

/// Runs `host-client` with `args` in the node namespace, inside `cgroup`
/// (or outside any test cgroup); returns its JSON report.
fn host_client(node: &NetNs, cgroup: Option<&TestCgroup>, args: &[String]) -> Value {
    run_host_client(env!("CARGO_BIN_EXE_host-client"), node, cgroup, args)
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

/// Asserts a run had no failure, `count` answers, every one from a backend
/// of the scenario, and every backend answered.
fn assert_spread_over_every_backend(run: &Value, count: usize) {
    let failures = failures(run);
    assert!(failures.is_empty(), "{} failed: {failures:?}", run["kind"]);
    let answers = host_client_answers(run);
    assert_eq!(
        answers.values().sum::<u64>(),
        count as u64,
        "{}: {answers:?}",
        run["kind"]
    );
    let expected: Vec<String> = (1..=BACKENDS).map(backend_name).collect();
    assert_eq!(
        answers.keys().cloned().collect::<Vec<_>>(),
        expected,
        "{} answered by {answers:?}",
        run["kind"]
    );
}

/// Starts the ClusterIP scenario with socket-LB on `cgroup`.
fn start(tag: &str, backends: &[usize], cgroup: &TestCgroup) -> ClusterIpScenario {
    let path = cgroup
        .path()
        .to_str()
        .expect("UTF-8 cgroup path")
        .to_owned();
    let scenario = ClusterIpScenario::start_with_agent_args(
        tag,
        &web_service_yaml(backends),
        backends.len(),
        &["--cgroup-path", &path],
    )
    .expect("scenario");
    assert!(
        scenario
            .agent
            .log()
            .contains("socket-LB attached to cgroup"),
        "agent log:\n{}",
        scenario.agent.log()
    );
    scenario
}

/// The programs attached to `cgroup` on each socket-LB hook.
fn programs(cgroup: &TestCgroup) -> Vec<Vec<u32>> {
    SOCKET_LB_HOOKS
        .iter()
        .map(|hook| cgroup.attached_programs(*hook).expect("BPF_PROG_QUERY"))
        .collect()
}

/// A process in the node namespace and in the socket-LB cgroup reaches the
/// ClusterIP: 60 TCP connections (each checking `getpeername` gives the
/// ClusterIP) spread over every backend, and UDP from unconnected and
/// connected sockets whose answers come from `ClusterIP:port`. The same
/// process outside the cgroup is untouched: it has no route to the
/// ClusterIP (as a node without kube-proxy), yet reaches a backend directly.
#[test]
fn host_process_in_the_cgroup_reaches_the_cluster_ip() {
    require_root!();
    let cgroup = TestCgroup::create().expect("test cgroup");
    let scenario = start("hostlb", &[1, 2, 3], &cgroup);
    let node = &scenario.topology.node;
    for pin in link_pins(&scenario.pin.path().join("links")) {
        assert!(pin.exists(), "{} not pinned", pin.display());
    }
    for (hook, ids) in SOCKET_LB_HOOKS.iter().zip(programs(&cgroup)) {
        assert_eq!(ids.len(), 1, "hook {hook}: programs {ids:?}");
    }

    let mut args = run("http", http_frontend(), HTTP_CONNECTIONS);
    args.extend(run("udp", udp_frontend(), UDP_REQUESTS));
    args.extend(run("udp-connected", udp_frontend(), UDP_REQUESTS));
    let report = host_client(node, Some(&cgroup), &args);
    assert!(
        report["cgroup"]
            .as_str()
            .unwrap_or_default()
            .contains(cgroup.path().file_name().unwrap().to_str().unwrap()),
        "host-client not in the test cgroup: {}",
        report["cgroup"]
    );
    let runs = report["runs"].as_array().expect("runs");
    assert_spread_over_every_backend(&runs[0], HTTP_CONNECTIONS);
    assert_spread_over_every_backend(&runs[1], UDP_REQUESTS);
    assert_spread_over_every_backend(&runs[2], UDP_REQUESTS);
    assert!(
        frontend_new_flows(scenario.pin.path(), http_frontend(), "TCP") >= HTTP_CONNECTIONS as u64,
        "TCP flows not counted: {}",
        list_json(scenario.pin.path()).expect("list")
    );
    assert!(
        frontend_new_flows(scenario.pin.path(), udp_frontend(), "UDP") >= 2 * UDP_REQUESTS as u64
    );

    // Outside the cgroup: nothing is rewritten. The node has no route to
    // the ClusterIP, so every attempt fails, while a backend is reachable.
    let backend = SocketAddr::from(([10, 200, 1, 2], BACKEND_HTTP_PORT));
    let mut args = run("http", http_frontend(), 5);
    args.extend(run("udp", udp_frontend(), 5));
    args.extend(run("http-plain", backend, 5));
    let report = host_client(node, None, &args);
    let runs = report["runs"].as_array().expect("runs");
    for run in &runs[..2] {
        assert!(
            host_client_answers(run).is_empty(),
            "{} outside the cgroup was answered: {run}",
            run["kind"]
        );
        assert_eq!(failures(run).len(), 5, "{run}");
    }
    assert_eq!(
        host_client_answers(&runs[2]).get(&backend_name(1)),
        Some(&5),
        "{}",
        runs[2]
    );
}

/// A Service without endpoints: the host process's `connect` is refused
/// at once (ECONNREFUSED, under 100 ms), and so is its `sendto`; both
/// counted as refusals.
#[test]
fn host_connect_to_a_service_without_endpoints_is_refused() {
    require_root!();
    let cgroup = TestCgroup::create().expect("test cgroup");
    let scenario = start("hostrej", &[], &cgroup);
    let mut args = run("http", http_frontend(), 5);
    args.extend(run("udp", udp_frontend(), 5));
    let report = host_client(&scenario.topology.node, Some(&cgroup), &args);
    for run in report["runs"].as_array().expect("runs") {
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
        counters.get("rejected_no_backend").copied().unwrap_or(0) >= 10,
        "{counters:?}"
    );
}

/// A restarted agent (SIGKILL) adopts the pinned socket links: the same
/// single link per hook now runs the new agent's program, and the host
/// process still reaches the Service. Restarted on another cgroup, the
/// links move there; restarted with `--cgroup-path none`, they are removed.
#[test]
fn restarted_agent_adopts_the_socket_links() {
    require_root!();
    let cgroup = TestCgroup::create().expect("test cgroup");
    let other = TestCgroup::create().expect("second test cgroup");
    let mut scenario = start("hostrs", &[1, 2, 3], &cgroup);
    let before = programs(&cgroup);

    let path = cgroup.path().to_str().unwrap().to_owned();
    scenario
        .agent
        .kill_and_restart_with_args(&[
            "--pod-device-prefix",
            POD_DEVICE_PREFIX,
            "--cgroup-path",
            path.as_str(),
        ])
        .expect("restart");
    scenario
        .agent
        .wait_for_log("socket-LB attached to cgroup", 2)
        .expect("socket-LB attached");
    let after = programs(&cgroup);
    for ((hook, before), after) in SOCKET_LB_HOOKS.iter().zip(&before).zip(&after) {
        assert_eq!(after.len(), 1, "hook {hook}: programs {after:?}");
        assert_ne!(
            before, after,
            "hook {hook}: the new program was not swapped in"
        );
    }
    let log = scenario.agent.log();
    assert!(
        !log.contains("attaching afresh") && !log.contains("attached elsewhere"),
        "the links were not adopted:\n{log}"
    );
    let report = host_client(
        &scenario.topology.node,
        Some(&cgroup),
        &run("http", http_frontend(), 30),
    );
    let run0 = &report["runs"][0];
    assert!(failures(run0).is_empty(), "{run0}");

    // Another cgroup: the links move.
    let other_path = other.path().to_str().unwrap().to_owned();
    scenario
        .agent
        .kill_and_restart_with_args(&[
            "--pod-device-prefix",
            POD_DEVICE_PREFIX,
            "--cgroup-path",
            other_path.as_str(),
        ])
        .expect("restart");
    scenario
        .agent
        .wait_for_log("socket-LB attached to cgroup", 3)
        .expect("socket-LB attached");
    assert!(
        programs(&cgroup).iter().all(Vec::is_empty),
        "{:?}",
        programs(&cgroup)
    );
    assert!(
        programs(&other).iter().all(|ids| ids.len() == 1),
        "{:?}",
        programs(&other)
    );
    let report = host_client(
        &scenario.topology.node,
        Some(&other),
        &run("udp", udp_frontend(), 10),
    );
    let run0 = &report["runs"][0];
    assert!(failures(run0).is_empty(), "{run0}");

    // Disabled: the pins and the links are gone.
    scenario
        .agent
        .kill_and_restart_with_args(&[
            "--pod-device-prefix",
            POD_DEVICE_PREFIX,
            "--cgroup-path",
            "none",
        ])
        .expect("restart");
    scenario
        .agent
        .wait_for_log("socket-LB disabled", 1)
        .expect("socket-LB disabled");
    for pin in link_pins(&scenario.pin.path().join("links")) {
        assert!(!pin.exists(), "{} still pinned", pin.display());
    }
    assert!(
        programs(&other).iter().all(Vec::is_empty),
        "{:?}",
        programs(&other)
    );
    let report = host_client(
        &scenario.topology.node,
        Some(&other),
        &run("http", http_frontend(), 3),
    );
    let run0 = &report["runs"][0];
    assert_eq!(failures(run0).len(), 3, "{run0}");
}
