//! Datapath tests of the flow lifecycle through BPF_PROG_TEST_RUN: every
//! state transition of a conntrack entry (TCP SYN, established, FIN one way
//! and both, RST, a SYN reopening a closed tuple; UDP unreplied and
//! replied), expiry (an entry is aged by moving its `last_seen` back in the
//! map, never by waiting), backends that leave or stop serving, flows of a
//! deleted frontend, and SNAT ports running out and being taken over.
//! Packets and expected outputs are exact bytes; the map contents after
//! each step are checked against the shared contract's own functions.

use std::net::Ipv4Addr;

use service_agent::datapath::{PROG_FROM_NETWORK, PROG_FROM_POD, PROG_TO_NETWORK, PROG_TO_POD};
use service_common::{
    BACKEND_STATE_NOT_SERVING, BACKEND_STATE_TERMINATING, CT_DIR_FORWARD, CT_DIR_SNAT_REPLY,
    CT_STATE_FIN_FORWARD, CT_STATE_FIN_REPLY, CT_STATE_RST, CT_STATE_SEEN_REPLY, ConntrackKey,
    ConntrackTimeouts, FRONTEND_FLAG_NODE_PORT, PROTO_TCP, PROTO_UDP, TCP_FLAG_ACK, TCP_FLAG_FIN,
    TCP_FLAG_RST,
};
use service_tests::{
    datapath_fixture::{Datapath, ct_key},
    packets::{Case, Expect, run_cases, tcp, tcp_segment, udp},
    require_root,
};

/// `TC_ACT_UNSPEC` as BPF_PROG_TEST_RUN reports it: the packet continues.
const CONTINUE: u32 = u32::MAX;
/// `TC_ACT_SHOT`: dropped.
const DROP: u32 = 2;
/// `XDP_PASS`.
const XDP_PASS: u32 = 2;
/// `XDP_DROP`.
const XDP_DROP: u32 = 1;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const BACKEND_A: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
const BACKEND_B: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A second ClusterIP whose only job is to keep backend A in the backends
/// map after VIP moved to B.
const VIP_KEEPING_A: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const SNAT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);

/// Short, distinct timeouts, so each state's timeout is recognisable.
const TIMEOUTS: ConntrackTimeouts = ConntrackTimeouts {
    tcp_syn: 60,
    tcp_established: 1000,
    tcp_fin: 120,
    tcp_close: 10,
    udp: 30,
    udp_stream: 120,
};

/// A datapath with [`TIMEOUTS`] and the ClusterIP `VIP:80/TCP` and
/// `VIP:53/UDP` on backend A.
fn datapath_on_a() -> Datapath {
    let mut dp = Datapath::load();
    dp.set_timeouts(TIMEOUTS);
    dp.set_service(VIP, 80, PROTO_TCP, &[(BACKEND_A, 8080)]);
    dp.set_service(VIP, 53, PROTO_UDP, &[(BACKEND_A, 5353)]);
    dp
}

/// One packet of a flow and what the flow's master entry must say after it.
struct Step {
    /// The packet, its verdict and output.
    case: Case,
    /// The master's `CT_STATE_*` bits afterwards.
    state: u8,
    /// The master's timeout afterwards (seconds).
    timeout: u32,
}

/// Runs the steps of the flow whose master is `master` (of `proto`).
fn run_steps(dp: &Datapath, master: &ConntrackKey, steps: Vec<Step>) {
    for step in steps {
        let name = step.case.name;
        run_cases(dp, vec![step.case]);
        let entry = dp.entry(master).expect("the flow's master entry");
        assert_eq!(entry.state, step.state, "{name}: state bits");
        assert_eq!(
            TIMEOUTS.timeout(master.proto, &entry),
            step.timeout,
            "{name}: timeout"
        );
    }
}

