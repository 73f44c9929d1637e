//! Keeping the node's own sockets off the SNAT ports: where the kernel's
//! ephemeral range (`net.ipv4.ip_local_port_range`) overlaps the SNAT port
//! range, the SNAT range is added to `net.ipv4.ip_local_reserved_ports`, so
//! the kernel never picks one of its ports for a socket of this network
//! namespace (an explicit `bind` still may). Otherwise a host socket and an
//! SNATed flow could share a tuple, and the datapath would hand the host
//! socket's replies to the external client. Both sysctls, though under
//! `net.ipv4`, govern IPv6 sockets too, so one reservation covers the SNAT
//! ports of both families.

use std::path::Path;

use service_common::SnatPortRange;

use crate::error::{Context as _, Error, IoContext as _};

/// The kernel's ephemeral port range of this network namespace.
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// The ports the kernel never picks for a socket by itself.
const LOCAL_RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// A range of ports, both ends included.
pub type PortRange = (u16, u16);

/// What [`reserve`] found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// The SNAT range lies outside the ephemeral range: nothing to do.
    Disjoint {
        /// The ephemeral range.
        ephemeral: PortRange,
    },
    /// The SNAT range was reserved already.
    AlreadyReserved {
        /// The ephemeral range.
        ephemeral: PortRange,
    },
    /// The SNAT range was added to the reserved ports.
    Reserved {
        /// The ephemeral range.
        ephemeral: PortRange,
        /// The reserved ports now, as written.
        reserved: String,
    },
}

/// Reads `ip_local_port_range` and, where it overlaps `snat`, adds `snat`
/// to `ip_local_reserved_ports` (keeping the ports reserved already), in
/// the calling process's network namespace.
pub fn reserve(snat: SnatPortRange) -> crate::Result<Reservation> {
    reserve_in(Path::new("/"), snat)
}

/// [`reserve`] with the sysctl files under `root` (tests).
pub fn reserve_in(root: &Path, snat: SnatPortRange) -> crate::Result<Reservation> {
    let snat = snat.effective();
    let snat = (snat.min, snat.max);
    let range_file = root.join(LOCAL_PORT_RANGE.trim_start_matches('/'));
    let reserved_file = root.join(LOCAL_RESERVED_PORTS.trim_start_matches('/'));
    let text = std::fs::read_to_string(&range_file).on_path("reading", &range_file)?;
    let ephemeral = parse_local_port_range(&text).ok_or_else(|| {
        Error::Unexpected(format!("{}: unexpected {text:?}", range_file.display()))
    })?;
    if !overlap(ephemeral, snat) {
        return Ok(Reservation::Disjoint { ephemeral });
    }
    let text = std::fs::read_to_string(&reserved_file).on_path("reading", &reserved_file)?;
    let current = parse_reserved_ports(&text).ok_or_else(|| {
        Error::Unexpected(format!("{}: unexpected {text:?}", reserved_file.display()))
    })?;
    let wanted = with_range(&current, snat);
    if wanted == merged(&current) {
        return Ok(Reservation::AlreadyReserved { ephemeral });
    }
    let reserved = format_reserved_ports(&wanted);
    std::fs::write(&reserved_file, &reserved)
        .with_context(|| format!("writing {reserved:?} to {}", reserved_file.display()))?;
    Ok(Reservation::Reserved {
        ephemeral,
        reserved,
    })
}

/// Parses `ip_local_port_range` (`"32768\t60999"`).
pub fn parse_local_port_range(text: &str) -> Option<PortRange> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<u16>().ok());
    let (low, high) = (fields.next()??, fields.next()??);
    (fields.next().is_none() && low <= high).then_some((low, high))
}

/// Parses `ip_local_reserved_ports` (`"8080,9000-9100"`, empty for none).
pub fn parse_reserved_ports(text: &str) -> Option<Vec<PortRange>> {
    text.trim()
        .split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let item = item.trim();
            let (low, high) = item.split_once('-').unwrap_or((item, item));
            let (low, high) = (low.trim().parse().ok()?, high.trim().parse().ok()?);
            (low <= high).then_some((low, high))
        })
        .collect()
}

