//! The nftables back end with real nftables and real packets.
//!
//! Each test builds its own node: a netns with a bridge `br0` (the Pod subnet's gateway)
//! and `net.bridge.bridge-nf-call-iptables=1` (Pod -> ClusterIP -> Pod on one bridge needs
//! it), Pod netns on veths in that bridge running small servers that answer with their
//! name and the peer address they saw, client netns outside the node on veths of their
//! own, and a default route out of the node (towards the first client) so that "refused at
//! once" cannot pass because the node had no route. The back end runs on a thread inside
//! the node netns. Nothing outside these namespaces is touched; they are deleted on drop,
//! also when a test panics.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_proxy::backend::nftables::{port_base_name, synthetic_table, NftablesBackend, TABLE};
use ferry_proxy::backend::Backend;
use ferry_proxy::changes::Changes;
use ferry_proxy::conntrack;
use ferry_proxy::plan::{
    Endpoint, Family, NodeSettings, Plan, Protocol, ServicePort, ServicePortId, ServiceTable,
};
use ferry_tests::{require_root, unique_v4_subnet, unique_v6_subnet, Netns, Node};

const TIMEOUT: Duration = Duration::from_secs(3);

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// "10.96.3.0/24" -> (prefix "10.96.3.", "/24").
fn v4_parts(cidr: &str) -> String {
    cidr.rsplit_once(".0/").expect("an aligned /24").0.to_string() + "."
}

struct Pod {
    ns: ferry_tests::Pod,
    v4: IpAddr,
    v6: IpAddr,
}

/// A node with Pods on a bridge and clients outside.
struct Cluster {
    node: Node,
    pods: Vec<Pod>,
    clients: Vec<(Netns, IpAddr)>,
    /// The node's address on the first client's link (NodePort target).
    node_ip: IpAddr,
    /// The bridge's addresses (what masquerading towards a Pod shows).
    gw_v4: IpAddr,
    pod_cidr_v4: String,
    pod_cidr_v6: String,
}

impl Cluster {
    fn new(pods: usize, clients: usize) -> Cluster {
        let node = Node::new("proxy-node");
        let n = node.name().to_string();
        let pod_cidr_v4 = unique_v4_subnet(24);
        let pod_cidr_v6 = unique_v6_subnet();
        let p4 = v4_parts(&pod_cidr_v4);
        let p6 = pod_cidr_v6.trim_end_matches("/64").to_string(); // "fd00:x:y::"
        node.forward_and_filter_bridged();
        ip(&["-n", &n, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &n, "addr", "add", &format!("{p4}1/24"), "dev", "br0"]);
        ip(&[
            "-n",
            &n,
            "addr",
            "add",
            &format!("{p6}1/64"),
            "dev",
            "br0",
            "nodad",
        ]);
        // The bridge's link-local address would go through duplicate address detection,
        // and until it has, the node sends no neighbour solicitation for a forwarded IPv6
        // packet: the first packets towards a Pod wait (one second or more, measured). A
        // node's bridge has been up for long; a link-local address without DAD stands in.
        ip(&["-n", &n, "addr", "add", "fe80::1/64", "dev", "br0", "nodad"]);
        ip(&["-n", &n, "link", "set", "br0", "up"]);
        let mut list = Vec::new();
        for i in 0..pods {
            let ns = node.pod(&format!("pod{i}"));
            let (v4, v6) = (format!("{p4}{}", 10 + i), format!("{p6}{:x}", 10 + i));
            node.wire_pod(
                &ns,
                "br0",
                &format!("vp{i}"),
                &[&format!("{v4}/24"), &format!("{v6}/64")],
                &[&format!("{p4}1"), &format!("{p6}1")],
            );
            let pod = Pod {
                ns,
                v4: v4.parse().unwrap(),
                v6: v6.parse().unwrap(),
            };
            list.push(pod);
        }
        let mut cl = Vec::new();
        let mut node_ip = None;
        for i in 0..clients {
            let c = node.client(&format!("client{i}"));
            let net = v4_parts(&unique_v4_subnet(24));
            let node_if = node.connect_client(&c, &format!("{net}2/24"), &format!("{net}1/24"));
            if i == 0 {
                let v6 = unique_v6_subnet().trim_end_matches("/64").to_string();
                ip(&[
                    "-n",
                    c.name(),
                    "addr",
                    "add",
                    &format!("{v6}2/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ]);
                ip(&[
                    "-n",
                    &n,
                    "addr",
                    "add",
                    &format!("{v6}1/64"),
                    "dev",
                    &node_if,
                    "nodad",
                ]);
                ip(&[
                    "-n",
                    &n,
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("{v6}2"),
                ]);
                // The node's way out: without it, traffic to a Service IP nobody handles
                // would fail with "network unreachable" at once, for the wrong reason.
                ip(&["-n", &n, "route", "add", "default", "via", &format!("{net}2")]);
                node_ip = Some(format!("{net}1").parse().unwrap());
            }
            cl.push((c, format!("{net}2").parse().unwrap()));
        }
        Cluster {
            gw_v4: format!("{p4}1").parse().unwrap(),
            node,
            pods: list,
            clients: cl,
            node_ip: node_ip.unwrap_or("127.0.0.1".parse().unwrap()),
            pod_cidr_v4,
            pod_cidr_v6,
        }
    }

    fn settings(&self) -> NodeSettings {
        NodeSettings {
            node_name: "node".into(),
            cluster_cidrs: vec![
                self.pod_cidr_v4.parse().unwrap(),
                self.pod_cidr_v6.parse().unwrap(),
            ],
            nodeport_addresses: vec![],
        }
    }

    fn sync(&self, backend: &mut NftablesBackend, plan: &Plan) {
        self.node
            .netns()
            .run(|| backend.sync(plan, &Changes::all()))
            .unwrap_or_else(|e| panic!("sync failed: {e}\ntransaction:\n{}", backend.last_transaction()));
    }

    fn nft(&self, args: &[&str]) -> String {
        let mut argv = vec!["nft"];
        argv.extend_from_slice(args);
        self.node.netns().exec_ok(&argv)
    }

    fn pod_ep(&self, i: usize, family: Family, port: u16) -> Endpoint {
        let ip = if family == Family::V4 {
            self.pods[i].v4
        } else {
            self.pods[i].v6
        };
        Endpoint {
            ip,
            port,
            is_local: true,
            ready: true,
        }
    }
}

fn service(name: &str, proto: Protocol, family: Family, cluster_ip: &str, port: u16) -> ServicePort {
    let id = ServicePortId {
        namespace: "default".into(),
        name: name.into(),
        port_name: "p".into(),
        protocol: proto,
        family,
    };
    ServicePort::new(id, Some(cluster_ip.parse().unwrap()), port)
}

fn with_endpoints(mut p: ServicePort, eps: Vec<Endpoint>) -> ServicePort {
    let mut eps = eps;
    eps.sort();
    p.cluster_endpoints = eps.clone();
    p.external_endpoints = eps;
    p
}

/// A plan of these Service ports (every port compared at each sync, as after a full plan).
fn table(settings: NodeSettings, ports: Vec<ServicePort>) -> Plan {
    Plan {
        services: ServiceTable {
            settings,
            ports: ports.into_iter().map(|p| (p.id.clone(), p)).collect(),
        },
        policy: None,
    }
}

/// A synthetic plan (see [`synthetic_table`]).
fn synthetic_plan(services: usize, endpoints: usize, offset: usize) -> Plan {
    Plan {
        services: synthetic_table(services, endpoints, offset),
        policy: None,
    }
}

/// A running server, stopped on drop.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn spawn(serve: impl FnOnce(&AtomicBool) + Send + 'static) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    Server {
        stop,
        thread: Some(std::thread::spawn(move || serve(&flag))),
    }
}

/// TCP: each connection gets "<name> <peer>\n", then an echo of every line it sends.
fn tcp_server(ns: &Netns, name: &str, addr: SocketAddr) -> Server {
    let listener = ns
        .run(|| TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    listener.set_nonblocking(true).unwrap();
    let name = name.to_string();
    spawn(move |stop| {
        let mut conns: Vec<JoinHandle<()>> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut conn, peer)) => {
                    let name = name.clone();
                    conns.push(std::thread::spawn(move || {
                        conn.set_nonblocking(false).unwrap();
                        conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                        if conn.write_all(format!("{name} {peer}\n").as_bytes()).is_err() {
                            return;
                        }
                        let mut reader = BufReader::new(conn.try_clone().unwrap());
                        let mut line = String::new();
                        while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                            if conn.write_all(format!("{name} {line}").as_bytes()).is_err() {
                                return;
                            }
                            line.clear();
                        }
                    }));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        drop(conns);
    })
}

