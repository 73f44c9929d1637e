//! The ClusterIP scenario shared by the end-to-end tests and the demo: a
//! node, a client pod and three backend pods running real servers, the
//! agent programming the Service "web" from a YAML file.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    agent::{AgentProcess, wait_for_backends},
    pins::PinDir,
    topology::{POD_DEVICE_PREFIX, SingleNode},
    traffic::BackendServer,
};

/// The Service's ClusterIP.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The Service's HTTP port.
pub const HTTP_PORT: u16 = 80;
/// The Service's UDP echo port.
pub const UDP_PORT: u16 = 7;
/// The backends' HTTP port (the named target port "http").
pub const BACKEND_HTTP_PORT: u16 = 8080;
/// The backends' UDP port.
pub const BACKEND_UDP_PORT: u16 = 7007;
/// Number of backend pods (pods 1..=3; pod 0 is the client).
pub const BACKENDS: usize = 3;

/// `CLUSTER_IP:HTTP_PORT`.
pub fn http_frontend() -> SocketAddr {
    SocketAddr::from((CLUSTER_IP, HTTP_PORT))
}

/// `CLUSTER_IP:UDP_PORT`.
pub fn udp_frontend() -> SocketAddr {
    SocketAddr::from((CLUSTER_IP, UDP_PORT))
}

/// The YAML shipped for the demo (`examples/demo-services.yaml`).
pub fn demo_yaml_path() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo-services.yaml");
    path.canonicalize().unwrap_or(path)
}

/// The name a backend pod's servers answer with.
pub fn backend_name(pod: usize) -> String {
    format!("web-{pod}")
}

/// Service "web" with one EndpointSlice listing the given backend pods
/// (1..=3) as ready, the same objects as the demo file.
pub fn web_service_yaml(backend_pods: &[usize]) -> String {
    web_service_yaml_draining(backend_pods, &[])
}

/// [`web_service_yaml`] with the pods of `terminating_pods` listed as well,
/// serving but terminating (`ready: false, serving: true, terminating:
/// true`), as a pod being deleted gracefully is: they take no new flows
/// while others are ready, and keep the flows they have.
pub fn web_service_yaml_draining(backend_pods: &[usize], terminating_pods: &[usize]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\nspec:\n  clusterIP: {CLUSTER_IP}\n  ports:\n  - {{name: http, protocol: TCP, port: {HTTP_PORT}, targetPort: http}}\n  - {{name: echo, protocol: UDP, port: {UDP_PORT}, targetPort: {BACKEND_UDP_PORT}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-7x2kq\n  namespace: demo\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: http, protocol: TCP, port: {BACKEND_HTTP_PORT}}}\n- {{name: echo, protocol: UDP, port: {BACKEND_UDP_PORT}}}\nendpoints:\n"
    );
    for pod in backend_pods {
        yaml.push_str(&format!(
            "- addresses: [\"10.200.{pod}.2\"]\n  conditions: {{ready: true}}\n"
        ));
    }
    for pod in terminating_pods {
        yaml.push_str(&format!(
            "- addresses: [\"10.200.{pod}.2\"]\n  conditions: {{ready: false, serving: true, terminating: true}}\n"
        ));
    }
    yaml
}

/// The running scenario. Dropping it stops the agent, then the servers,
/// then removes the namespaces, the pins and the work folder.
pub struct ClusterIpScenario {
    /// The agent process.
    pub agent: AgentProcess,
    /// One server pair per backend pod.
    pub servers: Vec<BackendServer>,
    /// Node and pods; pod 0 is the client.
    pub topology: SingleNode,
    /// The agent's pin folder.
    pub pin: PinDir,
    /// The YAML file the agent watches.
    pub yaml: PathBuf,
    /// Work folder holding the YAML and the agent's log.
    pub workdir: tempfile::TempDir,
}

impl ClusterIpScenario {
    /// Builds the topology, starts the servers and the agent on `yaml`, and
    /// waits until `list` shows the HTTP frontend with `expected_backends`.
    pub fn start(tag: &str, yaml: &str, expected_backends: usize) -> anyhow::Result<Self> {
        Self::start_with_agent_args(tag, yaml, expected_backends, &[])
    }

    /// [`ClusterIpScenario::start`] with more agent flags (after
    /// `--pod-device-prefix`), e.g. `--cgroup-path`.
    pub fn start_with_agent_args(
        tag: &str,
        yaml: &str,
        expected_backends: usize,
        agent_args: &[&str],
    ) -> anyhow::Result<Self> {
        let workdir = tempfile::Builder::new().prefix("service-lb-").tempdir()?;
        let yaml_path = workdir.path().join("services.yaml");
        std::fs::write(&yaml_path, yaml)?;
        let pin = PinDir::new(tag)?;
        let topology = SingleNode::new(tag, BACKENDS + 1)?;
        let mut servers = Vec::new();
        for pod in 1..=BACKENDS {
            servers.push(
                BackendServer::start(
                    &topology.pods[pod].ns,
                    &backend_name(pod),
                    BACKEND_HTTP_PORT,
                    BACKEND_UDP_PORT,
                )
                .with_context(|| format!("starting the servers of pod {pod}"))?,
            );
        }
        let mut args = vec!["--pod-device-prefix", POD_DEVICE_PREFIX];
        args.extend_from_slice(agent_args);
        let mut agent = AgentProcess::start_with_args(
            &topology.node,
            &yaml_path,
            pin.path(),
            &args,
            &workdir.path().join("agent.log"),
        )?;
        wait_for_backends(
            &mut agent,
            pin.path(),
            http_frontend(),
            "TCP",
            expected_backends,
            Duration::from_secs(20),
        )?;
        // The agent attaches to the devices in the same tick it programs the
        // maps; wait for the attach log line of every pod device.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (0..=BACKENDS).any(|i| {
            !agent
                .log()
                .contains(&format!("to {POD_DEVICE_PREFIX}{i}\n"))
        }) {
            agent.check_running()?;
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the agent did not attach to every pod device; log:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(ClusterIpScenario {
            agent,
            servers,
            topology,
            pin,
            yaml: yaml_path,
            workdir,
        })
    }

    /// The client pod's namespace.
    pub fn client(&self) -> &crate::netns::NetNs {
        &self.topology.pods[0].ns
    }

    /// Replaces the watched YAML atomically (write, then rename).
    pub fn rewrite_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        let staging = self.workdir.path().join("services.yaml.new");
        std::fs::write(&staging, yaml)?;
        std::fs::rename(&staging, &self.yaml)?;
        Ok(())
    }
}
