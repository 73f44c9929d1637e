//! The node's own addresses: which of them serve NodePorts, and, when no
//! `--external-device` is named, which devices are external (as Cilium
//! auto-detects them: the devices holding the Node's InternalIP and
//! ExternalIP addresses, and the device of the default route).

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

use crate::error::Context as _;

/// Every IPv4 address of this network namespace, with its device.
pub fn local_ipv4_addresses() -> crate::Result<Vec<(String, Ipv4Addr)>> {
    let mut out = Vec::new();
    for interface in nix::ifaddrs::getifaddrs().context("listing the node's addresses")? {
        if let Some(addr) = interface.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            out.push((interface.interface_name.clone(), addr.ip()));
        }
    }
    Ok(out)
}

/// The addresses NodePorts are served on: with CIDRs (kube-proxy's
/// `--nodeport-addresses`), every local address inside one of them; without,
/// the addresses of the external devices. Loopback only when a CIDR asks.
pub fn nodeport_addresses(
    local: &[(String, Ipv4Addr)],
    external_devices: &[String],
    cidrs: &[IpNet],
) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = local
        .iter()
        .filter(|(device, addr)| {
            if cidrs.is_empty() {
                external_devices.contains(device) && !addr.is_loopback()
            } else {
                cidrs.iter().any(|cidr| cidr.contains(&IpAddr::V4(*addr)))
            }
        })
        .map(|(_, addr)| IpAddr::V4(*addr))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The devices of the IPv4 default routes in `/proc/net/route`.
pub fn default_route_devices() -> Vec<String> {
    std::fs::read_to_string("/proc/net/route")
        .map(|text| parse_default_routes(&text))
        .unwrap_or_default()
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

/// What auto-detection found: the external devices and the SNAT address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DetectedDevices {
    /// The external devices, sorted.
    pub external: Vec<String>,
    /// The address to SNAT to: the Node's first IPv4 InternalIP held by
    /// this node, else the first address of the default route's device,
    /// else the first address of an external device.
    pub snat_ipv4: Option<Ipv4Addr>,
}

/// The external devices: those holding one of `node_ips` (the Node's
/// InternalIPs first, then its ExternalIPs) and those of `default_routes`,
/// never loopback; and the SNAT address (see [`DetectedDevices`]).
pub fn detect_devices(
    local: &[(String, Ipv4Addr)],
    node_ips: &[IpAddr],
    default_routes: &[String],
) -> DetectedDevices {
    let holding = |ip: &IpAddr| {
        local
            .iter()
            .find(|(_, addr)| IpAddr::V4(*addr) == *ip && !addr.is_loopback())
    };
    let mut external: Vec<String> = node_ips
        .iter()
        .filter_map(holding)
        .map(|(device, _)| device.clone())
        .chain(default_routes.iter().filter(|d| *d != "lo").cloned())
        .collect();
    external.sort();
    external.dedup();
    let first_of = |device: &String| {
        local
            .iter()
            .find(|(d, addr)| d == device && !addr.is_loopback())
            .map(|(_, addr)| *addr)
    };
    let snat_ipv4 = node_ips
        .iter()
        .filter_map(holding)
        .map(|(_, addr)| *addr)
        .next()
        .or_else(|| default_routes.iter().find_map(first_of))
        .or_else(|| external.iter().find_map(first_of));
    DetectedDevices {
        external,
        snat_ipv4,
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
        let found = detect_devices(&local(), &["127.0.0.1".parse().unwrap()], &["lo".into()]);
        assert_eq!(found, DetectedDevices::default());
    }

    fn local() -> Vec<(String, Ipv4Addr)> {
        vec![
            ("lo".into(), Ipv4Addr::LOCALHOST),
            ("ext0".into(), Ipv4Addr::new(10, 99, 0, 1)),
            ("node0".into(), Ipv4Addr::new(10, 0, 0, 1)),
            ("lxc0".into(), Ipv4Addr::new(10, 201, 0, 1)),
        ]
    }

    #[test]
    fn default_is_the_external_devices_addresses_without_loopback() {
        let addrs = nodeport_addresses(&local(), &["ext0".into(), "lo".into()], &[]);
        assert_eq!(addrs, [IpAddr::from([10, 99, 0, 1])]);
    }

    #[test]
    fn cidrs_select_any_local_address_loopback_only_when_asked() {
        let addrs = nodeport_addresses(&local(), &[], &["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(addrs.len(), 3);
        let addrs = nodeport_addresses(&local(), &[], &["127.0.0.0/8".parse().unwrap()]);
        assert_eq!(addrs, [IpAddr::from([127, 0, 0, 1])]);
    }
}
