//! The eBPF datapath of the Service load balancer.
//!
//! Hooks (as in Cilium), each a thin entry point over plain fallible Rust:
//! - `from_pod`: TC ingress on the host side of a pod's veth. Looks the
//!   destination up among the frontends, picks a backend, records the flow in
//!   conntrack and DNATs the packet. A new flow to a frontend without
//!   backends is refused at once (TCP RST, ICMP port unreachable; `reject`).
//!   A pod whose flow gets itself as backend (hairpin) also has the flow
//!   SNATed to `HAIRPIN_IPV4`, and its replies to that address translated
//!   back; both directions go straight back to the pod (`verdict`).
//! - `to_pod`: TC egress on the same device. Rewrites replies of translated
//!   flows back to the frontend address and port.
//! - `from_network`: XDP on the node's external devices (and
//!   `from_network_tc`, the same on TC ingress, where XDP cannot be used).
//!   DNATs traffic to NodePort, LoadBalancer and externalIP frontends, and
//!   gives replies of SNATed flows their client back as destination.
//!   Packets whose checksum is left to offload are deferred from XDP to
//!   `from_network_deferred`, TC ingress beside it (`offload`).
//! - `to_network`: TC egress on the external devices. SNATs flows to
//!   backends on other nodes and restores the frontend as the source of
//!   replies to external clients.
//! - `sock_connect4`, `sock_sendmsg4`, `sock_recvmsg4`, `sock_getpeer4`
//!   and their IPv6 twins (`sock_connect6`, ...): cgroup socket hooks
//!   (socket-LB, `sock`) for processes on the node itself: a socket
//!   connecting or sending to a frontend goes straight to a backend, and
//!   sees the frontend as its peer.
//!
//! Rewrites that change a source run on egress only: on ingress, a source
//! that is one of the node's own addresses would be dropped as a martian.
//! The exception is hairpin, whose packets never reach the node's routing
//! (and whose addresses are no node's).
//!
//! ICMP and ICMPv6 errors about a translated flow are translated on the
//! egress hooks too (`icmp`), and errors about an SNATed flow on their way
//! in from the network, so path MTU discovery (IPv6's "packet too big"
//! included) works through a Service. Fragments of a translated datagram
//! (IPv4, and IPv6 with a fragment header) are translated on every hook,
//! the later ones by the ports their first fragment recorded
//! (`fragments`).
//!
//! IPv6 gets the same translation, by the same code monomorphised for its
//! addresses (`packet::IpFamily`), each family in a function of its own
//! per hook; on XDP every IPv6 frame is left to the TC program beside it.
//!
//! Anything that is not a translated TCP/UDP flow passes untouched.
#![no_std]
#![no_main]

mod clock;
mod conntrack;
mod fragments;
mod icmp;
mod lb;
mod maps;
mod nat;
mod offload;
mod packet;
mod reject;
mod sock;
mod verdict;
mod wire;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use icmp::IcmpFamily;
use lb::{FlowAddr, Origin};
use nat::Rewriter;
use packet::{Flow, Fragment, IpFamily, Network, Packet, network};
use reject::Refusal;
use service_common::{DatapathCounter, MapAddr};
use verdict::{Outcome, VERDICT_CONTINUE, tc_verdict};

/// The family of the packet hooks: what the translation ([`FlowAddr`]) and
/// the refusal ([`Refusal`]) need, implemented for `[u8; 4]` (IPv4) and
/// `MapAddr` (IPv6). Every hook dispatches on the EtherType to its body,
/// one function (`#[inline(never)]`) per family monomorphised from one
/// generic body: each has its own stack frame, so the IPv6 path's 16-byte
/// addresses never add to the IPv4 path's frame (the verifier of kernel
/// 6.1 allows 512 bytes for a hook and its calls together).
trait HookFamily: FlowAddr + Refusal + IcmpFamily {}
impl<A: FlowAddr + Refusal + IcmpFamily> HookFamily for A {}

