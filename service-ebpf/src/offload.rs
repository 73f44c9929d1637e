//! Checksum offload on XDP. A veth whose peer transmits with checksum
//! offload on (every container and kind node does) hands XDP packets whose
//! L4 checksum is left to offload (`CHECKSUM_PARTIAL`): the field holds
//! only the folded pseudo-header sum. XDP cannot see that state, and
//! updating such a field as a full checksum breaks the packet. So XDP
//! defers every packet whose field equals its pseudo-header sum to the TC
//! ingress program attached beside it (`from_network_deferred`), which has
//! the skb and translates it with the kernel's checksum helpers, exact for
//! partial and full checksums alike. The mark travels in the XDP metadata
//! in front of the packet (`bpf_xdp_adjust_meta`), which the kernel hands
//! on to the skb; the TC program does nothing for unmarked packets, so the
//! two never translate the same packet twice.
//!
//! A full checksum that happens to equal the pseudo-header sum (one packet
//! in 65536) is deferred too, and translated exactly by TC. Where the
//! driver keeps no metadata (`bpf_xdp_adjust_meta` fails), XDP translates
//! the packet itself, as before.
//!
//! The same mark hands TC the new flows XDP cannot refuse itself: a packet
//! to a frontend without backends, which TC turns into a TCP RST or an
//! ICMP port unreachable (`reject`) with the skb's helpers.

use aya_ebpf::{
    helpers::bpf_xdp_adjust_meta,
    programs::{TcContext, XdpContext},
};

use crate::{
    packet::{Flow, Fragment, IpFamily, Packet},
    wire::{IP_TOT_LEN_OFF, IPV6_HDR_LEN, IPV6_PAYLOAD_LEN_OFF},
};

/// The metadata word XDP leaves in front of a packet it defers ("SLBD").
const DEFERRED_MARK: u32 = u32::from_ne_bytes(*b"SLBD");
/// Length of the mark.
const MARK_LEN: usize = core::mem::size_of::<u32>();

/// Whether `flow`'s L4 checksum looks left to offload: the field holds the
/// folded pseudo-header sum. Later fragments have no L4 header (and a
/// fragmented datagram never has a partial checksum).
#[inline(always)]
pub fn checksum_is_partial<A: IpFamily>(ctx: &XdpContext, flow: &Flow<A>) -> bool {
    if flow.fragment == Fragment::Later {
        return false;
    }
    // The IP datagram's length: IPv4's total length, or IPv6's payload
    // length and its fixed header.
    let (len_off, fixed) = if A::HEADER_CHECKSUM {
        (IP_TOT_LEN_OFF, 0)
    } else {
        (IPV6_PAYLOAD_LEN_OFF, IPV6_HDR_LEN as u16)
    };
    let (Some(field), Some(len)) = (
        ctx.read::<u16>(flow.l4_csum_off()),
        ctx.read::<[u8; 2]>(flow.l3_off + len_off),
    ) else {
        return false;
    };
    let l4_len = u16::from_be_bytes(len)
        .wrapping_add(fixed)
        .wrapping_sub((flow.l4_off - flow.l3_off) as u16);
    field == A::pseudo_header_sum(&flow.saddr, &flow.daddr, flow.proto, l4_len)
}

/// Marks the packet for the TC ingress program beside XDP; whether the
/// mark was written (the driver keeps XDP metadata).
#[inline(always)]
pub fn defer_to_tc(ctx: &XdpContext) -> bool {
    // SAFETY: the helper checks the room in front of the packet itself.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(MARK_LEN as i32)) } != 0 {
        return false;
    }
    let meta = ctx.metadata();
    if meta + MARK_LEN > ctx.metadata_end() {
        return false;
    }
    // SAFETY: the metadata area holds `MARK_LEN` bytes, checked just above.
    unsafe { (meta as *mut u32).write_unaligned(DEFERRED_MARK) };
    true
}

/// Whether XDP deferred this packet to TC; the mark is cleared, so the
/// packet is translated once even if it meets this program again.
#[inline(always)]
pub fn take_deferred(ctx: &TcContext) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: reads fields of the program's own context.
    let (meta, data) = unsafe { ((*skb).data_meta as usize, (*skb).data as usize) };
    if meta + MARK_LEN > data {
        return false;
    }
    // SAFETY: the metadata holds `MARK_LEN` bytes, checked just above.
    unsafe {
        let mark = meta as *mut u32;
        if mark.read_unaligned() != DEFERRED_MARK {
            return false;
        }
        mark.write_unaligned(0);
    }
    true
}
