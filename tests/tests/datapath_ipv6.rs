//! Datapath tests of IPv6, through BPF_PROG_TEST_RUN: the IPv4 ClusterIP,
//! conntrack, refusal and NodePort cases again with IPv6 packets. The real
//! `from_pod` DNATs a pod's packet to an IPv6 ClusterIP to a backend
//! (conntrack entries tagged IPv6, the TCP/UDP checksum, all IPv6 has,
//! kept valid), `to_pod` gives the replies their frontend back, extension
//! headers are walked to the transport header, a fragment header too (the
//! fragment cases are in datapath_fragments.rs), a pod reaching itself
//! through its IPv6 ClusterIP is hairpinned through `HAIRPIN_IPV6`, and a
//! new flow to a Service without endpoints is refused
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
    CT_DIR_FORWARD, CT_DIR_HAIRPIN_REPLY, CT_DIR_REPLY, CT_DIR_SNAT, CT_DIR_SNAT_REPLY,
    CT_FLAG_HAIRPIN, FAMILY_IPV6, FRONTEND_FLAG_NODE_PORT, HAIRPIN_IPV6, PROTO_TCP, PROTO_UDP,
    TCP_FLAG_ACK, TCP_FLAG_RST,
};
use service_tests::{
    datapath_fixture::{Datapath, ct_key},
    packets::{
        CLIENT_MAC, Case, EXTENSION_HEADER_LEN, Expect, HOP_LIMIT, NODE_MAC,
        assert_checksums_valid, run_cases, sent_back, tcp6, tcp6_segment,
        tcp6_with_extension_headers, udp6, udp6_with_extension_headers,
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
    // A reply of no tracked flow.
    let stray = tcp6((BACKEND, TARGET_PORT), (CLIENT, 1234), false, true, b"");
    for (program, packet) in [(PROG_FROM_POD, &other), (PROG_TO_POD, &stray)] {
        let (verdict, out) = datapath.run(program, packet);
        assert_eq!(verdict, CONTINUE, "{program}");
        assert_eq!(&out, packet, "{program}: untouched");
    }
}

/// A datagram of `len` payload bytes `src` -> `dst` whose IPv6 header is
/// followed by a fragment header with identification 7: offset 0 and M
/// set (a first fragment, the UDP header after the fragment header) or
/// clear (an atomic fragment, RFC 8200 4.5: a whole datagram).
fn udp6_behind_fragment_header(
    src: (Ipv6Addr, u16),
    dst: (Ipv6Addr, u16),
    more_fragments: bool,
) -> Vec<u8> {
    let udp = udp6(src, dst, b"0123456789abcdef");
    let mut packet = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(src.0.octets(), dst.0.octets(), HOP_LIMIT)
        .write(&mut packet, IpNumber::IPV6_FRAGMENTATION_HEADER, &{
            let mut payload =
                Ipv6FragmentHeader::new(IpNumber::UDP, 0.try_into().unwrap(), more_fragments, 7)
                    .to_bytes()
                    .to_vec();
            // The UDP header and payload, its checksum the whole datagram's.
            payload.extend_from_slice(&udp[14 + 40..]);
            payload
        })
        .expect("build fragment");
    packet
}

#[test]
fn a_first_fragment_and_an_atomic_fragment_are_translated() {
    require_root!();
    let datapath = datapath();
    for (more_fragments, case) in [(true, "first fragment"), (false, "atomic fragment")] {
        let client = (CLIENT, CLIENT_PORT + u16::from(more_fragments));
        let packet = udp6_behind_fragment_header(client, (VIP, PORT), more_fragments);
        let dnat = udp6_behind_fragment_header(client, (BACKEND, TARGET_PORT), more_fragments);
        let (verdict, out) = datapath.run(PROG_FROM_POD, &packet);
        assert_eq!(verdict, CONTINUE, "{case}");
        assert_eq!(out, dnat, "{case}: DNATed, UDP checksum updated");
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

/// The IPv6 hairpin address: the source a pod reaching itself through its
/// Service sees.
const HAIRPIN: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0xa9fe, 0x2a01);

/// As datapath_hairpin.rs for IPv4: `BACKEND`, reaching the ClusterIP
/// whose only backend it is, gets the flow SNATed to [`HAIRPIN`] (its port
/// kept) on every packet, its replies to that address translated back to
/// the ClusterIP, both directions sent straight back to it; another pod's
/// flow to the same ClusterIP is only DNATed.
#[test]
fn a_pod_reaching_itself_through_its_ipv6_cluster_ip_is_hairpinned() {
    require_root!();
    assert_eq!(HAIRPIN.octets(), HAIRPIN_IPV6, "the datapath's address");
    let datapath = datapath();
    let pod = (BACKEND, CLIENT_PORT);
    let hairpin = (HAIRPIN, CLIENT_PORT);
    let target = (BACKEND, TARGET_PORT);
    let vip = (VIP, PORT);
    let other = (CLIENT, CLIENT_PORT);
    let request = b"GET / HTTP/1.1\r\n\r\n";
    run_cases(
        &datapath,
        vec![
            Case {
                name: "the SYN to the ClusterIP goes back to the pod, from the hairpin address",
                program: PROG_FROM_POD,
                input: tcp6(pod, vip, true, false, &[]),
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(tcp6(hairpin, target, true, false, &[]))),
            },
            Case {
                name: "the hairpinned SYN leaving for the pod passes to_pod untouched",
                program: PROG_TO_POD,
                input: sent_back(tcp6(hairpin, target, true, false, &[])),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "the pod's SYN-ACK to the hairpin address comes back from the ClusterIP",
                program: PROG_FROM_POD,
                input: tcp6(target, hairpin, true, true, &[]),
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(tcp6(vip, pod, true, true, &[]))),
            },
            Case {
                name: "a data segment of the flow is SNATed again",
                program: PROG_FROM_POD,
                input: tcp6(pod, vip, false, true, request),
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(tcp6(hairpin, target, false, true, request))),
            },
            Case {
                name: "the pod's data reply to the hairpin address comes back from the ClusterIP",
                program: PROG_FROM_POD,
                input: tcp6(target, hairpin, false, true, b"web-1"),
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(tcp6(vip, pod, false, true, b"web-1"))),
            },
            Case {
                name: "UDP to the ClusterIP from the backend pod is hairpinned",
                program: PROG_FROM_POD,
                input: udp6(pod, vip, b"query"),
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(udp6(hairpin, target, b"query"))),
            },
            Case {
                name: "the UDP answer to the hairpin address comes back from the ClusterIP",
                program: PROG_FROM_POD,
                input: udp6(target, hairpin, b"answer"),
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(udp6(vip, pod, b"answer"))),
            },
            Case {
                name: "another pod's SYN to the same ClusterIP is only DNATed",
                program: PROG_FROM_POD,
                input: tcp6(other, vip, true, false, &[]),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp6(other, target, true, false, &[])),
            },
            Case {
                name: "the backend pod's reply to the other pod is not taken for a hairpin",
                program: PROG_FROM_POD,
                input: tcp6(target, other, true, true, &[]),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "a packet to the hairpin address of no tracked flow passes untouched",
                program: PROG_FROM_POD,
                input: tcp6(target, (HAIRPIN, 40999), false, true, &[]),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "a packet to the hairpin address from another pod passes untouched",
                program: PROG_FROM_POD,
                input: tcp6((CLIENT, TARGET_PORT), hairpin, false, true, &[]),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
        ],
    );
    assert_eq!(
        datapath.counter("reply_translated"),
        3,
        "the hairpin replies"
    );
    assert_eq!(datapath.counter("drop_rewrite"), 0);

    // The hairpin flow: a forward entry flagged hairpin, and instead of the
    // usual reply entry one keyed by the reply to the hairpin address,
    // naming the frontend to restore; both tagged IPv6.
    let forward = datapath
        .entry(&ct_key(pod, vip, PROTO_TCP, CT_DIR_FORWARD))
        .expect("forward entry of the hairpin flow");
    assert_eq!(
        (forward.nat_addr, u16::from_be(forward.nat_port)),
        (BACKEND.octets(), TARGET_PORT)
    );
    assert_eq!(forward.flags & CT_FLAG_HAIRPIN, CT_FLAG_HAIRPIN);
    let reply_key = ct_key(target, hairpin, PROTO_TCP, CT_DIR_HAIRPIN_REPLY);
    assert_eq!(reply_key.family, FAMILY_IPV6);
    let reply = datapath.entry(&reply_key).expect("hairpin reply entry");
    assert_eq!(
        (reply.nat_addr, u16::from_be(reply.nat_port)),
        (VIP.octets(), PORT)
    );
    assert_eq!(reply.flags, CT_FLAG_HAIRPIN);
    assert_eq!(reply.rev_nat_id, forward.rev_nat_id);
    assert!(
        datapath
            .entry(&ct_key(target, pod, PROTO_TCP, CT_DIR_REPLY))
            .is_none(),
        "a hairpin flow has no ordinary reply entry"
    );
    let other_forward = datapath
        .entry(&ct_key(other, vip, PROTO_TCP, CT_DIR_FORWARD))
        .expect("forward entry of the other pod's flow");
    assert_eq!(other_forward.flags & CT_FLAG_HAIRPIN, 0);
}
