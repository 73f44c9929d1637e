//! `service-agent list`: every frontend with its backends and counters, read
//! from the live pinned maps (not from the agent's memory), as a table or
//! as JSON.

use std::path::Path;

use aya::maps::{MapData, PerCpuArray};
use serde::Serialize;
use service_common::{
    BACKEND_FLAG_NODE_LOCAL, BACKEND_STATE_NOT_SERVING, BACKEND_STATE_TERMINATING, BackendId,
    BackendValue, FRONTEND_FLAG_AFFINITY, FRONTEND_FLAG_CLUSTER_IP, FRONTEND_FLAG_EXTERNAL_IP,
    FRONTEND_FLAG_EXTERNAL_LOCAL, FRONTEND_FLAG_LOAD_BALANCER, FRONTEND_FLAG_LOCAL_ONLY,
    FRONTEND_FLAG_NODE_PORT, FRONTEND_FLAG_SOURCE_RANGES, FRONTEND_FLAG_TERMINATING_FALLBACK,
    FrontendKey, FrontendStats, MAP_FRONTEND_STATS, SCOPE_INTERNAL, SOURCE_RANGE_ID_BITS,
};

use super::status::{self, ServiceState, ServiceStatus};
use crate::datapath::{
    maps::{ServiceMaps, datapath_counters, open_pinned, sum_stats},
    model::{MapReader as _, MapState, frontend_label, ip_from_map, proto_name},
};

/// Everything `list` shows.
#[derive(Debug, Serialize)]
pub struct Listing {
    /// Frontends, sorted by address, port and protocol.
    pub frontends: Vec<ListedFrontend>,
    /// Services that program nothing (headless, ExternalName, not served)
    /// or whose writes failed (a full map),
    /// from the agent's status file.
    pub not_programmed: Vec<ServiceStatus>,
    /// Fields set to something the agent does not serve (an SCTP port, an
    /// IPv6 address): the Service (`namespace/name`) and the field, one
    /// line each, from the agent's status file.
    pub unsupported: Vec<(String, String)>,
    /// Health-check node ports served: the Service and the port.
    pub health_check_ports: Vec<(String, u16)>,
    /// Datapath event counters (drops and translations), by name.
    pub counters: Vec<(String, u64)>,
}

/// One frontend.
#[derive(Debug, Serialize)]
pub struct ListedFrontend {
    /// The Service (`namespace/name`), from the agent's status file; empty
    /// when unknown.
    pub service: String,
    /// Frontend address.
    pub address: String,
    /// Frontend port.
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// Kinds and options, e.g. `ClusterIP`; `InCluster` for the in-cluster
    /// entry of an `externalTrafficPolicy: Local` frontend (the Service's
    /// cluster-wide backends, for pods and the node).
    pub flags: Vec<&'static str>,
    /// Reverse-NAT id (also the stats index).
    pub rev_nat_id: u32,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0: no affinity.
    pub affinity_timeout_secs: u32,
    /// `loadBalancerSourceRanges` the datapath admits (CIDRs); empty:
    /// every client.
    pub source_ranges: Vec<String>,
    /// Backends in slot order.
    pub backends: Vec<ListedBackend>,
    /// Packets and flows translated, summed over CPUs.
    pub stats: ListedStats,
}

/// One backend of a frontend.
#[derive(Debug, Serialize)]
pub struct ListedBackend {
    /// Backend id.
    pub id: u32,
    /// Backend address.
    pub address: String,
    /// Backend port.
    pub port: u16,
    /// `active`, `terminating` (the serving fallback) or `not-serving`.
    pub state: &'static str,
    /// Runs on this node.
    pub node_local: bool,
}

/// A frontend's counters.
#[derive(Debug, Default, Serialize)]
pub struct ListedStats {
    /// Packets sent to a backend.
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
    /// Flows that picked a backend.
    pub new_flows: u64,
}

impl From<FrontendStats> for ListedStats {
    fn from(s: FrontendStats) -> Self {
        ListedStats {
            packets: s.packets,
            bytes: s.bytes,
            new_flows: s.new_flows,
        }
    }
}

/// Reads the pinned maps under `pin_path` into a [`Listing`].
pub fn read_listing(pin_path: &Path) -> crate::Result<Listing> {
    let maps = ServiceMaps::open_pinned(pin_path)?;
    let state = maps.read_state()?;
    let stats: PerCpuArray<MapData, FrontendStats> =
        PerCpuArray::try_from(open_pinned(pin_path, MAP_FRONTEND_STATS)?)?;
    let statuses = status::read(pin_path).unwrap_or_default();
    let owners: std::collections::BTreeMap<&str, &str> = statuses
        .iter()
        .flat_map(|s| s.frontends.iter().map(|f| (f.as_str(), s.service.as_str())))
        .collect();
    let mut frontends = Vec::new();
    for (key, header) in state.frontends.iter().filter(|(k, _)| k.slot == 0) {
        let stats = sum_stats(&stats, header.rev_nat_id).unwrap_or_default();
        let label = frontend_label(
            ip_from_map(&key.addr, key.family),
            u16::from_be(key.port),
            key.proto,
        );
        frontends.push(ListedFrontend {
            service: owners
                .get(label.as_str())
                .map(|s| (*s).to_owned())
                .unwrap_or_default(),
            address: ip_from_map(&key.addr, key.family).to_string(),
            port: u16::from_be(key.port),
            protocol: proto_name(key.proto),
            flags: {
                let mut flags = flag_names(header.flags);
                if key.scope == SCOPE_INTERNAL {
                    flags.push("InCluster");
                }
                flags
            },
            rev_nat_id: header.rev_nat_id,
            affinity_timeout_secs: header.affinity_timeout_secs,
            source_ranges: source_ranges(&state, header.rev_nat_id, key.family),
            backends: listed_backends(&state, key, header.count),
            stats: stats.into(),
        });
    }
    frontends.sort_by(|a, b| {
        (
            a.address.parse::<std::net::IpAddr>().ok(),
            a.port,
            &a.protocol,
        )
            .cmp(&(b.address.parse().ok(), b.port, &b.protocol))
    });
    let counters = datapath_counters(pin_path)?
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    let unsupported = statuses
        .iter()
        .flat_map(|s| {
            s.unsupported
                .iter()
                .map(|line| (s.service.clone(), line.clone()))
        })
        .collect();
    let health_check_ports = statuses
        .iter()
        .filter_map(|s| Some((s.service.clone(), s.health_check_node_port?)))
        .collect();
    Ok(Listing {
        frontends,
        unsupported,
        health_check_ports,
        not_programmed: statuses
            .into_iter()
            .filter(|s| s.state != ServiceState::Programmed)
            .collect(),
        counters,
    })
}

