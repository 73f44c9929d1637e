//! The baselines: a [`ServiceSet`] programmed the way kube-proxy programs
//! it, in its iptables mode (`iptables-restore` input: `KUBE-SERVICES` with
//! one rule per Service port jumping to `KUBE-SVC-<hash>`, which picks a
//! `KUBE-SEP-<hash>` with `statistic --mode random` and DNATs there) and its
//! nftables mode (`nft -f` input: table `ip kube-proxy`, a `service-ips`
//! verdict map, `numgen random` over `endpoint-*` chains doing `dnat to`).
//!
//! Written after kube-proxy's own rule layout (pkg/proxy/iptables and
//! pkg/proxy/nftables of kubernetes/kubernetes), for ClusterIP Services
//! with the cluster CIDR known (so off-cluster sources are masqueraded),
//! without NodePorts, external IPs, LoadBalancers or session affinity,
//! which the bench does not use. Chain names have kube-proxy's shape (a
//! 16- or 8-character base32 hash of the same strings); the hash function
//! differs, which changes nothing in how the kernel walks the rules.

use std::{
    collections::hash_map::DefaultHasher,
    fmt::Write as _,
    hash::{Hash, Hasher},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::services::{CLUSTER_CIDR, NAMESPACE, PORT_NAME, SERVICE_PORT, ServiceSet, TARGET_PORT};
use crate::netns::{NetNs, enter_on_spawn};

/// kube-proxy's masquerade mark (`--masquerade-bit 14`).
const MASQ_MARK: &str = "0x4000";
/// Above this many endpoints kube-proxy's iptables mode leaves the
/// per-endpoint comments out ("large cluster mode").
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// One of kube-proxy's netfilter modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KubeProxyMode {
    /// `--proxy-mode iptables`, loaded with `iptables-restore`.
    Iptables,
    /// `--proxy-mode nftables`, loaded with `nft -f`.
    Nftables,
}

impl KubeProxyMode {
    /// Both modes.
    pub const ALL: [KubeProxyMode; 2] = [KubeProxyMode::Iptables, KubeProxyMode::Nftables];

    /// Short name, used as the baseline's name in the results.
    pub fn name(self) -> &'static str {
        match self {
            KubeProxyMode::Iptables => "iptables",
            KubeProxyMode::Nftables => "nftables",
        }
    }

    /// The tool that loads the rules.
    pub fn tool(self) -> &'static str {
        match self {
            KubeProxyMode::Iptables => "iptables-restore",
            KubeProxyMode::Nftables => "nft -f",
        }
    }

    /// The rules kube-proxy would write for `set` on its first sync, as
    /// the tool's input.
    pub fn rules(self, set: &ServiceSet) -> String {
        match self {
            KubeProxyMode::Iptables => iptables_rules(set, &Sync::Full),
            KubeProxyMode::Nftables => nftables_rules(set, &Sync::Full),
        }
    }

    /// What kube-proxy writes when only Service `service` changed (its
    /// endpoints are now those of `set`; `stale` are the endpoints it lost):
    /// a partial sync, as kube-proxy does since it minimizes its writes.
    pub fn change_rules(self, set: &ServiceSet, service: u32, stale: &[Ipv4Addr]) -> String {
        let sync = Sync::Changed { service, stale };
        match self {
            KubeProxyMode::Iptables => iptables_rules(set, &sync),
            KubeProxyMode::Nftables => nftables_rules(set, &sync),
        }
    }

    /// The command that loads `file`: `nft -f`, or `iptables-restore` as
    /// kube-proxy runs it (`--noflush`, so rules of others stay), except
    /// for the first load into an empty namespace (`first`), which flushes
    /// instead: the result is the same, and iptables-nft 1.8's `--noflush`
    /// takes time growing faster than the square of the chain count (6 s
    /// at 1k Services, 48 s at 2k here), which would make kube-proxy's
    /// first sync at 10k Services last hours.
    fn load_command(self, file: &Path, first: bool) -> Command {
        let mut command = match self {
            KubeProxyMode::Iptables => {
                let mut c = Command::new("iptables-restore");
                if !first {
                    c.arg("--noflush");
                }
                c.arg("--counters");
                c
            }
            KubeProxyMode::Nftables => {
                let mut c = Command::new("nft");
                c.arg("-f");
                c
            }
        };
        command.arg(file);
        command
    }

    /// The command that removes every rule the mode loaded.
    fn cleanup_command(self) -> Command {
        match self {
            KubeProxyMode::Iptables => {
                // Without --noflush, iptables-restore flushes the tables it is
                // given and deletes their user chains.
                let mut c = Command::new("sh");
                c.args([
                    "-c",
                    "printf '*nat\\nCOMMIT\\n*filter\\nCOMMIT\\n' | iptables-restore",
                ]);
                c
            }
            KubeProxyMode::Nftables => {
                let mut c = Command::new("nft");
                c.args(["delete", "table", "ip", "kube-proxy"]);
                c
            }
        }
    }
}

