//! The Pod network between nodes, measured: TCP connect latency and bulk transfer rate
//! from a Pod on node-0 to a Pod on the same node (the baseline: one bridge, no routing),
//! on node-1 (host-gw: same subnet) and on node-2 (VXLAN: behind a router), all in one
//! cluster and one run, the three targets interleaved so the machine's noise falls on each
//! alike; then the time from a Node written to the manifests directory to its routes in
//! place on another node.
//!
//! Run: `cargo bench -p ferry-tests --bench multinode` (as root). The daemons are the
//! binaries in `FERRY_BIN_DIR` (default: this profile's; `FERRY_BIN_DIR=target/debug`
//! avoids a release build of the daemon, whose speed does not enter the data path).
//! `FERRY_BENCH_CONNECTS` (default 300), `FERRY_BENCH_MB` (default 64) and
//! `FERRY_BENCH_ROUNDS` (default 5) set the sizes.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ferry_tests::bench::{env_usize, percentile};
use ferry_tests::cluster::{first_host, send_to_sink, tcp_sink, Cluster};
use ferry_tests::{require_root, wait_until};

fn main() {
    if !require_root("multinode benchmark") {
        return;
    }
    let connects = env_usize("FERRY_BENCH_CONNECTS", 300);
    let megabytes = env_usize("FERRY_BENCH_MB", 64);
    let rounds = env_usize("FERRY_BENCH_ROUNDS", 5);

    let mut cluster = Cluster::across_a_router("bm", "auto");
    cluster.start();
    let (client, _, _) = cluster.nodes[0].pod("client");
    let targets = [
        ("same node", cluster.nodes[0].pod("local")),
        ("host-gw", cluster.nodes[1].pod("hostgw")),
        ("VXLAN", cluster.nodes[2].pod("vxlan")),
    ];
    let gw2 = first_host(&cluster.nodes[2].pod4).to_string();
    assert!(
        wait_until(Duration::from_secs(10), || cluster.nodes[0]
            .ferry_routes()
            .contains(&gw2))
        .is_some(),
        "no VXLAN route on node-0"
    );
    let mut servers = Vec::new();
    let mut sinks = Vec::new();
    for (_, (pod, a4, _)) in &targets {
        servers.push(pod.tcp_server(SocketAddr::new(*a4, 8080)));
        sinks.push(tcp_sink(pod, SocketAddr::new(*a4, 9000)));
    }

    // Connect latency: the time connect() takes, measured inside the client Pod's netns.
    let addrs: Vec<SocketAddr> = targets
        .iter()
        .map(|(_, (_, a4, _))| SocketAddr::new(*a4, 8080))
        .collect();
    let mut connect: Vec<Vec<Duration>> = vec![Vec::new(); targets.len()];
    let samples = client.run(|| {
        let mut out: Vec<Vec<Duration>> = vec![Vec::new(); addrs.len()];
        for _ in 0..connects {
            for (i, addr) in addrs.iter().enumerate() {
                let started = Instant::now();
                let conn = TcpStream::connect_timeout(addr, Duration::from_secs(3)).expect("connect");
                out[i].push(started.elapsed());
                drop(conn);
            }
        }
        out
    });
    for (i, s) in samples.into_iter().enumerate() {
        connect[i] = s;
    }

    // Bulk rate: `megabytes` MiB per transfer, `rounds` rounds, interleaved.
    let mut rate: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for _ in 0..rounds {
        for (i, (_, (_, a4, _))) in targets.iter().enumerate() {
            let started = Instant::now();
            let n = send_to_sink(
                &client,
                SocketAddr::new(*a4, 9000),
                1 << 20,
                megabytes,
                Duration::ZERO,
            )
            .unwrap();
            assert_eq!(n, megabytes << 20);
            rate[i].push(n as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e9);
        }
    }

    println!(
        "Pod to Pod from node-0, {connects} connects and {rounds} x {megabytes} MiB per target, one run"
    );
    println!(
        "{:<10} {:>14} {:>14} {:>9} {:>16} {:>9}",
        "target", "connect p50", "connect p90", "ratio", "bulk median", "ratio"
    );
    let base_p50 = percentile(&mut connect[0].clone(), 0.5);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base_rate = median(&mut rate[0].clone());
    for (i, (name, _)) in targets.iter().enumerate() {
        let p50 = percentile(&mut connect[i], 0.5);
        let p90 = percentile(&mut connect[i], 0.9);
        let r = median(&mut rate[i]);
        println!(
            "{:<10} {:>11.1} us {:>11.1} us {:>8.2}x {:>11.2} Gb/s {:>8.2}x",
            name,
            p50.as_secs_f64() * 1e6,
            p90.as_secs_f64() * 1e6,
            p50.as_secs_f64() / base_p50.as_secs_f64(),
            r,
            r / base_rate
        );
    }

    // A Node added: from the manifest written to node-0's route to its Pods in place
    // (the manifests source polls every 200 ms; the API source is pushed to at once).
    let objects = cluster.node_objects();
    let mut added = Vec::new();
    for _ in 0..rounds {
        cluster.write_all("nodes", &objects[..2]);
        assert!(wait_until(Duration::from_secs(3), || !cluster.nodes[0]
            .ferry_routes()
            .contains(&gw2))
        .is_some());
        let started = Instant::now();
        cluster.write_all("nodes", &objects);
        while !cluster.nodes[0].ferry_routes().contains(&gw2) {
            assert!(started.elapsed() < Duration::from_secs(3), "the route never came");
        }
        added.push(started.elapsed());
    }
    println!(
        "Node added -> route in place on another node: median {:.0} ms, max {:.0} ms over {rounds} rounds \
         (includes the 200 ms manifests poll)",
        percentile(&mut added.clone(), 0.5).as_secs_f64() * 1e3,
        added.iter().max().unwrap().as_secs_f64() * 1e3
    );
    for s in &sinks {
        s.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
