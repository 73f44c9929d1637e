//! The `service-agent` library: everything but argument parsing.
//!
//! The folders follow the pipeline, and imports only point down it:
//!
//! - [`source`]: where the objects come from (a YAML file, or the
//!   Kubernetes API), sent as events;
//! - [`reconcile`]: the events' cluster state, translated per Service into
//!   the frontends to serve, laid out as map entries, diffed, and written in
//!   a safe order;
//! - [`datapath`]: the kernel side: the eBPF object, loading, attaching,
//!   and the maps (their contents as plain data in [`datapath::model`],
//!   written through the narrow [`datapath::model::MapWriter`] trait).
//!
//! Beside them, [`ops`] holds what operators see: metrics and health (which
//! the pipeline updates), the status file and `list`. [`cli`] and [`run`]
//! wire everything together. Every fallible operation returns the library's
//! own [`Error`] (see [`error`]).

pub mod cli;
pub mod datapath;
pub mod error;
pub mod ops;
pub mod reconcile;
pub mod run;
pub mod source;

pub use error::{Error, Result};
