//! Attaching the programs: "from pod"/"to pod" to pod devices (the ones
//! named with `--pod-device` and every device whose name starts with a
//! `--pod-device-prefix`, found again on every scan so new pods get
//! attached while the agent runs), and "from network" to the external
//! devices (`--external-device`).

use std::{collections::BTreeMap, path::Path};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
    },
    util::KernelVersion,
};
use log::{info, warn};

use super::{
    PROG_FROM_NETWORK, PROG_FROM_NETWORK_DEFERRED, PROG_FROM_NETWORK_TC, PROG_FROM_POD,
    PROG_TO_NETWORK, PROG_TO_POD,
};
use crate::error::{Context as _, Error, IoContext as _};

/// Which devices the datapath attaches to.
#[derive(Clone, Debug, Default)]
pub struct DeviceSelection {
    /// Pod devices: exact names.
    pub names: Vec<String>,
    /// Pod devices: name prefixes (e.g. `lxc`, `veth`).
    pub prefixes: Vec<String>,
    /// External devices (traffic from the network: NodePort,
    /// LoadBalancer, externalIPs, and replies of SNATed flows).
    pub external: Vec<String>,
    /// How "from network" attaches to the external devices.
    pub nodeport_mode: NodePortMode,
}

/// The hook of the "from network" program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NodePortMode {
    /// XDP (native where the driver has it, generic otherwise).
    #[default]
    Xdp,
    /// TC ingress, for devices or setups where XDP cannot be used.
    Tc,
}

impl DeviceSelection {
    /// Whether `name` is a pod device.
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
    ) -> crate::Result<()> {
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
        for name in &selection.external {
            if !interfaces.contains_key(name) && !self.attached.contains_key(name) {
                warn!("external device {name} does not exist (yet)");
            }
        }
        for (name, index) in interfaces {
            if self.attached.contains_key(&name) {
                continue;
            }
            let attached = if selection.external.contains(&name) {
                attach_external(ebpf, &name, selection.nodeport_mode, link_dir).map(|()| {
                    match selection.nodeport_mode {
                        NodePortMode::Xdp => "from_network (XDP), from_network_deferred (TC ingress, checksum offload) and to_network",
                        NodePortMode::Tc => "from_network_tc (TC ingress) and to_network",
                    }
                    .to_owned()
                })
            } else if selection.matches(&name) {
                attach_device(ebpf, &name, link_dir)
                    .map(|()| "from_pod (ingress) and to_pod (egress)".to_owned())
            } else {
                continue;
            };
            match attached {
                Ok(programs) => {
                    info!("attached {programs} to {name}");
                    self.attached.insert(name, index);
                }
                Err(error) => warn!("cannot attach to {name}: {}", error.report()),
            }
        }
        Ok(())
    }
}

/// Attaches "from pod" to the device's ingress and "to pod" to its egress.
/// Pinned links (see [`attach_tc`]) keep the programs attached when the
/// agent exits or is killed, and a new agent swaps its programs into them
/// atomically: traffic never sees a device without the datapath.
fn attach_device(ebpf: &mut Ebpf, device: &str, link_dir: &Path) -> crate::Result<()> {
    attach_tc(ebpf, PROG_FROM_POD, device, TcAttachType::Ingress, link_dir)?;
    attach_tc(ebpf, PROG_TO_POD, device, TcAttachType::Egress, link_dir)
}

/// Attaches to an external device: "from network" on XDP (its link pinned
/// as `DEVICE-xdp`) with, beside it on TC ingress, the program that
/// translates the packets XDP defers because their checksum is left to
/// offload (attached first, so no deferred packet finds it missing); or,
/// in `--nodeport-mode tc`, "from network" on TC ingress alone; and "to
/// network" on TC egress.
fn attach_external(
    ebpf: &mut Ebpf,
    device: &str,
    mode: NodePortMode,
    link_dir: &Path,
) -> crate::Result<()> {
    attach_tc(
        ebpf,
        PROG_TO_NETWORK,
        device,
        TcAttachType::Egress,
        link_dir,
    )?;
    let ingress = match mode {
        NodePortMode::Tc => PROG_FROM_NETWORK_TC,
        NodePortMode::Xdp => PROG_FROM_NETWORK_DEFERRED,
    };
    attach_tc(ebpf, ingress, device, TcAttachType::Ingress, link_dir)?;
    if mode == NodePortMode::Tc {
        return Ok(());
    }
    let program: &mut Xdp = ebpf
        .program_mut(PROG_FROM_NETWORK)
        .ok_or_else(|| Error::MissingProgram {
            program: PROG_FROM_NETWORK.to_owned(),
        })?
        .try_into()?;
    let pin = link_dir.join(format!("{device}-xdp"));
    if adopt_pinned(&pin, |link| {
        let link = XdpLink::try_from(link).context("pinned link is not XDP")?;
        program.attach_to_link(link)?;
        Ok(())
    })? {
        return Ok(());
    }
    let link_id = program
        .attach(device, XdpMode::Default)
        .map_err(|source| Error::Attach {
            program: PROG_FROM_NETWORK.to_owned(),
            target: format!("{device} (XDP)"),
            source: source.into(),
        })?;
    // A bpf_link (kernel 5.9+) can be pinned; a netlink attachment stays
    // on the device by itself.
    if let Ok(link) = FdLink::try_from(program.take_link(link_id)?) {
        link.pin(&pin)
            .with_context(|| format!("pinning link at {}", pin.display()))?;
    }
    Ok(())
}

