//! Wire facts (header offsets, protocol numbers, flags) and the one's
//! complement checksum arithmetic every hook uses. The only place these
//! numbers are written down.

pub use service_common::{TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN};

/// EtherType of IPv4, host byte order.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6, host byte order.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Offset of the EtherType inside an Ethernet header.
pub const ETH_TYPE_OFF: usize = 12;

/// IP version of IPv4.
pub const IP_VERSION_4: u8 = 4;
/// Offset of the total length inside an IPv4 header.
pub const IP_TOT_LEN_OFF: usize = 2;
/// Offset of the header checksum inside an IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
/// Offset of the protocol inside an IPv4 header.
pub const IP_PROTO_OFF: usize = 9;
/// Offset of the source address inside an IPv4 header.
pub const IP_SRC_OFF: usize = 12;
/// Offset of the destination address inside an IPv4 header.
pub const IP_DST_OFF: usize = 16;
/// The fixed 20 bytes of an IPv4 header as the parser reads them: fields
/// of their natural width and alignment, so that one read of it loads each
/// field whole (`network_types::ip::Ipv4Hdr` is made of byte arrays, which
/// the BPF target copies byte by byte, and reading a word of such a copy
/// back stalls on store forwarding: the most expensive instruction of an
/// established flow's parse in the bench's profile). Multi-byte fields in
/// network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Fixed {
    /// Version (high nibble) and header length in words (low nibble).
    pub version_ihl: u8,
    /// Type of service.
    pub tos: u8,
    /// Total length.
    pub tot_len: u16,
    /// Identification.
    pub id: u16,
    /// Flags (top 3 bits) and fragment offset in 8-byte units.
    pub flags_offset: u16,
    /// Time to live.
    pub ttl: u8,
    /// Protocol.
    pub proto: u8,
    /// Header checksum.
    pub check: u16,
    /// Source address.
    pub saddr: u32,
    /// Destination address.
    pub daddr: u32,
}
const _: () = assert!(core::mem::size_of::<Ipv4Fixed>() == IPV4_FIXED_LEN);

/// Length of an IPv4 header without options.
pub const IPV4_FIXED_LEN: usize = 20;
/// Length of an Ethernet header.
pub const ETH_HDR_LEN: usize = 14;
/// The fragment offset's bits of [`Ipv4Fixed::flags_offset`] (host byte order).
pub const IP_OFFSET_MASK: u16 = 0x1fff;
/// The flags' shift in [`Ipv4Fixed::flags_offset`] (host byte order).
pub const IP_FLAGS_SHIFT: u16 = 13;
/// "More fragments" in the 3-bit IPv4 flags field.
pub const IP_FLAG_MF: u8 = 0b001;
/// "Don't fragment" in the 3-bit IPv4 flags field.
pub const IP_FLAG_DF: u8 = 0b010;
/// Length of the largest IPv4 header: 20 bytes and 40 of options.
pub const IPV4_MAX_HDR_LEN: usize = 60;
/// Bytes in a 32-bit word, the unit of IPv4 and TCP header lengths.
pub const WORD_LEN: usize = 4;

