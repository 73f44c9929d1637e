//! Datapath tests of ICMP and ICMPv6 errors about translated flows,
//! through BPF_PROG_TEST_RUN: a "fragmentation needed", "packet too big"
//! or "unreachable" about a flow to a ClusterIP reaches the client quoting
//! the ClusterIP, so path MTU discovery works through a Service. Exact
//! bytes, checksums verified.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{Icmpv4Type, PacketBuilder, icmpv4::DestUnreachableHeader};
use service_agent::datapath::{
    PROG_FROM_NETWORK, PROG_FROM_NETWORK_TC, PROG_FROM_POD, PROG_TO_NETWORK, PROG_TO_POD,
};
use service_common::{FRONTEND_FLAG_NODE_PORT, PROTO_TCP, PROTO_UDP};
use service_tests::{
    datapath_fixture::Datapath,
    packets::{
        CLIENT_MAC, Case, Expect, NODE_MAC, icmpv6_packet_too_big, run_cases, tcp, tcp6, udp, udp6,
    },
    require_root,
};

/// `TC_ACT_UNSPEC` as BPF_PROG_TEST_RUN reports it: the packet continues.
const CONTINUE: u32 = u32::MAX;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// An ICMP error from `from` to `to` quoting `packet` (an Ethernet frame;
/// its IPv4 header and everything after it are quoted).
fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, kind: DestUnreachableHeader, packet: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(NODE_MAC, CLIENT_MAC)
        .ipv4(from.octets(), to.octets(), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(kind))
        .write(&mut out, &packet[14..])
        .expect("build ICMP error");
    out
}

const FRAG_NEEDED: DestUnreachableHeader =
    DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1200 };

#[test]
fn icmp_errors_about_a_translated_flow_quote_the_frontend() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_service(VIP, 53, PROTO_UDP, &[(BACKEND, 5353)]);
    dp.set_service(VIP, 80, PROTO_TCP, &[(BACKEND, 8080)]);
    let udp_client = (CLIENT, 50000);
    let tcp_client = (CLIENT, 40000);
    let big_query = vec![0x5a; 1400];
    run_cases(
        &dp,
        vec![
            Case {
                name: "a UDP datagram to the ClusterIP is DNATed",
                program: PROG_FROM_POD,
                input: udp(udp_client, (VIP, 53), &big_query),
                verdict: CONTINUE,
                expect: Expect::Bytes(udp(udp_client, (BACKEND, 5353), &big_query)),
            },
            Case {
                name: "the backend's fragmentation needed comes from and quotes the ClusterIP",
                program: PROG_TO_POD,
                input: icmp_error(
                    BACKEND,
                    CLIENT,
                    FRAG_NEEDED,
                    &udp(udp_client, (BACKEND, 5353), &big_query[..64]),
                ),
                verdict: CONTINUE,
                expect: Expect::Bytes(icmp_error(
                    VIP,
                    CLIENT,
                    FRAG_NEEDED,
                    &udp(udp_client, (VIP, 53), &big_query[..64]),
                )),
            },
            Case {
                name: "a TCP SYN to the ClusterIP is DNATed",
                program: PROG_FROM_POD,
                input: tcp(tcp_client, (VIP, 80), true, false, &[]),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(tcp_client, (BACKEND, 8080), true, false, &[])),
            },
            Case {
                name: "a router's error keeps the router as source, quoting the ClusterIP",
                program: PROG_TO_POD,
                input: icmp_error(
                    ROUTER,
                    CLIENT,
                    DestUnreachableHeader::Host,
                    &tcp(tcp_client, (BACKEND, 8080), true, false, &[]),
                ),
                verdict: CONTINUE,
                expect: Expect::Bytes(icmp_error(
                    ROUTER,
                    CLIENT,
                    DestUnreachableHeader::Host,
                    &tcp(tcp_client, (VIP, 80), true, false, &[]),
                )),
            },
            Case {
                name: "an error about an untracked flow passes untouched",
                program: PROG_TO_POD,
                input: icmp_error(
                    BACKEND,
                    CLIENT,
                    FRAG_NEEDED,
                    &udp((CLIENT, 50999), (BACKEND, 5353), b"x"),
                ),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
        ],
    );
}

