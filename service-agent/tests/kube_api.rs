//! The Kubernetes side against scripted API responses (tower-test mock
//! services, as kube-rs tests itself): the agent's real watchers list then
//! watch Services, EndpointSlices and this Node, and the pipeline programs
//! an in-memory copy of the maps. Each test plays the API server step by
//! step, checks the requests (paths, selectors, resourceVersions), and
//! checks the resulting map contents.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use service_agent::{
    datapath::model::{MapState, ip_from_map},
    ops::health::{Health, Probe},
    reconcile::{pipeline::Pipeline, sync::Syncer, translate::NodeContext},
    source::kube::{KINDS, SERVICE_LABEL_SELECTOR, spawn_watchers},
};
use tokio::sync::watch;
use tower_test::mock::{Handle, SendResponse};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

/// The scripted API server: hands the test each request for a given
/// resource, keeping requests for other resources until asked for, and
/// holding watch requests the test does not answer (so they stay open).
struct ApiServer {
    handle: ApiHandle,
    pending: VecDeque<(Request<Body>, SendResponse<Response<Body>>)>,
    held: Vec<SendResponse<Response<Body>>>,
}

/// A request as seen by the test.
struct Seen {
    path: String,
    query: String,
    respond: SendResponse<Response<Body>>,
}

impl Seen {
    fn is_watch(&self) -> bool {
        self.query.contains("watch=true")
    }

    fn param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == name).then(|| percent_decode(v))
        })
    }

    fn reply(self, status: StatusCode, body: Value) {
        self.respond.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    }

    /// Answers a watch with these events (one JSON object per line); the
    /// watch then ends, as when the API server closes it.
    fn reply_events(self, events: &[Value]) {
        let mut body = Vec::new();
        for event in events {
            body.extend(serde_json::to_vec(event).unwrap());
            body.push(b'\n');
        }
        self.respond
            .send_response(Response::builder().body(Body::from(body)).unwrap());
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(Ok(v)) = s.get(i + 1..i + 3).map(|hex| u8::from_str_radix(hex, 16))
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl ApiServer {
    fn new(handle: ApiHandle) -> Self {
        ApiServer {
            handle,
            pending: VecDeque::new(),
            held: Vec::new(),
        }
    }

    /// The next request for `path` (other requests are kept for later).
    async fn next(&mut self, path: &str) -> Seen {
        let found = self
            .pending
            .iter()
            .position(|(request, _)| request.uri().path() == path);
        let (request, respond) = match found {
            Some(index) => self.pending.remove(index).unwrap(),
            None => loop {
                let (request, respond) =
                    tokio::time::timeout(Duration::from_secs(20), self.handle.next_request())
                        .await
                        .unwrap_or_else(|_| panic!("no request for {path} within 20 s"))
                        .expect("the client went away");
                if request.uri().path() == path {
                    break (request, respond);
                }
                self.pending.push_back((request, respond));
            },
        };
        Seen {
            path: request.uri().path().to_owned(),
            query: request.uri().query().unwrap_or("").to_owned(),
            respond,
        }
    }

    /// Keeps a request open without answering (an idle watch).
    fn hold(&mut self, seen: Seen) {
        self.held.push(seen.respond);
    }
}

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NODES: &str = "/api/v1/nodes";

fn service(name: &str, cluster_ip: &str, rv: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": rv},
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    })
}

fn slice(service: &str, name: &str, addresses: &[&str], rv: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": rv,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": addresses.iter().map(|a| json!({"addresses": [a], "nodeName": "node-a"})).collect::<Vec<_>>()
    })
}

fn list(kind: &str, rv: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": rv}, "items": items})
}

fn event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

fn gone() -> Value {
    json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "metadata": {},
        "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}})
}

fn status(code: u16, reason: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": reason, "reason": reason, "code": code})
}

/// Frontends in the maps as `ip:port -> [backend ip:port, ...]` (IPv6
/// addresses bracketed), sorted.
fn summary(maps: &MapState) -> Vec<String> {
    let mut out = Vec::new();
    for (key, header) in maps.frontends.iter().filter(|(k, _)| k.slot == 0) {
        let backends: Vec<String> = (1..=header.count)
            .filter_map(|slot| {
                maps.frontends
                    .get(&service_common::FrontendKey { slot, ..*key })
            })
            .filter_map(|slot| maps.backends.get(&slot.backend_id))
            .map(|b| {
                std::net::SocketAddr::new(ip_from_map(&b.addr, b.family), u16::from_be(b.port))
                    .to_string()
            })
            .collect();
        out.push(format!(
            "{} -> [{}]",
            std::net::SocketAddr::new(ip_from_map(&key.addr, key.family), u16::from_be(key.port)),
            backends.join(" ")
        ));
    }
    out.sort();
    out
}

