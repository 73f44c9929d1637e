//! A dual-stack Service from the file source (issue 10, agent side): the
//! agent binary programs the frontends of both families into the pinned
//! maps, each family's with the endpoints of its own EndpointSlice and its
//! own family tag, writes the IPv6 SNAT address into the datapath's
//! configuration, and `list` and `/metrics` show both families, with
//! nothing of either reported as unsupported. No traffic here:
//! `e2e_host_ipv6.rs` sends it through socket-LB, `e2e_ipv6_cluster_ip.rs`
//! and `e2e_ipv6_nodeport.rs` through the packet datapath.

use std::{
    collections::BTreeSet,
    net::{Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use service_agent::datapath::{
    maps::{ServiceMaps, open_pinned},
    model::{MapReader as _, MapState, ip_from_map},
};
use service_common::{
    DatapathConfig, FAMILY_IPV4, FAMILY_IPV6, FRONTEND_FLAG_CLUSTER_IP, FRONTEND_FLAG_EXTERNAL_IP,
    FRONTEND_FLAG_LOAD_BALANCER, FRONTEND_FLAG_NODE_PORT, MAP_CONFIG, PROTO_TCP, PROTO_UDP,
};
use service_tests::{
    agent::{AgentProcess, list_json, list_table, listed_backends, metric},
    pins::PinDir,
    require_root,
    topology::{NODE_A_EXTERNAL_IP, TwoNodes, TwoNodesOptions, ipv6_of},
};

const SERVICES: &str = r#"
kind: Service
apiVersion: v1
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  externalIPs: [10.99.0.200, "2001:db8:99::200"]
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
    - {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}
status:
  loadBalancer:
    ingress: [{ip: 10.99.0.100}, {ip: "2001:db8:99::100"}]
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata:
  name: web-ipv4
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.1.1.2]}, {addresses: [10.1.2.2]}]
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata:
  name: web-ipv6
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: ["fd00:1:1::2"]}, {addresses: ["fd00:1:2::2"]}]
"#;

/// Node A's IPv6 address on its external device (`ipv6_of` 10.99.0.1),
/// on which IPv6 NodePorts are served and to which IPv6 flows would be
/// SNATed.
const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x99, 0, 0, 0, 0, 1);

/// Every frontend of one family in the maps: `address:port/proto kind ->
/// backends`, each backend checked to be of the same family.
fn frontends_of_family(maps: &MapState, family: u8) -> BTreeSet<String> {
    maps.frontends
        .iter()
        .filter(|(key, _)| key.slot == 0 && key.family == family)
        .map(|(key, header)| {
            let kind = match header.flags
                & (FRONTEND_FLAG_CLUSTER_IP
                    | FRONTEND_FLAG_NODE_PORT
                    | FRONTEND_FLAG_LOAD_BALANCER
                    | FRONTEND_FLAG_EXTERNAL_IP)
            {
                FRONTEND_FLAG_CLUSTER_IP => "ClusterIP",
                FRONTEND_FLAG_NODE_PORT => "NodePort",
                FRONTEND_FLAG_LOAD_BALANCER => "LoadBalancer",
                FRONTEND_FLAG_EXTERNAL_IP => "ExternalIP",
                other => panic!("frontend {key:?} has kind flags {other:#x}"),
            };
            let revnat = maps.revnat[&header.rev_nat_id];
            assert_eq!(
                (revnat.addr, revnat.port, revnat.family),
                (key.addr, key.port, family),
                "the rev-NAT entry of {key:?}"
            );
            let mut backends: Vec<String> = (1..=header.count)
                .map(|slot| {
                    let id = maps.frontends[&key.with_slot(slot)].backend_id;
                    let backend = maps.backends[&id];
                    assert_eq!(backend.family, family, "backend {id} of {key:?}");
                    SocketAddr::new(
                        ip_from_map(&backend.addr, backend.family),
                        u16::from_be(backend.port),
                    )
                    .to_string()
                })
                .collect();
            backends.sort();
            let proto = match key.proto {
                PROTO_TCP => "TCP",
                PROTO_UDP => "UDP",
                other => panic!("protocol {other}"),
            };
            format!(
                "{}/{proto} {kind} -> {}",
                SocketAddr::new(ip_from_map(&key.addr, key.family), u16::from_be(key.port)),
                backends.join(",")
            )
        })
        .collect()
}

