//! End to end in network namespaces: a Service whose EndpointSlice lists
//! no endpoint refuses new connections at once, like a closed port, instead
//! of leaving the client to time out: a TCP connect gets a RST
//! (ECONNREFUSED), a connected UDP socket gets an ICMP port unreachable
//! (ECONNREFUSED on its next receive). Also when the pod's checksums are
//! left to offload and the node's side of its veth completes them.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use service_agent::datapath::maps::datapath_counters;
use service_tests::{
    require_root,
    scenario::{ClusterIpScenario, http_frontend, udp_frontend, web_service_yaml},
};

/// The longest a refused TCP connect may take (the bound).
const TCP_REFUSAL_BOUND: Duration = Duration::from_millis(100);
/// The longest a UDP socket may wait for its ICMP port unreachable.
const UDP_REFUSAL_BOUND: Duration = Duration::from_secs(1);
/// How long the clients wait before giving up: far above both bounds, so
/// a timeout shows as a failed bound rather than a hang.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `target` over TCP: the error kind and how long it took.
fn tcp_connect(target: SocketAddr) -> (Result<(), ErrorKind>, Duration) {
    let start = Instant::now();
    let result = TcpStream::connect_timeout(&target, CLIENT_TIMEOUT)
        .map(drop)
        .map_err(|e| e.kind());
    (result, start.elapsed())
}

/// Sends one datagram on a UDP socket connected to `target` and waits for
/// an answer or an error: the outcome and how long it took.
fn udp_exchange(target: SocketAddr) -> std::io::Result<(Result<usize, ErrorKind>, Duration)> {
    let socket = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let start = Instant::now();
    socket.send(b"anyone?\n")?;
    let mut buf = [0u8; 512];
    let result = socket.recv(&mut buf).map_err(|e| e.kind());
    Ok((result, start.elapsed()))
}

/// From the client pod: a TCP connect to the empty Service's ClusterIP is
/// refused within [`TCP_REFUSAL_BOUND`], a connected UDP socket gets
/// ECONNREFUSED within [`UDP_REFUSAL_BOUND`], and the datapath counted both
/// refusals and dropped nothing.
fn assert_refused_at_once(scenario: &ClusterIpScenario) {
    let client = scenario.client();
    let (result, tcp_elapsed) = client
        .run(|| tcp_connect(http_frontend()))
        .expect("client thread");
    assert_eq!(
        result,
        Err(ErrorKind::ConnectionRefused),
        "TCP connect to {} after {tcp_elapsed:?}",
        http_frontend()
    );
    assert!(
        tcp_elapsed < TCP_REFUSAL_BOUND,
        "TCP connect refused only after {tcp_elapsed:?}"
    );

    let (result, udp_elapsed) = client
        .run(|| udp_exchange(udp_frontend()))
        .expect("client thread")
        .expect("UDP socket");
    assert_eq!(
        result,
        Err(ErrorKind::ConnectionRefused),
        "UDP exchange with {} after {udp_elapsed:?}",
        udp_frontend()
    );
    assert!(
        udp_elapsed < UDP_REFUSAL_BOUND,
        "UDP refused only after {udp_elapsed:?}"
    );
    eprintln!("refused at once: TCP connect in {tcp_elapsed:?}, UDP in {udp_elapsed:?}");

    let counters = datapath_counters(scenario.pin.path()).expect("counters");
    let counter = |name: &str| {
        counters
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, value)| *value)
            .unwrap_or_else(|| panic!("no counter {name}: {counters:?}"))
    };
    assert_eq!(counter("rejected_no_backend"), 2, "{counters:?}");
    assert_eq!(counter("drop_no_backend"), 0, "{counters:?}");
}

#[test]
fn a_service_without_endpoints_refuses_tcp_and_udp_at_once() {
    require_root!();
    let scenario = ClusterIpScenario::start("reject", &web_service_yaml(&[]), 0).expect("scenario");
    assert_refused_at_once(&scenario);
}

#[test]
fn refusals_survive_a_pod_device_that_completes_offloaded_checksums() {
    require_root!();
    let scenario =
        ClusterIpScenario::start("reject-csum", &web_service_yaml(&[]), 0).expect("scenario");
    // The pod leaves its L4 checksums to offload (CHECKSUM_PARTIAL) and the
    // node's side of its veth has no TX checksumming, so the kernel
    // completes the checksum of each reply from the pod packet's checksum
    // start before sending it: the replies must stay valid through that.
    let pod = &scenario.topology.pods[0];
    pod.ns
        .exec("ethtool", &["-K", "eth0", "tx", "on"])
        .expect("pod TX checksumming on");
    scenario
        .topology
        .node
        .exec("ethtool", &["-K", &pod.host_device, "tx", "off"])
        .expect("node-side TX checksumming off");
    assert_refused_at_once(&scenario);
}
