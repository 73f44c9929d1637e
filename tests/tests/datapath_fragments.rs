//! Datapath tests of fragments through BPF_PROG_TEST_RUN, IPv4 and IPv6
//! (a fragment header): a UDP datagram larger than the MTU arrives as
//! fragments, and every hook that translates translates all of them: the
//! first by its UDP header (whose checksum covers the whole datagram), the
//! later ones by the ports the first recorded at that hook. Both
//! directions, on from_pod, to_pod, from_network (XDP and TC; XDP hands
//! IPv6 to TC), to_network and hairpin. Expected outputs are the fragments
//! of the translated datagram, byte for byte, so the UDP checksum the
//! first fragment carries is the whole translated datagram's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{Icmpv6Type, NetHeaders, PacketHeaders, TransportHeader};
use service_agent::datapath::{
    PROG_FROM_NETWORK, PROG_FROM_NETWORK_TC, PROG_FROM_POD, PROG_TO_NETWORK, PROG_TO_POD,
};
use service_common::{
    CT_DIR_FORWARD, FRONTEND_FLAG_NODE_PORT, FragmentKey, HAIRPIN_IPV4, HAIRPIN_IPV6, PROTO_UDP,
};
use service_tests::{
    datapath_fixture::{Datapath, ct_key},
    packets::{Case, Expect, FragmentFamily, behind_hop_by_hop, run_cases, sent_back},
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
/// messages are; cut where a 1500-byte MTU cuts it
/// ([`FragmentFamily::FIRST_FRAGMENT_L4_LEN`]).
const PAYLOAD: [u8; 2000] = {
    let mut payload = [0u8; 2000];
    let mut i = 0;
    while i < payload.len() {
        payload[i] = (i % 251) as u8;
        i += 1;
    }
    payload
};

/// The fragments of the datagram `src -> dst` (identification `id`).
fn fragments<A: FragmentFamily>(src: (A, u16), dst: (A, u16), id: u32) -> [Vec<u8>; 2] {
    A::udp_fragments(src, dst, &PAYLOAD, id)
}

/// Two rows: the fragments of `src -> dst` through `program`, expected to
/// come out as the fragments of `out_src -> out_dst` with `verdict`.
#[expect(
    clippy::too_many_arguments,
    reason = "one table row per fragment, all built from the same datagram description"
)]
fn fragment_rows<A: FragmentFamily>(
    name: [&'static str; 2],
    program: &'static str,
    src: (A, u16),
    dst: (A, u16),
    out_src: (A, u16),
    out_dst: (A, u16),
    id: u32,
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

/// A datagram from `client:50000` to `vip:53`, a ClusterIP to
/// `backend:5353`, and its answer, both in two fragments (identifications
/// `ids`): `from_pod` DNATs both fragments of the request, `to_pod` gives
/// both of the answer the ClusterIP back as source. The datapath, for
/// more checks.
fn cluster_ip_fragments_are_translated_both_ways<A: FragmentFamily + Into<IpAddr>>(
    client: A,
    vip: A,
    backend: A,
    ids: [u32; 2],
) -> Datapath {
    let mut dp = Datapath::load();
    dp.set_service(vip, 53, PROTO_UDP, &[(backend, 5353)]);
    let (client, vip, backend) = ((client, 50000), (vip, 53), (backend, 5353));
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
        ids[0],
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
        ids[1],
        CONTINUE,
    ));
    run_cases(&dp, rows);
    assert_eq!(dp.counter("fragment_translated"), 2);
    dp
}

#[test]
fn fragments_to_a_cluster_ip_and_back_are_translated() {
    require_root!();
    cluster_ip_fragments_are_translated_both_ways(CLIENT, VIP, BACKEND, [1, 2]);
}

