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
//! Peer address sets are computed once per distinct list of peers and shared ([`Arc`])
//! by every Pod the policy selects, and equal sets of different rules are one set: 1,000
//! Pods under one policy cost one set, not 1,000, and 1,000 policies allowing "every
//! Pod's `http`" hold that list once (a back end can then program one kernel set for all
//! of them).
//!
//! The plan is kept up to date by [`PolicyPlanner`] (`planner.rs`): it remembers which
//! Pods each peer list holds, and redoes, after a change, only the peer sets and the
//! Pods that change can touch. [`plan`] and [`plan_pods`] build the same state once and
//! throw it away.
//!
//! Which Pods count as peers ([`is_peer`]): those with an address whose phase is not
//! Succeeded or Failed (a finished Pod's address may already belong to another Pod), and
//! not on the host's network.
//!
//! Pods with `hostNetwork: true`: upstream leaves NetworkPolicy for them
//! implementation-defined (the API docs say so: such Pods share the node's address, and
//! most plugins cannot tell their traffic from the node's). Ferry does this: such a Pod
//! is never enforced (it has no entry in the [`PolicyTable`]: everything it sends and
//! receives passes as the node's own traffic does), and it is never a selector peer (a
//! podSelector or namespaceSelector that matches its labels does not allow the node's
//! address). Its address still counts for an `ipBlock` that holds it, like any address.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use super::Protocol;
use crate::store::objects::{PodInfo, PodPhase};
use crate::store::Store;

mod planner;
mod ranges;

use planner::Compiled;
pub use planner::PolicyPlanner;
use ranges::Number;

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
    /// What the peers are (which selectors and blocks), as a name that stays while Pods
    /// join and leave them: a back end keeps one set per name and changes its elements.
    #[serde(skip)]
    pub peer_set: PeerSetId,
    #[serde(serialize_with = "shared")]
    pub peers: Arc<Addresses>,
    pub ports: Ports,
}

/// The identity of a list of peers: 16 hex digits of a hash of its definition (the
/// normalised peers of a rule and, where they select Pods of it, the policy's namespace;
/// for a named-port destination also the names and the number). Equal in every process
/// that reads the same policies, so a restarted daemon finds its sets by name. Two
/// clauses with one id have equal addresses in a table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerSetId(pub Arc<str>);

impl PeerSetId {
    /// The id of whatever `definition` writes (its `Debug` text).
    pub(crate) fn of(definition: &dyn std::fmt::Debug) -> PeerSetId {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(format!("{definition:?}").as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        PeerSetId(Arc::from(hex))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PeerSetId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
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
    /// A clause whose peers are named by their content: for a plan made by hand (tests),
    /// where no policy defines them.
    pub fn by_content(peers: Arc<Addresses>, ports: Ports) -> Clause {
        Clause {
            peer_set: PeerSetId::of(&peers),
            peers,
            ports,
        }
    }

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
    plan_pods(store, |pod| on_node(pod, node_name))
}

/// Plans the Pods `wanted` picks among those with an address (`trace` plans both ends of
/// a connection, whatever their node).
pub fn plan_pods(store: &Store, wanted: impl Fn(&PodInfo) -> bool) -> PolicyTable {
    Compiled::build(store, &wanted).1
}

fn on_node(pod: &PodInfo, node_name: &str) -> bool {
    pod.node_name.as_deref() == Some(node_name)
}

impl Isolation {
    fn empty() -> Isolation {
        Isolation {
            policies: Vec::new(),
            allows: Vec::new(),
        }
    }
}

/// Whether a Pod's address may stand for it: it has one, has not finished, and is not on
/// the host's network (that address is the node's; see the module docs).
pub fn is_peer(pod: &PodInfo) -> bool {
    !pod.ips.is_empty() && !pod.host_network && !matches!(pod.phase, PodPhase::Succeeded | PodPhase::Failed)
}

/// The numbers `pod` gives the container port `name` on `protocol`.
fn resolve_name<'p>(pod: &'p PodInfo, name: &'p str, protocol: Protocol) -> impl Iterator<Item = u16> + 'p {
    pod.ports
        .iter()
        .filter(move |p| p.name.as_deref() == Some(name) && p.protocol == Some(protocol))
        .filter_map(|p| u16::try_from(p.port).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Event, Kind, Object};
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use serde_json::json;

    fn pod(name: &str, app: &str, ip: &str, host_network: bool) -> Object {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"namespace": "x", "name": name, "labels": {"app": app}},
            "spec": {"nodeName": "node-a", "hostNetwork": host_network, "containers": []},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]}
        }))
        .unwrap();
        pod.into()
    }

    #[test]
    fn host_network_pods_are_neither_enforced_nor_selector_peers() {
        let policy: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"namespace": "x", "name": "p"},
            "spec": {"podSelector": {}, "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "agent"}}}]},
                {"from": [{"ipBlock": {"cidr": "192.168.0.10/32"}}]}]}
        }))
        .unwrap();
        let mut store = Store::new();
        store.apply(Event::Snapshot {
            kinds: Kind::ALL.to_vec(),
            objects: vec![
                // The node's address: a host-network agent, and a Pod with its own.
                pod("agent", "agent", "192.168.0.10", true),
                pod("agent-in-pod-net", "agent", "10.244.0.9", false),
                pod("web", "web", "10.244.0.5", false),
                policy.into(),
            ],
        });
        let table = plan(&store, "node-a");
        assert!(!table.pods.contains_key("x/agent"), "never enforced: {table:?}");
        let ingress = table.pods["x/web"].ingress.as_ref().unwrap();
        let node: IpAddr = "192.168.0.10".parse().unwrap();
        let pod_net: IpAddr = "10.244.0.9".parse().unwrap();
        assert!(
            !ingress.allows[0].clauses[0].peers.contains(node),
            "not a selector peer"
        );
        assert!(ingress.allows[0].clauses[0].peers.contains(pod_net));
        assert!(
            ingress.allows[1].clauses[0].peers.contains(node),
            "ipBlock still holds it"
        );
    }
}
