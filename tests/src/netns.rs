//! Named network namespaces (`ip netns`), removed on drop.

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

/// A network namespace created for a test; deleted (with its devices) on drop.
pub struct NetNs {
    name: String,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A name prefix unique to this process and call, short enough for device
/// names derived from it.
pub fn unique_prefix(tag: &str) -> String {
    format!(
        "slb{}-{}{}",
        std::process::id() % 100_000,
        tag,
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

impl NetNs {
    /// Creates the namespace `name` (replacing a leftover of the same name)
    /// with its loopback up.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = NetNs {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs a command inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .with_context(|| format!("running {program} in {}", self.name))?;
        if !output.status.success() {
            bail!(
                "{program} {args:?} in {} failed: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs `f` on a thread that has entered the namespace. Sockets created
    /// there belong to the namespace for their whole life, wherever used.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let file = self.file()?;
        std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).context("entering the namespace")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
    }

    /// Spawns a thread that lives inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<std::thread::JoinHandle<T>> {
        let file = self.file()?;
        Ok(std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).expect("entering the namespace");
            f()
        }))
    }

    /// The namespace's file, `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    fn file(&self) -> anyhow::Result<File> {
        File::open(self.path()).with_context(|| format!("opening namespace {}", self.name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Makes `command` start inside the namespace whose file is `netns` (without
/// the private mount namespace `ip netns exec` would add, so bpffs pins stay
/// shared with the caller).
pub fn enter_on_spawn(netns: &Path, command: &mut Command) -> anyhow::Result<()> {
    let file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    // SAFETY: the closure only calls setns(2), which is async-signal-safe.
    unsafe {
        command
            .pre_exec(move || setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
    }
    Ok(())
}

/// Runs a command and fails with its stderr when it fails.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
