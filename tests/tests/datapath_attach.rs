//! Attaching the datapath the way the agent does (`Attachments::scan`), then
//! real UDP through it: on kernels with tcx (6.6+) pinned tcx links, before
//! that clsact with cls_bpf filters through netlink (the path Debian 12's
//! 6.1 takes; the kernel matrix of `cargo xtask test` runs this test there).
//! For each set of hooks (a pod device; an external device with XDP; with
//! TC), a first agent attaches them, the datapath keeps translating after
//! that agent is gone, and a second agent takes the device over.
//!
//! Everything happens on the loopback device of a private network
//! namespace: client 127.0.0.2, backend 127.0.0.1, frontends elsewhere in
//! 127.0.0.0/8, which the loopback route serves.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use aya::util::KernelVersion;
use service_agent::datapath::{
    self,
    attach::{Attachments, DeviceSelection, NodePortMode},
};
use service_common::{FRONTEND_FLAG_CLUSTER_IP, FRONTEND_FLAG_NODE_PORT, PROTO_UDP};
use service_tests::{datapath_fixture::Datapath, netns::in_private_namespace, require_root};

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const BACKEND: (Ipv4Addr, u16) = (Ipv4Addr::new(127, 0, 0, 1), 8080);

/// One agent's attachments of the datapath to `lo`, as `service-agent run`
/// makes them.
fn attach(dp: &mut Datapath, selection: &DeviceSelection) {
    let link_dir = dp.pin.path().join("links");
    std::fs::create_dir_all(&link_dir).expect("link folder");
    let mut attachments = Attachments::default();
    attachments
        .scan(&mut dp.ebpf, selection, &link_dir)
        .expect("scanning the devices");
    assert_eq!(
        attachments.devices().collect::<Vec<_>>(),
        ["lo"],
        "the programs are attached to lo (see the log for why not)"
    );
}

/// A UDP request from the client to `frontend` is answered by the backend,
/// and the answer reaches the client from the frontend (a connected socket
/// takes datagrams from its peer only).
fn assert_served(frontend: SocketAddr, step: &str) {
    let server = UdpSocket::bind(BACKEND).expect("backend socket");
    let client = UdpSocket::bind((CLIENT, 0)).expect("client socket");
    client.connect(frontend).expect("connect");
    for socket in [&server, &client] {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
    }
    client.send(b"ping").expect("send");
    let mut buffer = [0u8; 16];
    let (len, from) = server
        .recv_from(&mut buffer)
        .unwrap_or_else(|e| panic!("{step}: the backend got nothing for {frontend}: {e}"));
    assert_eq!(&buffer[..len], b"ping", "{step}");
    assert_eq!(from, client.local_addr().unwrap(), "{step}: client kept");
    server.send_to(b"pong", from).expect("answer");
    let len = client
        .recv(&mut buffer)
        .unwrap_or_else(|e| panic!("{step}: no answer from {frontend}: {e}"));
    assert_eq!(&buffer[..len], b"pong", "{step}");
}

/// Programs `frontend` (of kind `flags`) with the backend, attaches with a
/// first agent, serves, lets that agent go, serves, attaches a second
/// agent, serves.
fn attach_serve_and_take_over(selection: DeviceSelection, frontend: SocketAddr, flags: u16) {
    let SocketAddr::V4(v4) = frontend else {
        unreachable!("IPv4 frontends only")
    };
    let mut dp = Datapath::load();
    dp.set_frontend(
        *v4.ip(),
        v4.port(),
        PROTO_UDP,
        flags,
        &[(BACKEND.0, BACKEND.1, true)],
    );
    attach(&mut dp, &selection);
    assert_served(frontend, "first agent");

    // The first agent exits: its programs stay attached.
    let second = datapath::load(dp.pin.path()).expect("loading the second agent");
    drop(std::mem::replace(&mut dp.ebpf, second));
    assert_served(frontend, "first agent gone");

    attach(&mut dp, &selection);
    assert_served(frontend, "second agent");
}

#[test]
fn every_program_attaches_serves_and_is_taken_over_by_a_new_agent() {
    require_root!();
    let mechanism = if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
        "tcx links"
    } else {
        "clsact and cls_bpf through netlink"
    };
    eprintln!("TC programs attach with {mechanism} on this kernel");
    let cases = [
        (
            "from_pod and to_pod on a pod device",
            DeviceSelection {
                names: vec!["lo".into()],
                ..DeviceSelection::default()
            },
            SocketAddr::from(([127, 0, 0, 10], 80)),
            FRONTEND_FLAG_CLUSTER_IP,
        ),
        (
            "from_network (XDP) and to_network on an external device",
            DeviceSelection {
                external: vec!["lo".into()],
                nodeport_mode: NodePortMode::Xdp,
                ..DeviceSelection::default()
            },
            SocketAddr::from(([127, 0, 0, 20], 30080)),
            FRONTEND_FLAG_NODE_PORT,
        ),
        (
            "from_network_tc and to_network on an external device",
            DeviceSelection {
                external: vec!["lo".into()],
                nodeport_mode: NodePortMode::Tc,
                ..DeviceSelection::default()
            },
            SocketAddr::from(([127, 0, 0, 20], 30080)),
            FRONTEND_FLAG_NODE_PORT,
        ),
    ];
    for (hooks, selection, frontend, flags) in cases {
        in_private_namespace(move || attach_serve_and_take_over(selection, frontend, flags))
            .unwrap_or_else(|e| panic!("{hooks}: {e:#}"));
    }
}
