//! Connection tracking: the entries of a flow, their keys and values, and
//! the pure rules the datapath, the agent's collector and the tests share
//! (see `docs/design/flow-lifecycle.md`).
//!
//! A flow has a **master** entry ([`CT_DIR_FORWARD`], keyed by the packet
//! as the client sent it: client → frontend) and companions: a reply entry
//! ([`CT_DIR_REPLY`] or, for hairpin, [`CT_DIR_HAIRPIN_REPLY`]) and, for an
//! SNATed flow, [`CT_DIR_SNAT`] and [`CT_DIR_SNAT_REPLY`]. Companions are
//! derived, never stored as pointers: [`reply_key`], [`snat_key`] and
//! [`snat_reply_key`] give them from the master, [`master_key`] the master
//! from any of them.
//!
//! Every entry records when it was last used and which `CT_STATE_*` bits
//! went through it; [`ConntrackTimeouts`] turns those into an expiry, which
//! the datapath honours itself (an expired master is a new flow) and the
//! collector uses to free entries.

use bytemuck::{Pod, Zeroable};

use crate::{
    FAMILY_IPV4, MapAddr, PROTO_TCP, RevNatValue, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST,
    TCP_FLAG_SYN, map_addr_v4,
};

/// Default capacity of the conntrack LRU map (two entries per flow, four
/// for an SNATed one).
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;

/// Conntrack direction: the flow's master, keyed by the packet as the
/// client sends it (client:cport → frontend:fport, before DNAT). Value: the
/// backend, the flow's state (both directions).
pub const CT_DIR_FORWARD: u8 = 0;
/// Conntrack direction: the reply of a flow as the backend sends it
/// (backend:bport → client:cport, before the source is restored). Value:
/// the frontend to restore as source.
pub const CT_DIR_REPLY: u8 = 1;
/// Conntrack direction: an SNATed flow leaving the node (client:cport →
/// backend:bport, after DNAT, before SNAT). Value: the SNAT address and
/// port the source becomes.
pub const CT_DIR_SNAT: u8 = 2;
/// Conntrack direction: a reply to an SNATed flow arriving (backend:bport →
/// SNAT address:SNAT port). Value: the client to restore as destination.
pub const CT_DIR_SNAT_REPLY: u8 = 3;
/// Conntrack direction: the reply of a hairpin flow (a pod that reached
/// itself through a frontend), as the pod sends it: pod:bport →
/// [`HAIRPIN_IPV4`]:cport. Value: the frontend to restore as source (the
/// client to restore as destination is the pod itself: the key's source
/// address and its destination port). Such a flow has this entry instead of
/// a [`CT_DIR_REPLY`] one.
pub const CT_DIR_HAIRPIN_REPLY: u8 = 4;

/// Conntrack flag (master, SNAT and SNAT reply entries): the flow is SNATed
/// to this node's address (a remote backend behind a NodePort,
/// LoadBalancer or externalIP frontend).
pub const CT_FLAG_SNAT: u16 = 1 << 0;
/// Conntrack flag (master and hairpin reply entry): the backend is the
/// client pod itself, so the flow's source is SNATed to [`HAIRPIN_IPV4`].
pub const CT_FLAG_HAIRPIN: u16 = 1 << 1;
/// Conntrack flag (any entry): the flow's frontend was deleted; set by the
/// agent on every entry with that rev-NAT id. The datapath drops packets of
/// such a flow in both directions; a new packet to a frontend that exists
/// again starts a new flow.
pub const CT_FLAG_DEAD: u16 = 1 << 2;
/// Conntrack flag (every entry of a flow): the flow came in from the
/// network (`from_network`, XDP or TC); without it, from a pod
/// (`from_pod`). A forward packet is only translated by a master of its
/// own origin: a packet from the network that carries a pod flow's
/// 5-tuple (or the other way round) is dropped, counted as
/// `DropOriginMismatch`, and never takes over or rewrites the flow.
pub const CT_FLAG_FROM_NETWORK: u16 = 1 << 3;

/// Conntrack state bit: a reply (backend → client) was seen.
pub const CT_STATE_SEEN_REPLY: u8 = 1 << 0;
/// Conntrack state bit: the client sent a TCP FIN.
pub const CT_STATE_FIN_FORWARD: u8 = 1 << 1;
/// Conntrack state bit: the backend sent a TCP FIN.
pub const CT_STATE_FIN_REPLY: u8 = 1 << 2;
/// Conntrack state bit: either side sent a TCP RST.
pub const CT_STATE_RST: u8 = 1 << 3;
/// The state bits of a TCP flow that is closing or closed.
pub const CT_STATE_CLOSING: u8 = CT_STATE_FIN_FORWARD | CT_STATE_FIN_REPLY | CT_STATE_RST;

