//! Address and port rewrites with checksums kept correct by the kernel's
//! incremental checksum helpers (`bpf_l3_csum_replace`/`bpf_l4_csum_replace`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use service_common::PROTO_UDP;

use crate::packet::Ipv4Flow;

/// Offset of the source address inside the IPv4 header.
const IP_SRC_OFF: usize = 12;
/// Offset of the destination address inside the IPv4 header.
const IP_DST_OFF: usize = 16;
/// Offset of the header checksum inside the IPv4 header.
const IP_CSUM_OFF: usize = 10;

/// Which end of the flow a rewrite changes.
#[derive(Clone, Copy)]
pub enum Side {
    /// Source address and port (reverse NAT of replies, SNAT).
    Source,
    /// Destination address and port (DNAT to a backend).
    Destination,
}

/// Rewrites one side of an IPv4 flow to `addr:port` (both network byte
/// order) and fixes the IP and L4 checksums. A UDP checksum of zero (none)
/// stays zero.
#[inline(always)]
pub fn rewrite_v4(
    ctx: &TcContext,
    flow: &Ipv4Flow,
    side: Side,
    addr: [u8; 4],
    port: u16,
) -> Result<(), i64> {
    let (old_addr, old_port, addr_off, port_off) = match side {
        Side::Source => (flow.saddr, flow.sport, IP_SRC_OFF, 0),
        Side::Destination => (flow.daddr, flow.dport, IP_DST_OFF, 2),
    };
    let mangled_0 = if flow.proto == PROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let csum_off = flow.l4_csum_off();
    let old_ip = u64::from(u32::from_ne_bytes(old_addr));
    let new_ip = u64::from(u32::from_ne_bytes(addr));
    if old_ip != new_ip {
        ctx.l4_csum_replace(
            csum_off,
            old_ip,
            new_ip,
            u64::from(BPF_F_PSEUDO_HDR) | mangled_0 | 4,
        )?;
        ctx.l3_csum_replace(flow.l3_off + IP_CSUM_OFF, old_ip, new_ip, 4)?;
        ctx.store(flow.l3_off + addr_off, &addr, 0)?;
    }
    if old_port != port {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_port),
            u64::from(port),
            mangled_0 | 2,
        )?;
        ctx.store(flow.l4_off + port_off, &port, 0)?;
    }
    Ok(())
}
