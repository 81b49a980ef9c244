//! Services and EndpointSlices -> [`ServiceTable`], read the way kube-proxy reads them.
//!
//! Pure: no I/O, no clock, no kernel. Each Service is planned on its own from the Service
//! and its own EndpointSlices, which is what makes the incremental form
//! ([`plan_services`]) exact: re-planning the Services the store marked dirty gives the
//! same table as planning everything ([`plan`]).
//!
//! The rules follow kube-proxy (pkg/proxy: serviceport.go, endpointslicecache.go,
//! topology.go), where the documentation ("Virtual IPs and Service Proxies") leaves a
//! detail open:
//! - skipped: no cluster IP (`""` or `None`, i.e. headless), `ExternalName`, and Services
//!   labelled `service.kubernetes.io/service-proxy-name` (another proxy owns them) or
//!   `service.kubernetes.io/headless`, as kube-proxy's informers filter them;
//! - one [`ServicePort`] per Service port and family of `spec.ipFamilies`/`clusterIPs`;
//!   external IPs, load-balancer IPs and source ranges are split by family;
//! - an endpoint feeds the Service port whose name and protocol equal the slice port's
//!   (how named target ports resolve); only the first address of an endpoint counts, and
//!   only if its family is the Service port's;
//! - ready endpoints (`ready` absent = ready); if none, serving and terminating ones;
//! - `externalTrafficPolicy: Local` counts when the Service is reachable from outside:
//!   NodePort, LoadBalancer, or ClusterIP with externalIPs (kube-proxy's
//!   `ExternallyAccessible`).
//!
//! It reads the store's slim objects ([`crate::store::objects`]): addresses, protocols and
//! ports that cannot be used were already parsed (or dropped) when the objects arrived.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use tracing::debug;

use super::{Endpoint, Family, NodeSettings, Protocol, ServicePort, ServicePortId, ServiceTable};
use crate::changes;
use crate::store::objects::{EndpointSliceInfo, ServiceInfo, ServiceType, SliceEndpoint};
use crate::store::{ServiceKey, Store};
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when absent (the API server's default).
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10800;
/// The largest timeout the API accepts (one day).
const MAX_AFFINITY_SECONDS: i32 = 86400;

/// Plans every Service in the store.
pub fn plan(store: &Store, settings: &NodeSettings) -> ServiceTable {
    let mut table = ServiceTable {
        settings: settings.clone(),
        ports: BTreeMap::new(),
    };
    for (key, service) in store.services() {
        insert_service(&mut table, key, service, store);
    }
    table
}

/// Re-plans the given Services in place (typically [`Store::take_dirty`]): their old
/// ports leave the table, their new ones enter it. A Service no longer in the store just
/// leaves. Uses the table's own settings. Returns the ids of the ports that differ from
/// before (added, removed, or with another value), for the sync loop's change tracker.
pub fn plan_services<'a>(
    table: &mut ServiceTable,
    store: &Store,
    keys: impl IntoIterator<Item = &'a ServiceKey>,
) -> BTreeSet<ServicePortId> {
    let mut changed = BTreeSet::new();
    for key in keys {
        let old = remove_service(table, key);
        if let Some(service) = store.service(key) {
            insert_service(table, key, service, store);
        }
        changed.extend(changes::diff_ports(&old, service_ports(table, key)));
    }
    changed
}

fn insert_service(table: &mut ServiceTable, key: &ServiceKey, service: &ServiceInfo, store: &Store) {
    for port in plan_service(key, service, store.slices(key), &table.settings) {
        table.ports.insert(port.id.clone(), port);
    }
}

/// Removes every port of one Service and returns them.
fn remove_service(table: &mut ServiceTable, key: &ServiceKey) -> Vec<ServicePort> {
    let ids: Vec<ServicePortId> = service_ports(table, key).map(|p| p.id.clone()).collect();
    ids.iter().filter_map(|id| table.ports.remove(id)).collect()
}

/// The ports of one Service in the table: ids sort by (namespace, name, ...), so they form
/// one contiguous range of the map, found in O(log n).
fn service_ports<'t>(
    table: &'t ServiceTable,
    key: &'t ServiceKey,
) -> impl Iterator<Item = &'t ServicePort> + 't {
    let first = ServicePortId {
        namespace: key.namespace.to_string(),
        name: key.name.to_string(),
        port_name: String::new(),
        protocol: Protocol::Tcp,
        family: Family::V4,
    };
    table
        .ports
        .range(first..)
        .take_while(|(id, _)| *id.namespace == *key.namespace && *id.name == *key.name)
        .map(|(_, port)| port)
}

