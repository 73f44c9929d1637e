//! IPv6 packet fuzzing through the real programs (BPF_PROG_TEST_RUN):
//! generated IPv6 frames through every hook, from_pod, to_pod, from_network
//! on XDP and on TC, and to_network. Flows to the programmed IPv6
//! frontends are followed through the hooks they would cross (a request,
//! its way out, the reply built from what the programs made of it, its way
//! back), and mixed with hostile frames: chains of extension headers
//! (hop-by-hop, routing, destination options, fragment headers with any
//! offset and flags), packets cut anywhere, payload lengths that lie,
//! flipped bytes, broken checksums, ICMPv6 errors quoting flows or garbage.
//! (`fuzz.rs` does the same for IPv4, with a model of every flow.)
//!
//! The invariant, for every output:
//! - XDP passes every IPv6 frame to the TC program beside it, untouched,
//!   with its mark in the metadata;
//! - on TC, a documented verdict; a packet sent back (a refusal or a
//!   hairpin packet) is well formed, with valid checksums, to the sender or
//!   from the hairpin address;
//! - a packet that continues is either untouched, or a well-formed packet
//!   of the same length in which only the addresses, the ports and the
//!   checksums changed (for an ICMPv6 error also the packet it quotes),
//!   whose L4 checksum still verifies if it did (its sum over addresses,
//!   ports and checksum unchanged, which also holds for a first fragment),
//!   whose new destination is a backend or a client, and whose new source
//!   a frontend, the SNAT address with a port of its range, or the hairpin
//!   address.
//!
//! The generator is seeded from /dev/urandom, printed at the start;
//! `SERVICE_TESTS_FUZZ_SEED=<32 hex digits>` replays a run, and
//! `SERVICE_TESTS_FUZZ_PACKETS` (default a million, as for the IPv4
//! fuzzer) sets the number of frames.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
    time::Instant,
};

use etherparse::checksum::Sum16BitWords;
use service_agent::datapath::{
    PROG_FROM_NETWORK, PROG_FROM_NETWORK_TC, PROG_FROM_POD, PROG_TO_NETWORK, PROG_TO_POD,
};
use service_common::{
    FRONTEND_FLAG_CLUSTER_IP, FRONTEND_FLAG_NODE_PORT, HAIRPIN_IPV6, PROTO_TCP, PROTO_UDP,
};
use service_tests::{
    datapath_fixture::Datapath,
    fuzzing::{self, DEFERRED_MARK, TC_CONTINUE, TC_DROP, TC_REDIRECT, XDP_PASS, hex},
    require_root,
};

const PROTO_ICMPV6: u8 = 58;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Ethernet header, then the fixed IPv6 header.
const L3: usize = 14;
const IPV6_HDR_LEN: usize = 40;

const CLUSTER_IP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// A ClusterIP whose Services have no backends (refused).
const EMPTY_IP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11);
/// This node: its NodePorts and the SNAT address.
const NODE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
const HAIRPIN: Ipv6Addr = Ipv6Addr::from_octets(HAIRPIN_IPV6);
const SNAT_PORTS: std::ops::RangeInclusive<u16> = 20000..=20003;
/// Local pods: backends, and the first two also clients (the first is a
/// backend of the ClusterIP it calls: hairpin).
const PODS: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 2),
    Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 5),
    Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 3),
];
/// A backend on another node (SNAT for flows from the network).
const REMOTE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 2);
/// Clients outside the cluster.
const EXTERNAL: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2),
];
/// Client ports: few, so that flows meet again.
const CLIENT_PORTS: [u16; 3] = [40000, 40001, 40002];

/// The frontends programmed: address, port, protocol, kind, backends
/// (address, port, node-local).
type FrontendSpec = (Ipv6Addr, u16, u8, u16, Vec<(Ipv6Addr, u16, bool)>);

