//! Datapath tests (BPF_PROG_TEST_RUN) of the Service fields the datapath
//! enforces itself (issue 9): session affinity (a hit, an expired entry,
//! a backend that left, switching it off), `loadBalancerSourceRanges`
//! (allowed and dropped on XDP, on TC and from a pod, then changed),
//! `externalTrafficPolicy: Local` (the client's address kept, never
//! SNATed, a remote backend dropped; pods served by every backend through
//! the in-cluster entry), the refusal of new flows to
//! LoadBalancer and externalIP frontends without backends on XDP (left to
//! the TC program beside it), and conntrack's origin check (a packet from
//! the network carrying a pod flow's tuple does not get its translation).

use std::{collections::BTreeSet, net::Ipv4Addr};

use aya::maps::{HashMap, MapData};
use service_agent::{
    datapath::{
        PROG_FROM_NETWORK, PROG_FROM_NETWORK_TC, PROG_FROM_POD, PROG_TO_NETWORK, PROG_TO_POD,
    },
    reconcile::{cluster::ObjectName, translate::DesiredFrontend},
};
use service_common::{
    AffinityKey, AffinityValue, CT_DIR_FORWARD, CT_DIR_SNAT, CT_FLAG_FROM_NETWORK,
    FRONTEND_FLAG_AFFINITY, FRONTEND_FLAG_CLUSTER_IP, FRONTEND_FLAG_EXTERNAL_IP,
    FRONTEND_FLAG_EXTERNAL_LOCAL, FRONTEND_FLAG_LOAD_BALANCER, FRONTEND_FLAG_LOCAL_ONLY,
    FRONTEND_FLAG_NODE_PORT, FRONTEND_FLAG_SOURCE_RANGES, FrontendKey, MAP_AFFINITY, PROTO_TCP,
    PROTO_UDP, SCOPE_INTERNAL, map_addr_v4,
};
use service_tests::{
    datapath_fixture::{Datapath, ct_key, frontend},
    packets::{Case, Expect, assert_checksums_valid, run_cases, tcp, udp},
    require_root,
};

/// `XDP_DROP`.
const XDP_DROP: u32 = 1;
/// `XDP_PASS`.
const XDP_PASS: u32 = 2;
/// `TC_ACT_SHOT`: dropped.
const TC_DROP: u32 = 2;
/// `TC_ACT_REDIRECT`: refused, the reply sent back out.
const TC_REDIRECT: u32 = 7;
/// `TC_ACT_UNSPEC` as BPF_PROG_TEST_RUN reports it: the packet continues.
const TC_CONTINUE: u32 = u32::MAX;
/// The metadata XDP puts in front of a packet it leaves to TC ("SLBD").
const DEFERRED_MARK: [u8; 4] = *b"SLBD";

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const OUTSIDER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const POD: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const SNAT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 100);
const LB_LOCAL_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 101);
const LB_EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 102);
const EXTERNAL_IP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 200);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 201, 0, 2),
    Ipv4Addr::new(10, 201, 0, 3),
    Ipv4Addr::new(10, 201, 0, 4),
];
const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);
/// The affinity timeout the tests use.
const TIMEOUT: u32 = 100;

/// A frontend of kind `flags` with the three local [`BACKENDS`] on port
/// 8080 and session affinity of [`TIMEOUT`] seconds (`affinity`).
fn three_backends(addr: Ipv4Addr, port: u16, proto: u8, flags: u16, affinity: bool) -> Datapath {
    let mut dp = Datapath::load();
    dp.set_snat_address(SNAT_IP);
    set_three(&mut dp, addr, port, proto, flags, affinity);
    dp
}

/// (Re)programs the frontend of [`three_backends`].
fn set_three(dp: &mut Datapath, addr: Ipv4Addr, port: u16, proto: u8, flags: u16, on: bool) {
    let backends: Vec<(Ipv4Addr, u16, bool)> = BACKENDS.iter().map(|b| (*b, 8080, true)).collect();
    let mut desired = frontend(addr, port, proto, flags, &backends);
    if on {
        desired.flags |= FRONTEND_FLAG_AFFINITY;
        desired.affinity_timeout_secs = TIMEOUT;
    }
    dp.set_desired_frontend(desired);
}

/// The affinity map of the loaded object.
fn affinity_map(dp: &mut Datapath) -> HashMap<&mut MapData, AffinityKey, AffinityValue> {
    HashMap::try_from(dp.ebpf.map_mut(MAP_AFFINITY).expect("affinity map")).expect("map type")
}

/// The destination address of a translated IPv4 packet.
fn destination(packet: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(packet[30], packet[31], packet[32], packet[33])
}

/// The source address of an IPv4 packet.
fn source(packet: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(packet[26], packet[27], packet[28], packet[29])
}