const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x200, 0, 0, 0, 0, 2);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x201, 0, 0, 0, 0, 7);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x201, 0, 0, 0, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// The MTU the IPv6 errors report (IPv6's minimum).
const MTU6: u32 = 1280;

#[test]
fn icmpv6_packet_too_big_about_a_translated_flow_quotes_the_frontend() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_service(VIP6, 53, PROTO_UDP, &[(BACKEND6, 5353)]);
    dp.set_service(VIP6, 80, PROTO_TCP, &[(BACKEND6, 8080)]);
    let udp_client = (CLIENT6, 50000);
    let tcp_client = (CLIENT6, 40000);
    let big_query = vec![0x5a; 1400];
    let segment = vec![0x6b; 1400];
    run_cases(
        &dp,
        vec![
            Case {
                name: "a UDP datagram to the IPv6 ClusterIP is DNATed",
                program: PROG_FROM_POD,
                input: udp6(udp_client, (VIP6, 53), &big_query),
                verdict: CONTINUE,
                expect: Expect::Bytes(udp6(udp_client, (BACKEND6, 5353), &big_query)),
            },
            Case {
                name: "the backend's packet too big comes from and quotes the ClusterIP",
                program: PROG_TO_POD,
                input: icmpv6_packet_too_big(
                    BACKEND6,
                    CLIENT6,
                    MTU6,
                    &udp6(udp_client, (BACKEND6, 5353), &big_query),
                ),
                verdict: CONTINUE,
                expect: Expect::Bytes(icmpv6_packet_too_big(
                    VIP6,
                    CLIENT6,
                    MTU6,
                    &udp6(udp_client, (VIP6, 53), &big_query),
                )),
            },
            Case {
                name: "a TCP segment to the IPv6 ClusterIP is DNATed",
                program: PROG_FROM_POD,
                input: tcp6(tcp_client, (VIP6, 80), true, false, &segment),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp6(tcp_client, (BACKEND6, 8080), true, false, &segment)),
            },
            Case {
                name: "a router's packet too big keeps the router as source, quoting the ClusterIP",
                program: PROG_TO_POD,
                input: icmpv6_packet_too_big(
                    ROUTER6,
                    CLIENT6,
                    MTU6,
                    &tcp6(tcp_client, (BACKEND6, 8080), true, false, &segment),
                ),
                verdict: CONTINUE,
                expect: Expect::Bytes(icmpv6_packet_too_big(
                    ROUTER6,
                    CLIENT6,
                    MTU6,
                    &tcp6(tcp_client, (VIP6, 80), true, false, &segment),
                )),
            },
            Case {
                name: "the same error on the way to the network is translated too",
                program: PROG_TO_NETWORK,
                input: icmpv6_packet_too_big(
                    BACKEND6,
                    CLIENT6,
                    MTU6,
                    &udp6(udp_client, (BACKEND6, 5353), &big_query),
                ),
                verdict: CONTINUE,
                expect: Expect::Bytes(icmpv6_packet_too_big(
                    VIP6,
                    CLIENT6,
                    MTU6,
                    &udp6(udp_client, (VIP6, 53), &big_query),
                )),
            },
            Case {
                name: "an IPv6 error about an untracked flow passes untouched",
                program: PROG_TO_POD,
                input: icmpv6_packet_too_big(
                    BACKEND6,
                    CLIENT6,
                    MTU6,
                    &udp6((CLIENT6, 50999), (BACKEND6, 5353), b"x"),
                ),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
        ],
    );
}