fn frontends() -> Vec<FrontendSpec> {
    vec![
        (
            CLUSTER_IP,
            80,
            PROTO_TCP,
            FRONTEND_FLAG_CLUSTER_IP,
            vec![
                (PODS[0], 8080, true),
                (PODS[2], 8080, true),
                (REMOTE, 8080, false),
            ],
        ),
        (
            CLUSTER_IP,
            53,
            PROTO_UDP,
            FRONTEND_FLAG_CLUSTER_IP,
            vec![(PODS[0], 5353, true), (PODS[2], 5353, true)],
        ),
        (EMPTY_IP, 80, PROTO_TCP, FRONTEND_FLAG_CLUSTER_IP, vec![]),
        (EMPTY_IP, 53, PROTO_UDP, FRONTEND_FLAG_CLUSTER_IP, vec![]),
        (
            NODE,
            30080,
            PROTO_TCP,
            FRONTEND_FLAG_NODE_PORT,
            vec![(PODS[2], 8080, true), (REMOTE, 8080, false)],
        ),
        (
            NODE,
            30053,
            PROTO_UDP,
            FRONTEND_FLAG_NODE_PORT,
            vec![(REMOTE, 5353, false), (PODS[2], 5353, true)],
        ),
        (NODE, 30099, PROTO_TCP, FRONTEND_FLAG_NODE_PORT, vec![]),
    ]
}

/// A small xorshift generator: reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

// ---------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------

/// An extension header to put in front of the transport header.
#[derive(Clone, Copy, Debug)]
enum Extension {
    /// Hop-by-hop, routing or destination options, with this many 8-byte
    /// units beyond the first.
    Options(u8, u8),
    /// A fragment header: offset in 8-byte units, M flag, identification.
    Fragment(u16, bool, u32),
}

/// The one's complement sum of the pseudo header of `l4_len` bytes of
/// `next` from `src` to `dst`.
fn pseudo_sum(src: &[u8], dst: &[u8], next: u8, l4_len: usize) -> Sum16BitWords {
    Sum16BitWords::new()
        .add_slice(src)
        .add_slice(dst)
        .add_4bytes((l4_len as u32).to_be_bytes())
        .add_2bytes([0, next])
}

/// Where the checksum of transport `proto` sits in its header.
fn checksum_offset(proto: u8) -> Option<usize> {
    match proto {
        PROTO_TCP => Some(16),
        PROTO_UDP => Some(6),
        PROTO_ICMPV6 => Some(2),
        _ => None,
    }
}

/// A frame `src:sport -> dst:dport` of `proto` behind `extensions`,
/// with `payload`; the transport checksum computed over this frame's
/// transport bytes (for a fragment, as if it were the whole datagram).
#[allow(clippy::too_many_arguments)]
fn frame(
    src: Ipv6Addr,
    sport: u16,
    dst: Ipv6Addr,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
    extensions: &[Extension],
    payload: &[u8],
) -> Vec<u8> {
    let mut l4 = match proto {
        PROTO_TCP => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[4..8].copy_from_slice(&0x1000_0000u32.to_be_bytes());
            h[12] = 5 << 4;
            h[13] = tcp_flags;
            h[14..16].copy_from_slice(&64240u16.to_be_bytes());
            h
        }
        PROTO_UDP => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            h
        }
        _ => Vec::new(),
    };
    l4.extend_from_slice(payload);
    let later = extensions
        .iter()
        .any(|e| matches!(e, Extension::Fragment(offset, ..) if *offset != 0));
    if let Some(at) = checksum_offset(proto).filter(|at| !later && l4.len() >= at + 2) {
        let sum = pseudo_sum(&src.octets(), &dst.octets(), proto, l4.len()).add_slice(&l4);
        // The checksum (etherparse's `ones_complement`: the complement of
        // the folded sum) over native-endian words: its bytes are native too.
        let csum = sum.ones_complement().to_ne_bytes();
        let csum = if csum == [0, 0] && proto == PROTO_UDP {
            [0xff, 0xff]
        } else {
            csum
        };
        l4[at..at + 2].copy_from_slice(&csum);
    }
    let mut ext = Vec::new();
    let nexts: Vec<u8> = extensions
        .iter()
        .skip(1)
        .map(|e| match e {
            Extension::Options(kind, _) => *kind,
            Extension::Fragment(..) => NEXTHDR_FRAGMENT,
        })
        .chain([proto])
        .collect();
    for (e, next) in extensions.iter().zip(nexts) {
        match *e {
            Extension::Options(kind, units) => {
                let mut h = vec![0u8; 8 + 8 * usize::from(units)];
                h[0] = next;
                h[1] = units;
                if kind == NEXTHDR_ROUTING {
                    h[2] = 4;
                } else {
                    // PadN over the rest.
                    h[2] = 1;
                    h[3] = (h.len() - 4) as u8;
                }
                ext.extend(h);
            }
            Extension::Fragment(offset, more, id) => {
                ext.push(next);
                ext.push(0);
                ext.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                ext.extend_from_slice(&id.to_be_bytes());
            }
        }
    }
    let first = extensions
        .first()
        .map(|e| match e {
            Extension::Options(kind, _) => *kind,
            Extension::Fragment(..) => NEXTHDR_FRAGMENT,
        })
        .unwrap_or(proto);
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x86, 0xdd];
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
    p.push(first);
    p.push(64);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend(ext);
    p.extend(l4);
    p
}

