//! The policy plan, compiled once and then kept up to date change by change.
//!
//! What is kept ([`Compiled`]): the peer Pods, indexed by namespace and by label; every
//! policy, with each rule pointing at a [`PeerSet`], the rule's list of peers resolved
//! once however many rules share it (the Pods it holds, their addresses, and per list of
//! named ports the destinations that give each name which number); and which policies
//! use each peer set.
//!
//! What a change touches, and so what [`PolicyPlanner::update`] redoes:
//! - a Pod: its own entry (when it is, or was, on the node); every peer set it enters or
//!   leaves, or whose addresses it changes; when its addresses, ports or phase changed,
//!   the named-port destinations that name one of its ports;
//! - a Namespace: the peer sets with a namespaceSelector whose verdict on the namespace
//!   flipped, checked again for the Pods of that namespace only;
//! - a policy: the node's Pods of its namespace that its old or its new podSelector picks;
//! - a peer set whose addresses changed (or a named-port destination set of it): its
//!   [`PeerSetId`] stays, so the entries that hold it get the new addresses in place,
//!   clause by clause, and are not planned again; a set that only gained members gets
//!   their addresses merged into its ranges rather than made again from every member;
//! - a peer set whose named ports gained or lost a destination number: the node's Pods
//!   selected by a policy that uses it (their egress gains or loses a clause).
//!
//! Each Pod entry to plan again is planned whole (its namespace's policies, a few) and
//! compared with the one in the table: only those that differ are reported, with those
//! whose addresses were swapped in.
//!
//! Measured (`cargo bench -p ferry-proxy --bench policy_backend`, the daemon's path per
//! change; 10,000 Pods, 1,000 on the node, 1,000 policies; table in the policy back
//! end's module docs): see "Measurements" there. Before the swap in place, a Pod added
//! whose named port every node Pod's egress resolves re-planned all 1,000 entries
//! (27.7-121 ms).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::ranges::{block_ranges, normalize, remove_address};
use super::{
    is_peer, on_node, resolve_name, AddressRange, Addresses, Allow, Clause, Isolation, PeerSetId, PodPolicy,
    PolicyTable, PortRange, Ports,
};
use crate::plan::Protocol;
use crate::store::objects::{Labels, PodInfo};
use crate::store::policy::{NetworkPolicyInfo, PolicyPeer, PolicyPort, PolicyRule, PortSpec};
use crate::store::policy_dirty::PolicyDirty;
use crate::store::{ObjectKey, Store};

/// The incremental policy plan of one node.
///
/// [`PolicyPlanner::full`] plans from scratch; [`PolicyPlanner::update`] then brings a
/// table up to date with what the store says changed
/// ([`Store::take_policy_changes`]). Every change must reach the planner: feed it each
/// take, in order, with the table it made last (or plan whole again).
pub struct PolicyPlanner {
    node: Arc<str>,
    compiled: Compiled,
}

impl PolicyPlanner {
    pub fn new(node_name: &str) -> PolicyPlanner {
        PolicyPlanner {
            node: Arc::from(node_name),
            compiled: Compiled::default(),
        }
    }

    /// Plans every Pod of the node from the store as it is, and keeps what it compiled.
    pub fn full(&mut self, store: &Store) -> PolicyTable {
        let node = self.node.clone();
        let (compiled, table) = Compiled::build(store, &|pod: &PodInfo| on_node(pod, &node));
        self.compiled = compiled;
        table
    }

    /// Brings `table` (the last one this planner made or updated) up to date with
    /// `dirty`; returns the `namespace/name` of each Pod whose entry changed, came or went.
    pub fn update(
        &mut self,
        store: &Store,
        dirty: &PolicyDirty,
        table: &mut PolicyTable,
    ) -> BTreeSet<String> {
        let node = self.node.clone();
        self.compiled
            .update(store, dirty, &|pod: &PodInfo| on_node(pod, &node), table)
    }
}

