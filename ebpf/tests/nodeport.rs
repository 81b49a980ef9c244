//! Services reached from outside the node: the tc program on the node's interfaces DNATs
//! a client outside to an endpoint, SNATs it to the node's address unless the Service
//! keeps the source, and translates the replies back. Needs root.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use common::Bench;
use ferry_ebpf::{EbpfDataplane, Frontend, Protocol, ServiceBackends};
use ferry_tests::{unique_v6_subnet, Netns, NODE_IP, OUTSIDE_IP};

/// The bench, a machine outside wired to the node, and the tc program on every node
/// interface. The node forwards, and accepts its own address as a source on the wire
/// (accept_local): SNATed packets and translated replies carry it (see tc.c).
fn setup(tag: &str) -> (Bench, Netns, EbpfDataplane) {
    let bench = Bench::new(tag);
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
