//! `service-agent run`: load and attach the datapath, then keep the maps in
//! line with the source until SIGINT or SIGTERM.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use log::{error, info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    datapath::{
        self,
        attach::{Attachments, DeviceSelection},
        maps::ServiceMaps,
    },
    source::{
        ClusterState, SourceSpec,
        file::{Parsed, read_file},
    },
    sync::Syncer,
    translate::NodeContext,
};

/// How `run` was asked to behave.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Where Services and EndpointSlices come from.
    pub source: SourceSpec,
    /// Folder the maps are pinned in.
    pub pin_path: PathBuf,
    /// Pod devices to attach to.
    pub devices: DeviceSelection,
    /// This node.
    pub node: NodeContext,
    /// How often the source and the devices are checked.
    pub poll_interval: Duration,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let SourceSpec::File(path) = &options.source;
    let mut ebpf = datapath::load(&options.pin_path)?;
    let maps = ServiceMaps::take_from(&mut ebpf)?;
    let current = maps.read_state().context("reading the pinned maps")?;
    info!(
        "maps pinned in {}: adopted {} frontend entries, {} backends",
        options.pin_path.display(),
        current.frontends.len(),
        current.backends.len()
    );
    let mut syncer = Syncer::adopting(maps, current, options.node.clone());
    let mut attachments = Attachments::default();
    let mut watcher = FileWatcher::new(path.clone());
    let mut retry_at: Option<Instant> = None;

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut ticker = tokio::time::interval(options.poll_interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        if let Err(e) = attachments.scan(&mut ebpf, &options.devices) {
            warn!("device scan failed: {e:#}");
        }
        let changed = watcher.poll();
        let retry_due = retry_at.is_some_and(|at| Instant::now() >= at);
        if changed || retry_due {
            let report = syncer.sync(watcher.state());
            retry_at = None;
            if report.failed {
                match syncer.writer().read_state() {
                    Ok(actual) => syncer.resync_mirror(actual),
                    Err(e) => error!("re-reading the maps after a failed write: {e:#}"),
                }
                retry_at = Some(Instant::now() + Duration::from_secs(5));
            }
        }
    }
    info!(
        "stopping; maps stay pinned in {} (attached to: {})",
        options.pin_path.display(),
        attachments.devices().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// Watches the source file: re-reads it when its size, time or inode
/// changes, and reports a change only when the content differs. A file that
/// is missing or not valid YAML keeps the last good state.
struct FileWatcher {
    path: PathBuf,
    stamp: Option<(std::time::SystemTime, u64, u64)>,
    content_hash: Option<u64>,
    missing_reported: bool,
    state: ClusterState,
}

impl FileWatcher {
    fn new(path: PathBuf) -> Self {
        FileWatcher {
            path,
            stamp: None,
            content_hash: None,
            missing_reported: false,
            state: ClusterState::default(),
        }
    }

    fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Whether the file now holds different content (parsed into `state`).
    fn poll(&mut self) -> bool {
        let stamp = file_stamp(&self.path);
        if stamp.is_some() && stamp == self.stamp {
            return false;
        }
        if stamp.is_none() {
            if !self.missing_reported {
                warn!(
                    "source file {} cannot be read; keeping the last state",
                    self.path.display()
                );
                self.missing_reported = true;
            }
            self.stamp = None;
            return false;
        }
        self.missing_reported = false;
        self.stamp = stamp;
        match read_file(&self.path) {
            Ok((Parsed { state, skipped }, hash)) => {
                if Some(hash) == self.content_hash {
                    return false;
                }
                info!(
                    "read {}: {} services, {} endpoint slices, {} objects skipped",
                    self.path.display(),
                    state.services.len(),
                    state.endpoint_slices.len(),
                    skipped.len()
                );
                self.content_hash = Some(hash);
                self.state = state;
                true
            }
            Err(e) => {
                error!("{e}; keeping the last good state");
                false
            }
        }
    }
}

fn file_stamp(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}
