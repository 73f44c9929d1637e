//! End to end: a backend answering a too-big datagram with "fragmentation
//! needed" lowers the client's path MTU towards the ClusterIP, because the
//! datapath hands the client the error as coming from the ClusterIP and
//! quoting it: path MTU discovery works through a Service.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use service_tests::{
    require_root,
    scenario::{BACKEND_UDP_PORT, ClusterIpScenario, udp_frontend, web_service_yaml},
};

/// The MTU the backend reports.
const REPORTED_MTU: u16 = 1000;
/// Size of the datagram the client sends.
const DATAGRAM: usize = 1400;

/// The one's complement checksum of `bytes` (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP "fragmentation needed" (type 3, code 4) quoting the IPv4 and UDP
/// headers of the datagram `client` -> `backend` as the backend received it.
fn frag_needed(client: SocketAddr, backend: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(client), SocketAddr::V4(backend)) = (client, backend) else {
        panic!("IPv4 only");
    };
    let mut inner = Vec::new();
    inner.extend_from_slice(&[0x45, 0]);
    inner.extend_from_slice(&((20 + 8 + DATAGRAM) as u16).to_be_bytes());
    inner.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    inner.extend_from_slice(&client.ip().octets());
    inner.extend_from_slice(&backend.ip().octets());
    let ip_csum = checksum(&inner);
    inner[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    inner.extend_from_slice(&client.port().to_be_bytes());
    inner.extend_from_slice(&backend.port().to_be_bytes());
    inner.extend_from_slice(&((8 + DATAGRAM) as u16).to_be_bytes());
    inner.extend_from_slice(&[0, 0]);
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&REPORTED_MTU.to_be_bytes());
    icmp.extend_from_slice(&inner);
    let csum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    icmp
}

/// `getsockopt(IP_MTU)`: the path MTU the kernel knows for a connected socket.
fn path_mtu(socket: &UdpSocket) -> i32 {
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid socket, output buffer of the right size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&raw mut mtu).cast(),
            &mut len,
        )
    };
    assert_eq!(
        rc,
        0,
        "getsockopt(IP_MTU): {}",
        std::io::Error::last_os_error()
    );
    mtu
}

#[test]
fn fragmentation_needed_from_a_backend_reaches_the_client_for_the_cluster_ip() {
    require_root!();
    let scenario = ClusterIpScenario::start("pmtu", &web_service_yaml(&[1]), 1).expect("scenario");
    let client_pod = &scenario.topology.pods[0];
    let backend_pod = &scenario.topology.pods[1];

    // The client: a UDP socket connected to the ClusterIP, with path MTU
    // discovery on (DF set, errors update the path MTU).
    let socket = client_pod
        .ns
        .run(|| {
            let socket = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))?;
            socket.connect(udp_frontend())?;
            let on: libc::c_int = libc::IP_PMTUDISC_DO;
            // SAFETY: valid socket and option value.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    (&raw const on).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0);
            Ok::<_, std::io::Error>(socket)
        })
        .unwrap()
        .expect("client socket");
    let before = path_mtu(&socket);
    assert_eq!(before, 1500);
    socket
        .send(&[0x5a; DATAGRAM])
        .expect("send the big datagram");
    let client = SocketAddr::new(client_pod.ip.into(), socket.local_addr().unwrap().port());
    let backend = SocketAddr::from((backend_pod.ip, BACKEND_UDP_PORT));

    // The backend answers "fragmentation needed", from its own address.
    let message = frag_needed(client, backend);
    let client_ip: Ipv4Addr = client_pod.ip;
    backend_pod
        .ns
        .run(move || {
            // SAFETY: plain socket(2); the fd is closed below.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let to = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(client_ip.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: valid fd, buffer and address.
            let sent = unsafe {
                libc::sendto(
                    fd,
                    message.as_ptr().cast(),
                    message.len(),
                    0,
                    (&raw const to).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            // SAFETY: closing the fd opened above.
            unsafe { libc::close(fd) };
            assert_eq!(
                sent,
                message.len() as isize,
                "{}",
                std::io::Error::last_os_error()
            );
        })
        .unwrap();

    // The client's kernel matched the error to its socket to the ClusterIP.
    let deadline = Instant::now() + Duration::from_secs(2);
    while path_mtu(&socket) != i32::from(REPORTED_MTU) {
        assert!(
            Instant::now() < deadline,
            "path MTU towards the ClusterIP stayed {}",
            path_mtu(&socket)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