/// kube-proxy's rules loaded in a namespace; removed again on drop.
pub struct LoadedRules {
    mode: KubeProxyMode,
    netns: PathBuf,
}

impl LoadedRules {
    /// Writes `rules` (from [`KubeProxyMode::rules`]) to a file in `dir`,
    /// loads it in `ns`, and returns the guard and how long the tool ran.
    pub fn load(
        ns: &NetNs,
        mode: KubeProxyMode,
        rules: &str,
        dir: &Path,
    ) -> anyhow::Result<(Self, Duration)> {
        let file = dir.join(format!("{}.rules", mode.name()));
        std::fs::write(&file, rules).with_context(|| format!("writing {}", file.display()))?;
        let guard = LoadedRules {
            mode,
            netns: ns.path(),
        };
        let took = guard.run(&file, true)?;
        Ok((guard, took))
    }

    /// Applies one more file of rules (a change, from
    /// [`KubeProxyMode::change_rules`]) and returns how long the tool ran.
    pub fn apply(&self, file: &Path) -> anyhow::Result<Duration> {
        self.run(file, false)
    }

    fn run(&self, file: &Path, first: bool) -> anyhow::Result<Duration> {
        let mut command = self.mode.load_command(file, first);
        enter_on_spawn(&self.netns, &mut command)?;
        let started = Instant::now();
        let output = command
            .output()
            .with_context(|| format!("running {}", self.mode.tool()))?;
        let took = started.elapsed();
        if !output.status.success() {
            bail!(
                "{} {} failed: {}",
                self.mode.tool(),
                file.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(took)
    }
}

impl Drop for LoadedRules {
    fn drop(&mut self) {
        let mut command = self.mode.cleanup_command();
        if enter_on_spawn(&self.netns, &mut command).is_ok() {
            let _ = command.output();
        }
    }
}

/// What one sync writes.
enum Sync<'a> {
    /// Everything (the first sync).
    Full,
    /// Only what Service `service` changed: in iptables mode the top-level
    /// chains (rewritten at every sync) and that Service's chains; in
    /// nftables mode that Service's chains. `stale` endpoint chains are
    /// deleted (iptables) or flushed for a later deletion (nftables).
    Changed { service: u32, stale: &'a [Ipv4Addr] },
}

impl Sync<'_> {
    /// Whether Service `i`'s own chains are written.
    fn writes(&self, i: u32) -> bool {
        match self {
            Sync::Full => true,
            Sync::Changed { service, .. } => *service == i,
        }
    }

    fn stale(&self) -> Option<(u32, &[Ipv4Addr])> {
        match self {
            Sync::Full => None,
            Sync::Changed { service, stale } => Some((*service, stale)),
        }
    }
}

/// kube-proxy's `ServicePortName` string, `namespace/name:port`.
fn service_port_name(i: u32) -> String {
    format!("{NAMESPACE}/{}:{PORT_NAME}", ServiceSet::name(i))
}

/// A base32 string of `len` characters hashing `text`, the shape of
/// kube-proxy's chain-name hashes.
fn hash_base32(text: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut bits: u128 = 0;
    for round in 0u8..2 {
        let mut hasher = DefaultHasher::new();
        (round, text).hash(&mut hasher);
        bits = (bits << 64) | u128::from(hasher.finish());
    }
    (0..len)
        .map(|k| ALPHABET[((bits >> (5 * k)) & 31) as usize] as char)
        .collect()
}

/// `KUBE-SVC-<hash>` of Service `i`.
fn iptables_service_chain(i: u32) -> String {
    format!(
        "KUBE-SVC-{}",
        hash_base32(&(service_port_name(i) + "tcp"), 16)
    )
}

/// `KUBE-SEP-<hash>` of one endpoint of Service `i`.
fn iptables_endpoint_chain(i: u32, endpoint: Ipv4Addr) -> String {
    let text = format!("{}tcp{endpoint}:{TARGET_PORT}", service_port_name(i));
    format!("KUBE-SEP-{}", hash_base32(&text, 16))
}

/// The `iptables-restore --noflush` input of kube-proxy's iptables mode
/// for `set`.
fn iptables_rules(set: &ServiceSet, sync: &Sync) -> String {
    let large_cluster = set.total_endpoints() > LARGE_CLUSTER_ENDPOINTS;
    let mut chains = String::new();
    let mut rules = String::new();
    // The filter table: kube-proxy's jump chains; with every Service
    // having endpoints they hold no per-Service rule.
    let mut out = String::from(
        "*filter\n:KUBE-NODEPORTS - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n",
    );
    for (hook, target, comment, new_only) in [
        (
            "INPUT",
            "KUBE-PROXY-FIREWALL",
            "kubernetes load balancer firewall",
            true,
        ),
        (
            "INPUT",
            "KUBE-NODEPORTS",
            "kubernetes health check service ports",
            false,
        ),
        (
            "INPUT",
            "KUBE-EXTERNAL-SERVICES",
            "kubernetes externally-visible service portals",
            true,
        ),
        (
            "FORWARD",
            "KUBE-PROXY-FIREWALL",
            "kubernetes load balancer firewall",
            true,
        ),
        (
            "FORWARD",
            "KUBE-FORWARD",
            "kubernetes forwarding rules",
            false,
        ),
        (
            "FORWARD",
            "KUBE-SERVICES",
            "kubernetes service portals",
            true,
        ),
        (
            "FORWARD",
            "KUBE-EXTERNAL-SERVICES",
            "kubernetes externally-visible service portals",
            true,
        ),
        (
            "OUTPUT",
            "KUBE-PROXY-FIREWALL",
            "kubernetes load balancer firewall",
            true,
        ),
        (
            "OUTPUT",
            "KUBE-SERVICES",
            "kubernetes service portals",
            true,
        ),
    ] {
        let state = if new_only {
            "-m conntrack --ctstate NEW "
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "-A {hook} {state}-m comment --comment \"{comment}\" -j {target}"
        );
    }
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\nCOMMIT"
    );

