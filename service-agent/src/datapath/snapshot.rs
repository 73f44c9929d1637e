//! A private copy of what one packet can read in the live pinned maps, for
//! `service-agent trace`: a second instance of the embedded object, loaded
//! with maps of its own (pinned in a private folder that is removed as soon
//! as the object is loaded), filled from the live maps by each map's
//! [`TraceCopy`] rule of the shared table, then run with BPF_PROG_TEST_RUN.
//! The live maps are only ever read (syscall lookups do not even touch an
//! LRU entry's recently-used bit), so tracing changes nothing a real packet
//! would see.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapData, MapError, MapInfo, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{Program, TestRun as _, TestRunOptions},
};
use service_common::{
    AffinityKey, AffinityValue, MAP_AFFINITY, MAP_SOURCE_RANGES, SOURCE_RANGE_ALLOW,
    SourceRangeKey, SourceRangePrefix, SourceRangeValue,
};
use service_common::{
    BACKEND_FLAG_NODE_LOCAL, BackendId, BackendValue, CT_DIR_FORWARD, CT_DIR_HAIRPIN_REPLY,
    CT_DIR_REPLY, CT_DIR_SNAT, CT_DIR_SNAT_REPLY, ConntrackKey, ConntrackValue, DatapathConfig,
    FAMILY_IPV6, FRONTEND_FLAGS_EXTERNAL, FragmentKey, FragmentValue, FrontendKey, FrontendValue,
    MAP_BACKENDS, MAP_CONFIG, MAP_CONNTRACK, MAP_COUNTERS, MAP_FRAGMENTS, MAP_FRONTENDS,
    MAP_REVNAT, MAPS, MapAddr, MapSpec, REVNAT_MAX_ENTRIES, RevNatId, RevNatValue, SCOPE_ALL,
    SCOPE_INTERNAL, TraceCopy, map_addr_v4, master_key, reply_key, snat_key, snat_reply_key,
};

use super::{
    MapSizes, bpffs,
    load::{load_with_sizes, map_type},
    maps::{open_pinned, sum_counters},
    model::map_addr,
};
use crate::error::{Context as _, Error};

/// Every conntrack direction, in the order entries are shown.
pub const CT_DIRECTIONS: [u8; 5] = [
    CT_DIR_FORWARD,
    CT_DIR_REPLY,
    CT_DIR_HAIRPIN_REPLY,
    CT_DIR_SNAT,
    CT_DIR_SNAT_REPLY,
];

/// Room left in the output buffer of a test run beyond the input's length,
/// for programs that grow the packet (an ICMP error quoting a datagram).
const OUTPUT_HEADROOM: usize = 256;

/// The IPv4 or IPv6 packet a snapshot is taken for, as the first hook
/// sees it (both addresses of one family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketTuple {
    /// Source address.
    pub saddr: IpAddr,
    /// Source port, host byte order.
    pub sport: u16,
    /// Destination address.
    pub daddr: IpAddr,
    /// Destination port, host byte order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// The IPv4 identification the packet carries, host byte order (0
    /// for IPv6).
    pub ip_id: u16,
}

impl PacketTuple {
    /// The packet's family tag (`FAMILY_IPV4` or `FAMILY_IPV6`).
    pub fn family(&self) -> u8 {
        map_addr(self.saddr).1
    }

    /// The packet's conntrack key in `direction`.
    pub fn ct_key(&self, direction: u8) -> ConntrackKey {
        ConntrackKey::new(
            map_addr(self.saddr).0,
            self.sport.to_be(),
            map_addr(self.daddr).0,
            self.dport.to_be(),
            self.family(),
            self.proto,
            direction,
        )
    }

    /// The header key of the packet's destination as a frontend in `scope`.
    pub fn frontend_key(&self, scope: u8) -> FrontendKey {
        let (daddr, family) = map_addr(self.daddr);
        FrontendKey::header(daddr, family, self.dport.to_be(), self.proto, scope)
    }