/// An ICMPv6 error from `src` to `dst` quoting `quoted` (an IPv6 packet
/// without its Ethernet header), checksum computed.
fn icmpv6_error(src: Ipv6Addr, dst: Ipv6Addr, kind: u8, quoted: &[u8]) -> Vec<u8> {
    let mut body = vec![kind, 0, 0, 0, 0, 0, 0x05, 0x00];
    body.extend_from_slice(quoted);
    frame(src, 0, dst, 0, PROTO_ICMPV6, 0, &[], &body)
}

/// Headers of a frame as the checker reads them: where its transport
/// header starts, its protocol, whether it is a later fragment.
struct Parsed {
    l4: usize,
    proto: u8,
    later_fragment: bool,
}

/// Walks the frame's extension headers (the same ones the datapath walks,
/// at most eight); `None` if they do not all fit the frame.
fn parse(p: &[u8]) -> Option<Parsed> {
    if p.len() < L3 + IPV6_HDR_LEN || p[12..14] != [0x86, 0xdd] || p[L3] >> 4 != 6 {
        return None;
    }
    let mut next = p[L3 + 6];
    let mut at = L3 + IPV6_HDR_LEN;
    let mut later_fragment = false;
    for _ in 0..8 {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let h = p.get(at..at + 2)?;
                next = h[0];
                at += (usize::from(h[1]) + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let h = p.get(at..at + 8)?;
                next = h[0];
                later_fragment = u16::from_be_bytes([h[2], h[3]]) >> 3 != 0;
                at += 8;
            }
            _ => break,
        }
    }
    (at <= p.len()).then_some(Parsed {
        l4: at,
        proto: next,
        later_fragment,
    })
}

/// The frame's source and destination addresses.
fn addrs(p: &[u8]) -> (Ipv6Addr, Ipv6Addr) {
    let a = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&p[at..at + 16]).unwrap());
    (a(L3 + 8), a(L3 + 24))
}

/// The transport ports of a frame whose headers parsed, if it has them.
fn ports(p: &[u8], parsed: &Parsed) -> Option<(u16, u16)> {
    if parsed.later_fragment || !matches!(parsed.proto, PROTO_TCP | PROTO_UDP) {
        return None;
    }
    let h = p.get(parsed.l4..parsed.l4 + 4)?;
    Some((
        u16::from_be_bytes([h[0], h[1]]),
        u16::from_be_bytes([h[2], h[3]]),
    ))
}

/// Whether the transport checksum of the frame verifies over its own
/// transport bytes (the generator's convention; `None`: nothing to verify).
fn l4_verifies(p: &[u8], parsed: &Parsed) -> Option<bool> {
    let at = checksum_offset(parsed.proto)?;
    if parsed.later_fragment || p.len() < parsed.l4 + at + 2 {
        return None;
    }
    let l4 = &p[parsed.l4..];
    if parsed.proto == PROTO_UDP && l4[6..8] == [0, 0] {
        return None;
    }
    let sum = pseudo_sum(
        &p[L3 + 8..L3 + 24],
        &p[L3 + 24..L3 + 40],
        parsed.proto,
        l4.len(),
    )
    .add_slice(l4)
    .ones_complement();
    // The checksum of bytes that hold their own checksum: zero.
    Some(sum == 0)
}