/// Source address of hairpin flows, network byte order: a pod that reaches
/// a frontend whose chosen backend is the pod itself gets its packets back
/// from this link-local address (and its own client port) instead of from
/// its own address, which it would drop as a packet it never sent; its
/// replies go to this address, through its default gateway, where the
/// datapath translates them back. The address Cilium uses for the same
/// purpose (`IPV4_LOOPBACK`); it must not be any pod's or node's address.
pub const HAIRPIN_IPV4: [u8; 4] = [169, 254, 42, 1];

/// Source address of IPv6 hairpin flows, network byte order: the IPv6 twin
/// of [`HAIRPIN_IPV4`], `2001:db8::a9fe:2a01` (that address inside the
/// documentation prefix, RFC 3849). Not link-local as the IPv4 one is: a
/// pod takes every `fe80::/64` address as on its link and would ask the
/// neighbour discovery for it instead of sending its replies through its
/// default gateway; the documentation prefix is never any pod's or node's
/// address, and is routed through that gateway like any global address.
pub const HAIRPIN_IPV6: MapAddr = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0xa9, 0xfe, 0x2a, 0x01,
];

/// The hairpin address of `family` ([`HAIRPIN_IPV4`] or [`HAIRPIN_IPV6`])
/// as a map address.
#[inline(always)]
pub const fn hairpin_addr(family: u8) -> MapAddr {
    if family == crate::FAMILY_IPV6 {
        HAIRPIN_IPV6
    } else {
        map_addr_v4(HAIRPIN_IPV4)
    }
}

/// Key of the conntrack map: a flow's 5-tuple as a hook sees the packet,
/// and which of the flow's entries it is.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ConntrackKey {
    /// Source address, network byte order.
    pub saddr: MapAddr,
    /// Destination address, network byte order.
    pub daddr: MapAddr,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// Address family: [`FAMILY_IPV4`] or [`crate::FAMILY_IPV6`].
    pub family: u8,
    /// IP protocol.
    pub proto: u8,
    /// `CT_DIR_*`: which of a flow's entries this is.
    pub direction: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ConntrackKey>() == 40);

impl ConntrackKey {
    /// The key of `saddr:sport → daddr:dport` (addresses and ports in
    /// network byte order) for `family`, `proto` and `direction`.
    #[inline(always)]
    pub const fn new(
        saddr: MapAddr,
        sport: u16,
        daddr: MapAddr,
        dport: u16,
        family: u8,
        proto: u8,
        direction: u8,
    ) -> Self {
        ConntrackKey {
            saddr,
            daddr,
            sport,
            dport,
            family,
            proto,
            direction,
            _pad: 0,
        }
    }

    /// The key of the IPv4 packet `saddr:sport → daddr:dport` (network byte
    /// order) in `direction`.
    #[inline(always)]
    pub const fn v4(
        saddr: [u8; 4],
        sport: u16,
        daddr: [u8; 4],
        dport: u16,
        proto: u8,
        direction: u8,
    ) -> Self {
        Self::new(
            map_addr_v4(saddr),
            sport,
            map_addr_v4(daddr),
            dport,
            FAMILY_IPV4,
            proto,
            direction,
        )
    }

    /// Whether this is a flow's master entry.
    #[inline(always)]
    pub const fn is_master(&self) -> bool {
        self.direction == CT_DIR_FORWARD
    }
}

/// Value of the conntrack map. What `nat_addr`/`nat_port` hold depends on
/// the entry's direction:
///
/// | Direction | `nat_addr:nat_port` | `snat_port` |
/// |---|---|---|
/// | [`CT_DIR_FORWARD`] (master) | the backend (DNAT target) | the SNAT port, if [`CT_FLAG_SNAT`] |
/// | [`CT_DIR_REPLY`], [`CT_DIR_HAIRPIN_REPLY`] | the frontend (restored as source) | 0 |
/// | [`CT_DIR_SNAT`] | the SNAT address and port (the new source) | 0 |
/// | [`CT_DIR_SNAT_REPLY`] | the client (restored as destination) | 0 |
///
/// Every entry carries the flow's backend and rev-NAT ids, its own
/// `last_seen` and `state`, and the flow's `created`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ConntrackValue {
    /// The address this entry translates to (see the table above), network
    /// byte order.
    pub nat_addr: MapAddr,
    /// The port this entry translates to (see the table above), network
    /// byte order.
    pub nat_port: u16,
    /// `CT_FLAG_*` bits.
    pub flags: u16,
    /// The flow's backend (host byte order): the datapath checks it is still
    /// in the backends map with the same address; the agent reaps by it.
    pub backend_id: crate::BackendId,
    /// The flow's frontend (host byte order).
    pub rev_nat_id: crate::RevNatId,
    /// Master of an SNATed flow: the source port on this node's SNAT
    /// address, network byte order; else zero.
    pub snat_port: u16,
    /// `CT_STATE_*` bits seen by this entry; the master also gets the reply
    /// direction's bits.
    pub state: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
    /// Monotonic seconds ([`crate::mono_seconds`]) of the last packet that
    /// used this entry (the master: of either direction, to the second).
    /// Host byte order.
    pub last_seen: u32,
    /// Monotonic seconds of the flow's first packet. Host byte order.
    pub created: u32,
}
const _: () = assert!(core::mem::size_of::<ConntrackValue>() == 40);

