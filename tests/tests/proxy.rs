//! ferry-proxy end to end: pods made with ferry-bridge run servers, the proxy runs in the
//! node's netns reading a manifests directory, and clients inside and outside the node
//! reach Services with real packets.
//!
//! Every test body runs against both back ends ([`both_backends!`]): `<test>::nftables`
//! and `<test>::ebpf`. For the eBPF one the test makes its own cgroup (the proxy gets
//! `--cgroup` that directory) and the Pods' clients make their sockets inside it; what
//! the eBPF back end does not serve yet would be marked `#[ignore = "why"]` on its variant.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_tests::{
    endpoint_slice, ferry_bin, require_root, service, wait_until, Client, EbpfSandbox, Pod, PodNetwork,
    ProxyBackend, ProxyProcess, Server, NODE_IP, OUTSIDE_IP,
};
use serde_json::json;

const NODE: &str = "node-a";
const CLIENT_IP: &str = OUTSIDE_IP;

/// One test body, run against each back end: `mod <body> { nftables, ebpf }`. With
/// `ebpf_ignore = "why"`, the eBPF variant is marked ignored with that reason.
macro_rules! both_backends {
    ($body:ident $(, ebpf_ignore = $why:literal)?) => {
        mod $body {
            #[test]
            fn nftables() {
                super::$body(ferry_tests::ProxyBackend::Nftables)
            }
            #[test]
            $(#[ignore = $why])?
            fn ebpf() {
                super::$body(ferry_tests::ProxyBackend::Ebpf)
            }
        }
    };
}

/// A node with pods on ferry-bridge, a client outside, and the proxy.
struct Cluster {
    net: PodNetwork,
    pods: BTreeMap<&'static str, (Pod, IpAddr)>,
    proxy: ProxyProcess,
    backend: ProxyBackend,
    // Last: the proxy is killed before its cgroup and pins go.
    ebpf: Option<EbpfSandbox>,
}

impl Cluster {
    fn new(tag: &str, pods: &[&'static str], backend: ProxyBackend) -> Cluster {
        let net = PodNetwork::new(tag);
        let made = pods.iter().map(|name| (*name, net.add_pod(name))).collect();
        let ebpf = (backend == ProxyBackend::Ebpf).then(|| EbpfSandbox::new(tag));
        let manifests = net.node.state_dir().join("manifests");
        let proxy = start_proxy(&net, &manifests, ebpf.as_ref());
        Cluster {
            net,
            pods: made,
            proxy,
            backend,
            ebpf,
        }
    }

    /// Starts the proxy again (after a kill), with the same flags and manifests.
    fn restart_proxy(&mut self) {
        let manifests: PathBuf = self.proxy.manifests.clone();
        self.proxy = start_proxy(&self.net, &manifests, self.ebpf.as_ref());
    }

    fn pod(&self, name: &str) -> &Pod {
        &self.pods[name].0
    }

    /// A client in Pod `name`: in the eBPF back end's cgroup when it runs, as a Pod's
    /// processes would be on a node.
    fn client(&self, name: &str) -> Client<'_> {
        Client {
            netns: self.pod(name),
            cgroup: self.ebpf.as_ref().map(EbpfSandbox::cgroup),
        }
    }

    /// `ferry-proxy dump` (eBPF: what the maps hold) or `cleanup`, for this node and back end.
    fn proxy_command(&self, command: &str) -> std::process::Output {
        let mut cmd = self.net.node.netns().command(ferry_bin("ferry-proxy"));
        cmd.args([command, "--hostname-override", NODE]);
        match (&self.ebpf, command) {
            (None, _) => {}
            (Some(e), "dump") => {
                cmd.args(["--backend", "ebpf", "--bpf-pin-root"])
                    .arg(e.pin_root());
            }
            (Some(e), _) => {
                cmd.args(e.flags());
            }
        }
        cmd.output().unwrap()
    }

    /// What the back end programmed, as text: the nftables table, or the eBPF maps'
    /// frontends (without the programs' own LRU counts).
    fn programmed(&self) -> String {
        match self.backend {
            ProxyBackend::Nftables => {
                let out = self
                    .net
                    .node
                    .netns()
                    .exec(&["nft", "list", "table", "inet", "ferry-proxy"]);
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
            ProxyBackend::Ebpf => {
                let out = self.proxy_command("dump");
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| format!("{l}\n"))
                    .collect()
            }
        }
    }

    fn ip(&self, name: &str) -> IpAddr {
        self.pods[name].1
    }

    /// Waits until the proxy's table holds `needle` (e.g. a ClusterIP); panics with the
    /// proxy's log otherwise.
    fn wait_for_rules(&self, needle: &str) -> Duration {
        wait_until(Duration::from_secs(5), || self.programmed().contains(needle)).unwrap_or_else(|| {
            panic!(
                "the proxy did not program {needle}; its log:\n{}",
                self.proxy.log()
            )
        })
    }
}

fn start_proxy(net: &PodNetwork, manifests: &std::path::Path, ebpf: Option<&EbpfSandbox>) -> ProxyProcess {
    let mut flags = vec!["--cluster-cidr".to_string(), net.subnet.clone()];
    flags.extend(ebpf.map(EbpfSandbox::flags).unwrap_or_default());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    ProxyProcess::start(net.node.netns(), manifests, NODE, &flags)
}

/// Servers answering "<peer> <local>" on each pod's address, TCP and UDP, for `ports`.
fn serve(c: &Cluster, pods: &[&str], tcp: &[u16], udp: &[u16]) -> Vec<Server> {
    let mut out = Vec::new();
    for p in pods {
        for port in tcp {
            out.push(c.pod(p).tcp_server(SocketAddr::new(c.ip(p), *port)));
        }
        for port in udp {
            out.push(c.pod(p).udp_server(SocketAddr::new(c.ip(p), *port)));
        }
    }
    out
}

/// Who answered: the `<local>` part of a server's reply, as an IP.
fn answered_by(reply: &str) -> IpAddr {
    let local = reply
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("reply {reply:?}"));
    local.parse::<SocketAddr>().unwrap().ip()
}

