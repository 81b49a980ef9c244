//! ferry-bridge + ferry-ipam against the reference bridge + host-local (Debian's
//! /usr/lib/cni), ipMasq on, in one run.
//!
//! Each plugin pair gets its own node namespace and its own pods; their calls are
//! interleaved so the machine's noise falls on both alike. Prints ADD and DEL median and
//! p90 over sequential calls, and the wall time to add 50 pods in parallel, with ratios.
//!
//! Run: `make bench` or `cargo bench -p ferry-tests --bench bridge`. `FERRY_BENCH_CALLS`
//! (default 100) and `FERRY_BENCH_ROUNDS` (default 5) set the sizes.

use std::path::PathBuf;
use std::time::Instant;

use ferry_tests::bench::{env_usize, Comparison};
use ferry_tests::{ferry_bin, reference_plugin, require_root, CniCall, Node, Pod};
use serde_json::{json, Value};

struct Setup {
    name: &'static str,
    plugin: PathBuf,
    cni_path: String,
    node: Node,
    conf: Value,
}

fn setup(name: &'static str, plugin: PathBuf, ipam: &str, cni_path: String, subnet: &str) -> Setup {
    let node = Node::new(&format!("bench-{name}"));
    let conf = json!({
        // The reference plugins (1.1.1) speak up to 1.0.0: both sides use it.
        "cniVersion": "1.0.0",
        "name": "benchnet",
        "type": plugin.file_name().unwrap().to_string_lossy(),
        "bridge": "cni0",
        "isGateway": true,
        "ipMasq": true,
        "hairpinMode": true,
        "ipam": {
            "type": ipam,
            "ranges": [[{"subnet": subnet}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": node.state_dir().join("ipam"),
        }
    });
    Setup {
        name,
        plugin,
        cni_path,
        node,
        conf,
    }
}

fn main() {
    if !require_root("bridge benchmark") {
        return;
    }
    let calls = env_usize("FERRY_BENCH_CALLS", 100);
    let rounds = env_usize("FERRY_BENCH_ROUNDS", 5);
    let reference = reference_plugin("bridge").expect("reference plugins missing: run scripts/setup.sh");
    let ref_dir = reference.parent().unwrap().display().to_string();
    let ferry_dir = ferry_bin("ferry-bridge").parent().unwrap().display().to_string();
    let setups = [
        setup(
            "ferry",
            ferry_bin("ferry-bridge"),
            "ferry-ipam",
            ferry_dir,
            "10.240.0.0/16",
        ),
        setup("reference", reference, "host-local", ref_dir, "10.241.0.0/16"),
    ];
    let call = |s: &Setup, verb: &str, pod: &Pod| {
        CniCall::new(&s.plugin, verb, s.conf.clone())
            .for_pod(pod)
            .cni_path(s.cni_path.clone())
    };
    let pods: Vec<Vec<Pod>> = setups
        .iter()
        .map(|s| (0..calls.max(50)).map(|i| s.node.pod(&format!("p{i}"))).collect())
        .collect();

    // Sequential: ADD every pod, then DEL every pod, the two setups taking turns.
    let mut add = [Vec::new(), Vec::new()];
    let mut del = [Vec::new(), Vec::new()];
    for (samples, verb) in [(&mut add, "ADD"), (&mut del, "DEL")] {
        for pair in pods[0][..calls].iter().zip(&pods[1][..calls]) {
            for (k, (s, pod)) in setups.iter().zip([pair.0, pair.1]).enumerate() {
                let out = call(s, verb, pod).run_in(s.node.netns());
                assert!(out.status.success(), "{} {verb} failed:\n{out}", s.name);
                samples[k].push(out.elapsed);
            }
        }
    }

    // 50 pods at once: wall time until the last ADD exits; DEL between rounds.
    let mut parallel = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (k, s) in setups.iter().enumerate() {
            let start = Instant::now();
            let children: Vec<_> = pods[k][..50]
                .iter()
                .map(|p| call(s, "ADD", p).spawn_in(s.node.netns()))
                .collect();
            for c in children {
                let out = c.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "{} parallel ADD failed: {}",
                    s.name,
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            parallel[k].push(start.elapsed());
            for p in &pods[k][..50] {
                call(s, "DEL", p).run_in(s.node.netns());
            }
        }
    }

    println!(
        "ferry-bridge+ferry-ipam vs reference bridge+host-local (/usr/lib/cni), ipMasq on, cniVersion 1.0.0"
    );
    println!("{calls} sequential ADDs then DELs each, {rounds} rounds of 50 parallel ADDs");
    let table = Comparison {
        ours: "ferry",
        theirs: "reference",
    };
    table.print_add_del_parallel(&add, &del, &parallel);
}
