//! Packets for the datapath tests, built with etherparse, and the table
//! those tests are written as: input packet, program, expected verdict and
//! expected output bytes, with every translated output's checksums verified
//! on their own as well. IPv4 and IPv6 (with extension headers, fragments
//! of both families, and ICMPv6 Packet Too Big for path MTU discovery
//! through a Service).

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{
    Icmpv6Type, IpFragOffset, IpHeaders, IpNumber, Ipv4Header, Ipv6Extensions, Ipv6FragmentHeader,
    Ipv6Header, Ipv6RawExtHeader, NetHeaders, PacketBuilder, PacketBuilderStep, PacketHeaders,
    TcpHeader, TransportHeader,
};
use service_common::{TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN};

use crate::datapath_fixture::Datapath;

/// Source MAC of the test packets.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Destination MAC of the test packets.
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// `packet` as it leaves when a hook sends it back out the device it came
/// in on (hairpin, refusals): the same bytes with the Ethernet destination
/// and source swapped.
pub fn sent_back(mut packet: Vec<u8>) -> Vec<u8> {
    let (dst, src) = packet.split_at_mut(6);
    dst.swap_with_slice(&mut src[..6]);
    packet
}

/// A TCP segment `src` -> `dst` (SYN and/or ACK flags), seq 1000, ack 2000.
pub fn tcp(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    syn: bool,
    ack: bool,
    payload: &[u8],
) -> Vec<u8> {
    let flags = if syn { TCP_FLAG_SYN } else { 0 } | if ack { TCP_FLAG_ACK } else { 0 };
    tcp_segment(src, dst, flags, payload)
}

/// A TCP segment `src` -> `dst` with `flags` (`TCP_FLAG_*` of
/// service-common: SYN, ACK, FIN, RST), seq 1000, ack 2000 when ACK is set.
pub fn tcp_segment(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 64240);
    write_tcp(builder, flags, payload)
}

/// Writes a TCP segment with `flags` (seq 1000, ack 2000 when ACK is set)
/// through `builder`, whatever the IP version below it.
fn write_tcp(mut builder: PacketBuilderStep<TcpHeader>, flags: u8, payload: &[u8]) -> Vec<u8> {
    if flags & TCP_FLAG_SYN != 0 {
        builder = builder.syn();
    }
    if flags & TCP_FLAG_ACK != 0 {
        builder = builder.ack(2000);
    }
    if flags & TCP_FLAG_FIN != 0 {
        builder = builder.fin();
    }
    if flags & TCP_FLAG_RST != 0 {
        builder = builder.rst();
    }
    let mut out = Vec::new();
    builder.write(&mut out, payload).expect("build tcp");
    out
}

/// Hop limit of the IPv6 test packets.
pub const HOP_LIMIT: u8 = 64;

/// A TCP segment over IPv6 `src` -> `dst` (SYN and/or ACK flags), seq
/// 1000, ack 2000.
pub fn tcp6(
    src: (Ipv6Addr, u16),
    dst: (Ipv6Addr, u16),
    syn: bool,
    ack: bool,
    payload: &[u8],
) -> Vec<u8> {
    let flags = if syn { TCP_FLAG_SYN } else { 0 } | if ack { TCP_FLAG_ACK } else { 0 };
    tcp6_segment(src, dst, flags, payload)
}

/// A TCP segment over IPv6 `src` -> `dst` with `flags` (`TCP_FLAG_*`),
/// seq 1000, ack 2000 when ACK is set.
pub fn tcp6_segment(
    src: (Ipv6Addr, u16),
    dst: (Ipv6Addr, u16),
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(src.0.octets(), dst.0.octets(), HOP_LIMIT)
        .tcp(src.1, dst.1, 1000, 64240);
    write_tcp(builder, flags, payload)
}

/// A UDP datagram over IPv6 `src` -> `dst` (its checksum is mandatory:
/// IPv6 has no header checksum).
pub fn udp6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(src.0.octets(), dst.0.octets(), HOP_LIMIT)
        .udp(src.1, dst.1)
        .write(&mut out, payload)
        .expect("build udp6");
    out
}