/// Who the server saw: the `<peer>` part, as an IP.
fn seen_peer(reply: &str) -> IpAddr {
    reply
        .split_whitespace()
        .next()
        .unwrap()
        .parse::<SocketAddr>()
        .unwrap()
        .ip()
}

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ep<'a>(ip: &'a str, node: &'a str) -> (&'a str, &'a str, bool, bool, bool) {
    (ip, node, true, true, false)
}

fn cluster_ip_tcp_udp_named_port_balancing_terminating_fallback_and_refusal(backend: ProxyBackend) {
    require_root!();
    let c = Cluster::new("px-cip", &["b1", "b2", "client"], backend);
    let _servers = serve(&c, &["b1", "b2"], &[8080], &[5353]);
    let (b1, b2) = (c.ip("b1").to_string(), c.ip("b2").to_string());
    c.proxy.write(
        "web",
        &[
            // Named target port "web-port": resolved from the EndpointSlice's port of the same name.
            service(
                "web",
                "10.96.0.10",
                &[
                    ("http", "TCP", 80, json!("web-port")),
                    ("dns", "UDP", 53, json!(5353)),
                ],
                json!({}),
            ),
            endpoint_slice(
                "web",
                "a",
                &[ep(&b1, NODE), ep(&b2, NODE)],
                &[("http", "TCP", 8080), ("dns", "UDP", 5353)],
            ),
            // No endpoints at all.
            service(
                "empty",
                "10.96.0.11",
                &[("http", "TCP", 80, json!(8080))],
                json!({}),
            ),
            // Only a terminating (still serving) endpoint: used as the fallback.
            service(
                "term",
                "10.96.0.12",
                &[("http", "TCP", 80, json!(8080))],
                json!({}),
            ),
            endpoint_slice(
                "term",
                "a",
                &[(&b1, NODE, false, true, true)],
                &[("http", "TCP", 8080)],
            ),
        ],
    );
    c.wait_for_rules("10.96.0.12");
    let client = c.client("client");

    let mut tcp_backends = HashSet::new();
    for _ in 0..30 {
        let reply = client.tcp_request(sock("10.96.0.10:80")).expect("ClusterIP TCP");
        tcp_backends.insert(answered_by(&reply));
        // Pod to ClusterIP inside the cluster CIDR: not masqueraded, the backend sees the pod.
        assert_eq!(seen_peer(&reply), c.ip("client"), "{reply}");
    }
    assert_eq!(
        tcp_backends,
        HashSet::from([c.ip("b1"), c.ip("b2")]),
        "both backends get TCP traffic"
    );
    let mut udp_backends = HashSet::new();
    for _ in 0..30 {
        udp_backends.insert(answered_by(
            &client.udp_request(sock("10.96.0.10:53")).expect("ClusterIP UDP"),
        ));
    }
    assert_eq!(
        udp_backends,
        HashSet::from([c.ip("b1"), c.ip("b2")]),
        "both backends get UDP traffic"
    );

    let start = Instant::now();
    let err = client.tcp_request(sock("10.96.0.11:80")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "refused at once, not dropped: {:?}",
        start.elapsed()
    );

    assert_eq!(
        answered_by(&client.tcp_request(sock("10.96.0.12:80")).unwrap()),
        c.ip("b1")
    );
}