#[test]
fn tcp_goes_from_syn_to_established_to_fin_to_close() {
    require_root!();
    let dp = datapath_on_a();
    let client = (CLIENT, 40000);
    let (vip, a) = ((VIP, 80), (BACKEND_A, 8080));
    let master = ct_key(client, vip, PROTO_TCP, CT_DIR_FORWARD);
    let fin_ack = TCP_FLAG_FIN | TCP_FLAG_ACK;
    run_steps(
        &dp,
        &master,
        vec![
            Step {
                case: Case {
                    name: "SYN: a new flow, on the SYN timeout",
                    program: PROG_FROM_POD,
                    input: tcp(client, vip, true, false, &[]),
                    verdict: CONTINUE,
                    expect: Expect::Bytes(tcp(client, a, true, false, &[])),
                },
                state: 0,
                timeout: TIMEOUTS.tcp_syn,
            },
            Step {
                case: Case {
                    name: "SYN-ACK: the reply reaches the master, established",
                    program: PROG_TO_POD,
                    input: tcp(a, client, true, true, &[]),
                    verdict: CONTINUE,
                    expect: Expect::Bytes(tcp(vip, client, true, true, &[])),
                },
                state: CT_STATE_SEEN_REPLY,
                timeout: TIMEOUTS.tcp_established,
            },
            Step {
                case: Case {
                    name: "data: nothing changes",
                    program: PROG_FROM_POD,
                    input: tcp(client, vip, false, true, b"GET /"),
                    verdict: CONTINUE,
                    expect: Expect::Bytes(tcp(client, a, false, true, b"GET /")),
                },
                state: CT_STATE_SEEN_REPLY,
                timeout: TIMEOUTS.tcp_established,
            },
            Step {
                case: Case {
                    name: "the client's FIN: closing one way",
                    program: PROG_FROM_POD,
                    input: tcp_segment(client, vip, fin_ack, &[]),
                    verdict: CONTINUE,
                    expect: Expect::Bytes(tcp_segment(client, a, fin_ack, &[])),
                },
                state: CT_STATE_SEEN_REPLY | CT_STATE_FIN_FORWARD,
                timeout: TIMEOUTS.tcp_fin,
            },
            Step {
                case: Case {
                    name: "the backend's FIN: closed both ways",
                    program: PROG_TO_POD,
                    input: tcp_segment(a, client, fin_ack, &[]),
                    verdict: CONTINUE,
                    expect: Expect::Bytes(tcp_segment(vip, client, fin_ack, &[])),
                },
                state: CT_STATE_SEEN_REPLY | CT_STATE_FIN_FORWARD | CT_STATE_FIN_REPLY,
                timeout: TIMEOUTS.tcp_close,
            },
            Step {
                case: Case {
                    name: "the last ACK still goes to the backend",
                    program: PROG_FROM_POD,
                    input: tcp(client, vip, false, true, &[]),
                    verdict: CONTINUE,
                    expect: Expect::Bytes(tcp(client, a, false, true, &[])),
                },
                state: CT_STATE_SEEN_REPLY | CT_STATE_FIN_FORWARD | CT_STATE_FIN_REPLY,
                timeout: TIMEOUTS.tcp_close,
            },
        ],
    );
}

#[test]
fn a_syn_reopens_a_closed_tuple_but_a_retransmitted_syn_keeps_its_flow() {
    require_root!();
    let mut dp = datapath_on_a();
    let (vip, a) = ((VIP, 80), (BACKEND_A, 8080));
    let closed = (CLIENT, 40001);
    let open = (CLIENT, 40002);
    let fin_ack = TCP_FLAG_FIN | TCP_FLAG_ACK;
    for packet in [
        tcp(closed, vip, true, false, &[]),
        tcp_segment(closed, vip, fin_ack, &[]),
        tcp(open, vip, true, false, &[]),
    ] {
        dp.run(PROG_FROM_POD, &packet);
    }
    dp.run(PROG_TO_POD, &tcp_segment(a, closed, fin_ack, &[]));
    let closed_key = ct_key(closed, vip, PROTO_TCP, CT_DIR_FORWARD);
    let open_key = ct_key(open, vip, PROTO_TCP, CT_DIR_FORWARD);
    // Both a few seconds old, well within every timeout.
    dp.age(&closed_key, 5);
    dp.age(&open_key, 5);
    let aged_closed = dp.entry(&closed_key).unwrap();
    let aged_open = dp.entry(&open_key).unwrap();
    assert_ne!(aged_closed.state & CT_STATE_FIN_REPLY, 0);

    let syn_closed = tcp(closed, vip, true, false, &[]);
    let syn_open = tcp(open, vip, true, false, &[]);
    run_cases(
        &dp,
        vec![
            Case {
                name: "a SYN on the closed tuple",
                program: PROG_FROM_POD,
                input: syn_closed,
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(closed, a, true, false, &[])),
            },
            Case {
                name: "a SYN again on the open one (a retransmission)",
                program: PROG_FROM_POD,
                input: syn_open,
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(open, a, true, false, &[])),
            },
        ],
    );
    let reopened = dp.entry(&closed_key).unwrap();
    assert_eq!(reopened.state, 0, "the reopened flow starts without state");
    assert!(
        reopened.created > aged_closed.created,
        "a new master: {reopened:?}"
    );
    let retransmitted = dp.entry(&open_key).unwrap();
    assert_eq!(retransmitted.created, aged_open.created, "the same master");
    assert!(
        retransmitted.last_seen > aged_open.last_seen,
        "but used now"
    );
}

