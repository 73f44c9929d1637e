//! Refusal of new flows to a frontend without backends, the way a host with
//! no listener refuses them, so the client fails at once instead of timing
//! out (kube-proxy's REJECT rules do the same).
//!
//! The offending packet itself becomes the reply, in place, and leaves
//! through the device it came in on (the host side of the client pod's
//! veth), that is, back to the pod:
//! - A TCP segment gets a reset (RFC 793, "Reset Generation", CLOSED port):
//!   a segment with ACK gets a RST whose sequence number is that ACK (the
//!   segment of a flow whose conntrack entry is gone, so the client learns
//!   the connection is dead); any other, a SYN above all, gets a RST|ACK
//!   with sequence number 0 acknowledging the segment (seq + 1 for a bare
//!   SYN). A RST is never answered: it is dropped.
//! - A UDP datagram gets an ICMP destination unreachable, port unreachable
//!   (RFC 792), quoting its IPv4 header and the first 8 bytes after it; over
//!   IPv6 an ICMPv6 destination unreachable, port unreachable (RFC 4443,
//!   type 1 code 4), quoting its IPv6 header, extension headers and the UDP
//!   header (cut at [`QUOTE_MAX_WORDS_V6`] words).
//!
//! Replies come from the frontend the client used (address, and port for
//! TCP), so the client's socket matches them. They have an IPv4 header
//! without options (TTL 64, DF set, ID 0, like Linux's own resets) or an
//! IPv6 header without extension headers (hop limit 64), a TCP header
//! without options and no data. One body serves both families
//! ([`Refusal`] holds what differs).
//!
//! Checksums: the IPv4, ICMP and ICMPv6 ones are computed in full; the TCP one goes
//! through `bpf_l4_csum_replace`, which writes it in the form the skb's
//! checksum state expects. That matters because a pod's packets usually
//! leave their L4 checksum to offload (`CHECKSUM_PARTIAL`, which a program
//! cannot clear), and a device without TX checksumming completes it, from
//! the checksum start the skb still holds: the position of the pod's L4
//! header. So the replies keep their L4 header there: the IPv4 options of
//! a TCP segment are cut with `bpf_skb_adjust_room` (which keeps the L4
//! header in place), and an ICMP error grows at the tail, its ICMP header
//! taking the UDP header's place (completing a valid ICMP message at that
//! offset only turns its unused bytes 6..8 into 0xffff). Only a datagram
//! with IPv4 options (IPv6 extension headers), offloaded, through such a
//! device, gets a broken ICMP checksum, and so times out as before.
//!
//! Anything that cannot be turned into a reply (a RST, an inconsistent TCP
//! header, a helper failure) is dropped and counted as `DropNoBackend`.
//! A later fragment never gets here (it never starts a flow: `lb`); a
//! first fragment is refused like a whole datagram, quoted up to its UDP
//! header (the IPv6 fragment header among the extension headers).

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, bpf_adj_room_mode::BPF_ADJ_ROOM_NET},
    helpers::{bpf_csum_diff, bpf_skb_change_tail},
    programs::TcContext,
};
use network_types::{
    bitfield::BitfieldU16, eth::EthHdr, icmp::Icmpv4Hdr, ip::Ipv4Hdr, tcp::TcpHdr,
};
use service_common::{DatapathCounter, MapAddr, PROTO_TCP};

use crate::{
    maps::count,
    packet::{Flow, IpFamily},
    verdict::{VERDICT_DROP, VERDICT_REDIRECT, redirect_back, swapped_macs},
    wire::{
        ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, ICMP_QUOTED_DATA_LEN, ICMPV6_DEST_UNREACH,
        ICMPV6_PORT_UNREACH, IP_FLAG_DF, IP_TOT_LEN_OFF, IP_VERSION_4, IP_VERSION_6,
        IPV4_MAX_HDR_LEN, IPV6_HDR_LEN, IPV6_PAYLOAD_LEN_OFF, PROTO_ICMP, PROTO_ICMPV6,
        TCP_CSUM_OFF, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN, WORD_LEN,
        checksum_bytes,
    },
};

