//! The cluster objects this node needs, indexed the way the plan reads them.
//!
//! Services are kept by (namespace, name); EndpointSlices are grouped under the Service
//! they belong to (label `kubernetes.io/service-name`), so planning one Service reads only
//! its own slices. The store also remembers which Services changed since the sync loop
//! last asked ([`Store::take_dirty`]): a Service is dirty when it, or one of its slices,
//! was added, changed or removed. That is what lets one change among 10k Services cost the
//! planning of one Service, not of all of them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tracing::debug;

use crate::source::{Event, Kind, Object};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Identifies a Service (and the group of EndpointSlices that belong to it).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> ServiceKey {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// (namespace, name) of an EndpointSlice.
type SliceKey = (String, String);

/// The objects the proxy has seen, as of the last event applied.
#[derive(Debug, Default)]
pub struct Store {
    services: BTreeMap<ServiceKey, Service>,
    /// EndpointSlices by owning Service, then by slice name.
    slices: HashMap<ServiceKey, BTreeMap<String, EndpointSlice>>,
    /// Which Service each stored slice is filed under: a slice's label can change, and a
    /// Delete event may carry a stale copy, so the owner is remembered, not recomputed.
    slice_owner: HashMap<SliceKey, ServiceKey>,
    nodes: BTreeMap<String, Node>,
    /// Kinds for which a complete snapshot has arrived: until then the store does not
    /// know the whole truth, and programming from it would delete good rules.
    synced: BTreeSet<Kind>,
    dirty: BTreeSet<ServiceKey>,
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    /// Applies one event from a source. `Error` events change nothing (the source keeps
    /// its last good state); the caller reports them.
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Snapshot { kinds, objects } => self.replace(&kinds, objects),
            Event::Upsert(object) => self.upsert(object),
            Event::Delete(object) => self.delete(&object),
            Event::Error(_) => {}
        }
    }

    /// Services whose plan may have changed since the last call, and forgets them.
    pub fn take_dirty(&mut self) -> BTreeSet<ServiceKey> {
        std::mem::take(&mut self.dirty)
    }

    /// Whether a Service changed since the last [`Store::take_dirty`].
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Whether a complete snapshot of `kind` has been applied.
    pub fn has_synced(&self, kind: Kind) -> bool {
        self.synced.contains(&kind)
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&Service> {
        self.services.get(key)
    }

    /// Every Service, in key order.
    pub fn services(&self) -> impl Iterator<Item = (&ServiceKey, &Service)> {
        self.services.iter()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The EndpointSlices of one Service, in slice-name order.
    pub fn slices(&self, key: &ServiceKey) -> impl Iterator<Item = &EndpointSlice> {
        self.slices
            .get(key)
            .into_iter()
            .flat_map(|by_name| by_name.values())
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Replaces every object of `kinds` by `objects`: what is not in the snapshot is gone.
    /// Objects equal to what is stored mark nothing dirty, so a relist of an unchanged
    /// cluster costs no re-planning.
    fn replace(&mut self, kinds: &[Kind], objects: Vec<Object>) {
        let mut keep_services = BTreeSet::new();
        let mut keep_slices = BTreeSet::new();
        let mut keep_nodes = BTreeSet::new();
        for object in objects {
            if !kinds.contains(&object.kind()) {
                debug!(kind = ?object.kind(), "snapshot holds an object of a kind it does not cover; applied as an update");
            }
            match &object {
                Object::Service(s) => keep_services.insert(service_key(&s.metadata)),
                Object::EndpointSlice(s) => keep_slices.insert(slice_key(&s.metadata)),
                Object::Node(n) => keep_nodes.insert(n.metadata.name.clone().unwrap_or_default()),
            };
            self.upsert(object);
        }
        for kind in kinds {
            match kind {
                Kind::Service => {
                    let gone: Vec<ServiceKey> = self
                        .services
                        .keys()
                        .filter(|k| !keep_services.contains(*k))
                        .cloned()
                        .collect();
                    for key in gone {
                        self.services.remove(&key);
                        self.dirty.insert(key);
                    }
                }
                Kind::EndpointSlice => {
                    let gone: Vec<SliceKey> = self
                        .slice_owner
                        .keys()
                        .filter(|k| !keep_slices.contains(*k))
                        .cloned()
                        .collect();
                    for key in gone {
                        self.remove_slice(&key);
                    }
                }
                Kind::Node => self.nodes.retain(|name, _| keep_nodes.contains(name)),
            }
            self.synced.insert(*kind);
        }
    }

    fn upsert(&mut self, object: Object) {
        match object {
            Object::Service(service) => {
                let key = service_key(&service.metadata);
                if key.name.is_empty() {
                    debug!("ignoring a Service without a name");
                    return;
                }
                if self.services.get(&key) != Some(&service) {
                    self.services.insert(key.clone(), service);
                    self.dirty.insert(key);
                }
            }
            Object::EndpointSlice(slice) => self.upsert_slice(slice),
            Object::Node(node) => {
                if let Some(name) = node.metadata.name.clone() {
                    self.nodes.insert(name, node);
                }
            }
        }
    }

    fn upsert_slice(&mut self, slice: EndpointSlice) {
        let key = slice_key(&slice.metadata);
        let owner = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
            .filter(|name| !name.is_empty())
            .map(|name| ServiceKey::new(key.0.clone(), name.clone()));
        let Some(owner) = owner.filter(|_| !key.1.is_empty()) else {
            // kube-proxy ignores slices it cannot tie to a Service; so do we, but a slice
            // that lost its label must stop feeding its old Service.
            debug!(slice = %format!("{}/{}", key.0, key.1), "ignoring an EndpointSlice without the {SERVICE_NAME_LABEL} label");
            self.remove_slice(&key);
            return;
        };
        if self.slice_owner.get(&key).is_some_and(|old| *old != owner) {
            self.remove_slice(&key);
        }
        let group = self.slices.entry(owner.clone()).or_default();
        if group.get(&key.1) != Some(&slice) {
            group.insert(key.1.clone(), slice);
            self.slice_owner.insert(key, owner.clone());
            self.dirty.insert(owner);
        }
    }

    fn delete(&mut self, object: &Object) {
        match object {
            Object::Service(service) => {
                let key = service_key(&service.metadata);
                if self.services.remove(&key).is_some() {
                    self.dirty.insert(key);
                }
            }
            Object::EndpointSlice(slice) => self.remove_slice(&slice_key(&slice.metadata)),
            Object::Node(node) => {
                if let Some(name) = &node.metadata.name {
                    self.nodes.remove(name);
                }
            }
        }
    }

    fn remove_slice(&mut self, key: &SliceKey) {
        let Some(owner) = self.slice_owner.remove(key) else {
            return;
        };
        if let Some(group) = self.slices.get_mut(&owner) {
            group.remove(&key.1);
            if group.is_empty() {
                self.slices.remove(&owner);
            }
        }
        self.dirty.insert(owner);
    }
}

/// Objects from a manifest may lack a namespace: like kubectl, they then live in "default".
fn namespace_of(meta: &ObjectMeta) -> String {
    meta.namespace
        .clone()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

fn service_key(meta: &ObjectMeta) -> ServiceKey {
    ServiceKey {
        namespace: namespace_of(meta),
        name: meta.name.clone().unwrap_or_default(),
    }
}

fn slice_key(meta: &ObjectMeta) -> SliceKey {
    (namespace_of(meta), meta.name.clone().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(ns: &str, name: &str, cluster_ip: &str) -> Object {
        let mut s = Service::default();
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        s.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            ..Default::default()
        });
        Object::Service(s)
    }

    fn slice(ns: &str, name: &str, owner: Option<&str>, ip: &str) -> Object {
        let mut s = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: vec![k8s_openapi::api::discovery::v1::Endpoint {
                addresses: vec![ip.into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        if let Some(owner) = owner {
            s.metadata.labels = Some([(SERVICE_NAME_LABEL.to_string(), owner.to_string())].into());
        }
        Object::EndpointSlice(s)
    }

    fn keys(names: &[(&str, &str)]) -> BTreeSet<ServiceKey> {
        names.iter().map(|(ns, n)| ServiceKey::new(*ns, *n)).collect()
    }

    #[test]
    fn upserts_mark_only_what_changed() {
        let mut store = Store::new();
        store.apply(Event::Upsert(service("a", "web", "10.0.0.1")));
        store.apply(Event::Upsert(slice("a", "web-1", Some("web"), "10.1.0.1")));
        assert_eq!(store.take_dirty(), keys(&[("a", "web")]));
        // The same object again is not a change.
        store.apply(Event::Upsert(service("a", "web", "10.0.0.1")));
        store.apply(Event::Upsert(slice("a", "web-1", Some("web"), "10.1.0.1")));
        assert!(store.take_dirty().is_empty());
        store.apply(Event::Upsert(slice("a", "web-1", Some("web"), "10.1.0.2")));
        assert_eq!(store.take_dirty(), keys(&[("a", "web")]));
        assert_eq!(store.slices(&ServiceKey::new("a", "web")).count(), 1);
    }

    #[test]
    fn a_slice_moving_to_another_service_dirties_both() {
        let mut store = Store::new();
        store.apply(Event::Upsert(slice("a", "s1", Some("old"), "10.1.0.1")));
        store.take_dirty();
        store.apply(Event::Upsert(slice("a", "s1", Some("new"), "10.1.0.1")));
        assert_eq!(store.take_dirty(), keys(&[("a", "new"), ("a", "old")]));
        assert_eq!(store.slices(&ServiceKey::new("a", "old")).count(), 0);
        assert_eq!(store.slices(&ServiceKey::new("a", "new")).count(), 1);
        // Losing the label removes it from its Service.
        store.apply(Event::Upsert(slice("a", "s1", None, "10.1.0.1")));
        assert_eq!(store.take_dirty(), keys(&[("a", "new")]));
        assert_eq!(store.slices(&ServiceKey::new("a", "new")).count(), 0);
    }

    #[test]
    fn deletes_use_the_remembered_owner() {
        let mut store = Store::new();
        store.apply(Event::Upsert(slice("a", "s1", Some("web"), "10.1.0.1")));
        store.take_dirty();
        // A Delete carrying a copy without labels still removes the slice from "web".
        store.apply(Event::Delete(slice("a", "s1", None, "10.1.0.1")));
        assert_eq!(store.take_dirty(), keys(&[("a", "web")]));
        assert_eq!(store.slices(&ServiceKey::new("a", "web")).count(), 0);
    }

    #[test]
    fn snapshots_replace_only_their_kinds() {
        let mut store = Store::new();
        store.apply(Event::Snapshot {
            kinds: vec![Kind::Service, Kind::EndpointSlice, Kind::Node],
            objects: vec![
                service("a", "web", "10.0.0.1"),
                service("a", "db", "10.0.0.2"),
                slice("a", "web-1", Some("web"), "10.1.0.1"),
            ],
        });
        assert!(store.has_synced(Kind::Service) && store.has_synced(Kind::EndpointSlice));
        assert_eq!(store.take_dirty(), keys(&[("a", "db"), ("a", "web")]));

        // A Service snapshot without "db": db is gone, the slices are untouched.
        store.apply(Event::Snapshot {
            kinds: vec![Kind::Service],
            objects: vec![service("a", "web", "10.0.0.1")],
        });
        assert_eq!(store.take_dirty(), keys(&[("a", "db")]));
        assert!(store.service(&ServiceKey::new("a", "db")).is_none());
        assert_eq!(store.slices(&ServiceKey::new("a", "web")).count(), 1);

        // A slice snapshot without web-1.
        store.apply(Event::Snapshot {
            kinds: vec![Kind::EndpointSlice],
            objects: vec![],
        });
        assert_eq!(store.take_dirty(), keys(&[("a", "web")]));
        assert_eq!(store.slices(&ServiceKey::new("a", "web")).count(), 0);
    }

    #[test]
    fn a_missing_namespace_means_default() {
        let mut store = Store::new();
        let mut s = service("x", "web", "10.0.0.1");
        if let Object::Service(s) = &mut s {
            s.metadata.namespace = None;
        }
        store.apply(Event::Upsert(s));
        assert!(store.service(&ServiceKey::new("default", "web")).is_some());
    }
}
