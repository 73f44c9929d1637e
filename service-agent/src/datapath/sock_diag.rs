//! The node's connected UDP sockets that socket-LB translated to a backend
//! now gone, found and destroyed through `sock_diag` netlink
//! (`NETLINK_SOCK_DIAG`), as Cilium does for the same case.
//!
//! Socket-LB translates a connected UDP socket once, at `connect`: no hook
//! sees its later datagrams, and the node's own sockets have no packet hook
//! either, so when the backend leaves its Service the socket would keep
//! sending to it forever (a statsd, syslog or DNS-forwarder socket). The
//! conntrack collector, told which backends a sync deleted or marked not
//! serving, has [`SocketLbSockets`] dump the node's connected UDP sockets
//! (`SOCK_DIAG_BY_FAMILY`, IPv4 and IPv6, state established) and destroy
//! (`SOCK_DESTROY`, kernel `CONFIG_INET_DIAG_DESTROY`) each one whose
//! destination is a backend that went *and* whose cookie has the reverse
//! entry socket-LB wrote for that very backend in `SVC_SOCK_NAT` (keyed by
//! the socket's cookie, the `idiag_cookie` the dump reports): a socket
//! that connected to the backend's address directly has no such entry and
//! is left alone. The kernel disconnects the socket and leaves it
//! `ECONNABORTED` as its pending error: the owner's next receive (or
//! `poll` with `POLLERR`) reports it, and a send on the now unconnected
//! socket fails with `EDESTADDRREQ`. An application that reconnects on
//! such an error goes through socket-LB again and lands on a live backend
//! (as with Cilium, which does the same). The destroyed
//! socket's `SVC_SOCK_NAT` entries are deleted too, so a reconnect of the
//! same socket (same cookie) does not stick to a backend that is still in
//! the map as not serving.
//!
//! The messages are a few fixed C structs (`linux/inet_diag.h`,
//! `linux/netlink.h`), written and read here as `bytemuck` plain data over
//! a netlink socket from `nix`. Limits: only the agent's own network
//! namespace is searched (pods' connected UDP sockets, of both families,
//! are left to the packet hooks' conntrack by socket-LB), and a socket whose
//! `SVC_SOCK_NAT` entry the LRU map evicted is not recognised.

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, OwnedFd},
    path::Path,
};

use aya::maps::{HashMap, MapData};
use bytemuck::{Pod, Zeroable};
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};
use service_common::{
    BackendId, FAMILY_IPV4, FAMILY_IPV6, MAP_SOCK_NAT, MapAddr, PROTO_UDP, RevNatId,
    SOCK_DIR_FORWARD, SOCK_DIR_REVERSE, SockNatKey, SockNatValue, map_addr_v4,
};

use super::maps::{io_error, open_pinned};

/// `SOCK_DIAG_BY_FAMILY`: the dump request and each socket of its answer.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `SOCK_DESTROY`: destroy the one socket a request's id names.
const SOCK_DESTROY: u16 = 21;
/// `NLMSG_ERROR`: an error, or (error 0) the acknowledgement asked for.
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: the end of a dump.
const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ACK`: answer with an `NLMSG_ERROR` carrying 0 on success.
const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`).
const NLM_F_DUMP: u16 = 0x300;
/// `TCP_ESTABLISHED`: the state of a connected UDP socket.
const TCP_ESTABLISHED: u32 = 1;
/// Receive buffer: the kernel fills a dump's messages up to about this.
const RECV_BUFFER: usize = 64 * 1024;

/// `struct nlmsghdr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
struct NlMsgHdr {
    /// Length of the message, this header included.
    len: u32,
    /// Message type.
    kind: u16,
    /// `NLM_F_*` flags.
    flags: u16,
    /// Sequence number, echoed in the answers.
    seq: u32,
    /// Port id of the sender (0: the kernel).
    pid: u32,
}

/// `struct inet_diag_sockid`: a socket as the dump reports it, and as a
/// destroy request names it (the kernel also checks the cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct InetDiagSockId {
    /// Local port, network byte order.
    pub sport: [u8; 2],
    /// Remote port, network byte order.
    pub dport: [u8; 2],
    /// Local address (IPv4: the first four bytes).
    pub src: [u8; 16],
    /// Remote address (IPv4: the first four bytes).
    pub dst: [u8; 16],
    /// Bound device index (0: none).
    pub interface: u32,
    /// The socket's cookie, low word first (host byte order).
    pub cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
