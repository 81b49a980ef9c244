//! The store's copy of a `networking.k8s.io/v1` NetworkPolicy: validated once, as it
//! arrives, into the few shapes the policy plan reads.
//!
//! Validation follows what the API server refuses (a CIDR that does not parse, an
//! `except` outside its `cidr`, `endPort` below `port` or after a named port, an unknown
//! protocol or selector operator), so a manifests directory cannot hand the plan a
//! policy a real cluster would never hold. Each refusal names the field by its path in
//! the object (`spec.ingress[0].from[1].ipBlock.except[0]`) so the user knows what to
//! fix. Defaults are applied here too: a missing protocol is TCP, and `policyTypes`
//! missing means Ingress, plus Egress when the policy has egress rules.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::intern::intern;
use super::objects::Labels;
use crate::plan::Protocol;
use crate::source::{Kind, Object};

/// A NetworkPolicy, as the policy plan reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicyInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// Selects the Pods of `namespace` the policy applies to; empty selects them all.
    pub pod_selector: Selector,
    /// `Some` when the policy isolates its Pods for ingress (`policyTypes`), with the
    /// rules that allow; `Some(vec![])` denies all ingress.
    pub ingress: Option<Vec<PolicyRule>>,
    /// As `ingress`, for egress.
    pub egress: Option<Vec<PolicyRule>>,
}

/// One ingress or egress rule: a connection is allowed when it matches one of `ports`
/// AND its other end one of `peers`; an empty list matches everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    pub peers: Vec<PolicyPeer>,
    pub ports: Vec<PolicyPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PolicyPeer {
    /// Pods chosen by labels. `namespaces: None` means the policy's own namespace;
    /// `pods: None` every Pod of the chosen namespaces.
    Pods {
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
    /// Addresses inside `cidr` and outside every `except` (each strictly inside `cidr`).
    Block { cidr: IpNetwork, except: Vec<IpNetwork> },
}

impl PolicyPeer {
    /// Whether an `ipBlock` peer holds `ip`; always false for a selector peer.
    pub fn block_holds(&self, ip: IpAddr) -> bool {
        match self {
            PolicyPeer::Block { cidr, except } => cidr.contains(ip) && !except.iter().any(|e| e.contains(ip)),
            PolicyPeer::Pods { .. } => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicyPort {
    pub protocol: Protocol,
    /// `None`: every port of the protocol.
    pub port: Option<PortSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortSpec {
    /// `port`, or `port..=endPort`.
    Range { first: u16, last: u16 },
    /// A container port name, resolved on the destination Pod.
    Name(Arc<str>),
}

/// A label selector: every `matchLabels` pair and every expression must hold. The empty
/// selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    pub match_labels: Labels,
    pub expressions: Vec<Expression>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expression {
    In(Arc<str>, Vec<Arc<str>>),
    NotIn(Arc<str>, Vec<Arc<str>>),
    Exists(Arc<str>),
    DoesNotExist(Arc<str>),
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|e| match e {
                Expression::In(key, values) => {
                    labels.get(key).is_some_and(|v| values.iter().any(|x| **x == *v))
                }
                Expression::NotIn(key, values) => {
                    !labels.get(key).is_some_and(|v| values.iter().any(|x| **x == *v))
                }
                Expression::Exists(key) => labels.get(key).is_some(),
                Expression::DoesNotExist(key) => labels.get(key).is_none(),
            })
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.expressions.is_empty()
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("{}");
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for e in &self.expressions {
            parts.push(match e {
                Expression::In(k, v) => format!("{k} in ({})", v.join(",")),
                Expression::NotIn(k, v) => format!("{k} notin ({})", v.join(",")),
                Expression::Exists(k) => k.to_string(),
                Expression::DoesNotExist(k) => format!("!{k}"),
            });
        }
        f.write_str(&parts.join(","))
    }
}

/// A NetworkPolicy the API server would refuse: which one, which field, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// `namespace/name`.
    pub policy: String,
    /// The field's path in the object, e.g. `spec.ingress[0].ports[1].endPort`.
    pub field: String,
    pub problem: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NetworkPolicy {}: {}: {}",
            self.policy, self.field, self.problem
        )
    }
}

impl std::error::Error for PolicyError {}

