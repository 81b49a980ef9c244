//! The policy table's back end at scale (issue 11's "Benchmark", back-end part): the
//! cluster of `policy_plan` (10,000 Pods on 10 nodes, 1,000 on this one, 100 namespaces,
//! 1,000 NetworkPolicies with ingress and egress rules on named ports and ranges), planned
//! for one node and applied by the nftables back end in a node netns of the bench's own.
//!
//! Printed, medians of `FERRY_BENCH_REPS` (default 5): the full sync (plan, then back end)
//! against the same node with no policy in the store (the baseline, same run); then
//! single changes, from the change in the store to the kernel, split in plan (a full
//! re-plan here; the sync loop updates its plan with `PolicyPlanner`, whose single-change
//! times `policy_plan` measures) and back end: one policy changed, one local Pod
//! relabelled, one local Pod added; the first sync of a new back end over the existing
//! table (a restart); and the table's size. Then the data path: connect latency p50/p99
//! from one local Pod to another (both real netns on a bridge, addresses of the
//! generator's Pods 10 and 20, the connection allowed by their policies) with 0, 100 and
//! 1,000 policies in the store against no policy table at all, interleaved round by round
//! so that load on the machine hits every case alike (`FERRY_BENCH_CONNECTS`, default
//! 2,000 per case).
//!
//! Run: `cargo bench -p ferry-proxy --bench policy_backend` (root).

use std::time::{Duration, Instant};

use ferry_proxy::backend::nftables::NftablesBackend;
use ferry_proxy::backend::Backend;
use ferry_proxy::changes::Changes;
use ferry_proxy::plan::policy::plan;
use ferry_proxy::plan::Plan;
use ferry_proxy::source::{Event, Object};
use ferry_proxy::store::Store;
use ferry_tests::bench::percentile;
use ferry_tests::{require_root, Node};

#[path = "common/policy_cluster.rs"]
mod policy_cluster;
use policy_cluster::{app, pod, policy, store, NODES, PODS, POLICIES};

const NODE: &str = "node-0";

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Plan and back-end times of one sync of `store`'s plan.
fn sync(store: &Store, backend: &mut NftablesBackend) -> (Duration, Duration) {
    let t = Instant::now();
    let plan = Plan {
        services: Default::default(),
        policy: Some(plan(store, NODE)),
    };
    let planned = t.elapsed();
    let t = Instant::now();
    backend
        .sync(&plan, &Changes::all())
        .unwrap_or_else(|e| panic!("sync: {e}"));
    (planned, t.elapsed())
}

/// Medians of a full sync from an empty kernel (the table deleted before each).
fn full_sync(store: &Store, reps: usize) -> (Duration, Duration, NftablesBackend) {
    let (mut plans, mut applies) = (Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..reps {
        let mut backend = NftablesBackend::new();
        backend.cleanup().expect("cleanup");
        let (p, a) = sync(store, &mut backend);
        plans.push(p);
        applies.push(a);
        last = Some(backend);
    }
    (median(plans), median(applies), last.unwrap())
}

/// One change per rep, `change` applied to the store, then synced: plan and back end.
fn changes(
    store: &mut Store,
    backend: &mut NftablesBackend,
    reps: usize,
    change: impl Fn(usize) -> Object,
) -> (Duration, Duration) {
    let (mut plans, mut applies) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        store.apply(Event::Upsert(change(rep)));
        assert!(store.take_policy_dirty());
        let (p, a) = sync(store, backend);
        assert!(
            !backend.last_policy_transaction().is_empty(),
            "the change changed nothing"
        );
        plans.push(p);
        applies.push(a);
    }
    (median(plans), median(applies))
}

/// Lines of `nft list table inet ferry-policy` that start with `prefix`.
fn count(node: &Node, prefix: &str) -> usize {
    let listed = node
        .netns()
        .exec_ok(&["nft", "list", "table", "inet", "ferry-policy"]);
    listed
        .lines()
        .filter(|l| l.trim_start().starts_with(prefix))
        .count()
}

/// Pod `i`'s address in the generator.
fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256)
}

