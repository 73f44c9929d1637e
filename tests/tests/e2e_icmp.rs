//! End to end: a backend answering a too-big datagram with "fragmentation
//! needed" (IPv4) or "packet too big" (IPv6) lowers the client's path MTU
//! towards the ClusterIP, because the datapath hands the client the error
//! as coming from the ClusterIP and quoting it: path MTU discovery works
//! through a Service, in both families. The same through a NodePort of
//! each family whose backend is on another node: the backend reports to
//! the SNAT address, and the external client gets the error from the
//! NodePort, on XDP and on TC.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use service_common::{CT_DIR_FORWARD, CT_DIR_SNAT, FAMILY_IPV4, FAMILY_IPV6, map_addr_v4_octets};
use service_tests::{
    agent::{conntrack_entries, wait_for_backends},
    netns::NetNs,
    require_root,
    scenario::{
        BACKEND_UDP_PORT, BACKENDS, CLUSTER_IP6, ClusterIpScenario, NODE_B_POD_0, TwoNodeScenario,
        UDP_PORT, demo_yaml_path, udp_frontend, web_service_yaml,
    },
    topology::{NODE_A_EXTERNAL_IP, ipv6_of},
};

/// The MTU the backend reports over IPv4.
const REPORTED_MTU: u16 = 1000;
/// The MTU the backend reports over IPv6 (IPv6's minimum: a lower one is
/// taken as 1280).
const REPORTED_MTU6: u32 = 1280;
/// Size of the datagram the client sends.
const DATAGRAM: usize = 1400;
/// Bytes of the datagram's payload an ICMPv6 error quotes here (it may
/// quote up to 1280 bytes in all).
const QUOTED6: usize = 512;

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
/// headers of the datagram `client` -> `backend` as the backend received it
/// (`client` is this node's SNAT address and port for an SNATed flow).
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

/// An ICMPv6 "packet too big" (type 2) quoting the IPv6 and UDP headers
/// (with a valid UDP checksum) and the first [`QUOTED6`] payload bytes of
/// the datagram of `payload` `client` -> `backend` as the backend received
/// it. Its checksum is left 0: the kernel fills it for an ICMPv6 raw
/// socket (RFC 3542).
fn packet_too_big(client: SocketAddr, backend: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (SocketAddr::V6(client), SocketAddr::V6(backend)) = (client, backend) else {
        panic!("IPv6 only");
    };
    let udp_len = (8 + payload.len()) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&client.port().to_be_bytes());
    udp.extend_from_slice(&backend.port().to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&client.ip().octets());
    pseudo.extend_from_slice(&backend.ip().octets());
    pseudo.extend_from_slice(&u32::from(udp_len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    pseudo.extend_from_slice(&udp);
    let udp_csum = checksum(&pseudo);
    udp[6..8].copy_from_slice(&udp_csum.to_be_bytes());

    let mut icmp = vec![2, 0, 0, 0];
    icmp.extend_from_slice(&REPORTED_MTU6.to_be_bytes());
    icmp.extend_from_slice(&[0x60, 0, 0, 0]);
    icmp.extend_from_slice(&udp_len.to_be_bytes());
    icmp.extend_from_slice(&[17, 64]);
    icmp.extend_from_slice(&client.ip().octets());
    icmp.extend_from_slice(&backend.ip().octets());
    icmp.extend_from_slice(&udp[..8 + QUOTED6]);
    icmp
}

/// `getsockopt(IP_MTU)` (`IPV6_MTU`): the path MTU the kernel knows for a
/// connected socket.
fn path_mtu(socket: &UdpSocket) -> i32 {
    let (level, option) = match socket.local_addr().expect("local address") {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_MTU),
        SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_MTU),
    };
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid socket, output buffer of the right size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&raw mut mtu).cast(),
            &mut len,
        )
    };
    assert_eq!(
        rc,
        0,
        "getsockopt(path MTU): {}",
        std::io::Error::last_os_error()
    );
    mtu
}

