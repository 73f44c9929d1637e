//! Beside the pipeline, for operators: [`metrics`] and [`health`] (updated
//! by the pipeline, served by [`server`]), the per-Service [`status`] file,
//! `service-agent list` ([`list`]), which reads the live maps, and
//! `service-agent trace` ([`trace`]), which runs a packet through the real
//! programs on a snapshot of them.

pub mod health;
pub mod list;
pub mod metrics;
pub mod server;
pub mod status;
pub mod trace;
