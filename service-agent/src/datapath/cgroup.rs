//! Socket-LB: attaching the cgroup socket programs (`sock_connect4`,
//! `sock_sendmsg4`, `sock_recvmsg4`, `sock_getpeer4` and their IPv6
//! twins `sock_connect6`, ...) to a cgroup v2, so
//! processes on the node itself (hostNetwork pods, the kubelet, node
//! daemons) reach Services: their sockets are sent straight to a backend
//! (see `service-ebpf/src/sock.rs`).
//!
//! The hooks apply to every process in the cgroup (`--cgroup-path`) and in
//! every cgroup below it, whatever its network namespace. The default, the
//! root of the cgroup v2 hierarchy (`/sys/fs/cgroup`), is every process on
//! the host: what host-networked processes need. On a host with the hybrid
//! layout, the cgroup v2 root below it (`/sys/fs/cgroup/unified`) is used.
//! In a container, mount the host's cgroup2 hierarchy and point
//! `--cgroup-path` at it: a container's own `/sys/fs/cgroup` is usually its
//! own cgroup only.
//! `--cgroup-path none` disables socket-LB and removes the links a previous
//! agent pinned.
//!
//! Each program is attached through a bpf_link (kernel 5.7+) pinned under
//! the pin folder as `links/cgroup-connect4`, `links/cgroup-sendmsg4`,
//! `links/cgroup-recvmsg4` and `links/cgroup-getpeername4`, and the same
//! with `6` for IPv6 (bpffs refuses dots in names), so the hooks stay when the agent exits. A restarted
//! agent adopts each pinned link: it swaps its new program into the link
//! (`BPF_LINK_UPDATE`) atomically, no socket ever sees the cgroup without
//! the hook. aya 0.14 has no `attach_to_link` for `CgroupSockAddr`, and
//! gives no access to a link's fd, so the pin is opened, checked and updated
//! here with the raw `bpf(2)` commands. A pinned link attached to another
//! cgroup (the flag changed) or to another hook, or a defunct one (its
//! cgroup was removed), is replaced: the new link is attached first, then
//! the old pin removed, so there is no gap either.

use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use log::{info, warn};

use super::{
    PROG_SOCK_CONNECT4, PROG_SOCK_CONNECT6, PROG_SOCK_GETPEER4, PROG_SOCK_GETPEER6,
    PROG_SOCK_RECVMSG4, PROG_SOCK_RECVMSG6, PROG_SOCK_SENDMSG4, PROG_SOCK_SENDMSG6,
};
use crate::error::{Context as _, Error, IoContext as _};

/// Default `--cgroup-path`: the root of the cgroup v2 hierarchy, so every
/// process on the host.
pub const DEFAULT_CGROUP_PATH: &str = "/sys/fs/cgroup";

/// The value of `--cgroup-path` that disables socket-LB.
pub const CGROUP_PATH_NONE: &str = "none";

/// `--cgroup-path`: the cgroup v2 the socket programs are attached to, or
/// none (`none`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupPath(pub Option<PathBuf>);

impl std::str::FromStr for CgroupPath {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(CgroupPath(
            (s != CGROUP_PATH_NONE && !s.is_empty()).then(|| PathBuf::from(s)),
        ))
    }
}

impl std::fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(path) => write!(f, "{}", path.display()),
            None => f.write_str(CGROUP_PATH_NONE),
        }
    }
}

/// One socket program: its name in the object, its kernel attach type
/// (`enum bpf_attach_type`, to check an adopted link) and its link's pin name.
struct SocketProgram {
    name: &'static str,
    attach_type: u32,
    pin: &'static str,
}