/// IP version of IPv6.
pub const IP_VERSION_6: u8 = 6;
/// Length of the IPv6 header (without extension headers).
pub const IPV6_HDR_LEN: usize = 40;
/// Offset of the payload length inside an IPv6 header.
pub const IPV6_PAYLOAD_LEN_OFF: usize = 4;
/// Offset of the next header inside an IPv6 header.
pub const IPV6_NEXT_HDR_OFF: usize = 6;
/// Offset of the source address inside an IPv6 header.
pub const IPV6_SRC_OFF: usize = 8;
/// Offset of the destination address inside an IPv6 header.
pub const IPV6_DST_OFF: usize = 24;
/// IPv6 next header: hop-by-hop options.
pub const NEXTHDR_HOP: u8 = 0;
/// IPv6 next header: routing header.
pub const NEXTHDR_ROUTING: u8 = 43;
/// IPv6 next header: destination options.
pub const NEXTHDR_DEST: u8 = 60;
/// IPv6 next header: fragment header (RFC 8200, 4.5).
pub const NEXTHDR_FRAGMENT: u8 = 44;
/// Length of the IPv6 fragment header: next header, reserved, offset and
/// flags (2 bytes), identification (4 bytes).
pub const IPV6_FRAG_HDR_LEN: usize = 8;
/// Offset of the offset-and-flags field inside the IPv6 fragment header.
pub const IPV6_FRAG_OFFSET_OFF: usize = 2;
/// Offset of the identification inside the IPv6 fragment header.
pub const IPV6_FRAG_ID_OFF: usize = 4;
/// The fragment offset (in 8-byte units, shifted left by 3) in the
/// host-order offset-and-flags field of the IPv6 fragment header.
pub const IPV6_FRAG_OFFSET_MASK: u16 = 0xfff8;
/// "More fragments" (M) in that field.
pub const IPV6_FRAG_MF: u16 = 0x0001;
/// How many extension headers the parser walks to find the transport
/// header (hop-by-hop, destination options, routing, fragment,
/// destination options: the order RFC 8200 recommends, each at most once
/// but the destination options).
pub const IPV6_EXT_HDRS_MAX: usize = 5;
/// IP protocol (next header) number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// ICMPv6 type: destination unreachable.
pub const ICMPV6_DEST_UNREACH: u8 = 1;
/// ICMPv6 destination unreachable code: port unreachable.
pub const ICMPV6_PORT_UNREACH: u8 = 4;
/// ICMPv6 type: packet too big (IPv6's path MTU discovery).
pub const ICMPV6_PKT_TOOBIG: u8 = 2;
/// ICMPv6 type: time exceeded.
pub const ICMPV6_TIME_EXCEED: u8 = 3;

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// ICMP type: destination unreachable.
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMP destination unreachable code: port unreachable.
pub const ICMP_PORT_UNREACH: u8 = 3;
/// ICMP type: time exceeded.
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// Length of an ICMP error header (type, code, checksum, 4 more bytes).
pub const ICMP_HDR_LEN: usize = 8;
/// Offset of the checksum inside an ICMP header.
pub const ICMP_CSUM_OFF: usize = 2;
/// Bytes of the offending datagram an ICMP error quotes after its IPv4
/// header (RFC 792): enough for the ports of TCP and UDP.
pub const ICMP_QUOTED_DATA_LEN: usize = 8;

/// Length of a TCP header without options.
pub const TCP_HDR_LEN: usize = 20;
/// Offset of the flags byte inside a TCP header.
pub const TCP_FLAGS_OFF: usize = 13;
/// Offset of the checksum inside a TCP header.
pub const TCP_CSUM_OFF: usize = 16;
/// Length of a UDP header.
pub const UDP_HDR_LEN: usize = 8;
/// Offset of the checksum inside a UDP header.
pub const UDP_CSUM_OFF: usize = 6;
/// Offset of the source port inside a TCP or UDP header.
pub const L4_SPORT_OFF: usize = 0;
/// Offset of the destination port inside a TCP or UDP header.
pub const L4_DPORT_OFF: usize = 2;

/// Offset of the checksum inside the L4 header of `proto` (TCP or UDP).
#[inline(always)]
pub fn l4_csum_off(proto: u8) -> usize {
    if proto == service_common::PROTO_TCP {
        TCP_CSUM_OFF
    } else {
        UDP_CSUM_OFF
    }
}

/// An IPv4 address as two 16-bit words in wire order (as native u16s).
#[inline(always)]
pub fn addr_words(addr: [u8; 4]) -> [u16; 2] {
    [
        u16::from_ne_bytes([addr[0], addr[1]]),
        u16::from_ne_bytes([addr[2], addr[3]]),
    ]
}

