//! Several nodes running `ferry-proxy` with the Pod network on, for the multi-node tests
//! and benchmark: three node netns wired to an underlay (one shared link, or two subnets
//! behind a router netns that drops IP fragments), each daemon reading a manifests
//! directory that holds every Node, Pods made by `ferry-bridge` with the conflist the
//! node's daemon wrote, and a TCP sink for transfers. Everything lives in namespaces and
//! temp directories this process made, and goes on drop.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{
    ferry_bin, unique_v4_subnet, unique_v6_subnet, wait_until, CniCall, Netns, Node, Pod, ProxyProcess,
};

/// `ip -n <ns> <args>`; panics on failure; returns stdout.
pub fn ip_in(ns: &str, args: &[&str]) -> String {
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

/// Address `host` of the `/24` at index `i` of the IPv4 network `base` (`a.b.c.0/n`):
/// `a.b.(c+i).host`.
pub fn v4_sub(base: &str, i: u8, host: u8) -> String {
    let net: std::net::Ipv4Addr = base.split('/').next().unwrap().parse().unwrap();
    let o = net.octets();
    format!("{}.{}.{}.{host}", o[0], o[1], o[2] + i)
}

/// Address `host` of the `/80` at index `i` inside the `/64` `base64`, as `ip` prints it.
pub fn v6_sub(base64: &str, i: u8, host: u16) -> String {
    let net: std::net::Ipv6Addr = base64.split('/').next().unwrap().parse().unwrap();
    let s = net.segments();
    std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], u16::from(i), 0, 0, host).to_string()
}

/// The first address of a CIDR (a Pod CIDR's gateway).
pub fn first_host(cidr: &str) -> IpAddr {
    match cidr.split('/').next().unwrap().parse::<IpAddr>().unwrap() {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
    }
}

/// One node of a [`Cluster`].
pub struct ClusterNode {
    // Field order is drop order: the daemon goes before its namespace.
    pub proxy: Option<ProxyProcess>,
    pub node: Node,
    pub name: String,
    /// Its InternalIPs (IPv6 only on an IPv6 underlay).
    pub ip4: String,
    pub ip6: Option<String>,
    pub pod4: String,
    pub pod6: String,
    pub manifests: PathBuf,
    pub flags: Vec<String>,
}

impl ClusterNode {
    pub fn conf_dir(&self) -> PathBuf {
        self.node.state_dir().join("net.d")
    }

    pub fn conflist_path(&self) -> PathBuf {
        self.conf_dir().join("10-ferry.conflist")
    }

    /// Starts (or starts again) the daemon.
    pub fn start(&mut self) {
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        self.proxy = Some(ProxyProcess::start(
            self.node.netns(),
            &self.manifests,
            &self.name,
            &flags,
        ));
    }

    pub fn log(&self) -> String {
        self.proxy.as_ref().map(ProxyProcess::log).unwrap_or_default()
    }

    /// `ip route show proto 118` of both families: Ferry's routes.
    pub fn ferry_routes(&self) -> String {
        let ns = self.node.name();
        ip_in(ns, &["route", "show", "proto", "118"]) + &ip_in(ns, &["-6", "route", "show", "proto", "118"])
    }

