//! Datapath tests of IPv6, through BPF_PROG_TEST_RUN: the IPv4 ClusterIP,
//! conntrack, refusal and NodePort cases again with IPv6 packets. The real
//! `from_pod` DNATs a pod's packet to an IPv6 ClusterIP to a backend
//! (conntrack entries tagged IPv6, the TCP/UDP checksum, all IPv6 has,
//! kept valid), `to_pod` gives the replies their frontend back, extension
//! headers are walked to the transport header, a fragment passes
//! untouched, and a new flow to a Service without endpoints is refused
//! with a TCP RST or an ICMPv6 port unreachable. From the network, an IPv6
//! NodePort is DNATed on TC (`from_network_tc`), a flow to a remote
//! backend SNATed to the node's IPv6 SNAT address by `to_network` and its
//! replies translated back both ways; XDP hands IPv6 to the TC program
//! beside it (deferred, untouched). Every output is checked
//! byte for byte against etherparse's packets, or parsed and its checksums
//! verified.

use std::net::Ipv6Addr;

use etherparse::{
    Icmpv6Type, IpNumber, Ipv6FragmentHeader, NetHeaders, PacketBuilder, PacketHeaders,
    TransportHeader, icmpv6::DestUnreachableCode,
};
use service_agent::datapath::{
    PROG_FROM_NETWORK, PROG_FROM_NETWORK_TC, PROG_FROM_POD, PROG_TO_NETWORK, PROG_TO_POD,
};
use service_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CT_DIR_SNAT, CT_DIR_SNAT_REPLY, FAMILY_IPV6,
    FRONTEND_FLAG_NODE_PORT, PROTO_TCP, PROTO_UDP, TCP_FLAG_ACK, TCP_FLAG_RST,
};
use service_tests::{
    datapath_fixture::{Datapath, ct_key},
    packets::{
        CLIENT_MAC, EXTENSION_HEADER_LEN, HOP_LIMIT, NODE_MAC, assert_checksums_valid, tcp6,
        tcp6_segment, tcp6_with_extension_headers, udp6, udp6_with_extension_headers,
    },
    require_root,
};

/// `TC_ACT_UNSPEC` as BPF_PROG_TEST_RUN reports it: the packet continues.
const CONTINUE: u32 = u32::MAX;
/// `TC_ACT_REDIRECT`: the refusal leaves through the device it came in on.
const REDIRECT: u32 = 7;

/// The client pod.
const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x200, 0, 0, 0, 0, 2);
/// The ClusterIP.
const VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// A ClusterIP whose Service has no endpoints.
const VIP_EMPTY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
/// The only backend of the ClusterIP.
const BACKEND: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x201, 0, 0, 0, 0, 7);
/// The Service port (TCP and UDP).
const PORT: u16 = 80;
/// The backend's target port.
const TARGET_PORT: u16 = 8080;
/// The client's port.
const CLIENT_PORT: u16 = 40_000;

/// A datapath with the ClusterIP `VIP:PORT` (TCP and UDP) to `BACKEND`.
fn datapath() -> Datapath {
    let mut datapath = Datapath::load();
    for proto in [PROTO_TCP, PROTO_UDP] {
        datapath.set_service(VIP, PORT, proto, &[(BACKEND, TARGET_PORT)]);
    }
    datapath
}

/// Runs `program` on `input`: the verdict is `verdict`, the output equals
/// `expected` byte for byte and its checksums are valid.
fn assert_run(datapath: &Datapath, program: &str, input: &[u8], verdict: u32, expected: &[u8]) {
    let (got, out) = datapath.run(program, input);
    assert_eq!(got, verdict, "{program}: verdict");
    assert_checksums_valid(&out, program);
    assert_eq!(out, expected, "{program}: output bytes");
}