both_backends!(cluster_ip_tcp_udp_named_port_balancing_terminating_fallback_and_refusal);

fn node_port_masquerades_and_external_traffic_policy_local_keeps_the_client_address(backend: ProxyBackend) {
    require_root!();
    let c = Cluster::new("px-np", &["b1"], backend);
    let _servers = serve(&c, &["b1"], &[8080], &[]);
    let b1 = c.ip("b1").to_string();
    c.proxy.write(
        "np",
        &[
            service("cluster", "10.96.1.10", &[("http", "TCP", 80, json!(8080))], json!({"type": "NodePort"})),
            endpoint_slice("cluster", "a", &[ep(&b1, NODE)], &[("http", "TCP", 8080)]),
            service("local", "10.96.1.11", &[("http", "TCP", 80, json!(8080))],
                json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 30900})),
            endpoint_slice("local", "a", &[ep(&b1, NODE)], &[("http", "TCP", 8080)]),
            // eTP Local with its only endpoint on another node: this node refuses.
            service("elsewhere", "10.96.1.12", &[("http", "TCP", 80, json!(8080))],
                json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 30901})),
            endpoint_slice("elsewhere", "a", &[ep("10.255.0.9", "node-b")], &[("http", "TCP", 8080)]),
        ],
    );
    // NodePorts are assigned by the API server; a manifest carries them in the ports.
    let set_node_ports = |c: &Cluster| {
        let mut objects = vec![
            service(
                "cluster",
                "10.96.1.10",
                &[("http", "TCP", 80, json!(8080))],
                json!({"type": "NodePort"}),
            ),
            endpoint_slice("cluster", "a", &[ep(&b1, NODE)], &[("http", "TCP", 8080)]),
            service(
                "local",
                "10.96.1.11",
                &[("http", "TCP", 80, json!(8080))],
                json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 30900}),
            ),
            endpoint_slice("local", "a", &[ep(&b1, NODE)], &[("http", "TCP", 8080)]),
            service(
                "elsewhere",
                "10.96.1.12",
                &[("http", "TCP", 80, json!(8080))],
                json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 30901}),
            ),
            endpoint_slice(
                "elsewhere",
                "a",
                &[ep("10.255.0.9", "node-b")],
                &[("http", "TCP", 8080)],
            ),
        ];
        for (i, port) in [(0, 30080), (2, 30081), (4, 30082)] {
            objects[i]["spec"]["ports"][0]["nodePort"] = json!(port);
        }
        c.proxy.write("np", &objects);
    };
    set_node_ports(&c);
    c.wait_for_rules("30082");

    let reply = c
        .net
        .outside
        .tcp_request(sock(&format!("{NODE_IP}:30080")))
        .expect("NodePort");
    assert_eq!(answered_by(&reply), c.ip("b1"));
    assert_eq!(
        seen_peer(&reply),
        c.net.gateway(),
        "eTP Cluster: masqueraded to the node's address: {reply}"
    );
    let reply = c
        .net
        .outside
        .tcp_request(sock(&format!("{NODE_IP}:30081")))
        .expect("NodePort, eTP Local");
    assert_eq!(
        seen_peer(&reply),
        sock(&format!("{CLIENT_IP}:1")).ip(),
        "eTP Local keeps the client address"
    );
    assert!(
        c.net
            .outside
            .tcp_request(sock(&format!("{NODE_IP}:30082")))
            .is_err(),
        "no local endpoint: refused"
    );

    // Health check node ports answer as kube-proxy's do.
    let get = |port: u16| -> String {
        let mut conn = c
            .net
            .outside
            .tcp_connect(sock(&format!("{NODE_IP}:{port}")))
            .expect("health check port");
        conn.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut conn, &mut text);
        text
    };
    let ok = get(30900);
    assert!(
        ok.starts_with("HTTP/1.0 200") || ok.starts_with("HTTP/1.1 200"),
        "{ok}"
    );
    assert!(
        ok.contains("\"localEndpoints\": 1") || ok.contains("\"localEndpoints\":1"),
        "{ok}"
    );
    let none = get(30901);
    assert!(none.contains(" 503 "), "{none}");
}