/// Error for a packet that gets no reply although no helper failed.
const NO_REPLY: i64 = -1;
/// TTL of the replies: Linux's default (`net.ipv4.ip_default_ttl`).
const REPLY_TTL: u8 = 64;
/// 32-bit words of the longest quote: the largest IPv4 header and 8 bytes.
const QUOTE_MAX_WORDS_V4: usize = (IPV4_MAX_HDR_LEN + ICMP_QUOTED_DATA_LEN) / WORD_LEN;
/// 32-bit words of the longest IPv6 quote: the IPv6 header, 56 bytes of
/// extension headers and 8 bytes (a longer one is cut there: RFC 4443
/// asks for as much of the datagram as fits, and no more than the minimum
/// MTU).
const QUOTE_MAX_WORDS_V6: usize = (IPV6_HDR_LEN + 56 + ICMP_QUOTED_DATA_LEN) / WORD_LEN;
/// Bit position of the header length (in words) in the TCP data offset byte.
const TCP_DOFF_SHIFT: u32 = 4;
/// The data offset byte of a TCP header without options.
const TCP_DOFF_NO_OPTIONS: u8 = ((TcpHdr::LEN / WORD_LEN) as u8) << TCP_DOFF_SHIFT;

/// The TCP pseudo header (RFC 793) the checksum covers besides the segment.
#[repr(C)]
struct PseudoHdr4 {
    /// Source address, network byte order.
    saddr: [u8; 4],
    /// Destination address, network byte order.
    daddr: [u8; 4],
    /// Always zero.
    zero: u8,
    /// IP protocol.
    proto: u8,
    /// Length of the TCP segment, network byte order.
    len: [u8; 2],
}

/// The IPv6 pseudo header (RFC 8200, 8.1) the TCP and ICMPv6 checksums
/// cover besides the message.
#[repr(C)]
struct PseudoHdr6 {
    /// Source address, network byte order.
    saddr: MapAddr,
    /// Destination address, network byte order.
    daddr: MapAddr,
    /// Length of the upper-layer message, network byte order.
    len: [u8; 4],
    /// Always zero.
    zero: [u8; 3],
    /// Next header.
    next: u8,
}

/// An IPv6 header without extension headers, as the replies carry it.
#[repr(C)]
struct Ipv6Header {
    /// Version (4 bits), traffic class (8), flow label (20).
    version_class_flow: [u8; 4],
    /// Length after this header, network byte order.
    payload_len: [u8; 2],
    /// Next header.
    next: u8,
    /// Hop limit.
    hop_limit: u8,
    /// Source address, network byte order.
    saddr: MapAddr,
    /// Destination address, network byte order.
    daddr: MapAddr,
}

/// What a refusal needs to know of its family: the IP header it writes,
/// the pseudo header its checksums cover, and its ICMP.
pub trait Refusal: IpFamily {
    /// Length of the reply's IP header (no options, no extension headers).
    const IP_HDR_LEN: usize;
    /// The ICMP of the family: protocol, type and code of port unreachable.
    const ICMP: (u8, u8, u8);
    /// Whether the ICMP checksum covers a pseudo header (ICMPv6's does).
    const ICMP_PSEUDO: bool;

    /// The IP datagram's length as its header says, in bytes.
    fn datagram_len(ctx: &TcContext, flow: &Flow<Self>) -> Result<usize, i64>;
    /// Writes the reply's IP header, from `flow`'s destination to its
    /// source, for `payload_len` bytes after it of protocol `proto`.
    fn write_ip(
        ctx: &TcContext,
        flow: &Flow<Self>,
        proto: u8,
        payload_len: usize,
    ) -> Result<(), i64>;
    /// `seed` plus the sum of the reply's pseudo header for `len` bytes of
    /// protocol `proto`.
    fn pseudo_sum(flow: &Flow<Self>, proto: u8, len: usize, seed: u32) -> Result<u32, i64>;
    /// Turns a UDP datagram into its port unreachable.
    fn port_unreachable(ctx: &TcContext, flow: &Flow<Self>) -> Result<(), i64>;
}

