//! The agent binary as a child process inside a node namespace, stopped on
//! drop, and `service-agent list --json` to read what it programmed.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::{NetNs, enter_on_spawn};

/// Path of the `service-agent` binary: `SERVICE_AGENT_BIN`, or the debug
/// build in this workspace's target folder (`cargo xtask test` builds it).
pub fn agent_binary() -> PathBuf {
    std::env::var_os("SERVICE_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/service-agent")
        })
}

/// A running `service-agent run`; SIGTERM then SIGKILL on drop.
pub struct AgentProcess {
    child: Child,
    log: PathBuf,
    /// How it was started, to start it again.
    command: AgentCommand,
}

/// The arguments an agent was started with.
#[derive(Clone)]
struct AgentCommand {
    source: PathBuf,
    pin_path: PathBuf,
    /// Flags after `--source` and `--pin-path`.
    args: Vec<String>,
    netns: PathBuf,
}

impl AgentProcess {
    /// Starts the agent in `node` on the YAML file `source`, pinning under
    /// `pin_path`, attaching to devices starting with `device_prefix`. Its
    /// log goes to `log`.
    pub fn start(
        node: &NetNs,
        source: &Path,
        pin_path: &Path,
        device_prefix: &str,
        log: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_with_args(
            node,
            source,
            pin_path,
            &["--pod-device-prefix", device_prefix],
            log,
        )
    }

    /// Starts the agent in `node` on the YAML file `source`, pinning under
    /// `pin_path`, with more flags (devices, node name, ...). Metrics and
    /// health are served on their default ports inside `node`.
    pub fn start_with_args(
        node: &NetNs,
        source: &Path,
        pin_path: &Path,
        args: &[&str],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let command = AgentCommand {
            source: source.to_owned(),
            pin_path: pin_path.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            netns: node.path(),
        };
        Ok(AgentProcess {
            child: spawn(&command, log)?,
            log: log.to_owned(),
            command,
        })
    }

