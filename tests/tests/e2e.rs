//! End to end in network namespaces: the agent binary programs the real
//! datapath from a YAML file, and real TCP and UDP clients in a pod reach
//! real servers in three backend pods through a ClusterIP.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use service_tests::{
    agent::{list_json, listed_backends, listed_frontend},
    require_root,
    scenario::{
        BACKENDS, ClusterIpScenario, backend_name, demo_yaml_path, http_frontend, udp_frontend,
        web_service_yaml, web_service_yaml_draining,
    },
    traffic::{HttpConnection, http_get, http_get_path, spread, udp_request},
};

/// Asserts every backend answered at least `min_share` of `answers`.
fn assert_spread(answers: &BTreeMap<String, usize>, total: usize, min_share: f64, what: &str) {
    for pod in 1..=BACKENDS {
        let count = answers.get(&backend_name(pod)).copied().unwrap_or(0);
        assert!(
            count as f64 >= total as f64 * min_share,
            "{what}: {} answered {count} of {total} (< {:.0}%): {answers:?}",
            backend_name(pod),
            min_share * 100.0
        );
    }
}

#[test]
fn tcp_and_udp_to_a_cluster_ip_reach_all_three_backends() {
    require_root!();
    let yaml = std::fs::read_to_string(demo_yaml_path()).expect("demo YAML");
    let scenario = ClusterIpScenario::start("spread", &yaml, 3).expect("scenario");

    let (answers, failures) =
        spread(scenario.client(), 300, http_frontend(), http_get).expect("HTTP requests");
    assert!(failures.is_empty(), "failed HTTP requests: {failures:?}");
    assert_spread(&answers, 300, 0.15, "300 TCP connections");

    let (answers, failures) =
        spread(scenario.client(), 150, udp_frontend(), udp_request).expect("UDP requests");
    assert!(failures.is_empty(), "failed UDP requests: {failures:?}");
    assert_spread(&answers, 150, 0.15, "150 UDP flows");

    // `list` reads the counters the datapath kept for these flows.
    let listing = list_json(scenario.pin.path()).expect("list --json");
    let tcp =
        listed_frontend(scenario.pin.path(), http_frontend(), "TCP").expect("HTTP frontend listed");
    assert_eq!(tcp["stats"]["new_flows"], 300, "{tcp}");
    assert_eq!(tcp["service"], "demo/web", "{tcp}");
    // The headless and ExternalName Services of the demo file program
    // nothing and are listed as such.
    let nothing: Vec<(String, String)> = listing["not_programmed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["service"].as_str().unwrap().to_owned(),
                s["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        nothing,
        [
            ("demo/docs".to_owned(), "ExternalName".to_owned()),
            ("demo/web-pods".to_owned(), "Headless".to_owned())
        ]
    );
    assert_eq!(
        listed_backends(&listing, udp_frontend(), "UDP")
            .unwrap()
            .len(),
        3
    );

    // The same counters, and kube-proxy's sync metrics, on /metrics; and a
    // healthy /healthz. Both are served inside the node's namespace.
    let node = &scenario.topology.node;
    let (code, metrics) = node
        .run(|| http_get_path(SocketAddr::from(([127, 0, 0, 1], 10249)), "/metrics"))
        .unwrap()
        .expect("GET /metrics");
    assert_eq!(code, 200);
    for line in [
        "service_agent_frontend_flows_total{frontend=\"10.96.0.10:80/TCP\"} 300",
        // The demo's Service is dual-stack: its IPv6 ClusterIP and
        // endpoints are programmed too (this topology has no IPv6).
        "service_agent_frontends 4",
        "service_agent_backends 12",
        "service_agent_map_entries{map=\"revnat\"} 4",
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
    ] {
        assert!(
            metrics.contains(line),
            "/metrics lacks {line:?}:\n{metrics}"
        );
    }
    // UDP flows: a client port may be reused by chance, so up to 150.
    let udp_flows: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("service_agent_frontend_flows_total{frontend=\"10.96.0.10:7/UDP\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .expect("UDP flow counter");
    assert!((140..=150).contains(&udp_flows), "{udp_flows}");
    let (code, health) = node
        .run(|| http_get_path(SocketAddr::from(([127, 0, 0, 1], 10256)), "/healthz"))
        .unwrap()
        .expect("GET /healthz");
    assert_eq!(code, 200, "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).expect("healthz JSON");
    assert!(
        health["lastUpdated"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{health}"
    );
}

#[test]
fn killing_and_restarting_the_agent_under_load_fails_no_request() {
    require_root!();
    let mut scenario =
        ClusterIpScenario::start("restart", &web_service_yaml(&[1, 2, 3]), 3).expect("scenario");
    let mut open = HttpConnection::open(scenario.client(), http_frontend()).expect("connect");
    let pinned_backend = open.get().expect("first request");

    // A client keeps opening connections and sending requests throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let client_stop = stop.clone();
    let client = scenario
        .client()
        .spawn(move || {
            let (mut ok, mut failed) = (0usize, Vec::new());
            while !client_stop.load(Ordering::Relaxed) {
                match http_get(http_frontend()) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("{e:#}")),
                }
            }
            (ok, failed)
        })
        .expect("client thread");

    std::thread::sleep(Duration::from_millis(300));
    scenario
        .agent
        .kill_and_restart()
        .expect("SIGKILL and restart");
    let deadline = Instant::now() + Duration::from_secs(20);
    while scenario.agent.log().matches("first full sync").count() < 2 {
        scenario
            .agent
            .check_running()
            .expect("restarted agent runs");
        assert!(
            Instant::now() < deadline,
            "no full sync after restart:\n{}",
            scenario.agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    // The maps were adopted, not flushed: the restart rewrote nothing.
    assert!(
        scenario.agent.log().matches("repair:").count() == 1,
        "the restarted agent rewrote entries:\n{}",
        scenario.agent.log()
    );
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = client.join().expect("client thread");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok >= 100, "only {ok} requests in the run");
    assert_eq!(
        open.get().expect("request on the open connection"),
        pinned_backend
    );
    eprintln!("restart under load: {ok} requests, 0 failed");
}

/// Opens a connection through the ClusterIP and returns it with the pod
/// that answered it and the other pods.
fn open_pinned_connection(
    scenario: &ClusterIpScenario,
) -> (HttpConnection, String, usize, Vec<usize>) {
    let mut open = HttpConnection::open(scenario.client(), http_frontend()).expect("connect");
    let pinned_backend = open.get().expect("first request on the open connection");
    let pinned_pod = (1..=BACKENDS)
        .find(|pod| backend_name(*pod) == pinned_backend)
        .expect("answer names a backend");
    let others = (1..=BACKENDS).filter(|p| *p != pinned_pod).collect();
    (open, pinned_backend, pinned_pod, others)
}

/// New connections from one second after a change on: none reaches
/// `gone`, each of `remaining` answers at least 30 of 150, and `list` shows
/// exactly `remaining` as the frontend's backends.
fn assert_new_flows_avoid(
    scenario: &ClusterIpScenario,
    changed_at: Instant,
    gone: &str,
    gone_pod: usize,
    remaining: &[usize],
) {
    std::thread::sleep(Duration::from_secs(1).saturating_sub(changed_at.elapsed()));
    let (answers, failures) =
        spread(scenario.client(), 150, http_frontend(), http_get).expect("HTTP requests");
    assert!(failures.is_empty(), "failed HTTP requests: {failures:?}");
    assert_eq!(
        answers.get(gone),
        None,
        "a new connection reached {gone}: {answers:?}\nagent log:\n{}",
        scenario.agent.log()
    );
    for pod in remaining {
        assert!(
            answers.get(&backend_name(*pod)).copied().unwrap_or(0) >= 30,
            "{answers:?}"
        );
    }
    let listed = listed_backends(
        &list_json(scenario.pin.path()).expect("list"),
        http_frontend(),
        "TCP",
    )
    .expect("frontend listed");
    assert_eq!(listed.len(), remaining.len(), "{listed:?}");
    assert!(!listed.contains(&format!("10.200.{gone_pod}.2:8080")));
}

#[test]
fn a_terminating_backend_gets_no_new_flows_while_its_open_connection_drains() {
    require_root!();
    let scenario =
        ClusterIpScenario::start("drain", &web_service_yaml(&[1, 2, 3]), 3).expect("scenario");
    let (mut open, pinned_backend, pinned_pod, remaining) = open_pinned_connection(&scenario);

    // The pod is being deleted gracefully: serving, terminating, not ready.
    scenario
        .rewrite_yaml(&web_service_yaml_draining(&remaining, &[pinned_pod]))
        .expect("rewrite YAML");
    assert_new_flows_avoid(
        &scenario,
        Instant::now(),
        &pinned_backend,
        pinned_pod,
        &remaining,
    );

    // The connection opened before the change still reaches its backend.
    for _ in 0..5 {
        assert_eq!(
            open.get().expect("request on the open connection"),
            pinned_backend
        );
    }
}

#[test]
fn a_deleted_backend_s_open_connection_fails_at_once_and_new_flows_avoid_it() {
    require_root!();
    let scenario =
        ClusterIpScenario::start("drop", &web_service_yaml(&[1, 2, 3]), 3).expect("scenario");
    let (mut open, pinned_backend, pinned_pod, remaining) = open_pinned_connection(&scenario);

    // The endpoint leaves the slice outright (the pod is gone): its flows
    // are re-balanced on their next packet, so the open connection meets a
    // backend that does not know it and is reset, instead of hanging.
    scenario
        .rewrite_yaml(&web_service_yaml(&remaining))
        .expect("rewrite YAML");
    assert_new_flows_avoid(
        &scenario,
        Instant::now(),
        &pinned_backend,
        pinned_pod,
        &remaining,
    );
    let started = Instant::now();
    let answer = open.get();
    assert!(
        answer.is_err(),
        "the connection to the deleted backend answered: {answer:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the connection to the deleted backend hung for {:?} instead of being reset",
        started.elapsed()
    );
}

#[test]
fn a_service_without_ready_endpoints_refuses_and_recovers_when_one_appears() {
    require_root!();
    let scenario = ClusterIpScenario::start("empty", &web_service_yaml(&[]), 0).expect("scenario");
    let client = scenario.client();
    let result = client
        .run(|| http_get(http_frontend()))
        .expect("client thread");
    assert!(
        result.is_err(),
        "a Service without endpoints answered: {result:?}"
    );

    scenario
        .rewrite_yaml(&web_service_yaml(&[2]))
        .expect("rewrite YAML");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match client
            .run(|| http_get(http_frontend()))
            .expect("client thread")
        {
            Ok(answer) => {
                assert_eq!(answer, backend_name(2));
                break;
            }
            Err(e) if Instant::now() > deadline => {
                panic!(
                    "no answer after the endpoint appeared: {e:#}\n{}",
                    scenario.agent.log()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
