//! Rendering: a Service port becomes chains, rules, affinity sets and map elements; the
//! node settings become the base of the table (see "Layout" in the module docs of
//! [`super`]). Pure: the same port, context and slot always give the same objects, which is
//! what lets the back end keep ports instead of their objects.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;

use super::elements::{Element, Key, SetDecl, SetKind, Value};
use super::names::{affinity_set_name, endpoint_map, port_base_name};
use super::rules::{fam, Rule};
use super::slots::{Slot, ENDPOINT_MAPS};
use crate::plan::{Endpoint, Family, NodeSettings, Protocol, ServicePort};

/// Base chains: name, type, hook, priority.
pub(super) const BASE_CHAINS: [(&str, &str, &str, i32); 7] = [
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];
/// Regular chains of the base layout.
pub(super) const HELPER_CHAINS: [&str; 5] = [
    "services",
    "endpoints-check",
    "firewall-check",
    "reject-chain",
    "masquerading",
];

pub(super) const FAMILIES: [Family; 2] = [Family::V4, Family::V6];
const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// The sets and maps of the base layout of one family (the endpoint maps included).
pub(super) fn base_sets(f: Family) -> Vec<SetDecl> {
    let fs = fam(f);
    let decl = |name: String, kind: SetKind| SetDecl { name, kind };
    let mut sets = vec![
        decl(format!("service-ips-{fs}"), SetKind::ServiceMap(f)),
        decl(format!("service-nodeports-{fs}"), SetKind::NodePortMap),
        decl(format!("no-endpoint-services-{fs}"), SetKind::ServiceMap(f)),
        decl(format!("no-endpoint-nodeports-{fs}"), SetKind::NodePortMap),
        decl(format!("firewall-ips-{fs}"), SetKind::ServiceMap(f)),
        decl(format!("cluster-cidrs-{fs}"), SetKind::Cidrs(f)),
        decl(format!("nodeport-ips-{fs}"), SetKind::Cidrs(f)),
        decl(format!("hairpin-{fs}"), SetKind::Hairpin(f)),
    ];
    for proto in PROTOCOLS {
        for shard in 0..ENDPOINT_MAPS {
            sets.push(decl(endpoint_map(f, proto, shard), SetKind::Endpoints(f, proto)));
        }
    }
    sets
}

/// What the node settings mean for the rules of each port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RenderCtx {
    /// The family has at least one cluster CIDR (then traffic from elsewhere to a
    /// ClusterIP is masqueraded, and Local external traffic from inside short-circuits).
    cidrs_v4: bool,
    cidrs_v6: bool,
}

impl RenderCtx {
    pub(super) fn of(settings: &NodeSettings) -> RenderCtx {
        RenderCtx {
            cidrs_v4: settings.cluster_cidrs.iter().any(|c| c.is_ipv4()),
            cidrs_v6: settings.cluster_cidrs.iter().any(|c| c.is_ipv6()),
        }
    }

    pub(super) fn has_cidrs(&self, f: Family) -> bool {
        match f {
            Family::V4 => self.cidrs_v4,
            Family::V6 => self.cidrs_v6,
        }
    }
}

/// Everything one Service port puts in the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct PortObjects {
    /// Chain name -> its rules, in order.
    pub(super) chains: BTreeMap<String, Vec<Rule>>,
    /// Affinity sets by name.
    pub(super) sets: BTreeMap<String, SetDecl>,
    pub(super) elements: BTreeSet<Element>,
    /// Endpoint addresses (for the hairpin set).
    pub(super) endpoint_ips: BTreeSet<IpAddr>,
}

impl PortObjects {
    pub(super) fn rules(&self) -> usize {
        self.chains.values().map(Vec::len).sum()
    }
}

