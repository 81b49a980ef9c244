//! NetworkPolicy enforcement (table `inet ferry-policy`) with real packets.
//!
//! Each test builds its own node: a netns with a bridge `br0` (both families) and
//! `bridge-nf-call-iptables=1`, Pod netns on veths in it, each Pod serving TCP on ports 80
//! and 81 (answering with the peer address it saw), and an outside client on a routed
//! link. Policy tables are written by hand here (the planner has its own tests); the back
//! end runs on a thread inside the node netns. `ferry-proxy run` itself is exercised at
//! the end: policy changes within one second, SIGKILL and restart under a probing denied
//! client, `--network-policy=false`. Nothing outside these namespaces is touched.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_proxy::backend::nftables::NftablesBackend;
use ferry_proxy::backend::policy::TABLE;
use ferry_proxy::backend::Backend;
use ferry_proxy::changes::Changes;
use ferry_proxy::plan::policy::{
    AddressRange, Addresses, Allow, Clause, Isolation, PodPolicy, PolicyTable, PortRange, Ports,
};
use ferry_proxy::plan::{
    Endpoint, Family, NodeSettings, Plan, Protocol, ServicePort, ServicePortId, ServiceTable,
};
use ferry_tests::{require_root, unique_v4_subnet, unique_v6_subnet, Netns, Node, Server};

/// A denied connection is one that has not connected within this (an allowed one on a
/// bridge connects in well under a millisecond).
const DENIED_AFTER: Duration = Duration::from_millis(700);

struct TestPod {
    ns: ferry_tests::Pod,
    name: String,
    v4: IpAddr,
    v6: IpAddr,
    _servers: Vec<Server>,
}

impl TestPod {
    fn ips(&self) -> Vec<IpAddr> {
        vec![self.v4, self.v6]
    }
}

struct Bed {
    node: Node,
    pods: Vec<TestPod>,
    /// A machine outside the node, routed through it.
    outside: Netns,
    outside_v4: IpAddr,
}

/// "10.96.3.0/24" -> "10.96.3.".
fn v4_prefix(cidr: &str) -> String {
    cidr.rsplit_once(".0/").expect("an aligned /24").0.to_string() + "."
}

impl Bed {
    fn new(pods: &[&str]) -> Bed {
        let node = Node::new("policy-node");
        let ns = node.netns();
        node.forward_and_filter_bridged();
        let p4 = v4_prefix(&unique_v4_subnet(24));
        let p6 = unique_v6_subnet().trim_end_matches("/64").to_string();
        ns.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        ns.exec_ok(&["ip", "addr", "add", &format!("{p4}1/24"), "dev", "br0"]);
        ns.exec_ok(&["ip", "addr", "add", &format!("{p6}1/64"), "dev", "br0", "nodad"]);
        // A link-local address without DAD: until DAD is done the node sends no neighbour
        // solicitation for forwarded IPv6 packets (see proxy/tests/nftables.rs).
        ns.exec_ok(&["ip", "addr", "add", "fe80::1/64", "dev", "br0", "nodad"]);
        ns.exec_ok(&["ip", "link", "set", "br0", "up"]);
        let mut list = Vec::new();
        for (i, name) in pods.iter().enumerate() {
            let pod = node.pod(&format!("pod-{name}"));
            let (v4, v6) = (format!("{p4}{}", 10 + i), format!("{p6}{:x}", 10 + i));
            node.wire_pod(
                &pod,
                "br0",
                &format!("vp{i}"),
                &[&format!("{v4}/24"), &format!("{v6}/64")],
                &[&format!("{p4}1"), &format!("{p6}1")],
            );
            // [::] takes IPv4 too.
            let servers = [80, 81]
                .iter()
                .map(|port| pod.tcp_server(SocketAddr::new("::".parse().unwrap(), *port)))
                .collect();
            list.push(TestPod {
                ns: pod,
                name: name.to_string(),
                v4: v4.parse().unwrap(),
                v6: v6.parse().unwrap(),
                _servers: servers,
            });
        }
        let outside = node.client("outside");
        let net = v4_prefix(&unique_v4_subnet(24));
        node.connect_client(&outside, &format!("{net}2/24"), &format!("{net}1/24"));
        Bed {
            node,
            pods: list,
            outside,
            outside_v4: format!("{net}2").parse().unwrap(),
        }
    }

