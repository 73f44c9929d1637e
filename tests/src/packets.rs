//! Packets for the datapath tests, built with etherparse, and the table
//! those tests are written as: input packet, program, expected verdict and
//! expected output bytes, with every translated output's checksums verified
//! on their own as well.

use std::net::Ipv4Addr;

use etherparse::{
    IpFragOffset, IpNumber, Ipv4Header, NetHeaders, PacketBuilder, PacketHeaders, TransportHeader,
};
use service_common::{TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN};

use crate::datapath_fixture::Datapath;

/// Source MAC of the test packets.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Destination MAC of the test packets.
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

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
    let mut builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 64240);
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

/// A UDP packet whose checksum is 0 ("none", allowed over IPv4).
pub fn udp_without_checksum(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let mut out = udp(src, dst, payload);
    out[14 + 20 + 6] = 0;
    out[14 + 20 + 7] = 0;
    out
}

/// Asserts the IPv4 header checksum and the TCP/UDP checksum of `packet`.
pub fn assert_checksums_valid(packet: &[u8], case: &str) {
    let headers = PacketHeaders::from_ethernet_slice(packet)
        .unwrap_or_else(|e| panic!("{case}: output does not parse: {e}"));
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