/// Length of each extension header [`with_extension_headers`] adds.
pub const EXTENSION_HEADER_LEN: usize = 8;

/// The IPv6 header of `src` -> `dst` followed by a hop-by-hop options
/// header and a destination options header (8 bytes each, PadN options):
/// what a datapath must walk to find the transport header.
pub fn with_extension_headers(src: Ipv6Addr, dst: Ipv6Addr) -> IpHeaders {
    // Two bytes of next header and length, then PadN (type 1) filling
    // the remaining 6 bytes: 4 bytes of padding data.
    let pad_n = [1, 4, 0, 0, 0, 0];
    let option = |next| Ipv6RawExtHeader::new_raw(next, &pad_n).expect("an 8-byte header");
    IpHeaders::Ipv6(
        Ipv6Header {
            hop_limit: HOP_LIMIT,
            source: src.octets(),
            destination: dst.octets(),
            ..Ipv6Header::default()
        },
        Ipv6Extensions {
            // (The builder sets each next-header field.)
            hop_by_hop_options: Some(option(IpNumber::IPV6_DESTINATION_OPTIONS)),
            destination_options: Some(option(IpNumber::UDP)),
            ..Ipv6Extensions::default()
        },
    )
}

/// A UDP datagram over IPv6 `src` -> `dst` behind the extension headers
/// of [`with_extension_headers`].
pub fn udp6_with_extension_headers(
    src: (Ipv6Addr, u16),
    dst: (Ipv6Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ip(with_extension_headers(src.0, dst.0))
        .udp(src.1, dst.1)
        .write(&mut out, payload)
        .expect("build udp6 with extension headers");
    out
}

/// A TCP segment over IPv6 `src` -> `dst` with `flags` behind the
/// extension headers of [`with_extension_headers`].
pub fn tcp6_with_extension_headers(
    src: (Ipv6Addr, u16),
    dst: (Ipv6Addr, u16),
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ip(with_extension_headers(src.0, dst.0))
        .tcp(src.1, dst.1, 1000, 64240);
    write_tcp(builder, flags, payload)
}

/// IPv6's minimum MTU: an ICMPv6 error never makes a packet longer.
pub const IPV6_MIN_MTU: usize = 1280;

/// An ICMPv6 Packet Too Big from `router` to `to` saying the next hop's
/// MTU is `mtu`, quoting `offending` (an Ethernet frame as the builders
/// here make them: its IPv6 packet is quoted, cut so the error fits in
/// [`IPV6_MIN_MTU`]).
pub fn icmpv6_packet_too_big(
    router: Ipv6Addr,
    to: Ipv6Addr,
    mtu: u32,
    offending: &[u8],
) -> Vec<u8> {
    // IPv6 header (40) and ICMPv6 header (8) come before the quote.
    let quoted = &offending[14..offending.len().min(14 + IPV6_MIN_MTU - 48)];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(router.octets(), to.octets(), HOP_LIMIT)
        .icmpv6(Icmpv6Type::PacketTooBig { mtu })
        .write(&mut out, quoted)
        .expect("build packet too big");
    out
}

/// A UDP datagram `src` -> `dst` with a real checksum.
pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .udp(src.1, dst.1)
        .write(&mut out, payload)
        .expect("build udp");
    out
}

/// The two fragments of the UDP datagram `src` -> `dst` carrying `payload`
/// (with the checksum of the whole datagram), IP identification `id`: the
/// first holds the UDP header and the first `first_len - 8` payload bytes
/// (`first_len`, the first fragment's L4 length, a multiple of 8), the
/// later one the rest. Each has its own valid IPv4 header checksum.
pub fn udp_fragments(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
    first_len: usize,
    id: u16,
) -> [Vec<u8>; 2] {
    assert!(first_len.is_multiple_of(8) && first_len < payload.len() + 8);
    let whole = udp(src, dst, payload);
    let l4 = &whole[14 + 20..];
    let fragment = |bytes: &[u8], offset: usize, more: bool| {
        let mut ip = Ipv4Header::new(
            bytes.len() as u16,
            64,
            IpNumber::UDP,
            src.0.octets(),
            dst.0.octets(),
        )
        .expect("fragment header");
        ip.identification = id;
        ip.more_fragments = more;
        ip.fragment_offset = IpFragOffset::try_new((offset / 8) as u16).expect("offset");
        let mut out = whole[..14].to_vec();
        ip.write(&mut out).expect("write fragment header");
        out.extend_from_slice(bytes);
        out
    };
    [
        fragment(&l4[..first_len], 0, true),
        fragment(&l4[first_len..], first_len, false),
    ]
}

