//! ICMP errors about translated flows (destination unreachable, including
//! "fragmentation needed", and time exceeded). A backend, or a router on
//! its way, reports an error about the packet it saw: from the client to
//! the backend. Before the client gets it, the quoted packet's destination
//! becomes the frontend again (and the error's source too when the backend
//! itself sent it), so the client's socket matches it: path MTU discovery
//! and connection errors work through a Service. Runs on the egress hooks,
//! like the reverse translation of ordinary replies.

use service_common::{
    CT_DIR_REPLY, ConntrackKey, DatapathCounter, PROTO_TCP, PROTO_UDP, map_addr_v4_octets,
};

use crate::{
    maps::{CONNTRACK, count},
    packet::Packet,
    verdict::Outcome,
    wire::{
        ETH_P_IP, ETH_TYPE_OFF, ICMP_CSUM_OFF, ICMP_DEST_UNREACH, ICMP_HDR_LEN, ICMP_TIME_EXCEEDED,
        IP_CSUM_OFF, IP_DST_OFF, IP_PROTO_OFF, IP_SRC_OFF, IP_VERSION_4, L4_DPORT_OFF, PROTO_ICMP,
        WORD_LEN, csum_replace, csum_replace_addr, l4_csum_off,
    },
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

/// An ICMP error quoting an IPv4 TCP or UDP packet.
struct IcmpError {
    /// Offset of the outer IPv4 header.
    l3_off: usize,
    /// Offset of the ICMP header.
    icmp_off: usize,
    /// Offset of the quoted IPv4 header.
    inner_l3_off: usize,
    /// Offset of the quoted L4 header.
    inner_l4_off: usize,
    /// Outer source address (who reports the error).
    saddr: [u8; 4],
    /// Quoted packet: source (the client), network byte order.
    inner_saddr: [u8; 4],
    /// Quoted packet: destination (the backend).
    inner_daddr: [u8; 4],
    /// Quoted packet: source port.
    inner_sport: u16,
    /// Quoted packet: destination port.
    inner_dport: u16,
    /// Quoted packet's protocol.
    inner_proto: u8,
}

/// Parses an ICMP error quoting at least the first 8 bytes of a TCP or UDP
/// packet (RFC 792); `None` for anything else.
#[inline(always)]
fn parse<P: Packet>(ctx: &P) -> Option<IcmpError> {
    let ether_type: u16 = ctx.read(ETH_TYPE_OFF)?;
    if u16::from_be(ether_type) != ETH_P_IP {
        return None;
    }
    let l3_off = EthHdr::LEN;
    let vihl: u8 = ctx.read(l3_off)?;
    let proto: u8 = ctx.read(l3_off + IP_PROTO_OFF)?;
    let ihl = usize::from(vihl & 0x0f) * WORD_LEN;
    if vihl >> 4 != IP_VERSION_4 || ihl < Ipv4Hdr::LEN || proto != PROTO_ICMP {
        return None;
    }
    let icmp_off = l3_off + ihl;
    let icmp_type: u8 = ctx.read(icmp_off)?;
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
        return None;
    }
    let inner_l3_off = icmp_off + ICMP_HDR_LEN;
    let inner_vihl: u8 = ctx.read(inner_l3_off)?;
    let inner_proto: u8 = ctx.read(inner_l3_off + IP_PROTO_OFF)?;
    let inner_ihl = usize::from(inner_vihl & 0x0f) * WORD_LEN;
    if inner_vihl >> 4 != IP_VERSION_4 || inner_ihl < Ipv4Hdr::LEN {
        return None;
    }
    if inner_proto != PROTO_TCP && inner_proto != PROTO_UDP {
        return None;
    }
    let inner_l4_off = inner_l3_off + inner_ihl;
    let ports: [u16; 2] = ctx.read(inner_l4_off)?;
    Some(IcmpError {
        l3_off,
        icmp_off,
        inner_l3_off,
        inner_l4_off,
        saddr: ctx.read(l3_off + IP_SRC_OFF)?,
        inner_saddr: ctx.read(inner_l3_off + IP_SRC_OFF)?,
        inner_daddr: ctx.read(inner_l3_off + IP_DST_OFF)?,
        inner_sport: ports[0],
        inner_dport: ports[1],
        inner_proto,
    })
}