#[test]
fn a_pod_reaches_an_ipv6_cluster_ip_and_gets_replies_from_it() {
    require_root!();
    let datapath = datapath();
    for syn in [true, false] {
        // The SYN starts the flow, the ACK after it follows it.
        let request = tcp6((CLIENT, CLIENT_PORT), (VIP, PORT), syn, !syn, b"GET /");
        let dnat = tcp6(
            (CLIENT, CLIENT_PORT),
            (BACKEND, TARGET_PORT),
            syn,
            !syn,
            b"GET /",
        );
        assert_run(&datapath, PROG_FROM_POD, &request, CONTINUE, &dnat);
    }
    let master = datapath
        .entry(&ct_key(
            (CLIENT, CLIENT_PORT),
            (VIP, PORT),
            PROTO_TCP,
            CT_DIR_FORWARD,
        ))
        .expect("the flow's master entry");
    assert_eq!(master.nat_addr, BACKEND.octets());
    assert_eq!(master.nat_port, TARGET_PORT.to_be());
    let reply_key = ct_key(
        (BACKEND, TARGET_PORT),
        (CLIENT, CLIENT_PORT),
        PROTO_TCP,
        CT_DIR_REPLY,
    );
    assert_eq!(reply_key.family, FAMILY_IPV6);
    let reply_entry = datapath.entry(&reply_key).expect("the flow's reply entry");
    assert_eq!(reply_entry.nat_addr, VIP.octets());
    assert_eq!(reply_entry.nat_port, PORT.to_be());

    // The backend's reply comes back from the ClusterIP.
    let reply = tcp6(
        (BACKEND, TARGET_PORT),
        (CLIENT, CLIENT_PORT),
        true,
        true,
        b"200 OK",
    );
    let restored = tcp6((VIP, PORT), (CLIENT, CLIENT_PORT), true, true, b"200 OK");
    assert_run(&datapath, PROG_TO_POD, &reply, CONTINUE, &restored);
}

#[test]
fn udp_over_ipv6_keeps_a_valid_checksum_both_ways() {
    require_root!();
    let datapath = datapath();
    let query = udp6((CLIENT, CLIENT_PORT), (VIP, PORT), b"query");
    let dnat = udp6((CLIENT, CLIENT_PORT), (BACKEND, TARGET_PORT), b"query");
    assert_run(&datapath, PROG_FROM_POD, &query, CONTINUE, &dnat);
    let answer = udp6((BACKEND, TARGET_PORT), (CLIENT, CLIENT_PORT), b"answer");
    let restored = udp6((VIP, PORT), (CLIENT, CLIENT_PORT), b"answer");
    assert_run(&datapath, PROG_TO_POD, &answer, CONTINUE, &restored);
    assert!(
        datapath
            .entry(&ct_key(
                (CLIENT, CLIENT_PORT),
                (VIP, PORT),
                PROTO_UDP,
                CT_DIR_FORWARD
            ))
            .is_some(),
        "the UDP flow is tracked"
    );
}

#[test]
fn extension_headers_are_walked_to_the_transport_header() {
    require_root!();
    let datapath = datapath();
    let query = udp6_with_extension_headers((CLIENT, CLIENT_PORT), (VIP, PORT), b"query");
    let dnat = udp6_with_extension_headers((CLIENT, CLIENT_PORT), (BACKEND, TARGET_PORT), b"query");
    assert_run(&datapath, PROG_FROM_POD, &query, CONTINUE, &dnat);
    let segment =
        tcp6_with_extension_headers((CLIENT, CLIENT_PORT + 1), (VIP, PORT), TCP_FLAG_ACK, b"x");
    let dnat = tcp6_with_extension_headers(
        (CLIENT, CLIENT_PORT + 1),
        (BACKEND, TARGET_PORT),
        TCP_FLAG_ACK,
        b"x",
    );
    assert_run(&datapath, PROG_FROM_POD, &segment, CONTINUE, &dnat);
    // Headers the parser walks: the UDP header sits behind both.
    assert_eq!(query.len(), 14 + 40 + 2 * EXTENSION_HEADER_LEN + 8 + 5);
}

