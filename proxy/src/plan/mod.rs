//! The plan: what the node must do for Services, as plain data.
//!
//! `plan` is a pure function of the store (the cluster objects this node sees) and the
//! node's settings. It does no I/O and knows nothing of nftables or eBPF: back ends turn a
//! [`Plan`] into kernel state, and a change is the difference of two plans
//! ([`crate::changes`]).

pub mod policy;
pub mod services;

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::Serialize;

/// Transport protocols a Service port can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// An IP family: a dual-stack Service has one [`ServicePort`] per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
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

/// Identifies one port of one Service in one family: the unit back ends program.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServicePortId {
    pub namespace: String,
    pub name: String,
    /// The Service port's name ("" when the Service has a single unnamed port).
    pub port_name: String,
    pub protocol: Protocol,
    pub family: Family,
}

impl std::fmt::Display for ServicePortId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fam = match self.family {
            Family::V4 => "v4",
            Family::V6 => "v6",
        };
        write!(
            f,
            "{}/{}:{}/{}/{}",
            self.namespace,
            self.name,
            self.port_name,
            self.protocol.as_str(),
            fam
        )
    }
}

/// One endpoint of a Service port: where traffic is DNATed to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// The target port, named ports already resolved from the EndpointSlice.
    pub port: u16,
    /// Runs on this node (EndpointSlice `nodeName` is ours).
    pub is_local: bool,
    /// Ready, as opposed to chosen by the terminating fallback (serving and terminating):
    /// health check node ports count only ready local endpoints, as kube-proxy does.
    pub ready: bool,
}

/// Everything the node does for one Service port in one family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub id: ServicePortId,
    /// The ClusterIP of this family (absent for e.g. a NodePort-only view of a headless
    /// Service, which the plan leaves out entirely).
    pub cluster_ip: Option<IpAddr>,
    pub port: u16,
    /// NodePort (for NodePort and LoadBalancer Services).
    pub node_port: Option<u16>,
    /// `spec.externalIPs` of this family.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` of this family.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` of this family: when non-empty, traffic to the
    /// load-balancer IPs from other sources is dropped.
    pub source_ranges: Vec<IpNetwork>,
    /// `externalTrafficPolicy: Local`: external traffic keeps its source address and goes
    /// only to local endpoints.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`: traffic to the ClusterIP goes only to local endpoints.
    pub internal_local: bool,
    /// `healthCheckNodePort` (LoadBalancer with externalTrafficPolicy Local).
    pub health_check_node_port: Option<u16>,
    /// `sessionAffinity: ClientIP`: the timeout in seconds.
    pub affinity_seconds: Option<u32>,
    /// Endpoints for traffic to the ClusterIP (and for traffic from inside the cluster to
    /// external and load-balancer IPs): ready ones, or if none, serving and terminating
    /// ones; only local ones with `internalTrafficPolicy: Local`. Sorted.
    pub cluster_endpoints: Vec<Endpoint>,
    /// Endpoints for traffic from outside to the NodePort, external and load-balancer IPs:
    /// the same selection, only local ones with `externalTrafficPolicy: Local`. Sorted.
    pub external_endpoints: Vec<Endpoint>,
    /// With both traffic policies Local: the endpoints a Cluster policy would use, for
    /// traffic from Pods and from the node to the NodePort, external and load-balancer IPs.
    /// kube-proxy sends that traffic to every endpoint ("short-circuit": it is subject to
    /// neither policy, as if it had gone out to the load balancer and come back). Empty
    /// otherwise, when that traffic uses `cluster_endpoints`. Sorted.
    pub short_circuit_endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// A port reached only at its ClusterIP, with no endpoints yet: planning and tests
    /// start from it and set what a Service's shape adds.
    pub fn new(id: ServicePortId, cluster_ip: Option<IpAddr>, port: u16) -> ServicePort {
        ServicePort {
            id,
            cluster_ip,
            port,
            node_port: None,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            source_ranges: Vec::new(),
            external_local: false,
            internal_local: false,
            health_check_node_port: None,
            affinity_seconds: None,
            cluster_endpoints: Vec::new(),
            external_endpoints: Vec::new(),
            short_circuit_endpoints: Vec::new(),
        }
    }
}

/// Node-level settings that shape the rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeSettings {
    /// `--hostname-override` (or the host name): which endpoints are local.
    pub node_name: String,
    /// `--cluster-cidr`: traffic to a ClusterIP from outside these is masqueraded.
    pub cluster_cidrs: Vec<IpNetwork>,
    /// `--nodeport-addresses`: the node addresses NodePorts answer on; empty means every
    /// local address.
    pub nodeport_addresses: Vec<IpNetwork>,
}

/// The Services part of the plan: every Service port the node handles, keyed for diffing.
/// It is only a value: what changed since a back end last saw it is the sync loop's
/// business ([`crate::changes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServiceTable {
    pub settings: NodeSettings,
    /// Serialized as a list (each port carries its id): JSON map keys must be strings.
    #[serde(serialize_with = "ports_as_list")]
    pub ports: BTreeMap<ServicePortId, ServicePort>,
}

/// Everything the node must do, as the back ends get it: Services, and NetworkPolicy for
/// the node's Pods.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub services: ServiceTable,
    /// `None`: policy is not enforced (`--network-policy=false`): the back end removes its
    /// policy table. `Some` with no isolated Pod still has the table, empty.
    pub policy: Option<policy::PolicyTable>,
}

fn ports_as_list<S: serde::Serializer>(
    ports: &BTreeMap<ServicePortId, ServicePort>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(ports.values())
}