/// How long a watch may keep failing before the tests' agent is unhealthy.
const HEALTH_BOUND: Duration = Duration::from_secs(2);

/// Starts the real watchers on a mock client and the pipeline on in-memory
/// maps, beating `health` as the agent's loop does; returns the scripted
/// server, a view of the maps after each flush, and the health.
fn start() -> (ApiServer, watch::Receiver<MapState>, Arc<Health>) {
    let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(mock, "default");
    let (events, mut incoming) = tokio::sync::mpsc::unbounded_channel();
    let health = Arc::new(Health::new(HEALTH_BOUND));
    spawn_watchers(client, "node-a", events, health.clone());
    let syncer = Syncer::adopting(MapState::default(), NodeContext::default()).unwrap();
    let (maps_tx, maps_rx) = watch::channel(MapState::default());
    let loop_health = health.clone();
    tokio::spawn(async move {
        let mut pipeline = Pipeline::new(syncer, &KINDS).with_health(loop_health.clone());
        let mut ticker = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                event = incoming.recv() => {
                    let Some(event) = event else { return };
                    pipeline.handle(event);
                    while let Ok(event) = incoming.try_recv() {
                        pipeline.handle(event);
                    }
                    if pipeline.flush().is_some() {
                        let _ = maps_tx.send(pipeline.syncer().writer().clone());
                    }
                }
                _ = ticker.tick() => loop_health.beat(pipeline.is_synced()),
            }
        }
    });
    (ApiServer::new(handle), maps_rx, health)
}

/// Waits until `probe` answers `code`; returns the body.
async fn expect_health(health: &Health, probe: Probe, code: StatusCode) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (got, body) = health.report(probe);
        if got == code {
            return body;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{probe:?} never answered {code}; last: {got} {body}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the maps summarise to `expected`.
async fn expect_maps(maps: &mut watch::Receiver<MapState>, expected: &[&str]) {
    let matched = matches!(
        tokio::time::timeout(
            Duration::from_secs(20),
            maps.wait_for(|m| summary(m) == expected)
        )
        .await,
        Ok(Ok(_))
    );
    if !matched {
        panic!(
            "maps never became {expected:?}; last: {:?}",
            summary(&maps.borrow())
        );
    }
}

/// Answers the three initial lists: the given Services and slices, and this node.
async fn initial_lists(server: &mut ApiServer, services: Vec<Value>, slices: Vec<Value>) {
    let request = server.next(SERVICES).await;
    assert!(!request.is_watch());
    assert_eq!(
        request.param("labelSelector").as_deref(),
        Some(SERVICE_LABEL_SELECTOR)
    );
    request.reply(StatusCode::OK, list("ServiceList", "100", services));
    let request = server.next(SLICES).await;
    assert!(!request.is_watch());
    assert_eq!(
        request.param("labelSelector").as_deref(),
        Some("!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name")
    );
    request.reply(StatusCode::OK, list("EndpointSliceList", "200", slices));
    let request = server.next(NODES).await;
    assert_eq!(
        request.param("fieldSelector").as_deref(),
        Some("metadata.name=node-a")
    );
    request.reply(
        StatusCode::OK,
        list("NodeList", "300", vec![json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "resourceVersion": "300"}})]),
    );
}

#[tokio::test]
async fn list_then_watch_add_modify_delete_program_the_maps() {
    let (mut server, mut maps, _) = start();
    initial_lists(
        &mut server,
        vec![service("web", "10.96.0.10", "90")],
        vec![],
    )
    .await;
    expect_maps(&mut maps, &["10.96.0.10:80 -> []"]).await;

    // The watches resume from each list's resourceVersion.
    let node_watch = server.next(NODES).await;
    assert!(node_watch.is_watch());
    assert_eq!(node_watch.param("resourceVersion").as_deref(), Some("300"));
    server.hold(node_watch);
    let service_watch = server.next(SERVICES).await;
    assert_eq!(
        service_watch.param("resourceVersion").as_deref(),
        Some("100")
    );
    let slice_watch = server.next(SLICES).await;
    assert!(slice_watch.is_watch());
    assert_eq!(slice_watch.param("resourceVersion").as_deref(), Some("200"));

    slice_watch.reply_events(&[event(
        "ADDED",
        slice("web", "web-1", &["10.1.1.2", "10.1.2.2"], "201"),
    )]);
    expect_maps(
        &mut maps,
        &["10.96.0.10:80 -> [10.1.1.2:8080 10.1.2.2:8080]"],
    )
    .await;

    // The watch ended; the next one resumes after the last event seen.
    let slice_watch = server.next(SLICES).await;
    assert_eq!(slice_watch.param("resourceVersion").as_deref(), Some("201"));
    slice_watch.reply_events(&[event(
        "MODIFIED",
        slice("web", "web-1", &["10.1.2.2"], "202"),
    )]);
    expect_maps(&mut maps, &["10.96.0.10:80 -> [10.1.2.2:8080]"]).await;

    service_watch.reply_events(&[
        event("ADDED", service("db", "10.96.0.20", "101")),
        event("DELETED", service("web", "10.96.0.10", "102")),
    ]);
    expect_maps(&mut maps, &["10.96.0.20:80 -> []"]).await;
    let service_watch = server.next(SERVICES).await;
    assert_eq!(
        service_watch.param("resourceVersion").as_deref(),
        Some("102")
    );
    server.hold(service_watch);
}