/// Sends a new TCP flow (a SYN) from `client`:`port` to `frontend` through
/// `program`; the backend it reached (its verdict must be `pass`).
fn new_flow(
    dp: &Datapath,
    program: &str,
    pass: u32,
    client: (Ipv4Addr, u16),
    frontend: (Ipv4Addr, u16),
) -> Ipv4Addr {
    let (verdict, out) = dp.run(program, &tcp(client, frontend, true, false, &[]));
    assert_eq!(verdict, pass, "{program}: verdict of a SYN from {client:?}");
    assert_checksums_valid(&out, "translated SYN");
    destination(&out)
}

#[test]
fn affinity_keeps_a_client_on_its_backend_on_every_hook_and_protocol() {
    require_root!();
    let mut dp = three_backends(CLUSTER_IP, 80, PROTO_TCP, FRONTEND_FLAG_CLUSTER_IP, true);
    set_three(
        &mut dp,
        NODE_IP,
        30080,
        PROTO_TCP,
        FRONTEND_FLAG_NODE_PORT,
        true,
    );
    set_three(
        &mut dp,
        CLUSTER_IP,
        53,
        PROTO_UDP,
        FRONTEND_FLAG_CLUSTER_IP,
        true,
    );
    let hooks = [
        (PROG_FROM_POD, TC_CONTINUE, (POD, CLUSTER_IP, 80)),
        (PROG_FROM_NETWORK, XDP_PASS, (CLIENT, NODE_IP, 30080)),
        (
            PROG_FROM_NETWORK_TC,
            TC_CONTINUE,
            (OUTSIDER, NODE_IP, 30080),
        ),
    ];
    for (program, pass, (client, addr, port)) in hooks {
        let first = new_flow(&dp, program, pass, (client, 40000), (addr, port));
        for sport in 40001..40030 {
            assert_eq!(
                new_flow(&dp, program, pass, (client, sport), (addr, port)),
                first,
                "{program}: connection from port {sport} left the client's backend"
            );
        }
    }
    // UDP: every datagram from a new port of the same client.
    let (_, out) = dp.run(PROG_FROM_POD, &udp((POD, 50000), (CLUSTER_IP, 53), b"q"));
    let first = destination(&out);
    for sport in 50001..50030 {
        let (verdict, out) = dp.run(PROG_FROM_POD, &udp((POD, sport), (CLUSTER_IP, 53), b"q"));
        assert_eq!((verdict, destination(&out)), (TC_CONTINUE, first));
    }
    assert_eq!(dp.counter("affinity_hit"), 3 * 29 + 29);
    // Other clients spread over the backends.
    let spread: BTreeSet<Ipv4Addr> = (1..=30u8)
        .map(|i| {
            new_flow(
                &dp,
                PROG_FROM_POD,
                TC_CONTINUE,
                (Ipv4Addr::new(10, 200, 2, i), 40000),
                (CLUSTER_IP, 80),
            )
        })
        .collect();
    assert!(spread.len() > 1, "30 clients all on {spread:?}");
}

#[test]
fn affinity_entries_expire_after_the_timeout_and_name_the_backend_until_then() {
    require_root!();
    let mut dp = three_backends(CLUSTER_IP, 80, PROTO_TCP, FRONTEND_FLAG_CLUSTER_IP, true);
    let first = new_flow(
        &dp,
        PROG_FROM_POD,
        TC_CONTINUE,
        (POD, 40000),
        (CLUSTER_IP, 80),
    );
    let rev_nat_id = dp.rev_nat_id(CLUSTER_IP, 80, PROTO_TCP);
    let key = AffinityKey::v4(POD.octets(), rev_nat_id);
    let entry = affinity_map(&mut dp).get(&key, 0).expect("affinity entry");
    assert_eq!(entry.addr, map_addr_v4(first.octets()));
    assert_eq!(entry.port, 8080u16.to_be());
    // Point the entry at another backend: a fresh entry is followed
    // exactly, also after `TIMEOUT` seconds idle (the bound is inclusive).
    let other = *BACKENDS.iter().find(|b| **b != first).unwrap();
    let other_id = (0u32..)
        .zip(dp.maps.backends.iter())
        .find(|(_, value)| {
            value
                .as_ref()
                .is_ok_and(|v| v.exists() && v.addr == map_addr_v4(other.octets()))
        })
        .expect("the other backend's id")
        .0;
    let aged = |dp: &mut Datapath, seconds: u32| {
        let mut map = affinity_map(dp);
        let mut entry = map.get(&key, 0).expect("affinity entry");
        entry.backend_id = other_id;
        entry.addr = map_addr_v4(other.octets());
        // Slots hold the backends in address order.
        entry.slot = BACKENDS.iter().position(|b| *b == other).unwrap() as u16 + 1;
        entry.last_used = entry.last_used.wrapping_sub(seconds);
        map.insert(key, entry, 0).expect("rewriting the entry");
    };
    aged(&mut dp, TIMEOUT - 1);
    let reached = new_flow(
        &dp,
        PROG_FROM_POD,
        TC_CONTINUE,
        (POD, 40001),
        (CLUSTER_IP, 80),
    );
    assert_eq!(reached, other, "a fresh entry is followed");
    // Idle past the timeout: balanced afresh. The entry still names
    // `other` each time, so 20 new flows that all reach it would mean the
    // entry was followed.
    let hits = dp.counter("affinity_hit");
    let mut reached = BTreeSet::new();
    for sport in 40002..40022 {
        aged(&mut dp, TIMEOUT + 2);
        reached.insert(new_flow(
            &dp,
            PROG_FROM_POD,
            TC_CONTINUE,
            (POD, sport),
            (CLUSTER_IP, 80),
        ));
    }
    assert_eq!(
        dp.counter("affinity_hit"),
        hits,
        "an expired entry is no hit"
    );
    assert!(
        reached.len() > 1,
        "expired entries still followed: {reached:?}"
    );
    // And the entry was rewritten by the last new flow: fresh again.
    let entry = affinity_map(&mut dp).get(&key, 0).expect("affinity entry");
    let last = destination(
        &dp.run(
            PROG_FROM_POD,
            &tcp((POD, 41000), (CLUSTER_IP, 80), true, false, &[]),
        )
        .1,
    );
    assert_eq!(map_addr_v4(last.octets()), entry.addr);
}

