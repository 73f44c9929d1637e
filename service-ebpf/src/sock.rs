//! Socket-LB: Service translation at the socket layer, for processes that
//! send from the node itself (hostNetwork pods, the kubelet, node daemons),
//! whose packets never cross a pod device and so never meet the TC hooks.
//! What Cilium calls socket-LB; these are `cgroup_sock_addr` programs the
//! agent attaches to a cgroup v2 (`--cgroup-path`), so they run for every
//! socket of every process in that cgroup and below, in whatever network
//! namespace.
//!
//! Each hook comes in two programs, one per address family (`connect4`
//! and `connect6`, and so on), over one body generic in the family
//! ([`SockFamily`]): IPv6 frontends are looked up with IPv6 keys and go to
//! IPv6 backends, as the agent programs them.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`): a dual-stack IPv6
//! socket (not `IPV6_V6ONLY`) talks IPv4 through them. A datagram such a
//! socket sends to a mapped address without being connected takes the
//! kernel's IPv4 path, which runs `sendmsg4` with the IPv4 address, so an
//! IPv4 frontend goes to an IPv4 backend; its answer meets `recvmsg6`,
//! which takes the mapped address as the IPv4 one ([`Ipv4Mapped`]) and
//! gives `::ffff:frontend` back: the mapped `SOCK_NAT` entries are the
//! IPv4 ones (family IPv4, the IPv4 address). `connect6` translates a
//! mapped destination the same way: to the mapped address of an IPv4
//! backend, with the same `SOCK_NAT` entries, so `getpeername6` and
//! `recvmsg6` give the mapped frontend back.
//!
//! - `sock_connect4`/`6` (`connect(2)` of TCP and UDP sockets) and
//!   `sock_sendmsg4`/`6` (`sendto(2)`/`sendmsg(2)` with an address, on
//!   unconnected UDP sockets): when the destination is a frontend (the
//!   frontends map, scope `SCOPE_ALL`, any frontend kind, like traffic from
//!   pods), pick a backend with [`lb::select_backend`], the very choice the
//!   packet hooks make, and rewrite the socket address to it. The kernel
//!   then connects (or sends) straight to the backend: there is no packet to
//!   translate and no conntrack entry, the socket itself stays on its
//!   backend. Except a pod's connected UDP socket (a namespace other than
//!   the node's, [`NODE_NETNS_COOKIE`]): it is left to the packet
//!   hooks, whose conntrack moves its datagrams to another backend when
//!   theirs goes (kube-proxy's behaviour); a connected socket's later
//!   datagrams pass no socket hook, so a socket translated here would stay
//!   on a deleted backend. The node's own connected UDP sockets have no
//!   packet hook to go to: when their backend leaves, the agent destroys
//!   them (sock_diag `SOCK_DESTROY`, found by their `SOCK_NAT` entries),
//!   and an application that reconnects on the error lands on a live
//!   backend.
//! - `sock_recvmsg4`/`6` (`recvfrom(2)`/`recvmsg(2)` on UDP) and
//!   `sock_getpeer4`/`6` (`getpeername(2)`): give the application back the
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
//! client, by its address of the frontend's family
//! (`DatapathConfig::snat_v4`, `snat_v6`): a socket outside
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
    DatapathConfig, DatapathCounter, FAMILY_IPV4, FAMILY_IPV6, MapAddr, PROTO_TCP, PROTO_UDP,
    SOCK_DIR_FORWARD, SOCK_DIR_REVERSE, SockNatKey, SockNatValue, map_addr_v4, map_addr_v4_octets,
    map_addrs_equal,
};

use crate::{
    clock::now_seconds,
    lb::{self, FlowAddr, Lookup, NewFlow, Origin, Target},
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

/// The system call a forward hook runs for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    /// `connect(2)`.
    Connect,
    /// `sendto(2)`/`sendmsg(2)` with an address.
    Sendmsg,
}

/// The node's network namespace cookie (the agent's own), set by the agent
/// at load time; 0 (the default): unknown, every socket is taken as the
/// node's. (A global of the object, like [`SOCK_LB_HOST_NETNS_COOKIE`].)
#[unsafe(no_mangle)]
static NODE_NETNS_COOKIE: u64 = 0;