/// Renders one Service port: its chains, affinity sets and map elements. `slot` holds at
/// least [`slots_needed`] keys.
pub(super) fn render_port(p: &ServicePort, ctx: RenderCtx, slot: Slot) -> PortObjects {
    let id = &p.id;
    let f = id.family;
    let (fs, proto) = (fam(f), id.protocol);
    let base = port_base_name(id);
    let service = format!("service-{base}");
    let external = format!("external-{base}");
    let ext_endpoints = format!("ext-endpoints-{base}");
    let all_endpoints = format!("all-endpoints-{base}");
    let firewall = format!("firewall-{base}");
    let mut o = PortObjects::default();

    let has_cluster = !p.cluster_endpoints.is_empty();
    let has_external = !p.external_endpoints.is_empty();
    let has_short_circuit = !p.short_circuit_endpoints.is_empty();
    let has_endpoints = has_cluster || has_external || has_short_circuit;
    // kube-proxy: no endpoints anywhere is rejected; endpoints that a Local policy keeps
    // out of reach are dropped.
    let none_verdict = if has_endpoints {
        Value::Drop
    } else {
        Value::Goto("reject-chain".into())
    };
    let mut element = |map: String, key: Key, value: Value| {
        o.elements.insert(Element { map, key, value });
    };
    let service_key = |addr: IpAddr| Key::Service {
        addr,
        proto,
        port: p.port,
    };

    // Destinations.
    if let Some(cip) = p.cluster_ip {
        if has_cluster {
            element(
                format!("service-ips-{fs}"),
                service_key(cip),
                Value::Goto(service.clone()),
            );
        } else {
            element(
                format!("no-endpoint-services-{fs}"),
                service_key(cip),
                none_verdict.clone(),
            );
        }
    }
    let external_ips: BTreeSet<IpAddr> = p
        .external_ips
        .iter()
        .chain(&p.load_balancer_ips)
        .copied()
        .filter(|a| Family::of(*a) == f)
        .collect();
    let uses_external_chain = has_endpoints && (p.node_port.is_some() || !external_ips.is_empty());
    for addr in &external_ips {
        if Some(*addr) == p.cluster_ip {
            continue;
        }
        if has_endpoints {
            element(
                format!("service-ips-{fs}"),
                service_key(*addr),
                Value::Goto(external.clone()),
            );
        }
        if !has_external {
            element(
                format!("no-endpoint-services-{fs}"),
                service_key(*addr),
                none_verdict.clone(),
            );
        }
    }
    if let Some(np) = p.node_port {
        let key = Key::NodePort { proto, port: np };
        if has_endpoints {
            element(
                format!("service-nodeports-{fs}"),
                key.clone(),
                Value::Goto(external.clone()),
            );
        }
        if !has_external {
            element(format!("no-endpoint-nodeports-{fs}"), key, none_verdict.clone());
        }
    }
    let ranges: Vec<IpNetwork> = p
        .source_ranges
        .iter()
        .copied()
        .filter(|r| Family::of(r.ip()) == f)
        .collect();
    let lb_ips: BTreeSet<IpAddr> = p
        .load_balancer_ips
        .iter()
        .copied()
        .filter(|a| Family::of(*a) == f)
        .collect();
    if !ranges.is_empty() && !lb_ips.is_empty() {
        let mut rules: Vec<Rule> = ranges.iter().map(|r| Rule::ReturnIfFrom(*r)).collect();
        rules.push(Rule::Drop);
        o.chains.insert(firewall.clone(), rules);
        for addr in &lb_ips {
            element(
                format!("firewall-ips-{fs}"),
                service_key(*addr),
                Value::Goto(firewall.clone()),
            );
        }
    }

    // Chains.
    let affinity = p.affinity_seconds.map(|t| t.max(1));
    let emap = endpoint_map(f, proto, slot.shard);
    // `first`: the index in the port's slot of the first of `eps`.
    let mut choice = |eps: &[Endpoint], first: u32| -> Vec<Rule> {
        let Some(timeout) = affinity else {
            let offset = slot.offset + first;
            for (i, ep) in eps.iter().enumerate() {
                o.elements.insert(Element {
                    map: emap.clone(),
                    key: Key::Index(offset + i as u32),
                    value: Value::Endpoint(ep.ip, ep.port),
                });
            }
            return vec![Rule::DnatChoice {
                family: f,
                proto,
                modulus: eps.len() as u32,
                offset,
                map: emap.clone(),
            }];
        };
        let mut rules = Vec::new();
        for ep in eps {
            let set = affinity_set_name(id, ep, timeout);
            o.sets.insert(
                set.clone(),
                SetDecl {
                    name: set.clone(),
                    kind: SetKind::Affinity(f, timeout),
                },
            );
            rules.push(Rule::DnatSticky {
                proto,
                set,
                to: SocketAddr::new(ep.ip, ep.port),
            });
        }
        let n = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            rules.push(Rule::DnatRecorded {
                proto,
                set: affinity_set_name(id, ep, timeout),
                modulus: (i + 1 < n).then_some((n - i) as u32),
                to: SocketAddr::new(ep.ip, ep.port),
            });
        }
        rules
    };
    if has_cluster {
        let mut rules = Vec::new();
        if ctx.has_cidrs(f) {
            rules.push(Rule::MarkUnlessFromCluster { family: f });
        }
        rules.extend(choice(&p.cluster_endpoints, 0));
        o.chains.insert(service.clone(), rules);
    }
    // External traffic may share the service chain only when its masquerade rule (for
    // sources outside the cluster CIDRs) is right for it too: with externalTrafficPolicy
    // Local the client's address must be kept, so it gets a choice chain of its own.
    let shares_service_chain =
        p.external_endpoints == p.cluster_endpoints && (!p.external_local || !ctx.has_cidrs(f));
    let external_target = if shares_service_chain {
        service.clone()
    } else {
        ext_endpoints.clone()
    };
    if has_external && external_target == ext_endpoints {
        let rules = choice(&p.external_endpoints, p.cluster_endpoints.len() as u32);
        o.chains.insert(ext_endpoints.clone(), rules);
    }
    // Traffic from Pods and from the node to an externalTrafficPolicy Local address
    // short-circuits to the Cluster-policy endpoints (kube-proxy's): the service chain's,
    // unless internalTrafficPolicy Local narrowed those; then a choice chain of its own.
    let short_circuit_target = if has_short_circuit {
        let rules = choice(
            &p.short_circuit_endpoints,
            (p.cluster_endpoints.len() + p.external_endpoints.len()) as u32,
        );
        o.chains.insert(all_endpoints.clone(), rules);
        Some(all_endpoints)
    } else if has_cluster {
        Some(service.clone())
    } else {
        None
    };
    if uses_external_chain {
        let mut rules = Vec::new();
        if !p.external_local {
            rules.push(Rule::Mark);
        } else if let Some(target) = short_circuit_target {
            if ctx.has_cidrs(f) {
                rules.push(Rule::GotoIfFromCluster {
                    family: f,
                    chain: target.clone(),
                });
            }
            rules.push(Rule::MarkIfFromNode);
            rules.push(Rule::GotoIfFromNode(target));
        }
        if has_external {
            rules.push(Rule::Goto(external_target));
        }
        o.chains.insert(external.clone(), rules);
    }
    o.endpoint_ips = p
        .cluster_endpoints
        .iter()
        .chain(&p.external_endpoints)
        .chain(&p.short_circuit_endpoints)
        .map(|e| e.ip)
        .collect();
    o
}

