//! The kernel matrix: the datapath tests (`tests/tests/datapath*.rs`: every
//! program loaded from the real object, so each kernel's verifier must
//! accept them; attached as the agent attaches them; the BPF_PROG_TEST_RUN
//! tables) run on the kernels users run, booted in QEMU with software
//! emulation (TCG; KVM is not available on the build machines).
//!
//! Kernels and QEMU are Debian packages. A kernel package is downloaded
//! and unpacked (`apt-get download`, `dpkg -x`), never installed; what the
//! guest needs of it (the kernel image and a few modules) is kept under
//! `target/kernel-matrix/`, so a rerun downloads nothing. QEMU comes from
//! bookworm-backports (Debian 12's own QEMU would replace the machine's
//! newer `qemu-utils`), installed with its `qemu-utils`.
//!
//! The guest boots an initramfs made here: `/init` is our
//! `kernel-matrix-init` (see `tests/src/bin/kernel-matrix-init.rs`), with
//! the test binaries the host just ran (debug symbols stripped) and the
//! shared libraries they link (`ldd`), so the guest runs the very binaries
//! the host tested, without another build.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{is_root, run, toolchain};

/// A kernel of the matrix.
pub struct MatrixKernel {
    /// How reports name it.
    pub label: &'static str,
    /// Debian's meta package that depends on the current build of it (old
    /// builds vanish from the mirror; the meta package always resolves).
    meta_package: &'static str,
}

/// Debian 12's own LTS kernel, and the 6.12 that Debian 12 ships too
/// (bookworm-security). Both need the machine's Debian 12 APT sources.
pub const KERNELS: [MatrixKernel; 2] = [
    MatrixKernel {
        label: "Linux 6.1 LTS (Debian 12)",
        meta_package: "linux-image-cloud-amd64",
    },
    MatrixKernel {
        label: "Linux 6.12 (Debian 12, bookworm-security)",
        meta_package: "linux-image-6.12-cloud-amd64",
    },
];

/// Kernel modules the guest loads, in order, where the kernel does not
/// build them in: clsact and cls_bpf, for the netlink attachment of kernels
/// without tcx.
const MODULES: [&str; 2] = ["net/sched/sch_ingress.ko", "net/sched/cls_bpf.ko"];

/// Test binaries (integration test targets of `service-tests`) the guests
/// run: every one whose name starts with this.
const TEST_PREFIX: &str = "datapath";

/// Longest a guest may run before it counts as hung. On a quiet machine the
/// 6.1 guest (TCG, no KVM) runs the whole set in well under 15 minutes;
/// TCG is CPU-bound, so on a machine whose two cores are busy with builds
/// it took three times as long and hit a 15-minute limit. The object did
/// not grow to cause it: the verifier processes about 0.5M instructions for
/// all programs together, within 3% of what it did before the socket-LB
/// and clock changes (`from_network` alone 223k). The margin is for load.
const GUEST_TIMEOUT: Duration = Duration::from_secs(35 * 60);

/// Prefix of the guest init's own lines (`kernel-matrix-init`).
const MARKER: &str = "kernel-matrix:";

/// What one kernel's guest reported.
pub struct GuestRun {
    /// The kernel's release (`uname -r` in the guest) or package.
    pub release: String,
    /// From starting QEMU to the init's first line.
    pub boot: Duration,
    /// From there to the guest's last line.
    pub tests: Duration,
    /// The guest's console output (the test binaries' output included).
    pub output: String,
    /// Why the guest did not run to its end, if it did not.
    pub problem: Option<String>,
}

/// What every guest needs, made once per run.
pub struct GuestFiles {
    /// `(path in the initramfs, file on the host)`: init, test binaries,
    /// shared libraries.
    files: Vec<(String, PathBuf)>,
    /// Where the matrix keeps its downloads and initramfs images.
    cache: PathBuf,
}