/// An ingress or egress rule as the API has it: its peers (`from` or `to`) and ports.
type RawRule<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

/// (field, problem) until the policy's name is attached.
type Invalid = (String, String);

impl TryFrom<NetworkPolicy> for NetworkPolicyInfo {
    type Error = PolicyError;

    fn try_from(policy: NetworkPolicy) -> Result<NetworkPolicyInfo, PolicyError> {
        let meta = &policy.metadata;
        let namespace = intern(
            meta.namespace
                .as_deref()
                .filter(|n| !n.is_empty())
                .unwrap_or("default"),
        );
        let name: Arc<str> = Arc::from(meta.name.as_deref().unwrap_or_default());
        let spec = policy.spec.unwrap_or_default();
        let error = |(field, problem): Invalid| PolicyError {
            policy: format!("{namespace}/{name}"),
            field,
            problem,
        };
        let pod_selector = match &spec.pod_selector {
            Some(s) => selector(s, "spec.podSelector").map_err(error)?,
            None => Selector::default(),
        };
        let rules = |rules: Vec<RawRule>, path: &str, peers_field: &str| {
            rules
                .into_iter()
                .enumerate()
                .map(|(i, (peers, ports))| rule(peers, ports, &format!("{path}[{i}]"), peers_field))
                .collect::<Result<Vec<_>, _>>()
        };
        let ingress = rules(
            spec.ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
            "spec.ingress",
            "from",
        )
        .map_err(error)?;
        let egress = rules(
            spec.egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
            "spec.egress",
            "to",
        )
        .map_err(error)?;
        let (affects_ingress, affects_egress) = match spec.policy_types.as_deref() {
            None | Some([]) => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
            Some(types) => {
                let mut both = (false, false);
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => both.0 = true,
                        "Egress" => both.1 = true,
                        other => {
                            return Err(error((
                                format!("spec.policyTypes[{i}]"),
                                format!("{other:?} is not a policy type: write Ingress or Egress"),
                            )))
                        }
                    }
                }
                both
            }
        };
        Ok(NetworkPolicyInfo {
            namespace: namespace.clone(),
            name: name.clone(),
            pod_selector,
            ingress: affects_ingress.then_some(ingress),
            egress: affects_egress.then_some(egress),
        })
    }
}

impl NetworkPolicyInfo {
    /// A policy that selects every Pod of `meta`'s namespace and allows nothing either
    /// way: what stands in for a policy that cannot be read.
    pub fn deny_namespace(meta: &ObjectMeta) -> NetworkPolicyInfo {
        NetworkPolicyInfo {
            namespace: intern(
                meta.namespace
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .unwrap_or("default"),
            ),
            name: Arc::from(meta.name.as_deref().unwrap_or_default()),
            pod_selector: Selector::default(),
            ingress: Some(Vec::new()),
            egress: Some(Vec::new()),
        }
    }
}

/// A NetworkPolicy from a manifest, decoded and validated: `Err` carries the message
/// the manifests source reports with the file's path.
pub fn decode_manifest(value: serde_json::Value) -> Result<Object, (Kind, String)> {
    let policy: NetworkPolicy =
        serde_json::from_value(value).map_err(|e| (Kind::NetworkPolicy, e.to_string()))?;
    let info = NetworkPolicyInfo::try_from(policy).map_err(|e| (Kind::NetworkPolicy, e.to_string()))?;
    Ok(Object::NetworkPolicy(Arc::new(info)))
}

fn rule(
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
    path: &str,
    peers_field: &str,
) -> Result<PolicyRule, Invalid> {
    Ok(PolicyRule {
        peers: peers
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| peer(p, &format!("{path}.{peers_field}[{i}]")))
            .collect::<Result<_, _>>()?,
        ports: ports
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| port(p, &format!("{path}.ports[{i}]")))
            .collect::<Result<_, _>>()?,
    })
}

