//! The packets `trace` sends through the programs, built with etherparse,
//! and what it shows of a packet: its addresses, ports, TCP flags, whether
//! its checksums verify, and its bytes.

use std::net::{IpAddr, SocketAddr};

use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use serde::Serialize;
use service_common::{
    PROTO_TCP, PROTO_UDP, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN,
};

use crate::datapath::snapshot::PacketTuple;

/// Source MAC of traced packets (a locally administered address).
pub const TRACE_SOURCE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Destination MAC of traced packets.
pub const TRACE_DESTINATION_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// TCP flag PSH (header byte 13), which traced packets may carry.
pub const TCP_FLAG_PSH: u8 = 0x08;

/// TCP flag names and bits, in the order they are shown.
const TCP_FLAG_NAMES: [(&str, u8); 5] = [
    ("SYN", TCP_FLAG_SYN),
    ("FIN", TCP_FLAG_FIN),
    ("RST", TCP_FLAG_RST),
    ("PSH", TCP_FLAG_PSH),
    ("ACK", TCP_FLAG_ACK),
];

/// Parses comma-separated TCP flags (`syn,ack`; case does not matter) into
/// their header bits.
pub fn parse_tcp_flags(text: &str) -> Result<u8, String> {
    let mut bits = 0;
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let (_, bit) = TCP_FLAG_NAMES
            .iter()
            .find(|(known, _)| known.eq_ignore_ascii_case(name))
            .ok_or_else(|| format!("unknown TCP flag {name:?} (known: syn, fin, rst, psh, ack)"))?;
        bits |= bit;
    }
    if bits == 0 {
        return Err("no TCP flag given (e.g. syn or ack,fin)".to_owned());
    }
    Ok(bits)
}

/// The names of the TCP flag bits `bits`, e.g. `SYN,ACK`.
pub fn tcp_flag_names(bits: u8) -> String {
    let names: Vec<&str> = TCP_FLAG_NAMES
        .iter()
        .filter(|(_, bit)| bits & bit != 0)
        .map(|(name, _)| *name)
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(",")
    }
}

/// `addr` as sixteen bytes: an IPv6 address, or an IPv4 one mapped.
fn v6_octets(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Builds the Ethernet frame of `tuple` (TCP with `tcp_flags`, or UDP),
/// IPv4 or IPv6 by its addresses, without payload, with valid checksums.
pub fn build(tuple: &PacketTuple, tcp_flags: u8) -> Vec<u8> {
    let ethernet = PacketBuilder::ethernet2(TRACE_SOURCE_MAC, TRACE_DESTINATION_MAC);
    let ip = match (tuple.saddr, tuple.daddr) {
        (IpAddr::V4(saddr), IpAddr::V4(daddr)) => ethernet.ipv4(saddr.octets(), daddr.octets(), 64),
        (saddr, daddr) => ethernet.ipv6(v6_octets(saddr), v6_octets(daddr), 64),
    };
    let mut out = Vec::new();
    let written = if tuple.proto == PROTO_TCP {
        let mut tcp = ip.tcp(tuple.sport, tuple.dport, 1000, 64240);
        if tcp_flags & TCP_FLAG_SYN != 0 {
            tcp = tcp.syn();
        }
        if tcp_flags & TCP_FLAG_ACK != 0 {
            tcp = tcp.ack(2000);
        }
        if tcp_flags & TCP_FLAG_FIN != 0 {
            tcp = tcp.fin();
        }
        if tcp_flags & TCP_FLAG_RST != 0 {
            tcp = tcp.rst();
        }
        if tcp_flags & TCP_FLAG_PSH != 0 {
            tcp = tcp.psh();
        }
        tcp.write(&mut out, &[])
    } else {
        ip.udp(tuple.sport, tuple.dport).write(&mut out, &[])
    };
    written.expect("a header-only frame always builds");
    out
}

/// What `trace` shows of a packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PacketView {
    /// One line: `SRC -> DST PROTO [FLAGS]`, or what the frame is.
    pub summary: String,
    /// Source `address:port` (`[address]:port` for IPv6; no port for
    /// ICMP); empty when not IP.
    pub source: String,
    /// Destination `address:port`.
    pub destination: String,
    /// `TCP`, `UDP`, `ICMP` or the protocol number.
    pub protocol: String,
    /// TCP flags, e.g. `SYN,ACK`; empty for other protocols.
    pub tcp_flags: String,
    /// Frame length in bytes.
    pub length: usize,
    /// Whether the IPv4 header checksum (IPv6 has none) and the
    /// TCP/UDP/ICMP checksum verify.
    pub checksums_valid: bool,
    /// The frame's bytes in hex, 16 a line, with offsets.
    pub hex: String,
}

