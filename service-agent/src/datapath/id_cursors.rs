//! The pinned array that keeps the id allocators' position across agent
//! restarts (`SVC_ID_CURSORS`, one [`IdCursors`]).

use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use service_common::{IdCursors, MAP_ID_CURSORS};

use crate::error::{Context as _, Error};

/// The id cursor array, taken from the loaded object.
pub struct IdCursorMap(Array<MapData, IdCursors>);

impl IdCursorMap {
    /// Takes the array out of a loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> crate::Result<Self> {
        let map = ebpf
            .take_map(MAP_ID_CURSORS)
            .ok_or_else(|| Error::MissingMap {
                map: MAP_ID_CURSORS.to_owned(),
            })?;
        Ok(IdCursorMap(Array::try_from(map)?))
    }

    /// The cursors a previous agent left (all zero when none did).
    pub fn load(&self) -> IdCursors {
        self.0.get(&0, 0).unwrap_or_default()
    }

    /// Keeps `cursors` for the next agent.
    pub fn store(&mut self, cursors: &IdCursors) -> crate::Result<()> {
        self.0
            .set(0, cursors, 0)
            .context("writing the id allocators' position")
    }
}