    fn pod(&self, name: &str) -> &TestPod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .expect("a pod of the bed")
    }

    fn sync(&self, backend: &mut NftablesBackend, plan: &Plan) {
        self.node
            .netns()
            .run(|| backend.sync(plan, &Changes::all()))
            .unwrap_or_else(|e| {
                panic!(
                    "sync failed: {e}\npolicy transaction:\n{}",
                    backend.last_policy_transaction()
                )
            });
    }

    fn nft(&self, args: &[&str]) -> String {
        let mut argv = vec!["nft"];
        argv.extend_from_slice(args);
        self.node.netns().exec_ok(&argv)
    }
}

/// Whether a TCP connection from `from` to `to` is established and answered.
fn connects(from: &Netns, to: SocketAddr) -> bool {
    from.run(|| {
        let Ok(mut conn) = TcpStream::connect_timeout(&to, DENIED_AFTER) else {
            return false;
        };
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut conn, &mut out).is_ok() && !out.is_empty()
    })
}

fn at(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// The addresses as the plan writes them: single-address ranges, sorted, v4 first.
fn hosts(ips: &[IpAddr]) -> Arc<Addresses> {
    let mut ranges: Vec<AddressRange> = ips
        .iter()
        .map(|ip| AddressRange {
            first: *ip,
            last: *ip,
        })
        .collect();
    ranges.sort_by_key(|r| (r.first.is_ipv6(), r.first));
    Arc::new(Addresses::Ranges(ranges))
}

fn tcp(first: u16, last: u16) -> Ports {
    Ports::Ranges(vec![PortRange {
        protocol: Protocol::Tcp,
        first,
        last,
    }])
}

/// One direction isolated by policy `policy`, allowing these clauses (none: deny all).
fn isolation(policy: &str, clauses: Vec<Clause>) -> Option<Isolation> {
    Some(Isolation {
        policies: vec![policy.to_string()],
        allows: if clauses.is_empty() {
            Vec::new()
        } else {
            vec![Allow {
                policy: policy.to_string(),
                rule: 0,
                clauses,
            }]
        },
    })
}

fn pod_policy(pod: &TestPod, ingress: Option<Isolation>, egress: Option<Isolation>) -> PodPolicy {
    PodPolicy {
        namespace: "x".into(),
        name: pod.name.clone(),
        ips: pod.ips(),
        ingress,
        egress,
    }
}

fn plan_of(pods: Vec<PodPolicy>) -> Plan {
    Plan {
        services: ServiceTable::default(),
        policy: Some(PolicyTable {
            pods: pods
                .into_iter()
                .map(|p| (format!("{}/{}", p.namespace, p.name), p))
                .collect(),
        }),
    }
}

#[test]
fn default_deny_ingress_then_allow_from_a_labelled_pod_in_both_families() {
    require_root!();
    let bed = Bed::new(&["a", "b", "c"]);
    let (a, b, c) = (bed.pod("a"), bed.pod("b"), bed.pod("c"));
    let mut backend = NftablesBackend::new();
    // Nothing isolated: everything passes, through the table already there.
    bed.sync(&mut backend, &plan_of(vec![pod_policy(a, None, None)]));
    assert!(bed.nft(&["list", "tables"]).contains(TABLE));
    assert!(connects(&c.ns, at(a.v4, 80)));

    // Default deny ingress for a.
    bed.sync(
        &mut backend,
        &plan_of(vec![pod_policy(a, isolation("x/deny", vec![]), None)]),
    );
    for from in [b, c] {
        assert!(!connects(&from.ns, at(a.v4, 80)), "{} -> a v4", from.name);
        assert!(!connects(&from.ns, at(a.v6, 80)), "{} -> a v6", from.name);
    }
    // a itself is not isolated for egress, nor are the others for ingress.
    assert!(connects(&a.ns, at(b.v4, 80)));
    assert!(connects(&c.ns, at(b.v6, 81)));

    // Allow from b (both its addresses) on TCP 80 only.
    let allow_b = Clause::by_content(hosts(&b.ips()), tcp(80, 80));
    bed.sync(
        &mut backend,
        &plan_of(vec![pod_policy(a, isolation("x/allow-b", vec![allow_b]), None)]),
    );
    assert!(connects(&b.ns, at(a.v4, 80)));
    assert!(connects(&b.ns, at(a.v6, 80)));
    assert!(!connects(&b.ns, at(a.v4, 81)), "port 81 is not allowed");
    assert!(!connects(&c.ns, at(a.v4, 80)), "c is not allowed");
    assert!(!connects(&c.ns, at(a.v6, 80)), "c is not allowed (v6)");
    // From outside the node (routed): not b either.
    assert!(!connects(&bed.outside, at(a.v4, 80)));

    // Removed from the plan: open again, and the chain and set are gone.
    bed.sync(&mut backend, &plan_of(vec![]));
    assert!(connects(&c.ns, at(a.v4, 80)));
    let listed = bed.nft(&["list", "table", "inet", TABLE]);
    assert!(!listed.contains("chain ingress-"), "{listed}");
    assert!(!listed.contains("set peers-"), "{listed}");
}

#[test]
fn the_node_reaches_its_pods_under_default_deny() {
    require_root!();
    let bed = Bed::new(&["a"]);
    let a = bed.pod("a");
    let mut backend = NftablesBackend::new();
    bed.sync(
        &mut backend,
        &plan_of(vec![pod_policy(
            a,
            isolation("x/deny", vec![]),
            isolation("x/deny", vec![]),
        )]),
    );
    assert!(!connects(&bed.outside, at(a.v4, 80)), "outside is denied");
    // kubelet probes: node -> Pod leaves through output, the replies come in through
    // input; neither passes the forward hook.
    assert!(connects(bed.node.netns(), at(a.v4, 80)));
    assert!(connects(bed.node.netns(), at(a.v6, 80)));
}

#[test]
fn replies_of_allowed_connections_pass_new_ones_the_other_way_do_not() {
    require_root!();
    let bed = Bed::new(&["a", "b"]);
    let (a, b) = (bed.pod("a"), bed.pod("b"));
    let mut backend = NftablesBackend::new();
    // a: ingress denied entirely, egress open.
    bed.sync(
        &mut backend,
        &plan_of(vec![pod_policy(a, isolation("x/deny", vec![]), None)]),
    );
    assert!(connects(&a.ns, at(b.v4, 80)), "a -> b, and b's replies back to a");
    assert!(connects(&a.ns, at(b.v6, 80)));
    assert!(!connects(&b.ns, at(a.v4, 80)));
}

#[test]
fn egress_to_an_ip_block_with_an_except() {
    require_root!();
    let bed = Bed::new(&["a", "b", "c"]);
    let (a, b, c) = (bed.pod("a"), bed.pod("b"), bed.pod("c"));
    let mut backend = NftablesBackend::new();
    // a may send to the Pod /24 except c (as /32), and nowhere else.
    let IpAddr::V4(c4) = c.v4 else { unreachable!() };
    let net = u32::from(c4) & 0xffff_ff00;
    let block = vec![
        AddressRange {
            first: IpAddr::V4(net.into()),
            last: IpAddr::V4((u32::from(c4) - 1).into()),
        },
        AddressRange {
            first: IpAddr::V4((u32::from(c4) + 1).into()),
            last: IpAddr::V4((net | 0xff).into()),
        },
    ];
    let clause = Clause::by_content(Arc::new(Addresses::Ranges(block)), Ports::Any);
    bed.sync(
        &mut backend,
        &plan_of(vec![pod_policy(a, None, isolation("x/egress", vec![clause]))]),
    );
    assert!(connects(&a.ns, at(b.v4, 80)));
    assert!(connects(&a.ns, at(b.v4, 81)));
    assert!(!connects(&a.ns, at(c.v4, 80)), "the except");
    assert!(!connects(&a.ns, at(b.v6, 80)), "no IPv6 block");
    assert!(!connects(&a.ns, at(bed.outside_v4, 80)), "outside the block");
    // Others are not isolated.
    assert!(connects(&c.ns, at(b.v4, 80)));
}

#[test]
fn through_a_cluster_ip_the_backend_pod_is_judged() {
    require_root!();
    let bed = Bed::new(&["a", "b", "c"]);
    let (a, b, c) = (bed.pod("a"), bed.pod("b"), bed.pod("c"));
    let mut backend = NftablesBackend::new();
    let cluster_ip: IpAddr = "10.96.77.10".parse().unwrap();
    let plan = a_behind_a_service_allowing_only_b(a, b, cluster_ip);
    // Services and policy in one transaction.
    bed.sync(&mut backend, &plan);
    assert!(connects(&b.ns, at(cluster_ip, 8080)), "b through the ClusterIP");
    assert!(!connects(&c.ns, at(cluster_ip, 8080)), "c through the ClusterIP");
    // The policy allows 80 (the backend's port), not 8080 (the Service's): it was judged
    // after DNAT.
    assert!(connects(&b.ns, at(a.v4, 80)));
}

/// A plan for node `node`: Service `x/s-a` (`cluster_ip`:8080/TCP) with `a`:80 as its one
/// endpoint, and `a` isolated for ingress but from `b` on 80 (the endpoint's port, so a
/// connection through the ClusterIP passes only when judged after DNAT).
fn a_behind_a_service_allowing_only_b(a: &TestPod, b: &TestPod, cluster_ip: IpAddr) -> Plan {
    let id = ServicePortId {
        namespace: "x".into(),
        name: "s-a".into(),
        port_name: "http".into(),
        protocol: Protocol::Tcp,
        family: Family::V4,
    };
    let endpoint = Endpoint {
        ip: a.v4,
        port: 80,
        is_local: true,
        ready: true,
    };
    let port = ServicePort {
        cluster_endpoints: vec![endpoint.clone()],
        external_endpoints: vec![endpoint],
        ..ServicePort::new(id.clone(), Some(cluster_ip), 8080)
    };
    let mut plan = plan_of(vec![pod_policy(
        a,
        isolation(
            "x/allow-b",
            vec![Clause::by_content(hosts(&b.ips()), tcp(80, 80))],
        ),
        None,
    )]);
    plan.services = ServiceTable {
        settings: NodeSettings {
            node_name: "node".into(),
            ..NodeSettings::default()
        },
        ports: [(id, port)].into_iter().collect(),
    };
    plan
}

/// The addresses from `first` to `last`, both included.
fn span(first: IpAddr, last: IpAddr) -> AddressRange {
    AddressRange { first, last }
}

/// Loads `text` with `nft -f` in `netns`.
fn nft_f(netns: &Netns, text: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    netns.exec_ok(&["nft", "-f", file.path().to_str().unwrap()]);
}

#[test]
fn the_policy_transaction_is_nft_text_that_lists_as_the_netlink_commit() {
    require_root!();
    let bed = Bed::new(&["a", "b", "c"]);
    let (a, b, c) = (bed.pod("a"), bed.pod("b"), bed.pod("c"));
    let mut backend = NftablesBackend::new();
    let other = Netns::new("policy-text");
    let mixed = Clause::by_content(
        Arc::new(Addresses::Ranges(vec![
            span("10.0.0.0".parse().unwrap(), "10.0.0.255".parse().unwrap()),
            span(b.v4, b.v4),
            span("200.0.0.0".parse().unwrap(), "255.255.255.255".parse().unwrap()),
            span(b.v6, b.v6),
        ])),
        Ports::Ranges(vec![
            PortRange {
                protocol: Protocol::Tcp,
                first: 80,
                last: 80,
            },
            PortRange {
                protocol: Protocol::Udp,
                first: 1000,
                last: 2000,
            },
            PortRange {
                protocol: Protocol::Sctp,
                first: 0,
                last: u16::MAX,
            },
        ]),
    );
    let mut moved_ranges = vec![
        span("10.0.0.0".parse().unwrap(), "10.0.0.127".parse().unwrap()),
        span(c.v4, c.v4),
        span("200.0.0.0".parse().unwrap(), "255.255.255.255".parse().unwrap()),
        span(c.v6, c.v6),
    ];
    moved_ranges.sort_by_key(|r| (r.first.is_ipv6(), r.first));
    let moved = Clause {
        peer_set: mixed.peer_set.clone(),
        peers: Arc::new(Addresses::Ranges(moved_ranges)),
        ports: mixed.ports.clone(),
    };
    let steps = [
        plan_of(vec![
            pod_policy(
                a,
                isolation("x/mixed", vec![mixed.clone()]),
                isolation("x/deny", vec![]),
            ),
            pod_policy(b, isolation("x/mixed", vec![mixed.clone()]), None),
        ]),
        // b relabelled out, c in; a's egress opened to anything on TCP.
        plan_of(vec![
            pod_policy(
                a,
                isolation("x/mixed", vec![mixed.clone()]),
                isolation(
                    "x/any",
                    vec![Clause::by_content(Arc::new(Addresses::Any), tcp(0, u16::MAX))],
                ),
            ),
            pod_policy(c, isolation("x/mixed", vec![mixed.clone()]), None),
        ]),
        // The same peers (one set id) now hold c instead of b and half the block: the
        // set's elements change by diff, with ranges deleted and added.
        plan_of(vec![
            pod_policy(
                a,
                isolation("x/mixed", vec![moved.clone()]),
                isolation(
                    "x/any",
                    vec![Clause::by_content(Arc::new(Addresses::Any), tcp(0, u16::MAX))],
                ),
            ),
            pod_policy(c, isolation("x/mixed", vec![moved]), None),
        ]),
    ];
    for (i, plan) in steps.iter().enumerate() {
        bed.sync(&mut backend, plan);
        let text = backend.last_policy_transaction().to_string();
        assert!(!text.is_empty() && !text.starts_with('#'), "step {i}: {text}");
        nft_f(&other, &text);
        let kernel = bed.nft(&["list", "table", "inet", TABLE]);
        let from_text = other.exec_ok(&["nft", "list", "table", "inet", TABLE]);
        assert_eq!(kernel, from_text, "step {i}: the transaction was\n{text}");
        assert!(kernel.contains("udp dport 1000-2000 accept"), "{kernel}");
    }
    let last = backend.last_policy_transaction();
    assert!(
        last.contains("delete element inet ferry-policy peers-") && !last.contains("add set"),
        "{last}"
    );
    // The same plan again: nothing to send.
    bed.sync(&mut backend, &steps[2]);
    assert_eq!(backend.last_policy_transaction(), "");
}

#[test]
fn a_new_process_converges_over_the_old_table_without_opening_it() {
    require_root!();
    let bed = Bed::new(&["a", "b", "c"]);
    let (a, b, c) = (bed.pod("a"), bed.pod("b"), bed.pod("c"));
    let only = |who: &TestPod, ports: Ports| {
        plan_of(vec![pod_policy(
            a,
            isolation("x/allow", vec![Clause::by_content(hosts(&who.ips()), ports)]),
            None,
        )])
    };
    let mut old = NftablesBackend::new();
    bed.sync(&mut old, &only(b, Ports::Any));
    drop(old);
    // c probes all along; not one connection may pass while the new back end takes over
    // with a plan that still denies c.
    let stop = Arc::new(AtomicBool::new(false));
    let passed = Arc::new(AtomicUsize::new(0));
    let probes = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if connects(&c.ns, at(a.v4, 80)) {
                    passed.fetch_add(1, Ordering::Relaxed);
                }
                probes.fetch_add(1, Ordering::Relaxed);
            }
        });
        let mut new = NftablesBackend::new();
        bed.sync(&mut new, &only(b, Ports::Any));
        let tx = new.last_policy_transaction().to_string();
        assert!(!tx.contains("delete table"), "{tx}");
        assert!(
            !tx.contains("add chain inet ferry-policy ingress-"),
            "kept by name: {tx}"
        );
        assert!(connects(&b.ns, at(a.v4, 80)));
        // Then a real change, by diff.
        bed.sync(&mut new, &only(b, tcp(80, 80)));
        assert!(!connects(&b.ns, at(a.v4, 81)));
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
    });
    assert!(probes.load(Ordering::Relaxed) >= 2);
    assert_eq!(passed.load(Ordering::Relaxed), 0, "a denied client got through");
}

