//! Builds the eBPF object (`service-ebpf`) so every build of the agent embeds
//! a fresh one. The object goes to `target/ebpf/` (its own target folder, so
//! the nested cargo never waits on the outer one's lock, and release, debug
//! and clippy builds of the agent share it).
//!
//! Needs `rust-src` and `bpf-linker`; `cargo xtask build-ebpf` (and every
//! other xtask command) installs them when missing.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().expect("workspace root").to_owned();
    let ebpf_dir = workspace.join("service-ebpf");
    let common_dir = workspace.join("service-common");
    let target_dir = workspace.join("target").join("ebpf");

    for dir in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("Cargo.toml").display()
        );
    }
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&workspace)
        .args([
            "build",
            "--package",
            "service-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(&target_dir)
        // `-Z build-std` on the stable toolchain.
        .env("RUSTC_BOOTSTRAP", "1");
    // Settings of the outer build that must not leak into the eBPF build.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        command.env_remove(var);
    }
    let status = command
        .status()
        .expect("cannot run cargo to build the eBPF object");
    if !status.success() {
        panic!(
            "building the eBPF object failed ({status}). If rust-src or bpf-linker is \
             missing, run `cargo xtask build-ebpf`, which installs them."
        );
    }
    let object = target_dir
        .join("bpfel-unknown-none")
        .join("release")
        .join("service-ebpf");
    println!("cargo:rustc-env=SERVICE_EBPF_OBJECT={}", object.display());
}