impl ConntrackValue {
    /// A fresh entry of a flow created at `now` (monotonic seconds) that
    /// translates to `nat_addr:nat_port` (network byte order), with no
    /// flags, no SNAT port and no state yet.
    #[inline(always)]
    pub const fn new(
        nat_addr: MapAddr,
        nat_port: u16,
        backend_id: crate::BackendId,
        rev_nat_id: crate::RevNatId,
        now: u32,
    ) -> Self {
        ConntrackValue {
            nat_addr,
            nat_port,
            flags: 0,
            backend_id,
            rev_nat_id,
            snat_port: 0,
            state: 0,
            _pad: 0,
            last_seen: now,
            created: now,
        }
    }

    /// The same entry with `CT_FLAG_*` bits `flags`.
    #[inline(always)]
    pub const fn with_flags(self, flags: u16) -> Self {
        ConntrackValue { flags, ..self }
    }

    /// The same entry with SNAT port `port` (network byte order).
    #[inline(always)]
    pub const fn with_snat_port(self, port: u16) -> Self {
        ConntrackValue {
            snat_port: port,
            ..self
        }
    }

    /// Whether the flow's frontend was deleted ([`CT_FLAG_DEAD`]).
    #[inline(always)]
    pub const fn is_dead(&self) -> bool {
        self.flags & CT_FLAG_DEAD != 0
    }

    /// Whether the flow saw a FIN or a RST (TCP).
    #[inline(always)]
    pub const fn is_closing(&self) -> bool {
        self.state & CT_STATE_CLOSING != 0
    }

    /// Whether a packet contributing state bits `bits` at `now` changes
    /// this entry: the datapath writes an entry only then, so at most once
    /// a second per entry plus once per new state bit.
    #[inline(always)]
    pub const fn needs_touch(&self, bits: u8, now: u32) -> bool {
        self.last_seen != now || self.state | bits != self.state
    }

    /// Whether this entry has seen no packet for more than `seconds` at
    /// `now` (monotonic seconds); a `last_seen` ahead of `now` (written by
    /// another CPU in the next second) is not idle.
    #[inline(always)]
    pub const fn idle_longer_than(&self, seconds: u32, now: u32) -> bool {
        seconds_between(self.last_seen, now) > seconds as i32
    }
}

/// The `CT_STATE_*` bits one packet contributes to its flow: `reply` says
/// whether it travels backend → client. TCP `tcp_flags` (header byte 13)
/// add FIN and RST bits; other protocols only the reply bit.
#[inline(always)]
pub const fn packet_state_bits(proto: u8, tcp_flags: u8, reply: bool) -> u8 {
    let mut bits = if reply { CT_STATE_SEEN_REPLY } else { 0 };
    if proto == PROTO_TCP {
        if tcp_flags & TCP_FLAG_FIN != 0 {
            bits |= if reply {
                CT_STATE_FIN_REPLY
            } else {
                CT_STATE_FIN_FORWARD
            };
        }
        if tcp_flags & TCP_FLAG_RST != 0 {
            bits |= CT_STATE_RST;
        }
    }
    bits
}

/// Whether a packet of `proto` with TCP flags `tcp_flags` opens a new
/// connection on a tuple whose master is `master`: a TCP SYN without ACK on
/// a closing or closed flow reuses the tuple, so it is a new flow (a SYN on
/// an open flow is a retransmission and keeps its backend).
#[inline(always)]
pub const fn reopens(master: &ConntrackValue, proto: u8, tcp_flags: u8) -> bool {
    proto == PROTO_TCP
        && tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
        && master.is_closing()
}

/// The reply-side key of the flow whose master is `master`/`value`:
/// [`CT_DIR_REPLY`] (backend:bport → client:cport) or, for a hairpin flow,
/// [`CT_DIR_HAIRPIN_REPLY`] (backend:bport → the family's hairpin address
/// ([`hairpin_addr`]):cport).
#[inline(always)]
pub const fn reply_key(master: &ConntrackKey, value: &ConntrackValue) -> ConntrackKey {
    // Two whole constructions rather than a choice per field: the BPF
    // target then copies addresses as words.
    if value.flags & CT_FLAG_HAIRPIN != 0 {
        ConntrackKey::new(
            value.nat_addr,
            value.nat_port,
            hairpin_addr(master.family),
            master.sport,
            master.family,
            master.proto,
            CT_DIR_HAIRPIN_REPLY,
        )
    } else {
        ConntrackKey::new(
            value.nat_addr,
            value.nat_port,
            master.saddr,
            master.sport,
            master.family,
            master.proto,
            CT_DIR_REPLY,
        )
    }
}

