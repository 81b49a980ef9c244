//! The oracle: an independent evaluator of `networking.k8s.io/v1` NetworkPolicy.
//!
//! It answers one question — is this connection allowed? — for a cluster of namespaces
//! and pods and a set of policies written as JSON, exactly as a user writes them. It
//! shares no code with the proxy's policy plan on purpose: when the two disagree, one of
//! them misreads the API, and the end-to-end test says which pair of pods shows it.
//! It is written to be obviously right, not fast: every decision walks every policy.
//!
//! The rules it follows, in the API reference's terms (our phrasing):
//!
//! 1. A policy applies to the pods of its own namespace that its `spec.podSelector`
//!    selects; an empty selector selects every pod of that namespace.
//! 2. A pod is isolated for ingress when at least one policy that applies to it has
//!    `Ingress` among its policy types, and likewise for egress. A pod no policy isolates
//!    in a direction accepts everything in that direction.
//! 3. `policyTypes`, when missing (or empty), is worked out from the policy: every policy
//!    affects ingress, and a policy affects egress too when it has at least one egress
//!    rule. When given, it is taken as written — so a policy naming `Ingress` and no
//!    ingress rules denies all ingress to the pods it selects.
//! 4. For an isolated pod, a connection in that direction is allowed when at least one
//!    rule of at least one policy that applies to it (with that type) allows it: rules
//!    add up (OR); no policy can take away what another allows.
//! 5. A rule allows a connection when the connection matches one of its ports AND its
//!    other end matches one of its peers. An empty or missing `ports` list matches every
//!    port; an empty or missing `from`/`to` list matches every peer.
//! 6. A peer with only `podSelector` means the selected pods of the policy's namespace;
//!    with only `namespaceSelector`, every pod of the selected namespaces; with both,
//!    the selected pods of the selected namespaces. An empty selector selects all.
//!    Namespaces carry `kubernetes.io/metadata.name: <name>`, set by the API server.
//! 7. An `ipBlock` peer matches an address inside `cidr` and outside every `except`
//!    range. Upstream's e2e suite expects it to match the addresses of pods as well as
//!    addresses outside the cluster, so it is checked against whatever address the other
//!    end of the connection has in the connection's family.
//! 8. A port entry matches the connection's protocol (`TCP` when not given) and, when
//!    `port` is given, its destination port: a number matches that port, or the range
//!    `port..=endPort` when `endPort` is set; a name is looked up among the container
//!    ports of the destination pod (per pod: the same name may be a different number on
//!    another pod) with the same protocol. A named port never matches a destination that
//!    is not a pod.
//! 9. A connection between two pods is allowed only when the source's egress allows it
//!    AND the destination's ingress allows it. A source or destination that is not a pod
//!    (an address outside the cluster) has no policy of its own.
//! 10. Not modelled: the API also lets a pod's own node reach it whatever the policies
//!     (kubelet's probes). The oracle has no node endpoint; a test that probes from the
//!     node must not ask it.
//!
//! Policies that the API server would refuse are refused here too, with the JSON path
//! of the mistake, so a typo in a test case cannot silently mean "allow everything".

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::Value;

/// Label key the API server puts on every namespace, with the namespace's name as value.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The spelling of the Kubernetes API (`TCP`, `UDP`, `SCTP`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    pub fn parse(text: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.as_str() == text)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The IP family of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

impl Namespace {
    /// A namespace as the API server stores it: `labels` plus the name label.
    pub fn new(name: &str, labels: Labels) -> Namespace {
        let mut labels = labels;
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
        Namespace {
            name: name.to_string(),
            labels,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// One address per family at most, as a dual-stack Pod has.
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ContainerPort>,
}

impl Pod {
    pub fn ip(&self, family: Family) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| Family::of(*ip) == family)
    }

    /// `namespace/name`, as upstream's truth tables label pods.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
}

/// One end of a connection: a pod of the cluster, or an address outside it.
#[derive(Clone, Copy, Debug)]
pub enum Endpoint<'a> {
    Pod(&'a Pod),
    Ip(IpAddr),
}

