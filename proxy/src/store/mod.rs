//! The cluster objects this node needs, in slim form ([`objects`]), indexed the way the
//! plans read them.
//!
//! Services are kept by (namespace, name); EndpointSlices are grouped under the Service
//! they belong to (label `kubernetes.io/service-name`), so planning one Service reads only
//! its own slices. The store also remembers which Services changed since the sync loop
//! last asked ([`Store::take_dirty`]): a Service is dirty when it, or one of its slices,
//! was added, changed or removed. That is what lets one change among 10k Services cost the
//! planning of one Service, not of all of them.
//!
//! An update whose slim form equals what is stored changes nothing and marks nothing
//! dirty: status-only churn (a Pod's conditions, a Node's heartbeat) and relists of an
//! unchanged cluster cost a comparison.
//!
//! Pods, Namespaces and NetworkPolicies are kept for the policy plan; they mark no
//! Service dirty. The store notes which of them changed, with their values before and
//! after ([`Store::take_policy_changes`], [`policy_dirty`]), so the incremental policy
//! planner redoes only what a change can touch; [`Store::take_policy_dirty`] only says
//! whether anything changed, for a caller that re-plans whole.
//!
//! Memory, `ferry-proxy run --manifests DIR` at 10k Services x 10 endpoints, VmRSS 1 s
//! after the first sync (proxy bench, `FERRY_BENCH_ONLY=memory`): 342 MiB with whole
//! k8s-openapi objects; 176 MiB with slim objects; 141 MiB giving freed memory back after
//! the first sync ([`release_freed_memory`]); 92 MiB decoding manifests item by item as
//! well (kept objects no longer scattered among the pages of the decoded JSON tree).
//! 10k Pods add 64 MiB (157 MiB; 440 MiB before), much more than their slim copies
//! (a few MiB by field sizes, not measured): each decoded Pod's freed memory stays
//! around the slim copy kept next to it. Decoding manifests straight into the slim types,
//! with no JSON tree nor k8s-openapi object in between, would avoid that; not done yet.
//!
//! By session 5 the 10k figure had grown back to 115.6 MiB, with the trim done. Where it
//! was (`malloc_info` and /proc/PID/smaps, 1 s after the first sync): ~61 MB in use, of
//! which ~19 MB in the main arena (the sync loop: store indexes, plan), ~20 MB in the
//! manifests reader's arena (the slim objects, shared with the store), ~11 MB in the back
//! end's arena plus its two largest hash tables mapped on their own (applied ports 6.3 MB,
//! key owners 4.3 MB); the binary ~10 MiB; and ~42 MiB of resident free memory in the back
//! end's arena, too fragmented for a trim (54.7 MB free in ~40k chunks). One arena for
//! every thread ([`use_one_allocator_arena`]) lets the other threads reuse those holes:
//! in the proxy bench, against the build before in the same run (two runs), 10k Services
//! 117.6 -> 97.8 and 96.6 MiB; + 10k Pods 184.0 -> 128.3 and 159.8 -> 132.0 MiB; + 1k
//! NetworkPolicies 193.3 -> 143.9 and 168.9 -> 144.2 MiB; start to first sync within the
//! noise (10k: 0.91 -> 1.05 s and 0.88 -> 0.94 s). Ten runs of each build in turn by hand
//! (10k Services, busy machine), medians: VmRSS 112.8 -> 92.9 MiB; start to first sync
//! 1.34 -> 1.26 s, plan 39 -> 29 ms, apply 886 -> 801 ms. The goal (< 100 MiB) is met
//! with little room: the fragmentation is still there, only shared. Churn gains too
//! (`tests/manifests_memory.rs`, six cycles of adding and removing a 100k-endpoint slice,
//! both builds in turn): VmRSS after each removal 21.9, 27.5, 31.7, 23.7, 32.4, 35.3 MiB
//! before, 22.4, 19.1, 22.5, 22.5, 19.1, 19.1 MiB after.

pub mod intern;
pub mod objects;
pub mod policy;
pub mod policy_dirty;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use tracing::debug;

use crate::source::{Event, Kind, Object};
use objects::{EndpointSliceInfo, NamespaceInfo, NodeInfo, PodInfo, ServiceInfo};
use policy::NetworkPolicyInfo;
use policy_dirty::{note, Before, PolicyDirty};

