//! Socket-LB: Service translation at the socket layer, for processes that
//! send from the node itself (hostNetwork pods, the kubelet, node daemons),
//! whose packets never cross a pod device and so never meet the TC hooks.
//! What Cilium calls socket-LB; these are `cgroup_sock_addr` programs the
//! agent attaches to a cgroup v2 (`--cgroup-path`), so they run for every
//! socket of every process in that cgroup and below, in whatever network
//! namespace.
//!
//! - `sock_connect4` (`connect(2)` of TCP and UDP sockets) and
//!   `sock_sendmsg4` (`sendto(2)`/`sendmsg(2)` with an address, on
//!   unconnected UDP sockets): when the destination is a frontend (the
//!   frontends map, scope `SCOPE_ALL`, any frontend kind, like traffic from
//!   pods), pick a backend with [`lb::select_backend`], the very choice the
//!   packet hooks make, and rewrite the socket address to it. The kernel
//!   then connects (or sends) straight to the backend: there is no packet to
//!   translate and no conntrack entry, the socket itself stays on its
//!   backend.
//! - `sock_recvmsg4` (`recvfrom(2)`/`recvmsg(2)` on UDP) and
//!   `sock_getpeer4` (`getpeername(2)`): give the application back the
//!   frontend it asked for instead of the backend it was sent to, so UDP
//!   answers come from `ClusterIP:port` and a connected socket's peer is
//!   the ClusterIP.
//!
//! The `SOCK_NAT` LRU map holds what the reverse hooks need, per socket
//! (keyed by its cookie, so two sockets never see each other's entries):
//! - a reverse entry `{cookie, backend, backend port}` -> frontend, written
//!   for every translated `connect` and `sendmsg`;
//! - for UDP, a forward entry `{cookie, frontend, frontend port}` ->
//!   backend, so every datagram a socket sends to a frontend goes to the
//!   same backend (what conntrack gives a pod's UDP flow), as long as that
//!   backend is still in the backends map with the same address; else a
//!   new backend is picked.
//!
//! Limits, as in Cilium: a socket that sends to two frontends sharing one
//! backend address and port sees the answers as coming from the last of the
//! two it sent to; a socket that also talks to that backend directly sees
//! its answers as coming from the frontend; an entry evicted from the LRU
//! map (a socket idle while many others were translated) leaves the backend
//! address visible to `recvfrom`/`getpeername`, never breaks the traffic.
//!
//! Session affinity and `loadBalancerSourceRanges` take the node as one
//! client, by its address (`DatapathConfig::snat_v4`): a socket outside
//! the ranges fails with `ECONNREFUSED` at once.
//!
//! A frontend without backends refuses at once: `connect` and `sendmsg`
//! fail with `ECONNREFUSED` (the program rejects, after `bpf_set_retval`,
//! kernel 5.18+; the kernel would report `EPERM` otherwise), as a closed
//! port would, counted as `rejected_no_backend`.
//!
//! With `--socket-lb-host-namespace-only` (Cilium's
//! `socketLB.hostNamespaceOnly`), the agent sets
//! [`SOCK_LB_HOST_NETNS_COOKIE`] to its own network namespace's cookie when
//! it loads the programs, and they leave sockets of every other namespace
//! (pods) alone: those reach Services through the packet hooks, so a
//! service mesh's sidecar or node proxy still sees the ClusterIP the
//! application asked for.
//!
//! These programs cannot be run through `BPF_PROG_TEST_RUN` (the kernel
//! has no test run for `cgroup_sock_addr`): they are tested end to end.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use service_common::{
    DatapathCounter, PROTO_TCP, PROTO_UDP, SOCK_DIR_FORWARD, SOCK_DIR_REVERSE, SockNatKey,
    SockNatValue, map_addr_v4, map_addr_v4_octets, map_addrs_equal,
};

use crate::{
    clock::now_seconds,
    lb::{self, Lookup, NewFlow, Origin, Target},
    maps::{BACKENDS, BPF_ANY, FRONTEND_STATS, SOCK_NAT, config, count},
};

