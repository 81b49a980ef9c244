//! ctnetlink over `Socket<Conntrack>`: real flows between namespaces through a node netns
//! that DNATs them, listed and deleted in that node's conntrack table.

use std::net::{Ipv4Addr, SocketAddr};

use ferry_netlink::conntrack::{Conntrack, Entry, IpFamily};
use ferry_netlink::{Netns, Socket};
use ferry_tests::{require_root, unique_v4_subnet, Node};

/// The `n`th address of a /24 made by `unique_v4_subnet`.
fn host(subnet: &str, n: u8) -> Ipv4Addr {
    let base: Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
    Ipv4Addr::from(u32::from(base) + u32::from(n))
}

/// A client and a server, each linked to the node, and a "Service" address on the node
/// whose UDP port 53 is DNATed to the server's 5353 (so conntrack tracks the flows, and
/// their reply source is the server, as behind a ClusterIP).
struct Bed {
    node: Node,
    client: ferry_tests::Netns,
    server: ferry_tests::Netns,
    client_ip: Ipv4Addr,
    server_ip: Ipv4Addr,
    vip: SocketAddr,
}

impl Bed {
    fn new(tag: &str) -> Bed {
        let node = Node::new(tag);
        let (c_net, s_net, vip_net) = (unique_v4_subnet(24), unique_v4_subnet(24), unique_v4_subnet(24));
        let client = node.client("ct-client");
        let server = node.client("ct-server");
        let (client_ip, server_ip) = (host(&c_net, 2), host(&s_net, 2));
        node.connect_client(
            &client,
            &format!("{client_ip}/24"),
            &format!("{}/24", host(&c_net, 1)),
        );
        node.connect_client(
            &server,
            &format!("{server_ip}/24"),
            &format!("{}/24", host(&s_net, 1)),
        );
        node.netns().exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let vip = SocketAddr::new(host(&vip_net, 10).into(), 53);
        let ns = node.netns();
        ns.exec_ok(&["nft", "add table ip fy-ct"]);
        ns.exec_ok(&[
            "nft",
            "add chain ip fy-ct pre { type nat hook prerouting priority -100 ; }",
        ]);
        ns.exec_ok(&[
            "nft",
            &format!(
                "add rule ip fy-ct pre ip daddr {} udp dport 53 dnat to {server_ip}:5353",
                vip.ip()
            ),
        ]);
        Bed {
            node,
            client,
            server,
            client_ip,
            server_ip,
            vip,
        }
    }

    fn node_netns(&self) -> Netns {
        Netns::open(self.node.netns().path()).unwrap()
    }
}

#[test]
fn a_udp_flow_is_listed_then_deleted_and_tcp_stays() {
    require_root!();
    let bed = Bed::new("ct-flow");
    let server_addr = SocketAddr::new(bed.server_ip.into(), 5353);
    let _udp = bed.server.udp_server(server_addr);
    let _tcp = bed.server.tcp_server(SocketAddr::new(bed.server_ip.into(), 8080));

    // One UDP socket: one flow through the DNAT. And a TCP connection beside it.
    let sock = bed.client.udp_socket(true).unwrap();
    sock.send_to(b"who am i", bed.vip).unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = sock
        .recv_from(&mut buf)
        .expect("the server answers through the DNAT");
    assert!(String::from_utf8_lossy(&buf[..n]).ends_with(&format!("{server_addr}\n")));
    let client_port = sock.local_addr().unwrap().port();
    let tcp = bed
        .client
        .tcp_connect(SocketAddr::new(bed.server_ip.into(), 8080))
        .expect("a TCP connection to the server");

    // The node's socket is opened inside its netns and used from this thread.
    let mut ct: Socket<Conntrack> = bed.node_netns().run(Socket::<Conntrack>::open).unwrap().unwrap();
    let entries = ct.entries(IpFamily::V4).unwrap();
    let udp = Entry {
        proto: 17,
        orig_src: SocketAddr::new(bed.client_ip.into(), client_port),
        orig_dst: bed.vip,
        reply_src: server_addr,
        zone: 0,
    };
    assert!(entries.contains(&udp), "{udp:?} not in {entries:#?}");
    let tcp_entries = |entries: &[Entry]| {
        entries
            .iter()
            .filter(|e| e.proto == 6 && e.orig_src.ip() == bed.client_ip)
            .count()
    };
    assert_eq!(tcp_entries(&entries), 1, "{entries:#?}");
    // The other family's table is apart.
    assert!(ct
        .entries(IpFamily::V6)
        .unwrap()
        .iter()
        .all(|e| e.orig_src.is_ipv6()));

    assert!(ct.delete(&udp).unwrap(), "the flow was there to delete");
    let after = ct.entries(IpFamily::V4).unwrap();
    assert!(!after.contains(&udp), "{after:#?}");
    assert_eq!(tcp_entries(&after), 1, "TCP is untouched: {after:#?}");
    assert!(!ct.delete(&udp).unwrap(), "deleting it again finds nothing");

    // The same socket sends again: a new entry, still to the server.
    sock.send_to(b"again", bed.vip).unwrap();
    sock.recv_from(&mut buf).expect("the flow is tracked afresh");
    assert!(ct.entries(IpFamily::V4).unwrap().contains(&udp));
    drop(tcp);
}

#[test]
fn entries_are_those_of_the_namespace_the_socket_was_opened_in() {
    require_root!();
    let bed = Bed::new("ct-ns");
    let _udp = bed.server.udp_server(SocketAddr::new(bed.server_ip.into(), 5353));
    bed.client.udp_request(bed.vip).unwrap();
    let in_node = bed
        .node_netns()
        .run(|| Socket::<Conntrack>::open()?.entries(IpFamily::V4))
        .unwrap()
        .unwrap();
    assert!(in_node.iter().any(|e| e.orig_dst == bed.vip), "{in_node:#?}");
    // The client's own table knows nothing of the DNAT (it has no conntrack users).
    let in_client = Netns::open(bed.client.path())
        .unwrap()
        .run(|| Socket::<Conntrack>::open()?.entries(IpFamily::V4))
        .unwrap()
        .unwrap();
    assert!(
        !in_client.iter().any(|e| e.reply_src.port() == 5353),
        "{in_client:#?}"
    );
}
