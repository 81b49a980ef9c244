use super::*;

fn node(name: &str, cidrs: &[&str], ips: &[&str]) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        being_deleted: false,
        to_be_deleted: false,
        pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        internal_ips: ips.iter().map(|c| c.parse().unwrap()).collect(),
    }
}

fn settings(mode: Mode) -> NetworkSettings {
    NetworkSettings {
        node_name: "a".into(),
        mode,
        cni_conf_dir: Some("/etc/cni/net.d".into()),
        ipam_data_dir: "/var/lib/cni/networks".into(),
        bridge: "cni0".into(),
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        vni: DEFAULT_VNI,
        vxlan_port: DEFAULT_VXLAN_PORT,
    }
}

fn host(addrs: &[&str]) -> HostFacts {
    HostFacts {
        addresses: addrs
            .iter()
            .map(|a| HostAddress {
                net: a.parse().unwrap(),
                link: 2,
                mtu: 1500,
            })
            .collect(),
    }
}

fn cluster() -> Vec<NodeInfo> {
    vec![
        node(
            "a",
            &["10.244.0.0/24", "fd00:10:244::/64"],
            &["192.168.1.1", "fd00:1::1"],
        ),
        // Same subnet as a.
        node(
            "b",
            &["10.244.1.0/24", "fd00:10:244:1::/64"],
            &["192.168.1.2", "fd00:1::2"],
        ),
        // Behind a router: another subnet.
        node("c", &["10.244.2.0/24"], &["192.168.2.3"]),
    ]
}

#[test]
fn auto_routes_same_subnet_peers_directly_and_others_over_vxlan() {
    let nodes = cluster();
    let net = plan(
        &settings(Mode::Auto),
        &nodes,
        &host(&["192.168.1.1/24", "fd00:1::1/64"]),
    );
    let via = |c: &str| net.routes[&c.parse::<IpNetwork>().unwrap()].via;
    assert_eq!(via("10.244.1.0/24"), Via::Direct("192.168.1.2".parse().unwrap()));
    assert_eq!(
        via("fd00:10:244:1::/64"),
        Via::Direct("fd00:1::2".parse().unwrap())
    );
    assert_eq!(
        via("10.244.2.0/24"),
        Via::Vxlan {
            gateway: "10.244.2.1".parse().unwrap(),
            mac: [0x0e, 0xfe, 192, 168, 2, 3],
            remote: "192.168.2.3".parse().unwrap()
        }
    );
    assert_eq!(net.routes.len(), 3, "no route to this node's own CIDRs");
    let dev = net.vxlan.unwrap();
    assert_eq!((dev.vni, dev.port, dev.mtu), (1, 8472, 1450));
    assert_eq!(dev.mac, vtep_mac("192.168.1.1".parse().unwrap()));
    assert!(net.unreachable.is_empty(), "{:?}", net.unreachable);
}

#[test]
fn auto_makes_no_tunnel_while_every_peer_shares_a_subnet() {
    let mut nodes = cluster();
    nodes.truncate(2);
    let net = plan(
        &settings(Mode::Auto),
        &nodes,
        &host(&["192.168.1.1/24", "fd00:1::1/64"]),
    );
    assert!(net.routes.values().all(|r| matches!(r.via, Via::Direct(_))));
    assert!(net.vxlan.is_none());
    // The Pods' MTU leaves room for a tunnel all the same: a VXLAN peer may join later.
    assert!(net.conflist.unwrap().contains("\"mtu\": 1450"));
}

#[test]
fn host_gw_leaves_out_peers_it_cannot_reach_and_says_why() {
    let nodes = cluster();
    let net = plan(&settings(Mode::HostGw), &nodes, &host(&["192.168.1.1/24"]));
    assert!(net.vxlan.is_none());
    // b's v6 address is on no subnet of this host either.
    assert_eq!(
        net.routes.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
        ["10.244.1.0/24"]
    );
    assert_eq!(net.unreachable.len(), 2, "{:?}", net.unreachable);
    assert!(net.unreachable[1].contains("use --pod-network-mode auto or vxlan"));
    // The full MTU: host-gw adds no header.
    assert!(!net.conflist.unwrap().contains("\"mtu\""));
}

