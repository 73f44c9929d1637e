//! Conntrack as the datapath runs it: the key of a packet in a direction,
//! what a flow's master entry says about the next forward packet (a live
//! flow, a new flow, a re-balance, a dead flow), the use of the other
//! entries by the packets that match them, the entries a new flow gets,
//! and the SNAT port a flow to a remote backend is given. What the entries
//! mean, and when they expire, is the shared contract
//! (`service_common::conntrack`, `docs/design/flow-lifecycle.md`).
//!
//! Writes are rare: a packet writes an entry only when the second changed
//! since the entry's `last_seen` or the packet brings a new state bit
//! (`ConntrackValue::needs_touch`); a reply that does so also brings the
//! master up to date, so the master knows of both directions.

#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map calls take keys and values by reference: the BPF target then \
              copies no 40-byte key or value into another stack slot"
)]

use aya_ebpf::helpers::bpf_get_prandom_u32;
use service_common::{
    BACKEND_STATE_ACTIVE, BACKEND_STATE_NOT_SERVING, CT_DIR_SNAT, CT_DIR_SNAT_REPLY,
    CT_FLAG_FROM_NETWORK, CT_FLAG_HAIRPIN, CT_FLAG_SNAT, ConntrackKey, ConntrackTimeouts,
    ConntrackValue, DatapathConfig, DatapathCounter, PROTO_TCP, map_addrs_equal, master_key,
    packet_state_bits, reopens, reply_key, snat_port_reusable,
};

use crate::{
    clock::now_seconds,
    lb::{Origin, Target},
    maps::{BACKENDS, BPF_ANY, BPF_NOEXIST, CONNTRACK, REVNAT, config, count},
    packet::{Flow, IpFamily},
};

/// How many SNAT ports are tried for a new flow before giving up.
const SNAT_PORT_TRIES: u32 = 16;

/// The conntrack key of a packet as it stands, in the given direction.
#[inline(always)]
pub fn conntrack_key<A: IpFamily>(flow: &Flow<A>, direction: u8) -> ConntrackKey {
    ConntrackKey::new(
        flow.saddr.to_map(),
        flow.sport,
        flow.daddr.to_map(),
        flow.dport,
        A::FAMILY,
        flow.proto,
        direction,
    )
}

/// What a forward packet's master entry says.
#[derive(Clone, Copy)]
pub enum Tracked<A> {
    /// A live flow: translate to this backend (the entry is up to date).
    Flow(Target<A>),
    /// No usable entry: absent, expired, or a TCP SYN reusing the tuple of
    /// a closing flow or of a flow whose backend no longer takes new ones.
    New,
    /// The flow's backend was deleted (or its id names another address now)
    /// or, for UDP, stopped serving: the flow moves to another backend.
    Rebalance,
    /// The flow's frontend was deleted: a new flow if a frontend exists
    /// there again, else the packet is dropped.
    Dead,
    /// A live flow of the other origin (`CT_FLAG_FROM_NETWORK` differs):
    /// the packet is dropped, the flow left alone.
    Foreign,
}

