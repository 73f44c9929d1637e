//! The pinned array that keeps the id allocators' position across agent
//! restarts (`SVC_ID_CURSORS`, one [`IdCursors`]).

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use service_common::{IdCursors, MAP_ID_CURSORS};

/// The id cursor array, taken from the loaded object.
pub struct IdCursorMap(Array<MapData, IdCursors>);

impl IdCursorMap {
    /// Takes the array out of a loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let map = ebpf
            .take_map(MAP_ID_CURSORS)
            .with_context(|| format!("map {MAP_ID_CURSORS} missing from the eBPF object"))?;
        Ok(IdCursorMap(Array::try_from(map)?))
    }

    /// The cursors a previous agent left (all zero when none did).
    pub fn load(&self) -> IdCursors {
        self.0.get(&0, 0).unwrap_or_default()
    }

    /// Keeps `cursors` for the next agent.
    pub fn store(&mut self, cursors: &IdCursors) -> anyhow::Result<()> {
        self.0
            .set(0, cursors, 0)
            .context("writing the id allocators' position")
    }
}
