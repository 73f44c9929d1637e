//! Conntrack entries as the datapath writes them: the key of a packet in
//! a direction, the entries a new flow gets, and the SNAT port a flow to a
//! remote backend is given. What the entries mean is the shared contract
//! (`service_common::conntrack`, `docs/design/flow-lifecycle.md`).

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use service_common::{
    CT_DIR_SNAT, CT_DIR_SNAT_REPLY, CT_FLAG_HAIRPIN, CT_FLAG_SNAT, ConntrackKey, ConntrackValue,
    map_addr_v4, mono_seconds, reply_key,
};

use crate::{
    lb::Target,
    maps::{BPF_ANY, BPF_NOEXIST, CONNTRACK, config},
    packet::Ipv4Flow,
};

/// How many SNAT ports are tried for a new flow before giving up.
const SNAT_PORT_TRIES: u32 = 16;

/// The conntrack key of a packet as it stands, in the given direction.
#[inline(always)]
pub fn conntrack_key(flow: &Ipv4Flow, direction: u8) -> ConntrackKey {
    ConntrackKey::v4(
        flow.saddr, flow.sport, flow.daddr, flow.dport, flow.proto, direction,
    )
}

/// Monotonic seconds, as conntrack entries store them.
#[inline(always)]
pub fn now_seconds() -> u32 {
    // SAFETY: the helper has no preconditions.
    mono_seconds(unsafe { bpf_ktime_get_ns() })
}

/// Gives a new flow to a remote backend a source port on this node's SNAT
/// address: a random start in the SNAT range, then the next ports; a port
/// is taken only if no other flow to the same backend holds it (the SNAT
/// reply entry is inserted only if absent). Then records the SNAT entry
/// `lb::snat_out` uses. `None` without an SNAT address or when every try
/// collides. Not inlined (its own stack frame).
#[inline(never)]
pub fn snat(flow: &Ipv4Flow, target: &Target) -> Option<u16> {
    let config = config();
    let snat_addr = config.snat_v4;
    if snat_addr == [0; 4] {
        return None;
    }
    let now = now_seconds();
    let range = config.snat_ports;
    // SAFETY: the helper has no preconditions.
    let start = unsafe { bpf_get_prandom_u32() } % range.port_count();
    let mut reply_key = ConntrackKey::v4(
        target.addr,
        target.port,
        snat_addr,
        0,
        flow.proto,
        CT_DIR_SNAT_REPLY,
    );
    let reply = ConntrackValue::new(
        map_addr_v4(flow.saddr),
        flow.sport,
        target.backend_id,
        target.rev_nat_id,
        now,
    )
    .with_flags(CT_FLAG_SNAT);
    let mut port = None;
    for attempt in 0..SNAT_PORT_TRIES {
        let candidate = range.nth(start + attempt).to_be();
        reply_key.dport = candidate;
        if CONNTRACK.insert(reply_key, reply, BPF_NOEXIST).is_ok() {
            port = Some(candidate);
            break;
        }
    }
    let port = port?;
    let out_key = ConntrackKey::v4(
        flow.saddr,
        flow.sport,
        target.addr,
        target.port,
        flow.proto,
        CT_DIR_SNAT,
    );
    let out = ConntrackValue::new(
        map_addr_v4(snat_addr),
        port,
        target.backend_id,
        target.rev_nat_id,
        now,
    )
    .with_flags(CT_FLAG_SNAT);
    CONNTRACK.insert(out_key, out, BPF_ANY).ok()?;
    Some(port)
}

/// Records a new flow: the reply entry first, so a reply can never arrive
/// before the datapath knows how to translate it, then the forward entry.
/// A hairpin flow's reply entry is keyed by the reply as the pod sends it,
/// to [`HAIRPIN_IPV4`]. Not inlined (its own stack frame).
#[inline(never)]
pub fn track(
    flow: &Ipv4Flow,
    forward_key: &ConntrackKey,
    target: &Target,
    hairpin: bool,
) -> Result<(), i32> {
    let now = now_seconds();
    let mut flags = if target.snat_port != 0 {
        CT_FLAG_SNAT
    } else {
        0
    };
    if hairpin {
        flags |= CT_FLAG_HAIRPIN;
    }
    let forward = ConntrackValue::new(
        map_addr_v4(target.addr),
        target.port,
        target.backend_id,
        target.rev_nat_id,
        now,
    )
    .with_flags(flags)
    .with_snat_port(target.snat_port);
    // The reply entry holds the frontend it restores.
    let reply = ConntrackValue::new(
        forward_key.daddr,
        flow.dport,
        target.backend_id,
        target.rev_nat_id,
        now,
    )
    .with_flags(flags & CT_FLAG_HAIRPIN);
    CONNTRACK.insert(reply_key(forward_key, &forward), reply, BPF_ANY)?;
    CONNTRACK.insert(forward_key, forward, BPF_ANY)
}
