//! The real-cluster tier: `deploy/kind-e2e.sh` creates a kind cluster
//! without kube-proxy, deploys the agent as a DaemonSet and checks a
//! Service end to end. It needs Docker and kind, which the build machines
//! do not have, so it is ignored by default; run it where they exist with
//! `cargo test -p service-tests --test kind_cluster -- --ignored`.

use std::{path::Path, process::Command};

fn available(tool: &str) -> bool {
    Command::new(tool)
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
#[ignore = "needs Docker and kind; run with --ignored where a cluster can be created"]
fn agent_serves_a_cluster_ip_on_a_kind_cluster_without_kube_proxy() {
    assert!(
        available("docker") && available("kind"),
        "this test needs a running Docker engine and kind"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kind-e2e.sh");
    let status = Command::new("bash")
        .arg(&script)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .status()
        .expect("running deploy/kind-e2e.sh");
    assert!(status.success(), "deploy/kind-e2e.sh failed ({status})");
}
