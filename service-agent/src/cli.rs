//! Command-line interface of `service-agent`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use ipnet::IpNet;
use service_common::{
    ConntrackTimeouts, PROTO_TCP, PROTO_UDP, SnatPortRange, TCP_FLAG_ACK, TCP_FLAG_SYN,
};

use clap::{Args, Parser, Subcommand};

use crate::{
    datapath::{
        DEFAULT_PIN_PATH, MapSizes,
        addresses::{local_addresses, nodeport_addresses},
        attach::{DeviceSelection, NodePortMode},
        cgroup::{CgroupPath, DEFAULT_CGROUP_PATH},
        snapshot::PacketTuple,
    },
    ops::trace::{Entry, TraceRequest, packet::parse_tcp_flags, pinned_nodeport_mode},
    reconcile::translate::NodeContext,
    run::{AutoDevices, RunOptions},
    source::SourceSpec,
};

/// eBPF Service load balancer for Kubernetes: a kube-proxy replacement.
#[derive(Debug, Parser)]
#[command(name = "service-agent", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start; boxing would only obscure the clap derive"
)]
pub enum Command {
    /// Load the datapath, attach it to pod devices and keep its maps in line
    /// with the Services and EndpointSlices of the source.
    Run(RunArgs),
    /// Print every frontend with its backends and counters, read from the
    /// live pinned maps.
    List(ListArgs),
    /// Show what the datapath would do with one packet: run it through the
    /// real programs (BPF_PROG_TEST_RUN) on a private snapshot of the live
    /// pinned maps, which are never written, and print the verdict, the
    /// frontend and backend, the rewritten packet, the conntrack entries,
    /// and the reverse translation of the backend's reply.
    Trace(TraceArgs),
}