#[test]
fn packets_that_are_none_of_ours_pass_untouched() {
    require_root!();
    let datapath = datapath();
    // Another destination.
    let other = udp6((CLIENT, CLIENT_PORT), (BACKEND, PORT), b"query");
    // A fragment (its fragment header is not parsed yet).
    let mut fragment = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(CLIENT.octets(), VIP.octets(), HOP_LIMIT)
        .write(&mut fragment, IpNumber::IPV6_FRAGMENTATION_HEADER, &{
            let mut payload =
                Ipv6FragmentHeader::new(IpNumber::UDP, 0.try_into().unwrap(), true, 7)
                    .to_bytes()
                    .to_vec();
            payload.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 16, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
            payload
        })
        .expect("build fragment");
    // A reply of no tracked flow.
    let stray = tcp6((BACKEND, TARGET_PORT), (CLIENT, 1234), false, true, b"");
    for (program, packet) in [
        (PROG_FROM_POD, &other),
        (PROG_FROM_POD, &fragment),
        (PROG_TO_POD, &stray),
    ] {
        let (verdict, out) = datapath.run(program, packet);
        assert_eq!(verdict, CONTINUE, "{program}");
        assert_eq!(&out, packet, "{program}: untouched");
    }
}

#[test]
fn a_new_flow_to_an_ipv6_service_without_endpoints_is_refused() {
    require_root!();
    let mut datapath = datapath();
    for proto in [PROTO_TCP, PROTO_UDP] {
        datapath.set_service::<Ipv6Addr>(VIP_EMPTY, PORT, proto, &[]);
    }

    // A SYN gets a RST|ACK from the ClusterIP, acknowledging the SYN.
    let syn = tcp6((CLIENT, CLIENT_PORT), (VIP_EMPTY, PORT), true, false, b"");
    let (verdict, out) = datapath.run(PROG_FROM_POD, &syn);
    assert_eq!(verdict, REDIRECT, "the RST goes back to the pod");
    assert_checksums_valid(&out, "RST");
    let headers = PacketHeaders::from_ethernet_slice(&out).expect("the RST parses");
    let Some(NetHeaders::Ipv6(ip, extensions)) = &headers.net else {
        panic!("not IPv6");
    };
    assert_eq!(
        (ip.source, ip.destination),
        (VIP_EMPTY.octets(), CLIENT.octets())
    );
    assert_eq!(ip.hop_limit, 64);
    assert!(extensions.is_empty());
    let Some(TransportHeader::Tcp(tcp)) = &headers.transport else {
        panic!("not TCP");
    };
    assert!(tcp.rst && tcp.ack && !tcp.syn);
    assert_eq!((tcp.source_port, tcp.destination_port), (PORT, CLIENT_PORT));
    assert_eq!(tcp.acknowledgment_number, 1001, "the SYN's sequence + 1");
    assert_eq!(out.len(), 14 + 40 + 20, "headers only");
    assert_eq!(
        &out[..12],
        [CLIENT_MAC, NODE_MAC].concat(),
        "MACs swapped: back to the client"
    );

    // A RST is never answered.
    let rst = tcp6_segment((CLIENT, CLIENT_PORT), (VIP_EMPTY, PORT), TCP_FLAG_RST, b"");
    assert_ne!(datapath.run(PROG_FROM_POD, &rst).0, REDIRECT);

    // A datagram gets an ICMPv6 port unreachable quoting it.
    let query = udp6((CLIENT, CLIENT_PORT), (VIP_EMPTY, PORT), b"query");
    let (verdict, out) = datapath.run(PROG_FROM_POD, &query);
    assert_eq!(verdict, REDIRECT, "the ICMPv6 error goes back to the pod");
    assert_checksums_valid(&out, "ICMPv6 port unreachable");
    let headers = PacketHeaders::from_ethernet_slice(&out).expect("the error parses");
    let Some(NetHeaders::Ipv6(ip, _)) = &headers.net else {
        panic!("not IPv6");
    };
    assert_eq!(
        (ip.source, ip.destination),
        (VIP_EMPTY.octets(), CLIENT.octets())
    );
    let Some(TransportHeader::Icmpv6(icmp)) = &headers.transport else {
        panic!("not ICMPv6");
    };
    assert_eq!(
        icmp.icmp_type,
        Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port)
    );
    // The quote: the offending IPv6 header and UDP header.
    let quote = &out[14 + 40 + 8..];
    assert_eq!(quote, &query[14..14 + 40 + 8]);
}

/// The external client.
const EXTERNAL_CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x99, 0, 0, 0, 0, 2);
/// This node's IPv6 address on the external network: the NodePort's.
const NODE_IP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x99, 0, 0, 0, 0, 1);
/// This node's IPv6 SNAT address (on the node network).
const SNAT_IP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1);
/// A backend on another node.
const REMOTE_BACKEND: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x202, 0, 0, 0, 0, 2);
/// The only SNAT port (a range of one: the translation is exact).
const SNAT_PORT: u16 = 20_000;
/// `XDP_PASS`.
const XDP_PASS: u32 = 2;

