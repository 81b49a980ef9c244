//! The store's copies of cluster objects: only the fields a plan reads, converted from
//! k8s-openapi's types as the objects arrive.
//!
//! A k8s-openapi object keeps every field of the API (an EndpointSlice endpoint alone has
//! a dozen optional strings: target reference, zone, hints, ...), and most of them are
//! never read here. At 10k Services x 10 endpoints, keeping whole objects cost the proxy
//! ~300 MiB; these types keep what the plans need, with strings that repeat across
//! objects (namespaces, node names, label keys and values, port names) shared through
//! [`intern`]. Values the plans would throw away (an endpoint address that does not
//! parse, a protocol nobody knows) are dropped or marked here, once, instead of at every
//! plan.
//!
//! Equality is on exactly these fields, so an update that changes nothing a plan reads
//! (a status condition, a resourceVersion, an annotation) compares equal to what is
//! stored and costs nothing downstream: the store's predicate, like kube-rs's predicate
//! filters.

use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::intern::intern;
use crate::plan::{Family, Protocol};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services and slices with this label are handled by another proxy (kube-proxy skips
/// them too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set on the objects of headless Services; kube-proxy's informers filter it out.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The label the API server puts on every Namespace (since 1.21), naming it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Objects from a manifest may lack a namespace: like kubectl, they then live in
/// "default".
fn namespace_of(meta: &ObjectMeta) -> Arc<str> {
    intern(
        meta.namespace
            .as_deref()
            .filter(|ns| !ns.is_empty())
            .unwrap_or("default"),
    )
}

fn name_of(meta: &ObjectMeta) -> Arc<str> {
    Arc::from(meta.name.as_deref().unwrap_or_default())
}

fn has_label(meta: &ObjectMeta, label: &str) -> bool {
    meta.labels.as_ref().is_some_and(|l| l.contains_key(label))
}

/// Whether kube-proxy's label selector leaves this object to someone else: another
/// proxy's, or a headless Service's.
fn not_ours(meta: &ObjectMeta) -> bool {
    has_label(meta, SERVICE_PROXY_NAME_LABEL) || has_label(meta, HEADLESS_LABEL)
}

/// Service and EndpointSlice ports default to TCP (the API server fills it in; a
/// hand-written manifest may not). `None`: a protocol Ferry does not know.
pub fn parse_protocol(value: Option<&str>) -> Option<Protocol> {
    match value.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn parse_family(value: &str) -> Option<Family> {
    match value {
        "IPv4" => Some(Family::V4),
        "IPv6" => Some(Family::V6),
        _ => None,
    }
}

/// Addresses that parse (surrounding blanks allowed, as validation lets them through);
/// the others cannot be programmed and are dropped.
fn parse_ips<'a>(ips: impl Iterator<Item = &'a str>) -> Vec<IpAddr> {
    ips.filter_map(|ip| ip.trim().parse().ok()).collect()
}

/// Labels, sorted by key, keys and values shared.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Box<[(Arc<str>, Arc<str>)]>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    /// The pairs as shared strings, for indexes keyed by them.
    pub fn pairs(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<str>)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> FromIterator<(&'a str, &'a str)> for Labels {
    fn from_iter<I: IntoIterator<Item = (&'a str, &'a str)>>(pairs: I) -> Labels {
        let mut pairs: Vec<(Arc<str>, Arc<str>)> =
            pairs.into_iter().map(|(k, v)| (intern(k), intern(v))).collect();
        pairs.sort();
        pairs.dedup_by(|a, b| a.0 == b.0);
        Labels(pairs.into_boxed_slice())
    }
}

fn labels_of(meta: &ObjectMeta) -> Labels {
    meta.labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// `spec.type` of a Service; `None` in the API means ClusterIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
    /// A type this proxy does not know: no node ports, not external.
    Other,
}

/// A Service, as the Services plan reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// Labelled `service.kubernetes.io/service-proxy-name` or `service.kubernetes.io/headless`.
    pub not_ours: bool,
    pub type_: ServiceType,
    /// `spec.clusterIPs`, or `[spec.clusterIP]` when a hand-written manifest gives only
    /// that; primary first, unparsed (`"None"` marks a headless Service).
    pub cluster_ips: Vec<Box<str>>,
    /// `spec.ipFamilies`, index for index with `cluster_ips`; `None` for a value Ferry
    /// does not know.
    pub ip_families: Vec<Option<Family>>,
    /// `spec.externalIPs` that parse.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` that parse, without those whose `ipMode` is
    /// not `VIP` (the load balancer proxies to the node: capturing its address would
    /// bypass it). Hostname-only entries have nothing to capture.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` that parse, as written (host bits not cleared yet).
    pub source_ranges: Vec<IpNetwork>,
    pub ports: Vec<ServicePortInfo>,
    /// `spec.externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `spec.internalTrafficPolicy: Local`.
    pub internal_local: bool,
    pub health_check_node_port: Option<i32>,
    /// `spec.sessionAffinity: ClientIP`.
    pub client_ip_affinity: bool,
    /// `spec.sessionAffinityConfig.clientIP.timeoutSeconds`, unchecked.
    pub affinity_timeout: Option<i32>,
}

