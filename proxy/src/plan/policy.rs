//! The policy plan: for each Pod this node enforces, which connections its NetworkPolicies
//! allow, resolved to addresses and port ranges.
//!
//! Labels and names are the store's business; a back end (and `trace`) should only
//! compare numbers. So every selector is resolved here, once: a peer becomes the
//! addresses of the Pods (of every node) it selects, an `ipBlock` becomes address ranges
//! (its `except`s cut out), a named port becomes the number the destination Pod gives it.
//!
//! The unit is a [`PodPolicy`]: per direction, either not isolated (no policy of that
//! type selects the Pod: everything passes) or a list of [`Allow`]s, one per rule of every
//! policy that selects it. A connection passes a direction when one clause of one allow
//! matches its other end's address and its destination port (rules add up: OR). The
//! kernel then needs both directions: the source Pod's egress and the destination Pod's
//! ingress, each judged on the node the Pod runs on.
//!
//! Peer address sets are computed once per rule and shared ([`Arc`]) by every Pod the
//! policy selects, and equal sets of different rules are one set: 1,000 Pods under one
//! policy cost one set, not 1,000, and 1,000 policies allowing "every Pod's `http`" hold
//! that list once (a back end can then program one kernel set for all of them).
//!
//! Which Pods count as peers: those with an address whose phase is not Succeeded or
//! Failed (a finished Pod's address may already belong to another Pod).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::Serialize;

use super::Protocol;
use crate::store::objects::{Labels, PodInfo, PodPhase};
use crate::store::policy::{NetworkPolicyInfo, PolicyPeer, PolicyPort, PolicyRule, PortSpec};
use crate::store::Store;

/// The policy part of the plan: every Pod of this node with an address, by
/// `namespace/name`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyTable {
    pub pods: BTreeMap<String, PodPolicy>,
}

/// What the policies say about one Pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodPolicy {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    /// `None`: no policy isolates the Pod for ingress; everything may come in.
    pub ingress: Option<Isolation>,
    /// `None`: not isolated for egress.
    pub egress: Option<Isolation>,
}

/// One direction of an isolated Pod: the policies that isolate it, and what they allow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Isolation {
    /// `namespace/name` of every policy that selects the Pod for this direction, sorted.
    pub policies: Vec<String>,
    pub allows: Vec<Allow>,
}

/// One rule of one policy, resolved for one Pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Allow {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// Index of the rule in the policy's `ingress` or `egress` list.
    pub rule: usize,
    /// The rule matches when any clause does. Most rules have one; an egress rule with
    /// named ports has one per destination port number, since each destination Pod
    /// resolves the name itself.
    pub clauses: Vec<Clause>,
}

/// Addresses of the other end AND ports of the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Clause {
    #[serde(serialize_with = "shared")]
    pub peers: Arc<Addresses>,
    pub ports: Ports,
}

fn shared<S: serde::Serializer>(addresses: &Arc<Addresses>, serializer: S) -> Result<S::Ok, S::Error> {
    addresses.as_ref().serialize(serializer)
}

/// Addresses of the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Addresses {
    /// Every address (a rule with no peers).
    Any,
    /// Sorted, disjoint, not adjacent ranges; IPv4 ranges before IPv6 ones.
    Ranges(Vec<AddressRange>),
}

/// `first..=last`, both of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct AddressRange {
    pub first: IpAddr,
    pub last: IpAddr,
}

/// Destination ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ports {
    /// Every port of every protocol (a rule with no ports).
    Any,
    /// Sorted; may be empty (a named port no destination has: matches nothing).
    Ranges(Vec<PortRange>),
}

/// `first..=last` of one protocol; `0..=65535` for "every port of this protocol".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortRange {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

impl Addresses {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match self {
            Addresses::Any => true,
            Addresses::Ranges(ranges) => {
                // Sorted and disjoint: the only candidate is the last range starting at
                // or below the address.
                let key = Number::of(ip);
                let after = ranges.partition_point(|r| Number::of(r.first) <= key);
                after > 0 && key <= Number::of(ranges[after - 1].last)
            }
        }
    }
}