/// Incremental checksum update (RFC 1624, eqn. 3): the checksum `csum`
/// after one 16-bit word changes from `old` to `new`. All values are wire
/// bytes read as native u16s; the one's complement sum does not depend on
/// byte order as long as it is the same for all.
#[inline(always)]
pub fn csum_replace(csum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!csum) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The checksum `csum` after an IPv4 address in the covered data changed
/// from `old` to `new`.
#[inline(always)]
pub fn csum_replace_addr(csum: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let (old, new) = (addr_words(old), addr_words(new));
    csum_replace(csum_replace(csum, old[0], new[0]), old[1], new[1])
}

/// The one's complement sum of an IPv6 address's four 32-bit words (wire
/// order, as native u32s), unfolded, or of their complements (`invert`).
/// The address is read as words, not as sixteen bytes (which the BPF
/// target would load and spill one by one): every IPv6 address the
/// datapath handles sits 4-byte aligned (in a parsed flow, a map value,
/// the configuration, a constant).
#[inline(always)]
fn addr6_sum(addr: &[u8; 16], invert: bool) -> u64 {
    let words = core::ptr::from_ref(addr).cast::<u32>();
    let mut sum = 0u64;
    for index in 0..4 {
        // SAFETY: four words inside the address; aligned (see above).
        let word = unsafe { words.add(index).read() };
        sum += u64::from(if invert { !word } else { word });
    }
    sum
}

/// Folds a 64-bit one's complement sum into 16 bits, without inverting.
#[inline(always)]
fn fold64(sum: u64) -> u16 {
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    fold(sum as u32)
}

/// The checksum `csum` after an IPv6 address in the covered data changed
/// from `old` to `new` (RFC 1624, eqn. 3, over 32-bit words: the one's
/// complement sum does not depend on the word size).
#[inline(always)]
pub fn csum_replace_addr6(csum: u16, old: &[u8; 16], new: &[u8; 16]) -> u16 {
    let sum = u64::from(!csum) + addr6_sum(old, true) + addr6_sum(new, false);
    !fold64(sum)
}

/// Folds a 32-bit one's complement sum into 16 bits (RFC 1071), without
/// inverting it. The sum's byte order is the wire's, so is the result's.
#[inline(always)]
pub fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    ((sum & 0xffff) + (sum >> 16)) as u16
}

/// The checksum field's bytes for a 32-bit one's complement sum: folded
/// and inverted (RFC 1071).
#[inline(always)]
pub fn checksum_bytes(sum: u32) -> [u8; 2] {
    (!fold(sum)).to_ne_bytes()
}

/// The folded, not inverted, one's complement sum of the IPv4 pseudo
/// header (RFC 768, RFC 793) of an L4 segment of `l4_len` bytes: what the
/// L4 checksum field holds while the checksum is left to offload
/// (`CHECKSUM_PARTIAL`). Wire bytes read as native u16s, like the field.
#[inline(always)]
pub fn pseudo_header_sum(saddr: [u8; 4], daddr: [u8; 4], proto: u8, l4_len: u16) -> u16 {
    let (s, d) = (addr_words(saddr), addr_words(daddr));
    let sum = u32::from(s[0])
        + u32::from(s[1])
        + u32::from(d[0])
        + u32::from(d[1])
        + u32::from(u16::from_ne_bytes([0, proto]))
        + u32::from(u16::from_ne_bytes(l4_len.to_be_bytes()));
    fold(sum)
}

/// The folded, not inverted, one's complement sum of the IPv6 pseudo
/// header (RFC 8200, 8.1) of an L4 segment of `l4_len` bytes: the IPv6 twin
/// of [`pseudo_header_sum`].
#[inline(always)]
pub fn pseudo_header_sum6(saddr: &[u8; 16], daddr: &[u8; 16], proto: u8, l4_len: u16) -> u16 {
    let sum = u64::from(u16::from_ne_bytes([0, proto]))
        + u64::from(u16::from_ne_bytes(l4_len.to_be_bytes()))
        + addr6_sum(saddr, false)
        + addr6_sum(daddr, false);
    fold64(sum)
}
