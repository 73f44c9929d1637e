//! The eBPF datapath of the Service load balancer.
//!
//! Hooks (as in Cilium), each a thin entry point over plain fallible Rust:
//! - `from_pod`: TC ingress on the host side of a pod's veth. Looks the
//!   destination up among the frontends, picks a backend, records the flow in
//!   conntrack and DNATs the packet.
//! - `to_pod`: TC egress on the same device. Rewrites replies of translated
//!   flows back to the frontend address and port.
//!
//! Anything that is not a translated IPv4 TCP/UDP flow passes untouched.
#![no_std]
#![no_main]

mod lb;
mod maps;
mod nat;
mod packet;

use aya_ebpf::{bindings::TC_ACT_SHOT, macros::classifier, programs::TcContext};

/// Verdict for packets that continue through the stack (translated or not):
/// `TC_ACT_UNSPEC`, which lets any later tc program run as well.
pub const VERDICT_CONTINUE: i32 = aya_ebpf::bindings::TC_ACT_UNSPEC;
/// Verdict for packets the datapath drops.
pub const VERDICT_DROP: i32 = TC_ACT_SHOT;

/// "From pod": service translation for traffic a pod sends.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    lb::from_pod(&ctx)
}

/// "To pod": reverse translation of replies travelling to a pod.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    lb::to_pod(&ctx)
}

/// Benchmark floor: a classifier that only returns its pass verdict, so
/// `cargo xtask bench` can report the datapath's cost next to the fixed
/// cost of running any program. Never attached by the agent.
#[classifier]
pub fn bench_floor_tc(_ctx: TcContext) -> i32 {
    VERDICT_CONTINUE
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this is never reached.
    loop {}
}

/// License of the programs: GPL-compatible, as several helpers require.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