impl Ports {
    pub fn contains(&self, protocol: Protocol, port: u16) -> bool {
        match self {
            Ports::Any => true,
            Ports::Ranges(ranges) => ranges
                .iter()
                .any(|r| r.protocol == protocol && r.first <= port && port <= r.last),
        }
    }
}

impl Clause {
    pub fn matches(&self, other_end: IpAddr, protocol: Protocol, port: u16) -> bool {
        self.ports.contains(protocol, port) && self.peers.contains(other_end)
    }
}

impl Isolation {
    /// The allows that let a connection through, in policy order: empty means denied.
    pub fn allowing(&self, other_end: IpAddr, protocol: Protocol, port: u16) -> Vec<&Allow> {
        self.allows
            .iter()
            .filter(|a| a.clauses.iter().any(|c| c.matches(other_end, protocol, port)))
            .collect()
    }
}

/// Plans every Pod of `node_name` that has an address.
pub fn plan(store: &Store, node_name: &str) -> PolicyTable {
    plan_pods(store, |pod| pod.node_name.as_deref() == Some(node_name))
}

/// Plans the Pods `wanted` picks among those with an address (`trace` plans both ends of
/// a connection, whatever their node).
pub fn plan_pods(store: &Store, wanted: impl Fn(&PodInfo) -> bool) -> PolicyTable {
    let peers = PeerIndex::new(store);
    let mut shared = SharedSets::default();
    let mut compiled: HashMap<(&str, &str), CompiledPolicy> = HashMap::new();
    let mut by_namespace: HashMap<&str, Vec<&NetworkPolicyInfo>> = HashMap::new();
    for policy in store.policies() {
        by_namespace.entry(&policy.namespace).or_default().push(policy);
    }
    let mut table = PolicyTable::default();
    for pod in peers.pods.iter().map(|p| p.pod).filter(|p| wanted(p)) {
        let mut ingress: Option<Isolation> = None;
        let mut egress: Option<Isolation> = None;
        for policy in by_namespace.get(&*pod.namespace).into_iter().flatten() {
            if !policy.pod_selector.matches(&pod.labels) {
                continue;
            }
            let key = (&*policy.namespace, &*policy.name);
            let compiled = compiled
                .entry(key)
                .or_insert_with(|| CompiledPolicy::new(policy, &peers, &mut shared));
            let name = format!("{}/{}", policy.namespace, policy.name);
            if let Some(rules) = &compiled.ingress {
                let isolation = ingress.get_or_insert_with(Isolation::empty);
                isolation.policies.push(name.clone());
                for (index, rule) in rules.iter().enumerate() {
                    isolation.allows.push(rule.ingress_allow(&name, index, pod));
                }
            }
            if let Some(rules) = &compiled.egress {
                let isolation = egress.get_or_insert_with(Isolation::empty);
                isolation.policies.push(name.clone());
                for (index, rule) in rules.iter().enumerate() {
                    isolation.allows.push(rule.egress_allow(&name, index));
                }
            }
        }
        table.pods.insert(
            format!("{}/{}", pod.namespace, pod.name),
            PodPolicy {
                namespace: pod.namespace.to_string(),
                name: pod.name.to_string(),
                ips: pod.ips.clone(),
                ingress,
                egress,
            },
        );
    }
    table
}

impl Isolation {
    fn empty() -> Isolation {
        Isolation {
            policies: Vec::new(),
            allows: Vec::new(),
        }
    }
}

/// Whether a Pod's address may stand for it: it has one and has not finished.
pub fn is_peer(pod: &PodInfo) -> bool {
    !pod.ips.is_empty() && !matches!(pod.phase, PodPhase::Succeeded | PodPhase::Failed)
}

/// The Pods that can be peers, with their namespace's labels, for resolving selectors.
struct PeerIndex<'s> {
    pods: Vec<PeerPod<'s>>,
}

struct PeerPod<'s> {
    pod: &'s PodInfo,
    /// `None`: the namespace is not (yet) known; it then has no labels.
    namespace_labels: Option<&'s Labels>,
}

