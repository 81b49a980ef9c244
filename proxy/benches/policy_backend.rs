//! The policy table's back end at scale (issue 11's "Benchmark", back-end part): the
//! cluster of `policy_plan` (10,000 Pods on 10 nodes, 1,000 on this one, 100 namespaces,
//! 1,000 NetworkPolicies with ingress and egress rules on named ports and ranges), planned
//! for one node and applied by the nftables back end in a node netns of the bench's own.
//!
//! Printed: the full sync (plan, then back end; median of `FERRY_BENCH_REPS`, default 5)
//! against the same node with no policy in the store (the baseline, same run). Then what
//! the daemon does per single change, from the change in the store to the kernel:
//! `PolicyPlanner::update` with the store's changes, then the back end's sync of the
//! updated table, each timed; median and p90 over `FERRY_BENCH_CHANGES` (default 21)
//! changes of each kind: one policy changed, one local Pod relabelled, one local Pod
//! added, one local Pod deleted, one Namespace relabelled. Beside the back end's time, the
//! same table with its peer sets named by their content (how sets were named before they
//! were named by what they select), synced by a second back end in a second node netns:
//! what a set rename costs against an element diff, same run. Then the first sync of a
//! new back end over the existing table (a restart), and the table's size. Then the data
//! path: connect latency p50/p99 from one local Pod to another (both real netns on a
//! bridge, addresses of the generator's Pods 10 and 20, the connection allowed by their
//! policies) with 0, 100 and 1,000 policies in the store against no policy table at all,
//! interleaved round by round so that load on the machine hits every case alike
//! (`FERRY_BENCH_CONNECTS`, default 2,000 per case).
//!
//! Run: `cargo bench -p ferry-proxy --bench policy_backend` (root).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proxy::backend::nftables::NftablesBackend;
use ferry_proxy::backend::Backend;
use ferry_proxy::changes::Changes;
use ferry_proxy::plan::policy::{plan, Clause, PolicyPlanner, PolicyTable};
use ferry_proxy::plan::Plan;
use ferry_proxy::source::Event;
use ferry_proxy::store::Store;
use ferry_tests::bench::percentile;
use ferry_tests::{require_root, Node};

#[path = "common/policy_cluster.rs"]
mod policy_cluster;
use policy_cluster::{app, namespace, pod, policy, store, NODES, PODS, POLICIES};

const NODE: &str = "node-0";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn policy_plan(table: PolicyTable) -> Plan {
    Plan {
        services: Default::default(),
        policy: Some(table),
    }
}

fn synced(backend: &mut NftablesBackend, plan: &Plan) -> Duration {
    let t = Instant::now();
    backend
        .sync(plan, &Changes::none())
        .unwrap_or_else(|e| panic!("sync: {e}\n{}", backend.last_policy_transaction()));
    t.elapsed()
}

