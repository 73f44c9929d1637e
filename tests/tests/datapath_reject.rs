//! Datapath tests of the refusal of new flows to a frontend without
//! backends, through BPF_PROG_TEST_RUN: the real `from_pod` program turns
//! the offending packet into the reply a host without a listener sends (a
//! TCP RST, an ICMP port unreachable) and redirects it back out of the
//! device it came in on. Each case gives the input packet, the expected
//! verdict and the exact expected output (built with etherparse); the
//! checksums of every reply are verified on their own, by summing.

use std::net::Ipv4Addr;

use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, Ipv4HeaderSlice, Ipv4Options, NetHeaders, PacketBuilder,
    PacketHeaders, TcpOptionElement, TransportHeader, icmpv4::DestUnreachableHeader,
};
use service_agent::datapath::{PROG_FROM_POD, PROG_TO_POD};
use service_common::{PROTO_TCP, PROTO_UDP};
use service_tests::{datapath_fixture::Datapath, require_root};

/// `TC_ACT_REDIRECT`: the reply leaves through the device chosen by
/// `bpf_redirect` (BPF_PROG_TEST_RUN only reports the verdict).
const REDIRECT: u32 = 7;
/// `TC_ACT_SHOT`: dropped.
const DROP: u32 = 2;
/// `TC_ACT_UNSPEC` as BPF_PROG_TEST_RUN reports it: the packet continues.
const CONTINUE: u32 = u32::MAX;

/// The client pod.
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// A ClusterIP whose Service has no endpoint.
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// The TCP port of that Service.
const TCP_PORT: u16 = 80;
/// The UDP port of that Service.
const UDP_PORT: u16 = 53;
/// The client pod's MAC address.
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The MAC address of the host side of the client's veth.
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// TTL of the client's packets.
const CLIENT_TTL: u8 = 64;
/// TTL the datapath gives its replies.
const REPLY_TTL: u8 = 64;
/// Window of the client's segments.
const CLIENT_WINDOW: u16 = 64_240;
/// Length of an Ethernet header.
const ETH_LEN: usize = 14;
/// Bytes an ICMP error quotes after the offending IPv4 header (RFC 792).
const QUOTED_DATA_LEN: usize = 8;
/// IPv4 options: Router Alert (4 bytes), two NOPs, end of list.
const IP_OPTIONS: [u8; 8] = [0x94, 0x04, 0, 0, 1, 1, 1, 0];

// ---------------------------------------------------------------------------
// Packets the client sends
// ---------------------------------------------------------------------------

/// Flags of a client TCP segment.
#[derive(Clone, Copy)]
enum Segment {
    /// A bare SYN.
    Syn,
    /// An ACK (of a flow the datapath no longer tracks).
    Ack(u32),
    /// A RST.
    Rst,
}

/// A TCP segment from the client to the empty Service, with `options` in
/// its IPv4 header and `tcp_options` in its TCP header.
fn client_tcp(
    port: u16,
    seq: u32,
    segment: Segment,
    ip_options: &[u8],
    tcp_options: &[TcpOptionElement],
    payload: &[u8],
) -> Vec<u8> {
    let mut ip = Ipv4Header::new(
        0,
        CLIENT_TTL,
        IpNumber::TCP,
        CLIENT.octets(),
        VIP_EMPTY.octets(),
    )
    .expect("IPv4 header");
    ip.options = Ipv4Options::try_from(ip_options).expect("IPv4 options");
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .tcp(port, TCP_PORT, seq, CLIENT_WINDOW)
        .options(tcp_options)
        .expect("TCP options");
    let builder = match segment {
        Segment::Syn => builder.syn(),
        Segment::Ack(ack) => builder.ack(ack).psh(),
        Segment::Rst => builder.rst(),
    };
    let mut out = Vec::new();
    builder.write(&mut out, payload).expect("build TCP");
    out
}