    /// The key of the packet's datagram in the fragments map; `None` for
    /// IPv6: a traced packet is a whole datagram, and an IPv6 one has no
    /// identification without a fragment header.
    pub fn fragment_key(&self) -> Option<FragmentKey> {
        let (IpAddr::V4(saddr), IpAddr::V4(daddr)) = (self.saddr, self.daddr) else {
            return None;
        };
        // The map holds the identification's wire bytes read as a native u16.
        Some(FragmentKey::v4(
            saddr.octets(),
            daddr.octets(),
            u16::from_ne_bytes(self.ip_id.to_be_bytes()),
            self.proto,
        ))
    }
}

/// The node's SNAT address of `family` in the datapath's configuration.
fn node_snat_addr(config: &DatapathConfig, family: u8) -> MapAddr {
    if family == FAMILY_IPV6 {
        config.snat_v6
    } else {
        map_addr_v4(config.snat_v4)
    }
}

/// What was copied from the live maps: the snapshot's state before any
/// program ran.
#[derive(Clone, Debug, Default)]
pub struct Copied {
    /// The datapath configuration.
    pub config: DatapathConfig,
    /// Headers and slots of the destination frontend.
    pub frontends: BTreeMap<FrontendKey, FrontendValue>,
    /// Backends named by the slots and flows.
    pub backends: BTreeMap<BackendId, BackendValue>,
    /// Rev-NAT entries of the frontend and flows.
    pub revnat: BTreeMap<RevNatId, RevNatValue>,
    /// Conntrack entries of the packet's flows.
    pub conntrack: BTreeMap<ConntrackKey, ConntrackValue>,
    /// The packet's fragment record.
    pub fragment: Option<(FragmentKey, FragmentValue)>,
    /// The session affinity entry of the packet's source for the
    /// destination frontend.
    pub affinity: Option<(AffinityKey, AffinityValue)>,
    /// The destination frontend's `loadBalancerSourceRanges` entries.
    pub source_ranges: Vec<SourceRangeKey>,
}

/// A second instance of the datapath, with private maps holding a copy of
/// what a packet can read, to run that packet (and its reply) in.
pub struct Snapshot {
    ebpf: Ebpf,
    conntrack: HashMap<MapData, ConntrackKey, ConntrackValue>,
    counters: PerCpuArray<MapData, u64>,
    /// What was copied in.
    pub copied: Copied,
}

/// The maps pinned by a running agent, opened read-only in spirit: this
/// module never writes them.
struct LiveMaps {
    frontends: HashMap<MapData, FrontendKey, FrontendValue>,
    backends: Array<MapData, BackendValue>,
    revnat: HashMap<MapData, RevNatId, RevNatValue>,
    conntrack: HashMap<MapData, ConntrackKey, ConntrackValue>,
    fragments: HashMap<MapData, FragmentKey, FragmentValue>,
    config: Array<MapData, DatapathConfig>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    source_ranges: LpmTrie<MapData, SourceRangePrefix, SourceRangeValue>,
}

/// A lookup's value; `None` when the key is absent.
fn found<V>(result: Result<V, MapError>) -> crate::Result<Option<V>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Checks that every map of the shared table is pinned under `pin_path`
/// with this binary's layout, so its entries are read as what they are.
pub fn check_pinned_layout(pin_path: &Path) -> crate::Result<()> {
    if !pin_path.join(MAP_FRONTENDS).exists() {
        return Err(Error::Config(format!(
            "no datapath pinned in {} (is the agent running with --pin-path {}?)",
            pin_path.display(),
            pin_path.display()
        )));
    }
    for spec in &MAPS {
        let pin = pin_path.join(spec.name);
        let info = MapInfo::from_pin(&pin).with_context(|| {
            format!(
                "map {} is not pinned in {} (an agent of another version?)",
                spec.name,
                pin_path.display()
            )
        })?;
        if info.map_type().ok() != Some(map_type(spec.kind))
            || info.key_size() != spec.key_size
            || info.value_size() != spec.value_size
        {
            return Err(Error::Unexpected(format!(
                "pinned map {} has another layout than this binary's (key {} B, value {} B): \
                 trace with the agent's own binary",
                pin.display(),
                info.key_size(),
                info.value_size()
            )));
        }
    }
    Ok(())
}

