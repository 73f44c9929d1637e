//! The file source: a multi-document YAML file of ordinary Kubernetes
//! Services and EndpointSlices (as `kubectl get -o yaml` prints them, `List`
//! documents included), parsed into k8s-openapi types.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use log::warn;
use serde::Deserialize;

use super::{ClusterState, object_name};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ObjectName;

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