#[test]
fn an_affinity_whose_backend_left_is_chosen_again() {
    require_root!();
    let mut dp = three_backends(CLUSTER_IP, 80, PROTO_TCP, FRONTEND_FLAG_CLUSTER_IP, true);
    let first = new_flow(
        &dp,
        PROG_FROM_POD,
        TC_CONTINUE,
        (POD, 40000),
        (CLUSTER_IP, 80),
    );
    // The backend leaves the Service (and the backends map).
    let rest: Vec<(Ipv4Addr, u16, bool)> = BACKENDS
        .iter()
        .filter(|b| **b != first)
        .map(|b| (*b, 8080, true))
        .collect();
    let mut desired = frontend(CLUSTER_IP, 80, PROTO_TCP, FRONTEND_FLAG_CLUSTER_IP, &rest);
    desired.flags |= FRONTEND_FLAG_AFFINITY;
    desired.affinity_timeout_secs = TIMEOUT;
    dp.set_desired_frontend(desired);
    let again = new_flow(
        &dp,
        PROG_FROM_POD,
        TC_CONTINUE,
        (POD, 40001),
        (CLUSTER_IP, 80),
    );
    assert_ne!(again, first);
    // The entry now names the new backend, which the client keeps.
    for sport in 40002..40012 {
        assert_eq!(
            new_flow(
                &dp,
                PROG_FROM_POD,
                TC_CONTINUE,
                (POD, sport),
                (CLUSTER_IP, 80)
            ),
            again
        );
    }
    let rev_nat_id = dp.rev_nat_id(CLUSTER_IP, 80, PROTO_TCP);
    let entry = affinity_map(&mut dp)
        .get(&AffinityKey::v4(POD.octets(), rev_nat_id), 0)
        .expect("affinity entry");
    assert_eq!(entry.addr, map_addr_v4(again.octets()));
    // A backend that stops taking new flows (terminating) is not followed.
    dp.set_backend_state(again, 8080, service_common::BACKEND_STATE_TERMINATING);
    let hits = dp.counter("affinity_hit");
    new_flow(
        &dp,
        PROG_FROM_POD,
        TC_CONTINUE,
        (POD, 40100),
        (CLUSTER_IP, 80),
    );
    assert_eq!(dp.counter("affinity_hit"), hits);
}

