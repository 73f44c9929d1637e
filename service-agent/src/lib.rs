//! The `service-agent` library: everything but argument parsing.
//!
//! Pipeline: a [`source`] yields Kubernetes objects as a
//! [`source::ClusterState`]; [`translate`] turns them into the frontends to
//! serve; [`state`] lays those out as map entries with stable ids and diffs
//! them against what the maps hold; [`sync`] applies the ordered writes
//! through the [`state::MapWriter`] trait, implemented by the kernel maps in
//! [`datapath`]. [`run`] drives it; [`list`] reads the live maps back.

pub mod cli;
pub mod datapath;
pub mod desired;
pub mod list;
pub mod pipeline;
pub mod run;
pub mod source;
pub mod state;
pub mod status;
pub mod sync;
pub mod telemetry;
pub mod translate;