/// What a plan is made of, kept to be updated.
#[derive(Default)]
pub(super) struct Compiled {
    /// Pods that can be peers ([`is_peer`]).
    peers: HashMap<ObjectKey, Arc<PodInfo>>,
    /// Names of the peer Pods of each namespace.
    by_namespace: HashMap<Arc<str>, BTreeSet<Arc<str>>>,
    /// Peer Pods by address (two may share one for a while): whether a set still holds
    /// an address some member left.
    by_ip: HashMap<IpAddr, Vec<ObjectKey>>,
    /// Peer Pods by label key, then value: a selector's `matchLabels` reads only these.
    by_label: HashMap<Arc<str>, HashMap<Arc<str>, HashSet<ObjectKey>>>,
    /// Every policy, by namespace then name (the order of its allows in a Pod's entry).
    policies: HashMap<Arc<str>, BTreeMap<Arc<str>, PlannedPolicy>>,
    peer_sets: HashMap<PeerList, PeerSet>,
    /// One copy of each distinct address set, so equal sets are one `Arc`; an entry
    /// nothing else holds any more is dropped after each update.
    shared: HashSet<Arc<Addresses>>,
}

/// A rule's peers as the set they resolve to depends on them: the policy's namespace
/// only matters when a peer selects Pods of it, so "every namespace's `app=web`" is one
/// set for every policy that says so.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PeerList {
    namespace: Option<Arc<str>>,
    peers: Vec<PolicyPeer>,
}

impl PeerList {
    fn of(namespace: &Arc<str>, rule: &PolicyRule) -> PeerList {
        let own_namespace = rule
            .peers
            .iter()
            .any(|p| matches!(p, PolicyPeer::Pods { namespaces: None, .. }));
        PeerList {
            namespace: own_namespace.then(|| namespace.clone()),
            peers: rule.peers.clone(),
        }
    }

    /// Whether a selector peer picks `pod`, whose namespace has `namespace_labels`.
    fn selects(&self, pod: &PodInfo, namespace_labels: &Labels) -> bool {
        self.peers.iter().any(|peer| match peer {
            PolicyPeer::Pods { namespaces, pods } => {
                let namespace_ok = match namespaces {
                    None => self.namespace.as_deref() == Some(&*pod.namespace),
                    Some(selector) => selector.matches(namespace_labels),
                };
                namespace_ok && pods.as_ref().is_none_or(|s| s.matches(&pod.labels))
            }
            PolicyPeer::Block { .. } => false,
        })
    }
}

/// One list of peers, resolved.
struct PeerSet {
    /// Its name for back ends: of the list, not of its members.
    id: PeerSetId,
    /// The peer Pods a selector peer picks.
    members: HashSet<ObjectKey>,
    addresses: Arc<Addresses>,
    /// Per sorted list of (name, protocol) of an egress rule: per port number, the
    /// addresses among `addresses` of the peer Pods that give a name that number.
    named: HashMap<PortNames, Destinations>,
    /// The policies with a rule of these peers.
    users: BTreeSet<ObjectKey>,
}

/// The named ports of an egress rule: (name, protocol), sorted.
type PortNames = Vec<(Arc<str>, Protocol)>;

/// Per port number, the destination addresses that give a name that number, with the
/// id of that destination set (the list's, the names' and the number's).
type Destinations = Vec<(PortRange, PeerSetId, Arc<Addresses>)>;

struct PlannedPolicy {
    info: Arc<NetworkPolicyInfo>,
    ingress: Option<Vec<PlannedRule>>,
    egress: Option<Vec<PlannedRule>>,
}

struct PlannedRule {
    peers: PeerList,
    /// Empty: every port.
    ports: Vec<PolicyPort>,
    /// Egress only: the named ports, sorted, resolved on each destination.
    names: PortNames,
}

fn no_labels() -> &'static Labels {
    static EMPTY: std::sync::OnceLock<Labels> = std::sync::OnceLock::new();
    EMPTY.get_or_init(Labels::default)
}

/// A namespace's labels; one the store does not know (yet) has none.
fn namespace_labels<'s>(store: &'s Store, namespace: &str) -> &'s Labels {
    store.namespace(namespace).map_or(no_labels(), |n| &n.labels)
}

fn table_key((namespace, name): &ObjectKey) -> String {
    format!("{namespace}/{name}")
}