/// "From pod": service translation for traffic a pod sends, and reverse
/// translation of the replies a pod sends to the hairpin address.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    match network(&ctx) {
        Network::V4 => from_pod_in::<[u8; 4]>(&ctx),
        Network::V6 => match from_pod_in::<MapAddr>(&ctx) {
            VERDICT_REFUSE => refuse_in::<MapAddr>(&ctx),
            verdict => verdict,
        },
        Network::Other => VERDICT_CONTINUE,
    }
}

/// What [`from_pod_in`] returns for a new flow to a frontend without
/// backends of a [`IpFamily::WIDE`] family: the hook refuses it with
/// [`refuse_in`], whose frame is then apart from the translation's (IPv4
/// refuses in place, as it always did). Never a TC verdict.
const VERDICT_REFUSE: i32 = i32::MIN;

/// Refuses the new flow of the packet (parsed again) like a closed port
/// (`reject`).
#[inline(never)]
fn refuse_in<A: HookFamily>(ctx: &TcContext) -> i32 {
    match A::parse(ctx) {
        Some(flow) => reject::reject(ctx, &flow),
        None => VERDICT_CONTINUE,
    }
}

/// [`from_pod`] for a packet of family `A`.
#[inline(never)]
fn from_pod_in<A: HookFamily>(ctx: &TcContext) -> i32 {
    let Some(mut flow) = A::parse(ctx) else {
        return VERDICT_CONTINUE;
    };
    if !fragment_ports(&mut flow) {
        return VERDICT_CONTINUE;
    }
    // Only replies of hairpin flows go to the hairpin address: one
    // comparison keeps every other packet off that lookup.
    let outcome = if flow.daddr.same(&A::HAIRPIN) {
        lb::reverse_hairpin(ctx, &flow)
    } else {
        lb::forward(ctx, &flow, Origin::Pod)
    };
    match fragment_done(&flow, outcome) {
        // Refused like a closed port: TCP RST or ICMP port unreachable.
        Outcome::NoBackend if A::WIDE => VERDICT_REFUSE,
        Outcome::NoBackend => reject::reject(ctx, &flow),
        // Back to the pod it came from, which is both ends of the flow.
        Outcome::Hairpin => verdict::send_back(ctx),
        outcome => tc_verdict(outcome),
    }
}

/// "To pod": reverse translation of replies travelling to a pod.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    match network(&ctx) {
        Network::V4 => to_pod_in::<[u8; 4]>(&ctx),
        Network::V6 => to_pod_in::<MapAddr>(&ctx),
        Network::Other => VERDICT_CONTINUE,
    }
}

/// [`to_pod`] for a packet of family `A` (a packet that is no TCP or UDP
/// may be an ICMP error about a translated flow, translated too).
#[inline(never)]
fn to_pod_in<A: HookFamily>(ctx: &TcContext) -> i32 {
    let Some(mut flow) = A::parse(ctx) else {
        return reverse_icmp_error::<A>(ctx);
    };
    if !fragment_ports(&mut flow) {
        return VERDICT_CONTINUE;
    }
    tc_verdict(fragment_done(&flow, lb::reverse_dnat(ctx, &flow)))
}

/// "From network" on XDP: external frontends (DNAT) and replies of SNATed
/// flows (reverse SNAT), before the kernel allocates an skb.
#[xdp]
pub fn from_network(ctx: XdpContext) -> u32 {
    match network(&ctx) {
        Network::V4 => from_network_in::<[u8; 4]>(&ctx),
        // IPv6 is translated by the TC program beside XDP
        // (`from_network_deferred`), as offloaded checksums are: XDP's
        // by-hand rewrite of 16-byte addresses does not fit the verifier's
        // stack limit next to the backend choice. Where the driver keeps
        // no XDP metadata, it passes untranslated.
        Network::V6 => {
            let _ = offload::defer_to_tc(&ctx);
            xdp_action::XDP_PASS
        }
        Network::Other => xdp_action::XDP_PASS,
    }
}