/// UDP: every datagram is answered with "<name> <peer>".
fn udp_server(ns: &Netns, name: &str, addr: SocketAddr) -> Server {
    let socket = ns
        .run(|| UdpSocket::bind(addr))
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let name = name.to_string();
    spawn(move |stop| {
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(format!("{name} {peer}").as_bytes(), peer);
            }
        }
    })
}

/// Connects from `ns`, returns the first line ("<server> <peer it saw>").
fn tcp_ask(ns: &Netns, to: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    ns.run(|| {
        let conn = TcpStream::connect_timeout(&to, timeout)?;
        conn.set_read_timeout(Some(TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(conn).read_line(&mut line)?;
        Ok(line.trim().to_string())
    })
}

/// One datagram from a fresh, connected socket (so ICMP errors surface as errors).
fn udp_ask(ns: &Netns, to: SocketAddr) -> std::io::Result<String> {
    ns.run(|| {
        let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let s = UdpSocket::bind(bind)?;
        s.connect(to)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.send(b"who")?;
        let mut buf = [0u8; 1500];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    })
}

fn server_of(answer: &str) -> &str {
    answer.split_whitespace().next().unwrap_or("")
}

fn peer_ip_of(answer: &str) -> IpAddr {
    let peer: SocketAddr = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
    peer.ip()
}

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

#[test]
fn cluster_ip_tcp_and_udp_reach_every_backend_in_both_families() {
    require_root!();
    let c = Cluster::new(3, 1);
    let mut servers = Vec::new();
    for i in 0..2 {
        let name = format!("pod{i}");
        servers.push(tcp_server(&c.pods[i].ns, &name, sa(c.pods[i].v4, 8080)));
        servers.push(udp_server(&c.pods[i].ns, &name, sa(c.pods[i].v4, 5353)));
        servers.push(tcp_server(&c.pods[i].ns, &name, sa(c.pods[i].v6, 8080)));
    }
    let tcp = with_endpoints(
        service("web", Protocol::Tcp, Family::V4, "10.233.0.10", 80),
        vec![c.pod_ep(0, Family::V4, 8080), c.pod_ep(1, Family::V4, 8080)],
    );
    let udp = with_endpoints(
        service("dns", Protocol::Udp, Family::V4, "10.233.0.10", 53),
        vec![c.pod_ep(0, Family::V4, 5353), c.pod_ep(1, Family::V4, 5353)],
    );
    let tcp6 = with_endpoints(
        service("web", Protocol::Tcp, Family::V6, "fd00:233::10", 80),
        vec![c.pod_ep(0, Family::V6, 8080), c.pod_ep(1, Family::V6, 8080)],
    );
    let mut backend = NftablesBackend::new();
    c.sync(&mut backend, &table(c.settings(), vec![tcp, udp, tcp6]));

    let client = &c.pods[2];
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..30 {
        let a = tcp_ask(&client.ns, "10.233.0.10:80".parse().unwrap(), TIMEOUT).expect("TCP to ClusterIP");
        assert_eq!(
            peer_ip_of(&a),
            client.v4,
            "a Pod inside the cluster CIDR keeps its address: {a}"
        );
        *counts.entry(format!("tcp {}", server_of(&a))).or_default() += 1;
        let a = udp_ask(&client.ns, "10.233.0.10:53".parse().unwrap()).expect("UDP to ClusterIP");
        *counts.entry(format!("udp {}", server_of(&a))).or_default() += 1;
        let a = tcp_ask(&client.ns, "[fd00:233::10]:80".parse().unwrap(), TIMEOUT).expect("TCP over v6");
        assert_eq!(peer_ip_of(&a), client.v6, "{a}");
        *counts.entry(format!("tcp6 {}", server_of(&a))).or_default() += 1;
    }
    eprintln!("distribution over 30 connections each: {counts:?}");
    for key in [
        "tcp pod0",
        "tcp pod1",
        "udp pod0",
        "udp pod1",
        "tcp6 pod0",
        "tcp6 pod1",
    ] {
        assert!(
            counts.get(key).copied().unwrap_or(0) >= 3,
            "{key} got too little: {counts:?}"
        );
    }
    // From outside the cluster CIDR: masqueraded to the node's address on the bridge.
    let a =
        tcp_ask(&c.clients[0].0, "10.233.0.10:80".parse().unwrap(), TIMEOUT).expect("client to ClusterIP");
    assert_eq!(peer_ip_of(&a), c.gw_v4, "{a}");
    // From the node itself (output hook).
    let a = tcp_ask(c.node.netns(), "10.233.0.10:80".parse().unwrap(), TIMEOUT).expect("node to ClusterIP");
    assert!(a.starts_with("pod"), "{a}");
}

#[test]
fn a_service_without_endpoints_is_refused_at_once() {
    require_root!();
    let c = Cluster::new(1, 1);
    let mut np = service("empty", Protocol::Tcp, Family::V4, "10.233.0.20", 80);
    np.node_port = Some(30020);
    let udp = service("empty-udp", Protocol::Udp, Family::V4, "10.233.0.20", 53);
    let v6 = service("empty", Protocol::Tcp, Family::V6, "fd00:233::20", 80);
    let mut backend = NftablesBackend::new();
    c.sync(&mut backend, &table(c.settings(), vec![np, udp, v6]));

    let pod: &Netns = &c.pods[0].ns;
    for (who, ns, to) in [
        ("pod", pod, "10.233.0.20:80"),
        ("pod v6", pod, "[fd00:233::20]:80"),
        ("node", c.node.netns(), "10.233.0.20:80"),
    ] {
        let t = Instant::now();
        let err = tcp_ask(ns, to.parse().unwrap(), TIMEOUT).expect_err("no endpoints must not connect");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{who} -> {to}: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{who} -> {to} took {:?}",
            t.elapsed()
        );
    }
    let node_port = sa(c.node_ip, 30020);
    let t = Instant::now();
    let err = tcp_ask(&c.clients[0].0, node_port, TIMEOUT).expect_err("NodePort without endpoints");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert!(t.elapsed() < Duration::from_secs(1));
    let t = Instant::now();
    let err = udp_ask(pod, "10.233.0.20:53".parse().unwrap()).expect_err("UDP without endpoints");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert!(t.elapsed() < Duration::from_secs(1));
    // And the reject comes from our rules: the node routes elsewhere (towards the client),
    // and without the table the connection is not refused at once.
    c.node.netns().run(|| backend.cleanup()).unwrap();
    let t = Instant::now();
    let res = tcp_ask(
        pod,
        "10.233.0.20:80".parse().unwrap(),
        Duration::from_millis(1500),
    );
    assert!(
        res.is_err() && t.elapsed() >= Duration::from_millis(1400),
        "without Ferry's rules the ClusterIP should time out, got {res:?} after {:?}",
        t.elapsed()
    );
}

#[test]
fn node_port_masquerades_unless_external_traffic_policy_is_local() {
    require_root!();
    let c = Cluster::new(2, 1);
    let _s0 = tcp_server(&c.pods[0].ns, "pod0", sa(c.pods[0].v4, 8080));
    let _s1 = tcp_server(&c.pods[1].ns, "pod1", sa(c.pods[1].v4, 8080));
    let mut cluster = with_endpoints(
        service("np", Protocol::Tcp, Family::V4, "10.233.0.30", 80),
        vec![c.pod_ep(0, Family::V4, 8080), c.pod_ep(1, Family::V4, 8080)],
    );
    cluster.node_port = Some(30030);
    let mut local = service("np-local", Protocol::Tcp, Family::V4, "10.233.0.31", 80);
    local.node_port = Some(30031);
    local.external_local = true;
    local.cluster_endpoints = vec![c.pod_ep(0, Family::V4, 8080), c.pod_ep(1, Family::V4, 8080)];
    local.external_endpoints = vec![c.pod_ep(1, Family::V4, 8080)];
    let mut none_here = local.clone();
    none_here.id.name = "np-elsewhere".into();
    none_here.cluster_ip = Some("10.233.0.32".parse().unwrap());
    none_here.node_port = Some(30032);
    none_here.external_endpoints = vec![];
    let mut backend = NftablesBackend::new();
    c.sync(
        &mut backend,
        &table(c.settings(), vec![cluster, local, none_here]),
    );

    let (client, client_ip) = (&c.clients[0].0, c.clients[0].1);
    for _ in 0..6 {
        let a = tcp_ask(client, sa(c.node_ip, 30030), TIMEOUT).expect("NodePort");
        assert_eq!(
            peer_ip_of(&a),
            c.gw_v4,
            "eTP Cluster: the backend sees the node: {a}"
        );
        let a = tcp_ask(client, sa(c.node_ip, 30031), TIMEOUT).expect("NodePort, eTP Local");
        assert_eq!(server_of(&a), "pod1", "only the local endpoint: {a}");
        assert_eq!(
            peer_ip_of(&a),
            client_ip,
            "eTP Local keeps the client address: {a}"
        );
    }
    // From a Pod, the NodePort on the node's own address works too.
    let a = tcp_ask(&c.pods[0].ns, sa(c.gw_v4, 30030), TIMEOUT).expect("NodePort from a Pod");
    assert!(a.starts_with("pod"), "{a}");
    // eTP Local without local endpoints: dropped from outside ...
    let res = tcp_ask(client, sa(c.node_ip, 30032), Duration::from_millis(800));
    assert!(res.is_err(), "no local endpoint must not answer: {res:?}");
    // ... while the ClusterIP of that Service still works.
    let a = tcp_ask(&c.pods[0].ns, "10.233.0.32:80".parse().unwrap(), TIMEOUT).expect("its ClusterIP");
    assert!(a.starts_with("pod"), "{a}");
}

#[test]
fn load_balancer_ips_external_ips_and_source_ranges() {
    require_root!();
    let c = Cluster::new(2, 2);
    let _s0 = tcp_server(&c.pods[0].ns, "pod0", sa(c.pods[0].v4, 8080));
    let _s1 = tcp_server(&c.pods[1].ns, "pod1", sa(c.pods[1].v4, 8080));
    let (allowed, allowed_ip) = (&c.clients[0].0, c.clients[0].1);
    let denied = &c.clients[1].0;
    let mut lb = with_endpoints(
        service("lb", Protocol::Tcp, Family::V4, "10.233.0.40", 80),
        vec![c.pod_ep(0, Family::V4, 8080), c.pod_ep(1, Family::V4, 8080)],
    );
    lb.load_balancer_ips = vec!["203.0.113.10".parse().unwrap()];
    lb.external_ips = vec!["203.0.113.11".parse().unwrap()];
    lb.source_ranges = vec![format!("{allowed_ip}/32").parse().unwrap()];
    // An eTP Local LB Service whose only endpoint is elsewhere: blackholed from outside,
    // reachable from inside the cluster.
    let mut local = service("lb-local", Protocol::Tcp, Family::V4, "10.233.0.41", 80);
    local.load_balancer_ips = vec!["203.0.113.12".parse().unwrap()];
    local.external_local = true;
    local.cluster_endpoints = vec![c.pod_ep(1, Family::V4, 8080)];
    let mut backend = NftablesBackend::new();
    c.sync(&mut backend, &table(c.settings(), vec![lb, local]));
    let a =
        tcp_ask(allowed, "203.0.113.10:80".parse().unwrap(), TIMEOUT).expect("LB IP from an allowed source");
    assert_eq!(peer_ip_of(&a), c.gw_v4, "{a}");
    let res = tcp_ask(
        denied,
        "203.0.113.10:80".parse().unwrap(),
        Duration::from_millis(800),
    );
    assert!(
        res.is_err(),
        "a source outside loadBalancerSourceRanges must be dropped: {res:?}"
    );
    // externalIPs are not subject to source ranges.
    for ns in [allowed, denied] {
        let a = tcp_ask(ns, "203.0.113.11:80".parse().unwrap(), TIMEOUT).expect("external IP");
        assert!(a.starts_with("pod"), "{a}");
    }
    // eTP Local, no local endpoint.
    let res = tcp_ask(
        allowed,
        "203.0.113.12:80".parse().unwrap(),
        Duration::from_millis(800),
    );
    assert!(
        res.is_err(),
        "eTP Local LB IP without local endpoints from outside: {res:?}"
    );
    let a = tcp_ask(&c.pods[0].ns, "203.0.113.12:80".parse().unwrap(), TIMEOUT)
        .expect("from inside the cluster the LB IP short-circuits to the cluster endpoints");
    assert_eq!(server_of(&a), "pod1");
    assert_eq!(peer_ip_of(&a), c.pods[0].v4, "{a}");
}

/// Both traffic policies Local, endpoints on pod0 (local) and pod1 ("on another node"):
/// the ClusterIP and traffic from outside reach only pod0, while Pods reaching the
/// load-balancer IP short-circuit to every endpoint, as kube-proxy does.
#[test]
fn both_traffic_policies_local_short_circuit_pods_to_every_endpoint() {
    require_root!();
    let c = Cluster::new(3, 1);
    let _s0 = tcp_server(&c.pods[0].ns, "pod0", sa(c.pods[0].v4, 8080));
    let _s1 = tcp_server(&c.pods[1].ns, "pod1", sa(c.pods[1].v4, 8080));
    let local_ep = c.pod_ep(0, Family::V4, 8080);
    let mut remote_ep = c.pod_ep(1, Family::V4, 8080);
    remote_ep.is_local = false;
    let mut svc = service("both-local", Protocol::Tcp, Family::V4, "10.233.0.45", 80);
    svc.load_balancer_ips = vec!["203.0.113.45".parse().unwrap()];
    svc.internal_local = true;
    svc.external_local = true;
    svc.cluster_endpoints = vec![local_ep.clone()];
    svc.external_endpoints = vec![local_ep.clone()];
    svc.short_circuit_endpoints = vec![local_ep, remote_ep];
    let mut backend = NftablesBackend::new();
    c.sync(&mut backend, &table(c.settings(), vec![svc]));

    let servers = |from: &Netns, to: &str| -> std::collections::BTreeSet<String> {
        (0..24)
            .map(|_| {
                let a = tcp_ask(from, to.parse().unwrap(), TIMEOUT).unwrap_or_else(|e| panic!("{to}: {e}"));
                server_of(&a).to_string()
            })
            .collect()
    };
    let pod2 = &c.pods[2].ns;
    assert_eq!(servers(pod2, "10.233.0.45:80"), ["pod0".to_string()].into());
    assert_eq!(
        servers(pod2, "203.0.113.45:80"),
        ["pod0".to_string(), "pod1".to_string()].into(),
        "24 connects from a Pod to the LB IP: both endpoints (1 in 2^23 to fail by chance)"
    );
    assert_eq!(
        servers(&c.clients[0].0, "203.0.113.45:80"),
        ["pod0".to_string()].into()
    );
}

#[test]
fn client_ip_affinity_sticks_and_hairpin_reaches_itself() {
    require_root!();
    let c = Cluster::new(3, 1);
    let mut servers = Vec::new();
    for i in 0..3 {
        servers.push(tcp_server(
            &c.pods[i].ns,
            &format!("pod{i}"),
            sa(c.pods[i].v4, 8080),
        ));
    }
    let mut sticky = with_endpoints(
        service("sticky", Protocol::Tcp, Family::V4, "10.233.0.50", 80),
        vec![c.pod_ep(0, Family::V4, 8080), c.pod_ep(1, Family::V4, 8080)],
    );
    sticky.affinity_seconds = Some(600);
    let solo = with_endpoints(
        service("solo", Protocol::Tcp, Family::V4, "10.233.0.51", 80),
        vec![c.pod_ep(2, Family::V4, 8080)],
    );
    let mut backend = NftablesBackend::new();
    c.sync(&mut backend, &table(c.settings(), vec![sticky, solo]));

    let client = &c.pods[2].ns;
    let first = tcp_ask(client, "10.233.0.50:80".parse().unwrap(), TIMEOUT).expect("sticky");
    for _ in 0..15 {
        let a = tcp_ask(client, "10.233.0.50:80".parse().unwrap(), TIMEOUT).expect("sticky");
        assert_eq!(server_of(&a), server_of(&first), "affinity must stick");
    }
    // Hairpin: pod2 is the only endpoint of "solo" and reaches itself through it, seeing
    // the node's address (masqueraded), not its own.
    let a = tcp_ask(client, "10.233.0.51:80".parse().unwrap(), TIMEOUT).expect("hairpin");
    assert_eq!(server_of(&a), "pod2");
    assert_eq!(peer_ip_of(&a), c.gw_v4, "{a}");
}

#[test]
fn one_endpoint_change_touches_its_map_elements_only_and_no_change_runs_nothing() {
    require_root!();
    let node = Node::new("proxy-diff");
    let settings = NodeSettings {
        node_name: "n".into(),
        cluster_cidrs: vec!["10.1.0.0/16".parse().unwrap()],
        nodeport_addresses: vec![],
    };
    let ep = |i: u8| Endpoint {
        ip: IpAddr::from([10, 1, 0, i]),
        port: 80,
        is_local: true,
        ready: true,
    };
    let mk = |name: &str, cip: &str, eps: Vec<Endpoint>| {
        let mut p = with_endpoints(service(name, Protocol::Tcp, Family::V4, cip, 80), eps);
        p.node_port = Some(30000 + cip.rsplit('.').next().unwrap().parse::<u16>().unwrap());
        p
    };
    let a = mk("a", "10.233.0.1", vec![ep(1), ep(2)]);
    let b = mk("b", "10.233.0.2", vec![ep(3), ep(4)]);
    let d = mk("d", "10.233.0.3", vec![ep(5)]);
    let mut backend = NftablesBackend::new();
    let run = |backend: &mut NftablesBackend, t: &Plan| {
        node.netns()
            .run(|| backend.sync(t, &Changes::all()))
            .unwrap_or_else(|e| panic!("{e}\n{}", backend.last_transaction()))
    };
    let stats = run(
        &mut backend,
        &table(settings.clone(), vec![a.clone(), b.clone(), d.clone()]),
    );
    assert_eq!(stats.changed_ports, 3);
    assert_eq!(stats.rules, count_rules(&node));

    let stats = run(
        &mut backend,
        &table(settings.clone(), vec![a.clone(), b.clone(), d.clone()]),
    );
    assert_eq!(stats.changed_ports, 0);
    assert_eq!(backend.last_transaction(), "", "nothing changed, nothing sent");

    let b2 = mk("b", "10.233.0.2", vec![ep(3), ep(6)]);
    let stats = run(
        &mut backend,
        &table(settings.clone(), vec![a.clone(), b2.clone(), d.clone()]),
    );
    assert_eq!(stats.changed_ports, 1);
    let tx = backend.last_transaction().to_string();
    eprintln!("transaction for one endpoint change:\n{tx}");
    // The endpoint's key in the endpoint map now maps to the new endpoint, and the
    // hairpin pairs follow: no chain is touched.
    assert!(!tx.contains("chain"), "{tx}");
    let lines: Vec<&str> = tx.lines().filter(|l| !l.contains("hairpin-v4")).collect();
    assert_eq!(lines.len(), 2, "{tx}");
    assert!(
        lines[0].starts_with(&format!("delete element inet {TABLE} endpoints-v4-tcp-")),
        "{tx}"
    );
    assert!(
        lines[1].starts_with(&format!("add element inet {TABLE} endpoints-v4-tcp-")),
        "{tx}"
    );
    assert!(lines[1].ends_with(": 10.1.0.6 . 80 }"), "{tx}");
    assert_eq!(tx.lines().count(), 4, "{tx}");
    let listed = node.netns().exec_ok(&["nft", "list", "table", "inet", TABLE]);
    assert!(
        listed.contains("10.1.0.6 . 80") && !listed.contains("10.1.0.4 . 80"),
        "{listed}"
    );

    // A Service that goes away takes its element and chains with it, in one transaction.
    let stats = run(
        &mut backend,
        &table(settings.clone(), vec![a.clone(), b2.clone()]),
    );
    assert_eq!(stats.changed_ports, 1);
    let gone = format!("service-{}", port_base_name(&d.id));
    let chains = node.netns().exec_ok(&["nft", "list", "chains", "inet"]);
    assert!(!chains.contains(&gone), "{chains}");
    let listed = node.netns().exec_ok(&["nft", "list", "table", "inet", TABLE]);
    assert!(
        !listed.contains("10.233.0.3") && !listed.contains("30003"),
        "{listed}"
    );
    assert_eq!(stats.rules, count_rules(&node));

    // Node settings change: NodePort addresses restricted, the v4 cluster CIDR gone (so
    // the masquerade rule of every v4 Service chain goes): real nft accepts the rewrite.
    let mut changed = settings.clone();
    changed.nodeport_addresses = vec!["192.168.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()];
    changed.cluster_cidrs = vec!["fd00:1::/48".parse().unwrap()];
    let stats = run(&mut backend, &table(changed, vec![a.clone(), b2.clone()]));
    assert_eq!(stats.rules, count_rules(&node));
    let listed = node.netns().exec_ok(&["nft", "list", "table", "inet", TABLE]);
    assert!(
        listed.contains("ip daddr @nodeport-ips-v4 fib daddr type local"),
        "{listed}"
    );
    assert!(!listed.contains("ip saddr != @cluster-cidrs-v4"), "{listed}");
}

/// The rules of Ferry's table, counted from `nft -a list table` (a rule line ends with its
/// handle; declarations end with `{ # handle N`).
fn count_rules(node: &Node) -> usize {
    let listed = node
        .netns()
        .exec_ok(&["nft", "-a", "list", "table", "inet", TABLE]);
    listed
        .lines()
        .filter(|l| l.contains("# handle") && !l.contains('{'))
        .count()
}

#[test]
fn a_restarted_backend_converges_without_breaking_established_connections() {
    require_root!();
    let c = Cluster::new(2, 1);
    let _s0 = tcp_server(&c.pods[0].ns, "pod0", sa(c.pods[0].v4, 8080));
    let web = with_endpoints(
        service("web", Protocol::Tcp, Family::V4, "10.233.0.60", 80),
        vec![c.pod_ep(0, Family::V4, 8080)],
    );
    let mut old_only = with_endpoints(
        service("old", Protocol::Tcp, Family::V4, "10.233.0.61", 80),
        vec![c.pod_ep(1, Family::V4, 8080)],
    );
    old_only.affinity_seconds = Some(30);
    let mut first = NftablesBackend::new();
    c.sync(
        &mut first,
        &table(c.settings(), vec![web.clone(), old_only.clone()]),
    );

    // An established connection through the ClusterIP.
    let mut conn = c.pods[1]
        .ns
        .run(|| TcpStream::connect_timeout(&"10.233.0.60:80".parse().unwrap(), TIMEOUT))
        .expect("connect through the ClusterIP");
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("pod0"), "{line}");

    // The proxy "restarts": a new back end, a slightly different plan (the old Service is
    // gone, a new one appears).
    drop(first);
    let new_svc = with_endpoints(
        service("new", Protocol::Tcp, Family::V4, "10.233.0.62", 80),
        vec![c.pod_ep(0, Family::V4, 8080)],
    );
    let mut second = NftablesBackend::new();
    c.sync(
        &mut second,
        &table(c.settings(), vec![web.clone(), new_svc.clone()]),
    );
    // The table is replaced in one transaction; nothing else is touched.
    let tx = second.last_transaction().to_string();
    assert!(
        tx.starts_with("delete table inet ferry-proxy\nadd table inet ferry-proxy\n"),
        "{tx}"
    );
    assert!(!tx.contains("flush ruleset"));

    conn.write_all(b"still there?\n").unwrap();
    line.clear();
    reader
        .read_line(&mut line)
        .expect("the established connection survives the restart");
    assert_eq!(line, "pod0 still there?\n");

    let chains = c.nft(&["list", "chains", "inet"]);
    assert!(
        !chains.contains(&port_base_name(&old_only.id)),
        "stale chain left: {chains}"
    );
    assert!(chains.contains(&port_base_name(&new_svc.id)), "{chains}");
    let sets = c.nft(&["list", "sets", "inet"]);
    assert!(!sets.contains("affinity-"), "stale affinity set left: {sets}");
    let a = tcp_ask(&c.pods[1].ns, "10.233.0.62:80".parse().unwrap(), TIMEOUT).expect("new Service");
    assert!(a.starts_with("pod0"), "{a}");
    assert!(tcp_ask(
        &c.pods[1].ns,
        "10.233.0.61:80".parse().unwrap(),
        Duration::from_millis(500)
    )
    .is_err());
    // A third instance with the same plan converges to the same table.
    let before = c.nft(&["list", "table", "inet", TABLE]);
    let mut third = NftablesBackend::new();
    c.sync(&mut third, &table(c.settings(), vec![web, new_svc]));
    assert_eq!(c.nft(&["list", "table", "inet", TABLE]), before);
}

#[test]
fn cleanup_removes_only_ferrys_table() {
    require_root!();
    let node = Node::new("proxy-cleanup");
    node.netns().exec_ok(&["nft", "add table inet other; add chain inet other c { type filter hook input priority 0; }; add rule inet other c counter"]);
    let t = synthetic_plan(3, 2, 0);
    let mut backend = NftablesBackend::new();
    node.netns().run(|| backend.sync(&t, &Changes::all())).unwrap();
    let tables = node.netns().exec_ok(&["nft", "list", "tables"]);
    assert!(
        tables.contains("table inet ferry-proxy") && tables.contains("table inet other"),
        "{tables}"
    );
    node.netns().run(|| backend.cleanup()).unwrap();
    let tables = node.netns().exec_ok(&["nft", "list", "tables"]);
    assert_eq!(tables.trim(), "table inet other");
    let other = node.netns().exec_ok(&["nft", "list", "table", "inet", "other"]);
    assert!(other.contains("counter"), "{other}");
    // Cleanup without a table is fine, and a sync afterwards rebuilds everything.
    node.netns().run(|| backend.cleanup()).unwrap();
    node.netns().run(|| backend.sync(&t, &Changes::all())).unwrap();
    assert!(node
        .netns()
        .exec_ok(&["nft", "list", "tables"])
        .contains("ferry-proxy"));
}

#[test]
fn removing_a_udp_endpoint_moves_its_flows_and_leaves_tcp_alone() {
    require_root!();
    let c = Cluster::new(3, 1);
    let mut servers = Vec::new();
    for i in 0..2 {
        servers.push(udp_server(
            &c.pods[i].ns,
            &format!("pod{i}"),
            sa(c.pods[i].v4, 5353),
        ));
        servers.push(tcp_server(
            &c.pods[i].ns,
            &format!("pod{i}"),
            sa(c.pods[i].v4, 8080),
        ));
    }
    let all = vec![c.pod_ep(0, Family::V4, 5353), c.pod_ep(1, Family::V4, 5353)];
    let udp = with_endpoints(
        service("dns", Protocol::Udp, Family::V4, "10.233.0.70", 53),
        all.clone(),
    );
    let tcp = with_endpoints(
        service("web", Protocol::Tcp, Family::V4, "10.233.0.70", 80),
        vec![c.pod_ep(0, Family::V4, 8080), c.pod_ep(1, Family::V4, 8080)],
    );
    let mut backend = NftablesBackend::new();
    c.sync(&mut backend, &table(c.settings(), vec![udp.clone(), tcp.clone()]));

    // One UDP socket, one flow: pinned to one endpoint by conntrack.
    let client = &c.pods[2].ns;
    let sock = client.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
    sock.connect("10.233.0.70:53").unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let ask = |s: &UdpSocket| {
        s.send(b"who").unwrap();
        let mut buf = [0u8; 200];
        let n = s.recv(&mut buf).expect("UDP answer");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let pinned = server_of(&ask(&sock)).to_string();
    for _ in 0..5 {
        assert_eq!(server_of(&ask(&sock)), pinned);
    }
    // TCP connections to both endpoints, which must survive.
    let mut tcp_conns = Vec::new();
    for _ in 0..10 {
        let conn = client
            .run(|| TcpStream::connect_timeout(&"10.233.0.70:80".parse().unwrap(), TIMEOUT))
            .unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut r = BufReader::new(conn.try_clone().unwrap());
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        tcp_conns.push((conn, r));
    }
    let (i_pinned, i_other) = if pinned == "pod0" { (0, 1) } else { (1, 0) };
    let tcp_before = c
        .node
        .netns()
        .run(|| conntrack::list(libc::AF_INET as u8))
        .unwrap();
    let count_tcp = |list: &[conntrack::Entry]| list.iter().filter(|e| e.proto == 6).count();

    // The pinned endpoint goes away (its server keeps running: only conntrack can move us).
    let remaining = with_endpoints(udp.clone(), vec![c.pod_ep(i_other, Family::V4, 5353)]);
    c.sync(&mut backend, &table(c.settings(), vec![remaining, tcp.clone()]));
    let answer = ask(&sock);
    assert_eq!(
        server_of(&answer),
        format!("pod{i_other}"),
        "the same socket moves to the remaining endpoint"
    );
    let _ = i_pinned;
    let tcp_after = c
        .node
        .netns()
        .run(|| conntrack::list(libc::AF_INET as u8))
        .unwrap();
    assert_eq!(
        count_tcp(&tcp_after),
        count_tcp(&tcp_before),
        "TCP entries are never touched"
    );
    for (conn, r) in &mut tcp_conns {
        conn.write_all(b"ping\n").unwrap();
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert!(l.ends_with("ping\n"), "{l}");
    }
}

/// Timings for the figures: `cargo test --release -p ferry-proxy --test nftables
/// -- --ignored --nocapture timings`.
#[test]
#[ignore]
fn timings() {
    require_root!();
    let node = Node::new("proxy-bench");
    for (services, endpoints) in [(1000, 10), (10_000, 10)] {
        let t = synthetic_plan(services, endpoints, 0);
        let mut backend = NftablesBackend::new();
        let start = Instant::now();
        let stats = node.netns().run(|| backend.sync(&t, &Changes::all())).unwrap();
        eprintln!(
            "full sync {services} x {endpoints}: {:?} ({} rules, {} bytes of nft text)",
            start.elapsed(),
            stats.rules,
            backend.last_transaction().len()
        );
        if let Ok(dir) = std::env::var("FERRY_DUMP_TRANSACTIONS") {
            let path = format!("{dir}/full-{services}.nft");
            std::fs::write(&path, backend.last_transaction()).unwrap();
        }
        // From here on each sync names what changed, as the sync loop's does.
        let mut changed = t.clone();
        let added = synthetic_table(1, endpoints, services).ports;
        let added_ids = Changes::service_ports(added.keys().cloned());
        changed.services.ports.extend(added);
        let start = Instant::now();
        node.netns().run(|| backend.sync(&changed, &added_ids)).unwrap();
        eprintln!("  one added Service: {:?}", start.elapsed());
        let (id, p) = changed.services.ports.iter_mut().next().unwrap();
        p.cluster_endpoints[0].ip = "10.255.255.1".parse().unwrap();
        p.external_endpoints = p.cluster_endpoints.clone();
        let moved = Changes::service_ports([id.clone()]);
        let start = Instant::now();
        node.netns().run(|| backend.sync(&changed, &moved)).unwrap();
        eprintln!("  one changed endpoint: {:?}", start.elapsed());
        let start = Instant::now();
        node.netns()
            .run(|| backend.sync(&changed, &Changes::none()))
            .unwrap();
        eprintln!("  no change: {:?}", start.elapsed());
        let start = Instant::now();
        node.netns()
            .run(|| backend.sync(&changed, &Changes::all()))
            .unwrap();
        eprintln!(
            "  no change, no change log (every port compared): {:?}",
            start.elapsed()
        );
        let mut restarted = NftablesBackend::new();
        let start = Instant::now();
        node.netns()
            .run(|| restarted.sync(&changed, &Changes::all()))
            .unwrap();
        eprintln!("  first sync of a restarted back end: {:?}", start.elapsed());
        let start = Instant::now();
        node.netns().run(|| restarted.cleanup()).unwrap();
        eprintln!("  cleanup: {:?}", start.elapsed());
    }
}

/// `nft list table` with the elements of every set sorted (the kernel lists a hash set in
/// its own order, which differs between two namespaces holding the same elements).
fn normalized_listing(ns: &Netns) -> String {
    let listing = ns.exec_ok(&["nft", "list", "table", "inet", TABLE]);
    let mut out = Vec::new();
    let mut lines = listing.lines();
    while let Some(line) = lines.next() {
        let Some((head, rest)) = line.split_once("elements = { ") else {
            out.push(line.to_string());
            continue;
        };
        let mut items = rest.to_string();
        while !items.trim_end().ends_with('}') {
            items.push(' ');
            items.push_str(lines.next().expect("elements end with }").trim());
        }
        let items = items.trim_end().trim_end_matches('}');
        let mut items: Vec<&str> = items
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        items.sort();
        out.push(format!("{head}elements = {{ {} }}", items.join(", ")));
    }
    out.join("\n")
}

/// The back end speaks netlink; its transaction log is nft text. Both must say the same
/// thing: the same transaction applied through netlink in one namespace and through
/// `nft -f` in another gives identical `nft list table` output, for every rule shape
/// (ClusterIP in both families and three protocols, NodePort, externalTrafficPolicy Local
/// with its own endpoints, affinity, LB IPs with source ranges, external IPs, no
/// endpoints, restricted NodePort addresses, cluster CIDRs).
#[test]
fn netlink_and_nft_text_program_the_same_table() {
    require_root!();
    let by_netlink = Node::new("proxy-oracle-nl");
    let by_text = Node::new("proxy-oracle-txt");
    let settings = NodeSettings {
        node_name: "n".into(),
        cluster_cidrs: vec!["10.1.0.0/16".parse().unwrap(), "fd00:1::/48".parse().unwrap()],
        nodeport_addresses: vec!["192.168.0.0/16".parse().unwrap(), "fd00:9::/64".parse().unwrap()],
    };
    let ep = |ip: &str, port: u16, local: bool| Endpoint {
        ip: ip.parse().unwrap(),
        port,
        is_local: local,
        ready: true,
    };
    let web = with_endpoints(
        service("web", Protocol::Tcp, Family::V4, "10.96.0.10", 80),
        vec![ep("10.1.0.2", 8080, true), ep("10.1.0.3", 8080, false)],
    );
    let mut dns = with_endpoints(
        service("dns", Protocol::Udp, Family::V6, "fd00:96::10", 53),
        vec![ep("fd00:1::2", 53, true), ep("fd00:1::3", 53, false)],
    );
    dns.node_port = Some(30053);
    let sctp = with_endpoints(
        service("sig", Protocol::Sctp, Family::V4, "10.96.0.11", 3868),
        vec![ep("10.1.0.4", 3868, true)],
    );
    let mut local = with_endpoints(
        service("local", Protocol::Tcp, Family::V4, "10.96.0.12", 443),
        vec![ep("10.1.0.2", 8443, true), ep("10.1.0.5", 8443, false)],
    );
    local.external_local = true;
    local.external_endpoints = vec![ep("10.1.0.2", 8443, true)];
    local.node_port = Some(30443);
    local.load_balancer_ips = vec!["192.0.2.10".parse().unwrap()];
    local.source_ranges = vec![
        "198.51.100.0/24".parse().unwrap(),
        "203.0.113.128/25".parse().unwrap(),
    ];
    let mut sticky = with_endpoints(
        service("sticky", Protocol::Tcp, Family::V6, "fd00:96::11", 80),
        vec![ep("fd00:1::4", 80, true), ep("fd00:1::5", 80, false)],
    );
    sticky.affinity_seconds = Some(10800);
    sticky.external_ips = vec!["2001:db8::7".parse().unwrap()];
    let mut empty = service("empty", Protocol::Tcp, Family::V4, "10.96.0.13", 80);
    empty.node_port = Some(30080);
    let t = table(settings, vec![web, dns, sctp, local, sticky, empty]);

    let mut backend = NftablesBackend::new();
    by_netlink
        .netns()
        .run(|| backend.sync(&t, &Changes::all()))
        .unwrap_or_else(|e| panic!("{e}\n{}", backend.last_transaction()));
    let text = backend.last_transaction().to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tx.nft");
    std::fs::write(&file, &text).unwrap();
    by_text.netns().exec_ok(&["nft", "-f", file.to_str().unwrap()]);
    let (a, b) = (
        normalized_listing(by_netlink.netns()),
        normalized_listing(by_text.netns()),
    );
    if a != b {
        let (fa, fb) = (dir.path().join("netlink"), dir.path().join("nft-f"));
        std::fs::write(&fa, &a).unwrap();
        std::fs::write(&fb, &b).unwrap();
        let diff = std::process::Command::new("diff")
            .arg("-u")
            .args([&fa, &fb])
            .output()
            .unwrap();
        panic!(
            "the two tables differ:\n{}\ntransaction:\n{text}",
            String::from_utf8_lossy(&diff.stdout)
        );
    }
    // And the listing is what an operator should read: no raw hex where nft knows types.
    assert!(a.contains("10.96.0.10 . tcp . 80 : goto service-"), "{a}");
    assert!(a.contains("dnat ip to numgen random mod 2 offset"), "{a}");
    assert!(a.contains("ip saddr 203.0.113.128/25 return"), "{a}");
}

// ---------------------------------------------------------------------------------------
// SCTP with raw packets.
//
// The test kernel has SCTP connection tracking and NAT (CONFIG_NF_CT_PROTO_SCTP) but no
// SCTP socket stack (CONFIG_IP_SCTP unset: `socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP)`
// fails with EPROTONOSUPPORT), so no Pod can run an SCTP server. What a Service needs from
// SCTP is only the first packet of an association: the client sends INIT chunks built by
// hand on raw sockets (`SOCK_RAW`, `IPPROTO_SCTP`: the kernel adds the IP header), and
// each endpoint Pod reads what arrives on a raw socket of its own. Nothing answers the
// INIT; the raw socket taking the packet also keeps the Pod's kernel from answering with
// "protocol unreachable".
// ---------------------------------------------------------------------------------------

const IPPROTO_SCTP: i32 = 132;

/// CRC32c (Castagnoli, reflected polynomial 0x82F63B78), the SCTP checksum (RFC 9260
/// appendix A).
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            bit += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        CRC32C_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// The checksum field of an SCTP packet: CRC32c over the packet with the field zeroed,
/// stored least significant byte first (as Linux's `sctp_compute_cksum` does).
fn sctp_checksum(packet: &[u8]) -> [u8; 4] {
    let mut p = packet.to_vec();
    p[8..12].fill(0);
    crc32c(&p).to_le_bytes()
}

/// An SCTP packet holding one INIT chunk (RFC 9260 3.3.2): verification tag 0 in the common
/// header (as an INIT must have; conntrack refuses anything else), a non-zero initiate tag,
/// which identifies the packet on the other side whatever NAT does to addresses and ports.
fn sctp_init(src_port: u16, dst_port: u16, initiate_tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&src_port.to_be_bytes());
    p.extend_from_slice(&dst_port.to_be_bytes());
    p.extend_from_slice(&0u32.to_be_bytes()); // verification tag
    p.extend_from_slice(&[0; 4]); // checksum, below
    p.extend_from_slice(&[1, 0]); // chunk type INIT, flags
    p.extend_from_slice(&20u16.to_be_bytes()); // chunk length
    p.extend_from_slice(&initiate_tag.to_be_bytes());
    p.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&10u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&10u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&initiate_tag.wrapping_mul(7).to_be_bytes()); // initial TSN
    let sum = sctp_checksum(&p);
    p[8..12].copy_from_slice(&sum);
    p
}

