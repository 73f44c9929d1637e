//! Datapath tests through BPF_PROG_TEST_RUN: the real programs, loaded from
//! the real object, run on hand-built packets against maps set up through
//! the agent's own state builder. Each case gives the input packet, the
//! expected verdict and the expected output bytes; checksums of every
//! output are verified on their own as well.

use std::net::Ipv4Addr;

use etherparse::{IpHeaders, IpNumber, Ipv4Header, Ipv4Options, PacketBuilder};
use service_agent::datapath::{PROG_FROM_POD, PROG_TO_POD};
use service_common::{CT_DIR_FORWARD, PROTO_TCP, PROTO_UDP};
use service_tests::{
    datapath_fixture::{Datapath, ct_key},
    packets::{
        CLIENT_MAC, Case, Expect, NODE_MAC, run_cases, tcp, udp, udp_fragments,
        udp_without_checksum,
    },
    require_root,
};

/// `TC_ACT_UNSPEC` as BPF_PROG_TEST_RUN reports it: the packet continues.
const CONTINUE: u32 = u32::MAX;
/// `TC_ACT_SHOT`: dropped.
const DROP: u32 = 2;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const BACKEND_A: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
const BACKEND_B: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_NO_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

// ---------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------

/// A TCP SYN whose IPv4 header carries 4 bytes of options (NOPs).
fn tcp_syn_with_ip_options(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let mut header = Ipv4Header::new(0, 64, IpNumber::TCP, src.0.octets(), dst.0.octets()).unwrap();
    header.options = Ipv4Options::try_from(&[1u8, 1, 1, 1][..]).unwrap();
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ip(IpHeaders::Ipv4(header, Default::default()))
        .tcp(src.1, dst.1, 1000, 64240)
        .syn()
        .write(&mut out, &[])
        .expect("build tcp with options");
    out
}

fn arp() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&[0xff; 6]);
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&[0x08, 0x06]);
    out.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&CLIENT.octets());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&VIP.octets());
    out
}

#[test]
fn cluster_ip_translation_table() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_service(VIP, 80, PROTO_TCP, &[(BACKEND_A, 8080)]);
    dp.set_service(VIP, 53, PROTO_UDP, &[(BACKEND_A, 5353)]);
    dp.set_service(VIP_NO_BACKEND, 80, PROTO_TCP, &[]);

    let client = (CLIENT, 40000);
    let truncated_tcp = {
        let mut p = tcp(client, (VIP, 80), true, false, &[]);
        p.truncate(14 + 20 + 10);
        p
    };
    // (A frame cut inside the IPv4 header cannot be tested here: the
    // kernel's BPF_PROG_TEST_RUN refuses it with EINVAL.)
    let bad_ihl = {
        let mut p = tcp(client, (VIP, 80), true, false, &[]);
        p[14] = 0x44;
        p
    };
    let short_total_length = {
        let mut p = tcp(client, (VIP, 80), true, false, &[]);
        p[16..18].copy_from_slice(&30u16.to_be_bytes());
        p
    };
    let payload = [7u8; 40];
    let fragments = udp_fragments((CLIENT, 50002), (VIP, 53), &payload, 24, 77);
    let translated_fragments = udp_fragments((CLIENT, 50002), (BACKEND_A, 5353), &payload, 24, 77);
    let rst_to_empty = {
        let mut p = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
            .ipv4(CLIENT.octets(), VIP_NO_BACKEND.octets(), 64)
            .tcp(40000, 80, 1000, 0)
            .rst()
            .write(&mut p, &[])
            .expect("build tcp rst");
        p
    };
    run_cases(
        &dp,
        vec![
            Case {
                name: "TCP SYN to a ClusterIP is DNATed to the backend",
                program: PROG_FROM_POD,
                input: tcp(client, (VIP, 80), true, false, &[]),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(client, (BACKEND_A, 8080), true, false, &[])),
            },
            Case {
                name: "the SYN-ACK reply gets the ClusterIP back as source",
                program: PROG_TO_POD,
                input: tcp((BACKEND_A, 8080), client, true, true, &[]),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp((VIP, 80), client, true, true, &[])),
            },
            Case {
                name: "a later data packet of the flow goes to the same backend",
                program: PROG_FROM_POD,
                input: tcp(client, (VIP, 80), false, true, b"GET / HTTP/1.1\r\n\r\n"),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(
                    client,
                    (BACKEND_A, 8080),
                    false,
                    true,
                    b"GET / HTTP/1.1\r\n\r\n",
                )),
            },
            Case {
                name: "UDP to a ClusterIP is DNATed",
                program: PROG_FROM_POD,
                input: udp((CLIENT, 50000), (VIP, 53), b"query"),
                verdict: CONTINUE,
                expect: Expect::Bytes(udp((CLIENT, 50000), (BACKEND_A, 5353), b"query")),
            },
            Case {
                name: "the UDP reply is reverse-translated",
                program: PROG_TO_POD,
                input: udp((BACKEND_A, 5353), (CLIENT, 50000), b"answer"),
                verdict: CONTINUE,
                expect: Expect::Bytes(udp((VIP, 53), (CLIENT, 50000), b"answer")),
            },
            Case {
                name: "UDP without checksum keeps checksum 0",
                program: PROG_FROM_POD,
                input: udp_without_checksum((CLIENT, 50001), (VIP, 53), b"query"),
                verdict: CONTINUE,
                expect: Expect::Bytes(udp_without_checksum(
                    (CLIENT, 50001),
                    (BACKEND_A, 5353),
                    b"query",
                )),
            },
            Case {
                name: "an IPv4 header with options is translated too",
                program: PROG_FROM_POD,
                input: tcp_syn_with_ip_options((CLIENT, 40001), (VIP, 80)),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp_syn_with_ip_options((CLIENT, 40001), (BACKEND_A, 8080))),
            },
            Case {
                name: "an address that is no frontend passes untouched",
                program: PROG_FROM_POD,
                input: tcp(client, (Ipv4Addr::new(10, 96, 0, 99), 80), true, false, &[]),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "a ClusterIP on a port that is no frontend passes untouched",
                program: PROG_FROM_POD,
                input: tcp(client, (VIP, 81), true, false, &[]),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "UDP to the TCP frontend's port passes untouched",
                program: PROG_FROM_POD,
                input: udp(client, (VIP, 80), b"x"),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "non-IP (ARP) passes untouched",
                program: PROG_FROM_POD,
                input: arp(),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "a truncated TCP header passes untouched",
                program: PROG_FROM_POD,
                input: truncated_tcp,
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "an IPv4 header length below 20 bytes passes untouched",
                program: PROG_FROM_POD,
                input: bad_ihl,
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "an IPv4 total length shorter than the headers passes untouched",
                program: PROG_FROM_POD,
                input: short_total_length,
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                // (Every hook, both directions, later fragments too:
                // datapath_fragments.rs.)
                name: "the first fragment of a datagram to a ClusterIP is translated",
                program: PROG_FROM_POD,
                input: fragments[0].clone(),
                verdict: CONTINUE,
                expect: Expect::Bytes(translated_fragments[0].clone()),
            },
            Case {
                name: "a reply of an untracked flow passes untouched",
                program: PROG_TO_POD,
                input: tcp((BACKEND_A, 8080), (CLIENT, 40999), true, true, &[]),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                // (A new flow there is refused: see datapath_reject.rs.)
                name: "a TCP RST to a frontend without backends is dropped, never answered",
                program: PROG_FROM_POD,
                input: rst_to_empty,
                verdict: DROP,
                expect: Expect::Untouched,
            },
        ],
    );
    assert_eq!(dp.counter("drop_no_backend"), 1);
    assert_eq!(dp.counter("reply_translated"), 2);

    // The SYN left a forward conntrack entry pinned to backend A.
    let key = ct_key((CLIENT, 40000), (VIP, 80), PROTO_TCP, CT_DIR_FORWARD);
    let entry = dp.entry(&key).expect("forward conntrack entry");
    assert_eq!(entry.nat_addr[..4], BACKEND_A.octets());
    assert_eq!(u16::from_be(entry.nat_port), 8080);
}

