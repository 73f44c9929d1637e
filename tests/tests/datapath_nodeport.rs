//! Datapath tests of traffic from the network through BPF_PROG_TEST_RUN:
//! `from_network` on XDP (and its TC twin) DNATs NodePort, LoadBalancer and
//! externalIP flows and gives replies of SNATed flows their client back;
//! `to_network` on TC egress SNATs flows to remote backends and restores
//! the frontend as the source of replies. Table-driven: input packet,
//! verdict, exact output bytes, checksums verified.
//!
//! Checksum offload on XDP: a packet whose L4 checksum is left to offload
//! (the field holds only the pseudo-header sum, as from a veth whose peer
//! transmits with offload on) is not translated by XDP, which cannot tell
//! such a checksum from a full one, but deferred to the TC ingress program
//! beside it: XDP passes it untouched with a mark in its metadata. The TC
//! program translates only marked packets (its marked path needs an skb
//! with XDP metadata, which BPF_PROG_TEST_RUN cannot build: the end-to-end
//! tests with the client's offload on cover it).

use std::net::Ipv4Addr;

use service_agent::datapath::{
    PROG_FROM_NETWORK, PROG_FROM_NETWORK_DEFERRED, PROG_FROM_NETWORK_TC, PROG_TO_NETWORK,
};
use service_common::{
    CT_DIR_FORWARD, FRONTEND_FLAG_CLUSTER_IP, FRONTEND_FLAG_EXTERNAL_IP,
    FRONTEND_FLAG_LOAD_BALANCER, FRONTEND_FLAG_NODE_PORT, PROTO_TCP, PROTO_UDP, SnatPortRange,
};
use service_tests::{
    datapath_fixture::{Datapath, ct_key},
    packets::{
        Case, Expect, assert_checksums_valid, run_cases, tcp, udp, udp_without_checksum,
        with_partial_checksum,
    },
    require_root,
};

/// `XDP_PASS`.
const XDP_PASS: u32 = 2;
/// `TC_ACT_UNSPEC` as BPF_PROG_TEST_RUN reports it: the packet continues.
const TC_CONTINUE: u32 = u32::MAX;
/// `TC_ACT_REDIRECT`: refused, the reply sent back out.
const TC_REDIRECT: u32 = 7;

/// The metadata XDP puts in front of a deferred packet ("SLBD").
const DEFERRED_MARK: [u8; 4] = *b"SLBD";

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const SNAT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 100);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 200);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LOCAL_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);

/// NodePort 30080 -> a backend on this node; 30081 -> one on another node;
/// 30099 -> none; LB IP and externalIP -> local; a ClusterIP -> local.
fn nodeport_datapath() -> Datapath {
    let mut dp = Datapath::load();
    dp.set_snat_address(SNAT_IP);
    let local = [(LOCAL_BACKEND, 8080, true)];
    let remote = [(REMOTE_BACKEND, 8080, false)];
    dp.set_frontend(NODE_IP, 30080, PROTO_TCP, FRONTEND_FLAG_NODE_PORT, &local);
    dp.set_frontend(NODE_IP, 30081, PROTO_TCP, FRONTEND_FLAG_NODE_PORT, &remote);
    dp.set_frontend(
        NODE_IP,
        30053,
        PROTO_UDP,
        FRONTEND_FLAG_NODE_PORT,
        &[(LOCAL_BACKEND, 5353, true)],
    );
    dp.set_frontend(NODE_IP, 30099, PROTO_TCP, FRONTEND_FLAG_NODE_PORT, &[]);
    dp.set_frontend(LB_IP, 80, PROTO_TCP, FRONTEND_FLAG_LOAD_BALANCER, &local);
    dp.set_frontend(
        EXTERNAL_IP,
        80,
        PROTO_TCP,
        FRONTEND_FLAG_EXTERNAL_IP,
        &local,
    );
    dp.set_frontend(CLUSTER_IP, 80, PROTO_TCP, FRONTEND_FLAG_CLUSTER_IP, &local);
    dp
}

