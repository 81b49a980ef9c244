//! What a Service costs a connection, through each back end: TCP connect latency and
//! request/response latency from a client Pod to a ClusterIP, beside the same server's Pod
//! IP reached directly from the same client (the baseline), in one run (issue 12,
//! "Benchmark").
//!
//! Four nodes, each a `PodNetwork` (ferry-bridge Pods) with a client Pod and a server Pod:
//! the nftables back end with 10 Services and with N, the eBPF back end with 10 and with N
//! (N = `FERRY_BENCH_SERVICES`, default 10000; ClusterIP Services x 10 endpoints, the
//! measured one among them, the others' endpoints never contacted). The eBPF back end's
//! socket programs attach only to a cgroup the bench makes (`EbpfSandbox`), and the client's
//! sockets are made in it; the nftables nodes' clients use plain sockets.
//!
//! Measured, per node, to the ClusterIP and to the server's Pod IP (the baseline), and on
//! the eBPF nodes also to the Pod IP from a socket outside the cgroup (no program runs:
//! against the baseline, the programs' cost on a connect to no Service):
//! - connect: the time of `connect()` on a fresh socket, `FERRY_BENCH_CONNECTS` (default
//!   2000) per series; sockets are made before their sample is timed, up to 1,800 at a
//!   time (in a cgroup a batch takes a fork, after which the first writes to each page of
//!   the process fault: made one by one, that cost 10-15 us landed in the eBPF series'
//!   connects);
//! - request/response: on one established connection, 32 bytes out and the same 32 bytes
//!   echoed back, `FERRY_BENCH_ROUND_TRIPS` (default 20000) per series.
//!
//! All series of a kind run interleaved round by round (common/interleaved.rs), after
//! untimed warm-up rounds, so load from the rest of the machine falls on all alike; every
//! client thread runs on CPU 0 and every server thread on CPU 1, so no series gets a
//! luckier placement than another. The figures are p50, p90, p99 and p99.9 and their
//! ratios to the node's baseline (goal for eBPF: <= 1.05x); the load average is printed
//! before and after. A p99 of 2,000 samples rests on 20 of them and swung 0.99-1.35x from
//! run to run; `FERRY_BENCH_CONNECTS=20000` (about a minute) gives stable ratios.
//!
//! Last, untimed, the `connect4` program's own run time per connect on each eBPF node, to
//! the ClusterIP (a hit) and to the Pod IP (a miss), from the kernel's BPF run-time
//! statistics (`BPF_ENABLE_STATS`, on only for that phase).
//!
//! Run: `cargo bench -p ferry-proxy --bench service_latency` (root; `FERRY_BIN_DIR=target/debug`
//! when only the debug plugins are built). Everything happens in namespaces and a cgroup
//! the bench creates.

#[path = "common/interleaved.rs"]
mod interleaved;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ferry_proxy::backend::ebpf::{pin_dir, EbpfBackend};
use ferry_proxy::backend::nftables::{synthetic_table, NftablesBackend};
use ferry_proxy::backend::Backend;
use ferry_proxy::changes::Changes;
use ferry_proxy::plan::{Endpoint, Family, Plan, Protocol, ServicePort, ServicePortId};
use ferry_tests::bench::{env_usize, percentile};
use ferry_tests::{require_root, Client, EbpfSandbox, Pod, PodNetwork, Server, TIMEOUT};
use interleaved::{interleaved, Sample, Series};

/// The measured Service's ClusterIP: outside `synthetic_table`'s 172.16.0.0/12 addresses
/// for up to 65,536 Services.
const WEB_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 255, 10);
/// Service port and Pod port of the connect series (a server that answers and closes).
const CONNECT_PORT: (u16, u16) = (80, 8080);
/// Service port and Pod port of the request/response series (an echo server).
const ECHO_PORT: (u16, u16) = (81, 8081);
/// One request (and its echo): 31 bytes and the newline the echo server waits for.
const REQUEST: &[u8; 32] = b"0123456789abcdefghijklmnopqrstu\n";
/// The ratio issue 12 sets for the eBPF back end.
const GOAL: f64 = 1.05;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Nftables,
    Ebpf,
}