/// Flags of `service-agent run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where Services and EndpointSlices come from: `kube`, the Kubernetes
    /// API (kubeconfig, else the in-cluster config), or `file:PATH`, a
    /// multi-document YAML file of Kubernetes objects, watched for changes.
    #[arg(long, value_name = "SOURCE")]
    pub source: SourceSpec,
    /// Folder on bpffs where the maps are pinned (bpffs is mounted if needed).
    /// A restarted agent adopts the maps it finds there.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// A pod's host-side device to attach to (repeatable).
    #[arg(long = "pod-device", value_name = "NAME")]
    pub pod_devices: Vec<String>,
    /// Attach to every device whose name starts with this prefix, including
    /// devices created later (repeatable), e.g. `lxc` or `veth`.
    #[arg(long = "pod-device-prefix", value_name = "PREFIX")]
    pub pod_device_prefixes: Vec<String>,
    /// An external device (repeatable): traffic from the network to
    /// NodePort, LoadBalancer and externalIP frontends, and replies of
    /// SNATed flows, are handled there. Include the device towards other
    /// nodes. Default (none named): detected, as Cilium does, and followed
    /// while the agent runs: the devices holding the Node's InternalIP and
    /// ExternalIP addresses and the device of the default route.
    #[arg(long = "external-device", value_name = "NAME")]
    pub external_devices: Vec<String>,
    /// Hook of the "from network" program on external devices: `xdp`
    /// (native where the driver has it, generic otherwise) or `tc` (TC
    /// ingress fallback).
    #[arg(long, value_enum, default_value_t = NodePortMode::Xdp)]
    pub nodeport_mode: NodePortMode,
    /// Serve NodePorts on the node's addresses inside these CIDRs, IPv4
    /// and IPv6 (comma-separated or repeated). Default: the addresses of
    /// the external devices (never loopback or IPv6 link-local unless a
    /// CIDR includes them).
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    pub nodeport_addresses: Vec<IpNet>,
    /// Serve `spec.externalIPs` only inside these CIDRs (comma-separated or
    /// repeated). Default: none, as externalIPs let any Service owner
    /// capture traffic for any address (CVE-2020-8554).
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    pub external_ip_cidrs: Vec<IpNet>,
    /// Address flows from the network to backends on other nodes are SNATed
    /// to, so their replies come back through this node. Default: the first
    /// IPv4 address of the first external device named; with detected
    /// devices, the Node's InternalIP (else the default route device's
    /// address).
    #[arg(long, value_name = "ADDR")]
    pub snat_ipv4: Option<Ipv4Addr>,
    /// IPv6 address flows from the network to backends on other nodes are
    /// SNATed to. Default: found like the IPv4 one among the node's IPv6
    /// addresses (the Node's IPv6 InternalIP, else the first global
    /// address of the default route's device), never link-local.
    #[arg(long, value_name = "ADDR")]
    pub snat_ipv6: Option<Ipv6Addr>,
    /// Socket-LB: the cgroup v2 folder the socket programs are attached to,
    /// so processes in the node's own network (hostNetwork pods, node
    /// daemons) reach Services: their `connect` and `sendmsg` to a frontend
    /// go straight to a backend. Applies to every process in that cgroup and
    /// in every cgroup below it; the default, the root of the hierarchy, is
    /// every process on the host. `none` disables it (and removes the links
    /// a previous agent pinned).
    #[arg(long, value_name = "PATH|none", default_value = DEFAULT_CGROUP_PATH)]
    pub cgroup_path: CgroupPath,
    /// Socket-LB only for sockets of the agent's own (the host's) network
    /// namespace, as Cilium's `socketLB.hostNamespaceOnly`: pods then reach
    /// Services through the packet hooks on their devices, so the
    /// connections a service mesh (Istio, Linkerd) intercepts in the pod
    /// still carry the ClusterIP. Off by default: socket-LB also serves
    /// pods' sockets, which saves a translation per packet.
    #[arg(long)]
    pub socket_lb_host_namespace_only: bool,
    /// This node's name (default: `$NODE_NAME`, else the hostname): the Node
    /// object watched, and endpoints with this `nodeName` are node-local.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// How often the source file and the devices are checked, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub poll_interval_ms: u64,
    /// How often the maps are compared in full with the desired state and
    /// repaired, in seconds (like kube-proxy's sync period).
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub resync_interval_secs: u64,
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    pub metrics_addr: SocketAddr,
    /// Address of the `/healthz` endpoint (kube-proxy's port).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10256")]
    pub healthz_addr: SocketAddr,
    /// Capacity of the frontends map: a header plus one slot per backend, per
    /// frontend (address, port, protocol).
    #[arg(long, value_name = "ENTRIES", default_value_t = service_common::FRONTENDS_MAX_ENTRIES)]
    pub map_size_frontends: u32,
    /// Capacity of the backends map.
    #[arg(long, value_name = "ENTRIES", default_value_t = service_common::BACKENDS_MAX_ENTRIES)]
    pub map_size_backends: u32,
    /// Capacity of the reverse-NAT map and per-frontend counters: the most
    /// frontends (address, port, protocol) that can be served.
    #[arg(long, value_name = "ENTRIES", default_value_t = service_common::REVNAT_MAX_ENTRIES)]
    pub map_size_revnat: u32,
    /// Capacity of the conntrack LRU map (two entries per flow, four for
    /// a flow SNATed to a backend on another node).
    #[arg(long, value_name = "ENTRIES", default_value_t = service_common::CONNTRACK_MAX_ENTRIES)]
    pub map_size_conntrack: u32,
    /// Capacity of the fragments LRU map (one entry per fragmented IPv4 or
    /// IPv6 datagram in flight through a Service).
    #[arg(long, value_name = "ENTRIES", default_value_t = service_common::FRAGMENTS_MAX_ENTRIES)]
    pub map_size_fragments: u32,
    /// Source ports flows SNATed to this node's address get, `MIN-MAX`.
    /// The default lies outside Linux's default ephemeral range
    /// (32768-60999) and the NodePort range (30000-32767), so no host
    /// socket picks one of them by itself.
    #[arg(long, value_name = "MIN-MAX", default_value = "20000-29999", value_parser = parse_port_range)]
    pub snat_port_range: SnatPortRange,
    /// Conntrack timeouts, in seconds. A flow's entries are treated as gone
    /// once idle for longer than the timeout of its state.
    #[command(flatten)]
    pub ct_timeouts: ConntrackTimeoutArgs,
    /// Longest time between two conntrack collector passes, in seconds. The
    /// collector paces itself between 1 s and this: sooner when a pass
    /// freed much of the map, later when it freed little, and at once when
    /// the datapath runs out of SNAT ports or conntrack room.
    #[arg(long, value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub ct_gc_max_interval_secs: u64,
}