impl<'s> PeerIndex<'s> {
    fn new(store: &'s Store) -> PeerIndex<'s> {
        PeerIndex {
            pods: store
                .pods()
                .filter(|p| is_peer(p))
                .map(|pod| PeerPod {
                    pod,
                    namespace_labels: store.namespace(&pod.namespace).map(|n| &n.labels),
                })
                .collect(),
        }
    }

    /// The Pods a selector peer of a policy in `policy_namespace` selects.
    fn selected<'i>(
        &'i self,
        policy_namespace: &'i str,
        peer: &'i PolicyPeer,
    ) -> impl Iterator<Item = &'s PodInfo> + 'i {
        let no_labels = Labels::default();
        self.pods
            .iter()
            .filter(move |p| match peer {
                PolicyPeer::Pods { namespaces, pods } => {
                    let namespace_ok = match namespaces {
                        None => *p.pod.namespace == *policy_namespace,
                        Some(selector) => selector.matches(p.namespace_labels.unwrap_or(&no_labels)),
                    };
                    namespace_ok && pods.as_ref().is_none_or(|s| s.matches(&p.pod.labels))
                }
                PolicyPeer::Block { .. } => false,
            })
            .map(|p| p.pod)
    }
}

/// A policy with its peers resolved; what remains per Pod is ingress named ports.
struct CompiledPolicy {
    ingress: Option<Vec<CompiledRule>>,
    egress: Option<Vec<CompiledRule>>,
}

struct CompiledRule {
    peers: Arc<Addresses>,
    /// Empty: every port.
    ports: Vec<PolicyPort>,
    /// Egress rules with named ports: per (protocol, number), the destinations among
    /// `peers` whose Pod gives that name that number.
    named_destinations: Vec<(PortRange, Arc<Addresses>)>,
}

/// One copy of each distinct address set of a plan, and the named-port destinations
/// already worked out: many egress rules name the same port towards the same peers
/// (`http` to every namespace), and resolving a name walks every Pod of the cluster.
#[derive(Default)]
struct SharedSets {
    sets: HashMap<Arc<Addresses>, ()>,
    named: NamedDestinations,
}

/// Per (peer set, sorted named ports): per port number, the peers that give a name it.
type NamedDestinations = HashMap<(usize, Vec<(Arc<str>, Protocol)>), Vec<(PortRange, Arc<Addresses>)>>;

