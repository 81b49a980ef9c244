//! Services reached from outside the node: the tc program on the node's interfaces DNATs
//! a client outside to an endpoint, SNATs it to the node's address unless the Service
//! keeps the source, and translates the replies back. Needs root.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use std::io::{Read, Write};
use std::time::Duration;

use common::Bench;
use ferry_ebpf::{EbpfDataplane, FlowSweeper, FlowTimeouts, Frontend, Protocol, ServiceBackends};
use ferry_tests::{unique_v6_subnet, Netns, NODE_IP, OUTSIDE_IP};

/// The bench, a machine outside wired to the node, and the tc program on every node
/// interface. The node forwards, and accepts its own address as a source on the wire
/// (accept_local): SNATed packets and translated replies carry it (see tc.c).
fn setup(tag: &str) -> (Bench, Netns, EbpfDataplane) {
    setup_bench(Bench::new(tag))
}

/// [`setup`] on a bench made by the caller (e.g. with pins left by an older build).
fn setup_bench(bench: Bench) -> (Bench, Netns, EbpfDataplane) {
    let outside = bench.node.client("outside");
    let ext = bench
        .node
        .connect_client(&outside, &format!("{OUTSIDE_IP}/24"), &format!("{NODE_IP}/24"));
    bench.node.netns().exec_ok(&[
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.accept_local=1",
    ]);
    let mut dp = bench.load();
    let links: Vec<String> = bench.server_links.iter().cloned().chain([ext]).collect();
    bench.node.netns().run(|| {
        for link in &links {
            dp.attach_tc(link)
                .unwrap_or_else(|e| panic!("attach tc to {link}: {e}"));
        }
    });
    dp.set_snat_ipv4(NODE_IP.parse().unwrap()).unwrap();
    (bench, outside, dp)
}

fn peer_and_server(answer: &str) -> (IpAddr, SocketAddr) {
    let mut words = answer.split_whitespace();
    let peer: SocketAddr = words.next().unwrap().parse().unwrap();
    (peer.ip(), words.next().unwrap().parse().unwrap())
}