/// A later fragment to `vip:53` (a ClusterIP to `backend:5353`) from
/// `client` whose first fragment no hook saw, and one of traffic that is
/// none of ours: both pass untouched, and no flow is opened.
fn later_fragments_without_record_pass_untouched<A: FragmentFamily + Into<IpAddr>>(
    client: A,
    vip: A,
    backend: A,
) {
    let mut dp = Datapath::load();
    dp.set_service(vip, 53, PROTO_UDP, &[(backend, 5353)]);
    let [_, later] = fragments((client, 50001), (vip, 53), 3);
    let [_, unrelated] = fragments((client, 50002), (backend, 5353), 4);
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
fn a_later_fragment_without_its_first_passes_untouched_and_opens_no_flow() {
    require_root!();
    later_fragments_without_record_pass_untouched(CLIENT, VIP, BACKEND);
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

/// The fragments of a flow from `pod` to `vip:53`, a ClusterIP whose
/// only backend is `pod:5353` itself, are SNATed to `hairpin` and sent
/// back, and so are the answer's fragments, from the ClusterIP.
fn hairpin_fragments_are_translated_both_ways<A: FragmentFamily + Into<IpAddr>>(
    pod: A,
    vip: A,
    hairpin: A,
) {
    let mut dp = Datapath::load();
    dp.set_service(vip, 53, PROTO_UDP, &[(pod, 5353)]);
    let (client, vip, target) = ((pod, 50030), (vip, 53), (pod, 5353));
    let [first, later] = fragments(client, vip, 30);
    let [out_first, out_later] = fragments((hairpin, 50030), target, 30);
    let [reply_first, reply_later] = fragments(target, (hairpin, 50030), 31);
    let [back_first, back_later] = fragments(vip, client, 31);
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

#[test]
fn fragments_of_a_hairpin_flow_are_translated_both_ways() {
    require_root!();
    // The backend pod reaches itself through the ClusterIP.
    hairpin_fragments_are_translated_both_ways(BACKEND, VIP, HAIRPIN);
}

const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x200, 0, 0, 0, 0, 2);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x201, 0, 0, 0, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// A ClusterIP whose Service has no endpoints.
const VIP6_EMPTY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
const EXTERNAL_CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x99, 0, 0, 0, 0, 2);
const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x99, 0, 0, 0, 0, 1);
const SNAT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1);
const REMOTE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x202, 0, 0, 0, 0, 2);
/// The only SNAT port of the IPv6 NodePort case (a range of one).
const SNAT_PORT: u16 = 20_000;

/// The fragment record key of the IPv6 datagram `src -> dst` with
/// identification `id`, as the datapath writes it.
fn fragment_key6(src: Ipv6Addr, dst: Ipv6Addr, id: u32) -> FragmentKey {
    FragmentKey::v6(
        src.octets(),
        dst.octets(),
        u32::from_ne_bytes(id.to_be_bytes()),
        PROTO_UDP,
    )
}

/// The ports (host byte order) the record of `key` holds.
fn recorded_ports(dp: &Datapath, key: &FragmentKey) -> (u16, u16) {
    let record = dp
        .fragment_record(key)
        .expect("the first fragment's record");
    (u16::from_be(record.sport), u16::from_be(record.dport))
}

#[test]
fn ipv6_fragments_to_a_cluster_ip_and_back_are_translated() {
    require_root!();
    // Identifications with all four bytes set: the records hold all 32 bits.
    let (request_id, answer_id) = (0x0102_0304, 0x0a0b_0c0d);
    let dp = cluster_ip_fragments_are_translated_both_ways(
        CLIENT6,
        VIP6,
        BACKEND6,
        [request_id, answer_id],
    );
    // Each hook recorded its first fragment's ports under the datagram as
    // it saw it, and one flow was tracked.
    assert_eq!(
        recorded_ports(&dp, &fragment_key6(CLIENT6, VIP6, request_id)),
        (50000, 53)
    );
    assert_eq!(
        recorded_ports(&dp, &fragment_key6(BACKEND6, CLIENT6, answer_id)),
        (5353, 50000)
    );
    let master = dp
        .conntrack
        .get(
            &ct_key((CLIENT6, 50000), (VIP6, 53), PROTO_UDP, CT_DIR_FORWARD),
            0,
        )
        .expect("the flow's master entry");
    assert_eq!(master.nat_addr, BACKEND6.octets());
}

