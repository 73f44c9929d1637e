//! The library's error type.
//!
//! Each variant says what failed (a path, a map, a program, the Kubernetes
//! API, an input being parsed, the configuration) and chains the error that
//! caused it as its [`source`](std::error::Error::source), so the CLI can
//! print the whole chain. Where no variant fits, [`Context`] wraps any error
//! with a sentence of what was being done ([`Error::Context`]), like
//! `anyhow`'s `.context()`.

use std::{fmt::Display, io, path::PathBuf};

/// Any error the error chain can hold.
pub type BoxedError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result of the library's fallible operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in the agent library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or folder operation on `path` failed.
    #[error("{action} {}", path.display())]
    Io {
        /// What was being done, as a verb ("reading", "creating").
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The system's answer.
        source: io::Error,
    },
    /// A system call or socket operation with no path to name failed.
    #[error(transparent)]
    System(#[from] io::Error),
    /// The loaded eBPF object has no map called `map`.
    #[error("map {map} missing from the eBPF object")]
    MissingMap {
        /// The map's name.
        map: String,
    },
    /// The loaded eBPF object has no program called `program`.
    #[error("program {program} missing from the eBPF object")]
    MissingProgram {
        /// The program's name.
        program: String,
    },
    /// An operation on the BPF map `map` failed.
    #[error("{action} the {map} map")]
    Map {
        /// What was being done ("reading", "opening").
        action: &'static str,
        /// The map's name.
        map: String,
        /// aya's error, with the kernel's answer inside.
        source: Box<aya::maps::MapError>,
    },
    /// A BPF map operation failed where the map is named by the error
    /// around it (a [`Error::Context`]), or by the operation itself.
    #[error(transparent)]
    MapOperation(Box<aya::maps::MapError>),
    /// The kernel refused to load the eBPF program `program`.
    #[error("the kernel refused program {program}")]
    ProgramLoad {
        /// The program's name.
        program: String,
        /// aya's error, with the kernel's or verifier's answer inside.
        source: Box<aya::programs::ProgramError>,
    },
    /// Attaching the eBPF program `program` to `target` failed.
    #[error("attaching {program} to {target}")]
    Attach {
        /// The program's name.
        program: String,
        /// Where: a device and hook, a cgroup.
        target: String,
        /// Why (aya's error, a netlink or pin failure).
        source: BoxedError,
    },
    /// A program operation failed where the program is named by the error
    /// around it.
    #[error(transparent)]
    ProgramOperation(Box<aya::programs::ProgramError>),
    /// Handling a bpf_link (pinning, converting, adopting) failed.
    #[error(transparent)]
    Link(Box<aya::programs::links::LinkError>),
    /// Pinning a BPF object failed.
    #[error(transparent)]
    Pin(Box<aya::pin::PinError>),
    /// Loading the eBPF object (creating or adopting its pinned maps,
    /// relocating its programs) failed.
    #[error("loading the eBPF object with maps pinned in {}", pin_path.display())]
    Load {
        /// The bpffs folder of the pinned maps.
        pin_path: PathBuf,
        /// aya's error.
        source: Box<aya::EbpfError>,
    },
    /// A request to the Kubernetes API failed.
    #[error("Kubernetes API: {action}")]
    Kube {
        /// What was asked ("connecting", "listing Services").
        action: String,
        /// kube-rs's error.
        source: Box<kube::Error>,
    },
    /// Input could not be parsed; `input` names it (a file, a reply).
    #[error("parsing {input}")]
    Parse {
        /// The input: a path, or what the text was.
        input: String,
        /// The parser's error.
        source: BoxedError,
    },
    /// Writing JSON (the status file, a listing) failed.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// The configuration (flags, the machine's set-up) cannot work; the
    /// message says why and what to change.
    #[error("{0}")]
    Config(String),
    /// What was found does not match what this binary expects (pinned maps
    /// of another layout, a link of another kind); the message says which.
    #[error("{0}")]
    Unexpected(String),
    /// An error of another kind, with what was being done.
    #[error("{what}")]
    Context {
        /// What was being done, as a sentence fragment.
        what: String,
        /// Why it failed.
        source: BoxedError,
    },
}

