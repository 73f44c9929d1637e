//! The node's own addresses: which of them serve NodePorts.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::Context as _;
use ipnet::IpNet;

/// Every IPv4 address of this network namespace, with its device.
pub fn local_ipv4_addresses() -> anyhow::Result<Vec<(String, Ipv4Addr)>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
