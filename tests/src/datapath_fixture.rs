//! The fixture of the datapath tests (BPF_PROG_TEST_RUN): the real eBPF
//! object loaded with its maps pinned in a test folder, Services programmed
//! through the agent's own desired-state builder and ordered writes, and a
//! runner that returns a program's verdict and the packet after it.

use std::net::IpAddr;

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use service_agent::{
    datapath::{
        self,
        maps::ServiceMaps,
        model::{MapState, write_in_order},
    },
    reconcile::{
        cluster::ObjectName,
        desired::DesiredState,
        translate::{BackendState, DesiredBackend, DesiredFrontend},
    },
};
use service_common::{
    BackendValue, CT_FLAG_DEAD, ConntrackKey, ConntrackTimeouts, ConntrackValue, DatapathConfig,
    FAMILY_IPV4, FAMILY_IPV6, FRONTEND_FLAG_CLUSTER_IP, FragmentKey, FragmentValue, FrontendKey,
    MAP_CONNTRACK, MAP_FRAGMENTS, MapAddr, SCOPE_ALL, SnatPortRange, map_addr_v4,
};

use crate::pins::PinDir;

/// The loaded object, its maps, and the agent-side state it was given.
pub struct Datapath {
    /// The loaded object (its programs are run by [`Datapath::run`]).
    pub ebpf: Ebpf,
    /// The Service maps, written through the agent's `MapWriter`.
    pub maps: ServiceMaps,
    /// The conntrack map, for tests that inspect the tracked flows.
    pub conntrack: HashMap<MapData, ConntrackKey, ConntrackValue>,
    /// The agent-side state the maps were programmed from.
    pub desired: DesiredState,
    /// The node-wide settings last written to the datapath.
    pub config: DatapathConfig,
    /// The pin folder, removed on drop.
    pub pin: PinDir,
}

impl Datapath {
    /// Loads the object with its maps pinned in a fresh test folder.
    pub fn load() -> Self {
        let pin = PinDir::new("datapath").expect("pin folder");
        let mut ebpf = datapath::load(pin.path()).expect("loading the eBPF object");
        let maps = ServiceMaps::take_from(&mut ebpf).expect("service maps");
        let conntrack = HashMap::try_from(ebpf.take_map(MAP_CONNTRACK).expect("conntrack map"))
            .expect("conntrack map type");
        Datapath {
            ebpf,
            maps,
            conntrack,
            desired: DesiredState::adopting(&MapState::default(), 1000, 1000),
            config: DatapathConfig::default(),
            pin,
        }
    }

    /// Programs (or reprograms) the ClusterIP `vip:port/proto` with
    /// node-local `backends`, through the same desired-state layout and
    /// ordered writes the agent uses. Addresses of either family.
    pub fn set_service<A: Into<IpAddr> + Copy>(
        &mut self,
        vip: A,
        port: u16,
        proto: u8,
        backends: &[(A, u16)],
    ) {
        let backends: Vec<(A, u16, bool)> = backends
            .iter()
            .map(|(addr, port)| (*addr, *port, true))
            .collect();
        self.set_frontend(vip, port, proto, FRONTEND_FLAG_CLUSTER_IP, &backends);
    }

    /// Programs (or reprograms) the frontend `addr:port/proto` of kind
    /// `flags` (`FRONTEND_FLAG_*`) with `backends` as (address, port,
    /// node-local). Addresses of either family.
    pub fn set_frontend<A: Into<IpAddr> + Copy>(
        &mut self,
        addr: A,
        port: u16,
        proto: u8,
        flags: u16,
        backends: &[(A, u16, bool)],
    ) {
        self.set_desired_frontend(frontend(addr, port, proto, flags, backends));
    }

    /// Programs (or reprograms) `frontend` as the only frontend of its
    /// Service, through the agent's desired-state layout and ordered
    /// writes: for tests that set fields beyond kind and backends
    /// (affinity, source ranges), starting from [`frontend`].
    pub fn set_desired_frontend(&mut self, frontend: DesiredFrontend) {
        let service = frontend_service(frontend.addr, frontend.port, frontend.proto);
        self.set_desired_service(&service, &[frontend]);
    }

