//! The Pod network between nodes (issue 13): three node netns, `ferry-proxy` on each from a
//! manifests directory holding the three Nodes, Pods made by `ferry-bridge` with the
//! conflist each daemon wrote, and real TCP between them.
//!
//! - `host_gw_on_one_link`: the nodes share one underlay link (a bridge in a netns of
//!   its own); every Pod reaches every other over IPv4 and IPv6 with its own address;
//!   traffic to outside the cluster CIDR is masqueraded; a Service whose endpoints are on
//!   the other nodes works from every node's Pods and by NodePort from outside; a Node
//!   removed from the manifests loses its routes everywhere within a second, and gets
//!   them back when re-added; the conflist is never seen half-written while it changes,
//!   and is not rewritten when nothing in it changed.
//! - `vxlan_and_auto_across_a_router`: two nodes share a subnet, the third is behind a
//!   router netns that drops IP fragments and knows no Pod CIDR; `auto` picks host-gw for
//!   the neighbour and VXLAN for the far node (IPv6 Pods ride the IPv4 underlay); 1,400-byte
//!   payloads and a 1 MB transfer pass (full-size segments, so the Pod MTU is right); a
//!   daemon killed with SIGKILL and restarted does not break a transfer running through
//!   the restart.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_tests::{
    endpoint_slice, ferry_bin, require_root, service, unique_v4_subnet, unique_v6_subnet, wait_until,
    CniCall, Netns, Node, Pod, ProxyProcess,
};
use serde_json::{json, Value};

/// `ip` inside `ns`, panicking on failure.
fn ip(ns: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip -n {ns} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `/24` at index `i` of a v4 prefix `a.b.c.0/n`: `a.b.(c+i).0/24`.
fn v4_sub(base: &str, i: u8, host: u8) -> String {
    let net: std::net::Ipv4Addr = base.split('/').next().unwrap().parse().unwrap();
    let o = net.octets();
    format!("{}.{}.{}.{host}", o[0], o[1], o[2] + i)
}

/// Address `host` of the `/80` at index `i` inside a `/64`, as `ip` prints it.
fn v6_sub(base64: &str, i: u8, host: u16) -> String {
    let net: std::net::Ipv6Addr = base64.split('/').next().unwrap().parse().unwrap();
    let s = net.segments();
    std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], u16::from(i), 0, 0, host).to_string()
}

/// The first address of a CIDR (a Pod CIDR's gateway), as `ip` prints it.
fn first_host(cidr: &str) -> IpAddr {
    match cidr.split('/').next().unwrap().parse::<IpAddr>().unwrap() {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
    }
}

struct ClusterNode {
    name: String,
    node: Node,
    /// The address other nodes know it by (Node InternalIP), v4 and maybe v6.
    ip4: String,
    ip6: Option<String>,
    pod4: String,
    pod6: String,
    proxy: Option<ProxyProcess>,
    manifests: PathBuf,
    flags: Vec<String>,
}

impl ClusterNode {
    fn conf_dir(&self) -> PathBuf {
        self.node.state_dir().join("net.d")
    }

    fn conflist_path(&self) -> PathBuf {
        self.conf_dir().join("10-ferry.conflist")
    }

    fn start(&mut self) {
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        self.proxy = Some(ProxyProcess::start(
            self.node.netns(),
            &self.manifests,
            &self.name,
            &flags,
        ));
    }

    fn log(&self) -> String {
        self.proxy.as_ref().map(ProxyProcess::log).unwrap_or_default()
    }

    /// `ip route show proto 118` of both families.
    fn ferry_routes(&self) -> String {
        let ns = self.node.name();
        ip(ns, &["route", "show", "proto", "118"]) + &ip(ns, &["-6", "route", "show", "proto", "118"])
    }

