//! The eBPF back end driven directly: a plan in, maps and real sockets out. Needs root.
//!
//! A node netns with two servers on links of their own (IPv4 and IPv6 on each), the
//! test's own cgroup v2 directory and bpf file system ([`EbpfSandbox`]), and the back end
//! on a thread inside the node netns (tc attaches to that netns's interfaces only).
//! Clients make their sockets inside the cgroup; nothing outside these is touched.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use ferry_proxy::backend::ebpf::{pin_dir, EbpfBackend};
use ferry_proxy::backend::Backend;
use ferry_proxy::changes::Changes;
use ferry_proxy::plan::{
    Endpoint, Family, NodeSettings, Plan, Protocol, ServicePort, ServicePortId, ServiceTable,
};
use ferry_tests::{
    require_root, unique_v4_subnet, unique_v6_subnet, Client, EbpfSandbox, Netns, Node, Server,
};

const NODE: &str = "node-a";

struct Bench {
    sandbox: EbpfSandbox,
    _servers: Vec<Server>,
    _server_ns: Vec<Netns>,
    node: Node,
    /// A client netns (a Pod, as far as the socket programs care), wired to the node.
    client: Netns,
    v4: Vec<IpAddr>,
    v6: Vec<IpAddr>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn host(net: &str, n: u128) -> IpAddr {
    let base = net.split('/').next().unwrap();
    match base.parse::<IpAddr>().unwrap() {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) + n as u32).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) + n).into()),
    }
}

