//! Packet parsing for the TC and XDP hooks: just enough of Ethernet, IPv4
//! or IPv6 (its extension headers walked, bounded) and the L4 header to
//! know a flow's 5-tuple and where its fields and checksums are. A parsed
//! packet is a [`Flow`] of its family's addresses ([`IpFamily`]), so every
//! later step (conntrack, backend choice, rewrite) has one body for both
//! families, monomorphised for each.
//!
//! Every access goes through [`Packet`]: a bounds-checked read of the
//! packet's data (for TC, `bpf_skb_load_bytes` when the bytes are not in
//! the skb's linear part), so a truncated packet yields `None`, never an
//! out-of-bounds access, and the caller lets such a packet pass untouched.
//!
//! Fragments are parsed too, IPv4 ones and IPv6 ones (a fragment header):
//! the first one (offset 0, more fragments) carries the L4 header like any
//! packet; a later one carries none, so its ports are unknown until
//! `fragments` finds them in the record its first fragment left.

use aya_ebpf::programs::{TcContext, XdpContext};
use service_common::{
    DatapathConfig, FAMILY_IPV4, FAMILY_IPV6, FragmentKey, HAIRPIN_IPV4, HAIRPIN_IPV6, MapAddr,
    PROTO_TCP, PROTO_UDP, map_addr_v4, map_addr_v4_octets, map_addrs_equal,
};

use crate::wire::{
    ETH_HDR_LEN, ETH_P_IP, ETH_P_IPV6, ETH_TYPE_OFF, IP_DST_OFF, IP_FLAG_MF, IP_FLAGS_SHIFT,
    IP_OFFSET_MASK, IP_SRC_OFF, IP_VERSION_4, IPV4_FIXED_LEN, IPV6_DST_OFF, IPV6_EXT_HDRS_MAX,
    IPV6_FRAG_HDR_LEN, IPV6_FRAG_ID_OFF, IPV6_FRAG_MF, IPV6_FRAG_OFFSET_MASK, IPV6_FRAG_OFFSET_OFF,
    IPV6_HDR_LEN, IPV6_NEXT_HDR_OFF, IPV6_PAYLOAD_LEN_OFF, IPV6_SRC_OFF, Ipv4Fixed, NEXTHDR_DEST,
    NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_ROUTING, TCP_FLAG_ACK, TCP_FLAG_SYN, TCP_FLAGS_OFF,
    TCP_HDR_LEN, UDP_HDR_LEN, csum_replace_addr, csum_replace_addr6, l4_csum_off,
    pseudo_header_sum, pseudo_header_sum6,
};

/// What differs between IPv4 and IPv6 once a packet is parsed: the family's
/// address type (`[u8; 4]` or [`MapAddr`], network byte order), where the
/// addresses sit in its header, whether that header has a checksum, and how
/// its addresses enter map keys and checksums. Everything generic over it
/// is monomorphised per family, so IPv4 keeps its 4-byte addresses (and
/// its code) as before.
pub trait IpFamily: Copy {
    /// The family tag of map keys (`FAMILY_IPV4` or `FAMILY_IPV6`).
    const FAMILY: u8;
    /// Offset of the source address inside the IP header.
    const SRC_OFF: usize;
    /// Offset of the destination address inside the IP header.
    const DST_OFF: usize;
    /// Whether the IP header has a checksum of its own (IPv4 only).
    const HEADER_CHECKSUM: bool;
    /// The source of hairpin flows (`HAIRPIN_IPV4`, `HAIRPIN_IPV6`).
    const HAIRPIN: Self;
    /// The all-zero address.
    const UNSPECIFIED: Self;
    /// Whether the hooks give some steps of this family's path their own
    /// stack frames (`#[inline(never)]`): IPv6's 16-byte addresses make its
    /// frames too large to inline them all within the 512 bytes the
    /// verifier allows a hook and its calls; IPv4 inlines as it always did.
    const WIDE: bool;