struct InetDiagReqV2 {
    /// `AF_INET` or `AF_INET6`.
    family: u8,
    /// `IPPROTO_UDP` here.
    protocol: u8,
    /// Extensions asked for (none).
    ext: u8,
    /// Padding, zero.
    pad: u8,
    /// Bit mask of the socket states to dump.
    states: u32,
    /// The socket (destroy) or zero (dump).
    id: InetDiagSockId,
}

/// `struct inet_diag_msg`: one socket of a dump.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: InetDiagSockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

const _: () = assert!(size_of::<NlMsgHdr>() == 16);
const _: () = assert!(size_of::<InetDiagSockId>() == 48);
const _: () = assert!(size_of::<InetDiagReqV2>() == 56);
const _: () = assert!(size_of::<InetDiagMsg>() == 72);

/// One connected UDP socket of the node, as the dump reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSocketId {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// Its addresses, ports, device and cookie.
    pub id: InetDiagSockId,
}

impl UdpSocketId {
    /// The socket's cookie (`bpf_get_socket_cookie` gives the same).
    pub fn cookie(&self) -> u64 {
        u64::from(self.id.cookie[0]) | (u64::from(self.id.cookie[1]) << 32)
    }

    /// The `SVC_SOCK_NAT` family of the socket.
    fn nat_family(&self) -> u8 {
        if self.family == libc::AF_INET as u8 {
            FAMILY_IPV4
        } else {
            FAMILY_IPV6
        }
    }

    /// An address of the socket as `SVC_SOCK_NAT` writes it.
    fn map_addr(&self, raw: &[u8; 16]) -> MapAddr {
        if self.family == libc::AF_INET as u8 {
            map_addr_v4([raw[0], raw[1], raw[2], raw[3]])
        } else {
            *raw
        }
    }

    /// The key of the reverse entry socket-LB wrote when it translated this
    /// socket to its destination.
    pub fn reverse_key(&self) -> SockNatKey {
        SockNatKey::new(
            self.cookie(),
            self.map_addr(&self.id.dst),
            self.nat_family(),
            u16::from_ne_bytes(self.id.dport),
            PROTO_UDP,
            SOCK_DIR_REVERSE,
        )
    }

    /// The key of the forward entry of `frontend` (a reverse entry's
    /// value) for this socket.
    pub fn forward_key(&self, frontend: &SockNatValue) -> SockNatKey {
        SockNatKey::new(
            self.cookie(),
            frontend.addr,
            self.nat_family(),
            frontend.port,
            PROTO_UDP,
            SOCK_DIR_FORWARD,
        )
    }

    /// `raw:port` as a socket address of the socket's family.
    fn socket_addr(&self, raw: &[u8; 16], port: [u8; 2]) -> SocketAddr {
        let ip = if self.family == libc::AF_INET as u8 {
            IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(*raw))
        };
        SocketAddr::new(ip, u16::from_be_bytes(port))
    }
}

impl fmt::Display for UdpSocketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} (cookie {})",
            self.socket_addr(&self.id.src, self.id.sport),
            self.socket_addr(&self.id.dst, self.id.dport),
            self.cookie()
        )
    }
}

/// The request message `kind` with `flags`, sequence number `seq`, for
/// `request`.
fn encode(kind: u16, flags: u16, seq: u32, request: &InetDiagReqV2) -> Vec<u8> {
    let header = NlMsgHdr {
        len: (size_of::<NlMsgHdr>() + size_of::<InetDiagReqV2>()) as u32,
        kind,
        flags,
        seq,
        pid: 0,
    };
    let mut message = bytemuck::bytes_of(&header).to_vec();
    message.extend_from_slice(bytemuck::bytes_of(request));
    message
}

/// The dump request of the connected UDP sockets of `family`.
fn dump_request(family: u8, seq: u32) -> Vec<u8> {
    let request = InetDiagReqV2 {
        family,
        protocol: libc::IPPROTO_UDP as u8,
        states: 1 << TCP_ESTABLISHED,
        ..InetDiagReqV2::default()
    };
    encode(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        &request,
    )
}

/// The request destroying `socket`, acknowledged.
fn destroy_request(socket: &UdpSocketId, seq: u32) -> Vec<u8> {
    let request = InetDiagReqV2 {
        family: socket.family,
        protocol: libc::IPPROTO_UDP as u8,
        states: u32::MAX,
        id: socket.id,
        ..InetDiagReqV2::default()
    };
    encode(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, &request)
}