#[test]
fn a_nodeport_from_outside_reaches_both_endpoints_snated_to_the_node() {
    ferry_tests::require_root!();
    let (bench, outside, mut dp) = setup("ebpf-nodeport");
    let node_ip: IpAddr = NODE_IP.parse().unwrap();
    dp.upsert_service(
        Frontend::outside(node_ip, 30080, Protocol::Tcp),
        &bench.backends(),
    )
    .unwrap();
    dp.upsert_service(
        Frontend::outside(node_ip, 30053, Protocol::Udp),
        &bench.backends(),
    )
    .unwrap();

    let nodeport = SocketAddr::new(node_ip, 30080);
    let mut reached = BTreeSet::new();
    for _ in 0..20 {
        let answer = outside.tcp_request(nodeport).expect("TCP to the NodePort");
        let (peer, server) = peer_and_server(&answer);
        assert_eq!(peer, node_ip, "the endpoint saw {answer}: not SNATed to the node");
        assert!(bench.endpoints.contains(&server), "{answer}");
        reached.insert(server);
    }
    assert_eq!(reached.len(), 2, "20 connections all went to {reached:?}");

    // An answer at all shows the reply was translated back: untranslated, it would come
    // from the endpoint's address to a port the outside socket never sent from.
    let answer = outside
        .udp_request(SocketAddr::new(node_ip, 30053))
        .expect("UDP to the NodePort");
    assert_eq!(peer_and_server(&answer).0, node_ip, "{answer}");
    assert!(dp.dump().unwrap().nat4_entries >= 4);

    // Without endpoints a new flow is dropped (a tc program cannot refuse): the client
    // times out, where without the program the node's own stack would refuse at once.
    let empty = Frontend::outside(node_ip, 30082, Protocol::Tcp);
    dp.upsert_service(empty, &ServiceBackends::default()).unwrap();
    let to = SocketAddr::new(node_ip, 30082);
    let short = std::time::Duration::from_millis(500);
    let err = outside
        .run(|| std::net::TcpStream::connect_timeout(&to, short))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");

    // Cleanup detaches the tc program: the node's own stack answers, and nothing listens.
    drop(dp);
    EbpfDataplane::cleanup(&bench.pins.pin_dir, bench.cgroup.path()).unwrap();
    let err = outside.tcp_request(nodeport).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address() {
    ferry_tests::require_root!();
    let (bench, outside, mut dp) = setup("ebpf-etp-local");
    let node_ip: IpAddr = NODE_IP.parse().unwrap();
    let backends = ServiceBackends {
        keep_source: true,
        ..bench.backends()
    };
    dp.upsert_service(Frontend::outside(node_ip, 30081, Protocol::Tcp), &backends)
        .unwrap();
    let answer = outside
        .tcp_request(SocketAddr::new(node_ip, 30081))
        .expect("TCP to the NodePort");
    let (peer, server) = peer_and_server(&answer);
    assert_eq!(peer, OUTSIDE_IP.parse::<IpAddr>().unwrap(), "{answer}");
    assert!(bench.endpoints.contains(&server), "{answer}");
}

/// The bench of [`setup`] plus an IPv6 client outside on a link of its own, the node
/// forwarding IPv6, and the servers routing IPv6 through the node (for replies to the
/// SNAT address and to a kept client address). Returns the client, its address and the
/// node's address on its link.
fn setup6(bench: &Bench, dp: &mut EbpfDataplane) -> (Netns, IpAddr, IpAddr) {
    let outside6 = bench.node.client("outside6");
    let net6: std::net::Ipv6Addr = unique_v6_subnet().split('/').next().unwrap().parse().unwrap();
    let (node6, client6) = (
        std::net::Ipv6Addr::from(u128::from(net6) + 1),
        std::net::Ipv6Addr::from(u128::from(net6) + 2),
    );
    let link = bench
        .node
        .connect_client(&outside6, &format!("{client6}/64"), &format!("{node6}/64"));
    bench
        .node
        .netns()
        .exec_ok(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    bench.node.netns().run(|| dp.attach_tc(&link)).unwrap();
    for (server, ep) in bench.servers.iter().zip(&bench.endpoints6) {
        let IpAddr::V6(server6) = ep.ip() else {
            unreachable!()
        };
        // The bench gives the node the address just below the server's on that link.
        let via = std::net::Ipv6Addr::from(u128::from(server6) - 1).to_string();
        server.exec_ok(&["ip", "-6", "route", "add", "default", "via", &via, "dev", "eth0"]);
    }
    dp.set_snat_ipv6(node6).unwrap();
    (outside6, client6.into(), node6.into())
}

#[test]
fn an_ipv6_nodeport_from_outside_is_snated_or_keeps_the_client_and_replies_come_back() {
    ferry_tests::require_root!();
    let (bench, _outside, mut dp) = setup("ebpf-np6");
    let (outside6, client6, node6) = setup6(&bench, &mut dp);
    let v6 = ServiceBackends {
        endpoints: bench.endpoints6.clone(),
        ..bench.backends()
    };
    dp.upsert_service(Frontend::outside(node6, 30080, Protocol::Tcp), &v6)
        .unwrap();
    dp.upsert_service(Frontend::outside(node6, 30053, Protocol::Udp), &v6)
        .unwrap();
    let keep = ServiceBackends {
        keep_source: true,
        ..v6.clone()
    };
    dp.upsert_service(Frontend::outside(node6, 30081, Protocol::Tcp), &keep)
        .unwrap();

    let mut reached = BTreeSet::new();
    for _ in 0..20 {
        let answer = outside6
            .tcp_request(SocketAddr::new(node6, 30080))
            .expect("TCP to the IPv6 NodePort");
        let (peer, server) = peer_and_server(&answer);
        assert_eq!(peer, node6, "the endpoint saw {answer}: not SNATed to the node");
        assert!(bench.endpoints6.contains(&server), "{answer}");
        reached.insert(server);
    }
    assert_eq!(reached.len(), 2, "20 connections all went to {reached:?}");
    let answer = outside6
        .udp_request(SocketAddr::new(node6, 30053))
        .expect("UDP to the IPv6 NodePort");
    assert_eq!(peer_and_server(&answer).0, node6, "{answer}");
    let answer = outside6
        .tcp_request(SocketAddr::new(node6, 30081))
        .expect("TCP to the IPv6 NodePort keeping the source");
    assert_eq!(peer_and_server(&answer).0, client6, "{answer}");
    let dump = dp.dump().unwrap();
    assert!(dump.nat6_entries >= 6, "{dump:?}");
    assert_eq!(dump.nat4_entries, 0, "{dump:?}");
}

#[test]
fn source_ranges_admit_only_their_clients_and_change_with_a_write_and_a_delete() {
    ferry_tests::require_root!();
    let (bench, outside, mut dp) = setup("ebpf-ranges");
    let node_ip: IpAddr = NODE_IP.parse().unwrap();
    let frontend = Frontend::outside(node_ip, 30090, Protocol::Tcp);
    let with_ranges = |ranges: &[&str]| ServiceBackends {
        source_ranges: ranges.iter().map(|r| r.parse().unwrap()).collect(),
        ..bench.backends()
    };
    let to = SocketAddr::new(node_ip, 30090);
    let short = std::time::Duration::from_millis(500);
    let connect = || outside.run(|| std::net::TcpStream::connect_timeout(&to, short));

    // The client's /24 and another range: admitted.
    let ops = dp
        .upsert_service(
            frontend,
            &with_ranges(&[&format!("{OUTSIDE_IP}/24"), "198.18.0.0/24"]),
        )
        .unwrap();
    // Two endpoint slots, two ranges, the frontend.
    assert_eq!(ops, 5);
    connect().expect("a source inside the ranges");
    let dumped = dp.dump().unwrap();
    assert_eq!(dumped.services[0].backends.source_ranges.len(), 2, "{dumped:?}");

    // Only the other range left: one delete, nothing else written; the client is dropped.
    let ops = dp
        .upsert_service(frontend, &with_ranges(&["198.18.0.0/24"]))
        .unwrap();
    assert_eq!(ops, 1, "narrowing the ranges is one delete");
    let err = connect().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");

    // No ranges: the frontend's flag goes, the last range after it; open to all again.
    let ops = dp.upsert_service(frontend, &bench.backends()).unwrap();
    assert_eq!(ops, 2);
    connect().expect("no ranges: every source");
    assert!(dp.dump().unwrap().services[0].backends.source_ranges.is_empty());
}

/// One endpoint of the bench.
fn only(bench: &Bench, i: usize) -> ServiceBackends {
    ServiceBackends {
        endpoints: vec![bench.endpoints[i]],
        ..bench.backends()
    }
}

/// Sends one datagram on `socket` (one flow while the socket lives) and returns the
/// endpoint that answered.
fn udp_ask(socket: &std::net::UdpSocket, to: SocketAddr) -> SocketAddr {
    socket.send_to(b"who am i", to).expect("send to the NodePort");
    let mut buf = [0u8; 200];
    let (n, _) = socket
        .recv_from(&mut buf)
        .expect("an answer through the NodePort");
    peer_and_server(std::str::from_utf8(&buf[..n]).unwrap()).1
}

/// Longer than a test timeout of 1 s plus the 1 s a flow's timestamp may lag its last packet.
const PAST_SHORT_TIMEOUT: Duration = Duration::from_millis(2500);

#[test]
fn an_idle_udp_flow_is_swept_after_its_timeout_and_the_next_datagram_picks_afresh() {
    ferry_tests::require_root!();
    let (bench, outside, mut dp) = setup("ebpf-flow-udp");
    let node_ip: IpAddr = NODE_IP.parse().unwrap();
    let frontend = Frontend::outside(node_ip, 30053, Protocol::Udp);
    let to = SocketAddr::new(node_ip, 30053);
    dp.upsert_service(frontend, &only(&bench, 0)).unwrap();
    let socket = outside.udp_socket(true).unwrap();
    assert_eq!(udp_ask(&socket, to), bench.endpoints[0]);
    assert_eq!(dp.dump().unwrap().nat4_entries, 2, "one flow, both directions");

    // The endpoint changes; the flow keeps the one it chose, as a conntrack entry would.
    dp.upsert_service(frontend, &only(&bench, 1)).unwrap();
    assert_eq!(udp_ask(&socket, to), bench.endpoints[0]);

    let short = FlowTimeouts::parse("udp=1,udp-stream=1").unwrap();
    let mut sweeper = FlowSweeper::open(&bench.pins.pin_dir).unwrap();
    let report = sweeper.sweep(&short).unwrap();
    assert_eq!((report.entries, report.removed), (2, 0), "a flow just used stays");

    std::thread::sleep(PAST_SHORT_TIMEOUT);
    let report = sweeper.sweep(&short).unwrap();
    assert_eq!(
        (report.entries, report.removed),
        (2, 2),
        "idle past 1 s: both directions go"
    );
    assert_eq!(dp.dump().unwrap().nat4_entries, 0);
    // The same client port is a new flow now, with a fresh choice.
    assert_eq!(udp_ask(&socket, to), bench.endpoints[1]);
}

#[test]
fn a_tcp_flow_closed_with_fin_is_swept_within_the_close_timeout_and_an_open_one_stays() {
    ferry_tests::require_root!();
    let (bench, outside, mut dp) = setup("ebpf-flow-fin");
    let node_ip: IpAddr = NODE_IP.parse().unwrap();
    // An echo server holds its connections open; the bench's servers answer and close.
    let echo_at = SocketAddr::new(bench.endpoints[0].ip(), 8081);
    let _echo = bench.servers[0].tcp_echo_server(echo_at);
    let echo = ServiceBackends {
        endpoints: vec![echo_at],
        ..bench.backends()
    };
    dp.upsert_service(Frontend::outside(node_ip, 30081, Protocol::Tcp), &echo)
        .unwrap();
    dp.upsert_service(Frontend::outside(node_ip, 30080, Protocol::Tcp), &only(&bench, 0))
        .unwrap();

    let mut open = outside
        .tcp_connect(SocketAddr::new(node_ip, 30081))
        .expect("TCP to the echo NodePort");
    let mut line = [0u8; 6];
    open.write_all(b"hello\n").unwrap();
    open.read_exact(&mut line).unwrap();
    let answer = outside
        .tcp_request(SocketAddr::new(node_ip, 30080))
        .expect("TCP to the NodePort");
    assert_eq!(peer_and_server(&answer).1, bench.endpoints[0]);
    assert_eq!(dp.dump().unwrap().nat4_entries, 4, "two flows, both directions");

    let short = FlowTimeouts::parse("tcp-fin=1,tcp-rst=1").unwrap();
    let mut sweeper = FlowSweeper::open(&bench.pins.pin_dir).unwrap();
    std::thread::sleep(PAST_SHORT_TIMEOUT);
    let report = sweeper.sweep(&short).unwrap();
    assert_eq!(
        (report.entries, report.removed),
        (4, 2),
        "the closed flow goes, the open one (timeout {:?}) stays",
        short.tcp
    );
    // The open connection still reaches its endpoint through its flow.
    open.write_all(b"again\n").unwrap();
    open.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"again\n");
}

#[test]
fn a_client_port_reused_after_a_close_starts_a_new_flow_at_once() {
    ferry_tests::require_root!();
    let (bench, outside, mut dp) = setup("ebpf-flow-reuse");
    let node_ip: IpAddr = NODE_IP.parse().unwrap();
    let frontend = Frontend::outside(node_ip, 30080, Protocol::Tcp);
    let to = SocketAddr::new(node_ip, 30080);
    dp.upsert_service(frontend, &only(&bench, 0)).unwrap();
    // The same client address and port twice: what a client reusing its port looks like.
    let from = SocketAddr::new(OUTSIDE_IP.parse().unwrap(), 40123);
    let request = || {
        outside.run(|| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&from.into())?;
            s.connect_timeout(&to.into(), ferry_tests::TIMEOUT)?;
            let mut conn = std::net::TcpStream::from(s);
            conn.set_read_timeout(Some(ferry_tests::TIMEOUT))?;
            let mut out = String::new();
            conn.read_to_string(&mut out)?;
            std::io::Result::Ok(out)
        })
    };
    let first = request().expect("the first connection");
    assert_eq!(peer_and_server(&first).1, bench.endpoints[0]);
    dp.upsert_service(frontend, &only(&bench, 1)).unwrap();
    // No sweep: the SYN meets a flow that saw FINs, which ends it and picks again.
    let second = request().expect("the connection from the reused port");
    assert_eq!(peer_and_server(&second).1, bench.endpoints[1], "{second}");
}

