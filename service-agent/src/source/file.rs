//! The file source: a multi-document YAML file of ordinary Kubernetes
//! Services and EndpointSlices (as `kubectl get -o yaml` prints them, `List`
//! documents included), read a document at a time into the partial types
//! of [`super::objects`] and kept as records, so memory follows the
//! records, not the file's size.

use std::{
    collections::hash_map::DefaultHasher,
    hash::Hasher as _,
    io::{BufRead, BufReader, Read as _},
    path::{Path, PathBuf},
    time::Duration,
};

use log::{error, info, warn};
use tokio::{sync::mpsc::UnboundedSender, task::JoinHandle};

use super::objects::{AnyObject, TypedObject, excluded_by_labels};
use crate::reconcile::{
    cluster::{Change, ClusterEvent, ClusterState, Kind, ObjectName},
    records::{NodeRecord, ServiceRecord, SliceRecord},
};

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
    /// The Services found, in file order (a later one of the same name wins).
    pub services: Vec<(ObjectName, ServiceRecord)>,
    /// The EndpointSlices found, in file order.
    pub slices: Vec<(ObjectName, SliceRecord)>,
    /// This node's Node, if the file has it (the Nodes of other nodes are
    /// ignored): its zone label and addresses are used as the kube
    /// source's.
    pub nodes: Vec<(ObjectName, NodeRecord)>,
    /// Objects left out by their labels (another proxy's, headless), one
    /// line each, as the kube source's label selector leaves them out.
    pub excluded: Vec<String>,
    /// One line per object that was skipped, saying why.
    pub skipped: Vec<String>,
}

impl Parsed {
    /// A cluster state holding what was found.
    pub fn into_cluster_state(self) -> ClusterState {
        let mut state = ClusterState::default();
        state.apply(ClusterEvent::Service(Change::Replaced(self.services)));
        state.apply(ClusterEvent::EndpointSlice(Change::Replaced(self.slices)));
        state.apply(ClusterEvent::Node(Change::Replaced(self.nodes)));
        state
    }
}

/// A hash of the file's content, read in chunks.
pub fn content_hash(path: &Path) -> Result<u64, FileSourceError> {
    let read_error = |source| FileSourceError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let mut hasher = DefaultHasher::new();
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let n = file.read(&mut buffer).map_err(read_error)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.write(&buffer[..n]);
    }
}

