//! The node's own addresses: which of them serve NodePorts, and, when no
//! `--external-device` is named, which devices are external (as Cilium
//! auto-detects them: the devices holding the Node's InternalIP and
//! ExternalIP addresses, and the device of the default route).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::error::Context as _;

/// Every IPv4 and IPv6 address of this network namespace, with its device.
pub fn local_addresses() -> crate::Result<Vec<(String, IpAddr)>> {
    let mut out = Vec::new();
    for interface in nix::ifaddrs::getifaddrs().context("listing the node's addresses")? {
        let Some(addr) = interface.address.as_ref() else {
            continue;
        };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.push((interface.interface_name.clone(), IpAddr::V4(v4.ip())));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out.push((interface.interface_name.clone(), IpAddr::V6(v6.ip())));
        }
    }
    Ok(out)
}

/// Whether `addr` can serve as a node address by default: not loopback,
/// and for IPv6 not link-local (`fe80::/10`, the same on every link, so
/// no address to reach a node by).
fn is_node_address(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => !v4.is_loopback(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
    }
}

/// The addresses NodePorts are served on, of both families: with CIDRs
/// (kube-proxy's `--nodeport-addresses`, IPv4 and IPv6 ones), every local
/// address inside one of them; without, the addresses of the external
/// devices. Loopback and IPv6 link-local addresses only when a CIDR asks.
pub fn nodeport_addresses(
    local: &[(String, IpAddr)],
    external_devices: &[String],
    cidrs: &[IpNet],
) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = local
        .iter()
        .filter(|(device, addr)| {
            if cidrs.is_empty() {
                external_devices.contains(device) && is_node_address(addr)
            } else {
                cidrs.iter().any(|cidr| cidr.contains(addr))
            }
        })
        .map(|(_, addr)| *addr)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The devices of the IPv4 default routes in `/proc/net/route`, then of
/// the IPv6 ones in `/proc/net/ipv6_route`.
pub fn default_route_devices() -> Vec<String> {
    let read = |path: &str, parse: fn(&str) -> Vec<String>| {
        std::fs::read_to_string(path)
            .map(|text| parse(&text))
            .unwrap_or_default()
    };
    let mut out = read("/proc/net/route", parse_default_routes);
    for device in read("/proc/net/ipv6_route", parse_default_routes_v6) {
        if !out.contains(&device) {
            out.push(device);
        }
    }
    out
}

/// The devices of the IPv6 default routes (destination `::/0`) in the
/// text of `/proc/net/ipv6_route`, without loopback (where the kernel
/// keeps its unreachable defaults).
pub fn parse_default_routes_v6(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Destination, its prefix length, source, its prefix length,
            // next hop, metric, refcount, use, flags, device.
            (fields.len() == 10
                && fields[0].bytes().all(|b| b == b'0')
                && fields[1] == "00"
                && fields[9] != "lo")
                .then(|| fields[9].to_owned())
        })
        .collect();
    out.dedup();
    out
}

/// The devices of the default routes (destination and mask 0) in the text
/// of `/proc/net/route`.
pub fn parse_default_routes(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            (fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000")
                .then(|| fields[0].to_owned())
        })
        .collect();
    out.dedup();
    out
}

/// What auto-detection found: the external devices and the SNAT addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DetectedDevices {
    /// The external devices, sorted.
    pub external: Vec<String>,
    /// The address to SNAT to: the Node's first IPv4 InternalIP held by
    /// this node, else the first address of the default route's device,
    /// else the first address of an external device.
    pub snat_ipv4: Option<Ipv4Addr>,
    /// The IPv6 address to SNAT to, found the same way among IPv6
    /// addresses (never link-local).
    pub snat_ipv6: Option<Ipv6Addr>,
}