/// Translates an ICMP error about a tracked flow back to its frontend;
/// `Untouched` when the packet is no such error.
#[inline(always)]
pub fn reverse_icmp_error<P: Packet>(ctx: &P) -> Outcome {
    let Some(error) = parse(ctx) else {
        return Outcome::Untouched;
    };
    // The quoted packet went client -> backend; its reply entry is the
    // other way round.
    let key = ConntrackKey::v4(
        error.inner_daddr,
        error.inner_dport,
        error.inner_saddr,
        error.inner_sport,
        error.inner_proto,
        CT_DIR_REPLY,
    );
    // SAFETY: the value is copied out at once.
    let Some(ct) = (unsafe { CONNTRACK.get(key) }).copied() else {
        return Outcome::Untouched;
    };
    // The reply entry holds the frontend.
    match rewrite(ctx, &error, map_addr_v4_octets(&ct.nat_addr), ct.nat_port) {
        Ok(()) => {
            count(DatapathCounter::ReplyTranslated);
            Outcome::Translated
        }
        Err(_) => {
            count(DatapathCounter::DropRewrite);
            Outcome::Dropped
        }
    }
}

/// Rewrites the quoted destination to `addr:port` (and the error's source,
/// when the backend sent it), fixing the quoted IPv4 and L4 checksums (the
/// L4 one only if it was quoted), the ICMP checksum and the outer IPv4
/// checksum, by RFC 1624 incremental updates.
#[inline(always)]
fn rewrite<P: Packet>(ctx: &P, error: &IcmpError, addr: [u8; 4], port: u16) -> Result<(), i64> {
    let (old, new) = (error.inner_daddr, addr);
    let mut icmp_csum: u16 = ctx.read(error.icmp_off + ICMP_CSUM_OFF).ok_or(-1i64)?;

    // Quoted IPv4 header: destination and header checksum.
    let inner_csum_off = error.inner_l3_off + IP_CSUM_OFF;
    let old_inner_csum: u16 = ctx.read(inner_csum_off).ok_or(-1i64)?;
    let new_inner_csum = csum_replace_addr(old_inner_csum, old, new);
    ctx.write(inner_csum_off, &new_inner_csum)?;
    ctx.write(error.inner_l3_off + IP_DST_OFF, &addr)?;
    icmp_csum = csum_replace_addr(icmp_csum, old, new);
    icmp_csum = csum_replace(icmp_csum, old_inner_csum, new_inner_csum);

    // Quoted destination port, and the quoted L4 checksum when present.
    ctx.write(error.inner_l4_off + L4_DPORT_OFF, &port)?;
    icmp_csum = csum_replace(icmp_csum, error.inner_dport, port);
    let l4_csum_off = error.inner_l4_off + l4_csum_off(error.inner_proto);
    if let Some(old_l4) = ctx.read::<u16>(l4_csum_off)
        && !(error.inner_proto == PROTO_UDP && old_l4 == 0)
    {
        let new_l4 = csum_replace(csum_replace_addr(old_l4, old, new), error.inner_dport, port);
        ctx.write(l4_csum_off, &new_l4)?;
        icmp_csum = csum_replace(icmp_csum, old_l4, new_l4);
    }
    ctx.write(error.icmp_off + ICMP_CSUM_OFF, &icmp_csum)?;

    // The error's own source, when the backend itself reported it.
    if error.saddr == error.inner_daddr {
        let outer_csum_off = error.l3_off + IP_CSUM_OFF;
        let outer_csum: u16 = ctx.read(outer_csum_off).ok_or(-1i64)?;
        ctx.write(outer_csum_off, &csum_replace_addr(outer_csum, old, new))?;
        ctx.write(error.l3_off + IP_SRC_OFF, &addr)?;
    }
    Ok(())
}