// `ferry-proxy run --manifests DIR` itself: the sources, the loop and the back end.

const NODE_NAME: &str = "node-a";

/// A Pod of the bed as `kubectl get -o json` shows it, on this node, serving
/// `serve-80-tcp` and `serve-81-tcp`.
fn pod_manifest(pod: &TestPod, labels: serde_json::Value) -> serde_json::Value {
    ferry_tests::pod(
        "x",
        &pod.name,
        NODE_NAME,
        labels,
        &[pod.v4, pod.v6],
        &[("serve-80-tcp", "TCP", 80), ("serve-81-tcp", "TCP", 81)],
    )
}

fn namespace_x() -> serde_json::Value {
    ferry_tests::namespace("x", serde_json::json!({"ns": "x"}))
}

/// A policy on Pod `a` allowing ingress from Pods labelled `from=yes` on `port` (a number
/// or a name); `None`: deny all ingress.
fn policy_on_a(port: Option<serde_json::Value>) -> serde_json::Value {
    let ingress = match port {
        Some(port) => serde_json::json!([{
            "from": [{"podSelector": {"matchLabels": {"from": "yes"}}}],
            "ports": [{"protocol": "TCP", "port": port}],
        }]),
        None => serde_json::json!([]),
    };
    serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "on-a", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": ingress},
    })
}