#[test]
fn a_rst_from_either_side_puts_the_flow_on_the_close_timeout() {
    require_root!();
    let dp = datapath_on_a();
    let (vip, a) = ((VIP, 80), (BACKEND_A, 8080));
    let reset_by_client = (CLIENT, 40010);
    let reset_by_backend = (CLIENT, 40011);
    run_steps(
        &dp,
        &ct_key(reset_by_client, vip, PROTO_TCP, CT_DIR_FORWARD),
        vec![
            Step {
                case: Case {
                    name: "SYN",
                    program: PROG_FROM_POD,
                    input: tcp(reset_by_client, vip, true, false, &[]),
                    verdict: CONTINUE,
                    expect: Expect::Bytes(tcp(reset_by_client, a, true, false, &[])),
                },
                state: 0,
                timeout: TIMEOUTS.tcp_syn,
            },
            Step {
                case: Case {
                    name: "the client's RST",
                    program: PROG_FROM_POD,
                    input: tcp_segment(reset_by_client, vip, TCP_FLAG_RST, &[]),
                    verdict: CONTINUE,
                    expect: Expect::Bytes(tcp_segment(reset_by_client, a, TCP_FLAG_RST, &[])),
                },
                state: CT_STATE_RST,
                timeout: TIMEOUTS.tcp_close,
            },
        ],
    );
    let rst_ack = TCP_FLAG_RST | TCP_FLAG_ACK;
    run_steps(
        &dp,
        &ct_key(reset_by_backend, vip, PROTO_TCP, CT_DIR_FORWARD),
        vec![
            Step {
                case: Case {
                    name: "SYN to a closed port behind the Service",
                    program: PROG_FROM_POD,
                    input: tcp(reset_by_backend, vip, true, false, &[]),
                    verdict: CONTINUE,
                    expect: Expect::Bytes(tcp(reset_by_backend, a, true, false, &[])),
                },
                state: 0,
                timeout: TIMEOUTS.tcp_syn,
            },
            Step {
                case: Case {
                    name: "the backend's RST reaches the master",
                    program: PROG_TO_POD,
                    input: tcp_segment(a, reset_by_backend, rst_ack, &[]),
                    verdict: CONTINUE,
                    expect: Expect::Bytes(tcp_segment(vip, reset_by_backend, rst_ack, &[])),
                },
                state: CT_STATE_SEEN_REPLY | CT_STATE_RST,
                timeout: TIMEOUTS.tcp_close,
            },
        ],
    );
}

