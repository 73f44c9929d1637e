//! The conntrack map as the agent's collector sees it: read in batches,
//! entries deleted or replaced one flow at a time, through the narrow
//! [`ConntrackTable`] trait, implemented by the kernel map
//! ([`ConntrackMap`]) and by [`MemoryConntrack`] in memory, so what the
//! collector decides is tested without a kernel. Also the agent's clock,
//! the one the datapath stamps entries with.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    io,
    os::fd::AsFd as _,
    path::Path,
};

use aya::maps::{HashMap, IterableMap as _, MapData, PerCpuArray};
use service_common::{
    AffinityKey, AffinityValue, ConntrackKey, ConntrackValue, DatapathCounter, MAP_AFFINITY,
    MAP_CONNTRACK, MAP_COUNTERS, MAP_REVNAT, RevNatId, RevNatValue, mono_seconds,
};

use super::{
    maps::{io_error, open_pinned},
    sys,
};
use crate::error::Context as _;

/// Entries read per batch: bounds the buffers and the time between reading
/// an entry and acting on it.
pub const SCAN_BATCH: usize = 4096;

/// Where a walk of the table stands.
#[derive(Debug, Default)]
pub struct ScanCursor {
    /// Batch reads: the kernel's position.
    batch: sys::BatchCursor,
    /// Key by key (kernels without batch reads, and the in-memory table):
    /// the keys left to read, once listed.
    keys: Option<VecDeque<ConntrackKey>>,
    /// The walk has reached the end.
    done: bool,
}

/// The conntrack map and the rev-NAT map its entries name, as the
/// collector uses them.
pub trait ConntrackTable {
    /// The conntrack map's capacity.
    fn capacity(&self) -> u32;

    /// Reads the next batch of entries into `batch` (cleared first),
    /// continuing from `cursor`; `false` once the walk is over (the last
    /// batch may be empty). Entries may be deleted between batches.
    fn next_batch(
        &mut self,
        cursor: &mut ScanCursor,
        batch: &mut Vec<(ConntrackKey, ConntrackValue)>,
    ) -> io::Result<bool>;

    /// The entry of `key`, if present.
    fn get(&self, key: &ConntrackKey) -> Option<ConntrackValue>;

    /// Deletes `keys`; absent ones are skipped.
    fn delete(&mut self, keys: &[ConntrackKey]) -> io::Result<()>;

    /// Replaces the entry of `key` with `value`, only if it exists; whether
    /// it did.
    fn replace(&mut self, key: &ConntrackKey, value: &ConntrackValue) -> bool;

    /// The rev-NAT map: the frontend of each rev-NAT id in use.
    fn frontends(&self) -> io::Result<BTreeMap<RevNatId, RevNatValue>>;

    /// Deletes the session-affinity entries (`SVC_AFFINITY`) whose
    /// frontend's rev-NAT id is in `rev_nat_ids`; how many it deleted.
    /// The datapath alone writes them and the LRU map would keep them
    /// until evicted: an id handed out again must not meet them.
    fn forget_affinity(&mut self, rev_nat_ids: &BTreeSet<RevNatId>) -> io::Result<u64>;

    /// The rev-NAT ids the session-affinity entries name.
    fn affinity_rev_nat_ids(&self) -> io::Result<BTreeSet<RevNatId>>;
}

/// The kernel's conntrack and rev-NAT maps, opened from their pins.
pub struct ConntrackMap {
    conntrack: HashMap<MapData, ConntrackKey, ConntrackValue>,
    revnat: HashMap<MapData, RevNatId, RevNatValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    capacity: u32,
    keys: Vec<ConntrackKey>,
    values: Vec<ConntrackValue>,
    /// The kernel has no batch reads for this map: walk key by key.
    key_by_key: bool,
}

impl ConntrackMap {
    /// Opens the maps pinned under `pin_path`.
    pub fn open(pin_path: &Path) -> crate::Result<Self> {
        let conntrack: HashMap<MapData, ConntrackKey, ConntrackValue> =
            HashMap::try_from(open_pinned(pin_path, MAP_CONNTRACK)?)
                .context("the conntrack map")?;
        let capacity = conntrack
            .map()
            .info()
            .context("reading the conntrack map's capacity")?
            .max_entries();
        Ok(ConntrackMap {
            conntrack,
            revnat: HashMap::try_from(open_pinned(pin_path, MAP_REVNAT)?)
                .context("the rev-NAT map")?,
            affinity: HashMap::try_from(open_pinned(pin_path, MAP_AFFINITY)?)
                .context("the session-affinity map")?,
            capacity,
            keys: vec![ConntrackKey::default(); SCAN_BATCH],
            values: vec![ConntrackValue::default(); SCAN_BATCH],
            key_by_key: false,
        })
    }

