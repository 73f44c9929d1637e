//! Datapath tests of IPv4 fragments through BPF_PROG_TEST_RUN: a UDP
//! datagram larger than the MTU arrives as fragments, and every hook that
//! translates translates all of them: the first by its UDP header (whose
//! checksum covers the whole datagram), the later ones by the ports the
//! first recorded at that hook. Both directions, on from_pod, to_pod,
//! from_network (XDP and TC), to_network and hairpin. Expected outputs are
//! the fragments of the translated datagram, byte for byte.

use std::net::Ipv4Addr;

use service_agent::datapath::{
    PROG_FROM_NETWORK, PROG_FROM_NETWORK_TC, PROG_FROM_POD, PROG_TO_NETWORK, PROG_TO_POD,
};
use service_common::{FRONTEND_FLAG_NODE_PORT, HAIRPIN_IPV4, PROTO_UDP};
use service_tests::{
    datapath_fixture::Datapath,
    packets::{CLIENT_MAC, Case, Expect, NODE_MAC, run_cases, udp_fragments},
    require_root,
};

/// `TC_ACT_UNSPEC` as BPF_PROG_TEST_RUN reports it: the packet continues.
const CONTINUE: u32 = u32::MAX;
/// `TC_ACT_REDIRECT`: sent back out the device it came in on.
const REDIRECT: u32 = 7;
/// `XDP_PASS`.
const XDP_PASS: u32 = 2;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EXTERNAL_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const SNAT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(
    HAIRPIN_IPV4[0],
    HAIRPIN_IPV4[1],
    HAIRPIN_IPV4[2],
    HAIRPIN_IPV4[3],
);
/// The datagrams' payload: 2000 bytes, as large DNS answers and syslog
/// messages are; cut after the first 1480 bytes of UDP, as a 1500-byte MTU
/// cuts it.
const PAYLOAD: [u8; 2000] = {
    let mut payload = [0u8; 2000];
    let mut i = 0;
    while i < payload.len() {
        payload[i] = (i % 251) as u8;
        i += 1;
    }
    payload
};
const FIRST_FRAGMENT_L4_LEN: usize = 1480;

/// The fragments of the datagram `src -> dst` (IP identification `id`).
fn fragments(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), id: u16) -> [Vec<u8>; 2] {
    udp_fragments(src, dst, &PAYLOAD, FIRST_FRAGMENT_L4_LEN, id)
}

/// Two rows: the fragments of `src -> dst` through `program`, expected to
/// come out as the fragments of `out_src -> out_dst` with `verdict`.
#[expect(
    clippy::too_many_arguments,
    reason = "one table row per fragment, all built from the same datagram description"
)]
fn fragment_rows(
    name: [&'static str; 2],
    program: &'static str,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    out_src: (Ipv4Addr, u16),
    out_dst: (Ipv4Addr, u16),
    id: u16,
    verdict: u32,
) -> Vec<Case> {
    let [first, later] = fragments(src, dst, id);
    let [out_first, out_later] = fragments(out_src, out_dst, id);
    vec![
        Case {
            name: name[0],
            program,
            input: first,
            verdict,
            expect: Expect::Bytes(out_first),
        },
        Case {
            name: name[1],
            program,
            input: later,
            verdict,
            expect: Expect::Bytes(out_later),
        },
    ]
}

/// `packet` with its Ethernet addresses swapped (sent back where it came from).
fn sent_back(mut packet: Vec<u8>) -> Vec<u8> {
    packet[..6].copy_from_slice(&CLIENT_MAC);
    packet[6..12].copy_from_slice(&NODE_MAC);
    packet
}

#[test]
fn fragments_to_a_cluster_ip_and_back_are_translated() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_service(VIP, 53, PROTO_UDP, &[(BACKEND, 5353)]);
    let (client, vip, backend) = ((CLIENT, 50000), (VIP, 53), (BACKEND, 5353));
    let mut rows = fragment_rows(
        [
            "from_pod: the first fragment is DNATed (ports and UDP checksum too)",
            "from_pod: the later fragment follows it (addresses only)",
        ],
        PROG_FROM_POD,
        client,
        vip,
        client,
        backend,
        1,
        CONTINUE,
    );
    rows.extend(fragment_rows(
        [
            "to_pod: the answer's first fragment comes from the ClusterIP",
            "to_pod: so does its later fragment",
        ],
        PROG_TO_POD,
        backend,
        client,
        vip,
        client,
        2,
        CONTINUE,
    ));
    run_cases(&dp, rows);
    assert_eq!(dp.counter("fragment_translated"), 2);
}

#[test]
fn a_later_fragment_without_its_first_passes_untouched_and_opens_no_flow() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_service(VIP, 53, PROTO_UDP, &[(BACKEND, 5353)]);
    let [_, later] = fragments((CLIENT, 50001), (VIP, 53), 3);
    let [_, unrelated] = fragments((CLIENT, 50002), (BACKEND, 5353), 4);
    run_cases(
        &dp,
        vec![
            Case {
                name: "a later fragment whose first fragment was never seen",
                program: PROG_FROM_POD,
                input: later,
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "a later fragment of traffic that is none of ours",
                program: PROG_TO_POD,
                input: unrelated,
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
        ],
    );
    assert!(
        dp.conntrack.keys().next().is_none(),
        "no conntrack entry was created"
    );
}