    /// The Node object the API server would show.
    pub fn object(&self, with_v6_cidr: bool) -> Value {
        let mut cidrs = vec![self.pod4.clone()];
        if with_v6_cidr {
            cidrs.push(self.pod6.clone());
        }
        let mut addresses = vec![json!({"type": "InternalIP", "address": self.ip4})];
        if let Some(ip6) = &self.ip6 {
            addresses.push(json!({"type": "InternalIP", "address": ip6}));
        }
        addresses.push(json!({"type": "Hostname", "address": self.name}));
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": self.name},
               "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs},
               "status": {"addresses": addresses}})
    }

    /// A Pod netns wired by ferry-bridge with the conflist this node's daemon wrote
    /// (waiting for it), as a runtime does; its IPv4 and IPv6 addresses.
    pub fn pod(&self, tag: &str) -> (Pod, IpAddr, IpAddr) {
        let path = self.conflist_path();
        assert!(
            wait_until(Duration::from_secs(10), || path.exists()).is_some(),
            "{} never wrote {}:\n{}",
            self.name,
            path.display(),
            self.log()
        );
        let list: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        // What libcni hands the list's one plugin: its entry with the list's name and
        // cniVersion.
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
                    let a = i["address"].as_str().unwrap();
                    a.split('/').next().unwrap().parse::<IpAddr>().unwrap()
                })
                .find(|a| a.is_ipv4() == v4)
                .unwrap_or_else(|| panic!("no {} address in {result}", if v4 { "v4" } else { "v6" }))
        };
        (pod, addr(true), addr(false))
    }
}

/// Three nodes, their underlay and the cluster's CIDRs.
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    pub cluster4: String,
    pub cluster6: String,
    /// The underlay's netns: a bridge (one link), or the router.
    pub underlay: Netns,
}

impl Cluster {
    fn new(tag: &str, mode: &str, underlay: Netns) -> Cluster {
        let cluster4 = unique_v4_subnet(20);
        let cluster6 = unique_v6_subnet();
        let mut nodes = Vec::new();
        for i in 0..3u8 {
            let node = Node::new(&format!("{tag}{i}"));
            let manifests = node.state_dir().join("manifests");
            let flags = vec![
                "--cluster-cidr".to_string(),
                format!("{cluster4},{cluster6}"),
                "--pod-network-mode".into(),
                mode.into(),
                "--cni-conf-dir".into(),
                node.state_dir().join("net.d").display().to_string(),
                "--cni-ipam-data-dir".into(),
                node.state_dir().join("ipam").display().to_string(),
            ];
            nodes.push(ClusterNode {
                proxy: None,
                name: format!("node-{i}"),
                node,
                ip4: String::new(),
                ip6: None,
                pod4: format!("{}/24", v4_sub(&cluster4, i, 0)),
                pod6: format!("{}/80", v6_sub(&cluster6, i, 0)),
                manifests,
                flags,
            });
        }
        Cluster {
            nodes,
            cluster4,
            cluster6,
            underlay,
        }
    }