impl Endpoint<'_> {
    fn address(&self, family: Family) -> Option<IpAddr> {
        match self {
            Endpoint::Pod(pod) => pod.ip(family),
            Endpoint::Ip(ip) if Family::of(*ip) == family => Some(*ip),
            Endpoint::Ip(_) => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    pub from: Endpoint<'a>,
    pub to: Endpoint<'a>,
    pub family: Family,
    /// Destination port, after any Service translation: policy sees the Pod's port.
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

impl Cluster {
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.name == name)
    }

    /// Rule 9: the source's egress AND the destination's ingress.
    pub fn allows(&self, policies: &[NetworkPolicy], connection: &Connection) -> bool {
        let egress_allowed = match connection.from {
            Endpoint::Pod(source) => self.direction_allows(policies, source, Direction::Egress, connection),
            Endpoint::Ip(_) => true,
        };
        let ingress_allowed = match connection.to {
            Endpoint::Pod(destination) => {
                self.direction_allows(policies, destination, Direction::Ingress, connection)
            }
            Endpoint::Ip(_) => true,
        };
        egress_allowed && ingress_allowed
    }

    /// Rules 1, 2 and 4 for one pod and one direction.
    fn direction_allows(
        &self,
        policies: &[NetworkPolicy],
        pod: &Pod,
        direction: Direction,
        connection: &Connection,
    ) -> bool {
        let isolating: Vec<&NetworkPolicy> = policies
            .iter()
            .filter(|policy| policy.namespace == pod.namespace)
            .filter(|policy| policy.pod_selector.matches(&pod.labels))
            .filter(|policy| match direction {
                Direction::Ingress => policy.affects_ingress,
                Direction::Egress => policy.affects_egress,
            })
            .collect();
        if isolating.is_empty() {
            return true;
        }
        isolating.iter().any(|policy| {
            let rules = match direction {
                Direction::Ingress => &policy.ingress,
                Direction::Egress => &policy.egress,
            };
            rules
                .iter()
                .any(|rule| self.rule_allows(policy, rule, direction, connection))
        })
    }

    /// Rule 5: one port AND one peer.
    fn rule_allows(
        &self,
        policy: &NetworkPolicy,
        rule: &Rule,
        direction: Direction,
        connection: &Connection,
    ) -> bool {
        let other_end = match direction {
            Direction::Ingress => connection.from,
            Direction::Egress => connection.to,
        };
        let port_matches = rule.ports.is_empty()
            || rule
                .ports
                .iter()
                .any(|port| port.matches(connection.to, connection.port, connection.protocol));
        let peer_matches = rule.peers.is_empty()
            || rule
                .peers
                .iter()
                .any(|peer| self.peer_matches(policy, peer, other_end, connection.family));
        port_matches && peer_matches
    }

    /// Rules 6 and 7.
    fn peer_matches(&self, policy: &NetworkPolicy, peer: &Peer, other_end: Endpoint, family: Family) -> bool {
        match peer {
            Peer::IpBlock { cidr, except } => match other_end.address(family) {
                Some(address) => {
                    cidr.contains(address) && !except.iter().any(|range| range.contains(address))
                }
                None => false,
            },
            Peer::Pods {
                namespaces,
                pods: pod_selector,
            } => {
                let Endpoint::Pod(pod) = other_end else {
                    return false;
                };
                let namespace_selected = match namespaces {
                    None => pod.namespace == policy.namespace,
                    Some(selector) => match self.namespace(&pod.namespace) {
                        Some(namespace) => selector.matches(&namespace.labels),
                        // A pod whose namespace is unknown carries no namespace labels.
                        None => selector.matches(&Labels::new()),
                    },
                };
                let pod_selected = match pod_selector {
                    None => true,
                    Some(selector) => selector.matches(&pod.labels),
                };
                namespace_selected && pod_selected
            }
        }
    }
}

/// A parsed, validated NetworkPolicy: only what decides traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    pub affects_ingress: bool,
    pub affects_egress: bool,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

/// An ingress or egress rule. Empty `peers` or `ports` match everything (rule 5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PortMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// `namespaces: None` means the policy's own namespace.
    Pods {
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
    IpBlock {
        cidr: IpNetwork,
        except: Vec<IpNetwork>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMatch {
    pub protocol: Protocol,
    pub port: Option<PortRef>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    Number { first: u16, last: u16 },
    Name(String),
}

impl PortMatch {
    /// Rule 8.
    fn matches(&self, destination: Endpoint, port: u16, protocol: Protocol) -> bool {
        if self.protocol != protocol {
            return false;
        }
        match &self.port {
            None => true,
            Some(PortRef::Number { first, last }) => (*first..=*last).contains(&port),
            Some(PortRef::Name(name)) => match destination {
                Endpoint::Pod(pod) => pod.ports.iter().any(|container_port| {
                    container_port.name.as_deref() == Some(name.as_str())
                        && container_port.protocol == protocol
                        && container_port.port == port
                }),
                Endpoint::Ip(_) => false,
            },
        }
    }
}

/// A label selector: every `matchLabels` pair AND every expression must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: Labels,
    pub expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// The key is present with one of the values.
    In(String, Vec<String>),
    /// The key is absent, or present with none of the values.
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        let pairs_hold = self
            .match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value));
        let expressions_hold = self.expressions.iter().all(|requirement| match requirement {
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => !labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
        });
        pairs_hold && expressions_hold
    }
}