/// Medians of a full sync from an empty kernel (the table deleted before each): a full
/// plan, then the back end's first sync.
fn full_sync(store: &Store, reps: usize) -> (Duration, Duration, NftablesBackend) {
    let (mut plans, mut applies) = (Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..reps {
        let mut backend = NftablesBackend::new();
        backend.cleanup().expect("cleanup");
        let t = Instant::now();
        let plan = policy_plan(PolicyPlanner::new(NODE).full(store));
        plans.push(t.elapsed());
        applies.push(synced(&mut backend, &plan));
        last = Some(backend);
    }
    (
        percentile(&mut plans, 0.5),
        percentile(&mut applies, 0.5),
        last.unwrap(),
    )
}

/// `table` with every peer set named by its content, as sets were named before they were
/// named by what they select (one name per distinct address list).
fn named_by_content(table: &PolicyTable, names: &mut HashMap<usize, Clause>) -> PolicyTable {
    let mut out = table.clone();
    let clauses = out
        .pods
        .values_mut()
        .flat_map(|p| p.ingress.iter_mut().chain(p.egress.iter_mut()))
        .flat_map(|i| i.allows.iter_mut())
        .flat_map(|a| a.clauses.iter_mut());
    for clause in clauses {
        let key = Arc::as_ptr(&clause.peers) as usize;
        let named = names
            .entry(key)
            .or_insert_with(|| Clause::by_content(clause.peers.clone(), clause.ports.clone()));
        clause.peer_set = named.peer_set.clone();
    }
    out
}

/// Times of one kind of change: planner update, back-end sync, and the back-end sync of
/// the same table with content-named sets.
#[derive(Default)]
struct Times {
    update: Vec<Duration>,
    apply: Vec<Duration>,
    total: Vec<Duration>,
    by_content: Vec<Duration>,
    /// Steps in the transaction.
    steps: Vec<usize>,
}

/// The daemon's path, one change at a time.
struct Daemon<'a> {
    store: &'a mut Store,
    planner: PolicyPlanner,
    plan: Plan,
    backend: NftablesBackend,
    /// The content-named twin and the netns it programs.
    twin: NftablesBackend,
    twin_node: &'a Node,
    node: &'a Node,
    names: HashMap<usize, Clause>,
}

impl Daemon<'_> {
    fn change(&mut self, event: Event, times: &mut Times) {
        let t = Instant::now();
        self.store.apply(event);
        let dirty = self.store.take_policy_changes();
        let table = self.plan.policy.as_mut().expect("policy on");
        self.planner.update(self.store, &dirty, table);
        let update = t.elapsed();
        let (backend, plan) = (&mut self.backend, &self.plan);
        let apply = self.node.netns().run(|| synced(backend, plan));
        let steps = self.backend.last_policy_transaction().lines().count();
        assert!(steps > 0, "the change changed nothing in the kernel");
        // The baseline twin, outside the daemon's path: its table renamed by content.
        self.names.clear();
        let twin_plan = policy_plan(named_by_content(table_of(&self.plan), &mut self.names));
        let twin = &mut self.twin;
        let by_content = self.twin_node.netns().run(|| synced(twin, &twin_plan));
        times.update.push(update);
        times.apply.push(apply);
        times.total.push(update + apply);
        times.by_content.push(by_content);
        times.steps.push(steps);
    }
}

