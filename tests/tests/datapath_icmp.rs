//! Datapath tests of ICMP errors about translated flows, through
//! BPF_PROG_TEST_RUN: a "fragmentation needed" or "unreachable" about a
//! flow to a ClusterIP reaches the client quoting the ClusterIP, so path
//! MTU discovery works through a Service. Exact bytes, checksums verified.

use std::net::Ipv4Addr;

use etherparse::{Icmpv4Type, PacketBuilder, icmpv4::DestUnreachableHeader};
use service_agent::datapath::{PROG_FROM_POD, PROG_TO_POD};
use service_common::{PROTO_TCP, PROTO_UDP};
use service_tests::{
    datapath_fixture::Datapath,
    packets::{CLIENT_MAC, Case, Expect, NODE_MAC, run_cases, tcp, udp},
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
