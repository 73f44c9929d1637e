//! Service translation: frontend lookup, backend choice, conntrack, and the
//! reverse translation of replies.

use aya_ebpf::{helpers::bpf_get_prandom_u32, programs::TcContext};
use service_common::{
    BACKEND_STATE_ACTIVE, BackendId, CT_DIR_FORWARD, CT_DIR_REPLY, ConntrackKey, ConntrackValue,
    DatapathCounter, FAMILY_IPV4, FrontendKey, FrontendValue, RevNatId, SCOPE_ALL, map_addr_v4,
    map_addr_v4_octets,
};

use crate::{
    VERDICT_CONTINUE, VERDICT_DROP,
    maps::{BACKENDS, CONNTRACK, FRONTENDS, REVNAT, account_frontend, count},
    nat::{Side, rewrite_v4},
    packet::{Ipv4Flow, parse_ipv4},
};

/// `BPF_ANY`: insert or replace.
const BPF_ANY: u64 = 0;

/// The backend a flow is (or will be) translated to.
struct Target {
    addr: [u8; 4],
    port: u16,
    backend_id: BackendId,
    rev_nat_id: RevNatId,
}

/// "From pod": DNAT of traffic to a frontend.
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> i32 {
    let Some(flow) = parse_ipv4(ctx) else {
        return VERDICT_CONTINUE;
    };
    let ct_key = conntrack_key(&flow, CT_DIR_FORWARD);
    let (target, new_flow) = match established_target(&flow, &ct_key) {
        Some(target) => (target, false),
        None => match new_flow_target(&flow) {
            Lookup::NotAFrontend => return VERDICT_CONTINUE,
            Lookup::Drop(reason) => {
                count(reason);
                return VERDICT_DROP;
            }
            Lookup::Backend(target) => {
                if track(&flow, &ct_key, &target).is_err() {
                    count(DatapathCounter::ConntrackInsertFailed);
                }
                (target, true)
            }
        },
    };
    if rewrite_v4(ctx, &flow, Side::Destination, target.addr, target.port).is_err() {
        count(DatapathCounter::DropRewrite);
        return VERDICT_DROP;
    }
    account_frontend(target.rev_nat_id, ctx.len(), new_flow);
    VERDICT_CONTINUE
}

/// "To pod": replies of translated flows get the frontend back as source.
#[inline(always)]
pub fn to_pod(ctx: &TcContext) -> i32 {
    let Some(flow) = parse_ipv4(ctx) else {
        return VERDICT_CONTINUE;
    };
    let ct_key = conntrack_key(&flow, CT_DIR_REPLY);
    // SAFETY: the value is copied out at once; a concurrent update at worst
    // yields the other, equally valid, rev-NAT id.
    let Some(rev_nat_id) = (unsafe { CONNTRACK.get(ct_key) }).map(|ct| ct.rev_nat_id) else {
        return VERDICT_CONTINUE;
    };
    // SAFETY: as above, copied out at once.
    let Some(frontend) = (unsafe { REVNAT.get(rev_nat_id) }).copied() else {
        return VERDICT_CONTINUE;
    };
    let addr = map_addr_v4_octets(&frontend.addr);
    if rewrite_v4(ctx, &flow, Side::Source, addr, frontend.port).is_err() {
        count(DatapathCounter::DropRewrite);
        return VERDICT_DROP;
    }
    count(DatapathCounter::ReplyTranslated);
    VERDICT_CONTINUE
}

/// The conntrack key of a packet as it stands, in the given direction.
#[inline(always)]
fn conntrack_key(flow: &Ipv4Flow, direction: u8) -> ConntrackKey {
    ConntrackKey {
        saddr: map_addr_v4(flow.saddr),
        daddr: map_addr_v4(flow.daddr),
        sport: flow.sport,
        dport: flow.dport,
        family: FAMILY_IPV4,
        proto: flow.proto,
        direction,
        _pad: 0,
    }
}