fn table_of(plan: &Plan) -> &PolicyTable {
    plan.policy.as_ref().expect("policy on")
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
    let changes = ferry_tests::bench::env_usize("FERRY_BENCH_CHANGES", 21);
    let node = Node::new("policy-bench");
    let twin_node = Node::new("policy-twin");
    let baseline_store = store(0);
    let mut store = store(POLICIES);
    store.take_policy_changes();
    let (base_plan, base_apply, _) = node.netns().run(|| full_sync(&baseline_store, reps));
    let (full_plan, full_apply, backend) = node.netns().run(|| full_sync(&store, reps));
    let rules = backend.policy_rules();

    let mut planner = PolicyPlanner::new(NODE);
    let first_plan = policy_plan(planner.full(&store));
    let mut twin = NftablesBackend::new();
    let mut names = HashMap::new();
    let twin_plan = policy_plan(named_by_content(table_of(&first_plan), &mut names));
    twin_node.netns().run(|| synced(&mut twin, &twin_plan));
    let mut daemon = Daemon {
        store: &mut store,
        planner,
        plan: first_plan,
        backend,
        twin,
        twin_node: &twin_node,
        node: &node,
        names,
    };
    // The first sync of the daemon's table (the full-sync back end had it already).
    node.netns().run(|| synced(&mut daemon.backend, &daemon.plan));

    type Kind = (&'static str, Box<dyn Fn(usize) -> Event>);
    let kinds: [Kind; 5] = [
        // Policy 10 selects app a10, whose Pods are all on node-0 (10 % 10): its port
        // range grows by one each time.
        (
            "one policy changed",
            Box::new(|rep| Event::Upsert(policy(10, 9101 + rep as u16))),
        ),
        // Pod 10 (ns10, node-0, app a10, isolated by policy 10) relabelled out of every
        // policy and back in, in turns.
        (
            "one local Pod relabelled",
            Box::new(|rep| Event::Upsert(pod(10, if rep % 2 == 0 { "unselected" } else { "a10" }))),
        ),
        // New Pods on node-0, selected by existing policies, named port `http`: each
        // joins peer sets of many rules, and a named-port destination set every local
        // Pod's egress holds.
        (
            "one local Pod added",
            Box::new(|rep| {
                let i = PODS + rep * NODES;
                Event::Upsert(pod(i, &app(i)))
            }),
        ),
        // The Pods just added, deleted again in the same order.
        (
            "one local Pod deleted",
            Box::new(|rep| {
                let i = PODS + rep * NODES;
                Event::Delete(pod(i, &app(i)))
            }),
        ),
        // ns3 into team t0 and back: its tier-1 Pods join and leave the peers of every
        // policy of the node's Pods (they all allow team t0's tier 1).
        (
            "one Namespace relabelled",
            Box::new(|rep| Event::Upsert(namespace(3, if rep % 2 == 0 { 0 } else { 3 }))),
        ),
    ];
    let mut results = Vec::new();
    for (name, event) in &kinds {
        let mut times = Times::default();
        for rep in 0..changes {
            daemon.change(event(rep), &mut times);
        }
        assert_eq!(
            *table_of(&daemon.plan),
            plan(&*daemon.store, NODE),
            "{name}: the updated table differs from a full plan"
        );
        results.push((*name, times));
    }
    let mut restarted = NftablesBackend::new();
    let restart_apply = node.netns().run(|| synced(&mut restarted, &daemon.plan));

    println!(
        "policy back end (nftables), {PODS} Pods ({} on the node), {POLICIES} policies; load: {}",
        PODS / NODES,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "  full sync, median of {reps}          {:>9} {:>9}",
        "plan ms", "apply ms"
    );
    println!(
        "  {:<34} {:>9.1} {:>9.1}",
        "baseline: no policy",
        ms(base_plan),
        ms(base_apply)
    );
    println!(
        "  {:<34} {:>9.1} {:>9.1}   total {:.1} ms",
        "1,000 policies",
        ms(full_plan),
        ms(full_apply),
        ms(full_plan + full_apply)
    );
    println!("  single changes, {changes} each: PolicyPlanner::update + back-end sync (ms, median / p90);");
    println!("  'sets by content': the same tables with content-named peer sets (a rename per change)");
    println!(
        "  {:<28} {:>13} {:>13} {:>13} {:>8} {:>16}",
        "", "update", "apply", "total", "steps", "sets by content"
    );
    let cell =
        |v: &mut Vec<Duration>| format!("{:.2} / {:.2}", ms(percentile(v, 0.5)), ms(percentile(v, 0.9)));
    for (name, times) in &mut results {
        println!(
            "  {:<28} {:>13} {:>13} {:>13} {:>8} {:>16}",
            name,
            cell(&mut times.update),
            cell(&mut times.apply),
            cell(&mut times.total),
            {
                times.steps.sort();
                times.steps[times.steps.len() / 2]
            },
            cell(&mut times.by_content),
        );
    }
    println!(
        "  against a full plan + full sync of {:.1} ms; restart (first sync of a new back end): {:.1} ms",
        ms(full_plan + full_apply),
        ms(restart_apply)
    );
    println!(
        "  table: {rules} rules, {} chains (incl. forward), {} peer sets, {} map lines",
        count(&node, "chain "),
        count(&node, "set peers-"),
        count(&node, "map "),
    );
    drop(daemon);
    connect_latency(ferry_tests::bench::env_usize("FERRY_BENCH_CONNECTS", 2_000));
}
