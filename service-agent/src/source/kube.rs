//! The Kubernetes source: kube-rs watchers on Services, EndpointSlices
//! (discovery.k8s.io/v1) and this Node. Each watcher lists, then watches;
//! on errors it retries with backoff, and after a 410 Gone (or any watch
//! that cannot resume) it re-lists, which arrives here as one
//! [`Change::Replaced`] so objects deleted meanwhile disappear too.

use std::fmt::Debug;

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, watcher},
};
use log::{info, warn};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc::UnboundedSender, task::JoinHandle};

use crate::reconcile::cluster::{Change, ClusterEvent, Kind};

/// Services of other proxies (`service.kubernetes.io/service-proxy-name`)
/// are not ours, as in kube-proxy.
pub const SERVICE_LABEL_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name";
/// EndpointSlices of headless Services and of other proxies' Services are
/// not needed, as in kube-proxy.
pub const SLICE_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";

/// The kinds this source lists before the first full sync may run.
pub const KINDS: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

/// Starts the three watchers; their events go to `events`. Returns their tasks.
pub fn spawn_watchers(
    client: Client,
    node_name: &str,
    events: UnboundedSender<ClusterEvent>,
) -> Vec<JoinHandle<()>> {
    vec![
        spawn_watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(SERVICE_LABEL_SELECTOR),
            events.clone(),
            ClusterEvent::Service,
        ),
        spawn_watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(SLICE_LABEL_SELECTOR),
            events.clone(),
            ClusterEvent::EndpointSlice,
        ),
        spawn_watcher(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            events,
            ClusterEvent::Node,
        ),
    ]
}

fn spawn_watcher<K>(
    api: Api<K>,
    config: watcher::Config,
    events: UnboundedSender<ClusterEvent>,
    wrap: fn(Change<K>) -> ClusterEvent,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    tokio::spawn(async move {
        let stream = watcher(api, config).default_backoff();
        futures::pin_mut!(stream);
        let mut listing: Vec<K> = Vec::new();
        while let Some(item) = stream.next().await {
            let change = match item {
                Ok(watcher::Event::Init) => {
                    listing.clear();
                    continue;
                }
                Ok(watcher::Event::InitApply(object)) => {
                    listing.push(object);
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    info!("listed {} {kind} objects", listing.len());
                    Change::Replaced(std::mem::take(&mut listing))
                }
                Ok(watcher::Event::Apply(object)) => Change::Applied(object),
                Ok(watcher::Event::Delete(object)) => Change::Deleted(object),
                Err(e) => {
                    warn!("watching {kind}: {e}; retrying with backoff");
                    continue;
                }
            };
            if events.send(wrap(change)).is_err() {
                return;
            }
        }
    })
}
