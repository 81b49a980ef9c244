//! `trace`: what the node does with the first packet of a connection, from the plans
//! alone (no kernel is asked).
//!
//! FROM is a Pod (`namespace/name`) or an address; TO is a Pod or an address with a port
//! and an optional protocol (`x/b:80/udp`, `10.96.0.10:53/udp`, `[fd00::1]:80`). When TO
//! is a Service address (a ClusterIP, an external or load-balancer IP, or a NodePort on
//! an address of the node), the Services plan gives the endpoints the packet can be sent
//! to (policy judges the packet after DNAT: on the endpoint's address and target port).
//! For each endpoint the policy plan then answers twice: may the source Pod send it
//! (egress, enforced on the source's node) and may the destination Pod take it (ingress,
//! on the destination's node); either "not isolated", or allowed by these rules, or
//! denied because these policies isolate it and none of their rules matches.

use std::fmt::{self, Write as _};
use std::net::IpAddr;

use serde::Serialize;

use crate::plan::policy::{self, Isolation, PodPolicy, PolicyTable};
use crate::plan::{services, Endpoint, Family, NodeSettings, Protocol, ServicePort};
use crate::store::objects::PodInfo;
use crate::store::Store;

/// A request `trace` cannot answer, and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceError {
    /// FROM or TO does not parse.
    Syntax { argument: String, problem: String },
    /// A Pod named that the store does not hold, or one without a usable address.
    UnknownPod { pod: String, problem: String },
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TraceError::Syntax { argument, problem } => write!(f, "{argument:?}: {problem}"),
            TraceError::UnknownPod { pod, problem } => write!(f, "Pod {pod}: {problem}"),
        }
    }
}

impl std::error::Error for TraceError {}

/// One side of the connection, as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Party {
    Pod { namespace: String, name: String },
    Address(IpAddr),
}

/// The destination as given: where, which port, which protocol (TCP when not said).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub party: Party,
    pub port: u16,
    pub protocol: Protocol,
}

/// FROM: `namespace/name` or an address.
pub fn parse_party(text: &str) -> Result<Party, TraceError> {
    let text = text.trim();
    if let Ok(ip) = text.trim_start_matches('[').trim_end_matches(']').parse() {
        return Ok(Party::Address(ip));
    }
    match text.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(Party::Pod {
                namespace: namespace.into(),
                name: name.into(),
            })
        }
        _ => Err(TraceError::Syntax {
            argument: text.into(),
            problem: "write a Pod as namespace/name or an address such as 10.244.1.7 or fd00::7".into(),
        }),
    }
}

/// TO: `PARTY:PORT[/PROTO]`, an IPv6 address in brackets (`[fd00::7]:80/udp`).
pub fn parse_target(text: &str) -> Result<Target, TraceError> {
    let bad = |problem: &str| TraceError::Syntax {
        argument: text.into(),
        problem: problem.into(),
    };
    let (rest, protocol) = match text.rsplit_once('/') {
        Some((rest, proto)) if proto.parse::<u16>().is_err() && rest.contains(':') => {
            let protocol = match proto.to_ascii_lowercase().as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "sctp" => Protocol::Sctp,
                _ => return Err(bad("the protocol after the port is tcp, udp or sctp")),
            };
            (rest, protocol)
        }
        _ => (text, Protocol::Tcp),
    };
    let (party, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| bad("give a port: namespace/name:80, 10.96.0.10:53/udp or [fd00::1]:80"))?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("the port is a number from 1 to 65535"))?;
    if party.contains(':') && !party.starts_with('[') {
        return Err(bad("write an IPv6 address in brackets: [fd00::1]:80"));
    }
    Ok(Target {
        party: parse_party(party)?,
        port,
        protocol,
    })
}

/// What `trace` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Trace {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: Protocol,
    /// `namespace/name:port-name` when TO is a Service's address and port.
    pub service: Option<String>,
    /// One per place the packet can go: the endpoints of the Service, or TO itself.
    pub paths: Vec<Path>,
}