// ---------------------------------------------------------------------------
// The invariant
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Hook {
    FromPod,
    ToPod,
    FromNetworkXdp,
    FromNetworkTc,
    ToNetwork,
}

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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Deferred,
    Dropped,
    SentBack,
    Untouched,
    Translated,
}

/// What the checker knows: the programmed frontends and backends, and
/// the clients whose frames the programs sent to a backend (a mutated
/// frame can bring any source address).
struct Model {
    frontends: Vec<FrontendSpec>,
    clients: std::cell::RefCell<std::collections::HashSet<Ipv6Addr>>,
}

impl Model {
    fn is_frontend(&self, addr: Ipv6Addr, port: u16) -> bool {
        self.frontends
            .iter()
            .any(|(a, p, ..)| *a == addr && *p == port)
    }
    fn is_backend(&self, addr: Ipv6Addr, port: u16) -> bool {
        self.frontends
            .iter()
            .flat_map(|(.., backends)| backends)
            .any(|(a, p, _)| *a == addr && *p == port)
    }
    fn is_client(&self, addr: Ipv6Addr) -> bool {
        self.clients.borrow().contains(&addr)
    }
}

/// Checks one output; `Err` names what is wrong.
fn check(
    model: &Model,
    hook: Hook,
    input: &[u8],
    verdict: u32,
    output: &[u8],
) -> Result<Outcome, String> {
    if hook == Hook::FromNetworkXdp {
        // XDP hands every IPv6 frame to TC, untouched.
        return if verdict == XDP_PASS && output.strip_prefix(DEFERRED_MARK) == Some(input) {
            Ok(Outcome::Deferred)
        } else {
            Err("XDP did not hand the IPv6 frame to TC untouched".into())
        };
    }
    match verdict {
        TC_DROP => return Ok(Outcome::Dropped),
        TC_REDIRECT => {
            let parsed = parse(output).ok_or("a packet sent back does not parse")?;
            let (src, dst) = addrs(output);
            let (in_src, _) = addrs(input);
            let verifies = l4_verifies(output, &parsed);
            if src == HAIRPIN {
                // A hairpin packet: the request translated, its checksum
                // verifying if the request's did.
                let verified = parse(input).and_then(|p| l4_verifies(input, &p));
                if verified == Some(true) && verifies != Some(true) {
                    return Err("a hairpin packet's checksum verified before and not after".into());
                }
            } else if dst != in_src {
                return Err(
                    "a packet sent back goes neither to the sender nor from the hairpin address"
                        .into(),
                );
            } else if verifies != Some(true) {
                // A refusal, built afresh: its checksum must verify.
                return Err("a refusal has a bad transport checksum".into());
            }
            return Ok(Outcome::SentBack);
        }
        TC_CONTINUE => {}
        other => return Err(format!("undocumented verdict {other}")),
    }
    if output == input {
        return Ok(Outcome::Untouched);
    }
    if output.len() != input.len() {
        return Err("translated with another length".into());
    }
    let parsed = parse(input).ok_or("a frame whose headers do not fit was translated")?;
    // The bytes that may change: addresses, ports and transport checksum;
    // for an ICMPv6 error also everything it quotes.
    let mut may_change = vec![false; input.len()];
    may_change[L3 + 8..L3 + 40].fill(true);
    if !parsed.later_fragment {
        match parsed.proto {
            PROTO_TCP | PROTO_UDP => {
                if input.len() < parsed.l4 + 8 {
                    return Err("a frame cut inside its transport header was translated".into());
                }
                let csum = parsed.l4 + checksum_offset(parsed.proto).unwrap();
                may_change[parsed.l4..parsed.l4 + 4].fill(true);
                may_change[csum..csum + 2].fill(true);
            }
            PROTO_ICMPV6 => {
                let from = (parsed.l4 + 2).min(input.len());
                may_change[from..].fill(true);
            }
            _ => {}
        }
    }
    if let Some(at) = (0..input.len()).find(|&i| input[i] != output[i] && !may_change[i]) {
        return Err(format!(
            "byte {at} changed, which is no address, port or checksum"
        ));
    }
    let out_parsed = parse(output).ok_or("the output does not parse")?;
    match (
        l4_verifies(input, &parsed),
        l4_verifies(output, &out_parsed),
    ) {
        (Some(true), Some(false)) => {
            return Err("the transport checksum verified before and not after".into());
        }
        (Some(_), None) if parsed.proto == PROTO_UDP => {
            return Err("a UDP checksum became zero".into());
        }
        _ => {}
    }
    if parsed.proto == PROTO_UDP
        && !parsed.later_fragment
        && input[parsed.l4 + 6..parsed.l4 + 8] == [0, 0]
        && output[parsed.l4 + 6..parsed.l4 + 8] != [0, 0]
    {
        return Err("a zero UDP checksum was given a value".into());
    }
    let (src_in, dst_in) = addrs(input);
    let (src_out, dst_out) = addrs(output);
    let (sport_in, dport_in) = ports(input, &parsed).unwrap_or((0, 0));
    let (sport_out, dport_out) = ports(output, &out_parsed).unwrap_or((0, 0));
    if parsed.proto != PROTO_ICMPV6 {
        // A later fragment has no ports: its addresses must fit.
        let later = parsed.later_fragment;
        let to_backend = if later {
            model.is_backend_addr(dst_out)
        } else {
            model.is_backend(dst_out, dport_out)
        };
        if to_backend {
            model.clients.borrow_mut().insert(src_out);
        }
        let destination_fits = to_backend || model.is_client(dst_out);
        if (dst_out, dport_out) != (dst_in, dport_in) && !destination_fits {
            return Err(format!(
                "destination became [{dst_out}]:{dport_out}, no backend or client"
            ));
        }
        let source_fits = src_out == HAIRPIN
            || if later {
                src_out == NODE || model.is_frontend_addr(src_out)
            } else {
                model.is_frontend(src_out, sport_out)
                    || (src_out == NODE && SNAT_PORTS.contains(&sport_out))
            };
        if (src_out, sport_out) != (src_in, sport_in) && !source_fits {
            return Err(format!(
                "source became [{src_out}]:{sport_out}, no frontend, SNAT port or hairpin address"
            ));
        }
    }
    Ok(Outcome::Translated)
}