#[test]
fn xdp_dnats_external_frontends_and_to_network_restores_their_replies() {
    require_root!();
    let dp = nodeport_datapath();
    let client = (CLIENT, 40000);
    let backend = (LOCAL_BACKEND, 8080);
    run_cases(
        &dp,
        vec![
            Case {
                name: "a SYN to a NodePort is DNATed to the local backend, client kept",
                program: PROG_FROM_NETWORK,
                input: tcp(client, (NODE_IP, 30080), true, false, &[]),
                verdict: XDP_PASS,
                expect: Expect::Bytes(tcp(client, backend, true, false, &[])),
            },
            Case {
                name: "its SYN-ACK leaving the node gets the NodePort back as source",
                program: PROG_TO_NETWORK,
                input: tcp(backend, client, true, true, &[]),
                verdict: TC_CONTINUE,
                expect: Expect::Bytes(tcp((NODE_IP, 30080), client, true, true, &[])),
            },
            Case {
                name: "a data segment of the flow keeps its backend",
                program: PROG_FROM_NETWORK,
                input: tcp(
                    client,
                    (NODE_IP, 30080),
                    false,
                    true,
                    b"GET / HTTP/1.1\r\n\r\n",
                ),
                verdict: XDP_PASS,
                expect: Expect::Bytes(tcp(client, backend, false, true, b"GET / HTTP/1.1\r\n\r\n")),
            },
            Case {
                name: "UDP to a NodePort is DNATed with its checksum updated",
                program: PROG_FROM_NETWORK,
                input: udp((CLIENT, 50000), (NODE_IP, 30053), b"query"),
                verdict: XDP_PASS,
                expect: Expect::Bytes(udp((CLIENT, 50000), (LOCAL_BACKEND, 5353), b"query")),
            },
            Case {
                name: "UDP without checksum keeps checksum 0",
                program: PROG_FROM_NETWORK,
                input: udp_without_checksum((CLIENT, 50001), (NODE_IP, 30053), b"query"),
                verdict: XDP_PASS,
                expect: Expect::Bytes(udp_without_checksum(
                    (CLIENT, 50001),
                    (LOCAL_BACKEND, 5353),
                    b"query",
                )),
            },
            Case {
                name: "a LoadBalancer IP is served",
                program: PROG_FROM_NETWORK,
                input: tcp((CLIENT, 40001), (LB_IP, 80), true, false, &[]),
                verdict: XDP_PASS,
                expect: Expect::Bytes(tcp((CLIENT, 40001), backend, true, false, &[])),
            },
            Case {
                name: "an externalIP is served",
                program: PROG_FROM_NETWORK,
                input: tcp((CLIENT, 40002), (EXTERNAL_IP, 80), true, false, &[]),
                verdict: XDP_PASS,
                expect: Expect::Bytes(tcp((CLIENT, 40002), backend, true, false, &[])),
            },
            Case {
                name: "a ClusterIP is not served to the network",
                program: PROG_FROM_NETWORK,
                input: tcp((CLIENT, 40003), (CLUSTER_IP, 80), true, false, &[]),
                verdict: XDP_PASS,
                expect: Expect::Untouched,
            },
            Case {
                name: "a NodePort without backend is left, marked, to TC to refuse",
                program: PROG_FROM_NETWORK,
                input: tcp((CLIENT, 40004), (NODE_IP, 30099), true, false, &[]),
                verdict: XDP_PASS,
                expect: Expect::Bytes(deferred(&tcp(
                    (CLIENT, 40004),
                    (NODE_IP, 30099),
                    true,
                    false,
                    &[],
                ))),
            },
            Case {
                name: "traffic to no frontend passes untouched",
                program: PROG_FROM_NETWORK,
                input: tcp((CLIENT, 40005), (NODE_IP, 22), true, false, &[]),
                verdict: XDP_PASS,
                expect: Expect::Untouched,
            },
            Case {
                name: "to_network leaves other traffic untouched",
                program: PROG_TO_NETWORK,
                input: tcp((NODE_IP, 22), (CLIENT, 40005), true, true, &[]),
                verdict: TC_CONTINUE,
                expect: Expect::Untouched,
            },
        ],
    );
}