/// The packet's fate towards one destination address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Path {
    pub source: Option<IpAddr>,
    pub destination: IpAddr,
    pub port: u16,
    /// `namespace/name` when the destination is a Pod.
    pub pod: Option<String>,
    pub egress: Judgement,
    pub ingress: Judgement,
    pub allowed: bool,
}

/// One direction's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Judgement {
    /// That end is not a Pod of the cluster: it has no policy.
    NotAPod,
    /// No policy of this direction selects the Pod.
    NotIsolated { node: Option<String> },
    /// These rules (`namespace/name ingress[i]`) allow it.
    Allowed {
        node: Option<String>,
        rules: Vec<String>,
    },
    /// These policies isolate the Pod and no rule of theirs matches.
    Denied {
        node: Option<String>,
        policies: Vec<String>,
    },
    /// The source has no address of the destination's family: nothing is sent.
    NoAddress,
}

impl Judgement {
    pub fn passes(&self) -> bool {
        matches!(
            self,
            Judgement::NotAPod | Judgement::NotIsolated { .. } | Judgement::Allowed { .. }
        )
    }
}

/// Answers for FROM and TO as the CLI gets them.
pub fn trace(store: &Store, settings: &NodeSettings, from: &str, to: &str) -> Result<Trace, TraceError> {
    let from = parse_party(from)?;
    let to = parse_target(to)?;
    trace_parsed(store, settings, &from, &to)
}

/// As [`trace`], for parsed arguments.
pub fn trace_parsed(
    store: &Store,
    settings: &NodeSettings,
    from: &Party,
    to: &Target,
) -> Result<Trace, TraceError> {
    let source_pod = match from {
        Party::Pod { namespace, name } => Some(find_pod(store, namespace, name)?),
        Party::Address(ip) => pod_by_address(store, *ip),
    };
    // The destination as an address: a Pod named by name is taken at its address of the
    // source's family (its first one when the source is a Pod of both).
    let destination = match &to.party {
        Party::Address(ip) => *ip,
        Party::Pod { namespace, name } => {
            let pod = find_pod(store, namespace, name)?;
            let wanted = match from {
                Party::Address(ip) => Some(Family::of(*ip)),
                Party::Pod { .. } => None,
            };
            pod.ips
                .iter()
                .copied()
                .find(|ip| wanted.is_none_or(|f| Family::of(*ip) == f))
                .ok_or_else(|| TraceError::UnknownPod {
                    pod: format!("{namespace}/{name}"),
                    problem: "has no address of the source's family".into(),
                })?
        }
    };
    let mut trace = Trace {
        from: describe_party(from),
        to: describe_party(&to.party),
        port: to.port,
        protocol: to.protocol,
        service: None,
        paths: Vec::new(),
    };
    let mut endpoints = vec![(destination, to.port)];
    let table = services::plan(store, settings);
    let reached = Reached {
        destination,
        port: to.port,
        protocol: to.protocol,
        from_pod: source_pod.is_some(),
        maybe_node: pod_by_address(store, destination).is_none()
            && !settings.cluster_cidrs.iter().any(|c| c.contains(destination))
            && (settings.nodeport_addresses.is_empty()
                || settings
                    .nodeport_addresses
                    .iter()
                    .any(|c| c.contains(destination))),
    };
    if let Some((port, chosen)) = table
        .ports
        .values()
        .find_map(|p| reached.endpoints(p).map(|e| (p, e)))
    {
        // `namespace/name:port`, or `namespace/name` for a Service's one unnamed port.
        let id = &port.id;
        trace.service = Some(if id.port_name.is_empty() {
            format!("{}/{}", id.namespace, id.name)
        } else {
            format!("{}/{}:{}", id.namespace, id.name, id.port_name)
        });
        endpoints = chosen.iter().map(|e| (e.ip, e.port)).collect();
    }

    // Plan both ends (whatever their node): trace answers for the whole path.
    let ends: Vec<(String, String)> = endpoints
        .iter()
        .filter_map(|(ip, _)| pod_by_address(store, *ip))
        .chain(source_pod)
        .map(|p| (p.namespace.to_string(), p.name.to_string()))
        .collect();
    let policies = policy::plan_pods(store, |p| {
        ends.iter().any(|(ns, n)| *p.namespace == **ns && *p.name == **n)
    });
    for (ip, port) in endpoints {
        trace
            .paths
            .push(judge(&policies, from, source_pod, ip, port, to.protocol, store));
    }
    Ok(trace)
}