#[test]
fn unreplied_udp_expires_sooner_than_a_replied_stream() {
    require_root!();
    let mut dp = datapath_on_a();
    let (vip, a) = ((VIP, 53), (BACKEND_A, 5353));
    let one_shot = (CLIENT, 50000);
    let stream = (CLIENT, 50001);
    let one_shot_key = ct_key(one_shot, vip, PROTO_UDP, CT_DIR_FORWARD);
    let stream_key = ct_key(stream, vip, PROTO_UDP, CT_DIR_FORWARD);
    run_steps(
        &dp,
        &one_shot_key,
        vec![Step {
            case: Case {
                name: "an unreplied datagram",
                program: PROG_FROM_POD,
                input: udp(one_shot, vip, b"q"),
                verdict: CONTINUE,
                expect: Expect::Bytes(udp(one_shot, a, b"q")),
            },
            state: 0,
            timeout: TIMEOUTS.udp,
        }],
    );
    run_steps(
        &dp,
        &stream_key,
        vec![
            Step {
                case: Case {
                    name: "a datagram of the stream",
                    program: PROG_FROM_POD,
                    input: udp(stream, vip, b"q"),
                    verdict: CONTINUE,
                    expect: Expect::Bytes(udp(stream, a, b"q")),
                },
                state: 0,
                timeout: TIMEOUTS.udp,
            },
            Step {
                case: Case {
                    name: "its answer, within 2 s: request/response",
                    program: PROG_TO_POD,
                    input: udp(a, stream, b"r"),
                    verdict: CONTINUE,
                    expect: Expect::Bytes(udp(vip, stream, b"r")),
                },
                state: CT_STATE_SEEN_REPLY,
                timeout: TIMEOUTS.udp,
            },
        ],
    );
    // The stream began 3 s before its last datagram: a stream now.
    dp.change_entry(&stream_key, |master| {
        master.created = master.created.wrapping_sub(3)
    });
    assert_eq!(
        TIMEOUTS.timeout(PROTO_UDP, &dp.entry(&stream_key).unwrap()),
        TIMEOUTS.udp_stream
    );

    // Both idle for longer than the UDP timeout, shorter than the stream's.
    dp.age(&one_shot_key, TIMEOUTS.udp + 1);
    dp.age(&stream_key, TIMEOUTS.udp + 1);
    let aged_one_shot = dp.entry(&one_shot_key).unwrap();
    let aged_stream = dp.entry(&stream_key).unwrap();
    dp.run(PROG_FROM_POD, &udp(one_shot, vip, b"q"));
    dp.run(PROG_FROM_POD, &udp(stream, vip, b"q"));
    assert_eq!(dp.counter("conntrack_expired"), 1, "only the one-shot flow");
    let renewed = dp.entry(&one_shot_key).unwrap();
    assert!(renewed.created > aged_one_shot.created, "a new master");
    let kept = dp.entry(&stream_key).unwrap();
    assert_eq!(kept.created, aged_stream.created, "the same master");
    assert_eq!(kept.state, CT_STATE_SEEN_REPLY);
}

#[test]
fn an_expired_flow_is_balanced_afresh_and_a_live_one_keeps_its_backend() {
    require_root!();
    let mut dp = datapath_on_a();
    let vip = (VIP, 80);
    let live = (CLIENT, 40020);
    let expired = (CLIENT, 40021);
    for client in [live, expired] {
        dp.run(PROG_FROM_POD, &tcp(client, vip, true, false, &[]));
        dp.run(
            PROG_TO_POD,
            &tcp((BACKEND_A, 8080), client, true, true, &[]),
        );
    }
    // The Service moves to B; A stays a (live, active) backend elsewhere,
    // so only expiry can move a flow.
    dp.set_service(VIP_KEEPING_A, 80, PROTO_TCP, &[(BACKEND_A, 8080)]);
    dp.set_service(VIP, 80, PROTO_TCP, &[(BACKEND_B, 8080)]);
    let expired_key = ct_key(expired, vip, PROTO_TCP, CT_DIR_FORWARD);
    dp.age(&expired_key, TIMEOUTS.tcp_established + 1);
    dp.age(
        &ct_key(live, vip, PROTO_TCP, CT_DIR_FORWARD),
        TIMEOUTS.tcp_established - 1,
    );
    run_cases(
        &dp,
        vec![
            Case {
                name: "an established flow idle for less than its timeout keeps A",
                program: PROG_FROM_POD,
                input: tcp(live, vip, false, true, b"x"),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(live, (BACKEND_A, 8080), false, true, b"x")),
            },
            Case {
                name: "one idle for longer is a new flow, to B",
                program: PROG_FROM_POD,
                input: tcp(expired, vip, false, true, b"x"),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(expired, (BACKEND_B, 8080), false, true, b"x")),
            },
        ],
    );
    assert_eq!(dp.counter("conntrack_expired"), 1);
    assert_eq!(dp.counter("flow_rebalanced"), 0);
    assert_eq!(dp.entry(&expired_key).unwrap().state, 0);
}

