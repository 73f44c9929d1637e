//! The demo (`cargo xtask demo`): a node, a client pod and three backend
//! pods as network namespaces, the agent programming the ClusterIP Service
//! of `examples/demo-services.yaml`, and real HTTP and UDP requests from the
//! client to the ClusterIP. Prints which backend answered how often and the
//! agent's `list`, then removes everything it created.

use std::{collections::BTreeMap, time::Instant};

use anyhow::Context as _;
use service_tests::{
    agent::list_table,
    is_root,
    scenario::{ClusterIpScenario, demo_yaml_path, http_frontend, udp_frontend},
    traffic::{http_get, spread, udp_request},
};

const HTTP_REQUESTS: usize = 300;
const UDP_REQUESTS: usize = 90;

fn main() -> anyhow::Result<()> {
    if !is_root() {
        anyhow::bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    let yaml_path = demo_yaml_path();
    let yaml = std::fs::read_to_string(&yaml_path)
        .with_context(|| format!("reading {}", yaml_path.display()))?;
    println!("== Setting up: node, client pod, 3 backend pods (network namespaces)");
    println!(
        "   agent: service-agent run --source file:{}",
        yaml_path.display()
    );
    let scenario = ClusterIpScenario::start("demo", &yaml, 3)?;
    println!(
        "   agent attached to the pod devices; maps pinned in {}",
        scenario.pin.path().display()
    );

    println!();
    println!(
        "== {HTTP_REQUESTS} HTTP requests, each on a new connection, client pod -> http://{}",
        http_frontend()
    );
    let started = Instant::now();
    let (answers, failures) = spread(scenario.client(), HTTP_REQUESTS, http_frontend(), http_get)?;
    print_shares(&answers, failures.len(), started.elapsed());

    println!();
    println!(
        "== {UDP_REQUESTS} UDP requests, each from a new socket, client pod -> udp://{}",
        udp_frontend()
    );
    let started = Instant::now();
    let (answers, failures_udp) =
        spread(scenario.client(), UDP_REQUESTS, udp_frontend(), udp_request)?;
    print_shares(&answers, failures_udp.len(), started.elapsed());

    println!();
    println!(
        "== service-agent list --pin-path {}",
        scenario.pin.path().display()
    );
    print!("{}", list_table(scenario.pin.path())?);

    drop(scenario);
    println!();
    println!("== Cleaned up: agent stopped, namespaces and pins removed");
    if !failures.is_empty() || !failures_udp.is_empty() {
        anyhow::bail!(
            "some requests failed: {:?}",
            failures
                .iter()
                .chain(&failures_udp)
                .take(5)
                .collect::<Vec<_>>()
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
