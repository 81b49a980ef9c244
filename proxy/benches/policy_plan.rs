//! The policy plan at scale (issue 11's "Benchmark", plan part only: nothing is
//! programmed yet): 10,000 Pods on 10 nodes (1,000 on the planned node) in 100
//! namespaces, 1,000 NetworkPolicies, each with an ingress rule of three peers (Pods of
//! every namespace by label, a namespace AND Pod selector, an ipBlock with except) on a named port and a
//! port range, and an egress rule to every namespace on a named port (the costly case:
//! the name is resolved on every destination Pod).
//!
//! Printed, medians of `FERRY_BENCH_REPS` (default 21) runs: the full plan for the node
//! against the same plan with no policy in the store; then, for each kind of single
//! change (one policy changed, one Pod relabelled, one Pod added, one Namespace
//! relabelled), the time from the store event to the updated table with
//! [`PolicyPlanner::update`] against a full re-plan after the same change (the baseline,
//! same run; each update's table is checked equal to the full re-plan's). Then the RSS
//! the planner's state and its table take. Run:
//! `cargo bench -p ferry-proxy --bench policy_plan`.
//!
//! Measured on the team machine (2 cores shared with five other engineers' builds, so
//! absolute times swing several-fold with load; ratios within a run hold better):
//!
//! | run (load)            | no policy | full plan | policy changed | Pod relabelled | Pod added | Namespace relabelled |
//! |-----------------------|-----------|-----------|----------------|----------------|-----------|----------------------|
//! | 21 runs (load ~7)     | 57.7 ms   | 1055 ms   | 0.63 ms (re-plan 797) | 0.58 ms (924) | 121 ms (740) | 26.5 ms (516) |
//! | 21 runs (load ~6.5)   | 39.0 ms   | 246 ms    | 0.59 ms (re-plan 222) | 0.60 ms (249) | 49.8 ms (173) | 16.4 ms (202) |
//! | 3 runs (load ~8, quieter moment) | 8.2 ms | 120 ms | 0.50 ms (102) | 0.59 ms (107) | 27.7 ms (499) | 7.4 ms (110) |
//!
//! RSS: the table alone 5.6 MiB; the planner's state beside its table 12.3 MiB.
//! The rows above predate peer set ids: a Pod added with a named port every isolated
//! Pod's egress names changed one destination set that all 1,000 node Pods' entries
//! hold, and the planner re-planned those 1,000 entries. It now swaps the set's new
//! addresses into them; `policy_backend` measures every kind end to end (planner update
//! and back end), which is the figure that counts.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proxy::plan::policy::{plan, PolicyPlanner, PolicyTable};
use ferry_proxy::source::Event;
use ferry_proxy::store::release_freed_memory;

#[path = "common/policy_cluster.rs"]
mod policy_cluster;
use policy_cluster::{app, namespace, pod, policy, store, NODES, PODS, POLICIES};

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

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One kind of change, made anew at each run (`rep`).
struct ChangeKind {
    name: &'static str,
    event: fn(usize) -> Event,
}

const CHANGES: [ChangeKind; 4] = [
    ChangeKind {
        name: "one policy changed",
        // Policy 10 selects Pods of the node (app a10 in ns10).
        event: |rep| Event::Upsert(policy(10, 9101 + rep as u16)),
    },
    ChangeKind {
        name: "one Pod relabelled",
        // Pod 10 is on the node: it leaves one app's peer sets for another's.
        event: |rep| Event::Upsert(pod(10, &app(11 + rep))),
    },
    ChangeKind {
        name: "one Pod added",
        event: |rep| Event::Upsert(pod(PODS + NODES * (rep + 1), &app(rep))),
    },
    ChangeKind {
        name: "one Namespace relabelled",
        event: |rep| Event::Upsert(namespace(3, 4 + rep % 5)),
    },
];

fn main() {
    let reps: usize = std::env::var("FERRY_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(21);
    let baseline_store = store(0);
    let (baseline, empty) = timed(reps, |_| plan(&baseline_store, "node-0"));
    assert_eq!(empty.pods.len(), PODS / NODES);
    assert!(empty
        .pods
        .values()
        .all(|p| p.ingress.is_none() && p.egress.is_none()));
    drop(baseline_store);

    let mut store = store(POLICIES);
    store.take_policy_changes();
    release_freed_memory();
    let rss_store = rss_kib();
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
    drop(table);

    // Memory: the table alone, then the planner's state beside its table.
    release_freed_memory();
    let before_table = rss_kib();
    let table = plan(&store, "node-0");
    release_freed_memory();
    let table_kib = rss_kib().saturating_sub(before_table);
    drop(table);
    release_freed_memory();
    let before_planner = rss_kib();
    let mut planner = PolicyPlanner::new("node-0");
    let measured = planner.full(&store);
    release_freed_memory();
    let planner_kib = rss_kib().saturating_sub(before_planner);
    drop(measured);

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "policy plan, {PODS} Pods ({} on the node), {POLICIES} policies, median of {reps}",
        PODS / NODES
    );
    println!("  local Pods isolated: {isolated}; allows: {allows}; distinct peer sets: {}; address ranges in them: {ranges}", sets.len());
    println!(
        "  {:<44} {:>10.2} ms",
        "baseline: plan with no policy",
        ms(baseline)
    );
    println!(
        "  {:<44} {:>10.2} ms  ({:.1}x baseline)",
        "full plan",
        ms(full),
        ms(full) / ms(baseline)
    );
    for change in &CHANGES {
        // The baseline first: the same change, then a whole plan.
        let (replan, _) = timed(reps, |rep| {
            store.apply((change.event)(rep));
            store.take_policy_changes();
            plan(&store, "node-0")
        });
        let mut table = planner.full(&store);
        let mut changed = Vec::new();
        let mut times = Vec::new();
        for rep in 0..reps {
            // Runs that follow the baseline's: each makes a change the store has not seen.
            let event = (change.event)(rep + reps);
            let start = Instant::now();
            store.apply(event);
            let dirty = store.take_policy_changes();
            changed.push(planner.update(&store, &dirty, &mut table).len());
            times.push(start.elapsed());
            assert_eq!(
                table,
                plan(&store, "node-0"),
                "{}: update differs from plan",
                change.name
            );
        }
        let update = median(times);
        changed.sort();
        println!(
            "  {:<44} {:>10.2} ms  (full re-plan {:.2} ms: {:.0}x faster; {} Pod entries changed)",
            format!("{}: store + update", change.name),
            ms(update),
            ms(replan),
            ms(replan) / ms(update),
            changed[changed.len() / 2]
        );
    }
    println!(
        "  RSS after building the store: {} MiB; the table alone: {:.1} MiB; planner state + its table: {:.1} MiB",
        rss_store / 1024,
        table_kib as f64 / 1024.0,
        planner_kib as f64 / 1024.0
    );
}