#[tokio::test]
async fn a_410_gone_leads_to_a_relist_that_drops_what_was_deleted_meanwhile() {
    let (mut server, mut maps, _) = start();
    initial_lists(
        &mut server,
        vec![
            service("web", "10.96.0.10", "90"),
            service("old", "10.96.0.30", "91"),
        ],
        vec![slice("web", "web-1", &["10.1.1.2"], "150")],
    )
    .await;
    expect_maps(
        &mut maps,
        &["10.96.0.10:80 -> [10.1.1.2:8080]", "10.96.0.30:80 -> []"],
    )
    .await;

    let service_watch = server.next(SERVICES).await;
    service_watch.reply_events(&[gone()]);
    // A fresh list (no watch), whose result replaces the Services.
    let relist = server.next(SERVICES).await;
    assert!(
        !relist.is_watch(),
        "expected a re-list, got {} {}",
        relist.path,
        relist.query
    );
    relist.reply(
        StatusCode::OK,
        list(
            "ServiceList",
            "500",
            vec![service("web", "10.96.0.10", "90")],
        ),
    );
    expect_maps(&mut maps, &["10.96.0.10:80 -> [10.1.1.2:8080]"]).await;
    let service_watch = server.next(SERVICES).await;
    assert!(service_watch.is_watch());
    assert_eq!(
        service_watch.param("resourceVersion").as_deref(),
        Some("500")
    );
    server.hold(service_watch);
}

#[tokio::test]
async fn error_answers_are_retried_and_nothing_is_programmed_before_every_list() {
    let (mut server, mut maps, _) = start();
    // The Services list is refused (403), then fails (500); the agent keeps
    // retrying with backoff and programs nothing meanwhile.
    server
        .next(SERVICES)
        .await
        .reply(StatusCode::FORBIDDEN, status(403, "Forbidden"));
    let request = server.next(SLICES).await;
    request.reply(
        StatusCode::OK,
        list(
            "EndpointSliceList",
            "200",
            vec![slice("web", "web-1", &["10.1.1.2"], "150")],
        ),
    );
    server
        .next(NODES)
        .await
        .reply(StatusCode::OK, list("NodeList", "300", vec![]));
    server.next(SERVICES).await.reply(
        StatusCode::INTERNAL_SERVER_ERROR,
        status(500, "InternalError"),
    );
    assert!(summary(&maps.borrow()).is_empty());

    let request = server.next(SERVICES).await;
    assert!(!request.is_watch());
    request.reply(
        StatusCode::OK,
        list(
            "ServiceList",
            "100",
            vec![service("web", "10.96.0.10", "90")],
        ),
    );
    expect_maps(&mut maps, &["10.96.0.10:80 -> [10.1.1.2:8080]"]).await;
}

fn node(deleting: bool, tainted: bool, rv: &str) -> Value {
    let mut node = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "resourceVersion": rv}, "spec": {}});
    if deleting {
        node["metadata"]["deletionTimestamp"] = json!("2024-01-02T03:04:05Z");
    }
    if tainted {
        node["spec"]["taints"] =
            json!([{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]);
    }
    node
}