impl Refusal for [u8; 4] {
    const IP_HDR_LEN: usize = Ipv4Hdr::LEN;
    const ICMP: (u8, u8, u8) = (PROTO_ICMP, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH);
    const ICMP_PSEUDO: bool = false;

    #[inline(always)]
    fn datagram_len(ctx: &TcContext, flow: &Flow<Self>) -> Result<usize, i64> {
        let len: [u8; 2] = ctx.load(flow.l3_off + IP_TOT_LEN_OFF)?;
        Ok(usize::from(u16::from_be_bytes(len)))
    }

    #[inline(always)]
    fn write_ip(
        ctx: &TcContext,
        flow: &Flow<Self>,
        proto: u8,
        payload_len: usize,
    ) -> Result<(), i64> {
        let mut ip = Ipv4Hdr {
            vihl: 0,
            tos: 0,
            tot_len: [0; 2],
            id: [0; 2],
            frags: [0; 2],
            ttl: REPLY_TTL,
            proto,
            check: [0; 2],
            src_addr: flow.daddr,
            dst_addr: flow.saddr,
        };
        ip.set_vihl(IP_VERSION_4, Ipv4Hdr::LEN as u8);
        ip.set_tot_len((Ipv4Hdr::LEN + payload_len) as u16);
        ip.set_frags(IP_FLAG_DF, 0);
        ip.check = checksum_bytes(csum_add(&ip, 0)?);
        ctx.store(EthHdr::LEN, &ip, 0)
    }

    #[inline(always)]
    fn pseudo_sum(flow: &Flow<Self>, proto: u8, len: usize, seed: u32) -> Result<u32, i64> {
        let pseudo = PseudoHdr4 {
            saddr: flow.daddr,
            daddr: flow.saddr,
            zero: 0,
            proto,
            len: (len as u16).to_be_bytes(),
        };
        csum_add(&pseudo, seed)
    }

    #[inline(always)]
    fn port_unreachable(ctx: &TcContext, flow: &Flow<Self>) -> Result<(), i64> {
        icmp_port_unreachable::<Self, QUOTE_MAX_WORDS_V4>(ctx, flow)
    }
}

impl Refusal for MapAddr {
    const IP_HDR_LEN: usize = IPV6_HDR_LEN;
    const ICMP: (u8, u8, u8) = (PROTO_ICMPV6, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH);
    const ICMP_PSEUDO: bool = true;

    #[inline(always)]
    fn datagram_len(ctx: &TcContext, flow: &Flow<Self>) -> Result<usize, i64> {
        let len: [u8; 2] = ctx.load(flow.l3_off + IPV6_PAYLOAD_LEN_OFF)?;
        Ok(IPV6_HDR_LEN + usize::from(u16::from_be_bytes(len)))
    }

    #[inline(always)]
    fn write_ip(
        ctx: &TcContext,
        flow: &Flow<Self>,
        proto: u8,
        payload_len: usize,
    ) -> Result<(), i64> {
        let ip = Ipv6Header {
            version_class_flow: [IP_VERSION_6 << 4, 0, 0, 0],
            payload_len: (payload_len as u16).to_be_bytes(),
            next: proto,
            hop_limit: REPLY_TTL,
            saddr: flow.daddr,
            daddr: flow.saddr,
        };
        ctx.store(EthHdr::LEN, &ip, 0)
    }

    #[inline(always)]
    fn pseudo_sum(flow: &Flow<Self>, proto: u8, len: usize, seed: u32) -> Result<u32, i64> {
        let pseudo = PseudoHdr6 {
            saddr: flow.daddr,
            daddr: flow.saddr,
            len: (len as u32).to_be_bytes(),
            zero: [0; 3],
            next: proto,
        };
        csum_add(&pseudo, seed)
    }