/// The conntrack timeouts (`--ct-timeout-*`), in seconds.
#[derive(Debug, Args)]
pub struct ConntrackTimeoutArgs {
    /// TCP: a SYN was seen, no reply yet.
    #[arg(long = "ct-timeout-tcp-syn", value_name = "SECONDS", default_value_t = ConntrackTimeouts::DEFAULT.tcp_syn, value_parser = timeout_parser())]
    pub tcp_syn: u32,
    /// TCP: established (a reply seen, no FIN or RST).
    #[arg(long = "ct-timeout-tcp-established", value_name = "SECONDS", default_value_t = ConntrackTimeouts::DEFAULT.tcp_established, value_parser = timeout_parser())]
    pub tcp_established: u32,
    /// TCP: a FIN in one direction.
    #[arg(long = "ct-timeout-tcp-fin", value_name = "SECONDS", default_value_t = ConntrackTimeouts::DEFAULT.tcp_fin, value_parser = timeout_parser())]
    pub tcp_fin: u32,
    /// TCP: FINs in both directions, or a RST; also flows of a deleted Service.
    #[arg(long = "ct-timeout-tcp-close", value_name = "SECONDS", default_value_t = ConntrackTimeouts::DEFAULT.tcp_close, value_parser = timeout_parser())]
    pub tcp_close: u32,
    /// UDP: no reply yet, or a reply within 2 s of the first datagram
    /// (request/response, such as DNS).
    #[arg(long = "ct-timeout-udp", value_name = "SECONDS", default_value_t = ConntrackTimeouts::DEFAULT.udp, value_parser = timeout_parser())]
    pub udp: u32,
    /// UDP: replied and older than 2 s (a stream).
    #[arg(long = "ct-timeout-udp-stream", value_name = "SECONDS", default_value_t = ConntrackTimeouts::DEFAULT.udp_stream, value_parser = timeout_parser())]
    pub udp_stream: u32,
}

impl ConntrackTimeoutArgs {
    /// The timeouts as the datapath's configuration holds them.
    pub fn timeouts(&self) -> ConntrackTimeouts {
        ConntrackTimeouts {
            tcp_syn: self.tcp_syn,
            tcp_established: self.tcp_established,
            tcp_fin: self.tcp_fin,
            tcp_close: self.tcp_close,
            udp: self.udp,
            udp_stream: self.udp_stream,
        }
    }
}

/// Timeouts run from 1 s to about 68 years (the datapath compares them as
/// signed 32-bit seconds).
fn timeout_parser() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=i32::MAX as i64)
}

/// Parses `MIN-MAX` (both included, `1 <= MIN <= MAX <= 65535`).
fn parse_port_range(text: &str) -> Result<SnatPortRange, String> {
    let (min, max) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not MIN-MAX"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|e| format!("{p:?} is not a port: {e}"))
    };
    let (min, max) = (port(min)?, port(max)?);
    if min == 0 || max < min {
        return Err(format!("{text:?}: need 1 <= MIN <= MAX"));
    }
    Ok(SnatPortRange { min, max })
}

/// Flags of `service-agent list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Folder on bpffs where the agent pinned the maps.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `service-agent trace`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
  service-agent trace --from 10.200.0.2:40000 --to 10.96.0.10:80\n  \
  service-agent trace --from 10.200.0.2:40000 --to 10.96.0.10:80 --established\n  \
  service-agent trace --from [fd00:10:200::2]:40000 --to [fd00:96::10]:80\n  \
  service-agent trace --from-network --device eth0 --from 192.0.2.7:50000 --to 10.0.0.1:30080 --proto tcp")]
