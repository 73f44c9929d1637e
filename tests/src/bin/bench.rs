//! The bench (`cargo xtask bench [--quick]`): measures the datapath, real
//! traffic, the control plane and the conntrack collector next to their
//! baselines, and writes
//! `results.json`, `results.md` and SVG plots. Needs root.
//!
//! `bench [--quick] [--out DIR] [--only datapath|traffic|control-plane|conntrack]...`

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use service_tests::{
    bench::{self, BenchConfig, report::Group},
    is_root,
};

fn main() -> anyhow::Result<()> {
    let all: Vec<String> = std::env::args().skip(1).collect();
    if all.first().map(String::as_str) == Some(bench::traffic::CLIENT_FLAG) {
        return bench::traffic::client_main(&all[1..]);
    }
    let mut quick = false;
    let mut out = PathBuf::from("target/bench");
    let mut groups = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--out" => out = PathBuf::from(args.next().context("--out needs a folder")?),
            "--only" => {
                let name = args.next().context("--only needs a group")?;
                let group = Group::ALL
                    .into_iter()
                    .find(|g| g.name() == name)
                    .with_context(|| format!("no group {name:?}"))?;
                groups.push(group);
            }
            other => {
                bail!("unknown argument {other:?} (expected --quick, --out DIR, --only GROUP)")
            }
        }
    }
    if !is_root() {
        bail!("the bench loads BPF programs and creates network namespaces: run it as root");
    }
    let config = if quick {
        BenchConfig::quick()
    } else {
        BenchConfig::full()
    };
    let workdir = tempfile::Builder::new()
        .prefix("service-lb-bench-")
        .tempdir()?;
    let report = bench::run(&config, &groups, workdir.path())?;
    let files = bench::write(&report, &out)?;
    println!("{}", report.markdown());
    for file in files {
        println!("wrote {}", file.display());
    }
    Ok(())
}