/// The first packet's destination, as the Services plan matches it.
struct Reached {
    destination: IpAddr,
    port: u16,
    protocol: Protocol,
    /// Sent by a Pod: kube-proxy short-circuits such traffic to external, load-balancer
    /// and NodePort addresses inside the node instead of applying externalTrafficPolicy.
    from_pod: bool,
    /// The destination may be an address of the node (a NodePort target): no Pod has it,
    /// it is outside the cluster CIDRs and within `--nodeport-addresses` when given. The
    /// plan does not know the node's addresses; the CLI's user names one.
    maybe_node: bool,
}

impl Reached {
    /// The endpoints `p` sends the packet to, if it is addressed to `p`: its ClusterIP, an
    /// external or load-balancer IP on its port, or its NodePort on a node address.
    fn endpoints<'p>(&self, p: &'p ServicePort) -> Option<&'p [Endpoint]> {
        if p.id.protocol != self.protocol || p.id.family != Family::of(self.destination) {
            return None;
        }
        let external = if !self.from_pod {
            &p.external_endpoints
        } else if p.short_circuit_endpoints.is_empty() {
            &p.cluster_endpoints
        } else {
            &p.short_circuit_endpoints
        };
        let to_external_address = p.port == self.port
            && (p.external_ips.contains(&self.destination)
                || p.load_balancer_ips.contains(&self.destination));
        let to_node_port = p.node_port == Some(self.port) && self.maybe_node;
        if p.port == self.port && p.cluster_ip == Some(self.destination) {
            Some(&p.cluster_endpoints)
        } else if to_external_address || to_node_port {
            Some(external)
        } else {
            None
        }
    }
}

fn judge(
    policies: &PolicyTable,
    from: &Party,
    source_pod: Option<&PodInfo>,
    destination: IpAddr,
    port: u16,
    protocol: Protocol,
    store: &Store,
) -> Path {
    let source = match from {
        Party::Address(ip) => Some(*ip),
        Party::Pod { .. } => source_pod.and_then(|p| {
            p.ips
                .iter()
                .copied()
                .find(|ip| Family::of(*ip) == Family::of(destination))
        }),
    };
    let destination_pod = pod_by_address(store, destination);
    let lookup =
        |pod: Option<&PodInfo>| pod.and_then(|p| policies.pods.get(&format!("{}/{}", p.namespace, p.name)));
    let node_of = |pod: Option<&PodInfo>| pod.and_then(|p| p.node_name.as_deref().map(str::to_string));
    let Some(source) = source else {
        return Path {
            source: None,
            destination,
            port,
            pod: destination_pod.map(|p| format!("{}/{}", p.namespace, p.name)),
            egress: Judgement::NoAddress,
            ingress: Judgement::NoAddress,
            allowed: false,
        };
    };
    let egress = direction(
        lookup(source_pod),
        |p| p.egress.as_ref(),
        destination,
        protocol,
        port,
        node_of(source_pod),
        "egress",
    );
    let ingress = direction(
        lookup(destination_pod),
        |p| p.ingress.as_ref(),
        source,
        protocol,
        port,
        node_of(destination_pod),
        "ingress",
    );
    Path {
        source: Some(source),
        destination,
        port,
        pod: destination_pod.map(|p| format!("{}/{}", p.namespace, p.name)),
        allowed: egress.passes() && ingress.passes(),
        egress,
        ingress,
    }
}

