//! The cases: upstream's NetworkPolicy e2e tests as data, and a few of Ferry's own.
//!
//! A [`Case`] is a list of [`Step`]s; a step changes the cluster ([`Action`]: apply a
//! policy, delete them all, relabel a namespace or a pod) and then probes one or more
//! port/protocol pairs over the full 9x9 matrix, each probe carrying upstream's own
//! expectation ([`Reachability`]). Nothing here says how pods are run or probed: the
//! end-to-end harness does that, asking [`State::expected`] what each probe should see.
//!
//! Policies are JSON objects as a user writes them. Where upstream builds a CIDR from a
//! pod's address at run time, the JSON holds a template string that [`Case::instantiate`]
//! fills in for one IP family:
//!
//! - `<x/b>/host` — x/b's address as a host route (`/32` or `/128`);
//! - `<x/b>/4` — the network of that prefix length around x/b's address (any length).

use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::{json, Value};

use super::cluster::{pod_keys, upstream_cluster, AddressError, PodAddresses, PORTS, PORT_RANGE_PORTS};
use super::model::{Cluster, Connection, Endpoint, Family, NetworkPolicy, PolicyError, Protocol};
use super::reachability::{Reachability, TruthTable};

mod extra;
mod upstream;

/// Every case: upstream's first, then Ferry's additions.
pub fn all() -> Vec<Case> {
    let mut cases = upstream::cases();
    cases.extend(extra::cases());
    cases
}

/// Where a case comes from; upstream's three suites are its `ginkgo.Context`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    Tcp,
    Udp,
    Sctp,
    /// Upstream's endPort suite, which only older versions of the file have.
    PortRange,
    /// Not in upstream's network_policy.go: Ferry's own, expectations by hand.
    Ferry,
}

impl Suite {
    /// Upstream's context string (Ferry's cases say they are Ferry's).
    pub fn context(self) -> &'static str {
        match self {
            Suite::Tcp => "NetworkPolicy between server and client",
            Suite::Udp => "NetworkPolicy between server and client using UDP",
            Suite::Sctp => "NetworkPolicy between server and client using SCTP",
            Suite::PortRange => "NetworkPolicy between server and client using port range",
            Suite::Ferry => "Ferry additions to upstream's cases",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Case {
    pub suite: Suite,
    /// Upstream's `f.It` title, word for word (without `[Feature:...]` tags).
    pub title: &'static str,
    /// The ports every pod serves, on TCP, UDP and SCTP.
    pub ports: &'static [u16],
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug)]
pub struct Step {
    pub actions: Vec<Action>,
    pub probes: Vec<Probe>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create the policy, or replace the one with its namespace and name (upstream's
    /// `CreatePolicy` and `UpdatePolicy`).
    Apply(Value),
    /// Delete every policy of every namespace (upstream's `cleanNetworkPolicies`).
    DeleteAllPolicies,
    /// Add or change one label of a namespace (upstream's `AddNamespaceLabel`).
    LabelNamespace {
        namespace: &'static str,
        key: &'static str,
        value: &'static str,
    },
    /// Add or change one label of a pod (upstream's `AddPodLabels`, one label at a time).
    LabelPod {
        namespace: &'static str,
        pod: &'static str,
        key: &'static str,
        value: &'static str,
    },
}

#[derive(Clone, Debug)]
pub struct Probe {
    pub port: u16,
    pub protocol: Protocol,
    /// What upstream expects this probe to see.
    pub upstream: Reachability,
}

/// A case that cannot be instantiated.
#[derive(Debug)]
pub enum CaseError {
    Address(AddressError),
    Template { template: String, problem: String },
    Policy { step: usize, error: PolicyError },
}

impl fmt::Display for CaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaseError::Address(e) => write!(f, "{e}"),
            CaseError::Template { template, problem } => {
                write!(f, "address template {template:?}: {problem}")
            }
            CaseError::Policy { step, error } => write!(f, "step {step}: {error}"),
        }
    }
}

impl std::error::Error for CaseError {}

impl From<AddressError> for CaseError {
    fn from(e: AddressError) -> Self {
        CaseError::Address(e)
    }
}

/// A case made concrete for one family: policies hold real CIDRs, and each step knows
/// the cluster and policies in force after it.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub family: Family,
    pub steps: Vec<ScenarioStep>,
}

#[derive(Clone, Debug)]
pub struct ScenarioStep {
    /// The step's actions with every template filled in.
    pub actions: Vec<Action>,
    pub probes: Vec<Probe>,
    pub state: State,
}

/// The cluster (labels included) and the policies in force after a step.
#[derive(Clone, Debug)]
pub struct State {
    pub cluster: Cluster,
    pub policies: Vec<Value>,
    parsed: Vec<NetworkPolicy>,
    family: Family,
}

impl State {
    /// The oracle's answer: does pod `from` (`x/a`) reach pod `to` on `port`/`protocol`,
    /// in the scenario's family. The same holds through `to`'s Service ClusterIP: policy
    /// sees the connection after the Service is translated to the pod.
    pub fn expected(&self, from: &str, to: &str, port: u16, protocol: Protocol) -> bool {
        let from = Endpoint::Pod(self.pod(from));
        self.expected_from(from, to, port, protocol)
    }

    /// As [`State::expected`], from an address outside the cluster.
    pub fn expected_from_address(&self, from: IpAddr, to: &str, port: u16, protocol: Protocol) -> bool {
        self.expected_from(Endpoint::Ip(from), to, port, protocol)
    }

    fn expected_from(&self, from: Endpoint, to: &str, port: u16, protocol: Protocol) -> bool {
        let connection = Connection {
            from,
            to: Endpoint::Pod(self.pod(to)),
            family: self.family,
            port,
            protocol,
        };
        self.cluster.allows(&self.parsed, &connection)
    }