/// Connect latency from Pod 10 to Pod 20's `http` port (8006) with each policy count.
fn connect_latency(connects: usize) {
    let node = Node::new("policy-lat");
    let ns = node.netns();
    ns.exec_ok(&[
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.bridge.bridge-nf-call-iptables=1",
    ]);
    ns.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
    ns.exec_ok(&["ip", "addr", "add", "10.64.255.254/16", "dev", "br0"]);
    ns.exec_ok(&["ip", "link", "set", "br0", "up"]);
    let mut pods = Vec::new();
    for i in [10, 20] {
        let pod = node.pod(&format!("p{i}"));
        node.wire_pod(
            &pod,
            "br0",
            &format!("vp{i}"),
            &[&format!("{}/16", pod_ip(i))],
            &[],
        );
        pods.push(pod);
    }
    let to: std::net::SocketAddr = format!("{}:8006", pod_ip(20)).parse().unwrap();
    let _server = pods[1].tcp_server(to);
    let cases = [
        ("policy off (no table)", None),
        ("0 policies", Some(0)),
        ("100 policies", Some(100)),
        ("1,000 policies", Some(POLICIES)),
    ];
    // Each case's plan, applied before its round.
    let plans: Vec<Plan> = cases
        .iter()
        .map(|(_, n)| Plan {
            services: Default::default(),
            policy: n.map(|n| plan(&store(n), NODE)),
        })
        .collect();
    let mut backend = NftablesBackend::new();
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    let rounds = 10;
    for _ in 0..rounds {
        for (k, plan) in plans.iter().enumerate() {
            ns.run(|| backend.sync(plan, &Changes::all())).expect("sync");
            let times = pods[0].run(|| {
                (0..connects / rounds)
                    .map(|_| {
                        let t = Instant::now();
                        let conn = std::net::TcpStream::connect(to).expect("an allowed connection");
                        let took = t.elapsed();
                        drop(conn);
                        took
                    })
                    .collect::<Vec<_>>()
            });
            samples[k].extend(times);
        }
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mut base50 = 0.0;
    println!("connect latency Pod 10 -> Pod 20:8006, {connects} connects per case, interleaved");
    println!("  {:<28} {:>9} {:>9} {:>12}", "", "p50 us", "p99 us", "p50 added");
    for (k, (name, _)) in cases.iter().enumerate() {
        let p50 = us(percentile(&mut samples[k], 0.5));
        let p99 = us(percentile(&mut samples[k], 0.99));
        if k == 0 {
            base50 = p50;
        }
        println!("  {name:<28} {p50:>9.1} {p99:>9.1} {:>+12.1}", p50 - base50);
    }
}

fn main() {
    require_root!();
    let reps = ferry_tests::bench::env_usize("FERRY_BENCH_REPS", 5);
    let node = Node::new("policy-bench");
    let baseline_store = store(0);
    let mut store = store(POLICIES);
    node.netns().run(|| {
        let (base_plan, base_apply, _) = full_sync(&baseline_store, reps);
        let (full_plan, full_apply, mut backend) = full_sync(&store, reps);
        let rules = backend.policy_rules();

        // Policy 10 selects app a10, whose Pods are all on node-0 (10 % 10): its port
        // range grows by one each time.
        let (policy_plan, policy_apply) = changes(&mut store, &mut backend, reps, |rep| {
            policy(10, 9101 + rep as u16)
        });
        // Pod 10 (ns10, node-0, app a10, isolated by policy 10) relabelled out of every
        // policy and back in, in turns: each rep is a change.
        let (relabel_plan, relabel_apply) = changes(&mut store, &mut backend, reps, |rep| {
            pod(10, if rep % 2 == 0 { "unselected" } else { "a10" })
        });
        // New Pods on node-0, selected by existing policies.
        let (added_plan, added_apply) = changes(&mut store, &mut backend, reps, |rep| {
            let i = PODS + rep * NODES;
            pod(i, &app(i))
        });
        let mut restarted = NftablesBackend::new();
        let (restart_plan, restart_apply) = sync(&store, &mut restarted);

        println!(
            "policy back end (nftables), {PODS} Pods ({} on the node), {POLICIES} policies, median of {reps}",
            PODS / NODES
        );
        println!("  {:<52} {:>9} {:>9}", "", "plan ms", "apply ms");
        let row = |what: &str, p: Duration, a: Duration| {
            println!("  {what:<52} {:>9.1} {:>9.1}", ms(p), ms(a));
        };
        row(
            "baseline: full sync, no policy (nothing isolated)",
            base_plan,
            base_apply,
        );
        row("full sync, 1,000 policies", full_plan, full_apply);
        println!(
            "    apply ratio to baseline: {:.1}x; total (plan + apply): {:.1} ms",
            ms(full_apply) / ms(base_apply),
            ms(full_plan + full_apply)
        );
        row("one policy changed", policy_plan, policy_apply);
        row("one local Pod relabelled", relabel_plan, relabel_apply);
        row("one local Pod added", added_plan, added_apply);
        row(
            "restart: first sync of a new back end",
            restart_plan,
            restart_apply,
        );
        println!(
            "  table: {rules} rules, {} chains (incl. forward), {} peer sets, {} map lines",
            count(&node, "chain "),
            count(&node, "set peers-"),
            count(&node, "map "),
        );
    });
    connect_latency(ferry_tests::bench::env_usize("FERRY_BENCH_CONNECTS", 2_000));
}