/// The socket programs, in attach order: the reverse hooks of both
/// families first, so a socket is never translated without its peer being
/// restored.
const SOCKET_PROGRAMS: [SocketProgram; 8] = [
    SocketProgram {
        name: PROG_SOCK_RECVMSG4,
        attach_type: 19, // BPF_CGROUP_UDP4_RECVMSG
        pin: "cgroup-recvmsg4",
    },
    SocketProgram {
        name: PROG_SOCK_GETPEER4,
        attach_type: 29, // BPF_CGROUP_INET4_GETPEERNAME
        pin: "cgroup-getpeername4",
    },
    SocketProgram {
        name: PROG_SOCK_RECVMSG6,
        attach_type: 20, // BPF_CGROUP_UDP6_RECVMSG
        pin: "cgroup-recvmsg6",
    },
    SocketProgram {
        name: PROG_SOCK_GETPEER6,
        attach_type: 30, // BPF_CGROUP_INET6_GETPEERNAME
        pin: "cgroup-getpeername6",
    },
    SocketProgram {
        name: PROG_SOCK_CONNECT4,
        attach_type: 10, // BPF_CGROUP_INET4_CONNECT
        pin: "cgroup-connect4",
    },
    SocketProgram {
        name: PROG_SOCK_SENDMSG4,
        attach_type: 14, // BPF_CGROUP_UDP4_SENDMSG
        pin: "cgroup-sendmsg4",
    },
    SocketProgram {
        name: PROG_SOCK_CONNECT6,
        attach_type: 11, // BPF_CGROUP_INET6_CONNECT
        pin: "cgroup-connect6",
    },
    SocketProgram {
        name: PROG_SOCK_SENDMSG6,
        attach_type: 15, // BPF_CGROUP_UDP6_SENDMSG
        pin: "cgroup-sendmsg6",
    },
];

/// The pin paths of the socket programs' links under `link_dir`.
pub fn link_pins(link_dir: &Path) -> Vec<PathBuf> {
    SOCKET_PROGRAMS
        .iter()
        .map(|p| link_dir.join(p.pin))
        .collect()
}

