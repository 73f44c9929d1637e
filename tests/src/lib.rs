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

/// Skips the calling test, with a clear message, when not running as root.
/// CI runs as root, so there every privileged test runs.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("skipped: this test needs root (BPF and network namespaces)");
            return;
        }
    };
}