#[test]
fn a_deleted_backend_moves_tcp_and_udp_flows_on_their_next_packet() {
    require_root!();
    let mut dp = datapath_on_a();
    let tcp_flow = (CLIENT, 40030);
    let udp_flow = (CLIENT, 50030);
    dp.run(PROG_FROM_POD, &tcp(tcp_flow, (VIP, 80), true, false, &[]));
    dp.run(PROG_FROM_POD, &udp(udp_flow, (VIP, 53), b"q"));
    // A leaves every Service: the agent deletes it from the backends map.
    dp.set_service(VIP, 80, PROTO_TCP, &[(BACKEND_B, 8080)]);
    dp.set_service(VIP, 53, PROTO_UDP, &[(BACKEND_B, 5353)]);
    run_cases(
        &dp,
        vec![
            Case {
                name: "the TCP flow moves to B",
                program: PROG_FROM_POD,
                input: tcp(tcp_flow, (VIP, 80), false, true, b"x"),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(tcp_flow, (BACKEND_B, 8080), false, true, b"x")),
            },
            Case {
                name: "the UDP flow moves to B",
                program: PROG_FROM_POD,
                input: udp(udp_flow, (VIP, 53), b"q"),
                verdict: CONTINUE,
                expect: Expect::Bytes(udp(udp_flow, (BACKEND_B, 5353), b"q")),
            },
            Case {
                name: "B's answer comes from the ClusterIP",
                program: PROG_TO_POD,
                input: udp((BACKEND_B, 5353), udp_flow, b"r"),
                verdict: CONTINUE,
                expect: Expect::Bytes(udp((VIP, 53), udp_flow, b"r")),
            },
        ],
    );
    assert_eq!(dp.counter("flow_rebalanced"), 2);
}

#[test]
fn a_backend_that_stops_serving_loses_its_udp_flows_and_drains_its_tcp_ones() {
    require_root!();
    let mut dp = datapath_on_a();
    let (tcp_flow, udp_flow) = ((CLIENT, 40040), (CLIENT, 50040));
    dp.run(PROG_FROM_POD, &tcp(tcp_flow, (VIP, 80), true, false, &[]));
    dp.run(PROG_FROM_POD, &udp(udp_flow, (VIP, 53), b"q"));
    // A stays in the backends map (another Service still lists it) but no
    // longer serves; VIP's slots hold B only.
    dp.set_service(VIP_KEEPING_A, 80, PROTO_TCP, &[(BACKEND_A, 8080)]);
    dp.set_service(VIP_KEEPING_A, 53, PROTO_UDP, &[(BACKEND_A, 5353)]);
    dp.set_service(VIP, 80, PROTO_TCP, &[(BACKEND_B, 8080)]);
    dp.set_service(VIP, 53, PROTO_UDP, &[(BACKEND_B, 5353)]);
    dp.set_backend_state(BACKEND_A, 8080, BACKEND_STATE_NOT_SERVING);
    dp.set_backend_state(BACKEND_A, 5353, BACKEND_STATE_NOT_SERVING);
    run_cases(
        &dp,
        vec![
            Case {
                name: "the UDP flow moves to B at once",
                program: PROG_FROM_POD,
                input: udp(udp_flow, (VIP, 53), b"q"),
                verdict: CONTINUE,
                expect: Expect::Bytes(udp(udp_flow, (BACKEND_B, 5353), b"q")),
            },
            Case {
                name: "the TCP connection drains on A",
                program: PROG_FROM_POD,
                input: tcp(tcp_flow, (VIP, 80), false, true, b"x"),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(tcp_flow, (BACKEND_A, 8080), false, true, b"x")),
            },
            Case {
                name: "a SYN reusing its tuple opens a new connection, on B",
                program: PROG_FROM_POD,
                input: tcp(tcp_flow, (VIP, 80), true, false, &[]),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(tcp_flow, (BACKEND_B, 8080), true, false, &[])),
            },
        ],
    );
    assert_eq!(dp.counter("flow_rebalanced"), 1);
}

