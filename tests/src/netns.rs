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

/// Runs `f` on a thread in a network namespace of its own, unshared and
/// unnamed, holding only its loopback device (brought up); the namespace
/// goes away with the thread. Needs no `ip` command, so it also works in
/// the kernel-matrix guests, which have none.
pub fn in_private_namespace<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    std::thread::spawn(move || -> anyhow::Result<T> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).context("unsharing the network namespace")?;
        set_up("lo")?;
        Ok(f())
    })
    .join()
    .map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        anyhow::anyhow!("thread in the private namespace panicked: {message}")
    })?
}

/// Brings `device` of the calling thread's network namespace up
/// (`SIOCSIFFLAGS` with `IFF_UP`, what `ip link set DEV up` does).
fn set_up(device: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("opening a socket for interface ioctls")?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if device.len() >= request.ifr_name.len() {
        bail!("device name {device} too long");
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(device.bytes()) {
        *slot = byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write the ifreq we own.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(std::io::Error::last_os_error()).context("SIOCGIFFLAGS");
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("bringing {device} up"));
        }
    }
    Ok(())
}