#[test]
fn fragments_to_a_local_nodeport_are_translated_on_xdp_and_tc() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_frontend(
        NODE_IP,
        30053,
        PROTO_UDP,
        FRONTEND_FLAG_NODE_PORT,
        &[(BACKEND, 5353, true)],
    );
    let (node_port, backend) = ((NODE_IP, 30053), (BACKEND, 5353));
    let (xdp_client, tc_client) = ((EXTERNAL_CLIENT, 50010), (EXTERNAL_CLIENT, 50011));
    let mut rows = fragment_rows(
        [
            "XDP: the first fragment is DNATed",
            "XDP: the later fragment follows it",
        ],
        PROG_FROM_NETWORK,
        xdp_client,
        node_port,
        xdp_client,
        backend,
        10,
        XDP_PASS,
    );
    rows.extend(fragment_rows(
        [
            "TC: the first fragment is DNATed",
            "TC: the later fragment follows it",
        ],
        PROG_FROM_NETWORK_TC,
        tc_client,
        node_port,
        tc_client,
        backend,
        11,
        CONTINUE,
    ));
    rows.extend(fragment_rows(
        [
            "to_network: the answer's first fragment comes from the NodePort",
            "to_network: so does its later fragment",
        ],
        PROG_TO_NETWORK,
        backend,
        xdp_client,
        node_port,
        xdp_client,
        12,
        CONTINUE,
    ));
    run_cases(&dp, rows);
}

#[test]
fn fragments_to_a_remote_backend_are_snated_and_their_answers_restored() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_snat_address(SNAT_IP);
    dp.set_frontend(
        NODE_IP,
        30053,
        PROTO_UDP,
        FRONTEND_FLAG_NODE_PORT,
        &[(REMOTE, 5353, false)],
    );
    let (client, node_port, remote) = ((EXTERNAL_CLIENT, 50020), (NODE_IP, 30053), (REMOTE, 5353));
    // In: DNAT on XDP, then SNAT on the way to the other node.
    run_cases(
        &dp,
        fragment_rows(
            [
                "XDP: the first fragment is DNATed to the remote backend",
                "XDP: the later fragment follows it",
            ],
            PROG_FROM_NETWORK,
            client,
            node_port,
            client,
            remote,
            20,
            XDP_PASS,
        ),
    );
    let [first, _] = fragments(client, remote, 20);
    let (_, snatted) = dp.run(PROG_TO_NETWORK, &first);
    let snat_port = u16::from_be_bytes([snatted[34], snatted[35]]);
    let mut rows = fragment_rows(
        [
            "to_network: the first fragment gets the SNAT source",
            "to_network: so does the later one (address only)",
        ],
        PROG_TO_NETWORK,
        client,
        remote,
        (SNAT_IP, snat_port),
        remote,
        21,
        CONTINUE,
    );
    // Back: reverse SNAT on XDP, then the NodePort restored on the way out.
    rows.extend(fragment_rows(
        [
            "XDP: the answer's first fragment goes to the client again",
            "XDP: so does its later fragment",
        ],
        PROG_FROM_NETWORK,
        remote,
        (SNAT_IP, snat_port),
        remote,
        client,
        22,
        XDP_PASS,
    ));
    rows.extend(fragment_rows(
        [
            "to_network: the answer's first fragment comes from the NodePort",
            "to_network: so does its later fragment",
        ],
        PROG_TO_NETWORK,
        remote,
        client,
        node_port,
        client,
        22,
        CONTINUE,
    ));
    run_cases(&dp, rows);
}

#[test]
fn fragments_of_a_hairpin_flow_are_translated_both_ways() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_service(VIP, 53, PROTO_UDP, &[(BACKEND, 5353)]);
    // The backend pod reaches itself through the ClusterIP.
    let (pod, vip, target) = ((BACKEND, 50030), (VIP, 53), (BACKEND, 5353));
    let [first, later] = fragments(pod, vip, 30);
    let [out_first, out_later] = fragments((HAIRPIN, 50030), target, 30);
    let [reply_first, reply_later] = fragments(target, (HAIRPIN, 50030), 31);
    let [back_first, back_later] = fragments(vip, pod, 31);
    run_cases(
        &dp,
        vec![
            Case {
                name: "the first fragment is DNATed and SNATed to the hairpin address",
                program: PROG_FROM_POD,
                input: first,
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(out_first)),
            },
            Case {
                name: "so is the later one",
                program: PROG_FROM_POD,
                input: later,
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(out_later)),
            },
            Case {
                name: "the answer's first fragment comes from the ClusterIP to the pod",
                program: PROG_FROM_POD,
                input: reply_first,
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(back_first)),
            },
            Case {
                name: "so does its later fragment",
                program: PROG_FROM_POD,
                input: reply_later,
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(back_later)),
            },
        ],
    );
}
