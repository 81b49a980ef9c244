//! The policy plan at scale (issue 11's "Benchmark", plan part only: nothing is
//! programmed yet): 10,000 Pods on 10 nodes (1,000 on the planned node) in 100
//! namespaces, 1,000 NetworkPolicies, each with an ingress rule of three peers (Pods of
//! every namespace by label, a namespace AND Pod selector, an ipBlock with except) on a named port and a
//! port range, and an egress rule to every namespace on a named port (the costly case:
//! the name is resolved on every destination Pod).
//!
//! Printed, medians of `FERRY_BENCH_REPS` (default 5) runs: the full plan for the node,
//! then the full re-plan after one policy changed and after one Pod relabelled (the plan
//! is redone whole on any change), against the same plan with no policy in the store (the
//! baseline, same run). Run: `cargo bench -p ferry-proxy --bench policy_plan`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proxy::plan::policy::{plan, PolicyTable};
use ferry_proxy::source::{Event, Kind, Object};
use ferry_proxy::store::Store;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;

const PODS: usize = 10_000;
const NODES: usize = 10;
const NAMESPACES: usize = 100;
const POLICIES: usize = 1_000;

fn namespace(i: usize) -> Object {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": format!("ns{i}"),
        "labels": {"team": format!("t{}", i % 10)}}}))
    .unwrap();
    ns.into()
}

fn pod(i: usize, app: &str) -> Object {
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

fn policy(j: usize, port_end: u16) -> Object {
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

fn app(i: usize) -> String {
    format!("a{}", i % 200)
}

fn store(policies: usize) -> Store {
    let mut objects: Vec<Object> = (0..NAMESPACES).map(namespace).collect();
    objects.extend((0..PODS).map(|i| pod(i, &app(i))));
    objects.extend((0..policies).map(|j| policy(j, 9100)));
    let mut store = Store::new();
    store.apply(Event::Snapshot {
        kinds: Kind::ALL.to_vec(),
        objects,
    });
    store
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn timed(reps: usize, mut f: impl FnMut(usize) -> PolicyTable) -> (Duration, PolicyTable) {
    let mut times = Vec::new();
    let mut last = PolicyTable::default();
    for rep in 0..reps {
        let start = Instant::now();
        last = f(rep);
        times.push(start.elapsed());
    }
    (median(times), last)
}

fn main() {
    let reps: usize = std::env::var("FERRY_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let baseline_store = store(0);
    let (baseline, empty) = timed(reps, |_| plan(&baseline_store, "node-0"));
    assert_eq!(empty.pods.len(), PODS / NODES);
    assert!(empty
        .pods
        .values()
        .all(|p| p.ingress.is_none() && p.egress.is_none()));

    let mut store = store(POLICIES);
    let (full, table) = timed(reps, |_| plan(&store, "node-0"));
    let isolated = table.pods.values().filter(|p| p.ingress.is_some()).count();
    let allows: usize = table
        .pods
        .values()
        .flat_map(|p| p.ingress.iter().chain(p.egress.iter()))
        .map(|i| i.allows.len())
        .sum();
    let mut sets = HashSet::new();
    let mut ranges = 0;
    for clause in table
        .pods
        .values()
        .flat_map(|p| p.ingress.iter().chain(p.egress.iter()))
        .flat_map(|i| i.allows.iter())
        .flat_map(|a| a.clauses.iter())
    {
        if sets.insert(Arc::as_ptr(&clause.peers)) {
            if let ferry_proxy::plan::policy::Addresses::Ranges(r) = &*clause.peers {
                ranges += r.len();
            }
        }
    }

    let (policy_changed, _) = timed(reps, |rep| {
        store.apply(Event::Upsert(policy(7, 9101 + rep as u16)));
        assert!(store.take_policy_dirty());
        plan(&store, "node-0")
    });
    let (pod_relabelled, _) = timed(reps, |rep| {
        store.apply(Event::Upsert(pod(10, &format!("moved-{rep}"))));
        assert!(store.take_policy_dirty());
        plan(&store, "node-0")
    });

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "policy plan, {PODS} Pods ({} on the node), {POLICIES} policies, median of {reps}",
        PODS / NODES
    );
    println!("  local Pods isolated: {isolated}; allows: {allows}; distinct peer sets: {}; address ranges in them: {ranges}", sets.len());
    println!(
        "  {:<44} {:>10.1} ms",
        "baseline: plan with no policy",
        ms(baseline)
    );
    println!(
        "  {:<44} {:>10.1} ms  ({:.1}x baseline)",
        "full plan",
        ms(full),
        ms(full) / ms(baseline)
    );
    println!(
        "  {:<44} {:>10.1} ms",
        "one policy changed: store + re-plan",
        ms(policy_changed)
    );
    println!(
        "  {:<44} {:>10.1} ms",
        "one Pod relabelled: store + re-plan",
        ms(pod_relabelled)
    );
}