/// Verdict letting the system call go on (with the address as rewritten).
const SOCK_ALLOW: i32 = 1;
/// Verdict failing the system call (with the error set by `bpf_set_retval`).
const SOCK_REJECT: i32 = 0;
/// `ECONNREFUSED`: a frontend without backends, like a closed port.
const ECONNREFUSED: i32 = 111;
/// `EHOSTUNREACH`: a frontend whose backend entry is missing (an
/// inconsistent map, which the agent's write order rules out).
const EHOSTUNREACH: i32 = 113;
/// `IPPROTO_TCP` as the socket reports it.
const IPPROTO_TCP: u32 = 6;
/// `IPPROTO_UDP` as the socket reports it.
const IPPROTO_UDP: u32 = 17;

/// The network namespace cookie socket-LB is limited to; 0 (the default):
/// every namespace. Set by the agent at load time (a global of the object,
/// so it is a constant for the verifier and costs no map lookup).
#[unsafe(no_mangle)]
static SOCK_LB_HOST_NETNS_COOKIE: u64 = 0;

/// Whether socket-LB applies to this socket's network namespace.
#[inline(always)]
fn in_scope(ctx: &SockAddrContext) -> bool {
    // SAFETY: a plain read of a global the loader may have rewritten (the
    // volatile read keeps the compiler from folding the initial 0).
    let host = unsafe { core::ptr::read_volatile(&SOCK_LB_HOST_NETNS_COOKIE) };
    // SAFETY: the helper takes the program's context (cgroup sock_addr
    // programs have it from kernel 5.7).
    host == 0 || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == host
}

/// `connect(2)` of a TCP or UDP socket: a frontend becomes a backend.
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx)
}

/// `sendto(2)`/`sendmsg(2)` with an address on an unconnected UDP socket:
/// a frontend becomes a backend, the same one for every datagram.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx)
}

/// `recvfrom(2)`/`recvmsg(2)` on a UDP socket: an answer from a backend
/// comes from the frontend the socket sent to. Must allow (the kernel
/// accepts no other verdict here).
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    SOCK_ALLOW
}

/// `getpeername(2)`: a socket connected to a backend through a frontend
/// has the frontend as its peer. Must allow.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeer4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    SOCK_ALLOW
}

/// The destination (or peer) of the socket address as it stands: address
/// and port in network byte order, and the protocol (`PROTO_TCP` or
/// `PROTO_UDP`; `None` for anything else, left alone).
#[inline(always)]
fn destination(ctx: &SockAddrContext) -> Option<([u8; 4], u16, u8)> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context is the kernel's `bpf_sock_addr`; each field is
    // read once, with the size the verifier requires (4 bytes), volatile so
    // no two reads are merged into one wider access.
    let (ip, port, protocol) = unsafe {
        (
            core::ptr::addr_of!((*sa).user_ip4).read_volatile(),
            core::ptr::addr_of!((*sa).user_port).read_volatile(),
            core::ptr::addr_of!((*sa).protocol).read_volatile(),
        )
    };
    let proto = match protocol {
        IPPROTO_TCP => PROTO_TCP,
        IPPROTO_UDP => PROTO_UDP,
        _ => return None,
    };
    // `user_port` holds the port as in `sin_port` (network order) in its
    // low 16 bits: read as a native u16 like the packet hooks read ports.
    Some((ip.to_ne_bytes(), port as u16, proto))
}

/// Rewrites the socket address to `addr:port` (network byte order).
#[inline(always)]
fn set_destination(ctx: &SockAddrContext, addr: [u8; 4], port: u16) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: both fields are writable in every hook here, with 4-byte stores.
    unsafe {
        core::ptr::addr_of_mut!((*sa).user_ip4).write_volatile(u32::from_ne_bytes(addr));
        core::ptr::addr_of_mut!((*sa).user_port).write_volatile(u32::from(port));
    }
}

/// The socket's cookie: unique per socket for its lifetime.
#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper takes the program's context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Fails the system call with `errno`.
#[inline(always)]
fn reject(errno: i32) -> i32 {
    // SAFETY: the helper has no preconditions; allowed in connect4 and
    // sendmsg4 (kernel 5.18+).
    unsafe { bpf_set_retval(-errno) };
    SOCK_REJECT
}