/// [`from_network`] for a packet of family `A`.
#[inline(never)]
fn from_network_in<A: HookFamily>(ctx: &XdpContext) -> u32 {
    let Some(mut flow) = A::parse(ctx) else {
        // An ICMP error about an SNATed flow goes on to its client.
        return match icmp::reverse_snat_icmp_error::<A, _>(ctx) {
            Outcome::Dropped => xdp_action::XDP_DROP,
            _ => xdp_action::XDP_PASS,
        };
    };
    // A checksum left to offload is TC's to update (`offload`).
    if offload::checksum_is_partial(ctx, &flow) && offload::defer_to_tc(ctx) {
        maps::count(DatapathCounter::ChecksumDeferred);
        return xdp_action::XDP_PASS;
    }
    if !fragment_ports(&mut flow) {
        return xdp_action::XDP_PASS;
    }
    match fragment_done(&flow, from_the_network(ctx, &flow)) {
        // (Hairpin only comes from pods, never from the network.)
        Outcome::Untouched | Outcome::Translated | Outcome::Hairpin => xdp_action::XDP_PASS,
        // A new flow to a frontend without backend is refused as on TC
        // (TCP RST, ICMP port unreachable, `reject`): XDP leaves it,
        // untouched and marked, to the TC program beside it, which has the
        // skb and builds the reply. Passed on unmarked, a LoadBalancer or
        // externalIP packet would be routed by the kernel (back out,
        // possibly). Where the driver keeps no XDP metadata it is dropped.
        Outcome::NoBackend if offload::defer_to_tc(ctx) => {
            maps::count(DatapathCounter::RejectDeferred);
            xdp_action::XDP_PASS
        }
        Outcome::NoBackend => {
            maps::count(DatapathCounter::DropNoBackend);
            xdp_action::XDP_DROP
        }
        Outcome::Dropped => xdp_action::XDP_DROP,
    }
}

/// "From network" on TC ingress: the same as [`from_network`], for devices
/// or setups where XDP cannot be used (`--nodeport-mode tc`).
#[classifier]
pub fn from_network_tc(ctx: TcContext) -> i32 {
    from_network_on_tc(&ctx)
}

/// TC ingress beside [`from_network`] on XDP: translates the packets XDP
/// deferred because their checksum is left to offload (`offload`) and
/// every IPv6 packet, refuses the new flows XDP deferred because their
/// frontend has no backend, and leaves every other packet alone.
#[classifier]
pub fn from_network_deferred(ctx: TcContext) -> i32 {
    if !offload::take_deferred(&ctx) {
        return VERDICT_CONTINUE;
    }
    from_network_on_tc(&ctx)
}

/// The "from network" translation on TC ingress; a new flow to a frontend
/// without backend is refused like a closed port, back out the device it
/// came in on.
#[inline(always)]
fn from_network_on_tc(ctx: &TcContext) -> i32 {
    match network(ctx) {
        Network::V4 => match from_network_tc_in::<[u8; 4]>(ctx) {
            VERDICT_UNPARSED => reverse_snat_icmp_error::<[u8; 4]>(ctx),
            verdict => verdict,
        },
        Network::V6 => match from_network_tc_in::<MapAddr>(ctx) {
            VERDICT_REFUSE => refuse_in::<MapAddr>(ctx),
            VERDICT_UNPARSED => reverse_snat_icmp_error::<MapAddr>(ctx),
            verdict => verdict,
        },
        Network::Other => VERDICT_CONTINUE,
    }
}

/// What [`from_network_tc_in`] returns for a packet that is no TCP or UDP
/// of its family: the hook then tries [`reverse_snat_icmp_error`], whose
/// frame is apart from the translation's. Never a TC verdict.
const VERDICT_UNPARSED: i32 = i32::MIN + 1;