#[test]
fn vxlan_sends_every_peer_through_the_tunnel_with_a_lower_pod_mtu() {
    let nodes = cluster();
    let net = plan(&settings(Mode::Vxlan), &nodes, &host(&["192.168.1.1/24"]));
    assert!(net.routes.values().all(|r| matches!(r.via, Via::Vxlan { .. })));
    // b's IPv6 Pod CIDR rides the IPv4 underlay too.
    assert_eq!(net.routes.len(), 3);
    let conf: serde_json::Value = serde_json::from_str(net.conflist.as_ref().unwrap()).unwrap();
    assert_eq!(conf["plugins"][0]["mtu"], 1450);
}

#[test]
fn nothing_without_pod_cidrs_or_in_mode_none() {
    let mut nodes = cluster();
    assert_eq!(
        plan(&settings(Mode::None), &nodes, &host(&["192.168.1.1/24"])),
        NodeNetwork::default()
    );
    nodes[0].pod_cidrs.clear();
    assert_eq!(
        plan(&settings(Mode::Auto), &nodes, &host(&["192.168.1.1/24"])),
        NodeNetwork::default()
    );
}

#[test]
fn the_conflist_has_a_range_set_per_pod_cidr_and_no_bridge_masquerade() {
    let nodes = cluster();
    let net = plan(&settings(Mode::HostGw), &nodes, &host(&["192.168.1.1/24"]));
    let text = net.conflist.unwrap();
    let conf: serde_json::Value = serde_json::from_str(&text).unwrap();
    let bridge = &conf["plugins"][0];
    assert_eq!(bridge["type"], "ferry-bridge");
    assert_eq!(bridge["ipMasq"], false);
    assert_eq!(bridge["ipam"]["type"], "ferry-ipam");
    assert_eq!(
        bridge["ipam"]["ranges"],
        serde_json::json!([[{"subnet": "10.244.0.0/24"}], [{"subnet": "fd00:10:244::/64"}]])
    );
    assert_eq!(bridge["ipam"]["dataDir"], "/var/lib/cni/networks");
    // Same inputs, same bytes: the file is rewritten only when something changed.
    let again = plan(&settings(Mode::HostGw), &nodes, &host(&["192.168.1.1/24"]));
    assert_eq!(again.conflist.unwrap(), text);
}

#[test]
fn masquerade_exempts_the_cluster_cidr_or_every_nodes_pod_cidrs() {
    let nodes = cluster();
    let net = plan(&settings(Mode::Auto), &nodes, &host(&["192.168.1.1/24"]));
    assert_eq!(
        masquerade::text(&net.masquerade),
        [
            "ip saddr 10.244.0.0/24 ip daddr != 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade",
            // No IPv6 --cluster-cidr: every node's IPv6 Pod CIDR is the cluster.
            "ip6 saddr fd00:10:244::/64 ip6 daddr != fd00:10:244::/64 ip6 daddr != fd00:10:244:1::/64 \
             ip6 daddr != ff00::/8 masquerade",
        ]
    );
    let from = "10.244.0.5".parse().unwrap();
    assert!(masquerade::exempts(
        &net.masquerade,
        from,
        "10.244.2.7".parse().unwrap()
    ));
    assert!(!masquerade::exempts(
        &net.masquerade,
        from,
        "203.0.113.1".parse().unwrap()
    ));
}

#[test]
fn overlapping_pod_cidrs_get_no_route() {
    let mut nodes = cluster();
    nodes[1].pod_cidrs = vec!["10.244.0.128/25".parse().unwrap()];
    let net = plan(&settings(Mode::Auto), &nodes, &host(&["192.168.1.1/24"]));
    assert!(!net.routes.keys().any(|k| k.to_string() == "10.244.0.128/25"));
    assert!(net.unreachable.iter().any(|u| u.contains("overlaps")));
}

#[test]
fn node_objects_give_pod_cidrs_and_internal_ips() {
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "b"},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.7/24", "fd00:10:244:1::/64", "nonsense"]},
        "status": {"addresses": [{"type": "Hostname", "address": "b"},
                                 {"type": "InternalIP", "address": "192.168.1.2"},
                                 {"type": "ExternalIP", "address": "203.0.113.2"},
                                 {"type": "InternalIP", "address": "fd00:1::2"}]}
    }))
    .unwrap();
    let info = NodeInfo::from(node);
    assert_eq!(
        info.pod_cidrs,
        [
            "10.244.1.0/24".parse().unwrap(),
            "fd00:10:244:1::/64".parse::<IpNetwork>().unwrap()
        ]
    );
    assert_eq!(
        info.internal_ips,
        [
            "192.168.1.2".parse::<IpAddr>().unwrap(),
            "fd00:1::2".parse().unwrap()
        ]
    );
}
