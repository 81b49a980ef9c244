//! ferry-proxy at scale: the figures of issue 5's "Benchmark" section, in one run, each
//! beside its goal.
//!
//! A generator makes N ClusterIP Services (TCP 80 -> 8080, spread over 50 namespaces) with
//! 10 endpoints each, as the Service and EndpointSlice objects a source hands the proxy
//! (the same JSON a manifests directory holds). Measured:
//!
//! - full sync (plan + apply) at 1k and N Services: a `Store` filled with the objects, the
//!   real `plan`, then `NftablesBackend::sync`, on a thread inside a fresh node netns (its
//!   netlink socket is opened there); each repetition in a fresh netns;
//! - at N, in the last of those: one added Service and one changed endpoint, each as the
//!   sync loop does it (store upsert, `plan_services` of the dirty Service, sync), and a
//!   resync with nothing changed (full re-plan, every port compared, nothing sent);
//! - the rule count (`SyncStats`, checked against `nft -a list table`);
//! - the memory of a real `ferry-proxy run --manifests DIR` after its first sync (VmRSS 1 s
//!   after it, and VmHWM, the peak), at 1k and N Services, at N Services plus N Pods
//!   (realistic `kubectl get -o json` objects on 100 nodes, one in ten on this one), and
//!   with N/10 NetworkPolicies more (enforced on this node's Pods); with `FERRY_BENCH_BASELINE_PROXY=PATH` (another build of ferry-proxy, e.g. of
//!   the commit before a change), the same for that build, run by run in turn, with the
//!   ratio;
//! - the first packet: the time of a TCP connect from a client pod to a ClusterIP whose one
//!   endpoint is a server pod (pods on ferry-bridge), on a node whose table holds 10
//!   Services and on one holding N (the others with fake endpoints), and to the server's
//!   pod IP directly on each node; the four series interleaved connect by connect.
//!
//! Run: `make bench`, or `cargo build --release --workspace --bins` (the latency part runs
//! ferry-bridge and ferry-ipam from target/release) then `cargo bench -p ferry-proxy
//! --bench proxy`. `FERRY_BENCH_SERVICES` (default 10000) replaces 10k for quick runs;
//! `FERRY_BENCH_REPS` (default 3) full syncs per size, `FERRY_BENCH_CHANGES` (default 20)
//! single changes of each kind, `FERRY_BENCH_CONNECTS` (default 1000) connects per series.
//! `FERRY_BENCH_ONLY=memory` runs only the process memory part (it needs only
//! `cargo build --release -p ferry-proxy`).
//! Everything happens in namespaces the bench creates; nothing touches the root netns.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_proxy::backend::nftables::{NftablesBackend, TABLE};
use ferry_proxy::backend::Backend;
use ferry_proxy::changes::Changes;
use ferry_proxy::plan::services::{plan, plan_services};
use ferry_proxy::plan::{NodeSettings, Plan};
use ferry_proxy::source::{Event, Kind, Object};
use ferry_proxy::store::Store;
use ferry_tests::bench::env_usize;
use ferry_tests::{
    endpoint_slice, ferry_bin, require_root, service, wait_until, Netns, Node, PodNetwork, ProxyProcess,
    SliceEndpoint, TIMEOUT,
};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};

/// Endpoints per generated Service.
const ENDPOINTS: usize = 10;
/// The size the goals are stated for.
const GOAL_SERVICES: usize = 10_000;
/// The node name the proxy runs as; endpoint 0 of each Service is "on" it.
const NODE_NAME: &str = "bench-node";
/// Where the generated endpoints live (never contacted; also the cluster CIDR).
const FAKE_PODS: &str = "100.64.0.0/10";

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(samples: &[Duration]) -> Duration {
    percentile(samples, 0.5)
}

fn time(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1e3)
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

fn micros(d: Duration) -> String {
    format!("{:.0} us", d.as_secs_f64() * 1e6)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// "met" / "NOT met", with a note when the run's size is not the one the goal is for.
fn verdict(ok: bool, n: usize) -> String {
    let v = if ok { "met" } else { "NOT met" };
    if n == GOAL_SERVICES {
        v.to_string()
    } else {
        format!("{v} (goal is for {GOAL_SERVICES})")
    }
}

fn v4_plus(base: Ipv4Addr, offset: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + offset as u32)
}

/// ClusterIP of generated Service `i`: 172.16.0.0/12 + i + 1.
fn cluster_ip(i: usize) -> Ipv4Addr {
    v4_plus(Ipv4Addr::new(172, 16, 0, 0), i + 1)
}

