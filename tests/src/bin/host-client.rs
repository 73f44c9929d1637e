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
//! fails unless its peer and the answer's source are TARGET),
//! `udp-stream` (COUNT datagrams 100 ms apart from one socket connected to
//! TARGET, each with its send time in milliseconds since the Unix epoch
//! and its answer, in `datagrams`), `udp-stream-reconnect` (the same from
//! one socket bound to the fixed source port
//! [`RECONNECTING_STREAM_PORT`](service_tests::traffic::RECONNECTING_STREAM_PORT),
//! which connects again, as resolvers do, whenever a send or receive
//! fails with anything but a timeout; each datagram also with the error
//! it met, as text, or null). TARGET is
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
        if kind == "udp-stream" || kind == "udp-stream-reconnect" {
            runs.push(json!({
                "kind": kind,
                "target": target.to_string(),
                "datagrams": udp_stream(target, count, kind == "udp-stream-reconnect")?,
            }));
            continue;
        }
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

/// `count` datagrams 100 ms apart from one UDP socket connected to
/// `target`: each as `[send time in ms since the Unix epoch, answer or
/// null, error (text) or null]` (an answer is one from `target` within 90
/// ms). With `reconnect`, the socket is bound to
/// [`RECONNECTING_STREAM_PORT`](service_tests::traffic::RECONNECTING_STREAM_PORT)
/// and connected again after a send or receive failed with anything but a
/// timeout (a destroyed socket's `ECONNABORTED`, or `EDESTADDRREQ` once
/// it is disconnected).
fn udp_stream(
    target: SocketAddr,
    count: usize,
    reconnect: bool,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut local = service_tests::traffic::unspecified_of(target);
    if reconnect {
        local.set_port(service_tests::traffic::RECONNECTING_STREAM_PORT);
    }
    let socket = std::net::UdpSocket::bind(local).with_context(|| format!("binding {local}"))?;
    socket
        .connect(target)
        .with_context(|| format!("connecting to {target}"))?;
    socket.set_read_timeout(Some(std::time::Duration::from_millis(90)))?;
    let mut datagrams = Vec::with_capacity(count);
    let mut buf = [0u8; 512];
    for _ in 0..count {
        let at = Instant::now();
        let epoch_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        // A refused datagram (ICMP port unreachable) fails the next call:
        // counted as no answer.
        let result = socket
            .send(b"which backend?\n")
            .and_then(|_| socket.recv(&mut buf));
        let (answer, error) = match result {
            Ok(n) => (
                Some(String::from_utf8_lossy(&buf[..n]).trim().to_owned()),
                None,
            ),
            Err(e) => {
                let timeout = matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
                if reconnect && !timeout {
                    socket
                        .connect(target)
                        .with_context(|| format!("connecting to {target} again after {e}"))?;
                }
                (None, (!timeout).then(|| e.to_string()))
            }
        };
        datagrams.push(json!([epoch_ms, answer, error]));
        std::thread::sleep(std::time::Duration::from_millis(100).saturating_sub(at.elapsed()));
    }
    Ok(datagrams)
}