fn direction(
    pod: Option<&PodPolicy>,
    isolation: impl Fn(&PodPolicy) -> Option<&Isolation>,
    other_end: IpAddr,
    protocol: Protocol,
    port: u16,
    node: Option<String>,
    name: &str,
) -> Judgement {
    let Some(pod) = pod else {
        return Judgement::NotAPod;
    };
    let Some(isolation) = isolation(pod) else {
        return Judgement::NotIsolated { node };
    };
    let allowing = isolation.allowing(other_end, protocol, port);
    if allowing.is_empty() {
        Judgement::Denied {
            node,
            policies: isolation.policies.clone(),
        }
    } else {
        Judgement::Allowed {
            node,
            rules: allowing
                .iter()
                .map(|a| format!("{} {name}[{}]", a.policy, a.rule))
                .collect(),
        }
    }
}

fn find_pod<'s>(store: &'s Store, namespace: &str, name: &str) -> Result<&'s PodInfo, TraceError> {
    let pod = store.pod(namespace, name).ok_or_else(|| TraceError::UnknownPod {
        pod: format!("{namespace}/{name}"),
        problem: "not found in the source (check the namespace and name, e.g. with kubectl get pods -A)"
            .into(),
    })?;
    if pod.host_network {
        return Err(TraceError::UnknownPod {
            pod: format!("{namespace}/{name}"),
            problem: "runs on the host's network: its address is the node's and no policy applies to it; trace from the node's address instead".into(),
        });
    }
    if !policy::is_peer(pod) {
        return Err(TraceError::UnknownPod {
            pod: format!("{namespace}/{name}"),
            problem: "has no address yet, or has finished: it sends and receives nothing".into(),
        });
    }
    Ok(pod)
}

/// The Pod that has `ip`, if any (a finished Pod's address does not count).
fn pod_by_address(store: &Store, ip: IpAddr) -> Option<&PodInfo> {
    store.pods().find(|p| policy::is_peer(p) && p.ips.contains(&ip))
}

fn describe_party(party: &Party) -> String {
    match party {
        Party::Pod { namespace, name } => format!("{namespace}/{name}"),
        Party::Address(ip) => ip.to_string(),
    }
}

impl Trace {
    /// Whether the first packet reaches at least one destination.
    pub fn allowed(&self) -> bool {
        self.paths.iter().any(|p| p.allowed)
    }

    /// The text the CLI prints.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let proto = self.protocol.as_str();
        let _ = writeln!(out, "{} -> {}:{}/{proto}", self.from, self.to, self.port);
        if let Some(service) = &self.service {
            let _ = writeln!(out, "  Service {service}: {} endpoint(s)", self.paths.len());
            if self.paths.is_empty() {
                let _ = writeln!(out, "  no endpoint: the connection is refused");
            }
        }
        for path in &self.paths {
            let verdict = if path.allowed { "ALLOWED" } else { "DENIED" };
            let pod = path
                .pod
                .as_deref()
                .map(|p| format!(" (Pod {p})"))
                .unwrap_or_default();
            let _ = writeln!(out, "  -> {}:{}{pod}: {verdict}", path.destination, path.port);
            let _ = writeln!(out, "     egress:  {}", describe(&path.egress, "source"));
            let _ = writeln!(out, "     ingress: {}", describe(&path.ingress, "destination"));
        }
        out
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a trace serializes") + "\n"
    }
}