/// Writes the Pods (b labelled `from=yes` when `b_allowed`) and the Namespace.
fn write_cluster(proxy: &ferry_tests::ProxyProcess, bed: &Bed, b_allowed: bool) {
    let b_labels = if b_allowed {
        serde_json::json!({"pod": "b", "from": "yes"})
    } else {
        serde_json::json!({"pod": "b"})
    };
    proxy.write(
        "pods",
        &[
            namespace_x(),
            pod_manifest(bed.pod("a"), serde_json::json!({"pod": "a"})),
            pod_manifest(bed.pod("b"), b_labels),
            pod_manifest(bed.pod("c"), serde_json::json!({"pod": "c"})),
        ],
    );
}

fn start_proxy(bed: &Bed, dir: &std::path::Path, flags: &[&str]) -> ferry_tests::ProxyProcess {
    ferry_tests::ProxyProcess::start(bed.node.netns(), &dir.join("manifests"), NODE_NAME, flags)
}

/// Whether a connection is made within `timeout` (for polling: an allowed connection on
/// a bridge takes well under a millisecond).
fn connects_within(from: &Netns, to: SocketAddr, timeout: Duration) -> bool {
    from.run(|| TcpStream::connect_timeout(&to, timeout).is_ok())
}

/// Polls until `from -> to` is in the state `open`; returns when the first probe that saw
/// it started, counted from `since`.
fn time_until(from: &Netns, to: SocketAddr, open: bool, since: std::time::Instant) -> Duration {
    loop {
        let probe = since.elapsed();
        if connects_within(from, to, Duration::from_millis(100)) == open {
            return probe;
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "{to} never became open={open}"
        );
    }
}