/// A UDP datagram from the client to the empty Service.
fn client_udp(port: u16, ip_options: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut ip = Ipv4Header::new(
        0,
        CLIENT_TTL,
        IpNumber::UDP,
        CLIENT.octets(),
        VIP_EMPTY.octets(),
    )
    .expect("IPv4 header");
    ip.options = Ipv4Options::try_from(ip_options).expect("IPv4 options");
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .udp(port, UDP_PORT)
        .write(&mut out, payload)
        .expect("build UDP");
    out
}

// ---------------------------------------------------------------------------
// Replies expected back
// ---------------------------------------------------------------------------

/// The IPv4 header of a reply: from the frontend to the client, no
/// options, TTL 64, DF set, ID 0 (total length and checksum are filled in
/// by the builder).
fn reply_ip(proto: IpNumber) -> IpHeaders {
    let mut ip = Ipv4Header::new(0, REPLY_TTL, proto, VIP_EMPTY.octets(), CLIENT.octets())
        .expect("IPv4 header");
    ip.identification = 0;
    ip.dont_fragment = true;
    IpHeaders::Ipv4(ip, Default::default())
}

/// The reset a closed port sends: from the frontend's port, without
/// options or data, window 0; with ACK when `ack` is given.
fn reset(port: u16, seq: u32, ack: Option<u32>) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(NODE_MAC, CLIENT_MAC)
        .ip(reply_ip(IpNumber::TCP))
        .tcp(TCP_PORT, port, seq, 0)
        .rst();
    let builder = match ack {
        Some(ack) => builder.ack(ack),
        None => builder,
    };
    let mut out = Vec::new();
    builder.write(&mut out, &[]).expect("build RST");
    out
}

/// The offending datagram's IPv4 header (with its options) and the first
/// 8 bytes after it: what an ICMP error about it quotes.
fn quote_of(datagram: &[u8]) -> &[u8] {
    let ip = Ipv4HeaderSlice::from_slice(&datagram[ETH_LEN..]).expect("IPv4 header");
    let end = ETH_LEN + usize::from(ip.ihl()) * 4 + QUOTED_DATA_LEN;
    &datagram[ETH_LEN..end]
}

/// The ICMP port unreachable about `datagram`, from the frontend address.
fn port_unreachable(datagram: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(NODE_MAC, CLIENT_MAC)
        .ip(reply_ip(IpNumber::ICMP))
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
        .write(&mut out, quote_of(datagram))
        .expect("build ICMP");
    out
}

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

/// The folded one's complement sum of `parts` (RFC 1071); a region that
/// holds its own valid checksum sums to 0xffff.
fn ones_complement_sum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Asserts the IPv4 header checksum, and the TCP (with its pseudo header)
/// or ICMP checksum of a reply, by summing the bytes themselves.
fn assert_reply_checksums(reply: &[u8], case: &str) {
    let ip = Ipv4HeaderSlice::from_slice(&reply[ETH_LEN..]).expect("IPv4 header");
    let ip_len = usize::from(ip.ihl()) * 4;
    let total = usize::from(ip.total_len());
    assert_eq!(reply.len(), ETH_LEN + total, "{case}: frame length");
    let header = &reply[ETH_LEN..ETH_LEN + ip_len];
    let l4 = &reply[ETH_LEN + ip_len..];
    assert_eq!(
        ones_complement_sum(&[header]),
        0xffff,
        "{case}: IPv4 checksum"
    );
    let l4_sum = match ip.protocol() {
        IpNumber::TCP => {
            let length = (l4.len() as u16).to_be_bytes();
            let pseudo = [
                &ip.source()[..],
                &ip.destination()[..],
                &[0, PROTO_TCP],
                &length[..],
            ]
            .concat();
            ones_complement_sum(&[&pseudo, l4])
        }
        IpNumber::ICMP => ones_complement_sum(&[l4]),
        other => panic!("{case}: unexpected reply protocol {other:?}"),
    };
    assert_eq!(l4_sum, 0xffff, "{case}: L4 checksum");
}