/// `?` on aya's errors: boxed, so that a `Result` stays small.
macro_rules! from_boxed {
    ($($variant:ident($error:ty)),* $(,)?) => {
        $(
            impl From<$error> for Error {
                fn from(error: $error) -> Self {
                    Error::$variant(Box::new(error))
                }
            }
        )*
    };
}

from_boxed!(
    MapOperation(aya::maps::MapError),
    ProgramOperation(aya::programs::ProgramError),
    Link(aya::programs::links::LinkError),
    Pin(aya::pin::PinError),
);

impl Error {
    /// A map operation `action` ("reading", ...) on the map `map` failed
    /// with `source`: for `map_err`.
    pub fn map(action: &'static str, map: &str) -> impl FnOnce(aya::maps::MapError) -> Error {
        let map = map.to_owned();
        move |source| Error::Map {
            action,
            map,
            source: Box::new(source),
        }
    }

    /// The error with its causes, joined by `: `, for one log line (as
    /// `anyhow` prints with `{:#}`).
    pub fn report(&self) -> Report<'_> {
        Report(self)
    }
}

/// An error and its causes on one line: `outer: cause: root cause`.
#[derive(Debug, Clone, Copy)]
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'static));

impl Display for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(cause) = next {
            write!(f, ": {cause}")?;
            next = cause.source();
        }
        Ok(())
    }
}

/// Adds what was being done to a failure: `.context("reading the maps")`.
pub trait Context<T> {
    /// Wraps the error in [`Error::Context`] with `what`.
    fn context(self, what: impl Display) -> Result<T>;

    /// [`Context::context`] with the text built only on failure.
    fn with_context<D: Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E> Context<T> for std::result::Result<T, E>
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn context(self, what: impl Display) -> Result<T> {
        self.map_err(|source| Error::Context {
            what: what.to_string(),
            source: Box::new(source),
        })
    }

    fn with_context<D: Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|source| Error::Context {
            what: what().to_string(),
            source: Box::new(source),
        })
    }
}

/// Adds the path and what was being done to an I/O failure
/// ([`Error::Io`]).
pub trait IoContext<T> {
    /// `action` on `path` failed: `.on_path("reading", &path)`.
    fn on_path(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn on_path(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            action,
            path: path.into(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages of a chain, outermost first, as the CLI prints them.
    fn chain(error: &(dyn std::error::Error + 'static)) -> Vec<String> {
        let mut out = vec![error.to_string()];
        let mut next = error.source();
        while let Some(e) = next {
            out.push(e.to_string());
            next = e.source();
        }
        out
    }

    #[test]
    fn context_chains_the_cause_without_repeating_it() {
        let inner: Result<()> = Err(io::Error::from_raw_os_error(libc::ENOENT))
            .on_path("reading", "/proc/sys/net/ipv4/ip_local_port_range");
        let outer = inner.context("reserving the SNAT ports").unwrap_err();
        assert_eq!(
            chain(&outer),
            [
                "reserving the SNAT ports",
                "reading /proc/sys/net/ipv4/ip_local_port_range",
                "No such file or directory (os error 2)",
            ]
        );
    }

    #[test]
    fn a_report_is_the_chain_on_one_line() {
        let error = Err::<(), _>(io::Error::from_raw_os_error(libc::EEXIST))
            .context("binding 127.0.0.1:10256")
            .unwrap_err();
        assert_eq!(
            error.report().to_string(),
            "binding 127.0.0.1:10256: File exists (os error 17)"
        );
    }

    #[test]
    fn a_map_error_names_the_map() {
        let error = Error::Map {
            action: "reading",
            map: "SVC_FRONTENDS".into(),
            source: Box::new(aya::maps::MapError::KeyNotFound),
        };
        assert_eq!(chain(&error)[0], "reading the SVC_FRONTENDS map");
        assert_eq!(chain(&error).len(), 2);
    }
}