#[test]
fn a_flow_table_pinned_with_an_older_layout_is_made_anew_and_flows_work() {
    ferry_tests::require_root!();
    let bench = Bench::new("ebpf-flow-layout");
    // What a build before flow timestamps pinned: 16-byte values.
    let maps = bench.pins.pin_dir.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    let old = maps.join("ferry_nat4");
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&old)
        .args([
            "type",
            "lru_hash",
            "key",
            "16",
            "value",
            "16",
            "entries",
            "262144",
            "name",
            "ferry_nat4",
        ])
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (bench, outside, mut dp) = setup_bench(bench);
    assert_eq!(dp.recreated_maps(), ["ferry_nat4"]);
    let node_ip: IpAddr = NODE_IP.parse().unwrap();
    dp.upsert_service(
        Frontend::outside(node_ip, 30080, Protocol::Tcp),
        &bench.backends(),
    )
    .unwrap();
    let answer = outside
        .tcp_request(SocketAddr::new(node_ip, 30080))
        .expect("TCP to the NodePort over the new flow table");
    assert!(bench.endpoints.contains(&peer_and_server(&answer).1), "{answer}");
    assert_eq!(dp.dump().unwrap().nat4_entries, 2);

    // A second load reuses what the first made.
    drop(dp);
    let dp = bench.load();
    assert!(dp.recreated_maps().is_empty(), "{:?}", dp.recreated_maps());
    assert_eq!(dp.dump().unwrap().nat4_entries, 2);
}