/// One entry of a Service's `spec.ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// "" when unnamed.
    pub name: Arc<str>,
    /// `None`: a protocol Ferry does not know.
    pub protocol: Option<Protocol>,
    pub port: i32,
    pub node_port: Option<i32>,
}

impl From<Service> for ServiceInfo {
    fn from(service: Service) -> ServiceInfo {
        let meta = &service.metadata;
        let spec = service.spec.unwrap_or_default();
        let cluster_ips: Vec<Box<str>> = match spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.into_iter().map(String::into_boxed_str).collect(),
            _ => spec
                .cluster_ip
                .filter(|ip| !ip.is_empty())
                .map(String::into_boxed_str)
                .into_iter()
                .collect(),
        };
        let ingress = service
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .unwrap_or_default();
        let vips = ingress
            .iter()
            .filter(|i| i.ip_mode.as_deref().is_none_or(|mode| mode == "VIP"))
            .filter_map(|i| i.ip.as_deref());
        ServiceInfo {
            namespace: namespace_of(meta),
            name: intern(meta.name.as_deref().unwrap_or_default()),
            not_ours: not_ours(meta),
            type_: match spec.type_.as_deref().unwrap_or("ClusterIP") {
                "ClusterIP" => ServiceType::ClusterIp,
                "NodePort" => ServiceType::NodePort,
                "LoadBalancer" => ServiceType::LoadBalancer,
                "ExternalName" => ServiceType::ExternalName,
                _ => ServiceType::Other,
            },
            cluster_ips,
            ip_families: spec
                .ip_families
                .iter()
                .flatten()
                .map(|f| parse_family(f))
                .collect(),
            external_ips: parse_ips(spec.external_ips.iter().flatten().map(String::as_str)),
            load_balancer_ips: parse_ips(vips),
            source_ranges: spec
                .load_balancer_source_ranges
                .iter()
                .flatten()
                .filter_map(|r| r.trim().parse().ok())
                .collect(),
            ports: spec
                .ports
                .into_iter()
                .flatten()
                .map(|p| ServicePortInfo {
                    name: intern(p.name.as_deref().unwrap_or_default()),
                    protocol: parse_protocol(p.protocol.as_deref()),
                    port: p.port,
                    node_port: p.node_port,
                })
                .collect(),
            external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            health_check_node_port: spec.health_check_node_port,
            client_ip_affinity: spec.session_affinity.as_deref() == Some("ClientIP"),
            affinity_timeout: spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds),
        }
    }
}

/// An EndpointSlice, as the Services plan reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSliceInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The `kubernetes.io/service-name` label, when present and not empty.
    pub service_name: Option<Arc<str>>,
    /// Labelled `service.kubernetes.io/service-proxy-name` or `service.kubernetes.io/headless`.
    pub not_ours: bool,
    /// `addressType`; `None` for FQDN (or anything else), which feeds no Service port.
    pub family: Option<Family>,
    pub ports: Vec<SlicePort>,
    /// The endpoints whose first address parses (only the first address counts, as in
    /// kube-proxy).
    pub endpoints: Vec<SliceEndpoint>,
}

/// One entry of an EndpointSlice's `ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    /// "" when absent (the API server defaults a nil name to "").
    pub name: Arc<str>,
    /// `None`: a protocol Ferry does not know.
    pub protocol: Option<Protocol>,
    pub port: Option<i32>,
}

/// One endpoint of an EndpointSlice, its conditions with the API's defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    pub node_name: Option<Arc<str>>,
    /// `conditions.ready`, absent = true.
    pub ready: bool,
    /// `conditions.serving`, absent = true.
    pub serving: bool,
    /// `conditions.terminating`, absent = false.
    pub terminating: bool,
}

impl From<EndpointSlice> for EndpointSliceInfo {
    fn from(slice: EndpointSlice) -> EndpointSliceInfo {
        let meta = &slice.metadata;
        let endpoints = slice
            .endpoints
            .iter()
            .filter_map(|e| {
                let ip = e.addresses.first()?.parse().ok()?;
                let c = e.conditions.clone().unwrap_or_default();
                Some(SliceEndpoint {
                    ip,
                    node_name: e.node_name.as_deref().map(intern),
                    ready: c.ready.unwrap_or(true),
                    serving: c.serving.unwrap_or(true),
                    terminating: c.terminating.unwrap_or(false),
                })
            })
            .collect();
        EndpointSliceInfo {
            namespace: namespace_of(meta),
            name: name_of(meta),
            service_name: meta
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .filter(|name| !name.is_empty())
                .map(|name| intern(name)),
            not_ours: not_ours(meta),
            family: parse_family(&slice.address_type),
            ports: slice
                .ports
                .iter()
                .flatten()
                .map(|p| SlicePort {
                    name: intern(p.name.as_deref().unwrap_or_default()),
                    protocol: parse_protocol(p.protocol.as_deref()),
                    port: p.port,
                })
                .collect(),
            endpoints,
        }
    }
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// A Node, as `/healthz` reads it (kube-proxy's `SyncNode`) and as the Pod network
/// between nodes reads it (`proxy/src/network`): its Pod CIDRs and InternalIPs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: Arc<str>,
    /// `metadata.deletionTimestamp` is set.
    pub being_deleted: bool,
    /// Tainted [`TO_BE_DELETED_TAINT`].
    pub to_be_deleted: bool,
    /// `spec.podCIDRs` (else `spec.podCIDR`), as networks (host bits cleared); entries
    /// that do not parse are left out.
    pub pod_cidrs: Vec<IpNetwork>,
    /// `status.addresses` of type `InternalIP`, in the order the Node lists them.
    pub internal_ips: Vec<IpAddr>,
}

