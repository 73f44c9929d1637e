//! Packet fuzzing through the real programs (BPF_PROG_TEST_RUN): a million
//! generated packets (`SERVICE_TESTS_FUZZ_PACKETS`, default 1,000,000)
//! through every hook: from_pod, to_pod, from_network on XDP and on TC, and
//! to_network. Valid flows to the programmed frontends, with their replies
//! built from what the programs made of the requests, are mixed with
//! hostile packets: truncated, bad header lengths, IP options, fragments,
//! bad checksums, unknown protocols, VLAN tags, ICMP errors quoting garbage,
//! flipped bytes.
//!
//! The invariant, for every output: a documented verdict, and either the
//! input untouched, or a well-formed packet whose checksums verify (each
//! that verified in the input) and whose translation matches the maps: a
//! frontend's traffic goes to one of its backends, replies come from the
//! frontend (of a flow the programs translated), SNAT uses the node's
//! address and a port of the SNAT range and is undone for its flow only,
//! and nothing else of the packet changes. The checker knows only the maps
//! programmed here and what the programs' outputs showed, not how the
//! datapath works inside.
//!
//! proptest drives it from a seed printed at the start; rerun a failure
//! with `SERVICE_TESTS_FUZZ_SEED=<seed>`.

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    time::Instant,
};

use etherparse::checksum::Sum16BitWords;
use proptest::{
    prelude::*,
    test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner},
};
use service_agent::datapath::{
    PROG_FROM_NETWORK, PROG_FROM_NETWORK_TC, PROG_FROM_POD, PROG_TO_NETWORK, PROG_TO_POD,
};
use service_common::{
    FRONTEND_FLAG_AFFINITY, FRONTEND_FLAG_CLUSTER_IP, FRONTEND_FLAG_EXTERNAL_IP,
    FRONTEND_FLAG_EXTERNAL_LOCAL, FRONTEND_FLAG_LOAD_BALANCER, FRONTEND_FLAG_NODE_PORT,
    HAIRPIN_IPV4, PROTO_TCP, PROTO_UDP,
};
use service_tests::{
    datapath_fixture::{Datapath, frontend},
    fuzzing::{
        self, DEFERRED_MARK, TC_CONTINUE, TC_DROP, TC_REDIRECT, XDP_DROP, XDP_PASS, hex, seed,
    },
    packets, require_root,
};

/// Cases per proptest run; runs follow each other until enough packets.
const CASES_PER_RUN: u32 = 20_000;

const SNAT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The SNAT port range configured here (both included): a small one, so
/// that ports get reused.
const SNAT_PORTS: std::ops::RangeInclusive<u16> = 20000..=20999;
const NODE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(
    HAIRPIN_IPV4[0],
    HAIRPIN_IPV4[1],
    HAIRPIN_IPV4[2],
    HAIRPIN_IPV4[3],
);
/// Pods that send from_pod traffic; the first is also a backend (hairpin).
const POD_CLIENTS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 200, 0, 2),
    Ipv4Addr::new(10, 200, 0, 3),
    Ipv4Addr::new(10, 200, 0, 4),
];
/// Clients on the network.
const NETWORK_CLIENTS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 99, 0, 2),
    Ipv4Addr::new(10, 99, 0, 3),
    Ipv4Addr::new(192, 0, 2, 7),
];

// ---------------------------------------------------------------------------
// The hooks
// ---------------------------------------------------------------------------

/// A program under test, with what its documentation promises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Hook {
    FromPod,
    ToPod,
    FromNetworkXdp,
    FromNetworkTc,
    ToNetwork,
}

const HOOKS: [Hook; 5] = [
    Hook::FromPod,
    Hook::ToPod,
    Hook::FromNetworkXdp,
    Hook::FromNetworkTc,
    Hook::ToNetwork,
];

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::FromPod => PROG_FROM_POD,
            Hook::ToPod => PROG_TO_POD,
            Hook::FromNetworkXdp => PROG_FROM_NETWORK,
            Hook::FromNetworkTc => PROG_FROM_NETWORK_TC,
            Hook::ToNetwork => PROG_TO_NETWORK,
        }
    }

    /// The verdicts the hook documents.
    fn verdicts(self) -> &'static [u32] {
        match self {
            Hook::FromPod | Hook::FromNetworkTc => &[TC_CONTINUE, TC_DROP, TC_REDIRECT],
            Hook::ToPod | Hook::ToNetwork => &[TC_CONTINUE, TC_DROP],
            Hook::FromNetworkXdp => &[XDP_PASS, XDP_DROP],
        }
    }

    fn drops(self, verdict: u32) -> bool {
        verdict
            == if self == Hook::FromNetworkXdp {
                XDP_DROP
            } else {
                TC_DROP
            }
    }

    /// Ingress hooks: DNAT of frontends, reverse SNAT, hairpin.
    fn is_ingress(self) -> bool {
        matches!(
            self,
            Hook::FromPod | Hook::FromNetworkXdp | Hook::FromNetworkTc
        )
    }

    /// Whether the hook serves the frontend kind `flags`.
    fn serves(self, flags: u16) -> bool {
        match self {
            Hook::FromNetworkXdp | Hook::FromNetworkTc => {
                flags
                    & (FRONTEND_FLAG_NODE_PORT
                        | FRONTEND_FLAG_LOAD_BALANCER
                        | FRONTEND_FLAG_EXTERNAL_IP)
                    != 0
            }
            _ => true,
        }
    }
}

// ---------------------------------------------------------------------------
// The maps, and what the outputs showed
// ---------------------------------------------------------------------------

/// A frontend as programmed here.
#[derive(Debug)]
struct Frontend {
    addr: Ipv4Addr,
    port: u16,
    proto: u8,
    flags: u16,
    /// (address, port, on this node)
    backends: Vec<(Ipv4Addr, u16, bool)>,
    /// Session affinity timeout in seconds (0: off). With it, a new flow
    /// still goes to one of `backends`: the invariant stays.
    affinity: u32,
    /// `loadBalancerSourceRanges`: clients outside them are dropped
    /// (drops are always allowed by the invariant).
    source_ranges: &'static [&'static str],
}

/// A reply the datapath may reverse-translate: (backend, backend port,
/// client, client port, protocol).
type ReplyTuple = (Ipv4Addr, u16, Ipv4Addr, u16, u8);
/// An SNATed flow as its replies show it: (backend, backend port, SNAT
/// port, protocol).
type SnatTuple = (Ipv4Addr, u16, u16, u8);