impl LiveMaps {
    fn open(pin_path: &Path) -> crate::Result<Self> {
        check_pinned_layout(pin_path)?;
        let open = |name| open_pinned(pin_path, name);
        Ok(LiveMaps {
            frontends: HashMap::try_from(open(MAP_FRONTENDS)?)?,
            backends: Array::try_from(open(MAP_BACKENDS)?)?,
            revnat: HashMap::try_from(open(MAP_REVNAT)?)?,
            conntrack: HashMap::try_from(open(MAP_CONNTRACK)?)?,
            fragments: HashMap::try_from(open(MAP_FRAGMENTS)?)?,
            config: Array::try_from(open(MAP_CONFIG)?)?,
            affinity: HashMap::try_from(open(MAP_AFFINITY)?)?,
            source_ranges: LpmTrie::try_from(open(MAP_SOURCE_RANGES)?)?,
        })
    }

    /// Copies, map by map in table order, what the packet `tuple` can read;
    /// `from_network` says whether it enters from the network (where a new
    /// flow to a remote backend picks an SNAT port).
    fn copy(&self, tuple: &PacketTuple, from_network: bool) -> crate::Result<Copied> {
        let mut copied = Copied::default();
        // Rules that read the destination frontend run after it, and the
        // rules that name ids after every other.
        let phase = |spec: &&MapSpec| match spec.trace_copy {
            TraceCopy::PacketAffinity | TraceCopy::DestinationSourceRanges => 1,
            TraceCopy::NamedBackends | TraceCopy::NamedRevNat => 2,
            _ => 0,
        };
        let mut ordered: Vec<&MapSpec> = MAPS.iter().collect();
        ordered.sort_by_key(phase);
        for spec in ordered {
            match spec.trace_copy {
                TraceCopy::Configuration => {
                    copied.config = self
                        .config
                        .get(&0, 0)
                        .context("reading the configuration")?;
                }
                TraceCopy::DestinationFrontend => self.copy_frontend(tuple, &mut copied)?,
                TraceCopy::PacketFlows => self.copy_flows(tuple, from_network, &mut copied)?,
                TraceCopy::PacketFragment => {
                    if let Some(key) = tuple.fragment_key() {
                        copied.fragment = found(self.fragments.get(&key, 0))?.map(|v| (key, v));
                    }
                }
                TraceCopy::PacketAffinity => {
                    for (_, header) in copied.frontends.iter().filter(|(key, _)| key.slot == 0) {
                        let (client, family) = map_addr(tuple.saddr);
                        let key = AffinityKey::new(client, family, header.rev_nat_id);
                        if let Some(value) = found(self.affinity.get(&key, 0))? {
                            copied.affinity = Some((key, value));
                        }
                    }
                }
                TraceCopy::DestinationSourceRanges => {
                    let ids: BTreeSet<RevNatId> = copied
                        .frontends
                        .iter()
                        .filter(|(key, _)| key.slot == 0)
                        .map(|(_, header)| header.rev_nat_id)
                        .collect();
                    for key in self.source_ranges.keys() {
                        let key = key.context("reading the source-ranges map")?;
                        if ids.contains(&key.data().rev_nat_id()) {
                            copied.source_ranges.push(SourceRangeKey {
                                prefix_len: key.prefix_len(),
                                data: key.data(),
                            });
                        }
                    }
                }
                TraceCopy::NamedBackends => {
                    let ids: BTreeSet<BackendId> = copied
                        .frontends
                        .iter()
                        .filter(|(key, _)| key.slot != 0)
                        .map(|(_, slot)| slot.backend_id)
                        .chain(copied.conntrack.values().map(|v| v.backend_id))
                        .chain(copied.affinity.iter().map(|(_, v)| v.backend_id))
                        .collect();
                    for id in ids {
                        if let Some(backend) = self.backend(id)? {
                            copied.backends.insert(id, backend);
                        }
                    }
                }
                TraceCopy::NamedRevNat => {
                    let ids: BTreeSet<RevNatId> = copied
                        .frontends
                        .iter()
                        .filter(|(key, _)| key.slot == 0)
                        .map(|(_, header)| header.rev_nat_id)
                        .chain(copied.conntrack.values().map(|v| v.rev_nat_id))
                        .collect();
                    for id in ids {
                        if let Some(frontend) = found(self.revnat.get(&id, 0))? {
                            copied.revnat.insert(id, frontend);
                        }
                    }
                }
                TraceCopy::Nothing => {}
            }
        }
        Ok(copied)
    }

