//! `/init` of the kernel-matrix guests: `cargo xtask test` boots Debian's
//! kernels in QEMU with an initramfs holding this program, the kernel
//! modules the datapath needs (`/modules`), and the datapath test binaries
//! (`/tests`) with their shared libraries. It mounts what the tests need,
//! loads the modules, runs every test binary one test at a time, and powers
//! the machine off. xtask reads the lines starting with [`MARKER`].

use std::{
    fs::File,
    os::fd::AsFd as _,
    path::Path,
    process::{Command, ExitStatus},
};

use anyhow::Context as _;
use nix::{
    mount::{MsFlags, mount},
    sys::reboot::{RebootMode, reboot},
};

/// Prefix of the lines xtask reads: `booted RELEASE`, `module NAME`,
/// `finished BINARY STATUS`, `done`.
const MARKER: &str = "kernel-matrix:";

fn main() {
    if let Err(error) = run() {
        println!("{MARKER} error {error:#}");
    }
    // Powering off makes QEMU exit; returning from PID 1 would panic the
    // kernel instead.
    nix::unistd::sync();
    let _ = reboot(RebootMode::RB_POWER_OFF);
}

fn run() -> anyhow::Result<()> {
    mount_filesystems()?;
    let release = nix::sys::utsname::uname()?
        .release()
        .to_string_lossy()
        .into_owned();
    println!("{MARKER} booted {release}");
    for module in sorted_entries(Path::new("/modules"))? {
        let file = File::open(&module).with_context(|| format!("opening {}", module.display()))?;
        nix::kmod::finit_module(file.as_fd(), c"", nix::kmod::ModuleInitFlags::empty())
            .with_context(|| format!("loading module {}", module.display()))?;
        println!("{MARKER} module {}", file_name(&module));
    }
    for binary in sorted_entries(Path::new("/tests"))? {
        let status: ExitStatus = Command::new(&binary)
            // What each test printed goes to the log too (which attach
            // mechanism the kernel got, for one).
            .args(["--test-threads=1", "--show-output"])
            .env("PATH", "/bin")
            .env("RUST_BACKTRACE", "1")
            .status()
            .with_context(|| format!("running {}", binary.display()))?;
        println!("{MARKER} finished {} {status}", file_name(&binary));
    }
    println!("{MARKER} done");
    Ok(())
}

/// The kernel starts `/init` on the initramfs with nothing mounted, and
/// with the console as stdin, stdout and stderr.
fn mount_filesystems() -> anyhow::Result<()> {
    let mounts: [(&str, &str, &str); 6] = [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("bpf", "/sys/fs/bpf", "bpf"),
        ("tmpfs", "/tmp", "tmpfs"),
        ("tmpfs", "/run", "tmpfs"),
    ];
    for (source, target, fstype) in mounts {
        std::fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
        mount(
            Some(source),
            target,
            Some(fstype),
            MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting {fstype} on {target}"))?;
    }
    Ok(())
}

/// The entries of `dir`, sorted by name (none when it does not exist).
fn sorted_entries(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut paths = entries
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    paths.sort();
    Ok(paths)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