/// The [`CT_DIR_SNAT`] key of an SNATed flow's master (client:cport →
/// backend:bport); `None` when the flow is not SNATed.
#[inline(always)]
pub const fn snat_key(master: &ConntrackKey, value: &ConntrackValue) -> Option<ConntrackKey> {
    if value.flags & CT_FLAG_SNAT == 0 {
        return None;
    }
    Some(ConntrackKey::new(
        master.saddr,
        master.sport,
        value.nat_addr,
        value.nat_port,
        master.family,
        master.proto,
        CT_DIR_SNAT,
    ))
}

/// The [`CT_DIR_SNAT_REPLY`] key of an SNATed flow's master
/// (backend:bport → `snat_addr`:SNAT port), given this node's SNAT address
/// (network byte order); `None` when the flow is not SNATed.
#[inline(always)]
pub const fn snat_reply_key(
    master: &ConntrackKey,
    value: &ConntrackValue,
    snat_addr: &MapAddr,
) -> Option<ConntrackKey> {
    if value.flags & CT_FLAG_SNAT == 0 {
        return None;
    }
    Some(ConntrackKey::new(
        value.nat_addr,
        value.nat_port,
        *snat_addr,
        value.snat_port,
        master.family,
        master.proto,
        CT_DIR_SNAT_REPLY,
    ))
}

/// The keys of every companion of the flow whose master is `master`/`value`,
/// given this node's SNAT address (network byte order): its reply (or
/// hairpin reply) entry, and for an SNATed flow its [`CT_DIR_SNAT`] and
/// [`CT_DIR_SNAT_REPLY`] entries. The collector deletes them with their
/// master.
#[inline(always)]
pub const fn companion_keys(
    master: &ConntrackKey,
    value: &ConntrackValue,
    snat_addr: &MapAddr,
) -> [Option<ConntrackKey>; 3] {
    [
        Some(reply_key(master, value)),
        snat_key(master, value),
        snat_reply_key(master, value, snat_addr),
    ]
}

/// Whether `key` is one of the companions ([`companion_keys`]) of the flow
/// whose master is `master`/`value`. A non-master entry whose master no
/// longer names it (the flow moved to another backend, or another flow took
/// the tuple) is an orphan.
#[inline(always)]
pub fn is_companion(
    key: &ConntrackKey,
    master: &ConntrackKey,
    value: &ConntrackValue,
    snat_addr: &MapAddr,
) -> bool {
    companion_keys(master, value, snat_addr)
        .iter()
        .any(|companion| companion.as_ref() == Some(key))
}

/// The master key of the flow a non-master entry belongs to. A reply or
/// hairpin reply entry holds its frontend; SNAT and SNAT reply entries need
/// it given (`frontend`: the rev-NAT entry of the value's `rev_nat_id`).
/// `None` for a master itself, for an unknown direction, and for SNAT
/// entries without `frontend`.
#[inline(always)]
pub const fn master_key(
    key: &ConntrackKey,
    value: &ConntrackValue,
    frontend: Option<&RevNatValue>,
) -> Option<ConntrackKey> {
    // (client, client port, frontend, frontend port)
    let (client, client_port, frontend_addr, frontend_port) = match key.direction {
        CT_DIR_REPLY => (key.daddr, key.dport, value.nat_addr, value.nat_port),
        CT_DIR_HAIRPIN_REPLY => (key.saddr, key.dport, value.nat_addr, value.nat_port),
        CT_DIR_SNAT => match frontend {
            Some(frontend) => (key.saddr, key.sport, frontend.addr, frontend.port),
            None => return None,
        },
        CT_DIR_SNAT_REPLY => match frontend {
            Some(frontend) => (value.nat_addr, value.nat_port, frontend.addr, frontend.port),
            None => return None,
        },
        _ => return None,
    };
    Some(ConntrackKey::new(
        client,
        client_port,
        frontend_addr,
        frontend_port,
        key.family,
        key.proto,
        CT_DIR_FORWARD,
    ))
}

/// How long an entry lives without packets, per protocol and state, in
/// seconds (host byte order). Written by the agent into the datapath's
/// configuration (`--ct-timeout-*`), read by the datapath and the collector
/// alike. A zero field means its default ([`ConntrackTimeouts::DEFAULT`]),
/// so a datapath without configuration still ages flows sensibly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ConntrackTimeouts {
    /// TCP, SYN seen, no reply yet.
    pub tcp_syn: u32,
    /// TCP, reply seen, no FIN or RST.
    pub tcp_established: u32,
    /// TCP, FIN in one direction.
    pub tcp_fin: u32,
    /// TCP, FIN in both directions, or RST; also any flow marked
    /// [`CT_FLAG_DEAD`].
    pub tcp_close: u32,
    /// UDP (and other protocols): no reply, or a reply within
    /// [`UDP_STREAM_MIN_AGE_SECS`] of the first packet (request/response).
    pub udp: u32,
    /// UDP (and other protocols): replied, and older than
    /// [`UDP_STREAM_MIN_AGE_SECS`] (a stream).
    pub udp_stream: u32,
}
const _: () = assert!(core::mem::size_of::<ConntrackTimeouts>() == 24);