    /// The backend `id`, if there is one (the backends map is an array:
    /// an all-zero entry, or an id beyond it, is none).
    fn backend(&self, id: BackendId) -> crate::Result<Option<BackendValue>> {
        match self.backends.get(&id, 0) {
            Ok(backend) => Ok(backend.exists().then_some(backend)),
            Err(MapError::OutOfBounds { .. }) => Ok(None),
            Err(source) => Err(Error::map("reading", MAP_BACKENDS)(source)),
        }
    }

    /// The destination frontend's header and slots, in every scope.
    fn copy_frontend(&self, tuple: &PacketTuple, copied: &mut Copied) -> crate::Result<()> {
        for scope in [SCOPE_ALL, SCOPE_INTERNAL] {
            let header_key = tuple.frontend_key(scope);
            let Some(header) = found(self.frontends.get(&header_key, 0))? else {
                continue;
            };
            copied.frontends.insert(header_key, header);
            for slot in 1..=header.count {
                let key = header_key.with_slot(slot);
                if let Some(value) = found(self.frontends.get(&key, 0))? {
                    copied.frontends.insert(key, value);
                }
            }
        }
        Ok(())
    }

    /// The packet's conntrack entries in every direction and their flows;
    /// from the network, the SNAT ports held towards the destination's
    /// remote backends too.
    fn copy_flows(
        &self,
        tuple: &PacketTuple,
        from_network: bool,
        copied: &mut Copied,
    ) -> crate::Result<()> {
        let mut entries = Vec::new();
        for direction in CT_DIRECTIONS {
            let key = tuple.ct_key(direction);
            if let Some(value) = found(self.conntrack.get(&key, 0))? {
                entries.push((key, value));
            }
        }
        if from_network && copied.config.snat_v4 != [0; 4] {
            entries.extend(self.snat_port_holders(tuple, copied)?);
        }
        for (key, value) in entries {
            self.copy_flow(&key, &value, copied)?;
        }
        Ok(())
    }

    /// The SNAT reply entries (the ports held on this node's SNAT address)
    /// of the destination frontend's remote backends: what a new flow's
    /// SNAT port choice reads. One walk over the live conntrack map.
    fn snat_port_holders(
        &self,
        tuple: &PacketTuple,
        copied: &Copied,
    ) -> crate::Result<Vec<(ConntrackKey, ConntrackValue)>> {
        let header = copied.frontends.get(&tuple.frontend_key(SCOPE_ALL));
        if header.is_none_or(|h| h.flags & FRONTEND_FLAGS_EXTERNAL == 0) {
            return Ok(Vec::new());
        }
        let mut remote = BTreeSet::new();
        for (key, slot) in &copied.frontends {
            if key.slot == 0 || key.scope != SCOPE_ALL {
                continue;
            }
            if let Some(backend) = self.backend(slot.backend_id)?
                && backend.flags & BACKEND_FLAG_NODE_LOCAL == 0
            {
                remote.insert((backend.addr, backend.port));
            }
        }
        if remote.is_empty() {
            return Ok(Vec::new());
        }
        let snat = node_snat_addr(&copied.config, tuple.family());
        let mut holders = Vec::new();
        for entry in self.conntrack.iter() {
            let (key, value) = match entry {
                Ok(entry) => entry,
                // Deleted between the walk's steps: not held any more.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(e).context("walking the conntrack map"),
            };
            if key.direction == CT_DIR_SNAT_REPLY
                && key.proto == tuple.proto
                && key.daddr == snat
                && remote.contains(&(key.saddr, key.sport))
            {
                holders.push((key, value));
            }
        }
        Ok(holders)
    }