impl Model {
    fn is_frontend_addr(&self, addr: Ipv6Addr) -> bool {
        self.frontends.iter().any(|(a, ..)| *a == addr)
    }
    fn is_backend_addr(&self, addr: Ipv6Addr) -> bool {
        self.frontends
            .iter()
            .flat_map(|(.., backends)| backends)
            .any(|(a, ..)| *a == addr)
    }
}

/// The reply to a frame: addresses and ports swapped, flags of an answer.
fn reply_to(p: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    let parsed = parse(p)?;
    let (src, dst) = addrs(p);
    let (sport, dport) = ports(p, &parsed)?;
    let flags = rng.pick(&[0x12u8, 0x10, 0x18, 0x11, 0x04]);
    let len = rng.below(24) as usize;
    let payload = rng.bytes(len);
    Some(frame(
        dst,
        dport,
        src,
        sport,
        parsed.proto,
        flags,
        &[],
        &payload,
    ))
}

// ---------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------

/// A random chain of extension headers (empty most of the time).
fn extensions(rng: &mut Rng) -> Vec<Extension> {
    if !rng.chance(30) {
        return Vec::new();
    }
    (0..1 + rng.below(6))
        .map(|_| match rng.below(4) {
            0 => Extension::Fragment(
                if rng.chance(50) {
                    0
                } else {
                    rng.below(200) as u16
                },
                rng.chance(60),
                rng.next() as u32,
            ),
            n => Extension::Options(
                [NEXTHDR_HOP, NEXTHDR_ROUTING, NEXTHDR_DEST][n as usize - 1],
                rng.below(3) as u8,
            ),
        })
        .collect()
}

