//! bpffs pin folders for tests, removed (with every pin in them) on drop.

use std::path::{Path, PathBuf};

/// A pin folder under `/sys/fs/bpf/service-lb-test/`.
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// Creates a fresh pin folder named after `tag` and this process.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let path = PathBuf::from("/sys/fs/bpf/service-lb-test")
            .join(format!("{tag}-{}", crate::netns::unique_prefix("p")));
        let _ = std::fs::remove_dir_all(&path);
        service_agent::datapath::bpffs::ensure_pin_dir(&path)?;
        Ok(PinDir { path })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        service_agent::ops::status::remove(&self.path);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