/// Attaches the TC program `name` to `device` in `direction`: a pinned tcx
/// link (`DEVICE-ingress` / `DEVICE-egress`, bpffs refuses dots in names)
/// where the kernel has tcx (6.6+), a clsact cls_bpf filter through
/// netlink before that ([`attach_netlink`]).
fn attach_tc(
    ebpf: &mut Ebpf,
    name: &str,
    device: &str,
    direction: TcAttachType,
    link_dir: &Path,
) -> crate::Result<()> {
    let has_tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::MissingProgram {
            program: name.to_owned(),
        })?
        .try_into()?;
    let suffix = if direction == TcAttachType::Ingress {
        "ingress"
    } else {
        "egress"
    };
    if has_tcx {
        return attach_pinned(
            program,
            device,
            direction,
            &link_dir.join(format!("{device}-{suffix}")),
        );
    }
    attach_netlink(program, device, direction).map_err(|source| Error::Attach {
        program: name.to_owned(),
        target: format!("{device} {suffix} (clsact, netlink)"),
        source: source.into(),
    })
}

/// Priority of our cls_bpf filters (kernels without tcx): fixed, with
/// [`NETLINK_HANDLE`], so that a new agent finds its predecessor's filter.
const NETLINK_PRIORITY: u16 = 1;
/// Handle of our cls_bpf filters at [`NETLINK_PRIORITY`].
const NETLINK_HANDLE: TcHandle = TcHandle::new(0, 1);

/// The netlink twin of [`attach_pinned`], for kernels without tcx (Debian
/// 12's 6.1): adds clsact, then replaces the program of the filter a
/// previous agent left at our priority and handle (in place, atomically:
/// traffic never sees the device without a filter), or adds that filter.
/// The filter stays when the agent exits, as a pinned tcx link does.
fn attach_netlink(
    program: &mut SchedClassifier,
    device: &str,
    direction: TcAttachType,
) -> crate::Result<()> {
    // Adding clsact twice fails with EEXIST, which is fine.
    let _ = tc::qdisc_add_clsact(device);
    let previous =
        SchedClassifierLink::attached(device, direction, NETLINK_PRIORITY, NETLINK_HANDLE, None)?;
    let link_id = match program.attach_to_link(previous) {
        Ok(link_id) => link_id,
        // No filter there yet (the kernel answers ENOENT to a replace).
        Err(_) => program.attach_with_options(
            device,
            direction,
            TcAttachOptions::Netlink(NlOptions {
                priority: NETLINK_PRIORITY,
                handle: NETLINK_HANDLE,
                ..NlOptions::default()
            }),
        )?,
    };
    // Dropping the link would remove the filter: it is let go of instead,
    // so the datapath keeps working after this agent is gone.
    std::mem::forget(program.take_link(link_id)?);
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
) -> crate::Result<()> {
    if adopt_pinned(pin, |link| {
        let link = SchedClassifierLink::try_from(link).context("pinned link is not a tcx link")?;
        program.attach_to_link(link)?;
        Ok(())
    })? {
        return Ok(());
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

/// Puts a new program into the link pinned at `pin` with `swap` (the link
/// stays attached, only its program changes). `Ok(true)` when done;
/// `Ok(false)` when there is no pin, or when the pinned link is stale (its
/// device is gone): that pin is removed, for a fresh attach.
fn adopt_pinned(pin: &Path, swap: impl FnOnce(FdLink) -> crate::Result<()>) -> crate::Result<bool> {
    let Ok(pinned) = PinnedLink::from_pin(pin) else {
        return Ok(false);
    };
    match swap(FdLink::from(pinned)) {
        Ok(()) => Ok(true),
        Err(e) => {
            warn!(
                "pinned link {} is stale ({}); attaching afresh",
                pin.display(),
                e.report()
            );
            std::fs::remove_file(pin).on_path("removing stale pin", pin)?;
            Ok(false)
        }
    }
}