both_backends!(node_port_masquerades_and_external_traffic_policy_local_keeps_the_client_address);

fn load_balancer_ip_with_source_ranges(backend: ProxyBackend) {
    require_root!();
    let c = Cluster::new("px-lbsr", &["b1", "b2"], backend);
    // A second client, on another link, outside the allowed source range.
    let other = c.net.node.client("other");
    c.net
        .node
        .connect_client(&other, "198.18.0.2/24", "198.18.0.1/24");
    let _servers = serve(&c, &["b1", "b2"], &[8080], &[]);
    let (b1, b2) = (c.ip("b1").to_string(), c.ip("b2").to_string());
    let mut lb = service(
        "lb",
        "10.96.2.10",
        &[("http", "TCP", 80, json!(8080))],
        json!({"type": "LoadBalancer", "loadBalancerSourceRanges": ["203.0.113.0/24"]}),
    );
    lb["spec"]["ports"][0]["nodePort"] = json!(30180);
    lb["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.10"}]}});
    c.proxy.write(
        "lb",
        &[
            lb,
            endpoint_slice(
                "lb",
                "a",
                &[ep(&b1, NODE), ep(&b2, NODE)],
                &[("http", "TCP", 8080)],
            ),
        ],
    );
    c.wait_for_rules("10.96.2.10");
    c.net
        .outside
        .tcp_request(sock("198.51.100.10:80"))
        .expect("LoadBalancer IP from an allowed source");
    assert!(
        other.tcp_request(sock("198.51.100.10:80")).is_err(),
        "a source outside loadBalancerSourceRanges"
    );
}

both_backends!(load_balancer_ip_with_source_ranges);