    /// The address as map keys and values hold it.
    fn to_map(self) -> MapAddr;
    /// The address of this family in a map key or value.
    fn from_map(addr: &MapAddr) -> Self;
    /// Whether two addresses are equal (word compares, no `bcmp` call).
    fn same(&self, other: &Self) -> bool;
    /// Whether the address is all zero (unset).
    fn is_unset(&self) -> bool;
    /// This node's SNAT address of the family (all zero: no SNAT).
    fn snat(config: &DatapathConfig) -> &Self;
    /// An L4 checksum (or the IPv4 header checksum) after the address
    /// `old` in the covered data became `new` (RFC 1624).
    fn csum_replace_addr(csum: u16, old: &Self, new: &Self) -> u16;
    /// The folded, not inverted, pseudo-header sum of an L4 segment of
    /// `l4_len` bytes (what a checksum left to offload holds).
    fn pseudo_header_sum(saddr: &Self, daddr: &Self, proto: u8, l4_len: u16) -> u16;
    /// The fragments-map key of `flow`'s datagram.
    fn fragment_key(flow: &Flow<Self>) -> FragmentKey;
    /// Parses a packet of this family ([`parse_ipv4`], [`parse_ipv6`]).
    fn parse<P: Packet>(ctx: &P) -> Option<Flow<Self>>;
}

impl IpFamily for [u8; 4] {
    const FAMILY: u8 = FAMILY_IPV4;
    const SRC_OFF: usize = IP_SRC_OFF;
    const DST_OFF: usize = IP_DST_OFF;
    const HEADER_CHECKSUM: bool = true;
    const HAIRPIN: Self = HAIRPIN_IPV4;
    const UNSPECIFIED: Self = [0; 4];
    const WIDE: bool = false;

    #[inline(always)]
    fn to_map(self) -> MapAddr {
        map_addr_v4(self)
    }

    #[inline(always)]
    fn from_map(addr: &MapAddr) -> Self {
        map_addr_v4_octets(addr)
    }

    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        self == other
    }

    #[inline(always)]
    fn is_unset(&self) -> bool {
        *self == [0; 4]
    }

    #[inline(always)]
    fn snat(config: &DatapathConfig) -> &Self {
        &config.snat_v4
    }

    #[inline(always)]
    fn csum_replace_addr(csum: u16, old: &Self, new: &Self) -> u16 {
        csum_replace_addr(csum, *old, *new)
    }

    #[inline(always)]
    fn pseudo_header_sum(saddr: &Self, daddr: &Self, proto: u8, l4_len: u16) -> u16 {
        pseudo_header_sum(*saddr, *daddr, proto, l4_len)
    }

    #[inline(always)]
    fn fragment_key(flow: &Flow<Self>) -> FragmentKey {
        FragmentKey::v4(flow.saddr, flow.daddr, flow.id as u16, flow.proto)
    }

    #[inline(always)]
    fn parse<P: Packet>(ctx: &P) -> Option<Flow<Self>> {
        parse_ipv4(ctx)
    }
}

impl IpFamily for MapAddr {
    const FAMILY: u8 = FAMILY_IPV6;
    const SRC_OFF: usize = IPV6_SRC_OFF;
    const DST_OFF: usize = IPV6_DST_OFF;
    const HEADER_CHECKSUM: bool = false;
    const HAIRPIN: Self = HAIRPIN_IPV6;
    const UNSPECIFIED: Self = [0; 16];
    const WIDE: bool = true;

    #[inline(always)]
    fn to_map(self) -> MapAddr {
        self
    }

    #[inline(always)]
    fn from_map(addr: &MapAddr) -> Self {
        *addr
    }

    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        map_addrs_equal(self, other)
    }

    #[inline(always)]
    fn is_unset(&self) -> bool {
        map_addrs_equal(self, &[0; 16])
    }

    #[inline(always)]
    fn snat(config: &DatapathConfig) -> &Self {
        &config.snat_v6
    }

    #[inline(always)]
    fn csum_replace_addr(csum: u16, old: &Self, new: &Self) -> u16 {
        csum_replace_addr6(csum, old, new)
    }

    #[inline(always)]
    fn pseudo_header_sum(saddr: &Self, daddr: &Self, proto: u8, l4_len: u16) -> u16 {
        pseudo_header_sum6(saddr, daddr, proto, l4_len)
    }

    #[inline(always)]
    fn fragment_key(flow: &Flow<Self>) -> FragmentKey {
        FragmentKey::v6(flow.saddr, flow.daddr, flow.id, flow.proto)
    }

    #[inline(always)]
    fn parse<P: Packet>(ctx: &P) -> Option<Flow<Self>> {
        parse_ipv6(ctx)
    }
}

/// The network layer of an Ethernet frame, as the hooks dispatch on it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
    /// Anything else (or a frame too short to tell).
    Other,
}

/// The network layer of the frame (its EtherType).
#[inline(always)]
pub fn network<P: Packet>(ctx: &P) -> Network {
    match ctx.read::<u16>(ETH_TYPE_OFF).map(u16::from_be) {
        Some(ETH_P_IP) => Network::V4,
        Some(ETH_P_IPV6) => Network::V6,
        _ => Network::Other,
    }
}

