//! The Pod network between nodes (issue 13): three node netns, `ferry-proxy` on each from a
//! manifests directory holding the three Nodes, Pods made by `ferry-bridge` with the
//! conflist each daemon wrote, and real TCP between them (the testbed's
//! `ferry_tests::cluster`).
//!
//! - `host_gw_on_one_link`: the nodes share one underlay link; every Pod reaches every
//!   other over IPv4 and IPv6 with its own address; traffic to outside the cluster CIDR is
//!   masqueraded; a Service whose endpoints are on the other nodes works from every
//!   node's Pods and by NodePort from outside; a Node removed from the manifests loses its
//!   routes everywhere within a second, and gets them back when re-added; the conflist is
//!   never seen half-written while it changes, and not rewritten when nothing in it did.
//! - `vxlan_and_auto_across_a_router`: two nodes share a subnet, the third is behind a
//!   router that drops IP fragments and knows no Pod CIDR; `auto` picks host-gw for the
//!   neighbour and VXLAN for the far node (IPv6 Pods ride the IPv4 underlay); 1,400-byte
//!   payloads and 1 MB transfers pass (full-size segments: the Pod MTU is right); FDB
//!   entries follow Node deletes; daemons killed with SIGKILL and restarted do not break a
//!   transfer running through the restart, nor change the routes or the device;
//!   `ferry-proxy cleanup` removes routes, device and table.
//! - `vxlan_mode_tunnels_even_to_a_neighbour`: `vxlan` sends every peer, the one on the
//!   same subnet too, through the tunnel.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_tests::cluster::{first_host, ip_in, send_to_sink, tcp_sink, v4_sub, Cluster, ClusterNode};
use ferry_tests::{
    endpoint_slice, ferry_bin, require_root, service, unique_v4_subnet, wait_until, Netns, Pod, Server,
};
use serde_json::{json, Value};

/// Connects from `from` to a "who am I" server at `to`: the peer address the server saw.
fn seen_peer(from: &Netns, to: SocketAddr) -> IpAddr {
    let answer = from
        .tcp_request(to)
        .unwrap_or_else(|e| panic!("{} -> {to}: {e}", from.name()));
    let peer: SocketAddr = answer.split(' ').next().unwrap().parse().unwrap();
    peer.ip()
}

/// Servers on every Pod's addresses; every Pod connects to every one and must be seen
/// with its own address.
fn all_pairs_reach_each_other(pods: &[(Pod, IpAddr, IpAddr)], port: u16) -> Vec<Server> {
    let mut servers = Vec::new();
    for (pod, a4, a6) in pods {
        servers.push(pod.tcp_server(SocketAddr::new(*a4, port)));
        servers.push(pod.tcp_server(SocketAddr::new(*a6, port)));
    }
    for (from, f4, f6) in pods {
        for (_, t4, t6) in pods {
            assert_eq!(seen_peer(from, SocketAddr::new(*t4, port)), *f4, "{f4} -> {t4}");
            assert_eq!(seen_peer(from, SocketAddr::new(*t6, port)), *f6, "{f6} -> {t6}");
        }
    }
    servers
}

/// Waits until every node but `gone` routes to every other node's Pod CIDRs.
fn wait_for_routes(nodes: &[ClusterNode], want: impl Fn(&ClusterNode, &ClusterNode) -> Vec<String>) {
    for n in nodes {
        let wanted: Vec<String> = nodes
            .iter()
            .filter(|p| p.name != n.name)
            .flat_map(|p| want(n, p))
            .collect();
        assert!(
            wait_until(Duration::from_secs(10), || {
                let routes = n.ferry_routes();
                wanted.iter().all(|w| routes.contains(w))
            })
            .is_some(),
            "{}: want {wanted:?}, have\n{}\n{}",
            n.name,
            n.ferry_routes(),
            n.log()
        );
    }
}