fn session_affinity_from_outside_keeps_a_client_on_one_endpoint(backend: ProxyBackend) {
    require_root!();
    let c = Cluster::new("px-affout", &["b1", "b2"], backend);
    let _servers = serve(&c, &["b1", "b2"], &[8080], &[]);
    let (b1, b2) = (c.ip("b1").to_string(), c.ip("b2").to_string());
    let both = [ep(&b1, NODE), ep(&b2, NODE)];
    c.proxy.write(
        "aff",
        &[
            service(
                "sticky",
                "10.96.8.10",
                &[("http", "TCP", 80, json!(8080))],
                json!({"externalIPs": ["198.51.100.30"], "sessionAffinity": "ClientIP",
                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
            ),
            endpoint_slice("sticky", "a", &both, &[("http", "TCP", 8080)]),
            service(
                "plain",
                "10.96.8.11",
                &[("http", "TCP", 80, json!(8080))],
                json!({"externalIPs": ["198.51.100.31"]}),
            ),
            endpoint_slice("plain", "a", &both, &[("http", "TCP", 8080)]),
        ],
    );
    c.wait_for_rules("10.96.8.11");
    // Without affinity new connections from one client spread over both endpoints, so
    // the loop below would see both if affinity did nothing.
    let spread: HashSet<IpAddr> = (0..30)
        .map(|_| {
            answered_by(
                &c.net
                    .outside
                    .tcp_request(sock("198.51.100.31:80"))
                    .expect("externalIP"),
            )
        })
        .collect();
    assert_eq!(spread, HashSet::from([c.ip("b1"), c.ip("b2")]));
    let first = answered_by(
        &c.net
            .outside
            .tcp_request(sock("198.51.100.30:80"))
            .expect("externalIP with affinity"),
    );
    for _ in 0..20 {
        assert_eq!(
            answered_by(&c.net.outside.tcp_request(sock("198.51.100.30:80")).unwrap()),
            first,
            "ClientIP affinity from outside"
        );
    }
}

both_backends!(session_affinity_from_outside_keeps_a_client_on_one_endpoint);

fn session_affinity_is_per_service_port_across_its_node_port_and_external_ip(backend: ProxyBackend) {
    require_root!();
    let c = Cluster::new("px-affport", &["b1", "b2"], backend);
    let _servers = serve(&c, &["b1", "b2"], &[8080], &[]);
    let (b1, b2) = (c.ip("b1").to_string(), c.ip("b2").to_string());
    let both = [ep(&b1, NODE), ep(&b2, NODE)];
    // Six Services: were affinity kept per address, a client's NodePort and externalIP
    // choices would agree on all six by chance once in 64 runs.
    let services = 6;
    let mut objects = Vec::new();
    for i in 0..services {
        let name = format!("sticky{i}");
        let mut svc = service(
            &name,
            &format!("10.96.8.{}", 20 + i),
            &[("http", "TCP", 80, json!(8080))],
            json!({"type": "NodePort", "externalIPs": [format!("198.51.100.{}", 40 + i)],
                   "sessionAffinity": "ClientIP",
                   "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
        );
        svc["spec"]["ports"][0]["nodePort"] = json!(30180 + i);
        objects.push(svc);
        objects.push(endpoint_slice(&name, "a", &both, &[("http", "TCP", 8080)]));
    }
    c.proxy.write("affport", &objects);
    c.wait_for_rules(&format!("{}", 30180 + services - 1));
    for i in 0..services {
        let external = sock(&format!("198.51.100.{}:80", 40 + i));
        let node_port = sock(&format!("{NODE_IP}:{}", 30180 + i));
        let first = answered_by(&c.net.outside.tcp_request(external).expect("externalIP"));
        for _ in 0..3 {
            for to in [node_port, external] {
                let reply = c
                    .net
                    .outside
                    .tcp_request(to)
                    .unwrap_or_else(|e| panic!("{to}: {e}"));
                assert_eq!(
                    answered_by(&reply),
                    first,
                    "Service {i}: {to} must keep the endpoint the client got by {external}"
                );
            }
        }
    }
}

both_backends!(session_affinity_is_per_service_port_across_its_node_port_and_external_ip);

fn load_balancer_ip_external_ip_affinity_and_hairpin(backend: ProxyBackend) {
    require_root!();
    let c = Cluster::new("px-lb", &["b1", "b2", "client"], backend);
    let _servers = serve(&c, &["b1", "b2"], &[8080], &[]);
    let (b1, b2) = (c.ip("b1").to_string(), c.ip("b2").to_string());
    let mut lb = service(
        "lb",
        "10.96.2.10",
        &[("http", "TCP", 80, json!(8080))],
        json!({"type": "LoadBalancer"}),
    );
    lb["spec"]["ports"][0]["nodePort"] = json!(30180);
    lb["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.10"}]}});
    c.proxy.write(
        "lb",
        &[
            lb,
            endpoint_slice("lb", "a", &[ep(&b1, NODE), ep(&b2, NODE)], &[("http", "TCP", 8080)]),
            service("ext", "10.96.2.11", &[("http", "TCP", 80, json!(8080))], json!({"externalIPs": ["198.51.100.20"]})),
            endpoint_slice("ext", "a", &[ep(&b1, NODE)], &[("http", "TCP", 8080)]),
            service("sticky", "10.96.2.12", &[("http", "TCP", 80, json!(8080))],
                json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}})),
            endpoint_slice("sticky", "a", &[ep(&b1, NODE), ep(&b2, NODE)], &[("http", "TCP", 8080)]),
            service("self", "10.96.2.13", &[("http", "TCP", 80, json!(8080))], json!({})),
            endpoint_slice("self", "a", &[ep(&b1, NODE)], &[("http", "TCP", 8080)]),
        ],
    );
    c.wait_for_rules("10.96.2.13");

    c.net
        .outside
        .tcp_request(sock("198.51.100.10:80"))
        .expect("LoadBalancer IP from outside");
    c.client("client")
        .tcp_request(sock("198.51.100.10:80"))
        .expect("LoadBalancer IP from a Pod");
    assert_eq!(
        answered_by(
            &c.net
                .outside
                .tcp_request(sock("198.51.100.20:80"))
                .expect("externalIP")
        ),
        c.ip("b1")
    );

    let client = c.client("client");
    let first = answered_by(&client.tcp_request(sock("10.96.2.12:80")).unwrap());
    for _ in 0..15 {
        assert_eq!(
            answered_by(&client.tcp_request(sock("10.96.2.12:80")).unwrap()),
            first,
            "ClientIP affinity"
        );
    }

    // b1 reaches its own Service and lands on itself.
    let reply = c
        .client("b1")
        .tcp_request(sock("10.96.2.13:80"))
        .expect("hairpin");
    assert_eq!(answered_by(&reply), c.ip("b1"));
}

