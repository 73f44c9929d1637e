//! `cargo xtask`: the project's build, test and demo entry points. Each
//! command first installs what a fresh machine lacks (rust-src, bpf-linker,
//! Debian packages), so the README's commands are all a new machine needs.

mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// Build, test and demo tasks of the workspace.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install rust-src and bpf-linker if missing, then build the eBPF object
    /// (through service-agent's build script, like every agent build).
    BuildEbpf,
    /// Run every test: unit tests, then the privileged datapath and
    /// end-to-end tests (as root, one at a time).
    Test,
    /// Run the demo: namespaces as node and pods, the agent on
    /// examples/demo-services.yaml, real traffic to a ClusterIP.
    Demo,
    /// cargo fmt --check and clippy -D warnings (host crates and the eBPF crate).
    Lint,
    /// Benchmark our datapath and control plane against the pass-only floor
    /// and kube-proxy's iptables and nftables modes; writes
    /// target/bench/results.json, results.md and SVG plots (as root).
    Bench {
        /// Fewer sizes and shorter runs (under three minutes).
        #[arg(long)]
        quick: bool,
        /// Run only this group (repeatable): `datapath`, `traffic` or
        /// `control-plane`.
        #[arg(long, value_name = "GROUP")]
        only: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::BuildEbpf => {
            toolchain::ensure_ebpf_toolchain()?;
            cargo(&root, &["build", "--package", "service-agent", "--lib"])?;
            println!(
                "eBPF object: {}",
                root.join("target/ebpf/bpfel-unknown-none/release/service-ebpf")
                    .display()
            );
        }
        Task::Test => {
            prepare_namespaced_run(&root)?;
            let mut totals = TestTotals::default();
            println!("== unit tests, Kubernetes API tests (scripted responses), manifest checks");
            totals.add(&cargo_test(
                &root,
                &[
                    "test",
                    "--workspace",
                    "--exclude",
                    "service-ebpf",
                    "--exclude",
                    "service-tests",
                ],
            )?);
            println!(
                "== privileged tests (datapath through BPF_PROG_TEST_RUN, end to end in namespaces)"
            );
            if !is_root() {
                println!("warning: not root: the privileged tests will report themselves skipped");
            }
            totals.add(&cargo_test(
                &root,
                &[
                    "test",
                    "--package",
                    "service-tests",
                    "--",
                    "--test-threads=1",
                ],
            )?);
            println!(
                "tests: {} passed, {} failed, {} skipped",
                totals.passed, totals.failed, totals.ignored
            );
        }
        Task::Demo => {
            prepare_namespaced_run(&root)?;
            if !is_root() {
                bail!("the demo needs root (network namespaces, BPF): run it with sudo");
            }
            let status = Command::new(root.join("target/debug/demo"))
                .env("SERVICE_AGENT_BIN", root.join("target/debug/service-agent"))
                .status()
                .context("running the demo")?;
            if !status.success() {
                bail!("the demo failed ({status})");
            }
        }
        Task::Bench { quick, only } => {
            toolchain::ensure_ebpf_toolchain()?;
            toolchain::ensure_debian_packages(&[
                ("ip", "iproute2"),
                ("sysctl", "procps"),
                ("iptables-restore", "iptables"),
                ("nft", "nftables"),
            ])?;
            cargo(
                &root,
                &[
                    "build",
                    "--release",
                    "--package",
                    "service-agent",
                    "--package",
                    "service-tests",
                    "--bins",
                ],
            )?;
            if !is_root() {
                bail!(
                    "the bench needs root (network namespaces, BPF, netfilter): run it with sudo"
                );
            }
            let out = root.join("target/bench");
            let mut bench = Command::new(root.join("target/release/bench"));
            bench.arg("--out").arg(&out).env(
                "SERVICE_AGENT_BIN",
                root.join("target/release/service-agent"),
            );
            if quick {
                bench.arg("--quick");
            }
            for group in &only {
                bench.args(["--only", group]);
            }
            run(&mut bench).context("running the bench")?;
        }
        Task::Lint => {
            toolchain::ensure_ebpf_toolchain()?;
            cargo(&root, &["fmt", "--all", "--check"])?;
            cargo(
                &root,
                &[
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "service-ebpf",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
            )?;
            let mut ebpf = Command::new(cargo_bin());
            ebpf.current_dir(&root)
                .args([
                    "clippy",
                    "--package",
                    "service-ebpf",
                    "--release",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--target-dir",
                    "target/ebpf",
                    "--",
                    "-D",
                    "warnings",
                ])
                .env("RUSTC_BOOTSTRAP", "1");
            run(&mut ebpf)?;
        }
    }
    Ok(())
}

/// Commands the tests and the demo need, with the Debian package of each.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("sysctl", "procps"),
    ("ethtool", "ethtool"),
];

/// What the tests and the demo need first: the eBPF toolchain, the
/// Debian packages, and the agent and harness binaries (debug build).
fn prepare_namespaced_run(root: &Path) -> anyhow::Result<()> {
    toolchain::ensure_ebpf_toolchain()?;
    toolchain::ensure_debian_packages(TEST_PACKAGES)?;
    cargo(
        root,
        &[
            "build",
            "--package",
            "service-agent",
            "--package",
            "service-tests",
            "--bins",
        ],
    )
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Runs `cargo ARGS` in the workspace.
fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    run(Command::new(cargo_bin()).current_dir(root).args(args))
}

/// Counts summed over `cargo test` runs.
#[derive(Debug, Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestTotals {
    /// Adds the counts of every `test result:` line in `output`.
    fn add(&mut self, output: &str) {
        for line in output.lines().filter(|l| l.starts_with("test result:")) {
            let count = |word: &str| -> u64 {
                line.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)?
                            .split_whitespace()
                            .last()?
                            .parse()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            self.passed += count(" passed");
            self.failed += count(" failed");
            self.ignored += count(" ignored");
        }
    }
}

/// Runs `cargo test ARGS` (with `SERVICE_AGENT_BIN` pointing at the debug
/// agent), echoing its output, and returns that output; fails when it fails.
fn cargo_test(root: &Path, args: &[&str]) -> anyhow::Result<String> {
    use std::io::{BufRead as _, Write as _};
    let mut child = Command::new(cargo_bin())
        .current_dir(root)
        .args(args)
        .env("SERVICE_AGENT_BIN", root.join("target/debug/service-agent"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let mut output = String::new();
    let stdout = child.stdout.take().expect("piped stdout");
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        std::io::stdout().flush()?;
        output.push_str(&line);
        output.push('\n');
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(output)
}

/// Runs a command, failing when it fails.
pub(crate) fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}
