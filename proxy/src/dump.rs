//! `ferry-proxy dump`: the plan as people read it (one line per Service port) or as
//! machines read it (JSON, the serde form of [`ServiceTable`]); with `--policy`, the
//! policy table the plan gives (one line per Pod, then each chain and set).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::backend::policy::{DirectionLayout, PolicyLayout};
use crate::plan::{Endpoint, Family, ServicePort, ServiceTable};

const HEADER: [&str; 7] = [
    "SERVICE PORT",
    "CLUSTER-IP",
    "NODEPORT",
    "EXTERNAL",
    "POLICY",
    "AFFINITY",
    "ENDPOINTS",
];

/// A table with a header, aligned columns and one line per Service port, after a line with
/// the node settings the plan was made with.
pub fn table(plan: &ServiceTable) -> String {
    let mut out = String::new();
    let settings = &plan.settings;
    let list = |nets: &[ipnetwork::IpNetwork], none: &str| {
        if nets.is_empty() {
            none.to_string()
        } else {
            nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
        }
    };
    let _ = writeln!(
        out,
        "node {}; cluster CIDRs {}; NodePort addresses {}",
        if settings.node_name.is_empty() {
            "(no name)"
        } else {
            &settings.node_name
        },
        list(&settings.cluster_cidrs, "(none)"),
        list(&settings.nodeport_addresses, "(all)"),
    );
    let rows: Vec<[String; 7]> = plan.ports.values().map(row).collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for cells in std::iter::once(HEADER.map(String::from)).chain(rows) {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let _ = writeln!(out, "{} Service ports", plan.ports.len());
    out
}

/// The plan as pretty-printed JSON.
pub fn json(plan: &ServiceTable) -> String {
    let mut text = serde_json::to_string_pretty(plan).expect("a ServiceTable serializes");
    text.push('\n');
    text
}

/// The policy table: one line per Pod (its addresses and, per direction, the chain that
/// isolates it and the policies behind it, or `open`), then every chain with its rules
/// and every peer set with its ranges, as `nft list table inet ferry-policy` will name them.
pub fn policy_table(layout: &PolicyLayout) -> String {
    let mut out = String::new();
    let direction = |d: &Option<DirectionLayout>| match d {
        Some(d) => format!("{} ({})", d.chain, d.policies.join(",")),
        None => "open".to_string(),
    };
    let width = layout.pods.keys().map(|k| k.len()).max().unwrap_or(3).max(3);
    let _ = writeln!(out, "{:<width$}  INGRESS / EGRESS / ADDRESSES", "POD");
    for (key, pod) in &layout.pods {
        let ips: Vec<String> = pod.ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "{key:<width$}  ingress {} / egress {} / {}",
            direction(&pod.ingress),
            direction(&pod.egress),
            ips.join(",")
        );
    }
    let isolated = layout
        .pods
        .values()
        .filter(|p| p.ingress.is_some() || p.egress.is_some())
        .count();
    let _ = writeln!(
        out,
        "{} Pods, {isolated} isolated; {} chains, {} peer sets",
        layout.pods.len(),
        layout.chains.len(),
        layout.sets.len()
    );
    for (name, rules) in &layout.chains {
        let _ = writeln!(out, "\nchain {name}");
        for rule in rules {
            let _ = writeln!(out, "  {rule}");
        }
    }
    for (name, ranges) in &layout.sets {
        let _ = writeln!(out, "\nset {name}\n  {}", ranges.join(", "));
    }
    out
}

/// The policy table as pretty-printed JSON.
pub fn policy_json(layout: &PolicyLayout) -> String {
    let mut text = serde_json::to_string_pretty(layout).expect("a PolicyLayout serializes");
    text.push('\n');
    text
}

fn row(p: &ServicePort) -> [String; 7] {
    let dash = || "-".to_string();
    let cluster_ip = p
        .cluster_ip
        .map_or_else(dash, |ip| SocketAddr::new(ip, p.port).to_string());
    let node_port = p.node_port.map_or_else(dash, |n| n.to_string());

    let mut external: Vec<String> = p
        .external_ips
        .iter()
        .map(|ip| address(*ip, p.id.family))
        .collect();
    external.extend(
        p.load_balancer_ips
            .iter()
            .map(|ip| format!("lb:{}", address(*ip, p.id.family))),
    );
    if !p.source_ranges.is_empty() {
        let ranges: Vec<String> = p.source_ranges.iter().map(ToString::to_string).collect();
        external.push(format!("from:{}", ranges.join(",")));
    }
    let external = if external.is_empty() {
        dash()
    } else {
        external.join(" ")
    };

    let mut policy = Vec::new();
    if p.external_local {
        policy.push("ext=Local".to_string());
    }
    if p.internal_local {
        policy.push("int=Local".to_string());
    }
    if let Some(port) = p.health_check_node_port {
        policy.push(format!("hc={port}"));
    }
    let policy = if policy.is_empty() {
        dash()
    } else {
        policy.join(" ")
    };
    let affinity = p.affinity_seconds.map_or_else(dash, |s| format!("ClientIP {s}s"));

    let endpoints = if p.cluster_endpoints == p.external_endpoints {
        endpoint_list(&p.cluster_endpoints)
    } else {
        format!(
            "cluster: {} | external: {}",
            endpoint_list(&p.cluster_endpoints),
            endpoint_list(&p.external_endpoints)
        )
    };
    [
        p.id.to_string(),
        cluster_ip,
        node_port,
        external,
        policy,
        affinity,
        endpoints,
    ]
}