/// The addresses and ports of an IPv4 or IPv6 TCP or UDP frame, as a
/// tuple.
pub fn tuple_of(packet: &[u8]) -> Option<PacketTuple> {
    let headers = PacketHeaders::from_ethernet_slice(packet).ok()?;
    let (saddr, daddr, ip_id) = match &headers.net {
        Some(NetHeaders::Ipv4(ip, _)) => {
            (ip.source.into(), ip.destination.into(), ip.identification)
        }
        Some(NetHeaders::Ipv6(ip, _)) => (ip.source.into(), ip.destination.into(), 0),
        _ => return None,
    };
    let (sport, dport, proto) = match &headers.transport {
        Some(TransportHeader::Tcp(tcp)) => (tcp.source_port, tcp.destination_port, PROTO_TCP),
        Some(TransportHeader::Udp(udp)) => (udp.source_port, udp.destination_port, PROTO_UDP),
        _ => return None,
    };
    Some(PacketTuple {
        saddr,
        sport,
        daddr,
        dport,
        proto,
        ip_id,
    })
}

/// The TCP flags of a frame (0 when it is no TCP segment).
pub fn tcp_flags_of(packet: &[u8]) -> u8 {
    match PacketHeaders::from_ethernet_slice(packet).map(|h| h.transport) {
        Ok(Some(TransportHeader::Tcp(tcp))) => TCP_FLAG_NAMES
            .iter()
            .filter(|(name, _)| match *name {
                "SYN" => tcp.syn,
                "FIN" => tcp.fin,
                "RST" => tcp.rst,
                "PSH" => tcp.psh,
                _ => tcp.ack,
            })
            .fold(0, |bits, (_, bit)| bits | bit),
        _ => 0,
    }
}

/// Describes a frame (see [`PacketView`]).
pub fn describe(packet: &[u8]) -> PacketView {
    let hex = hex_dump(packet);
    let length = packet.len();
    let unparsed = |summary: String| PacketView {
        summary,
        source: String::new(),
        destination: String::new(),
        protocol: String::new(),
        tcp_flags: String::new(),
        length,
        checksums_valid: false,
        hex: hex.clone(),
    };
    let headers = match PacketHeaders::from_ethernet_slice(packet) {
        Ok(headers) => headers,
        Err(e) => return unparsed(format!("unparsable frame ({e})")),
    };
    let (saddr, daddr, ip_valid, protocol_number): (IpAddr, IpAddr, bool, u8) = match &headers.net {
        Some(NetHeaders::Ipv4(ip, _)) => (
            ip.source.into(),
            ip.destination.into(),
            ip.header_checksum == ip.calc_header_checksum(),
            ip.protocol.into(),
        ),
        Some(NetHeaders::Ipv6(ip, _)) => (
            ip.source.into(),
            ip.destination.into(),
            true,
            ip.next_header.into(),
        ),
        _ => return unparsed("not an IP frame".to_owned()),
    };
    let payload = headers.payload.slice();
    // The transport checksum over the pseudo-header of the packet's family.
    let (s4, d4) = match (saddr, daddr) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (Some(s.octets()), d.octets()),
        _ => (None, [0; 4]),
    };
    let (s16, d16) = (v6_octets(saddr), v6_octets(daddr));
    let (source, destination, protocol, tcp_flags, l4_valid) = match &headers.transport {
        Some(TransportHeader::Tcp(tcp)) => (
            SocketAddr::new(saddr, tcp.source_port).to_string(),
            SocketAddr::new(daddr, tcp.destination_port).to_string(),
            "TCP".to_owned(),
            tcp_flag_names(tcp_flags_of(packet)),
            match s4 {
                Some(s4) => tcp.calc_checksum_ipv4_raw(s4, d4, payload),
                None => tcp.calc_checksum_ipv6_raw(s16, d16, payload),
            }
            .is_ok_and(|sum| sum == tcp.checksum),
        ),
        Some(TransportHeader::Udp(udp)) => (
            SocketAddr::new(saddr, udp.source_port).to_string(),
            SocketAddr::new(daddr, udp.destination_port).to_string(),
            "UDP".to_owned(),
            String::new(),
            // A zero checksum means none over IPv4 only.
            (udp.checksum == 0 && s4.is_some())
                || match s4 {
                    Some(s4) => udp.calc_checksum_ipv4_raw(s4, d4, payload),
                    None => udp.calc_checksum_ipv6_raw(s16, d16, payload),
                }
                .is_ok_and(|sum| sum == udp.checksum),
        ),
        Some(TransportHeader::Icmpv6(icmp)) => (
            saddr.to_string(),
            daddr.to_string(),
            format!("ICMPv6 {:?}", icmp.icmp_type)
                .split(['(', '{'])
                .next()
                .unwrap_or("ICMPv6")
                .trim()
                .to_owned(),
            String::new(),
            icmp.icmp_type
                .calc_checksum(s16, d16, payload)
                .is_ok_and(|sum| sum == icmp.checksum),
        ),
        Some(TransportHeader::Icmpv4(icmp)) => (
            saddr.to_string(),
            daddr.to_string(),
            format!("ICMP {:?}", icmp.icmp_type)
                .split(['(', '{'])
                .next()
                .unwrap_or("ICMP")
                .trim()
                .to_owned(),
            String::new(),
            icmp.checksum == icmp.icmp_type.calc_checksum(payload),
        ),
        _ => (
            saddr.to_string(),
            daddr.to_string(),
            protocol_number.to_string(),
            String::new(),
            true,
        ),
    };
    let flags = if tcp_flags.is_empty() {
        String::new()
    } else {
        format!(" [{tcp_flags}]")
    };
    PacketView {
        summary: format!("{source} -> {destination} {protocol}{flags}"),
        source,
        destination,
        protocol,
        tcp_flags,
        length,
        checksums_valid: ip_valid && l4_valid,
        hex,
    }
}