impl Bench {
    fn new(tag: &str) -> Bench {
        let node = Node::new(tag);
        // The client's packets, translated at connect, are routed through the node.
        node.netns().exec_ok(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        let (mut servers, mut server_ns, mut v4, mut v6) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..3 {
            let ns = node.client(&format!("s{i}"));
            let net4 = unique_v4_subnet(30);
            let (n4, s4) = (host(&net4, 1), host(&net4, 2));
            let node_if = node.connect_client(&ns, &format!("{s4}/30"), &format!("{n4}/30"));
            let net6 = unique_v6_subnet();
            let (n6, s6) = (host(&net6, 1), host(&net6, 2));
            ip(&[
                "-n",
                node.name(),
                "addr",
                "add",
                &format!("{n6}/64"),
                "dev",
                &node_if,
                "nodad",
            ]);
            ip(&[
                "-n",
                ns.name(),
                "addr",
                "add",
                &format!("{s6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            let via = n6.to_string();
            ip(&[
                "-n",
                ns.name(),
                "-6",
                "route",
                "add",
                "default",
                "via",
                &via,
                "dev",
                "eth0",
            ]);
            if i == 0 {
                // The first link is the client's; the other two hold servers.
                v4.push(s4);
                v6.push(s6);
                server_ns.push(ns);
                continue;
            }
            for addr in [s4, s6] {
                servers.push(ns.tcp_server(SocketAddr::new(addr, 8080)));
            }
            v4.push(s4);
            v6.push(s6);
            server_ns.push(ns);
        }
        let client = server_ns.remove(0);
        // Only the servers' addresses stay listed.
        let (v4, v6) = (v4[1..].to_vec(), v6[1..].to_vec());
        Bench {
            sandbox: EbpfSandbox::new(tag),
            _servers: servers,
            _server_ns: server_ns,
            node,
            client,
            v4,
            v6,
        }
    }

    fn client(&self) -> Client<'_> {
        Client {
            netns: &self.client,
            cgroup: Some(self.sandbox.cgroup()),
        }
    }

    fn backend(&self) -> EbpfBackend {
        EbpfBackend::new(&pin_dir(self.sandbox.pin_root(), NODE), self.sandbox.cgroup())
            .unwrap_or_else(|e| panic!("load: {e}"))
    }

    /// Who answers `to` over `tries` connections from the cgroup.
    fn answered_by(&self, to: SocketAddr, tries: usize) -> BTreeSet<IpAddr> {
        (0..tries)
            .map(|_| {
                let reply = self
                    .client()
                    .tcp_request(to)
                    .unwrap_or_else(|e| panic!("{to}: {e}"));
                let local: SocketAddr = reply.split_whitespace().nth(1).unwrap().parse().unwrap();
                local.ip()
            })
            .collect()
    }
}

fn port(name: &str, protocol: Protocol, cluster_ip: &str, endpoints: &[IpAddr]) -> ServicePort {
    let ip: IpAddr = cluster_ip.parse().unwrap();
    let id = ServicePortId {
        namespace: "default".into(),
        name: name.into(),
        port_name: "p".into(),
        protocol,
        family: Family::of(ip),
    };
    let mut p = ServicePort::new(id, Some(ip), 80);
    p.cluster_endpoints = endpoints
        .iter()
        .map(|ip| Endpoint {
            ip: *ip,
            port: 8080,
            is_local: true,
            ready: true,
        })
        .collect();
    p.external_endpoints = p.cluster_endpoints.clone();
    p
}

fn plan(ports: Vec<ServicePort>) -> Plan {
    Plan {
        services: ServiceTable {
            settings: NodeSettings {
                node_name: NODE.into(),
                ..NodeSettings::default()
            },
            ports: ports.into_iter().map(|p| (p.id.clone(), p)).collect(),
        },
        policy: None,
    }
}

fn dump(b: &Bench) -> String {
    ferry_proxy::backend::ebpf::dump_text(&pin_dir(b.sandbox.pin_root(), NODE)).unwrap()
}

fn endpoints_of(dump: &str, frontend: &str) -> usize {
    let line = dump
        .lines()
        .find(|l| l.starts_with(frontend))
        .unwrap_or_else(|| panic!("{frontend} not in\n{dump}"));
    line.matches(":8080").count()
}

#[test]
fn dual_stack_services_sync_only_the_named_ports_and_a_restart_converges() {
    require_root!();
    let b = Bench::new("ebpf-be");
    let (a4, a6) = ("10.96.9.10", "fd00:96::10");
    let full = plan(vec![
        port("a", Protocol::Tcp, a4, &b.v4),
        port("b", Protocol::Tcp, a6, &b.v6),
        port("s", Protocol::Sctp, "10.96.9.11", &b.v4),
    ]);
    b.node.netns().run(|| {
        let mut backend = b.backend();
        let stats = backend.sync(&full, &Changes::all()).unwrap();
        assert_eq!(stats.changed_ports, 2, "SCTP is left out");
        // Both families, both endpoints, from a socket in the cgroup.
        let v4: BTreeSet<IpAddr> = b.v4.iter().copied().collect();
        let v6: BTreeSet<IpAddr> = b.v6.iter().copied().collect();
        assert_eq!(b.answered_by(format!("{a4}:80").parse().unwrap(), 20), v4);
        assert_eq!(b.answered_by(format!("[{a6}]:80").parse().unwrap(), 20), v6);
        let d = dump(&b);
        assert!(!d.contains("10.96.9.11"), "SCTP is not programmed:\n{d}");

        // Both ports lose an endpoint, but only "a" is named: "b" must stay as it was.
        let shrunk = plan(vec![
            port("a", Protocol::Tcp, a4, &b.v4[..1]),
            port("b", Protocol::Tcp, a6, &b.v6[..1]),
        ]);
        let a_id = shrunk
            .services
            .ports
            .keys()
            .find(|id| id.name == "a")
            .unwrap()
            .clone();
        let stats = backend.sync(&shrunk, &Changes::service_ports([a_id])).unwrap();
        assert_eq!(stats.changed_ports, 1);
        let d = dump(&b);
        assert_eq!(endpoints_of(&d, &format!("{a4}:80/tcp")), 1, "{d}");
        assert_eq!(
            endpoints_of(&d, &format!("[{a6}]:80/tcp")),
            2,
            "an unnamed port was touched:\n{d}"
        );
        assert_eq!(
            b.answered_by(format!("{a4}:80").parse().unwrap(), 10),
            BTreeSet::from([b.v4[0]])
        );
        drop(backend);

        // A restart over the pinned maps, with "a" gone from the plan: the first sync
        // (everything compared) removes what the maps hold that no port has.
        let mut backend = b.backend();
        let only_b = plan(vec![port("b", Protocol::Tcp, a6, &b.v6[..1])]);
        backend.sync(&only_b, &Changes::all()).unwrap();
        let d = dump(&b);
        assert!(!d.contains(a4), "the stale frontend stayed:\n{d}");
        assert_eq!(endpoints_of(&d, &format!("[{a6}]:80/tcp")), 1, "{d}");
        assert_eq!(
            b.answered_by(format!("[{a6}]:80").parse().unwrap(), 10),
            BTreeSet::from([b.v6[0]])
        );

        backend.cleanup().unwrap();
    });
    assert!(
        !pin_dir(b.sandbox.pin_root(), NODE).exists(),
        "cleanup left the pins"
    );
}

#[test]
fn dual_stack_external_ips_are_served_from_outside_by_the_tc_program() {
    require_root!();
    let b = Bench::new("ebpf-be-out");
    let (ext4, ext6): (IpAddr, IpAddr) = ("198.51.100.40".parse().unwrap(), "2001:db8::40".parse().unwrap());
    let mut a = port("a", Protocol::Tcp, "10.96.9.20", &b.v4);
    a.external_ips = vec![ext4];
    let mut c = port("c", Protocol::Tcp, "fd00:96::20", &b.v6);
    c.external_ips = vec![ext6];
    let both = plan(vec![a, c]);
    // The client's netns, but a socket outside the cgroup: a machine outside the node as
    // far as Ferry can tell, so only the tc program on the node's interfaces translates.
    let outside = Client {
        netns: &b.client,
        cgroup: None,
    };
    b.node.netns().run(|| {
        let mut backend = b.backend();
        backend.sync(&both, &Changes::all()).unwrap();
        for (ext, endpoints) in [(ext4, &b.v4), (ext6, &b.v6)] {
            let to = SocketAddr::new(ext, 80);
            let answered: BTreeSet<IpAddr> = (0..20)
                .map(|_| {
                    let reply = outside
                        .tcp_request(to)
                        .unwrap_or_else(|e| panic!("{to} from outside: {e}"));
                    let local: SocketAddr = reply.split_whitespace().nth(1).unwrap().parse().unwrap();
                    local.ip()
                })
                .collect();
            assert_eq!(&answered, &endpoints.iter().copied().collect(), "{to}");
        }
        let d = dump(&b);
        assert!(d.contains("[2001:db8::40]:80/tcp (from outside)"), "{d}");
        backend.cleanup().unwrap();
    });
}

#[test]
fn the_back_end_ends_closed_flows_from_outside_after_the_close_timeout() {
    require_root!();
    let b = Bench::new("ebpf-be-sweep");
    let ext4: IpAddr = "198.51.100.41".parse().unwrap();
    let mut a = port("a", Protocol::Tcp, "10.96.9.21", &b.v4);
    a.external_ips = vec![ext4];
    let outside = Client {
        netns: &b.client,
        cgroup: None,
    };
    let flows = |b: &Bench| {
        let d = dump(b);
        let n = d
            .split("flows from outside ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.trim().parse::<usize>().ok());
        n.unwrap_or_else(|| panic!("no flow count in the dump: {d}"))
    };
    b.node.netns().run(|| {
        // What the daemon takes from FERRY_EBPF_FLOW_TIMEOUTS=tcp-fin=1,tcp-rst=1.
        let timeouts = ferry_ebpf::FlowTimeouts::parse("tcp-fin=1,tcp-rst=1").unwrap();
        let mut backend = EbpfBackend::with_flow_timeouts(
            &pin_dir(b.sandbox.pin_root(), NODE),
            b.sandbox.cgroup(),
            timeouts,
        )
        .unwrap_or_else(|e| panic!("load: {e}"));
        backend.sync(&plan(vec![a]), &Changes::all()).unwrap();
        let to = SocketAddr::new(ext4, 80);
        outside
            .tcp_request(to)
            .unwrap_or_else(|e| panic!("{to} from outside: {e}"));
        assert_eq!(flows(&b), 1, "the closed connection's flow, until the sweep");
        // Sweeps every second; the flow's timestamp may lag its last packet by one.
        let gone = ferry_tests::wait_until(std::time::Duration::from_secs(10), || flows(&b) == 0);
        assert!(
            gone.is_some(),
            "the closed flow is still there after 10 s: {}",
            dump(&b)
        );
        backend.cleanup().unwrap();
    });
}