#[test]
fn a_terminating_backend_keeps_its_flows() {
    require_root!();
    let mut dp = datapath_on_a();
    let (tcp_flow, udp_flow) = ((CLIENT, 40050), (CLIENT, 50050));
    dp.run(PROG_FROM_POD, &tcp(tcp_flow, (VIP, 80), true, false, &[]));
    dp.run(PROG_FROM_POD, &udp(udp_flow, (VIP, 53), b"q"));
    dp.set_service(VIP_KEEPING_A, 80, PROTO_TCP, &[(BACKEND_A, 8080)]);
    dp.set_service(VIP_KEEPING_A, 53, PROTO_UDP, &[(BACKEND_A, 5353)]);
    dp.set_service(VIP, 80, PROTO_TCP, &[(BACKEND_B, 8080)]);
    dp.set_service(VIP, 53, PROTO_UDP, &[(BACKEND_B, 5353)]);
    dp.set_backend_state(BACKEND_A, 8080, BACKEND_STATE_TERMINATING);
    dp.set_backend_state(BACKEND_A, 5353, BACKEND_STATE_TERMINATING);
    run_cases(
        &dp,
        vec![
            Case {
                name: "UDP stays on the terminating backend",
                program: PROG_FROM_POD,
                input: udp(udp_flow, (VIP, 53), b"q"),
                verdict: CONTINUE,
                expect: Expect::Bytes(udp(udp_flow, (BACKEND_A, 5353), b"q")),
            },
            Case {
                name: "TCP stays on the terminating backend",
                program: PROG_FROM_POD,
                input: tcp(tcp_flow, (VIP, 80), false, true, b"x"),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(tcp_flow, (BACKEND_A, 8080), false, true, b"x")),
            },
        ],
    );
    assert_eq!(dp.counter("flow_rebalanced"), 0);
}

#[test]
fn flows_of_a_deleted_frontend_stop_both_ways_and_a_recreated_one_starts_afresh() {
    require_root!();
    let mut dp = datapath_on_a();
    let (tcp_flow, udp_flow) = ((CLIENT, 40060), (CLIENT, 50060));
    let (a_http, a_dns) = ((BACKEND_A, 8080), (BACKEND_A, 5353));
    dp.run(PROG_FROM_POD, &tcp(tcp_flow, (VIP, 80), true, false, &[]));
    dp.run(PROG_TO_POD, &tcp(a_http, tcp_flow, true, true, &[]));
    dp.run(PROG_FROM_POD, &udp(udp_flow, (VIP, 53), b"q"));
    // The Service is deleted: the agent deletes its frontends and marks
    // their flows dead.
    let revnat_http = dp.rev_nat_id(VIP, 80, PROTO_TCP);
    let revnat_dns = dp.rev_nat_id(VIP, 53, PROTO_UDP);
    dp.delete_frontend(VIP, 80, PROTO_TCP);
    dp.delete_frontend(VIP, 53, PROTO_UDP);
    dp.mark_dead(revnat_http);
    dp.mark_dead(revnat_dns);
    let ack = tcp(tcp_flow, (VIP, 80), false, true, b"x");
    let datagram = udp(udp_flow, (VIP, 53), b"q");
    run_cases(
        &dp,
        vec![
            Case {
                name: "the client's segment is dropped, never sent to the old address",
                program: PROG_FROM_POD,
                input: ack.clone(),
                verdict: DROP,
                expect: Expect::Untouched,
            },
            Case {
                name: "the backend's segment is dropped, never leaves with its address",
                program: PROG_TO_POD,
                input: tcp(a_http, tcp_flow, false, true, b"late"),
                verdict: DROP,
                expect: Expect::Untouched,
            },
            Case {
                name: "the client's datagram is dropped",
                program: PROG_FROM_POD,
                input: datagram.clone(),
                verdict: DROP,
                expect: Expect::Untouched,
            },
            Case {
                name: "the backend's datagram is dropped",
                program: PROG_TO_POD,
                input: udp(a_dns, udp_flow, b"late"),
                verdict: DROP,
                expect: Expect::Untouched,
            },
        ],
    );
    assert_eq!(dp.counter("dead_flow_dropped"), 4);

    // The Service comes back at the same address, with new backends.
    dp.set_service(VIP, 80, PROTO_TCP, &[(BACKEND_B, 8080)]);
    dp.set_service(VIP, 53, PROTO_UDP, &[(BACKEND_B, 5353)]);
    run_cases(
        &dp,
        vec![
            Case {
                name: "the old TCP tuple is a new flow, to B",
                program: PROG_FROM_POD,
                input: ack,
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(tcp_flow, (BACKEND_B, 8080), false, true, b"x")),
            },
            Case {
                name: "the old UDP tuple is a new flow, to B",
                program: PROG_FROM_POD,
                input: datagram,
                verdict: CONTINUE,
                expect: Expect::Bytes(udp(udp_flow, (BACKEND_B, 5353), b"q")),
            },
            Case {
                name: "and B's answer comes from the ClusterIP",
                program: PROG_TO_POD,
                input: udp((BACKEND_B, 5353), udp_flow, b"r"),
                verdict: CONTINUE,
                expect: Expect::Bytes(udp((VIP, 53), udp_flow, b"r")),
            },
        ],
    );
    assert_eq!(dp.counter("dead_flow_dropped"), 4);
}