    /// Copies the entry `key` and every entry of its flow: the master
    /// (found through the rev-NAT map where the entry does not hold its
    /// frontend) and the master's companions.
    fn copy_flow(
        &self,
        key: &ConntrackKey,
        value: &ConntrackValue,
        copied: &mut Copied,
    ) -> crate::Result<()> {
        copied.conntrack.insert(*key, *value);
        let master = if key.is_master() {
            Some(*key)
        } else {
            let frontend = found(self.revnat.get(&value.rev_nat_id, 0))?;
            master_key(key, value, frontend.as_ref())
        };
        let Some(master) = master else {
            return Ok(());
        };
        let Some(master_value) = found(self.conntrack.get(&master, 0))? else {
            return Ok(());
        };
        copied.conntrack.insert(master, master_value);
        let snat = snat_key(&master, &master_value);
        let snat_entry = match snat {
            Some(snat) => found(self.conntrack.get(&snat, 0))?.map(|v| (snat, v)),
            None => None,
        };
        // The SNAT entry holds the address the flow was SNATed to; else
        // the node's SNAT address of the flow's family.
        let snat_addr = snat_entry
            .map(|(_, v)| v.nat_addr)
            .unwrap_or_else(|| node_snat_addr(&copied.config, master.family));
        let companions = [
            Some(reply_key(&master, &master_value)),
            snat_reply_key(&master, &master_value, &snat_addr),
        ];
        copied.conntrack.extend(snat_entry);
        for companion in companions.into_iter().flatten() {
            if let Some(value) = found(self.conntrack.get(&companion, 0))? {
                copied.conntrack.insert(companion, value);
            }
        }
        Ok(())
    }
}

/// A bpffs folder of this process's own, removed with its pins on drop.
struct PrivatePinDir(PathBuf);