/// Whether the socket is in a network namespace other than the node's (a
/// pod's, whose packets the packet hooks see).
#[inline(always)]
fn in_pod_netns(ctx: &SockAddrContext) -> bool {
    // SAFETY: as in `in_scope`.
    let node = unsafe { core::ptr::read_volatile(&NODE_NETNS_COOKIE) };
    // SAFETY: as in `in_scope`.
    node != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != node
}

/// `connect(2)` of a TCP or UDP socket: a frontend becomes a backend.
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    forward::<Ipv4>(&ctx, Call::Connect)
}

/// `sendto(2)`/`sendmsg(2)` with an address on an unconnected UDP socket:
/// a frontend becomes a backend, the same one for every datagram.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward::<Ipv4>(&ctx, Call::Sendmsg)
}

/// `recvfrom(2)`/`recvmsg(2)` on a UDP socket: an answer from a backend
/// comes from the frontend the socket sent to. Must allow (the kernel
/// accepts no other verdict here).
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse::<Ipv4>(&ctx);
    SOCK_ALLOW
}

/// `getpeername(2)`: a socket connected to a backend through a frontend
/// has the frontend as its peer. Must allow.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeer4(ctx: SockAddrContext) -> i32 {
    reverse::<Ipv4>(&ctx);
    SOCK_ALLOW
}

/// [`sock_connect4`] for IPv6 sockets: an IPv6 frontend becomes an IPv6
/// backend, and an IPv4-mapped one (`::ffff:a.b.c.d`, a dual-stack socket
/// connecting to an IPv4 frontend) an IPv4-mapped backend. Each family's
/// body is a function of its own, so the IPv4 backend choice never sits on
/// top of the IPv6 frame (the verifier of kernel 6.1 allows a program and
/// its calls 512 bytes of stack together).
#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    if is_v4_mapped(&ctx) {
        connect6_mapped(&ctx)
    } else {
        connect6_native(&ctx)
    }
}

/// [`sock_connect6`] to an IPv6 address.
#[inline(never)]
fn connect6_native(ctx: &SockAddrContext) -> i32 {
    forward::<Ipv6>(ctx, Call::Connect)
}

/// [`sock_connect6`] to an IPv4-mapped address.
#[inline(never)]
fn connect6_mapped(ctx: &SockAddrContext) -> i32 {
    forward::<Ipv4Mapped>(ctx, Call::Connect)
}

/// [`sock_sendmsg4`] for IPv6 sockets and frontends. Never sees an
/// IPv4-mapped destination: the kernel sends such a datagram through its
/// IPv4 path, which runs `sendmsg4` with the IPv4 address (tested end to
/// end).
#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward::<Ipv6>(&ctx, Call::Sendmsg)
}

/// [`sock_recvmsg4`] for IPv6 sockets, IPv4-mapped sources included.
/// Must allow.
#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    if is_v4_mapped(&ctx) {
        reverse::<Ipv4Mapped>(&ctx);
    } else {
        reverse::<Ipv6>(&ctx);
    }
    SOCK_ALLOW
}

/// [`sock_getpeer4`] for IPv6 sockets, IPv4-mapped peers included. Must
/// allow.
#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeer6(ctx: SockAddrContext) -> i32 {
    if is_v4_mapped(&ctx) {
        reverse::<Ipv4Mapped>(&ctx);
    } else {
        reverse::<Ipv6>(&ctx);
    }
    SOCK_ALLOW
}

/// What differs between the IPv4 and the IPv6 programs, and IPv4-mapped
/// addresses in the IPv6 ones: where the socket address sits in the
/// context and how, and the node's own address. Everything else works on
/// [`MapAddr`]s tagged with [`SockFamily::FAMILY`].
trait SockFamily {
    /// The family tag of the map keys (`FAMILY_IPV4` or `FAMILY_IPV6`):
    /// the family of the frontends and backends, which for IPv4-mapped
    /// addresses is not the socket's.
    const FAMILY: u8;
    /// The family's addresses as the backend choice takes them.
    type Addr: FlowAddr;

    /// `addr` as the backend choice takes it.
    fn flow_addr(addr: &MapAddr) -> Self::Addr;

    /// The socket address's IP address (`user_ip4` or `user_ip6`),
    /// network byte order, as the maps hold addresses of
    /// [`SockFamily::FAMILY`].
    ///
    /// # Safety
    /// `sa` is the program's context.
    unsafe fn read_addr(sa: *const bpf_sock_addr) -> MapAddr;

