//! The licence the eBPF programs tell the kernel (their `license` section)
//! is the one Cargo declares for the workspace's crates.

use service_agent::datapath::EBPF_OBJECT;

/// The kernel's names (`license_is_gpl_compatible` in the kernel) of the
/// SPDX expressions we may use.
const KERNEL_NAMES: [(&str, &str); 2] = [
    ("MIT OR GPL-2.0-only", "Dual MIT/GPL"),
    ("GPL-2.0-only", "GPL v2"),
];

#[test]
fn the_programs_tell_the_kernel_the_licence_cargo_declares() {
    let object = aya_obj::Object::parse(EBPF_OBJECT).expect("parsing the eBPF object");
    let told = object.license.to_str().expect("licence is UTF-8");
    let declared = env!("CARGO_PKG_LICENSE");
    let expected = KERNEL_NAMES
        .iter()
        .find(|(spdx, _)| *spdx == declared)
        .map(|(_, kernel)| *kernel)
        .unwrap_or_else(|| panic!("no kernel name known for the licence {declared}"));
    assert_eq!(
        told, expected,
        "the eBPF object's licence section disagrees with Cargo's {declared}"
    );
}
