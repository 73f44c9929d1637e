//! ICMP and ICMPv6 errors about translated flows (destination unreachable,
//! including "fragmentation needed", IPv6's "packet too big", and time
//! exceeded). A backend, or a router on its way, reports an error about
//! the packet it saw: from the client to the backend. Before the client
//! gets it, the quoted packet's destination becomes the frontend again
//! (and the error's source too when the backend itself sent it), so the
//! client's socket matches it: path MTU discovery and connection errors
//! work through a Service. Runs on the egress hooks, like the reverse
//! translation of ordinary replies.
//!
//! An error about an SNATed flow (a NodePort's remote backend, or a router
//! on the way to it, reporting about a packet from this node's SNAT
//! address) is first sent on to the client: on ingress from the network,
//! its destination and the quoted source become the client again, as the
//! reverse SNAT of ordinary replies does; the kernel forwards it, and the
//! egress hook then restores the frontend as above.
//!
//! One generic body serves both families ([`IcmpFamily`]); they differ in
//! where the error's headers sit and in what their checksums cover.

use service_common::{
    CT_DIR_REPLY, CT_DIR_SNAT_REPLY, ConntrackKey, DatapathCounter, MapAddr, PROTO_TCP, PROTO_UDP,
};

use crate::{
    maps::{CONNTRACK, config, count},
    nat::Side,
    packet::{IpFamily, Packet, read_addr6},
    verdict::Outcome,
    wire::{
        ETH_P_IP, ETH_P_IPV6, ETH_TYPE_OFF, ICMP_CSUM_OFF, ICMP_DEST_UNREACH, ICMP_HDR_LEN,
        ICMP_TIME_EXCEEDED, ICMPV6_DEST_UNREACH, ICMPV6_PKT_TOOBIG, ICMPV6_TIME_EXCEED,
        IP_CSUM_OFF, IP_DST_OFF, IP_PROTO_OFF, IP_SRC_OFF, IP_VERSION_4, IP_VERSION_6,
        IPV6_DST_OFF, IPV6_HDR_LEN, IPV6_NEXT_HDR_OFF, IPV6_SRC_OFF, L4_DPORT_OFF, L4_SPORT_OFF,
        PROTO_ICMP, PROTO_ICMPV6, WORD_LEN, csum_replace, l4_csum_off,
    },
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

/// An ICMP (ICMPv6) error quoting a TCP or UDP packet of family `A`.
/// The outer IP header follows the Ethernet header, and the quoted one the
/// ICMP header (fewer fields: the hooks from the network call the reverse
/// SNAT here at the verifier's stack limit).
pub struct IcmpError<A> {
    /// Offset of the ICMP header.
    icmp_off: usize,
    /// Offset of the quoted L4 header.
    inner_l4_off: usize,
    /// Outer source address (who reports the error).
    saddr: A,
    /// Outer destination address (who the error is for).
    daddr: A,
    /// Quoted packet: source (the client), network byte order.
    inner_saddr: A,
    /// Quoted packet: destination (the backend).
    inner_daddr: A,
    /// Quoted packet: source port.
    inner_sport: u16,
    /// Quoted packet: destination port.
    inner_dport: u16,
    /// Quoted packet's protocol.
    inner_proto: u8,
}

/// How each family's ICMP errors are parsed.
pub trait IcmpFamily: IpFamily {
    /// Parses an error of this family's ICMP quoting at least the first 8
    /// bytes of a TCP or UDP packet of the same family; `None` for
    /// anything else (other ICMP types above all: echo, neighbour
    /// discovery).
    fn parse_error<P: Packet>(ctx: &P) -> Option<IcmpError<Self>>;
}

impl IcmpFamily for [u8; 4] {
    /// ICMP destination unreachable or time exceeded (RFC 792), quoting an
    /// IPv4 header with or without options.
    #[inline(always)]
    fn parse_error<P: Packet>(ctx: &P) -> Option<IcmpError<Self>> {
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
        // Each read in order of offset, so every bounds check is the
        // verifier's to see (the compiler drops the checks a later, larger
        // offset implies).
        let saddr = ctx.read(l3_off + IP_SRC_OFF)?;
        let daddr = ctx.read(l3_off + IP_DST_OFF)?;
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
        let inner_saddr = ctx.read(inner_l3_off + IP_SRC_OFF)?;
        let inner_daddr = ctx.read(inner_l3_off + IP_DST_OFF)?;
        let inner_l4_off = inner_l3_off + inner_ihl;
        let ports: [u16; 2] = ctx.read(inner_l4_off)?;
        Some(IcmpError {
            icmp_off,
            inner_l4_off,
            saddr,
            daddr,
            inner_saddr,
            inner_daddr,
            inner_sport: ports[0],
            inner_dport: ports[1],
            inner_proto,
        })
    }
}

impl IcmpFamily for MapAddr {
    /// ICMPv6 destination unreachable, packet too big or time exceeded
    /// (RFC 4443) right after the IPv6 header, quoting an IPv6 header whose
    /// next header is TCP or UDP. Errors behind extension headers, and
    /// quoted packets with extension headers, pass untouched.
    #[inline(always)]
    fn parse_error<P: Packet>(ctx: &P) -> Option<IcmpError<Self>> {
        let ether_type: u16 = ctx.read(ETH_TYPE_OFF)?;
        if u16::from_be(ether_type) != ETH_P_IPV6 {
            return None;
        }
        let l3_off = EthHdr::LEN;
        let first: u8 = ctx.read(l3_off)?;
        let next: u8 = ctx.read(l3_off + IPV6_NEXT_HDR_OFF)?;
        if first >> 4 != IP_VERSION_6 || next != PROTO_ICMPV6 {
            return None;
        }
        let icmp_off = l3_off + IPV6_HDR_LEN;
        let icmp_type: u8 = ctx.read(icmp_off)?;
        if icmp_type != ICMPV6_DEST_UNREACH
            && icmp_type != ICMPV6_PKT_TOOBIG
            && icmp_type != ICMPV6_TIME_EXCEED
        {
            return None;
        }
        let inner_l3_off = icmp_off + ICMP_HDR_LEN;
        let inner_first: u8 = ctx.read(inner_l3_off)?;
        let inner_proto: u8 = ctx.read(inner_l3_off + IPV6_NEXT_HDR_OFF)?;
        if inner_first >> 4 != IP_VERSION_6 {
            return None;
        }
        if inner_proto != PROTO_TCP && inner_proto != PROTO_UDP {
            return None;
        }
        let inner_l4_off = inner_l3_off + IPV6_HDR_LEN;
        let ports: [u16; 2] = ctx.read(inner_l4_off)?;
        Some(IcmpError {
            icmp_off,
            inner_l4_off,
            saddr: read_addr6(ctx, l3_off + IPV6_SRC_OFF)?,
            daddr: read_addr6(ctx, l3_off + IPV6_DST_OFF)?,
            inner_saddr: read_addr6(ctx, inner_l3_off + IPV6_SRC_OFF)?,
            inner_daddr: read_addr6(ctx, inner_l3_off + IPV6_DST_OFF)?,
            inner_sport: ports[0],
            inner_dport: ports[1],
            inner_proto,
        })
    }
}

/// Translates an ICMP error about a tracked flow back to its frontend;
/// `Untouched` when the packet is no such error.
#[inline(always)]
pub fn reverse_icmp_error<A: IcmpFamily, P: Packet>(ctx: &P) -> Outcome {
    let Some(error) = A::parse_error(ctx) else {
        return Outcome::Untouched;
    };
    // The quoted packet went client -> backend; its reply entry is the
    // other way round, and holds the frontend.
    let key = quoted_reply_key(&error, CT_DIR_REPLY);
    // SAFETY: read in place; the frontend is copied out at once.
    let Some((frontend, port)) =
        (unsafe { CONNTRACK.get(key) }).map(|ct| (A::from_map(&ct.nat_addr), ct.nat_port))
    else {
        return Outcome::Untouched;
    };
    // The error's own source too, when the backend itself reported it.
    let outer = error.saddr.same(&error.inner_daddr);
    finish(rewrite(
        ctx,
        &error,
        Side::Destination,
        &frontend,
        port,
        outer,
    ))
}

/// Sends an ICMP error about an SNATed flow on to its client (ingress from
/// the network): the error is addressed to this node's SNAT address and
/// quotes a packet from it; both become the client's address and port
/// again, from the flow's SNAT reply entry. `Untouched` when the packet is
/// no such error. Not inlined: the hooks from the network are at their
/// stack limit on their TCP and UDP path.
#[inline(never)]
pub fn reverse_snat_icmp_error<A: IcmpFamily, P: Packet>(ctx: &P) -> Outcome {
    let Some(error) = A::parse_error(ctx) else {
        return Outcome::Untouched;
    };
    let Some(config) = config() else {
        return Outcome::Untouched;
    };
    // Only an error for the SNAT address, about a packet from it and a
    // port of the SNAT range, can be one of ours.
    if !error.daddr.same(A::snat(config))
        || !error.inner_saddr.same(A::snat(config))
        || !config.snat_ports.contains(u16::from_be(error.inner_sport))
    {
        return Outcome::Untouched;
    }
    // The quoted packet went SNAT address -> backend; the flow's SNAT reply
    // entry is the other way round, and holds the client.
    let key = quoted_reply_key(&error, CT_DIR_SNAT_REPLY);
    // SAFETY: read in place; the client is copied out at once.
    let Some((client, port)) =
        (unsafe { CONNTRACK.get(key) }).map(|ct| (A::from_map(&ct.nat_addr), ct.nat_port))
    else {
        return Outcome::Untouched;
    };
    // The error is addressed to the SNAT address: always rewritten.
    finish(rewrite(ctx, &error, Side::Source, &client, port, true))
}

/// The conntrack key of a reply to the quoted packet, in `direction`.
#[inline(always)]
fn quoted_reply_key<A: IcmpFamily>(error: &IcmpError<A>, direction: u8) -> ConntrackKey {
    ConntrackKey::new(
        error.inner_daddr.to_map(),
        error.inner_dport,
        error.inner_saddr.to_map(),
        error.inner_sport,
        A::FAMILY,
        error.inner_proto,
        direction,
    )
}

/// The outcome of a rewrite, counted.
#[inline(always)]
fn finish(rewritten: Result<(), i64>) -> Outcome {
    match rewritten {
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

/// Rewrites the `quoted` side of the quoted packet to `addr:port` and,
/// when `outer`, the error's own address that equals it (its source for a
/// quoted destination, its destination for a quoted source), fixing every
/// checksum that covers them by RFC 1624 incremental updates: the quoted
/// IPv4 header's, the quoted L4 one (if it was quoted), the ICMP one (for
/// ICMPv6 its pseudo-header holds the outer addresses) and the outer IPv4
/// header's.
#[inline(always)]
fn rewrite<A: IcmpFamily, P: Packet>(
    ctx: &P,
    error: &IcmpError<A>,
    quoted: Side,
    addr: &A,
    port: u16,
    outer: bool,
) -> Result<(), i64> {
    let (old, old_port, addr_off, port_off, outer_off) = match quoted {
        Side::Destination => (
            &error.inner_daddr,
            error.inner_dport,
            A::DST_OFF,
            L4_DPORT_OFF,
            A::SRC_OFF,
        ),
        Side::Source => (
            &error.inner_saddr,
            error.inner_sport,
            A::SRC_OFF,
            L4_SPORT_OFF,
            A::DST_OFF,
        ),
    };
    let mut icmp_csum: u16 = ctx.read(error.icmp_off + ICMP_CSUM_OFF).ok_or(-1i64)?;

    // Quoted IP header: the address, and IPv4's header checksum.
    if A::HEADER_CHECKSUM {
        let inner_csum_off = error.icmp_off + ICMP_HDR_LEN + IP_CSUM_OFF;
        let old_inner_csum: u16 = ctx.read(inner_csum_off).ok_or(-1i64)?;
        let new_inner_csum = A::csum_replace_addr(old_inner_csum, old, addr);
        ctx.write(inner_csum_off, &new_inner_csum)?;
        icmp_csum = csum_replace(icmp_csum, old_inner_csum, new_inner_csum);
    }
    ctx.write(error.icmp_off + ICMP_HDR_LEN + addr_off, addr)?;
    icmp_csum = A::csum_replace_addr(icmp_csum, old, addr);

    // Quoted port, and the quoted L4 checksum when present.
    ctx.write(error.inner_l4_off + port_off, &port)?;
    icmp_csum = csum_replace(icmp_csum, old_port, port);
    let l4_csum_off = error.inner_l4_off + l4_csum_off(error.inner_proto);
    if let Some(old_l4) = ctx.read::<u16>(l4_csum_off)
        && !(error.inner_proto == PROTO_UDP && old_l4 == 0)
    {
        let new_l4 = csum_replace(A::csum_replace_addr(old_l4, old, addr), old_port, port);
        ctx.write(l4_csum_off, &new_l4)?;
        icmp_csum = csum_replace(icmp_csum, old_l4, new_l4);
    }

    // The error's own address: in the IPv4 header's checksum, or in
    // ICMPv6's pseudo-header.
    if outer {
        if A::HEADER_CHECKSUM {
            let outer_csum_off = EthHdr::LEN + IP_CSUM_OFF;
            let outer_csum: u16 = ctx.read(outer_csum_off).ok_or(-1i64)?;
            ctx.write(outer_csum_off, &A::csum_replace_addr(outer_csum, old, addr))?;
        } else {
            icmp_csum = A::csum_replace_addr(icmp_csum, old, addr);
        }
        ctx.write(EthHdr::LEN + outer_off, addr)?;
    }
    ctx.write(error.icmp_off + ICMP_CSUM_OFF, &icmp_csum)
}
