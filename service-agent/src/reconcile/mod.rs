//! From the cluster's objects to ordered map writes: the sources' events
//! carry compact [`records`] and build a [`cluster::ClusterState`]; [`translate`] turns one Service into
//! the frontends to serve (a pure function); [`desired`] lays those out as
//! map entries with stable ids; [`diff`] orders the writes; [`sync`] applies
//! them through [`crate::datapath::model::MapWriter`] and, with
//! [`repair`], repairs drift; [`pipeline`] drives it all from events.
//! [`flows`] holds the rules for tracked flows (what a sync changed for
//! them, what a collector pass deletes), which the conntrack [`collector`]
//! applies on its own thread.

mod backend_table;
pub mod cluster;
pub mod collector;
pub mod desired;
pub mod diff;
pub mod flows;
pub mod pipeline;
pub mod records;
pub mod repair;
pub mod sync;
pub mod translate;