fn listed_backends(state: &MapState, header: &FrontendKey, count: u16) -> Vec<ListedBackend> {
    (1..=count)
        .filter_map(|slot| state.frontends.get(&FrontendKey { slot, ..*header }))
        .filter_map(|slot| {
            let backend = state.backends.get(&slot.backend_id)?;
            Some(listed_backend(slot.backend_id, backend))
        })
        .collect()
}

/// The backend `id` as listed.
pub fn listed_backend(id: BackendId, backend: &BackendValue) -> ListedBackend {
    ListedBackend {
        id,
        address: ip_from_map(&backend.addr, backend.family).to_string(),
        port: u16::from_be(backend.port),
        state: match backend.state {
            BACKEND_STATE_TERMINATING => "terminating",
            BACKEND_STATE_NOT_SERVING => "not-serving",
            _ => "active",
        },
        node_local: backend.flags & BACKEND_FLAG_NODE_LOCAL != 0,
    }
}

/// The source ranges of the frontend with rev-NAT id `rev_nat_id`, as
/// CIDRs, by address.
fn source_ranges(state: &MapState, rev_nat_id: u32, family: u8) -> Vec<String> {
    let mut ranges: Vec<_> = state
        .source_ranges
        .iter()
        .filter(|range| range.data.rev_nat_id() == rev_nat_id)
        .collect();
    ranges.sort_by_key(|range| (range.data.addr, range.prefix_len));
    ranges
        .into_iter()
        .map(|range| {
            let len = range.prefix_len.saturating_sub(SOURCE_RANGE_ID_BITS);
            format!("{}/{len}", ip_from_map(&range.data.addr, family))
        })
        .collect()
}

/// The names of a frontend header's `FRONTEND_FLAG_*` bits.
pub fn flag_names(flags: u16) -> Vec<&'static str> {
    [
        (FRONTEND_FLAG_CLUSTER_IP, "ClusterIP"),
        (FRONTEND_FLAG_NODE_PORT, "NodePort"),
        (FRONTEND_FLAG_EXTERNAL_IP, "ExternalIP"),
        (FRONTEND_FLAG_LOAD_BALANCER, "LoadBalancer"),
        (FRONTEND_FLAG_LOCAL_ONLY, "LocalOnly"),
        (FRONTEND_FLAG_TERMINATING_FALLBACK, "TerminatingFallback"),
        (FRONTEND_FLAG_AFFINITY, "Affinity"),
        (FRONTEND_FLAG_EXTERNAL_LOCAL, "ExternalLocal"),
        (FRONTEND_FLAG_SOURCE_RANGES, "SourceRanges"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

/// `address:port`, or `[address]:port` for an IPv6 address.
pub(crate) fn with_port(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

/// Renders a listing as the human-readable table.
pub fn render_table(listing: &Listing) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<24} {:<5} {:<20} {:<12} {:>9} {:>9}  BACKENDS\n",
        "FRONTEND", "PROTO", "SERVICE", "KIND", "FLOWS", "PACKETS"
    ));
    for f in &listing.frontends {
        let backends = if f.backends.is_empty() {
            "(none: new flows dropped)".to_owned()
        } else {
            f.backends
                .iter()
                .map(|b| {
                    let mut s = with_port(&b.address, b.port);
                    if b.state != "active" {
                        s.push_str(&format!(" ({})", b.state));
                    }
                    s
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "{:<24} {:<5} {:<20} {:<12} {:>9} {:>9}  {}\n",
            with_port(&f.address, f.port),
            f.protocol,
            if f.service.is_empty() {
                "?"
            } else {
                &f.service
            },
            f.flags.join(","),
            f.stats.new_flows,
            f.stats.packets,
            backends
        ));
    }
    for s in &listing.not_programmed {
        let note = if s.state == ServiceState::WriteFailed {
            s.problems.last().map_or("", String::as_str)
        } else {
            "(programs nothing)"
        };
        out.push_str(&format!(
            "{:<24} {:<5} {:<20} {} {note}\n",
            "-",
            "-",
            s.service,
            s.state.as_str()
        ));
    }
    for (service, port) in &listing.health_check_ports {
        out.push_str(&format!(
            "health-check node port {port}: {service} (externalTrafficPolicy: Local)\n"
        ));
    }
    for (service, line) in &listing.unsupported {
        out.push_str(&format!("not supported: {service}: {line}\n"));
    }
    let counters: Vec<String> = listing
        .counters
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    out.push_str(&format!("datapath counters: {}\n", counters.join(" ")));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_are_bracketed_before_their_port() {
        assert_eq!(with_port("10.96.0.10", 80), "10.96.0.10:80");
        assert_eq!(with_port("fd00::1", 80), "[fd00::1]:80");
    }
}