#[test]
fn ipv6_fragments_behind_a_hop_by_hop_header_are_translated() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_service(VIP6, 53, PROTO_UDP, &[(BACKEND6, 5353)]);
    let client = (CLIENT6, 50003);
    let [first, later] = fragments(client, (VIP6, 53), 5);
    let [out_first, out_later] = fragments(client, (BACKEND6, 5353), 5);
    run_cases(
        &dp,
        vec![
            Case {
                name: "the first fragment behind hop-by-hop options is DNATed",
                program: PROG_FROM_POD,
                input: behind_hop_by_hop(&first),
                verdict: CONTINUE,
                expect: Expect::Bytes(behind_hop_by_hop(&out_first)),
            },
            Case {
                name: "so is the later one",
                program: PROG_FROM_POD,
                input: behind_hop_by_hop(&later),
                verdict: CONTINUE,
                expect: Expect::Bytes(behind_hop_by_hop(&out_later)),
            },
        ],
    );
    assert_eq!(dp.counter("fragment_translated"), 1);
}

#[test]
fn an_ipv6_later_fragment_without_its_first_passes_untouched_and_opens_no_flow() {
    require_root!();
    later_fragments_without_record_pass_untouched(CLIENT6, VIP6, BACKEND6);
}

#[test]
fn an_ipv6_first_fragment_to_a_service_without_endpoints_is_refused_never_a_later_one() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_service::<Ipv6Addr>(VIP6_EMPTY, 53, PROTO_UDP, &[]);
    let [first, later] = fragments((CLIENT6, 50004), (VIP6_EMPTY, 53), 6);
    // A later fragment never starts a flow, so it is never refused.
    let (verdict, out) = dp.run(PROG_FROM_POD, &later);
    assert_eq!(verdict, CONTINUE, "the later fragment continues");
    assert_eq!(out, later, "the later fragment is untouched");
    // The first fragment is a new flow: refused like a whole datagram.
    let (verdict, out) = dp.run(PROG_FROM_POD, &first);
    assert_eq!(verdict, REDIRECT, "the ICMPv6 error goes back to the pod");
    let headers = PacketHeaders::from_ethernet_slice(&out).expect("the error parses");
    let Some(NetHeaders::Ipv6(ip, _)) = &headers.net else {
        panic!("not IPv6");
    };
    assert_eq!(
        (ip.source, ip.destination),
        (VIP6_EMPTY.octets(), CLIENT6.octets())
    );
    let Some(TransportHeader::Icmpv6(icmp)) = &headers.transport else {
        panic!("not ICMPv6");
    };
    assert_eq!(
        icmp.icmp_type,
        Icmpv6Type::DestinationUnreachable(etherparse::icmpv6::DestUnreachableCode::Port)
    );
    assert_eq!(
        icmp.checksum,
        icmp.icmp_type
            .calc_checksum(ip.source, ip.destination, headers.payload.slice())
            .unwrap(),
        "ICMPv6 checksum"
    );
    // The quote: IPv6 header, fragment header, UDP header.
    assert_eq!(&out[14 + 40 + 8..], &first[14..14 + 40 + 8 + 8]);
    assert_eq!(dp.counter("rejected_no_backend"), 1);
}

