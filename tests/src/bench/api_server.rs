//! A scripted Kubernetes API server over real HTTP on loopback, for the
//! agent binary's Kubernetes source: it serves a [`ServiceSet`]'s Services
//! and EndpointSlices as paged lists (`limit`/`continue`, as kube-rs asks
//! for them), this node, and then watches that stay open and quiet. The
//! objects look like the API server's (uid, resourceVersion, creation
//! time, labels, one managedFields entry), so the agent parses what it
//! would parse in a cluster. Pages are rendered before the agent starts,
//! so the server's own work while the agent lists is only copying bytes.

use std::{collections::HashMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{
    Router,
    body::Body,
    extract::{RawQuery, State},
    http::{StatusCode, Uri, header},
    response::{IntoResponse, Response},
};

use super::services::{NAMESPACE, PORT_NAME, SERVICE_PORT, ServiceSet, TARGET_PORT};

/// Items per page, as kube-rs's watcher asks for them.
const PAGE_SIZE: usize = 500;
/// The resourceVersion of every list.
const RESOURCE_VERSION: &str = "1000";

/// The pages of one resource's list, by `continue` token ("" first).
#[derive(Default)]
struct Pages(HashMap<String, String>);

impl Pages {
    /// Renders `items` as `kind` list pages of [`PAGE_SIZE`].
    fn render(api_version: &str, kind: &str, items: Vec<String>) -> Self {
        let mut pages = HashMap::new();
        let chunks: Vec<&[String]> = items.chunks(PAGE_SIZE).collect();
        let count = chunks.len().max(1);
        for index in 0..count {
            let token = if index == 0 {
                String::new()
            } else {
                index.to_string()
            };
            let next = if index + 1 < count {
                format!(r#","continue":"{}""#, index + 1)
            } else {
                String::new()
            };
            let body = format!(
                r#"{{"apiVersion":"{api_version}","kind":"{kind}","metadata":{{"resourceVersion":"{RESOURCE_VERSION}"{next}}},"items":[{}]}}"#,
                chunks.get(index).map(|c| c.join(",")).unwrap_or_default()
            );
            pages.insert(token, body);
        }
        Pages(pages)
    }
}

/// What the server answers.
struct Script {
    services: Pages,
    slices: Pages,
    nodes: Pages,
}

/// The server, running on its own thread; stopped on drop.
pub struct ApiServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Serves `set` and the Node `node_name` on `listener` (bound in the
    /// agent's network namespace, see [`crate::netns::NetNs::run`]).
    pub fn start(
        listener: std::net::TcpListener,
        set: &ServiceSet,
        node_name: &str,
    ) -> anyhow::Result<Self> {
        let script = Arc::new(Script {
            services: Pages::render(
                "v1",
                "ServiceList",
                (0..set.count).map(service_json).collect(),
            ),
            slices: Pages::render(
                "discovery.k8s.io/v1",
                "EndpointSliceList",
                (0..set.count).map(|i| slice_json(set, i)).collect(),
            ),
            nodes: Pages::render("v1", "NodeList", vec![node_json(node_name)]),
        });
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("api-server".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the API server");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("the API server's listener");
                    let app = Router::new().fallback(answer).with_state(script);
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stop.await;
                        })
                        .await;
                });
            })?;
        Ok(ApiServer {
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Writes a kubeconfig pointing at the server to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: bench\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: bench\n  user: {{}}\ncontexts:\n- name: bench\n  context: {{cluster: bench, user: bench, namespace: default}}\ncurrent-context: bench\n",
                self.addr
            ),
        )
        .with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        // Open watches keep graceful shutdown waiting: give it a moment,
        // then let the thread go (it ends with the process).
        if let Some(thread) = self.thread.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

/// Answers a list (a page of it) or a watch (open, quiet) of a served
/// resource; 404 otherwise.
async fn answer(
    State(script): State<Arc<Script>>,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Response {
    let pages = match uri.path() {
        "/api/v1/services" => &script.services,
        "/apis/discovery.k8s.io/v1/endpointslices" => &script.slices,
        "/api/v1/nodes" => &script.nodes,
        other => {
            return (
                StatusCode::NOT_FOUND,
                format!(r#"{{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":"{other} not served"}}"#),
            )
                .into_response();
        }
    };
    let query = query.unwrap_or_default();
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or("")
    };
    if param("watch") == "true" {
        // An open watch with nothing to say (until the agent stops).
        let quiet = futures::stream::pending::<Result<Vec<u8>, std::io::Error>>();
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(quiet))
            .expect("a watch response");
    }
    match pages.0.get(param("continue")) {
        Some(page) => ([(header::CONTENT_TYPE, "application/json")], page.clone()).into_response(),
        None => (StatusCode::GONE, "unknown continue token").into_response(),
    }
}

