//! The datapath's clock: monotonic seconds (`CLOCK_MONOTONIC` in whole
//! seconds, `service_common::mono_seconds`), the unit of every `last_seen`
//! and `created` in conntrack, affinity and fragment entries, and of the
//! agent's collector.
//!
//! Reading it is one of the dearest things a packet does: on the bench
//! machine `bpf_ktime_get_ns` cost 60 to 80 ns a call (a third of an
//! established flow's whole run). So the last reading is kept in a global
//! of the object together with the jiffy it was taken in, and a packet
//! reads the clock only when the jiffy changed (`bpf_jiffies64`, a plain
//! load of a kernel variable): at most `HZ` times a second for the whole
//! node, whatever the packet rate. A reading is thus up to one tick (1 to
//! 10 ms) behind the second it returns, which is far inside the one-second
//! grain every user of it already allows for.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_ns};
use service_common::mono_seconds;

/// The last reading, shared by every CPU and program of this object: bits
/// 63..32 the low 32 bits of the jiffy it was taken in, bits 31..0 the
/// monotonic seconds; 0: none yet. One word, so a CPU never sees the
/// jiffy of one reading with the seconds of another (two CPUs refreshing
/// it at once both write a correct reading). A jiffy that comes back after
/// 2^32 ticks (49 days at `HZ` 1000) without a single packet in between
/// would be taken for the old one, once: a stale second then, no more.
#[unsafe(no_mangle)]
static mut CLOCK_READING: u64 = 0;

/// Monotonic seconds, as conntrack entries store them (see the module).
#[inline(always)]
pub fn now_seconds() -> u32 {
    // SAFETY: the helper has no preconditions.
    let jiffy = unsafe { bpf_jiffies64() } as u32;
    // SAFETY: an aligned one-word read of a global (volatile: another CPU
    // may have written it since).
    let reading = unsafe { core::ptr::read_volatile(&raw const CLOCK_READING) };
    if reading != 0 && (reading >> 32) as u32 == jiffy {
        return reading as u32;
    }
    // SAFETY: the helper has no preconditions.
    let seconds = mono_seconds(unsafe { bpf_ktime_get_ns() });
    // SAFETY: an aligned one-word write of a global.
    unsafe {
        core::ptr::write_volatile(
            &raw mut CLOCK_READING,
            (u64::from(jiffy) << 32) | u64::from(seconds),
        )
    };
    seconds
}