/// One message of an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    /// A socket of a dump.
    Socket(UdpSocketId),
    /// `NLMSG_ERROR`: 0 acknowledges, else a negative errno.
    Error(i32),
    /// The end of a dump.
    Done,
}

/// The messages of one datagram the kernel sent, those of sequence
/// number `seq` only.
fn decode(mut buf: &[u8], seq: u32) -> io::Result<Vec<Reply>> {
    let malformed = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sock_diag answer: {what}"),
        )
    };
    let mut replies = Vec::new();
    while buf.len() >= size_of::<NlMsgHdr>() {
        let header: NlMsgHdr = bytemuck::pod_read_unaligned(&buf[..size_of::<NlMsgHdr>()]);
        let len = header.len as usize;
        if len < size_of::<NlMsgHdr>() || len > buf.len() {
            return Err(malformed("a message length beyond the datagram"));
        }
        let payload = &buf[size_of::<NlMsgHdr>()..len];
        if header.seq == seq {
            match header.kind {
                NLMSG_DONE => replies.push(Reply::Done),
                NLMSG_ERROR => {
                    let code = payload
                        .get(..4)
                        .ok_or_else(|| malformed("a short error message"))?;
                    replies.push(Reply::Error(i32::from_ne_bytes(
                        code.try_into().expect("four bytes"),
                    )));
                }
                SOCK_DIAG_BY_FAMILY => {
                    let message = payload
                        .get(..size_of::<InetDiagMsg>())
                        .ok_or_else(|| malformed("a short socket message"))?;
                    let message: InetDiagMsg = bytemuck::pod_read_unaligned(message);
                    replies.push(Reply::Socket(UdpSocketId {
                        family: message.family,
                        id: message.id,
                    }));
                }
                _ => {}
            }
        }
        // Messages start on four-byte boundaries (`NLMSG_ALIGN`).
        let next = len.next_multiple_of(4).min(buf.len());
        buf = &buf[next..];
    }
    Ok(replies)
}

/// A `NETLINK_SOCK_DIAG` socket of the agent's network namespace.
pub struct SockDiag {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl SockDiag {
    /// Opens the netlink socket.
    pub fn open() -> io::Result<Self> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        Ok(SockDiag {
            fd,
            seq: 0,
            buf: vec![0; RECV_BUFFER],
        })
    }

    /// Sends `message` (built for [`SockDiag::next_seq`]).
    fn send(&self, message: &[u8]) -> io::Result<()> {
        socket::send(self.fd.as_raw_fd(), message, MsgFlags::empty())?;
        Ok(())
    }

    /// The next sequence number.
    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Reads answers of `seq` until `until` says the last came.
    fn receive(&mut self, seq: u32, mut until: impl FnMut(Reply) -> bool) -> io::Result<()> {
        loop {
            let n = socket::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty())?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            for reply in decode(&self.buf[..n], seq)? {
                if until(reply) {
                    return Ok(());
                }
            }
        }
    }

    /// The connected UDP sockets of `family` (`AF_INET` or `AF_INET6`).
    pub fn connected_udp(&mut self, family: u8) -> io::Result<Vec<UdpSocketId>> {
        let seq = self.next_seq();
        self.send(&dump_request(family, seq))?;
        let mut sockets = Vec::new();
        let mut error = None;
        self.receive(seq, |reply| match reply {
            Reply::Socket(socket) => {
                sockets.push(socket);
                false
            }
            Reply::Error(code) => {
                error = Some(io::Error::from_raw_os_error(-code));
                true
            }
            Reply::Done => true,
        })?;
        match error {
            Some(error) => Err(error),
            None => Ok(sockets),
        }
    }

    /// Destroys `socket` (the kernel checks its cookie too): the socket is
    /// disconnected and its owner's next receive fails with `ECONNABORTED`.
    pub fn destroy(&mut self, socket: &UdpSocketId) -> io::Result<()> {
        let seq = self.next_seq();
        self.send(&destroy_request(socket, seq))?;
        let mut code = 0;
        self.receive(seq, |reply| match reply {
            Reply::Error(error) => {
                code = error;
                true
            }
            _ => false,
        })?;
        if code == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(-code))
        }
    }
}

