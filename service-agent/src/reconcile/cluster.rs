//! What the sources tell the reconciler: the [`ClusterEvent`]s a source
//! sends, and the [`ClusterState`] they build up, from which
//! [`super::translate`] works. Sources depend on this module, never the
//! other way round.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::Arc,
};

use super::records::{NodeRecord, ServiceRecord, SliceRecord};

/// A namespaced object name, `namespace/name`, cheap to clone (one shared
/// allocation).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName(Arc<str>);

impl ObjectName {
    /// `namespace/name`; an empty namespace is `default`.
    pub fn new(namespace: &str, name: &str) -> Self {
        let namespace = if namespace.is_empty() {
            "default"
        } else {
            namespace
        };
        ObjectName(format!("{namespace}/{name}").into())
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        self.0
            .split_once('/')
            .map_or("", |(namespace, _)| namespace)
    }

    /// The name within the namespace.
    pub fn name(&self) -> &str {
        self.0.split_once('/').map_or(&*self.0, |(_, name)| name)
    }

    /// `namespace/name`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// The Kubernetes objects the agent acts on, as last seen from a source.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    /// Services by name.
    pub services: BTreeMap<ObjectName, ServiceRecord>,
    /// EndpointSlices by their own name (not their Service's).
    endpoint_slices: BTreeMap<ObjectName, SliceRecord>,
    /// EndpointSlice names by the Service they belong to, so a Service's
    /// slices are found without scanning them all.
    slices_by_service: BTreeMap<ObjectName, Vec<ObjectName>>,
    /// This node, when the source knows it.
    pub node: Option<NodeRecord>,
}

/// A change reported by a source.
#[derive(Clone, Debug)]
pub enum Change<T> {
    /// The object was created or modified.
    Applied(ObjectName, T),
    /// The object was deleted.
    Deleted(ObjectName),
    /// A full (re-)list: these are all the objects of the kind now.
    Replaced(Vec<(ObjectName, T)>),
}

/// A change to one kind of object the agent watches.
#[derive(Clone, Debug)]
pub enum ClusterEvent {
    /// A Service changed.
    Service(Change<ServiceRecord>),
    /// An EndpointSlice changed.
    EndpointSlice(Change<SliceRecord>),
    /// This node changed.
    Node(Change<NodeRecord>),
}

/// The kinds of object a source lists and watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1` Services.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlices.
    EndpointSlice,
    /// This node's `v1` Node.
    Node,
}

impl Kind {
    /// The kind's name, as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
}

impl ClusterEvent {
    /// The kind of object the event is about.
    pub fn kind(&self) -> Kind {
        match self {
            ClusterEvent::Service(_) => Kind::Service,
            ClusterEvent::EndpointSlice(_) => Kind::EndpointSlice,
            ClusterEvent::Node(_) => Kind::Node,
        }
    }

    /// Whether the event is a full list (the first one, or a re-list).
    pub fn is_full_list(&self) -> bool {
        matches!(
            self,
            ClusterEvent::Service(Change::Replaced(_))
                | ClusterEvent::EndpointSlice(Change::Replaced(_))
                | ClusterEvent::Node(Change::Replaced(_))
        )
    }
}

/// Which Services an event may have changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dirty {
    /// These Services.
    Services(BTreeSet<ObjectName>),
    /// Possibly all of them.
    All,
}

impl Dirty {
    /// Nothing changed.
    pub fn none() -> Self {
        Dirty::Services(BTreeSet::new())
    }

    /// Adds what `other` marks.
    pub fn merge(&mut self, other: Dirty) {
        match (&mut *self, other) {
            (Dirty::All, _) => {}
            (_, Dirty::All) => *self = Dirty::All,
            (Dirty::Services(mine), Dirty::Services(theirs)) => mine.extend(theirs),
        }
    }
}

impl ClusterState {
    /// Applies a source's event; returns the Services it may have changed.
    pub fn apply(&mut self, event: ClusterEvent) -> Dirty {
        let mut dirty = BTreeSet::new();
        match event {
            ClusterEvent::Service(Change::Applied(name, service)) => {
                self.services.insert(name.clone(), service);
                dirty.insert(name);
            }
            ClusterEvent::Service(Change::Deleted(name)) => {
                self.services.remove(&name);
                dirty.insert(name);
            }
            ClusterEvent::Service(Change::Replaced(all)) => {
                dirty.extend(self.services.keys().cloned());
                self.services = all.into_iter().collect();
                dirty.extend(self.services.keys().cloned());
            }
            ClusterEvent::EndpointSlice(Change::Applied(name, slice)) => {
                dirty.extend(slice.service.clone());
                dirty.extend(self.insert_slice(name, slice));
            }
            ClusterEvent::EndpointSlice(Change::Deleted(name)) => {
                dirty.extend(self.remove_slice(&name));
            }
            ClusterEvent::EndpointSlice(Change::Replaced(all)) => {
                dirty.extend(self.slices_by_service.keys().cloned());
                self.endpoint_slices.clear();
                self.slices_by_service.clear();
                for (name, slice) in all {
                    dirty.extend(slice.service.clone());
                    self.insert_slice(name, slice);
                }
            }
            // Translation reads only the Node's zone (topology hints): a
            // new zone changes every Service, anything else none.
            ClusterEvent::Node(change) => {
                let zone_before = self.node_zone().map(str::to_owned);
                self.node = match change {
                    Change::Applied(_, node) => Some(node),
                    Change::Deleted(_) => None,
                    Change::Replaced(nodes) => nodes.into_iter().next().map(|(_, node)| node),
                };
                if self.node_zone() != zone_before.as_deref() {
                    return Dirty::All;
                }
            }
        }
        Dirty::Services(dirty)
    }

