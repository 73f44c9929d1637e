//! Service translation, shared by every hook: frontend lookup, backend
//! choice, conntrack, DNAT, SNAT for external traffic to a backend on
//! another node, hairpin, and the reverse of each.
//!
//! Each rewrite happens where the kernel's routing agrees with it: DNAT and
//! the reverse of SNAT (which change destinations) on ingress, before the
//! routing decision; SNAT and the reverse of DNAT (which change sources,
//! sometimes to this node's own address, which routing would take for a
//! martian on ingress) on egress, after it.
//!
//! Hairpin (Cilium's "loopback") is the one exception. When a pod's flow
//! gets the pod itself as its backend, DNAT alone would hand the pod a
//! packet from its own address, which it drops. So [`forward`] also SNATs
//! such a flow, on every packet, to the link-local [`HAIRPIN_IPV4`],
//! keeping the client port; the pod answers that address through its
//! default gateway, so the reply enters `from_pod` on the same device, and
//! [`reverse_hairpin`] gives it the frontend as source and the pod's client
//! port as destination. Both source changes happen on ingress, because the
//! packet's next stop is the very pod it came from: the hook sends both
//! directions straight back out the device they came in on (`hairpin`
//! module), so they never meet the node's routing, and none of the
//! addresses involved is the node's anyway. What it costs every other
//! flow: one address comparison per packet in each direction (the backend
//! against the source; the destination against the hairpin address).

#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map calls take keys and values by reference: the BPF target then \
              copies no key or value into another stack slot"
)]

use aya_ebpf::{helpers::bpf_get_prandom_u32, maps::lpm_trie::Key};
use service_common::{
    AffinityKey, AffinityValue, BACKEND_FLAG_NODE_LOCAL, BACKEND_STATE_ACTIVE,
    BACKEND_STATE_TERMINATING, BackendId, CT_DIR_FORWARD, CT_DIR_HAIRPIN_REPLY, CT_DIR_REPLY,
    CT_DIR_SNAT, CT_DIR_SNAT_REPLY, CT_FLAG_HAIRPIN, DatapathConfig, DatapathCounter, FAMILY_IPV6,
    FRONTEND_FLAG_AFFINITY, FRONTEND_FLAG_EXTERNAL_LOCAL, FRONTEND_FLAG_LOCAL_ONLY,
    FRONTEND_FLAG_SOURCE_RANGES, FRONTEND_FLAG_TERMINATING_FALLBACK, FRONTEND_FLAGS_EXTERNAL,
    FrontendKey, FrontendValue, MapAddr, RevNatId, SCOPE_ALL, SCOPE_INTERNAL, SOURCE_RANGE_ID_BITS,
    SourceRangePrefix, map_addr_v4, map_addr_v4_octets, map_addrs_equal,
};

use crate::{
    clock::now_seconds,
    conntrack::{
        SnatPort, Tracked, Used, allocate_snat_port, conntrack_key, lookup_master, record_snat,
        syn_ack_answers_master, take_over_snat_port, track, use_entry,
    },
    maps::{
        AFFINITY, BACKENDS, BPF_ANY, FRONTENDS, SOURCE_RANGES, account_frontend, config, count,
    },
    nat::{Rewriter, Side},
    packet::{Flow, Fragment, IpFamily, Packet},
    verdict::Outcome,
};

/// Where a packet entered the datapath.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From a pod (TC ingress on its host-side device): every frontend kind.
    Pod,
    /// From the network (XDP or TC on an external device): only NodePort,
    /// LoadBalancer and externalIP frontends; remote backends are SNATed
    /// (except for `externalTrafficPolicy: Local` frontends, which never
    /// use them).
    Network,
}

impl Origin {
    /// The `CT_FLAG_*` bit every conntrack entry of a flow of this origin
    /// carries.
    #[inline(always)]
    pub const fn conntrack_flag(self) -> u16 {
        match self {
            Origin::Pod => 0,
            Origin::Network => service_common::CT_FLAG_FROM_NETWORK,
        }
    }
}

