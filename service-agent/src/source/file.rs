//! The file source: a multi-document YAML file of ordinary Kubernetes
//! Services and EndpointSlices (as `kubectl get -o yaml` prints them, `List`
//! documents included), parsed into k8s-openapi types.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use log::{error, info, warn};
use serde::Deserialize;
use tokio::{sync::mpsc::UnboundedSender, task::JoinHandle};

use crate::reconcile::cluster::{Change, ClusterEvent, ClusterState, Kind, object_name};

/// Why a file could not be read at all. Problems with single objects are
/// not errors: they are reported in [`Parsed::skipped`] and the rest is used.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML.
    #[error("{path} is not valid YAML: {source}")]
    Yaml {
        /// The file.
        path: PathBuf,
        /// The YAML error.
        source: serde_yaml::Error,
    },
}

/// The result of parsing one file.
#[derive(Debug, Default)]
pub struct Parsed {
    /// The Services and EndpointSlices found.
    pub state: ClusterState,
    /// One line per object that was skipped, saying why.
    pub skipped: Vec<String>,
}

/// Reads and parses a file; see [`parse_documents`].
pub fn read_file(path: &Path) -> Result<(Parsed, u64), FileSourceError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileSourceError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    let parsed = parse_documents(&text).map_err(|source| FileSourceError::Yaml {
        path: path.to_owned(),
        source,
    })?;
    Ok((parsed, hasher.finish()))
}

/// Parses multi-document YAML. Services and EndpointSlices (also inside
/// `kind: List`) are kept; other kinds are skipped quietly, and objects that
/// do not deserialize are skipped with a reason. Only a YAML syntax error
/// fails the whole text.
pub fn parse_documents(text: &str) -> Result<Parsed, serde_yaml::Error> {
    let mut parsed = Parsed::default();
    // One document at a time: its generic YAML value is dropped as soon as
    // it has become a typed object, which keeps the peak memory of a large
    // file low.
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(document)?;
        add_object(&mut parsed, value, &format!("document {}", index + 1));
    }
    Ok(parsed)
}

/// Adds one YAML object (or the items of a `List`) to `parsed`.
fn add_object(parsed: &mut Parsed, value: serde_yaml::Value, origin: &str) {
    if value.is_null() {
        return;
    }
    let kind = value
        .get("kind")
        .and_then(|kind| kind.as_str())
        .unwrap_or("");
    match kind {
        "List" | "ServiceList" | "EndpointSliceList" => {
            let items = value
                .get("items")
                .and_then(|items| items.as_sequence())
                .cloned()
                .unwrap_or_default();
            for (index, item) in items.into_iter().enumerate() {
                add_object(parsed, item, &format!("{origin}, item {}", index + 1));
            }
        }
        "Service" => match serde_yaml::from_value::<Service>(value) {
            Ok(service) => match object_name(&service.metadata) {
                Some(name) => {
                    parsed.state.services.insert(name, service);
                }
                None => skip(parsed, origin, "Service has no metadata.name"),
            },
            Err(error) => skip(parsed, origin, &format!("invalid Service: {error}")),
        },
        "EndpointSlice" => match serde_yaml::from_value::<EndpointSlice>(value) {
            Ok(slice) => match object_name(&slice.metadata) {
                Some(name) => {
                    parsed.state.insert_slice(name, slice);
                }
                None => skip(parsed, origin, "EndpointSlice has no metadata.name"),
            },
            Err(error) => skip(parsed, origin, &format!("invalid EndpointSlice: {error}")),
        },
        _ => {}
    }
}

fn skip(parsed: &mut Parsed, origin: &str, reason: &str) {
    let line = format!("{origin}: {reason}");
    warn!("skipping {line}");
    parsed.skipped.push(line);
}

/// The kinds this source lists before the first full sync may run.
pub const KINDS: [Kind; 2] = [Kind::Service, Kind::EndpointSlice];

/// Starts watching the file at `path` (checked every `interval`); its
/// objects go to `events` as full lists. Returns the task.
pub fn spawn_watcher(
    path: PathBuf,
    interval: Duration,
    events: UnboundedSender<ClusterEvent>,
) -> JoinHandle<()> {
    tokio::spawn(watch(path, interval, events))
}

/// The file source: re-reads the file when its size, time or inode changes
/// and sends its objects as full lists when the content differs. A file
/// that is missing or not valid YAML keeps the last good state.
async fn watch(path: PathBuf, interval: Duration, events: UnboundedSender<ClusterEvent>) {
    let mut stamp = None;
    let mut content_hash = None;
    let mut missing_reported = false;
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let now = file_stamp(&path);
        if now.is_none() {
            if !missing_reported {
                warn!(
                    "source file {} cannot be read; keeping the last state",
                    path.display()
                );
                missing_reported = true;
            }
            stamp = None;
            continue;
        }
        missing_reported = false;
        if now == stamp {
            continue;
        }
        stamp = now;
        match read_file(&path) {
            Ok((Parsed { state, skipped }, hash)) => {
                if Some(hash) == content_hash {
                    continue;
                }
                content_hash = Some(hash);
                info!(
                    "read {}: {} services, {} endpoint slices, {} objects skipped",
                    path.display(),
                    state.services.len(),
                    state.endpoint_slices().len(),
                    skipped.len()
                );
                let (services, slices) = state.into_objects();
                if events
                    .send(ClusterEvent::Service(Change::Replaced(services)))
                    .is_err()
                    || events
                        .send(ClusterEvent::EndpointSlice(Change::Replaced(slices)))
                        .is_err()
                {
                    return;
                }
            }
            Err(e) => error!("{e}; keeping the last good state"),
        }
    }
}

fn file_stamp(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::cluster::ObjectName;

    const TWO_OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - addresses: [10.1.1.2]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"#;

    #[test]
    fn parses_services_and_slices_and_ignores_other_kinds() {
        let parsed = parse_documents(TWO_OBJECTS).unwrap();
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        let service = ObjectName {
            namespace: "shop".into(),
            name: "web".into(),
        };
        assert!(parsed.state.services.contains_key(&service));
        assert_eq!(parsed.state.slices_of(&service).count(), 1);
    }

    #[test]
    fn list_items_are_read_and_namespace_defaults() {
        let text = "kind: List\nitems:\n- kind: Service\n  apiVersion: v1\n  metadata: {name: a}\n  spec: {clusterIP: 10.96.0.1}\n";
        let parsed = parse_documents(text).unwrap();
        let names: Vec<_> = parsed
            .state
            .services
            .keys()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, ["default/a"]);
    }

    #[test]
    fn a_bad_object_is_skipped_and_the_rest_kept() {
        let text = format!(
            "{TWO_OBJECTS}\n---\nkind: Service\napiVersion: v1\nmetadata: {{name: bad}}\nspec: {{ports: 7}}\n---\nkind: Service\napiVersion: v1\nspec: {{}}\n"
        );
        let parsed = parse_documents(&text).unwrap();
        assert_eq!(parsed.state.services.len(), 1);
        assert_eq!(parsed.skipped.len(), 2, "{:?}", parsed.skipped);
        assert!(parsed.skipped[0].contains("document 4"));
    }

    #[test]
    fn broken_yaml_is_an_error() {
        assert!(parse_documents("kind: Service\n  bad: [").is_err());
    }
}
