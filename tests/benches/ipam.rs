//! ferry-ipam against Debian's host-local, in one run, on the same disk.
//!
//! Prints ADD and DEL median and p90 over sequential calls, and the wall time of 50
//! parallel ADDs, for both plugins with their ratio. Calls of the two plugins are
//! interleaved so that the machine's noise falls on both alike.
//!
//! Run: `make bench` (or `cargo bench -p ferry-tests --bench ipam`); `FERRY_BENCH_CALLS`
//! sets the number of sequential calls (default 300), `FERRY_BENCH_ROUNDS` the number of
//! 50-parallel rounds (default 9).

use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry_tests::bench::{env_usize, Comparison};
use ferry_tests::{ferry_bin, reference_plugin, require_root, CniCall, Node};
use serde_json::{json, Value};

struct Plugin {
    name: &'static str,
    exe: PathBuf,
    config: Value,
}

fn config(data_dir: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "bench",
        "type": "bridge",
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.88.0.0/16"}], [{"subnet": "fd00:88::/64"}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": data_dir,
        }
    })
}

fn main() {
    if !require_root("ipam benchmark") {
        return;
    }
    let calls = env_usize("FERRY_BENCH_CALLS", 300);
    let rounds = env_usize("FERRY_BENCH_ROUNDS", 9);
    let node = Node::new("bench-ipam");
    let pod = node.pod("pod");
    // On the root file system, as /var/lib/cni/networks is on a node: fsync costs what it costs there.
    let disk = tempfile::Builder::new()
        .prefix("ferry-bench-ipam-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let host_local = reference_plugin("host-local").expect("host-local missing: run scripts/setup.sh");
    let plugins = [
        Plugin {
            name: "ferry-ipam",
            exe: ferry_bin("ferry-ipam"),
            config: config(&disk.path().join("ferry")),
        },
        Plugin {
            name: "host-local",
            exe: host_local,
            config: config(&disk.path().join("host-local")),
        },
    ];
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

    println!(
        "ferry-ipam vs host-local ({}), {calls} sequential calls each, {rounds} rounds of 50 parallel ADDs",
        plugins[1].exe.display()
    );
    println!(
        "dual-stack config (/16 + /64), store on {}",
        disk.path().display()
    );
    let table = Comparison {
        ours: "ferry-ipam",
        theirs: "host-local",
    };
    table.print_add_del_parallel(&add, &del, &parallel);
}
