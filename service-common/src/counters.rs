//! Datapath event counters: one per-CPU `u64` per [`DatapathCounter`],
//! summed by user space (`service-agent list`, the metrics).

/// Index of a datapath event counter in the counters map (per-CPU `u64`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatapathCounter {
    /// A new flow to a frontend with no backend was dropped: from the
    /// network, or from a pod when no refusal could be built for it (a TCP
    /// RST, an inconsistent header, a helper failure).
    DropNoBackend = 0,
    /// A backend slot pointed at a missing slot or backend entry.
    DropBackendMissing = 1,
    /// A packet could not be rewritten (helper error).
    DropRewrite = 2,
    /// The conntrack entry for a new flow could not be inserted.
    ConntrackInsertFailed = 3,
    /// A reply was translated back to its frontend.
    ReplyTranslated = 4,
    /// A new flow to a frontend with no backend was refused: a TCP RST or an
    /// ICMP port unreachable went back to the client.
    RejectedNoBackend = 5,
    /// A new flow to a backend on another node was dropped: no SNAT port of
    /// the range was free within the tries. The collector should run.
    SnatPortsExhausted = 6,
    /// A tracked flow moved to another backend: its backend was deleted
    /// (or its id now names another address), or, for UDP, stopped serving.
    FlowRebalanced = 7,
    /// A packet of a flow whose frontend was deleted (`CT_FLAG_DEAD`) was
    /// dropped, in either direction.
    DeadFlowDropped = 8,
    /// A packet found its flow's master expired (idle beyond its timeout)
    /// and started a new flow.
    ConntrackExpired = 9,
    /// A later fragment of a datagram was translated from the ports its
    /// first fragment recorded.
    FragmentTranslated = 10,
    /// XDP left a packet whose L4 checksum is partial (checksum offload) to
    /// the TC ingress program beside it, which translates it.
    ChecksumDeferred = 11,
    /// A new flow took over the SNAT port of an expired flow.
    SnatPortReused = 12,
    /// A new flow to a LoadBalancer frontend from a client outside its
    /// `loadBalancerSourceRanges` was dropped.
    DropSourceRange = 13,
    /// A new flow from the network to an `externalTrafficPolicy: Local`
    /// frontend got a backend on another node and was dropped instead of
    /// SNATed.
    DropExternalLocal = 14,
    /// A forward packet matched the conntrack master of a flow of the
    /// other origin (network vs pod) and was dropped.
    DropOriginMismatch = 15,
    /// A new flow followed its client's session affinity entry.
    AffinityHit = 16,
    /// XDP left a new flow to a LoadBalancer or externalIP frontend
    /// without backends to the TC ingress program beside it, which refuses
    /// it (TCP RST, ICMP port unreachable) as TC does.
    RejectDeferred = 17,
    /// A new flow to a frontend that lists only node-local backends
    /// (`FRONTEND_FLAG_LOCAL_ONLY`, or `FRONTEND_FLAG_EXTERNAL_LOCAL` from
    /// the network) and has none was dropped.
    DropNoLocalEndpoint = 18,
    /// A TCP SYN-ACK matched a reply entry whose flow is closing, expired
    /// or gone (a connection the datapath did not translate, e.g. a
    /// socket-LB one from a client port an earlier flow used) and passed
    /// untranslated.
    StaleReplyPassed = 19,
}

impl DatapathCounter {
    /// Every counter, in index order.
    pub const ALL: [DatapathCounter; 20] = [
        DatapathCounter::DropNoBackend,
        DatapathCounter::DropBackendMissing,
        DatapathCounter::DropRewrite,
        DatapathCounter::ConntrackInsertFailed,
        DatapathCounter::ReplyTranslated,
        DatapathCounter::RejectedNoBackend,
        DatapathCounter::SnatPortsExhausted,
        DatapathCounter::FlowRebalanced,
        DatapathCounter::DeadFlowDropped,
        DatapathCounter::ConntrackExpired,
        DatapathCounter::FragmentTranslated,
        DatapathCounter::ChecksumDeferred,
        DatapathCounter::SnatPortReused,
        DatapathCounter::DropSourceRange,
        DatapathCounter::DropExternalLocal,
        DatapathCounter::DropOriginMismatch,
        DatapathCounter::AffinityHit,
        DatapathCounter::RejectDeferred,
        DatapathCounter::DropNoLocalEndpoint,
        DatapathCounter::StaleReplyPassed,
    ];

    /// The counter's name as shown by `service-agent list` and the metrics.
    pub const fn name(self) -> &'static str {
        match self {
            DatapathCounter::DropNoBackend => "drop_no_backend",
            DatapathCounter::DropBackendMissing => "drop_backend_missing",
            DatapathCounter::DropRewrite => "drop_rewrite",
            DatapathCounter::ConntrackInsertFailed => "conntrack_insert_failed",
            DatapathCounter::ReplyTranslated => "reply_translated",
            DatapathCounter::RejectedNoBackend => "rejected_no_backend",
            DatapathCounter::SnatPortsExhausted => "snat_ports_exhausted",
            DatapathCounter::FlowRebalanced => "flow_rebalanced",
            DatapathCounter::DeadFlowDropped => "dead_flow_dropped",
            DatapathCounter::ConntrackExpired => "conntrack_expired",
            DatapathCounter::FragmentTranslated => "fragment_translated",
            DatapathCounter::ChecksumDeferred => "checksum_deferred",
            DatapathCounter::SnatPortReused => "snat_port_reused",
            DatapathCounter::DropSourceRange => "drop_source_range",
            DatapathCounter::DropExternalLocal => "drop_external_local",
            DatapathCounter::DropOriginMismatch => "drop_origin_mismatch",
            DatapathCounter::AffinityHit => "affinity_hit",
            DatapathCounter::RejectDeferred => "reject_deferred",
            DatapathCounter::DropNoLocalEndpoint => "drop_no_local_endpoint",
            DatapathCounter::StaleReplyPassed => "stale_reply_passed",
        }
    }
}

/// Number of entries of the counters map.
pub const COUNTERS_MAX_ENTRIES: u32 = DatapathCounter::ALL.len() as u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_listed_in_index_order_with_distinct_names() {
        for (index, counter) in DatapathCounter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, index);
            for other in &DatapathCounter::ALL[..index] {
                assert_ne!(counter.name(), other.name());
            }
        }
    }
}