/// Endpoint `j` of generated Service `i`: 100.64.0.0/10 + 16 i + j.
fn fake_endpoint(i: usize, j: usize) -> Ipv4Addr {
    v4_plus(Ipv4Addr::new(100, 64, 0, 0), i * 16 + j)
}

/// A Service `ns/name` (TCP 80 -> 8080, port "http") and its EndpointSlice holding `ips`
/// (ready; the first on this node), as `kubectl get -o json` shows them.
fn service_objects(ns: &str, name: &str, cip: Ipv4Addr, ips: &[Ipv4Addr]) -> [Value; 2] {
    let mut svc = service(
        name,
        &cip.to_string(),
        &[("http", "TCP", 80, json!(8080))],
        json!({}),
    );
    svc["metadata"]["namespace"] = json!(ns);
    let ips: Vec<String> = ips.iter().map(Ipv4Addr::to_string).collect();
    let eps: Vec<SliceEndpoint> = ips
        .iter()
        .enumerate()
        .map(|(j, ip)| {
            (
                ip.as_str(),
                if j == 0 { NODE_NAME } else { "other-node" },
                true,
                true,
                false,
            )
        })
        .collect();
    let mut slice = endpoint_slice(name, "a", &eps, &[("http", "TCP", 8080)]);
    slice["metadata"]["namespace"] = json!(ns);
    [svc, slice]
}

/// Generated Service `i` with `ENDPOINTS` fake endpoints.
fn generated(i: usize) -> [Value; 2] {
    let ips: Vec<Ipv4Addr> = (0..ENDPOINTS).map(|j| fake_endpoint(i, j)).collect();
    service_objects(&format!("ns{}", i % 50), &format!("svc-{i}"), cluster_ip(i), &ips)
}

fn to_object(v: Value) -> Object {
    match v["kind"].as_str() {
        Some("Service") => Object::from(serde_json::from_value::<Service>(v).expect("a valid Service")),
        Some("EndpointSlice") => {
            Object::from(serde_json::from_value::<EndpointSlice>(v).expect("a valid EndpointSlice"))
        }
        other => panic!("generator made a {other:?}"),
    }
}

/// Pod `i` of the generated cluster, as `kubectl get -o json` shows a Deployment's Pod
/// (less its managed fields): labels, owner, one container with a named port, status
/// with conditions and a container status, on one of 100 nodes.
fn generated_pod(i: usize) -> Value {
    let ip = v4_plus(Ipv4Addr::new(100, 96, 0, 0), i).to_string();
    let app = format!("svc-{}", i / 2);
    let time = "2025-05-01T10:00:00Z";
    let conditions: Vec<Value> = [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]
    .iter()
    .map(|t| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": time}))
    .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("{app}-7d9c5b-{i:05}"),
            "generateName": format!("{app}-7d9c5b-"),
            "namespace": format!("ns{}", i % 50),
            "uid": format!("7e1c2b1a-0000-4000-8000-{i:012}"),
            "resourceVersion": format!("{}", 1000 + i),
            "creationTimestamp": time,
            "labels": {"app": app, "pod-template-hash": "7d9c5b"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-7d9c5b"),
                                 "uid": "5c0b7a52-1111-4222-8333-444455556666",
                                 "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            // One in ten on this node: the Pods NetworkPolicy enforces here.
            "nodeName": if i.is_multiple_of(10) { NODE_NAME.to_string() } else { format!("node-{}", i % 100) },
            "serviceAccountName": "default",
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "terminationGracePeriodSeconds": 30,
            "containers": [{
                "name": "app", "image": "registry.example.com/app:1.2.3", "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]
            }],
            "volumes": [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}}],
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": {
            "phase": "Running",
            "hostIP": format!("172.18.0.{}", 2 + i % 100),
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "qosClass": "Burstable",
            "startTime": time,
            "conditions": conditions,
            "containerStatuses": [{
                "name": "app", "ready": true, "started": true, "restartCount": 0,
                "image": "registry.example.com/app:1.2.3",
                "imageID": "registry.example.com/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "containerID": format!("containerd://{i:064x}"),
                "state": {"running": {"startedAt": time}}
            }]
        }
    })
}

fn objects(services: impl Iterator<Item = [Value; 2]>) -> Vec<Object> {
    services.flatten().map(to_object).collect()
}

