//! Map keys and values shared by the eBPF datapath (`service-ebpf`) and the
//! agent (`service-agent`), the table of every map and program both sides
//! use ([`layout`]), and the pure functions both sides (and the tests) use to
//! reason about conntrack entries: which entries belong to a flow, and when
//! an entry has expired ([`conntrack`]).
//!
//! Every type is `#[repr(C)]`, has its padding written out as named fields
//! (so `bytemuck::Pod` can be derived and no uninitialised byte ever reaches
//! a map key), and carries a size assertion. The keys and values the
//! datapath builds or copies per packet are 8-byte aligned (their sizes
//! are multiples of 8, so this adds no padding): the BPF target then copies
//! and compares their 16-byte addresses as whole words instead of byte by
//! byte. Byte order is documented per
//! field: "network" means the bytes as they stand in the packet header,
//! "host" means a plain native integer.
//!
//! Addresses are always 16 bytes with an explicit family so IPv6 needs no
//! layout change: an IPv4 address fills the first 4 bytes, the rest are zero.
#![no_std]

pub mod affinity;
pub mod config;
pub mod conntrack;
pub mod counters;
pub mod fragments;
pub mod layout;
pub mod services;
pub mod sock;
pub mod source_ranges;

pub use affinity::*;
pub use config::*;
pub use conntrack::*;
pub use counters::*;
pub use fragments::*;
pub use layout::*;
pub use services::*;
pub use sock::*;
pub use source_ranges::*;

/// Address family tag for IPv4 entries (`family` fields).
pub const FAMILY_IPV4: u8 = 4;
/// Address family tag for IPv6 entries (`family` fields).
pub const FAMILY_IPV6: u8 = 6;

/// IP protocol number of TCP (`proto` fields).
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP (`proto` fields).
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of SCTP (`proto` fields).
pub const PROTO_SCTP: u8 = 132;

/// TCP header flag FIN (byte 13 of the TCP header).
pub const TCP_FLAG_FIN: u8 = 0x01;
/// TCP header flag SYN.
pub const TCP_FLAG_SYN: u8 = 0x02;
/// TCP header flag RST.
pub const TCP_FLAG_RST: u8 = 0x04;
/// TCP header flag ACK.
pub const TCP_FLAG_ACK: u8 = 0x10;

/// A map address: 16 bytes in network byte order. IPv4 uses bytes 0..4 and
/// leaves 4..16 zero; the entry's `family` field says which one it is.
pub type MapAddr = [u8; 16];

/// Builds a [`MapAddr`] from an IPv4 address in network byte order.
#[inline(always)]
pub const fn map_addr_v4(octets: [u8; 4]) -> MapAddr {
    // As words, not as sixteen bytes: the BPF target then moves the address
    // with one load and store instead of splitting it into bytes.
    let words: [u32; 4] = [u32::from_ne_bytes(octets), 0, 0, 0];
    // SAFETY: `[u32; 4]` and `[u8; 16]` have the same size, and every byte
    // pattern is a valid `[u8; 16]`.
    unsafe { core::mem::transmute::<[u32; 4], MapAddr>(words) }
}

/// The IPv4 part of a [`MapAddr`] (bytes 0..4), network byte order.
#[inline(always)]
pub const fn map_addr_v4_octets(addr: &MapAddr) -> [u8; 4] {
    let [octets @ .., _, _, _, _, _, _, _, _, _, _, _, _] = *addr;
    octets
}

/// Whether two map addresses are equal, compared as two 64-bit words (the
/// BPF target would otherwise call a byte-by-byte compare).
#[inline(always)]
pub const fn map_addrs_equal(a: &MapAddr, b: &MapAddr) -> bool {
    // SAFETY: `[u8; 16]` and `[u64; 2]` have the same size, and every byte
    // pattern is a valid `[u64; 2]`.
    let (a, b) = unsafe {
        (
            core::mem::transmute::<MapAddr, [u64; 2]>(*a),
            core::mem::transmute::<MapAddr, [u64; 2]>(*b),
        )
    };
    a[0] == b[0] && a[1] == b[1]
}

/// Monotonic seconds as conntrack and fragment entries store them
/// (`last_seen`, `created`): `CLOCK_MONOTONIC` (what the datapath's
/// `bpf_ktime_get_ns` reads) in nanoseconds, divided down. Both sides use
/// this one conversion so their "now" agree.
///
/// Divides by multiplying, as compilers divide by a constant (10⁹ = 2⁹ ×
/// 1953125: the high half of `nanos / 2⁹` × ⌈2⁷⁵ / 1953125⌉, shifted by 11,
/// exact for every `u64`): the BPF target's 64-bit division costs more than
/// the whole rest of reading the clock.
#[inline(always)]
pub const fn mono_seconds(nanos: u64) -> u32 {
    (mul_high(nanos >> 9, 0x44_B82F_A09B_5A53) >> 11) as u32
}

/// The high 64 bits of the 128-bit product `a × b`, from 32-bit halves
/// (the BPF target has no wider multiplication).
#[inline(always)]
const fn mul_high(a: u64, b: u64) -> u64 {
    const LOW: u64 = 0xFFFF_FFFF;
    let (a_low, a_high) = (a & LOW, a >> 32);
    let (b_low, b_high) = (b & LOW, b >> 32);
    let low_low = a_low * b_low;
    let high_low = a_high * b_low;
    let low_high = a_low * b_high;
    let cross = (low_low >> 32) + (high_low & LOW) + low_high;
    (cross >> 32) + (high_low >> 32) + a_high * b_high
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mono_seconds_divide_exactly() {
        let exact = |nanos: u64| assert_eq!(mono_seconds(nanos), (nanos / 1_000_000_000) as u32);
        for nanos in [0, 1, 999_999_999, 1_000_000_000, u64::MAX, 1 << 63] {
            exact(nanos);
        }
        for seconds in [1u64, 59, 86_400, 4_294_967_295, 18_446_744_073] {
            let ns = seconds * 1_000_000_000;
            exact(ns - 1);
            exact(ns);
            exact(ns + 1);
        }
        // xorshift: spread over the whole range.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            exact(x);
        }
    }

    #[test]
    fn map_addresses_compare_by_every_byte() {
        let a = map_addr_v4([10, 0, 0, 1]);
        assert!(map_addrs_equal(&a, &a));
        assert!(!map_addrs_equal(&a, &map_addr_v4([10, 0, 0, 2])));
        let mut v6 = a;
        v6[15] = 1;
        assert!(!map_addrs_equal(&a, &v6));
        assert_eq!(map_addr_v4_octets(&a), [10, 0, 0, 1]);
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all these types are `#[repr(C)]`, `Copy`, and have no implicit
    // padding (checked by the `bytemuck::Pod` derive), so any byte pattern of
    // their size is a valid value.
    unsafe impl aya::Pod for super::FrontendKey {}
    unsafe impl aya::Pod for super::FrontendValue {}
    unsafe impl aya::Pod for super::BackendValue {}
    unsafe impl aya::Pod for super::RevNatValue {}
    unsafe impl aya::Pod for super::ConntrackKey {}
    unsafe impl aya::Pod for super::ConntrackValue {}
    unsafe impl aya::Pod for super::FragmentKey {}
    unsafe impl aya::Pod for super::FragmentValue {}
    unsafe impl aya::Pod for super::FrontendStats {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::IdCursors {}
    unsafe impl aya::Pod for super::SockNatKey {}
    unsafe impl aya::Pod for super::SockNatValue {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::SourceRangePrefix {}
}
