//! The eBPF back end against the nftables one, applying the same synthetic plans in the
//! same run: what a sync costs each, not counting planning (the same for both).
//!
//! For N ClusterIP Services with 10 endpoints each (`synthetic_table`): the first sync of
//! the whole plan, one endpoint changed with its port named (as the sync loop hands it),
//! one Service added (a new port with 10 endpoints, named the same way), a resync with nothing changed but every port compared (`Changes::all()`), and the first
//! sync of a restarted back end over what the kernel holds. Each back end on a thread in a
//! node netns of its own; the eBPF one attached to a cgroup and a bpffs the bench makes
//! (never the machine's root cgroup). Medians of `FERRY_BENCH_CHANGES` (default 20)
//! single changes; `FERRY_BENCH_SERVICES` (default 10000).
//!
//! Run: `cargo bench -p ferry-proxy --bench ebpf_backend` (root).

use std::time::{Duration, Instant};

use ferry_proxy::backend::ebpf::{pin_dir, EbpfBackend};
use ferry_proxy::backend::nftables::{synthetic_table, NftablesBackend};
use ferry_proxy::backend::Backend;
use ferry_proxy::changes::Changes;
use ferry_proxy::plan::{Endpoint, Plan};
use ferry_tests::bench::env_usize;
use ferry_tests::{require_root, EbpfSandbox, Node};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

struct Figures {
    full: Duration,
    one_endpoint: Duration,
    one_added: Duration,
    no_change_all: Duration,
    restart: Duration,
}

/// Runs the four measurements with back ends made by `make` (called on the node thread).
fn measure(
    node: &Node,
    services: usize,
    changes: usize,
    make: &(dyn Fn() -> Box<dyn Backend> + Sync),
) -> Figures {
    node.netns().run(|| {
        let plan = Plan {
            services: synthetic_table(services, 10, 0),
        };
        let mut backend = make();
        let t = Instant::now();
        backend.sync(&plan, &Changes::all()).expect("full sync");
        let full = t.elapsed();

        let mut plan = plan;
        let ids: Vec<_> = plan.services.ports.keys().take(changes).cloned().collect();
        let mut one = Vec::new();
        for (k, id) in ids.iter().enumerate() {
            let port = plan.services.ports.get_mut(id).unwrap();
            // A new endpoint in place of the last one.
            let last = port.cluster_endpoints.len() - 1;
            port.cluster_endpoints[last] = Endpoint {
                ip: std::net::IpAddr::from([10, 200, (k >> 8) as u8, k as u8]),
                ..port.cluster_endpoints[last].clone()
            };
            port.cluster_endpoints.sort();
            port.external_endpoints = port.cluster_endpoints.clone();
            let t = Instant::now();
            backend
                .sync(&plan, &Changes::service_ports([id.clone()]))
                .expect("one change");
            one.push(t.elapsed());
        }
        let mut added = Vec::new();
        let template = plan.services.ports.values().next().expect("a port").clone();
        for k in 0..changes {
            let mut port = template.clone();
            port.id.name = format!("added-{k}");
            port.cluster_ip = Some(std::net::IpAddr::from([10, 201, (k >> 8) as u8, k as u8]));
            let id = port.id.clone();
            plan.services.ports.insert(id.clone(), port);
            let t = Instant::now();
            backend
                .sync(&plan, &Changes::service_ports([id]))
                .expect("one Service added");
            added.push(t.elapsed());
        }
        let mut none = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            backend.sync(&plan, &Changes::all()).expect("resync");
            none.push(t.elapsed());
        }
        drop(backend);
        let mut restarted = make();
        let t = Instant::now();
        restarted.sync(&plan, &Changes::all()).expect("restart");
        let restart = t.elapsed();
        Figures {
            full,
            one_endpoint: median(one),
            one_added: median(added),
            no_change_all: median(none),
            restart,
        }
    })
}

fn main() {
    require_root!();
    let services = env_usize("FERRY_BENCH_SERVICES", 10_000);
    let changes = env_usize("FERRY_BENCH_CHANGES", 20);

    let nft_node = Node::new("bench-nft");
    let nft = measure(&nft_node, services, changes, &|| Box::new(NftablesBackend::new()));

    let ebpf_node = Node::new("bench-ebpf");
    let sandbox = EbpfSandbox::new("bench-ebpf");
    let dir = pin_dir(sandbox.pin_root(), "bench");
    let cgroup = sandbox.cgroup().to_owned();
    let ebpf = measure(&ebpf_node, services, changes, &|| {
        Box::new(EbpfBackend::new(&dir, &cgroup).expect("load the eBPF back end"))
    });

    println!("{services} Services x 10 endpoints, apply only (no planning); same run");
    println!("{:<40} {:>12} {:>12} {:>8}", "", "nftables", "eBPF", "ratio");
    for (what, a, b) in [
        ("full sync", nft.full, ebpf.full),
        (
            "one endpoint changed (median)",
            nft.one_endpoint,
            ebpf.one_endpoint,
        ),
        ("one Service added (median)", nft.one_added, ebpf.one_added),
        (
            "nothing changed, all compared (median)",
            nft.no_change_all,
            ebpf.no_change_all,
        ),
        ("first sync after a restart", nft.restart, ebpf.restart),
    ] {
        println!(
            "{what:<40} {:>10.2}ms {:>10.2}ms {:>7.2}x",
            a.as_secs_f64() * 1e3,
            b.as_secs_f64() * 1e3,
            a.as_secs_f64() / b.as_secs_f64()
        );
    }
}