    /// Kills the agent with SIGKILL (no chance to clean anything up) and
    /// starts a new one with the same arguments; its log is appended.
    pub fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.child.kill().context("SIGKILL")?;
        self.child.wait()?;
        self.child = spawn(&self.command, &self.log)?;
        Ok(())
    }

    /// Kills the agent with SIGKILL and starts a new one with `args` in
    /// place of the flags it had after `--source` and `--pin-path`; its log
    /// is appended.
    pub fn kill_and_restart_with_args(&mut self, args: &[&str]) -> anyhow::Result<()> {
        self.command.args = args.iter().map(|a| (*a).to_owned()).collect();
        self.kill_and_restart()
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if the agent has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the agent exited ({status}); its log:\n{}", self.log());
        }
        Ok(())
    }

    /// Waits until the agent's log holds `needle` `times` times, for at
    /// most 60 s: that covers a restarted agent loading and verifying the
    /// whole object and attaching eight socket programs on a machine whose
    /// cores are busy. Fails if the agent exits or the time runs out.
    pub fn wait_for_log(&mut self, needle: &str, times: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.log().matches(needle).count() < times {
            self.check_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "no {needle:?} ({times} times) in the agent log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// Starts `service-agent run` inside the node namespace; output appended to `log`.
fn spawn(command: &AgentCommand, log: &Path) -> anyhow::Result<Child> {
    let binary = agent_binary();
    if !binary.exists() {
        bail!(
            "{} not found: build it first (cargo xtask test does)",
            binary.display()
        );
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut process = Command::new(&binary);
    process
        .args(["run", "--source"])
        .arg(format!("file:{}", command.source.display()))
        .arg("--pin-path")
        .arg(&command.pin_path)
        .args(["--poll-interval-ms", "100"])
        .args(&command.args)
        // Socket-LB only where a test asks for it, on its own cgroup: never
        // on the machine's root cgroup (the default), which would reach every
        // process on the machine.
        .args(
            (!command.args.iter().any(|a| a.starts_with("--cgroup-path")))
                .then_some(["--cgroup-path", "none"])
                .into_iter()
                .flatten(),
        )
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    enter_on_spawn(&command.netns, &mut process)?;
    process
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(3));
    }
}

/// Stops a child process: SIGTERM, then SIGKILL if it has not exited
/// within `grace`.
pub fn stop_child(child: &mut Child, grace: Duration) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The value of the Prometheus series `series` (name and labels exactly as
/// exported, e.g. `service_agent_map_entries{map="conntrack"}` or
/// `service_agent_conntrack_gc_deleted_entries_total{reason="expired"}`)
/// of the agent serving `/metrics` on its default address in `node`;
/// `None` when it is not exported.
pub fn metric(node: &NetNs, series: &str) -> anyhow::Result<Option<f64>> {
    let (status, body) = node
        .run(|| {
            crate::traffic::http_get_path(SocketAddr::from(([127, 0, 0, 1], 10249)), "/metrics")
        })?
        .context("scraping /metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(body.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    }))
}

/// The datapath event counter `name` (`fragment_translated`, ...) of
/// the agent whose maps are pinned at `pin_path`, summed over CPUs.
pub fn datapath_counter(pin_path: &Path, name: &str) -> anyhow::Result<u64> {
    service_agent::datapath::maps::datapath_counters(pin_path)?
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value)
        .with_context(|| format!("no datapath counter {name}"))
}

/// The conntrack entries in the map pinned under `pin_path`.
pub fn conntrack_entries(
    pin_path: &Path,
) -> anyhow::Result<Vec<(service_common::ConntrackKey, service_common::ConntrackValue)>> {
    let map: aya::maps::HashMap<
        aya::maps::MapData,
        service_common::ConntrackKey,
        service_common::ConntrackValue,
    > = aya::maps::HashMap::try_from(service_agent::datapath::maps::open_pinned(
        pin_path,
        service_common::MAP_CONNTRACK,
    )?)?;
    map.iter()
        .map(|entry| entry.context("reading the conntrack map"))
        .collect()
}

/// `service-agent list` (table) for the maps pinned under `pin_path`.
pub fn list_table(pin_path: &Path) -> anyhow::Result<String> {
    list(pin_path, false)
}

/// `service-agent list --json`, parsed.
pub fn list_json(pin_path: &Path) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(&list(pin_path, true)?).context("parsing list --json")
}

/// The new flows `list` counts for the frontend `frontend` of `protocol`
/// ("TCP", "UDP") of the agent pinned at `pin_path`; 0 when it is not
/// listed.
pub fn frontend_new_flows(pin_path: &Path, frontend: std::net::SocketAddr, protocol: &str) -> u64 {
    listed_frontend(pin_path, frontend, protocol)
        .and_then(|f| f["stats"]["new_flows"].as_u64())
        .unwrap_or(0)
}

/// The entry `list --json` shows for `frontend` and `protocol` (`"TCP"`,
/// `"UDP"`); `None` if the frontend is not programmed.
pub fn listed_frontend(
    pin_path: &Path,
    frontend: std::net::SocketAddr,
    protocol: &str,
) -> Option<serde_json::Value> {
    let listing = list_json(pin_path).expect("list");
    listing["frontends"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| {
            f["address"] == frontend.ip().to_string()
                && f["port"] == frontend.port()
                && f["protocol"] == protocol
        })
        .cloned()
}

fn list(pin_path: &Path, json: bool) -> anyhow::Result<String> {
    let mut command = Command::new(agent_binary());
    command.arg("list").arg("--pin-path").arg(pin_path);
    if json {
        command.arg("--json");
    }
    let output = command.output().context("running service-agent list")?;
    if !output.status.success() {
        bail!("list failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The backends `list --json` shows for `frontend` and `protocol`, as
/// `addr:port` strings (`[addr]:port` for IPv6); `None` if the frontend is not programmed.
pub fn listed_backends(
    listing: &serde_json::Value,
    frontend: SocketAddr,
    protocol: &str,
) -> Option<Vec<String>> {
    listing["frontends"].as_array()?.iter().find_map(|f| {
        (f["address"] == frontend.ip().to_string()
            && f["port"] == frontend.port()
            && f["protocol"] == protocol)
            .then(|| {
                f["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| {
                        let address = b["address"].as_str().unwrap_or("?");
                        match (address.parse::<std::net::IpAddr>(), b["port"].as_u64()) {
                            (Ok(ip), Some(port)) => SocketAddr::new(ip, port as u16).to_string(),
                            _ => format!("{address}:{}", b["port"]),
                        }
                    })
                    .collect()
            })
    })
}

/// Waits until `list` shows `frontend`/`protocol` with exactly `backends`
/// backends, or fails after `timeout` with the agent's log.
pub fn wait_for_backends(
    agent: &mut AgentProcess,
    pin_path: &Path,
    frontend: SocketAddr,
    protocol: &str,
    backends: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    loop {
        agent.check_running()?;
        if let Ok(listing) = list_json(pin_path)
            && let Some(found) = listed_backends(&listing, frontend, protocol)
            && found.len() == backends
        {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!(
                "{frontend}/{protocol} did not get {backends} backends within {timeout:?}; agent log:\n{}",
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `service-agent trace --json` on the maps pinned under `pin_path` with
/// `args` (the packet and its options), parsed.
pub fn trace_json(pin_path: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(&trace(pin_path, args, true)?).context("parsing trace --json")
}

/// `service-agent trace` (text) on the maps pinned under `pin_path`.
pub fn trace_text(pin_path: &Path, args: &[&str]) -> anyhow::Result<String> {
    trace(pin_path, args, false)
}

fn trace(pin_path: &Path, args: &[&str], json: bool) -> anyhow::Result<String> {
    let mut command = Command::new(agent_binary());
    command
        .arg("trace")
        .arg("--pin-path")
        .arg(pin_path)
        .args(args);
    if json {
        command.arg("--json");
    }
    let output = command.output().context("running service-agent trace")?;
    if !output.status.success() {
        bail!(
            "trace {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
