//! A cgroup v2 made for one test, so socket-LB can be attached to it (and
//! only to it: never to the machine's root cgroup, which would change every
//! process on the machine, other tests included), with a way to start a
//! process inside it. Removed on drop, after its processes are moved back
//! to its parent.

use std::{
    io::Write as _,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// A cgroup v2 folder created for a test; removed on drop.
pub struct TestCgroup {
    path: PathBuf,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on a host with the hybrid layout.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let root = service_agent::datapath::cgroup::unified(Path::new("/sys/fs/cgroup"));
    if !service_agent::datapath::cgroup::is_cgroup2(&root) {
        bail!("no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified");
    }
    Ok(root)
}

impl TestCgroup {
    /// Creates `service-lb-test-PID-N` under the cgroup v2 root.
    pub fn create() -> anyhow::Result<Self> {
        let path = cgroup2_root()?.join(format!(
            "service-lb-test-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        ));
        if path.exists() {
            remove(&path);
        }
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    /// The cgroup's folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `command` start inside this cgroup: the child writes itself
    /// (`0`) to `cgroup.procs` before it runs anything, so every socket it
    /// creates belongs to the cgroup.
    pub fn join_on_spawn(&self, command: &mut Command) -> anyhow::Result<()> {
        let procs = self.path.join("cgroup.procs");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .with_context(|| format!("opening {}", procs.display()))?;
        // SAFETY: the closure only calls write(2), which is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                // SAFETY: a valid fd and a 1-byte buffer.
                let written = libc::write(file.as_raw_fd(), b"0".as_ptr().cast(), 1);
                if written == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        Ok(())
    }

    /// The processes in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        pids(&self.path)
    }
}

fn pids(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Moves every process of the cgroup at `path` to its parent, then removes
/// it (retrying while the kernel finishes releasing it).
fn remove(path: &Path) {
    let parent_procs = path
        .parent()
        .map(|p| p.join("cgroup.procs"))
        .unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for pid in pids(path) {
            if let Ok(mut file) = std::fs::OpenOptions::new().write(true).open(&parent_procs) {
                let _ = file.write_all(pid.to_string().as_bytes());
            }
        }
        if std::fs::remove_dir(path).is_ok() || !path.exists() || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove(&self.path);
    }
}

/// `BPF_CGROUP_INET4_CONNECT`: the `connect4` hook.
pub const ATTACH_CONNECT4: u32 = 10;
/// `BPF_CGROUP_UDP4_SENDMSG`: the `sendmsg4` hook.
pub const ATTACH_SENDMSG4: u32 = 14;
/// `BPF_CGROUP_UDP4_RECVMSG`: the `recvmsg4` hook.
pub const ATTACH_RECVMSG4: u32 = 19;
/// `BPF_CGROUP_INET4_GETPEERNAME`: the `getpeername4` hook.
pub const ATTACH_GETPEERNAME4: u32 = 29;
/// `BPF_CGROUP_INET6_CONNECT`: the `connect6` hook.
pub const ATTACH_CONNECT6: u32 = 11;
/// `BPF_CGROUP_UDP6_SENDMSG`: the `sendmsg6` hook.
pub const ATTACH_SENDMSG6: u32 = 15;
/// `BPF_CGROUP_UDP6_RECVMSG`: the `recvmsg6` hook.
pub const ATTACH_RECVMSG6: u32 = 20;
/// `BPF_CGROUP_INET6_GETPEERNAME`: the `getpeername6` hook.
pub const ATTACH_GETPEERNAME6: u32 = 30;
/// The eight socket-LB hooks, four per address family.
pub const SOCKET_LB_HOOKS: [u32; 8] = [
    ATTACH_CONNECT4,
    ATTACH_SENDMSG4,
    ATTACH_RECVMSG4,
    ATTACH_GETPEERNAME4,
    ATTACH_CONNECT6,
    ATTACH_SENDMSG6,
    ATTACH_RECVMSG6,
    ATTACH_GETPEERNAME6,
];

impl TestCgroup {
    /// The ids of the programs attached to this cgroup itself (not
    /// inherited) on hook `attach_type` (`BPF_PROG_QUERY`).
    pub fn attached_programs(&self, attach_type: u32) -> anyhow::Result<Vec<u32>> {
        attached_programs(&self.path, attach_type)
    }
}

/// The ids of the programs attached to the cgroup at `path` itself on hook
/// `attach_type` (`BPF_PROG_QUERY`).
pub fn attached_programs(path: &Path, attach_type: u32) -> anyhow::Result<Vec<u32>> {
    /// The head of `bpf_attr` for `BPF_PROG_QUERY`.
    #[repr(C)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    let dir = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_type,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
    };
    // SAFETY: a valid `bpf_attr` prefix of the size passed, pointing at a
    // buffer of `prog_cnt` ids.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_PROG_QUERY");
    }
    Ok(ids[..(attr.prog_cnt as usize).min(ids.len())].to_vec())
}
