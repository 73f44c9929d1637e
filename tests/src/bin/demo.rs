//! The demo (`cargo xtask demo`): a dual-stack node, a client pod and
//! three backend pods as network namespaces, the agent programming the
//! dual-stack ClusterIP Service of `examples/demo-services.yaml`, and real
//! HTTP and UDP requests from the client pod to both of its ClusterIPs,
//! IPv4 and IPv6, translated by the packet datapath on the pod's device.
//! Prints which backend answered how often and the agent's `list`, then
//! removes everything it created.

use std::{collections::BTreeMap, net::SocketAddr, time::Instant};

use anyhow::Context as _;
use service_tests::{
    agent::list_table,
    is_root,
    scenario::{CLUSTER_IP6, ClusterIpScenario, HTTP_PORT, UDP_PORT, demo_yaml_path},
    scenario::{http_frontend, udp_frontend},
    traffic::{http_get, spread, udp_request},
};

/// One request to a target; the answering backend's name.
type Request = fn(SocketAddr) -> anyhow::Result<String>;

const HTTP_REQUESTS: usize = 300;
const UDP_REQUESTS: usize = 90;

fn main() -> anyhow::Result<()> {
    if !is_root() {
        anyhow::bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    let yaml_path = demo_yaml_path();
    let yaml = std::fs::read_to_string(&yaml_path)
        .with_context(|| format!("reading {}", yaml_path.display()))?;
    println!(
        "== Setting up: dual-stack node, client pod, 3 backend pods (network namespaces, IPv4 and IPv6)"
    );
    println!(
        "   agent: service-agent run --source file:{}",
        yaml_path.display()
    );
    let scenario = ClusterIpScenario::start_dual_stack("demo", &yaml, 3, &[])?;
    println!(
        "   agent attached to the pod devices; maps pinned in {}",
        scenario.pin.path().display()
    );

    let http6 = SocketAddr::from((CLUSTER_IP6, HTTP_PORT));
    let udp6 = SocketAddr::from((CLUSTER_IP6, UDP_PORT));
    let http: Request = http_get;
    let udp: Request = udp_request;
    let mut failed = Vec::new();
    for (family, scheme, target, request, count, what) in [
        (
            "IPv4",
            "http",
            http_frontend(),
            http,
            HTTP_REQUESTS,
            "HTTP requests, each on a new connection",
        ),
        (
            "IPv4",
            "udp",
            udp_frontend(),
            udp,
            UDP_REQUESTS,
            "UDP requests, each from a new socket",
        ),
        (
            "IPv6",
            "http",
            http6,
            http,
            HTTP_REQUESTS,
            "HTTP requests, each on a new connection",
        ),
        (
            "IPv6",
            "udp",
            udp6,
            udp,
            UDP_REQUESTS,
            "UDP requests, each from a new socket",
        ),
    ] {
        println!();
        println!("== {family}: {count} {what}, client pod -> {scheme}://{target}");
        let started = Instant::now();
        let (answers, failures) = spread(scenario.client(), count, target, request)?;
        print_shares(&answers, failures.len(), started.elapsed());
        failed.extend(failures);
    }

    println!();
    println!(
        "== service-agent list --pin-path {}",
        scenario.pin.path().display()
    );
    print!("{}", list_table(scenario.pin.path())?);

    drop(scenario);
    println!();
    println!("== Cleaned up: agent stopped, namespaces and pins removed");
    if !failed.is_empty() {
        anyhow::bail!(
            "some requests failed: {:?}",
            failed.iter().take(5).collect::<Vec<_>>()
        );
    }
    Ok(())
}

fn print_shares(answers: &BTreeMap<String, usize>, failed: usize, took: std::time::Duration) {
    let total: usize = answers.values().sum::<usize>() + failed;
    for (backend, count) in answers {
        let share = *count as f64 * 100.0 / total.max(1) as f64;
        println!(
            "   {backend:<8} {count:>4} answers ({share:5.1}%) {}",
            "#".repeat((share / 2.0).round() as usize)
        );
    }
    println!("   failed   {failed:>4}   ({:.2?} in all)", took);
}