pub use objects::SERVICE_NAME_LABEL;

/// Identifies a Service (and the group of EndpointSlices that belong to it).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> ServiceKey {
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

/// (namespace, name) of a namespaced object: EndpointSlices, Pods, NetworkPolicies.
pub type ObjectKey = (Arc<str>, Arc<str>);

/// The objects the proxy has seen, as of the last event applied.
#[derive(Debug, Default)]
pub struct Store {
    services: BTreeMap<ServiceKey, Arc<ServiceInfo>>,
    /// EndpointSlices by owning Service, then by slice name.
    slices: HashMap<ServiceKey, BTreeMap<Arc<str>, Arc<EndpointSliceInfo>>>,
    /// Which Service each stored slice is filed under: a slice's label can change, and a
    /// Delete event may carry a stale copy, so the owner is remembered, not recomputed.
    slice_owner: HashMap<ObjectKey, ServiceKey>,
    nodes: BTreeMap<Arc<str>, Arc<NodeInfo>>,
    pods: BTreeMap<ObjectKey, Arc<PodInfo>>,
    namespaces: BTreeMap<Arc<str>, Arc<NamespaceInfo>>,
    policies: BTreeMap<ObjectKey, Arc<NetworkPolicyInfo>>,
    /// The Pods, Namespaces and NetworkPolicies changed since the last take, as they
    /// were then: any of them can change any Pod's policy.
    policy_before: Before,
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

    pub fn service(&self, key: &ServiceKey) -> Option<&ServiceInfo> {
        self.services.get(key).map(|s| &**s)
    }

    /// Every Service, in key order.
    pub fn services(&self) -> impl Iterator<Item = (&ServiceKey, &ServiceInfo)> {
        self.services.iter().map(|(k, s)| (k, &**s))
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The EndpointSlices of one Service, in slice-name order.
    pub fn slices(&self, key: &ServiceKey) -> impl Iterator<Item = &EndpointSliceInfo> {
        self.slices
            .get(key)
            .into_iter()
            .flat_map(|by_name| by_name.values().map(|s| &**s))
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name).map(|n| &**n)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods
            .get(&(Arc::from(namespace), Arc::from(name)))
            .map(|p| &**p)
    }