/// Age a replied UDP flow must pass before it counts as a stream (and gets
/// [`ConntrackTimeouts::udp_stream`]): netfilter's 2 seconds.
pub const UDP_STREAM_MIN_AGE_SECS: u32 = 2;

impl ConntrackTimeouts {
    /// The defaults (seconds): netfilter's for SYN (60; its `syn_recv`),
    /// FIN (120, `fin_wait`/`time_wait`), close (10), UDP (30) and UDP
    /// stream (120); established 86400, as kube-proxy sets netfilter's.
    pub const DEFAULT: ConntrackTimeouts = ConntrackTimeouts {
        tcp_syn: 60,
        tcp_established: 86_400,
        tcp_fin: 120,
        tcp_close: 10,
        udp: 30,
        udp_stream: 120,
    };

    /// The timeout in seconds of an entry of `proto` holding `value`: by its
    /// state bits (a master's are the flow's), its flags ([`CT_FLAG_DEAD`]
    /// gets the close timeout) and, for a replied UDP flow, its age at its
    /// last packet.
    #[inline(always)]
    pub const fn timeout(&self, proto: u8, value: &ConntrackValue) -> u32 {
        let state = value.state;
        let (configured, default) = if value.is_dead() {
            (self.tcp_close, Self::DEFAULT.tcp_close)
        } else if proto == PROTO_TCP {
            if state & CT_STATE_RST != 0
                || state & (CT_STATE_FIN_FORWARD | CT_STATE_FIN_REPLY)
                    == CT_STATE_FIN_FORWARD | CT_STATE_FIN_REPLY
            {
                (self.tcp_close, Self::DEFAULT.tcp_close)
            } else if state & (CT_STATE_FIN_FORWARD | CT_STATE_FIN_REPLY) != 0 {
                (self.tcp_fin, Self::DEFAULT.tcp_fin)
            } else if state & CT_STATE_SEEN_REPLY != 0 {
                (self.tcp_established, Self::DEFAULT.tcp_established)
            } else {
                (self.tcp_syn, Self::DEFAULT.tcp_syn)
            }
        } else if state & CT_STATE_SEEN_REPLY != 0
            && seconds_between(value.created, value.last_seen) > UDP_STREAM_MIN_AGE_SECS as i32
        {
            (self.udp_stream, Self::DEFAULT.udp_stream)
        } else {
            (self.udp, Self::DEFAULT.udp)
        };
        if configured == 0 { default } else { configured }
    }

    /// Whether an entry of `proto` holding `value` has expired at `now`
    /// (monotonic seconds): idle for longer than its [`timeout`]. An entry
    /// whose `last_seen` is ahead of `now` (written by another CPU in the
    /// next second) is not expired.
    ///
    /// [`timeout`]: ConntrackTimeouts::timeout
    #[inline(always)]
    pub const fn is_expired(&self, proto: u8, value: &ConntrackValue, now: u32) -> bool {
        value.idle_longer_than(self.timeout(proto, value), now)
    }

    /// The close timeout in effect: the configured one, or its default.
    #[inline(always)]
    pub const fn close(&self) -> u32 {
        if self.tcp_close == 0 {
            Self::DEFAULT.tcp_close
        } else {
            self.tcp_close
        }
    }
}

/// `later - earlier` in seconds, as a signed difference of the wrapping
/// 32-bit clock (so an entry aged by rewriting its `last_seen` backwards
/// works at any uptime, and a time slightly ahead reads as negative).
#[inline(always)]
const fn seconds_between(earlier: u32, later: u32) -> i32 {
    later.wrapping_sub(earlier) as i32
}

