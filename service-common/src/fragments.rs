//! Fragments (IPv4, and IPv6 with a fragment header): the first fragment of
//! a translated datagram records its L4 ports, so the later fragments (which
//! carry no L4 header) are translated as packets of the same flow.

use bytemuck::{Pod, Zeroable};

use crate::{FAMILY_IPV4, FAMILY_IPV6, MapAddr, map_addr_v4};

/// Default capacity of the fragments LRU map (`--map-size-fragments`).
pub const FRAGMENTS_MAX_ENTRIES: u32 = 8_192;

/// Key of the fragments map: one datagram as a hook sees it.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FragmentKey {
    /// Source address, network byte order.
    pub saddr: MapAddr,
    /// Destination address, network byte order.
    pub daddr: MapAddr,
    /// The datagram's identification: for IPv4 the header's two bytes read
    /// as a native `u16` (wire order), zero-extended; for IPv6 the fragment
    /// header's four bytes read as a native `u32`.
    pub id: u32,
    /// IP protocol.
    pub proto: u8,
    /// Address family: [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 40);

impl FragmentKey {
    /// The key of the IPv4 datagram `saddr → daddr` (network byte order)
    /// of `proto` with identification `id` (the header's two bytes read as
    /// a native `u16`).
    #[inline(always)]
    pub const fn v4(saddr: [u8; 4], daddr: [u8; 4], id: u16, proto: u8) -> Self {
        FragmentKey {
            saddr: map_addr_v4(saddr),
            daddr: map_addr_v4(daddr),
            id: id as u32,
            proto,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        }
    }

    /// The key of the IPv6 datagram `saddr → daddr` (network byte order)
    /// of `proto` (the transport protocol, after the fragment header) with
    /// the fragment header's identification `id` (its four bytes read as a
    /// native `u32`).
    #[inline(always)]
    pub const fn v6(saddr: MapAddr, daddr: MapAddr, id: u32, proto: u8) -> Self {
        FragmentKey {
            saddr,
            daddr,
            id,
            proto,
            family: FAMILY_IPV6,
            _pad: [0; 2],
        }
    }
}

/// Value of the fragments map: the L4 ports the first fragment carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragmentValue {
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// Monotonic seconds ([`crate::mono_seconds`]) of the first fragment,
    /// host byte order.
    pub last_seen: u32,
}
const _: () = assert!(core::mem::size_of::<FragmentValue>() == 8);
