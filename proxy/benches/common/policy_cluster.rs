//! The cluster both policy benches measure (`policy_plan` the plan, `policy_backend` the
//! kernel): 10,000 Pods on 10 nodes in 100 namespaces, and NetworkPolicies each with an
//! ingress rule of three peers (Pods of every namespace by label, a namespace AND Pod
//! selector, an ipBlock with except) on a named port and a port range, and an egress rule
//! to every namespace on a named port. Included by both with `#[path]`.

use ferry_proxy::source::{Event, Kind, Object};
use ferry_proxy::store::Store;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;

pub const PODS: usize = 10_000;
pub const NODES: usize = 10;
pub const NAMESPACES: usize = 100;
pub const POLICIES: usize = 1_000;

pub fn namespace(i: usize, team: usize) -> Object {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": format!("ns{i}"),
        "labels": {"team": format!("t{team}")}}}))
    .unwrap();
    ns.into()
}

pub fn pod(i: usize, app: &str) -> Object {
    let ip = format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"namespace": format!("ns{}", i % NAMESPACES), "name": format!("pod-{i}"),
                     "labels": {"app": app, "tier": format!("{}", i % 3)}},
        "spec": {"nodeName": format!("node-{}", i % NODES), "containers": [{"name": "c",
                 "ports": [{"name": "http", "containerPort": 8000 + (i % 7) as i32}]}]},
        "status": {"phase": "Running", "podIPs": [{"ip": ip}]}
    }))
    .unwrap();
    pod.into()
}

pub fn policy(j: usize, port_end: u16) -> Object {
    let policy: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"namespace": format!("ns{}", j % NAMESPACES), "name": format!("policy-{j}")},
        "spec": {
            "podSelector": {"matchLabels": {"app": format!("a{}", j % 200)}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [
                {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": format!("a{}", (j + 1) % 200)}}},
                {"namespaceSelector": {"matchLabels": {"team": format!("t{}", j % 10)}},
                 "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["1"]}]}},
                {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}],
              "ports": [{"port": "http"}, {"port": 9000, "endPort": port_end}]}],
            "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "http"}]}]
        }
    }))
    .unwrap();
    policy.into()
}

pub fn app(i: usize) -> String {
    format!("a{}", i % 200)
}

pub fn store(policies: usize) -> Store {
    let mut objects: Vec<Object> = (0..NAMESPACES).map(|i| namespace(i, i % 10)).collect();
    objects.extend((0..PODS).map(|i| pod(i, &app(i))));
    objects.extend((0..policies).map(|j| policy(j, 9100)));
    let mut store = Store::new();
    store.apply(Event::Snapshot {
        kinds: Kind::ALL.to_vec(),
        objects,
    });
    store
}
