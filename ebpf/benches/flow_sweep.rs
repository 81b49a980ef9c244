//! What one pass of the flow sweep costs over a full flow table (`ferry_nat4` at its
//! capacity, `layout::MAX_NAT_FLOWS` = 262,144 entries, i.e. 131,072 connections), beside a
//! plain read of every entry in the same run (the baseline: what any walk of the table
//! costs from user space, two system calls an entry).
//!
//! The tables are made and pinned in a bpf file system of the bench's own (no program is
//! loaded or attached) and filled from here. Medians of `FERRY_BENCH_PASSES` (default 5):
//! - read only: every entry read, nothing decided;
//! - sweep, nothing expired: every flow just used (the steady state of a busy node);
//! - sweep, all expired: every entry re-read and deleted (the table refilled between passes).
//!
//! Run: `cargo bench -p ferry-ebpf --bench flow_sweep` (root).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use ferry_ebpf::{monotonic_ns, FlowSweeper, FlowTimeouts};

const ENTRIES: u32 = 262_144;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A `ferry_nat4` key: an IPv4 flow (saddr, daddr, sport, dport, proto, pad).
fn flow(saddr: u32, daddr: u32, sport: u16, dport: u16) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[0..4].copy_from_slice(&saddr.to_ne_bytes());
    k[4..8].copy_from_slice(&daddr.to_ne_bytes());
    k[8..10].copy_from_slice(&sport.to_be_bytes());
    k[10..12].copy_from_slice(&dport.to_be_bytes());
    k[12] = libc::IPPROTO_TCP as u8;
    k
}

/// Flags of a flow entry: SEEN, and SEEN with FIN (`FERRY_FLOW_*`).
const OPEN: u32 = 1;
const CLOSED: u32 = 1 | 2;

/// A `ferry_nat4_entry`: rewrite to `to`, last seen at `last_seen_ns`, with `flags`.
fn entry(to: [u8; 16], last_seen_ns: u64, flags: u32) -> [u8; 32] {
    let mut v = [0u8; 32];
    v[0..16].copy_from_slice(&to);
    v[16..24].copy_from_slice(&last_seen_ns.to_ne_bytes());
    v[24..28].copy_from_slice(&flags.to_ne_bytes());
    v
}

/// Fills the table with ENTRIES / 2 connections (both directions, as the tc program writes
/// them: client -> NodePort becomes node -> endpoint, and back), all last seen at `at`.
fn fill(map: &mut BpfHashMap<MapData, [u8; 16], [u8; 32]>, at: u64, flags: u32) {
    let (node, nodeport, endpoint) = (0x0a00_0001u32, 30080u16, 0x0a01_0001u32);
    for i in 0..ENTRIES / 2 {
        let client = 0x6400_0000u32 + i;
        let snat_port = 61000 + (i % 4536) as u16;
        let endpoint = endpoint + i / 4536;
        let forth = flow(client, node, 40000, nodeport);
        let rewritten = flow(node, endpoint, snat_port, 8080);
        let back = flow(endpoint, node, 8080, snat_port);
        let restored = flow(node, client, nodeport, 40000);
        map.insert(forth, entry(rewritten, at, flags), 0).expect("fill");
        map.insert(back, entry(restored, at, flags), 0).expect("fill");
    }
}

fn create(path: &std::path::Path, name: &str, key: u32, value: u32) {
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(path.join(name))
        .args([
            "type",
            "lru_hash",
            "key",
            &key.to_string(),
            "value",
            &value.to_string(),
        ])
        .args(["entries", &ENTRIES.to_string(), "name", name])
        .output()
        .expect("run bpftool (Debian package bpftool)");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    ferry_tests::require_root!();
    let passes = env_usize("FERRY_BENCH_PASSES", 5).max(1);
    let bpffs = common::TestBpffs::new();
    let pin_dir = bpffs.path().join("bench");
    let maps = pin_dir.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    create(&maps, "ferry_nat4", 16, 32);
    create(&maps, "ferry_nat6", 40, 56);
    let data = MapData::from_pin(maps.join("ferry_nat4")).unwrap();
    let mut nat4: BpfHashMap<MapData, [u8; 16], [u8; 32]> =
        BpfHashMap::try_from(Map::from_map_data(data).unwrap()).unwrap();
    let mut sweeper = FlowSweeper::open(&pin_dir).unwrap();
    let timeouts = FlowTimeouts::default();

    fill(&mut nat4, monotonic_ns(), OPEN);
    let (mut read, mut kept, mut deleted) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..passes {
        let t = Instant::now();
        let n = nat4.iter().filter(|e| e.is_ok()).count();
        read.push(t.elapsed());
        // An LRU map evicts a little before its capacity (per-CPU free lists).
        assert!(n > ENTRIES as usize * 99 / 100, "the table must be full: {n}");

        let r = sweeper.sweep(&timeouts).unwrap();
        assert_eq!((r.entries, r.removed), (n, 0));
        kept.push(r.took);
    }
    for _ in 0..passes {
        // Closed flows last seen an hour ago (or at boot): past the FIN timeout.
        fill(
            &mut nat4,
            monotonic_ns().saturating_sub(3600 * 1_000_000_000),
            CLOSED,
        );
        let r = sweeper.sweep(&timeouts).unwrap();
        assert!(
            r.entries > ENTRIES as usize * 99 / 100,
            "the table must be full: {r:?}"
        );
        assert_eq!(r.removed, r.entries, "every entry expired");
        deleted.push(r.took);
    }
    let (read, kept, deleted) = (median(read), median(kept), median(deleted));
    println!(
        "flow table of {ENTRIES} entries ({} connections), median of {passes} passes, same run",
        ENTRIES / 2
    );
    println!("{:<34} {:>10} {:>12} {:>10}", "", "pass", "per entry", "vs read");
    for (what, d) in [
        ("read every entry (baseline)", read),
        ("sweep, nothing expired", kept),
        ("sweep, everything expired", deleted),
    ] {
        println!(
            "{what:<34} {:>8.1}ms {:>10.0}ns {:>9.2}x",
            d.as_secs_f64() * 1e3,
            d.as_nanos() as f64 / f64::from(ENTRIES),
            d.as_secs_f64() / read.as_secs_f64()
        );
    }
}