both_backends!(load_balancer_ip_external_ip_affinity_and_hairpin);

fn removing_a_udp_endpoint_moves_the_flow_to_the_remaining_one(backend: ProxyBackend) {
    require_root!();
    let c = Cluster::new("px-udp", &["b1", "b2", "client"], backend);
    let _servers = serve(&c, &["b1", "b2"], &[], &[5353]);
    let (b1, b2) = (c.ip("b1").to_string(), c.ip("b2").to_string());
    let objects = |eps: &[(&str, &str, bool, bool, bool)]| {
        vec![
            service("dns", "10.96.3.10", &[("dns", "UDP", 53, json!(5353))], json!({})),
            endpoint_slice("dns", "a", eps, &[("dns", "UDP", 5353)]),
        ]
    };
    c.proxy.write("dns", &objects(&[ep(&b1, NODE), ep(&b2, NODE)]));
    c.wait_for_rules("10.96.3.10");
    // One socket: one conntrack flow, pinned to one backend.
    let flow = c.client("client").udp_socket(true).unwrap();
    let ask = || -> Option<IpAddr> {
        flow.send_to(b"q", sock("10.96.3.10:53")).ok()?;
        let mut buf = [0u8; 200];
        let (n, _) = flow.recv_from(&mut buf).ok()?;
        Some(answered_by(&String::from_utf8_lossy(&buf[..n])))
    };
    let pinned = ask().expect("first answer");
    for _ in 0..5 {
        assert_eq!(ask(), Some(pinned), "a UDP flow stays on its backend");
    }
    let (gone, remaining) = if pinned == c.ip("b1") {
        (&b1, &b2)
    } else {
        (&b2, &b1)
    };
    let _ = gone;
    c.proxy.write("dns", &objects(&[ep(remaining, NODE)]));
    let moved = wait_until(Duration::from_secs(3), || {
        ask() == Some(remaining.parse().unwrap())
    });
    assert!(
        moved.is_some(),
        "the flow did not move to {remaining}; proxy log:\n{}",
        c.proxy.log()
    );
}

both_backends!(removing_a_udp_endpoint_moves_the_flow_to_the_remaining_one);