/// Looks up the master entry `key` of a forward packet `flow` from
/// `origin` at `now` and judges it (see [`Tracked`]); a live flow's entry
/// records the packet (its `last_seen`, its FIN or RST). A live master of
/// the other origin is [`Tracked::Foreign`]; an expired one is a new flow
/// like any expired master.
#[inline(always)]
pub fn lookup_master<A: IpFamily>(
    key: &ConntrackKey,
    flow: &Flow<A>,
    now: u32,
    timeouts: &ConntrackTimeouts,
    origin: Origin,
) -> Tracked<A> {
    let Some(entry) = CONNTRACK.get_ptr_mut(key) else {
        return Tracked::New;
    };
    // SAFETY: a live map value, read in place (no copy on the stack).
    let master = unsafe { &*entry };
    if master.is_dead() {
        return Tracked::Dead;
    }
    if timeouts.is_expired(flow.proto, master, now) {
        count(DatapathCounter::ConntrackExpired);
        return Tracked::New;
    }
    if master.flags & CT_FLAG_FROM_NETWORK != origin.conntrack_flag() {
        return Tracked::Foreign;
    }
    if reopens(master, flow.proto, flow.tcp_flags) {
        return Tracked::New;
    }
    let Some(backend) = BACKENDS.get(master.backend_id).filter(|b| b.exists()) else {
        return Tracked::Rebalance;
    };
    if !map_addrs_equal(&backend.addr, &master.nat_addr) || backend.port != master.nat_port {
        return Tracked::Rebalance;
    }
    if backend.state != BACKEND_STATE_ACTIVE {
        if flow.is_tcp_syn() {
            return Tracked::New;
        }
        if backend.state == BACKEND_STATE_NOT_SERVING && flow.proto != PROTO_TCP {
            return Tracked::Rebalance;
        }
    }
    let target = Target {
        addr: A::from_map(&master.nat_addr),
        port: master.nat_port,
        backend_id: master.backend_id,
        rev_nat_id: master.rev_nat_id,
        node_local: true,
        snat_port: master.snat_port,
        _pad0: 0,
        _pad1: 0,
    };
    touch(
        entry,
        packet_state_bits(flow.proto, flow.tcp_flags, false),
        now,
    );
    Tracked::Flow(target)
}

/// What a non-master entry said to the packet that matched it.
#[derive(Clone, Copy)]
pub enum Used<A> {
    /// No entry: not a packet of a tracked flow in this direction.
    Missing,
    /// The flow's frontend was deleted: the packet is dropped.
    Dead,
    /// The address and port (network byte order) the entry translates to
    /// (its `nat_addr`, `nat_port`).
    Translate(A, u16),
}

/// Looks up the non-master entry `key` for `flow`, a packet travelling in
/// the reply direction (`reply`) or not, and records the packet in it. A
/// reply or hairpin reply entry that changed (`propagate`) brings its
/// master up to date too: the master learns of replies, FINs and RSTs at
/// once and of reply-only activity once a second. The reply path does not
/// judge expiry: replies follow their master.
#[inline(always)]
pub fn use_entry<A: IpFamily>(
    key: &ConntrackKey,
    flow: &Flow<A>,
    reply: bool,
    propagate: bool,
) -> Used<A> {
    let Some(entry) = CONNTRACK.get_ptr_mut(key) else {
        return Used::Missing;
    };
    // SAFETY: a live map value, read in place.
    let value = unsafe { &*entry };
    if value.is_dead() {
        count(DatapathCounter::DeadFlowDropped);
        return Used::Dead;
    }
    let used = Used::Translate(A::from_map(&value.nat_addr), value.nat_port);
    let bits = packet_state_bits(flow.proto, flow.tcp_flags, reply);
    let now = now_seconds();
    if touch(entry, bits, now) && propagate {
        touch_master(key, entry, bits, now);
    }
    used
}

/// Records a packet contributing state `bits` at `now` in the entry at
/// `entry`, if that changes it; whether it did.
#[inline(always)]
fn touch(entry: *mut ConntrackValue, bits: u8, now: u32) -> bool {
    // SAFETY: a live map value; concurrent writers only ever set bits and
    // a recent second, so a lost update costs at most one second.
    unsafe {
        if !(*entry).needs_touch(bits, now) {
            return false;
        }
        (*entry).last_seen = now;
        (*entry).state |= bits;
    }
    true
}

/// Brings the master of the reply-side entry `key`/`value` up to date with
/// a reply's state `bits` at `now`, if it is still the same flow's (the
/// same backend: a re-balanced flow's old reply entry has no say).
/// Not inlined: rare, and its own stack frame.
#[inline(never)]
fn touch_master(key: &ConntrackKey, value: *const ConntrackValue, bits: u8, now: u32) {
    // SAFETY: a live map value, read in place.
    let value = unsafe { &*value };
    let Some(master_key) = master_key(key, value, None) else {
        return;
    };
    let Some(entry) = CONNTRACK.get_ptr_mut(master_key) else {
        return;
    };
    // SAFETY: a live map value, read in place.
    let master = unsafe { &*entry };
    if master.backend_id == value.backend_id && !master.is_dead() {
        touch(entry, bits, now);
    }
}