impl Compiled {
    /// Compiles the store and plans the Pods `wanted` picks among the peers.
    pub(super) fn build(store: &Store, wanted: &dyn Fn(&PodInfo) -> bool) -> (Compiled, PolicyTable) {
        let mut compiled = Compiled::default();
        for (key, pod) in store.pod_entries() {
            if is_peer(pod) {
                compiled.index(key.clone(), pod.clone());
            }
        }
        for (key, policy) in store.policy_entries() {
            compiled.add_policy(store, key.clone(), policy.clone());
        }
        let mut table = PolicyTable::default();
        for (key, pod) in store.pod_entries() {
            if is_peer(pod) && wanted(pod) {
                table.pods.insert(table_key(key), compiled.pod_policy(pod));
            }
        }
        (compiled, table)
    }

    fn index(&mut self, key: ObjectKey, pod: Arc<PodInfo>) {
        for ip in &pod.ips {
            self.by_ip.entry(*ip).or_default().push(key.clone());
        }
        self.by_namespace
            .entry(key.0.clone())
            .or_default()
            .insert(key.1.clone());
        for (k, v) in pod.labels.pairs() {
            self.by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .insert(key.clone());
        }
        self.peers.insert(key, pod);
    }

    fn unindex(&mut self, key: &ObjectKey) {
        let Some(pod) = self.peers.remove(key) else {
            return;
        };
        for ip in &pod.ips {
            if let Some(keys) = self.by_ip.get_mut(ip) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
        if let Some(names) = self.by_namespace.get_mut(&key.0) {
            names.remove(&key.1);
            if names.is_empty() {
                self.by_namespace.remove(&key.0);
            }
        }
        for (k, v) in pod.labels.pairs() {
            if let Some(values) = self.by_label.get_mut(k) {
                if let Some(keys) = values.get_mut(v) {
                    keys.remove(key);
                    if keys.is_empty() {
                        values.remove(v);
                    }
                }
                if values.is_empty() {
                    self.by_label.remove(k);
                }
            }
        }
    }

    /// The peer Pods a selector peer could pick, checked or not: those of the namespaces
    /// it can pick, or those with the rarest of its `matchLabels`, whichever are fewer.
    fn candidates(&self, store: &Store, list: &PeerList, peer: &PolicyPeer) -> Vec<ObjectKey> {
        let PolicyPeer::Pods { namespaces, pods } = peer else {
            return Vec::new();
        };
        let namespaces: Vec<&Arc<str>> = match namespaces {
            None => list.namespace.iter().collect(),
            Some(selector) => self
                .by_namespace
                .keys()
                .filter(|ns| selector.matches(namespace_labels(store, ns)))
                .collect(),
        };
        let in_namespaces: usize = namespaces
            .iter()
            .map(|ns| self.by_namespace.get(*ns).map_or(0, BTreeSet::len))
            .sum();
        let rarest_label = pods.as_ref().and_then(|selector| {
            selector
                .match_labels
                .iter()
                .map(|(k, v)| self.by_label.get(k).and_then(|values| values.get(v)))
                .min_by_key(|keys| keys.map_or(0, HashSet::len))
        });
        match rarest_label {
            Some(None) => Vec::new(),
            Some(Some(keys)) if keys.len() < in_namespaces => keys.iter().cloned().collect(),
            _ => namespaces
                .into_iter()
                .flat_map(|ns| {
                    self.by_namespace
                        .get(ns)
                        .into_iter()
                        .flatten()
                        .map(move |name| (ns.clone(), name.clone()))
                })
                .collect(),
        }
    }

    fn peer_selected(&self, store: &Store, list: &PeerList, key: &ObjectKey) -> bool {
        self.peers
            .get(key)
            .is_some_and(|pod| list.selects(pod, namespace_labels(store, &pod.namespace)))
    }

    /// The addresses of a peer list: its blocks and its members' addresses.
    fn addresses_of(&mut self, list: &PeerList, members: &HashSet<ObjectKey>) -> Arc<Addresses> {
        let addresses = if list.peers.is_empty() {
            Addresses::Any
        } else {
            let mut ranges = Vec::new();
            for peer in &list.peers {
                if let PolicyPeer::Block { cidr, except } = peer {
                    ranges.extend(block_ranges(*cidr, except));
                }
            }
            for key in members {
                ranges.extend(self.peers[key].ips.iter().map(|ip| AddressRange {
                    first: *ip,
                    last: *ip,
                }));
            }
            Addresses::Ranges(normalize(ranges))
        };
        self.share(addresses)
    }

    fn share(&mut self, addresses: Addresses) -> Arc<Addresses> {
        if let Some(existing) = self.shared.get(&addresses) {
            return existing.clone();
        }
        let shared = Arc::new(addresses);
        self.shared.insert(shared.clone());
        shared
    }

    /// Per port number, the addresses in `peers` of the peer Pods that give one of
    /// `names` that number.
    fn named_destinations(
        &mut self,
        list: &PeerSetId,
        peers: &Addresses,
        names: &[(Arc<str>, Protocol)],
    ) -> Destinations {
        let mut by_number: BTreeMap<PortRange, Vec<AddressRange>> = BTreeMap::new();
        for (name, protocol) in names {
            for pod in self.peers.values() {
                for number in resolve_name(pod, name, *protocol) {
                    let hosts = pod
                        .ips
                        .iter()
                        .filter(|ip| peers.contains(**ip))
                        .map(|ip| AddressRange {
                            first: *ip,
                            last: *ip,
                        });
                    let range = PortRange {
                        protocol: *protocol,
                        first: number,
                        last: number,
                    };
                    by_number.entry(range).or_default().extend(hosts);
                }
            }
        }
        by_number
            .into_iter()
            .map(|(range, hosts)| {
                let id = PeerSetId::of(&(list.as_str(), names, range));
                (range, id, self.share(Addresses::Ranges(normalize(hosts))))
            })
            .collect()
    }

    /// The peer set of `list`, resolved now if no rule had it yet.
    fn peer_set(&mut self, store: &Store, list: &PeerList) -> &mut PeerSet {
        if !self.peer_sets.contains_key(list) {
            let mut members = HashSet::new();
            for peer in &list.peers {
                for key in self.candidates(store, list, peer) {
                    if self.peer_selected(store, list, &key) {
                        members.insert(key);
                    }
                }
            }
            let addresses = self.addresses_of(list, &members);
            let set = PeerSet {
                id: PeerSetId::of(list),
                members,
                addresses,
                named: HashMap::new(),
                users: BTreeSet::new(),
            };
            self.peer_sets.insert(list.clone(), set);
        }
        self.peer_sets.get_mut(list).expect("inserted above")
    }

    fn add_policy(&mut self, store: &Store, key: ObjectKey, info: Arc<NetworkPolicyInfo>) {
        let mut plan_rules = |rules: &Vec<PolicyRule>, egress: bool| -> Vec<PlannedRule> {
            rules
                .iter()
                .map(|rule| {
                    let peers = PeerList::of(&info.namespace, rule);
                    let mut names: PortNames = Vec::new();
                    if egress {
                        names = rule
                            .ports
                            .iter()
                            .filter_map(|p| match &p.port {
                                Some(PortSpec::Name(name)) => Some((name.clone(), p.protocol)),
                                _ => None,
                            })
                            .collect();
                        names.sort();
                        names.dedup();
                    }
                    let set = self.peer_set(store, &peers);
                    set.users.insert(key.clone());
                    if !names.is_empty() && !set.named.contains_key(&names) {
                        let (id, addresses) = (set.id.clone(), set.addresses.clone());
                        let found = self.named_destinations(&id, &addresses, &names);
                        self.peer_sets
                            .get_mut(&peers)
                            .expect("made above")
                            .named
                            .insert(names.clone(), found);
                    }
                    PlannedRule {
                        peers,
                        ports: rule.ports.clone(),
                        names,
                    }
                })
                .collect()
        };
        let planned = PlannedPolicy {
            ingress: info.ingress.as_ref().map(|r| plan_rules(r, false)),
            egress: info.egress.as_ref().map(|r| plan_rules(r, true)),
            info,
        };
        self.policies.entry(key.0).or_default().insert(key.1, planned);
    }

    fn remove_policy(&mut self, key: &ObjectKey) {
        let Some(planned) = self
            .policies
            .get_mut(&key.0)
            .and_then(|by_name| by_name.remove(&key.1))
        else {
            return;
        };
        if self.policies.get(&key.0).is_some_and(BTreeMap::is_empty) {
            self.policies.remove(&key.0);
        }
        let rules = planned.ingress.iter().chain(planned.egress.iter()).flatten();
        for rule in rules {
            if let Some(set) = self.peer_sets.get_mut(&rule.peers) {
                set.users.remove(key);
                if set.users.is_empty() {
                    self.peer_sets.remove(&rule.peers);
                }
            }
        }
    }

    /// The entry of one Pod: every policy of its namespace that selects it, in name order.
    fn pod_policy(&self, pod: &PodInfo) -> PodPolicy {
        let mut ingress: Option<Isolation> = None;
        let mut egress: Option<Isolation> = None;
        for planned in self
            .policies
            .get(&pod.namespace)
            .into_iter()
            .flat_map(|p| p.values())
        {
            let policy = &planned.info;
            if !policy.pod_selector.matches(&pod.labels) {
                continue;
            }
            let name = format!("{}/{}", policy.namespace, policy.name);
            if let Some(rules) = &planned.ingress {
                let isolation = ingress.get_or_insert_with(Isolation::empty);
                isolation.policies.push(name.clone());
                for (index, rule) in rules.iter().enumerate() {
                    let set = &self.peer_sets[&rule.peers];
                    isolation.allows.push(Allow {
                        policy: name.clone(),
                        rule: index,
                        clauses: vec![Clause {
                            peer_set: set.id.clone(),
                            peers: set.addresses.clone(),
                            ports: port_ranges(&rule.ports, Some(pod)),
                        }],
                    });
                }
            }
            if let Some(rules) = &planned.egress {
                let isolation = egress.get_or_insert_with(Isolation::empty);
                isolation.policies.push(name.clone());
                for (index, rule) in rules.iter().enumerate() {
                    isolation.allows.push(self.egress_allow(&name, index, rule));
                }
            }
        }
        PodPolicy {
            namespace: pod.namespace.to_string(),
            name: pod.name.to_string(),
            ips: pod.ips.clone(),
            ingress,
            egress,
        }
    }

    fn egress_allow(&self, policy: &str, index: usize, rule: &PlannedRule) -> Allow {
        let set = &self.peer_sets[&rule.peers];
        let mut clauses = vec![Clause {
            peer_set: set.id.clone(),
            peers: set.addresses.clone(),
            ports: port_ranges(&rule.ports, None),
        }];
        if !rule.names.is_empty() {
            clauses.extend(set.named[&rule.names].iter().map(|(range, id, hosts)| Clause {
                peer_set: id.clone(),
                peers: hosts.clone(),
                ports: Ports::Ranges(vec![*range]),
            }));
        }
        // A rule of only named ports has nothing numeric: drop the clause that matches nothing.
        clauses.retain(|c| c.ports != Ports::Ranges(Vec::new()));
        Allow {
            policy: policy.to_string(),
            rule: index,
            clauses,
        }
    }

    /// See the module docs for what each change touches.
    fn update(
        &mut self,
        store: &Store,
        dirty: &PolicyDirty,
        wanted: &dyn Fn(&PodInfo) -> bool,
        table: &mut PolicyTable,
    ) -> BTreeSet<String> {
        // Pods of the node to plan again.
        let mut replan: BTreeSet<ObjectKey> = BTreeSet::new();
        // Policies whose selected Pods must be planned again.
        let mut touched_policies: BTreeSet<ObjectKey> = BTreeSet::new();

        // Policies go first, so sets only they used are not updated for nothing; they
        // come back after the Pods and Namespaces, resolved against the new state.
        for key in dirty.policies.keys() {
            self.remove_policy(key);
        }

        // Pods: the index, then the sets they enter or leave.
        let mut stale_sets: HashMap<PeerList, Stale> = HashMap::new();
        let mut moved_names: HashSet<(Arc<str>, Protocol)> = HashSet::new();
        for (key, change) in &dirty.pods {
            for pod in change.before.iter().chain(change.after.iter()) {
                if wanted(pod) {
                    replan.insert(key.clone());
                }
            }
            let was_peer = self.peers.contains_key(key);
            let peer_changed = change.peer_changed();
            if !peer_changed && !change.labels_changed() && was_peer {
                // Only its node changed: its own entry (above), nothing of any set.
                if let Some(pod) = &change.after {
                    self.peers.insert(key.clone(), pod.clone());
                }
                continue;
            }
            let old_ips = self.peers.get(key).map(|p| p.ips.clone()).unwrap_or_default();
            self.unindex(key);
            if let Some(pod) = change.after.as_ref().filter(|p| is_peer(p)) {
                self.index(key.clone(), pod.clone());
            }
            if peer_changed {
                for pod in change.before.iter().chain(change.after.iter()) {
                    for port in &pod.ports {
                        if let (Some(name), Some(protocol)) = (&port.name, port.protocol) {
                            moved_names.insert((name.clone(), protocol));
                        }
                    }
                }
            }
            let pod = self.peers.get(key).cloned();
            let labels = pod.as_ref().map(|p| namespace_labels(store, &p.namespace));
            for (list, set) in &mut self.peer_sets {
                let now = pod.as_ref().zip(labels).is_some_and(|(p, l)| list.selects(p, l));
                let was = set.members.contains(key);
                if now != was || (now && peer_changed) {
                    if now {
                        set.members.insert(key.clone());
                    } else {
                        set.members.remove(key);
                    }
                    let stale = stale_sets.entry(list.clone()).or_default();
                    if was {
                        stale.left.extend(&old_ips);
                    }
                    if let Some(pod) = pod.as_ref().filter(|_| now) {
                        stale.joined.extend(&pod.ips);
                    }
                }
            }
        }

        // Namespaces: sets whose namespaceSelector changed its mind about one.
        for (namespace, change) in &dirty.namespaces {
            let before = change.before.as_ref().map_or(no_labels(), |n| &n.labels);
            let after = change.after.as_ref().map_or(no_labels(), |n| &n.labels);
            let names: Vec<Arc<str>> = self
                .by_namespace
                .get(namespace)
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            for (list, set) in &mut self.peer_sets {
                let flipped = list.peers.iter().any(|peer| match peer {
                    PolicyPeer::Pods {
                        namespaces: Some(selector),
                        ..
                    } => selector.matches(before) != selector.matches(after),
                    _ => false,
                });
                if !flipped {
                    continue;
                }
                for name in &names {
                    let key = (namespace.clone(), name.clone());
                    let now = list.selects(&self.peers[&key], after);
                    if now != set.members.contains(&key) {
                        if now {
                            set.members.insert(key.clone());
                        } else {
                            set.members.remove(&key);
                        }
                        let stale = stale_sets.entry(list.clone()).or_default();
                        let ips = &self.peers[&key].ips;
                        if now {
                            stale.joined.extend(ips);
                        } else {
                            stale.left.extend(ips);
                        }
                    }
                }
            }
        }

        // The sets' addresses, then the named destinations that may have moved. A set
        // whose addresses alone changed keeps its id: the entries holding it get the new
        // addresses in place (`moved`), without being planned again.
        let mut moved = Moved::default();
        let mut changed_sets: HashSet<PeerList> = HashSet::new();
        for (list, stale) in stale_sets {
            let addresses = self.moved_addresses(&list, &stale);
            let set = self.peer_sets.get_mut(&list).expect("live set");
            if set.addresses != addresses {
                let was = std::mem::replace(&mut set.addresses, addresses.clone());
                moved.insert(set.id.clone(), &was, addresses);
                changed_sets.insert(list);
            }
        }
        // Sets whose named destinations gained or lost a port number: their users'
        // entries change shape (a clause more or less) and are planned again.
        let mut reshaped: HashSet<PeerList> = HashSet::new();
        let lists: Vec<PeerList> = self
            .peer_sets
            .iter()
            .filter(|(_, set)| !set.named.is_empty())
            .map(|(list, _)| list.clone())
            .collect();
        for list in lists {
            let set = &self.peer_sets[&list];
            let addresses = set.addresses.clone();
            let addresses_moved = changed_sets.contains(&list);
            let redo: Vec<PortNames> = set
                .named
                .keys()
                .filter(|names| addresses_moved || names.iter().any(|n| moved_names.contains(n)))
                .cloned()
                .collect();
            for names in redo {
                let id = self.peer_sets[&list].id.clone();
                let found = self.named_destinations(&id, &addresses, &names);
                let set = self.peer_sets.get_mut(&list).expect("live set");
                let Some(old) = set.named.get(&names) else {
                    set.named.insert(names, found);
                    reshaped.insert(list.clone());
                    continue;
                };
                if old == &found {
                    continue;
                }
                let same_numbers =
                    old.len() == found.len() && old.iter().zip(&found).all(|(o, f)| o.0 == f.0);
                if same_numbers {
                    for ((_, _, was), (_, id, now)) in old.iter().zip(&found) {
                        if was != now {
                            moved.insert(id.clone(), was, now.clone());
                        }
                    }
                } else {
                    reshaped.insert(list.clone());
                }
                set.named.insert(names, found);
            }
        }
        for list in &reshaped {
            touched_policies.extend(self.peer_sets[list].users.iter().cloned());
        }

        // Policies come back, and every Pod their old or new selector picks is replanned.
        for (key, change) in &dirty.policies {
            if let Some(policy) = &change.after {
                self.add_policy(store, key.clone(), policy.clone());
            }
            for policy in change.before.iter().chain(change.after.iter()) {
                self.select_local(policy, wanted, &mut replan);
            }
        }
        for key in touched_policies {
            if let Some(planned) = self.policies.get(&key.0).and_then(|p| p.get(&key.1)) {
                let policy = planned.info.clone();
                self.select_local(&policy, wanted, &mut replan);
            }
        }

        let mut changed = BTreeSet::new();
        if !moved.by_id.is_empty() {
            moved.swap_into(table, &mut changed);
        }
        for key in replan {
            let entry = self
                .peers
                .get(&key)
                .filter(|pod| wanted(pod))
                .map(|pod| self.pod_policy(pod));
            let name = table_key(&key);
            let differs = match entry {
                Some(entry) if table.pods.get(&name).is_some_and(|old| same_entry(old, &entry)) => false,
                Some(entry) => {
                    table.pods.insert(name.clone(), entry);
                    true
                }
                None => table.pods.remove(&name).is_some(),
            };
            if differs {
                changed.insert(name);
            }
        }
        self.shared.retain(|set| Arc::strong_count(set) > 1);
        changed
    }

    /// Adds the node's peer Pods `policy` selects to `into`.
    fn select_local(
        &self,
        policy: &NetworkPolicyInfo,
        wanted: &dyn Fn(&PodInfo) -> bool,
        into: &mut BTreeSet<ObjectKey>,
    ) {
        for name in self.by_namespace.get(&policy.namespace).into_iter().flatten() {
            let key = (policy.namespace.clone(), name.clone());
            let pod = &self.peers[&key];
            if wanted(pod) && policy.pod_selector.matches(&pod.labels) {
                into.insert(key);
            }
        }
    }
}

/// The addresses of a peer set's members that joined or left it in one update (a
/// member whose addresses changed did both).
#[derive(Default)]
struct Stale {
    joined: Vec<IpAddr>,
    left: Vec<IpAddr>,
}

impl Compiled {
    /// The addresses of `list` after `stale`, from its old ones: an address left stays
    /// when a block or another member still holds it; joined ones are merged in (a
    /// sorted list with a few addresses appended sorts in about one pass). Making the
    /// set again from every member instead (for the set of every Pod of the cluster:
    /// 10,000 lookups and a sort) was most of an added Pod's update.
    fn moved_addresses(&mut self, list: &PeerList, stale: &Stale) -> Arc<Addresses> {
        let set = &self.peer_sets[list];
        let Addresses::Ranges(old) = &*set.addresses else {
            return set.addresses.clone();
        };
        let mut ranges = old.clone();
        // Both lists are checked against the members as they are now: a Pod may have
        // joined and left (or the reverse) within one update.
        let held = |ip: &IpAddr| {
            self.by_ip
                .get(ip)
                .is_some_and(|keys| keys.iter().any(|k| set.members.contains(k)))
        };
        if !stale.left.is_empty() {
            let blocks: Vec<AddressRange> = list
                .peers
                .iter()
                .flat_map(|peer| match peer {
                    PolicyPeer::Block { cidr, except } => block_ranges(*cidr, except),
                    PolicyPeer::Pods { .. } => Vec::new(),
                })
                .collect();
            let blocks = Addresses::Ranges(normalize(blocks));
            for ip in &stale.left {
                if !blocks.contains(*ip) && !held(ip) {
                    remove_address(&mut ranges, *ip);
                }
            }
        }
        let joined: Vec<AddressRange> = stale
            .joined
            .iter()
            .filter(|ip| held(ip))
            .map(|ip| AddressRange {
                first: *ip,
                last: *ip,
            })
            .collect();
        if !joined.is_empty() {
            ranges.extend(joined);
            ranges = normalize(ranges);
        }
        self.share(Addresses::Ranges(ranges))
    }
}

/// Peer sets (and named-port destinations) whose addresses alone changed in one update.
#[derive(Default)]
struct Moved {
    by_id: HashMap<PeerSetId, Arc<Addresses>>,
    /// The addresses they had, as pointers, sorted: a clause can only hold a moved set if
    /// it holds one of these (cheaper to test than its id, for 1,000 entries of dozens of
    /// clauses).
    was: Vec<usize>,
}

impl Moved {
    fn insert(&mut self, id: PeerSetId, was: &Arc<Addresses>, now: Arc<Addresses>) {
        self.by_id.insert(id, now);
        let was = Arc::as_ptr(was) as usize;
        if let Err(at) = self.was.binary_search(&was) {
            self.was.insert(at, was);
        }
    }

