//! `cargo xtask`: the project's build, test and demo entry points. Each
//! command first installs what a fresh machine lacks (rust-src, bpf-linker,
//! Debian packages), so the README's commands are all a new machine needs.

mod kernel_matrix;
mod lint;
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
    /// end-to-end tests (as root, one at a time), the packet fuzzer, and
    /// the kernel matrix.
    Test {
        /// Fuzz 50,000 packets instead of 1,000,000 (CI runs the full size).
        #[arg(long)]
        quick: bool,
    },
    /// Run only the kernel matrix: the datapath tests on Debian's 6.1 LTS
    /// and 6.12 kernels in QEMU (part of `test`).
    KernelMatrix,
    /// Run the demo: namespaces as node and pods, the agent on
    /// examples/demo-services.yaml, real traffic to both ClusterIPs of a
    /// dual-stack Service.
    Demo,
    /// cargo fmt --check, clippy -D warnings (host crates and the eBPF
    /// crate), cargo-deny (deny.toml) and shellcheck on the shell scripts.
    Lint,
    /// Benchmark our datapath and control plane against the pass-only floor
    /// and kube-proxy's iptables and nftables modes, and the conntrack
    /// collector on a 1M-entry map; writes
    /// target/bench/results.json, results.md and SVG plots (as root).
    Bench {
        /// Fewer sizes and shorter runs (under three minutes).
        #[arg(long)]
        quick: bool,
        /// Run only this group (repeatable): `datapath`, `traffic`,
        /// `control-plane` or `conntrack`.
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
        Task::Test { quick } => {
            prepare_namespaced_run(&root)?;
            let mut totals = TestTotals::default();
            println!("== unit tests, Kubernetes API tests (scripted responses), manifest checks");
            totals.add(cargo_test(
                &root,
                &[
                    "--workspace",
                    "--exclude",
                    "service-ebpf",
                    "--exclude",
                    "service-tests",
                ],
                &[],
            )?);
            println!(
                "== privileged tests (datapath through BPF_PROG_TEST_RUN, end to end in namespaces)"
            );
            if !is_root() {
                println!("warning: not root: the privileged tests will report themselves skipped");
            }
            if quick {
                // SAFETY: set before any other thread of this process runs.
                unsafe { std::env::set_var(FUZZ_PACKETS_ENV, QUICK_FUZZ_PACKETS) };
            }
            totals.add(cargo_test(
                &root,
                &["--package", "service-tests"],
                &["--test-threads=1"],
            )?);
            println!("== kernel matrix (the datapath tests on other kernels, in QEMU)");
            totals.add_kernel_matrix(&root)?;
            totals.finish()?;
        }
        Task::KernelMatrix => {
            prepare_namespaced_run(&root)?;
            let mut totals = TestTotals::default();
            totals.add_kernel_matrix(&root)?;
            totals.finish()?;
        }
        Task::Demo => {
            prepare_namespaced_run(&root)?;
            if !is_root() {
                bail!("the demo needs root (network namespaces, BPF): run it with sudo");
            }
            let status = Command::new(target_dir(&root).join("debug/demo"))
                .env(
                    "SERVICE_AGENT_BIN",
                    target_dir(&root).join("debug/service-agent"),
                )
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
            let out = target_dir(&root).join("bench");
            let mut bench = Command::new(target_dir(&root).join("release/bench"));
            bench.arg("--out").arg(&out).env(
                "SERVICE_AGENT_BIN",
                target_dir(&root).join("release/service-agent"),
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
            let advisories = lint::cargo_deny(&root)?;
            let scripts = lint::shellcheck(&root)?;
            println!(
                "lint: fmt ok, clippy ok, cargo-deny bans, licenses and sources ok, {advisories}; \
                 shellcheck ok ({scripts} scripts)"
            );
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

/// Cargo's target folder: `CARGO_TARGET_DIR` when set, else `target/`.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

pub(crate) fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Runs `cargo ARGS` in the workspace.
fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    run(Command::new(cargo_bin()).current_dir(root).args(args))
}

/// How many packets the fuzzer (tests/tests/fuzz.rs) generates.
const FUZZ_PACKETS_ENV: &str = "SERVICE_TESTS_FUZZ_PACKETS";
/// The fuzzer's size in `cargo xtask test --quick`.
const QUICK_FUZZ_PACKETS: &str = "50000";

/// Where privileged tests record that they skipped themselves (see
/// `service_tests::SKIP_LOG_ENV`).
const SKIP_LOG_ENV: &str = "SERVICE_TESTS_SKIP_LOG";

/// What one `cargo test` run reported.
#[derive(Debug, Default)]
struct TestRun {
    /// Tests that passed, skipped ones not included.
    passed: u64,
    /// Tests that failed (also when their binary crashed).
    failed: u64,
    /// Tests `#[ignore]`d, and privileged tests that skipped themselves.
    skipped: u64,
    /// Names of the privileged tests that skipped themselves.
    skipped_privileged: Vec<String>,
    /// Whether cargo itself failed for another reason than a failed test
    /// (a build error, a crashed test binary).
    broken: bool,
}

impl TestRun {
    /// Counts the `test result:` lines of libtest's `output`.
    fn parse(output: &str) -> Self {
        let mut run = TestRun::default();
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
            run.passed += count(" passed");
            run.failed += count(" failed");
            run.skipped += count(" ignored");
        }
        run
    }
}

/// Counts summed over the `cargo test` runs of `cargo xtask test`.
#[derive(Debug, Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    skipped: u64,
    skipped_privileged: Vec<String>,
    broken: bool,
}