/// Installs QEMU when missing, and gathers the guest's files: the init
/// and the datapath test binaries of `target` (built by the caller)
/// stripped of debug symbols, and the shared libraries they link.
pub fn prepare(root: &Path, target: &Path) -> anyhow::Result<GuestFiles> {
    ensure_qemu()?;
    toolchain::ensure_debian_packages(&[("strip", "binutils"), ("xz", "xz-utils")])?;
    let cache = target.join("kernel-matrix");
    let stage = cache.join("stage");
    std::fs::create_dir_all(&stage).with_context(|| format!("creating {}", stage.display()))?;
    let mut binaries = vec![("init".to_owned(), target.join("debug/kernel-matrix-init"))];
    for (name, path) in datapath_test_binaries(root)? {
        binaries.push((format!("tests/{name}"), path));
    }
    let mut files = Vec::new();
    let mut libraries = Vec::new();
    for (guest_path, host_path) in binaries {
        for library in shared_libraries(&host_path)? {
            if !libraries.contains(&library) {
                libraries.push(library);
            }
        }
        let stripped = stage.join(guest_path.replace('/', "-"));
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(&host_path))?;
        files.push((guest_path, stripped));
    }
    for library in libraries {
        let guest_path = library
            .to_str()
            .context("library path is not UTF-8")?
            .trim_start_matches('/')
            .to_owned();
        files.push((guest_path, library));
    }
    Ok(GuestFiles { files, cache })
}

