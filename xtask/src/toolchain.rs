//! Installing what building and testing need, when it is missing: the
//! `rust-src` component (for `-Z build-std=core`), `bpf-linker` built against
//! the toolchain's own LLVM, and Debian packages for the tests.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run;

/// cargo-deny release `cargo xtask lint` installs: the newest that builds on
/// the installed Rust (1.95; it needs 1.88).
pub const CARGO_DENY_VERSION: &str = "0.20.2";

/// bpf-linker release known to build here (with `--features llvm-22`).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Makes sure rust-src and bpf-linker are installed.
pub fn ensure_ebpf_toolchain() -> anyhow::Result<()> {
    let sysroot = rustc_sysroot()?;
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        println!("== installing rust-src (needed for -Z build-std=core)");
        run(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    if !bpf_linker_works() {
        install_bpf_linker(&sysroot)?;
    }
    Ok(())
}

fn rustc_sysroot() -> anyhow::Result<PathBuf> {
    let output = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc --print sysroot")?;
    if !output.status.success() {
        bail!("rustc --print sysroot failed");
    }
    Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        })
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        || Command::new(cargo_home().join("bin/bpf-linker"))
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// Builds bpf-linker against the libLLVM that ships with rustc: a prefix
/// folder whose `lib/` links to it stands in for an LLVM installation. The
/// binary finds the library through its rpath, so the prefix stays.
fn install_bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    println!("== installing bpf-linker {BPF_LINKER_VERSION} against rustc's LLVM (about a minute)");
    let libdir = sysroot.join("lib");
    let llvm = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", libdir.display()))?;
    let prefix = cargo_home().join("bpf-linker-llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let file_name = llvm.file_name().expect("file name").to_owned();
    for link in [prefix_lib.join("libLLVM.so"), prefix_lib.join(&file_name)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new(crate::cargo_bin())
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", &prefix))
}

/// Installs cargo-deny ([`CARGO_DENY_VERSION`], from crates.io, with its
/// locked dependencies) when that version is missing.
pub fn ensure_cargo_deny() -> anyhow::Result<()> {
    let installed = Command::new(crate::cargo_bin())
        .args(["deny", "--version"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).trim() == format!("cargo-deny {CARGO_DENY_VERSION}")
        });
    if installed {
        return Ok(());
    }
    println!("== installing cargo-deny {CARGO_DENY_VERSION} (a few minutes)");
    run(Command::new(crate::cargo_bin()).args([
        "install",
        "--locked",
        &format!("cargo-deny@{CARGO_DENY_VERSION}"),
    ]))
}

/// Installs the Debian package of each `(command, package)` whose command
/// is missing.
pub fn ensure_debian_packages(needed: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(command, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {command} || test -x /usr/sbin/{command} || test -x /sbin/{command}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("== installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
