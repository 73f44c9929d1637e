//! Datapath tests of hairpin flows through BPF_PROG_TEST_RUN: a pod that
//! reaches a ClusterIP whose chosen backend is the pod itself gets the flow
//! SNATed to the link-local hairpin address (its client port kept) on every
//! packet, its replies to that address translated back to the ClusterIP,
//! and both directions sent straight back out the device they came in on
//! (redirect, Ethernet addresses swapped). Flows of other pods, and flows
//! of the same pod that land on another backend, are unaffected.
//! Expected outputs are exact bytes built with etherparse; their checksums
//! are verified on their own too.

use std::net::Ipv4Addr;

use service_agent::datapath::{PROG_FROM_POD, PROG_TO_POD};
use service_common::{
    CT_DIR_FORWARD, CT_DIR_HAIRPIN_REPLY, CT_DIR_REPLY, CT_FLAG_HAIRPIN, HAIRPIN_IPV4, PROTO_TCP,
    PROTO_UDP,
};
use service_tests::{
    datapath_fixture::{Datapath, ct_key},
    packets::{Case, Expect, assert_checksums_valid, run_cases, sent_back, tcp, udp},
    require_root,
};

/// `TC_ACT_UNSPEC` as BPF_PROG_TEST_RUN reports it: the packet continues.
const CONTINUE: u32 = u32::MAX;
/// `TC_ACT_REDIRECT`: the packet leaves through the device `bpf_redirect`
/// chose (here: back out the one it came in on).
const REDIRECT: u32 = 7;

/// The pod that reaches itself: the client, and the Service's backend.
const POD: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
/// Another pod, a client of the same Service.
const OTHER_POD: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// Another backend pod (for the Service with two backends).
const OTHER_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_TWO_BACKENDS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(
    HAIRPIN_IPV4[0],
    HAIRPIN_IPV4[1],
    HAIRPIN_IPV4[2],
    HAIRPIN_IPV4[3],
);

#[test]
fn a_pod_reaching_itself_through_its_cluster_ip_is_hairpinned() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_service(VIP, 80, PROTO_TCP, &[(POD, 8080)]);
    dp.set_service(VIP, 53, PROTO_UDP, &[(POD, 5353)]);

    let client = (POD, 40000);
    let other = (OTHER_POD, 40001);
    let request = b"GET / HTTP/1.1\r\n\r\n";
    run_cases(
        &dp,
        vec![
            Case {
                name: "the SYN to the ClusterIP goes back to the pod, from the hairpin address",
                program: PROG_FROM_POD,
                input: tcp(client, (VIP, 80), true, false, &[]),
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(tcp(
                    (HAIRPIN, 40000),
                    (POD, 8080),
                    true,
                    false,
                    &[],
                ))),
            },
            Case {
                name: "the hairpinned SYN leaving for the pod passes to_pod untouched",
                program: PROG_TO_POD,
                input: sent_back(tcp((HAIRPIN, 40000), (POD, 8080), true, false, &[])),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "the pod's SYN-ACK to the hairpin address comes back from the ClusterIP",
                program: PROG_FROM_POD,
                input: tcp((POD, 8080), (HAIRPIN, 40000), true, true, &[]),
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(tcp((VIP, 80), client, true, true, &[]))),
            },
            Case {
                name: "the translated SYN-ACK leaving for the pod passes to_pod untouched",
                program: PROG_TO_POD,
                input: sent_back(tcp((VIP, 80), client, true, true, &[])),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "a later ACK of the flow is SNATed again",
                program: PROG_FROM_POD,
                input: tcp(client, (VIP, 80), false, true, &[]),
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(tcp(
                    (HAIRPIN, 40000),
                    (POD, 8080),
                    false,
                    true,
                    &[],
                ))),
            },
            Case {
                name: "a data segment of the flow is SNATed again",
                program: PROG_FROM_POD,
                input: tcp(client, (VIP, 80), false, true, request),
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(tcp(
                    (HAIRPIN, 40000),
                    (POD, 8080),
                    false,
                    true,
                    request,
                ))),
            },
            Case {
                name: "the pod's data reply to the hairpin address comes back from the ClusterIP",
                program: PROG_FROM_POD,
                input: tcp((POD, 8080), (HAIRPIN, 40000), false, true, b"web-1"),
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(tcp((VIP, 80), client, false, true, b"web-1"))),
            },
            Case {
                name: "UDP to the ClusterIP from the backend pod is hairpinned",
                program: PROG_FROM_POD,
                input: udp((POD, 50000), (VIP, 53), b"query"),
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(udp((HAIRPIN, 50000), (POD, 5353), b"query"))),
            },
            Case {
                name: "the UDP answer to the hairpin address comes back from the ClusterIP",
                program: PROG_FROM_POD,
                input: udp((POD, 5353), (HAIRPIN, 50000), b"answer"),
                verdict: REDIRECT,
                expect: Expect::Bytes(sent_back(udp((VIP, 53), (POD, 50000), b"answer"))),
            },
            Case {
                name: "another pod's SYN to the same ClusterIP is only DNATed",
                program: PROG_FROM_POD,
                input: tcp(other, (VIP, 80), true, false, &[]),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(other, (POD, 8080), true, false, &[])),
            },
            Case {
                name: "its reply is reverse-translated on the way to it, as before",
                program: PROG_TO_POD,
                input: tcp((POD, 8080), other, true, true, &[]),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp((VIP, 80), other, true, true, &[])),
            },
            Case {
                name: "its later ACK is only DNATed",
                program: PROG_FROM_POD,
                input: tcp(other, (VIP, 80), false, true, request),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(other, (POD, 8080), false, true, request)),
            },
            Case {
                name: "the backend pod's reply to the other pod is not taken for a hairpin",
                program: PROG_FROM_POD,
                input: tcp((POD, 8080), other, false, true, b"web-1"),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "a packet to the hairpin address of no tracked flow passes untouched",
                program: PROG_FROM_POD,
                input: tcp((POD, 8080), (HAIRPIN, 40999), false, true, &[]),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "a packet to the hairpin address from another pod passes untouched",
                program: PROG_FROM_POD,
                input: tcp((OTHER_POD, 8080), (HAIRPIN, 40000), false, true, &[]),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
        ],
    );
    // Three hairpin replies and the other pod's one.
    assert_eq!(dp.counter("reply_translated"), 4);
    assert_eq!(dp.counter("drop_rewrite"), 0);

    // The hairpin flow: a forward entry flagged hairpin, and instead of the
    // usual reply entry one keyed by the reply to the hairpin address,
    // naming the frontend to restore (the client is the pod itself).
    let forward = dp
        .conntrack
        .get(&ct_key(client, (VIP, 80), PROTO_TCP, CT_DIR_FORWARD), 0)
        .expect("forward entry of the hairpin flow");
    assert_eq!(forward.nat_addr[..4], POD.octets());
    assert_eq!(u16::from_be(forward.nat_port), 8080);
    assert_eq!(forward.flags & CT_FLAG_HAIRPIN, CT_FLAG_HAIRPIN);
    let reply = dp
        .conntrack
        .get(
            &ct_key(
                (POD, 8080),
                (HAIRPIN, 40000),
                PROTO_TCP,
                CT_DIR_HAIRPIN_REPLY,
            ),
            0,
        )
        .expect("hairpin reply entry");
    assert_eq!(reply.nat_addr[..4], VIP.octets());
    assert_eq!(u16::from_be(reply.nat_port), 80);
    assert_eq!(reply.flags, CT_FLAG_HAIRPIN);
    assert_eq!(reply.rev_nat_id, forward.rev_nat_id);
    assert!(
        dp.conntrack
            .get(&ct_key((POD, 8080), client, PROTO_TCP, CT_DIR_REPLY), 0)
            .is_err(),
        "a hairpin flow has no ordinary reply entry"
    );

    // The other pod's flow: no hairpin flag, an ordinary reply entry.
    let forward = dp
        .conntrack
        .get(&ct_key(other, (VIP, 80), PROTO_TCP, CT_DIR_FORWARD), 0)
        .expect("forward entry of the other pod's flow");
    assert_eq!(forward.flags & CT_FLAG_HAIRPIN, 0);
    let reply = dp
        .conntrack
        .get(&ct_key((POD, 8080), other, PROTO_TCP, CT_DIR_REPLY), 0)
        .expect("reply entry of the other pod's flow");
    assert_eq!(reply.flags & CT_FLAG_HAIRPIN, 0);
}