/// The backend a flow is (or will be) translated to, with the address of
/// its family (`A`: `[u8; 4]`, the default, or [`MapAddr`]). The backend
/// choice ([`select_backend`]) writes an IPv4 one (an IPv6 backend's
/// address is then read with [`FlowAddr::target_addr`]). Its fields are
/// laid out without implicit padding for both families: a copy of it then
/// never carries undefined bytes, which the verifier refuses to read from
/// a register.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Target<A = [u8; 4]> {
    /// The backend's id.
    pub backend_id: BackendId,
    /// The frontend's rev-NAT id.
    pub rev_nat_id: RevNatId,
    /// Backend port, network byte order.
    pub port: u16,
    /// SNAT source port on this node's SNAT address, network order; 0: none.
    pub snat_port: u16,
    /// Backend address, network byte order.
    pub addr: A,
    /// The backend runs on this node.
    pub node_local: bool,
    /// Explicit padding, always zero: a byte and a half-word (three
    /// bytes in one field would be zeroed by a call to `memset`, a call
    /// frame of its own on 6.1's 512-byte budget).
    pub _pad0: u8,
    /// Explicit padding, always zero.
    pub _pad1: u16,
}

impl<A: IpFamily> Target<A> {
    /// No backend yet, for a family: what a new flow's choice is written
    /// over.
    #[inline(always)]
    pub fn none() -> Self {
        Target {
            backend_id: 0,
            rev_nat_id: 0,
            port: 0,
            snat_port: 0,
            addr: A::UNSPECIFIED,
            node_local: false,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

impl Target {
    /// No backend yet: what a new flow's choice is written over.
    pub const NONE: Target = Target {
        backend_id: 0,
        rev_nat_id: 0,
        port: 0,
        snat_port: 0,
        addr: [0; 4],
        node_local: false,
        _pad0: 0,
        _pad1: 0,
    };
}

/// Reverse DNAT (egress hooks): a reply of a tracked flow gets its
/// frontend back as source. `Untouched` when the packet is no such reply;
/// dropped when the flow's frontend was deleted.
#[inline(always)]
pub fn reverse_dnat<A: IpFamily, C: Rewriter + Packet>(ctx: &C, flow: &Flow<A>) -> Outcome {
    let key = conntrack_key(flow, CT_DIR_REPLY);
    // A SYN-ACK answers its flow's SYN only while that flow is open: on a
    // leftover reply entry it is another connection's.
    if flow.is_tcp_syn_ack() && !syn_ack_answers_master(&key, now_seconds()) {
        count(DatapathCounter::StaleReplyPassed);
        return Outcome::Untouched;
    }
    // The reply entry holds the frontend to restore.
    let (addr, port) = match use_entry(&key, flow, true, true) {
        Used::Missing => return Outcome::Untouched,
        Used::Dead => return Outcome::Dropped,
        Used::Translate(addr, port) => (addr, port),
    };
    if ctx.rewrite(flow, Side::Source, &addr, port).is_err() {
        count(DatapathCounter::DropRewrite);
        return Outcome::Dropped;
    }
    count(DatapathCounter::ReplyTranslated);
    Outcome::Translated
}

/// Reverse SNAT (ingress from the network): a reply to an SNATed flow,
/// addressed to this node's SNAT address and port, goes to the client
/// again. Its source (the backend) is restored by [`reverse_dnat`] on the
/// way out, which also brings the flow's master up to date. Only a packet
/// to the SNAT address and a port of the SNAT range can be such a reply:
/// every other packet (NodePort traffic above all, whose ports lie outside
/// that range) is spared the lookup.
#[inline(always)]
pub fn reverse_snat<A: IpFamily, C: Rewriter + Packet>(ctx: &C, flow: &Flow<A>) -> Outcome {
    let Some(config) = config() else {
        return Outcome::Untouched;
    };
    if !flow.daddr.same(A::snat(config)) || !config.snat_ports.contains(u16::from_be(flow.dport)) {
        return Outcome::Untouched;
    }
    let key = conntrack_key(flow, CT_DIR_SNAT_REPLY);
    // The SNAT reply entry holds the client.
    let (client, port) = match use_entry(&key, flow, true, false) {
        Used::Missing => return Outcome::Untouched,
        Used::Dead => return Outcome::Dropped,
        Used::Translate(addr, port) => (addr, port),
    };
    if ctx.rewrite(flow, Side::Destination, &client, port).is_err() {
        count(DatapathCounter::DropRewrite);
        return Outcome::Dropped;
    }
    Outcome::Translated
}

/// SNAT (egress to the network): a flow to a remote backend leaves with
/// this node's SNAT address and the flow's SNAT port as source.
#[inline(always)]
pub fn snat_out<A: IpFamily, C: Rewriter + Packet>(ctx: &C, flow: &Flow<A>) -> Outcome {
    let key = conntrack_key(flow, CT_DIR_SNAT);
    // The SNAT entry holds the new source: this node's address and the port.
    let (addr, port) = match use_entry(&key, flow, false, false) {
        Used::Missing => return Outcome::Untouched,
        Used::Dead => return Outcome::Dropped,
        Used::Translate(addr, port) => (addr, port),
    };
    if ctx.rewrite(flow, Side::Source, &addr, port).is_err() {
        count(DatapathCounter::DropRewrite);
        return Outcome::Dropped;
    }
    Outcome::Translated
}

/// DNAT (ingress hooks): a packet towards a frontend goes to a backend. A
/// tracked flow keeps its backend while its master entry lives (see
/// `conntrack::lookup_master`); a new one, or one whose backend left, gets
/// a random backend and conntrack entries, and from the network, when the
/// backend is on another node, an SNAT port (applied by [`snat_out`] on
/// the way out). A packet of a deleted frontend's flow is dropped unless a
/// frontend is there again. From a pod whose backend is the pod itself
/// (hairpin), the source becomes the family's hairpin address
/// ([`IpFamily::HAIRPIN`]) as well, and the outcome is
/// [`Outcome::Hairpin`].
#[inline(always)]
pub fn forward<A: FlowAddr, C: Rewriter + Packet>(
    ctx: &C,
    flow: &Flow<A>,
    origin: Origin,
) -> Outcome {
    let ct_key = conntrack_key(flow, CT_DIR_FORWARD);
    let now = now_seconds();
    let Some(config) = config() else {
        return Outcome::Untouched;
    };
    let tracked = lookup_master(&ct_key, flow, now, &config.timeouts, origin);
    let mut chosen = Target::none();
    let (target, new_flow) = match tracked {
        Tracked::Flow(target) => (target, false),
        // A packet carrying the tuple of a live flow of the other origin
        // (a pod's flow, seen from the network, or the other way round)
        // neither gets that flow's translation nor replaces it.
        Tracked::Foreign => {
            count(DatapathCounter::DropOriginMismatch);
            return Outcome::Dropped;
        }
        // A later fragment follows its flow, it never starts one.
        _ if flow.fragment == Fragment::Later => return Outcome::Untouched,
        _ => match choose(flow, origin, now, config, &mut chosen) {
            Lookup::NotAFrontend if matches!(tracked, Tracked::Dead) => {
                count(DatapathCounter::DeadFlowDropped);
                return Outcome::Dropped;
            }
            Lookup::NotAFrontend => return Outcome::Untouched,
            Lookup::NoBackend => return Outcome::NoBackend,
            Lookup::Drop(reason) => {
                count(reason);
                return Outcome::Dropped;
            }
            Lookup::Backend => {
                if matches!(tracked, Tracked::Rebalance) {
                    count(DatapathCounter::FlowRebalanced);
                }
                (chosen, true)
            }
        },
    };
    // Hairpin, decided afresh for every packet of the flow (new or tracked):
    // the only cost it adds to other flows is this comparison.
    let hairpin = origin == Origin::Pod && target.addr.same(&flow.saddr);
    let flags = if hairpin { CT_FLAG_HAIRPIN } else { 0 } | origin.conntrack_flag();
    if new_flow && !track(flow, &ct_key, &target, flags, now) {
        count(DatapathCounter::ConntrackInsertFailed);
    }
    if ctx
        .rewrite(flow, Side::Destination, &target.addr, target.port)
        .is_err()
        || (hairpin
            && ctx
                .rewrite(flow, Side::Source, &A::HAIRPIN, flow.sport)
                .is_err())
    {
        count(DatapathCounter::DropRewrite);
        return Outcome::Dropped;
    }
    account_frontend(target.rev_nat_id, ctx.length() as u32, new_flow);
    if hairpin {
        Outcome::Hairpin
    } else {
        Outcome::Translated
    }
}

/// The backend of a new flow `flow` from `origin` at `now`, into `target`
/// ([`Lookup::Backend`]): the frontend's choice ([`select_backend`]), with
/// its family's address, and from the network, for a backend on another
/// node, the SNAT port it leaves with (its SNAT entries recorded). A
/// frontend that cannot serve the flow, or a flow that gets no SNAT port
/// or entry, is [`Lookup::Drop`] with the reason.
#[inline(always)]
fn choose<A: FlowAddr>(
    flow: &Flow<A>,
    origin: Origin,
    now: u32,
    config: &DatapathConfig,
    target: &mut Target<A>,
) -> Lookup {
    let mut chosen = Target::NONE;
    match new_flow_target(flow, origin, now, &mut chosen) {
        Lookup::Backend => {}
        other => return other,
    }
    let Some(mut family_target) = A::family_target(&chosen) else {
        return Lookup::Drop(DatapathCounter::DropBackendMissing);
    };
    if origin == Origin::Network && !family_target.node_local && !A::snat(config).is_unset() {
        let port = match allocate_snat_port(flow, &family_target, config, now) {
            SnatPort::Taken(port) => port,
            SnatPort::Expired(port)
                if take_over_snat_port(flow, &family_target, config, port, now) =>
            {
                port
            }
            SnatPort::Expired(_) | SnatPort::Exhausted => {
                return Lookup::Drop(DatapathCounter::SnatPortsExhausted);
            }
        };
        if !record_snat(flow, &family_target, config, port, now) {
            return Lookup::Drop(DatapathCounter::ConntrackInsertFailed);
        }
        family_target.snat_port = port;
    }
    *target = family_target;
    Lookup::Backend
}

/// Reverse hairpin (`from_pod`, only for packets addressed to the family's
/// hairpin address, [`IpFamily::HAIRPIN`]): the reply of a hairpin flow, from the pod's target
/// port to the hairpin address and the client port, gets the frontend as
/// source and the client (the same pod) and its port as destination.
/// `Untouched` when no hairpin flow matches.
#[inline(always)]
pub fn reverse_hairpin<A: IpFamily, C: Rewriter + Packet>(ctx: &C, flow: &Flow<A>) -> Outcome {
    let key = conntrack_key(flow, CT_DIR_HAIRPIN_REPLY);
    // The client is the pod itself (the reply's source) at the port the
    // reply goes to; the entry holds the frontend.
    let (frontend, frontend_port) = match use_entry(&key, flow, true, true) {
        Used::Missing => return Outcome::Untouched,
        Used::Dead => return Outcome::Dropped,
        Used::Translate(addr, port) => (addr, port),
    };
    if ctx
        .rewrite(flow, Side::Destination, &flow.saddr, flow.dport)
        .is_err()
        || ctx
            .rewrite(flow, Side::Source, &frontend, frontend_port)
            .is_err()
    {
        count(DatapathCounter::DropRewrite);
        return Outcome::Dropped;
    }
    count(DatapathCounter::ReplyTranslated);
    Outcome::Hairpin
}

/// Outcome of a frontend lookup for a new flow (the backend chosen, if
/// any, is written to the caller's [`Target`], so the outcome is small
/// enough to come back in a register from a function of its own).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The destination is no frontend (for this origin): leave it alone.
    NotAFrontend,
    /// A frontend without backends.
    NoBackend,
    /// A frontend that cannot serve the flow: drop, counting why.
    Drop(DatapathCounter),
    /// A backend was chosen for the flow.
    Backend,
}

/// The addresses of one family as the backend choice takes them: `[u8;
/// 4]` for IPv4 (the packet hooks' and `sock_*4`'s), `[u8; 16]` for IPv6
/// (`sock_*6`'s), both network byte order. [`select_backend`] is generic
/// over it, so IPv4 flows keep their 4-byte addresses on the stack (the
/// verifier of kernel 6.1 allows no more than 512 bytes for a hook and its
/// calls together). The packet hooks use both ([`IpFamily`] holds what
/// their parsing and rewriting need).
pub trait FlowAddr: IpFamily {
    /// The header key of frontend `self:port` of `proto` (network byte
    /// order), in scope [`service_common::SCOPE_ALL`].
    fn frontend_key(self, port: u16, proto: u8) -> FrontendKey;
    /// The affinity key of client `self` of the frontend `rev_nat_id`.
    fn affinity_key(self, rev_nat_id: RevNatId) -> AffinityKey;
    /// The source-ranges lookup key of client `self` (its full address)
    /// for the frontend `rev_nat_id`.
    fn source_range_key(self, rev_nat_id: RevNatId) -> Key<SourceRangePrefix>;
    /// The full address of `target`, a backend of a frontend of this
    /// family: [`Target`] holds an IPv4 address only, so an IPv6 backend's
    /// address is read from its backends entry (`None` if that is no IPv6
    /// backend).
    fn target_addr(target: &Target) -> Option<MapAddr>;
    /// `target`, a backend of a frontend of this family as the backend
    /// choice wrote it, with its full address ([`FlowAddr::target_addr`]).
    fn family_target(target: &Target) -> Option<Target<Self>>;
}

impl FlowAddr for [u8; 4] {
    #[inline(always)]
    fn frontend_key(self, port: u16, proto: u8) -> FrontendKey {
        FrontendKey::v4(self, port, proto)
    }

    #[inline(always)]
    fn affinity_key(self, rev_nat_id: RevNatId) -> AffinityKey {
        AffinityKey::v4(self, rev_nat_id)
    }

    #[inline(always)]
    fn source_range_key(self, rev_nat_id: RevNatId) -> Key<SourceRangePrefix> {
        Key::new(
            SOURCE_RANGE_ID_BITS + 32,
            SourceRangePrefix::v4(rev_nat_id, self),
        )
    }

    #[inline(always)]
    fn target_addr(target: &Target) -> Option<MapAddr> {
        Some(map_addr_v4(target.addr))
    }

    #[inline(always)]
    fn family_target(target: &Target) -> Option<Target> {
        Some(*target)
    }
}

impl FlowAddr for MapAddr {
    #[inline(always)]
    fn frontend_key(self, port: u16, proto: u8) -> FrontendKey {
        FrontendKey::header(self, FAMILY_IPV6, port, proto, SCOPE_ALL)
    }

    #[inline(always)]
    fn affinity_key(self, rev_nat_id: RevNatId) -> AffinityKey {
        AffinityKey::new(self, FAMILY_IPV6, rev_nat_id)
    }

    #[inline(always)]
    fn source_range_key(self, rev_nat_id: RevNatId) -> Key<SourceRangePrefix> {
        Key::new(
            SOURCE_RANGE_ID_BITS + 128,
            SourceRangePrefix::new(rev_nat_id, self),
        )
    }

    #[inline(always)]
    fn target_addr(target: &Target) -> Option<MapAddr> {
        BACKENDS
            .get(target.backend_id)
            .filter(|backend| backend.family == FAMILY_IPV6)
            .map(|backend| backend.addr)
    }

    #[inline(always)]
    fn family_target(target: &Target) -> Option<Target<Self>> {
        Some(Target {
            addr: Self::target_addr(target)?,
            port: target.port,
            backend_id: target.backend_id,
            rev_nat_id: target.rev_nat_id,
            node_local: target.node_local,
            snat_port: target.snat_port,
            _pad0: 0,
            _pad1: 0,
        })
    }
}

/// A new flow asking for a backend: what [`select_backend`] decides on.
/// `A`: the family's addresses ([`FlowAddr`]).
pub struct NewFlow<A: FlowAddr> {
    /// Frontend address, network byte order.
    pub daddr: A,
    /// The client's address, network byte order: the packet's source, or
    /// for socket-LB the node's own address.
    pub client: A,
    /// Frontend port, network byte order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Where the flow entered the datapath.
    pub origin: Origin,
    /// Monotonic seconds.
    pub now: u32,
}

/// Looks the destination up among the frontends and picks a backend for
/// the packet's source as client, into `target`.
#[inline(always)]
fn new_flow_target<A: FlowAddr>(
    flow: &Flow<A>,
    origin: Origin,
    now: u32,
    target: &mut Target,
) -> Lookup {
    let request = NewFlow {
        daddr: flow.daddr,
        client: flow.saddr,
        dport: flow.dport,
        proto: flow.proto,
        origin,
        now,
    };
    select_backend(&request, target)
}

/// Looks the frontend of a new flow up (scope
/// [`service_common::SCOPE_ALL`]) and picks its backend into `target`:
/// the choice every new flow gets, from the packet hooks and from the
/// socket hooks (`sock`) alike. In order:
/// - a frontend with `loadBalancerSourceRanges` admits only clients inside
///   them ([`source_allowed`]);
/// - from pods and the node, an external frontend of an
///   `externalTrafficPolicy: Local` Service uses its in-cluster entry
///   ([`SCOPE_INTERNAL`]: the cluster-wide backends) where it has one;
/// - a frontend without backends is [`Lookup::NoBackend`] (refused), but
///   one that lists only local backends ([`FRONTEND_FLAG_LOCAL_ONLY`];
///   from the network also `externalTrafficPolicy: Local`) drops: no
///   local endpoint;
/// - with session affinity, the client's affinity entry names the backend
///   while it is fresh, that backend still holds the slot it was chosen in
///   and takes new flows ([`affinity_candidate`]); otherwise
///   a random slot's backend is taken;
/// - from the network, an `externalTrafficPolicy: Local` frontend drops
///   rather than use a backend on another node;
/// - with affinity, the random choice is recorded for the client.
///
/// The choice ([`pick_backend`]) has its own stack frame, apart from the
/// hook's; the recording is called from here, beside it rather than from
/// inside it, so the two frames are never stacked (the verifier of kernel
/// 6.1 counts a hook and the deepest chain of its calls against 512 bytes).
#[inline(always)]
pub fn select_backend<A: FlowAddr>(request: &NewFlow<A>, target: &mut Target) -> Lookup {
    let mut record_slot = 0u16;
    let lookup = pick_backend(request, target, &mut record_slot);
    if lookup == Lookup::Backend && record_slot != 0 {
        record_affinity(request.client, target, record_slot, request.now);
    }
    lookup
}

/// [`select_backend`] but the recording of a new affinity: the slot to
/// record goes to `record_slot` (left alone when there is none). Not
/// inlined: its own stack frame, apart from the hook's.
#[inline(never)]
fn pick_backend<A: FlowAddr>(
    request: &NewFlow<A>,
    target: &mut Target,
    record_slot: &mut u16,
) -> Lookup {
    let mut header_key = request.daddr.frontend_key(request.dport, request.proto);
    // SAFETY: the header is copied out at once.
    let Some(mut header) = (unsafe { FRONTENDS.get(header_key) }).copied() else {
        return Lookup::NotAFrontend;
    };
    if request.origin == Origin::Network && header.flags & FRONTEND_FLAGS_EXTERNAL == 0 {
        return Lookup::NotAFrontend;
    }
    if header.flags & FRONTEND_FLAG_SOURCE_RANGES != 0
        && !source_allowed(header.rev_nat_id, request.client)
    {
        return Lookup::Drop(DatapathCounter::DropSourceRange);
    }
    // In-cluster traffic to an external frontend of an
    // `externalTrafficPolicy: Local` Service goes to the Service's
    // cluster-wide backends, listed in the frontend's in-cluster scope.
    if request.origin == Origin::Pod
        && header.flags & FRONTEND_FLAG_EXTERNAL_LOCAL != 0
        && take_in_cluster_header(request, &mut header)
    {
        header_key.scope = SCOPE_INTERNAL;
    }
    let external_local =
        request.origin == Origin::Network && header.flags & FRONTEND_FLAG_EXTERNAL_LOCAL != 0;
    if header.count == 0 {
        // A traffic policy `Local` without a local endpoint: dropped, as
        // kube-proxy drops it (the listed backends are the local ones).
        if external_local || header.flags & FRONTEND_FLAG_LOCAL_ONLY != 0 {
            return Lookup::Drop(DatapathCounter::DropNoLocalEndpoint);
        }
        return Lookup::NoBackend;
    }
    let affinity = header.flags & FRONTEND_FLAG_AFFINITY != 0;
    if affinity {
        // The client's backend, if it may be followed and still holds the
        // slot it was chosen in (so it is still one of this frontend's).
        let slot = affinity_candidate(request, &header, external_local, target);
        if slot > 0
            && slot <= i32::from(header.count)
            && slot_holds(&header_key, slot as u16, target.backend_id)
        {
            refresh_affinity(request.client, header.rev_nat_id, request.now);
            return Lookup::Backend;
        }
    }
    // SAFETY: the helper has no preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = (random % u32::from(header.count)) as u16 + 1;
    let chosen = slot_target(&header_key, &header, slot, target);
    if chosen != Lookup::Backend {
        return chosen;
    }
    // Checked before the choice is recorded: a client is never kept on a
    // backend it cannot use.
    if external_local && !target.node_local {
        return Lookup::Drop(DatapathCounter::DropExternalLocal);
    }
    if affinity {
        *record_slot = slot;
    }
    Lookup::Backend
}

/// Replaces `header`, the frontend of `request`, by the header of its
/// in-cluster entry ([`SCOPE_INTERNAL`]); whether it has one. Not inlined:
/// its own stack frame, off the deepest call chain (the verifier of kernel
/// 6.1 allows 512 bytes for a hook and its calls together, and `from_pod`
/// is near that limit).
#[inline(never)]
fn take_in_cluster_header<A: FlowAddr>(request: &NewFlow<A>, header: &mut FrontendValue) -> bool {
    let key = request
        .daddr
        .frontend_key(request.dport, request.proto)
        .with_scope(SCOPE_INTERNAL);
    // SAFETY: the header is copied out at once.
    match unsafe { FRONTENDS.get(key) } {
        Some(internal) => {
            *header = *internal;
            true
        }
        None => false,
    }
}

/// Backend slot `slot` of the frontend `header_key`/`header`, resolved
/// into `target`.
#[inline(always)]
fn slot_target(
    header_key: &FrontendKey,
    header: &FrontendValue,
    slot: u16,
    target: &mut Target,
) -> Lookup {
    let slot_key = header_key.with_slot(slot);
    // SAFETY: copied out at once.
    let Some(slot) = (unsafe { FRONTENDS.get(slot_key) }).copied() else {
        return Lookup::Drop(DatapathCounter::DropBackendMissing);
    };
    backend_target(header, &slot, target)
}

/// Whether `client` (network byte order) lies inside one of the
/// `loadBalancerSourceRanges` of the frontend with rev-NAT id
/// `rev_nat_id`: one longest-prefix lookup of the client's full address
/// under that id. Not inlined: the key has its own stack frame.
#[inline(never)]
fn source_allowed<A: FlowAddr>(rev_nat_id: RevNatId, client: A) -> bool {
    let key = client.source_range_key(rev_nat_id);
    SOURCE_RANGES.get(&key).is_some()
}

/// The backend the client's affinity entry for the frontend of `request`
/// (header `header`) names, if it may be followed, written to `target`:
/// the entry is fresh (idle for at most the frontend's timeout), its
/// backend is still there with the address it had when chosen, takes new
/// flows (active, or terminating while the frontend is in the terminating
/// fallback) and, for traffic from the network to an
/// `externalTrafficPolicy: Local` frontend (`external_local`), runs on
/// this node. Returns the entry's slot (which must still hold the
/// backend), or -1: no backend to follow (the flow is balanced afresh,
/// and the entry rewritten). Not inlined: its own stack frame.
#[inline(never)]
fn affinity_candidate<A: FlowAddr>(
    request: &NewFlow<A>,
    header: &FrontendValue,
    external_local: bool,
    target: &mut Target,
) -> i32 {
    let key = request.client.affinity_key(header.rev_nat_id);
    // SAFETY: a live map value, read in place.
    let Some(value) = (unsafe { AFFINITY.get(&key) }) else {
        return -1;
    };
    if !value.is_fresh(request.now, header.affinity_timeout_secs) {
        return -1;
    }
    let Some(backend) = BACKENDS.get(value.backend_id).filter(|b| b.exists()) else {
        return -1;
    };
    let takes_new_flows = backend.state == BACKEND_STATE_ACTIVE
        || (backend.state == BACKEND_STATE_TERMINATING
            && header.flags & FRONTEND_FLAG_TERMINATING_FALLBACK != 0);
    let node_local = backend.flags & BACKEND_FLAG_NODE_LOCAL != 0;
    if !takes_new_flows
        || !map_addrs_equal(&backend.addr, &value.addr)
        || backend.port != value.port
        || (external_local && !node_local)
    {
        return -1;
    }
    *target = Target {
        addr: map_addr_v4_octets(&backend.addr),
        port: backend.port,
        backend_id: value.backend_id,
        rev_nat_id: header.rev_nat_id,
        node_local,
        snat_port: 0,
        _pad0: 0,
        _pad1: 0,
    };
    i32::from(value.slot)
}

/// Refreshes `client`'s affinity entry for the frontend with rev-NAT id
/// `rev_nat_id`, followed at `now`. Not inlined: its own stack frame.
#[inline(never)]
fn refresh_affinity<A: FlowAddr>(client: A, rev_nat_id: RevNatId, now: u32) {
    let key = client.affinity_key(rev_nat_id);
    if let Some(entry) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: a live map value; a concurrent writer only ever writes a
        // recent second.
        unsafe {
            if (*entry).last_used != now {
                (*entry).last_used = now;
            }
        }
    }
    count(DatapathCounter::AffinityHit);
}

/// Whether slot `slot` of the frontend `header_key` holds `backend_id`.
#[inline(always)]
fn slot_holds(header_key: &FrontendKey, slot: u16, backend_id: BackendId) -> bool {
    // SAFETY: read at once.
    unsafe { FRONTENDS.get(header_key.with_slot(slot)) }
        .is_some_and(|value| value.backend_id == backend_id)
}

/// Records that `client` was given `target`, found in slot `slot`, at
/// `now` (the entry of `client` and the target's frontend, written over
/// any older one). Not inlined: its own stack frame.
#[inline(never)]
fn record_affinity<A: FlowAddr>(client: A, target: &Target, slot: u16, now: u32) {
    let Some(addr) = A::target_addr(target) else {
        return;
    };
    let key = client.affinity_key(target.rev_nat_id);
    let value = AffinityValue {
        backend_id: target.backend_id,
        last_used: now,
        addr,
        port: target.port,
        slot,
        _pad: [0; 4],
    };
    // A failed write (never expected of an LRU map) only costs affinity.
    let _ = AFFINITY.insert(&key, &value, BPF_ANY);
}

/// Resolves a backend slot to the address and port to DNAT to, into
/// `target`.
#[inline(always)]
fn backend_target(header: &FrontendValue, slot: &FrontendValue, target: &mut Target) -> Lookup {
    let Some(backend) = BACKENDS.get(slot.backend_id).filter(|b| b.exists()) else {
        return Lookup::Drop(DatapathCounter::DropBackendMissing);
    };
    *target = Target {
        addr: map_addr_v4_octets(&backend.addr),
        port: backend.port,
        backend_id: slot.backend_id,
        rev_nat_id: header.rev_nat_id,
        node_local: backend.flags & BACKEND_FLAG_NODE_LOCAL != 0,
        snat_port: 0,
        _pad0: 0,
        _pad1: 0,
    };
    Lookup::Backend
}