/// Reads and parses a file a document at a time; see [`parse_documents`].
/// Endpoints whose `nodeName` is `this_node` are node-local.
pub fn read_file(path: &Path, this_node: Option<&str>) -> Result<Parsed, FileSourceError> {
    let file = std::fs::File::open(path).map_err(|source| FileSourceError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_reader(BufReader::new(file), this_node).map_err(|e| match e {
        DocumentError::Io(source) => FileSourceError::Read {
            path: path.to_owned(),
            source,
        },
        DocumentError::Yaml(source) => FileSourceError::Yaml {
            path: path.to_owned(),
            source,
        },
    })
}

/// Parses multi-document YAML. Services and EndpointSlices (also inside
/// `kind: List`) are kept; other kinds are skipped quietly, and objects that
/// do not deserialize are skipped with a reason. Only a YAML syntax error
/// fails the whole text.
pub fn parse_documents(text: &str, this_node: Option<&str>) -> Result<Parsed, serde_yaml::Error> {
    parse_reader(text.as_bytes(), this_node).map_err(|e| match e {
        DocumentError::Yaml(e) => e,
        DocumentError::Io(e) => unreachable!("reading from memory failed: {e}"),
    })
}

/// Why a text could not be parsed.
enum DocumentError {
    Io(std::io::Error),
    Yaml(serde_yaml::Error),
}

/// Splits the text into documents at `---` and `...` lines (which end any
/// YAML content, block scalars included) and parses each on its own.
fn parse_reader(
    mut reader: impl BufRead,
    this_node: Option<&str>,
) -> Result<Parsed, DocumentError> {
    let mut parsed = Parsed::default();
    let mut document = String::new();
    let mut line = String::new();
    let mut index = 0;
    loop {
        line.clear();
        let end = reader.read_line(&mut line).map_err(DocumentError::Io)? == 0;
        let marker = if line.starts_with("---") || line.starts_with("...") {
            let rest = &line[3..];
            (rest.is_empty() || rest.starts_with([' ', '\t', '\n', '\r'])).then_some(rest)
        } else {
            None
        };
        if end || marker.is_some() {
            if has_content(&document) {
                index += 1;
                add_document(&mut parsed, &document, index, this_node)?;
            }
            document.clear();
            if end {
                return Ok(parsed);
            }
            // `--- {inline: document}` starts the next document on its line;
            // `...` only ends one.
            if line.starts_with("---") {
                document.push_str(marker.unwrap_or_default());
            }
        } else if !line.starts_with('%') {
            // (`%` lines are directives, which only the next `---` uses.)
            document.push_str(&line);
        }
    }
}

/// Whether a document holds more than blank lines and comments.
fn has_content(document: &str) -> bool {
    document.lines().any(|line| {
        let line = line.trim_start();
        !line.is_empty() && !line.starts_with('#')
    })
}

/// Parses one document: in one pass, straight into the agent's types, in
/// the common case (a third of the time of going through generic YAML
/// values); a document that does not fit them is parsed again as generic
/// YAML to tell a syntax error (the whole file fails) from an object of
/// another kind (ignored) or an invalid object (skipped with the reason).
fn add_document(
    parsed: &mut Parsed,
    text: &str,
    index: usize,
    this_node: Option<&str>,
) -> Result<(), DocumentError> {
    let origin = format!("document {index}");
    match serde_yaml::from_str::<AnyObject>(text) {
        Ok(object) => add_object(parsed, object, &origin, this_node),
        Err(error) => {
            // The slow path: generic YAML says whether the text is YAML at
            // all, and which kind the object is.
            let value: serde_yaml::Value =
                serde_yaml::from_str(text).map_err(DocumentError::Yaml)?;
            add_value(parsed, value, &origin, this_node, error);
        }
    }
    Ok(())
}

/// Adds a generic YAML object that did not parse as a whole (`error`):
/// a `List`'s items one by one, otherwise the object is reported if it is
/// of a kind the agent takes.
fn add_value(
    parsed: &mut Parsed,
    value: serde_yaml::Value,
    origin: &str,
    this_node: Option<&str>,
    error: serde_yaml::Error,
) {
    let kind = value
        .get("kind")
        .and_then(|kind| kind.as_str())
        .unwrap_or("")
        .to_owned();
    if !AnyObject::is_taken_kind(&kind) {
        return;
    }
    if kind.ends_with("List")
        && let Some(serde_yaml::Value::Sequence(items)) = value.get("items").cloned()
    {
        for (index, item) in items.into_iter().enumerate() {
            let origin = format!("{origin}, item {}", index + 1);
            match serde_yaml::from_value::<AnyObject>(item.clone()) {
                Ok(object) => add_object(parsed, object, &origin, this_node),
                Err(error) => add_value(parsed, item, &origin, this_node, error),
            }
        }
        return;
    }
    skip(parsed, origin, &format!("invalid {kind}: {error}"));
}

/// Adds one object (or the items of a `List`) to `parsed`.
fn add_object(parsed: &mut Parsed, object: AnyObject, origin: &str, this_node: Option<&str>) {
    let typed = object.into_typed();
    let metadata = match &typed {
        Ok(TypedObject::Service(service)) => Some(&service.metadata),
        Ok(TypedObject::EndpointSlice(slice)) => Some(&slice.metadata),
        _ => None,
    };
    if let Some(metadata) = metadata
        && let Some(reason) = excluded_by_labels(metadata)
    {
        let line = format!(
            "{origin} ({}): {reason}",
            metadata.name.as_deref().unwrap_or("no name")
        );
        log::debug!("leaving out {line}");
        parsed.excluded.push(line);
        return;
    }
    match typed {
        Ok(TypedObject::Node(node)) => {
            if this_node.is_some() && node.metadata.name.as_deref() == this_node {
                match node.into_record() {
                    Some(named) => parsed.nodes.push(named),
                    None => skip(parsed, origin, "Node has no metadata.name"),
                }
            }
        }
        Ok(TypedObject::Service(service)) => match service.into_record() {
            Some(named) => parsed.services.push(named),
            None => skip(parsed, origin, "Service has no metadata.name"),
        },
        Ok(TypedObject::EndpointSlice(slice)) => match slice.into_record(this_node) {
            Some(named) => parsed.slices.push(named),
            None => skip(parsed, origin, "EndpointSlice has no metadata.name"),
        },
        Ok(TypedObject::List(items)) => {
            for (index, item) in items.into_iter().enumerate() {
                add_object(
                    parsed,
                    item,
                    &format!("{origin}, item {}", index + 1),
                    this_node,
                );
            }
        }
        Ok(TypedObject::Other) => {}
        Err(reason) => skip(parsed, origin, &format!("invalid EndpointSlice: {reason}")),
    }
}

fn skip(parsed: &mut Parsed, origin: &str, reason: &str) {
    let line = format!("{origin}: {reason}");
    warn!("skipping {line}");
    parsed.skipped.push(line);
}

/// The kinds this source lists before the first full sync may run (each
/// read of the file lists all three; the file need not hold a Node).
pub const KINDS: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

/// Starts watching the file at `path` (checked every `interval`); its
/// objects go to `events` as full lists, endpoints on `this_node` marked
/// node-local. Returns the task.
pub fn spawn_watcher(
    path: PathBuf,
    interval: Duration,
    this_node: Option<String>,
    events: UnboundedSender<ClusterEvent>,
) -> JoinHandle<()> {
    tokio::spawn(watch(path, interval, this_node, events))
}

/// The file source: re-reads the file when its size, time or inode changes
/// and sends its objects as full lists when the content differs. A file
/// that is missing or not valid YAML keeps the last good state. Reading
/// runs on a blocking thread, so a large file never stalls the agent.
async fn watch(
    path: PathBuf,
    interval: Duration,
    this_node: Option<String>,
    events: UnboundedSender<ClusterEvent>,
) {
    let mut stamp = None;
    let mut last_hash = None;
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
        let (file, node) = (path.clone(), this_node.clone());
        let read = tokio::task::spawn_blocking(move || {
            let hash = content_hash(&file)?;
            if Some(hash) == last_hash {
                return Ok((hash, None));
            }
            read_file(&file, node.as_deref()).map(|parsed| (hash, Some(parsed)))
        })
        .await;
        match read {
            Ok(Ok((_, None))) => {}
            Ok(Ok((hash, Some(parsed)))) => {
                last_hash = Some(hash);
                info!(
                    "read {}: {} services, {} endpoint slices, {} node, {} objects skipped, {} left out by their labels",
                    path.display(),
                    parsed.services.len(),
                    parsed.slices.len(),
                    parsed.nodes.len(),
                    parsed.skipped.len(),
                    parsed.excluded.len()
                );
                // The Node first: translation of the Services reads its zone.
                if events
                    .send(ClusterEvent::Node(Change::Replaced(parsed.nodes)))
                    .is_err()
                    || events
                        .send(ClusterEvent::Service(Change::Replaced(parsed.services)))
                        .is_err()
                    || events
                        .send(ClusterEvent::EndpointSlice(Change::Replaced(parsed.slices)))
                        .is_err()
                {
                    return;
                }
            }
            Ok(Err(e)) => error!("{e}; keeping the last good state"),
            Err(e) => error!(
                "reading {} failed: {e}; keeping the last good state",
                path.display()
            ),
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
        let parsed = parse_documents(TWO_OBJECTS, None).unwrap();
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        let state = parsed.into_cluster_state();
        let service = ObjectName::new("shop", "web");
        assert!(state.services.contains_key(&service));
        assert_eq!(state.slices_of(&service).count(), 1);
    }

    #[test]
    fn list_items_are_read_and_namespace_defaults() {
        let text = "kind: List\nitems:\n- kind: Service\n  apiVersion: v1\n  metadata: {name: a}\n  spec: {clusterIP: 10.96.0.1}\n- kind: Deployment\n  spec: {selector: {matchLabels: {a: b}}, ports: 7}\n";
        let parsed = parse_documents(text, None).unwrap();
        let names: Vec<_> = parsed.services.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(names, ["default/a"]);
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
    }

    #[test]
    fn a_bad_object_is_skipped_and_the_rest_kept() {
        let text = format!(
            "{TWO_OBJECTS}\n---\nkind: Service\napiVersion: v1\nmetadata: {{name: bad}}\nspec: {{ports: 7}}\n---\nkind: Service\napiVersion: v1\nspec: {{}}\n--- {{kind: EndpointSlice, metadata: {{name: s}}}}\n"
        );
        let parsed = parse_documents(&text, None).unwrap();
        assert_eq!(parsed.services.len(), 1);
        assert_eq!(parsed.skipped.len(), 3, "{:?}", parsed.skipped);
        assert!(
            parsed.skipped[0].contains("document 4"),
            "{:?}",
            parsed.skipped
        );
        assert!(
            parsed.skipped[2].contains("addressType"),
            "{:?}",
            parsed.skipped
        );
    }

    #[test]
    fn documents_split_only_at_markers_and_other_kinds_with_clashing_fields_are_ignored() {
        let text = "# a comment\n---\n---\nkind: ConfigMap\ndata:\n  script: |\n    a line with --- inside\n...\n--- # next\nkind: Deployment\nspec: {ports: {a: b}, type: [1]}\n";
        let parsed = parse_documents(text, None).unwrap();
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        assert!(parsed.services.is_empty() && parsed.slices.is_empty());
    }

    #[test]
    fn the_label_rules_of_the_kube_source_leave_objects_out() {
        let text = format!(
            "{TWO_OBJECTS}---\nkind: Service\napiVersion: v1\nmetadata: {{name: other, labels: {{service.kubernetes.io/service-proxy-name: other-proxy}}}}\nspec: {{clusterIP: 10.96.0.11}}\n---\nkind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata: {{name: other-1, labels: {{kubernetes.io/service-name: other, service.kubernetes.io/service-proxy-name: other-proxy}}}}\naddressType: IPv4\n---\nkind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata: {{name: h-1, labels: {{kubernetes.io/service-name: h, service.kubernetes.io/headless: ''}}}}\naddressType: IPv4\n"
        );
        let parsed = parse_documents(&text, None).unwrap();
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        let services: Vec<_> = parsed.services.iter().map(|(n, _)| n.name()).collect();
        assert_eq!(services, ["web"]);
        let slices: Vec<_> = parsed.slices.iter().map(|(n, _)| n.name()).collect();
        assert_eq!(slices, ["web-abc"]);
        assert_eq!(parsed.excluded.len(), 3, "{:?}", parsed.excluded);
        assert!(parsed.excluded[0].contains("service-proxy-name=other-proxy"));
        assert!(parsed.excluded[2].contains("headless"));
    }

    #[test]
    fn only_this_nodes_node_is_read_with_its_zone_and_addresses() {
        let text = "kind: Node\napiVersion: v1\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a, other: x}}\nstatus: {addresses: [{type: InternalIP, address: 10.0.0.1}, {type: Hostname, address: node-a}, {type: ExternalIP, address: 192.0.2.1}]}\n---\nkind: Node\napiVersion: v1\nmetadata: {name: node-b, labels: {topology.kubernetes.io/zone: zone-b}}\n";
        let parsed = parse_documents(text, Some("node-a")).unwrap();
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        assert_eq!(parsed.nodes.len(), 1);
        let node = &parsed.nodes[0].1;
        assert_eq!(node.zone.as_deref(), Some("zone-a"));
        assert_eq!(&*node.internal_ips, [std::net::IpAddr::from([10, 0, 0, 1])]);
        assert_eq!(
            &*node.external_ips,
            [std::net::IpAddr::from([192, 0, 2, 1])]
        );
        let state = parsed.into_cluster_state();
        assert_eq!(state.node_zone(), Some("zone-a"));
        assert!(parse_documents(text, None).unwrap().nodes.is_empty());
    }

    #[test]
    fn broken_yaml_is_an_error() {
        assert!(parse_documents("kind: Service\n  bad: [", None).is_err());
    }
}