/// Which part of a datagram a packet is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    Whole,
    /// The first fragment of a datagram: it holds the L4 header.
    First,
    /// A later fragment: no L4 header, its ports come from the first one.
    Later,
}

/// A TCP or UDP packet whose headers are all present in the skb (for a
/// later fragment: its IP header), of the family whose addresses are `A`
/// ([`IpFamily`]). Aligned so its addresses are copied into map keys as
/// whole words.
#[repr(C, align(8))]
pub struct Flow<A> {
    /// Source address, network byte order.
    pub saddr: A,
    /// Destination address, network byte order.
    pub daddr: A,
    /// Source port, network byte order (wire bytes read as a native u16);
    /// for a later fragment, 0 until its first fragment's record is found.
    pub sport: u16,
    /// Destination port, network byte order (the same caveat).
    pub dport: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// TCP flags byte (offset 13 of the TCP header); 0 for UDP and for a
    /// later fragment.
    pub tcp_flags: u8,
    /// The datagram's identification: IPv4's two header bytes as a native
    /// u16, zero-extended; IPv6's fragment header's four bytes as a native
    /// u32 (0 without a fragment header).
    pub id: u32,
    /// Which part of its datagram the packet is.
    pub fragment: Fragment,
    /// Offset of the IP header.
    pub l3_off: usize,
    /// Offset of the L4 header.
    pub l4_off: usize,
}

/// A parsed IPv4 packet.
pub type Ipv4Flow = Flow<[u8; 4]>;
/// A parsed IPv6 packet.
pub type Ipv6Flow = Flow<MapAddr>;

impl<A> Flow<A> {
    /// Offset of the L4 checksum.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off + l4_csum_off(self.proto)
    }

    /// Whether this is a TCP SYN with ACK: a connection's answer to its
    /// SYN.
    #[inline(always)]
    pub fn is_tcp_syn_ack(&self) -> bool {
        self.proto == PROTO_TCP
            && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN | TCP_FLAG_ACK
    }

    /// Whether this is a TCP SYN without ACK: the first packet of a connection.
    #[inline(always)]
    pub fn is_tcp_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }
}

/// Bounds-checked access to a packet's bytes, for both hook types.
///
/// A `T` is loaded and stored at its own width (`ptr::read`/`ptr::write`,
/// not their `_unaligned` forms, which the BPF target expands into one
/// byte access per byte, and a wider read of bytes so written stalls on
/// store forwarding). Packet data has no alignment the compiler can rely
/// on; the accesses are sound here because the BPF instructions carry no
/// alignment requirement of their own, and the verifier accepts misaligned
/// packet accesses on the architectures the agent runs on (x86-64 and
/// arm64 both have efficient unaligned access, and the programs are loaded
/// without `BPF_F_STRICT_ALIGNMENT`). Nothing derives facts from the
/// pointers' alignment: they are rebuilt from `data` at every access.
pub trait Packet {
    /// Reads a `T` at `offset`; `None` when the packet is too short.
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
    /// Writes `value` at `offset`.
    fn write<T: Copy>(&self, offset: usize, value: &T) -> Result<(), i64>;
    /// The packet's length in bytes.
    fn length(&self) -> usize;
}

impl Packet for TcContext {
    /// Reads straight from the skb's linear data when the bytes are there
    /// (the headers of almost every packet), else through
    /// `bpf_skb_load_bytes`, which also reaches paged data.
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let start = self.data();
        // At least two bytes: for one, the compiler turns the check into
        // `pointer >= end`, from which the verifier derives no readable
        // range. (A single byte that ends the linear data is read through
        // the helper instead.)
        let needed = core::mem::size_of::<T>().max(2);
        if start + offset + needed > self.data_end() {
            return self.load(offset).ok();
        }
        // SAFETY: the range lies inside the linear data, checked just above;
        // alignment: see the trait.
        Some(unsafe { ((start + offset) as *const T).read() })
    }

    /// Writes straight into the skb's linear data when the bytes are there
    /// (the kernel makes a cloned skb writable before the program runs),
    /// else through `bpf_skb_store_bytes`.
    #[inline(always)]
    fn write<T: Copy>(&self, offset: usize, value: &T) -> Result<(), i64> {
        let start = self.data();
        // At least two bytes, as for `read`.
        let needed = core::mem::size_of::<T>().max(2);
        if start + offset + needed > self.data_end() {
            return self.store(offset, value, 0);
        }
        // SAFETY: the range lies inside the linear data, checked just above;
        // alignment: see the trait.
        unsafe { ((start + offset) as *mut T).write(*value) };
        Ok(())
    }

    #[inline(always)]
    fn length(&self) -> usize {
        self.len() as usize
    }
}