/// `bytes` in hex, 16 a line, each line led by its offset.
pub fn hex_dump(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(line, chunk)| {
            let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            format!("{:04x}  {}", line * 16, hex.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn tuple(proto: u8) -> PacketTuple {
        PacketTuple {
            saddr: [10, 200, 0, 2].into(),
            sport: 40000,
            daddr: [10, 96, 0, 10].into(),
            dport: 80,
            proto,
            ip_id: 0,
        }
    }

    #[test]
    fn tcp_flags_parse_by_name_in_any_case_and_order() {
        assert_eq!(parse_tcp_flags("syn"), Ok(TCP_FLAG_SYN));
        assert_eq!(parse_tcp_flags("ACK, fin"), Ok(TCP_FLAG_ACK | TCP_FLAG_FIN));
        assert!(parse_tcp_flags("").is_err());
        let error = parse_tcp_flags("syn,urg").unwrap_err();
        assert!(error.contains("\"urg\""), "{error}");
        assert_eq!(tcp_flag_names(TCP_FLAG_SYN | TCP_FLAG_ACK), "SYN,ACK");
        assert_eq!(tcp_flag_names(0), "none");
    }

    #[test]
    fn built_packets_read_back_as_their_tuple_with_valid_checksums() {
        for (proto, flags) in [
            (PROTO_TCP, TCP_FLAG_SYN),
            (PROTO_TCP, TCP_FLAG_ACK | TCP_FLAG_PSH),
            (PROTO_UDP, 0),
        ] {
            let packet = build(&tuple(proto), flags);
            assert_eq!(tuple_of(&packet), Some(tuple(proto)));
            assert_eq!(tcp_flags_of(&packet), flags);
            let view = describe(&packet);
            assert!(view.checksums_valid, "{view:?}");
            assert_eq!(view.source, "10.200.0.2:40000");
            assert_eq!(view.destination, "10.96.0.10:80");
            assert_eq!(view.length, packet.len());
        }
        let view = describe(&build(&tuple(PROTO_TCP), TCP_FLAG_SYN));
        assert_eq!(view.summary, "10.200.0.2:40000 -> 10.96.0.10:80 TCP [SYN]");
        let view = describe(&build(&tuple(PROTO_UDP), 0));
        assert_eq!(view.summary, "10.200.0.2:40000 -> 10.96.0.10:80 UDP");
    }

    #[test]
    fn ipv6_packets_build_and_read_back_with_valid_checksums() {
        let tuple6 = |proto| PacketTuple {
            saddr: "fd00:10:200::2".parse::<Ipv6Addr>().unwrap().into(),
            daddr: "fd00:96::10".parse::<Ipv6Addr>().unwrap().into(),
            ..tuple(proto)
        };
        for (proto, flags, summary) in [
            (
                PROTO_TCP,
                TCP_FLAG_SYN,
                "[fd00:10:200::2]:40000 -> [fd00:96::10]:80 TCP [SYN]",
            ),
            (
                PROTO_UDP,
                0,
                "[fd00:10:200::2]:40000 -> [fd00:96::10]:80 UDP",
            ),
        ] {
            let mut packet = build(&tuple6(proto), flags);
            assert_eq!(packet[12..14], [0x86, 0xdd], "an IPv6 frame");
            assert_eq!(tuple_of(&packet), Some(tuple6(proto)));
            let view = describe(&packet);
            assert!(view.checksums_valid, "{view:?}");
            assert_eq!(view.summary, summary);
            let last = packet.len() - 1;
            packet[last] ^= 0xff;
            assert!(!describe(&packet).checksums_valid);
        }
    }

    #[test]
    fn a_broken_checksum_is_reported() {
        let mut packet = build(&tuple(PROTO_UDP), 0);
        let last = packet.len() - 1;
        packet[last] ^= 0xff;
        assert!(!describe(&packet).checksums_valid);
        assert_eq!(describe(&[0u8; 3]).source, "");
    }

    #[test]
    fn hex_dumps_have_sixteen_bytes_a_line_with_offsets() {
        let bytes: Vec<u8> = (0..18).collect();
        assert_eq!(
            hex_dump(&bytes),
            "0000  00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f\n0010  10 11"
        );
    }
}
