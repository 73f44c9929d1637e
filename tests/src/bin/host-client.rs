//! A client for the host-originated traffic tests: run as its own process
//! so a test can place it in a cgroup (socket-LB applies per cgroup) and in
//! the node's network namespace. Makes requests, each on a new socket, and
//! prints as JSON which backend answered how often, the failures, and the
//! error kinds they came with.
//!
//! ```text
//! host-client KIND TARGET COUNT [KIND TARGET COUNT ...]
//! ```
//!
//! Kinds: `http` (a GET on a new connection; fails unless the connection's
//! peer is TARGET), `http-plain` (a GET without that check), `udp` (a
//! datagram from a new unconnected socket; fails unless the answer comes
//! from TARGET), `udp-connected` (from a new socket connected to TARGET;
//! fails unless its peer and the answer's source are TARGET). TARGET is
//! `ADDRESS:PORT` of either family (`[fd00:96::10]:80` for IPv6), and
//! every socket is of TARGET's family.

use std::{collections::BTreeMap, net::SocketAddr, time::Instant};

use anyhow::{Context as _, bail};
use serde_json::json;
use service_tests::traffic::{http_get, http_get_peer_checked, udp_request, udp_request_connected};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || !args.len().is_multiple_of(3) {
        bail!("usage: host-client KIND TARGET COUNT [KIND TARGET COUNT ...]");
    }
    let mut runs = Vec::new();
    for run in args.chunks(3) {
        let (kind, target, count) = (&run[0], &run[1], &run[2]);
        let target: SocketAddr = target.parse().with_context(|| format!("target {target}"))?;
        let count: usize = count.parse().with_context(|| format!("count {count}"))?;
        let request: fn(SocketAddr) -> anyhow::Result<String> = match kind.as_str() {
            "http" => http_get_peer_checked,
            "http-plain" => http_get,
            "udp" => udp_request,
            "udp-connected" => udp_request_connected,
            other => bail!("unknown kind {other}"),
        };
        let mut answers = BTreeMap::<String, usize>::new();
        let mut failures = Vec::new();
        let mut error_kinds = BTreeMap::<String, usize>::new();
        let mut slowest_failure_ms = 0.0f64;
        for _ in 0..count {
            let start = Instant::now();
            match request(target) {
                Ok(name) => *answers.entry(name).or_default() += 1,
                Err(e) => {
                    slowest_failure_ms =
                        slowest_failure_ms.max(start.elapsed().as_secs_f64() * 1e3);
                    let kind = e
                        .chain()
                        .find_map(|cause| cause.downcast_ref::<std::io::Error>())
                        .map(|io| format!("{:?}", io.kind()))
                        .unwrap_or_else(|| "Other".to_owned());
                    *error_kinds.entry(kind).or_default() += 1;
                    failures.push(format!("{e:#}"));
                }
            }
        }
        runs.push(json!({
            "kind": kind,
            "target": target.to_string(),
            "answers": answers,
            "failures": failures,
            "error_kinds": error_kinds,
            "slowest_failure_ms": slowest_failure_ms,
        }));
    }
    let report = json!({
        "cgroup": std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default(),
        "runs": runs,
    });
    println!("{report}");
    Ok(())
}
