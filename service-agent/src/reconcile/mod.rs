//! From the cluster's objects to ordered map writes: the sources' events
//! carry compact [`records`] and build a [`cluster::ClusterState`]; [`translate`] turns one Service into
//! the frontends to serve (a pure function); [`desired`] lays those out as
//! map entries with stable ids; [`diff`] orders the writes; [`sync`] applies
//! them through [`crate::datapath::model::MapWriter`] and, with
//! [`repair`], repairs drift; [`pipeline`] drives it all from events.
//! [`flows`] says what a sync changed that tracked flows must follow.

pub mod cluster;
pub mod desired;
pub mod diff;
pub mod flows;
pub mod pipeline;
pub mod records;
pub mod repair;
pub mod sync;
pub mod translate;
