//! The scenarios shared by the end-to-end tests and the demo: a node, a
//! client pod and three backend pods running real servers, the agent
//! programming the Service "web" from a YAML file ([`ClusterIpScenario`]);
//! and two nodes with an external client, an agent on each
//! ([`TwoNodeScenario`]).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    agent::{AgentProcess, wait_for_backends},
    pins::PinDir,
    topology::{
        EXTERNAL_DEVICE, NODE_A_IP, NODE_B_IP, NODE_NETWORK_DEVICE, POD_DEVICE_PREFIX, SingleNode,
        TwoNodes, TwoNodesOptions,
    },
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

/// The name a backend pod's IPv6 servers answer with, in the dual-stack
/// scenarios (its IPv4 servers answer as [`backend_name`]).
pub fn backend6_name(pod: usize) -> String {
    format!("web6-{pod}")
}

/// The Service's IPv6 ClusterIP, in the dual-stack scenarios (the demo's).
pub const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);

/// NodePort of the two-node Service "web" ([`two_node_web_yaml`]), TCP.
pub const WEB_NODE_PORT_TCP: u16 = 30080;
/// NodePort of the two-node Service "web", UDP echo.
pub const WEB_NODE_PORT_UDP: u16 = 30007;
/// LoadBalancer IP of the two-node Service "web": outside the external
/// client's own subnet, so the client routes it to node A.
pub const WEB_LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 100);
/// Pods of the two-node Service "web" on each node.
pub const WEB_PODS_PER_NODE: usize = 2;

/// The two-node Service "web" (LoadBalancer: [`CLUSTER_IP`], NodePorts
/// [`WEB_NODE_PORT_TCP`] and [`WEB_NODE_PORT_UDP`], ingress IP
/// [`WEB_LOAD_BALANCER_IP`]) with `spec_extra` (indented spec lines, or
/// empty), and its EndpointSlice: [`WEB_PODS_PER_NODE`] ready pods on
/// each node (`10.201.i.2` on node A, `10.202.i.2` on node B).
pub fn two_node_web_yaml(spec_extra: &str) -> String {
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: {CLUSTER_IP}
{spec_extra}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: {WEB_NODE_PORT_TCP}}}
  - {{name: echo, protocol: UDP, port: 7, targetPort: 7007, nodePort: {WEB_NODE_PORT_UDP}}}
status:
  loadBalancer:
    ingress: [{{ip: "{WEB_LOAD_BALANCER_IP}"}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: 8080}}
- {{name: echo, protocol: UDP, port: 7007}}
endpoints:
"#
    );
    for (node, net) in [("node-a", 201), ("node-b", 202)] {
        for i in 0..WEB_PODS_PER_NODE {
            yaml.push_str(&format!(
                "- {{addresses: [\"10.{net}.{i}.2\"], nodeName: {node}, conditions: {{ready: true}}}}\n"
            ));
        }
    }
    yaml
}

/// The address of node B's first pod in a [`TwoNodeScenario`].
pub const NODE_B_POD_0: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);

/// The UDP echo port of the Service of [`dual_stack_remote_node_port_yaml`]
/// for large datagrams (a [`crate::traffic::UdpEchoServer`] on the pod).
pub const REMOTE_BIG_TARGET_PORT: u16 = 9009;
/// Its NodePort.
pub const REMOTE_BIG_NODE_PORT: u16 = 30_009;

/// A dual-stack NodePort Service "web" (`node_port`, TCP and UDP, and the
/// UDP echo port [`REMOTE_BIG_TARGET_PORT`] on [`REMOTE_BIG_NODE_PORT`])
/// whose only endpoint of each family is node B's first pod
/// ([`NODE_B_POD_0`] and its IPv6 twin): from node A, a remote backend
/// reached through SNAT.
pub fn dual_stack_remote_node_port_yaml(node_port: u16) -> String {
    let backend_v6 = crate::topology::ipv6_of(NODE_B_POD_0);
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: ["10.96.0.10", "fd00:96::10"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: {BACKEND_HTTP_PORT}, nodePort: {node_port}}}
  - {{name: echo, protocol: UDP, port: 7, targetPort: {BACKEND_UDP_PORT}, nodePort: {node_port}}}
  - {{name: big, protocol: UDP, port: 9, targetPort: {REMOTE_BIG_TARGET_PORT}, nodePort: {REMOTE_BIG_NODE_PORT}}}