impl Packet for XdpContext {
    /// Reads from the frame; `None` past its end. At least two bytes are
    /// checked, as on TC: for one, the compiler turns the check into
    /// `pointer >= end`, from which the verifier derives no readable range
    /// (so a single byte that ends the frame reads as `None`).
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let start = self.data();
        if start + offset + core::mem::size_of::<T>().max(2) > self.data_end() {
            return None;
        }
        // SAFETY: the range lies inside the packet, checked just above;
        // alignment: see the trait.
        Some(unsafe { ((start + offset) as *const T).read() })
    }

    #[inline(always)]
    fn write<T: Copy>(&self, offset: usize, value: &T) -> Result<(), i64> {
        let start = self.data();
        if start + offset + core::mem::size_of::<T>() > self.data_end() {
            return Err(-1);
        }
        // SAFETY: the range lies inside the packet, checked just above;
        // alignment: see the trait.
        unsafe { ((start + offset) as *mut T).write(*value) };
        Ok(())
    }

    #[inline(always)]
    fn length(&self) -> usize {
        self.data_end() - self.data()
    }
}

/// Parses an Ethernet frame holding IPv4 TCP or UDP (a whole datagram or a
/// fragment of one). `None` for anything else: other EtherTypes, other
/// protocols, and packets whose headers are cut short or inconsistent.
#[inline(always)]
pub fn parse_ipv4<P: Packet>(ctx: &P) -> Option<Ipv4Flow> {
    if u16::from_be(ctx.read::<u16>(ETH_TYPE_OFF)?) != ETH_P_IP {
        return None;
    }
    let l3_off = ETH_HDR_LEN;
    let ip: Ipv4Fixed = ctx.read(l3_off)?;
    let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
    if ip.version_ihl >> 4 != IP_VERSION_4 || ihl < IPV4_FIXED_LEN {
        return None;
    }
    let l4_len = match ip.proto {
        PROTO_TCP => TCP_HDR_LEN,
        PROTO_UDP => UDP_HDR_LEN,
        _ => return None,
    };
    let tot_len = usize::from(u16::from_be(ip.tot_len));
    let l4_off = l3_off + ihl;
    let id = u32::from(ip.id);
    let flags_offset = u16::from_be(ip.flags_offset);
    if flags_offset & IP_OFFSET_MASK != 0 {
        // A later fragment: only its IPv4 header is ours to read, and the
        // frame must hold all of it (options included), as for any packet
        // (the packet fuzzer found one cut inside its options translated).
        if tot_len < ihl || ctx.length() < l4_off {
            return None;
        }
        return Some(Ipv4Flow {
            saddr: ip.saddr.to_ne_bytes(),
            daddr: ip.daddr.to_ne_bytes(),
            sport: 0,
            dport: 0,
            proto: ip.proto,
            tcp_flags: 0,
            id,
            fragment: Fragment::Later,
            l3_off,
            l4_off,
        });
    }
    if tot_len < ihl + l4_len || ctx.length() < l4_off + l4_len {
        return None;
    }
    let ports: [u16; 2] = ctx.read(l4_off)?;
    let tcp_flags = if ip.proto == PROTO_TCP {
        ctx.read::<u8>(l4_off + TCP_FLAGS_OFF)?
    } else {
        0
    };
    Some(Ipv4Flow {
        saddr: ip.saddr.to_ne_bytes(),
        daddr: ip.daddr.to_ne_bytes(),
        sport: ports[0],
        dport: ports[1],
        proto: ip.proto,
        tcp_flags,
        id,
        fragment: if (flags_offset >> IP_FLAGS_SHIFT) as u8 & IP_FLAG_MF != 0 {
            Fragment::First
        } else {
            Fragment::Whole
        },
        l3_off,
        l4_off,
    })
}

