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
//! Then NodePort packets per second through one core, each back end on a node of its own
//! (ferry-bridge Pods, a machine outside): a UDP flood from one socket outside, its thread
//! pinned to one CPU, to the NodePort of a Service whose one endpoint is a Pod counting what
//! arrives, for `FERRY_BENCH_PPS_SECONDS` (default 2; 0 skips it). Everything on the
//! packet's way (veth, tc or nftables, conntrack, forwarding, bridge, the Pod's socket
//! queue) runs in softirq on the sender's CPU, in the sender's syscalls or in that CPU's
//! ksoftirqd; CPU per packet is the sender thread's CPU time plus ksoftirqd's, divided by
//! the packets the Pod got, so other processes on the machine do not count (packets per
//! second do depend on how much of the CPU the sender gets). Baseline in the same run: the
//! same flood straight to the Pod's address through the same node; "vs direct" is what
//! the NodePort adds per packet.
//!
//! Run: `cargo bench -p ferry-proxy --bench ebpf_backend` (root; `FERRY_BIN_DIR=target/debug`
//! when only the debug plugins are built).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_proxy::backend::ebpf::{pin_dir, EbpfBackend};
use ferry_proxy::backend::nftables::{synthetic_table, NftablesBackend};
use ferry_proxy::backend::Backend;
use ferry_proxy::changes::Changes;
use ferry_proxy::plan::{Endpoint, Family, Plan, Protocol, ServicePort, ServicePortId};
use ferry_tests::bench::env_usize;
use ferry_tests::{require_root, EbpfSandbox, Node, PodNetwork, NODE_IP};

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
            policy: None,
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

/// The NodePort of the flood's Service, and the Pod's port.
const FLOOD_NODE_PORT: u16 = 30999;
const SINK_PORT: u16 = 9999;
/// The CPU the sender is pinned to.
const FLOOD_CPU: usize = 0;

/// One flood: datagrams sent and received, and CPU per received packet.
struct Flood {
    sent: u64,
    received: u64,
    seconds: f64,
    cpu_per_packet: Duration,
}

impl Flood {
    fn pps(&self) -> f64 {
        self.received as f64 / self.seconds
    }
}

/// CPU time of the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The CPU time so far of `ksoftirqd/<cpu>` (utime + stime from /proc, in clock ticks),
/// where the kernel finishes softirq work a syscall leaves over.
fn ksoftirqd_time(cpu: usize) -> Duration {
    let want = format!("ksoftirqd/{cpu}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        if std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == want) {
            let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
            // Fields after the ")" that ends the command: state is the 1st, utime the 12th.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            // SAFETY: sysconf has no memory effects.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
            let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
            return Duration::from_nanos(ticks * 1_000_000_000 / hz);
        }
    }
    Duration::ZERO
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only
    // touch that set and this thread's affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Floods `to` from the machine outside for `seconds`, counting at the Pod's sink.
fn flood(net: &PodNetwork, sink: &UdpSocket, to: SocketAddr, seconds: f64) -> Flood {
    let stop = AtomicBool::new(false);
    let received = AtomicU64::new(0);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if sink.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let before = received.load(Ordering::Relaxed);
        let (sent, cpu, wall, got) = net.outside.run(|| {
            pin_to_cpu(FLOOD_CPU);
            let socket = UdpSocket::bind("0.0.0.0:0").expect("bind the sender");
            socket.connect(to).expect("connect the sender");
            let payload = [0x5au8; 18];
            let (cpu0, soft0, start) = (thread_cpu_time(), ksoftirqd_time(FLOOD_CPU), Instant::now());
            let mut sent = 0u64;
            while start.elapsed().as_secs_f64() < seconds {
                for _ in 0..64 {
                    if socket.send(&payload).is_ok() {
                        sent += 1;
                    }
                }
            }
            let cpu = thread_cpu_time() - cpu0 + ksoftirqd_time(FLOOD_CPU).saturating_sub(soft0);
            let wall = start.elapsed();
            // Let the last datagrams arrive before counting.
            std::thread::sleep(Duration::from_millis(200));
            (sent, cpu, wall, received.load(Ordering::Relaxed))
        });
        stop.store(true, Ordering::Relaxed);
        let received = got - before;
        Flood {
            sent,
            received,
            seconds: wall.as_secs_f64(),
            cpu_per_packet: cpu / received.max(1) as u32,
        }
    })
}