/// What a manifests directory read (or an API relist) gives the store.
fn snapshot(objects: Vec<Object>) -> Event {
    Event::Snapshot {
        kinds: vec![Kind::Service, Kind::EndpointSlice, Kind::Node],
        objects,
    }
}

fn settings(cluster_cidr: &str) -> NodeSettings {
    NodeSettings {
        node_name: NODE_NAME.into(),
        cluster_cidrs: vec![cluster_cidr.parse().expect("a CIDR")],
        nodeport_addresses: Vec::new(),
    }
}

/// Rules in Ferry's table as nft lists them (a rule line ends with its handle; chain and
/// set declarations end with `{ # handle N`), run from a thread inside the node netns.
fn listed_rules() -> usize {
    let out = std::process::Command::new("nft")
        .args(["-a", "list", "table", "inet", TABLE])
        .output()
        .expect("run nft");
    assert!(
        out.status.success(),
        "nft list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("# handle") && !l.contains('{'))
        .count()
}

/// Busy and total jiffies of all CPUs so far (`/proc/stat`, first line).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    let total: u64 = fields.iter().take(8).sum();
    (total - idle, total)
}

/// Waits (at most 5 s) until the machine is mostly idle over 200 ms: deleting a table of
/// 10k chains leaves the kernel freeing it in a worker after nft returns, and the next
/// figure must not share the CPUs with that.
fn quiesce() {
    for _ in 0..25 {
        let (busy0, total0) = cpu_jiffies();
        std::thread::sleep(Duration::from_millis(200));
        let (busy1, total1) = cpu_jiffies();
        if total1 > total0 && (busy1 - busy0) as f64 / ((total1 - total0) as f64) < 0.1 {
            return;
        }
    }
}

/// Plan, apply and total times of one sync.
#[derive(Clone, Copy)]
struct Timing {
    plan: Duration,
    apply: Duration,
    total: Duration,
}

/// What the in-process sync part measured at one size.
#[derive(Default)]
struct SizeReport {
    services: usize,
    store_fill: Vec<Duration>,
    full: Vec<Timing>,
    rules: usize,
    listed_rules: usize,
    added: Vec<Timing>,
    endpoint_changed: Vec<Timing>,
    no_change: Vec<Timing>,
}

/// Full syncs of `n` generated Services, each in a fresh node netns; in the last one,
/// `changes` single changes of each kind.
fn sync_size(n: usize, reps: usize, changes: usize) -> SizeReport {
    let all = objects((0..n).map(generated));
    let settings = settings(FAKE_PODS);
    let mut report = SizeReport {
        services: n,
        ..Default::default()
    };
    for rep in 0..reps {
        let last = rep + 1 == reps;
        let changes = if last { changes } else { 0 };
        // Prepared outside the timings: what a source would deliver.
        let added: Vec<Vec<Object>> = (0..changes)
            .map(|k| objects([generated(n + k)].into_iter()))
            .collect();
        let moved: Vec<Object> = (0..changes)
            .map(|k| {
                let i = (k * 7919) % n;
                let mut ips: Vec<Ipv4Addr> = (0..ENDPOINTS).map(|j| fake_endpoint(i, j)).collect();
                ips[0] = v4_plus(Ipv4Addr::new(100, 127, 0, 0), k + 1);
                let [_, slice] =
                    service_objects(&format!("ns{}", i % 50), &format!("svc-{i}"), cluster_ip(i), &ips);
                to_object(slice)
            })
            .collect();
        let node = Node::new("bench-sync");
        let objects = all.clone();
        node.netns().run(|| {
            let mut store = Store::new();
            let start = Instant::now();
            store.apply(snapshot(objects));
            store.take_dirty();
            report.store_fill.push(start.elapsed());

            let mut backend = NftablesBackend::new();
            let start = Instant::now();
            let mut current = Plan {
                services: plan(&store, &settings),
                policy: None,
            };
            let planned = start.elapsed();
            let stats = backend
                .sync(&current, &Changes::all())
                .unwrap_or_else(|e| panic!("full sync of {n} Services failed: {e}"));
            let total = start.elapsed();
            report.full.push(Timing {
                plan: planned,
                apply: total - planned,
                total,
            });
            assert_eq!(
                current.services.ports.len(),
                n,
                "the plan must hold every generated Service"
            );
            if last {
                report.rules = stats.rules;
                report.listed_rules = listed_rules();
            }

            // One change at a time, as the sync loop handles it.
            let mut one_change = |event_objects: Vec<Object>, what: &str| {
                let start = Instant::now();
                for object in event_objects {
                    store.apply(Event::Upsert(object));
                }
                let dirty = store.take_dirty();
                let changed = plan_services(&mut current.services, &store, &dirty);
                let planned = start.elapsed();
                let stats = backend
                    .sync(&current, &Changes::service_ports(changed))
                    .unwrap_or_else(|e| panic!("{what} failed: {e}"));
                let total = start.elapsed();
                assert_eq!(stats.changed_ports, 1, "{what} must change one Service port");
                Timing {
                    plan: planned,
                    apply: total - planned,
                    total,
                }
            };
            for objects in added {
                report.added.push(one_change(objects, "one added Service"));
            }
            for slice in moved {
                report
                    .endpoint_changed
                    .push(one_change(vec![slice], "one changed endpoint"));
            }
            // The periodic resync: everything re-planned, nothing to send.
            for _ in 0..changes.min(5) {
                let start = Instant::now();
                let replanned = Plan {
                    services: plan(&store, &settings),
                    policy: None,
                };
                let planned = start.elapsed();
                let stats = backend.sync(&replanned, &Changes::all()).expect("resync");
                let total = start.elapsed();
                assert_eq!(stats.changed_ports, 0);
                assert_eq!(backend.last_transaction(), "", "nothing changed, nothing sent");
                report.no_change.push(Timing {
                    plan: planned,
                    apply: total - planned,
                    total,
                });
            }
            // Untimed: an empty netns is quick to delete, so the next repetition does not
            // share the CPU with the kernel freeing this table.
            backend.cleanup().expect("cleanup");
        });
        drop(node);
        quiesce();
    }
    report
}