/// A node whose back end programs `services` Services, one of them the measured one with
/// the server Pod as its only endpoint.
struct LatencyNode {
    label: String,
    // Field order is drop order: servers, then the Pods, then the programs, then the node.
    _servers: [Server; 2],
    client: Pod,
    _server_pod: Pod,
    sandbox: Option<EbpfSandbox>,
    _net: PodNetwork,
    server_ip: IpAddr,
}

/// The measured Service: one port per series kind, the server Pod its only endpoint.
fn web_ports(server: IpAddr) -> Vec<ServicePort> {
    [("connect", CONNECT_PORT), ("echo", ECHO_PORT)]
        .into_iter()
        .map(|(name, (port, target))| {
            let id = ServicePortId {
                namespace: "bench".into(),
                name: "web".into(),
                port_name: name.into(),
                protocol: Protocol::Tcp,
                family: Family::V4,
            };
            let ep = Endpoint {
                ip: server,
                port: target,
                is_local: true,
                ready: true,
            };
            ServicePort {
                cluster_endpoints: vec![ep.clone()],
                external_endpoints: vec![ep],
                ..ServicePort::new(id, Some(WEB_IP.into()), port)
            }
        })
        .collect()
}

fn latency_node(kind: Kind, services: usize) -> LatencyNode {
    let tag = format!("lat-{}{services}", if kind == Kind::Ebpf { "e" } else { "n" });
    let label = format!(
        "{}, {services} Services",
        if kind == Kind::Ebpf { "eBPF" } else { "nftables" }
    );
    let net = PodNetwork::new(&tag);
    let (server_pod, server_ip) = net.add_pod("server");
    let (client, _) = net.add_pod("client");
    let mut table = synthetic_table(services - 1, 10, 0);
    table.settings.cluster_cidrs = vec![net.subnet.parse().expect("the Pod subnet")];
    for port in web_ports(server_ip) {
        table.ports.insert(port.id.clone(), port);
    }
    let plan = Plan {
        services: table,
        policy: None,
    };
    let sandbox = (kind == Kind::Ebpf).then(|| EbpfSandbox::new(&tag));
    net.node.netns().run(|| {
        // The programs and rules stay in the kernel when the back end is dropped (the eBPF
        // one's links are pinned in the sandbox's bpffs).
        let mut backend: Box<dyn Backend> = match &sandbox {
            None => Box::new(NftablesBackend::new()),
            Some(s) => Box::new(
                EbpfBackend::new(&pin_dir(s.pin_root(), &tag), s.cgroup()).expect("load the eBPF back end"),
            ),
        };
        backend
            .sync(&plan, &Changes::all())
            .unwrap_or_else(|e| panic!("{label}: sync failed: {e}"));
    });
    let servers = [
        server_pod.tcp_server(SocketAddr::new(server_ip, CONNECT_PORT.1)),
        server_pod.tcp_echo_server(SocketAddr::new(server_ip, ECHO_PORT.1)),
    ];
    let node = LatencyNode {
        label,
        _servers: servers,
        client,
        _server_pod: server_pod,
        sandbox,
        _net: net,
        server_ip,
    };
    // The ClusterIP must lead to the server, through this node's back end.
    let answer = node
        .client()
        .tcp_request(SocketAddr::new(WEB_IP.into(), CONNECT_PORT.0))
        .unwrap_or_else(|e| panic!("{}: the ClusterIP does not answer: {e}", node.label));
    assert!(
        answer.ends_with(&format!(" {server_ip}:{}", CONNECT_PORT.1)),
        "{}: the ClusterIP must lead to the server Pod: {answer}",
        node.label
    );
    node
}