/// A request to a frontend, a backend or anywhere, from a client.
fn request(rng: &mut Rng, model: &Model, from_pod: bool) -> Vec<u8> {
    let src = if from_pod {
        rng.pick(&PODS[..2])
    } else {
        rng.pick(&EXTERNAL)
    };
    let (dst, dport, proto) = if rng.chance(80) {
        let (a, p, proto, ..) = &model.frontends[rng.below(model.frontends.len() as u64) as usize];
        (*a, *p, *proto)
    } else {
        (
            rng.pick(&[PODS[2], REMOTE, HAIRPIN, NODE, CLUSTER_IP]),
            rng.pick(&[80, 53, 8080, 30080, 30099, 20001]),
            rng.pick(&[PROTO_TCP, PROTO_UDP, PROTO_ICMPV6, 132]),
        )
    };
    let flags = rng.pick(&[0x02u8, 0x10, 0x18, 0x11, 0x04, 0x02 | 0x10, 0x00, 0xff]);
    let payload = if rng.chance(5) {
        rng.bytes(1200)
    } else {
        let len = rng.below(40) as usize;
        rng.bytes(len)
    };
    let sport = rng.pick(&CLIENT_PORTS);
    frame(
        src,
        sport,
        dst,
        dport,
        proto,
        flags,
        &extensions(rng),
        &payload,
    )
}

/// Damage done to a frame (or none).
fn mutate(rng: &mut Rng, mut p: Vec<u8>) -> Vec<u8> {
    match rng.below(12) {
        // Cut anywhere after the Ethernet header.
        0 => {
            let at = 14 + rng.below((p.len() - 14) as u64) as usize;
            p.truncate(at.max(15));
        }
        // A flipped byte anywhere in the IPv6 part.
        1 => {
            let at = 14 + rng.below((p.len() - 14) as u64) as usize;
            p[at] ^= 1 << rng.below(8);
        }
        // A payload length that lies.
        2 => {
            let len = rng.next() as u16;
            p[L3 + 4..L3 + 6].copy_from_slice(&len.to_be_bytes());
        }
        // A transport checksum broken (somewhere near it).
        3 => {
            let at = (L3 + IPV6_HDR_LEN + rng.below(24) as usize).min(p.len() - 1);
            p[at] = p[at].wrapping_add(1);
        }
        _ => {}
    }
    p
}

/// Runs `hook` on `packet` and checks the output; the output if the
/// packet went on.
fn send(
    dp: &Datapath,
    model: &Model,
    tally: &mut BTreeMap<(Hook, Outcome), u64>,
    hook: Hook,
    packet: &[u8],
) -> Result<Option<Vec<u8>>, String> {
    let (verdict, output) = match dp.try_run(hook.program(), packet) {
        Ok(result) => result,
        // The kernel refuses some frames outright (too short for the hook).
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
        Err(e) => return Err(format!("BPF_PROG_TEST_RUN: {e}")),
    };
    let outcome = check(model, hook, packet, verdict, &output).map_err(|problem| {
        format!(
            "{hook:?}: {problem}\n  in : {}\n  out: {} (verdict {verdict})",
            hex(packet),
            hex(&output)
        )
    })?;
    *tally.entry((hook, outcome)).or_default() += 1;
    Ok(matches!(outcome, Outcome::Untouched | Outcome::Translated).then_some(output))
}