/// The base of the table for these settings: chains with their rules (regular and base),
/// and the elements of the cluster-cidrs and nodeport-ips sets.
pub(super) fn render_base(settings: &NodeSettings) -> (Vec<(String, Vec<Rule>)>, Vec<Element>) {
    let restricted = !settings.nodeport_addresses.is_empty();
    let mut chains: Vec<(String, Vec<Rule>)> = Vec::new();
    let lookups = |maps: (&str, &str)| -> Vec<Rule> {
        let mut rules = Vec::new();
        for f in FAMILIES {
            rules.push(Rule::ServiceLookup {
                family: f,
                map: format!("{}-{}", maps.0, fam(f)),
            });
        }
        for f in FAMILIES {
            rules.push(Rule::NodePortLookup {
                family: f,
                map: format!("{}-{}", maps.1, fam(f)),
                restricted,
            });
        }
        rules
    };
    chains.push(("services".into(), lookups(("service-ips", "service-nodeports"))));
    chains.push((
        "endpoints-check".into(),
        lookups(("no-endpoint-services", "no-endpoint-nodeports")),
    ));
    chains.push((
        "firewall-check".into(),
        FAMILIES
            .iter()
            .map(|f| Rule::ServiceLookup {
                family: *f,
                map: format!("firewall-ips-{}", fam(*f)),
            })
            .collect(),
    ));
    chains.push(("reject-chain".into(), vec![Rule::RejectTcpReset, Rule::Reject]));
    let mut masq: Vec<Rule> = FAMILIES
        .iter()
        .map(|f| Rule::HairpinMasquerade { family: *f })
        .collect();
    masq.extend([Rule::ReturnUnlessMarked, Rule::ClearMark, Rule::Masquerade]);
    chains.push(("masquerading".into(), masq));
    let new_jump = |c: &str| Rule::NewConnectionJump(c.into());
    chains.push(("filter-prerouting".into(), vec![new_jump("firewall-check")]));
    chains.push(("filter-input".into(), vec![new_jump("endpoints-check")]));
    chains.push(("filter-forward".into(), vec![new_jump("endpoints-check")]));
    chains.push((
        "filter-output".into(),
        vec![new_jump("endpoints-check"), new_jump("firewall-check")],
    ));
    chains.push(("nat-prerouting".into(), vec![Rule::Jump("services".into())]));
    chains.push(("nat-output".into(), vec![Rule::Jump("services".into())]));
    chains.push(("nat-postrouting".into(), vec![Rule::Jump("masquerading".into())]));

    let mut elements = Vec::new();
    // An interval set refuses overlapping elements: a prefix inside another is left out.
    let nets = |list: &[IpNetwork], f: Family| -> BTreeSet<IpNetwork> {
        let all: BTreeSet<IpNetwork> = list
            .iter()
            .filter(|n| Family::of(n.ip()) == f)
            .map(|n| IpNetwork::new(n.network(), n.prefix()).unwrap_or(*n))
            .collect();
        all.iter()
            .filter(|n| {
                !all.iter()
                    .any(|m| m != *n && m.prefix() <= n.prefix() && m.contains(n.network()))
            })
            .copied()
            .collect()
    };
    for f in FAMILIES {
        for net in nets(&settings.cluster_cidrs, f) {
            elements.push(Element {
                map: format!("cluster-cidrs-{}", fam(f)),
                key: Key::Net(net),
                value: Value::None,
            });
        }
        for net in nets(&settings.nodeport_addresses, f) {
            elements.push(Element {
                map: format!("nodeport-ips-{}", fam(f)),
                key: Key::Net(net),
                value: Value::None,
            });
        }
    }
    (chains, elements)
}