impl LatencyNode {
    /// The client Pod's process as the back end sees it: in the sandbox's cgroup for eBPF.
    fn client(&self) -> Client<'_> {
        Client {
            netns: self.client.netns(),
            cgroup: self.sandbox.as_ref().map(|s| s.cgroup()),
        }
    }

    /// The measured series of `port`: the Service's address and the server Pod's, from the
    /// client Pod (baseline second: ratios are against it). With `outside`, eBPF nodes add
    /// the Pod IP from a socket outside the cgroup, so no program runs on its connect: that
    /// against the baseline is the programs' cost on a miss (a connect to no Service).
    fn targets(&self, port: (u16, u16), outside: bool) -> Vec<(&'static str, SocketAddr, Client<'_>)> {
        let pod_ip = SocketAddr::new(self.server_ip, port.1);
        let mut targets = vec![
            ("ClusterIP", SocketAddr::new(WEB_IP.into(), port.0), self.client()),
            ("Pod IP (baseline)", pod_ip, self.client()),
        ];
        if outside && self.sandbox.is_some() {
            let plain = Client {
                netns: self.client.netns(),
                cgroup: None,
            };
            targets.push(("Pod IP, outside the cgroup", pod_ip, plain));
        }
        targets
    }
}

/// The same client again, for a series' thread (`Client` holds only references).
fn copy<'a>(client: &Client<'a>) -> Client<'a> {
    Client {
        netns: client.netns,
        cgroup: client.cgroup,
    }
}

/// Connects `socket` (made by the series' client) to `to`, timing `connect()` alone.
fn connect(socket: std::os::fd::OwnedFd, to: SocketAddr) -> std::io::Result<(socket2::Socket, Duration)> {
    let socket = socket2::Socket::from(socket);
    // SO_SNDTIMEO bounds connect() too: a lost SYN fails the series instead of hanging.
    socket.set_write_timeout(Some(TIMEOUT))?;
    let start = Instant::now();
    socket.connect(&to.into())?;
    Ok((socket, start.elapsed()))
}

/// Sockets a connect series makes at a time: all its sockets at once for the default
/// 2,000 connects, in batches for longer runs, so ten series stay under the open-file limit
/// of 20,000 that some hosts set as a hard limit.
const SOCKET_BATCH: usize = 1800;

/// `samples` connects, each on a socket of its own made before its sample is timed, in
/// batches (in a cgroup a batch is one fork, whose page faults then fall mostly in the
/// warm-up; with batches they recur every `SOCKET_BATCH` samples, in every in-cgroup
/// series alike).
fn connect_series<'a>(
    node: &'a LatencyNode,
    (what, to, client): (&str, SocketAddr, Client<'a>),
    samples: usize,
) -> Series<'a> {
    Series {
        label: format!("{}: connect to the {what} {to}", node.label),
        netns: node.client.netns(),
        start: Box::new(move || {
            let batch = samples.min(SOCKET_BATCH);
            let mut sockets = client.unconnected_tcp_sockets(to.is_ipv4(), batch)?;
            let sample: Sample<'a> = Box::new(move || {
                if sockets.is_empty() {
                    sockets = client.unconnected_tcp_sockets(to.is_ipv4(), batch)?;
                }
                let socket = sockets.pop().expect("a batch holds at least one socket");
                connect(socket, to).map(|(_, took)| took)
            });
            Ok(sample)
        }),
    }
}

fn echo_series<'a>(node: &'a LatencyNode, (what, to, client): (&str, SocketAddr, Client<'a>)) -> Series<'a> {
    Series {
        label: format!("{}: request/response to the {what} {to}", node.label),
        netns: node.client.netns(),
        start: Box::new(move || {
            let socket = client.unconnected_tcp_sockets(to.is_ipv4(), 1)?.remove(0);
            let (socket, _) = connect(socket, to)?;
            let mut conn = TcpStream::from(socket);
            conn.set_nodelay(true)?;
            conn.set_read_timeout(Some(TIMEOUT))?;
            let mut reply = [0u8; REQUEST.len()];
            let sample: Sample<'a> = Box::new(move || {
                let start = Instant::now();
                conn.write_all(REQUEST)?;
                conn.read_exact(&mut reply)?;
                let took = start.elapsed();
                if &reply != REQUEST {
                    return Err(std::io::Error::other("the echo differs from the request"));
                }
                Ok(took)
            });
            Ok(sample)
        }),
    }
}

/// Where the series' client threads run (they inherit it from the thread that spawns them)
/// and where the servers' threads do.
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