/// What one search for the sockets of removed backends did.
#[derive(Debug, Default)]
pub struct DestroyReport {
    /// The sockets destroyed.
    pub destroyed: Vec<UdpSocketId>,
    /// The sockets that could not be destroyed (or a family that could
    /// not be dumped: `None`), with why.
    pub failed: Vec<(Option<UdpSocketId>, io::Error)>,
    /// The kernel has no `SOCK_DESTROY` (`EOPNOTSUPP`): reported once,
    /// and no search is made again.
    pub unsupported: Option<io::Error>,
}

/// Destroys the node's connected UDP sockets socket-LB translated to
/// backends that left their Services (see the module's documentation).
pub trait TranslatedSockets: Send {
    /// Destroys the connected UDP sockets socket-LB translated through a
    /// frontend to a backend for which `reaped(frontend's rev-NAT id,
    /// backend)` holds.
    fn destroy_translated_to(
        &mut self,
        reaped: &dyn Fn(RevNatId, BackendId) -> bool,
    ) -> DestroyReport;
}

/// The reverse entry of `socket` if socket-LB translated it through a
/// frontend to a backend for which `reaped` holds: an entry under the
/// socket's cookie and destination naming them.
pub fn translated_to(
    socket: &UdpSocketId,
    reaped: &dyn Fn(RevNatId, BackendId) -> bool,
    lookup: impl Fn(&SockNatKey) -> Option<SockNatValue>,
) -> Option<SockNatValue> {
    lookup(&socket.reverse_key()).filter(|entry| reaped(entry.rev_nat_id, entry.backend_id))
}

/// The kernel's sockets and `SVC_SOCK_NAT`.
pub struct SocketLbSockets {
    nat: HashMap<MapData, SockNatKey, SockNatValue>,
    diag: SockDiag,
    /// `SOCK_DESTROY` failed with `EOPNOTSUPP`, or the dump found no UDP
    /// handler, once: nothing is tried again.
    unsupported: bool,
}

impl SocketLbSockets {
    /// Opens `SVC_SOCK_NAT` pinned under `pin_path` and a sock_diag socket.
    pub fn open(pin_path: &Path) -> crate::Result<Self> {
        use crate::error::Context as _;
        Ok(SocketLbSockets {
            nat: HashMap::try_from(open_pinned(pin_path, MAP_SOCK_NAT)?)
                .context("the socket-LB NAT map")?,
            diag: SockDiag::open().context("opening a NETLINK_SOCK_DIAG socket")?,
            unsupported: false,
        })
    }

    /// Forgets socket-LB's entries of a destroyed `socket`.
    fn forget(&mut self, socket: &UdpSocketId, reverse: &SockNatValue) {
        for key in [socket.reverse_key(), socket.forward_key(reverse)] {
            // Absent (evicted) is as good as deleted; any other failure
            // only leaves an entry the LRU map ages out.
            let _ = self.nat.remove(&key);
        }
    }
}