/// The two fragments of the UDP datagram over IPv6 `src` -> `dst`
/// carrying `payload` (with the checksum of the whole datagram), each an
/// IPv6 header followed by a fragment header (RFC 8200, 4.5) with
/// identification `id`: the first holds the UDP header and the first
/// `first_len - 8` payload bytes (`first_len`, a multiple of 8), the later
/// one the rest.
pub fn udp6_fragments(
    src: (Ipv6Addr, u16),
    dst: (Ipv6Addr, u16),
    payload: &[u8],
    first_len: usize,
    id: u32,
) -> [Vec<u8>; 2] {
    assert!(first_len.is_multiple_of(8) && first_len < payload.len() + 8);
    let whole = udp6(src, dst, payload);
    let l4 = &whole[14 + 40..];
    let fragment = |bytes: &[u8], offset: usize, more: bool| {
        let header = Ipv6FragmentHeader::new(
            IpNumber::UDP,
            IpFragOffset::try_new((offset / 8) as u16).expect("offset"),
            more,
            id,
        );
        let ip = Ipv6Header {
            payload_length: (Ipv6FragmentHeader::LEN + bytes.len()) as u16,
            next_header: IpNumber::IPV6_FRAGMENTATION_HEADER,
            hop_limit: HOP_LIMIT,
            source: src.0.octets(),
            destination: dst.0.octets(),
            ..Ipv6Header::default()
        };
        let mut out = whole[..14].to_vec();
        ip.write(&mut out).expect("write IPv6 header");
        out.extend_from_slice(&header.to_bytes());
        out.extend_from_slice(bytes);
        out
    };
    [
        fragment(&l4[..first_len], 0, true),
        fragment(&l4[first_len..], first_len, false),
    ]
}

/// `packet` (Ethernet and IPv6) with an 8-byte hop-by-hop options header
/// (PadN) inserted right after its IPv6 header, before whatever followed
/// it (a fragment header, say).
pub fn behind_hop_by_hop(packet: &[u8]) -> Vec<u8> {
    const NEXT_HEADER: usize = 14 + 6;
    const PAYLOAD_LEN: usize = 14 + 4;
    let mut out = packet[..14 + 40].to_vec();
    let hop_by_hop = [packet[NEXT_HEADER], 0, 1, 4, 0, 0, 0, 0];
    out[NEXT_HEADER] = IpNumber::IPV6_HEADER_HOP_BY_HOP.0;
    let len = u16::from_be_bytes([out[PAYLOAD_LEN], out[PAYLOAD_LEN + 1]]) + 8;
    out[PAYLOAD_LEN..PAYLOAD_LEN + 2].copy_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&hop_by_hop);
    out.extend_from_slice(&packet[14 + 40..]);
    out
}

/// An address family whose UDP datagrams the tests fragment: IPv4
/// ([`udp_fragments`]) or IPv6 ([`udp6_fragments`]), so one test body
/// serves both.
pub trait FragmentFamily: Copy {
    /// The UDP bytes of a first fragment on a 1500-byte MTU (a multiple of
    /// 8): 1480 after an IPv4 header, 1448 after IPv6 and fragment headers.
    const FIRST_FRAGMENT_L4_LEN: usize;
    /// The two fragments of the UDP datagram `src` -> `dst` carrying
    /// `payload`, identification `id` (IPv4: its low 16 bits).
    fn udp_fragments(src: (Self, u16), dst: (Self, u16), payload: &[u8], id: u32) -> [Vec<u8>; 2];
}

impl FragmentFamily for Ipv4Addr {
    const FIRST_FRAGMENT_L4_LEN: usize = 1480;