#[test]
fn the_daemon_applies_policy_changes_within_a_second() {
    require_root!();
    let bed = Bed::new(&["a", "b", "c"]);
    let (a, b, c) = (bed.pod("a"), bed.pod("b"), bed.pod("c"));
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(&bed, dir.path(), &[]);
    write_cluster(&proxy, &bed, false);
    proxy.write("policy", &[policy_on_a(Some(serde_json::json!("serve-80-tcp")))]);
    // Enforced once everything is listed.
    time_until(&c.ns, at(a.v4, 80), false, std::time::Instant::now());
    assert!(!connects(&b.ns, at(a.v4, 80)), "b is not labelled yet");
    assert!(connects(&a.ns, at(b.v4, 80)), "a's egress is not isolated");

    // b relabelled into the rule: the named port 80 opens, 81 stays shut.
    let since = std::time::Instant::now();
    write_cluster(&proxy, &bed, true);
    let took = time_until(&b.ns, at(a.v4, 80), true, since);
    assert!(took < Duration::from_secs(1), "relabel took {took:?}");
    assert!(connects(&b.ns, at(a.v6, 80)));
    assert!(!connects(&b.ns, at(a.v4, 81)), "only the named port");
    assert!(!connects(&c.ns, at(a.v4, 80)));

    // `dump --policy` names what the kernel holds: a's ingress chain, b's set.
    let dump = |format: &str| {
        let out = bed
            .node
            .netns()
            .command(ferry_tests::ferry_bin("ferry-proxy"))
            .args(["dump", "--policy", "-o", format, "--manifests"])
            .arg(&proxy.manifests)
            .args(["--hostname-override", NODE_NAME])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&dump("json")).unwrap();
    let chain = json["pods"]["x/a"]["ingress"]["chain"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(json["pods"]["x/a"]["ingress"]["policies"][0], "x/on-a");
    assert!(json["pods"]["x/b"]["ingress"].is_null(), "{json}");
    let kernel = bed.nft(&["list", "table", "inet", TABLE]);
    assert!(
        kernel.contains(&format!("chain {chain} {{")),
        "{chain} not in\n{kernel}"
    );
    for set in json["sets"].as_object().unwrap().keys() {
        assert!(
            kernel.contains(&format!("set {set} {{")),
            "{set} not in\n{kernel}"
        );
    }
    let text = dump("table");
    assert!(
        text.contains(&format!("x/a  ingress {chain} (x/on-a) / egress open")),
        "{text}"
    );

    // The policy deleted: everything opens.
    let since = std::time::Instant::now();
    proxy.write("policy", &[]);
    let took = time_until(&c.ns, at(a.v4, 81), true, since);
    assert!(
        took < Duration::from_secs(1),
        "deletion took {took:?}\n{}",
        proxy.log()
    );
    // Back to deny all: it closes again.
    let since = std::time::Instant::now();
    proxy.write("policy", &[policy_on_a(None)]);
    let took = time_until(&b.ns, at(a.v4, 80), false, since);
    assert!(took < Duration::from_secs(1), "a new policy took {took:?}");
}

#[test]
fn sigkill_and_restart_under_policy_let_no_denied_packet_through() {
    require_root!();
    let bed = Bed::new(&["a", "b", "c"]);
    let (a, b, c) = (bed.pod("a"), bed.pod("b"), bed.pod("c"));
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = start_proxy(&bed, dir.path(), &[]);
    write_cluster(&proxy, &bed, true);
    proxy.write("policy", &[policy_on_a(Some(serde_json::json!(80)))]);
    time_until(&c.ns, at(a.v4, 80), false, std::time::Instant::now());
    assert!(connects(&b.ns, at(a.v4, 80)));

    let stop = AtomicBool::new(false);
    let passed = AtomicUsize::new(0);
    let probes = AtomicUsize::new(0);
    std::thread::scope(|s| {
        // Fresh connections as fast as they fail (each waits 100 ms for an answer).
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if connects_within(&c.ns, at(a.v4, 80), Duration::from_millis(100)) {
                    passed.fetch_add(1, Ordering::Relaxed);
                }
                probes.fetch_add(1, Ordering::Relaxed);
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        proxy.kill();
        std::thread::sleep(Duration::from_millis(500));
        let mut again = start_proxy(&bed, dir.path(), &[]);
        let synced = ferry_tests::wait_until(Duration::from_secs(10), || {
            again.log().matches("first sync done").count() >= 2
        });
        assert!(synced.is_some(), "{}", again.log());
        // The new process enforces changes too: b loses port 80.
        again.write("policy", &[policy_on_a(Some(serde_json::json!(81)))]);
        time_until(&b.ns, at(a.v4, 80), false, std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        again.kill();
    });
    assert!(probes.load(Ordering::Relaxed) > 10, "the client hardly probed");
    assert_eq!(passed.load(Ordering::Relaxed), 0, "a denied client got through");
}

#[test]
fn network_policy_false_leaves_pods_open_and_removes_the_table() {
    require_root!();
    let bed = Bed::new(&["a", "b", "c"]);
    let (a, c) = (bed.pod("a"), bed.pod("c"));
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = start_proxy(&bed, dir.path(), &[]);
    write_cluster(&proxy, &bed, false);
    proxy.write("policy", &[policy_on_a(None)]);
    time_until(&c.ns, at(a.v4, 80), false, std::time::Instant::now());
    proxy.kill();

    let off = start_proxy(&bed, dir.path(), &["--network-policy=false"]);
    time_until(&c.ns, at(a.v4, 80), true, std::time::Instant::now());
    assert!(connects(&c.ns, at(a.v6, 80)));
    let tables = bed.nft(&["list", "tables"]);
    assert!(!tables.contains(TABLE), "{tables}\n{}", off.log());
    assert!(
        tables.contains("ferry-proxy"),
        "Services are still programmed: {tables}"
    );
}

#[test]
fn with_the_ebpf_back_end_policy_judges_the_backend_pod() {
    require_root!();
    use ferry_proxy::backend::ebpf::{pin_dir, EbpfBackend};
    let bed = Bed::new(&["a", "b", "c"]);
    let (a, b, c) = (bed.pod("a"), bed.pod("b"), bed.pod("c"));
    let sandbox = ferry_tests::EbpfSandbox::new("policy");
    let cluster_ip: IpAddr = "10.96.78.10".parse().unwrap();
    let mut plan = a_behind_a_service_allowing_only_b(a, b, cluster_ip);
    let pins = pin_dir(sandbox.pin_root(), "node");
    let mut backend = bed
        .node
        .netns()
        .run(|| EbpfBackend::new(&pins, sandbox.cgroup()).map_err(|e| e.to_string()))
        .unwrap();
    bed.node
        .netns()
        .run(|| backend.sync(&plan, &Changes::all()))
        .unwrap_or_else(|e| panic!("sync: {e}"));
    fn in_cgroup<'a>(pod: &'a TestPod, cgroup: &'a std::path::Path) -> ferry_tests::Client<'a> {
        ferry_tests::Client {
            netns: &pod.ns,
            cgroup: Some(cgroup),
        }
    }
    let client = |pod| in_cgroup(pod, sandbox.cgroup());
    // The socket programs send the connection to a's address at connect(): the forward
    // hook sees the real Pod and judges it.
    let answer = client(b)
        .tcp_request(at(cluster_ip, 8080))
        .expect("b through the ClusterIP");
    assert!(
        answer.contains(&format!("{}]", b.v4)),
        "b's own address: {answer}"
    );
    assert!(
        client(c).tcp_request(at(cluster_ip, 8080)).is_err(),
        "c through the ClusterIP"
    );
    assert!(bed.nft(&["list", "tables"]).contains(TABLE));
    // Policy off with the eBPF back end: the table goes.
    plan.policy = None;
    bed.node
        .netns()
        .run(|| backend.sync(&plan, &Changes::all()))
        .unwrap_or_else(|e| panic!("sync: {e}"));
    assert!(!bed.nft(&["list", "tables"]).contains(TABLE));
    assert!(client(c).tcp_request(at(cluster_ip, 8080)).is_ok());
    bed.node.netns().run(|| backend.cleanup()).unwrap();
}
