//! The Kubernetes source: kube-rs watchers on Services, EndpointSlices
//! (discovery.k8s.io/v1) and this Node. Each watcher lists, then watches;
//! on errors it retries with backoff, and after a 410 Gone (or any watch
//! that cannot resume) it re-lists, which arrives here as one
//! [`Change::Replaced`] so objects deleted meanwhile disappear too.

use std::{fmt::Debug, sync::Arc};

use futures::StreamExt as _;
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, watcher},
};
use log::{info, warn};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc::UnboundedSender, task::JoinHandle};

use super::objects::{NodeObject, ServiceObject, SliceObject, excluded_by_labels};
use crate::{
    ops::health::Health,
    reconcile::cluster::{Change, ClusterEvent, Kind, ObjectName},
};

/// Services of other proxies (`service.kubernetes.io/service-proxy-name`)
/// are not ours, and headless ones program nothing, as in kube-proxy (which
/// puts both on both watches). The API server applies it; the records are
/// checked again with [`excluded_by_labels`], the file source's rule.
pub const SERVICE_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// EndpointSlices of headless Services and of other proxies' Services are
/// not needed, as in kube-proxy.
pub const SLICE_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";

/// The kinds this source lists before the first full sync may run.
pub const KINDS: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

/// Starts the three watchers on Services, EndpointSlices and the Node
/// `node_name` (whose endpoints are node-local); their events go to
/// `events`, and whether they deliver to `health`. Returns their tasks.
pub fn spawn_watchers(
    client: Client,
    node_name: &str,
    events: UnboundedSender<ClusterEvent>,
    health: Arc<Health>,
) -> Vec<JoinHandle<()>> {
    let this_node: Option<String> = Some(node_name.to_owned()).filter(|n| !n.is_empty());
    vec![
        spawn_watcher(
            Api::<ServiceObject>::all(client.clone()),
            watcher::Config::default().labels(SERVICE_LABEL_SELECTOR),
            Watch {
                kind: Kind::Service,
                events: events.clone(),
                health: health.clone(),
            },
            move |service| {
                excluded_by_labels(&service.metadata)
                    .is_none()
                    .then(|| service.into_record())
                    .flatten()
            },
            ClusterEvent::Service,
        ),
        spawn_watcher(
            Api::<SliceObject>::all(client.clone()),
            watcher::Config::default().labels(SLICE_LABEL_SELECTOR),
            Watch {
                kind: Kind::EndpointSlice,
                events: events.clone(),
                health: health.clone(),
            },
            move |slice| {
                excluded_by_labels(&slice.metadata)
                    .is_none()
                    .then(|| slice.into_record(this_node.as_deref()))
                    .flatten()
            },
            ClusterEvent::EndpointSlice,
        ),
        spawn_watcher(
            Api::<NodeObject>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            Watch {
                kind: Kind::Node,
                events,
                health,
            },
            move |node| node.into_record(),
            ClusterEvent::Node,
        ),
    ]
}

/// Where one watcher reports.
struct Watch {
    kind: Kind,
    events: UnboundedSender<ClusterEvent>,
    health: Arc<Health>,
}

/// Runs one watcher: objects become records (`record`) as they arrive, a
/// full list is sent as one event once complete.
fn spawn_watcher<K, T>(
    api: Api<K>,
    config: watcher::Config,
    watch: Watch,
    record: impl Fn(K) -> Option<(ObjectName, T)> + Send + 'static,
    wrap: fn(Change<T>) -> ClusterEvent,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
    T: Send + 'static,
{
    let kind = watch.kind.as_str();
    tokio::spawn(async move {
        let stream = watcher(api, config).default_backoff();
        futures::pin_mut!(stream);
        let mut listing: Vec<(ObjectName, T)> = Vec::new();
        while let Some(item) = stream.next().await {
            if item.is_ok() {
                watch.health.delivered(kind);
            }
            let change = match item {
                Ok(watcher::Event::Init) => {
                    listing.clear();
                    continue;
                }
                Ok(watcher::Event::InitApply(object)) => {
                    listing.extend(record(object));
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    info!("listed {} {kind} objects", listing.len());
                    Change::Replaced(std::mem::take(&mut listing))
                }
                Ok(watcher::Event::Apply(object)) => match record(object) {
                    Some((name, record)) => Change::Applied(name, record),
                    None => continue,
                },
                Ok(watcher::Event::Delete(object)) => {
                    match super::objects::object_name(object.meta()) {
                        Some(name) => Change::Deleted(name),
                        None => continue,
                    }
                }
                Err(e) => {
                    watch.health.failed(kind);
                    warn!("watching {kind}: {e}; retrying with backoff");
                    continue;
                }
            };
            if watch.events.send(wrap(change)).is_err() {
                return;
            }
        }
    })
}