    #[inline(always)]
    fn port_unreachable(ctx: &TcContext, flow: &Flow<Self>) -> Result<(), i64> {
        icmp_port_unreachable::<Self, QUOTE_MAX_WORDS_V6>(ctx, flow)
    }
}

/// Turns a new flow's packet to a frontend without backends into the
/// client's refusal and sends it back: [`VERDICT_REDIRECT`], counted as
/// `RejectedNoBackend`; the drop verdict, counted as `DropNoBackend`, when
/// no reply can be made. Not inlined: its own stack frame keeps the
/// hooks that refuse within the BPF stack limit.
#[inline(never)]
pub fn reject<A: Refusal>(ctx: &TcContext, flow: &Flow<A>) -> i32 {
    let reply = if flow.proto == PROTO_TCP {
        tcp_reset(ctx, flow)
    } else {
        A::port_unreachable(ctx, flow)
    };
    if reply.is_ok() && redirect_back(ctx) {
        count(DatapathCounter::RejectedNoBackend);
        return VERDICT_REDIRECT;
    }
    count(DatapathCounter::DropNoBackend);
    VERDICT_DROP
}

/// Turns a TCP segment into the reset a closed port answers it with.
#[inline(always)]
fn tcp_reset<A: Refusal>(ctx: &TcContext, flow: &Flow<A>) -> Result<(), i64> {
    if flow.tcp_flags & TCP_FLAG_RST != 0 {
        return Err(NO_REPLY);
    }
    let eth: EthHdr = ctx.load(0)?;
    let datagram_len = A::datagram_len(ctx, flow)?;
    let tcp: TcpHdr = ctx.load(flow.l4_off)?;
    let ip_hdr_len = flow.l4_off - flow.l3_off;
    let tcp_hdr_len = usize::from(tcp.doff()) * WORD_LEN;
    if tcp_hdr_len < TcpHdr::LEN {
        return Err(NO_REPLY);
    }
    let data_len = datagram_len
        .checked_sub(ip_hdr_len + tcp_hdr_len)
        .ok_or(NO_REPLY)?;
    let (seq, ack_seq, flags) = if flow.tcp_flags & TCP_FLAG_ACK != 0 {
        (tcp.ack_seq, [0; 4], TCP_FLAG_RST)
    } else {
        // SEG.LEN counts the data, and SYN and FIN as one each.
        let seg_len = data_len as u32
            + u32::from(flow.tcp_flags & TCP_FLAG_SYN != 0)
            + u32::from(flow.tcp_flags & TCP_FLAG_FIN != 0);
        let ack = u32::from_be_bytes(tcp.seq).wrapping_add(seg_len);
        ([0; 4], ack.to_be_bytes(), TCP_FLAG_RST | TCP_FLAG_ACK)
    };

    // Only the headers stay, without options: cut the IPv4 options (IPv6
    // extension headers) out (the TCP header keeps its place) and
    // everything after 20 TCP bytes.
    if ip_hdr_len > A::IP_HDR_LEN {
        ctx.adjust_room(-((ip_hdr_len - A::IP_HDR_LEN) as i32), BPF_ADJ_ROOM_NET, 0)?;
    }
    let l4_off = EthHdr::LEN + A::IP_HDR_LEN;
    change_tail(ctx, l4_off + TcpHdr::LEN)?;

    write_l2_l3(ctx, &eth, flow, PROTO_TCP, TcpHdr::LEN)?;
    let reset = TcpHdr {
        source: tcp.dest,
        dest: tcp.source,
        seq,
        ack_seq,
        _bitfield_align_1: [],
        _bitfield_1: BitfieldU16::new([TCP_DOFF_NO_OPTIONS, flags]),
        window: [0; 2],
        check: [0; 2],
        urg_ptr: [0; 2],
    };
    ctx.store(l4_off, &reset, 0)?;
    // From a zero checksum: first the pseudo header, then the segment.
    let csum_off = l4_off + TCP_CSUM_OFF;
    ctx.l4_csum_replace(
        csum_off,
        0,
        u64::from(A::pseudo_sum(flow, PROTO_TCP, TcpHdr::LEN, 0)?),
        u64::from(BPF_F_PSEUDO_HDR),
    )?;
    ctx.l4_csum_replace(csum_off, 0, u64::from(csum_add(&reset, 0)?), 0)
}