#[test]
fn a_remote_backend_is_reached_through_snat_and_its_replies_come_back() {
    require_root!();
    let dp = nodeport_datapath();
    let client = (CLIENT, 41000);
    let remote = (REMOTE_BACKEND, 8080);
    // Ingress: DNAT only; the source is still the client.
    let (verdict, dnatted) = dp.run(
        PROG_FROM_NETWORK,
        &tcp(client, (NODE_IP, 30081), true, false, &[]),
    );
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(dnatted, tcp(client, remote, true, false, &[]));
    // Egress towards the other node: SNAT to this node's address and a port
    // of the SNAT range.
    let (verdict, snatted) = dp.run(PROG_TO_NETWORK, &dnatted);
    assert_eq!(verdict, TC_CONTINUE);
    let snat_port = u16::from_be_bytes([snatted[34], snatted[35]]);
    assert!(SnatPortRange::DEFAULT.contains(snat_port), "{snat_port}");
    assert_eq!(snatted, tcp((SNAT_IP, snat_port), remote, true, false, &[]));
    assert_checksums_valid(&snatted, "SNATed SYN");
    // A later segment of the flow gets the same SNAT port.
    let (_, later) = dp.run(
        PROG_FROM_NETWORK,
        &tcp(client, (NODE_IP, 30081), false, true, b"x"),
    );
    let (_, later) = dp.run(PROG_TO_NETWORK, &later);
    assert_eq!(later, tcp((SNAT_IP, snat_port), remote, false, true, b"x"));
    // The reply arrives for the SNAT address: ingress gives it its client
    // back as destination; egress towards the client restores the NodePort.
    let (verdict, unsnatted) = dp.run(
        PROG_FROM_NETWORK,
        &tcp(remote, (SNAT_IP, snat_port), true, true, &[]),
    );
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(unsnatted, tcp(remote, client, true, true, &[]));
    assert_checksums_valid(&unsnatted, "reverse-SNATed SYN-ACK");
    let (_, restored) = dp.run(PROG_TO_NETWORK, &unsnatted);
    assert_eq!(restored, tcp((NODE_IP, 30081), client, true, true, &[]));
    // A second client gets its own SNAT port.
    let (_, other) = dp.run(
        PROG_FROM_NETWORK,
        &tcp((CLIENT, 41001), (NODE_IP, 30081), true, false, &[]),
    );
    let (_, other) = dp.run(PROG_TO_NETWORK, &other);
    let other_port = u16::from_be_bytes([other[34], other[35]]);
    assert_ne!(other_port, snat_port);
}

#[test]
fn the_tc_fallback_translates_like_xdp_and_refuses_without_backend() {
    require_root!();
    let dp = nodeport_datapath();
    let client = (CLIENT, 42000);
    run_cases(
        &dp,
        vec![
            Case {
                name: "TC from_network DNATs a NodePort SYN",
                program: PROG_FROM_NETWORK_TC,
                input: tcp(client, (NODE_IP, 30080), true, false, &[]),
                verdict: TC_CONTINUE,
                expect: Expect::Bytes(tcp(client, (LOCAL_BACKEND, 8080), true, false, &[])),
            },
            Case {
                name: "TC from_network leaves a ClusterIP alone",
                program: PROG_FROM_NETWORK_TC,
                input: tcp(client, (CLUSTER_IP, 80), true, false, &[]),
                verdict: TC_CONTINUE,
                expect: Expect::Untouched,
            },
        ],
    );
    // Without a backend the TC hook answers itself (a RST sent back out).
    let (verdict, reply) = dp.run(
        PROG_FROM_NETWORK_TC,
        &tcp(client, (NODE_IP, 30099), true, false, &[]),
    );
    assert_eq!(verdict, TC_REDIRECT);
    assert_eq!(reply[47] & 0x04, 0x04, "RST flag set: {reply:?}");
    assert_checksums_valid(&reply, "RST");
}