    out.push_str("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    let _ = writeln!(
        rules,
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"
    );
    for i in 0..set.count {
        let name = service_port_name(i);
        let vip = ServiceSet::cluster_ip(i);
        let svc_chain = iptables_service_chain(i);
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {vip} --dport {SERVICE_PORT} -j {svc_chain}"
        );
        if !sync.writes(i) {
            continue;
        }
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            rules,
            "-A {svc_chain} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {vip} --dport {SERVICE_PORT} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ"
        );
        let endpoints = set.endpoints(i);
        let n = endpoints.len();
        for (k, endpoint) in endpoints.iter().enumerate() {
            let sep_chain = iptables_endpoint_chain(i, *endpoint);
            let _ = writeln!(chains, ":{sep_chain} - [0:0]");
            let comment = if large_cluster {
                String::new()
            } else {
                format!("-m comment --comment \"{name} -> {endpoint}:{TARGET_PORT}\" ")
            };
            let statistic = if k + 1 < n {
                format!(
                    "-m statistic --mode random --probability {:.10} ",
                    1.0 / (n - k) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(rules, "-A {svc_chain} {comment}{statistic}-j {sep_chain}");
            let comment = if large_cluster {
                String::new()
            } else {
                format!("-m comment --comment {name} ")
            };
            let _ = writeln!(
                rules,
                "-A {sep_chain} {comment}-s {endpoint}/32 -j KUBE-MARK-MASQ\n-A {sep_chain} {comment}-m tcp -p tcp -j DNAT --to-destination {endpoint}:{TARGET_PORT}"
            );
        }
    }
    if let Some((i, stale)) = sync.stale() {
        for endpoint in stale {
            let sep_chain = iptables_endpoint_chain(i, *endpoint);
            let _ = writeln!(chains, ":{sep_chain} - [0:0]");
            let _ = writeln!(rules, "-X {sep_chain}");
        }
    }
    let _ = writeln!(
        rules,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT"
    );
    out.push_str(&chains);
    out.push_str(&rules);
    out
}

/// kube-proxy's nftables chain-name base, `HASH-namespace/name/tcp/port`.
fn nft_name_base(text: &str) -> String {
    format!("{}-{text}", hash_base32(text, 8))
}

/// `service-<base>` of Service `i`.
fn nft_service_chain(i: u32) -> String {
    let base = format!("{NAMESPACE}/{}/tcp/{PORT_NAME}", ServiceSet::name(i));
    format!("service-{}", nft_name_base(&base))
}

/// `endpoint-<base>` of one endpoint of Service `i`.
fn nft_endpoint_chain(i: u32, endpoint: Ipv4Addr) -> String {
    let base = format!(
        "{NAMESPACE}/{}/tcp/{PORT_NAME}__{endpoint}/{TARGET_PORT}",
        ServiceSet::name(i)
    );
    format!("endpoint-{}", nft_name_base(&base))
}