/// A NetworkPolicy the API server would refuse, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// `namespace/name` when the metadata could be read.
    pub policy: String,
    /// JSON path of the mistake, e.g. `spec.ingress[0].ports[1].endPort`.
    pub path: String,
    pub problem: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NetworkPolicy {}: {}: {}",
            self.policy, self.path, self.problem
        )
    }
}

impl std::error::Error for PolicyError {}

impl NetworkPolicy {
    /// Reads a `networking.k8s.io/v1` NetworkPolicy object, as JSON.
    pub fn from_json(object: &Value) -> Result<NetworkPolicy, PolicyError> {
        let name_of = |object: &Value| {
            let metadata = &object["metadata"];
            format!(
                "{}/{}",
                metadata["namespace"].as_str().unwrap_or("?"),
                metadata["name"].as_str().unwrap_or("?")
            )
        };
        let raw: json::Policy = serde_path_to_error::deserialize(object).map_err(|e| PolicyError {
            policy: name_of(object),
            path: e.path().to_string(),
            problem: format!(
                "{}; write it as the networking.k8s.io/v1 API spells it",
                e.inner()
            ),
        })?;
        let policy = format!("{}/{}", raw.metadata.namespace, raw.metadata.name);
        let error = |path: String, problem: String| PolicyError {
            policy: policy.clone(),
            path,
            problem,
        };
        if let Some(api_version) = &raw.api_version {
            if api_version != "networking.k8s.io/v1" {
                return Err(error(
                    "apiVersion".into(),
                    format!("{api_version:?} is not networking.k8s.io/v1"),
                ));
            }
        }
        if let Some(kind) = &raw.kind {
            if kind != "NetworkPolicy" {
                return Err(error("kind".into(), format!("{kind:?} is not NetworkPolicy")));
            }
        }
        let spec = raw.spec;
        let pod_selector = selector(&spec.pod_selector, "spec.podSelector").map_err(|(p, m)| error(p, m))?;
        let ingress = spec
            .ingress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| rule(&r.from, &r.ports, &format!("spec.ingress[{i}]"), "from"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|(p, m)| error(p, m))?;
        let egress = spec
            .egress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| rule(&r.to, &r.ports, &format!("spec.egress[{i}]"), "to"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|(p, m)| error(p, m))?;
        // Rule 3.
        let (affects_ingress, affects_egress) = match spec.policy_types.as_deref() {
            None | Some([]) => (true, !egress.is_empty()),
            Some(types) => {
                let mut ingress_type = false;
                let mut egress_type = false;
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => ingress_type = true,
                        "Egress" => egress_type = true,
                        other => {
                            return Err(error(
                                format!("spec.policyTypes[{i}]"),
                                format!("{other:?} is neither \"Ingress\" nor \"Egress\""),
                            ))
                        }
                    }
                }
                (ingress_type, egress_type)
            }
        };
        Ok(NetworkPolicy {
            namespace: raw.metadata.namespace,
            name: raw.metadata.name,
            pod_selector,
            affects_ingress,
            affects_egress,
            ingress,
            egress,
        })
    }
}

type Invalid = (String, String);

