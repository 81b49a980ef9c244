//! The daemon started with `ip netns exec`: its command gets a fresh /sys with neither
//! bpffs nor a cgroup v2 mount. The data plane must still load (mounting both in the
//! command's private mount namespace), translate, and clean up, without a mount leaking to
//! the machine.
//!
//! This file's main plays both parts: run by cargo it builds the bench and runs itself
//! again under `ip netns exec` in the node netns, with CHILD_ENV naming the test cgroup.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use common::Bench;
use ferry_ebpf::{cgroup2_root, ferry_programs_attached, EbpfDataplane, Frontend, Protocol, ServiceBackends};

const CHILD_ENV: &str = "FERRY_EBPF_NETNS_EXEC_CHILD";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn main() {
    match std::env::var(CHILD_ENV) {
        Ok(spec) => child(&spec),
        Err(_) => parent(),
    }
}

#[allow(clippy::unnecessary_cast)] // __fsword_t is narrower on some architectures
fn is_bpffs(path: &str) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

fn parent() {
    print!("test daemon_started_with_ip_netns_exec ... ");
    ferry_tests::require_root!();
    let bench = Bench::new("ebpf-nsexec");
    let host_bpffs = is_bpffs("/sys/fs/bpf");
    let cgroup_name = bench.cgroup.path().file_name().unwrap().to_str().unwrap();
    let spec = format!("{cgroup_name} {} {}", bench.vip, bench.endpoints[0]);
    let out = Command::new("ip")
        .args(["netns", "exec", bench.node.name()])
        .arg(std::env::current_exe().unwrap())
        .env(CHILD_ENV, spec)
        .output()
        .expect("run ip netns exec");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the child under ip netns exec failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let vip = SocketAddr::new(bench.vip, 80).to_string();
    // The fresh /sys had neither: both were mounted by the data plane.
    assert!(stdout.contains("bpffs_before=false"), "{stdout}");
    assert!(stdout.contains("cgroup2_root=/sys/fs/cgroup\n"), "{stdout}");
    assert!(stdout.contains(&format!("peer={vip}")), "{stdout}");
    assert!(stdout.contains("cleanup=ok"), "{stdout}");
    // Nothing stayed attached, and the child's mounts stayed in its mount namespace.
    assert_eq!(
        ferry_programs_attached(bench.cgroup.path()).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        is_bpffs("/sys/fs/bpf"),
        host_bpffs,
        "a bpffs mount leaked to the machine"
    );
    println!("ok");
}

/// Under `ip netns exec`: load as the daemon would, connect through the Service, clean up.
fn child(spec: &str) {
    let mut parts = spec.split_whitespace();
    let (cgroup_name, vip, endpoint) = (
        parts.next().unwrap(),
        parts.next().unwrap().parse().unwrap(),
        parts.next().unwrap().parse().unwrap(),
    );
    println!("bpffs_before={}", is_bpffs("/sys/fs/bpf"));
    let root = cgroup2_root().unwrap();
    println!("cgroup2_root={}", root.display());
    let cgroup = root.join(cgroup_name);
    let pin_dir = Path::new("/sys/fs/bpf/ferry/nsexec-test");
    let mut dp = EbpfDataplane::load(pin_dir, &cgroup).unwrap_or_else(|e| panic!("load: {e}"));
    let frontend = Frontend::inside(vip, 80, Protocol::Tcp);
    let backends = ServiceBackends {
        endpoints: vec![endpoint],
        affinity_seconds: None,
        keep_source: false,
        source_ranges: Vec::new(),
    };
    dp.upsert_service(frontend, &backends).unwrap();
    let probe = Command::new(env!("CARGO_BIN_EXE_ferry-ebpf-probe"))
        .arg("--cgroup")
        .arg(&cgroup)
        .args(["tcp", &SocketAddr::new(vip, 80).to_string()])
        .output()
        .unwrap();
    print!("{}", String::from_utf8_lossy(&probe.stdout));
    drop(dp);
    EbpfDataplane::cleanup(pin_dir, &cgroup).unwrap_or_else(|e| panic!("cleanup: {e}"));
    println!("cleanup=ok");
}
