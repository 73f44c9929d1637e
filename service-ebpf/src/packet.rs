//! Packet parsing for the TC hooks: just enough of Ethernet, IPv4 and the L4
//! header to know a flow's 5-tuple and where its fields and checksums are.
//!
//! Every read goes through `bpf_skb_load_bytes` (`TcContext::load`), so a
//! truncated packet yields an error, never an out-of-bounds access, and the
//! caller lets such a packet pass untouched.

use aya_ebpf::programs::TcContext;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use service_common::{PROTO_TCP, PROTO_UDP};

/// EtherType of IPv4, host byte order.
const ETH_P_IP: u16 = 0x0800;
/// "More fragments" flag in the IPv4 flags field.
const IP_MF: u8 = 0b001;
/// Length of a TCP header without options.
const TCP_HDR_LEN: usize = 20;
/// Length of a UDP header.
const UDP_HDR_LEN: usize = 8;
/// Offset of the checksum inside a TCP header.
const TCP_CSUM_OFF: usize = 16;
/// Offset of the checksum inside a UDP header.
const UDP_CSUM_OFF: usize = 6;

/// An IPv4 TCP or UDP packet whose headers are all present in the skb.
pub struct Ipv4Flow {
    /// Source address, network byte order.
    pub saddr: [u8; 4],
    /// Destination address, network byte order.
    pub daddr: [u8; 4],
    /// Source port, network byte order (wire bytes read as a native u16).
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// TCP flags byte (offset 13 of the TCP header); 0 for UDP.
    pub tcp_flags: u8,
    /// Offset of the IPv4 header.
    pub l3_off: usize,
    /// Offset of the L4 header.
    pub l4_off: usize,
}

/// TCP SYN flag bit.
pub const TCP_FLAG_SYN: u8 = 0x02;
/// TCP ACK flag bit.
pub const TCP_FLAG_ACK: u8 = 0x10;

impl Ipv4Flow {
    /// Offset of the L4 checksum.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off
            + if self.proto == PROTO_TCP {
                TCP_CSUM_OFF
            } else {
                UDP_CSUM_OFF
            }
    }

    /// Whether this is a TCP SYN without ACK: the first packet of a connection.
    #[inline(always)]
    pub fn is_tcp_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }
}

/// Parses an Ethernet frame holding IPv4 TCP or UDP. `None` for anything
/// else: other EtherTypes, other protocols, non-first fragments, and packets
/// whose headers are cut short or inconsistent.
#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext) -> Option<Ipv4Flow> {
    let eth: EthHdr = ctx.load(0).ok()?;
    if u16::from_be(eth.ether_type) != ETH_P_IP {
        return None;
    }
    let l3_off = EthHdr::LEN;
    let ip: Ipv4Hdr = ctx.load(l3_off).ok()?;
    let ihl = usize::from(ip.ihl());
    if ip.version() != 4 || ihl < Ipv4Hdr::LEN {
        return None;
    }
    // Fragments carry no (or only partial) L4 header: never translate them.
    if ip.frag_offset() != 0 || ip.frag_flags() & IP_MF != 0 {
        return None;
    }
    let l4_len = match ip.proto {
        PROTO_TCP => TCP_HDR_LEN,
        PROTO_UDP => UDP_HDR_LEN,
        _ => return None,
    };
    let tot_len = usize::from(ip.tot_len());
    let l4_off = l3_off + ihl;
    if tot_len < ihl + l4_len || (ctx.len() as usize) < l4_off + l4_len {
        return None;
    }
    let ports: [u16; 2] = ctx.load(l4_off).ok()?;
    let tcp_flags = if ip.proto == PROTO_TCP {
        ctx.load::<u8>(l4_off + 13).ok()?
    } else {
        0
    };
    Some(Ipv4Flow {
        saddr: ip.src_addr,
        daddr: ip.dst_addr,
        sport: ports[0],
        dport: ports[1],
        proto: ip.proto,
        tcp_flags,
        l3_off,
        l4_off,
    })
}
