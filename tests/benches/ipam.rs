//! ferry-ipam against Debian's host-local, in one run, on the same disk, in two shapes:
//!
//! - single-stack: one /24, as an independent harness measured it (sequential ADDs with
//!   unique ids, each plugin spawned as a runtime does);
//! - dual-stack: a /16 and a /64, one address from each per ADD.
//!
//! For each shape it prints ADD and DEL median and p90 over sequential calls, and the wall
//! time of 50 parallel ADDs, for both plugins with their ratio. Calls of the two plugins
//! are interleaved so that the machine's noise falls on both alike.
//!
//! Run: `make bench` (or `cargo bench -p ferry-tests --bench ipam`); `FERRY_BENCH_CALLS`
//! sets the number of sequential calls (default 300; the /24 takes at most 250, as it has
//! 253 addresses), `FERRY_BENCH_ROUNDS` the number of 50-parallel rounds (default 9),
//! `FERRY_BENCH_STORE` the directory the stores go in (default /var/tmp). What a new file
//! costs depends on the file system under it: ~110 us on the root ext4 of the machine
//! this was tuned on, which has no journal, ~10 us on a journaled ext4 (see the docs of
//! cni-ipam/src/store.rs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::bench::{env_usize, Comparison};
use ferry_tests::{ferry_bin, reference_plugin, require_root, CniCall, Node, Pod};
use serde_json::{json, Value};

/// The most sequential ADDs the /24 holds with room to spare.
const SINGLE_STACK_MAX_CALLS: usize = 250;

struct Shape {
    name: &'static str,
    ranges: Value,
    calls: usize,
}

struct Plugin {
    name: &'static str,
    exe: PathBuf,
    config: Value,
}

fn config(data_dir: &Path, ranges: &Value) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "bench",
        "type": "bridge",
        "ipam": {
            "type": "host-local",
            "ranges": ranges,
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": data_dir,
        }
    })
}

/// Samples of one shape, `[ferry-ipam, host-local]` each.
struct Samples {
    add: [Vec<Duration>; 2],
    del: [Vec<Duration>; 2],
    parallel: [Vec<Duration>; 2],
}

fn measure(plugins: &[Plugin; 2], node: &Node, pod: &Pod, calls: usize, rounds: usize) -> Samples {
    let call = |p: &Plugin, verb: &str, id: &str| {
        CniCall::new(&p.exe, verb, p.config.clone())
            .container_id(id)
            .netns(Some(&pod.path()))
    };

    // Sequential ADDs then DELs, the two plugins taking turns call by call.
    let mut add = [Vec::new(), Vec::new()];
    let mut del = [Vec::new(), Vec::new()];
    for (samples, verb) in [(&mut add, "ADD"), (&mut del, "DEL")] {
        for i in 0..calls {
            for (k, p) in plugins.iter().enumerate() {
                let out = call(p, verb, &format!("seq-{i}")).run_in(node.netns());
                assert!(out.status.success(), "{} {verb} failed:\n{out}", p.name);
                samples[k].push(out.elapsed);
            }
        }
    }

    // 50 ADDs started at once; the wall time until the last one exits. DEL between rounds.
    let mut parallel = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (k, p) in plugins.iter().enumerate() {
            let ids: Vec<String> = (0..50).map(|i| format!("par-{round}-{i}")).collect();
            let start = Instant::now();
            let children: Vec<_> = ids
                .iter()
                .map(|id| call(p, "ADD", id).spawn_in(node.netns()))
                .collect();
            for c in children {
                let out = c.wait_with_output().unwrap();
                assert!(out.status.success(), "{} parallel ADD failed", p.name);
            }
            parallel[k].push(start.elapsed());
            for id in &ids {
                call(p, "DEL", id).run_in(node.netns());
            }
        }
    }
    Samples { add, del, parallel }
}

fn main() {
    if !require_root("ipam benchmark") {
        return;
    }
    let calls = env_usize("FERRY_BENCH_CALLS", 300);
    let rounds = env_usize("FERRY_BENCH_ROUNDS", 9);
    let node = Node::new("bench-ipam");
    let pod = node.pod("pod");
    // On the root file system by default, as /var/lib/cni/networks is on a node.
    let store = std::env::var("FERRY_BENCH_STORE").unwrap_or_else(|_| "/var/tmp".into());
    let disk = tempfile::Builder::new()
        .prefix("ferry-bench-ipam-")
        .tempdir_in(&store)
        .unwrap_or_else(|e| panic!("FERRY_BENCH_STORE={store}: cannot make a directory there: {e}"));
    let host_local = reference_plugin("host-local").expect("host-local missing: run scripts/setup.sh");
    let shapes = [
        Shape {
            name: "single-stack (/24)",
            ranges: json!([[{"subnet": "10.89.0.0/24"}]]),
            calls: calls.min(SINGLE_STACK_MAX_CALLS),
        },
        Shape {
            name: "dual-stack (/16 + /64)",
            ranges: json!([[{"subnet": "10.88.0.0/16"}], [{"subnet": "fd00:88::/64"}]]),
            calls,
        },
    ];

    println!(
        "ferry-ipam vs host-local ({}), {rounds} rounds of 50 parallel ADDs per shape, store on {}",
        host_local.display(),
        disk.path().display()
    );
    let table = Comparison {
        ours: "ferry-ipam",
        theirs: "host-local",
    };
    for (i, shape) in shapes.iter().enumerate() {
        // A store of its own per shape and plugin: each starts empty.
        let plugins = [
            Plugin {
                name: "ferry-ipam",
                exe: ferry_bin("ferry-ipam"),
                config: config(&disk.path().join(format!("ferry-{i}")), &shape.ranges),
            },
            Plugin {
                name: "host-local",
                exe: host_local.clone(),
                config: config(&disk.path().join(format!("host-local-{i}")), &shape.ranges),
            },
        ];
        let s = measure(&plugins, &node, &pod, shape.calls, rounds);
        println!();
        println!("{}, {} sequential calls each", shape.name, shape.calls);
        table.print_add_del_parallel(&s.add, &s.del, &s.parallel);
    }
}