fn rule(
    peers: &Option<Vec<json::Peer>>,
    ports: &Option<Vec<json::Port>>,
    path: &str,
    peers_field: &str,
) -> Result<Rule, Invalid> {
    let peers = peers
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| peer(p, &format!("{path}.{peers_field}[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = ports
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| port(p, &format!("{path}.ports[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Rule { peers, ports })
}

fn peer(raw: &json::Peer, path: &str) -> Result<Peer, Invalid> {
    match (&raw.ip_block, &raw.namespace_selector, &raw.pod_selector) {
        (None, None, None) => Err((
            path.to_string(),
            "a peer needs podSelector, namespaceSelector or ipBlock".into(),
        )),
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err((
            path.to_string(),
            "ipBlock cannot be combined with podSelector or namespaceSelector; make them two peers".into(),
        )),
        (Some(block), None, None) => {
            let cidr = network(&block.cidr, &format!("{path}.ipBlock.cidr"))?;
            let mut except = Vec::new();
            for (i, text) in block.except.iter().flatten().enumerate() {
                let at = format!("{path}.ipBlock.except[{i}]");
                let range = network(text, &at)?;
                let inside = Family::of(range.ip()) == Family::of(cidr.ip())
                    && range.prefix() > cidr.prefix()
                    && cidr.contains(range.network());
                if !inside {
                    return Err((at, format!("{text} is not strictly inside the cidr {cidr}")));
                }
                except.push(range);
            }
            Ok(Peer::IpBlock { cidr, except })
        }
        (None, namespaces, pods) => Ok(Peer::Pods {
            namespaces: namespaces
                .as_ref()
                .map(|s| selector(s, &format!("{path}.namespaceSelector")))
                .transpose()?,
            pods: pods
                .as_ref()
                .map(|s| selector(s, &format!("{path}.podSelector")))
                .transpose()?,
        }),
    }
}

fn network(text: &str, path: &str) -> Result<IpNetwork, Invalid> {
    if !text.contains('/') {
        return Err((
            path.to_string(),
            format!("{text:?} has no prefix length; write a CIDR such as 10.0.0.0/24"),
        ));
    }
    text.parse::<IpNetwork>()
        .map_err(|e| (path.to_string(), format!("{text:?} is not a CIDR: {e}")))
}

fn port(raw: &json::Port, path: &str) -> Result<PortMatch, Invalid> {
    let protocol = match &raw.protocol {
        None => Protocol::Tcp,
        Some(text) => Protocol::parse(text).ok_or_else(|| {
            (
                format!("{path}.protocol"),
                format!("{text:?} is not TCP, UDP or SCTP"),
            )
        })?,
    };
    let port = match (&raw.port, raw.end_port) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err((
                format!("{path}.endPort"),
                "endPort needs a numeric port to start the range".into(),
            ))
        }
        (Some(json::PortValue::Name(name)), Some(_)) => {
            return Err((
                format!("{path}.endPort"),
                format!("endPort cannot follow the named port {name:?}; use a number"),
            ))
        }
        (Some(json::PortValue::Name(name)), None) => {
            if !is_port_name(name) {
                return Err((
                    format!("{path}.port"),
                    format!(
                        "{name:?} is not a port name (1-15 of a-z, 0-9 and '-', with a letter, \
                         no '-' at either end or twice in a row); write a number as a number"
                    ),
                ));
            }
            Some(PortRef::Name(name.clone()))
        }
        (Some(json::PortValue::Number(number)), end_port) => {
            if *number == 0 {
                return Err((format!("{path}.port"), "port 0 is not a port".into()));
            }
            let last = end_port.unwrap_or(*number);
            if last < *number {
                return Err((
                    format!("{path}.endPort"),
                    format!("endPort {last} is below port {number}"),
                ));
            }
            Some(PortRef::Number { first: *number, last })
        }
    };
    Ok(PortMatch { protocol, port })
}

/// The API's rule for container port names (an IANA service name).
fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

fn selector(raw: &json::Selector, path: &str) -> Result<Selector, Invalid> {
    let mut expressions = Vec::new();
    for (i, expression) in raw.match_expressions.iter().flatten().enumerate() {
        let at = format!("{path}.matchExpressions[{i}]");
        let values = expression.values.clone().unwrap_or_default();
        let key = expression.key.clone();
        let requirement = match expression.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err((at, format!("{} needs at least one value", expression.operator)))
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err((at, format!("{} takes no values", expression.operator)))
            }
            "In" => Requirement::In(key, values),
            "NotIn" => Requirement::NotIn(key, values),
            "Exists" => Requirement::Exists(key),
            "DoesNotExist" => Requirement::DoesNotExist(key),
            other => {
                return Err((
                    format!("{at}.operator"),
                    format!("{other:?} is not In, NotIn, Exists or DoesNotExist"),
                ))
            }
        };
        expressions.push(requirement);
    }
    Ok(Selector {
        match_labels: raw.match_labels.clone().unwrap_or_default(),
        expressions,
    })
}

/// The JSON shapes of the API object, field for field. Unknown fields under `spec` are
/// refused: the API server would refuse them too, and a typo must not widen a policy.
mod json {
    use super::Labels;
    use serde::Deserialize;

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Policy {
        pub api_version: Option<String>,
        pub kind: Option<String>,
        pub metadata: Metadata,
        pub spec: Spec,
    }

    #[derive(Deserialize)]
    pub struct Metadata {
        pub name: String,
        pub namespace: String,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct Spec {
        pub pod_selector: Selector,
        pub policy_types: Option<Vec<String>>,
        pub ingress: Option<Vec<IngressRule>>,
        pub egress: Option<Vec<EgressRule>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct IngressRule {
        pub from: Option<Vec<Peer>>,
        pub ports: Option<Vec<Port>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct EgressRule {
        pub to: Option<Vec<Peer>>,
        pub ports: Option<Vec<Port>>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct Peer {
        pub pod_selector: Option<Selector>,
        pub namespace_selector: Option<Selector>,
        pub ip_block: Option<IpBlock>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct IpBlock {
        pub cidr: String,
        pub except: Option<Vec<String>>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct Port {
        pub protocol: Option<String>,
        pub port: Option<PortValue>,
        pub end_port: Option<u16>,
    }

    /// `port` is an int-or-string in the API.
    #[derive(Deserialize)]
    #[serde(untagged)]
    pub enum PortValue {
        Number(u16),
        Name(String),
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct Selector {
        pub match_labels: Option<Labels>,
        pub match_expressions: Option<Vec<Expression>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Expression {
        pub key: String,
        pub operator: String,
        pub values: Option<Vec<String>>,
    }
}