fn peer(peer: &NetworkPolicyPeer, path: &str) -> Result<PolicyPeer, Invalid> {
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            return Err((
                path.to_string(),
                "ipBlock cannot share a peer with podSelector or namespaceSelector: write two peers".into(),
            ));
        }
        let cidr = cidr(&block.cidr, &format!("{path}.ipBlock.cidr"))?;
        let mut except = Vec::new();
        for (i, text) in block.except.iter().flatten().enumerate() {
            let field = format!("{path}.ipBlock.except[{i}]");
            let range = self::cidr(text, &field)?;
            let inside = range.is_ipv4() == cidr.is_ipv4()
                && range.prefix() > cidr.prefix()
                && cidr.contains(range.network());
            if !inside {
                return Err((field, format!("{text} must lie strictly inside the cidr {cidr}")));
            }
            except.push(range);
        }
        return Ok(PolicyPeer::Block { cidr, except });
    }
    if peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
        return Err((
            path.to_string(),
            "a peer needs podSelector, namespaceSelector or ipBlock".into(),
        ));
    }
    Ok(PolicyPeer::Pods {
        namespaces: peer
            .namespace_selector
            .as_ref()
            .map(|s| selector(s, &format!("{path}.namespaceSelector")))
            .transpose()?,
        pods: peer
            .pod_selector
            .as_ref()
            .map(|s| selector(s, &format!("{path}.podSelector")))
            .transpose()?,
    })
}

fn cidr(text: &str, field: &str) -> Result<IpNetwork, Invalid> {
    let parsed = text
        .contains('/')
        .then(|| text.parse::<IpNetwork>().ok())
        .flatten();
    parsed.ok_or_else(|| {
        (
            field.to_string(),
            format!(
                "{text:?} is not a CIDR: write an address and a prefix length, e.g. 10.0.0.0/16 or fd00::/64"
            ),
        )
    })
}

fn port(port: &NetworkPolicyPort, path: &str) -> Result<PolicyPort, Invalid> {
    let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        other => {
            return Err((
                format!("{path}.protocol"),
                format!("{other:?} is not a protocol: write TCP, UDP or SCTP"),
            ))
        }
    };
    let number = |n: i32, field: &str| {
        u16::try_from(n).ok().filter(|n| *n != 0).ok_or_else(|| {
            (
                format!("{path}.{field}"),
                format!("{n} is not a port: write 1 to 65535"),
            )
        })
    };
    let spec = match (&port.port, port.end_port) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err((
                format!("{path}.endPort"),
                "endPort needs a numeric port where the range starts".into(),
            ))
        }
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                return Err((
                    format!("{path}.endPort"),
                    format!("endPort cannot follow the named port {name:?}: give a number as port"),
                ));
            }
            if !valid_port_name(name) {
                return Err((
                    format!("{path}.port"),
                    format!("{name:?} is not a port name (up to 15 lowercase letters, digits and single inner dashes, at least one letter)"),
                ));
            }
            Some(PortSpec::Name(intern(name)))
        }
        (Some(IntOrString::Int(first)), end) => {
            let first = number(*first, "port")?;
            let last = match end {
                Some(end) => number(end, "endPort")?,
                None => first,
            };
            if last < first {
                return Err((
                    format!("{path}.endPort"),
                    format!("endPort {last} is below port {first}: the range must not be empty"),
                ));
            }
            Some(PortSpec::Range { first, last })
        }
    };
    Ok(PolicyPort { protocol, port: spec })
}

/// An IANA_SVC_NAME, as the API server checks container port names.
fn valid_port_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=15).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.iter().any(u8::is_ascii_lowercase)
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
        && !name.contains("--")
}