    /// Writes `addr` (network byte order, a map address of
    /// [`SockFamily::FAMILY`]) as the socket address's IP address.
    ///
    /// # Safety
    /// `sa` is the program's context, in a hook that may write the address.
    unsafe fn write_addr(sa: *mut bpf_sock_addr, addr: &MapAddr);

    /// The node as a client of this family's frontends (for session
    /// affinity and source ranges): its SNAT address of the family.
    fn node_address(config: &DatapathConfig) -> Self::Addr;
}

/// The IPv4 programs (`*4`).
struct Ipv4;

impl SockFamily for Ipv4 {
    const FAMILY: u8 = FAMILY_IPV4;
    type Addr = [u8; 4];

    #[inline(always)]
    fn flow_addr(addr: &MapAddr) -> [u8; 4] {
        map_addr_v4_octets(addr)
    }

    #[inline(always)]
    unsafe fn read_addr(sa: *const bpf_sock_addr) -> MapAddr {
        // SAFETY: read once, with the 4-byte size the verifier requires,
        // volatile so it is not merged into a wider access.
        let ip = unsafe { core::ptr::addr_of!((*sa).user_ip4).read_volatile() };
        map_addr_v4(ip.to_ne_bytes())
    }

    #[inline(always)]
    unsafe fn write_addr(sa: *mut bpf_sock_addr, addr: &MapAddr) {
        let ip = u32::from_ne_bytes(map_addr_v4_octets(addr));
        // SAFETY: a 4-byte store, allowed in every IPv4 hook here.
        unsafe { core::ptr::addr_of_mut!((*sa).user_ip4).write_volatile(ip) };
    }

    #[inline(always)]
    fn node_address(config: &DatapathConfig) -> [u8; 4] {
        config.snat_v4
    }
}

/// The IPv6 programs (`*6`).
struct Ipv6;

impl SockFamily for Ipv6 {
    const FAMILY: u8 = FAMILY_IPV6;
    type Addr = MapAddr;

    #[inline(always)]
    fn flow_addr(addr: &MapAddr) -> MapAddr {
        *addr
    }

    #[inline(always)]
    unsafe fn read_addr(sa: *const bpf_sock_addr) -> MapAddr {
        // SAFETY: the caller's promise.
        let words = unsafe { read_ip6_words(sa) };
        // SAFETY: `[u32; 4]` and `[u8; 16]` have the same size, and every
        // byte pattern is a valid `[u8; 16]`.
        unsafe { core::mem::transmute::<[u32; 4], MapAddr>(words) }
    }

    #[inline(always)]
    unsafe fn write_addr(sa: *mut bpf_sock_addr, addr: &MapAddr) {
        // SAFETY: as in `read_addr`.
        let words = unsafe { core::mem::transmute::<MapAddr, [u32; 4]>(*addr) };
        // SAFETY: the caller's promise.
        unsafe { write_ip6_words(sa, words) };
    }

    #[inline(always)]
    fn node_address(config: &DatapathConfig) -> MapAddr {
        config.snat_v6
    }
}

/// IPv4 frontends and backends seen through IPv4-mapped IPv6 addresses
/// (`::ffff:a.b.c.d`) by the IPv6 programs: looked up, chosen and recorded
/// exactly as the IPv4 programs do (the node as client by its IPv4
/// address), read from and written to `user_ip6` in the mapped form.
struct Ipv4Mapped;

impl SockFamily for Ipv4Mapped {
    const FAMILY: u8 = FAMILY_IPV4;
    type Addr = [u8; 4];

    #[inline(always)]
    fn flow_addr(addr: &MapAddr) -> [u8; 4] {
        map_addr_v4_octets(addr)
    }

    #[inline(always)]
    unsafe fn read_addr(sa: *const bpf_sock_addr) -> MapAddr {
        // SAFETY: the caller's promise.
        let [_, _, _, ip] = unsafe { read_ip6_words(sa) };
        map_addr_v4(ip.to_ne_bytes())
    }

    #[inline(always)]
    unsafe fn write_addr(sa: *mut bpf_sock_addr, addr: &MapAddr) {
        let ip = u32::from_ne_bytes(map_addr_v4_octets(addr));
        // SAFETY: the caller's promise.
        unsafe { write_ip6_words(sa, [0, 0, V4_MAPPED_PREFIX_WORD, ip]) };
    }

    #[inline(always)]
    fn node_address(config: &DatapathConfig) -> [u8; 4] {
        config.snat_v4
    }
}

