//! Making sure the pin folder lives on a BPF filesystem.

use std::path::{Path, PathBuf};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use crate::error::{Context as _, IoContext as _};

/// Whether `path` is on a BPF filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
}

/// Creates `pin_path` on a BPF filesystem. When its nearest existing
/// ancestor is not on one, mounts bpffs first: on `/sys/fs/bpf` when the
/// path is below it (as on a fresh boot of these machines), else on
/// `pin_path` itself.
pub fn ensure_pin_dir(pin_path: &Path) -> crate::Result<()> {
    let existing = nearest_existing(pin_path);
    if !is_bpffs(&existing) {
        let sys_fs_bpf = Path::new("/sys/fs/bpf");
        let mount_point = if pin_path.starts_with(sys_fs_bpf) {
            sys_fs_bpf
        } else {
            pin_path
        };
        std::fs::create_dir_all(mount_point).on_path("creating", mount_point)?;
        mount(
            Some("bpf"),
            mount_point,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting bpffs on {}", mount_point.display()))?;
        log::info!("mounted bpffs on {}", mount_point.display());
    }
    std::fs::create_dir_all(pin_path).on_path("creating pin folder", pin_path)
}

fn nearest_existing(path: &Path) -> PathBuf {
    let mut current = path.to_path_buf();
    while !current.exists() {
        if !current.pop() {
            return PathBuf::from("/");
        }
    }
    current
}