#[test]
fn a_dual_stack_service_is_programmed_for_both_families_listed_and_reported() {
    require_root!();
    // Node A of the dual-stack topology: its external device holds an
    // address of each family.
    let topology = TwoNodes::with_options(
        "dual",
        0,
        TwoNodesOptions {
            dual_stack: true,
            ..TwoNodesOptions::default()
        },
    )
    .expect("dual-stack topology");
    assert_eq!(ipv6_of(NODE_A_EXTERNAL_IP), NODE_IPV6);
    let node = &topology.node_a;
    let pin = PinDir::new("dual-stack").expect("pin folder");
    let dir = tempfile::tempdir().expect("temp dir");
    let yaml = dir.path().join("services.yaml");
    std::fs::write(&yaml, SERVICES).expect("writing the YAML");
    let snat_flag = NODE_IPV6.to_string();
    let mut agent = AgentProcess::start_with_args(
        node,
        &yaml,
        pin.path(),
        &[
            "--pod-device-prefix",
            "lxc",
            "--nodeport-addresses",
            "10.99.0.0/24,fd00:10:99::/64",
            "--external-ip-cidrs",
            "10.99.0.0/24,2001:db8:99::/64",
            "--snat-ipv6",
            &snat_flag,
        ],
        &dir.path().join("agent.log"),
    )
    .expect("agent");

    // Wait until both families' ClusterIPs are listed with their backends.
    let deadline = Instant::now() + Duration::from_secs(20);
    let listing = loop {
        agent.check_running().expect("agent running");
        if let Ok(listing) = list_json(pin.path()) {
            let v6 = listed_backends(&listing, "[fd00:96::10]:53".parse().unwrap(), "UDP");
            let v4 = listed_backends(&listing, "10.96.0.10:80".parse().unwrap(), "TCP");
            if v6.is_some_and(|b| b.len() == 2) && v4.is_some_and(|b| b.len() == 2) {
                break listing;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the dual-stack Service was never listed; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        listed_backends(&listing, "[fd00:96::10]:80".parse().unwrap(), "TCP").unwrap(),
        ["[fd00:1:1::2]:8080", "[fd00:1:2::2]:8080"]
    );
    // Every frontend of both families is listed with its Service.
    let frontends = listing["frontends"].as_array().expect("frontends");
    assert_eq!(frontends.len(), 16);
    assert!(
        frontends.iter().all(|f| f["service"] == "default/web"),
        "{listing:#}"
    );

    // The pinned maps: each family's frontends with that family's
    // backends, family tags and rev-NAT entries included.
    let maps = ServiceMaps::open_pinned(pin.path())
        .expect("pinned maps")
        .read_state()
        .expect("reading the maps");
    let v4_tcp = "10.1.1.2:8080,10.1.2.2:8080";
    let v4_udp = "10.1.1.2:5353,10.1.2.2:5353";
    let v6_tcp = "[fd00:1:1::2]:8080,[fd00:1:2::2]:8080";
    let v6_udp = "[fd00:1:1::2]:5353,[fd00:1:2::2]:5353";
    let expected = |rows: &[(&str, &str, &str)]| -> BTreeSet<String> {
        rows.iter()
            .map(|(frontend, kind, backends)| format!("{frontend} {kind} -> {backends}"))
            .collect()
    };
    assert_eq!(
        frontends_of_family(&maps, FAMILY_IPV6),
        expected(&[
            ("[fd00:96::10]:80/TCP", "ClusterIP", v6_tcp),
            ("[fd00:96::10]:53/UDP", "ClusterIP", v6_udp),
            ("[fd00:10:99::1]:30080/TCP", "NodePort", v6_tcp),
            ("[fd00:10:99::1]:30053/UDP", "NodePort", v6_udp),
            ("[2001:db8:99::100]:80/TCP", "LoadBalancer", v6_tcp),
            ("[2001:db8:99::100]:53/UDP", "LoadBalancer", v6_udp),
            ("[2001:db8:99::200]:80/TCP", "ExternalIP", v6_tcp),
            ("[2001:db8:99::200]:53/UDP", "ExternalIP", v6_udp),
        ])
    );
    assert_eq!(
        frontends_of_family(&maps, FAMILY_IPV4),
        expected(&[
            ("10.96.0.10:80/TCP", "ClusterIP", v4_tcp),
            ("10.96.0.10:53/UDP", "ClusterIP", v4_udp),
            ("10.99.0.1:30080/TCP", "NodePort", v4_tcp),
            ("10.99.0.1:30053/UDP", "NodePort", v4_udp),
            ("10.99.0.100:80/TCP", "LoadBalancer", v4_tcp),
            ("10.99.0.100:53/UDP", "LoadBalancer", v4_udp),
            ("10.99.0.200:80/TCP", "ExternalIP", v4_tcp),
            ("10.99.0.200:53/UDP", "ExternalIP", v4_udp),
        ])
    );
    // The backends map holds the four endpoints at both ports, nothing else.
    assert_eq!(maps.backends.len(), 8);
    assert_eq!(
        maps.backends
            .values()
            .filter(|b| b.family == FAMILY_IPV6)
            .count(),
        4
    );

    // The IPv6 SNAT address is in the datapath's configuration.
    let config: aya::maps::Array<aya::maps::MapData, DatapathConfig> =
        aya::maps::Array::try_from(open_pinned(pin.path(), MAP_CONFIG).expect("config map"))
            .expect("config array");
    let config = config.get(&0, 0).expect("config entry");
    assert_eq!(config.snat_v6, NODE_IPV6.octets());

    // `list` prints IPv6 addresses bracketed before their port, and
    // reports nothing of either family as not supported.
    let table = list_table(pin.path()).expect("list");
    for shown in [
        "[fd00:96::10]:80",
        "[fd00:10:99::1]:30053",
        "[fd00:1:1::2]:8080",
        "10.96.0.10:80",
        "10.1.1.2:8080",
    ] {
        assert!(table.contains(shown), "{shown} not in:\n{table}");
    }
    assert!(!table.contains("not supported"), "{table}");
    assert!(!agent.log().contains("not supported"), "{}", agent.log());

    // `/metrics`: no reported field, and per-frontend counters of both
    // families.
    assert_eq!(
        metric(node, "service_agent_unsupported_fields").unwrap(),
        Some(0.0)
    );
    for frontend in ["[fd00:96::10]:80/TCP", "10.96.0.10:80/TCP"] {
        let series = format!("service_agent_frontend_flows_total{{frontend=\"{frontend}\"}}");
        assert_eq!(metric(node, &series).unwrap(), Some(0.0), "{series}");
    }
}
