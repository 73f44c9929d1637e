//! Raw `bpf(2)` commands aya 0.14 does not expose: the map batch
//! operations (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`,
//! `BPF_MAP_LOOKUP_BATCH`, kernel 5.6), which write, delete or read
//! thousands of entries per system call instead of one (reads either all at
//! once or batch by batch from a resumable [`BatchCursor`]), and the generic
//! [`bpf`] call the cgroup link code uses.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::Pod;

/// `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_MAP_UPDATE_BATCH`.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// `BPF_MAP_DELETE_BATCH`.
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries per batch system call: bounds the kernel's work per call (and,
/// for lookups, the buffers) without giving up the gain.
pub const BATCH_SIZE: usize = 8192;

/// Issues one `bpf(2)` command with `attr` as its `bpf_attr`.
pub fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised `bpf_attr` prefix for `cmd`,
    // of the size passed; the kernel zero-extends the rest and writes only
    // within that size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The `batch` member of `bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A batch call that stopped early: `done` entries were processed before
/// the entry at that index failed with `error`.
#[derive(Debug, thiserror::Error)]
#[error("{error} (after {done} entries of the batch)")]
pub struct BatchError {
    /// Entries processed before the failing one.
    pub done: usize,
    /// The kernel's answer for the failing entry.
    #[source]
    pub error: io::Error,
}

impl From<BatchError> for io::Error {
    fn from(failure: BatchError) -> Self {
        failure.error
    }
}

/// Whether the kernel lacks batch operations for this map (kernels before
/// 5.6, or a map type without them): the caller falls back to one call per
/// entry.
pub fn unsupported(error: &io::Error) -> bool {
    /// The kernel's own `ENOTSUPP`, which BPF commands can return.
    const ENOTSUPP: i32 = 524;
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | ENOTSUPP)
    )
}

/// Inserts or replaces `keys[i] -> values[i]` in order (`BPF_ANY`). On a
/// failure the entries before the failing one are written and the rest
/// are not.
pub fn update_batch<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut done = 0;
    while done < keys.len() {
        let end = (done + BATCH_SIZE).min(keys.len());
        let mut attr = BatchAttr {
            keys: keys[done..end].as_ptr() as u64,
            values: values[done..end].as_ptr() as u64,
            count: (end - done) as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        if let Err(error) = bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
            return Err(BatchError {
                done: done + attr.count as usize,
                error,
            });
        }
        done = end;
    }
    Ok(())
}

/// Deletes `keys` in order. A key that is already absent (an LRU eviction,
/// a delete by someone else) stops a kernel batch with ENOENT; it is
/// skipped and the rest deleted. On another failure the keys before the
/// failing one are deleted and the rest are not.
pub fn delete_batch<K: Pod>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), BatchError> {
    let mut done = 0;
    while done < keys.len() {
        let end = (done + BATCH_SIZE).min(keys.len());
        let mut attr = BatchAttr {
            keys: keys[done..end].as_ptr() as u64,
            count: (end - done) as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(_) => done = end,
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {
                // The entry at `done + count` was already gone: its delete
                // has done its job.
                done += attr.count as usize + 1;
            }
            Err(error) => {
                return Err(BatchError {
                    done: done + attr.count as usize,
                    error,
                });
            }
        }
    }
    Ok(())
}

/// Where a walk of a map in batches stands: the kernel's position token
/// between calls (a bucket index for hash maps, a key for arrays).
#[derive(Debug, Default)]
pub struct BatchCursor {
    /// The token of the next call; empty before the first.
    token: Vec<u8>,
    /// The walk has reached the end.
    done: bool,
}