    /// A Pod made by ferry-bridge with the conflist this node's daemon wrote; its v4 and
    /// v6 addresses.
    fn pod(&self, tag: &str) -> (Pod, IpAddr, IpAddr) {
        let path = self.conflist_path();
        assert!(
            wait_until(Duration::from_secs(10), || path.exists()).is_some(),
            "{} never wrote {}:\n{}",
            self.name,
            path.display(),
            self.log()
        );
        let list: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        // What a runtime (libcni) hands the list's one plugin: its entry, with the list's
        // name and cniVersion.
        let mut conf = list["plugins"][0].clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        let pod = self.node.pod(tag);
        let result = CniCall::new(ferry_bin("ferry-bridge"), "ADD", conf)
            .for_pod(&pod)
            .run_in(self.node.netns())
            .ok();
        let addr = |v4: bool| -> IpAddr {
            result["ips"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| {
                    i["address"]
                        .as_str()
                        .unwrap()
                        .split('/')
                        .next()
                        .unwrap()
                        .parse::<IpAddr>()
                        .unwrap()
                })
                .find(|a| a.is_ipv4() == v4)
                .unwrap_or_else(|| panic!("no {} address in {result}", if v4 { "v4" } else { "v6" }))
        };
        (pod, addr(true), addr(false))
    }
}

/// A Node object as the API server shows it.
fn node_object(n: &ClusterNode, with_v6_cidr: bool) -> Value {
    let mut cidrs = vec![n.pod4.clone()];
    if with_v6_cidr {
        cidrs.push(n.pod6.clone());
    }
    let mut addresses = vec![json!({"type": "InternalIP", "address": n.ip4})];
    if let Some(ip6) = &n.ip6 {
        addresses.push(json!({"type": "InternalIP", "address": ip6}));
    }
    addresses.push(json!({"type": "Hostname", "address": n.name}));
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": n.name},
           "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs},
           "status": {"addresses": addresses}})
}

/// Writes `objects` as `<file>.json` into every node's manifests directory.
fn write_all(nodes: &[ClusterNode], file: &str, objects: &[Value]) {
    for n in nodes {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        let tmp = n.manifests.join(format!(".{file}.tmp"));
        std::fs::create_dir_all(&n.manifests).unwrap();
        std::fs::write(&tmp, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
        std::fs::rename(tmp, n.manifests.join(format!("{file}.json"))).unwrap();
    }
}

/// Connects from `from` to `to` and returns the peer address the server saw.
fn seen_peer(from: &Netns, to: SocketAddr) -> IpAddr {
    let answer = from
        .tcp_request(to)
        .unwrap_or_else(|e| panic!("{} -> {to}: {e}", from.name()));
    let peer: SocketAddr = answer.split(' ').next().unwrap().parse().unwrap();
    peer.ip()
}

/// A TCP sink in `ns` on `addr`: reads each connection to its end and answers with the
/// number of bytes read.
fn sink(ns: &Netns, addr: SocketAddr) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let listener = ns.run(|| TcpListener::bind(addr)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    conn.set_nonblocking(false).unwrap();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 65536];
                        let mut total = 0usize;
                        loop {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => total += n,
                            }
                        }
                        let _ = conn.write_all(format!("{total}\n").as_bytes());
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    (stop, thread)
}

