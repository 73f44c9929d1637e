//! Attaching the TC programs to pod devices: the ones named with
//! `--pod-device` and every device whose name starts with a
//! `--pod-device-prefix`, found again on every scan so new pods get
//! attached while the agent runs.

use std::collections::BTreeMap;

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{SchedClassifier, TcAttachType, tc},
    util::KernelVersion,
};
use log::{info, warn};

use super::{PROG_FROM_POD, PROG_TO_POD};

/// Which devices are pod devices.
#[derive(Clone, Debug, Default)]
pub struct DeviceSelection {
    /// Exact device names.
    pub names: Vec<String>,
    /// Name prefixes (e.g. `lxc`, `veth`).
    pub prefixes: Vec<String>,
}

impl DeviceSelection {
    /// Whether the device `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
            || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }
}

/// The devices the programs are attached to, by name, with their ifindex.
#[derive(Default)]
pub struct Attachments {
    attached: BTreeMap<String, u32>,
}

impl Attachments {
    /// Names of the devices currently attached.
    pub fn devices(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// Attaches both programs to every selected device that has not got
    /// them yet (or that was re-created with a new ifindex), and forgets
    /// devices that are gone (the kernel detached their programs with them).
    /// A device that cannot be attached is logged and retried next scan.
    pub fn scan(&mut self, ebpf: &mut Ebpf, selection: &DeviceSelection) -> anyhow::Result<()> {
        let interfaces: BTreeMap<String, u32> = nix::net::if_::if_nameindex()
            .context("listing network devices")?
            .iter()
            .map(|i| (i.name().to_string_lossy().into_owned(), i.index()))
            .collect();
        self.attached
            .retain(|name, index| interfaces.get(name) == Some(index));
        for name in &selection.names {
            if !interfaces.contains_key(name) && !self.attached.contains_key(name) {
                warn!("pod device {name} does not exist (yet)");
            }
        }
        for (name, index) in interfaces {
            if !selection.matches(&name) || self.attached.contains_key(&name) {
                continue;
            }
            match attach_device(ebpf, &name) {
                Ok(()) => {
                    info!("attached from_pod (ingress) and to_pod (egress) to {name}");
                    self.attached.insert(name, index);
                }
                Err(error) => warn!("cannot attach to {name}: {error:#}"),
            }
        }
        Ok(())
    }
}

/// Attaches "from pod" to the device's ingress and "to pod" to its egress:
/// tcx links where the kernel has them (6.6+), clsact and cls_bpf through
/// netlink before that.
fn attach_device(ebpf: &mut Ebpf, device: &str) -> anyhow::Result<()> {
    let has_tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if !has_tcx {
        // Adding clsact twice fails with EEXIST, which is fine.
        let _ = tc::qdisc_add_clsact(device);
    }
    for (program, attach_type) in [
        (PROG_FROM_POD, TcAttachType::Ingress),
        (PROG_TO_POD, TcAttachType::Egress),
    ] {
        let program: &mut SchedClassifier = ebpf
            .program_mut(program)
            .with_context(|| format!("program {program} missing"))?
            .try_into()?;
        program
            .attach(device, attach_type)
            .with_context(|| format!("attaching {attach_type:?} program to {device}"))?;
    }
    Ok(())
}