#[test]
fn host_gw_on_one_link() {
    require_root!();
    let mut cluster = Cluster::on_one_link("hg", "host-gw");
    cluster.start();
    let node_objects = cluster.node_objects();
    let nodes = &cluster.nodes;
    let pods: Vec<_> = nodes.iter().map(|n| n.pod("p")).collect();

    // One route per peer Pod CIDR via the peer's address, in Ferry's protocol.
    wait_for_routes(nodes, |_, p| {
        vec![
            format!("{} via {}", p.pod4, p.ip4),
            format!("{} via {}", p.pod6, p.ip6.as_ref().unwrap()),
        ]
    });
    assert!(
        nodes.iter().all(|n| !n.ferry_routes().contains("ferry.vxlan")),
        "host-gw made a tunnel"
    );

    // Every Pod reaches every other, both families, with its own address.
    let _servers = all_pairs_reach_each_other(&pods, 8080);

    // Out of the cluster: masqueraded to the node's address.
    let outside = nodes[0].node.client("hg-out");
    let link = unique_v4_subnet(30);
    let (node_side, out_side) = (v4_sub(&link, 0, 1), v4_sub(&link, 0, 2));
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
    cluster.write_all("web", &[svc, slice]);
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
            // The endpoint sees the client Pod, unless the client is the endpoint (hairpin
            // traffic is masqueraded, as kube-proxy does).
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

    // A Node deleted: its routes go from every node within a second; re-added: back. The
    // conflist, which does not depend on peers, is not rewritten meanwhile.
    let inode =
        |n: &ClusterNode| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(n.conflist_path()).unwrap());
    let inode_before = inode(&nodes[0]);
    let started = Instant::now();
    cluster.write_all("nodes", &node_objects[..2]);
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

    // A route Ferry does not own to a Pod CIDR (an administrator's, `proto static`) is left
    // alone when the Node comes back, and logged; once it is gone, Ferry routes there.
    let n0 = nodes[0].node.name();
    ip_in(
        n0,
        &[
            "route",
            "add",
            &nodes[2].pod4,
            "via",
            &nodes[2].ip4,
            "proto",
            "static",
        ],
    );
    cluster.write_all("nodes", &node_objects);
    let logged = || nodes[0].log().contains("exists that Ferry does not own");
    assert!(
        wait_until(Duration::from_secs(3), logged).is_some(),
        "{}",
        nodes[0].log()
    );
    let route = ip_in(n0, &["route", "show", &nodes[2].pod4]);
    assert!(
        route.contains("proto static") && !nodes[0].ferry_routes().contains(&nodes[2].pod4),
        "{route}"
    );
    ip_in(n0, &["route", "del", &nodes[2].pod4, "proto", "static"]);
    cluster.write_all("nodes", &node_objects[..2]);
    let gone = || !nodes[1].ferry_routes().contains(&nodes[2].pod4);
    assert!(wait_until(Duration::from_secs(3), gone).is_some());
    cluster.write_all("nodes", &node_objects);
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
        objects[0] = nodes[0].object(false);
        cluster.write_all("nodes", &objects);
        let v4_only = || !std::fs::read_to_string(&path).unwrap().contains(&nodes[0].pod6);
        assert!(
            wait_until(Duration::from_secs(3), v4_only).is_some(),
            "round {round}"
        );
        cluster.write_all("nodes", &node_objects);
        let back = || std::fs::read_to_string(&path).unwrap() == text_with_v6;
        assert!(
            wait_until(Duration::from_secs(3), back).is_some(),
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
    let mut cluster = Cluster::across_a_router("vx", "auto");
    // The router really drops fragments: a 3000-byte ping between the subnets fails.
    let ping = cluster.nodes[0].node.netns().exec(&[
        "ping",
        "-c1",
        "-W1",
        "-s3000",
        "-M",
        "dont",
        &cluster.nodes[2].ip4,
    ]);
    assert!(!ping.status.success(), "a fragmented ping crossed the router");
    cluster.start();
    let node_objects = cluster.node_objects();
    let pods: Vec<_> = cluster.nodes.iter().map(|n| n.pod("p")).collect();

    // auto: host-gw to the neighbour on subnet A for IPv4 (the family of its InternalIP),
    // VXLAN to node-2, and for IPv6 Pods (no IPv6 InternalIP).
    let (n0, n1, n2) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let gw2 = first_host(&n2.pod4).to_string();
    wait_for_routes(&cluster.nodes[..1], |_, _| {
        vec![
            format!("{} via {} dev eth0", n1.pod4, n1.ip4),
            format!("{} via {gw2} dev ferry.vxlan onlink", n2.pod4),
            format!("{} via {} dev ferry.vxlan", n1.pod6, first_host(&n1.pod6)),
        ]
    });
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

    // 1,400-byte payloads and full-size segments (1 MB), both families, over the tunnel
    // both ways and over host-gw.
    let mut sinks = Vec::new();
    for (pod, a4, a6) in &pods {
        sinks.push(tcp_sink(pod, SocketAddr::new(*a4, 9000)));
        sinks.push(tcp_sink(pod, SocketAddr::new(*a6, 9000)));
    }
    for (from, to) in [(0, 2), (2, 0), (0, 1)] {
        for v4 in [true, false] {
            let dst = SocketAddr::new(if v4 { pods[to].1 } else { pods[to].2 }, 9000);
            assert_eq!(
                send_to_sink(&pods[from].0, dst, 1400, 1, Duration::ZERO).unwrap(),
                1400,
                "{dst}"
            );
            let mb = send_to_sink(&pods[from].0, dst, 1 << 16, 16, Duration::ZERO).unwrap();
            assert_eq!(mb, 1 << 20, "{dst}");
        }
    }

    // A Node deleted: its FDB entry and routes go within a second; re-added: back.
    let started = Instant::now();
    cluster.write_all("nodes", &node_objects[..2]);
    let gone = wait_until(Duration::from_secs(3), || {
        !fdb().contains(&mac2) && !cluster.nodes[0].ferry_routes().contains(&gw2)
    });
    assert!(
        gone.is_some() && started.elapsed() <= Duration::from_secs(1),
        "{:?}\n{}",
        started.elapsed(),
        fdb()
    );
    cluster.write_all("nodes", &node_objects);
    assert!(
        wait_until(Duration::from_secs(3), || fdb().contains(&mac2)).is_some(),
        "{}",
        fdb()
    );
    assert!(
        wait_until(Duration::from_secs(3), || cluster.nodes[0]
            .ferry_routes()
            .contains(&gw2))
        .is_some(),
        "{}",
        cluster.nodes[0].ferry_routes()
    );

    // SIGKILL and restart of both ends' daemons while a transfer runs over the tunnel.
    let index = |n: &ClusterNode| {
        n.node
            .netns()
            .exec_ok(&["cat", "/sys/class/net/ferry.vxlan/ifindex"])
    };
    let before = (cluster.nodes[0].ferry_routes(), index(&cluster.nodes[0]));
    let (client, _, _) = cluster.nodes[0].pod("vx-client");
    let dst = SocketAddr::new(pods[2].1, 9000);
    let transfer =
        std::thread::spawn(move || send_to_sink(&client, dst, 16 << 10, 120, Duration::from_millis(25)));
    std::thread::sleep(Duration::from_millis(300));
    for n in [0, 2] {
        cluster.nodes[n].proxy.as_mut().unwrap().kill();
        cluster.nodes[n].start();
    }
    let sent = transfer
        .join()
        .unwrap()
        .expect("the transfer broke during the restart");
    assert_eq!(sent, 120 * (16 << 10));
    let log = cluster.nodes[0].log();
    assert!(log.matches("Pod network between nodes on").count() >= 2, "{log}");
    assert_eq!(
        (cluster.nodes[0].ferry_routes(), index(&cluster.nodes[0])),
        before,
        "the restart changed the routes or the device"
    );
    for stop in &sinks {
        stop.store(true, Ordering::Relaxed);
    }

    // `ferry-proxy cleanup` removes the routes, the device and the masquerade table.
    let n0 = &mut cluster.nodes[0];
    n0.proxy.as_mut().unwrap().kill();
    let out = n0
        .node
        .netns()
        .command(ferry_bin("ferry-proxy"))
        .args(["cleanup", "--hostname-override", "node-0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(n0.ferry_routes().trim(), "");
    let links = n0.node.netns().exec_ok(&["ip", "link", "show"]);
    assert!(!links.contains("ferry.vxlan"), "{links}");
    let tables = n0.node.netns().exec_ok(&["nft", "list", "tables"]);
    assert!(!tables.contains("ferry-network"), "{tables}");
    assert!(n0.conflist_path().exists(), "cleanup keeps the conflist");
}

#[test]
fn vxlan_mode_tunnels_even_to_a_neighbour() {
    require_root!();
    let mut cluster = Cluster::across_a_router("vm", "vxlan");
    cluster.start();
    let pods: Vec<_> = cluster.nodes.iter().map(|n| n.pod("p")).collect();
    let nodes = &cluster.nodes;
    wait_for_routes(nodes, |_, p| {
        vec![
            format!("{} via {} dev ferry.vxlan onlink", p.pod4, first_host(&p.pod4)),
            format!("{} via {} dev ferry.vxlan", p.pod6, first_host(&p.pod6)),
        ]
    });
    let _servers = all_pairs_reach_each_other(&pods, 8080);
    let sink = tcp_sink(&pods[1].0, SocketAddr::new(pods[1].1, 9000));
    let mb = send_to_sink(
        &pods[0].0,
        SocketAddr::new(pods[1].1, 9000),
        1 << 16,
        16,
        Duration::ZERO,
    )
    .unwrap();
    assert_eq!(mb, 1 << 20);
    sink.store(true, Ordering::Relaxed);
}
