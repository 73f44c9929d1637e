//! Where the Kubernetes objects come from: a YAML file ([`file`]) or the
//! Kubernetes API ([`kube`]). Both send the same
//! [`crate::reconcile::cluster::ClusterEvent`]s into a channel; a full list
//! of a kind arrives as one `Change::Replaced`.

pub mod file;
pub mod kube;
pub mod objects;

use std::{path::PathBuf, str::FromStr};

/// The `--source` flag: where to read Services and EndpointSlices from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// `file:PATH`: a multi-document YAML file, watched for changes.
    File(PathBuf),
    /// `kube`: the Kubernetes API (kubeconfig, or in-cluster config).
    Kube,
}

impl FromStr for SourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(SourceSpec::File(PathBuf::from(path))),
            Some(("file", _)) => Err("file source needs a path: file:PATH".to_owned()),
            _ if s == "kube" => Ok(SourceSpec::Kube),
            _ => Err(format!("unknown source {s:?}: expected file:PATH or kube")),
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
        assert_eq!("kube".parse::<SourceSpec>(), Ok(SourceSpec::Kube));
    }
}