    /// The oracle's 9x9 table for one probe.
    pub fn truth_table(&self, port: u16, protocol: Protocol) -> TruthTable {
        TruthTable::from_fn(|from, to| self.expected(from, to, port, protocol))
    }

    fn pod(&self, key: &str) -> &super::model::Pod {
        let (namespace, name) = key.split_once('/').unwrap_or((key, ""));
        self.cluster
            .pod(namespace, name)
            .unwrap_or_else(|| panic!("{key:?} is not a pod of the x/y/z topology"))
    }
}

impl Case {
    /// `<context> <title>`, unique across cases, for test names and reports.
    pub fn name(&self) -> String {
        format!("{} {}", self.suite.context(), self.title)
    }

    /// Fills the address templates for `family` and works out each step's state. Every
    /// pod needs an address of `family`: the scenario probes all nine.
    pub fn instantiate(&self, addresses: &PodAddresses, family: Family) -> Result<Scenario, CaseError> {
        for pod in pod_keys() {
            addresses.get(&pod, family)?;
        }
        let mut cluster = upstream_cluster(addresses, self.ports);
        let mut policies: Vec<Value> = Vec::new();
        let mut steps = Vec::new();
        for (index, step) in self.steps.iter().enumerate() {
            let mut actions = Vec::new();
            for action in &step.actions {
                let action = match action {
                    Action::Apply(template) => {
                        let policy = fill_templates(template, addresses, family)?;
                        apply(&mut policies, policy.clone());
                        Action::Apply(policy)
                    }
                    Action::DeleteAllPolicies => {
                        policies.clear();
                        Action::DeleteAllPolicies
                    }
                    Action::LabelNamespace {
                        namespace,
                        key,
                        value,
                    } => {
                        let ns = cluster
                            .namespaces
                            .iter_mut()
                            .find(|n| n.name == *namespace)
                            .ok_or_else(|| AddressError::UnknownNamespace(namespace.to_string()))?;
                        ns.labels.insert(key.to_string(), value.to_string());
                        action.clone()
                    }
                    Action::LabelPod {
                        namespace,
                        pod,
                        key,
                        value,
                    } => {
                        let p = cluster
                            .pods
                            .iter_mut()
                            .find(|p| p.namespace == *namespace && p.name == *pod)
                            .ok_or_else(|| AddressError::UnknownPod(format!("{namespace}/{pod}")))?;
                        p.labels.insert(key.to_string(), value.to_string());
                        action.clone()
                    }
                };
                actions.push(action);
            }
            let parsed = policies
                .iter()
                .map(NetworkPolicy::from_json)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| CaseError::Policy { step: index, error })?;
            steps.push(ScenarioStep {
                actions,
                probes: step.probes.clone(),
                state: State {
                    cluster: cluster.clone(),
                    policies: policies.clone(),
                    parsed,
                    family,
                },
            });
        }
        Ok(Scenario {
            name: self.name(),
            family,
            steps,
        })
    }
}

/// Create-or-replace by namespace and name, as the API server keys policies.
fn apply(policies: &mut Vec<Value>, policy: Value) {
    let key = |p: &Value| {
        (
            p["metadata"]["namespace"].as_str().map(str::to_string),
            p["metadata"]["name"].as_str().map(str::to_string),
        )
    };
    let new_key = key(&policy);
    match policies.iter_mut().find(|p| key(p) == new_key) {
        Some(existing) => *existing = policy,
        None => policies.push(policy),
    }
}

fn fill_templates(value: &Value, addresses: &PodAddresses, family: Family) -> Result<Value, CaseError> {
    Ok(match value {
        Value::String(text) if text.starts_with('<') => {
            Value::String(fill_template(text, addresses, family)?)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| fill_templates(v, addresses, family))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), fill_templates(v, addresses, family)?)))
                .collect::<Result<_, CaseError>>()?,
        ),
        other => other.clone(),
    })
}

/// `<x/b>/host` or `<x/b>/<prefix length>`.
fn fill_template(template: &str, addresses: &PodAddresses, family: Family) -> Result<String, CaseError> {
    let bad = |problem: &str| CaseError::Template {
        template: template.to_string(),
        problem: problem.to_string(),
    };
    let (pod, suffix) = template
        .strip_prefix('<')
        .and_then(|rest| rest.split_once(">/"))
        .ok_or_else(|| bad("write <ns/pod>/host or <ns/pod>/<prefix length>"))?;
    let address = addresses.get(pod, family)?;
    let host_length = match family {
        Family::V4 => 32,
        Family::V6 => 128,
    };
    let length = match suffix {
        "host" => host_length,
        digits => digits
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= host_length)
            .ok_or_else(|| bad("the prefix length is not a number within the family's"))?,
    };
    let network = IpNetwork::new(address, length).map_err(|e| bad(&e.to_string()))?;
    Ok(format!("{}/{}", network.network(), length))
}

// Shorthands for writing cases: a case reads as upstream's test does.

fn case(suite: Suite, title: &'static str, steps: Vec<Step>) -> Case {
    let ports = match suite {
        Suite::PortRange => &PORT_RANGE_PORTS[..],
        _ => &PORTS[..],
    };
    Case {
        suite,
        title,
        ports,
        steps,
    }
}

fn step(actions: Vec<Action>, probes: Vec<Probe>) -> Step {
    Step { actions, probes }
}

fn probe(port: u16, protocol: Protocol, upstream: Reachability) -> Probe {
    Probe {
        port,
        protocol,
        upstream,
    }
}

/// A whole NetworkPolicy object from its namespace, name and spec.
fn policy(namespace: &str, name: &str, spec: Value) -> Action {
    Action::Apply(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": namespace, "name": name},
        "spec": spec,
    }))
}
