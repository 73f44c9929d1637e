//! End to end with the agent binary (issue 8, acceptance 3; issue 10 for
//! IPv6): UDP datagrams larger than the MTU (2000 bytes over 1500-byte
//! links, so two IP fragments each way, IPv6 ones with a fragment header)
//! through a ClusterIP, answered with 2000 bytes: every one is delivered
//! whole, and no namespace counted a bad UDP checksum or a failed
//! reassembly. (The NodePort cases with a backend on another node are in
//! e2e_nodeport.rs and e2e_ipv6_nodeport.rs, whose two-node setups they
//! share.)

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use service_common::{CT_DIR_FORWARD, FAMILY_IPV6};
use service_tests::{
    agent::{conntrack_entries, datapath_counter},
    netns::NetNs,
    require_root,
    scenario::{BACKENDS, ClusterIpScenario, web_service_yaml},
    traffic::{UdpEchoServer, echo_large_datagrams, udp_receive_errors, udp6_receive_errors},
};

/// The ClusterIP of the Service "big" (UDP echo of large datagrams).
const BIG_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const BIG_PORT: u16 = 9;
const BIG_TARGET_PORT: u16 = 9009;
/// Datagrams sent, each from a new socket (a new flow).
const DATAGRAMS: usize = 20;
/// Bytes per datagram and per answer.
const DATAGRAM_LEN: usize = 2000;

/// The IPv6 ClusterIP of the Service "big" in the dual-stack case.
const BIG_CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x12);

/// Service "big": UDP `BIG_CLUSTER_IP:BIG_PORT` to port 9009 of every
/// backend pod.
fn big_service_yaml() -> String {
    big_service_yaml_of(&[BIG_CLUSTER_IP.into()])
}

/// Service "big" with `cluster_ips` (one per family; the IPv4 one first
/// when there are two) and an EndpointSlice per family, with every backend
/// pod's address of that family (`fd00:10:200:N::2` for `10.200.N.2`: the
/// dual-stack topology's).
fn big_service_yaml_of(cluster_ips: &[IpAddr]) -> String {
    let ips: Vec<String> = cluster_ips.iter().map(|ip| format!("\"{ip}\"")).collect();
    let families: Vec<&str> = cluster_ips
        .iter()
        .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" })
        .collect();
    let mut yaml = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: big, namespace: demo}}\nspec:\n  clusterIP: {}\n  clusterIPs: [{}]\n  ipFamilies: [{}]\n  ports: [{{name: echo, protocol: UDP, port: {BIG_PORT}, targetPort: {BIG_TARGET_PORT}}}]\n",
        cluster_ips[0],
        ips.join(", "),
        families.join(", "),
    );
    for family in families {
        yaml.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: big-{family}\n  namespace: demo\n  labels: {{kubernetes.io/service-name: big}}\naddressType: {family}\nports: [{{name: echo, protocol: UDP, port: {BIG_TARGET_PORT}}}]\nendpoints:\n"
        ));
        for pod in 1..=BACKENDS {
            let addr = if family == "IPv4" {
                format!("10.200.{pod}.2")
            } else {
                format!("fd00:10:200:{pod}::2")
            };
            yaml.push_str(&format!(
                "- addresses: [\"{addr}\"]\n  conditions: {{ready: true}}\n"
            ));
        }
    }
    yaml
}

/// Sends the 2000-byte datagrams from the client pod to `frontend`: every
/// one answered whole, and no pod counted (by `receive_errors`, of the
/// frontend's family) a bad UDP checksum or a failed reassembly (the
/// counters count what the sockets never saw).
fn large_datagrams_cross(
    scenario: &ClusterIpScenario,
    frontend: SocketAddr,
    receive_errors: fn(&NetNs) -> anyhow::Result<(u64, u64)>,
) {
    let failures = echo_large_datagrams(scenario.client(), frontend, DATAGRAMS, DATAGRAM_LEN)
        .expect("client thread");
    assert!(
        failures.is_empty(),
        "{} of {DATAGRAMS} 2000-byte datagrams failed: {failures:?}\nagent log:\n{}",
        failures.len(),
        scenario.agent.log()
    );
    for pod in 0..=BACKENDS {
        assert_eq!(
            receive_errors(&scenario.topology.pods[pod].ns).unwrap(),
            (0, 0),
            "pod {pod}: UDP checksum errors, reassembly failures"
        );
    }
}

#[test]
fn udp_datagrams_larger_than_the_mtu_cross_a_cluster_ip_both_ways() {
    require_root!();
    let yaml = web_service_yaml(&[1, 2, 3]) + &big_service_yaml();
    let scenario = ClusterIpScenario::start("frag", &yaml, BACKENDS).expect("scenario");
    let _echo: Vec<UdpEchoServer> = (1..=BACKENDS)
        .map(|pod| {
            UdpEchoServer::start(&scenario.topology.pods[pod].ns, BIG_TARGET_PORT).expect("echo")
        })
        .collect();
    let frontend = SocketAddr::from((BIG_CLUSTER_IP, BIG_PORT));
    large_datagrams_cross(&scenario, frontend, udp_receive_errors);
}

/// The same over IPv6, through the packet datapath: socket-LB is limited
/// to the agent's namespace, so the client pod's datagrams reach the
/// ClusterIP as fragments (IPv6 fragment headers) that `from_pod`
/// translates, and the answers' fragments `to_pod` gives the ClusterIP
/// back; without fragment translation the later fragments keep the
/// ClusterIP (or the backend) as address and no datagram reassembles.
#[test]
fn udp_datagrams_larger_than_the_mtu_cross_an_ipv6_cluster_ip_both_ways() {
    require_root!();
    let yaml = web_service_yaml(&[1, 2, 3])
        + &big_service_yaml_of(&[BIG_CLUSTER_IP.into(), BIG_CLUSTER_IP6.into()]);
    let scenario = ClusterIpScenario::start_dual_stack(
        "frag6",
        &yaml,
        BACKENDS,
        &["--socket-lb-host-namespace-only"],
    )
    .expect("scenario");
    let _echo: Vec<UdpEchoServer> = (1..=BACKENDS)
        .map(|pod| {
            let ip6 = scenario.topology.pods[pod].ip6.expect("dual-stack pod");
            UdpEchoServer::start_on(&scenario.topology.pods[pod].ns, ip6.into(), BIG_TARGET_PORT)
                .expect("echo")
        })
        .collect();
    let frontend = SocketAddr::from((BIG_CLUSTER_IP6, BIG_PORT));
    large_datagrams_cross(&scenario, frontend, udp6_receive_errors);
    // The packet hooks translated them: a flow per datagram, tagged IPv6,
    // spread over the backends, and a later fragment translated each way
    // per datagram.
    let backends: BTreeSet<_> = conntrack_entries(scenario.pin.path())
        .expect("conntrack")
        .into_iter()
        .filter(|(key, _)| {
            key.family == FAMILY_IPV6
                && key.direction == CT_DIR_FORWARD
                && key.daddr == BIG_CLUSTER_IP6.octets()
        })
        .map(|(_, value)| Ipv6Addr::from(value.nat_addr))
        .collect();
    assert!(
        backends.len() > 1,
        "the datagrams' flows went to several backends: {backends:?}"
    );
    let translated =
        datapath_counter(scenario.pin.path(), "fragment_translated").expect("fragment counter");
    assert!(
        translated >= 2 * DATAGRAMS as u64,
        "{translated} later fragments translated"
    );
}