/// The ports of one Service, from the Service and its EndpointSlices.
pub fn plan_service<'a>(
    key: &ServiceKey,
    service: &ServiceInfo,
    slices: impl Iterator<Item = &'a EndpointSliceInfo>,
    settings: &NodeSettings,
) -> Vec<ServicePort> {
    if service.not_ours {
        return Vec::new();
    }
    let primary_ip = service.cluster_ips.first().map_or("", |ip| &**ip);
    if service.type_ == ServiceType::ExternalName || primary_ip.is_empty() || primary_ip == "None" {
        return Vec::new();
    }
    let has_node_ports = matches!(service.type_, ServiceType::NodePort | ServiceType::LoadBalancer);
    let is_load_balancer = service.type_ == ServiceType::LoadBalancer;
    let has_external_ips = !service.external_ips.is_empty();
    let externally_accessible =
        has_node_ports || (service.type_ == ServiceType::ClusterIp && has_external_ips);
    let external_local = externally_accessible && service.external_local;
    let internal_local = service.internal_local;
    let health_check_node_port = if is_load_balancer && external_local {
        service.health_check_node_port.and_then(port_number)
    } else {
        None
    };
    let affinity_seconds = affinity_seconds(key, service);
    let slices: Vec<&EndpointSliceInfo> = slices.filter(|s| !s.not_ours).collect();

    let mut ports = Vec::new();
    for family in [Family::V4, Family::V6] {
        let Some(cluster_ip) = cluster_ip_of_family(service, family) else {
            continue;
        };
        let external_ips = ips_of_family(&service.external_ips, family);
        let (load_balancer_ips, source_ranges) = if is_load_balancer {
            (
                ips_of_family(&service.load_balancer_ips, family),
                source_ranges(&service.source_ranges, family),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        for service_port in &service.ports {
            let port_name = service_port.name.to_string();
            let Some(protocol) = service_port.protocol else {
                debug!(service = %key, port = %port_name, "skipping a port with an unknown protocol");
                continue;
            };
            let Some(port) = port_number(service_port.port) else {
                debug!(service = %key, port = %port_name, "skipping a port with an invalid number");
                continue;
            };
            let candidates = candidates(&slices, &port_name, protocol, family, &settings.node_name);
            let all = select(&candidates, false);
            let local = if internal_local || external_local {
                select(&candidates, true)
            } else {
                Vec::new()
            };
            ports.push(ServicePort {
                id: ServicePortId {
                    namespace: key.namespace.to_string(),
                    name: key.name.to_string(),
                    port_name,
                    protocol,
                    family,
                },
                cluster_ip: Some(cluster_ip),
                port,
                node_port: if has_node_ports {
                    service_port.node_port.and_then(port_number)
                } else {
                    None
                },
                external_ips: external_ips.clone(),
                load_balancer_ips: load_balancer_ips.clone(),
                source_ranges: source_ranges.clone(),
                external_local,
                internal_local,
                health_check_node_port,
                affinity_seconds,
                cluster_endpoints: if internal_local {
                    local.clone()
                } else {
                    all.clone()
                },
                external_endpoints: if external_local { local } else { all.clone() },
                short_circuit_endpoints: if internal_local && external_local {
                    all
                } else {
                    Vec::new()
                },
            });
        }
    }
    ports
}

/// Valid port numbers; 0 and out-of-range values mean "none".
fn port_number(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

fn affinity_seconds(key: &ServiceKey, service: &ServiceInfo) -> Option<u32> {
    if !service.client_ip_affinity {
        return None;
    }
    match service.affinity_timeout {
        None => Some(DEFAULT_AFFINITY_SECONDS),
        Some(t) if (1..=MAX_AFFINITY_SECONDS).contains(&t) => Some(t as u32),
        Some(t) => {
            debug!(service = %key, timeout = t, "sessionAffinity timeout out of range (1..=86400); using the default");
            Some(DEFAULT_AFFINITY_SECONDS)
        }
    }
}

/// The cluster IP of one family, as kube-proxy's `GetClusterIPByFamily`: `clusterIPs[i]`
/// where `ipFamilies[i]` is the family; without `ipFamilies` (an old or hand-written
/// object), the first cluster IP of that family. (The store keeps `clusterIPs`, or
/// `[clusterIP]` when a hand-written manifest gives only that.)
fn cluster_ip_of_family(service: &ServiceInfo, family: Family) -> Option<IpAddr> {
    let ips = &service.cluster_ips;
    let ip = if service.ip_families.is_empty() {
        ips.iter()
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .find(|ip| Family::of(*ip) == family)
    } else {
        service
            .ip_families
            .iter()
            .position(|f| *f == Some(family))
            .and_then(|i| ips.get(i))
            .and_then(|ip| ip.parse::<IpAddr>().ok())
    };
    ip.filter(|ip| Family::of(*ip) == family)
}

/// The addresses of `family`, sorted and without duplicates (so that the order in the
/// spec does not make a difference to the back end).
fn ips_of_family(ips: &[IpAddr], family: Family) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = ips
        .iter()
        .copied()
        .filter(|ip| Family::of(*ip) == family)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `loadBalancerSourceRanges` of the family, trimmed (validation lets padding through),
/// host bits cleared so back ends get a proper prefix.
fn source_ranges(ranges: &[IpNetwork], family: Family) -> Vec<IpNetwork> {
    let mut out: Vec<IpNetwork> = ranges
        .iter()
        .filter(|net| Family::of(net.ip()) == family)
        .filter_map(|net| IpNetwork::new(net.network(), net.prefix()).ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What the slices say about one IP:port. The same IP:port may appear in several slices
/// (briefly, while the controller moves it): each condition is true if any copy says so,
/// which makes the result independent of the order in which slices are read. kube-proxy
/// likewise prefers the local copy.
#[derive(Debug, Clone, Copy, Default)]
struct Conditions {
    local: bool,
    ready: bool,
    serving: bool,
    terminating: bool,
}

fn conditions(endpoint: &SliceEndpoint, node_name: &str) -> Conditions {
    Conditions {
        // An empty node name never matches: a node with no name has no local endpoints.
        local: !node_name.is_empty() && endpoint.node_name.as_deref() == Some(node_name),
        ready: endpoint.ready,
        serving: endpoint.serving,
        terminating: endpoint.terminating,
    }
}

/// Every IP:port the slices give for one Service port in one family.
fn candidates(
    slices: &[&EndpointSliceInfo],
    port_name: &str,
    protocol: Protocol,
    family: Family,
    node_name: &str,
) -> BTreeMap<(IpAddr, u16), Conditions> {
    let mut out: BTreeMap<(IpAddr, u16), Conditions> = BTreeMap::new();
    for slice in slices {
        // FQDN slices and slices of the other family feed nothing here.
        if slice.family != Some(family) {
            continue;
        }
        for slice_port in &slice.ports {
            // A nil name is defaulted to "" by the API server, and so by the store.
            if *slice_port.name != *port_name || slice_port.protocol != Some(protocol) {
                continue;
            }
            let Some(target) = slice_port.port.and_then(port_number) else {
                continue;
            };
            for endpoint in &slice.endpoints {
                let ip = endpoint.ip;
                if Family::of(ip) != family {
                    continue;
                }
                let new = conditions(endpoint, node_name);
                let seen = out.entry((ip, target)).or_default();
                seen.local |= new.local;
                seen.ready |= new.ready;
                seen.serving |= new.serving;
                seen.terminating |= new.terminating;
            }
        }
    }
    out
}

/// Ready endpoints, or if there are none, serving and terminating ones (so that a
/// rolling update with no ready Pod left still reaches Pods finishing their work). With
/// `only_local`, the choice is made among local endpoints alone: a node with a local
/// terminating endpoint uses it even when other nodes have ready ones.
fn select(candidates: &BTreeMap<(IpAddr, u16), Conditions>, only_local: bool) -> Vec<Endpoint> {
    let pick = |wanted: fn(&Conditions) -> bool| -> Vec<Endpoint> {
        candidates
            .iter()
            .filter(|(_, c)| (!only_local || c.local) && wanted(c))
            .map(|(&(ip, port), c)| Endpoint {
                ip,
                port,
                is_local: c.local,
                ready: c.ready,
            })
            .collect()
    };
    let ready = pick(|c| c.ready);
    if !ready.is_empty() {
        return ready;
    }
    pick(|c| c.serving && c.terminating)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Event, Kind, Object};
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use serde_json::{json, Value};

    const NODE: &str = "node-a";

    fn settings() -> NodeSettings {
        NodeSettings {
            node_name: NODE.into(),
            ..Default::default()
        }
    }

    fn service(v: Value) -> Object {
        let mut v = v;
        v["apiVersion"] = json!("v1");
        v["kind"] = json!("Service");
        Object::from(serde_json::from_value::<Service>(v).expect("test Service"))
    }

    /// An EndpointSlice of Service `svc` in namespace "default".
    fn slice(name: &str, svc: &str, address_type: &str, ports: Value, endpoints: Value) -> Object {
        let v = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": svc}},
            "addressType": address_type, "ports": ports, "endpoints": endpoints,
        });
        Object::from(serde_json::from_value::<EndpointSlice>(v).expect("test EndpointSlice"))
    }

    fn ep(ip: &str, node: &str) -> Value {
        json!({"addresses": [ip], "nodeName": node})
    }

    fn ep_cond(ip: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Value {
        json!({"addresses": [ip], "nodeName": node,
               "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
    }

    fn plan_of(objects: Vec<Object>) -> ServiceTable {
        let mut store = Store::new();
        store.apply(Event::Snapshot {
            kinds: vec![Kind::Service, Kind::EndpointSlice],
            objects,
        });
        plan(&store, &settings())
    }

    fn id(name: &str, port_name: &str, protocol: Protocol, family: Family) -> ServicePortId {
        ServicePortId {
            namespace: "default".into(),
            name: name.into(),
            port_name: port_name.into(),
            protocol,
            family,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An endpoint chosen by the terminating fallback.
    fn not_ready(e: Endpoint) -> Endpoint {
        Endpoint { ready: false, ..e }
    }

    fn endpoint(addr: &str, port: u16, is_local: bool) -> Endpoint {
        Endpoint {
            ip: ip(addr),
            port,
            is_local,
            ready: true,
        }
    }

    /// A plain ClusterIP port; tests change what their shape changes.
    fn port(id: ServicePortId, cluster_ip: &str, port: u16, endpoints: Vec<Endpoint>) -> ServicePort {
        ServicePort {
            cluster_endpoints: endpoints.clone(),
            external_endpoints: endpoints,
            ..ServicePort::new(id, Some(ip(cluster_ip)), port)
        }
    }

    fn table(ports: Vec<ServicePort>) -> ServiceTable {
        ServiceTable {
            settings: settings(),
            ports: ports.into_iter().map(|p| (p.id.clone(), p)).collect(),
        }
    }

    fn web(spec: Value) -> Object {
        service(json!({"metadata": {"name": "web", "namespace": "default"}, "spec": spec}))
    }

    fn web_slice(port_name: &str, protocol: &str, port: u16, endpoints: Value) -> Object {
        slice(
            "web-1",
            "web",
            "IPv4",
            json!([{"name": port_name, "protocol": protocol, "port": port}]),
            endpoints,
        )
    }

    #[test]
    fn cluster_ip_tcp_udp_sctp() {
        for (proto_name, protocol) in [
            ("TCP", Protocol::Tcp),
            ("UDP", Protocol::Udp),
            ("SCTP", Protocol::Sctp),
        ] {
            let got = plan_of(vec![
                web(
                    json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": proto_name, "targetPort": 8080}]}),
                ),
                web_slice(
                    "",
                    proto_name,
                    8080,
                    json!([ep("10.244.1.5", "node-b"), ep("10.244.0.7", NODE)]),
                ),
            ]);
            let want = table(vec![port(
                id("web", "", protocol, Family::V4),
                "10.96.0.10",
                80,
                vec![
                    endpoint("10.244.0.7", 8080, true),
                    endpoint("10.244.1.5", 8080, false),
                ],
            )]);
            assert_eq!(got, want, "{proto_name}");
        }
    }

    #[test]
    fn protocol_defaults_to_tcp_on_both_sides() {
        let got = plan_of(vec![
            web(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]})),
            slice(
                "web-1",
                "web",
                "IPv4",
                json!([{"port": 8080}]),
                json!([ep("10.244.1.5", "node-b")]),
            ),
        ]);
        let want = table(vec![port(
            id("web", "", Protocol::Tcp, Family::V4),
            "10.96.0.10",
            80,
            vec![endpoint("10.244.1.5", 8080, false)],
        )]);
        assert_eq!(got, want);
    }

    #[test]
    fn multi_port_and_named_target_ports() {
        // "http" targets a named container port: the slice says which number it is.
        // The slice's "metrics" port has no Service port and is ignored.
        let got = plan_of(vec![
            web(json!({"clusterIP": "10.96.0.10", "ports": [
                {"name": "http", "port": 80, "targetPort": "web"},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
            ]})),
            slice(
                "web-1",
                "web",
                "IPv4",
                json!([
                    {"name": "http", "protocol": "TCP", "port": 8080},
                    {"name": "dns", "protocol": "UDP", "port": 5353},
                    {"name": "metrics", "protocol": "TCP", "port": 9090},
                ]),
                json!([ep("10.244.1.5", "node-b")]),
            ),
        ]);
        let want = table(vec![
            port(
                id("web", "http", Protocol::Tcp, Family::V4),
                "10.96.0.10",
                80,
                vec![endpoint("10.244.1.5", 8080, false)],
            ),
            port(
                id("web", "dns", Protocol::Udp, Family::V4),
                "10.96.0.10",
                53,
                vec![endpoint("10.244.1.5", 5353, false)],
            ),
        ]);
        assert_eq!(got, want);
    }

    #[test]
    fn a_slice_port_of_another_protocol_does_not_match() {
        let got = plan_of(vec![
            web(
                json!({"clusterIP": "10.96.0.10", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}),
            ),
            web_slice("dns", "TCP", 53, json!([ep("10.244.1.5", "node-b")])),
        ]);
        let want = table(vec![port(
            id("web", "dns", Protocol::Udp, Family::V4),
            "10.96.0.10",
            53,
            vec![],
        )]);
        assert_eq!(got, want);
    }

    #[test]
    fn terminating_fallback() {
        let spec = json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]});
        // One ready endpoint: only it is used, the serving+terminating one is not.
        let got = plan_of(vec![
            web(spec.clone()),
            web_slice(
                "",
                "TCP",
                80,
                json!([
                    ep_cond("10.244.1.1", "node-b", true, true, false),
                    ep_cond("10.244.1.2", "node-b", false, true, true),
                    ep_cond("10.244.1.3", "node-b", false, false, false),
                ]),
            ),
        ]);
        let want_ready = vec![endpoint("10.244.1.1", 80, false)];
        assert_eq!(got.ports.values().next().unwrap().cluster_endpoints, want_ready);

        // None ready: the serving and terminating ones (not the not-serving terminating
        // one, nor the not-ready not-terminating one).
        let got = plan_of(vec![
            web(spec),
            web_slice(
                "",
                "TCP",
                80,
                json!([
                    ep_cond("10.244.1.2", "node-b", false, true, true),
                    ep_cond("10.244.1.4", "node-b", false, false, true),
                    ep_cond("10.244.1.3", "node-b", false, true, false),
                    ep_cond("10.244.1.5", NODE, false, true, true),
                ]),
            ),
        ]);
        let want = table(vec![port(
            id("web", "", Protocol::Tcp, Family::V4),
            "10.96.0.10",
            80,
            vec![
                not_ready(endpoint("10.244.1.2", 80, false)),
                not_ready(endpoint("10.244.1.5", 80, true)),
            ],
        )]);
        assert_eq!(got, want);
    }

    #[test]
    fn no_endpoints() {
        let got = plan_of(vec![web(
            json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
        )]);
        let want = table(vec![port(
            id("web", "", Protocol::Tcp, Family::V4),
            "10.96.0.10",
            80,
            vec![],
        )]);
        assert_eq!(got, want);
    }

    #[test]
    fn headless_external_name_and_foreign_proxy_are_skipped() {
        let got = plan_of(vec![
            service(
                json!({"metadata": {"name": "headless"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
            ),
            service(json!({"metadata": {"name": "noip"}, "spec": {"ports": [{"port": 80}]}})),
            service(
                json!({"metadata": {"name": "ext"}, "spec": {"type": "ExternalName", "externalName": "example.com"}}),
            ),
            service(
                json!({"metadata": {"name": "other", "labels": {"service.kubernetes.io/service-proxy-name": "x"}},
                           "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}}),
            ),
            slice(
                "headless-1",
                "headless",
                "IPv4",
                json!([{"name": "", "port": 80}]),
                json!([ep("10.244.1.5", "b")]),
            ),
        ]);
        assert_eq!(got, table(vec![]));
    }

    #[test]
    fn node_port() {
        let got = plan_of(vec![
            web(
                json!({"type": "NodePort", "clusterIP": "10.96.0.10", "ports": [{"port": 80, "nodePort": 30080}]}),
            ),
            web_slice("", "TCP", 8080, json!([ep("10.244.1.5", "node-b")])),
        ]);
        let mut want = port(
            id("web", "", Protocol::Tcp, Family::V4),
            "10.96.0.10",
            80,
            vec![endpoint("10.244.1.5", 8080, false)],
        );
        want.node_port = Some(30080);
        assert_eq!(got, table(vec![want]));
    }

    #[test]
    fn a_node_port_on_a_cluster_ip_service_is_ignored() {
        let got = plan_of(vec![web(
            json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80, "nodePort": 30080}]}),
        )]);
        assert_eq!(got.ports.values().next().unwrap().node_port, None);
    }

    #[test]
    fn external_traffic_policy_local() {
        let got = plan_of(vec![
            web(
                json!({"type": "NodePort", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
                       "ports": [{"port": 80, "nodePort": 30080}]}),
            ),
            web_slice(
                "",
                "TCP",
                8080,
                json!([ep("10.244.1.5", "node-b"), ep("10.244.0.7", NODE)]),
            ),
        ]);
        let mut want = port(
            id("web", "", Protocol::Tcp, Family::V4),
            "10.96.0.10",
            80,
            vec![
                endpoint("10.244.0.7", 8080, true),
                endpoint("10.244.1.5", 8080, false),
            ],
        );
        want.node_port = Some(30080);
        want.external_local = true;
        want.external_endpoints = vec![endpoint("10.244.0.7", 8080, true)];
        assert_eq!(got, table(vec![want]));
    }

    #[test]
    fn external_traffic_policy_local_falls_back_to_local_terminating() {
        // Ready endpoints elsewhere, only a terminating one here: external traffic uses
        // the local terminating one, cluster traffic the ready remote one.
        let got = plan_of(vec![
            web(
                json!({"type": "NodePort", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
                       "ports": [{"port": 80, "nodePort": 30080}]}),
            ),
            web_slice(
                "",
                "TCP",
                8080,
                json!([
                    ep("10.244.1.5", "node-b"),
                    ep_cond("10.244.0.7", NODE, false, true, true)
                ]),
            ),
        ]);
        let p = got.ports.values().next().unwrap();
        assert_eq!(p.cluster_endpoints, vec![endpoint("10.244.1.5", 8080, false)]);
        assert_eq!(
            p.external_endpoints,
            vec![not_ready(endpoint("10.244.0.7", 8080, true))]
        );
    }

    #[test]
    fn external_traffic_policy_local_on_a_plain_cluster_ip_is_ignored() {
        let got = plan_of(vec![
            web(
                json!({"clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
            ),
            web_slice("", "TCP", 80, json!([ep("10.244.1.5", "node-b")])),
        ]);
        let p = got.ports.values().next().unwrap();
        assert!(!p.external_local);
        assert_eq!(p.external_endpoints, vec![endpoint("10.244.1.5", 80, false)]);
    }

    #[test]
    fn internal_traffic_policy_local() {
        let got = plan_of(vec![
            web(
                json!({"clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
            ),
            web_slice(
                "",
                "TCP",
                80,
                json!([ep("10.244.1.5", "node-b"), ep("10.244.0.7", NODE)]),
            ),
        ]);
        let mut want = port(
            id("web", "", Protocol::Tcp, Family::V4),
            "10.96.0.10",
            80,
            vec![
                endpoint("10.244.0.7", 80, true),
                endpoint("10.244.1.5", 80, false),
            ],
        );
        want.internal_local = true;
        want.cluster_endpoints = vec![endpoint("10.244.0.7", 80, true)];
        assert_eq!(got, table(vec![want]));
    }

    #[test]
    fn both_traffic_policies_local_keep_every_endpoint_for_the_short_circuit() {
        let got = plan_of(vec![
            web(json!({
                "type": "NodePort", "clusterIP": "10.96.0.10",
                "internalTrafficPolicy": "Local", "externalTrafficPolicy": "Local",
                "ports": [{"port": 80, "nodePort": 30080}]
            })),
            web_slice(
                "",
                "TCP",
                80,
                json!([ep("10.244.1.5", "node-b"), ep("10.244.0.7", NODE)]),
            ),
        ]);
        let all = vec![
            endpoint("10.244.0.7", 80, true),
            endpoint("10.244.1.5", 80, false),
        ];
        let mut want = port(
            id("web", "", Protocol::Tcp, Family::V4),
            "10.96.0.10",
            80,
            all.clone(),
        );
        want.node_port = Some(30080);
        want.internal_local = true;
        want.external_local = true;
        want.cluster_endpoints = vec![endpoint("10.244.0.7", 80, true)];
        want.external_endpoints = want.cluster_endpoints.clone();
        want.short_circuit_endpoints = all;
        assert_eq!(got, table(vec![want]));
    }

    #[test]
    fn load_balancer() {
        let got = plan_of(vec![
            service(json!({
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {
                    "type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
                    "healthCheckNodePort": 32000,
                    "loadBalancerSourceRanges": [" 192.0.2.0/24", "198.51.100.7/16", "2001:db8::/32"],
                    "ports": [{"port": 80, "nodePort": 30080}],
                },
                "status": {"loadBalancer": {"ingress": [
                    {"ip": "203.0.113.9"},
                    {"ip": "203.0.113.5", "ipMode": "VIP"},
                    {"ip": "203.0.113.6", "ipMode": "Proxy"},
                    {"hostname": "lb.example.com"},
                    {"ip": "2001:db8::9"},
                ]}},
            })),
            web_slice(
                "",
                "TCP",
                8080,
                json!([ep("10.244.0.7", NODE), ep("10.244.1.5", "node-b")]),
            ),
        ]);
        let mut want = port(
            id("web", "", Protocol::Tcp, Family::V4),
            "10.96.0.10",
            80,
            vec![
                endpoint("10.244.0.7", 8080, true),
                endpoint("10.244.1.5", 8080, false),
            ],
        );
        want.node_port = Some(30080);
        want.load_balancer_ips = vec![ip("203.0.113.5"), ip("203.0.113.9")];
        want.source_ranges = vec!["192.0.2.0/24".parse().unwrap(), "198.51.0.0/16".parse().unwrap()];
        want.external_local = true;
        want.health_check_node_port = Some(32000);
        want.external_endpoints = vec![endpoint("10.244.0.7", 8080, true)];
        assert_eq!(got, table(vec![want]));
    }

    #[test]
    fn health_check_node_port_only_for_local_load_balancers() {
        let got = plan_of(vec![web(json!({
            "type": "LoadBalancer", "clusterIP": "10.96.0.10", "healthCheckNodePort": 32000,
            "ports": [{"port": 80, "nodePort": 30080}],
        }))]);
        assert_eq!(got.ports.values().next().unwrap().health_check_node_port, None);
    }

    #[test]
    fn external_ips() {
        let got = plan_of(vec![
            web(
                json!({"clusterIP": "10.96.0.10", "externalIPs": ["192.0.2.20", "2001:db8::20", "192.0.2.10"],
                       "externalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
            ),
            web_slice("", "TCP", 80, json!([ep("10.244.1.5", "node-b")])),
        ]);
        // A ClusterIP Service with external IPs is reachable from outside: eTP Local holds.
        let mut want = port(
            id("web", "", Protocol::Tcp, Family::V4),
            "10.96.0.10",
            80,
            vec![endpoint("10.244.1.5", 80, false)],
        );
        want.external_ips = vec![ip("192.0.2.10"), ip("192.0.2.20")];
        want.external_local = true;
        want.external_endpoints = vec![];
        assert_eq!(got, table(vec![want]));
    }

    #[test]
    fn client_ip_affinity() {
        let default = plan_of(vec![web(
            json!({"clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP", "ports": [{"port": 80}]}),
        )]);
        let mut want = port(id("web", "", Protocol::Tcp, Family::V4), "10.96.0.10", 80, vec![]);
        want.affinity_seconds = Some(10800);
        assert_eq!(default, table(vec![want.clone()]));

        let custom = plan_of(vec![web(
            json!({"clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}, "ports": [{"port": 80}]}),
        )]);
        want.affinity_seconds = Some(60);
        assert_eq!(custom, table(vec![want]));

        let none = plan_of(vec![web(
            json!({"clusterIP": "10.96.0.10", "sessionAffinity": "None",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}, "ports": [{"port": 80}]}),
        )]);
        assert_eq!(none.ports.values().next().unwrap().affinity_seconds, None);
    }

    #[test]
    fn dual_stack() {
        let got = plan_of(vec![
            web(json!({
                "type": "LoadBalancer",
                "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                "externalIPs": ["192.0.2.10", "2001:db8::10"],
                "loadBalancerSourceRanges": ["192.0.2.0/24", "2001:db8::/64"],
                "ports": [{"port": 80, "nodePort": 30080}],
            })),
            slice(
                "web-v4",
                "web",
                "IPv4",
                json!([{"name": "", "port": 8080}]),
                json!([ep("10.244.1.5", "b")]),
            ),
            slice(
                "web-v6",
                "web",
                "IPv6",
                json!([{"name": "", "port": 8080}]),
                json!([ep("fd00:244::5", "b")]),
            ),
        ]);
        let mut v4 = port(
            id("web", "", Protocol::Tcp, Family::V4),
            "10.96.0.10",
            80,
            vec![endpoint("10.244.1.5", 8080, false)],
        );
        v4.node_port = Some(30080);
        v4.external_ips = vec![ip("192.0.2.10")];
        v4.source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
        let mut v6 = port(
            id("web", "", Protocol::Tcp, Family::V6),
            "fd00:96::10",
            80,
            vec![endpoint("fd00:244::5", 8080, false)],
        );
        v6.node_port = Some(30080);
        v6.external_ips = vec![ip("2001:db8::10")];
        v6.source_ranges = vec!["2001:db8::/64".parse().unwrap()];
        assert_eq!(got, table(vec![v4, v6]));
    }

    #[test]
    fn hand_written_cluster_ips() {
        // ipFamilies without clusterIPs, and clusterIPs without clusterIP.
        for spec in [
            json!({"clusterIP": "10.96.0.10", "ipFamilies": ["IPv4"], "ports": [{"port": 80}]}),
            json!({"clusterIPs": ["10.96.0.10"], "ports": [{"port": 80}]}),
        ] {
            let got = plan_of(vec![web(spec.clone())]);
            let want = table(vec![port(
                id("web", "", Protocol::Tcp, Family::V4),
                "10.96.0.10",
                80,
                vec![],
            )]);
            assert_eq!(got, want, "{spec}");
        }
    }

    #[test]
    fn ipv6_primary_cluster_ip() {
        let got = plan_of(vec![web(
            json!({"clusterIP": "fd00:96::10", "clusterIPs": ["fd00:96::10", "10.96.0.10"],
            "ipFamilies": ["IPv6", "IPv4"], "ports": [{"port": 80}]}),
        )]);
        let ids: Vec<_> = got
            .ports
            .values()
            .map(|p| (p.id.family, p.cluster_ip.unwrap()))
            .collect();
        assert_eq!(
            ids,
            vec![(Family::V4, ip("10.96.0.10")), (Family::V6, ip("fd00:96::10"))]
        );
    }

    #[test]
    fn slices_of_the_wrong_family_and_fqdn_are_ignored() {
        let got = plan_of(vec![
            web(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]})),
            slice(
                "web-v6",
                "web",
                "IPv6",
                json!([{"name": "", "port": 80}]),
                json!([ep("fd00:244::5", "b")]),
            ),
            slice(
                "web-fqdn",
                "web",
                "FQDN",
                json!([{"name": "", "port": 80}]),
                json!([ep("example.com", "b")]),
            ),
            // An IPv4 slice carrying a stray IPv6 address: that endpoint is ignored.
            slice(
                "web-v4",
                "web",
                "IPv4",
                json!([{"name": "", "port": 80}]),
                json!([ep("fd00:244::6", "b"), ep("10.244.1.5", "b")]),
            ),
        ]);
        let want = table(vec![port(
            id("web", "", Protocol::Tcp, Family::V4),
            "10.96.0.10",
            80,
            vec![endpoint("10.244.1.5", 80, false)],
        )]);
        assert_eq!(got, want);
    }

    #[test]
    fn the_same_endpoint_in_two_slices_counts_once() {
        let got = plan_of(vec![
            web(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]})),
            slice(
                "web-1",
                "web",
                "IPv4",
                json!([{"name": "", "port": 80}]),
                json!([
                    ep("10.244.1.5", "node-b"),
                    ep_cond("10.244.1.6", "node-b", false, false, false)
                ]),
            ),
            slice(
                "web-2",
                "web",
                "IPv4",
                json!([{"name": "", "port": 80}]),
                json!([
                    ep("10.244.1.5", "node-b"),
                    ep("10.244.1.6", "node-b"),
                    ep("10.244.1.4", "node-b")
                ]),
            ),
        ]);
        let want = table(vec![port(
            id("web", "", Protocol::Tcp, Family::V4),
            "10.96.0.10",
            80,
            vec![
                endpoint("10.244.1.4", 80, false),
                endpoint("10.244.1.5", 80, false),
                endpoint("10.244.1.6", 80, false),
            ],
        )]);
        assert_eq!(got, want);
    }

    #[test]
    fn slices_of_other_services_and_namespaces_do_not_leak() {
        let got = plan_of(vec![
            web(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]})),
            slice(
                "db-1",
                "db",
                "IPv4",
                json!([{"name": "", "port": 80}]),
                json!([ep("10.244.1.9", "b")]),
            ),
            {
                let v = json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "web-x", "namespace": "other", "labels": {"kubernetes.io/service-name": "web"}},
                    "addressType": "IPv4", "ports": [{"name": "", "port": 80}], "endpoints": [ep("10.244.1.8", "b")],
                });
                Object::from(serde_json::from_value::<EndpointSlice>(v).unwrap())
            },
        ]);
        assert_eq!(got.ports.values().next().unwrap().cluster_endpoints, vec![]);
    }

    /// A small deterministic generator (xorshift64*): the property test needs variety, not
    /// cryptographic quality, and must fail the same way every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len() as u64) as usize]
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    const NAMES: [&str; 4] = ["a", "b", "c", "d"];
    const NAMESPACES: [&str; 2] = ["default", "kube-system"];

    fn random_service(rng: &mut Rng) -> Object {
        let ns = *rng.pick(&NAMESPACES);
        let name = *rng.pick(&NAMES);
        let ty = *rng.pick(&["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]);
        let dual = rng.chance(30);
        let mut spec = json!({
            "type": ty,
            "clusterIP": if rng.chance(10) { "None".to_string() } else { format!("10.96.0.{}", rng.below(50)) },
            "ports": [{"name": "http", "port": 80, "nodePort": 30000 + rng.below(100)},
                      {"name": "dns", "port": 53, "protocol": *rng.pick(&["UDP", "TCP"])}],
        });
        if dual {
            spec["clusterIPs"] = json!([spec["clusterIP"].clone(), "fd00::10"]);
            spec["ipFamilies"] = json!(["IPv4", "IPv6"]);
        }
        if rng.chance(50) {
            spec["externalTrafficPolicy"] = json!("Local");
        }
        if rng.chance(30) {
            spec["internalTrafficPolicy"] = json!("Local");
        }
        if rng.chance(30) {
            spec["sessionAffinity"] = json!("ClientIP");
        }
        service(json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}))
    }

    fn random_slice(rng: &mut Rng) -> Object {
        let ns = *rng.pick(&NAMESPACES);
        let owner = *rng.pick(&NAMES);
        let name = format!("slice-{}", rng.below(6));
        let v6 = rng.chance(25);
        let endpoints: Vec<Value> = (0..rng.below(4))
            .map(|_| {
                let addr = if v6 {
                    format!("fd00:244::{}", rng.below(8))
                } else {
                    format!("10.244.0.{}", rng.below(8))
                };
                let node = *rng.pick(&[NODE, "node-b"]);
                ep_cond(&addr, node, rng.chance(60), rng.chance(70), rng.chance(30))
            })
            .collect();
        let port_name = *rng.pick(&["http", "dns", "other"]);
        let protocol = *rng.pick(&["TCP", "UDP"]);
        let mut labels = json!({});
        if !rng.chance(10) {
            labels["kubernetes.io/service-name"] = json!(owner);
        }
        let v = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "addressType": if v6 { "IPv6" } else { "IPv4" },
            "ports": [{"name": port_name, "protocol": protocol, "port": 8000 + rng.below(3)}],
            "endpoints": endpoints,
        });
        Object::from(serde_json::from_value::<EndpointSlice>(v).unwrap())
    }

    #[test]
    fn incremental_plan_equals_full_plan() {
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut store = Store::new();
            let mut table = ServiceTable {
                settings: settings(),
                ports: BTreeMap::new(),
            };
            for step in 0..300 {
                // A burst of one to three events, then one incremental re-plan.
                for _ in 0..=rng.below(3) {
                    let event = match rng.below(10) {
                        0..=2 => Event::Upsert(random_service(&mut rng)),
                        3..=5 => Event::Upsert(random_slice(&mut rng)),
                        6 => Event::Delete(random_service(&mut rng)),
                        7 => Event::Delete(random_slice(&mut rng)),
                        8 => Event::Snapshot {
                            kinds: vec![Kind::Service],
                            objects: (0..rng.below(5)).map(|_| random_service(&mut rng)).collect(),
                        },
                        _ => Event::Snapshot {
                            kinds: vec![Kind::EndpointSlice],
                            objects: (0..rng.below(8)).map(|_| random_slice(&mut rng)).collect(),
                        },
                    };
                    store.apply(event);
                }
                let dirty = store.take_dirty();
                plan_services(&mut table, &store, &dirty);
                assert_eq!(table, plan(&store, &settings()), "seed {seed}, step {step}");
            }
        }
    }

    /// One random burst of one to three store events (the same mix as above).
    fn random_burst(rng: &mut Rng, store: &mut Store) {
        for _ in 0..=rng.below(3) {
            let event = match rng.below(10) {
                0..=2 => Event::Upsert(random_service(rng)),
                3..=5 => Event::Upsert(random_slice(rng)),
                6 => Event::Delete(random_service(rng)),
                7 => Event::Delete(random_slice(rng)),
                8 => Event::Snapshot {
                    kinds: vec![Kind::Service],
                    objects: (0..rng.below(5)).map(|_| random_service(rng)).collect(),
                },
                _ => Event::Snapshot {
                    kinds: vec![Kind::EndpointSlice],
                    objects: (0..rng.below(8)).map(|_| random_slice(rng)).collect(),
                },
            };
            store.apply(event);
        }
    }

    /// The ports whose value differs between two tables, worked out here on its own (not
    /// with [`changes::diff_ports`]): ids in either table, compared one by one.
    fn differing_ports(a: &ServiceTable, b: &ServiceTable) -> BTreeSet<ServicePortId> {
        a.ports
            .keys()
            .chain(b.ports.keys())
            .filter(|id| a.ports.get(*id) != b.ports.get(*id))
            .cloned()
            .collect()
    }

    /// The change tracker as the sync loop drives it, over random plans: syncs that fail
    /// (their changes given back) and periodic full re-plans mixed in. For every pair of
    /// plans a back end can be handed (the last one it applied, the current one), every
    /// port that differs between them is among the changes; and each re-plan names exactly
    /// the ports it changed.
    #[test]
    fn every_port_that_differs_from_the_last_synced_plan_is_a_change() {
        use crate::changes::{ChangeTracker, Changes};
        let mut differing_pairs = 0;
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0xd1b5_4a32_d192_ed03) | 1);
            let mut store = Store::new();
            let mut table = ServiceTable {
                settings: settings(),
                ports: BTreeMap::new(),
            };
            let mut tracker = ChangeTracker::new();
            // What the back end last applied: nothing yet.
            let mut synced = table.clone();
            // No sync has succeeded yet: the first changes are "all".
            let mut last_failed = true;
            for step in 0..300 {
                random_burst(&mut rng, &mut store);
                let dirty = store.take_dirty();
                let full = rng.chance(5);
                if full {
                    table = plan(&store, &settings());
                    tracker.all_services();
                } else {
                    let before = table.clone();
                    let changed = plan_services(&mut table, &store, &dirty);
                    assert_eq!(
                        changed,
                        differing_ports(&before, &table),
                        "seed {seed}, step {step}: the re-plan names exactly what it changed"
                    );
                    tracker.service_ports(changed);
                }
                assert_eq!(table, plan(&store, &settings()), "seed {seed}, step {step}");

                let changes = tracker.take();
                let differing = differing_ports(&synced, &table);
                differing_pairs += usize::from(!differing.is_empty());
                for id in &differing {
                    assert!(
                        changes.services.contains(id),
                        "seed {seed}, step {step}: {id} differs from the last synced plan but is not among the changes {:?}",
                        changes.services
                    );
                }
                // Right after a successful sync, an incremental re-plan's changes are exact.
                // (After a failure they may also name a port that changed and came back:
                // that costs the back end one comparison.)
                if !last_failed && !full {
                    assert_eq!(
                        changes,
                        Changes::service_ports(differing),
                        "seed {seed}, step {step}"
                    );
                }
                last_failed = rng.chance(25);
                if last_failed {
                    tracker.give_back(changes);
                } else {
                    synced = table.clone();
                }
            }
        }
        // The generator must make the property bite: plans that differ, often.
        assert!(differing_pairs > 1000, "only {differing_pairs} differing pairs");
    }

    #[test]
    fn one_change_among_ten_thousand_plans_one_service() {
        let mut objects = Vec::new();
        for i in 0..10_000u32 {
            let name = format!("svc-{i}");
            objects.push(service(
                json!({"metadata": {"name": name, "namespace": "default"},
                "spec": {"clusterIP": format!("10.96.{}.{}", i / 250, i % 250), "ports": [{"port": 80}]}}),
            ));
            let eps: Vec<Value> = (0..10)
                .map(|j| ep(&format!("10.{}.{}.{j}", 100 + i / 250, i % 250), "b"))
                .collect();
            objects.push(slice(
                &format!("{name}-1"),
                &name,
                "IPv4",
                json!([{"name": "", "port": 8080}]),
                json!(eps),
            ));
        }
        let mut store = Store::new();
        store.apply(Event::Snapshot {
            kinds: vec![Kind::Service, Kind::EndpointSlice],
            objects,
        });
        let mut table = plan(&store, &settings());
        store.take_dirty();
        assert_eq!(table.ports.len(), 10_000);

        store.apply(Event::Upsert(slice(
            "svc-5000-1",
            "svc-5000",
            "IPv4",
            json!([{"name": "", "port": 8080}]),
            json!([ep("10.250.0.1", "b")]),
        )));
        // How long this takes belongs to the proxy bench ("one endpoint changed at 10k");
        // here: only the one dirty Service is planned, and only its port changes.
        let dirty = store.take_dirty();
        let changed = plan_services(&mut table, &store, &dirty);
        assert_eq!(dirty.len(), 1);
        let id = ServicePortId {
            name: "svc-5000".into(),
            ..id("", "", Protocol::Tcp, Family::V4)
        };
        assert_eq!(
            table.ports[&id].cluster_endpoints,
            vec![endpoint("10.250.0.1", 8080, false)]
        );
        assert_eq!(changed.into_iter().collect::<Vec<_>>(), vec![id]);
    }
}