fn address(ip: IpAddr, family: Family) -> String {
    match family {
        Family::V4 => ip.to_string(),
        Family::V6 => format!("[{ip}]"),
    }
}

fn endpoint_list(endpoints: &[Endpoint]) -> String {
    if endpoints.is_empty() {
        return "(none)".to_string();
    }
    let all: Vec<String> = endpoints
        .iter()
        .map(|e| {
            let addr = SocketAddr::new(e.ip, e.port);
            if e.is_local {
                format!("{addr} (local)")
            } else {
                addr.to_string()
            }
        })
        .collect();
    all.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{NodeSettings, Protocol, ServicePortId};

    fn sample() -> ServiceTable {
        let ep = |ip: &str, is_local| Endpoint {
            ip: ip.parse().unwrap(),
            port: 8080,
            is_local,
            ready: true,
        };
        let port = ServicePort {
            id: ServicePortId {
                namespace: "default".into(),
                name: "web".into(),
                port_name: "http".into(),
                protocol: Protocol::Tcp,
                family: Family::V4,
            },
            cluster_ip: Some("10.96.0.10".parse().unwrap()),
            port: 80,
            node_port: Some(30080),
            external_ips: vec!["192.0.2.10".parse().unwrap()],
            load_balancer_ips: vec!["203.0.113.5".parse().unwrap()],
            source_ranges: vec!["198.51.100.0/24".parse().unwrap()],
            external_local: true,
            internal_local: false,
            health_check_node_port: Some(32000),
            affinity_seconds: Some(10800),
            cluster_endpoints: vec![ep("10.244.0.7", true), ep("10.244.1.5", false)],
            external_endpoints: vec![ep("10.244.0.7", true)],
            short_circuit_endpoints: Vec::new(),
        };
        let mut v6 = port.clone();
        v6.id.family = Family::V6;
        v6.cluster_ip = Some("fd00::10".parse().unwrap());
        v6.external_ips = vec![];
        v6.load_balancer_ips = vec![];
        v6.source_ranges = vec![];
        v6.external_local = false;
        v6.health_check_node_port = None;
        v6.affinity_seconds = None;
        v6.node_port = None;
        v6.cluster_endpoints = vec![];
        v6.external_endpoints = vec![];
        ServiceTable {
            settings: NodeSettings {
                node_name: "node-a".into(),
                cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
                nodeport_addresses: vec![],
            },
            ports: [port, v6].into_iter().map(|p| (p.id.clone(), p)).collect(),
        }
    }

    #[test]
    fn the_table_has_one_aligned_line_per_port() {
        let text = table(&sample());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "node node-a; cluster CIDRs 10.244.0.0/16; NodePort addresses (all)"
        );
        assert!(lines[1].starts_with("SERVICE PORT"));
        assert_eq!(
            lines[2],
            "default/web:http/tcp/v4  10.96.0.10:80  30080     192.0.2.10 lb:203.0.113.5 from:198.51.100.0/24  \
             ext=Local hc=32000  ClientIP 10800s  cluster: 10.244.0.7:8080 (local), 10.244.1.5:8080 | \
             external: 10.244.0.7:8080 (local)"
        );
        assert_eq!(
            lines[3],
            "default/web:http/tcp/v6  [fd00::10]:80  -         -                                               \
             -                   -                (none)"
        );
        assert_eq!(lines[4], "2 Service ports");
        // Columns line up: CLUSTER-IP starts at the same offset on every line.
        let at = lines[1].find("CLUSTER-IP").unwrap();
        assert_eq!(&lines[2][at..at + 10], "10.96.0.10");
    }

    #[test]
    fn json_lists_the_ports() {
        let value: serde_json::Value = serde_json::from_str(&json(&sample())).unwrap();
        assert_eq!(value["settings"]["node_name"], "node-a");
        let ports = value["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[0]["id"]["protocol"], "tcp");
        assert_eq!(ports[0]["source_ranges"][0], "198.51.100.0/24");
        assert_eq!(ports[0]["cluster_endpoints"][0]["ip"], "10.244.0.7");
    }
}