    /// Programs (or reprograms) `frontends` as the frontends of Service
    /// `service`, through the agent's desired-state layout and ordered
    /// writes.
    pub fn set_desired_service(&mut self, service: &ObjectName, frontends: &[DesiredFrontend]) {
        let update = self.desired.set_service(service, frontends);
        assert!(update.problems.is_empty(), "{:?}", update.problems);
        if let Err(failure) = write_in_order(&mut self.maps, &update.writes.ops) {
            panic!("map write: {}", failure.error);
        }
    }

    /// Runs `program` (a TC classifier or an XDP program) once on `packet`:
    /// the verdict and the packet after it.
    pub fn run(&self, program: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(program, packet).expect("BPF_PROG_TEST_RUN")
    }

    /// [`Datapath::run`], with BPF_PROG_TEST_RUN's refusal of a packet
    /// (e.g. `EINVAL` for one too short for its hook) as an error.
    pub fn try_run(&self, program: &str, packet: &[u8]) -> std::io::Result<(u32, Vec<u8>)> {
        datapath::snapshot::test_run(&self.ebpf, program, packet)
    }

    /// Deletes the frontend `addr:port/proto` (its Service), as the agent
    /// does: header, slots and rev-NAT entry, and backends no other
    /// frontend uses.
    pub fn delete_frontend(&mut self, addr: impl Into<IpAddr>, port: u16, proto: u8) {
        let update = self
            .desired
            .set_service(&frontend_service(addr.into(), port, proto), &[]);
        if let Err(failure) = write_in_order(&mut self.maps, &update.writes.ops) {
            panic!("map write: {}", failure.error);
        }
    }

    /// Sets this node's SNAT address of the address's family in the
    /// datapath configuration.
    pub fn set_snat_address(&mut self, addr: impl Into<IpAddr>) {
        match addr.into() {
            IpAddr::V4(addr) => self.config.snat_v4 = addr.octets(),
            IpAddr::V6(addr) => self.config.snat_v6 = addr.octets(),
        }
        self.write_config();
    }

    /// Sets the SNAT port range (host byte order, both included).
    pub fn set_snat_ports(&mut self, min: u16, max: u16) {
        self.config.snat_ports = SnatPortRange { min, max };
        self.write_config();
    }

    /// Sets the conntrack timeouts.
    pub fn set_timeouts(&mut self, timeouts: ConntrackTimeouts) {
        self.config.timeouts = timeouts;
        self.write_config();
    }

    fn write_config(&mut self) {
        datapath::maps::write_config(&mut self.ebpf, &self.config)
            .expect("writing the configuration");
    }

    /// The conntrack entry `key`, if any.
    pub fn entry(&self, key: &ConntrackKey) -> Option<ConntrackValue> {
        self.conntrack.get(key, 0).ok()
    }

    /// Replaces the conntrack entry `key` by `change` applied to it.
    pub fn change_entry(&mut self, key: &ConntrackKey, change: impl FnOnce(&mut ConntrackValue)) {
        let mut value = self.entry(key).expect("the entry to change exists");
        change(&mut value);
        self.conntrack
            .insert(key, value, 0)
            .expect("rewriting the entry");
    }

    /// Ages the conntrack entry `key` by `seconds`: its `last_seen` and
    /// `created` move back, as if no packet had used it since. (Tests age
    /// entries this way, never by sleeping.)
    pub fn age(&mut self, key: &ConntrackKey, seconds: u32) {
        self.change_entry(key, |value| {
            value.last_seen = value.last_seen.wrapping_sub(seconds);
            value.created = value.created.wrapping_sub(seconds);
        });
    }