    /// Every Pod, in (namespace, name) order.
    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.values().map(|p| &**p)
    }

    /// Every Pod as the store shares it, in (namespace, name) order.
    pub fn pod_entries(&self) -> impl Iterator<Item = (&ObjectKey, &Arc<PodInfo>)> {
        self.pods.iter()
    }

    pub fn namespace(&self, name: &str) -> Option<&NamespaceInfo> {
        self.namespaces.get(name).map(|n| &**n)
    }

    /// Every Namespace, in name order.
    pub fn namespaces(&self) -> impl Iterator<Item = &NamespaceInfo> {
        self.namespaces.values().map(|n| &**n)
    }

    /// Every NetworkPolicy, in (namespace, name) order.
    pub fn policies(&self) -> impl Iterator<Item = &NetworkPolicyInfo> {
        self.policies.values().map(|p| &**p)
    }

    /// Every NetworkPolicy as the store shares it, in (namespace, name) order.
    pub fn policy_entries(&self) -> impl Iterator<Item = (&ObjectKey, &Arc<NetworkPolicyInfo>)> {
        self.policies.iter()
    }

    /// Whether the policy plan may have changed since the last take, and forgets what
    /// changed: for a caller that re-plans whole.
    pub fn take_policy_dirty(&mut self) -> bool {
        !self.take_policy_changes().is_empty()
    }

    /// Whether a Pod, Namespace or NetworkPolicy changed since the last take.
    pub fn has_policy_dirty(&self) -> bool {
        !self.policy_before.is_empty()
    }

    /// The Pods, Namespaces and NetworkPolicies that differ from the last take (of
    /// either kind), with both values, and forgets them. Costs the number of changes.
    pub fn take_policy_changes(&mut self) -> PolicyDirty {
        std::mem::take(&mut self.policy_before).against(&self.pods, &self.namespaces, &self.policies)
    }

    /// Replaces every object of `kinds` by `objects`: what is not in the snapshot is gone.
    /// Objects equal to what is stored mark nothing dirty, so a relist of an unchanged
    /// cluster costs no re-planning.
    fn replace(&mut self, kinds: &[Kind], objects: Vec<Object>) {
        let mut keep_services = BTreeSet::new();
        let mut keep_slices = BTreeSet::new();
        let mut keep_nodes = BTreeSet::new();
        let mut keep_pods = BTreeSet::new();
        let mut keep_namespaces = BTreeSet::new();
        let mut keep_policies = BTreeSet::new();
        for object in objects {
            if !kinds.contains(&object.kind()) {
                debug!(kind = ?object.kind(), "snapshot holds an object of a kind it does not cover; applied as an update");
            }
            match &object {
                Object::Service(s) => keep_services.insert(service_key(s)),
                Object::EndpointSlice(s) => keep_slices.insert(slice_key(s)),
                Object::Node(n) => keep_nodes.insert(n.name.clone()),
                Object::Pod(p) => keep_pods.insert((p.namespace.clone(), p.name.clone())),
                Object::Namespace(n) => keep_namespaces.insert(n.name.clone()),
                Object::NetworkPolicy(p) => keep_policies.insert((p.namespace.clone(), p.name.clone())),
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
                    let gone: Vec<ObjectKey> = self
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
                Kind::Pod => retain_noted(&mut self.pods, &keep_pods, &mut self.policy_before.pods),
                Kind::Namespace => retain_noted(
                    &mut self.namespaces,
                    &keep_namespaces,
                    &mut self.policy_before.namespaces,
                ),
                Kind::NetworkPolicy => retain_noted(
                    &mut self.policies,
                    &keep_policies,
                    &mut self.policy_before.policies,
                ),
            }
            self.synced.insert(*kind);
        }
    }

    fn upsert(&mut self, object: Object) {
        match object {
            Object::Service(service) => {
                let key = service_key(&service);
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
                if !node.name.is_empty() {
                    replace_if_changed(&mut self.nodes, node.name.clone(), node);
                }
            }
            Object::Pod(pod) => {
                if !pod.name.is_empty() {
                    let key = (pod.namespace.clone(), pod.name.clone());
                    replace_noted(&mut self.pods, key, pod, &mut self.policy_before.pods);
                }
            }
            Object::Namespace(namespace) => {
                if !namespace.name.is_empty() {
                    let key = namespace.name.clone();
                    replace_noted(
                        &mut self.namespaces,
                        key,
                        namespace,
                        &mut self.policy_before.namespaces,
                    );
                }
            }
            Object::NetworkPolicy(policy) => {
                if !policy.name.is_empty() {
                    let key = (policy.namespace.clone(), policy.name.clone());
                    replace_noted(&mut self.policies, key, policy, &mut self.policy_before.policies);
                }
            }
        }
    }

    fn upsert_slice(&mut self, slice: Arc<EndpointSliceInfo>) {
        let key = slice_key(&slice);
        let owner = slice
            .service_name
            .as_ref()
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
                let key = service_key(service);
                if self.services.remove(&key).is_some() {
                    self.dirty.insert(key);
                }
            }
            Object::EndpointSlice(slice) => self.remove_slice(&slice_key(slice)),
            Object::Node(node) => {
                self.nodes.remove(&node.name);
            }
            Object::Pod(pod) => {
                let key = (pod.namespace.clone(), pod.name.clone());
                remove_noted(&mut self.pods, key, &mut self.policy_before.pods);
            }
            Object::Namespace(namespace) => {
                remove_noted(
                    &mut self.namespaces,
                    namespace.name.clone(),
                    &mut self.policy_before.namespaces,
                );
            }
            Object::NetworkPolicy(policy) => {
                let key = (policy.namespace.clone(), policy.name.clone());
                remove_noted(&mut self.policies, key, &mut self.policy_before.policies);
            }
        }
    }

    fn remove_slice(&mut self, key: &ObjectKey) {
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

/// Returns the heap's free pages to the system (glibc's `malloc_trim`). Decoding a large
/// list (a relist, a manifests file of 10k objects) allocates many times what the store
/// keeps, on whatever thread decoded it; glibc keeps the freed memory in that thread's
/// arena, so the process's RSS would stay at its peak (figures in the module docs).
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes every thread allocate from one glibc arena, unless the operator chose a number
/// (`MALLOC_ARENA_MAX`, or `arena_max` in `GLIBC_TUNABLES`). Call it before any thread
/// starts: an arena, once made, stays.
///
/// Why: glibc gives each allocating thread an arena of its own, and a trim only returns
/// whole free pages. The back end's thread builds its first sync's transient objects
/// (rendered rules, elements, netlink buffers) among what it keeps (the applied ports and
/// key owners); once they are freed, its arena held 54.7 MB free in ~40k chunks (1.4 KB on
/// average) around ~11 MB in use, so most of its pages stayed resident (52.7 MiB of RSS,
/// `malloc_info` and smaps at 10k Services). With one arena the next allocations of every
/// thread reuse those holes: 112.8 -> 92.9 MiB (module docs). Two arenas gave 95-103 MiB,
/// depending on which threads happened to share one. The cost, one lock for every
/// thread's allocations, is small here: the source, the sync loop and the back end hand
/// work to each other rather than allocate side by side.
pub fn use_one_allocator_arena() {
    let chosen = std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
    if !chosen {
        // SAFETY: mallopt only sets a limit the allocator reads when it makes an arena.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Stores `value` unless an equal one is there: the stored copy stays, and the new one
/// (with its own allocations) is dropped. Whether it stored.
fn replace_if_changed<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, Arc<V>>, key: K, value: Arc<V>) -> bool {
    let changed = map.get(&key) != Some(&value);
    if changed {
        map.insert(key, value);
    }
    changed
}

/// [`replace_if_changed`], noting the value it replaced for the policy plan.
fn replace_noted<K: Ord + Clone, V: PartialEq>(
    map: &mut BTreeMap<K, Arc<V>>,
    key: K,
    value: Arc<V>,
    noted: &mut BTreeMap<K, Option<Arc<V>>>,
) {
    if map.get(&key) != Some(&value) {
        let before = map.insert(key.clone(), value);
        note(noted, key, before.as_ref());
    }
}

fn remove_noted<K: Ord, V>(map: &mut BTreeMap<K, Arc<V>>, key: K, noted: &mut BTreeMap<K, Option<Arc<V>>>) {
    if let Some(before) = map.remove(&key) {
        note(noted, key, Some(&before));
    }
}

/// Keeps the entries of `map` whose key is in `keep`, noting the others' values.
fn retain_noted<K: Ord + Clone, V>(
    map: &mut BTreeMap<K, Arc<V>>,
    keep: &BTreeSet<K>,
    noted: &mut BTreeMap<K, Option<Arc<V>>>,
) {
    map.retain(|key, value| {
        let kept = keep.contains(key);
        if !kept {
            note(noted, key.clone(), Some(value));
        }
        kept
    });
}

fn service_key(service: &ServiceInfo) -> ServiceKey {
    ServiceKey::new(service.namespace.clone(), service.name.clone())
}

fn slice_key(slice: &EndpointSliceInfo) -> ObjectKey {
    (slice.namespace.clone(), slice.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use serde_json::json;

    fn k8s_service(ns: &str, name: &str, cluster_ip: &str) -> Service {
        let mut s = Service::default();
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        s.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            ..Default::default()
        });
        s
    }

    fn service(ns: &str, name: &str, cluster_ip: &str) -> Object {
        k8s_service(ns, name, cluster_ip).into()
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
        s.into()
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
    fn changes_nothing_reads_are_not_changes() {
        let mut store = Store::new();
        store.apply(Event::Upsert(service("a", "web", "10.0.0.1")));
        store.take_dirty();
        // A new resourceVersion, an annotation and a status condition: nothing a plan reads.
        let mut churned = k8s_service("a", "web", "10.0.0.1");
        churned.metadata.resource_version = Some("42".into());
        churned.metadata.annotations = Some([("note".to_string(), "x".to_string())].into());
        churned.status = Some(
            serde_json::from_value(json!({"conditions": [{
            "type": "Ready", "status": "True", "reason": "r", "message": "m",
            "lastTransitionTime": "2025-05-01T10:00:00Z"}]}))
            .unwrap(),
        );
        store.apply(Event::Upsert(churned.into()));
        assert!(store.take_dirty().is_empty());
        // The load balancer's address is read: that is a change.
        let mut with_lb = k8s_service("a", "web", "10.0.0.1");
        with_lb.status = Some(
            serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}})).unwrap(),
        );
        store.apply(Event::Upsert(with_lb.into()));
        assert_eq!(store.take_dirty(), keys(&[("a", "web")]));
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
        let mut s = k8s_service("x", "web", "10.0.0.1");
        s.metadata.namespace = None;
        store.apply(Event::Upsert(s.into()));
        assert!(store.service(&ServiceKey::new("default", "web")).is_some());
    }

    fn pod(name: &str, labels: serde_json::Value, phase: &str, ips: &[&str]) -> Object {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "labels": labels,
                         "uid": "u", "resourceVersion": "1",
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"}},
            "spec": {"nodeName": "node-a", "containers": [
                {"name": "web", "image": "nginx", "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"containerPort": 53, "protocol": "UDP"}]}],
                "initContainers": [{"name": "proxy", "image": "envoy", "restartPolicy": "Always",
                    "ports": [{"name": "admin", "containerPort": 9901, "protocol": "SCTP"}]}]},
            "status": {"phase": phase, "podIP": ips.first().copied().unwrap_or(""),
                       "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        pod.into()
    }

    #[test]
    fn pods_and_namespaces_are_kept_slim_and_updated() {
        use crate::plan::Protocol;
        use objects::{ContainerPort, PodPhase};

        let mut store = Store::new();
        let namespace: Namespace =
            serde_json::from_value(json!({"metadata": {"name": "shop", "labels": {"team": "a"}}})).unwrap();
        store.apply(Event::Snapshot {
            kinds: vec![Kind::Pod, Kind::Namespace],
            objects: vec![
                pod("web-1", json!({"app": "web"}), "Pending", &[]),
                namespace.into(),
            ],
        });
        assert!(store.has_synced(Kind::Pod) && store.has_synced(Kind::Namespace));
        assert!(!store.has_synced(Kind::Service));
        // No Service reads them: nothing to re-plan.
        assert!(store.take_dirty().is_empty());

        let shop = store.namespace("shop").unwrap();
        // The label the API server adds is there, also when the manifest left it out.
        assert_eq!(shop.labels.get("kubernetes.io/metadata.name"), Some("shop"));
        assert_eq!(shop.labels.get("team"), Some("a"));
        assert_eq!(shop.labels.len(), 2);

        let web = store.pod("shop", "web-1").unwrap();
        assert_eq!(web.phase, PodPhase::Pending);
        assert!(web.ips.is_empty());
        assert_eq!(web.node_name.as_deref(), Some("node-a"));
        assert_eq!(web.labels.iter().collect::<Vec<_>>(), [("app", "web")]);
        assert_eq!(
            web.ports,
            [
                ContainerPort {
                    name: Some("http".into()),
                    protocol: Some(Protocol::Tcp),
                    port: 8080
                },
                ContainerPort {
                    name: None,
                    protocol: Some(Protocol::Udp),
                    port: 53
                },
                ContainerPort {
                    name: Some("admin".into()),
                    protocol: Some(Protocol::Sctp),
                    port: 9901
                },
            ]
        );

        // Running, with its addresses: the stored copy follows.
        store.apply(Event::Upsert(pod(
            "web-1",
            json!({"app": "web"}),
            "Running",
            &["10.244.0.5", "fd00::5"],
        )));
        let web = store.pod("shop", "web-1").unwrap();
        assert_eq!(web.phase, PodPhase::Running);
        assert_eq!(
            web.ips,
            [
                "10.244.0.5".parse::<std::net::IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        // Strings that repeat are shared: the namespace of the Pod is the Namespace's name.
        assert!(Arc::ptr_eq(
            &web.namespace,
            &store.namespace("shop").unwrap().name
        ));

        // A relist without it: gone.
        store.apply(Event::Snapshot {
            kinds: vec![Kind::Pod],
            objects: vec![pod("web-2", json!({}), "Running", &["10.244.0.6"])],
        });
        assert!(store.pod("shop", "web-1").is_none());
        assert_eq!(store.pods().map(|p| &*p.name).collect::<Vec<_>>(), ["web-2"]);
        store.apply(Event::Delete(pod("web-2", json!({}), "Running", &[])));
        assert_eq!(store.pods().count(), 0);
        assert!(store.take_dirty().is_empty());
    }

    #[test]
    fn policies_are_stored_and_raise_the_policy_flag_only_on_change() {
        use k8s_openapi::api::networking::v1::NetworkPolicy;
        let policy = |app: &str| -> Object {
            let p: NetworkPolicy = serde_json::from_value(json!({
                "metadata": {"namespace": "shop", "name": "deny"},
                "spec": {"podSelector": {"matchLabels": {"app": app}}}}))
            .unwrap();
            p.into()
        };
        let mut store = Store::new();
        store.apply(Event::Snapshot {
            kinds: vec![Kind::NetworkPolicy],
            objects: vec![policy("web")],
        });
        assert!(store.take_policy_dirty());
        assert_eq!(store.policies().count(), 1);
        store.apply(Event::Upsert(policy("web")));
        assert!(!store.take_policy_dirty(), "the same policy again is no change");
        store.apply(Event::Upsert(policy("db")));
        assert!(store.take_policy_dirty());
        store.apply(Event::Upsert(pod(
            "web-1",
            json!({"app": "web"}),
            "Running",
            &["10.244.0.5"],
        )));
        assert!(store.take_policy_dirty(), "a new Pod can be selected");
        store.apply(Event::Delete(policy("db")));
        assert!(store.take_policy_dirty());
        assert_eq!(store.policies().count(), 0);
        assert!(store.take_dirty().is_empty(), "no Service is re-planned");
    }

    #[test]
    fn policy_changes_say_which_objects_changed_and_what_they_were() {
        let mut store = Store::new();
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap();
        store.apply(Event::Upsert(namespace.into()));
        store.apply(Event::Upsert(pod(
            "web-1",
            json!({"app": "web"}),
            "Running",
            &["10.244.0.5"],
        )));
        let added = store.take_policy_changes();
        assert_eq!(added.namespaces.len(), 1);
        let key: ObjectKey = (Arc::from("shop"), Arc::from("web-1"));
        let change = &added.pods[&key];
        assert!(change.before.is_none() && change.after.is_some());
        assert!(change.peer_changed() && change.labels_changed());
        assert!(!store.has_policy_dirty());

        // Relabelled, then its address changed: one change, from the first value.
        store.apply(Event::Upsert(pod(
            "web-1",
            json!({"app": "db"}),
            "Running",
            &["10.244.0.5"],
        )));
        let relabelled = store.take_policy_changes();
        assert!(relabelled.pods[&key].labels_changed() && !relabelled.pods[&key].peer_changed());
        store.apply(Event::Upsert(pod(
            "web-1",
            json!({"app": "web"}),
            "Running",
            &["10.244.0.5"],
        )));
        store.apply(Event::Upsert(pod(
            "web-1",
            json!({"app": "web"}),
            "Running",
            &["10.244.0.6"],
        )));
        let moved = store.take_policy_changes();
        let change = &moved.pods[&key];
        assert_eq!(change.before.as_ref().unwrap().labels.get("app"), Some("db"));
        assert_eq!(change.after.as_ref().unwrap().labels.get("app"), Some("web"));
        assert!(change.peer_changed());

        // Changed and changed back: nothing to redo.
        store.apply(Event::Upsert(pod(
            "web-1",
            json!({"app": "x"}),
            "Running",
            &["10.244.0.6"],
        )));
        store.apply(Event::Upsert(pod(
            "web-1",
            json!({"app": "web"}),
            "Running",
            &["10.244.0.6"],
        )));
        assert!(store.has_policy_dirty());
        assert!(store.take_policy_changes().is_empty());

        // A relist without it: removed, with what it was.
        store.apply(Event::Snapshot {
            kinds: vec![Kind::Pod, Kind::Namespace],
            objects: vec![],
        });
        let relisted = store.take_policy_changes();
        assert!(relisted.pods[&key].after.is_none());
        assert_eq!(relisted.namespaces.len(), 1);
        assert!(relisted.namespaces[&Arc::from("shop")].after.is_none());
    }
}