/// Attaches the socket programs to `cgroup` (or, with `None`, removes the
/// links a previous agent pinned). The programs must be loaded
/// ([`super::load`] does it).
pub fn configure(ebpf: &mut Ebpf, cgroup: &CgroupPath, link_dir: &Path) -> crate::Result<()> {
    match &cgroup.0 {
        Some(path) => {
            attach(ebpf, path, link_dir)?;
            info!(
                "socket-LB attached to cgroup {} (every process in it and below)",
                path.display()
            );
        }
        None => {
            let removed = detach(link_dir)?;
            info!(
                "socket-LB disabled (--cgroup-path none){}",
                if removed > 0 {
                    "; removed the pinned links of a previous agent"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

/// Attaches every socket program to the cgroup v2 at `cgroup`, adopting
/// the links pinned under `link_dir` (see the module docs).
pub fn attach(ebpf: &mut Ebpf, cgroup: &Path, link_dir: &Path) -> crate::Result<()> {
    let cgroup = &unified(cgroup);
    let dir = File::open(cgroup).with_context(|| {
        format!(
            "opening cgroup {} (--cgroup-path; `none` disables socket-LB)",
            cgroup.display()
        )
    })?;
    let cgroup_id = cgroup_id(&dir, cgroup)?;
    for spec in &SOCKET_PROGRAMS {
        attach_one(ebpf, spec, &dir, cgroup, cgroup_id, link_dir)
            .with_context(|| format!("attaching {} to cgroup {}", spec.name, cgroup.display()))?;
    }
    Ok(())
}

/// `path`, or on a host with the hybrid layout (cgroup v1 controllers on a
/// tmpfs at `/sys/fs/cgroup`, cgroup v2 at `/sys/fs/cgroup/unified`), the
/// cgroup v2 root below it.
pub fn unified(path: &Path) -> PathBuf {
    let hybrid = path.join("unified");
    if !is_cgroup2(path) && is_cgroup2(&hybrid) {
        return hybrid;
    }
    path.to_owned()
}

/// Whether `path` is on a cgroup v2 filesystem.
pub fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Removes the pinned socket links under `link_dir`, which detaches them
/// (no one else holds them). Returns how many there were.
pub fn detach(link_dir: &Path) -> crate::Result<usize> {
    let mut removed = 0;
    for pin in link_pins(link_dir) {
        match std::fs::remove_file(&pin) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).on_path("removing", pin),
        }
    }
    Ok(removed)
}

/// The id of the cgroup v2 open as `dir`: its inode number on cgroup2,
/// which is what the kernel reports as a cgroup link's `cgroup_id`.
fn cgroup_id(dir: &File, path: &Path) -> crate::Result<u64> {
    let fs = nix::sys::statfs::fstatfs(dir.as_fd())
        .with_context(|| format!("statfs {}", path.display()))?;
    if fs.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Err(Error::Config(format!(
            "{} is not a cgroup v2 folder (socket-LB needs the unified hierarchy; \
             `--cgroup-path none` disables it)",
            path.display()
        )));
    }
    Ok(dir
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

fn attach_one(
    ebpf: &mut Ebpf,
    spec: &SocketProgram,
    dir: &File,
    cgroup: &Path,
    cgroup_id: u64,
    link_dir: &Path,
) -> crate::Result<()> {
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(spec.name)
        .ok_or_else(|| Error::MissingProgram {
            program: spec.name.to_owned(),
        })?
        .try_into()?;
    let pin = link_dir.join(spec.pin);
    let mut stale = false;
    if pin.exists() {
        let prog_fd = program.fd()?.as_fd().as_raw_fd();
        match sys::adopt(&pin, prog_fd, cgroup_id, spec.attach_type) {
            Ok(Adoption::Updated) => return Ok(()),
            Ok(Adoption::Elsewhere) => {
                info!(
                    "pinned link {} is attached elsewhere; re-attaching to {}",
                    pin.display(),
                    cgroup.display()
                );
                stale = true;
            }
            Err(e) => {
                warn!(
                    "pinned link {} is stale ({}); attaching afresh",
                    pin.display(),
                    e.report()
                );
                stale = true;
            }
        }
    }
    // Flags 0: a bpf_link always joins the cgroup's list of programs
    // (multi-attach), next to other links and other tools' programs.
    let link_id = program
        .attach(dir, CgroupAttachMode::Single)
        .context("attaching to the cgroup")?;
    let link: FdLink = program
        .take_link(link_id)?
        .try_into()
        .context("the kernel has no bpf_link for cgroups (5.7+ needed)")?;
    if stale {
        std::fs::remove_file(&pin).on_path("removing stale pin", &pin)?;
    }
    link.pin(&pin)
        .with_context(|| format!("pinning link at {}", pin.display()))?;
    Ok(())
}

/// What adopting a pinned link did.
#[derive(Debug, PartialEq, Eq)]
enum Adoption {
    /// The link is on the wanted cgroup and hook: its program was swapped.
    Updated,
    /// The link is on another cgroup or hook: left alone.
    Elsewhere,
}

/// The raw `bpf(2)` commands aya 0.14 does not expose for cgroup links.
mod sys {
    use super::*;
    use crate::datapath::sys::bpf;

    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    const BPF_LINK_TYPE_CGROUP: u32 = 3;

    /// `bpf_attr` for `BPF_OBJ_GET`.
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }

    /// `bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }

    /// The head of `struct bpf_link_info` with its `cgroup` member.
    #[repr(C)]
    #[derive(Default)]
    struct CgroupLinkInfo {
        link_type: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        cgroup_id: u64,
        attach_type: u32,
        _pad2: u32,
    }

    /// `bpf_attr` for `BPF_LINK_UPDATE`.
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }

    /// Opens the link pinned at `pin`; if it is a cgroup link on
    /// `cgroup_id` and `attach_type`, puts the program `prog_fd` into it.
    pub(super) fn adopt(
        pin: &Path,
        prog_fd: i32,
        cgroup_id: u64,
        attach_type: u32,
    ) -> crate::Result<Adoption> {
        let path = CString::new(pin.as_os_str().as_bytes())
            .with_context(|| format!("pin path {}", pin.display()))?;
        let mut get = ObjGetAttr {
            pathname: path.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
        };
        let fd = bpf(BPF_OBJ_GET, &mut get).context("BPF_OBJ_GET")?;
        // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
        let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut info = CgroupLinkInfo::default();
        let mut query = InfoAttr {
            bpf_fd: link.as_raw_fd() as u32,
            info_len: std::mem::size_of::<CgroupLinkInfo>() as u32,
            info: &mut info as *mut CgroupLinkInfo as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut query).context("BPF_OBJ_GET_INFO_BY_FD")?;
        if info.link_type != BPF_LINK_TYPE_CGROUP {
            return Err(Error::Unexpected(format!(
                "not a cgroup link (link type {})",
                info.link_type
            )));
        }
        if info.cgroup_id == 0 {
            return Err(Error::Unexpected("its cgroup is gone".to_owned()));
        }
        if info.cgroup_id != cgroup_id || info.attach_type != attach_type {
            return Ok(Adoption::Elsewhere);
        }
        let mut update = LinkUpdateAttr {
            link_fd: link.as_raw_fd() as u32,
            new_prog_fd: prog_fd as u32,
            flags: 0,
            old_prog_fd: 0,
        };
        bpf(BPF_LINK_UPDATE, &mut update).context("BPF_LINK_UPDATE")?;
        Ok(Adoption::Updated)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn cgroup_flag(extra: &[&str]) -> CgroupPath {
        let mut args = vec!["service-agent", "run", "--source", "kube"];
        args.extend_from_slice(extra);
        match Cli::try_parse_from(args).expect("valid flags").command {
            Command::Run(run) => run.cgroup_path,
            Command::List(_) | Command::Trace(_) => unreachable!(),
        }
    }

    #[test]
    fn cgroup_path_defaults_to_the_root_and_none_disables() {
        assert_eq!(
            cgroup_flag(&[]),
            CgroupPath(Some(PathBuf::from(DEFAULT_CGROUP_PATH)))
        );
        assert_eq!(
            cgroup_flag(&["--cgroup-path", "/sys/fs/cgroup/node.slice"]),
            CgroupPath(Some(PathBuf::from("/sys/fs/cgroup/node.slice")))
        );
        assert_eq!(cgroup_flag(&["--cgroup-path", "none"]), CgroupPath(None));
        assert_eq!(CgroupPath(None).to_string(), "none");
        assert_eq!(
            CgroupPath(Some(PathBuf::from("/a/b"))).to_string(),
            "/a/b".to_owned()
        );
    }

    #[test]
    fn every_socket_program_of_the_layout_is_attached_on_its_own_hook() {
        use std::collections::BTreeSet;

        use service_common::{PROGRAMS, ProgramKind};

        let listed: BTreeSet<&str> = PROGRAMS
            .iter()
            .filter(|spec| spec.kind == ProgramKind::CgroupSockAddr)
            .map(|spec| spec.name)
            .collect();
        let attached: BTreeSet<&str> = SOCKET_PROGRAMS.iter().map(|p| p.name).collect();
        assert_eq!(attached, listed);
        let hooks: BTreeSet<u32> = SOCKET_PROGRAMS.iter().map(|p| p.attach_type).collect();
        assert_eq!(hooks.len(), SOCKET_PROGRAMS.len());
        // Each program's family is the one of its hook and its pin.
        for program in &SOCKET_PROGRAMS {
            let family = &program.name[program.name.len() - 1..];
            assert!(program.pin.ends_with(family), "{}", program.pin);
        }
    }

    #[test]
    fn every_socket_program_has_its_own_pin_without_dots() {
        let pins = link_pins(Path::new("/pins/links"));
        assert_eq!(pins.len(), 8);
        let names: std::collections::BTreeSet<_> = pins
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(names.len(), 8);
        assert!(
            names
                .iter()
                .all(|n| n.starts_with("cgroup-") && !n.contains('.'))
        );
    }
}