/// The `nft -f` input of kube-proxy's nftables mode for `set`: one
/// transaction, as kube-proxy sends it.
fn nftables_rules(set: &ServiceSet, sync: &Sync) -> String {
    let t = "ip kube-proxy";
    if let Some((i, stale)) = sync.stale() {
        let mut out = nftables_service(set, i, true);
        for endpoint in stale {
            let _ = writeln!(out, "flush chain {t} {}", nft_endpoint_chain(i, *endpoint));
        }
        return out;
    }
    let mut out = format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}\n");
    // Priorities as numbers: `dstnat` is -100 and `srcnat` 100; nft 1.0
    // only accepts the names on some hooks.
    for (chain, kind, hook, priority) in [
        ("filter-prerouting", "filter", "prerouting", -110),
        ("filter-input", "filter", "input", -110),
        ("filter-forward", "filter", "forward", -110),
        ("filter-output", "filter", "output", -110),
        ("nat-prerouting", "nat", "prerouting", -100),
        ("nat-output", "nat", "output", -100),
        ("nat-postrouting", "nat", "postrouting", 100),
    ] {
        let _ = writeln!(
            out,
            "add chain {t} {chain} {{ type {kind} hook {hook} priority {priority} ; }}"
        );
    }
    for chain in [
        "endpoints-check",
        "firewall-check",
        "services",
        "masquerading",
        "mark-for-masquerade",
        "reject-chain",
    ] {
        let _ = writeln!(out, "add chain {t} {chain}");
    }
    for (source, extra, target) in [
        ("filter-input", "ct state new ", "endpoints-check"),
        ("filter-forward", "ct state new ", "endpoints-check"),
        ("filter-output", "ct state new ", "endpoints-check"),
        ("filter-prerouting", "ct state new ", "firewall-check"),
        ("filter-output", "ct state new ", "firewall-check"),
        ("nat-output", "", "services"),
        ("nat-prerouting", "", "services"),
        ("nat-postrouting", "", "masquerading"),
    ] {
        let _ = writeln!(out, "add rule {t} {source} {extra}jump {target}");
    }
    let _ = writeln!(
        out,
        "add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}\nadd rule {t} masquerading mark and {MASQ_MARK} == 0 return\nadd rule {t} masquerading mark set mark xor {MASQ_MARK}\nadd rule {t} masquerading masquerade fully-random\nadd rule {t} reject-chain reject"
    );
    for (map, key) in [
        (
            "no-endpoint-services",
            "ipv4_addr . inet_proto . inet_service",
        ),
        ("no-endpoint-nodeports", "inet_proto . inet_service"),
        ("firewall-ips", "ipv4_addr . inet_proto . inet_service"),
        ("service-ips", "ipv4_addr . inet_proto . inet_service"),
        ("service-nodeports", "inet_proto . inet_service"),
    ] {
        let _ = writeln!(out, "add map {t} {map} {{ type {key} : verdict ; }}");
    }
    let _ = writeln!(
        out,
        "add rule {t} endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\nadd rule {t} endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports\nadd rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\nadd rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips\nadd rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
    );
    for i in 0..set.count {
        out.push_str(&nftables_service(set, i, false));
        let _ = writeln!(
            out,
            "add element {t} service-ips {{ {} . tcp . {SERVICE_PORT} : goto {} }}",
            ServiceSet::cluster_ip(i),
            nft_service_chain(i)
        );
    }
    out
}