impl SharedSets {
    /// Which destination Pods among `peers` give each of `names` which number: only those
    /// addresses, on that number, are allowed by the name.
    fn named_destinations(
        &mut self,
        peers: &Arc<Addresses>,
        names: &[(&Arc<str>, Protocol)],
        index: &PeerIndex,
    ) -> Vec<(PortRange, Arc<Addresses>)> {
        // The pointer stands for the set: every set of this plan is shared, so equal sets
        // have one pointer, and `self.sets` keeps each alive for the plan's length.
        let key = (
            Arc::as_ptr(peers) as usize,
            names.iter().map(|(n, p)| ((*n).clone(), *p)).collect::<Vec<_>>(),
        );
        if let Some(found) = self.named.get(&key) {
            return found.clone();
        }
        let mut by_number: BTreeMap<PortRange, Vec<AddressRange>> = BTreeMap::new();
        for (name, protocol) in names {
            for candidate in &index.pods {
                for number in resolve_name(candidate.pod, name, *protocol) {
                    let hosts = candidate
                        .pod
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
        let found: Vec<(PortRange, Arc<Addresses>)> = by_number
            .into_iter()
            .map(|(range, hosts)| (range, self.share(Addresses::Ranges(normalize(hosts)))))
            .collect();
        self.named.insert(key, found.clone());
        found
    }

    fn share(&mut self, addresses: Addresses) -> Arc<Addresses> {
        if let Some((existing, ())) = self.sets.get_key_value(&addresses) {
            return existing.clone();
        }
        let shared = Arc::new(addresses);
        self.sets.insert(shared.clone(), ());
        shared
    }
}

impl CompiledPolicy {
    fn new(policy: &NetworkPolicyInfo, peers: &PeerIndex, shared: &mut SharedSets) -> CompiledPolicy {
        let mut compile = |rules: &Vec<PolicyRule>, egress: bool| {
            rules
                .iter()
                .map(|rule| CompiledRule::new(&policy.namespace, rule, peers, egress, shared))
                .collect()
        };
        CompiledPolicy {
            ingress: policy.ingress.as_ref().map(|r| compile(r, false)),
            egress: policy.egress.as_ref().map(|r| compile(r, true)),
        }
    }
}

impl CompiledRule {
    fn new(
        namespace: &str,
        rule: &PolicyRule,
        index: &PeerIndex,
        egress: bool,
        shared: &mut SharedSets,
    ) -> CompiledRule {
        let peers = if rule.peers.is_empty() {
            Addresses::Any
        } else {
            let mut ranges = Vec::new();
            for peer in &rule.peers {
                match peer {
                    PolicyPeer::Block { cidr, except } => ranges.extend(block_ranges(*cidr, except)),
                    PolicyPeer::Pods { .. } => {
                        for pod in index.selected(namespace, peer) {
                            ranges.extend(pod.ips.iter().map(|ip| AddressRange {
                                first: *ip,
                                last: *ip,
                            }));
                        }
                    }
                }
            }
            Addresses::Ranges(normalize(ranges))
        };
        let peers = shared.share(peers);
        let mut named_destinations = Vec::new();
        if egress {
            let mut names: Vec<(&Arc<str>, Protocol)> = rule
                .ports
                .iter()
                .filter_map(|p| match &p.port {
                    Some(PortSpec::Name(name)) => Some((name, p.protocol)),
                    _ => None,
                })
                .collect();
            names.sort();
            names.dedup();
            if !names.is_empty() {
                named_destinations = shared.named_destinations(&peers, &names, index);
            }
        }
        CompiledRule {
            peers,
            ports: rule.ports.clone(),
            named_destinations,
        }
    }

    /// Numeric ports as ranges; named ones resolved on `destination` when given.
    fn port_ranges(&self, destination: Option<&PodInfo>) -> Ports {
        if self.ports.is_empty() {
            return Ports::Any;
        }
        let mut ranges = Vec::new();
        for port in &self.ports {
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

    fn ingress_allow(&self, policy: &str, rule: usize, pod: &PodInfo) -> Allow {
        Allow {
            policy: policy.to_string(),
            rule,
            clauses: vec![Clause {
                peers: self.peers.clone(),
                ports: self.port_ranges(Some(pod)),
            }],
        }
    }

    fn egress_allow(&self, policy: &str, rule: usize) -> Allow {
        let mut clauses = vec![Clause {
            peers: self.peers.clone(),
            ports: self.port_ranges(None),
        }];
        clauses.extend(self.named_destinations.iter().map(|(range, hosts)| Clause {
            peers: hosts.clone(),
            ports: Ports::Ranges(vec![*range]),
        }));
        // A rule of only named ports has nothing numeric: drop the clause that matches nothing.
        clauses.retain(|c| c.ports != Ports::Ranges(Vec::new()));
        Allow {
            policy: policy.to_string(),
            rule,
            clauses,
        }
    }
}

/// The numbers `pod` gives the container port `name` on `protocol`.
fn resolve_name<'p>(pod: &'p PodInfo, name: &'p str, protocol: Protocol) -> impl Iterator<Item = u16> + 'p {
    pod.ports
        .iter()
        .filter(move |p| p.name.as_deref() == Some(name) && p.protocol == Some(protocol))
        .filter_map(|p| u16::try_from(p.port).ok())
}

/// An address as a number in one space: IPv4 below IPv6, so ranges of both families sort
/// and compare without mixing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Number(u8, u128);

impl Number {
    fn of(ip: IpAddr) -> Number {
        match ip {
            IpAddr::V4(v4) => Number(4, u32::from(v4).into()),
            IpAddr::V6(v6) => Number(6, u128::from(v6)),
        }
    }

    fn ip(self) -> IpAddr {
        match self.0 {
            4 => IpAddr::V4(Ipv4Addr::from(self.1 as u32)),
            _ => IpAddr::V6(Ipv6Addr::from(self.1)),
        }
    }
}

fn network_bounds(network: IpNetwork) -> (Number, Number) {
    (
        Number::of(network.network()),
        Number::of(network.broadcast_or_last()),
    )
}

trait LastAddress {
    fn broadcast_or_last(&self) -> IpAddr;
}

impl LastAddress for IpNetwork {
    fn broadcast_or_last(&self) -> IpAddr {
        match self {
            IpNetwork::V4(n) => IpAddr::V4(n.broadcast()),
            IpNetwork::V6(n) => {
                let host_bits = 128 - u32::from(n.prefix());
                let mask = if host_bits == 128 {
                    u128::MAX
                } else {
                    (1u128 << host_bits) - 1
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | mask))
            }
        }
    }
}

/// `cidr` without its `except`s, as ranges.
fn block_ranges(cidr: IpNetwork, except: &[IpNetwork]) -> Vec<AddressRange> {
    let mut ranges = vec![network_bounds(cidr)];
    for hole in except {
        let (lo, hi) = network_bounds(*hole);
        ranges = ranges
            .into_iter()
            .flat_map(|(first, last)| {
                let mut kept = Vec::new();
                if hi < first || last < lo {
                    kept.push((first, last));
                } else {
                    if first < lo {
                        kept.push((first, Number(lo.0, lo.1 - 1)));
                    }
                    if hi < last {
                        kept.push((Number(hi.0, hi.1 + 1), last));
                    }
                }
                kept
            })
            .collect();
    }
    ranges
        .into_iter()
        .map(|(first, last)| AddressRange {
            first: first.ip(),
            last: last.ip(),
        })
        .collect()
}

/// Sorts and merges overlapping or adjacent ranges: an nftables interval set refuses
/// overlaps, and a shorter list is a shorter set.
fn normalize(ranges: Vec<AddressRange>) -> Vec<AddressRange> {
    let mut numbers: Vec<(Number, Number)> = ranges
        .into_iter()
        .map(|r| (Number::of(r.first), Number::of(r.last)))
        .collect();
    numbers.sort();
    let mut merged: Vec<(Number, Number)> = Vec::with_capacity(numbers.len());
    for (first, last) in numbers {
        match merged.last_mut() {
            Some((_, end)) if end.0 == first.0 && end.1.checked_add(1).is_none_or(|next| next >= first.1) => {
                *end = (*end).max(last);
            }
            _ => merged.push((first, last)),
        }
    }
    merged
        .into_iter()
        .map(|(first, last)| AddressRange {
            first: first.ip(),
            last: last.ip(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: &str, last: &str) -> AddressRange {
        AddressRange {
            first: first.parse().unwrap(),
            last: last.parse().unwrap(),
        }
    }

    #[test]
    fn blocks_cut_out_their_excepts() {
        let ranges = block_ranges(
            "10.0.0.0/24".parse().unwrap(),
            &["10.0.0.16/28".parse().unwrap(), "10.0.0.255/32".parse().unwrap()],
        );
        assert_eq!(
            ranges,
            [range("10.0.0.0", "10.0.0.15"), range("10.0.0.32", "10.0.0.254")]
        );
        let v6 = block_ranges("fd00::/120".parse().unwrap(), &["fd00::/121".parse().unwrap()]);
        assert_eq!(v6, [range("fd00::80", "fd00::ff")]);
        let all = block_ranges("0.0.0.0/0".parse().unwrap(), &[]);
        assert_eq!(all, [range("0.0.0.0", "255.255.255.255")]);
    }

    #[test]
    fn normalize_merges_adjacent_and_keeps_families_apart() {
        let merged = normalize(vec![
            range("fd00::1", "fd00::1"),
            range("10.0.0.2", "10.0.0.2"),
            range("10.0.0.1", "10.0.0.1"),
            range("10.0.0.5", "10.0.0.9"),
            range("10.0.0.6", "10.0.0.7"),
            range("255.255.255.255", "255.255.255.255"),
            range("::", "::"),
        ]);
        assert_eq!(
            merged,
            [
                range("10.0.0.1", "10.0.0.2"),
                range("10.0.0.5", "10.0.0.9"),
                range("255.255.255.255", "255.255.255.255"),
                range("::", "::"),
                range("fd00::1", "fd00::1"),
            ]
        );
    }
}
