//! The agent binary started for a bench: like [`crate::agent::AgentProcess`]
//! but with map capacities sized to the Service set, and with the ways a
//! bench observes it (when it is fully programmed, its peak memory).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use service_agent::datapath::MapSizes;

use crate::{
    agent::agent_binary,
    netns::{NetNs, enter_on_spawn},
    topology::POD_DEVICE_PREFIX,
};

/// Where a bench agent reads its Services.
#[derive(Clone, Debug)]
pub enum AgentSource {
    /// `--source file:PATH`.
    File(PathBuf),
    /// `--source kube` with this kubeconfig, as this node.
    Kube {
        /// The kubeconfig (`KUBECONFIG`).
        kubeconfig: PathBuf,
        /// `--node-name`.
        node_name: String,
    },
}

/// A running `service-agent run`; SIGTERM, then SIGKILL, on drop.
pub struct BenchAgent {
    child: Child,
    log: PathBuf,
    pin_path: PathBuf,
}

impl BenchAgent {
    /// Starts the agent inside `node` on `source`, with maps of `sizes`
    /// pinned under `pin_path`, attaching to the pod devices (`lxc*`), and
    /// socket-LB on the cgroup `socket_lb` if given (never the default, the
    /// root cgroup, which would reach every process on the machine). Its
    /// log goes to `log`.
    pub fn start(
        node: &NetNs,
        source: &AgentSource,
        pin_path: &Path,
        sizes: MapSizes,
        socket_lb: Option<&Path>,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let binary = agent_binary();
        if !binary.exists() {
            bail!("{} not found: build it first", binary.display());
        }
        let log_file = std::fs::File::create(log)?;
        let mut command = Command::new(&binary);
        command.args(["run", "--source"]);
        match source {
            AgentSource::File(path) => {
                command.arg(format!("file:{}", path.display()));
            }
            AgentSource::Kube {
                kubeconfig,
                node_name,
            } => {
                command
                    .args(["kube", "--node-name", node_name])
                    .env("KUBECONFIG", kubeconfig);
            }
        }
        command
            .arg("--pin-path")
            .arg(pin_path)
            .args(["--pod-device-prefix", POD_DEVICE_PREFIX])
            .args(["--poll-interval-ms", "50"])
            .arg("--cgroup-path")
            .arg(socket_lb.unwrap_or(Path::new("none")))
            .arg(format!("--map-size-frontends={}", sizes.frontends))
            .arg(format!("--map-size-backends={}", sizes.backends))
            .arg(format!("--map-size-revnat={}", sizes.revnat))
            .arg(format!("--map-size-conntrack={}", sizes.conntrack))
            .args(["--metrics-addr", "127.0.0.1:10249"])
            .args(["--healthz-addr", "127.0.0.1:10256"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        enter_on_spawn(&node.path(), &mut command)?;
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(BenchAgent {
            child,
            log: log.to_owned(),
            pin_path: pin_path.to_owned(),
        })
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails, with the log, if the agent has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the agent exited ({status}); its log:\n{}", self.log());
        }
        Ok(())
    }

    /// Waits until the agent's first full sync has been written to the
    /// maps and returns when that was seen. The agent writes its status
    /// file (atomically) right after a sync's last map write, so the file
    /// appearing marks the end of the first full sync; it is polled every
    /// millisecond, which loads the agent with nothing.
    pub fn wait_synced(&mut self, timeout: Duration) -> anyhow::Result<Instant> {
        let status = service_agent::ops::status::status_path(&self.pin_path);
        let deadline = Instant::now() + timeout;
        loop {
            if status.exists() {
                return Ok(Instant::now());
            }
            self.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "the agent did not finish its first sync within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until the agent has attached to `lxc0 .. lxc{pods-1}`.
    pub fn wait_attached(&mut self, pods: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while (0..pods).any(|i| !self.log().contains(&format!("to {POD_DEVICE_PREFIX}{i}\n"))) {
            self.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "the agent did not attach to every pod device; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Peak resident memory (`VmHWM`) of the agent so far, in KiB.
    pub fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .context("reading the agent's /proc status")?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in the agent's /proc status")
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        crate::agent::stop_child(&mut self.child, Duration::from_secs(5));
    }
}