/// The external devices: those holding one of `node_ips` (the Node's
/// InternalIPs first, then its ExternalIPs) and those of `default_routes`,
/// never loopback; and the SNAT address (see [`DetectedDevices`]).
pub fn detect_devices(
    local: &[(String, IpAddr)],
    node_ips: &[IpAddr],
    default_routes: &[String],
) -> DetectedDevices {
    let holding = |ip: &IpAddr| {
        local
            .iter()
            .find(|(_, addr)| addr == ip && is_node_address(addr))
    };
    let mut external: Vec<String> = node_ips
        .iter()
        .filter_map(holding)
        .map(|(device, _)| device.clone())
        .chain(default_routes.iter().filter(|d| *d != "lo").cloned())
        .collect();
    external.sort();
    external.dedup();
    // The first node address of `family` (IPv4: true) by the order above.
    let snat = |ipv4: bool| {
        let first_of = |device: &String| {
            local
                .iter()
                .find(|(d, addr)| d == device && addr.is_ipv4() == ipv4 && is_node_address(addr))
                .map(|(_, addr)| *addr)
        };
        node_ips
            .iter()
            .filter(|ip| ip.is_ipv4() == ipv4)
            .filter_map(holding)
            .map(|(_, addr)| *addr)
            .next()
            .or_else(|| default_routes.iter().find_map(first_of))
            .or_else(|| external.iter().find_map(first_of))
    };
    let snat_ipv4 = match snat(true) {
        Some(IpAddr::V4(v4)) => Some(v4),
        _ => None,
    };
    let snat_ipv6 = match snat(false) {
        Some(IpAddr::V6(v6)) => Some(v6),
        _ => None,
    };
    DetectedDevices {
        external,
        snat_ipv4,
        snat_ipv6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_are_read_from_proc_net_route() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    eth1\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        assert_eq!(parse_default_routes(text), ["eth0", "eth1"]);
        assert!(parse_default_routes("Iface\n").is_empty());
    }

    #[test]
    fn devices_of_the_node_addresses_and_the_default_route_are_external() {
        let found = detect_devices(
            &local(),
            &["10.0.0.1".parse().unwrap(), "192.0.2.9".parse().unwrap()],
            &["ext0".into()],
        );
        assert_eq!(found.external, ["ext0", "node0"]);
        // The InternalIP is the SNAT address.
        assert_eq!(found.snat_ipv4, Some(Ipv4Addr::new(10, 0, 0, 1)));
        // Without a Node: the default route's device and its address.
        let found = detect_devices(&local(), &[], &["ext0".into()]);
        assert_eq!(found.external, ["ext0"]);
        assert_eq!(found.snat_ipv4, Some(Ipv4Addr::new(10, 99, 0, 1)));
        // Nothing at all: nothing, never loopback.
        let found = detect_devices(
            &local(),
            &["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
            &["lo".into()],
        );
        assert_eq!(found, DetectedDevices::default());
    }

    #[test]
    fn the_ipv6_snat_address_is_found_like_the_ipv4_one_never_link_local() {
        // The Node's IPv6 InternalIP, whatever the order of families.
        let found = detect_devices(
            &local(),
            &[
                "fd00:99::1".parse().unwrap(),
                "10.0.0.1".parse().unwrap(),
                "fd00::1".parse().unwrap(),
            ],
            &[],
        );
        assert_eq!(found.snat_ipv4, Some(Ipv4Addr::new(10, 0, 0, 1)));
        // fd00:99::1 is held by no device: the next one.
        assert_eq!(found.snat_ipv6, Some("fd00::1".parse().unwrap()));
        assert_eq!(found.external, ["node0"]);
        // Without a Node: the default route device's first global IPv6
        // address (its link-local one comes first and is passed over).
        let found = detect_devices(&local(), &[], &["ext0".into()]);
        assert_eq!(found.snat_ipv6, Some("2001:db8:99::1".parse().unwrap()));
        // A device with only a link-local IPv6 address: no IPv6 SNAT.
        let found = detect_devices(&local(), &[], &["lxc0".into()]);
        assert_eq!(found.snat_ipv4, Some(Ipv4Addr::new(10, 201, 0, 1)));
        assert_eq!(found.snat_ipv6, None);
    }

    #[test]
    fn ipv6_default_routes_are_read_from_proc_net_ipv6_route() {
        let text = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n\
                    20010db8000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
                    00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n";
        assert_eq!(parse_default_routes_v6(text), ["eth0"]);
        assert!(parse_default_routes_v6("").is_empty());
    }

    fn local() -> Vec<(String, IpAddr)> {
        [
            ("lo", "127.0.0.1"),
            ("lo", "::1"),
            ("ext0", "10.99.0.1"),
            ("ext0", "fe80::1"),
            ("ext0", "2001:db8:99::1"),
            ("node0", "10.0.0.1"),
            ("node0", "fd00::1"),
            ("lxc0", "10.201.0.1"),
            ("lxc0", "fe80::2"),
        ]
        .into_iter()
        .map(|(device, addr)| (device.to_owned(), addr.parse().unwrap()))
        .collect()
    }

    #[test]
    fn default_is_the_external_devices_addresses_without_loopback_or_link_local() {
        let addrs = nodeport_addresses(&local(), &["ext0".into(), "lo".into()], &[]);
        assert_eq!(
            addrs,
            [
                IpAddr::from([10, 99, 0, 1]),
                "2001:db8:99::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn cidrs_select_any_local_address_loopback_only_when_asked() {
        let addrs = nodeport_addresses(&local(), &[], &["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(addrs.len(), 3);
        let addrs = nodeport_addresses(&local(), &[], &["127.0.0.0/8".parse().unwrap()]);
        assert_eq!(addrs, [IpAddr::from([127, 0, 0, 1])]);
    }

    #[test]
    fn ipv6_cidrs_select_ipv6_addresses_link_local_only_when_asked() {
        let cidr = |text: &str| -> IpNet { text.parse().unwrap() };
        let addrs = nodeport_addresses(&local(), &[], &[cidr("fd00::/8")]);
        assert_eq!(addrs, ["fd00::1".parse::<IpAddr>().unwrap()]);
        let addrs = nodeport_addresses(
            &local(),
            &[],
            &[cidr("10.99.0.0/16"), cidr("2001:db8::/32")],
        );
        assert_eq!(
            addrs,
            [
                IpAddr::from([10, 99, 0, 1]),
                "2001:db8:99::1".parse().unwrap()
            ]
        );
        let addrs = nodeport_addresses(&local(), &[], &[cidr("fe80::/10")]);
        assert_eq!(addrs.len(), 2);
    }
}