"#
    );
    for (family, name, addr) in [
        ("IPv4", "web-v4", NODE_B_POD_0.to_string()),
        ("IPv6", "web-v6", backend_v6.to_string()),
    ] {
        yaml.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: demo\n  labels: {{kubernetes.io/service-name: web}}\naddressType: {family}\nports:\n- {{name: http, protocol: TCP, port: {BACKEND_HTTP_PORT}}}\n- {{name: echo, protocol: UDP, port: {BACKEND_UDP_PORT}}}\n- {{name: big, protocol: UDP, port: {REMOTE_BIG_TARGET_PORT}}}\nendpoints:\n- {{addresses: [\"{addr}\"], nodeName: node-b, conditions: {{ready: true}}}}\n"
        ));
    }
    yaml
}

/// The dual-stack Service "web": both ClusterIPs ([`CLUSTER_IP`],
/// [`CLUSTER_IP6`]) and an EndpointSlice per family listing the given
/// backend pods (1..=3) of the single-node topology by their address of
/// that family.
pub fn dual_stack_web_yaml(backend_pods: &[usize]) -> String {
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: {CLUSTER_IP}
  clusterIPs: ["{CLUSTER_IP}", "{CLUSTER_IP6}"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
  - {{name: http, protocol: TCP, port: {HTTP_PORT}, targetPort: {BACKEND_HTTP_PORT}}}
  - {{name: echo, protocol: UDP, port: {UDP_PORT}, targetPort: {BACKEND_UDP_PORT}}}
"#
    );
    for (family, name) in [("IPv4", "web-v4"), ("IPv6", "web-v6")] {
        yaml.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: demo\n  labels: {{kubernetes.io/service-name: web}}\naddressType: {family}\nports:\n- {{name: http, protocol: TCP, port: {BACKEND_HTTP_PORT}}}\n- {{name: echo, protocol: UDP, port: {BACKEND_UDP_PORT}}}\nendpoints:\n"
        ));
        for pod in backend_pods {
            let v4 = Ipv4Addr::new(10, 200, *pod as u8, 2);
            let addr: IpAddr = if family == "IPv4" {
                v4.into()
            } else {
                crate::topology::ipv6_of(v4).into()
            };
            yaml.push_str(&format!("- {{addresses: [\"{addr}\"]}}\n"));
        }
    }
    yaml
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
    /// One server pair per backend pod (two in the dual-stack scenario: one
    /// per family).
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
        Self::build(tag, yaml, expected_backends, agent_args, false)
    }

    /// [`ClusterIpScenario::start_with_agent_args`] on the dual-stack node
    /// ([`SingleNode::dual_stack`]): every backend pod also serves on its
    /// IPv6 address, answering as [`backend6_name`].
    pub fn start_dual_stack(
        tag: &str,
        yaml: &str,
        expected_backends: usize,
        agent_args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::build(tag, yaml, expected_backends, agent_args, true)
    }

    fn build(
        tag: &str,
        yaml: &str,
        expected_backends: usize,
        agent_args: &[&str],
        dual_stack: bool,
    ) -> anyhow::Result<Self> {
        let workdir = tempfile::Builder::new().prefix("service-lb-").tempdir()?;
        let yaml_path = workdir.path().join("services.yaml");
        std::fs::write(&yaml_path, yaml)?;
        let pin = PinDir::new(tag)?;
        let topology = if dual_stack {
            SingleNode::dual_stack(tag, BACKENDS + 1)?
        } else {
            SingleNode::new(tag, BACKENDS + 1)?
        };
        let mut servers = Vec::new();
        for pod in 1..=BACKENDS {
            let ns = &topology.pods[pod].ns;
            servers.push(
                BackendServer::start(ns, &backend_name(pod), BACKEND_HTTP_PORT, BACKEND_UDP_PORT)
                    .with_context(|| format!("starting the servers of pod {pod}"))?,
            );
            if let Some(ip6) = topology.pods[pod].ip6 {
                servers.push(
                    BackendServer::start_on(
                        ns,
                        &backend6_name(pod),
                        IpAddr::V6(ip6),
                        BACKEND_HTTP_PORT,
                        BACKEND_UDP_PORT,
                    )
                    .with_context(|| format!("starting the IPv6 servers of pod {pod}"))?,
                );
            }
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

    /// Replaces the watched YAML atomically.
    pub fn rewrite_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        replace_file(&self.yaml, yaml)
    }
}