/// The client: a UDP socket in `ns` connected to `frontend`, with path MTU
/// discovery on (DF set, errors update the path MTU).
fn client_socket(ns: &NetNs, frontend: SocketAddr) -> UdpSocket {
    ns.run(move || {
        let (unspecified, level, option, value): (SocketAddr, _, _, libc::c_int) = match frontend {
            SocketAddr::V4(_) => (
                ([0, 0, 0, 0], 0).into(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DO,
            ),
            SocketAddr::V6(_) => (
                ([0u16; 8], 0).into(),
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_DO,
            ),
        };
        let socket = UdpSocket::bind(unspecified)?;
        socket.connect(frontend)?;
        // SAFETY: valid socket and option value.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                level,
                option,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        Ok::<_, std::io::Error>(socket)
    })
    .unwrap()
    .expect("client socket")
}

/// Sends the ICMP (ICMPv6) `message` from a raw socket in `ns` to `to`.
fn send_icmp(ns: &NetNs, to: IpAddr, message: Vec<u8>) {
    ns.run(move || {
        let (domain, protocol) = match to {
            IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP),
            IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6),
        };
        // SAFETY: plain socket(2); the fd is closed below.
        let fd = unsafe { libc::socket(domain, libc::SOCK_RAW, protocol) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let sent = match to {
            IpAddr::V4(ip) => {
                let address = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(ip.octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: valid fd, buffer and address.
                unsafe {
                    libc::sendto(
                        fd,
                        message.as_ptr().cast(),
                        message.len(),
                        0,
                        (&raw const address).cast(),
                        std::mem::size_of_val(&address) as libc::socklen_t,
                    )
                }
            }
            IpAddr::V6(ip) => {
                let address = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: 0,
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    sin6_scope_id: 0,
                };
                // SAFETY: valid fd, buffer and address.
                unsafe {
                    libc::sendto(
                        fd,
                        message.as_ptr().cast(),
                        message.len(),
                        0,
                        (&raw const address).cast(),
                        std::mem::size_of_val(&address) as libc::socklen_t,
                    )
                }
            }
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
}

/// Waits (2 s at most) until the client's path MTU is `expected`.
fn assert_path_mtu_becomes(socket: &UdpSocket, expected: i32) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while path_mtu(socket) != expected {
        assert!(
            Instant::now() < deadline,
            "path MTU towards the frontend stayed {}",
            path_mtu(socket)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fragmentation_needed_from_a_backend_reaches_the_client_for_the_cluster_ip() {
    require_root!();
    let scenario = ClusterIpScenario::start("pmtu", &web_service_yaml(&[1]), 1).expect("scenario");
    let client_pod = &scenario.topology.pods[0];
    let backend_pod = &scenario.topology.pods[1];

    let socket = client_socket(&client_pod.ns, udp_frontend());
    assert_eq!(path_mtu(&socket), 1500);
    socket
        .send(&[0x5a; DATAGRAM])
        .expect("send the big datagram");
    let client = SocketAddr::new(client_pod.ip.into(), socket.local_addr().unwrap().port());
    let backend = SocketAddr::from((backend_pod.ip, BACKEND_UDP_PORT));

    // The backend answers "fragmentation needed", from its own address;
    // the client's kernel matches the error to its socket to the ClusterIP.
    send_icmp(
        &backend_pod.ns,
        client_pod.ip.into(),
        frag_needed(client, backend),
    );
    assert_path_mtu_becomes(&socket, i32::from(REPORTED_MTU));
}

#[test]
fn packet_too_big_from_a_backend_reaches_the_client_for_the_ipv6_cluster_ip() {
    require_root!();
    let yaml = std::fs::read_to_string(demo_yaml_path()).expect("demo YAML");
    let mut scenario =
        ClusterIpScenario::start_dual_stack("pmtu6", &yaml, BACKENDS, &[]).expect("scenario");
    let frontend = SocketAddr::from((CLUSTER_IP6, UDP_PORT));
    wait_for_backends(
        &mut scenario.agent,
        scenario.pin.path(),
        frontend,
        "UDP",
        BACKENDS,
        Duration::from_secs(20),
    )
    .expect("the IPv6 ClusterIP programmed");
    let client_pod = &scenario.topology.pods[0];
    let client_ip = client_pod.ip6.expect("dual-stack pod");

    let socket = client_socket(&client_pod.ns, frontend);
    assert_eq!(path_mtu(&socket), 1500);
    let payload = [0x5a; DATAGRAM];
    socket.send(&payload).expect("send the big datagram");
    let client = SocketAddr::new(client_ip.into(), socket.local_addr().unwrap().port());

    // The backend the datapath chose, from the flow's master entry.
    let master = conntrack_entries(scenario.pin.path())
        .expect("conntrack")
        .into_iter()
        .find(|(key, _)| {
            key.family == FAMILY_IPV6
                && key.direction == CT_DIR_FORWARD
                && key.sport == client.port().to_be()
        })
        .map(|(_, value)| value)
        .expect("the big datagram's flow in conntrack");
    let backend_ip = std::net::Ipv6Addr::from(master.nat_addr);
    let backend_pod = scenario.topology.pods[1..=BACKENDS]
        .iter()
        .find(|pod| pod.ip6 == Some(backend_ip))
        .expect("the chosen backend is a backend pod");
    let backend = SocketAddr::from((backend_ip, BACKEND_UDP_PORT));
    assert_eq!(master.nat_port, BACKEND_UDP_PORT.to_be());

    // The backend answers "packet too big", from its own address; the
    // client's kernel matches the error to its socket to the ClusterIP.
    send_icmp(
        &backend_pod.ns,
        client_ip.into(),
        packet_too_big(client, backend, &payload),
    );
    assert_path_mtu_becomes(&socket, REPORTED_MTU6 as i32);
}

/// The NodePort (TCP and UDP) of the dual-stack Service whose only
/// backend is on node B.
const NODE_PORT: u16 = 30_011;

/// The external client sends a too-big datagram to node A's NodePort of
/// each family, SNATed to node B's pod; that pod answers "fragmentation
/// needed" (IPv4) or "packet too big" (IPv6) to the SNAT address and port
/// it saw, and the client's path MTU towards the NodePort drops to the
/// reported MTU.
fn path_mtu_errors_cross_an_snated_node_port(mode: &str) {
    let node_port = SocketAddr::from((NODE_A_EXTERNAL_IP, NODE_PORT));
    let mut setup = TwoNodeScenario::dual_stack_remote_node_port("pmtunp", mode, NODE_PORT);
    let backend_pod = &setup.topology.pods_b[0];
    assert_eq!(backend_pod.ip, NODE_B_POD_0);
    let backend6 = backend_pod.ip6.expect("dual-stack pod");
    let node_port6 = SocketAddr::from((ipv6_of(NODE_A_EXTERNAL_IP), NODE_PORT));
    wait_for_backends(
        &mut setup.agents[0],
        setup.pins[0].path(),
        node_port6,
        "UDP",
        1,
        Duration::from_secs(20),
    )
    .expect("the IPv6 NodePort programmed");

    for (frontend, backend) in [
        (
            node_port,
            SocketAddr::from((NODE_B_POD_0, BACKEND_UDP_PORT)),
        ),
        (node_port6, SocketAddr::from((backend6, BACKEND_UDP_PORT))),
    ] {
        let socket = client_socket(&setup.topology.client, frontend);
        assert_eq!(path_mtu(&socket), 1500, "{mode}: {frontend}");
        let payload = [0x5a; DATAGRAM];
        socket.send(&payload).expect("send the big datagram");
        let client_port = socket.local_addr().unwrap().port();

        // The SNAT address and port node A gave the flow.
        let family = if frontend.is_ipv4() {
            FAMILY_IPV4
        } else {
            FAMILY_IPV6
        };
        let snat = conntrack_entries(setup.pins[0].path())
            .expect("node A's conntrack")
            .into_iter()
            .find(|(key, _)| {
                key.family == family
                    && key.direction == CT_DIR_SNAT
                    && key.sport == client_port.to_be()
            })
            .map(|(_, value)| {
                let addr: IpAddr = if frontend.is_ipv4() {
                    map_addr_v4_octets(&value.nat_addr).into()
                } else {
                    std::net::Ipv6Addr::from(value.nat_addr).into()
                };
                SocketAddr::new(addr, u16::from_be(value.nat_port))
            })
            .unwrap_or_else(|| panic!("{mode}: {frontend}: no SNAT entry on node A"));

        let (message, reported) = if frontend.is_ipv4() {
            (frag_needed(snat, backend), i32::from(REPORTED_MTU))
        } else {
            (
                packet_too_big(snat, backend, &payload),
                REPORTED_MTU6 as i32,
            )
        };
        send_icmp(&backend_pod.ns, snat.ip(), message);
        assert_path_mtu_becomes(&socket, reported);
    }
}

#[test]
fn xdp_path_mtu_errors_from_a_remote_backend_reach_the_node_port_client() {
    require_root!();
    path_mtu_errors_cross_an_snated_node_port("xdp");
}

#[test]
fn tc_path_mtu_errors_from_a_remote_backend_reach_the_node_port_client() {
    require_root!();
    path_mtu_errors_cross_an_snated_node_port("tc");
}