/// The frontends (no two share a backend address and port, so a backend
/// names its frontend), and the flows the outputs showed being translated.
struct Model {
    frontends: Vec<Frontend>,
    /// Replies the datapath may reverse-translate: (backend, backend port,
    /// client, client port, protocol) of every DNAT seen.
    replies: RefCell<HashSet<ReplyTuple>>,
    /// Hairpin flows seen: (backend = client, backend port, client port,
    /// protocol).
    hairpins: RefCell<HashSet<(Ipv4Addr, u16, u16, u8)>>,
    /// SNAT seen: (backend, backend port, SNAT port, protocol) -> client.
    snat: RefCell<HashMap<SnatTuple, (Ipv4Addr, u16)>>,
}

impl Model {
    fn frontend(&self, addr: Ipv4Addr, port: u16, proto: u8) -> Option<&Frontend> {
        self.frontends
            .iter()
            .find(|f| f.addr == addr && f.port == port && f.proto == proto)
    }

    /// The frontend whose backend is `addr:port`.
    fn owner(&self, addr: Ipv4Addr, port: u16, proto: u8) -> Option<&Frontend> {
        self.frontends
            .iter()
            .find(|f| f.proto == proto && f.backends.iter().any(|b| b.0 == addr && b.1 == port))
    }
}

/// Programs the frontends: every kind, local and remote backends, one
/// without backends per hook family, and a ClusterIP whose backend is one
/// of the client pods (hairpin).
fn program(dp: &mut Datapath) -> Model {
    dp.set_snat_address(SNAT);
    dp.set_snat_ports(*SNAT_PORTS.start(), *SNAT_PORTS.end());
    let pod = |n: u8| Ipv4Addr::new(10, 200, n, 2);
    let remote = |n: u8| Ipv4Addr::new(10, 202, n, 2);
    let frontends = vec![
        Frontend {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: PROTO_TCP,
            flags: FRONTEND_FLAG_CLUSTER_IP,
            backends: vec![
                (pod(1), 8080, true),
                (pod(2), 8080, true),
                (remote(1), 8080, false),
            ],
            affinity: 10_800,
            source_ranges: &[],
        },
        Frontend {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 53,
            proto: PROTO_UDP,
            flags: FRONTEND_FLAG_CLUSTER_IP,
            backends: vec![(pod(1), 5353, true), (pod(3), 5353, true)],
            affinity: 0,
            source_ranges: &[],
        },
        Frontend {
            addr: Ipv4Addr::new(10, 96, 0, 11),
            port: 80,
            proto: PROTO_TCP,
            flags: FRONTEND_FLAG_CLUSTER_IP,
            backends: vec![],
            affinity: 0,
            source_ranges: &[],
        },
        Frontend {
            addr: Ipv4Addr::new(10, 96, 0, 11),
            port: 53,
            proto: PROTO_UDP,
            flags: FRONTEND_FLAG_CLUSTER_IP,
            backends: vec![],
            affinity: 0,
            source_ranges: &[],
        },
        Frontend {
            addr: Ipv4Addr::new(10, 96, 0, 12),
            port: 443,
            proto: PROTO_TCP,
            flags: FRONTEND_FLAG_CLUSTER_IP,
            backends: vec![(POD_CLIENTS[0], 8443, true), (pod(4), 8443, true)],
            affinity: 0,
            source_ranges: &[],
        },
        Frontend {
            addr: NODE,
            port: 30080,
            proto: PROTO_TCP,
            flags: FRONTEND_FLAG_NODE_PORT,
            backends: vec![(pod(5), 8080, true), (remote(2), 8080, false)],
            affinity: 0,
            source_ranges: &[],
        },
        Frontend {
            addr: NODE,
            port: 30053,
            proto: PROTO_UDP,
            flags: FRONTEND_FLAG_NODE_PORT,
            backends: vec![(remote(3), 5353, false), (pod(6), 5353, true)],
            affinity: 60,
            source_ranges: &[],
        },
        Frontend {
            addr: NODE,
            port: 30099,
            proto: PROTO_TCP,
            flags: FRONTEND_FLAG_NODE_PORT,
            backends: vec![],
            affinity: 0,
            source_ranges: &[],
        },
        Frontend {
            addr: Ipv4Addr::new(10, 98, 0, 100),
            port: 80,
            proto: PROTO_TCP,
            // externalTrafficPolicy: Local, admitting one network client
            // and two pods.
            flags: FRONTEND_FLAG_LOAD_BALANCER | FRONTEND_FLAG_EXTERNAL_LOCAL,
            backends: vec![(pod(7), 80, true)],
            affinity: 0,
            source_ranges: &["10.99.0.2/32", "10.200.0.2/31"],
        },
        Frontend {
            addr: Ipv4Addr::new(10, 98, 0, 200),
            port: 80,
            proto: PROTO_TCP,
            flags: FRONTEND_FLAG_EXTERNAL_IP,
            backends: vec![(remote(4), 80, false)],
            affinity: 0,
            source_ranges: &[],
        },
    ];
    for f in &frontends {
        let mut desired = frontend(f.addr, f.port, f.proto, f.flags, &f.backends);
        if f.affinity != 0 {
            desired.flags |= FRONTEND_FLAG_AFFINITY;
            desired.affinity_timeout_secs = f.affinity;
        }
        desired.source_ranges = f.source_ranges.iter().map(|r| r.parse().unwrap()).collect();
        dp.set_desired_frontend(desired);
    }
    Model {
        frontends,
        replies: RefCell::default(),
        hairpins: RefCell::default(),
        snat: RefCell::default(),
    }
}

// ---------------------------------------------------------------------------
// Generated cases
// ---------------------------------------------------------------------------

/// Where a flow enters.
#[derive(Clone, Copy, Debug)]
enum Entry {
    Pod,
    NetworkXdp,
    NetworkTc,
}

/// A flow: a client, a destination (a frontend, or an address that is
/// none), a protocol, TCP flags and a payload.
#[derive(Clone, Debug)]
struct FlowSpec {
    entry: Entry,
    client: usize,
    client_port: u16,
    /// Index into the frontends; past the end: an address that is none.
    frontend: usize,
    tcp_flags: u8,
    reply_flags: u8,
    payload: Vec<u8>,
}

/// A way to spoil a packet.
#[derive(Clone, Debug)]
enum Mutation {
    Truncate(u16),
    HeaderLength(u8),
    IpOptions(Vec<u8>),
    TotalLength(u16),
    Fragment { more: bool, offset: u16 },
    BadIpChecksum(u16),
    BadL4Checksum(u16),
    Protocol(u8),
    Vlan(u16),
    IcmpError { kind: u8, garbage: Vec<u8> },
    EtherType(u16),
    FlipByte { at: u16, xor: u8 },
}