/// A packet from the network that is no TCP or UDP: an ICMP error about an
/// SNATed flow goes on to its client (`icmp`).
#[inline(always)]
fn reverse_snat_icmp_error<A: HookFamily>(ctx: &TcContext) -> i32 {
    tc_verdict(icmp::reverse_snat_icmp_error::<A, _>(ctx))
}

/// [`from_network_on_tc`] for a packet of family `A`.
#[inline(never)]
fn from_network_tc_in<A: HookFamily>(ctx: &TcContext) -> i32 {
    let Some(mut flow) = A::parse(ctx) else {
        return VERDICT_UNPARSED;
    };
    if !fragment_ports(&mut flow) {
        return VERDICT_CONTINUE;
    }
    match fragment_done(&flow, from_the_network(ctx, &flow)) {
        Outcome::NoBackend if A::WIDE => VERDICT_REFUSE,
        Outcome::NoBackend => reject::reject(ctx, &flow),
        outcome => tc_verdict(outcome),
    }
}

/// "To network": TC egress on the external devices. Flows to backends on
/// other nodes get their SNAT source; replies to external clients get their
/// frontend back as source.
#[classifier]
pub fn to_network(ctx: TcContext) -> i32 {
    match network(&ctx) {
        Network::V4 => to_network_in::<[u8; 4]>(&ctx),
        Network::V6 => to_network_in::<MapAddr>(&ctx),
        Network::Other => VERDICT_CONTINUE,
    }
}

/// [`to_network`] for a packet of family `A` (a packet that is no TCP or
/// UDP may be an ICMP error about a translated flow, translated too).
#[inline(never)]
fn to_network_in<A: HookFamily>(ctx: &TcContext) -> i32 {
    let Some(mut flow) = A::parse(ctx) else {
        return reverse_icmp_error::<A>(ctx);
    };
    if !fragment_ports(&mut flow) {
        return VERDICT_CONTINUE;
    }
    let outcome = match lb::snat_out(ctx, &flow) {
        Outcome::Untouched => lb::reverse_dnat(ctx, &flow),
        done => done,
    };
    tc_verdict(fragment_done(&flow, outcome))
}

/// A packet the egress hooks did not parse: an ICMP or ICMPv6 error about
/// a translated flow gets the flow's translation (`icmp`).
#[inline(always)]
fn reverse_icmp_error<A: HookFamily>(ctx: &TcContext) -> i32 {
    tc_verdict(icmp::reverse_icmp_error::<A, _>(ctx))
}

/// The translation of traffic from the network, on either hook: replies
/// of SNATed flows first (reverse SNAT), then frontends (DNAT).
#[inline(always)]
fn from_the_network<A: FlowAddr, C: Rewriter + Packet>(ctx: &C, flow: &Flow<A>) -> Outcome {
    // IPv6's reverse SNAT has a frame of its own (it calls nothing), so
    // the forward path's stays within the verifier's limit.
    let reversed = if A::WIDE {
        reverse_snat_apart(ctx, flow)
    } else {
        lb::reverse_snat(ctx, flow)
    };
    match reversed {
        Outcome::Untouched => lb::forward(ctx, flow, Origin::Network),
        done => done,
    }
}

/// [`lb::reverse_snat`] in a stack frame of its own.
#[inline(never)]
fn reverse_snat_apart<A: FlowAddr, C: Rewriter + Packet>(ctx: &C, flow: &Flow<A>) -> Outcome {
    lb::reverse_snat(ctx, flow)
}

/// Before a hook translates `flow`: a later fragment gets the ports its
/// first fragment recorded at this hook (`fragments`). Whether the packet
/// can be translated (a later fragment without a record passes untouched).
#[inline(always)]
fn fragment_ports<A: IpFamily>(flow: &mut Flow<A>) -> bool {
    flow.fragment != Fragment::Later || fragments::resolve_ports(flow)
}