    fn udp_fragments(src: (Self, u16), dst: (Self, u16), payload: &[u8], id: u32) -> [Vec<u8>; 2] {
        udp_fragments(src, dst, payload, Self::FIRST_FRAGMENT_L4_LEN, id as u16)
    }
}

impl FragmentFamily for Ipv6Addr {
    const FIRST_FRAGMENT_L4_LEN: usize = 1448;

    fn udp_fragments(src: (Self, u16), dst: (Self, u16), payload: &[u8], id: u32) -> [Vec<u8>; 2] {
        udp6_fragments(src, dst, payload, Self::FIRST_FRAGMENT_L4_LEN, id)
    }
}

/// A UDP packet whose checksum is 0 ("none", allowed over IPv4).
pub fn udp_without_checksum(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let mut out = udp(src, dst, payload);
    out[14 + 20 + 6] = 0;
    out[14 + 20 + 7] = 0;
    out
}

/// `packet` (Ethernet, IPv4 without options, TCP or UDP) as a sender with
/// transmit checksum offload hands it over (`CHECKSUM_PARTIAL`): its L4
/// checksum field holds only the folded pseudo-header sum, for the device
/// to complete.
pub fn with_partial_checksum(mut packet: Vec<u8>) -> Vec<u8> {
    let ip = &packet[14..34];
    let proto = ip[9];
    let l4_len = u16::from_be_bytes([ip[2], ip[3]]) - 20;
    let word = |b: &[u8]| u32::from(u16::from_be_bytes([b[0], b[1]]));
    let mut sum = word(&ip[12..14])
        + word(&ip[14..16])
        + word(&ip[16..18])
        + word(&ip[18..20])
        + u32::from(proto)
        + u32::from(l4_len);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let field = 34 + if proto == 6 { 16 } else { 6 };
    packet[field..field + 2].copy_from_slice(&(sum as u16).to_be_bytes());
    packet
}

/// Asserts the IPv4 header checksum and the TCP/UDP checksum of `packet`;
/// for IPv6 (no header checksum), the TCP, UDP (never zero: mandatory
/// over IPv6) and ICMPv6 checksums.
pub fn assert_checksums_valid(packet: &[u8], case: &str) {
    let headers = PacketHeaders::from_ethernet_slice(packet)
        .unwrap_or_else(|e| panic!("{case}: output does not parse: {e}"));
    if let Some(NetHeaders::Ipv6(ip, _)) = &headers.net {
        assert_ipv6_checksums_valid(ip, &headers.transport, headers.payload.slice(), case);
        return;
    }
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        return;
    };
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "{case}: IPv4 checksum"
    );
    let payload = headers.payload.slice();
    match &headers.transport {
        Some(TransportHeader::Tcp(tcp)) => assert_eq!(
            tcp.checksum,
            tcp.calc_checksum_ipv4(ip, payload).unwrap(),
            "{case}: TCP checksum"
        ),
        Some(TransportHeader::Udp(udp)) if udp.checksum != 0 => assert_eq!(
            udp.checksum,
            udp.calc_checksum_ipv4(ip, payload).unwrap(),
            "{case}: UDP checksum"
        ),
        _ => {}
    }
}

fn assert_ipv6_checksums_valid(
    ip: &Ipv6Header,
    transport: &Option<TransportHeader>,
    payload: &[u8],
    case: &str,
) {
    match transport {
        Some(TransportHeader::Tcp(tcp)) => assert_eq!(
            tcp.checksum,
            tcp.calc_checksum_ipv6(ip, payload).unwrap(),
            "{case}: TCP checksum"
        ),
        Some(TransportHeader::Udp(udp)) => {
            assert_ne!(udp.checksum, 0, "{case}: UDP over IPv6 without checksum");
            assert_eq!(
                udp.checksum,
                udp.calc_checksum_ipv6(ip, payload).unwrap(),
                "{case}: UDP checksum"
            );
        }
        Some(TransportHeader::Icmpv6(icmp)) => assert_eq!(
            icmp.checksum,
            icmp.icmp_type
                .calc_checksum(ip.source, ip.destination, payload)
                .unwrap(),
            "{case}: ICMPv6 checksum"
        ),
        _ => {}
    }
}