    /// `eth0` in node `i`, `port` in the underlay netns, both up.
    fn wire(&self, i: usize, port: &str) {
        let n = self.nodes[i].node.name();
        let hub = self.underlay.name();
        ip_in(
            n,
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", hub,
            ],
        );
        ip_in(n, &["link", "set", "eth0", "up"]);
        ip_in(hub, &["link", "set", port, "up"]);
    }

    /// Three nodes on one link (a bridge in a netns of its own), IPv4 and IPv6 InternalIPs.
    pub fn on_one_link(tag: &str, mode: &str) -> Cluster {
        let underlay = Netns::new(&format!("{tag}-ul"));
        ip_in(underlay.name(), &["link", "add", "br0", "type", "bridge"]);
        ip_in(underlay.name(), &["link", "set", "br0", "up"]);
        let mut c = Cluster::new(tag, mode, underlay);
        let (net4, net6) = (unique_v4_subnet(24), unique_v6_subnet());
        for i in 0..3 {
            let port = format!("ul{i}");
            c.wire(i, &port);
            ip_in(c.underlay.name(), &["link", "set", &port, "master", "br0"]);
            let n = &mut c.nodes[i];
            n.ip4 = v4_sub(&net4, 0, i as u8 + 1);
            n.ip6 = Some(v6_sub(&net6, 0, i as u16 + 1));
            let ns = n.node.name().to_string();
            ip_in(&ns, &["addr", "add", &format!("{}/24", n.ip4), "dev", "eth0"]);
            let a6 = format!("{}/64", n.ip6.as_ref().unwrap());
            ip_in(&ns, &["addr", "add", &a6, "dev", "eth0", "nodad"]);
        }
        c
    }

    /// node-0 and node-1 on subnet A (a bridge in the router's netns), node-2 on subnet B;
    /// the router forwards between them, knows no Pod CIDR and drops every IP fragment.
    /// IPv4 InternalIPs only.
    pub fn across_a_router(tag: &str, mode: &str) -> Cluster {
        let router = Netns::new(&format!("{tag}-rt"));
        let r = router.name().to_string();
        let mut c = Cluster::new(tag, mode, router);
        let (net_a, net_b) = (unique_v4_subnet(24), unique_v4_subnet(24));
        ip_in(&r, &["link", "add", "bra", "type", "bridge"]);
        ip_in(&r, &["link", "set", "bra", "up"]);
        ip_in(
            &r,
            &[
                "addr",
                "add",
                &format!("{}/24", v4_sub(&net_a, 0, 254)),
                "dev",
                "bra",
            ],
        );
        for i in 0..3 {
            let port = format!("rt{i}");
            c.wire(i, &port);
            let net = if i < 2 {
                ip_in(&r, &["link", "set", &port, "master", "bra"]);
                &net_a
            } else {
                ip_in(
                    &r,
                    &[
                        "addr",
                        "add",
                        &format!("{}/24", v4_sub(&net_b, 0, 254)),
                        "dev",
                        &port,
                    ],
                );
                &net_b
            };
            let n = &mut c.nodes[i];
            n.ip4 = v4_sub(net, 0, i as u8 + 1);
            let ns = n.node.name().to_string();
            ip_in(&ns, &["addr", "add", &format!("{}/24", n.ip4), "dev", "eth0"]);
            ip_in(&ns, &["route", "add", "default", "via", &v4_sub(net, 0, 254)]);
        }
        c.underlay.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        c.underlay.exec_ok(&[
            "nft",
            "add table inet fragments; add chain inet fragments forward { type filter hook forward priority 0; }; \
             add rule inet fragments forward ip frag-off & 0x3fff != 0 counter drop; \
             add rule inet fragments forward exthdr frag exists counter drop",
        ]);
        c
    }

    /// Every Node object (with both Pod CIDRs).
    pub fn node_objects(&self) -> Vec<Value> {
        self.nodes.iter().map(|n| n.object(true)).collect()
    }

    /// Writes `objects` as `<file>.json` into every node's manifests directory.
    pub fn write_all(&self, file: &str, objects: &[Value]) {
        for n in &self.nodes {
            let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
            let tmp = n.manifests.join(format!(".{file}.tmp"));
            std::fs::create_dir_all(&n.manifests).unwrap();
            std::fs::write(&tmp, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
            std::fs::rename(tmp, n.manifests.join(format!("{file}.json"))).unwrap();
        }
    }

    /// Writes every Node and starts every daemon.
    pub fn start(&mut self) {
        self.write_all("nodes", &self.node_objects());
        for n in &mut self.nodes {
            n.start();
        }
    }
}

/// A TCP sink in `ns` on `addr`: reads each connection to its end, then answers with the
/// number of bytes read. Stops when the returned flag is set.
pub fn tcp_sink(ns: &Netns, addr: SocketAddr) -> Arc<AtomicBool> {
    let listener = ns.run(|| TcpListener::bind(addr)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
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
    stop
}

/// Sends `chunks` writes of `size` bytes from `from` to a [`tcp_sink`] at `to`, pausing
/// `pause` after each; returns what the sink counted.
pub fn send_to_sink(
    from: &Netns,
    to: SocketAddr,
    size: usize,
    chunks: usize,
    pause: Duration,
) -> std::io::Result<usize> {
    let mut conn = from.tcp_connect(to)?;
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    let data = vec![0x5au8; size];
    for _ in 0..chunks {
        conn.write_all(&data)?;
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    answer
        .trim()
        .parse()
        .map_err(|_| std::io::Error::other(format!("sink answered {answer:?}")))
}