/// `packet` as XDP passes it on when it defers it: the mark, then the
/// packet untouched (BPF_PROG_TEST_RUN returns the metadata in front).
fn deferred(packet: &[u8]) -> Vec<u8> {
    let mut out = DEFERRED_MARK.to_vec();
    out.extend_from_slice(packet);
    out
}

#[test]
fn xdp_defers_partial_checksums_to_tc_and_translates_full_ones() {
    require_root!();
    let dp = nodeport_datapath();
    let client = (CLIENT, 40000);
    let partial_syn = with_partial_checksum(tcp(client, (NODE_IP, 30080), true, false, &[]));
    let partial_udp = with_partial_checksum(udp((CLIENT, 50000), (NODE_IP, 30053), b"query"));
    run_cases(
        &dp,
        vec![
            Case {
                name: "a TCP SYN with a partial checksum is deferred, untouched",
                program: PROG_FROM_NETWORK,
                input: partial_syn.clone(),
                verdict: XDP_PASS,
                expect: Expect::Bytes(deferred(&partial_syn)),
            },
            Case {
                name: "a UDP datagram with a partial checksum is deferred, untouched",
                program: PROG_FROM_NETWORK,
                input: partial_udp.clone(),
                verdict: XDP_PASS,
                expect: Expect::Bytes(deferred(&partial_udp)),
            },
            Case {
                name: "the same SYN with a full checksum is translated by XDP",
                program: PROG_FROM_NETWORK,
                input: tcp((CLIENT, 40001), (NODE_IP, 30080), true, false, &[]),
                verdict: XDP_PASS,
                expect: Expect::Bytes(tcp(
                    (CLIENT, 40001),
                    (LOCAL_BACKEND, 8080),
                    true,
                    false,
                    &[],
                )),
            },
            Case {
                name: "the TC program beside XDP leaves an unmarked packet alone",
                program: PROG_FROM_NETWORK_DEFERRED,
                input: tcp((CLIENT, 40002), (NODE_IP, 30080), true, false, &[]),
                verdict: TC_CONTINUE,
                expect: Expect::Untouched,
            },
        ],
    );
    assert_eq!(dp.counter("checksum_deferred"), 2);
    // Deferred packets opened no flow: XDP did nothing but mark them.
    assert!(
        dp.entry(&ct_key(client, (NODE_IP, 30080), PROTO_TCP, CT_DIR_FORWARD))
            .is_none()
    );
}

#[test]
fn a_partial_reply_to_an_snated_flow_is_deferred_too() {
    require_root!();
    let dp = nodeport_datapath();
    let client = (CLIENT, 41000);
    let remote = (REMOTE_BACKEND, 8080);
    let (_, dnatted) = dp.run(
        PROG_FROM_NETWORK,
        &tcp(client, (NODE_IP, 30081), true, false, &[]),
    );
    let (_, snatted) = dp.run(PROG_TO_NETWORK, &dnatted);
    let snat_port = u16::from_be_bytes([snatted[34], snatted[35]]);
    let partial_reply = with_partial_checksum(tcp(remote, (SNAT_IP, snat_port), true, true, &[]));
    run_cases(
        &dp,
        vec![
            Case {
                name: "a reply with a partial checksum is deferred, untouched",
                program: PROG_FROM_NETWORK,
                input: partial_reply.clone(),
                verdict: XDP_PASS,
                expect: Expect::Bytes(deferred(&partial_reply)),
            },
            Case {
                name: "the same reply with a full checksum is translated by XDP",
                program: PROG_FROM_NETWORK,
                input: tcp(remote, (SNAT_IP, snat_port), true, true, &[]),
                verdict: XDP_PASS,
                expect: Expect::Bytes(tcp(remote, client, true, true, &[])),
            },
        ],
    );
}
