//! Packet parsing for the TC and XDP hooks: just enough of Ethernet, IPv4
//! and the L4 header to know a flow's 5-tuple and where its fields and
//! checksums are.
//!
//! Every access goes through [`Packet`]: `bpf_skb_load_bytes` for TC, a
//! bounds-checked read for XDP, so a truncated packet yields `None`, never
//! an out-of-bounds access, and the caller lets such a packet pass untouched.
//!
//! An IPv4 fragment is parsed too: the first one (offset 0, more fragments)
//! carries the L4 header like any packet; a later one carries none, so its
//! ports are unknown until `fragments` finds them in the record its first
//! fragment left.

use aya_ebpf::programs::{TcContext, XdpContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use service_common::{PROTO_TCP, PROTO_UDP};

use crate::wire::{
    ETH_P_IP, IP_FLAG_MF, TCP_FLAG_ACK, TCP_FLAG_SYN, TCP_FLAGS_OFF, TCP_HDR_LEN, UDP_HDR_LEN,
    l4_csum_off,
};

/// Which part of a datagram a packet is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    Whole,
    /// The first fragment of a datagram: it holds the L4 header.
    First,
    /// A later fragment: no L4 header, its ports come from the first one.
    Later,
}

/// An IPv4 TCP or UDP packet whose headers are all present in the skb (for
/// a later fragment: its IPv4 header). Aligned so its addresses are copied
/// into map keys as whole words.
#[repr(C, align(8))]
pub struct Ipv4Flow {
    /// Source address, network byte order.
    pub saddr: [u8; 4],
    /// Destination address, network byte order.
    pub daddr: [u8; 4],
    /// Source port, network byte order (wire bytes read as a native u16);
    /// for a later fragment, 0 until its first fragment's record is found.
    pub sport: u16,
    /// Destination port, network byte order (the same caveat).
    pub dport: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// TCP flags byte (offset 13 of the TCP header); 0 for UDP and for a
    /// later fragment.
    pub tcp_flags: u8,
    /// The IPv4 identification (the header's two bytes as a native u16).
    pub id: u16,
    /// Which part of its datagram the packet is.
    pub fragment: Fragment,
    /// Offset of the IPv4 header.
    pub l3_off: usize,
    /// Offset of the L4 header.
    pub l4_off: usize,
}

impl Ipv4Flow {
    /// Offset of the L4 checksum.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off + l4_csum_off(self.proto)
    }

    /// Whether this is a TCP SYN without ACK: the first packet of a connection.
    #[inline(always)]
    pub fn is_tcp_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }
}

/// Bounds-checked access to a packet's bytes, for both hook types.
pub trait Packet {
    /// Reads a `T` at `offset`; `None` when the packet is too short.
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
    /// Writes `value` at `offset`.
    fn write<T: Copy>(&self, offset: usize, value: &T) -> Result<(), i64>;
    /// The packet's length in bytes.
    fn length(&self) -> usize;
}

impl Packet for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        self.load(offset).ok()
    }

    #[inline(always)]
    fn write<T: Copy>(&self, offset: usize, value: &T) -> Result<(), i64> {
        self.store(offset, value, 0)
    }

    #[inline(always)]
    fn length(&self) -> usize {
        self.len() as usize
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let start = self.data();
        if start + offset + core::mem::size_of::<T>() > self.data_end() {
            return None;
        }
        // SAFETY: the range lies inside the packet, checked just above.
        Some(unsafe { ((start + offset) as *const T).read_unaligned() })
    }

    #[inline(always)]
    fn write<T: Copy>(&self, offset: usize, value: &T) -> Result<(), i64> {
        let start = self.data();
        if start + offset + core::mem::size_of::<T>() > self.data_end() {
            return Err(-1);
        }
        // SAFETY: the range lies inside the packet, checked just above.
        unsafe { ((start + offset) as *mut T).write_unaligned(*value) };
        Ok(())
    }

    #[inline(always)]
    fn length(&self) -> usize {
        self.data_end() - self.data()
    }
}

/// Parses an Ethernet frame holding IPv4 TCP or UDP (a whole datagram or a
/// fragment of one). `None` for anything else: other EtherTypes, other
/// protocols, and packets whose headers are cut short or inconsistent.
#[inline(always)]
pub fn parse_ipv4<P: Packet>(ctx: &P) -> Option<Ipv4Flow> {
    let eth: EthHdr = ctx.read(0)?;
    if u16::from_be(eth.ether_type) != ETH_P_IP {
        return None;
    }
    let l3_off = EthHdr::LEN;
    let ip: Ipv4Hdr = ctx.read(l3_off)?;
    let ihl = usize::from(ip.ihl());
    if ip.version() != 4 || ihl < Ipv4Hdr::LEN {
        return None;
    }
    let l4_len = match ip.proto {
        PROTO_TCP => TCP_HDR_LEN,
        PROTO_UDP => UDP_HDR_LEN,
        _ => return None,
    };
    let tot_len = usize::from(ip.tot_len());
    let l4_off = l3_off + ihl;
    let id = u16::from_ne_bytes(ip.id);
    if ip.frag_offset() != 0 {
        // A later fragment: only its IPv4 header is ours to read, and the
        // frame must hold all of it (options included), as for any packet
        // (the packet fuzzer found one cut inside its options translated).
        if tot_len < ihl || ctx.length() < l4_off {
            return None;
        }
        return Some(Ipv4Flow {
            saddr: ip.src_addr,
            daddr: ip.dst_addr,
            sport: 0,
            dport: 0,
            proto: ip.proto,
            tcp_flags: 0,
            id,
            fragment: Fragment::Later,
            l3_off,
            l4_off,
        });
    }
    if tot_len < ihl + l4_len || ctx.length() < l4_off + l4_len {
        return None;
    }
    let ports: [u16; 2] = ctx.read(l4_off)?;
    let tcp_flags = if ip.proto == PROTO_TCP {
        ctx.read::<u8>(l4_off + TCP_FLAGS_OFF)?
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
        id,
        fragment: if ip.frag_flags() & IP_FLAG_MF != 0 {
            Fragment::First
        } else {
            Fragment::Whole
        },
        l3_off,
        l4_off,
    })
}
