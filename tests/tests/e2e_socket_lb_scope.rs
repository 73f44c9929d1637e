//! End to end: `--socket-lb-host-namespace-only` (Cilium's
//! `socketLB.hostNamespaceOnly`). Socket-LB then translates the sockets of
//! the agent's own network namespace only: a process in the node namespace
//! still reaches the ClusterIP through it, while a process of the same
//! cgroup in another network namespace (a pod's) is left alone, for the
//! packet hooks (where a service mesh's proxy sees the ClusterIP). Without
//! the flag, socket-LB translates that process's sockets as well.
//!
//! The other namespace here has only loopback, so the packet hooks never
//! see its traffic: whether socket-LB touched a `connect` shows in the
//! frontend's flow counter, and in the error (socket-LB refuses a Service
//! without endpoints with ECONNREFUSED; untouched, the ClusterIP has no
//! route).

use serde_json::Value;
use service_tests::{
    agent::frontend_new_flows,
    cgroup::TestCgroup,
    netns::{NetNs, unique_prefix},
    require_root,
    scenario::{ClusterIpScenario, backend_name, http_frontend, web_service_yaml},
    topology::POD_DEVICE_PREFIX,
    traffic::{host_client_answers, run_host_client},
};

/// Connections per run.
const CONNECTIONS: usize = 10;
/// Connections from the node's own namespace, spread over three backends.
const NODE_CONNECTIONS: usize = 60;

/// Runs `host-client http FRONTEND COUNT` in `ns` inside `cgroup`; returns
/// its one run's report.
fn connect_from(ns: &NetNs, cgroup: &TestCgroup, count: usize) -> Value {
    let args = [
        "http".to_owned(),
        http_frontend().to_string(),
        count.to_string(),
    ];
    let report = run_host_client(env!("CARGO_BIN_EXE_host-client"), ns, Some(cgroup), &args);
    report["runs"][0].clone()
}

/// Answers of a run, summed.
fn answered(run: &Value) -> u64 {
    host_client_answers(run).values().sum()
}

#[test]
fn host_namespace_only_leaves_other_namespaces_to_the_packet_hooks() {
    require_root!();
    let cgroup = TestCgroup::create().expect("test cgroup");
    let cgroup_path = cgroup.path().to_str().expect("UTF-8 path").to_owned();
    let mut scenario = ClusterIpScenario::start_with_agent_args(
        "lbscope",
        &web_service_yaml(&[1, 2, 3]),
        3,
        &[
            "--cgroup-path",
            &cgroup_path,
            "--socket-lb-host-namespace-only",
        ],
    )
    .expect("scenario");
    assert!(
        scenario
            .agent
            .log()
            .contains("socket-LB limited to this network namespace"),
        "{}",
        scenario.agent.log()
    );
    let pin = scenario.pin.path().to_owned();
    // The node namespace (the agent's): served by socket-LB.
    // Enough connections that each of the three backends answers some
    // (a backend left out by chance: 3 x (2/3)^60, about 1e-10).
    let run = connect_from(&scenario.topology.node, &cgroup, NODE_CONNECTIONS);
    assert_eq!(answered(&run), NODE_CONNECTIONS as u64, "{run}");
    for pod in 1..=3 {
        assert!(
            run["answers"][backend_name(pod)].as_u64().unwrap_or(0) > 0,
            "{run}"
        );
    }
    // Another namespace, same cgroup: untouched.
    let other = NetNs::create(&format!("{}-other", unique_prefix("lbscope"))).expect("netns");
    let before = frontend_new_flows(&pin, http_frontend(), "TCP");
    let run = connect_from(&other, &cgroup, CONNECTIONS);
    assert_eq!(answered(&run), 0, "{run}");
    assert!(
        run["error_kinds"].get("ConnectionRefused").is_none(),
        "socket-LB touched a socket of another namespace: {run}"
    );
    assert_eq!(
        frontend_new_flows(&pin, http_frontend(), "TCP"),
        before,
        "socket-LB counted flows of another namespace"
    );

    // Without the flag, the same process is translated by socket-LB (its
    // connects count as flows, and fail only for want of a route to the
    // backend).
    scenario
        .agent
        .kill_and_restart_with_args(&[
            "--pod-device-prefix",
            POD_DEVICE_PREFIX,
            "--cgroup-path",
            &cgroup_path,
        ])
        .expect("restart");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while scenario
        .agent
        .log()
        .matches("socket-LB attached to cgroup")
        .count()
        < 2
    {
        scenario.agent.check_running().expect("agent running");
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            scenario.agent.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let before = frontend_new_flows(&pin, http_frontend(), "TCP");
    let run = connect_from(&other, &cgroup, CONNECTIONS);
    assert_eq!(answered(&run), 0, "{run}");
    assert!(
        frontend_new_flows(&pin, http_frontend(), "TCP") >= before + CONNECTIONS as u64,
        "socket-LB did not translate the other namespace's sockets: {run}"
    );
}