/// The third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`)
/// as it sits in memory (network byte order).
const V4_MAPPED_PREFIX_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Whether the IPv6 socket address of the context is IPv4-mapped
/// (`::ffff:a.b.c.d`). Only for the IPv6 programs.
#[inline(always)]
fn is_v4_mapped(ctx: &SockAddrContext) -> bool {
    // SAFETY: the context of an IPv6 hook, whose `user_ip6` is readable.
    let [a, b, c, _] = unsafe { read_ip6_words(ctx.sock_addr) };
    a == 0 && b == 0 && c == V4_MAPPED_PREFIX_WORD
}

/// The four words of `user_ip6`, network byte order.
///
/// # Safety
/// `sa` is the context of an IPv6 hook.
#[inline(always)]
unsafe fn read_ip6_words(sa: *const bpf_sock_addr) -> [u32; 4] {
    // SAFETY: `sa` is the context (the caller's promise).
    let ip = unsafe { core::ptr::addr_of!((*sa).user_ip6) }.cast::<u32>();
    // SAFETY: four 4-byte reads of `user_ip6` (the verifier takes no wider
    // ones on every kernel), volatile so none are merged.
    unsafe {
        [
            ip.read_volatile(),
            ip.add(1).read_volatile(),
            ip.add(2).read_volatile(),
            ip.add(3).read_volatile(),
        ]
    }
}

/// Writes `words` (network byte order) to `user_ip6`.
///
/// # Safety
/// `sa` is the context of an IPv6 hook that may write the address.
#[inline(always)]
unsafe fn write_ip6_words(sa: *mut bpf_sock_addr, words: [u32; 4]) {
    // SAFETY: `sa` is the context (the caller's promise).
    let ip = unsafe { core::ptr::addr_of_mut!((*sa).user_ip6) }.cast::<u32>();
    // SAFETY: four 4-byte stores to `user_ip6`, writable in every IPv6 hook
    // here.
    unsafe {
        ip.write_volatile(words[0]);
        ip.add(1).write_volatile(words[1]);
        ip.add(2).write_volatile(words[2]);
        ip.add(3).write_volatile(words[3]);
    }
}

/// A socket address: IP address and port in network byte order, and the
/// protocol (`PROTO_TCP` or `PROTO_UDP`).
struct SockDestination {
    addr: MapAddr,
    port: u16,
    proto: u8,
}

/// The destination (or peer) of the socket address as it stands; `None`
/// for a protocol other than TCP and UDP, left alone.
#[inline(always)]
fn destination<F: SockFamily>(ctx: &SockAddrContext) -> Option<SockDestination> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context is the kernel's `bpf_sock_addr`; each field is
    // read once, with the size the verifier requires (4 bytes), volatile so
    // no two reads are merged into one wider access.
    let (addr, port, protocol) = unsafe {
        (
            F::read_addr(sa),
            core::ptr::addr_of!((*sa).user_port).read_volatile(),
            core::ptr::addr_of!((*sa).protocol).read_volatile(),
        )
    };
    let proto = match protocol {
        IPPROTO_TCP => PROTO_TCP,
        IPPROTO_UDP => PROTO_UDP,
        _ => return None,
    };
    // `user_port` holds the port as in `sin_port`/`sin6_port` (network
    // order) in its low 16 bits: read as a native u16 like the packet
    // hooks read ports.
    Some(SockDestination {
        addr,
        port: port as u16,
        proto,
    })
}

/// Rewrites the socket address to `addr:port` (network byte order).
#[inline(always)]
fn set_destination<F: SockFamily>(ctx: &SockAddrContext, addr: &MapAddr, port: u16) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the address and the port are writable in every hook here,
    // with 4-byte stores.
    unsafe {
        F::write_addr(sa, addr);
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
    // SAFETY: the helper has no preconditions; allowed in the connect and
    // sendmsg hooks (kernel 5.18+).
    unsafe { bpf_set_retval(-errno) };
    SOCK_REJECT
}