/// Rules in the base layout (for the rule count).
pub(super) fn base_rules(settings: &NodeSettings) -> usize {
    render_base(settings).0.iter().map(|(_, r)| r.len()).sum()
}

pub(super) fn hairpin_element(ip: IpAddr) -> Element {
    Element {
        map: format!("hairpin-{}", fam(Family::of(ip))),
        key: Key::Pair(ip),
        value: Value::None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::nftables::slots::endpoint_shard;
    use crate::plan::ServicePortId;

    /// An element as nft text: map, key, value ("" in a set).
    #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
    struct El {
        map: String,
        key: String,
        value: String,
    }

    /// A port's objects as nft text, for readable assertions.
    struct Text {
        chains: BTreeMap<String, Vec<String>>,
        sets: BTreeMap<String, String>,
        elements: BTreeSet<El>,
    }

    /// Renders with the port's endpoints at keys 100.. of its endpoint map, as text.
    fn render(p: &ServicePort, ctx: RenderCtx) -> Text {
        let slot = Slot {
            shard: endpoint_shard(&p.id),
            offset: 100,
            capacity: 16,
        };
        let o = render_port(p, ctx, slot);
        Text {
            chains: o
                .chains
                .iter()
                .map(|(name, rules)| (name.clone(), rules.iter().map(Rule::to_string).collect()))
                .collect(),
            sets: o.sets.iter().map(|(name, d)| (name.clone(), d.body())).collect(),
            elements: o
                .elements
                .iter()
                .map(|e| {
                    let full = e.to_string();
                    let value = full.split_once(" : ").map_or("", |(_, v)| v).to_string();
                    El {
                        map: e.map.clone(),
                        key: e.key.to_string(),
                        value,
                    }
                })
                .collect(),
        }
    }

    pub(crate) fn ep(ip: &str, port: u16) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port,
            is_local: true,
            ready: true,
        }
    }

    pub(crate) fn port(name: &str, family: Family) -> ServicePort {
        let id = ServicePortId {
            namespace: "default".into(),
            name: name.into(),
            port_name: "".into(),
            protocol: Protocol::Tcp,
            family,
        };
        let cluster_ip = if family == Family::V4 {
            "10.96.0.10"
        } else {
            "fd00::10"
        };
        ServicePort::new(id, Some(cluster_ip.parse().unwrap()), 80)
    }

    const CTX: RenderCtx = RenderCtx {
        cidrs_v4: true,
        cidrs_v6: false,
    };

    #[test]
    fn cluster_ip_with_endpoints_gets_a_random_choice() {
        let mut p = port("web", Family::V4);
        p.cluster_endpoints = vec![ep("10.1.0.2", 8080), ep("10.1.0.3", 8080), ep("10.1.0.4", 8080)];
        p.external_endpoints = p.cluster_endpoints.clone();
        let o = render(&p, CTX);
        let service = format!("service-{}", port_base_name(&p.id));
        assert_eq!(o.chains.len(), 1);
        let emap = endpoint_map(Family::V4, Protocol::Tcp, endpoint_shard(&p.id));
        assert_eq!(
            o.chains[&service],
            vec![
                "ip saddr != @cluster-cidrs-v4 meta mark set meta mark or 0x4000".to_string(),
                format!("meta l4proto tcp dnat ip to numgen random mod 3 offset 100 map @{emap}"),
            ]
        );
        let elements: Vec<(&str, &str, &str)> = o
            .elements
            .iter()
            .map(|e| (e.map.as_str(), e.key.as_str(), e.value.as_str()))
            .collect();
        let goto = format!("goto {service}");
        assert_eq!(
            elements,
            vec![
                (emap.as_str(), "100", "10.1.0.2 . 8080"),
                (emap.as_str(), "101", "10.1.0.3 . 8080"),
                (emap.as_str(), "102", "10.1.0.4 . 8080"),
                ("service-ips-v4", "10.96.0.10 . tcp . 80", goto.as_str()),
            ]
        );
        // No cluster CIDR for the family: no masquerade rule.
        let o = render(
            &p,
            RenderCtx {
                cidrs_v4: false,
                cidrs_v6: false,
            },
        );
        assert_eq!(o.chains[&service].len(), 1);
    }

    #[test]
    fn no_endpoints_reject_and_local_without_local_endpoints_drops() {
        let mut p = port("web", Family::V4);
        p.node_port = Some(30080);
        p.load_balancer_ips = vec!["192.0.2.10".parse().unwrap()];
        let o = render(&p, CTX);
        assert!(o.chains.is_empty());
        let got: Vec<(&str, &str, &str)> = o
            .elements
            .iter()
            .map(|e| (e.map.as_str(), e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("no-endpoint-nodeports-v4", "tcp . 30080", "goto reject-chain"),
                (
                    "no-endpoint-services-v4",
                    "10.96.0.10 . tcp . 80",
                    "goto reject-chain"
                ),
                (
                    "no-endpoint-services-v4",
                    "192.0.2.10 . tcp . 80",
                    "goto reject-chain"
                ),
            ]
        );
        // externalTrafficPolicy Local, endpoints only elsewhere.
        p.external_local = true;
        p.cluster_endpoints = vec![ep("10.1.0.2", 8080)];
        let o = render(&p, CTX);
        let base = port_base_name(&p.id);
        let external = &o.chains[&format!("external-{base}")];
        assert_eq!(
            external,
            &vec![
                format!("ip saddr @cluster-cidrs-v4 goto service-{base}"),
                "fib saddr type local meta mark set meta mark or 0x4000".into(),
                format!("fib saddr type local goto service-{base}"),
            ]
        );
        assert!(o.elements.contains(&El {
            map: "no-endpoint-nodeports-v4".into(),
            key: "tcp . 30080".into(),
            value: "drop".into()
        }));
        assert!(o.elements.contains(&El {
            map: "service-nodeports-v4".into(),
            key: "tcp . 30080".into(),
            value: format!("goto external-{base}")
        }));
    }

    #[test]
    fn both_policies_local_short_circuit_to_every_endpoint() {
        let mut p = port("web", Family::V4);
        p.node_port = Some(30080);
        p.internal_local = true;
        p.external_local = true;
        p.short_circuit_endpoints = vec![ep("10.1.0.2", 8080), ep("10.2.0.3", 8080)];
        let base = port_base_name(&p.id);
        let emap = endpoint_map(Family::V4, Protocol::Tcp, endpoint_shard(&p.id));
        // No local endpoint: the ClusterIP and outside traffic are dropped, Pods and the
        // node still reach the Service through its NodePort.
        let o = render(&p, CTX);
        assert_eq!(
            o.chains[&format!("external-{base}")],
            vec![
                format!("ip saddr @cluster-cidrs-v4 goto all-endpoints-{base}"),
                "fib saddr type local meta mark set meta mark or 0x4000".into(),
                format!("fib saddr type local goto all-endpoints-{base}"),
            ]
        );
        assert_eq!(
            o.chains[&format!("all-endpoints-{base}")],
            vec![format!(
                "meta l4proto tcp dnat ip to numgen random mod 2 offset 100 map @{emap}"
            )]
        );
        assert!(!o.chains.contains_key(&format!("service-{base}")));
        for (map, key) in [
            ("no-endpoint-services-v4", "10.96.0.10 . tcp . 80"),
            ("no-endpoint-nodeports-v4", "tcp . 30080"),
        ] {
            assert!(
                o.elements.contains(&El {
                    map: map.into(),
                    key: key.into(),
                    value: "drop".into()
                }),
                "{map}"
            );
        }
        // A local endpoint: it serves the ClusterIP and outside traffic; the short-circuit
        // still spreads over both, after the other two choices in the port's slot.
        p.cluster_endpoints = vec![ep("10.1.0.2", 8080)];
        p.external_endpoints = p.cluster_endpoints.clone();
        let o = render(&p, CTX);
        assert_eq!(
            o.chains[&format!("all-endpoints-{base}")],
            vec![format!(
                "meta l4proto tcp dnat ip to numgen random mod 2 offset 102 map @{emap}"
            )]
        );
        assert_eq!(
            o.chains[&format!("external-{base}")].last().unwrap(),
            &format!("goto ext-endpoints-{base}")
        );
    }

    #[test]
    fn local_external_endpoints_get_their_own_chain_and_v6_syntax() {
        let mut p = port("web", Family::V6);
        p.node_port = Some(30080);
        p.external_local = true;
        p.affinity_seconds = Some(60);
        p.cluster_endpoints = vec![ep("fd00:1::2", 80), ep("fd00:1::3", 80)];
        p.external_endpoints = vec![ep("fd00:1::2", 80)];
        let o = render(&p, CTX);
        let base = port_base_name(&p.id);
        let ext = &o.chains[&format!("ext-endpoints-{base}")];
        let set = affinity_set_name(&p.id, &p.external_endpoints[0], 60);
        assert_eq!(
            ext,
            &vec![
                format!(
                    "ip6 saddr @{set} update @{set} {{ ip6 saddr }} meta l4proto tcp dnat ip6 to [fd00:1::2]:80"
                ),
                format!("update @{set} {{ ip6 saddr }} meta l4proto tcp dnat ip6 to [fd00:1::2]:80"),
            ]
        );
        assert_eq!(o.sets.len(), 2);
        assert!(o.sets[&set].contains("timeout 60s"));
        // v6 has no cluster CIDR in CTX: no short-circuit by source, only the node's own.
        assert_eq!(
            o.chains[&format!("external-{base}")],
            vec![
                "fib saddr type local meta mark set meta mark or 0x4000".to_string(),
                format!("fib saddr type local goto service-{base}"),
                format!("goto ext-endpoints-{base}"),
            ]
        );
    }

    #[test]
    fn source_ranges_make_a_firewall_chain() {
        let mut p = port("lb", Family::V4);
        p.load_balancer_ips = vec!["192.0.2.10".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        p.source_ranges = vec![
            "198.51.100.7/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        p.cluster_endpoints = vec![ep("10.1.0.2", 8080)];
        p.external_endpoints = p.cluster_endpoints.clone();
        let o = render(&p, CTX);
        let base = port_base_name(&p.id);
        assert_eq!(
            o.chains[&format!("firewall-{base}")],
            vec!["ip saddr 198.51.100.0/24 return".to_string(), "drop".into()]
        );
        assert!(o.elements.contains(&El {
            map: "firewall-ips-v4".into(),
            key: "192.0.2.10 . tcp . 80".into(),
            value: format!("goto firewall-{base}")
        }));
        assert_eq!(
            o.elements.iter().filter(|e| e.key.contains("2001:db8")).count(),
            0
        );
    }
}