/// An external client.
const EXTERNAL_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// This node's address on the external network: the NodePort's.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// This node's SNAT address.
const SNAT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// A backend on another node, and a router on the way to it.
const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);
const REMOTE_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 1);
const EXTERNAL_CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x99, 0, 0, 0, 0, 2);
const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x99, 0, 0, 0, 0, 1);
const SNAT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1);
const REMOTE_BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x202, 0, 0, 0, 0, 2);
const REMOTE_ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x202, 0, 0, 0, 0, 1);
/// The UDP NodePort to the remote backend.
const NODE_PORT: u16 = 30053;
/// The only SNAT port (a range of one: the translation is exact).
const SNAT_PORT: u16 = 20_000;
/// `XDP_PASS`.
const XDP_PASS: u32 = 2;

/// The NodePort `NODE_PORT`/UDP of both families to the remote backends,
/// SNATed to the one port `SNAT_PORT`.
fn nodeport_datapath() -> Datapath {
    let mut dp = Datapath::load();
    dp.set_snat_address(SNAT_IP);
    dp.set_snat_address(SNAT_IP6);
    dp.set_snat_ports(SNAT_PORT, SNAT_PORT);
    dp.set_frontend(
        NODE_IP,
        NODE_PORT,
        PROTO_UDP,
        FRONTEND_FLAG_NODE_PORT,
        &[(REMOTE_BACKEND, 5353, false)],
    );
    dp.set_frontend(
        NODE_IP6,
        NODE_PORT,
        PROTO_UDP,
        FRONTEND_FLAG_NODE_PORT,
        &[(REMOTE_BACKEND6, 5353, false)],
    );
    dp
}

#[test]
fn icmp_errors_about_an_snated_node_port_flow_reach_its_client_from_the_node_port() {
    require_root!();
    let dp = nodeport_datapath();
    let client = (EXTERNAL_CLIENT, 50000);
    let backend = (REMOTE_BACKEND, 5353);
    let snat = (SNAT_IP, SNAT_PORT);
    let query = vec![0x5a; 1400];
    let quoted = &query[..64];
    let mut cases = vec![
        Case {
            name: "the datagram to the NodePort is DNATed on XDP",
            program: PROG_FROM_NETWORK,
            input: udp(client, (NODE_IP, NODE_PORT), &query),
            verdict: XDP_PASS,
            expect: Expect::Bytes(udp(client, backend, &query)),
        },
        Case {
            name: "and SNATed on the way out to the backend's node",
            program: PROG_TO_NETWORK,
            input: udp(client, backend, &query),
            verdict: CONTINUE,
            expect: Expect::Bytes(udp(snat, backend, &query)),
        },
    ];
    for (program, verdict) in [
        (PROG_FROM_NETWORK, XDP_PASS),
        (PROG_FROM_NETWORK_TC, CONTINUE),
    ] {
        cases.push(Case {
            name: "the backend's error to the SNAT address goes to the client again",
            program,
            input: icmp_error(
                REMOTE_BACKEND,
                SNAT_IP,
                FRAG_NEEDED,
                &udp(snat, backend, quoted),
            ),
            verdict,
            expect: Expect::Bytes(icmp_error(
                REMOTE_BACKEND,
                EXTERNAL_CLIENT,
                FRAG_NEEDED,
                &udp(client, backend, quoted),
            )),
        });
    }
    cases.extend([
        Case {
            name: "and leaves from the NodePort, quoting it",
            program: PROG_TO_NETWORK,
            input: icmp_error(
                REMOTE_BACKEND,
                EXTERNAL_CLIENT,
                FRAG_NEEDED,
                &udp(client, backend, quoted),
            ),
            verdict: CONTINUE,
            expect: Expect::Bytes(icmp_error(
                NODE_IP,
                EXTERNAL_CLIENT,
                FRAG_NEEDED,
                &udp(client, (NODE_IP, NODE_PORT), quoted),
            )),
        },
        Case {
            name: "a router's error goes to the client, the router kept as source",
            program: PROG_FROM_NETWORK,
            input: icmp_error(
                REMOTE_ROUTER,
                SNAT_IP,
                DestUnreachableHeader::Host,
                &udp(snat, backend, quoted),
            ),
            verdict: XDP_PASS,
            expect: Expect::Bytes(icmp_error(
                REMOTE_ROUTER,
                EXTERNAL_CLIENT,
                DestUnreachableHeader::Host,
                &udp(client, backend, quoted),
            )),
        },
        Case {
            name: "an error about another SNAT port passes untouched",
            program: PROG_FROM_NETWORK,
            input: icmp_error(
                REMOTE_BACKEND,
                SNAT_IP,
                FRAG_NEEDED,
                &udp((SNAT_IP, SNAT_PORT + 1), backend, quoted),
            ),
            verdict: XDP_PASS,
            expect: Expect::Untouched,
        },
        Case {
            name: "an error for another address passes untouched",
            program: PROG_FROM_NETWORK,
            input: icmp_error(
                REMOTE_BACKEND,
                NODE_IP,
                FRAG_NEEDED,
                &udp(snat, backend, quoted),
            ),
            verdict: XDP_PASS,
            expect: Expect::Untouched,
        },
    ]);
    run_cases(&dp, cases);
}

