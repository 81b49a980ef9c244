//! Issue 10, item 8, measured: the resident memory of `ferry-proxy run --manifests` before
//! and after each of six cycles of adding and removing a 100,000-endpoint EndpointSlice.
//! A measurement, not a pass/fail test: it prints VmRSS and the ratio against the
//! baseline taken in the same run. Run it with the release binary:
//!
//! ```sh
//! cargo build --release -p ferry-proxy
//! FERRY_PROXY_BIN=$PWD/target/release/ferry-proxy FERRY_REQUIRE_ROOT=1 \
//!   cargo test -p ferry-proxy --test manifests_memory -- --ignored --nocapture
//! ```

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn vm_rss_kib(child: &Child) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Waits until VmRSS has not moved by more than 1 MiB for three seconds (or 60 s passed):
/// parsing and syncing 100k endpoints has pauses shorter than that. Never less than 11 s:
/// the proxy gives freed memory back at most every 10 s, and once more after the last sync.
fn settled_rss(child: &Child) -> u64 {
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    let mut last = vm_rss_kib(child);
    let mut stable = 0;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = vm_rss_kib(child);
        stable = if now.abs_diff(last) < 1024 { stable + 1 } else { 0 };
        if stable >= 3 || started.elapsed() > Duration::from_secs(60) {
            return now;
        }
        last = now;
    }
}

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn big_slice(endpoints: usize) -> String {
    let mut text = String::from(
        "{\"apiVersion\":\"discovery.k8s.io/v1\",\"kind\":\"EndpointSlice\",\
         \"metadata\":{\"name\":\"big-1\",\"namespace\":\"default\",\
         \"labels\":{\"kubernetes.io/service-name\":\"big\"}},\"addressType\":\"IPv4\",\
         \"ports\":[{\"name\":\"http\",\"port\":8080,\"protocol\":\"TCP\"}],\"endpoints\":[",
    );
    for i in 0..endpoints {
        if i > 0 {
            text.push(',');
        }
        text.push_str(&format!(
            "{{\"addresses\":[\"10.{}.{}.{}\"],\"conditions\":{{\"ready\":true}},\"nodeName\":\"node-{}\"}}",
            64 + i / 65536,
            (i / 256) % 256,
            i % 256,
            i % 50
        ));
    }
    text.push_str("]}\n");
    text
}

#[test]
#[ignore = "a measurement: run by hand with --ignored --nocapture (see the file's docs)"]
fn rss_over_six_cycles_of_a_100k_endpoint_slice() {
    ferry_tests::require_root!();
    let netns = ferry_tests::Netns::new("pmem");
    let dir = tempfile::tempdir().unwrap();
    let base = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n---\n\
                apiVersion: v1\nkind: Service\nmetadata:\n  name: big\n  namespace: default\n\
                spec:\n  clusterIP: 10.96.0.50\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n";
    write(&dir.path().join("base.yaml"), base);
    let bin = std::env::var("FERRY_PROXY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ferry-proxy").into());
    let mut child = netns
        .command(&bin)
        .args(["run", "--manifests"])
        .arg(dir.path())
        .args(["--hostname-override", "node-a"])
        .args([
            "--healthz-bind-address",
            "127.0.0.1:0",
            "--metrics-bind-address",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let slice = big_slice(100_000);
    let baseline = settled_rss(&child);
    println!("binary {bin}");
    println!("baseline VmRSS {:.1} MiB", baseline as f64 / 1024.0);
    let slice_path = dir.path().join("big.json");
    for cycle in 1..=6 {
        write(&slice_path, &slice);
        let added = settled_rss(&child);
        std::fs::remove_file(&slice_path).unwrap();
        let removed = settled_rss(&child);
        println!(
            "cycle {cycle}: with the slice {:.1} MiB, after removal {:.1} MiB ({:.2}x baseline)",
            added as f64 / 1024.0,
            removed as f64 / 1024.0,
            removed as f64 / baseline as f64
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