/// After a hook translated `flow` with `outcome`: a translated first
/// fragment records its ports for the later ones; a translated later one
/// is counted.
#[inline(always)]
fn fragment_done<A: IpFamily>(flow: &Flow<A>, outcome: Outcome) -> Outcome {
    if matches!(outcome, Outcome::Translated | Outcome::Hairpin) {
        match flow.fragment {
            Fragment::Whole => {}
            Fragment::First => fragments::record_ports(flow),
            Fragment::Later => maps::count(DatapathCounter::FragmentTranslated),
        }
    }
    outcome
}

/// Benchmark floor: a classifier that only returns its pass verdict, so
/// `cargo xtask bench` can report the datapath's cost next to the fixed
/// cost of running any program. Never attached by the agent.
#[classifier]
pub fn bench_floor_tc(_ctx: TcContext) -> i32 {
    VERDICT_CONTINUE
}

/// Benchmark bound: the conntrack work no tracked flow can skip, alone,
/// for the bench to report next to the datapath's cost. It parses an IPv4
/// TCP or UDP packet and looks up its flow's forward entry; a TCP SYN
/// whose flow has none also gets the two entries every flow needs (forward
/// and reply, as `conntrack::track` writes them, pointing back at the
/// packet's own addresses). No translation, no backend choice, no clock, no
/// counters: an established flow cannot cost less than the first part, a
/// new one less than both. Never attached by the agent.
#[classifier]
pub fn bench_conntrack_tc(ctx: TcContext) -> i32 {
    conntrack_bound(&ctx, false);
    VERDICT_CONTINUE
}

/// [`bench_conntrack_tc`] for the XDP path from the network, whose new
/// flows to a backend on another node also get the two SNAT entries (SNAT
/// and SNAT reply): four inserts. Never attached by the agent.
#[xdp]
pub fn bench_conntrack_xdp(ctx: XdpContext) -> u32 {
    conntrack_bound(&ctx, true);
    xdp_action::XDP_PASS
}

/// The bound's work (see [`bench_conntrack_tc`]); `snat`: a new flow gets
/// the SNAT entries too.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map calls take keys and values by reference, as in `conntrack`"
)]
fn conntrack_bound<C: Packet>(ctx: &C, snat: bool) {
    let Some(flow) = packet::parse_ipv4(ctx) else {
        return;
    };
    let key = conntrack::conntrack_key(&flow, service_common::CT_DIR_FORWARD);
    if maps::CONNTRACK.get_ptr(&key).is_some() || !flow.is_tcp_syn() {
        return;
    }
    let value = service_common::ConntrackValue::new(key.daddr, flow.dport, 0, 0, 0);
    let reply_key = service_common::reply_key(&key, &value);
    let _ = maps::CONNTRACK.insert(&reply_key, &value, maps::BPF_ANY);
    let _ = maps::CONNTRACK.insert(&key, &value, maps::BPF_ANY);
    if snat {
        let snat_key = service_common::ConntrackKey {
            direction: service_common::CT_DIR_SNAT,
            ..key
        };
        let snat_reply_key = service_common::ConntrackKey {
            direction: service_common::CT_DIR_SNAT_REPLY,
            ..reply_key
        };
        let _ = maps::CONNTRACK.insert(&snat_key, &value, maps::BPF_ANY);
        let _ = maps::CONNTRACK.insert(&snat_reply_key, &value, maps::BPF_ANY);
    }
}

/// Benchmark floor for the XDP path: an XDP program that only passes.
/// Never attached by the agent.
#[xdp]
pub fn bench_floor_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this is never reached.
    loop {}
}

/// License of the programs: GPL-compatible, as several helpers require;
/// the kernel's name for the workspace's `MIT OR GPL-2.0-only`
/// (service-agent/tests/license.rs checks that they agree).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