/// The source port `to_network` gave an SNATed packet.
fn snat_port_of(packet: &[u8]) -> u16 {
    u16::from_be_bytes([packet[34], packet[35]])
}

/// Sends a datagram of `client` through XDP and, when it passes, through
/// `to_network`: the verdict and the SNAT port it got.
fn open_snat_flow(dp: &Datapath, client: (Ipv4Addr, u16)) -> (u32, Option<u16>) {
    let (verdict, dnatted) = dp.run(PROG_FROM_NETWORK, &udp(client, (NODE_IP, 30053), b"q"));
    if verdict != XDP_PASS {
        return (verdict, None);
    }
    assert_eq!(dnatted, udp(client, (REMOTE, 5353), b"q"));
    let (_, snatted) = dp.run(PROG_TO_NETWORK, &dnatted);
    let port = snat_port_of(&snatted);
    assert_eq!(snatted, udp((SNAT_IP, port), (REMOTE, 5353), b"q"));
    (verdict, Some(port))
}

#[test]
fn snat_ports_run_out_and_a_flow_that_let_go_of_its_port_gives_it_up() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_timeouts(TIMEOUTS);
    dp.set_snat_address(SNAT_IP);
    dp.set_snat_ports(40000, 40001);
    dp.set_frontend(
        NODE_IP,
        30053,
        PROTO_UDP,
        FRONTEND_FLAG_NODE_PORT,
        &[(REMOTE, 5353, false)],
    );
    let clients = [40100, 40101, 40102, 40103].map(|port| (CLIENT, port));
    let (_, first) = open_snat_flow(&dp, clients[0]);
    let (_, second) = open_snat_flow(&dp, clients[1]);
    let (first, second) = (first.unwrap(), second.unwrap());
    let mut ports = [first, second];
    ports.sort();
    assert_eq!(ports, [40000, 40001], "each flow its own port of the range");

    // A third flow finds both ports held by live flows.
    assert_eq!(open_snat_flow(&dp, clients[2]), (XDP_DROP, None));
    assert_eq!(dp.counter("snat_ports_exhausted"), 1);

    // The first flow ends (idle beyond its timeout, both its master and
    // its port's entry): a new flow takes its port over.
    let master_key = |client| ct_key(client, (NODE_IP, 30053), PROTO_UDP, CT_DIR_FORWARD);
    let port_key = |port| {
        ct_key(
            (REMOTE, 5353),
            (SNAT_IP, port),
            PROTO_UDP,
            CT_DIR_SNAT_REPLY,
        )
    };
    dp.age(&master_key(clients[0]), TIMEOUTS.udp + 1);
    dp.age(&port_key(first), TIMEOUTS.udp + 1);
    assert_eq!(open_snat_flow(&dp, clients[2]), (XDP_PASS, Some(first)));
    assert_eq!(dp.counter("snat_port_reused"), 1);
    // Its answers reach the new client.
    let (verdict, answer) = dp.run(
        PROG_FROM_NETWORK,
        &udp((REMOTE, 5353), (SNAT_IP, first), b"r"),
    );
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(answer, udp((REMOTE, 5353), clients[2], b"r"));

    // The second flow's port entry is idle (no answers), but the flow
    // still sends: its master is live, so its port is not taken.
    dp.age(&port_key(second), TIMEOUTS.udp + 1);
    assert_eq!(open_snat_flow(&dp, clients[3]), (XDP_DROP, None));
    assert_eq!(dp.counter("snat_ports_exhausted"), 2);
    assert_eq!(dp.counter("snat_port_reused"), 1);
    let (verdict, answer) = dp.run(
        PROG_FROM_NETWORK,
        &udp((REMOTE, 5353), (SNAT_IP, second), b"r"),
    );
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(answer, udp((REMOTE, 5353), clients[1], b"r"));
}