/// One table row: input, verdict, output.
struct Case {
    name: &'static str,
    input: Vec<u8>,
    verdict: u32,
    /// The packet after the program: the reply, or the input when dropped.
    output: Vec<u8>,
}

/// Runs every case through `from_pod`; each reply must also pass `to_pod`
/// (the egress hook of the device it is sent out of) untouched.
fn run_table(dp: &Datapath, cases: &[Case]) {
    for case in cases {
        let (verdict, out) = dp.run(PROG_FROM_POD, &case.input);
        assert_eq!(verdict, case.verdict, "{}: verdict", case.name);
        assert_eq!(
            out, case.output,
            "{}: output bytes\n got:      {out:02x?}\n expected: {:02x?}",
            case.name, case.output
        );
        if case.verdict == REDIRECT {
            assert_reply_checksums(&out, case.name);
            let (verdict, after) = dp.run(PROG_TO_POD, &out);
            assert_eq!(verdict, CONTINUE, "{}: to_pod verdict", case.name);
            assert_eq!(after, out, "{}: to_pod changed the reply", case.name);
        }
    }
}

/// A datapath with one Service without endpoints, TCP and UDP.
fn empty_service() -> Datapath {
    let mut dp = Datapath::load();
    dp.set_service(VIP_EMPTY, TCP_PORT, PROTO_TCP, &[]);
    dp.set_service(VIP_EMPTY, UDP_PORT, PROTO_UDP, &[]);
    dp
}

#[test]
fn new_flows_to_a_frontend_without_backends_are_refused() {
    require_root!();
    let dp = empty_service();
    let syn_options = [
        TcpOptionElement::MaximumSegmentSize(1460),
        TcpOptionElement::SelectiveAcknowledgementPermitted,
        TcpOptionElement::Timestamp(123_456, 0),
        TcpOptionElement::Noop,
        TcpOptionElement::WindowScale(7),
    ];
    let big_datagram = client_udp(50_001, &IP_OPTIONS, &[0xab; 1200]);
    let cases = [
        Case {
            name: "a SYN gets a RST|ACK: seq 0, ack = its seq + 1",
            input: client_tcp(40_000, 1000, Segment::Syn, &[], &[], &[]),
            verdict: REDIRECT,
            output: reset(40_000, 0, Some(1001)),
        },
        Case {
            name: "a SYN whose seq wraps gets ack 0",
            input: client_tcp(40_001, u32::MAX, Segment::Syn, &[], &[], &[]),
            verdict: REDIRECT,
            output: reset(40_001, 0, Some(0)),
        },
        Case {
            name: "a SYN with IPv4 and TCP options gets a RST without options",
            input: client_tcp(40_002, 7, Segment::Syn, &IP_OPTIONS, &syn_options, &[]),
            verdict: REDIRECT,
            output: reset(40_002, 0, Some(8)),
        },
        Case {
            name: "a SYN carrying data (fast open) gets it acknowledged too",
            input: client_tcp(40_003, 500, Segment::Syn, &[], &[], b"hello"),
            verdict: REDIRECT,
            output: reset(40_003, 0, Some(506)),
        },
        Case {
            name: "an ACK of an untracked flow gets a RST with seq = its ack",
            input: client_tcp(40_004, 9000, Segment::Ack(77_777), &[], &[], b"GET /"),
            verdict: REDIRECT,
            output: reset(40_004, 77_777, None),
        },
        Case {
            name: "a RST is never answered: dropped",
            input: client_tcp(40_005, 1, Segment::Rst, &[], &[], &[]),
            verdict: DROP,
            output: client_tcp(40_005, 1, Segment::Rst, &[], &[], &[]),
        },
        Case {
            name: "a UDP datagram gets an ICMP port unreachable",
            input: client_udp(50_000, &[], b"query"),
            verdict: REDIRECT,
            output: port_unreachable(&client_udp(50_000, &[], b"query")),
        },
        Case {
            name: "a large UDP datagram with IPv4 options: the quote keeps them, the data is cut",
            input: big_datagram.clone(),
            verdict: REDIRECT,
            output: port_unreachable(&big_datagram),
        },
        Case {
            name: "an empty UDP datagram gets its header quoted",
            input: client_udp(50_002, &[], &[]),
            verdict: REDIRECT,
            output: port_unreachable(&client_udp(50_002, &[], &[])),
        },
    ];
    run_table(&dp, &cases);
    let rejected = cases.iter().filter(|c| c.verdict == REDIRECT).count() as u64;
    let dropped = cases.iter().filter(|c| c.verdict == DROP).count() as u64;
    assert_eq!(dp.counter("rejected_no_backend"), rejected);
    assert_eq!(dp.counter("drop_no_backend"), dropped);
}