#[tokio::test]
async fn healthz_fails_while_the_api_server_fails_and_recovers_when_it_answers() {
    let (mut server, mut maps, health) = start();
    initial_lists(
        &mut server,
        vec![service("web", "10.96.0.10", "90")],
        vec![],
    )
    .await;
    expect_maps(&mut maps, &["10.96.0.10:80 -> []"]).await;
    expect_health(&health, Probe::Healthz, StatusCode::OK).await;

    // The Services watch fails and the retries fail too: after the bound,
    // both probes answer 503 and name the watch.
    server.next(SERVICES).await.reply(
        StatusCode::INTERNAL_SERVER_ERROR,
        status(500, "InternalError"),
    );
    let body = expect_health(&health, Probe::Healthz, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(body.contains(r#""failingWatches":["Service"]"#), "{body}");
    expect_health(&health, Probe::Livez, StatusCode::SERVICE_UNAVAILABLE).await;
    let retry = server.next(SERVICES).await;
    retry.reply(
        StatusCode::INTERNAL_SERVER_ERROR,
        status(500, "InternalError"),
    );
    // The API server answers again: the next watch delivers, health is back.
    let watch = server.next(SERVICES).await;
    assert!(watch.is_watch(), "{} {}", watch.path, watch.query);
    watch.reply_events(&[event("ADDED", service("db", "10.96.0.20", "101"))]);
    expect_maps(&mut maps, &["10.96.0.10:80 -> []", "10.96.0.20:80 -> []"]).await;
    expect_health(&health, Probe::Healthz, StatusCode::OK).await;
    expect_health(&health, Probe::Livez, StatusCode::OK).await;
}

#[tokio::test]
async fn healthz_fails_while_this_node_is_being_deleted_and_livez_does_not() {
    let (mut server, mut maps, health) = start();
    initial_lists(&mut server, vec![], vec![]).await;
    expect_maps(&mut maps, &[]).await;
    expect_health(&health, Probe::Healthz, StatusCode::OK).await;

    let node_watch = server.next(NODES).await;
    node_watch.reply_events(&[event("MODIFIED", node(false, true, "301"))]);
    let body = expect_health(&health, Probe::Healthz, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(body.contains(r#""nodeEligible":false"#), "{body}");
    let (code, _) = health.report(Probe::Livez);
    assert_eq!(code, StatusCode::OK);

    let node_watch = server.next(NODES).await;
    node_watch.reply_events(&[event("MODIFIED", node(false, false, "302"))]);
    expect_health(&health, Probe::Healthz, StatusCode::OK).await;

    let node_watch = server.next(NODES).await;
    node_watch.reply_events(&[event("MODIFIED", node(true, false, "303"))]);
    expect_health(&health, Probe::Healthz, StatusCode::SERVICE_UNAVAILABLE).await;
    let node_watch = server.next(NODES).await;
    server.hold(node_watch);
}

/// The Node watch is used: this node's zone label (here arriving with a
/// watch event) makes the zone-hinted endpoints the only backends; a
/// Service of another proxy that the API server returned anyway (the label
/// selector is the server's business) is left out by the agent's own rule.
#[tokio::test]
async fn the_nodes_zone_selects_hinted_endpoints_and_other_proxies_services_are_left_out() {
    let (mut server, mut maps, _) = start();
    let mut other = service("other", "10.96.0.11", "91");
    other["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "elsewhere"});
    let mut hinted = slice("web", "web-1", &["10.1.1.2", "10.1.2.2"], "199");
    hinted["endpoints"][0]["hints"] = json!({"forZones": [{"name": "zone-a"}]});
    hinted["endpoints"][1]["hints"] = json!({"forZones": [{"name": "zone-b"}]});
    initial_lists(
        &mut server,
        vec![service("web", "10.96.0.10", "90"), other],
        vec![hinted],
    )
    .await;
    // No zone known yet: every endpoint.
    expect_maps(
        &mut maps,
        &["10.96.0.10:80 -> [10.1.1.2:8080 10.1.2.2:8080]"],
    )
    .await;
    let node_watch = server.next(NODES).await;
    assert!(node_watch.is_watch());
    node_watch.reply_events(&[event(
        "MODIFIED",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "resourceVersion": "301",
            "labels": {"topology.kubernetes.io/zone": "zone-b"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}}),
    )]);
    expect_maps(&mut maps, &["10.96.0.10:80 -> [10.1.2.2:8080]"]).await;
}

#[tokio::test]
async fn a_dual_stack_service_from_the_api_gets_each_familys_endpoints() {
    let (mut server, mut maps, _) = start();
    // As the API server returns a PreferDualStack Service on a dual-stack
    // cluster, with one EndpointSlice per family.
    let mut dual = service("web", "10.96.0.10", "90");
    dual["spec"]["clusterIPs"] = json!(["10.96.0.10", "fd00:96::10"]);
    dual["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
    dual["spec"]["ipFamilyPolicy"] = json!("PreferDualStack");
    let mut v6 = slice("web", "web-v6", &["fd00:1:1::2", "fd00:1:2::2"], "199");
    v6["addressType"] = json!("IPv6");
    initial_lists(
        &mut server,
        vec![dual],
        vec![slice("web", "web-v4", &["10.1.1.2"], "198"), v6],
    )
    .await;
    expect_maps(
        &mut maps,
        &[
            "10.96.0.10:80 -> [10.1.1.2:8080]",
            "[fd00:96::10]:80 -> [[fd00:1:1::2]:8080 [fd00:1:2::2]:8080]",
        ],
    )
    .await;
}