#[test]
fn a_dead_nodeport_flow_is_dropped_on_xdp_and_tc() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_frontend(
        NODE_IP,
        30080,
        PROTO_TCP,
        FRONTEND_FLAG_NODE_PORT,
        &[(BACKEND_A, 8080, true)],
    );
    let client = (CLIENT, 40070);
    let syn = tcp(client, (NODE_IP, 30080), true, false, &[]);
    assert_eq!(dp.run(PROG_FROM_NETWORK, &syn).0, XDP_PASS);
    let revnat = dp.rev_nat_id(NODE_IP, 30080, PROTO_TCP);
    dp.delete_frontend(NODE_IP, 30080, PROTO_TCP);
    dp.mark_dead(revnat);
    let ack = tcp(client, (NODE_IP, 30080), false, true, b"x");
    run_cases(
        &dp,
        vec![
            Case {
                name: "XDP drops the client's segment",
                program: PROG_FROM_NETWORK,
                input: ack.clone(),
                verdict: XDP_DROP,
                expect: Expect::Untouched,
            },
            Case {
                name: "to_network drops the backend's",
                program: PROG_TO_NETWORK,
                input: tcp((BACKEND_A, 8080), client, false, true, b"late"),
                verdict: DROP,
                expect: Expect::Untouched,
            },
        ],
    );
    assert_eq!(dp.counter("dead_flow_dropped"), 2);
}

#[test]
fn a_syn_ack_on_a_finished_flows_reply_entry_passes_untranslated() {
    require_root!();
    let mut dp = datapath_on_a();
    let vip = (VIP, 80);
    let backend = (BACKEND_A, 8080);
    let (closed, expired, open) = ((CLIENT, 40030), (CLIENT, 40031), (CLIENT, 40032));
    for client in [closed, expired, open] {
        run_cases(
            &dp,
            vec![
                Case {
                    name: "the SYN is DNATed",
                    program: PROG_FROM_POD,
                    input: tcp(client, vip, true, false, &[]),
                    verdict: CONTINUE,
                    expect: Expect::Bytes(tcp(client, backend, true, false, &[])),
                },
                Case {
                    name: "its SYN-ACK comes back from the ClusterIP",
                    program: PROG_TO_POD,
                    input: tcp(backend, client, true, true, &[]),
                    verdict: CONTINUE,
                    expect: Expect::Bytes(tcp(vip, client, true, true, &[])),
                },
                Case {
                    name: "the ACK follows the flow",
                    program: PROG_FROM_POD,
                    input: tcp(client, vip, false, true, &[]),
                    verdict: CONTINUE,
                    expect: Expect::Bytes(tcp(client, backend, false, true, &[])),
                },
            ],
        );
    }
    // The first flow closes (FIN both ways), the second goes idle beyond
    // its timeout; their reply entries stay until the collector runs.
    let fin = TCP_FLAG_FIN | TCP_FLAG_ACK;
    dp.run(PROG_FROM_POD, &tcp_segment(closed, vip, fin, &[]));
    dp.run(PROG_TO_POD, &tcp_segment(backend, closed, fin, &[]));
    dp.age(
        &ct_key(expired, vip, PROTO_TCP, CT_DIR_FORWARD),
        TIMEOUTS.tcp_established + 1,
    );
    run_cases(
        &dp,
        vec![
            Case {
                name: "a SYN-ACK to the closed flow's client port is another connection's",
                program: PROG_TO_POD,
                input: tcp(backend, closed, true, true, &[]),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "so is one to the expired flow's",
                program: PROG_TO_POD,
                input: tcp(backend, expired, true, true, &[]),
                verdict: CONTINUE,
                expect: Expect::Untouched,
            },
            Case {
                name: "a retransmitted SYN-ACK of the open flow is still its",
                program: PROG_TO_POD,
                input: tcp(backend, open, true, true, &[]),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(vip, open, true, true, &[])),
            },
            Case {
                name: "and the closed flow's late data still comes from the ClusterIP",
                program: PROG_TO_POD,
                input: tcp(backend, closed, false, true, b"late"),
                verdict: CONTINUE,
                expect: Expect::Bytes(tcp(vip, closed, false, true, b"late")),
            },
        ],
    );
    assert_eq!(dp.counter("stale_reply_passed"), 2);
}