/// Service `i`'s service and endpoint chains; with `flush`, emptied first
/// (a rewrite of chains that exist).
fn nftables_service(set: &ServiceSet, i: u32, flush: bool) -> String {
    let t = "ip kube-proxy";
    let mut out = String::new();
    let chain = |out: &mut String, name: &str| {
        let _ = writeln!(out, "add chain {t} {name}");
        if flush {
            let _ = writeln!(out, "flush chain {t} {name}");
        }
    };
    let vip = ServiceSet::cluster_ip(i);
    let svc_chain = nft_service_chain(i);
    let endpoints = set.endpoints(i);
    let endpoint_chains: Vec<String> = endpoints
        .iter()
        .map(|e| nft_endpoint_chain(i, *e))
        .collect();
    for (endpoint, name) in endpoints.iter().zip(&endpoint_chains) {
        chain(&mut out, name);
        let _ = writeln!(
            out,
            "add rule {t} {name} ip saddr {endpoint} jump mark-for-masquerade\nadd rule {t} {name} meta l4proto tcp dnat to {endpoint}:{TARGET_PORT}"
        );
    }
    let vmap: Vec<String> = endpoint_chains
        .iter()
        .enumerate()
        .map(|(k, name)| format!("{k} : goto {name}"))
        .collect();
    chain(&mut out, &svc_chain);
    let _ = writeln!(
        out,
        "add rule {t} {svc_chain} ip daddr {vip} tcp dport {SERVICE_PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\nadd rule {t} {svc_chain} numgen random mod {} vmap {{ {} }}",
        endpoints.len(),
        vmap.join(", ")
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_rules_follow_kube_proxy_layout() {
        let rules = KubeProxyMode::Iptables.rules(&ServiceSet::new(2, 3));
        let svc = iptables_service_chain(1);
        assert!(svc.starts_with("KUBE-SVC-") && svc.len() == 25, "{svc}");
        assert!(rules.contains(&format!(
            "-A KUBE-SERVICES -m comment --comment \"bench/svc-1:http cluster IP\" -m tcp -p tcp -d 10.96.0.2 --dport 80 -j {svc}\n"
        )));
        // Descending probabilities 1/3, 1/2, then the unconditional last one.
        let picks: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with(&format!("-A {svc} ")) && l.contains("KUBE-SEP-"))
            .collect();
        assert_eq!(picks.len(), 3);
        assert!(picks[0].contains("--probability 0.3333333333 "));
        assert!(picks[1].contains("--probability 0.5000000000 "));
        assert!(!picks[2].contains("statistic"));
        assert!(rules.contains("-j DNAT --to-destination 100.64.0.3:8080\n"));
        // The nodeports rule stays last in KUBE-SERVICES.
        let last = rules
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES "))
            .unwrap();
        assert!(last.contains("KUBE-NODEPORTS"));
    }

    #[test]
    fn nftables_rules_use_a_verdict_map_and_numgen() {
        let rules = KubeProxyMode::Nftables.rules(&ServiceSet::new(2, 2));
        let svc = nft_service_chain(0);
        assert!(svc.starts_with("service-") && svc.ends_with("-bench/svc-0/tcp/http"));
        assert!(rules.contains(&format!(
            "add element ip kube-proxy service-ips {{ 10.96.0.1 . tcp . 80 : goto {svc} }}"
        )));
        assert!(rules.contains(&format!(
            "add rule ip kube-proxy {svc} numgen random mod 2 vmap {{ 0 : goto {}, 1 : goto {} }}",
            nft_endpoint_chain(0, Ipv4Addr::new(100, 64, 0, 0)),
            nft_endpoint_chain(0, Ipv4Addr::new(100, 64, 0, 1)),
        )));
        assert!(rules.contains("meta l4proto tcp dnat to 100.64.0.3:8080\n"));
    }

    #[test]
    fn large_clusters_drop_the_endpoint_comments() {
        let small = KubeProxyMode::Iptables.rules(&ServiceSet::new(10, 10));
        let large = KubeProxyMode::Iptables.rules(&ServiceSet::new(101, 10));
        assert!(small.contains("-> 100.64.0.0:8080"));
        assert!(!large.contains("-> 100.64.0.0:8080"));
    }

    #[test]
    fn a_change_rewrites_the_top_chains_and_one_service() {
        let before = ServiceSet::new(3, 2);
        let lost = before.endpoints(1)[0];
        let after = before
            .clone()
            .with_endpoints(1, before.endpoints(1)[1..].to_vec());
        let iptables = KubeProxyMode::Iptables.change_rules(&after, 1, &[lost]);
        assert_eq!(
            iptables
                .lines()
                .filter(|l| l.starts_with("-A KUBE-SERVICES "))
                .count(),
            4,
            "every Service rule and the nodeports rule"
        );
        assert!(iptables.contains(&format!(":{} - [0:0]", iptables_service_chain(1))));
        assert!(!iptables.contains(&format!(":{} - [0:0]", iptables_service_chain(0))));
        assert!(iptables.contains(&format!("-X {}", iptables_endpoint_chain(1, lost))));

        let nft = KubeProxyMode::Nftables.change_rules(&after, 1, &[lost]);
        assert!(nft.contains(&format!(
            "flush chain ip kube-proxy {}",
            nft_service_chain(1)
        )));
        assert!(nft.contains("numgen random mod 1 vmap"));
        assert!(nft.contains(&format!(
            "flush chain ip kube-proxy {}",
            nft_endpoint_chain(1, lost)
        )));
        assert!(!nft.contains(&nft_service_chain(0)));
    }
}
