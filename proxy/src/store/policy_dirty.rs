//! What changed among Pods, Namespaces and NetworkPolicies since the policy plan last
//! asked: per object, its value then and now.
//!
//! The store notes an object's value the first time it changes after a take (and nothing
//! more on later changes), so a take costs the number of objects that changed, and an
//! object changed and changed back is no change at all. With both values the planner
//! knows what to undo (an old selector, old labels) without keeping a copy of the
//! cluster, and how much to redo: a Pod whose labels alone changed moves between peer
//! sets, but cannot change which numbers its named ports resolve to.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::objects::{NamespaceInfo, PodInfo};
use super::policy::NetworkPolicyInfo;
use super::ObjectKey;

/// An object as the last take saw it and as the store holds it now; `None`: absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change<T> {
    pub before: Option<Arc<T>>,
    pub after: Option<Arc<T>>,
}

/// Pods, Namespaces and NetworkPolicies that differ from the last take, by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyDirty {
    /// By (namespace, name).
    pub pods: BTreeMap<ObjectKey, Change<PodInfo>>,
    /// By name.
    pub namespaces: BTreeMap<Arc<str>, Change<NamespaceInfo>>,
    /// By (namespace, name).
    pub policies: BTreeMap<ObjectKey, Change<NetworkPolicyInfo>>,
}

impl PolicyDirty {
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty() && self.namespaces.is_empty() && self.policies.is_empty()
    }
}

impl Change<PodInfo> {
    /// Whether what a Pod is as a peer changed: whether it is one, its addresses, its
    /// named ports. A label-only change moves it between selectors but leaves these.
    pub fn peer_changed(&self) -> bool {
        let of = |p: &Option<Arc<PodInfo>>| {
            p.as_ref()
                .map(|p| (p.ips.clone(), p.ports.clone(), p.phase, p.host_network))
        };
        of(&self.before) != of(&self.after)
    }

    /// Whether the labels changed (or the Pod came or went).
    pub fn labels_changed(&self) -> bool {
        self.before.as_ref().map(|p| &p.labels) != self.after.as_ref().map(|p| &p.labels)
    }
}

/// The values of changed objects at the last take, kept by the store until the next.
#[derive(Debug, Default)]
pub(super) struct Before {
    pub pods: BTreeMap<ObjectKey, Option<Arc<PodInfo>>>,
    pub namespaces: BTreeMap<Arc<str>, Option<Arc<NamespaceInfo>>>,
    pub policies: BTreeMap<ObjectKey, Option<Arc<NetworkPolicyInfo>>>,
}

impl Before {
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty() && self.namespaces.is_empty() && self.policies.is_empty()
    }

    /// Pairs each noted value with the current one; drops those that came back.
    pub fn against(
        self,
        pods: &BTreeMap<ObjectKey, Arc<PodInfo>>,
        namespaces: &BTreeMap<Arc<str>, Arc<NamespaceInfo>>,
        policies: &BTreeMap<ObjectKey, Arc<NetworkPolicyInfo>>,
    ) -> PolicyDirty {
        PolicyDirty {
            pods: pair(self.pods, pods),
            namespaces: pair(self.namespaces, namespaces),
            policies: pair(self.policies, policies),
        }
    }
}

/// Notes `before` as `key`'s value at the last take, unless a value is noted already.
pub(super) fn note<K: Ord, T>(noted: &mut BTreeMap<K, Option<Arc<T>>>, key: K, before: Option<&Arc<T>>) {
    noted.entry(key).or_insert_with(|| before.cloned());
}

fn pair<K: Ord + Clone, T: PartialEq>(
    noted: BTreeMap<K, Option<Arc<T>>>,
    now: &BTreeMap<K, Arc<T>>,
) -> BTreeMap<K, Change<T>> {
    noted
        .into_iter()
        .filter_map(|(key, before)| {
            let after = now.get(&key).cloned();
            (before != after).then_some((key, Change { before, after }))
        })
        .collect()
}