    /// Marks every conntrack entry of the flows of rev-NAT id `rev_nat_id`
    /// dead, as the agent does when that frontend is deleted.
    pub fn mark_dead(&mut self, rev_nat_id: u32) {
        let keys: Vec<ConntrackKey> = self
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, value)| value.rev_nat_id == rev_nat_id)
            .map(|(key, _)| key)
            .collect();
        for key in keys {
            self.change_entry(&key, |value| value.flags |= CT_FLAG_DEAD);
        }
    }

    /// Sets the `BACKEND_STATE_*` of the backend `addr:port` in the
    /// backends map (what the agent writes for a terminating or no longer
    /// serving endpoint).
    pub fn set_backend_state(&mut self, addr: impl Into<IpAddr>, port: u16, state: u8) {
        let (addr, _) = map_addr(addr.into());
        let (id, mut value): (u32, BackendValue) = (0..)
            .zip(self.maps.backends.iter())
            .filter_map(|(id, value)| Some((id, value.ok()?)))
            .find(|(_, value)| value.exists() && value.addr == addr && value.port == port.to_be())
            .expect("the backend is in the map");
        value.state = state;
        self.maps
            .backends
            .set(id, value, 0)
            .expect("rewriting the backend");
    }

    /// The rev-NAT id of the frontend `addr:port/proto`.
    pub fn rev_nat_id(&self, addr: impl Into<IpAddr>, port: u16, proto: u8) -> u32 {
        let (addr, family) = map_addr(addr.into());
        self.maps
            .frontends
            .get(
                &FrontendKey::header(addr, family, port.to_be(), proto, SCOPE_ALL),
                0,
            )
            .expect("the frontend is programmed")
            .rev_nat_id
    }

    /// The record a first fragment left for the later fragments of its
    /// datagram `key`, if any.
    pub fn fragment_record(&self, key: &FragmentKey) -> Option<FragmentValue> {
        let map = self.ebpf.map(MAP_FRAGMENTS).expect("fragments map");
        let records: HashMap<&MapData, FragmentKey, FragmentValue> =
            HashMap::try_from(map).expect("fragments map type");
        records.get(key, 0).ok()
    }

    /// A datapath event counter, summed over CPUs, by name.
    pub fn counter(&self, name: &str) -> u64 {
        crate::agent::datapath_counter(self.pin.path(), name).expect("counter exists")
    }
}

/// The frontend `addr:port/proto` of kind `flags` (`FRONTEND_FLAG_*`) with
/// active `backends` as (address, port, node-local), without affinity or
/// source ranges. Addresses of either family.
pub fn frontend<A: Into<IpAddr> + Copy>(
    addr: A,
    port: u16,
    proto: u8,
    flags: u16,
    backends: &[(A, u16, bool)],
) -> DesiredFrontend {
    DesiredFrontend {
        addr: addr.into(),
        port,
        proto,
        flags,
        backends: backends
            .iter()
            .map(|(addr, port, node_local)| DesiredBackend {
                addr: (*addr).into(),
                port: *port,
                node_local: *node_local,
                state: BackendState::Active,
            })
            .collect(),
        draining: Vec::new(),
        affinity_timeout_secs: 0,
        source_ranges: Vec::new(),
        scope: service_common::SCOPE_ALL,
    }
}

/// The Service the fixture programs the frontend `addr:port/proto` as.
fn frontend_service(addr: IpAddr, port: u16, proto: u8) -> ObjectName {
    let addr = addr.to_string().replace(':', "-");
    ObjectName::new("test", &format!("svc-{addr}-{port}-{proto}"))
}

/// The conntrack key of the packet `src -> dst` (ports in host byte
/// order; addresses of one family) in `direction`, as the datapath writes
/// it.
pub fn ct_key<A: Into<IpAddr>>(
    src: (A, u16),
    dst: (A, u16),
    proto: u8,
    direction: u8,
) -> ConntrackKey {
    let (saddr, family) = map_addr(src.0.into());
    let (daddr, _) = map_addr(dst.0.into());
    ConntrackKey::new(
        saddr,
        src.1.to_be(),
        daddr,
        dst.1.to_be(),
        family,
        proto,
        direction,
    )
}

/// `addr` as map keys and values hold it, and its family tag.
pub fn map_addr(addr: IpAddr) -> (MapAddr, u8) {
    match addr {
        IpAddr::V4(addr) => (map_addr_v4(addr.octets()), FAMILY_IPV4),
        IpAddr::V6(addr) => (addr.octets(), FAMILY_IPV6),
    }
}