impl TestTotals {
    fn add(&mut self, run: TestRun) {
        self.passed += run.passed;
        self.failed += run.failed;
        self.skipped += run.skipped;
        self.skipped_privileged.extend(run.skipped_privileged);
        self.broken |= run.broken;
    }

    /// Runs the datapath tests on every kernel of the matrix and adds what
    /// each reported; a kernel whose guest did not run to its end counts as
    /// a failure named after it.
    fn add_kernel_matrix(&mut self, root: &Path) -> anyhow::Result<()> {
        let guest = match kernel_matrix::prepare(root, &target_dir(root)) {
            Ok(guest) => guest,
            // Installing QEMU needs root: without it the matrix is skipped
            // (counted so; under CI, which is root, this never happens).
            Err(e) if !is_root() => {
                println!("skipped: the kernel matrix cannot run: {e:#}");
                for kernel in &kernel_matrix::KERNELS {
                    self.skipped += 1;
                    self.skipped_privileged
                        .push(format!("kernel matrix on {}", kernel.label));
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // One guest per kernel, side by side (each emulated CPU is one
        // host thread); their lines carry the kernel's name.
        let guest_runs: Vec<anyhow::Result<kernel_matrix::GuestRun>> =
            std::thread::scope(|scope| {
                let guests: Vec<_> = kernel_matrix::KERNELS
                    .iter()
                    .map(|kernel| scope.spawn(|| kernel_matrix::boot(kernel, &guest)))
                    .collect();
                guests
                    .into_iter()
                    .map(|guest| guest.join().expect("guest thread panicked"))
                    .collect()
            });
        let mut summary = Vec::new();
        for (kernel, guest_run) in kernel_matrix::KERNELS.iter().zip(guest_runs) {
            let guest_run = guest_run?;
            let mut run = TestRun::parse(&guest_run.output);
            let verdict = match &guest_run.problem {
                Some(problem) => {
                    run.broken = true;
                    format!("FAILED: {problem}")
                }
                None if run.failed > 0 => format!("FAILED: {} tests failed", run.failed),
                None => "ok".to_owned(),
            };
            summary.push(format!(
                "kernel matrix: {} ({}): {verdict}; {} passed, {} failed; boot {:.1} s, tests {:.1} s",
                kernel.label,
                guest_run.release,
                run.passed,
                run.failed,
                guest_run.boot.as_secs_f64(),
                guest_run.tests.as_secs_f64(),
            ));
            self.add(run);
        }
        for line in summary {
            println!("{line}");
        }
        Ok(())
    }

    /// Prints the closing line; fails when a test failed or a run broke.
    /// (Under CI a privileged test that cannot run fails instead of
    /// skipping: `service_tests::skip_unless_root`.)
    fn finish(self) -> anyhow::Result<()> {
        if !self.skipped_privileged.is_empty() {
            println!(
                "skipped because not root ({}): {}",
                self.skipped_privileged.len(),
                self.skipped_privileged.join(", ")
            );
        }
        println!(
            "tests: {} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        );
        if self.failed > 0 {
            bail!("{} tests failed", self.failed);
        }
        if self.broken {
            bail!("a test run failed before its tests could (see above)");
        }
        Ok(())
    }
}

/// Runs `cargo test --no-fail-fast ARGS -- TEST_ARGS` (with
/// `SERVICE_AGENT_BIN` pointing at the debug agent), echoing its output, and
/// returns what it reported; privileged tests that skipped themselves count
/// as skipped, not passed.
fn cargo_test(root: &Path, args: &[&str], test_args: &[&str]) -> anyhow::Result<TestRun> {
    use std::io::{BufRead as _, Write as _};
    let skip_log = target_dir(root).join("test-skips.log");
    match std::fs::remove_file(&skip_log) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", skip_log.display()));
        }
        _ => {}
    }
    let mut child = Command::new(cargo_bin())
        .current_dir(root)
        .args(["test", "--no-fail-fast"])
        .args(args)
        .arg("--")
        .args(test_args)
        .env(
            "SERVICE_AGENT_BIN",
            target_dir(root).join("debug/service-agent"),
        )
        .env(SKIP_LOG_ENV, &skip_log)
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
    let mut run = TestRun::parse(&output);
    run.skipped_privileged = match std::fs::read_to_string(&skip_log) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", skip_log.display())),
    };
    let skipped = run.skipped_privileged.len() as u64;
    run.passed = run.passed.checked_sub(skipped).with_context(|| {
        format!(
            "{skipped} tests recorded a skip, but only {} passed",
            run.passed
        )
    })?;
    run.skipped += skipped;
    run.broken = !status.success() && run.failed == 0;
    if run.broken {
        println!("error: cargo test {} failed ({status})", args.join(" "));
    }
    Ok(run)
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
