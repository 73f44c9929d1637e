//! Where the Kubernetes objects come from. Every source produces the same
//! [`ClusterState`], which [`crate::translate`] turns into map entries, so
//! the file source and the Kubernetes source share one pipeline.

pub mod file;

use std::{collections::BTreeMap, fmt, path::PathBuf, str::FromStr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A namespaced object name, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName {
    /// Namespace (`default` when the object does not say).
    pub namespace: String,
    /// Object name.
    pub name: String,
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The Kubernetes objects the agent acts on, as last seen from a source.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    /// Services by name.
    pub services: BTreeMap<ObjectName, Service>,
    /// EndpointSlices by their own name (not their Service's).
    pub endpoint_slices: BTreeMap<ObjectName, EndpointSlice>,
}

impl ClusterState {
    /// The EndpointSlices labelled as belonging to `service`.
    pub fn slices_of<'a>(
        &'a self,
        service: &'a ObjectName,
    ) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.endpoint_slices
            .iter()
            .filter(move |(name, slice)| {
                name.namespace == service.namespace
                    && slice
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
                        .is_some_and(|owner| *owner == service.name)
            })
            .map(|(_, slice)| slice)
    }
}

/// The `--source` flag: where to read Services and EndpointSlices from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// `file:PATH`: a multi-document YAML file, watched for changes.
    File(PathBuf),
}

impl FromStr for SourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(SourceSpec::File(PathBuf::from(path))),
            Some(("file", _)) => Err("file source needs a path: file:PATH".to_owned()),
            _ if s == "kube" => Err(
                "the Kubernetes source (--source kube) is not available yet; use file:PATH"
                    .to_owned(),
            ),
            _ => Err(format!("unknown source {s:?}: expected file:PATH")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_spec_parses_file_paths_and_rejects_the_rest() {
        assert_eq!(
            "file:/tmp/a.yaml".parse::<SourceSpec>(),
            Ok(SourceSpec::File(PathBuf::from("/tmp/a.yaml")))
        );
        assert!("file:".parse::<SourceSpec>().is_err());
        assert!("http://x".parse::<SourceSpec>().is_err());
        assert!("kube".parse::<SourceSpec>().is_err());
    }
}