#[test]
fn an_affinity_whose_backend_left_the_frontend_but_serves_another_is_chosen_again() {
    require_root!();
    let mut dp = three_backends(CLUSTER_IP, 80, PROTO_TCP, FRONTEND_FLAG_CLUSTER_IP, true);
    // Another Service uses the same three backends: none of them leaves
    // the backends map below.
    set_three(
        &mut dp,
        CLUSTER_IP,
        81,
        PROTO_TCP,
        FRONTEND_FLAG_CLUSTER_IP,
        false,
    );
    let first = new_flow(
        &dp,
        PROG_FROM_POD,
        TC_CONTINUE,
        (POD, 40000),
        (CLUSTER_IP, 80),
    );
    let rev_nat_id = dp.rev_nat_id(CLUSTER_IP, 80, PROTO_TCP);
    let key = AffinityKey::v4(POD.octets(), rev_nat_id);
    let slot = affinity_map(&mut dp).get(&key, 0).unwrap().slot;
    assert_eq!(
        BACKENDS[usize::from(slot) - 1],
        first,
        "the entry keeps its slot"
    );
    // The client's backend leaves this frontend but stays in the backends
    // map for the other Service: never followed again.
    let rest: Vec<(Ipv4Addr, u16, bool)> = BACKENDS
        .iter()
        .filter(|b| **b != first)
        .map(|b| (*b, 8080, true))
        .collect();
    let mut desired = frontend(CLUSTER_IP, 80, PROTO_TCP, FRONTEND_FLAG_CLUSTER_IP, &rest);
    desired.flags |= FRONTEND_FLAG_AFFINITY;
    desired.affinity_timeout_secs = TIMEOUT;
    dp.set_desired_frontend(desired);
    assert!(
        dp.maps
            .backends
            .iter()
            .filter_map(Result::ok)
            .any(|b| b.exists() && b.addr == map_addr_v4(first.octets()))
    );
    let again = new_flow(
        &dp,
        PROG_FROM_POD,
        TC_CONTINUE,
        (POD, 40001),
        (CLUSTER_IP, 80),
    );
    assert_ne!(again, first);
    for sport in 40002..40012 {
        assert_eq!(
            new_flow(
                &dp,
                PROG_FROM_POD,
                TC_CONTINUE,
                (POD, sport),
                (CLUSTER_IP, 80)
            ),
            again
        );
    }
}

#[test]
fn switching_affinity_off_and_on_applies_to_new_flows() {
    require_root!();
    let mut dp = three_backends(CLUSTER_IP, 80, PROTO_TCP, FRONTEND_FLAG_CLUSTER_IP, true);
    let first = new_flow(
        &dp,
        PROG_FROM_POD,
        TC_CONTINUE,
        (POD, 40000),
        (CLUSTER_IP, 80),
    );
    set_three(
        &mut dp,
        CLUSTER_IP,
        80,
        PROTO_TCP,
        FRONTEND_FLAG_CLUSTER_IP,
        false,
    );
    let header = dp
        .maps
        .frontends
        .get(
            &FrontendKey::v4(CLUSTER_IP.octets(), 80u16.to_be(), PROTO_TCP),
            0,
        )
        .unwrap();
    assert_eq!(
        (
            header.flags & FRONTEND_FLAG_AFFINITY,
            header.affinity_timeout_secs
        ),
        (0, 0)
    );
    let spread: BTreeSet<Ipv4Addr> = (40001..40031)
        .map(|sport| {
            new_flow(
                &dp,
                PROG_FROM_POD,
                TC_CONTINUE,
                (POD, sport),
                (CLUSTER_IP, 80),
            )
        })
        .collect();
    assert!(
        spread.len() > 1,
        "affinity off, yet 30 flows all on {spread:?}"
    );
    // The flow opened with affinity on keeps its backend (conntrack).
    let (_, out) = dp.run(
        PROG_FROM_POD,
        &tcp((POD, 40000), (CLUSTER_IP, 80), false, true, b"x"),
    );
    assert_eq!(destination(&out), first);
    // On again: the client sticks to one backend from its next flow on.
    set_three(
        &mut dp,
        CLUSTER_IP,
        80,
        PROTO_TCP,
        FRONTEND_FLAG_CLUSTER_IP,
        true,
    );
    let stuck = new_flow(
        &dp,
        PROG_FROM_POD,
        TC_CONTINUE,
        (POD, 41000),
        (CLUSTER_IP, 80),
    );
    for sport in 41001..41020 {
        assert_eq!(
            new_flow(
                &dp,
                PROG_FROM_POD,
                TC_CONTINUE,
                (POD, sport),
                (CLUSTER_IP, 80)
            ),
            stuck
        );
    }
}

/// A LoadBalancer frontend `LB_IP:80` with one local backend, admitting
/// `ranges`.
fn set_ranged(dp: &mut Datapath, ranges: &[&str]) {
    let mut desired = frontend(
        LB_IP,
        80,
        PROTO_TCP,
        FRONTEND_FLAG_LOAD_BALANCER,
        &[(BACKENDS[0], 8080, true)],
    );
    desired.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
    dp.set_desired_frontend(desired);
}