/// How a [`TwoNodeScenario`] is built beyond its defaults.
#[derive(Clone, Copy, Debug, Default)]
pub struct TwoNodeOptions<'a> {
    /// The topology's options.
    pub topology: TwoNodesOptions,
    /// Further arguments of both agents.
    pub agent_args: &'a [&'a str],
    /// Further arguments of node A's agent only.
    pub agent_a_args: &'a [&'a str],
    /// Start both agents without `--external-device` and `--snat-ipv4`:
    /// they detect their external devices and SNAT address themselves
    /// (give them a default route, or a Node with its addresses, in the
    /// YAML).
    pub detect_devices: bool,
}

/// Two nodes, an agent on each (node A also on its external device towards
/// the client, both SNATing to their node-network address), and every pod
/// running the test servers (HTTP on 8080, UDP on 7007) named `web-a0`,
/// `web-b1`, ... after its node and index. Dropping it stops the agents,
/// then the servers, then removes the namespaces, the pins and the work
/// folder.
pub struct TwoNodeScenario {
    /// The agents of node A and node B.
    pub agents: [AgentProcess; 2],
    /// The servers of every pod.
    pub servers: Vec<BackendServer>,
    /// Nodes, pods and the external client.
    pub topology: TwoNodes,
    /// The pin folders of node A and node B.
    pub pins: [PinDir; 2],
    /// The YAML file both agents watch.
    pub yaml: PathBuf,
    /// Work folder holding the YAML and the agents' logs.
    pub workdir: tempfile::TempDir,
}

impl TwoNodeScenario {
    /// Two dual-stack nodes with one pod each and the Service of
    /// [`dual_stack_remote_node_port_yaml`] (`node_port`) programmed on node
    /// A (its IPv4 TCP NodePort listed), "from network" on `mode` (`xdp` or
    /// `tc`) on the NodePort addresses of both families, node A SNATing
    /// IPv6 to its node-network address (`--snat-ipv6`).
    pub fn dual_stack_remote_node_port(tag: &str, mode: &str, node_port: u16) -> Self {
        let snat_v6 = crate::topology::ipv6_of(NODE_A_IP).to_string();
        TwoNodeScenario::start_with(
            &format!("{tag}{mode}"),
            1,
            &dual_stack_remote_node_port_yaml(node_port),
            TwoNodeOptions {
                topology: TwoNodesOptions {
                    dual_stack: true,
                    ..TwoNodesOptions::default()
                },
                agent_args: &[
                    "--nodeport-mode",
                    mode,
                    "--nodeport-addresses",
                    "10.99.0.0/24,fd00:10:99::/64",
                ],
                agent_a_args: &["--snat-ipv6", &snat_v6],
                ..TwoNodeOptions::default()
            },
            |_| Ok(()),
            (
                SocketAddr::from((crate::topology::NODE_A_EXTERNAL_IP, node_port)),
                "TCP",
                1,
            ),
        )
        .expect("two nodes programmed")
    }

    /// Builds the topology with `pods_per_node` pods per node, runs
    /// `prepare` on it (e.g. sysctls the agents must find), starts the
    /// servers and both agents on `yaml` (node A's with `agent_a_args` as
    /// well), and waits until node A's `list` shows `frontend`/`protocol`
    /// with `backends` backends.
    pub fn start(
        tag: &str,
        pods_per_node: usize,
        yaml: &str,
        agent_a_args: &[&str],
        prepare: impl FnOnce(&TwoNodes) -> anyhow::Result<()>,
        wait_for: (SocketAddr, &str, usize),
    ) -> anyhow::Result<Self> {
        Self::start_with(
            tag,
            pods_per_node,
            yaml,
            TwoNodeOptions {
                agent_a_args,
                ..TwoNodeOptions::default()
            },
            prepare,
            wait_for,
        )
    }