/// Sends `chunks` writes of `size` bytes from `from` to a [`sink`] at `to`, pausing
/// `pause` between them; returns what the sink counted.
fn send(from: &Netns, to: SocketAddr, size: usize, chunks: usize, pause: Duration) -> std::io::Result<usize> {
    let mut conn = from.tcp_connect(to)?;
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    let data = vec![0x5au8; size];
    for _ in 0..chunks {
        conn.write_all(&data)?;
        std::thread::sleep(pause);
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    answer
        .trim()
        .parse()
        .map_err(|_| std::io::Error::other(format!("sink answered {answer:?}")))
}

/// Three node netns with addresses, not yet wired to anything.
fn three_nodes(tag: &str, v6_underlay: bool, mode: &str) -> (Vec<ClusterNode>, String, String) {
    let cluster4 = unique_v4_subnet(20);
    let cluster6 = unique_v6_subnet();
    let mut nodes = Vec::new();
    for i in 0..3u8 {
        let node = Node::new(&format!("{tag}{i}"));
        let manifests = node.state_dir().join("manifests");
        let conf_dir = node.state_dir().join("net.d");
        let ipam = node.state_dir().join("ipam");
        let flags = vec![
            "--cluster-cidr".to_string(),
            format!("{cluster4},{cluster6}"),
            "--pod-network-mode".into(),
            mode.into(),
            "--cni-conf-dir".into(),
            conf_dir.display().to_string(),
            "--cni-ipam-data-dir".into(),
            ipam.display().to_string(),
            "--cni-bridge".into(),
            "cni0".into(),
        ];
        nodes.push(ClusterNode {
            name: format!("node-{i}"),
            node,
            ip4: String::new(),
            ip6: v6_underlay.then(String::new),
            pod4: format!("{}/24", v4_sub(&cluster4, i, 0)),
            pod6: format!("{}/80", v6_sub(&cluster6, i, 0)),
            proxy: None,
            manifests,
            flags,
        });
    }
    (nodes, cluster4, cluster6)
}

/// Wires `node` to `hub` (a netns) with a veth pair: `eth0` in the node, `port` in the hub.
fn wire(node: &ClusterNode, hub: &Netns, port: &str) {
    let n = node.node.name();
    ip(
        n,
        &[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            hub.name(),
        ],
    );
    ip(n, &["link", "set", "eth0", "up"]);
    ip(hub.name(), &["link", "set", port, "up"]);
}

fn all_pairs_reach_each_other(pods: &[(Pod, IpAddr, IpAddr)], servers_port: u16) -> Vec<ferry_tests::Server> {
    let mut servers = Vec::new();
    for (pod, a4, a6) in pods {
        servers.push(pod.tcp_server(SocketAddr::new(*a4, servers_port)));
        servers.push(pod.tcp_server(SocketAddr::new(*a6, servers_port)));
    }
    for (from, f4, f6) in pods {
        for (_, t4, t6) in pods {
            assert_eq!(
                seen_peer(from, SocketAddr::new(*t4, servers_port)),
                *f4,
                "{f4} -> {t4}"
            );
            assert_eq!(
                seen_peer(from, SocketAddr::new(*t6, servers_port)),
                *f6,
                "{f6} -> {t6}"
            );
        }
    }
    servers
}

#[test]
fn host_gw_on_one_link() {
    require_root!();
    let (mut nodes, cluster4, _) = three_nodes("hg", true, "host-gw");
    let underlay = Netns::new("hg-ul");
    ip(underlay.name(), &["link", "add", "br0", "type", "bridge"]);
    ip(underlay.name(), &["link", "set", "br0", "up"]);
    let net4 = unique_v4_subnet(24);
    let net6 = unique_v6_subnet();
    for (i, n) in nodes.iter_mut().enumerate() {
        let port = format!("ul{i}");
        wire(n, &underlay, &port);
        ip(underlay.name(), &["link", "set", &port, "master", "br0"]);
        n.ip4 = v4_sub(&net4, 0, i as u8 + 1);
        n.ip6 = Some(format!("{}{}", net6.trim_end_matches("/64"), i + 1));
        let nn = n.node.name().to_string();
        ip(&nn, &["addr", "add", &format!("{}/24", n.ip4), "dev", "eth0"]);
        ip(
            &nn,
            &[
                "addr",
                "add",
                &format!("{}/64", n.ip6.as_ref().unwrap()),
                "dev",
                "eth0",
                "nodad",
            ],
        );
    }
    let node_objects: Vec<Value> = nodes.iter().map(|n| node_object(n, true)).collect();
    write_all(&nodes, "nodes", &node_objects);
    for n in nodes.iter_mut() {
        n.start();
    }
    let pods: Vec<_> = nodes.iter().map(|n| n.pod("p")).collect();

    // Routes: one per peer Pod CIDR via the peer's address, in Ferry's protocol.
    for n in &nodes {
        let peers: Vec<&ClusterNode> = nodes.iter().filter(|p| p.name != n.name).collect();
        assert!(
            wait_until(Duration::from_secs(10), || {
                let routes = n.ferry_routes();
                peers.iter().all(|p| {
                    routes.contains(&format!("{} via {}", p.pod4, p.ip4))
                        && routes.contains(&format!("{} via {}", p.pod6, p.ip6.as_ref().unwrap()))
                })
            })
            .is_some(),
            "{}: {}\n{}",
            n.name,
            n.ferry_routes(),
            n.log()
        );
        assert!(!n.ferry_routes().contains("ferry.vxlan"), "host-gw made a tunnel");
    }

    // Every Pod reaches every other, both families, with its own address.
    let _servers = all_pairs_reach_each_other(&pods, 8080);

    // Out of the cluster: masqueraded to the node's address.
    let outside = nodes[0].node.client("hg-out");
    let link = unique_v4_subnet(30);
    let (node_side, out_side) = (v4_sub(&link, 0, 1), v4_sub(&link, 0, 2));
    assert!(!cluster4.contains(&link));
    nodes[0]
        .node
        .connect_client(&outside, &format!("{out_side}/30"), &format!("{node_side}/30"));
    let _outside_server = outside.tcp_server(format!("{out_side}:9090").parse().unwrap());
    assert_eq!(
        seen_peer(&pods[0].0, format!("{out_side}:9090").parse().unwrap()),
        node_side.parse::<IpAddr>().unwrap(),
        "Pod traffic leaving the cluster is masqueraded"
    );

    // A Service whose endpoints are on the other nodes, from every node's Pods and by
    // NodePort from outside.
    let cluster_ip = v4_sub(&unique_v4_subnet(24), 0, 10);
    let svc = service(
        "web",
        &cluster_ip,
        &[("http", "TCP", 80, json!(8080))],
        json!({"type": "NodePort", "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080}]}),
    );
    let (e1, e2) = (pods[1].1.to_string(), pods[2].1.to_string());
    let slice = endpoint_slice(
        "web",
        "a",
        &[
            (&e1, "node-1", true, true, false),
            (&e2, "node-2", true, true, false),
        ],
        &[("http", "TCP", 8080)],
    );
    write_all(&nodes, "web", &[svc, slice]);
    let to_service: SocketAddr = format!("{cluster_ip}:80").parse().unwrap();
    for (pod, a4, _) in &pods {
        assert!(
            wait_until(Duration::from_secs(10), || pod.tcp_request(to_service).is_ok()).is_some(),
            "{a4} -> {to_service}"
        );
        for _ in 0..4 {
            let answer = pod.tcp_request(to_service).unwrap();
            let local = answer.split(' ').nth(1).unwrap();
            assert!(local.starts_with(&e1) || local.starts_with(&e2), "{answer}");
            // Pod to Pod through a Service: the endpoint sees the client Pod (unless the
            // client is the endpoint: hairpin traffic is masqueraded, as kube-proxy does).
            if !local.starts_with(&format!("{a4}:")) {
                assert!(answer.starts_with(&format!("{a4}:")), "{answer}");
            }
        }
    }
    let node_port: SocketAddr = format!("{node_side}:30080").parse().unwrap();
    let answer = outside.tcp_request(node_port).unwrap();
    assert!(
        answer.contains(&format!("{e1}:8080")) || answer.contains(&format!("{e2}:8080")),
        "{answer}"
    );

    // The conflist: not rewritten when a change does not touch it (a peer's Node).
    let inode =
        |n: &ClusterNode| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(n.conflist_path()).unwrap());
    let inode_before = inode(&nodes[0]);

    // A Node deleted: its routes go from every node within a second; re-added: back.
    let started = Instant::now();
    write_all(&nodes, "nodes", &node_objects[..2]);
    for n in &nodes[..2] {
        let gone = wait_until(Duration::from_secs(3), || {
            !n.ferry_routes().contains(&nodes[2].pod4)
        });
        let took = started.elapsed();
        assert!(
            gone.is_some() && took <= Duration::from_secs(1),
            "{}: {took:?}\n{}",
            n.name,
            n.ferry_routes()
        );
        println!(
            "{}: node-2's routes gone {took:?} after the manifest changed",
            n.name
        );
    }
    assert!(pods[0].0.tcp_request(SocketAddr::new(pods[2].1, 8080)).is_err());
    write_all(&nodes, "nodes", &node_objects);
    for n in &nodes[..2] {
        assert!(
            wait_until(Duration::from_secs(3), || n
                .ferry_routes()
                .contains(&nodes[2].pod4))
            .is_some(),
            "{}",
            n.name
        );
    }
    assert_eq!(seen_peer(&pods[0].0, SocketAddr::new(pods[2].1, 8080)), pods[0].1);
    assert_eq!(
        inode(&nodes[0]),
        inode_before,
        "the conflist was rewritten with the same bytes"
    );

    // The conflist changes (node-0 loses and regains its IPv6 Pod CIDR): a reader never
    // sees it half-written.
    let path = nodes[0].conflist_path();
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let reader = {
        let (stop, reads, bad, path) = (stop.clone(), reads.clone(), bad.clone(), path.clone());
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let bytes = std::fs::read(&path).unwrap_or_default();
                if serde_json::from_slice::<Value>(&bytes).is_err() {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                seen.insert(bytes);
                reads.fetch_add(1, Ordering::Relaxed);
            }
            seen.len()
        })
    };
    let text_with_v6 = std::fs::read_to_string(&path).unwrap();
    for round in 0..3 {
        let mut objects = node_objects.clone();
        objects[0] = node_object(&nodes[0], false);
        write_all(&nodes, "nodes", &objects);
        assert!(
            wait_until(Duration::from_secs(3), || !std::fs::read_to_string(&path)
                .unwrap()
                .contains(&nodes[0].pod6))
            .is_some(),
            "round {round}"
        );
        write_all(&nodes, "nodes", &node_objects);
        assert!(
            wait_until(Duration::from_secs(3), || std::fs::read_to_string(&path).unwrap()
                == text_with_v6)
            .is_some(),
            "round {round}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let versions = reader.join().unwrap();
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "the conflist was seen half-written"
    );
    assert!(
        versions >= 2 && reads.load(Ordering::Relaxed) > 100,
        "{versions} versions in {reads:?} reads"
    );
    // Only 10-ferry.conflist there: nothing else written or left behind.
    let names: Vec<_> = std::fs::read_dir(nodes[0].conf_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["10-ferry.conflist"]);
}

#[test]
fn vxlan_and_auto_across_a_router() {
    require_root!();
    let (mut nodes, _, _) = three_nodes("vx", false, "auto");
    // node-0 and node-1 share subnet A on a bridge in the router's netns; node-2 is on
    // subnet B behind the router, which forwards between A and B, knows no Pod CIDR, and
    // drops every IP fragment.
    let router = Netns::new("vx-rt");
    let r = router.name().to_string();
    let (net_a, net_b) = (unique_v4_subnet(24), unique_v4_subnet(24));
    ip(&r, &["link", "add", "bra", "type", "bridge"]);
    ip(&r, &["link", "set", "bra", "up"]);
    ip(
        &r,
        &[
            "addr",
            "add",
            &format!("{}/24", v4_sub(&net_a, 0, 254)),
            "dev",
            "bra",
        ],
    );
    for (i, n) in nodes.iter_mut().enumerate() {
        let port = format!("rt{i}");
        wire(n, &router, &port);
        let (net, gw) = if i < 2 {
            ip(&r, &["link", "set", &port, "master", "bra"]);
            (&net_a, v4_sub(&net_a, 0, 254))
        } else {
            ip(
                &r,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", v4_sub(&net_b, 0, 254)),
                    "dev",
                    &port,
                ],
            );
            (&net_b, v4_sub(&net_b, 0, 254))
        };
        n.ip4 = v4_sub(net, 0, i as u8 + 1);
        let nn = n.node.name().to_string();
        ip(&nn, &["addr", "add", &format!("{}/24", n.ip4), "dev", "eth0"]);
        ip(&nn, &["route", "add", "default", "via", &gw]);
    }
    router.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    router.exec_ok(&[
        "nft",
        "add table inet fragments; add chain inet fragments forward { type filter hook forward priority 0; }; \
         add rule inet fragments forward ip frag-off & 0x3fff != 0 counter drop; \
         add rule inet fragments forward exthdr frag exists counter drop",
    ]);
    // The router really drops fragments: a 3000-byte ping between the subnets fails.
    let ping = nodes[0]
        .node
        .netns()
        .exec(&["ping", "-c1", "-W1", "-s3000", "-M", "dont", &nodes[2].ip4]);
    assert!(!ping.status.success(), "a fragmented ping crossed the router");

    let node_objects: Vec<Value> = nodes.iter().map(|n| node_object(n, true)).collect();
    write_all(&nodes, "nodes", &node_objects);
    for n in nodes.iter_mut() {
        n.start();
    }
    let pods: Vec<_> = nodes.iter().map(|n| n.pod("p")).collect();

    // auto: host-gw to the neighbour on subnet A (IPv4, the family of its InternalIP),
    // VXLAN to node-2 and for IPv6 Pods (no IPv6 InternalIP).
    let (n0, n1, n2) = (&nodes[0], &nodes[1], &nodes[2]);
    let gw2 = v4_sub(&n2.pod4, 0, 1);
    let want = [
        format!("{} via {} dev eth0", n1.pod4, n1.ip4),
        format!("{} via {gw2} dev ferry.vxlan onlink", n2.pod4),
        format!("{} via {} dev ferry.vxlan", n1.pod6, first_host(&n1.pod6)),
    ];
    assert!(
        wait_until(Duration::from_secs(10), || want
            .iter()
            .all(|w| n0.ferry_routes().contains(w)))
        .is_some(),
        "want {want:?}:\n{}\n{}",
        n0.ferry_routes(),
        n0.log()
    );
    let fdb = || {
        n0.node
            .netns()
            .exec_ok(&["bridge", "fdb", "show", "dev", "ferry.vxlan"])
    };
    let mac2 = {
        let o: Vec<u8> = n2.ip4.split('.').map(|b| b.parse().unwrap()).collect();
        format!("0e:fe:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
    };
    assert!(
        fdb().contains(&format!("{mac2} dst {} self permanent", n2.ip4)),
        "{}",
        fdb()
    );
    let link = n0
        .node
        .netns()
        .exec_ok(&["ip", "-d", "link", "show", "ferry.vxlan"]);
    assert!(
        link.contains("mtu 1450") && link.contains("vxlan id 1") && link.contains("dstport 8472"),
        "{link}"
    );
    let conf: Value = serde_json::from_slice(&std::fs::read(n0.conflist_path()).unwrap()).unwrap();
    assert_eq!(
        conf["plugins"][0]["mtu"], 1450,
        "Pods get the underlay MTU minus VXLAN's 50 bytes"
    );

    let _servers = all_pairs_reach_each_other(&pods, 8080);

    // 1,400-byte payloads and full-size segments (1 MB) both ways over the tunnel.
    let mut sinks = Vec::new();
    for (pod, a4, a6) in &pods {
        sinks.push(sink(pod, SocketAddr::new(*a4, 9000)));
        sinks.push(sink(pod, SocketAddr::new(*a6, 9000)));
    }
    for (from, to) in [(0, 2), (2, 0), (0, 1)] {
        for v4 in [true, false] {
            let dst = SocketAddr::new(if v4 { pods[to].1 } else { pods[to].2 }, 9000);
            assert_eq!(
                send(&pods[from].0, dst, 1400, 1, Duration::ZERO).unwrap(),
                1400,
                "{dst}"
            );
            assert_eq!(
                send(&pods[from].0, dst, 1 << 16, 16, Duration::ZERO).unwrap(),
                1 << 20,
                "{dst}"
            );
        }
    }

    // A Node deleted: its FDB entry and routes go; re-added: back.
    let started = Instant::now();
    write_all(&nodes, "nodes", &node_objects[..2]);
    let gone = wait_until(Duration::from_secs(3), || {
        !fdb().contains(&mac2) && !nodes[0].ferry_routes().contains(&gw2)
    });
    assert!(
        gone.is_some() && started.elapsed() <= Duration::from_secs(1),
        "{:?}\n{}",
        started.elapsed(),
        fdb()
    );
    write_all(&nodes, "nodes", &node_objects);
    assert!(
        wait_until(Duration::from_secs(3), || fdb().contains(&mac2)).is_some(),
        "{}",
        fdb()
    );

    // SIGKILL and restart of both ends' daemons while a transfer runs over the tunnel.
    let index = |n: &ClusterNode| {
        n.node
            .netns()
            .exec_ok(&["cat", "/sys/class/net/ferry.vxlan/ifindex"])
    };
    let before = (nodes[0].ferry_routes(), index(&nodes[0]));
    let transfer = {
        let client = nodes[0].node.pod("vx-client");
        // A Pod of its own, so the transfer's thread owns it.
        let path = nodes[0].conflist_path();
        let list: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let mut conf = list["plugins"][0].clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        CniCall::new(ferry_bin("ferry-bridge"), "ADD", conf)
            .for_pod(&client)
            .run_in(nodes[0].node.netns())
            .ok();
        let dst = SocketAddr::new(pods[2].1, 9000);
        std::thread::spawn(move || send(&client, dst, 16 << 10, 120, Duration::from_millis(25)))
    };
    std::thread::sleep(Duration::from_millis(300));
    for n in [0, 2] {
        nodes[n].proxy.as_mut().unwrap().kill();
        nodes[n].start();
    }
    let sent = transfer
        .join()
        .unwrap()
        .expect("the transfer broke during the restart");
    assert_eq!(sent, 120 * (16 << 10));
    assert!(
        nodes[0].log().matches("starting").count() >= 2,
        "{}",
        nodes[0].log()
    );
    assert_eq!(
        (nodes[0].ferry_routes(), index(&nodes[0])),
        before,
        "the restart changed the routes or the device"
    );
    for (stop, _) in &sinks {
        stop.store(true, Ordering::Relaxed);
    }
}