/// Metadata as the API server returns it (one managedFields entry).
fn metadata(name: &str, namespace: Option<&str>, uid: u64, labels: &str) -> String {
    let namespace = namespace
        .map(|n| format!(r#""namespace":"{n}","#))
        .unwrap_or_default();
    format!(
        r#"{{"name":"{name}",{namespace}"uid":"00000000-0000-4000-8000-{uid:012x}","resourceVersion":"{uid}","creationTimestamp":"2026-01-01T00:00:00Z","labels":{{{labels}}},"managedFields":[{{"manager":"kube-controller-manager","operation":"Update","apiVersion":"v1","time":"2026-01-01T00:00:00Z","fieldsType":"FieldsV1","fieldsV1":{{"f:metadata":{{"f:labels":{{".":{{}}}}}}}}}}]}}"#
    )
}

/// Service `i` as the API server returns it.
fn service_json(i: u32) -> String {
    let name = ServiceSet::name(i);
    let ip = ServiceSet::cluster_ip(i);
    format!(
        r#"{{"metadata":{},"spec":{{"type":"ClusterIP","clusterIP":"{ip}","clusterIPs":["{ip}"],"ipFamilies":["IPv4"],"ipFamilyPolicy":"SingleStack","internalTrafficPolicy":"Cluster","sessionAffinity":"None","selector":{{"app":"{name}"}},"ports":[{{"name":"{PORT_NAME}","protocol":"TCP","port":{SERVICE_PORT},"targetPort":"{PORT_NAME}"}}]}},"status":{{"loadBalancer":{{}}}}}}"#,
        metadata(
            &name,
            Some(NAMESPACE),
            u64::from(i) * 2 + 1,
            &format!(r#""app":"{name}""#)
        ),
    )
}

/// Service `i`'s EndpointSlice as the API server returns it.
fn slice_json(set: &ServiceSet, i: u32) -> String {
    let name = ServiceSet::name(i);
    let endpoints: Vec<String> = set
        .endpoints(i)
        .iter()
        .enumerate()
        .map(|(j, addr)| {
            format!(
                r#"{{"addresses":["{addr}"],"conditions":{{"ready":true,"serving":true,"terminating":false}},"nodeName":"node-{}","targetRef":{{"kind":"Pod","namespace":"{NAMESPACE}","name":"{name}-pod-{j}","uid":"00000000-0000-4000-8000-{:012x}"}}}}"#,
                j % 8,
                u64::from(i) * 1000 + j as u64
            )
        })
        .collect();
    format!(
        r#"{{"metadata":{},"addressType":"IPv4","endpoints":[{}],"ports":[{{"name":"{PORT_NAME}","protocol":"TCP","port":{TARGET_PORT}}}]}}"#,
        metadata(
            &format!("{name}-s1"),
            Some(NAMESPACE),
            u64::from(i) * 2 + 2,
            &format!(
                r#""kubernetes.io/service-name":"{name}","endpointslice.kubernetes.io/managed-by":"endpointslice-controller.k8s.io""#
            )
        ),
        endpoints.join(",")
    )
}

/// The Node as the API server returns it (its status left out).
fn node_json(node_name: &str) -> String {
    format!(
        r#"{{"metadata":{},"spec":{{"podCIDR":"10.200.0.0/24"}}}}"#,
        metadata(node_name, None, 1, r#""kubernetes.io/hostname":"bench""#)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_chain_through_continue_tokens_and_hold_every_item() {
        let pages = Pages::render(
            "v1",
            "ServiceList",
            (0..1200).map(|i| format!("{i}")).collect(),
        );
        let mut token = String::new();
        let mut items = 0;
        loop {
            let page: serde_json::Value = serde_json::from_str(&pages.0[&token]).unwrap();
            items += page["items"].as_array().unwrap().len();
            match page["metadata"]["continue"].as_str() {
                Some(next) => token = next.to_owned(),
                None => break,
            }
        }
        assert_eq!(items, 1200);
    }

    #[test]
    fn objects_translate_to_the_sets_frontends_through_the_agents_parser() {
        use service_agent::{
            reconcile::{
                cluster::{Change, ClusterEvent, ClusterState},
                translate::{NodeContext, translate},
            },
            source::objects::{ServiceObject, SliceObject},
        };
        let set = ServiceSet::new(2, 3);
        let mut state = ClusterState::default();
        let services = (0..2)
            .map(|i| {
                serde_json::from_str::<ServiceObject>(&service_json(i))
                    .unwrap()
                    .into_record()
                    .unwrap()
            })
            .collect();
        let slices = (0..2)
            .map(|i| {
                serde_json::from_str::<SliceObject>(&slice_json(&set, i))
                    .unwrap()
                    .into_record(None)
                    .unwrap()
            })
            .collect();
        state.apply(ClusterEvent::Service(Change::Replaced(services)));
        state.apply(ClusterEvent::EndpointSlice(Change::Replaced(slices)));
        let translation = translate(&state, &NodeContext::default());
        assert!(translation.skipped.is_empty(), "{:?}", translation.skipped);
        let mut got = translation.frontends;
        got.sort_by_key(|f| f.addr);
        assert_eq!(got, [set.frontend(0), set.frontend(1)]);
    }
}
