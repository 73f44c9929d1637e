//! The conntrack collector against the kernel's own map: the real eBPF
//! object loaded with its maps pinned, conntrack filled with more flows
//! than one batch read holds, then the agent's collector pass and reap walk
//! run through the pinned maps (batched reads and deletes, replacements of
//! existing entries only), and the map read back. Also the id allocators'
//! position, kept in its pinned array across a reload of the object, and
//! the session-affinity entries of deleted frontends, deleted when a sync
//! reports the deletion and, for a frontend gone while no agent ran, by a
//! new collector's first pass.

use std::net::Ipv4Addr;

use service_agent::{
    datapath::{
        self, PROG_FROM_POD,
        conntrack::{ConntrackMap, SCAN_BATCH, monotonic_seconds},
        id_cursors::IdCursorMap,
    },
    reconcile::{
        collector::{Collector, CollectorSettings},
        flows::{DeleteReason, FlowChanges, FlowRules, collect, reap},
    },
};
use service_common::{
    AffinityKey, CT_DIR_FORWARD, ConntrackKey, ConntrackTimeouts, ConntrackValue,
    FRONTEND_FLAG_AFFINITY, FRONTEND_FLAG_CLUSTER_IP, IdCursors, PROTO_TCP, PROTO_UDP, RevNatId,
    SnatPortRange, map_addr_v4, reply_key,
};
use service_tests::{
    datapath_fixture::{Datapath, frontend},
    packets::tcp,
    pins::{PinDir, affinity_entries},
    require_root,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
const TIMEOUTS: ConntrackTimeouts = ConntrackTimeouts {
    tcp_syn: 5,
    tcp_established: 60,
    tcp_fin: 10,
    tcp_close: 2,
    udp: 10,
    udp_stream: 20,
};

/// Writes `count` UDP flows from client ports `first_port..` to the
/// frontend `rev_nat_id` (VIP:53) and `backend_id` (BACKEND:5353), last
/// seen at `last_seen`, as the datapath writes them (master and reply).
fn add_flows(
    datapath: &mut Datapath,
    first_port: u16,
    count: u16,
    rev_nat_id: u32,
    backend_id: u32,
    last_seen: u32,
) {
    for port in first_port..first_port + count {
        let master = ConntrackKey::v4(
            [10, 1, (port >> 8) as u8, port as u8],
            port.to_be(),
            VIP.octets(),
            53u16.to_be(),
            PROTO_UDP,
            CT_DIR_FORWARD,
        );
        let value = ConntrackValue::new(
            map_addr_v4(BACKEND.octets()),
            5353u16.to_be(),
            backend_id,
            rev_nat_id,
            last_seen,
        );
        let reply = ConntrackValue::new(
            master.daddr,
            master.dport,
            backend_id,
            rev_nat_id,
            last_seen,
        );
        datapath
            .conntrack
            .insert(reply_key(&master, &value), reply, 0)
            .expect("reply entry");
        datapath
            .conntrack
            .insert(master, value, 0)
            .expect("master entry");
    }
}

/// The entries of the conntrack map.
fn entries(datapath: &Datapath) -> Vec<(ConntrackKey, ConntrackValue)> {
    datapath
        .conntrack
        .iter()
        .map(|entry| entry.expect("reading conntrack"))
        .collect()
}

#[test]
fn the_collector_walks_the_kernel_map_in_batches_and_frees_what_expired() {
    require_root!();
    let mut datapath = Datapath::load();
    datapath.set_service(VIP, 53, PROTO_UDP, &[(BACKEND, 5353)]);
    let rev_nat_id = datapath
        .desired
        .maps()
        .frontends
        .values()
        .find(|v| v.rev_nat_id != 0)
        .expect("the frontend")
        .rev_nat_id;
    let backend_id = *datapath.desired.maps().backends.keys().next().unwrap();
    let now = monotonic_seconds();
    // More flows than a batch read holds, half idle past the UDP timeout.
    let flows = SCAN_BATCH as u16 * 2;
    add_flows(
        &mut datapath,
        10_000,
        flows,
        rev_nat_id,
        backend_id,
        now - 100,
    );
    add_flows(&mut datapath, 30_000, flows, rev_nat_id, backend_id, now);
    let mut table = ConntrackMap::open(datapath.pin.path()).expect("opening the pinned maps");
    let rules = FlowRules {
        timeouts: TIMEOUTS,
        snat_v4: map_addr_v4([10, 0, 0, 1]),
        snat_v6: [0; 16],
    };

    let report = collect(&mut table, &rules, now).expect("a pass");
    let live = usize::from(flows) * 2;
    assert_eq!(
        report.deleted[&DeleteReason::Expired],
        live as u64,
        "{report:?}"
    );
    assert_eq!(report.remaining, live as u64);
    let left = entries(&datapath);
    assert_eq!(left.len(), live);
    assert!(left.iter().all(|(_, v)| v.last_seen == now));

    // The frontend is deleted: its flows are marked dead at once, in the
    // kernel map, and leave after the close timeout.
    let changes = FlowChanges {
        rev_nat_ids_released: [rev_nat_id].into(),
        ..FlowChanges::default()
    };
    let report = reap(&mut table, &changes, now).expect("a reap walk");
    assert_eq!(report.marked_dead, live as u64);
    assert!(entries(&datapath).iter().all(|(_, v)| v.is_dead()));
    let report = collect(&mut table, &rules, now + TIMEOUTS.tcp_close + 1).expect("a pass");
    assert_eq!(report.deleted[&DeleteReason::Dead], live as u64);
    assert!(entries(&datapath).is_empty());
}

#[test]
fn udp_flows_of_a_backend_that_left_are_reaped_from_the_kernel_map() {
    require_root!();
    let mut datapath = Datapath::load();
    datapath.set_service(VIP, 53, PROTO_UDP, &[(BACKEND, 5353)]);
    let now = monotonic_seconds();
    add_flows(&mut datapath, 10_000, 3000, 1, 7, now);
    add_flows(&mut datapath, 20_000, 3000, 1, 8, now);
    let mut table = ConntrackMap::open(datapath.pin.path()).expect("opening the pinned maps");
    let changes = FlowChanges {
        backends_deleted: [7].into(),
        ..FlowChanges::default()
    };
    let report = reap(&mut table, &changes, now).expect("a reap walk");
    assert_eq!(report.deleted[&DeleteReason::Reaped], 6000);
    let left = entries(&datapath);
    assert_eq!(left.len(), 6000);
    assert!(left.iter().all(|(_, v)| v.backend_id == 8));
}

#[test]
fn the_id_allocators_position_outlives_the_agent_in_its_pinned_array() {
    require_root!();
    let pin = PinDir::new("cursors").expect("pin folder");
    let cursors = IdCursors {
        next_rev_nat_id: 4242,
        next_backend_id: 77,
    };
    {
        let mut ebpf = datapath::load(pin.path()).expect("loading the object");
        let mut map = IdCursorMap::take_from(&mut ebpf).expect("the cursor array");
        assert_eq!(map.load(), IdCursors::default(), "a fresh array");
        map.store(&cursors).expect("storing");
    }
    // A new agent loads the object again and adopts the pinned array.
    let mut ebpf = datapath::load(pin.path()).expect("loading the object again");
    let map = IdCursorMap::take_from(&mut ebpf).expect("the cursor array");
    assert_eq!(map.load(), cursors);
}

/// Two frontends with session affinity (to `VIP` and 10.96.0.11), two
/// clients of each given an affinity entry by the datapath, then `VIP`'s
/// frontend deleted from the maps (its rev-NAT entry too); returns the
/// rev-NAT ids of the deleted and of the kept frontend.
fn affinity_of_two_frontends_then_one_deleted(datapath: &mut Datapath) -> (RevNatId, RevNatId) {
    let other_vip = Ipv4Addr::new(10, 96, 0, 11);
    for vip in [VIP, other_vip] {
        let mut desired = frontend(
            vip,
            80,
            PROTO_TCP,
            FRONTEND_FLAG_CLUSTER_IP,
            &[(BACKEND, 8080, true)],
        );
        desired.flags |= FRONTEND_FLAG_AFFINITY;
        desired.affinity_timeout_secs = 100;
        datapath.set_desired_frontend(desired);
    }
    for vip in [VIP, other_vip] {
        for client in [Ipv4Addr::new(10, 1, 0, 2), Ipv4Addr::new(10, 1, 0, 3)] {
            let (_, out) = datapath.run(
                PROG_FROM_POD,
                &tcp((client, 40_000), (vip, 80), true, false, &[]),
            );
            assert_eq!(out[30..34], BACKEND.octets(), "SYN to {vip} translated");
        }
    }
    assert_eq!(affinity_of(datapath).len(), 4);
    let deleted = datapath.rev_nat_id(VIP, 80, PROTO_TCP);
    let kept = datapath.rev_nat_id(other_vip, 80, PROTO_TCP);
    datapath.delete_frontend(VIP, 80, PROTO_TCP);
    (deleted, kept)
}

/// The keys of the datapath's affinity entries.
fn affinity_of(datapath: &Datapath) -> Vec<AffinityKey> {
    affinity_entries(datapath.pin.path())
        .expect("affinity map")
        .into_iter()
        .map(|(key, _)| key)
        .collect()
}

/// A collector over the datapath's pinned maps, as the agent runs one.
fn collector_of(datapath: &Datapath) -> Collector<ConntrackMap> {
    let table = ConntrackMap::open(datapath.pin.path()).expect("opening the pinned maps");
    let settings = CollectorSettings {
        rules: FlowRules {
            timeouts: TIMEOUTS,
            snat_v4: map_addr_v4([0; 4]),
            snat_v6: [0; 16],
        },
        snat_ports: SnatPortRange::DEFAULT,
        min_interval: std::time::Duration::from_secs(1),
        max_interval: std::time::Duration::from_secs(60),
    };
    Collector::new(table, settings, None)
}

#[test]
fn a_deleted_frontend_s_session_affinity_is_deleted_from_the_kernel_map() {
    require_root!();
    let mut datapath = Datapath::load();
    let (deleted, kept) = affinity_of_two_frontends_then_one_deleted(&mut datapath);
    let mut collector = collector_of(&datapath);
    collector.follow(
        &FlowChanges {
            rev_nat_ids_released: [deleted].into(),
            ..FlowChanges::default()
        },
        monotonic_seconds(),
    );
    let left = affinity_of(&datapath);
    assert_eq!(left.len(), 2, "the kept frontend's two clients: {left:?}");
    assert!(left.iter().all(|key| key.rev_nat_id == kept));
}

/// The frontend was deleted by an agent that stopped before its collector
/// followed: a new agent's collector, which no sync will tell, deletes
/// the gone frontend's affinity entries on its first pass.
#[test]
fn a_new_collector_s_first_pass_deletes_the_affinity_of_frontends_gone_meanwhile() {
    require_root!();
    let mut datapath = Datapath::load();
    let (_, kept) = affinity_of_two_frontends_then_one_deleted(&mut datapath);
    assert_eq!(affinity_of(&datapath).len(), 4, "nothing deleted them yet");
    let mut collector = collector_of(&datapath);
    collector.pass(monotonic_seconds());
    let left = affinity_of(&datapath);
    assert_eq!(left.len(), 2, "the kept frontend's two clients: {left:?}");
    assert!(left.iter().all(|key| key.rev_nat_id == kept));
}