/// Whether a TCP SYN-ACK matching the reply entry `key` answers the SYN
/// of its flow: the flow's master is there, of the same backend, neither
/// dead, closing nor expired at `now`. Otherwise the SYN-ACK answers a
/// connection the datapath did not translate (socket-LB's, from a client
/// port that an earlier, finished flow used: the same tuple as that
/// flow's leftover reply entry) and must reach its socket untranslated.
/// Only SYN-ACKs are judged: one extra lookup per connection. Not inlined
/// (its own stack frame).
#[inline(never)]
pub fn syn_ack_answers_master(key: &ConntrackKey, now: u32) -> bool {
    // SAFETY: read in place.
    let Some(reply) = (unsafe { CONNTRACK.get(key) }) else {
        return false;
    };
    let Some(master_key) = master_key(key, reply, None) else {
        return false;
    };
    // SAFETY: read in place.
    let Some(master) = (unsafe { CONNTRACK.get(&master_key) }) else {
        return false;
    };
    let expired = config().is_some_and(|c| c.timeouts.is_expired(PROTO_TCP, master, now));
    master.backend_id == reply.backend_id && !master.is_dead() && !master.is_closing() && !expired
}

/// What the search for a free SNAT port found.
#[derive(Clone, Copy)]
pub enum SnatPort {
    /// This port (network byte order) was free and is now the flow's.
    Taken(u16),
    /// No port tried was free; this one's holder has expired (to be
    /// taken over with [`take_over_snat_port`] if its flow let go of it).
    Expired(u16),
    /// Every port tried is held by a live entry.
    Exhausted,
}

/// Looks for a source port on this node's SNAT address for a new flow to
/// a remote backend, at `now`: up to [`SNAT_PORT_TRIES`] ports of the SNAT
/// range, each drawn at random (independent draws find a free port as
/// long as any sizeable share is free; probing the next ports would walk
/// along the runs of taken ones that build up). A port is taken by
/// inserting its SNAT reply entry only if absent. Not inlined (its own
/// stack frame).
#[inline(never)]
pub fn allocate_snat_port<A: IpFamily>(
    flow: &Flow<A>,
    target: &Target<A>,
    config: &DatapathConfig,
    now: u32,
) -> SnatPort {
    let range = config.snat_ports;
    let mut key = snat_reply_entry_key(flow, target, config, 0);
    let value = snat_reply_entry(flow, target, now);
    // The first port tried whose holder has expired (network byte order;
    // 0: none). One take-over at most keeps this loop cheap to run and to
    // verify.
    let mut expired = 0;
    for _ in 0..SNAT_PORT_TRIES {
        // SAFETY: the helper has no preconditions.
        let candidate = range.nth(unsafe { bpf_get_prandom_u32() }).to_be();
        key.dport = candidate;
        if CONNTRACK.insert(&key, &value, BPF_NOEXIST).is_ok() {
            return SnatPort::Taken(candidate);
        }
        // SAFETY: read in place.
        let holder = unsafe { CONNTRACK.get(&key) };
        if expired == 0 && holder.is_some_and(|h| config.timeouts.is_expired(flow.proto, h, now)) {
            expired = candidate;
        }
    }
    if expired == 0 {
        SnatPort::Exhausted
    } else {
        SnatPort::Expired(expired)
    }
}

/// The SNAT reply entry key of a flow to `target` given SNAT port `port`.
#[inline(always)]
fn snat_reply_entry_key<A: IpFamily>(
    flow: &Flow<A>,
    target: &Target<A>,
    config: &DatapathConfig,
    port: u16,
) -> ConntrackKey {
    ConntrackKey::new(
        target.addr.to_map(),
        target.port,
        (*A::snat(config)).to_map(),
        port,
        A::FAMILY,
        flow.proto,
        CT_DIR_SNAT_REPLY,
    )
}

/// The SNAT reply entry of a new flow `flow`: it restores the client.
#[inline(always)]
fn snat_reply_entry<A: IpFamily>(flow: &Flow<A>, target: &Target<A>, now: u32) -> ConntrackValue {
    ConntrackValue::new(
        flow.saddr.to_map(),
        flow.sport,
        target.backend_id,
        target.rev_nat_id,
        now,
    )
    .with_flags(CT_FLAG_SNAT | CT_FLAG_FROM_NETWORK)
}