/// The proxy process's figures at one size.
struct ProcessReport {
    start_to_sync: Duration,
    /// The first sync's duration as the proxy itself measured it (plan + apply).
    own_sync: Duration,
    /// Its plan and apply times, from its log line "first sync done".
    own_split: Option<(Duration, Duration)>,
    rules: usize,
    rss_kib: u64,
    hwm_kib: u64,
}

/// `/metrics` of the proxy in `ns` (its loopback, port 10249).
fn scrape(ns: &Netns) -> Option<String> {
    ns.run(|| -> std::io::Result<String> {
        let mut conn =
            TcpStream::connect_timeout(&"127.0.0.1:10249".parse().unwrap(), Duration::from_secs(1))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        conn.read_to_string(&mut out)?;
        Ok(out)
    })
    .ok()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the proxy's /proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn write_list(dir: &Path, name: &str, items: Vec<Value>) {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    std::fs::write(dir.join(name), serde_json::to_vec(&list).unwrap()).unwrap();
}

/// NetworkPolicy `j` of [`proxy_process`]'s `policies`, as in `benches/policy_plan.rs`:
/// it isolates the two Pods of one app (one of them on this node) for ingress from
/// another app's Pods in the namespaces of one team and from an address block with a
/// hole, on the named port, and for egress to every namespace on the named port (the
/// name is resolved on every destination Pod).
fn generated_policy(j: usize) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": format!("ns{}", (j * 10) % 50), "name": format!("policy-{j}")},
        "spec": {
            "podSelector": {"matchLabels": {"app": format!("svc-{}", j * 5)}},
            "ingress": [{
                "from": [
                    {"namespaceSelector": {"matchLabels": {"team": format!("t{}", j % 10)}},
                     "podSelector": {"matchLabels": {"app": format!("svc-{}", j * 5 + 1)}}},
                    {"ipBlock": {"cidr": "100.64.0.0/10", "except": [format!("100.96.{}.0/24", j % 256)]}}
                ],
                "ports": [{"port": "http"}]
            }],
            "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "http"}]}]
        }
    })
}