impl TranslatedSockets for SocketLbSockets {
    fn destroy_translated_to(
        &mut self,
        reaped: &dyn Fn(RevNatId, BackendId) -> bool,
    ) -> DestroyReport {
        let mut report = DestroyReport::default();
        if self.unsupported {
            return report;
        }
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            let sockets = match self.diag.connected_udp(family) {
                Ok(sockets) => sockets,
                // No UDP handler of sock_diag (`CONFIG_INET_UDP_DIAG`
                // off): as without `SOCK_DESTROY`, said once.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EOPNOTSUPP)) => {
                    self.unsupported = true;
                    report.unsupported = Some(e);
                    return report;
                }
                Err(e) => {
                    report.failed.push((None, e));
                    continue;
                }
            };
            for socket in sockets {
                let nat = &self.nat;
                let Some(entry) = translated_to(&socket, reaped, |key| {
                    nat.get(key, 0).map_err(io_error).ok()
                }) else {
                    continue;
                };
                match self.diag.destroy(&socket) {
                    Ok(()) => {
                        self.forget(&socket, &entry);
                        report.destroyed.push(socket);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                        self.unsupported = true;
                        report.unsupported = Some(e);
                        return report;
                    }
                    // Closed meanwhile: nothing left to destroy.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => report.failed.push((Some(socket), e)),
                }
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    /// A connected IPv4 socket 10.0.0.1:40000 -> 10.200.1.2:7007 of
    /// cookie 0x1_0000_0002.
    fn socket_v4() -> UdpSocketId {
        let mut id = InetDiagSockId {
            sport: 40000u16.to_be_bytes(),
            dport: 7007u16.to_be_bytes(),
            interface: 0,
            cookie: [2, 1],
            ..InetDiagSockId::default()
        };
        id.src[..4].copy_from_slice(&[10, 0, 0, 1]);
        id.dst[..4].copy_from_slice(&[10, 200, 1, 2]);
        UdpSocketId {
            family: libc::AF_INET as u8,
            id,
        }
    }

    #[test]
    fn a_destroy_request_is_the_kernel_s_header_and_inet_diag_req_v2() {
        let socket = socket_v4();
        let message = destroy_request(&socket, 7);
        assert_eq!(message.len(), 72);
        // nlmsghdr: length, type 21, flags REQUEST|ACK, seq 7, pid 0.
        assert_eq!(&message[..4], &72u32.to_ne_bytes());
        assert_eq!(&message[4..6], &21u16.to_ne_bytes());
        assert_eq!(&message[6..8], &5u16.to_ne_bytes());
        assert_eq!(&message[8..12], &7u32.to_ne_bytes());
        assert_eq!(&message[12..16], &[0; 4]);
        // inet_diag_req_v2: family, protocol, ext, pad, states.
        assert_eq!(&message[16..20], &[libc::AF_INET as u8, 17, 0, 0]);
        assert_eq!(&message[20..24], &u32::MAX.to_ne_bytes());
        // inet_diag_sockid: ports big-endian, addresses, device, cookie.
        assert_eq!(&message[24..28], &[0x9c, 0x40, 0x1b, 0x5f]);
        assert_eq!(&message[28..32], &[10, 0, 0, 1]);
        assert_eq!(&message[44..48], &[10, 200, 1, 2]);
        assert_eq!(&message[60..64], &[0; 4]);
        assert_eq!(&message[64..68], &2u32.to_ne_bytes());
        assert_eq!(&message[68..72], &1u32.to_ne_bytes());
    }

    #[test]
    fn a_dump_request_asks_for_established_udp_sockets_of_the_family() {
        let message = dump_request(libc::AF_INET6 as u8, 3);
        assert_eq!(&message[4..6], &20u16.to_ne_bytes());
        assert_eq!(&message[6..8], &0x301u16.to_ne_bytes());
        assert_eq!(&message[16..20], &[libc::AF_INET6 as u8, 17, 0, 0]);
        assert_eq!(&message[20..24], &2u32.to_ne_bytes());
        assert!(message[24..].iter().all(|b| *b == 0));
    }

    /// A message of `kind` and `seq` with `payload` (padded to four bytes).
    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let header = NlMsgHdr {
            len: (16 + payload.len()) as u32,
            kind,
            flags: 0,
            seq,
            pid: 0,
        };
        let mut bytes = bytemuck::bytes_of(&header).to_vec();
        bytes.extend_from_slice(payload);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    }

    #[test]
    fn dump_answers_decode_to_sockets_errors_and_done() {
        let socket = socket_v4();
        let diag = InetDiagMsg {
            family: socket.family,
            state: 1,
            id: socket.id,
            ..InetDiagMsg::default()
        };
        // A socket message with an attribute after it (6 bytes, padded).
        let mut with_attribute = bytemuck::bytes_of(&diag).to_vec();
        with_attribute.extend_from_slice(&[6, 0, 1, 0, 9, 9]);
        let mut datagram = message(SOCK_DIAG_BY_FAMILY, 5, &with_attribute);
        datagram.extend(message(SOCK_DIAG_BY_FAMILY, 4, bytemuck::bytes_of(&diag)));
        datagram.extend(message(NLMSG_ERROR, 5, &(-libc::EOPNOTSUPP).to_ne_bytes()));
        datagram.extend(message(NLMSG_DONE, 5, &0i32.to_ne_bytes()));
        assert_eq!(
            decode(&datagram, 5).unwrap(),
            [
                Reply::Socket(socket),
                Reply::Error(-libc::EOPNOTSUPP),
                Reply::Done
            ]
        );
        // A length past the datagram is refused, not read.
        let mut broken = message(NLMSG_DONE, 5, &[0; 4]);
        broken[0] = 200;
        assert!(decode(&broken, 5).is_err());
    }

