//! The packets `trace` sends through the programs, built with etherparse,
//! and what it shows of a packet: its addresses, ports, TCP flags, whether
//! its checksums verify, and its bytes.

use std::net::{Ipv4Addr, SocketAddrV4};

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

/// Builds the Ethernet frame of `tuple` (TCP with `tcp_flags`, or UDP),
/// without payload, with valid checksums.
pub fn build(tuple: &PacketTuple, tcp_flags: u8) -> Vec<u8> {
    let ip = PacketBuilder::ethernet2(TRACE_SOURCE_MAC, TRACE_DESTINATION_MAC).ipv4(
        tuple.saddr.octets(),
        tuple.daddr.octets(),
        64,
    );
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
    /// Source `address:port` (no port for ICMP); empty when not IPv4.
    pub source: String,
    /// Destination `address:port`.
    pub destination: String,
    /// `TCP`, `UDP`, `ICMP` or the protocol number.
    pub protocol: String,
    /// TCP flags, e.g. `SYN,ACK`; empty for other protocols.
    pub tcp_flags: String,
    /// Frame length in bytes.
    pub length: usize,
    /// Whether the IPv4 header checksum and the TCP/UDP/ICMP checksum verify.
    pub checksums_valid: bool,
    /// The frame's bytes in hex, 16 a line, with offsets.
    pub hex: String,
}

/// The addresses and ports of an IPv4 TCP or UDP frame, as a tuple.
pub fn tuple_of(packet: &[u8]) -> Option<PacketTuple> {
    let headers = PacketHeaders::from_ethernet_slice(packet).ok()?;
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        return None;
    };
    let (sport, dport, proto) = match &headers.transport {
        Some(TransportHeader::Tcp(tcp)) => (tcp.source_port, tcp.destination_port, PROTO_TCP),
        Some(TransportHeader::Udp(udp)) => (udp.source_port, udp.destination_port, PROTO_UDP),
        _ => return None,
    };
    Some(PacketTuple {
        saddr: ip.source.into(),
        sport,
        daddr: ip.destination.into(),
        dport,
        proto,
        ip_id: ip.identification,
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
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        return unparsed("not an IPv4 frame".to_owned());
    };
    let (saddr, daddr) = (Ipv4Addr::from(ip.source), Ipv4Addr::from(ip.destination));
    let payload = headers.payload.slice();
    let ip_valid = ip.header_checksum == ip.calc_header_checksum();
    let (source, destination, protocol, tcp_flags, l4_valid) = match &headers.transport {
        Some(TransportHeader::Tcp(tcp)) => (
            SocketAddrV4::new(saddr, tcp.source_port).to_string(),
            SocketAddrV4::new(daddr, tcp.destination_port).to_string(),
            "TCP".to_owned(),
            tcp_flag_names(tcp_flags_of(packet)),
            tcp.calc_checksum_ipv4(ip, payload)
                .is_ok_and(|sum| sum == tcp.checksum),
        ),
        Some(TransportHeader::Udp(udp)) => (
            SocketAddrV4::new(saddr, udp.source_port).to_string(),
            SocketAddrV4::new(daddr, udp.destination_port).to_string(),
            "UDP".to_owned(),
            String::new(),
            udp.checksum == 0
                || udp
                    .calc_checksum_ipv4(ip, payload)
                    .is_ok_and(|sum| sum == udp.checksum),
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
            u8::from(ip.protocol).to_string(),
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

    fn tuple(proto: u8) -> PacketTuple {
        PacketTuple {
            saddr: Ipv4Addr::new(10, 200, 0, 2),
            sport: 40000,
            daddr: Ipv4Addr::new(10, 96, 0, 10),
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
