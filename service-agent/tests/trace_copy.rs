//! `service-agent trace` copies each map into its snapshot by the rule the
//! shared table gives it: every map of the eBPF object must be in that
//! table, or the snapshot would start it empty without anyone deciding so.

use service_agent::datapath::EBPF_OBJECT;
use service_common::MAPS;

#[test]
fn every_map_of_the_object_has_a_trace_copy_rule() {
    let object = aya_obj::Object::parse(EBPF_OBJECT).expect("parsing the eBPF object");
    let mut names: Vec<&str> = object
        .maps
        .keys()
        .map(String::as_str)
        // Sections of global data (.bss, .rodata), if any, are no maps of ours.
        .filter(|name| !name.starts_with('.'))
        .collect();
    names.sort_unstable();
    let missing: Vec<&&str> = names
        .iter()
        .filter(|name| MAPS.iter().all(|spec| spec.name != **name))
        .collect();
    assert!(
        missing.is_empty(),
        "maps without a table entry (and so without a trace copy rule): {missing:?}"
    );
    assert_eq!(names.len(), MAPS.len(), "{names:?}");
}