/// Turns a UDP datagram into the ICMP (ICMPv6) port unreachable a closed
/// port answers it with, quoting its IP header and UDP header (at most
/// `WORDS` words): the quote is copied out, the packet grown or cut at its
/// tail to the reply's length, and every byte after the Ethernet addresses
/// written anew.
#[inline(always)]
fn icmp_port_unreachable<A: Refusal, const WORDS: usize>(
    ctx: &TcContext,
    flow: &Flow<A>,
) -> Result<(), i64> {
    let eth: EthHdr = ctx.load(0)?;
    let quote_len = (flow.l4_off - flow.l3_off + ICMP_QUOTED_DATA_LEN).min(WORDS * WORD_LEN);
    // The quote, word by word (IPv4 header and IPv6 extension header
    // lengths are whole words); the words after it stay zero and add
    // nothing to the checksum.
    let mut quote = [0u32; WORDS];
    for (index, word) in quote.iter_mut().enumerate() {
        if index * WORD_LEN >= quote_len {
            break;
        }
        *word = ctx.load(flow.l3_off + index * WORD_LEN)?;
    }
    let (proto, type_, code) = A::ICMP;
    // (ICMPv6's header has the same layout as ICMP's.)
    let mut icmp = Icmpv4Hdr {
        type_,
        code,
        check: [0; 2],
        data: [0; 4],
    };
    let message_len = Icmpv4Hdr::LEN + quote_len;
    let seed = if A::ICMP_PSEUDO {
        A::pseudo_sum(flow, proto, message_len, 0)?
    } else {
        0
    };
    icmp.check = checksum_bytes(csum_add(&quote, csum_add(&icmp, seed)?)?);

    let icmp_off = EthHdr::LEN + A::IP_HDR_LEN;
    let quote_off = icmp_off + Icmpv4Hdr::LEN;
    change_tail(ctx, quote_off + quote_len)?;
    write_l2_l3(ctx, &eth, flow, proto, message_len)?;
    ctx.store(icmp_off, &icmp, 0)?;
    for (index, word) in quote.iter().enumerate() {
        if index * WORD_LEN >= quote_len {
            break;
        }
        ctx.store(quote_off + index * WORD_LEN, word, 0)?;
    }
    Ok(())
}

/// Writes the reply's Ethernet header (the addresses swapped) and its IP
/// header, from the frontend to the client, with `payload_len` bytes of
/// `proto` after it.
#[inline(always)]
fn write_l2_l3<A: Refusal>(
    ctx: &TcContext,
    eth: &EthHdr,
    flow: &Flow<A>,
    proto: u8,
    payload_len: usize,
) -> Result<(), i64> {
    let reply_eth = swapped_macs(eth);
    A::write_ip(ctx, flow, proto, payload_len)?;
    ctx.store(0, &reply_eth, 0)
}

/// Trims (or grows) the packet to `len` bytes.
#[inline(always)]
fn change_tail(ctx: &TcContext, len: usize) -> Result<(), i64> {
    // SAFETY: the helper checks `len` against the packet itself.
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) };
    if ret == 0 { Ok(()) } else { Err(ret) }
}

/// `seed` plus the one's complement sum of `value`'s bytes (its size a
/// multiple of 4), by `bpf_csum_diff`.
#[inline(always)]
fn csum_add<T>(value: &T, seed: u32) -> Result<u32, i64> {
    // SAFETY: the helper only reads the `size_of::<T>()` bytes of `value`.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            core::ptr::from_ref(value).cast_mut().cast(),
            core::mem::size_of::<T>() as u32,
            seed,
        )
    };
    u32::try_from(sum).map_err(|_| sum)
}