/// NodePort 30080 to `BACKEND` (on this node), 30081 to `REMOTE_BACKEND`.
fn nodeport_datapath() -> Datapath {
    let mut datapath = Datapath::load();
    datapath.set_snat_address(SNAT_IP);
    datapath.set_snat_ports(SNAT_PORT, SNAT_PORT);
    for (port, backend, local) in [(30080, BACKEND, true), (30081, REMOTE_BACKEND, false)] {
        datapath.set_frontend(
            NODE_IP,
            port,
            PROTO_TCP,
            FRONTEND_FLAG_NODE_PORT,
            &[(backend, TARGET_PORT, local)],
        );
    }
    datapath
}

#[test]
fn an_ipv6_node_port_reaches_a_local_backend_on_tc() {
    require_root!();
    let datapath = nodeport_datapath();
    let client = (EXTERNAL_CLIENT, CLIENT_PORT);
    let syn = tcp6(client, (NODE_IP, 30080), true, false, b"");
    let dnat = tcp6(client, (BACKEND, TARGET_PORT), true, false, b"");
    assert_run(&datapath, PROG_FROM_NETWORK_TC, &syn, CONTINUE, &dnat);
    let syn_ack = tcp6((BACKEND, TARGET_PORT), client, true, true, b"");
    let restored = tcp6((NODE_IP, 30080), client, true, true, b"");
    assert_run(&datapath, PROG_TO_NETWORK, &syn_ack, CONTINUE, &restored);
    // XDP hands IPv6 to the TC program beside it: untouched, marked.
    let next = tcp6(
        (EXTERNAL_CLIENT, CLIENT_PORT + 1),
        (NODE_IP, 30080),
        true,
        false,
        b"",
    );
    let (verdict, out) = datapath.run(PROG_FROM_NETWORK, &next);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out,
        [b"SLBD".as_slice(), &next].concat(),
        "deferred, untouched"
    );
}

#[test]
fn an_ipv6_node_port_reaches_a_remote_backend_through_snat() {
    require_root!();
    let datapath = nodeport_datapath();
    let client = (EXTERNAL_CLIENT, CLIENT_PORT);
    let backend = (REMOTE_BACKEND, TARGET_PORT);
    let snat = (SNAT_IP, SNAT_PORT);
    for (name, program, input, expected) in [
        (
            "the SYN is DNATed on the way in, the client kept",
            PROG_FROM_NETWORK_TC,
            tcp6(client, (NODE_IP, 30081), true, false, b""),
            tcp6(client, backend, true, false, b""),
        ),
        (
            "and SNATed on the way out to the backend's node",
            PROG_TO_NETWORK,
            tcp6(client, backend, true, false, b""),
            tcp6(snat, backend, true, false, b""),
        ),
        (
            "the SYN-ACK to the SNAT address goes to the client again",
            PROG_FROM_NETWORK_TC,
            tcp6(backend, snat, true, true, b""),
            tcp6(backend, client, true, true, b""),
        ),
        (
            "and leaves from the NodePort",
            PROG_TO_NETWORK,
            tcp6(backend, client, true, true, b""),
            tcp6((NODE_IP, 30081), client, true, true, b""),
        ),
    ] {
        let (verdict, out) = datapath.run(program, &input);
        assert_eq!(verdict, CONTINUE, "{name}: verdict");
        assert_checksums_valid(&out, name);
        assert_eq!(out, expected, "{name}: output bytes");
    }
    let snat_entry = datapath
        .entry(&ct_key(client, backend, PROTO_TCP, CT_DIR_SNAT))
        .expect("the flow's SNAT entry");
    assert_eq!(
        (snat_entry.nat_addr, snat_entry.nat_port),
        (SNAT_IP.octets(), SNAT_PORT.to_be())
    );
    assert!(
        datapath
            .entry(&ct_key(backend, snat, PROTO_TCP, CT_DIR_SNAT_REPLY))
            .is_some(),
        "the flow's SNAT reply entry"
    );
}
