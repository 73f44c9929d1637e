//! A full map never blocks the other Services (issue 8, acceptance 7): the
//! agent binary with small `--map-size-*` over the real kernel maps. One
//! Service grows past the frontends map's capacity in the same change that
//! deletes one Service and moves another to a new endpoint: the deletion
//! and the update land, the big Service is reported (its map named) in
//! `list` and in `/metrics`, and a later update of another Service lands
//! too while the big one keeps failing.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use service_tests::{
    agent::{AgentProcess, list_json, listed_backends},
    netns::{NetNs, unique_prefix},
    pins::PinDir,
    require_root,
    traffic::http_get_path,
};

/// A Service `name` on `10.96.5.{octet}:80` with these endpoints.
fn service(name: &str, octet: u8, endpoints: &[String]) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{addresses: [{a}]}}"))
        .collect();
    format!(
        "---\nkind: Service\napiVersion: v1\nmetadata: {{name: {name}, namespace: full}}\nspec: {{clusterIP: 10.96.5.{octet}, ports: [{{name: http, port: 80}}]}}\n---\nkind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata: {{name: {name}-1, namespace: full, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
        endpoints.join(", ")
    )
}

fn addrs(prefix: &str, count: usize) -> Vec<String> {
    (1..=count).map(|i| format!("{prefix}.{i}")).collect()
}

fn frontend(octet: u8) -> SocketAddr {
    SocketAddr::from(([10, 96, 5, octet], 80))
}

/// Waits until `check` accepts `list --json`; fails with the agent's log.
fn wait_for_listing(
    agent: &mut AgentProcess,
    pin: &PinDir,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        agent.check_running().expect("agent running");
        if let Ok(listing) = list_json(pin.path())
            && check(&listing)
        {
            return listing;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: never seen; last listing: {:?}\nagent log:\n{}",
                list_json(pin.path()).ok(),
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn backends_of(listing: &serde_json::Value, octet: u8) -> Option<Vec<String>> {
    listed_backends(listing, frontend(octet), "TCP")
}

#[test]
fn a_service_filling_the_frontends_map_does_not_stop_other_services_deletes_and_updates() {
    require_root!();
    let node = NetNs::create(&unique_prefix("full")).expect("namespace");
    let pin = PinDir::new("map-full").expect("pin folder");
    let dir = tempfile::tempdir().expect("temp dir");
    let yaml = dir.path().join("services.yaml");
    let (a, b, c) = (addrs("10.8.1", 2), addrs("10.8.2", 2), addrs("10.8.3", 2));
    std::fs::write(
        &yaml,
        [
            service("a", 1, &a),
            service("b", 2, &b),
            service("c", 3, &c),
        ]
        .concat(),
    )
    .expect("writing the YAML");
    // 16 frontend entries: the three Services take 9 (a header and two
    // slots each).
    let mut agent = AgentProcess::start_with_args(
        &node,
        &yaml,
        pin.path(),
        &[
            "--pod-device-prefix",
            "lxc",
            "--map-size-frontends=16",
            "--map-size-backends=64",
            "--map-size-revnat=16",
            "--resync-interval-secs=1",
        ],
        &dir.path().join("agent.log"),
    )
    .expect("agent");
    wait_for_listing(&mut agent, &pin, "the three Services", |l| {
        (1..=3).all(|o| backends_of(l, o).is_some_and(|b| b.len() == 2))
    });

    // One change: a is deleted, b moves to a new endpoint, and big (20
    // endpoints: 21 entries) arrives, more than the map holds.
    let b_moved = vec![b[0].clone(), "10.8.2.9".to_owned()];
    std::fs::write(
        &yaml,
        [
            service("b", 2, &b_moved),
            service("c", 3, &c),
            service("big", 9, &addrs("10.8.9", 20)),
        ]
        .concat(),
    )
    .expect("rewriting the YAML");
    let listing = wait_for_listing(&mut agent, &pin, "big reported as failed", |l| {
        l["not_programmed"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["service"] == "full/big"))
    });
    assert_eq!(backends_of(&listing, 1), None, "a's deletion landed");
    assert_eq!(
        backends_of(&listing, 2).map(|mut b| {
            b.sort();
            b
        }),
        Some(vec!["10.8.2.1:8080".to_owned(), "10.8.2.9:8080".to_owned()]),
        "b's update landed"
    );
    assert_eq!(backends_of(&listing, 3).map(|b| b.len()), Some(2));
    assert_eq!(
        backends_of(&listing, 9),
        None,
        "big is not visible half-written"
    );
    let big = listing["not_programmed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "full/big")
        .unwrap();
    assert_eq!(big["state"], "write failed", "{big}");
    let problems = big["problems"].to_string();
    assert!(
        problems.contains("frontends map") && problems.contains("full"),
        "{problems}"
    );

    // `list` prints it too, and /metrics counts it by map.
    let table = service_tests::agent::list_table(pin.path()).expect("list");
    assert!(
        table
            .lines()
            .any(|l| l.contains("full/big") && l.contains("write failed")),
        "{table}"
    );
    let (code, metrics) = node
        .run(|| http_get_path(SocketAddr::from(([127, 0, 0, 1], 10249)), "/metrics"))
        .expect("metrics thread")
        .expect("GET /metrics");
    assert_eq!(code, 200);
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"service_agent_map_write_failures_total{map="frontends"} "#))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no frontends write failures in /metrics:\n{metrics}"));
    assert!(failures >= 1);
    assert!(
        metrics.contains("service_agent_services_failed 1"),
        "{metrics}"
    );

    // While big keeps failing (every repair retries it), c's update lands.
    std::fs::write(
        &yaml,
        [
            service("b", 2, &b_moved),
            service("c", 3, &[c[0].clone(), "10.8.3.7".to_owned()]),
            service("big", 9, &addrs("10.8.9", 20)),
        ]
        .concat(),
    )
    .expect("rewriting the YAML");
    wait_for_listing(&mut agent, &pin, "c's update", |l| {
        backends_of(l, 3).is_some_and(|b| b.contains(&"10.8.3.7:8080".to_owned()))
    });
}