    /// [`TwoNodeScenario::start`] with the topology and both agents'
    /// arguments as `options` say.
    pub fn start_with(
        tag: &str,
        pods_per_node: usize,
        yaml: &str,
        options: TwoNodeOptions<'_>,
        prepare: impl FnOnce(&TwoNodes) -> anyhow::Result<()>,
        (frontend, protocol, backends): (SocketAddr, &str, usize),
    ) -> anyhow::Result<Self> {
        let workdir = tempfile::Builder::new().prefix("service-lb-").tempdir()?;
        let yaml_path = workdir.path().join("services.yaml");
        std::fs::write(&yaml_path, yaml)?;
        let topology = TwoNodes::with_options(tag, pods_per_node, options.topology)?;
        prepare(&topology)?;
        let mut servers = Vec::new();
        for (node, pods) in [("a", &topology.pods_a), ("b", &topology.pods_b)] {
            for (i, pod) in pods.iter().enumerate() {
                servers.push(BackendServer::start(
                    &pod.ns,
                    &format!("web-{node}{i}"),
                    BACKEND_HTTP_PORT,
                    BACKEND_UDP_PORT,
                )?);
            }
        }
        let pins = [
            PinDir::new(&format!("{tag}-a"))?,
            PinDir::new(&format!("{tag}-b"))?,
        ];
        let snat_a = NODE_A_IP.to_string();
        let mut args_a = vec![
            "--pod-device-prefix",
            POD_DEVICE_PREFIX,
            "--node-name",
            "node-a",
        ];
        if !options.detect_devices {
            args_a.extend_from_slice(&[
                "--external-device",
                EXTERNAL_DEVICE,
                "--external-device",
                NODE_NETWORK_DEVICE,
                "--snat-ipv4",
                &snat_a,
            ]);
        }
        args_a.extend_from_slice(options.agent_args);
        args_a.extend_from_slice(options.agent_a_args);
        let snat_b = NODE_B_IP.to_string();
        let mut args_b = vec![
            "--pod-device-prefix",
            POD_DEVICE_PREFIX,
            "--node-name",
            "node-b",
        ];
        if !options.detect_devices {
            args_b.extend_from_slice(&[
                "--external-device",
                NODE_NETWORK_DEVICE,
                "--snat-ipv4",
                &snat_b,
            ]);
        }
        args_b.extend_from_slice(options.agent_args);
        let mut agents = [
            AgentProcess::start_with_args(
                &topology.node_a,
                &yaml_path,
                pins[0].path(),
                &args_a,
                &workdir.path().join("agent-a.log"),
            )?,
            AgentProcess::start_with_args(
                &topology.node_b,
                &yaml_path,
                pins[1].path(),
                &args_b,
                &workdir.path().join("agent-b.log"),
            )?,
        ];
        wait_for_backends(
            &mut agents[0],
            pins[0].path(),
            frontend,
            protocol,
            backends,
            Duration::from_secs(20),
        )?;
        // Both agents attach within a tick of programming; give them one.
        std::thread::sleep(Duration::from_millis(500));
        Ok(TwoNodeScenario {
            agents,
            servers,
            topology,
            pins,
            yaml: yaml_path,
            workdir,
        })
    }

    /// Replaces the watched YAML atomically.
    pub fn rewrite_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        replace_file(&self.yaml, yaml)
    }

    /// Both agents' logs.
    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .map(AgentProcess::log)
            .collect::<Vec<_>>()
            .join("\n----\n")
    }
}

/// Replaces the file at `path` with `text` atomically (write beside it,
/// then rename), so a watcher never reads it half written.
fn replace_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let staging = path.with_extension("new");
    std::fs::write(&staging, text)?;
    std::fs::rename(&staging, path)?;
    Ok(())
}
