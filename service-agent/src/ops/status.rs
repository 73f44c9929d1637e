//! The agent's per-Service status, written next to the maps for `list`:
//! which Service each frontend belongs to, and which Services program
//! nothing on purpose (headless, ExternalName) or could not be served. The
//! maps themselves only hold addresses; bpffs holds no ordinary files, so
//! the status lives under `/run/service-lb/`, named after the pin folder.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::error::{Context as _, IoContext as _};
use crate::{
    datapath::model::{frontend_label, ip_from_map},
    reconcile::{
        cluster::ObjectName,
        desired::DesiredState,
        sync::{ServiceSummary, WriteFailure},
        translate::NotProgrammed,
    },
};

/// Folder of the status files.
pub const STATUS_DIR: &str = "/run/service-lb";

/// What became of a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceState {
    /// Its frontends are in the maps.
    #[serde(rename = "programmed")]
    Programmed,
    /// `clusterIP: None`: programs nothing, by design.
    Headless,
    /// `type: ExternalName`: programs nothing, by design.
    ExternalName,
    /// Every port or address was skipped as invalid or unsupported.
    #[serde(rename = "not served")]
    NotServed,
    /// A map write failed (a full map): some of its entries may be
    /// missing until a repair writes them.
    #[serde(rename = "write failed")]
    WriteFailed,
}

impl ServiceState {
    /// The state as `list` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Programmed => "programmed",
            ServiceState::Headless => "Headless",
            ServiceState::ExternalName => "ExternalName",
            ServiceState::NotServed => "not served",
            ServiceState::WriteFailed => "write failed",
        }
    }
}

/// One Service as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// `namespace/name`.
    pub service: String,
    /// What became of it.
    pub state: ServiceState,
    /// Its frontends as `address:port/PROTOCOL`.
    pub frontends: Vec<String>,
    /// What was skipped, and why.
    pub problems: Vec<String>,
    /// Fields set to something the agent does not serve (an SCTP port, an
    /// IPv6 address), one line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsupported: Vec<String>,
    /// Its health-check node port (`externalTrafficPolicy: Local`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
}

/// The status file of the agent pinning under `pin_path`.
pub fn status_path(pin_path: &Path) -> PathBuf {
    let name: String = pin_path
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Path::new(STATUS_DIR).join(format!("{name}.json"))
}

/// The status of every translated Service: `services` as the syncer keeps
/// them, their frontends from `desired`, `failures` the Services whose
/// writes failed. Built one at a time as [`write`] streams them: at 100k
/// Services the whole list would take about 20 MiB at the agent's peak.
pub fn statuses<'a>(
    services: &'a BTreeMap<ObjectName, ServiceSummary>,
    desired: &'a DesiredState,
    failures: &'a BTreeMap<ObjectName, WriteFailure>,
) -> impl Iterator<Item = ServiceStatus> + 'a {
    services.iter().map(|(name, summary)| {
        let failure = failures.get(name);
        let state = match summary.not_programmed {
            Some(NotProgrammed::Headless) => ServiceState::Headless,
            Some(NotProgrammed::ExternalName) => ServiceState::ExternalName,
            None if failure.is_some() => ServiceState::WriteFailed,
            None if !summary.has_frontends => ServiceState::NotServed,
            None => ServiceState::Programmed,
        };
        ServiceStatus {
            service: name.to_string(),
            state,
            frontends: desired
                .frontends_of(name)
                .map(|(key, _)| {
                    frontend_label(
                        ip_from_map(&key.addr, key.family),
                        u16::from_be(key.port),
                        key.proto,
                    )
                })
                .collect(),
            problems: summary
                .problems
                .iter()
                .cloned()
                .chain(failure.map(|f| f.error.clone()))
                .collect(),
            unsupported: summary.unsupported.to_vec(),
            health_check_node_port: summary.health_check.as_ref().map(|check| check.port),
        }
    })
}

/// Writes the status file atomically (write, then rename), streaming it:
/// each status is serialized as `statuses` yields it.
pub fn write(
    pin_path: &Path,
    statuses: impl IntoIterator<Item = ServiceStatus>,
) -> crate::Result<()> {
    let path = status_path(pin_path);
    std::fs::create_dir_all(STATUS_DIR).on_path("creating", STATUS_DIR)?;
    let staging = path.with_extension("json.new");
    let file = std::fs::File::create(&staging).on_path("writing", &staging)?;
    let mut writer = std::io::BufWriter::new(file);
    serde::Serializer::collect_seq(&mut serde_json::Serializer::new(&mut writer), statuses)
        .with_context(|| format!("writing {}", staging.display()))?;
    std::io::Write::flush(&mut writer).on_path("writing", &staging)?;
    std::fs::rename(&staging, &path).on_path("writing", path)
}

/// Reads the status file; `None` when there is none (no agent wrote it).
pub fn read(pin_path: &Path) -> Option<Vec<ServiceStatus>> {
    let text = std::fs::read_to_string(status_path(pin_path)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Removes the status file.
pub fn remove(pin_path: &Path) {
    let _ = std::fs::remove_file(status_path(pin_path));
}
