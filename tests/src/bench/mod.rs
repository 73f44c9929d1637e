//! `cargo xtask bench`: our datapath and control plane measured next to
//! baselines in one run on one machine: the pass-only floor program for
//! the per-packet cost, kube-proxy's iptables and nftables modes for real
//! traffic and for programming. See each module for how it measures.
//!
//! Everything runs in namespaces and pin folders this process creates,
//! each behind a guard that removes it on drop, also on failure.

pub mod agent;
pub mod api_server;
pub mod collector;
pub mod control_plane;
pub mod datapath;
pub mod kube_proxy;
pub mod plots;
pub mod report;
pub mod services;
pub mod stats;
pub mod traffic;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use self::{
    collector::CollectorBenchConfig,
    control_plane::ControlPlaneConfig,
    datapath::DatapathConfig,
    report::{Group, Machine, NotAvailable, Report},
    traffic::TrafficConfig,
};

/// How much to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// `quick` or `full`.
    pub mode: &'static str,
    /// Datapath cost per packet.
    pub datapath: DatapathConfig,
    /// Real traffic.
    pub traffic: TrafficConfig,
    /// Control plane.
    pub control_plane: ControlPlaneConfig,
    /// The conntrack collector.
    pub collector: CollectorBenchConfig,
    /// What this mode leaves out, and why.
    pub not_measured: Vec<NotAvailable>,
}

/// Capacity of the conntrack map of the collector bench (2^20).
const COLLECTOR_CAPACITY: u32 = 1 << 20;
/// Entries the collector bench walks: a 1M-entry map.
const COLLECTOR_ENTRIES: u32 = 1_000_000;

/// Why `--quick` measures the control plane at 5k Services.
const QUICK_CONTROL_PLANE: &str = "--quick measures it at 5k Services to stay under three minutes: nft -f alone takes 75 to 110 s to load 10k here";

impl BenchConfig {
    /// The full run (about ten minutes on two cores).
    pub fn full() -> Self {
        BenchConfig {
            mode: "full",
            // Every flow fits in conntrack (2M entries) without eviction:
            // 550k prefilled (1.1M entries), and (13 + 1) batches of
            // 2 x 2000 new flows per path (2 entries each, 4 on the SNAT
            // path) and as many through each path's conntrack bound: 800k
            // entries.
            datapath: DatapathConfig {
                sizes: vec![1, 1_000, 10_000, 100_000],
                batches: 13,
                packets: 2_000,
                prefill_max: 550_000,
            },
            traffic: TrafficConfig {
                sizes: vec![1, 1_000, 10_000],
                runs: 5,
                run_time: Duration::from_millis(1_500),
                clients: 2,
            },
            control_plane: ControlPlaneConfig {
                services: 10_000,
                rss_sizes: vec![10_000, 100_000],
                changes: 400,
                load_runs: 2,
                change_runs: 6,
            },
            collector: CollectorBenchConfig {
                capacity: COLLECTOR_CAPACITY,
                entries: COLLECTOR_ENTRIES,
                runs: 3,
            },
            not_measured: Vec::new(),
        }
    }

    /// `--quick`: fewer sizes and shorter runs (under three minutes).
    pub fn quick() -> Self {
        BenchConfig {
            mode: "quick",
            datapath: DatapathConfig {
                sizes: vec![1, 1_000, 10_000],
                batches: 11,
                packets: 2_000,
                prefill_max: 100_000,
            },
            traffic: TrafficConfig {
                sizes: vec![1, 1_000],
                runs: 3,
                run_time: Duration::from_secs(1),
                clients: 2,
            },
            control_plane: ControlPlaneConfig {
                services: 5_000,
                rss_sizes: vec![5_000],
                changes: 200,
                load_runs: 1,
                change_runs: 4,
            },
            collector: CollectorBenchConfig {
                capacity: COLLECTOR_CAPACITY,
                entries: COLLECTOR_ENTRIES,
                runs: 1,
            },
            not_measured: vec![NotAvailable {
                name: "Control plane at 10k and 100k Services".to_owned(),
                reason: QUICK_CONTROL_PLANE.to_owned(),
            }],
        }
    }
}

/// Runs the benches of `groups` (every group when empty) and returns the
/// report.
pub fn run(config: &BenchConfig, groups: &[Group], workdir: &Path) -> anyhow::Result<Report> {
    let started = Instant::now();
    let wanted = |group| groups.is_empty() || groups.contains(&group);
    let mut figures = Vec::new();
    if wanted(Group::Datapath) {
        eprintln!("== datapath cost per packet");
        figures.extend(datapath::run(&config.datapath).context("datapath bench")?);
    }
    if wanted(Group::Traffic) {
        eprintln!("== real traffic: ours, kube-proxy iptables, kube-proxy nftables");
        figures.extend(traffic::run(&config.traffic, workdir).context("traffic bench")?);
    }
    if wanted(Group::ControlPlane) {
        eprintln!("== control plane");
        figures.extend(
            control_plane::run(&config.control_plane, workdir).context("control-plane bench")?,
        );
    }
    if wanted(Group::Conntrack) {
        eprintln!("== conntrack collector");
        figures.extend(collector::run(&config.collector).context("collector bench")?);
    }
    Ok(Report {
        mode: config.mode.to_owned(),
        machine: machine(),
        duration_secs: started.elapsed().as_secs_f64(),
        figures,
        not_available: config.not_measured.clone(),
    })
}

/// Writes `results.json`, `results.md` and the SVG plots into `dir`;
/// returns the files written.
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(report)?)?;
    let markdown = dir.join("results.md");
    std::fs::write(&markdown, report.markdown())?;
    let mut files = vec![json, markdown];
    files.extend(plots::write_all(report, dir)?);
    Ok(files)
}

/// The machine's CPUs, kernel and netfilter tools.
fn machine() -> Machine {
    let command = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|e| format!("{program}: {e}"))
    };
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        kernel: command("uname", &["-r"]),
        iptables: command("iptables", &["-V"]),
        nft: command("nft", &["-v"]),
    }
}