#[test]
fn source_ranges_admit_only_their_clients_on_xdp_tc_and_from_pods() {
    require_root!();
    let mut dp = Datapath::load();
    set_ranged(&mut dp, &["10.99.0.0/24", "10.200.1.2/32"]);
    let header = dp
        .maps
        .frontends
        .get(
            &FrontendKey::v4(LB_IP.octets(), 80u16.to_be(), PROTO_TCP),
            0,
        )
        .unwrap();
    assert_ne!(header.flags & FRONTEND_FLAG_SOURCE_RANGES, 0);
    let lb = (LB_IP, 80);
    let backend = (BACKENDS[0], 8080);
    run_cases(
        &dp,
        vec![
            Case {
                name: "XDP: a client inside a range is served",
                program: PROG_FROM_NETWORK,
                input: tcp((CLIENT, 40000), lb, true, false, &[]),
                verdict: XDP_PASS,
                expect: Expect::Bytes(tcp((CLIENT, 40000), backend, true, false, &[])),
            },
            Case {
                name: "XDP: a client outside every range is dropped",
                program: PROG_FROM_NETWORK,
                input: tcp((OUTSIDER, 40000), lb, true, false, &[]),
                verdict: XDP_DROP,
                expect: Expect::Untouched,
            },
            Case {
                name: "TC: a client inside a range is served",
                program: PROG_FROM_NETWORK_TC,
                input: tcp((CLIENT, 40001), lb, true, false, &[]),
                verdict: TC_CONTINUE,
                expect: Expect::Bytes(tcp((CLIENT, 40001), backend, true, false, &[])),
            },
            Case {
                name: "TC: a client outside every range is dropped",
                program: PROG_FROM_NETWORK_TC,
                input: tcp((OUTSIDER, 40001), lb, true, false, &[]),
                verdict: TC_DROP,
                expect: Expect::Untouched,
            },
            Case {
                name: "a pod inside a range is served",
                program: PROG_FROM_POD,
                input: tcp((POD, 40002), lb, true, false, &[]),
                verdict: TC_CONTINUE,
                expect: Expect::Bytes(tcp((POD, 40002), backend, true, false, &[])),
            },
            Case {
                name: "a pod outside every range is dropped",
                program: PROG_FROM_POD,
                input: tcp((Ipv4Addr::new(10, 200, 1, 3), 40002), lb, true, false, &[]),
                verdict: TC_DROP,
                expect: Expect::Untouched,
            },
        ],
    );
    assert_eq!(dp.counter("drop_source_range"), 3);
    // Changed: the outsider's prefix only. New flows follow at once.
    set_ranged(&mut dp, &["10.77.0.0/16"]);
    assert_eq!(dp.maps.source_ranges.keys().count(), 1);
    assert_eq!(
        new_flow(&dp, PROG_FROM_NETWORK, XDP_PASS, (OUTSIDER, 40010), lb),
        BACKENDS[0]
    );
    let (verdict, _) = dp.run(
        PROG_FROM_NETWORK,
        &tcp((CLIENT, 40010), lb, true, false, &[]),
    );
    assert_eq!(verdict, XDP_DROP);
    // No ranges: everyone is admitted, and the trie holds nothing.
    set_ranged(&mut dp, &[]);
    assert_eq!(dp.maps.source_ranges.keys().count(), 0);
    assert_eq!(
        new_flow(&dp, PROG_FROM_NETWORK, XDP_PASS, (CLIENT, 40011), lb),
        BACKENDS[0]
    );
    // Deleting the frontend deletes its ranges.
    set_ranged(&mut dp, &["10.99.0.0/24"]);
    dp.delete_frontend(LB_IP, 80, PROTO_TCP);
    assert_eq!(dp.maps.source_ranges.keys().count(), 0);
}