fn manifest_edits_apply_within_a_second_and_a_broken_file_changes_nothing(backend: ProxyBackend) {
    require_root!();
    let c = Cluster::new("px-edit", &["b1", "client"], backend);
    let _servers = serve(&c, &["b1"], &[8080], &[]);
    let b1 = c.ip("b1").to_string();
    c.proxy.write(
        "a",
        &[
            service("a", "10.96.4.10", &[("http", "TCP", 80, json!(8080))], json!({})),
            endpoint_slice("a", "x", &[ep(&b1, NODE)], &[("http", "TCP", 8080)]),
        ],
    );
    c.wait_for_rules("10.96.4.10");

    // A new Service in a new file.
    c.proxy.write(
        "b",
        &[
            service("b", "10.96.4.11", &[("http", "TCP", 80, json!(8080))], json!({})),
            endpoint_slice("b", "x", &[ep(&b1, NODE)], &[("http", "TCP", 8080)]),
        ],
    );
    let took = c.wait_for_rules("10.96.4.11");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    c.client("client")
        .tcp_request(sock("10.96.4.11:80"))
        .expect("the new Service works");

    // A broken file: reported, nothing changes, the last good state stays programmed.
    let before = c.programmed();
    std::fs::write(
        c.proxy.manifests.join("b.json"),
        "{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let after = c.programmed();
    assert_eq!(before, after, "a broken file changed the rules");
    assert!(
        c.proxy.log().contains("b.json"),
        "the error names the file:\n{}",
        c.proxy.log()
    );
    c.client("client")
        .tcp_request(sock("10.96.4.11:80"))
        .expect("still served from the last good state");
}

both_backends!(manifest_edits_apply_within_a_second_and_a_broken_file_changes_nothing);

fn sigkill_and_restart_keep_fifty_open_connections_working(backend: ProxyBackend) {
    require_root!();
    let mut c = Cluster::new("px-restart", &["b1", "b2", "client"], backend);
    let _echo: Vec<Server> = ["b1", "b2"]
        .iter()
        .map(|p| c.pod(p).tcp_echo_server(SocketAddr::new(c.ip(p), 7000)))
        .collect();
    let (b1, b2) = (c.ip("b1").to_string(), c.ip("b2").to_string());
    let objects = vec![
        service(
            "echo",
            "10.96.5.10",
            &[("echo", "TCP", 7, json!(7000))],
            json!({}),
        ),
        endpoint_slice(
            "echo",
            "a",
            &[ep(&b1, NODE), ep(&b2, NODE)],
            &[("echo", "TCP", 7000)],
        ),
    ];
    c.proxy.write("echo", &objects);
    c.wait_for_rules("10.96.5.10");
    let conns: Vec<_> = (0..50)
        .map(|_| {
            c.client("client")
                .tcp_connect(sock("10.96.5.10:7"))
                .expect("connect")
        })
        .collect();
    let roundtrip = |conns: &Vec<std::net::TcpStream>, tag: &str| {
        for (i, conn) in conns.iter().enumerate() {
            let mut w = conn.try_clone().unwrap();
            w.write_all(format!("{tag}-{i}\n").as_bytes()).unwrap();
            let mut line = String::new();
            BufReader::new(conn.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("conn {i} ({tag}): {e}"));
            assert_eq!(line.trim(), format!("{tag}-{i}"));
        }
    };
    roundtrip(&conns, "before");

    c.proxy.kill();
    c.restart_proxy();
    // Wait for the new process's first sync (a new Service proves it ran), then use them all.
    c.proxy.write(
        "extra",
        &[service(
            "extra",
            "10.96.5.11",
            &[("http", "TCP", 80, json!(8080))],
            json!({}),
        )],
    );
    c.wait_for_rules("10.96.5.11");
    roundtrip(&conns, "after");
}

both_backends!(sigkill_and_restart_keep_fifty_open_connections_working);

fn cleanup_removes_the_table_and_leaves_other_tables_alone(backend: ProxyBackend) {
    require_root!();
    let mut c = Cluster::new("px-clean", &["b1", "client"], backend);
    let _servers = serve(&c, &["b1"], &[8080], &[]);
    let b1 = c.ip("b1").to_string();
    c.net
        .node
        .netns()
        .exec_ok(&["nft", "add", "table", "inet", "other"]);
    c.net
        .node
        .netns()
        .exec_ok(&["nft", "add", "chain", "inet", "other", "c"]);
    c.net
        .node
        .netns()
        .exec_ok(&["nft", "add", "rule", "inet", "other", "c", "counter", "accept"]);
    let other_before = c
        .net
        .node
        .netns()
        .exec_ok(&["nft", "list", "table", "inet", "other"]);
    c.proxy.write(
        "a",
        &[
            service("a", "10.96.6.10", &[("http", "TCP", 80, json!(8080))], json!({})),
            endpoint_slice("a", "x", &[ep(&b1, NODE)], &[("http", "TCP", 8080)]),
        ],
    );
    c.wait_for_rules("10.96.6.10");
    c.client("client")
        .tcp_request(sock("10.96.6.10:80"))
        .expect("served before the cleanup");
    c.proxy.kill();
    let out = c.proxy_command("cleanup");
    assert!(
        out.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        c.client("client").tcp_request(sock("10.96.6.10:80")).is_err(),
        "the ClusterIP is still served after the cleanup"
    );
    if let Some(e) = &c.ebpf {
        assert!(
            !e.pin_root().join(NODE).exists(),
            "the pins are left in {}",
            e.pin_root().display()
        );
        assert!(
            !c.proxy_command("dump").status.success(),
            "dump after the cleanup finds no maps"
        );
    }
    let tables = c.net.node.netns().exec_ok(&["nft", "list", "tables"]);
    assert!(!tables.contains("ferry-proxy"), "{tables}");
    assert!(
        tables.contains("ferry-bridge"),
        "the bridge plugin's table is not the proxy's to remove: {tables}"
    );
    assert_eq!(
        c.net
            .node
            .netns()
            .exec_ok(&["nft", "list", "table", "inet", "other"]),
        other_before
    );
}

both_backends!(cleanup_removes_the_table_and_leaves_other_tables_alone);

/// What only the socket-level back end shows: the client sees the Service address (not
/// the endpoint's) as its peer and as the source of UDP replies, a process outside the
/// attached cgroup is never translated, and `dump` lists the frontends from the maps.
#[test]
fn ebpf_translates_only_the_cgroup_and_shows_the_service_address() {
    require_root!();
    let c = Cluster::new("px-ebpf", &["b1", "client"], ProxyBackend::Ebpf);
    let _servers = serve(&c, &["b1"], &[8080], &[5353]);
    let b1 = c.ip("b1").to_string();
    c.proxy.write(
        "web",
        &[
            service(
                "web",
                "10.96.7.10",
                &[("http", "TCP", 80, json!(8080)), ("dns", "UDP", 53, json!(5353))],
                json!({}),
            ),
            endpoint_slice(
                "web",
                "a",
                &[ep(&b1, NODE)],
                &[("http", "TCP", 8080), ("dns", "UDP", 5353)],
            ),
        ],
    );
    c.wait_for_rules("10.96.7.10:53/udp");
    let dump = c.programmed();
    assert!(
        dump.contains("10.96.7.10:80/tcp") && dump.contains(&format!("{b1}:8080")),
        "dump lists the frontend and its endpoint:\n{dump}"
    );
    assert!(
        c.proxy
            .log()
            .contains(&c.ebpf.as_ref().unwrap().cgroup().display().to_string()),
        "the log says which cgroup the programs are attached to:\n{}",
        c.proxy.log()
    );

    let client = c.client("client");
    let peer = client
        .tcp_connect(sock("10.96.7.10:80"))
        .expect("connect in the cgroup")
        .peer_addr()
        .unwrap();
    assert_eq!(peer, sock("10.96.7.10:80"), "getpeername shows the ClusterIP");
    let (answer, from) = client.udp_exchange(sock("10.96.7.10:53")).expect("UDP");
    assert_eq!(answered_by(&answer), c.ip("b1"));
    assert_eq!(from, sock("10.96.7.10:53"), "the reply comes from the ClusterIP");

    // The same Pod's netns, but a socket of the test process, outside the cgroup.
    let outside_cgroup = Client {
        netns: c.pod("client"),
        cgroup: None,
    };
    assert!(
        outside_cgroup.tcp_request(sock("10.96.7.10:80")).is_err(),
        "a process outside the attached cgroup was translated"
    );
}