pub struct TraceArgs {
    /// The packet's source, `ADDR:PORT` (`[ADDR]:PORT` for IPv6): a pod on
    /// this node, or with `--from-network` a client outside it.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_endpoint)]
    pub from: SocketAddr,
    /// The packet's destination, `ADDR:PORT` of the source's family: a
    /// ClusterIP, a node address with a NodePort, a LoadBalancer IP or an
    /// externalIP.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_endpoint)]
    pub to: SocketAddr,
    /// The packet's protocol.
    #[arg(long, value_enum, default_value_t = TraceProtocol::Tcp)]
    pub proto: TraceProtocol,
    /// The packet comes from the network (an external device): it enters
    /// `from_network` (XDP or TC, as the agent attached it) instead of
    /// `from_pod`.
    #[arg(long)]
    pub from_network: bool,
    /// The external device the packet arrives on: its pinned links tell
    /// whether the agent attached `from_network` as XDP or TC there.
    #[arg(long, value_name = "NAME", requires = "from_network")]
    pub device: Option<String>,
    /// Run `from_network` on this hook instead of the one the pinned links
    /// show.
    #[arg(long, value_enum, requires = "from_network")]
    pub nodeport_mode: Option<NodePortMode>,
    /// Probe an existing flow: send an ACK instead of the SYN that opens a
    /// new one (TCP).
    #[arg(long, conflicts_with = "flags")]
    pub established: bool,
    /// The TCP flags to send, comma-separated: `syn`, `ack`, `fin`, `rst`,
    /// `psh` (default `syn`; `ack` with `--established`).
    #[arg(long, value_name = "FLAGS", value_parser = parse_tcp_flags)]
    pub flags: Option<u8>,
    /// Folder on bpffs where the agent pinned the maps.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A protocol `trace` sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TraceProtocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// Parses `ADDR:PORT`, `[ADDR]:PORT` for IPv6.
fn parse_endpoint(text: &str) -> Result<SocketAddr, String> {
    text.trim()
        .parse::<SocketAddr>()
        .map_err(|_| format!("{text:?} is not an ADDR:PORT (e.g. 10.96.0.10:80, [fd00:96::10]:80)"))
}

impl TraceArgs {
    /// The trace these flags ask for.
    pub fn request(&self) -> anyhow::Result<TraceRequest> {
        let proto = match self.proto {
            TraceProtocol::Tcp => PROTO_TCP,
            TraceProtocol::Udp => PROTO_UDP,
        };
        if proto == PROTO_UDP && self.flags.is_some() {
            anyhow::bail!("--flags applies to TCP only");
        }
        let tcp_flags = match (self.flags, self.established) {
            (Some(flags), _) => flags,
            (None, true) => TCP_FLAG_ACK,
            (None, false) => TCP_FLAG_SYN,
        };
        let entry =
            if self.from_network {
                Entry::Network(self.nodeport_mode.unwrap_or_else(|| {
                    pinned_nodeport_mode(&self.pin_path, self.device.as_deref())
                }))
            } else {
                Entry::Pod
            };
        if self.from.is_ipv4() != self.to.is_ipv4() {
            anyhow::bail!(
                "--from {} and --to {} are of two families: give both IPv4 or both IPv6",
                self.from,
                self.to
            );
        }
        Ok(TraceRequest {
            tuple: PacketTuple {
                saddr: self.from.ip(),
                sport: self.from.port(),
                daddr: self.to.ip(),
                dport: self.to.port(),
                proto,
                ip_id: 0,
            },
            tcp_flags,
            entry,
            pin_path: self.pin_path.clone(),
        })
    }
}

impl RunArgs {
    /// The options `run` works with.
    pub fn options(&self) -> anyhow::Result<RunOptions> {
        // Without --external-device, `run` detects the external devices,
        // the NodePort addresses and the SNAT address itself.
        let auto_devices = self.external_devices.is_empty().then(|| {
            AutoDevices::new(
                self.nodeport_addresses.clone(),
                self.snat_ipv4,
                self.snat_ipv6,
            )
        });
        let local = local_addresses()?;
        let nodeport_addresses =
            nodeport_addresses(&local, &self.external_devices, &self.nodeport_addresses);
        let snat_ipv4 = self.snat_ipv4.or_else(|| {
            let first = self.external_devices.first()?;
            local.iter().find_map(|(dev, addr)| match addr {
                IpAddr::V4(v4) if dev == first => Some(*v4),
                _ => None,
            })
        });
        let snat_ipv6 = self.snat_ipv6.or_else(|| {
            let first = self.external_devices.first()?;
            local.iter().find_map(|(dev, addr)| match addr {
                IpAddr::V6(v6) if dev == first && !v6.is_unicast_link_local() => Some(*v6),
                _ => None,
            })
        });
        Ok(RunOptions {
            source: self.source.clone(),
            pin_path: self.pin_path.clone(),
            devices: DeviceSelection {
                names: self.pod_devices.clone(),
                prefixes: self.pod_device_prefixes.clone(),
                external: self.external_devices.clone(),
                nodeport_mode: self.nodeport_mode,
            },
            node_name: self
                .node_name
                .clone()
                .or_else(|| nix::unistd::gethostname().ok()?.into_string().ok()),
            // (Not on IPv6 link-local addresses, which a socket binds only
            // with a scope.)
            health_check_addresses: if self.nodeport_addresses.is_empty() {
                Vec::new()
            } else {
                nodeport_addresses
                    .iter()
                    .filter(|addr| match addr {
                        IpAddr::V6(v6) => !v6.is_unicast_link_local(),
                        IpAddr::V4(_) => true,
                    })
                    .copied()
                    .collect()
            },
            node: NodeContext {
                nodeport_addresses,
                external_ip_cidrs: self.external_ip_cidrs.clone(),
            },
            snat_ipv4,
            snat_ipv6,
            cgroup_path: self.cgroup_path.clone(),
            socket_lb_host_namespace_only: self.socket_lb_host_namespace_only,
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            resync_interval: Duration::from_secs(self.resync_interval_secs),
            metrics_addr: self.metrics_addr,
            healthz_addr: self.healthz_addr,
            map_sizes: MapSizes {
                frontends: self.map_size_frontends,
                backends: self.map_size_backends,
                revnat: self.map_size_revnat,
                conntrack: self.map_size_conntrack,
                fragments: self.map_size_fragments,
            },
            snat_ports: self.snat_port_range,
            ct_timeouts: self.ct_timeouts.timeouts(),
            ct_gc_max_interval: Duration::from_secs(self.ct_gc_max_interval_secs),
            auto_devices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snat_port_ranges_parse_and_reject_nonsense() {
        assert_eq!(
            parse_port_range("20000-29999"),
            Ok(SnatPortRange {
                min: 20000,
                max: 29999
            })
        );
        assert_eq!(
            parse_port_range("7-7"),
            Ok(SnatPortRange { min: 7, max: 7 })
        );
        for bad in ["", "20000", "0-10", "10-9", "1-70000", "a-b"] {
            assert!(parse_port_range(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn without_external_devices_they_are_detected_and_named_ones_are_kept() {
        let options = |extra: &[&str]| {
            let mut args = vec!["service-agent", "run", "--source", "kube"];
            args.extend_from_slice(extra);
            let Command::Run(args) = Cli::parse_from(args).command else {
                panic!("run expected");
            };
            args.options().unwrap()
        };
        // No device flag at all is fine now: the DaemonSet's case.
        let detected = options(&[]);
        assert!(detected.auto_devices.is_some());
        assert!(!detected.socket_lb_host_namespace_only);
        let named = options(&["--external-device", "lo", "--socket-lb-host-namespace-only"]);
        assert!(named.auto_devices.is_none());
        assert_eq!(named.devices.external, ["lo"]);
        assert!(named.socket_lb_host_namespace_only);
    }

    #[test]
    fn ipv6_snat_and_nodeport_cidrs_are_taken_from_the_flags() {
        let Command::Run(args) = Cli::parse_from([
            "service-agent",
            "run",
            "--source",
            "kube",
            "--external-device",
            "lo",
            "--snat-ipv6",
            "fd00:10:99::1",
            "--nodeport-addresses",
            "10.0.0.0/8,::1/128",
        ])
        .command
        else {
            panic!("run expected");
        };
        // A CIDR of each family.
        assert!(args.nodeport_addresses[0].addr().is_ipv4());
        assert!(args.nodeport_addresses[1].addr().is_ipv6());
        let options = args.options().unwrap();
        assert_eq!(options.snat_ipv6, Some("fd00:10:99::1".parse().unwrap()));
        assert!(Cli::try_parse_from(["service-agent", "run", "--snat-ipv6", "10.0.0.1"]).is_err());
    }

    #[test]
    fn defaults_are_the_design_values() {
        let cli = Cli::parse_from([
            "service-agent",
            "run",
            "--source",
            "file:/x",
            "--pod-device",
            "x",
        ]);
        let Command::Run(args) = cli.command else {
            panic!("run expected");
        };
        assert_eq!(args.ct_timeouts.timeouts(), ConntrackTimeouts::DEFAULT);
        assert_eq!(args.snat_port_range, SnatPortRange::DEFAULT);
        let cli = Cli::parse_from([
            "service-agent",
            "run",
            "--source",
            "file:/x",
            "--pod-device",
            "x",
            "--ct-timeout-udp",
            "3",
            "--snat-port-range",
            "40000-40009",
        ]);
        let Command::Run(args) = cli.command else {
            panic!("run expected");
        };
        assert_eq!(args.ct_timeouts.timeouts().udp, 3);
        assert_eq!(args.snat_port_range.port_count(), 10);
    }

    fn trace_request(args: &[&str]) -> anyhow::Result<TraceRequest> {
        let cli = Cli::try_parse_from(["service-agent", "trace"].iter().chain(args))?;
        let Command::Trace(args) = cli.command else {
            panic!("trace expected");
        };
        args.request()
    }

    #[test]
    fn trace_sends_a_syn_from_a_pod_by_default_and_an_ack_to_probe_a_flow() {
        let request =
            trace_request(&["--from", "10.200.0.2:40000", "--to", "10.96.0.10:80"]).unwrap();
        assert_eq!(request.entry, Entry::Pod);
        assert_eq!(request.tcp_flags, TCP_FLAG_SYN);
        assert_eq!(
            request.tuple,
            PacketTuple {
                saddr: Ipv4Addr::new(10, 200, 0, 2).into(),
                sport: 40000,
                daddr: Ipv4Addr::new(10, 96, 0, 10).into(),
                dport: 80,
                proto: PROTO_TCP,
                ip_id: 0,
            }
        );
        assert_eq!(request.pin_path, PathBuf::from(DEFAULT_PIN_PATH));
        let established = trace_request(&[
            "--from",
            "10.200.0.2:40000",
            "--to",
            "10.96.0.10:80",
            "--established",
        ])
        .unwrap();
        assert_eq!(established.tcp_flags, TCP_FLAG_ACK);
        let flags = trace_request(&[
            "--from",
            "10.200.0.2:40000",
            "--to",
            "10.96.0.10:80",
            "--flags",
            "fin,ack",
        ])
        .unwrap();
        assert_eq!(flags.tcp_flags, TCP_FLAG_ACK | service_common::TCP_FLAG_FIN);
    }

    #[test]
    fn trace_takes_ipv6_tuples_and_refuses_two_families() {
        let request = trace_request(&[
            "--from",
            "[fd00:10:200::2]:40000",
            "--to",
            "[fd00:96::10]:80",
        ])
        .unwrap();
        assert_eq!(
            request.tuple.saddr,
            "fd00:10:200::2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            request.tuple.daddr,
            "fd00:96::10".parse::<IpAddr>().unwrap()
        );
        assert_eq!(request.tuple.dport, 80);
        let error =
            trace_request(&["--from", "10.200.0.2:40000", "--to", "[fd00:96::10]:80"]).unwrap_err();
        assert!(error.to_string().contains("two families"), "{error}");
    }

    #[test]
    fn trace_from_the_network_takes_the_mode_asked_or_pinned() {
        let request = trace_request(&[
            "--from-network",
            "--from",
            "10.99.0.2:50000",
            "--to",
            "10.99.0.1:30080",
            "--proto",
            "udp",
            "--nodeport-mode",
            "tc",
        ])
        .unwrap();
        assert_eq!(request.entry, Entry::Network(NodePortMode::Tc));
        assert_eq!(request.tuple.proto, PROTO_UDP);
        // Nothing pinned there: no XDP link, so TC.
        let request = trace_request(&[
            "--from-network",
            "--device",
            "ext0",
            "--from",
            "10.99.0.2:50000",
            "--to",
            "10.99.0.1:30080",
            "--pin-path",
            "/nonexistent/pins",
        ])
        .unwrap();
        assert_eq!(request.entry, Entry::Network(NodePortMode::Tc));
    }

    #[test]
    fn trace_rejects_what_it_cannot_send_with_a_clear_reason() {
        let error = |args: &[&str]| trace_request(args).unwrap_err().to_string();
        let bad = error(&["--from", "10.200.0.x:40000", "--to", "10.96.0.10:80"]);
        assert!(
            bad.contains("\"10.200.0.x:40000\" is not an ADDR:PORT"),
            "{bad}"
        );
        let no_port = error(&["--from", "10.200.0.2", "--to", "10.96.0.10:80"]);
        assert!(no_port.contains("is not an ADDR:PORT"), "{no_port}");
        let missing = error(&["--from", "10.200.0.2:1"]);
        assert!(missing.contains("--to"), "{missing}");
        let device = error(&[
            "--from",
            "10.200.0.2:1",
            "--to",
            "10.96.0.10:80",
            "--device",
            "eth0",
        ]);
        assert!(device.contains("--from-network"), "{device}");
        let udp_flags = error(&[
            "--from",
            "10.200.0.2:1",
            "--to",
            "10.96.0.10:80",
            "--proto",
            "udp",
            "--flags",
            "syn",
        ]);
        assert!(udp_flags.contains("TCP only"), "{udp_flags}");
        let both = error(&[
            "--from",
            "10.200.0.2:1",
            "--to",
            "10.96.0.10:80",
            "--flags",
            "syn",
            "--established",
        ]);
        assert!(both.contains("cannot be used with"), "{both}");
    }
}