/// A Service with NodePort FLOOD_NODE_PORT/UDP whose one endpoint is `pod`.
fn flood_plan(pod: IpAddr, cluster_cidr: &str) -> Plan {
    let mut services = synthetic_table(0, 0, 0);
    services.settings.cluster_cidrs = vec![cluster_cidr.parse().expect("the Pod subnet")];
    let id = ServicePortId {
        namespace: "bench".into(),
        name: "flood".into(),
        port_name: "udp".into(),
        protocol: Protocol::Udp,
        family: Family::V4,
    };
    let ep = Endpoint {
        ip: pod,
        port: SINK_PORT,
        is_local: true,
        ready: true,
    };
    let port = ServicePort {
        node_port: Some(FLOOD_NODE_PORT),
        cluster_endpoints: vec![ep.clone()],
        external_endpoints: vec![ep],
        ..ServicePort::new(id.clone(), Some(IpAddr::from([10, 96, 99, 99])), 53)
    };
    services.ports.insert(id, port);
    Plan {
        services,
        policy: None,
    }
}

/// Straight to the Pod, then through the NodePort, on a node whose Services `make`'s back
/// end programs.
fn measure_nodeport(tag: &str, seconds: f64, make: &(dyn Fn() -> Box<dyn Backend> + Sync)) -> (Flood, Flood) {
    let net = PodNetwork::new(tag);
    let (pod, pod_ip) = net.add_pod("sink");
    let sink = pod.run(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("sink socket");
        // A deep queue: the sink's CPU must not be what drops packets.
        let _ = s.set_recv_buffer_size(32 << 20);
        s.bind(&SocketAddr::new(pod_ip, SINK_PORT).into())
            .expect("bind the sink");
        let s = UdpSocket::from(s);
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        s
    });
    let plan = flood_plan(pod_ip, &net.subnet);
    net.node.netns().run(|| {
        let mut backend = make();
        backend
            .sync(&plan, &Changes::all())
            .expect("sync the flood's Service");
        let direct = flood(&net, &sink, SocketAddr::new(pod_ip, SINK_PORT), seconds);
        let node_ip: IpAddr = NODE_IP.parse().unwrap();
        let nodeport = flood(&net, &sink, SocketAddr::new(node_ip, FLOOD_NODE_PORT), seconds);
        drop(backend);
        (direct, nodeport)
    })
}

/// One row; `baseline` is the same node's flood straight to the Pod.
fn print_flood(what: &str, f: &Flood, baseline: &Flood) {
    let extra = f.cpu_per_packet.as_nanos() as i128 - baseline.cpu_per_packet.as_nanos() as i128;
    println!(
        "{what:<34} {:>10.0} {:>10} {:>10} {:>9}ns {:>+9}ns {:>7.2}x",
        f.pps(),
        f.sent,
        f.received,
        f.cpu_per_packet.as_nanos(),
        extra,
        f.cpu_per_packet.as_secs_f64() / baseline.cpu_per_packet.as_secs_f64(),
    );
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

    let seconds = env_usize("FERRY_BENCH_PPS_SECONDS", 2) as f64;
    if seconds == 0.0 {
        return;
    }
    let (nft_direct, nft_np) = measure_nodeport("pps-nft", seconds, &|| Box::new(NftablesBackend::new()));
    let pps_sandbox = EbpfSandbox::new("pps-ebpf");
    let pps_dir = pin_dir(pps_sandbox.pin_root(), "pps");
    let pps_cgroup = pps_sandbox.cgroup().to_owned();
    let (ebpf_direct, ebpf_np) = measure_nodeport("pps-ebpf", seconds, &|| {
        Box::new(EbpfBackend::new(&pps_dir, &pps_cgroup).expect("load the eBPF back end"))
    });
    println!();
    println!(
        "UDP flood from outside, one socket, sender pinned to CPU {FLOOD_CPU}, {seconds} s each; same run"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>11} {:>11} {:>8}",
        "", "pps", "sent", "received", "CPU/packet", "vs direct", "CPU/base"
    );
    print_flood("nftables node: straight to the Pod", &nft_direct, &nft_direct);
    print_flood("nftables node: NodePort", &nft_np, &nft_direct);
    print_flood("eBPF node: straight to the Pod", &ebpf_direct, &ebpf_direct);
    print_flood("eBPF node: NodePort", &ebpf_np, &ebpf_direct);
    println!(
        "NodePort eBPF / nftables: {:.2}x the packets per second, {:.2}x the CPU per packet",
        ebpf_np.pps() / nft_np.pps(),
        ebpf_np.cpu_per_packet.as_secs_f64() / nft_np.cpu_per_packet.as_secs_f64()
    );
}