    /// The next batch read key by key: every key is listed at the start of
    /// the walk (deleting while walking with "next key" would restart it),
    /// then read in batches.
    fn next_batch_by_key(
        &mut self,
        cursor: &mut ScanCursor,
        batch: &mut Vec<(ConntrackKey, ConntrackValue)>,
    ) -> io::Result<bool> {
        if cursor.keys.is_none() {
            let mut keys = VecDeque::new();
            for key in self.conntrack.keys() {
                keys.push_back(key.map_err(io_error)?);
            }
            cursor.keys = Some(keys);
        }
        let conntrack = &self.conntrack;
        Ok(cursor.fill_from_keys(batch, SCAN_BATCH, |key| conntrack.get(key, 0).ok()))
    }
}

impl ConntrackTable for ConntrackMap {
    fn capacity(&self) -> u32 {
        self.capacity
    }

    fn next_batch(
        &mut self,
        cursor: &mut ScanCursor,
        batch: &mut Vec<(ConntrackKey, ConntrackValue)>,
    ) -> io::Result<bool> {
        batch.clear();
        if cursor.done {
            return Ok(false);
        }
        if self.key_by_key || cursor.keys.is_some() {
            return self.next_batch_by_key(cursor, batch);
        }
        let read = sys::lookup_batch(
            self.conntrack.map().fd().as_fd(),
            &mut cursor.batch,
            &mut self.keys,
            &mut self.values,
        );
        let count = match read {
            Ok(count) => count,
            Err(error) if sys::unsupported(&error) && cursor.batch_is_fresh() => {
                log::info!(
                    "the kernel reads the conntrack map in batches only from 5.6 ({error}); walking it key by key"
                );
                self.key_by_key = true;
                return self.next_batch_by_key(cursor, batch);
            }
            Err(error) => return Err(error),
        };
        batch.extend(
            self.keys[..count]
                .iter()
                .copied()
                .zip(self.values[..count].iter().copied()),
        );
        cursor.done = cursor.batch.is_done();
        Ok(!cursor.done)
    }

    fn get(&self, key: &ConntrackKey) -> Option<ConntrackValue> {
        self.conntrack.get(key, 0).ok()
    }

    fn delete(&mut self, keys: &[ConntrackKey]) -> io::Result<()> {
        match sys::delete_batch(self.conntrack.map().fd().as_fd(), keys) {
            Ok(()) => Ok(()),
            Err(failure) if failure.done == 0 && sys::unsupported(&failure.error) => {
                for key in keys {
                    match self.conntrack.remove(key).map_err(io_error) {
                        Ok(()) => {}
                        // Already gone: its delete has done its job.
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(other) => return Err(other),
                    }
                }
                Ok(())
            }
            Err(failure) => Err(failure.into()),
        }
    }

    fn replace(&mut self, key: &ConntrackKey, value: &ConntrackValue) -> bool {
        /// `BPF_EXIST`: update only an existing entry.
        const BPF_EXIST: u64 = 2;
        self.conntrack.insert(key, value, BPF_EXIST).is_ok()
    }

    fn frontends(&self) -> io::Result<BTreeMap<RevNatId, RevNatValue>> {
        self.revnat
            .iter()
            .map(|entry| entry.map_err(io_error))
            .collect()
    }

    fn forget_affinity(&mut self, rev_nat_ids: &BTreeSet<RevNatId>) -> io::Result<u64> {
        if rev_nat_ids.is_empty() {
            return Ok(0);
        }
        // Listed first, then deleted: deleting while walking with "next
        // key" would restart the walk.
        let mut doomed = Vec::new();
        for key in self.affinity.keys() {
            let key = key.map_err(io_error)?;
            if rev_nat_ids.contains(&key.rev_nat_id) {
                doomed.push(key);
            }
        }
        let mut deleted = 0;
        for key in &doomed {
            match self.affinity.remove(key).map_err(io_error) {
                Ok(()) => deleted += 1,
                // Evicted meanwhile: gone all the same.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(other) => return Err(other),
            }
        }
        Ok(deleted)
    }

    fn affinity_rev_nat_ids(&self) -> io::Result<BTreeSet<RevNatId>> {
        self.affinity
            .keys()
            .map(|key| key.map(|key| key.rev_nat_id).map_err(io_error))
            .collect()
    }
}

impl ScanCursor {
    /// Whether no batch has been read yet.
    fn batch_is_fresh(&self) -> bool {
        self.keys.is_none() && !self.done
    }