#[test]
fn icmpv6_packet_too_big_about_an_snated_node_port_flow_reaches_its_client() {
    require_root!();
    let dp = nodeport_datapath();
    let client = (EXTERNAL_CLIENT6, 50000);
    let backend = (REMOTE_BACKEND6, 5353);
    let snat = (SNAT_IP6, SNAT_PORT);
    let query = vec![0x5a; 1400];
    run_cases(
        &dp,
        vec![
            Case {
                name: "the datagram to the IPv6 NodePort is DNATed on TC",
                program: PROG_FROM_NETWORK_TC,
                input: udp6(client, (NODE_IP6, NODE_PORT), &query),
                verdict: CONTINUE,
                expect: Expect::Bytes(udp6(client, backend, &query)),
            },
            Case {
                name: "and SNATed on the way out to the backend's node",
                program: PROG_TO_NETWORK,
                input: udp6(client, backend, &query),
                verdict: CONTINUE,
                expect: Expect::Bytes(udp6(snat, backend, &query)),
            },
            Case {
                name: "the backend's packet too big to the SNAT address goes to the client again",
                program: PROG_FROM_NETWORK_TC,
                input: icmpv6_packet_too_big(
                    REMOTE_BACKEND6,
                    SNAT_IP6,
                    MTU6,
                    &udp6(snat, backend, &query),
                ),
                verdict: CONTINUE,
                expect: Expect::Bytes(icmpv6_packet_too_big(
                    REMOTE_BACKEND6,
                    EXTERNAL_CLIENT6,
                    MTU6,
                    &udp6(client, backend, &query),
                )),
            },
            Case {
                name: "and leaves from the IPv6 NodePort, quoting it",
                program: PROG_TO_NETWORK,
                input: icmpv6_packet_too_big(
                    REMOTE_BACKEND6,
                    EXTERNAL_CLIENT6,
                    MTU6,
                    &udp6(client, backend, &query),
                ),
                verdict: CONTINUE,
                expect: Expect::Bytes(icmpv6_packet_too_big(
                    NODE_IP6,
                    EXTERNAL_CLIENT6,
                    MTU6,
                    &udp6(client, (NODE_IP6, NODE_PORT), &query),
                )),
            },
            Case {
                name: "a router's packet too big goes to the client, the router kept",
                program: PROG_FROM_NETWORK_TC,
                input: icmpv6_packet_too_big(
                    REMOTE_ROUTER6,
                    SNAT_IP6,
                    MTU6,
                    &udp6(snat, backend, &query),
                ),
                verdict: CONTINUE,
                expect: Expect::Bytes(icmpv6_packet_too_big(
                    REMOTE_ROUTER6,
                    EXTERNAL_CLIENT6,
                    MTU6,
                    &udp6(client, backend, &query),
                )),
            },
        ],
    );
}
