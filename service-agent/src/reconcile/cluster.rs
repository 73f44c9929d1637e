//! What the sources tell the reconciler: the [`ClusterEvent`]s a source
//! sends, and the [`ClusterState`] they build up, from which
//! [`super::translate`] works. Sources depend on this module, never the
//! other way round.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use k8s_openapi::{
    Metadata,
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A namespaced object name, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName {
    /// Namespace (`default` when the object does not say).
    pub namespace: String,
    /// Object name.
    pub name: String,
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The Kubernetes objects the agent acts on, as last seen from a source.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    /// Services by name.
    pub services: BTreeMap<ObjectName, Service>,
    /// EndpointSlices by their own name (not their Service's).
    endpoint_slices: BTreeMap<ObjectName, EndpointSlice>,
    /// EndpointSlice names by the Service they belong to, so a Service's
    /// slices are found without scanning them all.
    slices_by_service: BTreeMap<ObjectName, BTreeSet<ObjectName>>,
    /// This node, when the source knows it.
    pub node: Option<Node>,
}

/// A change reported by a source.
#[derive(Clone, Debug)]
pub enum Change<K> {
    /// The object was created or modified.
    Applied(K),
    /// The object was deleted.
    Deleted(K),
    /// A full (re-)list: these are all the objects of the kind now.
    Replaced(Vec<K>),
}

/// A change to one kind of object the agent watches.
#[derive(Clone, Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "events move through a channel one at a time; a Node is the largest and the rarest"
)]
pub enum ClusterEvent {
    /// A Service changed.
    Service(Change<Service>),
    /// An EndpointSlice changed.
    EndpointSlice(Change<EndpointSlice>),
    /// This node changed.
    Node(Change<Node>),
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
    /// Objects without a name are ignored.
    pub fn apply(&mut self, event: ClusterEvent) -> Dirty {
        match event {
            ClusterEvent::Service(change) => {
                Dirty::Services(apply_change(&mut self.services, change, |service| {
                    object_name(service.metadata())
                }))
            }
            ClusterEvent::EndpointSlice(change) => {
                let mut dirty = BTreeSet::new();
                match change {
                    Change::Applied(slice) => {
                        if let Some(name) = object_name(&slice.metadata) {
                            dirty.extend(slice_owner(&slice));
                            dirty.extend(self.insert_slice(name, slice));
                        }
                    }
                    Change::Deleted(slice) => {
                        if let Some(name) = object_name(&slice.metadata) {
                            dirty.extend(slice_owner(&slice));
                            dirty.extend(self.remove_slice(&name));
                        }
                    }
                    Change::Replaced(all) => {
                        dirty.extend(self.slices_by_service.keys().cloned());
                        self.endpoint_slices.clear();
                        self.slices_by_service.clear();
                        for slice in all {
                            if let Some(name) = object_name(&slice.metadata) {
                                dirty.extend(slice_owner(&slice));
                                self.insert_slice(name, slice);
                            }
                        }
                    }
                }
                Dirty::Services(dirty)
            }
            ClusterEvent::Node(change) => {
                self.node = match change {
                    Change::Applied(node) => Some(node),
                    Change::Deleted(_) => None,
                    Change::Replaced(nodes) => nodes.into_iter().next(),
                };
                Dirty::All
            }
        }
    }

    /// The EndpointSlices labelled as belonging to `service`.
    pub fn slices_of<'a>(
        &'a self,
        service: &'a ObjectName,
    ) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|name| self.endpoint_slices.get(name))
    }

    /// Every EndpointSlice, by its own name.
    pub fn endpoint_slices(&self) -> &BTreeMap<ObjectName, EndpointSlice> {
        &self.endpoint_slices
    }

    /// Adds or replaces an EndpointSlice; returns the Service the replaced
    /// version belonged to.
    pub fn insert_slice(&mut self, name: ObjectName, slice: EndpointSlice) -> Option<ObjectName> {
        let previous_owner = self.remove_slice(&name);
        if let Some(owner) = slice_owner(&slice) {
            self.slices_by_service
                .entry(owner)
                .or_default()
                .insert(name.clone());
        }
        self.endpoint_slices.insert(name, slice);
        previous_owner
    }

    /// Removes an EndpointSlice; returns the Service it belonged to.
    fn remove_slice(&mut self, name: &ObjectName) -> Option<ObjectName> {
        let owner = slice_owner(&self.endpoint_slices.remove(name)?)?;
        if let Some(names) = self.slices_by_service.get_mut(&owner) {
            names.remove(name);
            if names.is_empty() {
                self.slices_by_service.remove(&owner);
            }
        }
        Some(owner)
    }

    /// The Services and EndpointSlices, taken out.
    pub fn into_objects(self) -> (Vec<Service>, Vec<EndpointSlice>) {
        (
            self.services.into_values().collect(),
            self.endpoint_slices.into_values().collect(),
        )
    }
}