/// The backend of an already tracked flow. A TCP SYN whose tracked backend
/// is gone or no longer active (the 5-tuple was reused after the backend
/// left) starts afresh.
#[inline(always)]
fn established_target(flow: &Ipv4Flow, ct_key: &ConntrackKey) -> Option<Target> {
    // SAFETY: the value is copied out at once.
    let ct = unsafe { CONNTRACK.get(ct_key) }.copied()?;
    if flow.is_tcp_syn() {
        // SAFETY: only read, to test the backend's presence and state.
        let backend = unsafe { BACKENDS.get(ct.backend_id) }?;
        if backend.state != BACKEND_STATE_ACTIVE
            || backend.addr != ct.nat_addr
            || backend.port != ct.nat_port
        {
            return None;
        }
    }
    Some(Target {
        addr: map_addr_v4_octets(&ct.nat_addr),
        port: ct.nat_port,
        backend_id: ct.backend_id,
        rev_nat_id: ct.rev_nat_id,
    })
}

/// Outcome of a frontend lookup for a new flow.
enum Lookup {
    /// The destination is no frontend: leave the packet alone.
    NotAFrontend,
    /// A frontend that cannot serve the flow: drop, counting why.
    Drop(DatapathCounter),
    /// The backend chosen for the flow.
    Backend(Target),
}

/// Looks the destination up among the frontends and picks a random backend.
#[inline(always)]
fn new_flow_target(flow: &Ipv4Flow) -> Lookup {
    let mut key = FrontendKey {
        addr: map_addr_v4(flow.daddr),
        port: flow.dport,
        slot: 0,
        family: FAMILY_IPV4,
        proto: flow.proto,
        scope: SCOPE_ALL,
        _pad: 0,
    };
    // SAFETY: the header is copied out at once.
    let Some(header) = (unsafe { FRONTENDS.get(key) }).copied() else {
        return Lookup::NotAFrontend;
    };
    if header.count == 0 {
        return Lookup::Drop(DatapathCounter::DropNoBackend);
    }
    // SAFETY: the helper has no preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    key.slot = (random % u32::from(header.count)) as u16 + 1;
    // SAFETY: copied out at once.
    let Some(slot) = (unsafe { FRONTENDS.get(key) }).copied() else {
        return Lookup::Drop(DatapathCounter::DropBackendMissing);
    };
    backend_target(&header, &slot)
}

/// Resolves a backend slot to the address and port to DNAT to.
#[inline(always)]
fn backend_target(header: &FrontendValue, slot: &FrontendValue) -> Lookup {
    // SAFETY: copied out at once.
    let Some(backend) = (unsafe { BACKENDS.get(slot.backend_id) }).copied() else {
        return Lookup::Drop(DatapathCounter::DropBackendMissing);
    };
    Lookup::Backend(Target {
        addr: map_addr_v4_octets(&backend.addr),
        port: backend.port,
        backend_id: slot.backend_id,
        rev_nat_id: header.rev_nat_id,
    })
}

/// Records a new flow: the reply entry first, so a reply can never arrive
/// before the datapath knows how to translate it, then the forward entry.
#[inline(always)]
fn track(flow: &Ipv4Flow, forward_key: &ConntrackKey, target: &Target) -> Result<(), i32> {
    let reply_key = ConntrackKey {
        saddr: map_addr_v4(target.addr),
        daddr: forward_key.saddr,
        sport: target.port,
        dport: flow.sport,
        family: FAMILY_IPV4,
        proto: flow.proto,
        direction: CT_DIR_REPLY,
        _pad: 0,
    };
    let reply = ConntrackValue {
        backend_id: target.backend_id,
        rev_nat_id: target.rev_nat_id,
        ..ConntrackValue::default()
    };
    CONNTRACK.insert(reply_key, reply, BPF_ANY)?;
    let forward = ConntrackValue {
        nat_addr: map_addr_v4(target.addr),
        nat_port: target.port,
        backend_id: target.backend_id,
        rev_nat_id: target.rev_nat_id,
        ..ConntrackValue::default()
    };
    CONNTRACK.insert(forward_key, forward, BPF_ANY)
}