#[test]
fn the_port_unreachable_quotes_the_datagram_header_and_8_bytes() {
    require_root!();
    let dp = empty_service();
    let datagram = client_udp(50_010, &IP_OPTIONS, b"a payload longer than eight bytes");
    let (verdict, reply) = dp.run(PROG_FROM_POD, &datagram);
    assert_eq!(verdict, REDIRECT);
    assert_reply_checksums(&reply, "ICMP");

    let headers = PacketHeaders::from_ethernet_slice(&reply).expect("reply parses");
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        panic!("no IPv4 header: {headers:?}");
    };
    assert_eq!(Ipv4Addr::from(ip.source), VIP_EMPTY);
    assert_eq!(Ipv4Addr::from(ip.destination), CLIENT);
    assert!(ip.options.is_empty(), "reply has IPv4 options");
    let Some(TransportHeader::Icmpv4(icmp)) = &headers.transport else {
        panic!("no ICMP header: {headers:?}");
    };
    assert_eq!(
        icmp.icmp_type,
        etherparse::Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
    );

    // The quote: the datagram's own IPv4 header, options included, then
    // its UDP header (the first 8 bytes after it), and nothing more.
    let quote = headers.payload.slice();
    let ip_len = 20 + IP_OPTIONS.len();
    assert_eq!(quote.len(), ip_len + QUOTED_DATA_LEN);
    assert_eq!(
        quote,
        &datagram[ETH_LEN..ETH_LEN + ip_len + QUOTED_DATA_LEN]
    );
    let quoted_ip = Ipv4HeaderSlice::from_slice(quote).expect("quoted IPv4 header");
    assert_eq!(Ipv4Addr::from(quoted_ip.source()), CLIENT);
    assert_eq!(Ipv4Addr::from(quoted_ip.destination()), VIP_EMPTY);
    assert_eq!(quoted_ip.protocol(), IpNumber::UDP);
    assert_eq!(quoted_ip.options(), IP_OPTIONS);
    let udp = &quote[ip_len..];
    assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), 50_010);
    assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), UDP_PORT);
    assert_eq!(dp.counter("rejected_no_backend"), 1);
}

#[test]
fn a_frontend_that_gains_a_backend_stops_refusing() {
    require_root!();
    let mut dp = empty_service();
    let syn = client_tcp(41_000, 1, Segment::Syn, &[], &[], &[]);
    assert_eq!(dp.run(PROG_FROM_POD, &syn).0, REDIRECT);

    let backend = Ipv4Addr::new(10, 200, 1, 2);
    dp.set_service(VIP_EMPTY, TCP_PORT, PROTO_TCP, &[(backend, 8080)]);
    let (verdict, out) = dp.run(PROG_FROM_POD, &syn);
    assert_eq!(verdict, CONTINUE);
    let headers = PacketHeaders::from_ethernet_slice(&out).expect("parses");
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        panic!("no IPv4 header");
    };
    assert_eq!(Ipv4Addr::from(ip.destination), backend);
    assert_eq!(dp.counter("rejected_no_backend"), 1);
}
