//! Datapath tests of checksum offload on XDP through BPF_PROG_TEST_RUN: a
//! packet whose L4 checksum is left to offload (the field holds only the
//! pseudo-header sum, as from a veth whose peer transmits with offload on)
//! is not translated by XDP, which cannot tell such a checksum from a full
//! one, but deferred to the TC ingress program beside it: XDP passes it
//! untouched with a mark in its metadata. The TC program translates only
//! marked packets (its marked path needs an skb with XDP metadata, which
//! BPF_PROG_TEST_RUN cannot build: the end-to-end tests with the client's
//! offload on cover it).

use std::net::Ipv4Addr;

use service_agent::datapath::{PROG_FROM_NETWORK, PROG_FROM_NETWORK_DEFERRED, PROG_TO_NETWORK};
use service_common::{FRONTEND_FLAG_NODE_PORT, PROTO_TCP, PROTO_UDP};
use service_tests::{
    datapath_fixture::Datapath,
    packets::{Case, Expect, run_cases, tcp, udp, with_partial_checksum},
    require_root,
};

/// `XDP_PASS`.
const XDP_PASS: u32 = 2;
/// `TC_ACT_UNSPEC` as BPF_PROG_TEST_RUN reports it: the packet continues.
const TC_CONTINUE: u32 = u32::MAX;
/// The metadata XDP puts in front of a deferred packet ("SLBD").
const DEFERRED_MARK: [u8; 4] = *b"SLBD";

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const SNAT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const LOCAL_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);

/// `packet` as XDP passes it on when it defers it: the mark, then the
/// packet untouched (BPF_PROG_TEST_RUN returns the metadata in front).
fn deferred(packet: &[u8]) -> Vec<u8> {
    let mut out = DEFERRED_MARK.to_vec();
    out.extend_from_slice(packet);
    out
}

fn nodeport_datapath() -> Datapath {
    let mut dp = Datapath::load();
    dp.set_snat_address(SNAT_IP);
    let local = [(LOCAL_BACKEND, 8080, true)];
    dp.set_frontend(NODE_IP, 30080, PROTO_TCP, FRONTEND_FLAG_NODE_PORT, &local);
    dp.set_frontend(
        NODE_IP,
        30053,
        PROTO_UDP,
        FRONTEND_FLAG_NODE_PORT,
        &[(LOCAL_BACKEND, 5353, true)],
    );
    dp.set_frontend(
        NODE_IP,
        30081,
        PROTO_TCP,
        FRONTEND_FLAG_NODE_PORT,
        &[(REMOTE_BACKEND, 8080, false)],
    );
    dp
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
        dp.entry(&service_tests::datapath_fixture::ct_key(
            client,
            (NODE_IP, 30080),
            PROTO_TCP,
            service_common::CT_DIR_FORWARD
        ))
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
