//! Node-wide settings the agent writes for the datapath (one entry of the
//! configuration array): the SNAT addresses and port range, and the
//! conntrack timeouts.

use bytemuck::{Pod, Zeroable};

use crate::ConntrackTimeouts;

/// A range of SNAT source ports, both ends included, host byte order.
/// `0..=0` means the default range ([`SnatPortRange::DEFAULT`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SnatPortRange {
    /// First port, host byte order.
    pub min: u16,
    /// Last port, host byte order.
    pub max: u16,
}
const _: () = assert!(core::mem::size_of::<SnatPortRange>() == 4);

impl SnatPortRange {
    /// The default, 20000-29999 (as Calico's `bpfPSNATPorts`): disjoint
    /// from Linux's default ephemeral range (32768-60999) and from the
    /// NodePort range (30000-32767), so no host socket picks an SNAT port
    /// by itself.
    pub const DEFAULT: SnatPortRange = SnatPortRange {
        min: 20_000,
        max: 29_999,
    };

    /// The range in use: this one, or the default when it is unset or
    /// inverted.
    #[inline(always)]
    pub const fn effective(self) -> SnatPortRange {
        if self.min == 0 || self.max < self.min {
            Self::DEFAULT
        } else {
            self
        }
    }

    /// Number of ports in the effective range (at least one).
    #[inline(always)]
    pub const fn port_count(self) -> u32 {
        let range = self.effective();
        // Never zero, provably so (no division-by-zero panic in the datapath).
        range.max.saturating_sub(range.min) as u32 + 1
    }

    /// The `index`-th port of the effective range, counting round from its
    /// start (`index` modulo the length), host byte order.
    #[inline(always)]
    pub const fn nth(self, index: u32) -> u16 {
        let range = self.effective();
        (range.min as u32 + index % self.port_count()) as u16
    }

    /// Whether `port` (host byte order) lies in the effective range.
    #[inline(always)]
    pub const fn contains(self, port: u16) -> bool {
        let range = self.effective();
        range.min <= port && port <= range.max
    }
}

/// Node-wide settings the agent gives the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DatapathConfig {
    /// IPv4 address replies of SNATed flows come back to (this node's
    /// address on the node network), network byte order; zero: no SNAT, so
    /// remote backends are not used for external traffic.
    pub snat_v4: [u8; 4],
    /// Source ports SNATed flows get (`--snat-port-range`).
    pub snat_ports: SnatPortRange,
    /// Conntrack timeouts (`--ct-timeout-*`).
    pub timeouts: ConntrackTimeouts,
    /// IPv6 address replies of SNATed IPv6 flows come back to, network
    /// byte order; all zero: no IPv6 SNAT. (Appended last: the fields
    /// above keep their offsets.)
    pub snat_v6: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 48);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snat_range_defaults_when_unset_or_inverted() {
        assert_eq!(SnatPortRange::default().effective(), SnatPortRange::DEFAULT);
        let inverted = SnatPortRange { min: 5, max: 4 };
        assert_eq!(inverted.effective(), SnatPortRange::DEFAULT);
        assert_eq!(SnatPortRange::DEFAULT.port_count(), 10_000);
    }

    // Disjoint from the ephemeral (32768-60999) and NodePort (30000-32767) ranges.
    const _: () = assert!(SnatPortRange::DEFAULT.max < 30_000);

    #[test]
    fn ports_are_counted_round_the_range() {
        let range = SnatPortRange { min: 100, max: 102 };
        assert_eq!(range.port_count(), 3);
        assert_eq!(
            [0, 1, 2, 3, 7].map(|i| range.nth(i)),
            [100, 101, 102, 100, 101]
        );
        assert!(range.contains(102) && !range.contains(103) && !range.contains(99));
        let single = SnatPortRange { min: 7, max: 7 };
        assert_eq!((single.port_count(), single.nth(5)), (1, 7));
    }
}