fn describe(judgement: &Judgement, end: &str) -> String {
    let on = |node: &Option<String>| {
        node.as_deref()
            .map(|n| format!(" (on node {n})"))
            .unwrap_or_default()
    };
    match judgement {
        Judgement::NotAPod => format!("the {end} is not a Pod: no policy"),
        Judgement::NotIsolated { node } => format!("not isolated{}", on(node)),
        Judgement::Allowed { node, rules } => format!("allowed by {}{}", rules.join(", "), on(node)),
        Judgement::Denied { node, policies } => {
            format!(
                "denied: isolated by {} and no rule matches{}",
                policies.join(", "),
                on(node)
            )
        }
        Judgement::NoAddress => "the source has no address of the destination's family".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Event, Kind, Object};
    use k8s_openapi::api::core::v1::{Pod, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use serde_json::json;

    /// A LoadBalancer Service (NodePort 30080, load-balancer IP 192.0.2.10,
    /// externalTrafficPolicy Local) with one endpoint on node-a and one on node-b.
    fn load_balancer_store() -> Store {
        let pod = |name: &str, ip: &str, node: &str| -> Object {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"namespace": "x", "name": name, "labels": {"app": "web"}},
                "spec": {"nodeName": node, "containers": []},
                "status": {"phase": "Running", "podIPs": [{"ip": ip}]}
            }))
            .unwrap();
            pod.into()
        };
        let service: Service = serde_json::from_value(json!({
            "metadata": {"namespace": "x", "name": "web"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "x", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": [{"addresses": ["10.244.0.5"], "nodeName": "node-a"},
                          {"addresses": ["10.244.1.5"], "nodeName": "node-b"}]
        }))
        .unwrap();
        let mut store = Store::new();
        store.apply(Event::Snapshot {
            kinds: Kind::ALL.to_vec(),
            objects: vec![
                pod("local", "10.244.0.5", "node-a"),
                pod("remote", "10.244.1.5", "node-b"),
                service.into(),
                slice.into(),
            ],
        });
        store
    }

    #[test]
    fn node_ports_and_load_balancer_ips_lead_to_the_endpoints_kube_proxy_picks() {
        let store = load_balancer_store();
        let settings = NodeSettings {
            node_name: "node-a".into(),
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            ..NodeSettings::default()
        };
        let destinations = |from: &str, to: &str| {
            let t = trace(&store, &settings, from, to).unwrap();
            let mut d: Vec<String> = t
                .paths
                .iter()
                .map(|p| format!("{}:{}", p.destination, p.port))
                .collect();
            d.sort();
            (t.service, d)
        };
        let web = Some("x/web:http".to_string());
        // From outside: externalTrafficPolicy Local keeps to the local endpoint.
        for to in ["192.0.2.10:80", "203.0.113.1:30080"] {
            assert_eq!(
                destinations("198.51.100.7", to),
                (web.clone(), vec!["10.244.0.5:8080".to_string()]),
                "{to}"
            );
        }
        // From a Pod: short-circuited to every endpoint.
        assert_eq!(
            destinations("x/remote", "192.0.2.10:80"),
            (
                web.clone(),
                vec!["10.244.0.5:8080".to_string(), "10.244.1.5:8080".to_string()]
            )
        );
        // A Pod's own address on the NodePort's number is that Pod, not the Service.
        assert_eq!(
            destinations("198.51.100.7", "10.244.1.5:30080"),
            (None, vec!["10.244.1.5:30080".to_string()])
        );
    }

    #[test]
    fn arguments_parse_or_say_how_to_write_them() {
        assert_eq!(
            parse_target("x/b:80/udp").unwrap(),
            Target {
                party: Party::Pod {
                    namespace: "x".into(),
                    name: "b".into()
                },
                port: 80,
                protocol: Protocol::Udp
            }
        );
        assert_eq!(
            parse_target("[fd00::1]:81").unwrap(),
            Target {
                party: Party::Address("fd00::1".parse().unwrap()),
                port: 81,
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(parse_target("10.0.0.1:53/SCTP").unwrap().protocol, Protocol::Sctp);
        assert!(parse_target("x/b")
            .unwrap_err()
            .to_string()
            .contains("give a port"));
        assert!(parse_target("fd00::1:80")
            .unwrap_err()
            .to_string()
            .contains("brackets"));
        assert!(parse_target("x/b:80/icmp")
            .unwrap_err()
            .to_string()
            .contains("tcp, udp or sctp"));
        assert!(parse_party("nobody")
            .unwrap_err()
            .to_string()
            .contains("namespace/name"));
    }
}