/// Boots `kernel` with the guest files and returns what its guest reported.
/// Fails only when the guest cannot be started at all.
pub fn boot(kernel: &MatrixKernel, guest: &GuestFiles) -> anyhow::Result<GuestRun> {
    let image = fetch_kernel(kernel, &guest.cache)
        .with_context(|| format!("getting the {} kernel", kernel.label))?;
    let initramfs = guest.cache.join(format!("{}.cpio", image.package));
    write_initramfs(&initramfs, &guest.files, &image.modules)?;
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "1024",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(&image.vmlinuz)
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let (lines, received) = mpsc::channel();
    let stdout = qemu.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut run = GuestRun {
        release: image.package.clone(),
        boot: Duration::ZERO,
        tests: Duration::ZERO,
        output: String::new(),
        problem: None,
    };
    let mut booted = None;
    let mut finished = false;
    loop {
        let left = GUEST_TIMEOUT.saturating_sub(started.elapsed());
        let (at, line) = match received.recv_timeout(left) {
            Ok(received) => received,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = qemu.kill();
                run.problem = Some(format!("no end after {GUEST_TIMEOUT:?}: killed"));
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        // The serial console ends lines with CR LF.
        let line = line.trim_end_matches('\r');
        println!("[{}] {line}", kernel.label);
        run.output.push_str(line);
        run.output.push('\n');
        // (The firmware's terminal codes may precede the init's first line.)
        let Some(event) = line
            .find(MARKER)
            .map(|start| line[start + MARKER.len()..].trim())
        else {
            continue;
        };
        if let Some(release) = event.strip_prefix("booted ") {
            run.release = release.to_owned();
            run.boot = at - started;
            booted = Some(at);
        } else if event == "done" {
            finished = true;
            run.tests = at - booted.unwrap_or(started);
        } else if let Some(error) = event.strip_prefix("error ") {
            run.problem = Some(format!("the guest's init failed: {error}"));
        }
    }
    let status = qemu.wait().context("waiting for qemu")?;
    let _ = reader.join();
    if !finished && run.problem.is_none() {
        let mut stderr = String::new();
        if let Some(mut pipe) = qemu.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        run.problem = Some(format!(
            "the guest stopped before its end (qemu {status}){}",
            if stderr.is_empty() {
                String::new()
            } else {
                format!(": {}", stderr.trim())
            }
        ));
    }
    Ok(run)
}

/// Installs QEMU from bookworm-backports (adding that suite to APT's
/// sources if no source names it), with the `qemu-utils` of the same
/// release, when `qemu-system-x86_64` is missing.
fn ensure_qemu() -> anyhow::Result<()> {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    if !is_root() {
        bail!("qemu-system-x86_64 is missing, and installing it needs root");
    }
    let policy = Command::new("apt-cache")
        .arg("policy")
        .output()
        .context("running apt-cache policy")?;
    if !String::from_utf8_lossy(&policy.stdout).contains("bookworm-backports") {
        let sources = Path::new("/etc/apt/sources.list.d/bookworm-backports.sources");
        println!(
            "== adding bookworm-backports to APT's sources ({})",
            sources.display()
        );
        std::fs::write(
            sources,
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )
        .with_context(|| format!("writing {}", sources.display()))?;
    }
    println!("== installing qemu-system-x86 and qemu-utils from bookworm-backports");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "-t",
            "bookworm-backports",
            "qemu-system-x86",
            "qemu-utils",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// A kernel ready to boot, kept in the matrix cache.
struct KernelImage {
    /// The versioned package it came from.
    package: String,
    /// The kernel image.
    vmlinuz: PathBuf,
    /// The modules of [`MODULES`] it does not build in, decompressed, in
    /// loading order.
    modules: Vec<PathBuf>,
}

/// Resolves the kernel's meta package to its current build, and downloads
/// and unpacks that build unless the cache has it.
fn fetch_kernel(kernel: &MatrixKernel, cache: &Path) -> anyhow::Result<KernelImage> {
    let package = current_build(kernel.meta_package)?;
    let dir = cache.join(&package);
    let complete = dir.join(".complete");
    if !complete.exists() {
        println!("== downloading {package} ({})", kernel.label);
        let _ = std::fs::remove_dir_all(&dir);
        // One download folder per kernel: the kernels are fetched side by
        // side, and each clears its own folder first.
        let download = cache.join(format!("download-{package}"));
        let _ = std::fs::remove_dir_all(&download);
        std::fs::create_dir_all(&download)?;
        let mut apt = Command::new("apt-get");
        apt.current_dir(&download).args(["download", "-q"]);
        if is_root() {
            // The download folder is not _apt's: download as root.
            apt.args(["-o", "APT::Sandbox::User=root"]);
        }
        run(apt.arg(&package))?;
        let deb = std::fs::read_dir(&download)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        let unpacked = download.join("unpacked");
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
        std::fs::create_dir_all(dir.join("modules"))?;
        let vmlinuz = std::fs::read_dir(unpacked.join("boot"))?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| {
                path.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .context("the package holds no boot/vmlinuz-*")?;
        std::fs::copy(&vmlinuz, dir.join("vmlinuz"))?;
        let modules_root = std::fs::read_dir(unpacked.join("lib/modules"))?
            .filter_map(Result::ok)
            .map(|entry| entry.path().join("kernel"))
            .next()
            .context("the package holds no lib/modules/*")?;
        for (index, module) in MODULES.iter().enumerate() {
            let plain = modules_root.join(module);
            let compressed = modules_root.join(format!("{module}.xz"));
            let name = format!("{index}-{}", file_name(Path::new(module)));
            let kept = dir.join("modules").join(name);
            if plain.exists() {
                std::fs::copy(&plain, &kept)?;
            } else if compressed.exists() {
                let output = Command::new("xz")
                    .arg("-dc")
                    .arg(&compressed)
                    .output()
                    .context("running xz")?;
                if !output.status.success() {
                    bail!("xz -dc {} failed", compressed.display());
                }
                std::fs::write(&kept, output.stdout)?;
            }
            // Neither: built into this kernel.
        }
        std::fs::remove_dir_all(&download)?;
        std::fs::write(&complete, "")?;
    }
    let mut modules: Vec<PathBuf> = std::fs::read_dir(dir.join("modules"))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    modules.sort();
    Ok(KernelImage {
        package,
        vmlinuz: dir.join("vmlinuz"),
        modules,
    })
}

/// The package a meta package currently depends on, e.g.
/// `linux-image-6.1.0-57-cloud-amd64` for `linux-image-cloud-amd64`.
fn current_build(meta_package: &str) -> anyhow::Result<String> {
    let show = || {
        Command::new("apt-cache")
            .args(["show", "--no-all-versions", meta_package])
            .output()
    };
    let mut output = show().context("running apt-cache show")?;
    if !output.status.success() && is_root() {
        // A fresh machine may have no package lists yet.
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        output = show().context("running apt-cache show")?;
    }
    if !output.status.success() {
        bail!(
            "apt-cache show {meta_package} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("Depends:"))
        .and_then(|depends| depends.split([',', ' ']).find(|word| !word.is_empty()))
        .map(str::to_owned)
        .with_context(|| format!("{meta_package} names no kernel package"))
}

/// The test binaries of the datapath tests, built if needed, as `(target
/// name, executable)`.
fn datapath_test_binaries(root: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let output = Command::new(crate::cargo_bin())
        .current_dir(root)
        .args([
            "test",
            "--package",
            "service-tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !output.status.success() {
        bail!("building the test binaries failed");
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let target = &message["target"];
        let is_test = target["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "test"));
        let (Some(name), Some(executable)) =
            (target["name"].as_str(), message["executable"].as_str())
        else {
            continue;
        };
        if is_test && name.starts_with(TEST_PREFIX) {
            binaries.push((name.to_owned(), PathBuf::from(executable)));
        }
    }
    if binaries.is_empty() {
        bail!("no {TEST_PREFIX}* test binary found");
    }
    binaries.sort();
    Ok(binaries)
}

/// The shared libraries `binary` loads (its ELF interpreter included), as
/// `ldd` resolves them on this machine.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    if !output.status.success() {
        bail!("ldd {} failed", binary.display());
    }
    // Lines are `name => /path (address)`, `/path (address)` for the
    // interpreter, and `linux-vdso.so.1 (address)`, which is no file.
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Writes the guest's initramfs (an uncompressed newc cpio archive, which
/// every kernel accepts): the guest files, the kernel's modules under
/// `/modules`, the folders the init mounts on, and `/dev/console`.
fn write_initramfs(
    out: &Path,
    files: &[(String, PathBuf)],
    modules: &[PathBuf],
) -> anyhow::Result<()> {
    let mut contents: Vec<(String, PathBuf)> = files.to_vec();
    for module in modules {
        contents.push((format!("modules/{}", file_name(module)), module.clone()));
    }
    let mut dirs: Vec<String> = ["dev", "proc", "sys", "tmp", "run", "modules", "tests"]
        .map(str::to_owned)
        .to_vec();
    for (guest_path, _) in &contents {
        for dir in Path::new(guest_path).ancestors().skip(1) {
            let dir = dir.to_string_lossy().into_owned();
            if !dir.is_empty() && !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs.sort_by_key(|d| d.matches('/').count());
    let mut archive = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
    );
    let mut ino = 1;
    let mut entry = |name: &str, mode: u32| {
        ino += 1;
        cpio::newc::Builder::new(name).ino(ino).mode(mode).nlink(1)
    };
    for dir in &dirs {
        entry(dir, 0o040_755).write(&mut archive, 0).finish()?;
    }
    // The console, so the init starts with stdin, stdout and stderr.
    entry("dev/console", 0o020_600)
        .rdev_major(5)
        .rdev_minor(1)
        .write(&mut archive, 0)
        .finish()?;
    for (guest_path, host_path) in &contents {
        let data =
            std::fs::read(host_path).with_context(|| format!("reading {}", host_path.display()))?;
        let mut writer = entry(guest_path, 0o100_755).write(&mut archive, data.len() as u32);
        std::io::Write::write_all(&mut writer, &data)?;
        writer.finish()?;
    }
    cpio::newc::trailer(&mut archive)?;
    std::io::Write::flush(&mut archive)?;
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
