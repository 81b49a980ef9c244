//! Upstream's test topology: namespaces x, y, z; pods a, b, c in each; every pod serving
//! ports 80 and 81 (111 to 116 for the port-range cases) on TCP, UDP and SCTP, one
//! Service per pod.
//!
//! Names and labels follow upstream's `test/e2e/network/netpol/model.go`: a namespace is
//! labelled `ns: <name>` (and `kubernetes.io/metadata.name: <name>` by the API server), a
//! pod `pod: <name>`, and the container port for 80/TCP is named `serve-80-tcp`. Upstream
//! gives each test only the protocols it probes; here every pod serves all three, which
//! changes no expectation: a named port names one protocol, and probes of a protocol a
//! case does not mention are not made.
//!
//! Addresses are not part of the topology: the test that runs the pods fills a
//! [`PodAddresses`] with whatever the testbed gave each pod, in one family or both.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use super::model::{Cluster, ContainerPort, Family, Labels, Namespace, Pod, Protocol};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];
/// The ports every pod serves in upstream's main suites.
pub const PORTS: [u16; 2] = [80, 81];
/// The ports of upstream's port-range suite: it served 111 to 115 and probed 116 as well,
/// so 116 is served too, or its probe would fail for want of a server, not of a rule.
pub const PORT_RANGE_PORTS: [u16; 6] = [111, 112, 113, 114, 115, 116];

/// The nine pods in upstream's order: x/a, x/b, x/c, y/a, ... z/c.
pub fn pod_keys() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| POD_NAMES.iter().map(move |pod| format!("{ns}/{pod}")))
        .collect()
}

/// The container port name upstream gives `port`/`protocol`, e.g. `serve-80-tcp`.
pub fn port_name(port: u16, protocol: Protocol) -> String {
    format!("serve-{port}-{}", protocol.as_str().to_lowercase())
}

/// The name of the Service upstream puts in front of `pod` (`x/a` gives `s-x-a`); it
/// selects the pod by its `pod` label and exposes every served port.
pub fn service_name(pod: &str) -> String {
    format!("s-{}", pod.replace('/', "-"))
}

/// The name of that Service's port for `port`/`protocol`, e.g. `service-port-tcp-80`.
pub fn service_port_name(port: u16, protocol: Protocol) -> String {
    format!("service-port-{}-{port}", protocol.as_str().to_lowercase())
}

/// Labels a namespace of the topology starts with (before the API server's name label).
pub fn namespace_labels(namespace: &str) -> Labels {
    Labels::from([("ns".to_string(), namespace.to_string())])
}

/// Labels a pod of the topology starts with.
pub fn pod_labels(pod: &str) -> Labels {
    Labels::from([("pod".to_string(), pod.to_string())])
}

/// The addresses each pod of the topology got, keyed `x/a`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodAddresses {
    by_pod: BTreeMap<String, Vec<IpAddr>>,
}

/// A pod's address that a case or a probe needs and that was not given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressError {
    UnknownPod(String),
    UnknownNamespace(String),
    MissingAddress { pod: String, family: Family },
    TwoOfAFamily { pod: String, family: Family },
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressError::UnknownPod(pod) => write!(
                f,
                "{pod:?} is not a pod of the x/y/z topology; name one of {}",
                pod_keys().join(", ")
            ),
            AddressError::UnknownNamespace(namespace) => write!(
                f,
                "{namespace:?} is not a namespace of the topology; name x, y or z"
            ),
            AddressError::MissingAddress { pod, family } => write!(
                f,
                "pod {pod} has no {family:?} address; give it one with PodAddresses::set"
            ),
            AddressError::TwoOfAFamily { pod, family } => write!(
                f,
                "pod {pod} was given two {family:?} addresses; a pod has one per family"
            ),
        }
    }
}

impl std::error::Error for AddressError {}

impl PodAddresses {
    pub fn new() -> PodAddresses {
        PodAddresses::default()
    }

    /// Records `pod`'s addresses (`pod` as `x/a`), one per family at most.
    pub fn set(&mut self, pod: &str, ips: &[IpAddr]) -> Result<(), AddressError> {
        if !pod_keys().iter().any(|k| k == pod) {
            return Err(AddressError::UnknownPod(pod.to_string()));
        }
        for family in [Family::V4, Family::V6] {
            if ips.iter().filter(|ip| Family::of(**ip) == family).count() > 1 {
                return Err(AddressError::TwoOfAFamily {
                    pod: pod.to_string(),
                    family,
                });
            }
        }
        self.by_pod.insert(pod.to_string(), ips.to_vec());
        Ok(())
    }

    pub fn get(&self, pod: &str, family: Family) -> Result<IpAddr, AddressError> {
        if !pod_keys().iter().any(|k| k == pod) {
            return Err(AddressError::UnknownPod(pod.to_string()));
        }
        self.by_pod
            .get(pod)
            .and_then(|ips| ips.iter().copied().find(|ip| Family::of(*ip) == family))
            .ok_or(AddressError::MissingAddress {
                pod: pod.to_string(),
                family,
            })
    }

    fn all(&self, pod: &str) -> Vec<IpAddr> {
        self.by_pod.get(pod).cloned().unwrap_or_default()
    }
}

/// The topology with its starting labels, every pod holding the addresses given and
/// serving `ports` on every protocol.
pub fn upstream_cluster(addresses: &PodAddresses, ports: &[u16]) -> Cluster {
    let namespaces = NAMESPACES
        .iter()
        .map(|ns| Namespace::new(ns, namespace_labels(ns)))
        .collect();
    let mut container_ports = Vec::new();
    for &port in ports {
        for protocol in Protocol::ALL {
            container_ports.push(ContainerPort {
                name: Some(port_name(port, protocol)),
                protocol,
                port,
            });
        }
    }
    let pods = NAMESPACES
        .iter()
        .flat_map(|ns| POD_NAMES.iter().map(move |pod| (*ns, *pod)))
        .map(|(ns, pod)| Pod {
            namespace: ns.to_string(),
            name: pod.to_string(),
            labels: pod_labels(pod),
            ips: addresses.all(&format!("{ns}/{pod}")),
            ports: container_ports.clone(),
        })
        .collect();
    Cluster { namespaces, pods }
}