/// Parses an Ethernet frame holding IPv6 TCP or UDP (a whole datagram or
/// a fragment of one), walking up to [`IPV6_EXT_HDRS_MAX`] hop-by-hop,
/// routing, destination options and fragment headers to the transport
/// header. A fragment header (RFC 8200, 4.5) ends the walk: the transport
/// header must follow it directly (as it does for every datagram Linux
/// fragments), and its identification becomes the flow's `id`. Offset 0
/// with M set is [`Fragment::First`] (ports read after the fragment
/// header), a non-zero offset [`Fragment::Later`] (no transport header:
/// ports 0 until its first fragment's record is found), offset 0 with M
/// clear (an atomic fragment) a [`Fragment::Whole`] datagram. `None` for
/// anything else: other EtherTypes, other next headers (a fragment whose
/// fragmentable part starts with another extension header above all, so
/// all of its datagram passes untouched), more extension headers than
/// that, and packets whose headers are cut short or inconsistent.
#[inline(always)]
pub fn parse_ipv6<P: Packet>(ctx: &P) -> Option<Ipv6Flow> {
    if u16::from_be(ctx.read::<u16>(ETH_TYPE_OFF)?) != ETH_P_IPV6 {
        return None;
    }
    let l3_off = ETH_HDR_LEN;
    let first: u8 = ctx.read(l3_off)?;
    if first >> 4 != 6 {
        return None;
    }
    let payload_len = usize::from(u16::from_be(
        ctx.read::<u16>(l3_off + IPV6_PAYLOAD_LEN_OFF)?,
    ));
    let mut next: u8 = ctx.read(l3_off + IPV6_NEXT_HDR_OFF)?;
    let mut l4_off = l3_off + IPV6_HDR_LEN;
    let mut fragment = Fragment::Whole;
    let mut id = 0;
    for _ in 0..IPV6_EXT_HDRS_MAX {
        if next == NEXTHDR_FRAGMENT {
            // Next header, reserved, offset and flags, identification.
            next = ctx.read(l4_off)?;
            let field = u16::from_be(ctx.read::<u16>(l4_off + IPV6_FRAG_OFFSET_OFF)?);
            id = ctx.read::<u32>(l4_off + IPV6_FRAG_ID_OFF)?;
            l4_off += IPV6_FRAG_HDR_LEN;
            if field & IPV6_FRAG_OFFSET_MASK != 0 {
                fragment = Fragment::Later;
            } else if field & IPV6_FRAG_MF != 0 {
                fragment = Fragment::First;
            }
            break;
        }
        if next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST {
            break;
        }
        // Next header, then the length in 8-byte units beyond the first 8.
        let ext: [u8; 2] = ctx.read(l4_off)?;
        next = ext[0];
        l4_off += (usize::from(ext[1]) + 1) * 8;
    }
    let l4_len = match next {
        PROTO_TCP => TCP_HDR_LEN,
        PROTO_UDP => UDP_HDR_LEN,
        _ => return None,
    };
    if fragment == Fragment::Later {
        // Only its headers are ours to read (no transport header), and the
        // frame must hold all of them, as for any packet.
        if IPV6_HDR_LEN + payload_len < l4_off - l3_off || ctx.length() < l4_off {
            return None;
        }
        return Some(Flow {
            saddr: read_addr6(ctx, l3_off + IPV6_SRC_OFF)?,
            daddr: read_addr6(ctx, l3_off + IPV6_DST_OFF)?,
            sport: 0,
            dport: 0,
            proto: next,
            tcp_flags: 0,
            id,
            fragment,
            l3_off,
            l4_off,
        });
    }
    if IPV6_HDR_LEN + payload_len < l4_off - l3_off + l4_len || ctx.length() < l4_off + l4_len {
        return None;
    }
    let saddr = read_addr6(ctx, l3_off + IPV6_SRC_OFF)?;
    let daddr = read_addr6(ctx, l3_off + IPV6_DST_OFF)?;
    let ports: [u16; 2] = ctx.read(l4_off)?;
    let tcp_flags = if next == PROTO_TCP {
        ctx.read::<u8>(l4_off + TCP_FLAGS_OFF)?
    } else {
        0
    };
    Some(Flow {
        saddr,
        daddr,
        sport: ports[0],
        dport: ports[1],
        proto: next,
        tcp_flags,
        id,
        fragment,
        l3_off,
        l4_off,
    })
}

/// Reads an IPv6 address at `offset` as two 64-bit words, in one read
/// (one bounds check, one helper call at most): read as sixteen bytes, it
/// would be copied byte by byte (and spilled so to the stack), read word by
/// word, each word read so far would be kept across the next word's
/// possible helper call, and as four 32-bit words it keeps `from_pod`'s
/// IPv6 frame 32 bytes over 6.1's stack limit.
#[inline(always)]
pub fn read_addr6<P: Packet>(ctx: &P, offset: usize) -> Option<MapAddr> {
    let words: [u64; 2] = ctx.read(offset)?;
    // SAFETY: `[u64; 2]` and `[u8; 16]` have the same size, and every byte
    // pattern is a valid `[u8; 16]`.
    Some(unsafe { core::mem::transmute::<[u64; 2], MapAddr>(words) })
}