impl From<Node> for NodeInfo {
    fn from(node: Node) -> NodeInfo {
        let spec = node.spec.unwrap_or_default();
        let cidrs = match spec.pod_cidrs {
            Some(cidrs) if !cidrs.is_empty() => cidrs,
            _ => spec.pod_cidr.into_iter().collect(),
        };
        let pod_cidrs = cidrs
            .iter()
            .filter_map(|c| c.parse::<IpNetwork>().ok())
            .filter_map(|n| IpNetwork::new(n.network(), n.prefix()).ok())
            .collect();
        let internal_ips = node
            .status
            .and_then(|s| s.addresses)
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        NodeInfo {
            name: intern(node.metadata.name.as_deref().unwrap_or_default()),
            being_deleted: node.metadata.deletion_timestamp.is_some(),
            to_be_deleted: spec
                .taints
                .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT)),
            pod_cidrs,
            internal_ips,
        }
    }
}

/// `status.phase` of a Pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    /// `Unknown`, absent, or a value Ferry does not know.
    Unknown,
}

/// A Pod, as NetworkPolicy will read it: who it is (labels, namespace), where it runs,
/// its addresses and its named ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub labels: Labels,
    /// `spec.nodeName`: `None` until scheduled.
    pub node_name: Option<Arc<str>>,
    /// The ports of every container (init containers too: a sidecar's ports count).
    pub ports: Vec<ContainerPort>,
    /// `status.podIPs`, or `status.podIP` when only that is set; those that parse.
    pub ips: Vec<IpAddr>,
    pub phase: PodPhase,
    /// `spec.hostNetwork`: the Pod runs in its node's network namespace, and its
    /// addresses are the node's.
    pub host_network: bool,
}

/// One `containers[].ports[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<Arc<str>>,
    /// `None`: a protocol Ferry does not know.
    pub protocol: Option<Protocol>,
    pub port: i32,
}

impl From<Pod> for PodInfo {
    fn from(pod: Pod) -> PodInfo {
        let meta = &pod.metadata;
        let spec = pod.spec.unwrap_or_default();
        let status = pod.status.unwrap_or_default();
        let containers = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten());
        let ports = containers
            .flat_map(|c| c.ports.iter().flatten())
            .map(|p| ContainerPort {
                name: p.name.as_deref().filter(|n| !n.is_empty()).map(intern),
                protocol: parse_protocol(p.protocol.as_deref()),
                port: p.container_port,
            })
            .collect();
        let ips = match status.pod_ips.as_deref() {
            Some(ips) if !ips.is_empty() => parse_ips(ips.iter().map(|ip| ip.ip.as_str())),
            _ => parse_ips(status.pod_ip.as_deref().into_iter()),
        };
        PodInfo {
            namespace: namespace_of(meta),
            name: name_of(meta),
            labels: labels_of(meta),
            node_name: spec.node_name.as_deref().filter(|n| !n.is_empty()).map(intern),
            ports,
            ips,
            phase: match status.phase.as_deref() {
                Some("Pending") => PodPhase::Pending,
                Some("Running") => PodPhase::Running,
                Some("Succeeded") => PodPhase::Succeeded,
                Some("Failed") => PodPhase::Failed,
                _ => PodPhase::Unknown,
            },
            host_network: spec.host_network.unwrap_or(false),
        }
    }
}

/// A Namespace, as NetworkPolicy will read it: its name and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: Arc<str>,
    /// With `kubernetes.io/metadata.name` always set to the name, as the API server
    /// does (a manifest written by hand may leave it out; policies select on it).
    pub labels: Labels,
}

impl From<Namespace> for NamespaceInfo {
    fn from(namespace: Namespace) -> NamespaceInfo {
        let meta = &namespace.metadata;
        let name = meta.name.as_deref().unwrap_or_default();
        let given = meta
            .labels
            .iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), v.as_str()));
        let labels = if has_label(meta, NAMESPACE_NAME_LABEL) {
            given.collect()
        } else {
            given.chain([(NAMESPACE_NAME_LABEL, name)]).collect()
        };
        NamespaceInfo {
            name: intern(name),
            labels,
        }
    }
}