#[test]
fn ipv6_fragments_to_a_remote_backend_are_snated_and_their_answers_restored() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_snat_address(SNAT_IP6);
    dp.set_snat_ports(SNAT_PORT, SNAT_PORT);
    dp.set_frontend(
        NODE_IP6,
        30053,
        PROTO_UDP,
        FRONTEND_FLAG_NODE_PORT,
        &[(REMOTE6, 5353, false)],
    );
    let (client, node_port, remote) = (
        (EXTERNAL_CLIENT6, 50020),
        (NODE_IP6, 30053),
        (REMOTE6, 5353),
    );
    let snat = (SNAT_IP6, SNAT_PORT);
    // XDP hands IPv6 to the TC program beside it, fragments as well.
    let [first, _] = fragments(client, node_port, 20);
    let (verdict, out) = dp.run(PROG_FROM_NETWORK, &first);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out,
        [b"SLBD".as_slice(), &first].concat(),
        "deferred, untouched"
    );
    // In: DNAT on TC, then SNAT on the way to the other node.
    let mut rows = fragment_rows(
        [
            "TC: the first IPv6 fragment is DNATed to the remote backend",
            "TC: the later fragment follows it",
        ],
        PROG_FROM_NETWORK_TC,
        client,
        node_port,
        client,
        remote,
        20,
        CONTINUE,
    );
    rows.extend(fragment_rows(
        [
            "to_network: the first IPv6 fragment gets the SNAT source",
            "to_network: so does the later one (address only)",
        ],
        PROG_TO_NETWORK,
        client,
        remote,
        snat,
        remote,
        21,
        CONTINUE,
    ));
    // Back: reverse SNAT on TC, then the NodePort restored on the way out.
    rows.extend(fragment_rows(
        [
            "TC: the answer's first IPv6 fragment goes to the client again",
            "TC: so does its later fragment",
        ],
        PROG_FROM_NETWORK_TC,
        remote,
        snat,
        remote,
        client,
        22,
        CONTINUE,
    ));
    rows.extend(fragment_rows(
        [
            "to_network: the answer's first IPv6 fragment comes from the NodePort",
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
    assert_eq!(dp.counter("fragment_translated"), 4);
}

#[test]
fn ipv6_fragments_of_a_hairpin_flow_are_translated_both_ways() {
    require_root!();
    hairpin_fragments_are_translated_both_ways(BACKEND6, VIP6, Ipv6Addr::from(HAIRPIN_IPV6));
}

/// `packet` (Ethernet, IPv6) with its payload length set to `len`.
fn with_payload_len(mut packet: Vec<u8>, len: u16) -> Vec<u8> {
    packet[14 + 4..14 + 6].copy_from_slice(&len.to_be_bytes());
    packet
}

/// `packet` (Ethernet, IPv6, fragment header) with the fragment header's
/// next header set to `next`.
fn with_fragment_next_header(mut packet: Vec<u8>, next: u8) -> Vec<u8> {
    packet[14 + 40] = next;
    packet
}

/// Fragment headers cut short, inconsistent or followed by anything but
/// TCP or UDP: the parser's bounds hold, and each passes untouched, a
/// later fragment too although its datagram's record is there.
#[test]
fn malformed_ipv6_fragments_pass_untouched() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_service(VIP6, 53, PROTO_UDP, &[(BACKEND6, 5353)]);
    let client = (CLIENT6, 50040);
    let [first, later] = fragments(client, (VIP6, 53), 40);
    // The record the later fragments could find.
    let (verdict, _) = dp.run(PROG_FROM_POD, &first);
    assert_eq!(verdict, CONTINUE);
    let before = dp.counter("fragment_translated");
    let cases = [
        (
            "a first fragment cut inside its fragment header",
            first[..14 + 40 + 4].to_vec(),
        ),
        (
            "a first fragment cut inside its UDP header",
            first[..14 + 40 + 8 + 4].to_vec(),
        ),
        (
            "a later fragment cut inside its fragment header",
            later[..14 + 40 + 6].to_vec(),
        ),
        (
            "a later fragment whose payload length ends inside its fragment header",
            with_payload_len(later.clone(), 4),
        ),
        (
            "a first fragment whose payload length ends inside its UDP header",
            with_payload_len(first.clone(), 8 + 4),
        ),
        (
            "a first fragment whose fragment header announces destination options",
            with_fragment_next_header(first.clone(), 60),
        ),
        (
            "a later fragment whose fragment header announces destination options",
            with_fragment_next_header(later.clone(), 60),
        ),
        (
            "a later fragment whose fragment header announces another fragment header",
            with_fragment_next_header(later.clone(), 44),
        ),
    ];
    for (name, input) in cases {
        let (verdict, out) = dp.run(PROG_FROM_POD, &input);
        assert_eq!(verdict, CONTINUE, "{name}: verdict");
        assert_eq!(out, input, "{name}: untouched");
    }
    assert_eq!(dp.counter("fragment_translated"), before);
}