/// An SCTP packet as an endpoint Pod received it.
#[derive(Debug, Clone)]
struct SctpSeen {
    /// Which Pod's socket got it.
    pod: usize,
    src: IpAddr,
    dst: IpAddr,
    src_port: u16,
    dst_port: u16,
    vtag: u32,
    chunk_type: u8,
    initiate_tag: u32,
    checksum_ok: bool,
}

fn parse_sctp(pod: usize, src: IpAddr, dst: IpAddr, p: &[u8]) -> Option<SctpSeen> {
    if p.len() < 20 {
        return None;
    }
    let u16_at = |i: usize| u16::from_be_bytes([p[i], p[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes(p[i..i + 4].try_into().unwrap());
    Some(SctpSeen {
        pod,
        src,
        dst,
        src_port: u16_at(0),
        dst_port: u16_at(2),
        vtag: u32_at(4),
        chunk_type: p[12],
        initiate_tag: u32_at(16),
        checksum_ok: p[8..12] == sctp_checksum(p),
    })
}

/// A raw socket of `proto` made inside `ns`, bound to `local` (so it only gets packets
/// for that address) when given. Returned as a `UdpSocket`, which only wraps the fd:
/// `sendto`/`recvfrom` are the same calls on a raw socket (the port is 0 both ways), and
/// it needs no unsafe code for the receive buffer.
fn raw_socket(ns: &Netns, v6: bool, proto: i32, local: Option<IpAddr>) -> UdpSocket {
    let domain = if v6 {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let s = ns
        .run(|| {
            socket2::Socket::new(
                domain,
                socket2::Type::from(libc::SOCK_RAW),
                Some(socket2::Protocol::from(proto)),
            )
        })
        .unwrap_or_else(|e| panic!("raw socket for protocol {proto}: {e}"));
    if let Some(ip) = local {
        s.bind(&SocketAddr::new(ip, 0).into())
            .unwrap_or_else(|e| panic!("bind raw socket to {ip}: {e}"));
    }
    let s = UdpSocket::from(s);
    s.set_nonblocking(true).unwrap();
    s
}

/// Everything waiting on the endpoint sockets, parsed. A raw IPv4 socket delivers the IP
/// header too; a raw IPv6 socket only the payload (its destination is the address the
/// socket is bound to).
fn drain_sctp(sockets: &[(usize, IpAddr, UdpSocket)], seen: &mut Vec<SctpSeen>) {
    let mut buf = [0u8; 2048];
    for (pod, local, s) in sockets {
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let p = &buf[..n];
            let parsed = match local {
                IpAddr::V4(_) => {
                    let ihl = usize::from(p[0] & 0x0f) * 4;
                    assert_eq!(p[9], IPPROTO_SCTP as u8, "not SCTP: {p:02x?}");
                    let src = IpAddr::from(<[u8; 4]>::try_from(&p[12..16]).unwrap());
                    let dst = IpAddr::from(<[u8; 4]>::try_from(&p[16..20]).unwrap());
                    parse_sctp(*pod, src, dst, &p[ihl..])
                }
                IpAddr::V6(_) => parse_sctp(*pod, from.ip(), *local, p),
            };
            seen.push(parsed.unwrap_or_else(|| panic!("short SCTP packet at pod{pod}: {p:02x?}")));
        }
    }
}

/// Waits (at most `within`) on a raw ICMP or ICMPv6 socket for "port unreachable" about an
/// SCTP packet from `src_port` to `to`; returns the time it took.
fn wait_port_unreachable(icmp: &UdpSocket, to: SocketAddr, src_port: u16, within: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 2048];
    let mut others = Vec::new();
    while start.elapsed() < within {
        let Ok(n) = icmp.recv(&mut buf) else {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        let p = &buf[..n];
        // (type, code, the wanted type and code, quoted protocol, quoted destination, quoted
        // SCTP header)
        let quoted = match to {
            SocketAddr::V4(_) => {
                // IPv4 raw sockets deliver the IP header; ICMP follows it.
                let icmp_at = usize::from(p[0] & 0x0f) * 4;
                let q = icmp_at + 8;
                (p.len() >= q + 28).then(|| {
                    let qihl = usize::from(p[q] & 0x0f) * 4;
                    let dst = IpAddr::from(<[u8; 4]>::try_from(&p[q + 16..q + 20]).unwrap());
                    (p[icmp_at], p[icmp_at + 1], (3, 3), p[q + 9], dst, &p[q + qihl..])
                })
            }
            SocketAddr::V6(_) => {
                // ICMPv6 raw sockets deliver the ICMPv6 message only.
                (p.len() >= 8 + 40 + 8).then(|| {
                    let dst = IpAddr::from(<[u8; 16]>::try_from(&p[8 + 24..8 + 40]).unwrap());
                    (p[0], p[1], (1, 4), p[8 + 6], dst, &p[8 + 40..])
                })
            }
        };
        match quoted {
            Some((ty, code, want, proto, dst, sctp))
                if (ty, code) == want
                    && proto == IPPROTO_SCTP as u8
                    && dst == to.ip()
                    && sctp.len() >= 4
                    && sctp[0..2] == src_port.to_be_bytes()
                    && sctp[2..4] == to.port().to_be_bytes() =>
            {
                return start.elapsed();
            }
            _ => others.push(p.get(..p.len().min(64)).unwrap_or(p).to_vec()),
        }
    }
    panic!(
        "no ICMP port unreachable for SCTP {src_port} -> {to} within {within:?}; other ICMP seen: {others:02x?}"
    );
}

#[test]
fn sctp_crc32c_matches_the_check_values() {
    // The standard check value, and RFC 3720 B.4's 32 zero bytes.
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(&[0; 32]), 0x8A91_36AA);
    let p = sctp_init(1, 2, 3);
    assert_eq!(p.len(), 32);
    assert!(
        parse_sctp(0, IpAddr::from([0; 4]), IpAddr::from([0; 4]), &p)
            .unwrap()
            .checksum_ok
    );
}

#[test]
fn cluster_ip_sctp_reaches_every_backend_with_raw_init_packets() {
    require_root!();
    let c = Cluster::new(3, 1);
    let (svc4, svc6): (IpAddr, IpAddr) = ("10.233.0.80".parse().unwrap(), "fd00:233::80".parse().unwrap());
    let (empty4, empty6): (IpAddr, IpAddr) =
        ("10.233.0.81".parse().unwrap(), "fd00:233::81".parse().unwrap());
    let (port, target) = (3868, 13868);
    let sctp4 = with_endpoints(
        service("diameter", Protocol::Sctp, Family::V4, "10.233.0.80", port),
        vec![c.pod_ep(0, Family::V4, target), c.pod_ep(1, Family::V4, target)],
    );
    let sctp6 = with_endpoints(
        service("diameter", Protocol::Sctp, Family::V6, "fd00:233::80", port),
        vec![c.pod_ep(0, Family::V6, target), c.pod_ep(1, Family::V6, target)],
    );
    let none4 = service("empty-sctp", Protocol::Sctp, Family::V4, "10.233.0.81", port);
    let none6 = service("empty-sctp", Protocol::Sctp, Family::V6, "fd00:233::81", port);
    let mut backend = NftablesBackend::new();
    c.sync(
        &mut backend,
        &table(c.settings(), vec![sctp4, sctp6, none4, none6]),
    );

    // Each endpoint Pod listens on a raw SCTP socket per family, bound to its address.
    let mut listeners = Vec::new();
    for i in 0..2 {
        for ip in [c.pods[i].v4, c.pods[i].v6] {
            listeners.push((
                i,
                ip,
                raw_socket(&c.pods[i].ns, ip.is_ipv6(), IPPROTO_SCTP, Some(ip)),
            ));
        }
    }
    let client = &c.pods[2];
    let (outside, outside_ip) = (&c.clients[0].0, c.clients[0].1);
    let client4 = raw_socket(&client.ns, false, IPPROTO_SCTP, None);
    let client6 = raw_socket(&client.ns, true, IPPROTO_SCTP, None);
    let outside4 = raw_socket(outside, false, IPPROTO_SCTP, None);
    let send = |s: &UdpSocket, to: IpAddr, src_port: u16, tag: u32, corrupt: bool| {
        let mut p = sctp_init(src_port, port, tag);
        if corrupt {
            p[8] ^= 0xff;
        }
        s.send_to(&p, SocketAddr::new(to, 0))
            .unwrap_or_else(|e| panic!("send INIT to {to}: {e}"));
    };

    // A corrupted checksum first: conntrack verifies it (nf_conntrack_checksum=1), marks the
    // packet invalid, and NAT never sees it. This is what makes the good packets' delivery
    // below a proof that our checksum is right.
    const BAD_PORT: u16 = 43000;
    const BAD_TAG: u32 = 0x0BAD_0001;
    send(&client4, svc4, BAD_PORT, BAD_TAG, true);
    // Every INIT from a new source port is a new association, so a new random choice.
    const N: u16 = 40;
    const N_OUTSIDE: u16 = 10;
    let mut expected = std::collections::BTreeMap::new(); // initiate tag -> (source, source port)
    for i in 0..N {
        let tag = 0x5C70_0000 + u32::from(i);
        send(&client4, svc4, 40000 + i, tag, false);
        expected.insert(tag, (client.v4, 40000 + i));
        let tag = 0x5C76_0000 + u32::from(i);
        send(&client6, svc6, 41000 + i, tag, false);
        expected.insert(tag, (client.v6, 41000 + i));
    }
    // From outside the cluster CIDR: masqueraded to the bridge address, source port and all.
    for i in 0..N_OUTSIDE {
        let tag = 0x0C70_0000 + u32::from(i);
        send(&outside4, svc4, 42000 + i, tag, false);
        expected.insert(tag, (outside_ip, 42000 + i));
    }
    let mut seen = Vec::new();
    let start = Instant::now();
    loop {
        drain_sctp(&listeners, &mut seen);
        if seen.len() >= expected.len() || start.elapsed() > Duration::from_secs(2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!(
        "{} of {} INITs delivered in {:?}",
        seen.len(),
        expected.len(),
        start.elapsed()
    );
    let mut per_pod = std::collections::BTreeMap::<String, usize>::new();
    for s in &seen {
        let Some(&(src, src_port)) = expected.get(&s.initiate_tag) else {
            panic!("a packet nobody expected (the corrupted one?): {s:?}");
        };
        let pod = &c.pods[s.pod];
        let family = if src.is_ipv6() { "v6" } else { "v4" };
        assert_eq!(
            s.dst,
            if src.is_ipv6() { pod.v6 } else { pod.v4 },
            "DNAT to the endpoint's address: {s:?}"
        );
        assert_eq!(s.dst_port, target, "DNAT to the target port: {s:?}");
        assert_eq!((s.chunk_type, s.vtag), (1, 0), "an INIT, untouched: {s:?}");
        assert!(
            s.checksum_ok,
            "NAT rewrote the ports and the CRC32c with them: {s:?}"
        );
        if src == outside_ip {
            assert_eq!(
                s.src, c.gw_v4,
                "from outside the cluster CIDR: masqueraded to the bridge address: {s:?}"
            );
            *per_pod
                .entry(format!("outside {family} pod{}", s.pod))
                .or_default() += 1;
        } else {
            assert_eq!(
                (s.src, s.src_port),
                (src, src_port),
                "a Pod inside the cluster CIDR keeps its address and port: {s:?}"
            );
            *per_pod.entry(format!("{family} pod{}", s.pod)).or_default() += 1;
        }
    }
    eprintln!("SCTP distribution: {per_pod:?}");
    let mut tags: Vec<u32> = seen.iter().map(|s| s.initiate_tag).collect();
    tags.sort();
    tags.dedup();
    assert_eq!(tags.len(), seen.len(), "each INIT arrives once: {seen:?}");
    assert_eq!(
        seen.len(),
        expected.len(),
        "every INIT reaches an endpoint: {per_pod:?}"
    );
    for key in ["v4 pod0", "v4 pod1", "v6 pod0", "v6 pod1"] {
        assert!(
            per_pod.get(key).copied().unwrap_or(0) >= 5,
            "{key} got too little of {N}: {per_pod:?}"
        );
    }

    // Conntrack's view: one association per INIT from the Pod, each towards an endpoint's
    // target port, and none for the corrupted packet.
    let endpoints4 = [sa(c.pods[0].v4, target), sa(c.pods[1].v4, target)];
    let endpoints6 = [sa(c.pods[0].v6, target), sa(c.pods[1].v6, target)];
    let (ct4, ct6) = c.node.netns().run(|| {
        (
            conntrack::list(libc::AF_INET as u8).unwrap(),
            conntrack::list(libc::AF_INET6 as u8).unwrap(),
        )
    });
    let from_client = |list: &[conntrack::Entry], client: IpAddr, svc: IpAddr, eps: &[SocketAddr]| {
        let mine: Vec<&conntrack::Entry> = list
            .iter()
            .filter(|e| e.proto == IPPROTO_SCTP as u8 && e.orig_src.ip() == client)
            .collect();
        for e in &mine {
            assert!(
                e.orig_src.port() != BAD_PORT,
                "the corrupted INIT got a conntrack entry: {e:?}"
            );
            assert_eq!(e.orig_dst, sa(svc, port), "{e:?}");
            assert!(eps.contains(&e.reply_src), "{e:?}");
        }
        mine.len()
    };
    assert_eq!(from_client(&ct4, client.v4, svc4, &endpoints4), usize::from(N));
    assert_eq!(from_client(&ct6, client.v6, svc6, &endpoints6), usize::from(N));

    // A Service without endpoints: the reject chain answers the INIT with ICMP (ICMPv6) port
    // unreachable, quoting our packet. Nothing else on the way says "port": without Ferry's
    // rules the node routes the packet towards the outside client (its default route),
    // which does not forward and drops it without a word.
    let icmp4 = raw_socket(&client.ns, false, libc::IPPROTO_ICMP, None);
    let icmp6 = raw_socket(&client.ns, true, libc::IPPROTO_ICMPV6, None);
    for (icmp, sctp, to, src_port, tag) in [
        (&icmp4, &client4, empty4, 44000, 0x0E70_0004),
        (&icmp6, &client6, empty6, 44006, 0x0E70_0006),
    ] {
        send(sctp, to, src_port, tag, false);
        let took = wait_port_unreachable(icmp, sa(to, port), src_port, Duration::from_secs(1));
        eprintln!("SCTP to {to}: port unreachable after {took:?}");
    }
    // Nothing more reached the endpoints: neither the corrupted INIT nor the refused ones.
    let mut late = Vec::new();
    drain_sctp(&listeners, &mut late);
    assert!(late.is_empty(), "unexpected SCTP at the endpoints: {late:?}");
}