/// Pins the calling thread, and threads it spawns from now on, to `cpu` (when the machine
/// has it).
fn pin_to_cpu(cpu: usize) {
    if online_cpus() <= cpu {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only
    // touch that set and this thread's affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The machine's CPUs (`available_parallelism` counts only those this thread may use).
fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory effects.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize
}

/// Every connect series holds its sockets from the start: allow that many open files
/// (raising the hard limit too, as root may, for runs of tens of thousands of connects).
fn raise_fd_limit(wanted: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let wanted = wanted as libc::rlim_t;
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < wanted {
            let raised = libc::rlimit {
                rlim_cur: wanted,
                rlim_max: lim.rlim_max.max(wanted),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                lim.rlim_cur = lim.rlim_max.min(wanted);
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }
}

/// `BPF_CGROUP_INET4_CONNECT` in linux/bpf.h's `enum bpf_attach_type`.
const INET4_CONNECT: u32 = 10;

/// The time the node's `connect4` program itself runs per connect, to the ClusterIP (a
/// hit: lookups, endpoint pick, the `ferry_revnat` write) and to the Pod IP (a miss: one
/// lookup), from the kernel's run-time statistics of that program over `samples` connects
/// of each. Statistics are on only for this untimed phase: they add two clock reads to
/// every program run on the machine.
fn program_cost(node: &LatencyNode, samples: usize) -> Result<[Duration; 2], String> {
    let sandbox = node.sandbox.as_ref().ok_or("not an eBPF node")?;
    let ids = ferry_ebpf::attached_program_ids(sandbox.cgroup(), INET4_CONNECT).map_err(|e| e.to_string())?;
    let [id] = ids[..] else {
        return Err(format!(
            "{} connect4 programs on the cgroup, expected one",
            ids.len()
        ));
    };
    let totals = || -> Result<(Duration, u64), String> {
        let info = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == id)
            .ok_or(format!("program {id} is gone"))?;
        Ok((info.run_time(), info.run_count()))
    };
    let _stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| format!("BPF_ENABLE_STATS: {e}"))?;
    let per_run = |to: SocketAddr| -> Result<Duration, String> {
        let client = node.client();
        let sockets = node
            .client
            .netns()
            .run(|| client.unconnected_tcp_sockets(true, samples))
            .map_err(|e| e.to_string())?;
        let (time0, runs0) = totals()?;
        node.client.netns().run(|| {
            sockets
                .into_iter()
                .try_for_each(|socket| connect(socket, to).map(drop))
                .map_err(|e| e.to_string())
        })?;
        let (time1, runs1) = totals()?;
        let runs = (runs1 - runs0).max(1);
        Ok((time1 - time0) / runs as u32)
    };
    Ok([
        per_run(SocketAddr::new(WEB_IP.into(), CONNECT_PORT.0))?,
        per_run(SocketAddr::new(node.server_ip, CONNECT_PORT.1))?,
    ])
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn micros(d: Duration) -> String {
    format!("{:.2}us", d.as_secs_f64() * 1e6)
}

/// Each node with the names of its series.
type Rows<'a> = Vec<(&'a LatencyNode, Vec<(&'static str, SocketAddr, Client<'a>)>)>;

fn names<'a>(rows: &Rows<'a>) -> Vec<(&'a LatencyNode, Vec<&'static str>)> {
    rows.iter()
        .map(|(node, targets)| (*node, targets.iter().map(|t| t.0).collect()))
        .collect()
}

/// The percentiles printed, and their column names.
const PERCENTILES: [(f64, &str); 4] = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")];

/// Prints each node's series, then each one's ratio to the node's baseline (its second
/// series, the Pod IP from the client Pod) at every percentile. `rows` names each node's
/// series in the order of `samples`.
fn print_table(title: &str, rows: &[(&LatencyNode, Vec<&str>)], samples: &mut [Vec<Duration>]) {
    println!();
    print!("{title:<62}");
    for (_, name) in PERCENTILES {
        print!(" {name:>9}");
    }
    for (_, name) in PERCENTILES {
        print!(" {:>9}", format!("{name} x"));
    }
    println!();
    let mut samples = samples.iter_mut();
    for (node, names) in rows {
        let figures: Vec<Vec<Duration>> = names
            .iter()
            .map(|_| {
                let series = samples.next().expect("one series per row");
                PERCENTILES.iter().map(|&(p, _)| percentile(series, p)).collect()
            })
            .collect();
        let baseline = &figures[1];
        for (name, row) in names.iter().zip(&figures) {
            print!("{:<62}", format!("{}: {name}", node.label));
            for d in row {
                print!(" {:>9}", micros(*d));
            }
            if !std::ptr::eq(row, baseline) {
                for (d, base) in row.iter().zip(baseline) {
                    print!(" {:>8.2}x", d.as_secs_f64() / base.as_secs_f64());
                }
            }
            println!();
        }
    }
}