/// Applies `change` to `objects` (keyed by object name) and returns the
/// owners (as `owner` names them) of every object version it touched, old
/// and new, so a moved or deleted object marks both sides.
fn apply_change<K: Metadata<Ty = ObjectMeta>>(
    objects: &mut BTreeMap<ObjectName, K>,
    change: Change<K>,
    owner: impl Fn(&K) -> Option<ObjectName>,
) -> BTreeSet<ObjectName> {
    let mut owners = BTreeSet::new();
    match change {
        Change::Applied(object) => {
            if let Some(name) = object_name(object.metadata()) {
                owners.extend(objects.get(&name).and_then(&owner));
                owners.extend(owner(&object));
                objects.insert(name, object);
            }
        }
        Change::Deleted(object) => {
            if let Some(name) = object_name(object.metadata()) {
                owners.extend(objects.remove(&name).as_ref().and_then(&owner));
                owners.extend(owner(&object));
            }
        }
        Change::Replaced(all) => {
            owners.extend(objects.values().filter_map(&owner));
            *objects = all
                .into_iter()
                .filter_map(|object| Some((object_name(object.metadata())?, object)))
                .collect();
            owners.extend(objects.values().filter_map(&owner));
        }
    }
    owners
}

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name`
/// label, in the slice's namespace).
pub fn slice_owner(slice: &EndpointSlice) -> Option<ObjectName> {
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    let slice_name = object_name(&slice.metadata)?;
    Some(ObjectName {
        namespace: slice_name.namespace,
        name: service.clone(),
    })
}

/// The object's `namespace/name`, the namespace defaulting to `default`.
pub fn object_name(metadata: &ObjectMeta) -> Option<ObjectName> {
    let name = metadata.name.clone().filter(|name| !name.is_empty())?;
    let namespace = metadata
        .namespace
        .clone()
        .filter(|namespace| !namespace.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    Some(ObjectName { namespace, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, service: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                labels: Some([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: Vec::new(),
            ports: None,
        }
    }

    fn owners(state: &ClusterState, service: &str) -> Vec<String> {
        let service = ObjectName {
            namespace: "default".into(),
            name: service.into(),
        };
        state
            .slices_of(&service)
            .map(|s| s.metadata.name.clone().unwrap())
            .collect()
    }

    #[test]
    fn slice_events_keep_the_service_index_right_and_mark_both_owners() {
        let mut state = ClusterState::default();
        state.apply(ClusterEvent::EndpointSlice(Change::Replaced(vec![
            slice("a-1", "a"),
            slice("a-2", "a"),
            slice("b-1", "b"),
        ])));
        assert_eq!(owners(&state, "a"), ["a-1", "a-2"]);
        // A slice relabelled to another Service moves, and both are dirty.
        let dirty = state.apply(ClusterEvent::EndpointSlice(Change::Applied(slice(
            "a-2", "b",
        ))));
        let Dirty::Services(dirty) = dirty else {
            panic!("a slice event marks Services");
        };
        assert_eq!(
            dirty.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(owners(&state, "a"), ["a-1"]);
        assert_eq!(owners(&state, "b"), ["a-2", "b-1"]);
        state.apply(ClusterEvent::EndpointSlice(Change::Deleted(slice(
            "a-1", "a",
        ))));
        assert!(owners(&state, "a").is_empty());
        // A re-list replaces everything.
        state.apply(ClusterEvent::EndpointSlice(Change::Replaced(vec![slice(
            "c-1", "c",
        )])));
        assert!(owners(&state, "b").is_empty());
        assert_eq!(owners(&state, "c"), ["c-1"]);
        assert_eq!(state.endpoint_slices().len(), 1);
    }
}
