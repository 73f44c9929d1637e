//! The demo (`cargo xtask demo`): a dual-stack node, a client pod and
//! three backend pods as network namespaces, the agent programming the
//! dual-stack ClusterIP Service of `examples/demo-services.yaml`, and real
//! HTTP and UDP requests from the client pod to both of its ClusterIPs:
//! over IPv4 through the packet datapath on the pod's device, over IPv6
//! through socket-LB (the client process runs in the cgroup the agent
//! attached its socket programs to). Prints which backend answered how
//! often and the agent's `list`, then removes everything it created.

use std::{collections::BTreeMap, net::SocketAddr, time::Instant};

use anyhow::Context as _;
use service_tests::{
    agent::list_table,
    cgroup::TestCgroup,
    is_root,
    scenario::{CLUSTER_IP6, ClusterIpScenario, HTTP_PORT, UDP_PORT, demo_yaml_path},
    scenario::{http_frontend, udp_frontend},
    traffic::{host_client_answers, http_get, run_host_client, spread, udp_request},
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
    // The demo's processes only: never the machine's root cgroup.
    let cgroup = TestCgroup::create()?;
    let cgroup_path = cgroup.path().to_str().context("UTF-8 cgroup path")?;
    println!(
        "== Setting up: dual-stack node, client pod, 3 backend pods (network namespaces, IPv4 and IPv6)"
    );
    println!(
        "   agent: service-agent run --source file:{} --cgroup-path {cgroup_path}",
        yaml_path.display()
    );
    let mut scenario =
        ClusterIpScenario::start_dual_stack("demo", &yaml, 3, &["--cgroup-path", cgroup_path])?;
    scenario
        .agent
        .wait_for_log("socket-LB attached to cgroup", 1)?;
    println!(
        "   agent attached to the pod devices and to the cgroup; maps pinned in {}",
        scenario.pin.path().display()
    );

    let mut failed = Vec::new();
    println!();
    println!(
        "== IPv4: {HTTP_REQUESTS} HTTP requests, each on a new connection, client pod -> http://{} (packet datapath on the pod's device)",
        http_frontend()
    );
    let started = Instant::now();
    let (answers, failures) = spread(scenario.client(), HTTP_REQUESTS, http_frontend(), http_get)?;
    print_shares(&answers, failures.len(), started.elapsed());
    failed.extend(failures);

    println!();
    println!(
        "== IPv4: {UDP_REQUESTS} UDP requests, each from a new socket, client pod -> udp://{}",
        udp_frontend()
    );
    let started = Instant::now();
    let (answers, failures) = spread(scenario.client(), UDP_REQUESTS, udp_frontend(), udp_request)?;
    print_shares(&answers, failures.len(), started.elapsed());
    failed.extend(failures);

    // The same Service over IPv6, from a process of the client pod in the
    // agent's cgroup: socket-LB sends each socket to an IPv6 backend.
    let client = std::env::current_exe()?.with_file_name("host-client");
    let client = client.to_str().context("UTF-8 path")?;
    for (kind, target, count) in [
        (
            "http",
            SocketAddr::from((CLUSTER_IP6, HTTP_PORT)),
            HTTP_REQUESTS,
        ),
        (
            "udp",
            SocketAddr::from((CLUSTER_IP6, UDP_PORT)),
            UDP_REQUESTS,
        ),
    ] {
        println!();
        println!(
            "== IPv6: {count} {} requests, each from a new socket, client pod -> {kind}://{target} (socket-LB: the client process is in the cgroup)",
            kind.to_uppercase()
        );
        let started = Instant::now();
        let report = run_host_client(
            client,
            scenario.client(),
            Some(&cgroup),
            &[kind, &target.to_string(), &count.to_string()],
        );
        let run = &report["runs"][0];
        let answers: BTreeMap<String, usize> = host_client_answers(run)
            .into_iter()
            .map(|(name, n)| (name, n as usize))
            .collect();
        let failures: Vec<String> = run["failures"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| f.as_str().unwrap_or_default().to_owned())
            .collect();
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
    drop(cgroup);
    println!();
    println!("== Cleaned up: agent stopped, namespaces, cgroup and pins removed");
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