/// Whether the SNAT port held by the [`CT_DIR_SNAT_REPLY`] entry `holder`
/// (of `proto`, for port `port` in network byte order) may be given to a
/// new flow at `now`: the entry has expired, and the flow it belongs to
/// no longer holds the port: its master (`master`, looked up through
/// [`master_key`]) is absent, dead, expired, or now names another backend
/// or SNAT port.
#[inline(always)]
pub const fn snat_port_reusable(
    timeouts: &ConntrackTimeouts,
    proto: u8,
    holder: &ConntrackValue,
    master: Option<&ConntrackValue>,
    port: u16,
    now: u32,
) -> bool {
    if !timeouts.is_expired(proto, holder, now) {
        return false;
    }
    match master {
        None => true,
        Some(master) => {
            master.is_dead()
                || timeouts.is_expired(proto, master, now)
                || master.flags & CT_FLAG_SNAT == 0
                || master.snat_port != port
                || master.backend_id != holder.backend_id
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FAMILY_IPV4, PROTO_UDP, map_addr_v4};

    const CLIENT: [u8; 4] = [10, 0, 0, 2];
    const FRONTEND: [u8; 4] = [10, 96, 0, 10];
    const BACKEND: [u8; 4] = [10, 200, 1, 2];
    const SNAT: [u8; 4] = [10, 0, 0, 1];

    fn master(proto: u8) -> ConntrackKey {
        ConntrackKey::v4(
            CLIENT,
            40000u16.to_be(),
            FRONTEND,
            80u16.to_be(),
            proto,
            CT_DIR_FORWARD,
        )
    }

    fn master_value(flags: u16, snat_port: u16) -> ConntrackValue {
        ConntrackValue::new(map_addr_v4(BACKEND), 8080u16.to_be(), 7, 3, 100)
            .with_flags(flags)
            .with_snat_port(snat_port)
    }

    fn frontend() -> RevNatValue {
        RevNatValue {
            addr: map_addr_v4(FRONTEND),
            port: 80u16.to_be(),
            family: FAMILY_IPV4,
            _pad: 0,
        }
    }

    #[test]
    fn a_reply_entry_is_the_backend_answering_the_client_and_leads_back_to_its_master() {
        let key = master(PROTO_TCP);
        let value = master_value(0, 0);
        let reply = reply_key(&key, &value);
        assert_eq!(
            reply,
            ConntrackKey::v4(
                BACKEND,
                8080u16.to_be(),
                CLIENT,
                40000u16.to_be(),
                PROTO_TCP,
                CT_DIR_REPLY
            )
        );
        // The reply entry holds the frontend, so its master needs no lookup.
        let reply_value = ConntrackValue::new(key.daddr, key.dport, 7, 3, 100);
        assert_eq!(master_key(&reply, &reply_value, None), Some(key));
        assert_eq!(snat_key(&key, &value), None);
        assert_eq!(snat_reply_key(&key, &value, &map_addr_v4(SNAT)), None);
    }

    #[test]
    fn a_hairpin_flow_is_answered_to_the_hairpin_address() {
        let key = ConntrackKey::v4(
            BACKEND,
            40000u16.to_be(),
            FRONTEND,
            80u16.to_be(),
            PROTO_TCP,
            CT_DIR_FORWARD,
        );
        let value = master_value(CT_FLAG_HAIRPIN, 0);
        let reply = reply_key(&key, &value);
        assert_eq!(
            reply,
            ConntrackKey::v4(
                BACKEND,
                8080u16.to_be(),
                HAIRPIN_IPV4,
                40000u16.to_be(),
                PROTO_TCP,
                CT_DIR_HAIRPIN_REPLY
            )
        );
        let reply_value = ConntrackValue::new(key.daddr, key.dport, 7, 3, 100);
        assert_eq!(master_key(&reply, &reply_value, None), Some(key));
    }

    #[test]
    fn an_snated_flow_has_four_entries_that_all_lead_back_to_its_master() {
        let key = master(PROTO_UDP);
        let port = 20017u16.to_be();
        let value = master_value(CT_FLAG_SNAT, port);
        let snat = snat_key(&key, &value).unwrap();
        assert_eq!(
            snat,
            ConntrackKey::v4(
                CLIENT,
                40000u16.to_be(),
                BACKEND,
                8080u16.to_be(),
                PROTO_UDP,
                CT_DIR_SNAT
            )
        );
        let snat_reply = snat_reply_key(&key, &value, &map_addr_v4(SNAT)).unwrap();
        assert_eq!(
            snat_reply,
            ConntrackKey::v4(
                BACKEND,
                8080u16.to_be(),
                SNAT,
                port,
                PROTO_UDP,
                CT_DIR_SNAT_REPLY
            )
        );
        let snat_value = ConntrackValue::new(map_addr_v4(SNAT), port, 7, 3, 100);
        let snat_reply_value = ConntrackValue::new(key.saddr, key.sport, 7, 3, 100);
        for (companion, companion_value) in [(snat, snat_value), (snat_reply, snat_reply_value)] {
            // SNAT entries need the frontend from the rev-NAT map.
            assert_eq!(master_key(&companion, &companion_value, None), None);
            assert_eq!(
                master_key(&companion, &companion_value, Some(&frontend())),
                Some(key)
            );
        }
        assert_eq!(master_key(&key, &value, Some(&frontend())), None);
    }

    #[test]
    fn companions_are_the_entries_that_lead_back_to_their_master() {
        let snat = map_addr_v4(SNAT);
        let key = master(PROTO_UDP);
        let plain = master_value(0, 0);
        let [reply, none_a, none_b] = companion_keys(&key, &plain, &snat);
        assert_eq!(reply, Some(reply_key(&key, &plain)));
        assert_eq!((none_a, none_b), (None, None));
        let snated = master_value(CT_FLAG_SNAT, 20017u16.to_be());
        let companions = companion_keys(&key, &snated, &snat);
        for companion in companions.iter().flatten() {
            assert!(is_companion(companion, &key, &snated, &snat));
            // Leads back to the master (the SNAT ones through the frontend).
            let back = match companion.direction {
                // Holds the frontend.
                CT_DIR_REPLY => master_key(
                    companion,
                    &ConntrackValue::new(key.daddr, key.dport, 7, 3, 100),
                    None,
                ),
                // Holds the client.
                _ => master_key(
                    companion,
                    &ConntrackValue::new(key.saddr, key.sport, 7, 3, 100),
                    Some(&frontend()),
                ),
            };
            assert_eq!(back, Some(key), "{companion:?}");
        }
        assert_eq!(companions.iter().flatten().count(), 3);
        // After a re-balance the master names another backend: the old
        // reply entry is no companion any more.
        let moved = ConntrackValue {
            nat_addr: map_addr_v4([10, 200, 9, 9]),
            ..plain
        };
        assert!(!is_companion(&reply_key(&key, &plain), &key, &moved, &snat));
        assert!(!is_companion(&key, &key, &plain, &snat));
    }

    #[test]
    fn packets_contribute_state_bits_by_direction() {
        assert_eq!(packet_state_bits(PROTO_TCP, TCP_FLAG_SYN, false), 0);
        assert_eq!(
            packet_state_bits(PROTO_TCP, TCP_FLAG_SYN | TCP_FLAG_ACK, true),
            CT_STATE_SEEN_REPLY
        );
        assert_eq!(
            packet_state_bits(PROTO_TCP, TCP_FLAG_FIN | TCP_FLAG_ACK, false),
            CT_STATE_FIN_FORWARD
        );
        assert_eq!(
            packet_state_bits(PROTO_TCP, TCP_FLAG_FIN | TCP_FLAG_ACK, true),
            CT_STATE_SEEN_REPLY | CT_STATE_FIN_REPLY
        );
        assert_eq!(
            packet_state_bits(PROTO_TCP, TCP_FLAG_RST, false),
            CT_STATE_RST
        );
        // UDP has no flags: a FIN-like byte means nothing.
        assert_eq!(packet_state_bits(PROTO_UDP, TCP_FLAG_FIN, false), 0);
        assert_eq!(packet_state_bits(PROTO_UDP, 0, true), CT_STATE_SEEN_REPLY);
    }

    #[test]
    fn a_syn_reopens_only_a_closing_flow() {
        let mut value = master_value(0, 0);
        value.state = CT_STATE_SEEN_REPLY;
        assert!(!reopens(&value, PROTO_TCP, TCP_FLAG_SYN));
        value.state |= CT_STATE_FIN_FORWARD;
        assert!(reopens(&value, PROTO_TCP, TCP_FLAG_SYN));
        assert!(!reopens(&value, PROTO_TCP, TCP_FLAG_SYN | TCP_FLAG_ACK));
        assert!(!reopens(&value, PROTO_UDP, TCP_FLAG_SYN));
    }

    fn with_state(state: u8) -> ConntrackValue {
        ConntrackValue {
            state,
            ..master_value(0, 0)
        }
    }

    #[test]
    fn tcp_timeouts_follow_the_flow_state() {
        let t = ConntrackTimeouts {
            tcp_syn: 1,
            tcp_established: 2,
            tcp_fin: 3,
            tcp_close: 4,
            udp: 5,
            udp_stream: 6,
        };
        let tcp = |state| t.timeout(PROTO_TCP, &with_state(state));
        assert_eq!(tcp(0), 1);
        assert_eq!(tcp(CT_STATE_SEEN_REPLY), 2);
        assert_eq!(tcp(CT_STATE_SEEN_REPLY | CT_STATE_FIN_FORWARD), 3);
        assert_eq!(tcp(CT_STATE_SEEN_REPLY | CT_STATE_FIN_REPLY), 3);
        assert_eq!(
            tcp(CT_STATE_SEEN_REPLY | CT_STATE_FIN_FORWARD | CT_STATE_FIN_REPLY),
            4
        );
        assert_eq!(tcp(CT_STATE_RST), 4);
        let dead = master_value(CT_FLAG_DEAD, 0);
        assert_eq!(t.timeout(PROTO_TCP, &dead), 4);
        assert_eq!(t.timeout(PROTO_UDP, &dead), 4);
    }

    #[test]
    fn udp_becomes_a_stream_once_replied_and_older_than_two_seconds() {
        let t = ConntrackTimeouts::default();
        let mut value = with_state(0);
        value.last_seen = value.created + 10;
        assert_eq!(t.timeout(PROTO_UDP, &value), 30, "unreplied");
        value.state = CT_STATE_SEEN_REPLY;
        value.last_seen = value.created + 1;
        assert_eq!(t.timeout(PROTO_UDP, &value), 30, "request/response");
        value.last_seen = value.created + 3;
        assert_eq!(t.timeout(PROTO_UDP, &value), 120, "stream");
    }

    #[test]
    fn zero_timeouts_mean_the_defaults() {
        let zero = ConntrackTimeouts::default();
        let d = ConntrackTimeouts::DEFAULT;
        assert_eq!(zero.timeout(PROTO_TCP, &with_state(0)), d.tcp_syn);
        assert_eq!(
            zero.timeout(PROTO_TCP, &with_state(CT_STATE_SEEN_REPLY)),
            d.tcp_established
        );
        assert_eq!(zero.timeout(PROTO_UDP, &with_state(0)), d.udp);
    }

    #[test]
    fn an_entry_expires_once_idle_longer_than_its_timeout_at_any_uptime() {
        let t = ConntrackTimeouts::DEFAULT;
        for last_seen in [5u32, 100_000, u32::MAX - 3] {
            let value = ConntrackValue {
                last_seen,
                created: last_seen,
                ..with_state(0)
            };
            let udp = t.udp;
            assert!(!t.is_expired(PROTO_UDP, &value, last_seen));
            assert!(!t.is_expired(PROTO_UDP, &value, last_seen.wrapping_add(udp)));
            assert!(t.is_expired(PROTO_UDP, &value, last_seen.wrapping_add(udp + 1)));
            // Aged by rewriting last_seen backwards, as tests do.
            let aged = ConntrackValue {
                last_seen: last_seen.wrapping_sub(udp + 1),
                ..value
            };
            assert!(t.is_expired(PROTO_UDP, &aged, last_seen));
            // Written by another CPU a second ahead: not expired.
            assert!(!t.is_expired(PROTO_UDP, &value, last_seen.wrapping_sub(1)));
        }
    }

    #[test]
    fn idleness_is_measured_on_the_wrapping_clock_and_the_close_timeout_defaults() {
        let value = ConntrackValue {
            last_seen: u32::MAX - 1,
            ..with_state(0)
        };
        assert!(!value.idle_longer_than(3, 1));
        assert!(value.idle_longer_than(2, 1));
        assert!(!value.idle_longer_than(0, u32::MAX - 2), "ahead of now");
        assert_eq!(ConntrackTimeouts::default().close(), 10);
        let short = ConntrackTimeouts {
            tcp_close: 2,
            ..ConntrackTimeouts::default()
        };
        assert_eq!(short.close(), 2);
    }

    #[test]
    fn an_snat_port_is_reused_only_once_its_flow_let_go_of_it() {
        let t = ConntrackTimeouts::DEFAULT;
        let port = 20001u16.to_be();
        let holder = ConntrackValue::new(map_addr_v4(CLIENT), 40000u16.to_be(), 7, 3, 100);
        let live_master = master_value(CT_FLAG_SNAT, port);
        let later = 100 + t.udp + 1;
        // The holder itself is fresh: never.
        assert!(!snat_port_reusable(&t, PROTO_UDP, &holder, None, port, 100));
        // Expired, and no master: yes.
        assert!(snat_port_reusable(
            &t, PROTO_UDP, &holder, None, port, later
        ));
        // Expired, but its master (kept alive by forward packets) still holds it.
        let mut master = live_master;
        master.last_seen = later;
        assert!(!snat_port_reusable(
            &t,
            PROTO_UDP,
            &holder,
            Some(&master),
            port,
            later
        ));
        // The master moved on to another port or backend, died or expired.
        let other_port = live_master.with_snat_port(20002u16.to_be());
        assert!(snat_port_reusable(
            &t,
            PROTO_UDP,
            &holder,
            Some(&other_port),
            port,
            later
        ));
        let other_backend = ConntrackValue {
            backend_id: 8,
            last_seen: later,
            ..live_master
        };
        assert!(snat_port_reusable(
            &t,
            PROTO_UDP,
            &holder,
            Some(&other_backend),
            port,
            later
        ));
        let dead = ConntrackValue {
            last_seen: later,
            ..live_master.with_flags(CT_FLAG_SNAT | CT_FLAG_DEAD)
        };
        assert!(snat_port_reusable(
            &t,
            PROTO_UDP,
            &holder,
            Some(&dead),
            port,
            later
        ));
        assert!(snat_port_reusable(
            &t,
            PROTO_UDP,
            &holder,
            Some(&live_master),
            port,
            later
        ));
    }
}