/// Whether two ranges share a port.
fn overlap(a: PortRange, b: PortRange) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// `ranges` sorted, with overlapping and adjacent ones joined.
fn merged(ranges: &[PortRange]) -> Vec<PortRange> {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<PortRange> = Vec::with_capacity(sorted.len());
    for (low, high) in sorted {
        match out.last_mut() {
            Some(last) if u32::from(low) <= u32::from(last.1) + 1 => last.1 = last.1.max(high),
            _ => out.push((low, high)),
        }
    }
    out
}

/// `ranges` with `range` added, merged.
fn with_range(ranges: &[PortRange], range: PortRange) -> Vec<PortRange> {
    let mut all = ranges.to_vec();
    all.push(range);
    merged(&all)
}

/// Formats ranges as `ip_local_reserved_ports` takes them.
pub fn format_reserved_ports(ranges: &[PortRange]) -> String {
    ranges
        .iter()
        .map(|&(low, high)| {
            if low == high {
                low.to_string()
            } else {
                format!("{low}-{high}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/proc/sys` with the given contents.
    fn sysctls(range: &str, reserved: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("proc/sys/net/ipv4");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ip_local_port_range"), range).unwrap();
        std::fs::write(dir.join("ip_local_reserved_ports"), reserved).unwrap();
        root
    }

    fn reserved(root: &tempfile::TempDir) -> String {
        std::fs::read_to_string(root.path().join(&LOCAL_RESERVED_PORTS[1..])).unwrap()
    }

    const SNAT: SnatPortRange = SnatPortRange {
        min: 20000,
        max: 29999,
    };

    #[test]
    fn the_default_ranges_need_no_reservation() {
        let root = sysctls("32768\t60999\n", "\n");
        assert_eq!(
            reserve_in(root.path(), SNAT).unwrap(),
            Reservation::Disjoint {
                ephemeral: (32768, 60999)
            }
        );
        assert_eq!(reserved(&root), "\n");
    }

    #[test]
    fn an_overlapping_ephemeral_range_gets_the_snat_range_reserved_keeping_the_rest() {
        let root = sysctls("1024 65000\n", "8080,29990-30010,9000-9100\n");
        assert_eq!(
            reserve_in(root.path(), SNAT).unwrap(),
            Reservation::Reserved {
                ephemeral: (1024, 65000),
                reserved: "8080,9000-9100,20000-30010".into()
            }
        );
        assert_eq!(reserved(&root), "8080,9000-9100,20000-30010");
        // Run again (a restarted agent): nothing more to write.
        assert_eq!(
            reserve_in(root.path(), SNAT).unwrap(),
            Reservation::AlreadyReserved {
                ephemeral: (1024, 65000)
            }
        );
    }

    #[test]
    fn sysctl_texts_parse_and_nonsense_is_refused() {
        assert_eq!(
            parse_local_port_range("32768\t60999\n"),
            Some((32768, 60999))
        );
        for bad in ["", "1", "5 4", "1 2 3", "a b", "1 70000"] {
            assert_eq!(parse_local_port_range(bad), None, "{bad:?}");
        }
        assert_eq!(parse_reserved_ports("\n"), Some(vec![]));
        assert_eq!(
            parse_reserved_ports("80, 8000-8010\n"),
            Some(vec![(80, 80), (8000, 8010)])
        );
        for bad in ["x", "10-5", "1-2-3", "70000"] {
            assert_eq!(parse_reserved_ports(bad), None, "{bad:?}");
        }
        assert_eq!(
            format_reserved_ports(&merged(&[(5, 5), (1, 3), (4, 4), (10, 12)])),
            "1-5,10-12"
        );
        assert!(overlap((1, 5), (5, 9)) && !overlap((1, 4), (5, 9)));
    }
}
