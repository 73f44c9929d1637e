//! Attaching the TC programs to pod devices: the ones named with
//! `--pod-device` and every device whose name starts with a
//! `--pod-device-prefix`, found again on every scan so new pods get
//! attached while the agent runs.

use std::{collections::BTreeMap, path::Path};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, TcAttachOptions},
    },
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
    pub fn scan(
        &mut self,
        ebpf: &mut Ebpf,
        selection: &DeviceSelection,
        link_dir: &Path,
    ) -> anyhow::Result<()> {
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
            match attach_device(ebpf, &name, link_dir) {
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

/// Attaches "from pod" to the device's ingress and "to pod" to its egress.
///
/// With tcx (kernel 6.6+) each link is pinned under `link_dir` as
/// `DEVICE-ingress` and `DEVICE-egress` (bpffs refuses dots in names), so the
/// programs stay attached when the agent exits or is killed, and a new agent
/// swaps its programs into the pinned links atomically: traffic never sees
/// a device without the datapath. Before 6.6, clsact and cls_bpf through
/// netlink, which the kernel keeps without a pin; a restart replaces the
/// filters of the previous agent.
fn attach_device(ebpf: &mut Ebpf, device: &str, link_dir: &Path) -> anyhow::Result<()> {
    let has_tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if !has_tcx {
        // Adding clsact twice fails with EEXIST, which is fine.
        let _ = tc::qdisc_add_clsact(device);
    }
    for (program_name, attach_type, direction) in [
        (PROG_FROM_POD, TcAttachType::Ingress, "ingress"),
        (PROG_TO_POD, TcAttachType::Egress, "egress"),
    ] {
        let program: &mut SchedClassifier = ebpf
            .program_mut(program_name)
            .with_context(|| format!("program {program_name} missing"))?
            .try_into()?;
        if has_tcx {
            attach_pinned(
                program,
                device,
                attach_type,
                &link_dir.join(format!("{device}-{direction}")),
            )?;
        } else {
            // Remove the previous agent's filter of this program, then attach.
            let _ = tc::qdisc_detach_program(device, attach_type, program_name);
            program
                .attach(device, attach_type)
                .with_context(|| format!("attaching {program_name} to {device} {direction}"))?;
        }
    }
    Ok(())
}

/// Puts `program` into the tcx link pinned at `pin` (replacing the
/// program a previous agent left there), or attaches it afresh and pins the
/// new link. A pinned link whose device is gone is replaced.
fn attach_pinned(
    program: &mut SchedClassifier,
    device: &str,
    attach_type: TcAttachType,
    pin: &Path,
) -> anyhow::Result<()> {
    if let Ok(pinned) = PinnedLink::from_pin(pin) {
        let link = SchedClassifierLink::try_from(FdLink::from(pinned))
            .context("pinned link is not a tcx link")?;
        match program.attach_to_link(link) {
            Ok(_) => return Ok(()),
            Err(e) => {
                warn!(
                    "pinned link {} is stale ({e}); attaching afresh",
                    pin.display()
                );
                std::fs::remove_file(pin)
                    .with_context(|| format!("removing stale pin {}", pin.display()))?;
            }
        }
    }
    let link_id = program
        .attach_with_options(
            device,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching to {device} {attach_type:?}"))?;
    let link: FdLink = program.take_link(link_id)?.try_into()?;
    link.pin(pin)
        .with_context(|| format!("pinning link at {}", pin.display()))?;
    Ok(())
}
