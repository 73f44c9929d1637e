//! Session affinity (`sessionAffinity: ClientIP`): which backend a client
//! of a frontend was last given, and when. The datapath alone reads and
//! writes these entries (an LRU map, as Cilium's `cilium_lb4_affinity`):
//! a new flow to a frontend whose header has
//! [`crate::FRONTEND_FLAG_AFFINITY`] goes to the backend its client's entry
//! names while the entry is younger than the frontend's
//! `affinity_timeout_secs` and the backend is still one of the frontend's
//! (in one of its slots) and takes new flows; else it is balanced afresh
//! and the entry rewritten. Every new flow refreshes the
//! entry (kube-proxy's `recent --set`: the timeout runs from the client's
//! last new connection). Expiry needs no agent: the timestamp check makes
//! an old entry worthless, and the LRU map evicts the least recently used
//! entries when it fills.

use bytemuck::{Pod, Zeroable};

use crate::{BackendId, FAMILY_IPV4, MapAddr, RevNatId, map_addr_v4};

/// Default capacity of the affinity LRU map (one entry per client and
/// frontend with affinity).
pub const AFFINITY_MAX_ENTRIES: u32 = 65_536;

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset: 3 hours
/// (the API's default).
pub const AFFINITY_TIMEOUT_DEFAULT_SECS: u32 = 10_800;
/// The largest valid `timeoutSeconds`: one day (the API's bound).
pub const AFFINITY_TIMEOUT_MAX_SECS: u32 = 86_400;

/// Key of the affinity map: one client of one frontend. Affinity is per
/// frontend (its rev-NAT id), as in Cilium: a client reaching a Service
/// through its ClusterIP and through a NodePort may get two backends.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AffinityKey {
    /// The client's address, network byte order (see [`MapAddr`]): the
    /// packet's source, or for socket-LB the node's own address.
    pub client: MapAddr,
    /// The frontend's rev-NAT id, host byte order.
    pub rev_nat_id: RevNatId,
    /// Address family of `client`: [`FAMILY_IPV4`] or [`crate::FAMILY_IPV6`].
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 24);

impl AffinityKey {
    /// The key of IPv4 client `client` (network byte order) of the
    /// frontend with rev-NAT id `rev_nat_id`.
    #[inline(always)]
    pub const fn v4(client: [u8; 4], rev_nat_id: RevNatId) -> Self {
        Self::new(map_addr_v4(client), FAMILY_IPV4, rev_nat_id)
    }

    /// The key of client `client` (network byte order) of `family`
    /// ([`FAMILY_IPV4`] or [`crate::FAMILY_IPV6`]) of the frontend with
    /// rev-NAT id `rev_nat_id`.
    #[inline(always)]
    pub const fn new(client: MapAddr, family: u8, rev_nat_id: RevNatId) -> Self {
        // SAFETY: `[u8; 16]` and `[u32; 4]` have the same size, and every
        // byte pattern is a valid `[u32; 4]`.
        let client = unsafe { core::mem::transmute::<MapAddr, [u32; 4]>(client) };
        // As six words, not field by field: the BPF target then stores
        // whole words instead of calling `memset` for the bytes around
        // the family (a call that would deepen the datapath's call chain).
        let words: [u32; 6] = [
            client[0],
            client[1],
            client[2],
            client[3],
            rev_nat_id,
            u32::from_ne_bytes([family, 0, 0, 0]),
        ];
        // SAFETY: `[u32; 6]` and `AffinityKey` have the same size, every
        // byte pattern is a valid `AffinityKey`, and the words give each
        // field its value (the client in bytes 0..16, the id at 16, the
        // family at 20, zero elsewhere).
        unsafe { core::mem::transmute::<[u32; 6], AffinityKey>(words) }
    }
}

/// Value of the affinity map: the backend a client was given.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityValue {
    /// The backend's id, host byte order. The datapath checks that the
    /// backends map still holds it, with the same address (`addr`, `port`:
    /// an id handed to another backend is not followed) and taking new
    /// flows, before it follows the entry.
    pub backend_id: BackendId,
    /// Monotonic seconds ([`crate::mono_seconds`], the conntrack clock) of
    /// the client's last new flow to the frontend. Host byte order.
    pub last_used: u32,
    /// The backend's address when chosen, network byte order.
    pub addr: MapAddr,
    /// The backend's port when chosen, network byte order.
    pub port: u16,
    /// The frontend slot the backend was chosen in (host byte order): the
    /// entry is followed only while that slot still holds the backend, so
    /// a backend that left the frontend (even one still in the backends
    /// map for another Service) is never followed.
    pub slot: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 32);

impl AffinityValue {
    /// Whether the entry, last used at `last_used`, is still valid at `now`
    /// (monotonic seconds) for a frontend whose timeout is `timeout_secs`:
    /// idle for at most that long. A `last_used` ahead of `now` (written
    /// by another CPU in the next second) is valid.
    #[inline(always)]
    pub const fn is_fresh(&self, now: u32, timeout_secs: u32) -> bool {
        (now.wrapping_sub(self.last_used) as i32) <= timeout_secs as i32
    }
}

/// The `affinity_timeout_secs` of a frontend header for a Service's
/// `timeoutSeconds` (`None`: unset), or why it is invalid: unset is the
/// default (10800 s); a value outside `1..=86400` is refused, as the API
/// server's validation refuses it.
pub const fn affinity_timeout(timeout_seconds: Option<i64>) -> Result<u32, i64> {
    const MAX: i64 = AFFINITY_TIMEOUT_MAX_SECS as i64;
    match timeout_seconds {
        None => Ok(AFFINITY_TIMEOUT_DEFAULT_SECS),
        Some(secs @ 1..=MAX) => Ok(secs as u32),
        Some(invalid) => Err(invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_fresh_for_its_timeout_after_last_use() {
        let entry = AffinityValue {
            last_used: 1000,
            ..AffinityValue::default()
        };
        assert!(entry.is_fresh(1000, 2));
        assert!(entry.is_fresh(1002, 2));
        assert!(!entry.is_fresh(1003, 2));
        // Written by another CPU a second ahead.
        assert!(entry.is_fresh(999, 2));
        // Across the clock's wrap.
        let wrapped = AffinityValue {
            last_used: u32::MAX,
            ..AffinityValue::default()
        };
        assert!(wrapped.is_fresh(1, 2) && !wrapped.is_fresh(2, 2));
    }

    #[test]
    fn keys_are_built_field_by_field_alike() {
        let key = AffinityKey::v4([10, 0, 0, 1], 0x0102_0304);
        assert_eq!(key.client, crate::map_addr_v4([10, 0, 0, 1]));
        assert_eq!(key.rev_nat_id, 0x0102_0304);
        assert_eq!((key.family, key._pad), (FAMILY_IPV4, [0; 3]));
    }

    #[test]
    fn timeouts_default_and_are_bounded_like_the_api() {
        assert_eq!(affinity_timeout(None), Ok(10_800));
        assert_eq!(affinity_timeout(Some(1)), Ok(1));
        assert_eq!(affinity_timeout(Some(86_400)), Ok(86_400));
        assert_eq!(affinity_timeout(Some(0)), Err(0));
        assert_eq!(affinity_timeout(Some(-5)), Err(-5));
        assert_eq!(affinity_timeout(Some(86_401)), Err(86_401));
    }
}