#[test]
fn pods_reach_an_external_traffic_policy_local_frontend_through_every_backend() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_snat_address(SNAT_IP);
    // An `externalTrafficPolicy: Local` NodePort as the agent lays it out
    // on a node without a local endpoint: no backend for the network, and
    // the Service's remote endpoint in its in-cluster entry.
    let external = frontend(
        NODE_IP,
        30080,
        PROTO_TCP,
        FRONTEND_FLAG_NODE_PORT | FRONTEND_FLAG_EXTERNAL_LOCAL | FRONTEND_FLAG_LOCAL_ONLY,
        &[],
    );
    let in_cluster = DesiredFrontend {
        scope: SCOPE_INTERNAL,
        ..frontend(
            NODE_IP,
            30080,
            PROTO_TCP,
            FRONTEND_FLAG_NODE_PORT,
            &[(REMOTE_BACKEND, 8080, false)],
        )
    };
    dp.set_desired_service(
        &ObjectName::new("test", "etp-local"),
        &[external.clone(), in_cluster],
    );
    // From the network: no local endpoint, dropped (on XDP and TC).
    let (verdict, _) = dp.run(
        PROG_FROM_NETWORK,
        &tcp((CLIENT, 40000), (NODE_IP, 30080), true, false, &[]),
    );
    assert_eq!(verdict, XDP_DROP);
    let (verdict, _) = dp.run(
        PROG_FROM_NETWORK_TC,
        &tcp((CLIENT, 40000), (NODE_IP, 30080), true, false, &[]),
    );
    assert_eq!(verdict, TC_DROP);
    assert_eq!(dp.counter("drop_no_local_endpoint"), 2);
    // From a pod: the remote endpoint, with the pod's own address (pods
    // reach other nodes' pods unSNATed), and the reply gets the NodePort
    // back as source.
    let (verdict, out) = dp.run(
        PROG_FROM_POD,
        &tcp((POD, 40000), (NODE_IP, 30080), true, false, &[]),
    );
    assert_eq!(verdict, TC_CONTINUE);
    assert_eq!(
        out,
        tcp((POD, 40000), (REMOTE_BACKEND, 8080), true, false, &[])
    );
    assert_checksums_valid(&out, "pod to an externalTrafficPolicy: Local NodePort");
    let (_, reply) = dp.run(
        PROG_TO_POD,
        &tcp((REMOTE_BACKEND, 8080), (POD, 40000), true, true, &[]),
    );
    assert_eq!(reply, tcp((NODE_IP, 30080), (POD, 40000), true, true, &[]));
    assert_eq!(dp.counter("drop_no_local_endpoint"), 2);
    // Without its in-cluster entry (the layout of an older agent), a pod
    // gets the external entry: no local endpoint, dropped.
    dp.set_desired_service(&ObjectName::new("test", "etp-local"), &[external]);
    let (verdict, _) = dp.run(
        PROG_FROM_POD,
        &tcp((POD, 40001), (NODE_IP, 30080), true, false, &[]),
    );
    assert_eq!(verdict, TC_DROP);
    assert_eq!(dp.counter("drop_no_local_endpoint"), 3);
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_never_snats() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_snat_address(SNAT_IP);
    let local_flags = FRONTEND_FLAG_LOAD_BALANCER | FRONTEND_FLAG_EXTERNAL_LOCAL;
    dp.set_frontend(
        LB_LOCAL_IP,
        80,
        PROTO_TCP,
        local_flags,
        &[(BACKENDS[0], 8080, true)],
    );
    // A Local frontend that somehow lists a remote backend.
    dp.set_frontend(
        LB_LOCAL_IP,
        81,
        PROTO_TCP,
        local_flags,
        &[(REMOTE_BACKEND, 8080, false)],
    );
    // A Local frontend without (local) backends.
    dp.set_frontend(LB_LOCAL_IP, 82, PROTO_TCP, local_flags, &[]);
    // The same remote backend behind a Cluster frontend is SNATed.
    dp.set_frontend(
        LB_IP,
        81,
        PROTO_TCP,
        FRONTEND_FLAG_LOAD_BALANCER,
        &[(REMOTE_BACKEND, 8080, false)],
    );
    let client = (CLIENT, 40000);
    for program in [PROG_FROM_NETWORK, PROG_FROM_NETWORK_TC] {
        let pass = if program == PROG_FROM_NETWORK {
            XDP_PASS
        } else {
            TC_CONTINUE
        };
        let drop = if program == PROG_FROM_NETWORK {
            XDP_DROP
        } else {
            TC_DROP
        };
        let (verdict, out) = dp.run(program, &tcp(client, (LB_LOCAL_IP, 80), true, false, &[]));
        assert_eq!(verdict, pass);
        assert_eq!(
            out,
            tcp(client, (BACKENDS[0], 8080), true, false, &[]),
            "{program}"
        );
        let (verdict, _) = dp.run(program, &tcp(client, (LB_LOCAL_IP, 81), true, false, &[]));
        assert_eq!(
            verdict, drop,
            "{program}: a remote backend of a Local frontend"
        );
        let (verdict, _) = dp.run(program, &tcp(client, (LB_LOCAL_IP, 82), true, false, &[]));
        assert_eq!(
            verdict, drop,
            "{program}: no local backend: dropped, not refused"
        );
    }
    assert_eq!(dp.counter("drop_external_local"), 2);
    assert_eq!(dp.counter("drop_no_local_endpoint"), 2);
    // With affinity, a client is never kept on a remote backend: once a
    // flow got the local one, every later flow does (the remote choices
    // were dropped, not recorded).
    let mut mixed = frontend(
        LB_LOCAL_IP,
        83,
        PROTO_TCP,
        local_flags | FRONTEND_FLAG_AFFINITY,
        &[(BACKENDS[0], 8080, true), (REMOTE_BACKEND, 8080, false)],
    );
    mixed.affinity_timeout_secs = TIMEOUT;
    dp.set_desired_frontend(mixed);
    let mut served = false;
    for sport in 41000..41040 {
        let (verdict, out) = dp.run(
            PROG_FROM_NETWORK,
            &tcp((OUTSIDER, sport), (LB_LOCAL_IP, 83), true, false, &[]),
        );
        if served {
            assert_eq!((verdict, destination(&out)), (XDP_PASS, BACKENDS[0]));
        } else if verdict == XDP_PASS {
            assert_eq!(destination(&out), BACKENDS[0]);
            served = true;
        } else {
            assert_eq!(verdict, XDP_DROP);
        }
    }
    assert!(served, "40 flows never got the local backend");
    // From a pod, the same frontend without backends is refused as usual.
    let (verdict, _) = dp.run(
        PROG_FROM_POD,
        &tcp((POD, 40001), (LB_LOCAL_IP, 82), true, false, &[]),
    );
    assert_eq!(verdict, TC_REDIRECT);
    // The local flow has no SNAT entry, and leaves with the client's address.
    let snat = ct_key(client, (BACKENDS[0], 8080), PROTO_TCP, CT_DIR_SNAT);
    assert!(dp.entry(&snat).is_none());
    let (verdict, out) = dp.run(
        PROG_TO_NETWORK,
        &tcp(client, (BACKENDS[0], 8080), false, true, b"x"),
    );
    assert_eq!((verdict, source(&out)), (TC_CONTINUE, CLIENT));
    // Pods are not subject to the policy: they may use the remote backend.
    let (verdict, out) = dp.run(
        PROG_FROM_POD,
        &tcp((POD, 40000), (LB_LOCAL_IP, 81), true, false, &[]),
    );
    assert_eq!((verdict, destination(&out)), (TC_CONTINUE, REMOTE_BACKEND));
    // The Cluster frontend SNATs its remote backend (for comparison).
    let (verdict, out) = dp.run(
        PROG_FROM_NETWORK,
        &tcp((CLIENT, 40001), (LB_IP, 81), true, false, &[]),
    );
    assert_eq!((verdict, destination(&out)), (XDP_PASS, REMOTE_BACKEND));
    let snat = ct_key(
        (CLIENT, 40001),
        (REMOTE_BACKEND, 8080),
        PROTO_TCP,
        CT_DIR_SNAT,
    );
    assert!(dp.entry(&snat).is_some());
}