/// One case: a frame from a pod or from the network, followed through the
/// hooks it would cross, with its reply; or an ICMPv6 error about it.
fn run_case(
    dp: &Datapath,
    model: &Model,
    tally: &mut BTreeMap<(Hook, Outcome), u64>,
    rng: &mut Rng,
) -> Result<(), String> {
    let from_pod = rng.chance(50);
    let packet = request(rng, model, from_pod);
    let packet = mutate(rng, packet);
    if from_pod {
        let Some(out) = send(dp, model, tally, Hook::FromPod, &packet)? else {
            return Ok(());
        };
        let Some(reply) = reply_to(&out, rng) else {
            return Ok(());
        };
        if rng.chance(10) {
            let (src, dst) = addrs(&reply);
            let error = icmpv6_error(src, dst, rng.pick(&[1, 2, 3]), &out[L3..]);
            send(dp, model, tally, Hook::ToPod, &error)?;
            return Ok(());
        }
        send(dp, model, tally, Hook::ToPod, &mutate(rng, reply))?;
        return Ok(());
    }
    send(dp, model, tally, Hook::FromNetworkXdp, &packet)?;
    let Some(inbound) = send(dp, model, tally, Hook::FromNetworkTc, &packet)? else {
        return Ok(());
    };
    // On its way to a backend on another node: SNAT.
    let Some(outbound) = send(dp, model, tally, Hook::ToNetwork, &inbound)? else {
        return Ok(());
    };
    let Some(reply) = reply_to(&outbound, rng) else {
        return Ok(());
    };
    let reply = if rng.chance(10) {
        let (src, dst) = addrs(&reply);
        icmpv6_error(src, dst, rng.pick(&[1, 2, 3]), &outbound[L3..])
    } else {
        mutate(rng, reply)
    };
    send(dp, model, tally, Hook::FromNetworkXdp, &reply)?;
    let Some(back) = send(dp, model, tally, Hook::FromNetworkTc, &reply)? else {
        return Ok(());
    };
    send(dp, model, tally, Hook::ToNetwork, &back)?;
    Ok(())
}

#[test]
fn generated_ipv6_frames_through_every_program_keep_the_invariant() {
    require_root!();
    let target = fuzzing::packets();
    let seed = fuzzing::seed();
    println!(
        "fuzz6 seed: {} (replay: SERVICE_TESTS_FUZZ_SEED={0})",
        hex(&seed)
    );
    let mut dp = Datapath::load();
    dp.set_snat_address(IpAddr::V6(NODE));
    dp.set_snat_ports(*SNAT_PORTS.start(), *SNAT_PORTS.end());
    let model = Model {
        frontends: frontends(),
        clients: Default::default(),
    };
    for (addr, port, proto, flags, backends) in &model.frontends {
        dp.set_frontend(*addr, *port, *proto, *flags, backends);
    }
    // (Never zero: xorshift would stay there.)
    let mut rng = Rng(u64::from_le_bytes(seed[..8].try_into().unwrap()) | 1);
    let mut tally = BTreeMap::new();
    let started = Instant::now();
    while tally.values().sum::<u64>() < target {
        if let Err(problem) = run_case(&dp, &model, &mut tally, &mut rng) {
            panic!("invariant broken (seed {}): {problem}", hex(&seed));
        }
    }
    let packets: u64 = tally.values().sum();
    let mut summary = String::new();
    for ((hook, outcome), count) in &tally {
        summary.push_str(&format!("fuzz6 {hook:?} {outcome:?}: {count}\n"));
    }
    summary.push_str(&format!(
        "fuzz6: {packets} IPv6 frames, 0 violations, in {:.1} s; seed {}\n",
        started.elapsed().as_secs_f64(),
        hex(&seed)
    ));
    fuzzing::report(&summary);
    // Every path was taken: translations on every TC hook, refusals and
    // hairpin packets sent back, drops.
    for hook in [
        Hook::FromPod,
        Hook::ToPod,
        Hook::FromNetworkTc,
        Hook::ToNetwork,
    ] {
        assert!(
            tally
                .get(&(hook, Outcome::Translated))
                .copied()
                .unwrap_or(0)
                > 0,
            "{hook:?} never translated"
        );
    }
    for (hook, outcome) in [
        (Hook::FromPod, Outcome::SentBack),
        (Hook::FromNetworkTc, Outcome::SentBack),
        (Hook::FromNetworkXdp, Outcome::Deferred),
    ] {
        assert!(
            tally.get(&(hook, outcome)).copied().unwrap_or(0) > 0,
            "{hook:?} never had a {outcome:?} output"
        );
    }
}