/// What a case expects to come out.
pub enum Expect {
    /// The input, byte for byte.
    Untouched,
    /// Exactly these bytes.
    Bytes(Vec<u8>),
}

/// One table row: program, input, verdict, output.
pub struct Case {
    /// What the row checks.
    pub name: &'static str,
    /// The program run (TC classifier or XDP).
    pub program: &'static str,
    /// The packet in.
    pub input: Vec<u8>,
    /// The expected verdict.
    pub verdict: u32,
    /// The expected packet out.
    pub expect: Expect,
}

/// Runs the rows in order (later rows see the conntrack state earlier rows
/// left) and checks each.
pub fn run_cases(datapath: &Datapath, cases: Vec<Case>) {
    for case in cases {
        let (verdict, out) = datapath.run(case.program, &case.input);
        assert_eq!(verdict, case.verdict, "{}: verdict", case.name);
        let expected = match &case.expect {
            Expect::Untouched => &case.input,
            Expect::Bytes(bytes) => bytes,
        };
        assert_eq!(&out, expected, "{}: output bytes", case.name);
        if matches!(case.expect, Expect::Bytes(_)) {
            assert_checksums_valid(&out, case.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x99, 0, 0, 0, 0, 2);
    const SERVICE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);

    #[test]
    fn ipv6_packets_parse_back_with_valid_checksums() {
        for (name, packet) in [
            (
                "tcp6",
                tcp6((CLIENT, 40000), (SERVICE, 80), true, false, b""),
            ),
            ("udp6", udp6((CLIENT, 40000), (SERVICE, 53), b"query")),
            (
                "udp6 with extension headers",
                udp6_with_extension_headers((CLIENT, 40000), (SERVICE, 53), b"query"),
            ),
            (
                "tcp6 with extension headers",
                tcp6_with_extension_headers((CLIENT, 40000), (SERVICE, 80), TCP_FLAG_ACK, b"data"),
            ),
        ] {
            let headers = PacketHeaders::from_ethernet_slice(&packet).expect(name);
            let Some(NetHeaders::Ipv6(ip, _)) = &headers.net else {
                panic!("{name}: not IPv6");
            };
            assert_eq!(
                (ip.source, ip.destination),
                (CLIENT.octets(), SERVICE.octets())
            );
            assert!(headers.transport.is_some(), "{name}");
            assert_checksums_valid(&packet, name);
        }
    }

    #[test]
    fn extension_headers_sit_between_the_ipv6_and_the_transport_header() {
        let packet = udp6_with_extension_headers((CLIENT, 40000), (SERVICE, 53), b"q");
        // Next header: hop-by-hop (0), then destination options (60), then UDP.
        assert_eq!(packet[14 + 6], 0);
        assert_eq!(packet[14 + 40], 60);
        assert_eq!(packet[14 + 40 + EXTENSION_HEADER_LEN], 17);
        let udp = 14 + 40 + 2 * EXTENSION_HEADER_LEN;
        assert_eq!(&packet[udp..udp + 4], [0x9c, 0x40, 0, 53]);
        assert_eq!(packet.len(), udp + 8 + 1);
    }

    #[test]
    fn a_packet_too_big_quotes_the_offending_packet_within_the_minimum_mtu() {
        let big = tcp6((SERVICE, 80), (CLIENT, 40000), false, true, &[7; 1400]);
        let error = icmpv6_packet_too_big(SERVICE, CLIENT, 1280, &big);
        assert_eq!(error.len() - 14, IPV6_MIN_MTU);
        assert_checksums_valid(&error, "packet too big");
        let headers = PacketHeaders::from_ethernet_slice(&error).unwrap();
        let Some(TransportHeader::Icmpv6(icmp)) = &headers.transport else {
            panic!("no ICMPv6");
        };
        assert_eq!(icmp.icmp_type, Icmpv6Type::PacketTooBig { mtu: 1280 });
        // The quote starts with the offending IPv6 header.
        assert_eq!(&error[14 + 48..14 + 48 + 40], &big[14..14 + 40]);
    }
}