/// Takes SNAT port `port` (network byte order), whose reply entry has
/// expired, for a new flow, if the flow holding it let go of it at `now`
/// (`service_common::snat_port_reusable`: its master is gone, expired,
/// dead, or moved on): replaces the entry, then reads it back, so of two
/// CPUs taking the same port over at once only the one whose entry stayed
/// keeps it. Not inlined: rare, and its own stack frame.
#[inline(never)]
pub fn take_over_snat_port<A: IpFamily>(
    flow: &Flow<A>,
    target: &Target<A>,
    config: &DatapathConfig,
    port: u16,
    now: u32,
) -> bool {
    let key = snat_reply_entry_key(flow, target, config, port);
    let ours = snat_reply_entry(flow, target, now);
    // SAFETY (all lookups): map values, read in place.
    let Some(holder) = (unsafe { CONNTRACK.get(&key) }) else {
        return false;
    };
    let frontend = unsafe { REVNAT.get(holder.rev_nat_id) };
    let master = match master_key(&key, holder, frontend) {
        Some(master_key) => unsafe { CONNTRACK.get(master_key) },
        None => None,
    };
    if !snat_port_reusable(&config.timeouts, key.proto, holder, master, port, now) {
        return false;
    }
    if CONNTRACK.insert(&key, &ours, BPF_ANY).is_err() {
        return false;
    }
    let kept = unsafe { CONNTRACK.get(&key) };
    let ours_kept = kept.is_some_and(|kept| {
        map_addrs_equal(&kept.nat_addr, &ours.nat_addr)
            && kept.nat_port == ours.nat_port
            && kept.backend_id == ours.backend_id
    });
    if ours_kept {
        count(DatapathCounter::SnatPortReused);
    }
    ours_kept
}

/// Records the SNAT entry of a new flow to a remote backend: its packets
/// leave with `config`'s SNAT address and `port` (network byte order) as
/// source. Not inlined (its own stack frame, apart from the port search's).
#[inline(never)]
pub fn record_snat<A: IpFamily>(
    flow: &Flow<A>,
    target: &Target<A>,
    config: &DatapathConfig,
    port: u16,
    now: u32,
) -> bool {
    let key = ConntrackKey::new(
        flow.saddr.to_map(),
        flow.sport,
        target.addr.to_map(),
        target.port,
        A::FAMILY,
        flow.proto,
        CT_DIR_SNAT,
    );
    let value = ConntrackValue::new(
        (*A::snat(config)).to_map(),
        port,
        target.backend_id,
        target.rev_nat_id,
        now,
    )
    .with_flags(CT_FLAG_SNAT | CT_FLAG_FROM_NETWORK);
    CONNTRACK.insert(&key, &value, BPF_ANY).is_ok()
}

/// Records a new flow at `now`: the reply entry first, so a reply can
/// never arrive before the datapath knows how to translate it, then the
/// master. A hairpin flow's reply entry is keyed by the reply as the pod
/// sends it, to the family's hairpin address. Both are written over any entries of an
/// earlier flow on the same tuple. `flags` are the flow's
/// [`CT_FLAG_HAIRPIN`] and origin ([`CT_FLAG_FROM_NETWORK`]) bits, which
/// both entries record ([`CT_FLAG_SNAT`] follows from the target). Whether
/// both were written. Not inlined (its own stack frame).
#[inline(never)]
pub fn track<A: IpFamily>(
    flow: &Flow<A>,
    forward_key: &ConntrackKey,
    target: &Target<A>,
    flags: u16,
    now: u32,
) -> bool {
    let mut flags = flags;
    if target.snat_port != 0 {
        flags |= CT_FLAG_SNAT;
    }
    let forward = ConntrackValue::new(
        target.addr.to_map(),
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
    .with_flags(flags & (CT_FLAG_HAIRPIN | CT_FLAG_FROM_NETWORK));
    CONNTRACK
        .insert(&reply_key(forward_key, &forward), &reply, BPF_ANY)
        .is_ok()
        && CONNTRACK.insert(forward_key, &forward, BPF_ANY).is_ok()
}
