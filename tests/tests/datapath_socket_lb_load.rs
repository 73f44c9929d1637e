//! The socket-LB programs load, also limited to one network namespace
//! (`--socket-lb-host-namespace-only`: the loader rewrites their
//! `SOCK_LB_HOST_NETNS_COOKIE` global, and they call
//! `bpf_get_netns_cookie`). The agent only warns when the kernel refuses
//! them (the rest of the datapath works without socket-LB), so this checks
//! that the kernel took them; the kernel matrix runs it on 6.1 and 6.12.
//! (The kernel has no test run for these programs: what they do is tested
//! end to end, `e2e_host.rs` and `e2e_socket_lb_scope.rs`.)

use aya::programs::CgroupSockAddr;
use service_agent::datapath::{self, MapSizes, netns::current_netns_cookie};
use service_common::{PROGRAMS, ProgramKind};
use service_tests::{netns::in_private_namespace, pins::PinDir, require_root};

#[test]
fn socket_lb_programs_load_for_every_namespace_and_for_one() {
    require_root!();
    in_private_namespace(|| {
        for (tag, scope) in [
            ("sockload-all", None),
            (
                "sockload-one",
                Some(current_netns_cookie().expect("cookie")),
            ),
        ] {
            let pin = PinDir::new(tag).expect("pin folder");
            let mut ebpf = datapath::load_with_options(pin.path(), MapSizes::default(), scope)
                .expect("loading the datapath");
            let socket_programs: Vec<&str> = PROGRAMS
                .iter()
                .filter(|spec| spec.kind == ProgramKind::CgroupSockAddr)
                .map(|spec| spec.name)
                .collect();
            assert_eq!(socket_programs.len(), 8, "{socket_programs:?}");
            for name in socket_programs {
                let program: &mut CgroupSockAddr = ebpf
                    .program_mut(name)
                    .expect("program in the object")
                    .try_into()
                    .expect("a cgroup sock_addr program");
                assert!(
                    program.fd().is_ok(),
                    "the kernel refused {name} (scope {scope:?})"
                );
            }
        }
    })
    .expect("private namespace");
}