#[test]
fn xdp_leaves_new_flows_to_external_frontends_without_backends_to_tc_to_refuse() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_frontend(LB_EMPTY_IP, 80, PROTO_TCP, FRONTEND_FLAG_LOAD_BALANCER, &[]);
    dp.set_frontend(
        EXTERNAL_IP_EMPTY,
        80,
        PROTO_TCP,
        FRONTEND_FLAG_EXTERNAL_IP,
        &[],
    );
    dp.set_frontend(LB_EMPTY_IP, 53, PROTO_UDP, FRONTEND_FLAG_LOAD_BALANCER, &[]);
    let deferred = |packet: &[u8]| [&DEFERRED_MARK[..], packet].concat();
    for (dst, proto) in [
        ((LB_EMPTY_IP, 80), PROTO_TCP),
        ((EXTERNAL_IP_EMPTY, 80), PROTO_TCP),
        ((LB_EMPTY_IP, 53), PROTO_UDP),
    ] {
        let packet = if proto == PROTO_TCP {
            tcp((CLIENT, 40000), dst, true, false, &[])
        } else {
            udp((CLIENT, 40000), dst, b"query")
        };
        let (verdict, out) = dp.run(PROG_FROM_NETWORK, &packet);
        assert_eq!(verdict, XDP_PASS, "{dst:?}: XDP passes it on");
        assert_eq!(
            out,
            deferred(&packet),
            "{dst:?}: untouched and marked for TC"
        );
        // What TC does with it (the deferred program runs the same code on
        // a marked packet): the refusal, back to the client.
        let (verdict, reply) = dp.run(PROG_FROM_NETWORK_TC, &packet);
        assert_eq!(verdict, TC_REDIRECT, "{dst:?}: TC refuses");
        assert_eq!(destination(&reply), CLIENT);
        assert_eq!(source(&reply), dst.0);
        if proto == PROTO_TCP {
            assert_eq!(reply[47] & 0x04, 0x04, "RST flag set: {reply:?}");
            assert_checksums_valid(&reply, "RST");
        } else {
            assert_eq!(
                (reply[23], reply[34], reply[35]),
                (1, 3, 3),
                "ICMP port unreachable"
            );
        }
    }
    assert_eq!(dp.counter("reject_deferred"), 3);
}

