//! What a sync changed that the flows already tracked must follow
//! ([`FlowChanges`]): backends deleted or no longer serving (their UDP flows
//! are reaped at once) and frontends deleted (their flows are marked dead).
//! Read from the writes a sync applied, so nothing is diffed twice.

use std::collections::BTreeSet;

use service_common::{BACKEND_STATE_NOT_SERVING, BackendId, RevNatId};

use crate::datapath::model::MapOp;

/// The changes of one or more syncs that existing conntrack entries must
/// follow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowChanges {
    /// Backends deleted from the backends map: every flow naming them is
    /// re-balanced by the datapath; their UDP entries are deleted at once.
    pub backends_deleted: BTreeSet<BackendId>,
    /// Backends now `NOT_SERVING`: their UDP entries are deleted at once
    /// (TCP flows drain).
    pub backends_not_serving: BTreeSet<BackendId>,
    /// Rev-NAT ids whose frontend was deleted: every entry naming them is
    /// marked dead, and the id is handed out again only once no entry
    /// names it.
    pub rev_nat_ids_released: BTreeSet<RevNatId>,
}

impl FlowChanges {
    /// Records what the applied write `op` means for existing flows.
    pub fn record(&mut self, op: &MapOp) {
        match op {
            MapOp::DeleteBackend(id) => {
                self.backends_deleted.insert(*id);
            }
            MapOp::UpsertBackend(id, value) if value.state == BACKEND_STATE_NOT_SERVING => {
                self.backends_not_serving.insert(*id);
            }
            MapOp::DeleteRevNat(id) => {
                self.rev_nat_ids_released.insert(*id);
            }
            _ => {}
        }
    }

    /// Adds `other`'s changes.
    pub fn merge(&mut self, other: FlowChanges) {
        self.backends_deleted.extend(other.backends_deleted);
        self.backends_not_serving.extend(other.backends_not_serving);
        self.rev_nat_ids_released.extend(other.rev_nat_ids_released);
    }

    /// Whether nothing changed for existing flows.
    pub fn is_empty(&self) -> bool {
        self.backends_deleted.is_empty()
            && self.backends_not_serving.is_empty()
            && self.rev_nat_ids_released.is_empty()
    }

    /// Whether UDP flows to backend `id` are to be deleted.
    pub fn reaps_udp_of(&self, id: BackendId) -> bool {
        self.backends_deleted.contains(&id) || self.backends_not_serving.contains(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use service_common::{
        BACKEND_STATE_ACTIVE, BACKEND_STATE_TERMINATING, BackendValue, FrontendKey, FrontendValue,
        RevNatValue,
    };

    fn backend(state: u8) -> BackendValue {
        BackendValue {
            state,
            ..BackendValue::default()
        }
    }

    #[test]
    fn deleted_and_not_serving_backends_and_deleted_frontends_are_recorded() {
        let mut changes = FlowChanges::default();
        for op in [
            MapOp::UpsertBackend(1, backend(BACKEND_STATE_ACTIVE)),
            MapOp::UpsertBackend(2, backend(BACKEND_STATE_TERMINATING)),
            MapOp::UpsertBackend(3, backend(BACKEND_STATE_NOT_SERVING)),
            MapOp::DeleteBackend(4),
            MapOp::UpsertRevNat(5, RevNatValue::default()),
            MapOp::DeleteRevNat(6),
            MapOp::UpsertFrontend(FrontendKey::default(), FrontendValue::default()),
            MapOp::DeleteFrontend(FrontendKey::default()),
        ] {
            changes.record(&op);
        }
        assert_eq!(changes.backends_deleted, BTreeSet::from([4]));
        assert_eq!(changes.backends_not_serving, BTreeSet::from([3]));
        assert_eq!(changes.rev_nat_ids_released, BTreeSet::from([6]));
        assert!(changes.reaps_udp_of(3) && changes.reaps_udp_of(4));
        assert!(!changes.reaps_udp_of(1) && !changes.reaps_udp_of(2));

        let mut merged = FlowChanges::default();
        assert!(merged.is_empty());
        merged.merge(changes.clone());
        merged.merge(FlowChanges {
            backends_deleted: BTreeSet::from([9]),
            ..FlowChanges::default()
        });
        assert_eq!(merged.backends_deleted, BTreeSet::from([4, 9]));
        assert_eq!(merged.rev_nat_ids_released, changes.rev_nat_ids_released);
    }
}