/// Runs `bin run --manifests DIR` (a ferry-proxy) with `n` generated Services (in 4 List
/// files), `pods` generated Pods (in one more, with their 50 Namespaces) and `policies`
/// NetworkPolicies (in one more), written before it starts; waits for its first sync and
/// reads its memory.
fn proxy_process(bin: &Path, n: usize, pods: usize, policies: usize) -> ProcessReport {
    let node = Node::new("bench-rss");
    let dir = node.state_dir().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let files = 4;
    for f in 0..files {
        let items = (f * n / files..(f + 1) * n / files).flat_map(generated).collect();
        write_list(&dir, &format!("services-{f}.json"), items);
    }
    if pods > 0 {
        let namespaces = (0..50).map(|i| {
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": format!("ns{i}"), "labels": {"team": format!("t{}", i % 10)}}})
        });
        write_list(
            &dir,
            "pods.json",
            namespaces.chain((0..pods).map(generated_pod)).collect(),
        );
    }
    if policies > 0 {
        write_list(
            &dir,
            "policies.json",
            (0..policies).map(generated_policy).collect(),
        );
    }
    let start = Instant::now();
    let mut proxy =
        ProxyProcess::start_bin(bin, node.netns(), &dir, NODE_NAME, &["--cluster-cidr", FAKE_PODS]);
    let mut text = String::new();
    let synced = wait_until(Duration::from_secs(120), || {
        text = scrape(node.netns()).unwrap_or_default();
        metric(&text, "ferry_proxy_sync_proxy_rules_duration_seconds_count").is_some_and(|c| c >= 1.0)
    });
    let start_to_sync = start.elapsed();
    assert!(
        synced.is_some(),
        "ferry-proxy did not sync {n} Services within 120 s; its log:\n{}",
        proxy.log()
    );
    let pid = proxy.pid().expect("the proxy runs");
    // Settled: a second after the first sync.
    std::thread::sleep(Duration::from_secs(1));
    let (rss_kib, hwm_kib) = memory(pid);
    let services = metric(&text, "ferry_proxy_services").unwrap_or(0.0) as usize;
    assert_eq!(services, n, "the proxy's first sync must cover every Service");
    let report = ProcessReport {
        start_to_sync,
        own_sync: Duration::from_secs_f64(
            metric(&text, "ferry_proxy_sync_proxy_rules_duration_seconds_sum").unwrap_or(0.0),
        ),
        own_split: first_sync_split(&proxy.log()),
        rules: metric(&text, "ferry_proxy_rules").unwrap_or(0.0) as usize,
        rss_kib,
        hwm_kib,
    };
    proxy.kill();
    // Untimed, as above: leave an empty netns behind.
    let _ = node
        .netns()
        .command("nft")
        .args(["delete", "table", "inet", TABLE])
        .output();
    drop(node);
    quiesce();
    report
}

/// `plan_ms` and `apply_ms` of the proxy's "first sync done" log line (colours removed).
fn first_sync_split(log: &str) -> Option<(Duration, Duration)> {
    let line = log.lines().find(|l| l.contains("first sync done"))?;
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An ANSI escape: ESC [ ... letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let field = |name: &str| -> Option<Duration> {
        let ms: f64 = plain
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()?;
        Some(Duration::from_secs_f64(ms / 1e3))
    };
    Some((field("plan_ms")?, field("apply_ms")?))
}

/// A node with a client and a server pod on ferry-bridge, the server answering on
/// :8080, and the proxy's table holding `services` Services, one of them ("web", at
/// `WEB_IP`:80) with the server as its only endpoint.
struct LatencyNode {
    // Field order is drop order: the server stops before its namespace goes.
    _server: ferry_tests::Server,
    client: ferry_tests::Pod,
    _server_pod: ferry_tests::Pod,
    _net: PodNetwork,
    server_ip: IpAddr,
}

/// The ClusterIP of the real Service, outside the generated range.
const WEB_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 10);

