//! Socket-LB (cgroup socket hooks for host-originated traffic): the
//! per-socket translations the reverse hooks restore.

use bytemuck::{Pod, Zeroable};

use crate::{BackendId, FAMILY_IPV4, MapAddr, RevNatId, map_addr_v4};

/// Capacity of the socket-LB NAT LRU map: one reverse entry per socket
/// translated, plus one forward entry per UDP socket.
pub const SOCK_NAT_MAX_ENTRIES: u32 = 65_536;

/// Socket-LB direction: a UDP socket's frontend (key) to the backend it
/// was given (value), so every datagram the socket sends to that frontend
/// goes to the same backend, as conntrack keeps a pod's UDP flow on its
/// backend.
pub const SOCK_DIR_FORWARD: u8 = 0;
/// Socket-LB direction: a backend a socket was sent to (key) to the
/// frontend the application asked for (value), restored as the peer
/// address by `recvmsg4`/`recvmsg6` and `getpeername4`/`getpeername6`.
pub const SOCK_DIR_REVERSE: u8 = 1;

/// Key of the socket-LB NAT map: one socket (by cookie) and one address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SockNatKey {
    /// The socket's cookie (`bpf_get_socket_cookie`), host byte order.
    pub cookie: u64,
    /// Forward: the frontend address; reverse: the backend address.
    /// Network byte order (see [`MapAddr`]).
    pub addr: MapAddr,
    /// Forward: the frontend port; reverse: the backend port. Network byte order.
    pub port: u16,
    /// Address family: [`FAMILY_IPV4`] or [`crate::FAMILY_IPV6`].
    pub family: u8,
    /// IP protocol: [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
    pub proto: u8,
    /// [`SOCK_DIR_FORWARD`] or [`SOCK_DIR_REVERSE`].
    pub direction: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<SockNatKey>() == 32);

impl SockNatKey {
    /// The key of socket `cookie` and the IPv4 `addr:port` (network byte
    /// order) of `proto`, in `direction`.
    #[inline(always)]
    pub const fn v4(cookie: u64, addr: [u8; 4], port: u16, proto: u8, direction: u8) -> Self {
        Self::new(
            cookie,
            map_addr_v4(addr),
            FAMILY_IPV4,
            port,
            proto,
            direction,
        )
    }

    /// The key of socket `cookie` and `addr:port` (network byte order) of
    /// `family` ([`FAMILY_IPV4`] or [`crate::FAMILY_IPV6`]) and `proto`, in
    /// `direction`.
    #[inline(always)]
    pub const fn new(
        cookie: u64,
        addr: MapAddr,
        family: u8,
        port: u16,
        proto: u8,
        direction: u8,
    ) -> Self {
        SockNatKey {
            cookie,
            addr,
            port,
            family,
            proto,
            direction,
            _pad: [0; 3],
        }
    }
}

/// Value of the socket-LB NAT map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockNatValue {
    /// Forward: the backend address; reverse: the frontend address.
    /// Network byte order (see [`MapAddr`]).
    pub addr: MapAddr,
    /// Forward: the backend port; reverse: the frontend port. Network byte order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
    /// The backend (host byte order): a forward entry is only reused while
    /// this backend is still in the backends map with the same address.
    pub backend_id: BackendId,
    /// The frontend (host byte order).
    pub rev_nat_id: RevNatId,
    /// Explicit padding, always zero.
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<SockNatValue>() == 32);
