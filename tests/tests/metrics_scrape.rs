//! A `/metrics` scrape costs the same whatever the conntrack map holds: with
//! 1M conntrack entries in the real kernel map, the scrape reports the
//! occupancy the conntrack collector last set (it does not count the
//! entries itself), and its time is printed next to what one walk of the
//! map takes (run with `--nocapture` to see both).

use std::{os::fd::AsFd as _, time::Instant};

use aya::maps::{HashMap, IterableMap as _, MapData};
use service_agent::{
    datapath::{self, MapSizes, maps::CounterMaps, sys},
    ops::metrics::Metrics,
};
use service_common::{CONNTRACK_MAX_ENTRIES, ConntrackKey, ConntrackValue, MAP_CONNTRACK};
use service_tests::{pins::PinDir, require_root};

/// Entries put in the conntrack map.
const ENTRIES: u32 = 1_000_000;

#[test]
fn a_scrape_with_a_million_conntrack_entries_does_not_walk_them() {
    require_root!();
    let pin = PinDir::new("scrape").expect("pin folder");
    let sizes = MapSizes {
        conntrack: ENTRIES.next_power_of_two().max(CONNTRACK_MAX_ENTRIES),
        ..MapSizes::default()
    };
    let mut ebpf = datapath::load_with_sizes(pin.path(), sizes).expect("loading the datapath");
    let conntrack: HashMap<MapData, ConntrackKey, ConntrackValue> =
        HashMap::try_from(ebpf.take_map(MAP_CONNTRACK).expect("conntrack map"))
            .expect("a hash map");
    let keys: Vec<ConntrackKey> = (0..ENTRIES)
        .map(|i| {
            let mut key = ConntrackKey::default();
            key.saddr[..4].copy_from_slice(&i.to_be_bytes());
            key.sport = 40_000u16.to_be();
            key
        })
        .collect();
    let values = vec![ConntrackValue::default(); keys.len()];
    sys::update_batch(conntrack.map().fd().as_fd(), &keys, &values).expect("filling conntrack");
    drop((keys, values));

    let metrics = Metrics::new(
        sizes,
        Some(CounterMaps::take_from(&mut ebpf).expect("counters")),
    );
    // What the conntrack collector would report after its last walk.
    metrics.set_conntrack_entries(1234);
    let started = Instant::now();
    let scrapes = 20;
    let mut text = String::new();
    for _ in 0..scrapes {
        text = metrics.encode();
    }
    let per_scrape = started.elapsed() / scrapes;
    assert!(
        text.contains("service_agent_map_entries{map=\"conntrack\"} 1234"),
        "the scrape counted the map instead of reporting the collector's figure:\n{text}"
    );
    assert!(
        text.contains(&format!(
            "service_agent_map_capacity{{map=\"conntrack\"}} {}",
            sizes.conntrack
        )),
        "{text}"
    );
    assert!(
        text.contains("service_agent_datapath_events_total"),
        "{text}"
    );

    let started = Instant::now();
    let walked = conntrack.keys().count();
    let walk = started.elapsed();
    assert_eq!(walked, ENTRIES as usize);
    println!(
        "one /metrics scrape: {per_scrape:?} (mean of {scrapes}); one walk of the {walked} conntrack entries: {walk:?}"
    );
}
