//! Beside the pipeline, for operators: [`metrics`] and [`health`] (updated
//! by the pipeline, served by [`server`]), the per-Service [`status`] file,
//! and `service-agent list` ([`list`]), which reads the live maps.

pub mod health;
pub mod list;
pub mod metrics;
pub mod server;
pub mod status;