fn main() {
    require_root!();
    let services = env_usize("FERRY_BENCH_SERVICES", 10_000).max(10);
    let connects = env_usize("FERRY_BENCH_CONNECTS", 2000).max(10);
    let round_trips = env_usize("FERRY_BENCH_ROUND_TRIPS", 20_000).max(10);
    let load_before = loadavg();
    // Servers (made next) run on SERVER_CPU, clients on CLIENT_CPU: every series sees the
    // same placement, where leaving it to the scheduler gave two series of one node (same
    // client, same server, same packets) medians 1.6x apart.
    pin_to_cpu(SERVER_CPU);

    eprintln!("service latency: four nodes (nftables and eBPF, 10 and {services} Services)...");
    let nodes: Vec<LatencyNode> = [Kind::Nftables, Kind::Ebpf]
        .into_iter()
        .flat_map(|kind| [10, services].map(|n| (kind, n)))
        .map(|(kind, n)| latency_node(kind, n))
        .collect();

    eprintln!("service latency: {connects} connects per series...");
    let warmup = connects / 20;
    let connect_rows: Rows = nodes
        .iter()
        .map(|node| (node, node.targets(CONNECT_PORT, true)))
        .collect();
    let connect_series_count: usize = connect_rows.iter().map(|(_, t)| t.len()).sum();
    raise_fd_limit(connect_series_count * (warmup + connects).min(SOCKET_BATCH) + 1024);
    let series = connect_rows
        .iter()
        .flat_map(|(node, targets)| {
            targets
                .iter()
                .map(|(what, to, client)| connect_series(node, (what, *to, copy(client)), warmup + connects))
        })
        .collect();
    pin_to_cpu(CLIENT_CPU);
    let mut connect_times = interleaved(series, warmup, connects);

    eprintln!("service latency: {round_trips} round trips per series...");
    let echo_rows: Rows = nodes
        .iter()
        .map(|node| (node, node.targets(ECHO_PORT, false)))
        .collect();
    let series = echo_rows
        .iter()
        .flat_map(|(node, targets)| {
            targets
                .iter()
                .map(|(what, to, client)| echo_series(node, (what, *to, copy(client))))
        })
        .collect();
    let mut echo_times = interleaved(series, round_trips / 20, round_trips);

    println!(
        "Service latency, TCP, client Pod -> server Pod on one node (ferry-bridge); ClusterIP \
         Services x 10 endpoints; series interleaved round by round; ratio = ClusterIP / Pod \
         IP on the same node (goal for eBPF <= {GOAL}x); {} CPUs; load average {load_before} \
         before, {} after",
        online_cpus(),
        loadavg()
    );
    print_table(
        &format!("TCP connect ({connects} per series)"),
        &names(&connect_rows),
        &mut connect_times,
    );
    print_table(
        &format!("request/response, 32 B ({round_trips} per series)"),
        &names(&echo_rows),
        &mut echo_times,
    );

    println!();
    println!(
        "connect4 program run time per connect, {} connects each (kernel BPF run-time stats, untimed phase):",
        connects.min(SOCKET_BATCH)
    );
    for node in nodes.iter().filter(|n| n.sandbox.is_some()) {
        match program_cost(node, connects.min(SOCKET_BATCH)) {
            Ok([hit, miss]) => println!(
                "{:<40} to the ClusterIP (hit) {:>6} ns, to the Pod IP (miss) {:>6} ns",
                node.label,
                hit.as_nanos(),
                miss.as_nanos()
            ),
            Err(e) => println!("{:<40} not measured: {e}", node.label),
        }
    }
}