    #[test]
    fn only_sockets_socket_lb_sent_to_a_removed_backend_are_chosen() {
        let socket = socket_v4();
        assert_eq!(socket.cookie(), 0x1_0000_0002);
        assert_eq!(
            socket.to_string(),
            "10.0.0.1:40000 -> 10.200.1.2:7007 (cookie 4294967298)"
        );
        let reverse = SockNatKey::v4(
            0x1_0000_0002,
            [10, 200, 1, 2],
            7007u16.to_be(),
            PROTO_UDP,
            SOCK_DIR_REVERSE,
        );
        assert_eq!(socket.reverse_key(), reverse);
        let entry = SockNatValue {
            addr: map_addr_v4([10, 96, 0, 10]),
            port: 7u16.to_be(),
            backend_id: 4,
            rev_nat_id: 2,
            ..SockNatValue::default()
        };
        let map = |key: &SockNatKey| (*key == reverse).then_some(entry);
        let backend_4 = |_, backend| backend == 4;
        assert_eq!(translated_to(&socket, &backend_4, map), Some(entry));
        // Another backend went: this socket stays.
        assert_eq!(
            translated_to(&socket, &|_, backend| backend == 5, map),
            None
        );
        // Backend 4 left frontend 2 (this socket's): it goes; left
        // another frontend: it stays.
        let left = |from: RevNatId| move |frontend, backend| (frontend, backend) == (from, 4);
        assert_eq!(translated_to(&socket, &left(2), map), Some(entry));
        assert_eq!(translated_to(&socket, &left(3), map), None);
        // Connected to the backend directly (no entry for its cookie).
        assert_eq!(translated_to(&socket, &backend_4, |_| None), None);
        assert_eq!(
            socket.forward_key(&entry),
            SockNatKey::v4(
                0x1_0000_0002,
                [10, 96, 0, 10],
                7u16.to_be(),
                PROTO_UDP,
                SOCK_DIR_FORWARD
            )
        );
    }

    /// The socket's cookie, as `SO_COOKIE` gives it.
    fn cookie_of(socket: &std::net::UdpSocket) -> u64 {
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: `cookie` and `len` are valid for the call, of the size
        // passed.
        let ret = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        assert_eq!(ret, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        cookie
    }

    /// Against the kernel: a connected loopback UDP socket of this test is
    /// dumped with its cookie, destroyed by it, and then is disconnected
    /// (a send fails with `EDESTADDRREQ`) and its receive fails with
    /// `ECONNABORTED`; a second one connected to the same address is left
    /// alone. Destroying needs CAP_NET_ADMIN: skipped without it.
    #[test]
    fn the_kernel_dumps_and_destroys_a_connected_udp_socket_by_cookie() {
        for (family, localhost) in [
            (libc::AF_INET as u8, IpAddr::V4(Ipv4Addr::LOCALHOST)),
            (libc::AF_INET6 as u8, IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ] {
            let Ok(server) = std::net::UdpSocket::bind((localhost, 0)) else {
                eprintln!("no {localhost} here: skipped");
                continue;
            };
            let server = server.local_addr().unwrap();
            let doomed = std::net::UdpSocket::bind((localhost, 0)).unwrap();
            doomed.connect(server).unwrap();
            let kept = std::net::UdpSocket::bind((localhost, 0)).unwrap();
            kept.connect(server).unwrap();
            let mut diag = SockDiag::open().expect("NETLINK_SOCK_DIAG");
            let sockets = diag.connected_udp(family).expect("dump");
            let found = sockets
                .iter()
                .find(|s| s.cookie() == cookie_of(&doomed))
                .copied()
                .unwrap_or_else(|| panic!("{localhost}: not dumped: {sockets:?}"));
            assert_eq!(found.family, family);
            assert_eq!(
                found.socket_addr(&found.id.dst, found.id.dport),
                server,
                "{found}"
            );
            match diag.destroy(&found) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    eprintln!("no CAP_NET_ADMIN: destroying skipped");
                    return;
                }
                other => other.expect("SOCK_DESTROY"),
            }
            // Disconnected: a send has no destination; the pending error
            // comes with the next receive.
            let error = doomed.send(b"x").expect_err("a destroyed socket");
            assert_eq!(error.raw_os_error(), Some(libc::EDESTADDRREQ), "{error}");
            doomed.set_nonblocking(true).unwrap();
            let error = doomed.recv(&mut [0; 8]).expect_err("a destroyed socket");
            assert_eq!(error.raw_os_error(), Some(libc::ECONNABORTED), "{error}");
            kept.send(b"x").expect("the other socket is untouched");
            // Destroyed already (disconnected): the kernel finds it no more.
            let again = diag.destroy(&found).expect_err("gone");
            assert_eq!(again.raw_os_error(), Some(libc::ENOENT), "{again}");
        }
    }
}
