//! What the hooks return: the outcome of the translation, the TC verdicts,
//! and the redirects that send a packet straight back out the device it
//! came in on (a refusal from `reject`, a hairpin packet).
//!
//! Hairpin delivery: a pod that reached itself through a frontend is both
//! ends of the flow, so once `lb` has translated a packet of such a flow
//! (DNAT and SNAT to `HAIRPIN_IPV4`, or the reverse of both), its next stop
//! is the pod it came from. It goes straight back out the device it came in
//! on (the host side of that pod's veth), with its Ethernet addresses
//! swapped, as Cilium's `redirect_self` does. That skips the node's routing
//! on purpose: it would only send the packet back out the same device, and
//! on the way the node's reverse-path filter could drop it, since neither
//! source (the hairpin address, a ClusterIP) is routed through that device:
//! strict `rp_filter` always drops it, loose `rp_filter` when the node has
//! no route to the source at all. The TTL is left as it is, as for a packet
//! that never left the pod's link. Should the redirect be refused, the
//! packet continues into the stack, which routes it the same way (where
//! `rp_filter` lets it).

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_redirect,
    programs::TcContext,
};
use network_types::eth::EthHdr;
use service_common::DatapathCounter;

use crate::maps::count;

/// Verdict for packets that continue through the stack (translated or not):
/// `TC_ACT_UNSPEC`, which lets any later tc program run as well.
pub const VERDICT_CONTINUE: i32 = TC_ACT_UNSPEC;
/// Verdict for packets the datapath drops.
pub const VERDICT_DROP: i32 = TC_ACT_SHOT;
/// Verdict for a packet sent back out (after `bpf_redirect`).
pub const VERDICT_REDIRECT: i32 = TC_ACT_REDIRECT;

/// What the datapath did with a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not for a frontend: untouched.
    Untouched,
    /// Translated (DNAT, SNAT or reverse NAT).
    Translated,
    /// Translated as a hairpin flow (only from pods): the packet's next
    /// stop is the pod it came from, both ends of the flow being that pod.
    Hairpin,
    /// A new flow to a frontend without usable backend.
    NoBackend,
    /// Dropped (already counted).
    Dropped,
}

/// The TC verdict for an outcome (a new flow without backend is dropped
/// here; hooks that refuse such flows handle that outcome first).
#[inline(always)]
pub fn tc_verdict(outcome: Outcome) -> i32 {
    match outcome {
        Outcome::Untouched | Outcome::Translated | Outcome::Hairpin => VERDICT_CONTINUE,
        Outcome::NoBackend => {
            count(DatapathCounter::DropNoBackend);
            VERDICT_DROP
        }
        Outcome::Dropped => VERDICT_DROP,
    }
}

/// Asks for the packet to leave through the device it came in on; whether
/// the kernel accepted.
#[inline(always)]
pub fn redirect_back(ctx: &TcContext) -> bool {
    // SAFETY: reads a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the helper only records the target device.
    let verdict = unsafe { bpf_redirect(ifindex, 0) };
    verdict == i64::from(VERDICT_REDIRECT)
}

/// `eth` with its source and destination addresses swapped: the header of
/// a packet sent back where it came from.
#[inline(always)]
pub fn swapped_macs(eth: &EthHdr) -> EthHdr {
    EthHdr {
        dst_addr: eth.src_addr,
        src_addr: eth.dst_addr,
        ether_type: eth.ether_type,
    }
}

/// Sends a translated hairpin packet back to the pod it came from: its
/// MAC addresses swapped, redirected to the egress of the device it
/// arrived on. [`VERDICT_REDIRECT`], or the continue verdict when the
/// Ethernet header cannot be rewritten or the redirect is refused.
#[inline(always)]
pub fn send_back(ctx: &TcContext) -> i32 {
    let Ok(eth) = ctx.load::<EthHdr>(0) else {
        return VERDICT_CONTINUE;
    };
    if ctx.store(0, &swapped_macs(&eth), 0).is_err() {
        return VERDICT_CONTINUE;
    }
    if redirect_back(ctx) {
        VERDICT_REDIRECT
    } else {
        // The stack routes it then: it must still be addressed to the node.
        let _ = ctx.store(0, &eth, 0);
        VERDICT_CONTINUE
    }
}