    /// Gives every clause of a moved set its new addresses, and notes the entries that
    /// held one as changed (those planned again afterwards get the same addresses).
    fn swap_into(&self, table: &mut PolicyTable, changed: &mut BTreeSet<String>) {
        for (name, entry) in &mut table.pods {
            let mut swapped = false;
            let clauses = entry
                .ingress
                .iter_mut()
                .chain(entry.egress.iter_mut())
                .flat_map(|i| i.allows.iter_mut())
                .flat_map(|a| a.clauses.iter_mut());
            for clause in clauses {
                if self
                    .was
                    .binary_search(&(Arc::as_ptr(&clause.peers) as usize))
                    .is_err()
                {
                    continue;
                }
                if let Some(now) = self.by_id.get(&clause.peer_set) {
                    if !Arc::ptr_eq(&clause.peers, now) {
                        clause.peers = now.clone();
                        swapped = true;
                    }
                }
            }
            if swapped {
                changed.insert(name.clone());
            }
        }
    }
}

/// Whether two entries of this planner's tables are equal, address sets compared by
/// pointer: every set is shared ([`Compiled::share`]), so equal sets are one `Arc`, and
/// comparing the contents of a changed set (thousands of addresses, in every entry that
/// holds it) cost more than planning the entries did.
fn same_entry(a: &PodPolicy, b: &PodPolicy) -> bool {
    let same_allow = |x: &Allow, y: &Allow| {
        x.policy == y.policy
            && x.rule == y.rule
            && x.clauses.len() == y.clauses.len()
            && x.clauses.iter().zip(&y.clauses).all(|(c, d)| {
                Arc::ptr_eq(&c.peers, &d.peers) && c.peer_set == d.peer_set && c.ports == d.ports
            })
    };
    let same_isolation = |x: &Option<Isolation>, y: &Option<Isolation>| match (x, y) {
        (None, None) => true,
        (Some(x), Some(y)) => {
            x.policies == y.policies
                && x.allows.len() == y.allows.len()
                && x.allows.iter().zip(&y.allows).all(|(p, q)| same_allow(p, q))
        }
        _ => false,
    };
    a.namespace == b.namespace
        && a.name == b.name
        && a.ips == b.ips
        && same_isolation(&a.ingress, &b.ingress)
        && same_isolation(&a.egress, &b.egress)
}

/// Numeric ports as ranges; named ones resolved on `destination` when given.
fn port_ranges(ports: &[PolicyPort], destination: Option<&PodInfo>) -> Ports {
    if ports.is_empty() {
        return Ports::Any;
    }
    let mut ranges = Vec::new();
    for port in ports {
        match &port.port {
            None => ranges.push(PortRange {
                protocol: port.protocol,
                first: 0,
                last: u16::MAX,
            }),
            Some(PortSpec::Range { first, last }) => ranges.push(PortRange {
                protocol: port.protocol,
                first: *first,
                last: *last,
            }),
            Some(PortSpec::Name(name)) => {
                if let Some(pod) = destination {
                    ranges.extend(resolve_name(pod, name, port.protocol).map(|n| PortRange {
                        protocol: port.protocol,
                        first: n,
                        last: n,
                    }));
                }
            }
        }
    }
    ranges.sort();
    ranges.dedup();
    Ports::Ranges(ranges)
}
