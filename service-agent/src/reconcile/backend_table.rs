//! The desired backends by id, as a table indexed by id.
//!
//! Backend ids are small integers handed out below the backends map's
//! capacity, so the desired state keeps its backends the way the kernel's
//! array does: in pages of [`PAGE`] slots indexed by id, a page allocated
//! when an id in it is first used. A `BTreeMap` by id took about 78 B per
//! backend at 100k Services x 10 endpoints (half-full nodes, as ids arrive
//! in order); a slot is 32 B.

use service_common::{BackendId, BackendValue};

/// A backend in the desired state: its value, and how many Services use it.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackendUse {
    /// The backends map's value.
    pub value: BackendValue,
    /// Services using it.
    pub services: u32,
}

/// Slots per page: 64 KiB, below glibc's threshold for mmap'ed chunks.
const PAGE: usize = 2048;

/// Backends by id: the desired state's part of the backends map. A slot
/// holds a backend when its value exists ([`BackendValue::exists`]: an
/// all-zero value is none, as in the kernel's array).
#[derive(Clone, Debug, Default)]
pub struct BackendTable {
    /// Page `i` holds ids `i * PAGE ..`; `None` until one of them is used.
    pages: Vec<Option<Box<[BackendUse]>>>,
    /// Slots holding a backend.
    len: usize,
}

impl BackendTable {
    fn slot(&self, id: BackendId) -> Option<&BackendUse> {
        let page = self.pages.get(id as usize / PAGE)?.as_ref()?;
        Some(&page[id as usize % PAGE])
    }

    fn slot_mut(&mut self, id: BackendId) -> Option<&mut BackendUse> {
        let page = self.pages.get_mut(id as usize / PAGE)?.as_mut()?;
        Some(&mut page[id as usize % PAGE])
    }

    /// The backend `id`, if the table has it.
    pub fn get(&self, id: &BackendId) -> Option<&BackendUse> {
        self.slot(*id).filter(|used| used.value.exists())
    }

    /// The backend `id` to change, if the table has it.
    pub fn get_mut(&mut self, id: &BackendId) -> Option<&mut BackendUse> {
        self.slot_mut(*id).filter(|used| used.value.exists())
    }

    /// Whether the table has backend `id`.
    pub fn contains_key(&self, id: &BackendId) -> bool {
        self.get(id).is_some()
    }

    /// Sets backend `id` (its value must exist).
    pub fn insert(&mut self, id: BackendId, used: BackendUse) {
        debug_assert!(used.value.exists(), "an all-zero backend value");
        let page = id as usize / PAGE;
        if self.pages.len() <= page {
            self.pages.resize(page + 1, None);
        }
        let slot = &mut self.pages[page]
            .get_or_insert_with(|| vec![BackendUse::default(); PAGE].into_boxed_slice())
            [id as usize % PAGE];
        if !slot.value.exists() {
            self.len += 1;
        }
        *slot = used;
    }

    /// Removes backend `id`.
    pub fn remove(&mut self, id: &BackendId) {
        if let Some(slot) = self.slot_mut(*id)
            && slot.value.exists()
        {
            *slot = BackendUse::default();
            self.len -= 1;
        }
    }

    /// How many backends the table has.
    pub fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(port: u16, services: u32) -> BackendUse {
        BackendUse {
            value: BackendValue {
                port,
                family: 4,
                ..BackendValue::default()
            },
            services,
        }
    }

    #[test]
    fn ids_across_pages_are_kept_counted_and_removed() {
        let mut table = BackendTable::default();
        assert!(table.get(&7).is_none());
        table.insert(7, used(80, 1));
        table.insert(3 * PAGE as u32 + 1, used(81, 2));
        assert_eq!(table.len(), 2);
        assert_eq!(table.get(&7).unwrap().value.port, 80);
        assert!(table.contains_key(&(3 * PAGE as u32 + 1)));
        assert!(!table.contains_key(&8));
        assert!(!table.contains_key(&(2 * PAGE as u32)));
        table.get_mut(&7).unwrap().services += 1;
        // A backend whose count dropped to 0 is still there until removed.
        table.get_mut(&(3 * PAGE as u32 + 1)).unwrap().services = 0;
        table.remove(&(3 * PAGE as u32 + 1));
        assert_eq!(table.len(), 1);
        table.insert(3 * PAGE as u32 + 1, used(81, 2));
        table.insert(7, used(90, 3));
        assert_eq!(table.len(), 2);
        assert_eq!(table.get(&7).unwrap().value.port, 90);
        table.remove(&7);
        table.remove(&7);
        table.remove(&123_456);
        assert_eq!(table.len(), 1);
        assert!(table.get(&7).is_none());
        assert!(table.get_mut(&7).is_none());
    }
}