    /// Fills `batch` up to `size` entries from the keys left to read (an
    /// entry deleted since they were listed is skipped), each read with
    /// `get`; `false` once the keys ran out.
    fn fill_from_keys(
        &mut self,
        batch: &mut Vec<(ConntrackKey, ConntrackValue)>,
        size: usize,
        get: impl Fn(&ConntrackKey) -> Option<ConntrackValue>,
    ) -> bool {
        let Some(keys) = &mut self.keys else {
            return false;
        };
        while batch.len() < size {
            let Some(key) = keys.pop_front() else {
                self.done = true;
                return false;
            };
            if let Some(value) = get(&key) {
                batch.push((key, value));
            }
        }
        true
    }
}

/// A conntrack table in memory, for tests: the same contract as the
/// kernel map.
#[derive(Clone, Debug, Default)]
pub struct MemoryConntrack {
    /// The conntrack entries.
    pub entries: BTreeMap<ConntrackKey, ConntrackValue>,
    /// The rev-NAT map.
    pub frontends: BTreeMap<RevNatId, RevNatValue>,
    /// The session-affinity map.
    pub affinity: BTreeMap<AffinityKey, AffinityValue>,
    /// The capacity reported.
    pub capacity: u32,
    /// Entries per batch (small in tests, to cross batch boundaries).
    pub batch_size: usize,
}

impl MemoryConntrack {
    /// An empty table of `capacity` entries, read `batch_size` at a time.
    pub fn new(capacity: u32, batch_size: usize) -> Self {
        MemoryConntrack {
            capacity,
            batch_size: batch_size.max(1),
            ..Self::default()
        }
    }
}

impl ConntrackTable for MemoryConntrack {
    fn capacity(&self) -> u32 {
        self.capacity
    }

    fn next_batch(
        &mut self,
        cursor: &mut ScanCursor,
        batch: &mut Vec<(ConntrackKey, ConntrackValue)>,
    ) -> io::Result<bool> {
        batch.clear();
        if cursor.done {
            return Ok(false);
        }
        if cursor.keys.is_none() {
            cursor.keys = Some(self.entries.keys().copied().collect());
        }
        let entries = &self.entries;
        Ok(cursor.fill_from_keys(batch, self.batch_size, |key| entries.get(key).copied()))
    }

    fn get(&self, key: &ConntrackKey) -> Option<ConntrackValue> {
        self.entries.get(key).copied()
    }

    fn delete(&mut self, keys: &[ConntrackKey]) -> io::Result<()> {
        for key in keys {
            self.entries.remove(key);
        }
        Ok(())
    }

    fn replace(&mut self, key: &ConntrackKey, value: &ConntrackValue) -> bool {
        match self.entries.get_mut(key) {
            Some(entry) => {
                *entry = *value;
                true
            }
            None => false,
        }
    }

    fn frontends(&self) -> io::Result<BTreeMap<RevNatId, RevNatValue>> {
        Ok(self.frontends.clone())
    }

    fn forget_affinity(&mut self, rev_nat_ids: &BTreeSet<RevNatId>) -> io::Result<u64> {
        let before = self.affinity.len();
        self.affinity
            .retain(|key, _| !rev_nat_ids.contains(&key.rev_nat_id));
        Ok((before - self.affinity.len()) as u64)
    }

    fn affinity_rev_nat_ids(&self) -> io::Result<BTreeSet<RevNatId>> {
        Ok(self.affinity.keys().map(|key| key.rev_nat_id).collect())
    }
}

/// The datapath's signals that conntrack needs room: its counters of SNAT
/// ports exhausted and of conntrack inserts failed, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pressure {
    /// New flows to remote backends dropped for want of an SNAT port.
    pub snat_ports_exhausted: u64,
    /// New flows whose conntrack entries could not be inserted.
    pub conntrack_insert_failed: u64,
}

/// The datapath's counters map, opened once, read for [`Pressure`].
pub struct PressureCounters(PerCpuArray<MapData, u64>);

impl PressureCounters {
    /// Opens the counters map pinned under `pin_path`.
    pub fn open(pin_path: &Path) -> crate::Result<Self> {
        Ok(PressureCounters(
            PerCpuArray::try_from(open_pinned(pin_path, MAP_COUNTERS)?)
                .context("the counters map")?,
        ))
    }

    /// The counters now; `None` if they cannot be read.
    pub fn read(&self) -> Option<Pressure> {
        let sum = |counter: DatapathCounter| -> Option<u64> {
            Some(self.0.get(&(counter as u32), 0).ok()?.iter().sum())
        };
        Some(Pressure {
            snat_ports_exhausted: sum(DatapathCounter::SnatPortsExhausted)?,
            conntrack_insert_failed: sum(DatapathCounter::ConntrackInsertFailed)?,
        })
    }
}

/// Now in the datapath's clock: `CLOCK_MONOTONIC` in whole seconds, what
/// `bpf_ktime_get_ns` reads and conntrack entries store.
pub fn monotonic_seconds() -> u32 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; CLOCK_MONOTONIC always
    // exists, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    mono_seconds(now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64)
}