fn selector(selector: &LabelSelector, path: &str) -> Result<Selector, Invalid> {
    let match_labels = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut expressions = Vec::new();
    for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
        let field = format!("{path}.matchExpressions[{i}]");
        let key = intern(&e.key);
        let values: Vec<Arc<str>> = e.values.iter().flatten().map(|v| intern(v)).collect();
        let needs_values = matches!(e.operator.as_str(), "In" | "NotIn");
        if needs_values && values.is_empty() {
            return Err((
                format!("{field}.values"),
                format!("{} needs at least one value", e.operator),
            ));
        }
        if !needs_values && !values.is_empty() && matches!(e.operator.as_str(), "Exists" | "DoesNotExist") {
            return Err((
                format!("{field}.values"),
                format!("{} takes no values: remove them", e.operator),
            ));
        }
        expressions.push(match e.operator.as_str() {
            "In" => Expression::In(key, values),
            "NotIn" => Expression::NotIn(key, values),
            "Exists" => Expression::Exists(key),
            "DoesNotExist" => Expression::DoesNotExist(key),
            other => {
                return Err((
                    format!("{field}.operator"),
                    format!("{other:?} is not an operator: write In, NotIn, Exists or DoesNotExist"),
                ))
            }
        });
    }
    Ok(Selector {
        match_labels,
        expressions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(spec: serde_json::Value) -> Result<NetworkPolicyInfo, PolicyError> {
        let policy: NetworkPolicy =
            serde_json::from_value(json!({"metadata": {"namespace": "x", "name": "p"}, "spec": spec}))
                .unwrap();
        NetworkPolicyInfo::try_from(policy)
    }

    #[test]
    fn policy_types_default_from_the_rules() {
        let only_ingress = parse(json!({"podSelector": {}})).unwrap();
        assert_eq!(only_ingress.ingress, Some(vec![]));
        assert_eq!(only_ingress.egress, None);
        let both = parse(json!({"podSelector": {}, "egress": [{}]})).unwrap();
        assert!(both.ingress.is_some() && both.egress.as_ref().is_some_and(|e| e.len() == 1));
        let egress_only =
            parse(json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]})).unwrap();
        assert_eq!(egress_only.ingress, None);
        assert_eq!(egress_only.egress, Some(vec![]));
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (
                json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.300/24"}}]}]}),
                "spec.ingress[0].from[0].ipBlock.cidr",
            ),
            (
                json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.1.0.0/28"]}}]}]}),
                "spec.ingress[0].from[0].ipBlock.except[0]",
            ),
            (
                json!({"podSelector": {}, "egress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
                "spec.egress[0].ports[0].endPort",
            ),
            (
                json!({"podSelector": {}, "egress": [{}, {"ports": [{"protocol": "ICMP"}]}]}),
                "spec.egress[1].ports[0].protocol",
            ),
            (
                json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}}),
                "spec.podSelector.matchExpressions[0].operator",
            ),
        ];
        for (spec, field) in cases {
            let error = parse(spec).unwrap_err();
            assert_eq!(error.field, field, "{error}");
            assert!(error.to_string().starts_with("NetworkPolicy x/p: "), "{error}");
        }
    }

    #[test]
    fn selectors_and_blocks_match() {
        let policy = parse(json!({"podSelector": {"matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.128/25"]}}]}]}))
        .unwrap();
        let labels = |pairs: &[(&'static str, &'static str)]| pairs.iter().copied().collect::<Labels>();
        assert!(policy.pod_selector.matches(&labels(&[("app", "web")])));
        assert!(!policy
            .pod_selector
            .matches(&labels(&[("app", "web"), ("tier", "db")])));
        let block = &policy.ingress.unwrap()[0].peers[0];
        assert!(block.block_holds("10.0.0.5".parse().unwrap()));
        assert!(!block.block_holds("10.0.0.200".parse().unwrap()));
        assert!(!block.block_holds("fd00::1".parse().unwrap()));
    }

    #[test]
    fn manifests_read_policies_and_refuse_bad_ones_with_path_and_field() {
        use crate::source::manifests::parse_file;
        let good = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: allow-web\n  namespace: shop\n\
                    spec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports: [{port: http}, {port: 8000, endPort: 8080, protocol: UDP}]\n";
        let objects = parse_file("/m/policy.yaml".as_ref(), good).unwrap();
        let [Object::NetworkPolicy(policy)] = &objects[..] else {
            panic!("{objects:?}");
        };
        assert_eq!((&*policy.namespace, &*policy.name), ("shop", "allow-web"));
        let ports = &policy.ingress.as_ref().unwrap()[0].ports;
        assert_eq!(ports[0].port, Some(PortSpec::Name("http".into())));
        assert_eq!(
            ports[1],
            PolicyPort {
                protocol: Protocol::Udp,
                port: Some(PortSpec::Range {
                    first: 8000,
                    last: 8080
                })
            }
        );

        let bad = good.replace("endPort: 8080", "endPort: 80");
        let error = parse_file("/m/policy.yaml".as_ref(), &bad)
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("/m/policy.yaml"), "{error}");
        assert!(error.contains("spec.ingress[0].ports[1].endPort"), "{error}");
    }
}