impl PrivatePinDir {
    /// A fresh folder beside `live` (on the same bpffs), named after it
    /// and this process.
    fn beside(live: &Path) -> crate::Result<Self> {
        let name = live
            .file_name()
            .map(|n| n.to_string_lossy().replace('.', "-"))
            .unwrap_or_default();
        let dir = live
            .parent()
            .unwrap_or(Path::new("/sys/fs/bpf"))
            .join(format!("{name}-trace-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        bpffs::ensure_pin_dir(&dir)?;
        Ok(PrivatePinDir(dir))
    }
}

impl Drop for PrivatePinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Snapshot {
    /// Copies from the maps pinned under `pin_path` what the packet
    /// `tuple` can read (`from_network`: it enters from the network) into a
    /// private instance of the datapath.
    pub fn take(pin_path: &Path, tuple: &PacketTuple, from_network: bool) -> crate::Result<Self> {
        let live = LiveMaps::open(pin_path)?;
        let copied = live.copy(tuple, from_network)?;
        let sizes = MapSizes {
            frontends: room_for(copied.frontends.len()),
            // An array indexed by backend id: room up to the highest copied.
            backends: copied
                .backends
                .keys()
                .max()
                .map_or(1, |id| id.saturating_add(1)),
            // Indexes the per-frontend counters by rev-NAT id: full size.
            revnat: REVNAT_MAX_ENTRIES,
            conntrack: room_for(copied.conntrack.len()),
            fragments: room_for(1),
        };
        let ebpf = {
            let private = PrivatePinDir::beside(pin_path)?;
            load_with_sizes(&private.0, sizes)
                .context("loading the snapshot's instance of the datapath")?
            // The maps live on through the object's descriptors: the pins go.
        };
        if let Some(name) = ebpf
            .maps()
            .map(|(name, _)| name)
            // Sections of globals are not copied: `.rodata` is set by the
            // loader, `.bss` holds the datapath's own clock reading.
            .filter(|name| !name.starts_with('.'))
            .find(|name| MAPS.iter().all(|spec| spec.name != *name))
        {
            return Err(Error::Unexpected(format!(
                "map {name} of the eBPF object is not in the shared table: it has no copy rule"
            )));
        }
        Self::fill(ebpf, copied)
    }

    /// Writes `copied` into the maps of the freshly loaded `ebpf`.
    fn fill(mut ebpf: Ebpf, copied: Copied) -> crate::Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name).ok_or_else(|| Error::MissingMap {
                map: name.to_owned(),
            })
        };
        let mut config: Array<MapData, DatapathConfig> = Array::try_from(take(MAP_CONFIG)?)?;
        let mut frontends: HashMap<MapData, FrontendKey, FrontendValue> =
            HashMap::try_from(take(MAP_FRONTENDS)?)?;
        let mut backends: Array<MapData, BackendValue> = Array::try_from(take(MAP_BACKENDS)?)?;
        let mut revnat: HashMap<MapData, RevNatId, RevNatValue> =
            HashMap::try_from(take(MAP_REVNAT)?)?;
        let mut conntrack: HashMap<MapData, ConntrackKey, ConntrackValue> =
            HashMap::try_from(take(MAP_CONNTRACK)?)?;
        let mut fragments: HashMap<MapData, FragmentKey, FragmentValue> =
            HashMap::try_from(take(MAP_FRAGMENTS)?)?;
        let counters = PerCpuArray::try_from(take(MAP_COUNTERS)?)?;
        let mut affinity: HashMap<MapData, AffinityKey, AffinityValue> =
            HashMap::try_from(take(MAP_AFFINITY)?)?;
        let mut source_ranges: LpmTrie<MapData, SourceRangePrefix, SourceRangeValue> =
            LpmTrie::try_from(take(MAP_SOURCE_RANGES)?)?;
        config.set(0, copied.config, 0)?;
        for (id, value) in &copied.backends {
            backends.set(*id, value, 0)?;
        }
        for (id, value) in &copied.revnat {
            revnat.insert(id, value, 0)?;
        }
        for (key, value) in &copied.frontends {
            frontends.insert(key, value, 0)?;
        }
        for (key, value) in &copied.conntrack {
            conntrack.insert(key, value, 0)?;
        }
        if let Some((key, value)) = &copied.fragment {
            fragments.insert(key, value, 0)?;
        }
        if let Some((key, value)) = &copied.affinity {
            affinity.insert(key, value, 0)?;
        }
        for key in &copied.source_ranges {
            source_ranges.insert(&Key::new(key.prefix_len, key.data), SOURCE_RANGE_ALLOW, 0)?;
        }
        Ok(Snapshot {
            ebpf,
            conntrack,
            counters,
            copied,
        })
    }

    /// Runs `program` once on `packet` in the snapshot: its return value
    /// and the packet after it.
    pub fn run(&self, program: &str, packet: &[u8]) -> std::io::Result<(u32, Vec<u8>)> {
        test_run(&self.ebpf, program, packet)
    }

    /// The snapshot's conntrack entries now.
    pub fn conntrack(&self) -> crate::Result<BTreeMap<ConntrackKey, ConntrackValue>> {
        self.conntrack
            .iter()
            .map(|entry| entry.context("reading the snapshot's conntrack"))
            .collect()
    }

    /// The snapshot's datapath event counters, by name: what the packets
    /// run in it did (they start at zero).
    pub fn counters(&self) -> crate::Result<Vec<(&'static str, u64)>> {
        sum_counters(&self.counters)
    }
}

/// A map capacity for `entries` copied entries and the few a packet adds.
/// (LRU maps hand out free entries per CPU: ample room keeps the copied
/// ones from being evicted.)
fn room_for(entries: usize) -> u32 {
    u32::try_from(entries.saturating_mul(2))
        .unwrap_or(u32::MAX)
        .max(4096)
}

/// Runs `program` of `ebpf` (a TC classifier or an XDP program) once on
/// `packet` with BPF_PROG_TEST_RUN: its return value and the packet after
/// it. The kernel's refusal of a packet (e.g. `EINVAL` for one too short
/// for its hook) is the error.
pub fn test_run(ebpf: &Ebpf, program: &str, packet: &[u8]) -> std::io::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; packet.len() + OUTPUT_HEADROOM];
    let options = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    };
    let result = match ebpf.program(program) {
        Some(Program::SchedClassifier(tc)) => tc.test_run(options),
        Some(Program::Xdp(xdp)) => xdp.test_run(options),
        Some(other) => {
            return Err(std::io::Error::other(format!(
                "{program} is a {:?} program, not TC or XDP",
                other.prog_type()
            )));
        }
        None => {
            return Err(std::io::Error::other(format!(
                "program {program} missing from the eBPF object"
            )));
        }
    }
    .map_err(|e| match e {
        aya::programs::ProgramError::SyscallError(e) => e.io_error,
        other => std::io::Error::other(other),
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}