/// One case: a flow with its reply (no mutation), or a spoiled packet of
/// a flow sent to one hook.
#[derive(Clone, Debug)]
struct Case {
    flow: FlowSpec,
    mutations: Vec<Mutation>,
    hook: usize,
}

fn case_strategy(frontends: usize) -> impl Strategy<Value = Case> {
    let entry = prop_oneof![
        Just(Entry::Pod),
        Just(Entry::NetworkXdp),
        Just(Entry::NetworkTc)
    ];
    let flow = (
        entry,
        0..3usize,
        1024..2048u16,
        0..frontends + 2,
        any::<u8>(),
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(
            |(entry, client, client_port, frontend, tcp_flags, reply_flags, payload)| FlowSpec {
                entry,
                client,
                client_port,
                frontend,
                tcp_flags,
                reply_flags,
                payload,
            },
        );
    let mutation = prop_oneof![
        (0..120u16).prop_map(Mutation::Truncate),
        (0..16u8).prop_map(Mutation::HeaderLength),
        prop::collection::vec(any::<u8>(), 1..41).prop_map(Mutation::IpOptions),
        any::<u16>().prop_map(Mutation::TotalLength),
        (any::<bool>(), 0..0x2000u16)
            .prop_map(|(more, offset)| Mutation::Fragment { more, offset }),
        (1..u16::MAX).prop_map(Mutation::BadIpChecksum),
        (1..u16::MAX).prop_map(Mutation::BadL4Checksum),
        any::<u8>().prop_map(Mutation::Protocol),
        any::<u16>().prop_map(Mutation::Vlan),
        (0..4u8, prop::collection::vec(any::<u8>(), 0..48))
            .prop_map(|(kind, garbage)| Mutation::IcmpError { kind, garbage }),
        prop_oneof![Just(0x86ddu16), Just(0x0806), any::<u16>()].prop_map(Mutation::EtherType),
        (0..100u16, 1..=255u8).prop_map(|(at, xor)| Mutation::FlipByte { at, xor }),
    ];
    let mutations = prop_oneof![
        1 => Just(Vec::new()),
        1 => prop::collection::vec(mutation, 1..4),
    ];
    (flow, mutations, 0..HOOKS.len()).prop_map(|(flow, mutations, hook)| Case {
        flow,
        mutations,
        hook,
    })
}

// ---------------------------------------------------------------------------
// Building packets
// ---------------------------------------------------------------------------

fn client_of(flow: &FlowSpec) -> Ipv4Addr {
    match flow.entry {
        Entry::Pod => POD_CLIENTS[flow.client],
        _ => NETWORK_CLIENTS[flow.client],
    }
}

/// The flow's destination and protocol.
fn destination(model: &Model, flow: &FlowSpec) -> (Ipv4Addr, u16, u8) {
    match model.frontends.get(flow.frontend) {
        Some(f) => (f.addr, f.port, f.proto),
        None if flow.frontend == model.frontends.len() => {
            (Ipv4Addr::new(10, 96, 0, 99), 80, PROTO_TCP)
        }
        None => (NODE, 30080, PROTO_UDP),
    }
}

/// A TCP or UDP packet with valid checksums.
fn l4_packet(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    proto: u8,
    tcp_flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    if proto == PROTO_UDP {
        return packets::udp(src, dst, payload);
    }
    let mut out = packets::tcp(src, dst, false, false, payload);
    // The flags byte (offset 13 of the TCP header), then the checksum again.
    out[14 + 20 + 13] = tcp_flags;
    fix_l4_checksum(&mut out);
    out
}

/// Recomputes the IPv4 header checksum.
fn fix_ip_checksum(p: &mut [u8]) {
    let Some(ip) = parse(p) else { return };
    p[ip.l3 + 10..ip.l3 + 12].fill(0);
    let sum = Sum16BitWords::new()
        .add_slice(&p[ip.l3..ip.l3 + ip.ihl])
        .ones_complement()
        .to_be();
    p[ip.l3 + 10..ip.l3 + 12].copy_from_slice(&sum.to_ne_bytes());
}

/// Recomputes the TCP or UDP checksum of an unfragmented packet.
fn fix_l4_checksum(p: &mut [u8]) {
    let Some(ip) = parse(p) else { return };
    let Some(at) = l4_checksum_offset(&ip) else {
        return;
    };
    if at + 2 > p.len() {
        return;
    }
    p[at..at + 2].fill(0);
    let sum = l4_sum(p, &ip).ones_complement();
    let sum = if sum == 0 && ip.proto == PROTO_UDP {
        0xffff
    } else {
        sum
    };
    p[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Applies a mutation; the checksums are left as the mutation leaves them,
/// unless the mutation's point is something else (options, total length).
fn mutate(p: &mut Vec<u8>, mutation: &Mutation) {
    match mutation {
        Mutation::Truncate(len) => p.truncate(usize::from(*len).max(14)),
        Mutation::HeaderLength(ihl) if p.len() > 14 => p[14] = 0x40 | ihl,
        Mutation::IpOptions(options) if parse(p).is_some() => {
            let mut options = options.clone();
            options.resize(options.len().div_ceil(4) * 4, 0);
            let ihl = 20 + options.len();
            p.splice(34..34, options);
            p[14] = 0x40 | (ihl / 4) as u8;
            let total = u16::from_be_bytes([p[16], p[17]]).wrapping_add(ihl as u16 - 20);
            p[16..18].copy_from_slice(&total.to_be_bytes());
            fix_ip_checksum(p);
        }
        Mutation::TotalLength(len) if p.len() >= 18 => {
            p[16..18].copy_from_slice(&len.to_be_bytes());
            fix_ip_checksum(p);
        }
        Mutation::Fragment { more, offset } if p.len() >= 22 => {
            let field = (u16::from(*more) << 13) | offset;
            p[20..22].copy_from_slice(&field.to_be_bytes());
            fix_ip_checksum(p);
        }
        Mutation::BadIpChecksum(delta) if p.len() >= 26 => {
            let old = u16::from_be_bytes([p[24], p[25]]);
            p[24..26].copy_from_slice(&old.wrapping_add(*delta).to_be_bytes());
        }
        Mutation::BadL4Checksum(delta) => {
            if let Some(at) = parse(p).as_ref().and_then(l4_checksum_offset)
                && at + 2 <= p.len()
            {
                let old = u16::from_be_bytes([p[at], p[at + 1]]);
                p[at..at + 2].copy_from_slice(&old.wrapping_add(*delta).to_be_bytes());
            }
        }
        Mutation::Protocol(proto) if p.len() >= 24 => {
            p[23] = *proto;
            fix_ip_checksum(p);
        }
        Mutation::Vlan(tci) => {
            let tag = [0x81, 0x00, (tci >> 8) as u8, *tci as u8];
            p.splice(12..12, tag);
        }
        Mutation::IcmpError { kind, garbage } if parse(p).is_some() => {
            // An ICMP error to this packet's source, quoting this packet's
            // header (or garbage), from this packet's destination.
            let ip = parse(p).expect("parsed");
            let (icmp_type, code) = [(3, 3), (3, 4), (11, 0), (12, 0)][usize::from(*kind)];
            let mut quote: Vec<u8> = p[ip.l3..p.len().min(ip.l3 + ip.ihl + 8)].to_vec();
            quote.extend_from_slice(garbage);
            let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0, 0];
            if (icmp_type, code) == (3, 4) {
                icmp[6..8].copy_from_slice(&1400u16.to_be_bytes());
            }
            icmp.extend_from_slice(&quote);
            let sum = Sum16BitWords::new().add_slice(&icmp).ones_complement();
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            let mut out = p[..14].to_vec();
            let mut header = p[ip.l3..ip.l3 + 20].to_vec();
            header[0] = 0x45;
            header[6..8].fill(0);
            header[9] = 1;
            header[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
            header.copy_within(12..16, 16);
            header[12..16].copy_from_slice(&p[ip.l3 + 16..ip.l3 + 20]);
            out.extend_from_slice(&header);
            out.extend_from_slice(&icmp);
            fix_ip_checksum(&mut out);
            *p = out;
        }
        Mutation::EtherType(ether_type) if p.len() >= 14 => {
            p[12..14].copy_from_slice(&ether_type.to_be_bytes());
        }
        Mutation::FlipByte { at, xor } => {
            if let Some(byte) = p.get_mut(usize::from(*at)) {
                *byte ^= xor;
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// Reading packets
// ---------------------------------------------------------------------------

/// What the checker reads of an IPv4 packet.
#[derive(Clone, Debug)]
struct Ip {
    l3: usize,
    ihl: usize,
    total: usize,
    proto: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    /// Offset (in 8-byte units) and more-fragments flag.
    fragment: (u16, bool),
}

impl Ip {
    /// Whether the L4 header is in this packet (not a later fragment).
    fn has_l4(&self) -> bool {
        self.fragment.0 == 0
    }

    fn is_fragment(&self) -> bool {
        self.fragment != (0, false)
    }
}

/// An untagged Ethernet frame holding a whole IPv4 header.
fn parse(p: &[u8]) -> Option<Ip> {
    if p.len() < 34 || p[12..14] != [0x08, 0x00] || p[14] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[14] & 0xf) * 4;
    if ihl < 20 || p.len() < 14 + ihl {
        return None;
    }
    let flags = u16::from_be_bytes([p[20], p[21]]);
    Some(Ip {
        l3: 14,
        ihl,
        total: usize::from(u16::from_be_bytes([p[16], p[17]])),
        proto: p[23],
        src: Ipv4Addr::new(p[26], p[27], p[28], p[29]),
        dst: Ipv4Addr::new(p[30], p[31], p[32], p[33]),
        fragment: (flags & 0x1fff, flags & 0x2000 != 0),
    })
}

fn l4_offset(ip: &Ip) -> usize {
    ip.l3 + ip.ihl
}

fn l4_checksum_offset(ip: &Ip) -> Option<usize> {
    if !ip.has_l4() {
        return None;
    }
    match ip.proto {
        PROTO_TCP => Some(l4_offset(ip) + 16),
        PROTO_UDP => Some(l4_offset(ip) + 6),
        1 => Some(l4_offset(ip) + 2),
        _ => None,
    }
}

/// Source and destination ports, when the TCP/UDP header is there.
fn ports(p: &[u8], ip: &Ip) -> Option<(u16, u16)> {
    let at = l4_offset(ip);
    let need = if ip.proto == PROTO_TCP { 20 } else { 8 };
    if !ip.has_l4() || !matches!(ip.proto, PROTO_TCP | PROTO_UDP) || p.len() < at + need {
        return None;
    }
    Some((
        u16::from_be_bytes([p[at], p[at + 1]]),
        u16::from_be_bytes([p[at + 2], p[at + 3]]),
    ))
}

/// The L4 bytes the IPv4 header claims, when the frame holds them all.
fn l4_bytes<'a>(p: &'a [u8], ip: &Ip) -> Option<&'a [u8]> {
    let start = l4_offset(ip);
    let end = ip.l3 + ip.total;
    (ip.total >= ip.ihl && end <= p.len()).then(|| &p[start..end])
}

fn l4_sum(p: &[u8], ip: &Ip) -> Sum16BitWords {
    let bytes = l4_bytes(p, ip).unwrap_or(&[]);
    let mut sum = Sum16BitWords::new().add_slice(&p[ip.l3 + 12..ip.l3 + 20]);
    sum = sum.add_2bytes([0, ip.proto]);
    sum = sum.add_2bytes((bytes.len() as u16).to_be_bytes());
    sum.add_slice(bytes)
}

/// Which checksums of the packet verify: (IPv4 header, L4).
fn checksums(p: &[u8]) -> (bool, bool) {
    let Some(ip) = parse(p) else {
        return (false, false);
    };
    let header = Sum16BitWords::new()
        .add_slice(&p[ip.l3..ip.l3 + ip.ihl])
        .ones_complement()
        == 0;
    // A fragment's L4 checksum covers the whole datagram: not checkable.
    let l4 = !ip.is_fragment()
        && match (ip.proto, l4_bytes(p, &ip)) {
            (PROTO_UDP, Some(bytes)) if bytes.len() >= 8 && bytes[6..8] == [0, 0] => true,
            (PROTO_TCP | PROTO_UDP, Some(_)) => l4_sum(p, &ip).ones_complement() == 0,
            (1, Some(bytes)) => Sum16BitWords::new().add_slice(bytes).ones_complement() == 0,
            _ => false,
        };
    (header, l4)
}

/// Whether `output` is `input` deferred by XDP, untouched, to the TC
/// program beside it, and rightly so: its L4 checksum field holds only
/// its pseudo-header sum (a checksum left to offload, which only TC can
/// update exactly).
fn deferred_to_tc(input: &[u8], output: &[u8]) -> bool {
    if output.strip_prefix(DEFERRED_MARK) != Some(input) {
        return false;
    }
    let Some(ip) = parse(input) else {
        return false;
    };
    let Some(at) = l4_checksum_offset(&ip).filter(|_| matches!(ip.proto, PROTO_TCP | PROTO_UDP))
    else {
        return false;
    };
    if input.len() < at + 2 {
        return false;
    }
    let l4_len = (ip.total as u16).wrapping_sub(ip.ihl as u16);
    let pseudo = Sum16BitWords::new()
        .add_slice(&input[ip.l3 + 12..ip.l3 + 20])
        .add_2bytes([0, ip.proto])
        .add_2bytes(l4_len.to_be_bytes());
    // (The sum runs over native-endian words: its bytes are native too.)
    input[at..at + 2] == (!pseudo.ones_complement()).to_ne_bytes()
}

/// Whether `output` is `input` deferred by XDP, untouched, to the TC
/// program beside it because it is an IPv6 frame (EtherType `0x86dd`):
/// XDP hands every IPv6 packet to TC, which translates IPv6.
fn deferred_ipv6(input: &[u8], output: &[u8]) -> bool {
    output.strip_prefix(DEFERRED_MARK) == Some(input) && input.get(12..14) == Some(&[0x86, 0xdd])
}

/// Whether `output` is `input` deferred by XDP, untouched, to the TC
/// program beside it for a refusal, and rightly so: it goes to a frontend
/// without backends that the hook serves (TC turns it into a TCP RST or
/// an ICMP port unreachable).
fn deferred_refusal(model: &Model, hook: Hook, input: &[u8], output: &[u8]) -> bool {
    if output.strip_prefix(DEFERRED_MARK) != Some(input) {
        return false;
    }
    let Some(ip) = parse(input) else {
        return false;
    };
    ports(input, &ip).is_some_and(|(_, dport)| {
        model
            .frontend(ip.dst, dport, ip.proto)
            .is_some_and(|f| f.backends.is_empty() && hook.serves(f.flags))
    })
}

// ---------------------------------------------------------------------------
// The invariant
// ---------------------------------------------------------------------------

/// What an output was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Dropped,
    Untouched,
    Translated,
    Refused,
    Hairpin,
}

/// A packet that went in and the packet that came out, as the checker
/// reads them.
struct Pair<'a> {
    input: &'a [u8],
    ip_in: Ip,
    output: &'a [u8],
    ip_out: Ip,
}

/// Checks one output against the invariant, recording translated flows in
/// the model. `Err` names what is wrong.
fn check(
    model: &Model,
    hook: Hook,
    input: &[u8],
    verdict: u32,
    output: &[u8],
) -> Result<Outcome, String> {
    if !hook.verdicts().contains(&verdict) {
        return Err(format!("undocumented verdict {verdict}"));
    }
    if hook.drops(verdict) {
        return Ok(Outcome::Dropped);
    }
    if output == input {
        return Ok(Outcome::Untouched);
    }
    if hook == Hook::FromNetworkXdp
        && (deferred_to_tc(input, output)
            || deferred_ipv6(input, output)
            || deferred_refusal(model, hook, input, output))
    {
        return Ok(Outcome::Untouched);
    }
    let (Some(ip_in), Some(ip_out)) = (parse(input), parse(output)) else {
        return Err("changed a packet that is not (or no longer) IPv4".into());
    };
    let (in_header_ok, in_l4_ok) = checksums(input);
    let (out_header_ok, out_l4_ok) = checksums(output);
    if in_header_ok && !out_header_ok {
        return Err("the IPv4 header checksum no longer verifies".into());
    }
    if verdict == TC_REDIRECT && ip_out.src == ip_in.dst && ip_out.dst == ip_in.src {
        let pair = Pair {
            input,
            ip_in,
            output,
            ip_out,
        };
        return check_refusal(model, hook, &pair, in_l4_ok, out_l4_ok);
    }
    if in_l4_ok && !out_l4_ok {
        return Err(format!(
            "the protocol {} checksum no longer verifies",
            ip_in.proto
        ));
    }
    if output.len() != input.len() {
        return Err("a translation changed the length".into());
    }
    // Everything but addresses, ports and checksums stays as it was (the
    // MAC addresses swap when a hairpin packet is sent back).
    let hairpin_redirect = verdict == TC_REDIRECT;
    let mut a = input.to_vec();
    let mut b = output.to_vec();
    for p in [&mut a, &mut b] {
        blank_rewritable(p, &ip_in, hairpin_redirect);
    }
    if a != b {
        let at = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0);
        return Err(format!("byte {at} changed, which no translation changes"));
    }
    if ip_in.proto == 1 {
        let pair = Pair {
            input,
            ip_in,
            output,
            ip_out,
        };
        return check_icmp_error(model, hook, &pair);
    }
    let before = (ip_in.src, ip_in.dst, ports(input, &ip_in));
    let after = (ip_out.src, ip_out.dst, ports(output, &ip_out));
    check_translation(model, hook, ip_in.proto, before, after, hairpin_redirect)
}

/// Zeroes what a translation may change: addresses, the IPv4 checksum,
/// ports and the L4 checksum, and for an ICMP error the same fields of the
/// header it quotes; and, when `macs`, the MAC addresses.
fn blank_rewritable(p: &mut [u8], ip: &Ip, macs: bool) {
    if macs {
        p[..12].fill(0);
    }
    p[ip.l3 + 10..ip.l3 + 12].fill(0);
    p[ip.l3 + 12..ip.l3 + 20].fill(0);
    let l4 = l4_offset(ip);
    if !ip.has_l4() {
        return;
    }
    let end = p.len();
    let blank = |p: &mut [u8], range: std::ops::Range<usize>| {
        let range = range.start.min(end)..range.end.min(end);
        p[range].fill(0);
    };
    match ip.proto {
        PROTO_TCP => {
            blank(p, l4..l4 + 4);
            blank(p, l4 + 16..l4 + 18);
        }
        PROTO_UDP => {
            blank(p, l4..l4 + 4);
            blank(p, l4 + 6..l4 + 8);
        }
        1 => {
            blank(p, l4 + 2..l4 + 4);
            let inner = l4 + 8;
            if let Some(&first) = p.get(inner) {
                let inner_ihl = usize::from(first & 0xf) * 4;
                blank(p, inner + 10..inner + 20);
                let proto = p.get(inner + 9).copied().unwrap_or(0);
                let inner_l4 = inner + inner_ihl.max(20);
                blank(p, inner_l4..inner_l4 + 4);
                match proto {
                    PROTO_TCP => blank(p, inner_l4 + 16..inner_l4 + 18),
                    PROTO_UDP => blank(p, inner_l4 + 6..inner_l4 + 8),
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

type Endpoints = (Ipv4Addr, Ipv4Addr, Option<(u16, u16)>);

/// Whether a translated TCP/UDP packet (or fragment: no ports) matches the
/// maps and the flows seen, for its hook.
fn check_translation(
    model: &Model,
    hook: Hook,
    proto: u8,
    (src, dst, ports_in): Endpoints,
    (src2, dst2, ports_out): Endpoints,
    hairpin_redirect: bool,
) -> Result<Outcome, String> {
    let (sport, dport) = ports_in.map_or((None, None), |(s, d)| (Some(s), Some(d)));
    let (sport2, dport2) = ports_out.map_or((None, None), |(s, d)| (Some(s), Some(d)));
    let src_changed = (src, sport) != (src2, sport2);
    let dst_changed = (dst, dport) != (dst2, dport2);
    let backend_of = |f: &Frontend, addr: Ipv4Addr, port: Option<u16>| {
        f.backends
            .iter()
            .any(|b| b.0 == addr && port.is_none_or(|p| p == b.1))
    };
    // Frontends that `addr:port` may be, for this hook.
    let frontends_at = |addr: Ipv4Addr, port: Option<u16>| {
        model.frontends.iter().filter(move |f| {
            f.addr == addr
                && f.proto == proto
                && port.is_none_or(|p| p == f.port)
                && hook.serves(f.flags)
        })
    };
    if hook.is_ingress() && dst_changed {
        // Reverse SNAT: a reply to our SNAT address and port.
        if dst == SNAT && hook != Hook::FromPod {
            let (Some(bport), Some(snat_port), Some(cport)) = (sport, dport, dport2) else {
                return Err("a fragment to the SNAT address was translated".into());
            };
            let expected = model
                .snat
                .borrow()
                .get(&(src, bport, snat_port, proto))
                .copied();
            if src_changed || expected != Some((dst2, cport)) {
                return Err(format!(
                    "reverse SNAT to {dst2}:{cport}, but SNAT port {snat_port} of {src}:{bport} belongs to {expected:?}"
                ));
            }
            return Ok(Outcome::Translated);
        }
        // Reverse hairpin: a pod's reply to the hairpin address.
        if dst == HAIRPIN && hook == Hook::FromPod {
            let (Some(bport), Some(cport)) = (sport, dport) else {
                return Err("a fragment to the hairpin address was translated".into());
            };
            let owner = model.owner(src, bport, proto);
            let seen = model
                .hairpins
                .borrow()
                .contains(&(src, bport, cport, proto));
            let ok = seen
                && owner.is_some_and(|f| (src2, sport2) == (f.addr, Some(f.port)))
                && (dst2, dport2) == (src, Some(cport));
            return if ok {
                Ok(Outcome::Hairpin)
            } else {
                Err(format!(
                    "reverse hairpin {src}:{bport} -> {src2}:{sport2:?}, {dst2}:{dport2:?}"
                ))
            };
        }
        // DNAT: a frontend's traffic to one of its backends.
        let Some(frontend) = frontends_at(dst, dport).find(|f| backend_of(f, dst2, dport2)) else {
            return Err(format!(
                "{dst}:{dport:?} became {dst2}:{dport2:?}, which is no backend of a frontend there"
            ));
        };
        let hairpin = hook == Hook::FromPod && dst2 == src;
        if hairpin {
            if (src2, sport2) != (HAIRPIN, sport) {
                return Err(format!("hairpin flow's source became {src2}:{sport2:?}"));
            }
            if let (Some(cport), Some(bport)) = (sport, dport2) {
                model
                    .hairpins
                    .borrow_mut()
                    .insert((dst2, bport, cport, proto));
            }
            return Ok(Outcome::Hairpin);
        }
        if src_changed || hairpin_redirect {
            return Err(format!(
                "DNAT to {frontend:?} also changed the source to {src2}:{sport2:?}"
            ));
        }
        if let (Some(cport), Some(bport)) = (sport, dport2) {
            model
                .replies
                .borrow_mut()
                .insert((dst2, bport, src, cport, proto));
        }
        return Ok(Outcome::Translated);
    }
    if hook.is_ingress() || dst_changed {
        return Err(format!(
            "{hook:?} changed {src}:{sport:?} -> {dst}:{dport:?} into {src2}:{sport2:?} -> {dst2}:{dport2:?}"
        ));
    }
    // Egress: SNAT towards a remote backend.
    if hook == Hook::ToNetwork && src2 == SNAT {
        let remote = model.frontends.iter().any(|f| {
            hook.serves(f.flags)
                && f.proto == proto
                && f.backends
                    .iter()
                    .any(|b| !b.2 && b.0 == dst && dport.is_none_or(|p| p == b.1))
        });
        let port_ok = sport2.is_none_or(|p| SNAT_PORTS.contains(&p));
        if !remote || !port_ok {
            return Err(format!(
                "SNAT of a flow to {dst}:{dport:?} (port {sport2:?})"
            ));
        }
        if let (Some(cport), Some(bport), Some(snat_port)) = (sport, dport, sport2) {
            model
                .snat
                .borrow_mut()
                .insert((dst, bport, snat_port, proto), (src, cport));
        }
        return Ok(Outcome::Translated);
    }
    // Reverse DNAT: a backend's reply comes from its frontend.
    let Some(owner) = model
        .frontends
        .iter()
        .find(|f| f.proto == proto && backend_of(f, src, sport))
    else {
        return Err(format!(
            "source {src}:{sport:?} rewritten, but it is no backend"
        ));
    };
    if (src2, sport2.or(Some(owner.port))) != (owner.addr, Some(owner.port)) {
        return Err(format!(
            "reply of {src}:{sport:?} comes from {src2}:{sport2:?}, not from its frontend {}:{}",
            owner.addr, owner.port
        ));
    }
    if let (Some(bport), Some(cport)) = (sport, dport)
        && !model
            .replies
            .borrow()
            .contains(&(src, bport, dst, cport, proto))
    {
        return Err(format!(
            "reply {src}:{bport} -> {dst}:{cport} translated, but no such flow was translated"
        ));
    }
    Ok(Outcome::Translated)
}

/// A refusal sent back to the sender: its flow was to a frontend without
/// backends, and the answer is a TCP RST or an ICMP port unreachable.
fn check_refusal(
    model: &Model,
    hook: Hook,
    pair: &Pair,
    in_l4_ok: bool,
    out_l4_ok: bool,
) -> Result<Outcome, String> {
    let Pair {
        input,
        ip_in,
        output,
        ip_out,
    } = pair;
    let Some((_, dport)) = ports(input, ip_in) else {
        return Err("refused a packet without ports".into());
    };
    let empty = model
        .frontend(ip_in.dst, dport, ip_in.proto)
        .is_some_and(|f| f.backends.is_empty() && hook.serves(f.flags));
    if !empty {
        return Err(format!("refused a packet to {}:{dport}", ip_in.dst));
    }
    let answer_ok = match ip_out.proto {
        PROTO_TCP => {
            ports(output, ip_out).is_some_and(|(s, _)| s == dport)
                && output
                    .get(l4_offset(ip_out) + 13)
                    .is_some_and(|f| f & 0x04 != 0)
        }
        1 => output[l4_offset(ip_out)..].starts_with(&[3, 3]),
        _ => false,
    };
    if !answer_ok {
        return Err("a refusal that is neither a TCP RST nor an ICMP port unreachable".into());
    }
    if in_l4_ok && !out_l4_ok {
        return Err("the refusal's checksum does not verify".into());
    }
    Ok(Outcome::Refused)
}

/// An ICMP error about a translated flow. On egress, the quoted packet
/// (client to backend) gets its frontend back, and so does the error's own
/// source when it was the backend. From the network, an error for the
/// SNAT address quoting a packet of an SNATed flow (SNAT address to remote
/// backend) gets its client back, as destination and as quoted source.
fn check_icmp_error(model: &Model, hook: Hook, pair: &Pair) -> Result<Outcome, String> {
    let Pair {
        input,
        ip_in,
        output,
        ip_out,
    } = pair;
    let from_network = matches!(hook, Hook::FromNetworkXdp | Hook::FromNetworkTc);
    if hook.is_ingress() && !from_network {
        return Err(format!("{hook:?} rewrote an ICMP packet"));
    }
    let inner = l4_offset(ip_in) + 8;
    let quoted = |p: &[u8]| -> Option<(Ipv4Addr, Ipv4Addr, u8, u16, u16)> {
        let header = p.get(inner..inner + 20)?;
        let ihl = usize::from(header[0] & 0xf) * 4;
        let l4 = p.get(inner + ihl..inner + ihl + 4)?;
        Some((
            Ipv4Addr::new(header[12], header[13], header[14], header[15]),
            Ipv4Addr::new(header[16], header[17], header[18], header[19]),
            header[9],
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ))
    };
    let (Some(before), Some(after)) = (quoted(input), quoted(output)) else {
        return Err("rewrote an ICMP error that quotes no whole header".into());
    };
    if from_network {
        let (snat, backend, proto, snat_port, bport) = before;
        let Some((client, cport)) = model
            .snat
            .borrow()
            .get(&(backend, bport, snat_port, proto))
            .copied()
            .filter(|_| snat == SNAT && ip_in.dst == SNAT)
        else {
            return Err(format!(
                "{hook:?} rewrote an ICMP error about {snat}:{snat_port} -> {backend}:{bport}, no SNATed flow"
            ));
        };
        if after != (client, backend, proto, cport, bport) {
            return Err(format!(
                "the quoted SNATed flow became {after:?}, not one from {client}:{cport}"
            ));
        }
        if ip_out.src != ip_in.src || ip_out.dst != client {
            return Err(format!(
                "the error about an SNATed flow now goes {} -> {}",
                ip_out.src, ip_out.dst
            ));
        }
        return Ok(Outcome::Translated);
    }
    let (client, backend, proto, cport, bport) = before;
    let owner = model.owner(backend, bport, proto);
    let seen = model
        .replies
        .borrow()
        .contains(&(backend, bport, client, cport, proto));
    let Some(owner) = owner.filter(|_| seen) else {
        return Err(format!(
            "rewrote an ICMP error about {client}:{cport} -> {backend}:{bport}, a flow never translated"
        ));
    };
    if after != (client, owner.addr, proto, cport, owner.port) {
        return Err(format!(
            "the quoted flow became {after:?}, not one to {owner:?}"
        ));
    }
    let outer_ok = ip_out.dst == ip_in.dst
        && (ip_out.src == ip_in.src || (ip_in.src == backend && ip_out.src == owner.addr));
    if !outer_ok {
        return Err(format!(
            "the error now goes {} -> {}",
            ip_out.src, ip_out.dst
        ));
    }
    Ok(Outcome::Translated)
}

// ---------------------------------------------------------------------------
// Running cases
// ---------------------------------------------------------------------------

/// Counts per hook and outcome, and the packets BPF_PROG_TEST_RUN refused.
#[derive(Default)]
struct Tally {
    outcomes: BTreeMap<(Hook, Outcome), u64>,
    refused_by_kernel: u64,
}

impl Tally {
    fn packets(&self) -> u64 {
        self.outcomes.values().sum()
    }
}

/// Runs one packet through a hook and checks it; the output, unless the
/// packet was dropped or refused.
fn send(
    dp: &Datapath,
    model: &Model,
    tally: &RefCell<Tally>,
    hook: Hook,
    packet: &[u8],
) -> Result<Option<Vec<u8>>, TestCaseError> {
    let (verdict, output) = match dp.try_run(hook.program(), packet) {
        Ok(result) => result,
        // The kernel refuses some frames outright (too short for the hook):
        // no program ran.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tally.borrow_mut().refused_by_kernel += 1;
            return Ok(None);
        }
        Err(e) => return Err(TestCaseError::fail(format!("BPF_PROG_TEST_RUN: {e}"))),
    };
    let outcome = check(model, hook, packet, verdict, &output).map_err(|problem| {
        TestCaseError::fail(format!(
            "{hook:?}: {problem}\n  in : {}\n  out: {} (verdict {verdict})",
            hex(packet),
            hex(&output)
        ))
    })?;
    *tally
        .borrow_mut()
        .outcomes
        .entry((hook, outcome))
        .or_default() += 1;
    Ok(matches!(
        outcome,
        Outcome::Translated | Outcome::Untouched | Outcome::Hairpin
    )
    .then_some(output))
}

/// A flow's request through its ingress hook, and, as the network would
/// carry them, the request on through to_network (from the network) and the
/// backend's reply back through the hooks it crosses.
fn exchange(
    dp: &Datapath,
    model: &Model,
    tally: &RefCell<Tally>,
    flow: &FlowSpec,
) -> Result<(), TestCaseError> {
    let client = (client_of(flow), flow.client_port);
    let (daddr, dport, proto) = destination(model, flow);
    let request = l4_packet(client, (daddr, dport), proto, flow.tcp_flags, &flow.payload);
    let ingress = match flow.entry {
        Entry::Pod => Hook::FromPod,
        Entry::NetworkXdp => Hook::FromNetworkXdp,
        Entry::NetworkTc => Hook::FromNetworkTc,
    };
    let Some(mut request) = send(dp, model, tally, ingress, &request)? else {
        return Ok(());
    };
    if !matches!(flow.entry, Entry::Pod) {
        match send(dp, model, tally, Hook::ToNetwork, &request)? {
            Some(out) => request = out,
            None => return Ok(()),
        }
    }
    let Some(ip) = parse(&request) else {
        return Ok(());
    };
    let Some((sport, dport)) = ports(&request, &ip) else {
        return Ok(());
    };
    // The backend (or whoever the request went to) answers.
    let reply = l4_packet(
        (ip.dst, dport),
        (ip.src, sport),
        proto,
        flow.reply_flags,
        b"reply",
    );
    match flow.entry {
        Entry::Pod if ip.src == HAIRPIN => {
            send(dp, model, tally, Hook::FromPod, &reply)?;
        }
        Entry::Pod => {
            send(dp, model, tally, Hook::ToPod, &reply)?;
        }
        Entry::NetworkXdp | Entry::NetworkTc => {
            let reply = if ip.src == SNAT {
                match send(dp, model, tally, ingress, &reply)? {
                    Some(reply) => reply,
                    None => return Ok(()),
                }
            } else {
                reply
            };
            send(dp, model, tally, Hook::ToNetwork, &reply)?;
        }
    }
    Ok(())
}

fn run_case(
    dp: &Datapath,
    model: &Model,
    tally: &RefCell<Tally>,
    case: &Case,
) -> Result<(), TestCaseError> {
    if case.mutations.is_empty() {
        return exchange(dp, model, tally, &case.flow);
    }
    let client = (client_of(&case.flow), case.flow.client_port);
    let (daddr, dport, proto) = destination(model, &case.flow);
    let mut packet = l4_packet(
        client,
        (daddr, dport),
        proto,
        case.flow.tcp_flags,
        &case.flow.payload,
    );
    for mutation in &case.mutations {
        mutate(&mut packet, mutation);
    }
    // Ingress hooks see what comes their way only: pods' packets enter
    // from_pod, the network's from_network. (Conntrack does not know the
    // hook: a network packet with a pod flow's 5-tuple would get that
    // flow's translation, ClusterIP included.) Egress hooks see both.
    let hook = match (HOOKS[case.hook], case.flow.entry) {
        (hook, _) if !hook.is_ingress() => hook,
        (_, Entry::Pod) => Hook::FromPod,
        (Hook::FromPod, _) => Hook::FromNetworkXdp,
        (hook, _) => hook,
    };
    send(dp, model, tally, hook, &packet)?;
    Ok(())
}

/// The seed: `SERVICE_TESTS_FUZZ_SEED` (32 hex digits) or a fresh one.
#[test]
fn a_million_generated_packets_through_every_program_keep_the_invariant() {
    require_root!();
    let target = fuzzing::packets();
    let seed = seed();
    println!(
        "fuzz seed: {} (replay: SERVICE_TESTS_FUZZ_SEED={0})",
        hex(&seed)
    );
    let mut dp = Datapath::load();
    let model = program(&mut dp);
    let tally = RefCell::new(Tally::default());
    let config = Config {
        cases: CASES_PER_RUN,
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    };
    let strategy = case_strategy(model.frontends.len());
    let started = Instant::now();
    // Runs of CASES_PER_RUN cases until enough packets; run N's generator
    // is seeded with the seed and N, so the seed replays them all.
    let mut run = 0u32;
    while tally.borrow().packets() < target {
        let mut run_seed = seed;
        for (byte, n) in run_seed[12..].iter_mut().zip(run.to_le_bytes()) {
            *byte ^= n;
        }
        // (XorShift: proptest forks its generator for every case, which
        // costs ChaCha more.)
        let mut runner = TestRunner::new_with_rng(
            config.clone(),
            TestRng::from_seed(RngAlgorithm::XorShift, &run_seed),
        );
        if let Err(failure) = runner.run(&strategy, |case| run_case(&dp, &model, &tally, &case)) {
            panic!(
                "invariant broken (seed {}, run {run}): {failure}",
                hex(&seed)
            );
        }
        run += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tally = tally.into_inner();
    let packets = tally.packets();
    let mut per_hook: BTreeMap<Hook, BTreeMap<Outcome, u64>> = BTreeMap::new();
    for ((hook, outcome), count) in &tally.outcomes {
        *per_hook
            .entry(*hook)
            .or_default()
            .entry(*outcome)
            .or_default() += count;
    }
    // Written past libtest's capture, so `cargo xtask test` shows the
    // count and rate of every run, passing or not.
    let mut summary = String::new();
    for (hook, outcomes) in &per_hook {
        summary.push_str(&format!("fuzz {hook:?}: {outcomes:?}\n"));
    }
    summary.push_str(&format!(
        "fuzz: {packets} packets, 0 violations, in {elapsed:.1} s ({:.0} packets/s); \
         {} frames refused by BPF_PROG_TEST_RUN itself; seed {}\n",
        packets as f64 / elapsed,
        tally.refused_by_kernel,
        hex(&seed)
    ));
    fuzzing::report(&summary);
    // Every hook saw traffic, and every kind of outcome happened.
    for hook in HOOKS {
        let outcomes = per_hook.get(&hook).expect("every hook ran");
        for outcome in [Outcome::Untouched, Outcome::Translated] {
            assert!(
                outcomes.get(&outcome).copied().unwrap_or(0) > 0,
                "{hook:?} never had an {outcome:?} output"
            );
        }
    }
    for (hook, outcome) in [
        (Hook::FromPod, Outcome::Refused),
        (Hook::FromPod, Outcome::Hairpin),
        (Hook::FromNetworkTc, Outcome::Refused),
    ] {
        assert!(
            tally.outcomes.get(&(hook, outcome)).copied().unwrap_or(0) > 0,
            "{hook:?} never had a {outcome:?} output"
        );
    }
}