fn latency_node(services: usize) -> LatencyNode {
    let net = PodNetwork::new("bench-lat");
    let (server_pod, server_ip) = net.add_pod("server");
    let (client, _) = net.add_pod("client");
    let (node, subnet) = (&net.node, &net.subnet);
    let bridged = node
        .netns()
        .run(|| std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables"));
    assert_eq!(
        bridged.as_deref().map(str::trim).ok(),
        Some("1"),
        "net.bridge.bridge-nf-call-iptables must be 1 in the node netns (is br_netfilter loaded?)"
    );

    let IpAddr::V4(server_v4) = server_ip else {
        panic!("an IPv4 pod address")
    };
    let mut objs = objects([service_objects("default", "web", WEB_IP, &[server_v4])].into_iter());
    objs.extend(objects((0..services - 1).map(generated)));
    let settings = settings(subnet);
    node.netns().run(|| {
        let mut store = Store::new();
        store.apply(snapshot(objs));
        let table = Plan {
            services: plan(&store, &settings),
            policy: None,
        };
        assert_eq!(table.services.ports.len(), services);
        NftablesBackend::new()
            .sync(&table, &Changes::all())
            .unwrap_or_else(|e| panic!("sync of {services} Services failed: {e}"));
    });
    let server = server_pod.tcp_server(SocketAddr::new(server_ip, 8080));
    let answer = client
        .tcp_request(SocketAddr::new(WEB_IP.into(), 80))
        .unwrap_or_else(|e| panic!("the ClusterIP does not answer at {services} Services: {e}"));
    assert!(
        answer.ends_with(&format!(" {server_ip}:8080")),
        "the ClusterIP must lead to the server pod: {answer}"
    );
    LatencyNode {
        _server: server,
        client,
        _server_pod: server_pod,
        _net: net,
        server_ip,
    }
}

/// Connect times of each `(client netns, destination)` series: `rounds` rounds (after
/// `warmup` untimed ones), one connect per series each, the order rotating every round.
/// Each series has its own thread inside its client's netns; only the connect is timed.
fn connect_times(series: &[(&Netns, SocketAddr)], warmup: usize, rounds: usize) -> Vec<Vec<Duration>> {
    std::thread::scope(|s| {
        let workers: Vec<_> = series
            .iter()
            .map(|&(ns, to)| {
                let (job_tx, job_rx) = mpsc::channel::<()>();
                let (done_tx, done_rx) = mpsc::channel::<std::io::Result<Duration>>();
                s.spawn(move || {
                    ns.run(move || {
                        for () in job_rx {
                            let start = Instant::now();
                            let result = TcpStream::connect_timeout(&to, TIMEOUT).map(|conn| {
                                let took = start.elapsed();
                                drop(conn);
                                took
                            });
                            if done_tx.send(result).is_err() {
                                break;
                            }
                        }
                    })
                });
                (job_tx, done_rx, to)
            })
            .collect();
        let mut samples = vec![Vec::with_capacity(rounds); series.len()];
        for round in 0..warmup + rounds {
            for k in 0..series.len() {
                let k = (k + round) % series.len();
                let (job, done, to) = &workers[k];
                job.send(()).unwrap();
                let took = done
                    .recv()
                    .unwrap()
                    .unwrap_or_else(|e| panic!("connect to {to} failed: {e}"));
                if round >= warmup {
                    samples[k].push(took);
                }
            }
        }
        samples
        // The job senders drop here: the workers end and the scope joins them.
    })
}

/// The memory of `ferry-proxy run` at 1k and N Services, at N Services plus N Pods, and
/// with N/10 NetworkPolicies more; with a baseline build, each configuration is run with
/// both builds in turn (baseline first), so both see the same machine.
fn memory_part(proxy: &Path, baseline: Option<&Path>, sizes: &[usize], n: usize) {
    let mut configs: Vec<(usize, usize, usize)> = sizes.iter().map(|&s| (s, 0, 0)).collect();
    configs.push((n, n, 0));
    configs.push((n, n, n / 10));
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for &(services, pods, policies) in &configs {
        eprintln!("proxy bench: memory at {services} Services, {pods} Pods, {policies} policies...");
        if let Some(baseline) = baseline {
            theirs.push(proxy_process(baseline, services, pods, policies));
        }
        ours.push(proxy_process(proxy, services, pods, policies));
    }
    println!(
        "ferry-proxy run --manifests DIR: ClusterIP Services x {ENDPOINTS} endpoints (4 List files), \
         Pods in a fifth, NetworkPolicies (NP) in a sixth; memory 1 s after the first sync"
    );
    let header: String = configs
        .iter()
        .map(|(s, p, np)| {
            let label = match (p, np) {
                (0, _) => format!("{s} Services"),
                (p, 0) => format!("{s} Svc + {p} Pods"),
                (p, np) => format!("{s} Svc+{p} Pods+{np} NP"),
            };
            format!(" {label:>22}")
        })
        .collect();
    println!("{:<44}{header}", "");
    let line = |label: &str, cells: Vec<String>| {
        let cells: String = cells.iter().map(|c| format!(" {c:>22}")).collect();
        println!("{label:<44}{cells}");
    };
    line("VmRSS, this build", ours.iter().map(|p| mib(p.rss_kib)).collect());
    line(
        "VmHWM (peak), this build",
        ours.iter().map(|p| mib(p.hwm_kib)).collect(),
    );
    line(
        "start to first sync, this build",
        ours.iter().map(|p| time(p.start_to_sync)).collect(),
    );
    if let Some(baseline) = baseline {
        println!("baseline: {}", baseline.display());
        line("VmRSS, baseline", theirs.iter().map(|p| mib(p.rss_kib)).collect());
        line(
            "VmHWM (peak), baseline",
            theirs.iter().map(|p| mib(p.hwm_kib)).collect(),
        );
        line(
            "start to first sync, baseline",
            theirs.iter().map(|p| time(p.start_to_sync)).collect(),
        );
        line(
            "VmRSS, this build / baseline",
            ours.iter()
                .zip(&theirs)
                .map(|(a, b)| format!("{:.2}x", a.rss_kib as f64 / b.rss_kib as f64))
                .collect(),
        );
    }
    let at_goal = ours[configs.len() - 3].rss_kib;
    println!(
        "goal: < 100 MiB at {GOAL_SERVICES} Services x {ENDPOINTS} endpoints: {}",
        verdict(at_goal < 100 * 1024, n)
    );
}

fn main() {
    if !require_root("proxy benchmark") {
        return;
    }
    let n = env_usize("FERRY_BENCH_SERVICES", GOAL_SERVICES).max(10);
    let reps = env_usize("FERRY_BENCH_REPS", 3).max(1);
    let changes = env_usize("FERRY_BENCH_CHANGES", 20).max(1);
    let connects = env_usize("FERRY_BENCH_CONNECTS", 1000).max(10);
    let sizes: Vec<usize> = if n > 1000 { vec![1000, n] } else { vec![n] };
    let started = Instant::now();
    let baseline = std::env::var_os("FERRY_BENCH_BASELINE_PROXY")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    if let Some(path) = &baseline {
        assert!(
            path.is_file(),
            "FERRY_BENCH_BASELINE_PROXY={}: no such file",
            path.display()
        );
    }
    let only_memory = std::env::var("FERRY_BENCH_ONLY").is_ok_and(|v| v == "memory");
    // Checked up front: the latency part needs them, and finding out after a minute is no fun.
    let proxy_bin = ferry_bin("ferry-proxy");
    if only_memory {
        memory_part(&proxy_bin, baseline.as_deref(), &sizes, n);
        println!();
        println!("bench wall time: {}", time(started.elapsed()));
        return;
    }
    ferry_bin("ferry-bridge");
    ferry_bin("ferry-ipam");

    eprintln!("proxy bench: in-process syncs...");
    let reports: Vec<SizeReport> = sizes
        .iter()
        .map(|&size| sync_size(size, reps, if size == n { changes } else { 0 }))
        .collect();
    eprintln!("proxy bench: ferry-proxy processes...");
    let processes: Vec<ProcessReport> = sizes
        .iter()
        .map(|&size| proxy_process(&proxy_bin, size, 0, 0))
        .collect();
    eprintln!("proxy bench: connect latency...");
    let small = latency_node(10);
    let big = latency_node(n);
    let web = SocketAddr::new(WEB_IP.into(), 80);
    let series = [
        (small.client.netns(), web),
        (small.client.netns(), SocketAddr::new(small.server_ip, 8080)),
        (big.client.netns(), web),
        (big.client.netns(), SocketAddr::new(big.server_ip, 8080)),
    ];
    quiesce();
    let conn = connect_times(&series, 50, connects);
    drop(big);
    drop(small);

    let nft = std::process::Command::new("nft")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |c| c.get());
    println!("ferry-proxy: ClusterIP Services (TCP) x {ENDPOINTS} endpoints each; {nft}; {cpus} CPUs");
    println!(
        "in-process: Store -> plan -> NftablesBackend::sync in a fresh node netns; \
         {reps} full syncs per size, {changes} single changes of each kind"
    );
    println!();
    println!(
        "{:<42} {:>9} {:>9} {:>9} {:>9}  {:<8} verdict",
        "sync (medians; p90 of the total)", "plan", "apply", "total", "p90", "goal"
    );
    let row = |label: String, t: &[Timing], goal: &str, verdict: &str| {
        let pick = |f: fn(&Timing) -> Duration| median(&t.iter().map(f).collect::<Vec<_>>());
        let totals: Vec<Duration> = t.iter().map(|t| t.total).collect();
        println!(
            "{:<42} {:>9} {:>9} {:>9} {:>9}  {:<8} {}",
            label,
            time(pick(|t| t.plan)),
            time(pick(|t| t.apply)),
            time(median(&totals)),
            time(percentile(&totals, 0.9)),
            goal,
            verdict
        );
    };
    for r in &reports {
        let goal = r.services == n && n >= 1000;
        let total = median(&r.full.iter().map(|t| t.total).collect::<Vec<_>>());
        row(
            format!("full sync, {} Services", r.services),
            &r.full,
            if goal { "< 2 s" } else { "" },
            &if goal {
                verdict(total < Duration::from_secs(2), n)
            } else {
                String::new()
            },
        );
    }
    let at_n = reports.last().unwrap();
    let added = median(&at_n.added.iter().map(|t| t.total).collect::<Vec<_>>());
    row(
        format!("one added Service at {n}"),
        &at_n.added,
        "< 20 ms",
        &format!(
            "{}; kube-proxy nftables: 141 ms",
            verdict(added < Duration::from_millis(20), n)
        ),
    );
    row(
        format!("one endpoint changed at {n}"),
        &at_n.endpoint_changed,
        "",
        "",
    );
    row(
        format!("resync, nothing changed, at {n}"),
        &at_n.no_change,
        "",
        "(full re-plan + diff; nothing sent)",
    );
    println!(
        "(filling the Store from the objects, not part of a sync: {})",
        reports
            .iter()
            .map(|r| format!("{} at {}", time(median(&r.store_fill)), r.services))
            .collect::<Vec<_>>()
            .join(", ")
    );

    println!();
    let header: String = sizes
        .iter()
        .map(|s| format!(" {:>19}", format!("{s} Services")))
        .collect();
    println!("{:<50}{header}", "size");
    let line = |label: &str, cells: Vec<String>| {
        let cells: String = cells.iter().map(|c| format!(" {c:>19}")).collect();
        println!("{label:<50}{cells}");
    };
    line(
        "nftables rules (SyncStats / nft -a list)",
        reports
            .iter()
            .map(|r| format!("{} / {}", r.rules, r.listed_rules))
            .collect(),
    );
    line(
        "ferry-proxy run: VmRSS 1 s after the first sync",
        processes.iter().map(|p| mib(p.rss_kib)).collect(),
    );
    line(
        "ferry-proxy run: VmHWM (peak RSS)",
        processes.iter().map(|p| mib(p.hwm_kib)).collect(),
    );
    line(
        "ferry-proxy run: start to first sync done",
        processes.iter().map(|p| time(p.start_to_sync)).collect(),
    );
    line(
        "ferry-proxy run: first sync, its own measure",
        processes.iter().map(|p| time(p.own_sync)).collect(),
    );
    line(
        "ferry-proxy run: of which plan / apply (its log)",
        processes
            .iter()
            .map(|p| match p.own_split {
                Some((plan, apply)) => format!("{} / {}", time(plan), time(apply)),
                None => "-".into(),
            })
            .collect(),
    );
    line(
        "ferry-proxy run: rules (metrics)",
        processes.iter().map(|p| p.rules.to_string()).collect(),
    );

    println!();
    println!(
        "{:<50} {:>9} {:>9}",
        format!("TCP connect from a pod ({connects} each, interleaved)"),
        "median",
        "p90"
    );
    let labels = [
        "ClusterIP, table of 10 Services".to_string(),
        "pod IP directly, same node".to_string(),
        format!("ClusterIP, table of {n} Services"),
        "pod IP directly, same node".to_string(),
    ];
    for (label, samples) in labels.iter().zip(&conn) {
        println!(
            "{label:<50} {:>9} {:>9}",
            micros(median(samples)),
            micros(percentile(samples, 0.9))
        );
    }
    let ratio = |a: &[Duration], b: &[Duration], p: f64| {
        percentile(a, p).as_secs_f64() / percentile(b, p).as_secs_f64()
    };
    println!(
        "{:<50} {:>9} {:>9}  {:<8} verdict (median)",
        "ratio", "median", "p90", "goal"
    );
    let ratios = [
        (format!("ClusterIP@{n} / ClusterIP@10"), &conn[2], &conn[0], 1.1),
        (
            "ClusterIP / direct, 10 Services".to_string(),
            &conn[0],
            &conn[1],
            1.2,
        ),
        (
            format!("ClusterIP / direct, {n} Services"),
            &conn[2],
            &conn[3],
            1.2,
        ),
    ];
    for (label, a, b, goal) in ratios {
        let m = ratio(a, b, 0.5);
        println!(
            "{label:<50} {:>8.2}x {:>8.2}x  {:<8} {}",
            m,
            ratio(a, b, 0.9),
            format!("<= {goal}x"),
            verdict(m <= goal, n)
        );
    }
    println!();
    println!("bench wall time: {}", time(started.elapsed()));
}