/// With two backends, the pod's flows that land on itself are hairpinned
/// and those that land on the other backend are plain DNAT: the decision is
/// per flow, and stays with the flow.
#[test]
fn hairpin_is_decided_per_flow_by_the_chosen_backend() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_service(
        VIP_TWO_BACKENDS,
        80,
        PROTO_TCP,
        &[(POD, 8080), (OTHER_BACKEND, 8080)],
    );
    let (mut hairpinned, mut plain) = (0, 0);
    for port in 0..200u16 {
        let client = (POD, 20000 + port);
        let syn = tcp(client, (VIP_TWO_BACKENDS, 80), true, false, &[]);
        let ack = tcp(client, (VIP_TWO_BACKENDS, 80), false, true, b"x");
        let (verdict, out) = dp.run(PROG_FROM_POD, &syn);
        let (ack_verdict, ack_out) = dp.run(PROG_FROM_POD, &ack);
        let case = format!("flow from port {}", client.1);
        assert_checksums_valid(&out, &case);
        if verdict == REDIRECT {
            hairpinned += 1;
            let hairpin = (HAIRPIN, client.1);
            assert_eq!(
                out,
                sent_back(tcp(hairpin, (POD, 8080), true, false, &[])),
                "{case}"
            );
            assert_eq!(ack_verdict, REDIRECT, "{case}: the ACK");
            assert_eq!(
                ack_out,
                sent_back(tcp(hairpin, (POD, 8080), false, true, b"x")),
                "{case}: the ACK"
            );
        } else {
            plain += 1;
            assert_eq!(verdict, CONTINUE, "{case}");
            assert_eq!(
                out,
                tcp(client, (OTHER_BACKEND, 8080), true, false, &[]),
                "{case}"
            );
            assert_eq!(ack_verdict, CONTINUE, "{case}: the ACK");
            assert_eq!(
                ack_out,
                tcp(client, (OTHER_BACKEND, 8080), false, true, b"x"),
                "{case}: the ACK"
            );
        }
    }
    // Random choice between two backends: each far above 25% of 200.
    assert!(hairpinned >= 50 && plain >= 50, "{hairpinned} / {plain}");
}