/// `connect4`/`6` and `sendmsg4`/`6`: translates a frontend to a backend.
#[inline(always)]
fn forward<F: SockFamily>(ctx: &SockAddrContext, call: Call) -> i32 {
    if !in_scope(ctx) {
        return SOCK_ALLOW;
    }
    let Some(frontend) = destination::<F>(ctx) else {
        return SOCK_ALLOW;
    };
    // A pod's connected UDP socket is left to the packet hooks (which
    // translate both families): its datagrams then go through conntrack,
    // which moves them to another backend when theirs goes, as kube-proxy's
    // conntrack flush does. Translated once here, the socket would keep
    // sending to a deleted backend: no hook runs for a connected socket's
    // later datagrams.
    if call == Call::Connect && frontend.proto == PROTO_UDP && in_pod_netns(ctx) {
        return SOCK_ALLOW;
    }
    let forward_key = SockNatKey::new(
        cookie(ctx),
        frontend.addr,
        F::FAMILY,
        frontend.port,
        frontend.proto,
        SOCK_DIR_FORWARD,
    );
    // A UDP socket already sending to this frontend keeps its backend.
    if frontend.proto == PROTO_UDP
        && let Some((addr, port)) = sticky_backend(&forward_key)
    {
        set_destination::<F>(ctx, &addr, port);
        return SOCK_ALLOW;
    }
    // The node is one client, by its own address, for session affinity
    // and `loadBalancerSourceRanges` (the address its sockets' packets
    // would leave with towards other nodes).
    let request = NewFlow {
        daddr: F::flow_addr(&frontend.addr),
        client: config().map_or(F::flow_addr(&[0; 16]), F::node_address),
        dport: frontend.port,
        proto: frontend.proto,
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
    let Some(backend) = F::Addr::target_addr(&target) else {
        count(DatapathCounter::DropBackendMissing);
        return reject(EHOSTUNREACH);
    };
    if record(&forward_key, &frontend, &backend, &target).is_err() {
        count(DatapathCounter::ConntrackInsertFailed);
    }
    set_destination::<F>(ctx, &backend, target.port);
    account_flow(target.rev_nat_id);
    SOCK_ALLOW
}

/// The backend a UDP socket's forward entry holds, if that backend is still
/// in the backends map with the same address and port (active or
/// terminating: an established flow keeps a terminating backend).
#[inline(always)]
fn sticky_backend(forward_key: &SockNatKey) -> Option<(MapAddr, u16)> {
    // SAFETY: copied out at once.
    let entry = unsafe { SOCK_NAT.get(forward_key) }.copied()?;
    let backend = BACKENDS.get(entry.backend_id).filter(|b| b.exists())?;
    if !map_addrs_equal(&backend.addr, &entry.addr) || backend.port != entry.port {
        return None;
    }
    Some((entry.addr, entry.port))
}

/// Records a translated socket: the reverse entry (backend `backend` to
/// `frontend`), then for UDP the forward entry (frontend to backend) under
/// `forward_key`.
#[inline(always)]
fn record(
    forward_key: &SockNatKey,
    frontend: &SockDestination,
    backend: &MapAddr,
    target: &Target,
) -> Result<(), i32> {
    let proto = forward_key.proto;
    let reverse_key = SockNatKey::new(
        forward_key.cookie,
        *backend,
        forward_key.family,
        target.port,
        proto,
        SOCK_DIR_REVERSE,
    );
    let reverse = SockNatValue {
        addr: frontend.addr,
        port: frontend.port,
        backend_id: target.backend_id,
        rev_nat_id: target.rev_nat_id,
        ..SockNatValue::default()
    };
    SOCK_NAT.insert(reverse_key, reverse, BPF_ANY)?;
    if proto != PROTO_UDP {
        return Ok(());
    }
    let forward = SockNatValue {
        addr: *backend,
        port: target.port,
        ..reverse
    };
    SOCK_NAT.insert(forward_key, forward, BPF_ANY)
}

/// `recvmsg4`/`6` and `getpeername4`/`6`: a backend this socket was
/// translated to shows as the frontend it asked for.
#[inline(always)]
fn reverse<F: SockFamily>(ctx: &SockAddrContext) {
    if !in_scope(ctx) {
        return;
    }
    let Some(peer) = destination::<F>(ctx) else {
        return;
    };
    let key = SockNatKey::new(
        cookie(ctx),
        peer.addr,
        F::FAMILY,
        peer.port,
        peer.proto,
        SOCK_DIR_REVERSE,
    );
    // SAFETY: copied out at once.
    let Some(frontend) = (unsafe { SOCK_NAT.get(key) }).copied() else {
        return;
    };
    set_destination::<F>(ctx, &frontend.addr, frontend.port);
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