impl BatchCursor {
    /// Whether the walk has reached the end.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

/// One `BPF_MAP_LOOKUP_BATCH` call of up to `count` entries into `keys`
/// and `values` (buffers of at least `count` keys of `key_size` bytes and
/// `count` values), continuing from `cursor`; returns how many were read.
///
/// # Safety
///
/// `keys` and `values` must be valid for writes of `count` entries of the
/// map's key and value size (per-CPU values: times the possible CPUs), and
/// any bit pattern must be valid in them.
unsafe fn lookup_batch_raw(
    map: BorrowedFd<'_>,
    cursor: &mut BatchCursor,
    key_size: usize,
    keys: *mut u8,
    values: *mut u8,
    count: usize,
) -> io::Result<usize> {
    if cursor.done {
        return Ok(0);
    }
    let mut out_token = vec![0u8; key_size.max(8)];
    let mut attr = BatchAttr {
        // The kernel only reads the token it is given.
        in_batch: if cursor.token.is_empty() {
            0
        } else {
            cursor.token.as_ptr() as u64
        },
        out_batch: out_token.as_mut_ptr() as u64,
        keys: keys as u64,
        values: values as u64,
        count: count as u32,
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(_) => cursor.token = out_token,
        // The last batch (possibly empty).
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => cursor.done = true,
        Err(error) => return Err(error),
    }
    Ok(attr.count as usize)
}

/// Reads the next batch of a map's entries (as many as `keys` and `values`
/// hold, which must be equally long) into their fronts, continuing from
/// `cursor`; returns how many were read. Entries of a hash map deleted
/// between calls never make the walk start over (the kernel walks bucket by
/// bucket).
pub fn lookup_batch<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    cursor: &mut BatchCursor,
    keys: &mut [K],
    values: &mut [V],
) -> io::Result<usize> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    // SAFETY: both buffers hold `keys.len()` entries of `Pod` types of
    // the map's key and value size.
    unsafe {
        lookup_batch_raw(
            map,
            cursor,
            std::mem::size_of::<K>(),
            keys.as_mut_ptr().cast(),
            values.as_mut_ptr().cast(),
            keys.len(),
        )
    }
}

/// Reads every entry of a hash or array map, [`BATCH_SIZE`] entries per
/// call, handing each to `entry`.
pub fn lookup_all<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    mut entry: impl FnMut(K, V),
) -> io::Result<()> {
    // SAFETY: `Pod` types are valid for any bit pattern, zeroes included.
    let zero_key: K = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let zero_value: V = unsafe { std::mem::zeroed() };
    let mut keys = vec![zero_key; BATCH_SIZE];
    let mut values = vec![zero_value; BATCH_SIZE];
    let mut cursor = BatchCursor::default();
    while !cursor.is_done() {
        let read = lookup_batch(map, &mut cursor, &mut keys, &mut values)?;
        for i in 0..read {
            entry(keys[i], values[i]);
        }
    }
    Ok(())
}

/// Reads every entry of a per-CPU array, [`BATCH_SIZE`] entries per call,
/// handing each index and its per-CPU values (one per possible CPU) to
/// `entry`. `V`'s size must be a multiple of 8, the kernel's per-CPU stride.
pub fn lookup_all_per_cpu<V: Pod>(
    map: BorrowedFd<'_>,
    cpus: usize,
    mut entry: impl FnMut(u32, &[V]),
) -> io::Result<()> {
    assert_eq!(
        std::mem::size_of::<V>() % 8,
        0,
        "per-CPU values are 8-byte strided"
    );
    // SAFETY: `Pod` types are valid for any bit pattern, zeroes included.
    let zero: V = unsafe { std::mem::zeroed() };
    let mut keys = vec![0u32; BATCH_SIZE];
    let mut values = vec![zero; BATCH_SIZE * cpus];
    let mut cursor = BatchCursor::default();
    while !cursor.is_done() {
        // SAFETY: `keys` holds `BATCH_SIZE` indexes and `values` as many
        // times `cpus` values of a `Pod` type, 8-byte strided as the
        // kernel writes them.
        let read = unsafe {
            lookup_batch_raw(
                map,
                &mut cursor,
                std::mem::size_of::<u32>(),
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr().cast(),
                BATCH_SIZE,
            )
        }?;
        for i in 0..read {
            entry(keys[i], &values[i * cpus..(i + 1) * cpus]);
        }
    }
    Ok(())
}
