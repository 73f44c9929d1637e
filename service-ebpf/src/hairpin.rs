//! Delivery of hairpin packets: a pod that reached itself through a
//! frontend is both ends of the flow, so once `lb` has translated a packet
//! of such a flow (DNAT and SNAT to `HAIRPIN_IPV4`, or the reverse of
//! both), its next stop is the pod it came from. It goes straight back out
//! the device it came in on (the host side of that pod's veth), with its
//! Ethernet addresses swapped, as Cilium's `redirect_self` does.
//!
//! That skips the node's routing on purpose: it would only send the packet
//! back out the same device, and on the way the node's reverse-path filter
//! could drop it, since neither source (the hairpin address, a ClusterIP)
//! is routed through that device: strict `rp_filter` always drops it, loose
//! `rp_filter` when the node has no route to the source at all. The TTL is
//! left as it is, as for a packet that never left the pod's link. Should
//! the redirect be refused, the packet continues into the stack, which
//! routes it the same way (where `rp_filter` lets it).

use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::bpf_redirect, programs::TcContext};
use network_types::eth::EthHdr;

use crate::VERDICT_CONTINUE;

/// Sends a translated hairpin packet back to the pod it came from: its
/// MAC addresses swapped, redirected to the egress of the device it
/// arrived on. `TC_ACT_REDIRECT`, or the continue verdict when the
/// Ethernet header cannot be rewritten or the redirect is refused.
#[inline(always)]
pub fn send_back(ctx: &TcContext) -> i32 {
    let Ok(eth) = ctx.load::<EthHdr>(0) else {
        return VERDICT_CONTINUE;
    };
    let back = EthHdr {
        dst_addr: eth.src_addr,
        src_addr: eth.dst_addr,
        ether_type: eth.ether_type,
    };
    if ctx.store(0, &back, 0).is_err() {
        return VERDICT_CONTINUE;
    }
    // SAFETY: reads a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the helper only records the target device.
    let verdict = unsafe { bpf_redirect(ifindex, 0) };
    if verdict == i64::from(TC_ACT_REDIRECT) {
        TC_ACT_REDIRECT
    } else {
        // The stack routes it then: it must still be addressed to the node.
        let _ = ctx.store(0, &eth, 0);
        VERDICT_CONTINUE
    }
}
