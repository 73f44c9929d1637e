//! Fragments of translated datagrams, IPv4 and IPv6 alike. The first
//! fragment of a datagram carries its L4 header; the later ones carry
//! none, so a hook that translated a first fragment records its ports,
//! keyed by the datagram as the hook saw it (addresses, identification:
//! IPv4's 16 bits, the IPv6 fragment header's 32, protocol, family), and a
//! later fragment that finds that record is translated as a packet of the
//! same flow: addresses (and the IPv4 header checksum) only, as IPv6 has
//! no header checksum (the first fragment's L4 checksum covers the whole
//! datagram and was updated with it). A later fragment never creates a
//! flow, and is never refused.
//!
//! A later fragment without a record passes untouched: the hook cannot
//! tell a fragment of a Service flow whose first fragment it did not see
//! (reordered, or its record evicted) from one of any other traffic, and
//! records are only written for translated datagrams, so dropping it would
//! drop every fragmented datagram that is none of ours. Linux sends
//! fragments in order, and reassembly fails for a datagram missing a
//! fragment either way.

use service_common::{FragmentKey, FragmentValue};

use crate::{
    clock::now_seconds,
    maps::{BPF_ANY, FRAGMENTS},
    packet::{Flow, Fragment, IpFamily},
};

/// The record key of `flow`'s datagram, as the hook sees it.
#[inline(always)]
fn key<A: IpFamily>(flow: &Flow<A>) -> FragmentKey {
    A::fragment_key(flow)
}

/// Gives a later fragment the ports its first fragment recorded at this
/// hook; whether there was a record. Whole datagrams and first fragments
/// have their ports already. Not inlined (its own stack frame).
#[inline(never)]
pub fn resolve_ports<A: IpFamily>(flow: &mut Flow<A>) -> bool {
    if flow.fragment != Fragment::Later {
        return true;
    }
    // SAFETY: read in place.
    let Some(record) = (unsafe { FRAGMENTS.get(key(flow)) }) else {
        return false;
    };
    flow.sport = record.sport;
    flow.dport = record.dport;
    true
}

/// Records the ports of a first fragment this hook translated, for the
/// later fragments of its datagram. Not inlined (its own stack frame).
#[inline(never)]
pub fn record_ports<A: IpFamily>(flow: &Flow<A>) {
    let record = FragmentValue {
        sport: flow.sport,
        dport: flow.dport,
        last_seen: now_seconds(),
    };
    // A failed write leaves the later fragments untranslated, as without
    // any record: nothing to count separately.
    let _ = FRAGMENTS.insert(key(flow), record, BPF_ANY);
}
