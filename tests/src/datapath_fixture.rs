//! The fixture of the datapath tests (BPF_PROG_TEST_RUN): the real eBPF
//! object loaded with its maps pinned in a test folder, Services programmed
//! through the agent's own desired-state builder and ordered writes, and a
//! runner that returns a program's verdict and the packet after it.

use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{Program, TestRun, TestRunOptions},
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
        translate::{DesiredBackend, DesiredFrontend},
    },
};
use service_common::{
    ConntrackKey, ConntrackValue, DatapathConfig, FRONTEND_FLAG_CLUSTER_IP, MAP_CONNTRACK,
};

use crate::pins::PinDir;

/// Room left in the output buffer beyond the input's length, for programs
/// that grow the packet (an ICMP error quoting a datagram's headers).
const OUTPUT_HEADROOM: usize = 256;

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
            pin,
        }
    }

    /// Programs (or reprograms) the ClusterIP `vip:port/proto` with
    /// node-local `backends`, through the same desired-state layout and
    /// ordered writes the agent uses.
    pub fn set_service(
        &mut self,
        vip: Ipv4Addr,
        port: u16,
        proto: u8,
        backends: &[(Ipv4Addr, u16)],
    ) {
        let backends: Vec<(Ipv4Addr, u16, bool)> = backends
            .iter()
            .map(|(addr, port)| (*addr, *port, true))
            .collect();
        self.set_frontend(vip, port, proto, FRONTEND_FLAG_CLUSTER_IP, &backends);
    }

    /// Programs (or reprograms) the frontend `addr:port/proto` of kind
    /// `flags` (`FRONTEND_FLAG_*`) with `backends` as (address, port,
    /// node-local).
    pub fn set_frontend(
        &mut self,
        addr: Ipv4Addr,
        port: u16,
        proto: u8,
        flags: u16,
        backends: &[(Ipv4Addr, u16, bool)],
    ) {
        let service = ObjectName::new("test", &format!("svc-{addr}-{port}-{proto}"));
        let frontend = DesiredFrontend {
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
                    terminating: false,
                })
                .collect(),
        };
        let update = self.desired.set_service(&service, &[frontend]);
        assert!(update.problems.is_empty(), "{:?}", update.problems);
        if let Err(failure) = write_in_order(&mut self.maps, &update.writes.ops) {
            panic!("map write: {}", failure.error);
        }
    }

    /// Runs `program` (a TC classifier or an XDP program) once on `packet`:
    /// the verdict and the packet after it.
    pub fn run(&self, program: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; packet.len() + OUTPUT_HEADROOM];
        let options = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let result = match self.ebpf.program(program).expect("program") {
            Program::SchedClassifier(tc) => tc.test_run(options),
            Program::Xdp(xdp) => xdp.test_run(options),
            other => panic!("{program} is a {:?}, not TC or XDP", other.prog_type()),
        }
        .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Sets this node's SNAT address in the datapath configuration.
    pub fn set_snat_address(&mut self, addr: Ipv4Addr) {
        datapath::maps::write_config(
            &mut self.ebpf,
            &DatapathConfig {
                snat_v4: addr.octets(),
                ..DatapathConfig::default()
            },
        )
        .expect("writing the configuration");
    }

    /// A datapath event counter, summed over CPUs, by name.
    pub fn counter(&self, name: &str) -> u64 {
        datapath::maps::datapath_counters(self.pin.path())
            .expect("counters")
            .into_iter()
            .find(|(n, _)| *n == name)
            .expect("counter exists")
            .1
    }
}