/// `connect4` and `sendmsg4`: translates a frontend to a backend.
#[inline(always)]
fn forward(ctx: &SockAddrContext) -> i32 {
    if !in_scope(ctx) {
        return SOCK_ALLOW;
    }
    let Some((daddr, dport, proto)) = destination(ctx) else {
        return SOCK_ALLOW;
    };
    let cookie = cookie(ctx);
    let forward_key = SockNatKey::v4(cookie, daddr, dport, proto, SOCK_DIR_FORWARD);
    // A UDP socket already sending to this frontend keeps its backend.
    if proto == PROTO_UDP
        && let Some((addr, port)) = sticky_backend(&forward_key)
    {
        set_destination(ctx, addr, port);
        return SOCK_ALLOW;
    }
    // The node is one client, by its own address, for session affinity
    // and `loadBalancerSourceRanges` (the address its sockets' packets
    // would leave with towards other nodes).
    let request = NewFlow {
        daddr,
        client: config().map_or([0; 4], |config| config.snat_v4),
        dport,
        proto,
        origin: Origin::Pod,
        now: now_seconds(),
    };
    let mut target = Target::NONE;
    match lb::select_backend(&request, &mut target) {
        Lookup::NotAFrontend => return SOCK_ALLOW,
        Lookup::NoBackend => {
            count(DatapathCounter::RejectedNoBackend);
            return reject(ECONNREFUSED);
        }
        Lookup::Drop(reason) => {
            count(reason);
            return reject(if reason == DatapathCounter::DropSourceRange {
                ECONNREFUSED
            } else {
                EHOSTUNREACH
            });
        }
        Lookup::Backend => {}
    }
    if record(&forward_key, daddr, dport, &target).is_err() {
        count(DatapathCounter::ConntrackInsertFailed);
    }
    set_destination(ctx, target.addr, target.port);
    account_flow(target.rev_nat_id);
    SOCK_ALLOW
}

/// The backend a UDP socket's forward entry holds, if that backend is still
/// in the backends map with the same address and port (active or
/// terminating: an established flow keeps a terminating backend).
#[inline(always)]
fn sticky_backend(forward_key: &SockNatKey) -> Option<([u8; 4], u16)> {
    // SAFETY: copied out at once.
    let entry = unsafe { SOCK_NAT.get(forward_key) }.copied()?;
    let backend = BACKENDS.get(entry.backend_id).filter(|b| b.exists())?;
    if !map_addrs_equal(&backend.addr, &entry.addr) || backend.port != entry.port {
        return None;
    }
    Some((map_addr_v4_octets(&entry.addr), entry.port))
}

/// Records a translated socket: the reverse entry (backend to frontend),
/// then for UDP the forward entry (frontend to backend) under `forward_key`.
#[inline(always)]
fn record(
    forward_key: &SockNatKey,
    frontend: [u8; 4],
    frontend_port: u16,
    target: &Target,
) -> Result<(), i32> {
    let proto = forward_key.proto;
    let reverse_key = SockNatKey::v4(
        forward_key.cookie,
        target.addr,
        target.port,
        proto,
        SOCK_DIR_REVERSE,
    );
    let reverse = SockNatValue {
        addr: map_addr_v4(frontend),
        port: frontend_port,
        backend_id: target.backend_id,
        rev_nat_id: target.rev_nat_id,
        ..SockNatValue::default()
    };
    SOCK_NAT.insert(reverse_key, reverse, BPF_ANY)?;
    if proto != PROTO_UDP {
        return Ok(());
    }
    let forward = SockNatValue {
        addr: map_addr_v4(target.addr),
        port: target.port,
        ..reverse
    };
    SOCK_NAT.insert(forward_key, forward, BPF_ANY)
}

/// `recvmsg4` and `getpeername4`: a backend this socket was translated to
/// shows as the frontend it asked for.
#[inline(always)]
fn reverse(ctx: &SockAddrContext) {
    if !in_scope(ctx) {
        return;
    }
    let Some((addr, port, proto)) = destination(ctx) else {
        return;
    };
    let key = SockNatKey::v4(cookie(ctx), addr, port, proto, SOCK_DIR_REVERSE);
    // SAFETY: copied out at once.
    let Some(frontend) = (unsafe { SOCK_NAT.get(key) }).copied() else {
        return;
    };
    set_destination(ctx, map_addr_v4_octets(&frontend.addr), frontend.port);
}

/// Counts a new flow (a translated socket) for its frontend. The socket
/// hooks see no packets, so only `new_flows` moves.
#[inline(always)]
fn account_flow(rev_nat_id: u32) {
    if let Some(stats) = FRONTEND_STATS.get_ptr_mut(rev_nat_id) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { (*stats).new_flows += 1 };
    }
}