#[test]
fn a_packet_from_the_network_never_gets_a_pod_flows_translation() {
    require_root!();
    let mut dp = three_backends(CLUSTER_IP, 80, PROTO_TCP, FRONTEND_FLAG_CLUSTER_IP, false);
    set_three(
        &mut dp,
        NODE_IP,
        30080,
        PROTO_TCP,
        FRONTEND_FLAG_NODE_PORT,
        false,
    );
    // A pod's flow to the ClusterIP.
    let pod_flow = tcp((POD, 40000), (CLUSTER_IP, 80), true, false, &[]);
    let (verdict, out) = dp.run(PROG_FROM_POD, &pod_flow);
    assert_eq!(verdict, TC_CONTINUE);
    let backend = destination(&out);
    let master = ct_key((POD, 40000), (CLUSTER_IP, 80), PROTO_TCP, CT_DIR_FORWARD);
    assert_eq!(dp.entry(&master).unwrap().flags & CT_FLAG_FROM_NETWORK, 0);
    // The same tuple from the network: not translated (a ClusterIP is not
    // served to the network), on XDP and TC, and the pod's flow untouched.
    let data = tcp((POD, 40000), (CLUSTER_IP, 80), false, true, b"x");
    assert_eq!(dp.run(PROG_FROM_NETWORK, &data).0, XDP_DROP);
    assert_eq!(dp.run(PROG_FROM_NETWORK_TC, &data).0, TC_DROP);
    assert_eq!(dp.run(PROG_FROM_NETWORK, &pod_flow).0, XDP_DROP);
    assert_eq!(dp.counter("drop_origin_mismatch"), 3);
    let (verdict, out) = dp.run(PROG_FROM_POD, &data);
    assert_eq!((verdict, destination(&out)), (TC_CONTINUE, backend));
    // The other way round: a flow from the network to a NodePort, whose
    // tuple a pod then sends.
    let network_flow = tcp((CLIENT, 40000), (NODE_IP, 30080), true, false, &[]);
    let (verdict, out) = dp.run(PROG_FROM_NETWORK, &network_flow);
    assert_eq!(verdict, XDP_PASS);
    let backend = destination(&out);
    let master = ct_key((CLIENT, 40000), (NODE_IP, 30080), PROTO_TCP, CT_DIR_FORWARD);
    assert_ne!(dp.entry(&master).unwrap().flags & CT_FLAG_FROM_NETWORK, 0);
    let data = tcp((CLIENT, 40000), (NODE_IP, 30080), false, true, b"x");
    assert_eq!(dp.run(PROG_FROM_POD, &data).0, TC_DROP);
    let (verdict, out) = dp.run(PROG_FROM_NETWORK, &data);
    assert_eq!((verdict, destination(&out)), (XDP_PASS, backend));
    // Once the pod's flow has expired, its tuple is anyone's again (here:
    // no frontend for the network, so untouched).
    dp.age(
        &ct_key((POD, 40000), (CLUSTER_IP, 80), PROTO_TCP, CT_DIR_FORWARD),
        100_000,
    );
    let pod_data = tcp((POD, 40000), (CLUSTER_IP, 80), false, true, b"x");
    let (verdict, out) = dp.run(PROG_FROM_NETWORK, &pod_data);
    assert_eq!(
        (verdict, out),
        (XDP_PASS, pod_data.clone()),
        "a ClusterIP: untouched"
    );
}

/// A frontend that lists only node-local backends (traffic policy
/// `Local`, e.g. `internalTrafficPolicy: Local` on a ClusterIP) drops new
/// flows when it has none, as kube-proxy drops them, instead of refusing
/// them; with a local backend it serves as usual.
#[test]
fn a_local_only_frontend_without_backends_drops_instead_of_refusing() {
    require_root!();
    let mut dp = Datapath::load();
    let local_only = FRONTEND_FLAG_CLUSTER_IP | FRONTEND_FLAG_LOCAL_ONLY;
    dp.set_frontend(CLUSTER_IP, 80, PROTO_TCP, local_only, &[]);
    dp.set_frontend(CLUSTER_IP, 53, PROTO_UDP, local_only, &[]);
    dp.set_frontend(CLUSTER_IP, 81, PROTO_TCP, FRONTEND_FLAG_CLUSTER_IP, &[]);
    let syn = tcp((POD, 40000), (CLUSTER_IP, 80), true, false, &[]);
    assert_eq!(dp.run(PROG_FROM_POD, &syn), (TC_DROP, syn.clone()));
    let datagram = udp((POD, 40000), (CLUSTER_IP, 53), b"q");
    assert_eq!(dp.run(PROG_FROM_POD, &datagram).0, TC_DROP);
    assert_eq!(dp.counter("drop_no_local_endpoint"), 2);
    // Without the flag, the same empty frontend refuses (a RST back).
    let syn = tcp((POD, 40000), (CLUSTER_IP, 81), true, false, &[]);
    assert_eq!(dp.run(PROG_FROM_POD, &syn).0, TC_REDIRECT);
    // With a local backend: served.
    dp.set_frontend(
        CLUSTER_IP,
        80,
        PROTO_TCP,
        local_only,
        &[(BACKENDS[0], 8080, true)],
    );
    assert_eq!(
        new_flow(
            &dp,
            PROG_FROM_POD,
            TC_CONTINUE,
            (POD, 40001),
            (CLUSTER_IP, 80)
        ),
        BACKENDS[0]
    );
}