    /// Whether this node is being deleted (as far as the source knows).
    pub fn node_being_deleted(&self) -> bool {
        self.node.as_ref().is_some_and(|node| node.being_deleted)
    }

    /// This node's zone (its `topology.kubernetes.io/zone` label), if known.
    pub fn node_zone(&self) -> Option<&str> {
        self.node.as_ref().and_then(|node| node.zone.as_deref())
    }

    /// The EndpointSlices belonging to `service`, with their names.
    pub fn slices_of<'a>(
        &'a self,
        service: &'a ObjectName,
    ) -> impl Iterator<Item = (&'a ObjectName, &'a SliceRecord)> + 'a {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|name| Some((name, self.endpoint_slices.get(name)?)))
    }

    /// Every EndpointSlice, by its own name.
    pub fn endpoint_slices(&self) -> &BTreeMap<ObjectName, SliceRecord> {
        &self.endpoint_slices
    }

    /// Adds or replaces an EndpointSlice; returns the Service the replaced
    /// version belonged to.
    fn insert_slice(&mut self, name: ObjectName, slice: SliceRecord) -> Option<ObjectName> {
        let previous_owner = self.remove_slice(&name);
        if let Some(owner) = &slice.service {
            // Most Services have one slice: room for one (a pushed
            // `Vec` starts with room for four).
            self.slices_by_service
                .entry(owner.clone())
                .or_insert_with(|| Vec::with_capacity(1))
                .push(name.clone());
        }
        self.endpoint_slices.insert(name, slice);
        previous_owner
    }

    /// Removes an EndpointSlice; returns the Service it belonged to.
    fn remove_slice(&mut self, name: &ObjectName) -> Option<ObjectName> {
        let owner = self.endpoint_slices.remove(name)?.service?;
        if let Some(names) = self.slices_by_service.get_mut(&owner) {
            names.retain(|n| n != name);
            if names.is_empty() {
                self.slices_by_service.remove(&owner);
            }
        }
        Some(owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::records::AddressType;

    fn slice(service: &str) -> SliceRecord {
        SliceRecord {
            service: Some(ObjectName::new("default", service)),
            address_type: AddressType::Ipv4,
            ports: Box::default(),
            endpoints: Box::default(),
            zone_hints: Box::default(),
            trigger_time: None,
            problems: Box::default(),
        }
    }

    fn named(name: &str) -> ObjectName {
        ObjectName::new("default", name)
    }

    fn owners(state: &ClusterState, service: &str) -> Vec<String> {
        let service = named(service);
        let mut names: Vec<String> = state
            .slices_of(&service)
            .map(|(name, _)| name.name().to_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn slice_events_keep_the_service_index_right_and_mark_both_owners() {
        let mut state = ClusterState::default();
        state.apply(ClusterEvent::EndpointSlice(Change::Replaced(vec![
            (named("a-1"), slice("a")),
            (named("a-2"), slice("a")),
            (named("b-1"), slice("b")),
        ])));
        assert_eq!(owners(&state, "a"), ["a-1", "a-2"]);
        // A slice relabelled to another Service moves, and both are dirty.
        let dirty = state.apply(ClusterEvent::EndpointSlice(Change::Applied(
            named("a-2"),
            slice("b"),
        )));
        let Dirty::Services(dirty) = dirty else {
            panic!("a slice event marks Services");
        };
        assert_eq!(
            dirty.iter().map(|n| n.name()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(owners(&state, "a"), ["a-1"]);
        assert_eq!(owners(&state, "b"), ["a-2", "b-1"]);
        let dirty = state.apply(ClusterEvent::EndpointSlice(Change::Deleted(named("a-1"))));
        assert_eq!(dirty, Dirty::Services([named("a")].into()));
        assert!(owners(&state, "a").is_empty());
        // A re-list replaces everything.
        state.apply(ClusterEvent::EndpointSlice(Change::Replaced(vec![(
            named("c-1"),
            slice("c"),
        )])));
        assert!(owners(&state, "b").is_empty());
        assert_eq!(owners(&state, "c"), ["c-1"]);
        assert_eq!(state.endpoint_slices().len(), 1);
    }

    #[test]
    fn node_events_change_services_only_with_the_zone_and_tell_whether_the_node_goes() {
        let mut state = ClusterState::default();
        let dirty = state.apply(ClusterEvent::Node(Change::Applied(
            named("node-a"),
            NodeRecord {
                being_deleted: true,
                ..NodeRecord::default()
            },
        )));
        assert_eq!(dirty, Dirty::none());
        assert!(state.node_being_deleted());
        state.apply(ClusterEvent::Node(Change::Deleted(named("node-a"))));
        assert!(!state.node_being_deleted());
        // A zone (new, changed or gone) changes every Service.
        let zoned = |zone: &str| NodeRecord {
            zone: Some(zone.into()),
            ..NodeRecord::default()
        };
        let dirty = state.apply(ClusterEvent::Node(Change::Applied(
            named("node-a"),
            zoned("zone-a"),
        )));
        assert_eq!(dirty, Dirty::All);
        assert_eq!(state.node_zone(), Some("zone-a"));
        let dirty = state.apply(ClusterEvent::Node(Change::Applied(
            named("node-a"),
            zoned("zone-a"),
        )));
        assert_eq!(dirty, Dirty::none());
        let dirty = state.apply(ClusterEvent::Node(Change::Replaced(Vec::new())));
        assert_eq!(dirty, Dirty::All);
    }

    #[test]
    fn object_names_split_back_into_namespace_and_name() {
        let name = ObjectName::new("", "web");
        assert_eq!(name.to_string(), "default/web");
        assert_eq!((name.namespace(), name.name()), ("default", "web"));
    }
}
