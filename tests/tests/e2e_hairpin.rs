//! End to end in network namespaces: hairpin. A pod that reaches a
//! ClusterIP whose only backend is the pod itself gets its own answer,
//! from the ClusterIP, over TCP (new connections and one kept-alive
//! connection) and UDP; other pods still reach it as before. Also with the
//! node's reverse-path filter strict, which the hairpin path must not meet.

use std::net::SocketAddr;

use service_agent::datapath::maps::datapath_counters;
use service_tests::{
    netns::NetNs,
    require_root,
    scenario::{ClusterIpScenario, backend_name, http_frontend, udp_frontend, web_service_yaml},
    traffic::{HttpConnection, http_get, udp_request},
};

/// The backend pod that is also the client.
const HAIRPIN_POD: usize = 1;
/// Requests per check.
const REQUESTS: usize = 20;

/// `REQUESTS` calls of `request` to `target` from inside `ns`, each on a new
/// flow: every answer must be `expected`.
fn assert_answers(
    ns: &NetNs,
    target: SocketAddr,
    request: fn(SocketAddr) -> anyhow::Result<String>,
    expected: &str,
    what: &str,
) {
    let answers = ns
        .run(move || (0..REQUESTS).map(|_| request(target)).collect::<Vec<_>>())
        .expect("client thread");
    for (i, answer) in answers.into_iter().enumerate() {
        match answer {
            Ok(name) => assert_eq!(name, expected, "{what}: request {i}"),
            Err(e) => panic!("{what}: request {i} failed: {e:#}"),
        }
    }
}

/// The hairpin checks on a running scenario whose Service's only backend
/// is pod [`HAIRPIN_POD`].
fn assert_hairpin_works(scenario: &ClusterIpScenario) {
    let pod = &scenario.topology.pods[HAIRPIN_POD].ns;
    let me = backend_name(HAIRPIN_POD);
    assert_answers(
        pod,
        http_frontend(),
        http_get,
        &me,
        "HTTP from the backend pod to its own ClusterIP",
    );
    // (The UDP client checks that the answer comes from the ClusterIP.)
    assert_answers(
        pod,
        udp_frontend(),
        udp_request,
        &me,
        "UDP from the backend pod to its own ClusterIP",
    );
    // Established packets are SNATed every time: many requests on one flow.
    let mut connection = HttpConnection::open(pod, http_frontend()).expect("keep-alive connection");
    for i in 0..REQUESTS {
        assert_eq!(
            connection
                .get()
                .expect("request on the kept-alive connection"),
            me,
            "request {i} on the kept-alive connection"
        );
    }
    // Another pod reaches the same Service normally.
    assert_answers(
        scenario.client(),
        http_frontend(),
        http_get,
        &me,
        "HTTP from pod 0",
    );
    let counters = datapath_counters(scenario.pin.path()).expect("counters");
    for (name, value) in counters {
        if name.starts_with("drop") || name == "conntrack_insert_failed" {
            assert_eq!(value, 0, "datapath counter {name}");
        }
    }
}

#[test]
fn a_pod_reaches_itself_through_its_cluster_ip() {
    require_root!();
    let scenario = ClusterIpScenario::start("hairpin", &web_service_yaml(&[HAIRPIN_POD]), 1)
        .expect("scenario");
    assert_hairpin_works(&scenario);
}

/// With strict reverse-path filtering on the node, a hairpin packet routed
/// by the node would be dropped (its source, the hairpin address or the
/// ClusterIP, is not routed through the pod's device); the datapath sends
/// it straight back to the pod instead, so the node never sees it.
#[test]
fn hairpin_works_with_strict_reverse_path_filtering_on_the_node() {
    require_root!();
    let scenario = ClusterIpScenario::start("hairpin-rpf", &web_service_yaml(&[HAIRPIN_POD]), 1)
        .expect("scenario");
    // The effective setting of a device is the larger of "all" and its own.
    scenario
        .topology
        .node
        .exec("sysctl", &["-qw", "net.ipv4.conf.all.rp_filter=1"])
        .expect("sysctl");
    assert_hairpin_works(&scenario);
}
