//! Test harness of the Service load balancer: network namespaces as nodes
//! and pods, real servers and clients inside them, the agent as a child
//! process, and bpffs pin folders that clean up after themselves. Used by
//! the privileged tests in `tests/` and by the demo (`cargo xtask demo`).
//!
//! Every guard removes what it created when dropped, also when a test
//! panics. Traffic only ever goes to addresses inside namespaces made here.

pub mod agent;
pub mod bench;
pub mod cgroup;
pub mod datapath_fixture;
pub mod fuzzing;
pub mod netns;
pub mod packets;
pub mod pins;
pub mod scenario;
pub mod topology;
pub mod traffic;

/// Whether the process runs as root (privileged tests need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Environment variable naming the file in which privileged tests that
/// skipped themselves are recorded, one test name a line. `cargo xtask
/// test` sets it and reports those tests as skipped, not as passed.
pub const SKIP_LOG_ENV: &str = "SERVICE_TESTS_SKIP_LOG";

/// Whether this run is CI's (the `CI` environment variable is set, and
/// not to `0` or `false`): there, a privileged test never skips.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// What [`require_root!`] does: `false` as root (the test runs). Without
/// root, the test is skipped: `true`, after a clear message and a line in
/// the file named by [`SKIP_LOG_ENV`]. Under CI a skip is a failure: panics.
pub fn skip_unless_root() -> bool {
    if is_root() {
        return false;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_owned();
    assert!(
        !under_ci(),
        "{test} needs root (BPF and network namespaces); under CI a skipped test is a failure"
    );
    eprintln!("skipped: {test} needs root (BPF and network namespaces)");
    if let Some(log) = std::env::var_os(SKIP_LOG_ENV) {
        use std::io::Write as _;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut file| writeln!(file, "{test}"))
            .unwrap_or_else(|e| panic!("recording the skip in {}: {e}", log.to_string_lossy()));
    }
    true
}

/// Skips the calling test when not running as root: it returns at once and
/// is reported as skipped by `cargo xtask test` (see [`skip_unless_root`]).
/// Under CI, which runs as root, a skip fails the test instead.
#[macro_export]
macro_rules! require_root {
    () => {
        if $crate::skip_unless_root() {
            return;
        }
    };
}
