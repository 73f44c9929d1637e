//! `loadBalancerSourceRanges`: the client prefixes a LoadBalancer
//! frontend admits. An LPM trie keyed by the frontend's rev-NAT id and a
//! client prefix; the agent writes one entry per range and frontend, and
//! sets [`crate::FRONTEND_FLAG_SOURCE_RANGES`] in the frontend's header
//! only once they are written (and clears it before they are deleted).
//! A new flow to a frontend with that flag whose client matches no entry
//! is dropped (kube-proxy drops it too), counted as
//! [`crate::DatapathCounter::DropSourceRange`].

use bytemuck::{Pod, Zeroable};

use crate::{MapAddr, RevNatId, map_addr_v4};

/// Default capacity of the source-ranges trie (ranges × LoadBalancer
/// frontends).
pub const SOURCE_RANGES_MAX_ENTRIES: u32 = 16_384;

/// Bits of [`SourceRangePrefix::rev_nat_id`]: every entry's prefix
/// length counts them first (an entry matches only its own frontend).
pub const SOURCE_RANGE_ID_BITS: u32 = 32;

/// The data of a source-ranges key (the trie's key is this behind its
/// 32-bit prefix length, [`SourceRangeKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SourceRangePrefix {
    /// The frontend's rev-NAT id, stored big-endian (network byte order)
    /// so the trie's bitwise prefix starts with its most significant bits.
    /// (Every entry's prefix covers all 32 bits, so this only keeps the
    /// layout readable.)
    pub rev_nat_id_be: u32,
    /// The client prefix's address, network byte order (see [`MapAddr`]):
    /// an IPv4 prefix fills the first 4 bytes.
    pub addr: MapAddr,
}
const _: () = assert!(core::mem::size_of::<SourceRangePrefix>() == 20);

impl SourceRangePrefix {
    /// The data of IPv4 address `addr` (network byte order) for the
    /// frontend with rev-NAT id `rev_nat_id`.
    #[inline(always)]
    pub const fn v4(rev_nat_id: RevNatId, addr: [u8; 4]) -> Self {
        Self::new(rev_nat_id, map_addr_v4(addr))
    }

    /// The data of address `addr` of either family (network byte order)
    /// for the frontend with rev-NAT id `rev_nat_id`.
    #[inline(always)]
    pub const fn new(rev_nat_id: RevNatId, addr: MapAddr) -> Self {
        SourceRangePrefix {
            rev_nat_id_be: rev_nat_id.to_be(),
            addr,
        }
    }

    /// The frontend's rev-NAT id, host byte order.
    #[inline(always)]
    pub const fn rev_nat_id(&self) -> RevNatId {
        u32::from_be(self.rev_nat_id_be)
    }
}

/// A key of the source-ranges trie as the kernel lays it out
/// (`struct bpf_lpm_trie_key`): a prefix length in bits, host byte order,
/// then the data it applies to. The agent and the eBPF crate use their
/// libraries' own key type of the same layout; this one gives the table of
/// maps its size and the agent's model its ordering.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SourceRangeKey {
    /// Prefix length in bits: [`SOURCE_RANGE_ID_BITS`] plus the client
    /// prefix's length. Host byte order.
    pub prefix_len: u32,
    /// What the prefix applies to.
    pub data: SourceRangePrefix,
}
const _: () = assert!(core::mem::size_of::<SourceRangeKey>() == 24);

impl SourceRangeKey {
    /// The entry admitting IPv4 prefix `addr/len` to the frontend with
    /// rev-NAT id `rev_nat_id` (`len` at most 32).
    #[inline(always)]
    pub const fn v4(rev_nat_id: RevNatId, addr: [u8; 4], len: u8) -> Self {
        SourceRangeKey {
            prefix_len: SOURCE_RANGE_ID_BITS + len as u32,
            data: SourceRangePrefix::v4(rev_nat_id, addr),
        }
    }

    /// The entry admitting prefix `addr/len` of either family (`addr` a
    /// [`MapAddr`], network byte order; `len` at most 32 for IPv4, 128 for
    /// IPv6) to the frontend with rev-NAT id `rev_nat_id`. The frontend's
    /// family is that of its prefixes, so none is stored.
    #[inline(always)]
    pub const fn new(rev_nat_id: RevNatId, addr: MapAddr, len: u8) -> Self {
        SourceRangeKey {
            prefix_len: SOURCE_RANGE_ID_BITS + len as u32,
            data: SourceRangePrefix::new(rev_nat_id, addr),
        }
    }
}

/// Value of the source-ranges trie: always [`SOURCE_RANGE_ALLOW`] (only
/// a key's presence matters).
pub type SourceRangeValue = u32;
/// The value of every source-ranges entry.
pub const SOURCE_RANGE_ALLOW: SourceRangeValue = 1;
