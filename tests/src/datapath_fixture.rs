//! The fixture of the datapath tests (BPF_PROG_TEST_RUN): the real eBPF
//! object loaded with its maps pinned in a test folder, Services programmed
//! through the agent's own desired-state builder and ordered writes, and a
//! runner that returns a program's verdict and the packet after it.

use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use service_agent::{
    datapath::{self, maps::ServiceMaps},
    desired::DesiredState,
    source::ObjectName,
    state::{MapState, MapWriter as _},
    translate::{DesiredBackend, DesiredFrontend},
};
use service_common::{ConntrackKey, ConntrackValue, FRONTEND_FLAG_CLUSTER_IP, MAP_CONNTRACK};

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

    /// Programs (or reprograms) `vip:port/proto` with `backends`, through the
    /// same desired-state layout and ordered writes the agent uses.
    pub fn set_service(
        &mut self,
        vip: Ipv4Addr,
        port: u16,
        proto: u8,
        backends: &[(Ipv4Addr, u16)],
    ) {
        let service = ObjectName {
            namespace: "test".into(),
            name: format!("svc-{vip}-{port}-{proto}"),
        };
        let frontend = DesiredFrontend {
            service: service.clone(),
            port_name: String::new(),
            addr: vip.into(),
            port,
            proto,
            flags: FRONTEND_FLAG_CLUSTER_IP,
            backends: backends
                .iter()
                .map(|(addr, port)| DesiredBackend {
                    addr: (*addr).into(),
                    port: *port,
                    node_local: true,
                    terminating: false,
                })
                .collect(),
        };
        let (ops, problems) = self.desired.set_service(&service, &[frontend]);
        assert!(problems.is_empty(), "{problems:?}");
        for op in ops {
            self.maps.apply(&op).expect("map write");
        }
    }

    /// Runs `program` once on `packet`: the verdict and the packet after it.
    pub fn run(&self, program: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        let program: &SchedClassifier = self
            .ebpf
            .program(program)
            .expect("program")
            .try_into()
            .expect("classifier");
        let mut out = vec![0u8; packet.len() + OUTPUT_HEADROOM];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
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