#[test]
fn a_flow_whose_backend_was_deleted_moves_to_a_live_backend() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_service(VIP, 80, PROTO_TCP, &[(BACKEND_A, 8080)]);
    let old_flow = (CLIENT, 41000);
    let (_, out) = dp.run(PROG_FROM_POD, &tcp(old_flow, (VIP, 80), true, false, &[]));
    assert_eq!(out, tcp(old_flow, (BACKEND_A, 8080), true, false, &[]));

    // Backend A leaves every Service, so the agent deletes it from the
    // backends map; B is the only backend now.
    dp.set_service(VIP, 80, PROTO_TCP, &[(BACKEND_B, 8080)]);
    run_cases(
        &dp,
        vec![
            Case {
                name: "the next packet of the open connection is re-balanced to B",
                program: PROG_FROM_POD,
                input: tcp(old_flow, (VIP, 80), false, true, b"more"),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(old_flow, (BACKEND_B, 8080), false, true, b"more")),
            },
            Case {
                name: "and stays there",
                program: PROG_FROM_POD,
                input: tcp(old_flow, (VIP, 80), false, true, b"again"),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(old_flow, (BACKEND_B, 8080), false, true, b"again")),
            },
            Case {
                name: "B's replies come back from the ClusterIP",
                program: PROG_TO_POD,
                input: tcp((BACKEND_B, 8080), old_flow, false, true, b"ok"),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp((VIP, 80), old_flow, false, true, b"ok")),
            },
            Case {
                name: "a new connection goes to B",
                program: PROG_FROM_POD,
                input: tcp((CLIENT, 41001), (VIP, 80), true, false, &[]),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp((CLIENT, 41001), (BACKEND_B, 8080), true, false, &[])),
            },
        ],
    );
    assert_eq!(dp.counter("flow_rebalanced"), 1);
}

#[test]
fn new_flows_spread_over_every_backend() {
    require_root!();
    let mut dp = Datapath::load();
    let backends = [BACKEND_A, BACKEND_B, Ipv4Addr::new(10, 200, 3, 2)];
    dp.set_service(VIP, 80, PROTO_TCP, &backends.map(|b| (b, 8080)));
    let mut hits = [0usize; 3];
    for port in 0..600u16 {
        let (verdict, out) = dp.run(
            PROG_FROM_POD,
            &tcp((CLIENT, 20000 + port), (VIP, 80), true, false, &[]),
        );
        assert_eq!(verdict, CONTINUE);
        let dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let index = backends.iter().position(|b| *b == dst).expect("a backend");
        hits[index] += 1;
    }
    // Random choice: each of three backends gets far more than 20% of 600.
    assert!(hits.iter().all(|h| *h >= 120), "{hits:?}");
}
