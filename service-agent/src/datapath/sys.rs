//! Raw `bpf(2)` commands aya 0.14 does not expose: the map batch
//! operations `BPF_MAP_LOOKUP_BATCH` and `BPF_MAP_DELETE_BATCH` (kernel
//! 5.6), which read or delete thousands of entries per system call.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::Pod;

/// `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_MAP_DELETE_BATCH`.
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

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

/// Deletes `keys` in order, as many per system call as the kernel takes. A
/// key that is already absent (an LRU eviction, a delete by someone else)
/// stops a kernel batch with ENOENT; it is skipped and the rest deleted.
pub fn delete_batch<K: Pod>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(_) => return Ok(()),
            // The key at `done + count` was already gone: its delete has
            // done its job.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {
                done += attr.count as usize + 1;
            }
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Where a walk of a hash map in batches stands: the kernel's position
/// token (a bucket index) between calls.
#[derive(Debug, Default)]
pub struct BatchCursor {
    /// The token of the next call; `None` before the first.
    token: Option<u64>,
    /// The walk has reached the end.
    done: bool,
}

impl BatchCursor {
    /// Whether the walk has reached the end.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

/// Reads the next batch of a hash map's entries (as many as `keys` and
/// `values` hold, which must be equally long) into their fronts, continuing
/// from `cursor`; returns how many were read. Entries deleted between calls
/// never make the walk start over (the kernel walks bucket by bucket).
pub fn lookup_batch<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    cursor: &mut BatchCursor,
    keys: &mut [K],
    values: &mut [V],
) -> io::Result<usize> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if cursor.done {
        return Ok(0);
    }
    let mut in_token = cursor.token.unwrap_or(0);
    let mut out_token = 0u64;
    let mut attr = BatchAttr {
        in_batch: match cursor.token {
            Some(_) => &mut in_token as *mut u64 as u64,
            None => 0,
        },
        out_batch: &mut out_token as *mut u64 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(_) => cursor.token = Some(out_token),
        // The last batch (possibly empty).
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => cursor.done = true,
        Err(error) => return Err(error),
    }
    Ok(attr.count as usize)
}
