//! ferry-bridge end to end: the real binary delegating to ferry-ipam (or host-local), run
//! in a testbed node as a runtime runs it, checked with real packets and the kernel's state.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ferry_tests::{
    ferry_bin, reference_plugin, require_root, unique_v4_subnet, unique_v6_subnet, CniCall, Netns, Node, Pod,
};
use serde_json::{json, Value};

fn bridge() -> PathBuf {
    ferry_bin("ferry-bridge")
}

/// One Ferry network on one node: its config, and the calls a runtime makes.
struct Net {
    node: Node,
    conf: Value,
    v4: String,
    v6: String,
}

impl Net {
    /// A dual-stack network with the options in `extra` merged over the defaults.
    fn new(tag: &str, extra: Value) -> Net {
        let node = Node::new(tag);
        let (v4, v6) = (unique_v4_subnet(24), unique_v6_subnet());
        let mut conf = json!({
            "cniVersion": "1.1.0",
            "name": "podnet",
            "type": "ferry-bridge",
            "isGateway": true,
            "isDefaultGateway": true,
            "ipam": {
                "type": "ferry-ipam",
                "ranges": [[{"subnet": v4}], [{"subnet": v6}]],
                "dataDir": node.state_dir().join("ipam"),
            }
        });
        merge(&mut conf, extra);
        Net { node, conf, v4, v6 }
    }

    fn call(&self, verb: &str, pod: &Pod) -> CniCall {
        CniCall::new(bridge(), verb, self.conf.clone()).for_pod(pod)
    }

    fn add(&self, pod: &Pod) -> Value {
        self.call("ADD", pod).run_in(self.node.netns()).ok()
    }

    /// The gateway of the IPv4 subnet (.1).
    fn gw4(&self) -> IpAddr {
        nth(&self.v4, 1)
    }

    fn node(&self) -> &Netns {
        self.node.netns()
    }

    /// What an attachment can leave behind: Ferry's veths, leases, nftables rules. DEL
    /// retires a veth pair and a reaper deletes it moments later: retired pairs still there
    /// after two seconds count as left behind.
    fn leftovers(&self) -> Vec<String> {
        // Host veths are "fy" + 12 hex digits, retired ones "fyr" + 12; the testbed's client
        // links ("fyc0") are shorter.
        let ferry_links = || -> Vec<String> {
            links(self.node())
                .into_iter()
                .filter_map(|l| l["ifname"].as_str().map(str::to_string))
                .filter(|n| n.starts_with("fy") && n.len() >= 14)
                .collect()
        };
        ferry_tests::wait_until(std::time::Duration::from_secs(2), || {
            !ferry_links().iter().any(|n| n.starts_with("fyr"))
        });
        let mut out: Vec<String> = ferry_links()
            .into_iter()
            .map(|n| format!("link \"{n}\""))
            .collect();
        let leases = self.node.state_dir().join("ipam/podnet");
        for e in std::fs::read_dir(leases).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<IpAddr>().is_ok() {
                out.push(format!("lease {name}"));
            }
        }
        out.extend(ferry_rules(self.node()).into_iter().map(|r| format!("rule {r}")));
        out
    }
}

/// Merges `extra` into `base`, key by key (objects recursively).
fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, e) => *b = e,
    }
}

/// The `n`th address of a subnet written as CIDR.
fn nth(cidr: &str, n: u32) -> IpAddr {
    let (ip, _) = cidr.split_once('/').unwrap();
    match ip.parse::<IpAddr>().unwrap() {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) + n).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) + u128::from(n)).into()),
    }
}

fn json_of(ns: &Netns, argv: &[&str]) -> Value {
    let out = ns.exec_ok(argv);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{argv:?} gave no JSON ({e}): {out}"))
}

fn links(ns: &Netns) -> Vec<Value> {
    json_of(ns, &["ip", "-j", "-d", "link", "show"])
        .as_array()
        .unwrap()
        .clone()
}

fn link(ns: &Netns, name: &str) -> Value {
    json_of(ns, &["ip", "-j", "-d", "link", "show", "dev", name])[0].clone()
}

fn addresses(ns: &Netns, dev: &str) -> Vec<String> {
    json_of(ns, &["ip", "-j", "addr", "show", "dev", dev])[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["scope"] == "global")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

/// Rules in Ferry's nftables tables, by comment (or by text when they have none).
fn ferry_rules(ns: &Netns) -> Vec<String> {
    let v = json_of(ns, &["nft", "-j", "list", "ruleset"]);
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r["table"].as_str().is_some_and(|t| t.starts_with("ferry")))
        .map(|r| {
            r.get("comment")
                .and_then(Value::as_str)
                .map_or_else(|| r["expr"].to_string(), str::to_string)
        })
        .collect()
}

/// The Pod's IPv4 address from an ADD result.
fn pod_ip(result: &Value) -> IpAddr {
    let a = result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| !i["address"].as_str().unwrap().contains(':'))
        .unwrap();
    a["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn sock(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

#[test]
fn one_pod_gets_bridge_veth_addresses_routes_and_reaches_everything() {
    require_root!();
    let net = Net::new("br-one", json!({"ipMasq": true}));
    let client = net.node.client("client");
    net.node
        .connect_client(&client, "203.0.113.2/24", "203.0.113.1/24");
    let (a, b) = (net.node.pod("a"), net.node.pod("b"));

    let ra = net.add(&a);
    // The result: bridge, host veth, container interface, and the address on the latter.
    let ifaces = ra["interfaces"].as_array().unwrap();
    assert_eq!(ifaces[0]["name"], "cni0");
    assert_eq!(ifaces[2]["name"], "eth0");
    assert_eq!(ifaces[2]["sandbox"], a.path().display().to_string());
    assert_eq!(ra["ips"][0]["interface"], 2);
    let host_veth = ifaces[1]["name"].as_str().unwrap().to_string();

    // The node: cni0 with the gateway addresses; the host veth a port of cni0, hairpin on.
    let gw4 = net.gw4();
    let bridge_addrs = addresses(net.node(), "cni0");
    assert!(bridge_addrs.contains(&format!("{gw4}/24")), "{bridge_addrs:?}");
    assert!(
        bridge_addrs.contains(&format!("{}/64", nth(&net.v6, 1))),
        "{bridge_addrs:?}"
    );
    let port = link(net.node(), &host_veth);
    assert_eq!(port["master"], "cni0");
    assert_eq!(port["linkinfo"]["info_slave_data"]["hairpin"], true, "{port}");
    assert_eq!(port["operstate"], "UP");

    // The Pod: eth0 with its address, a default route via the gateway, the gateway answers.
    let ip_a = pod_ip(&ra);
    assert!(addresses(&a, "eth0").contains(&format!("{ip_a}/24")));
    let routes = json_of(&a, &["ip", "-j", "route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], gw4.to_string(), "{routes}");
    a.exec_ok(&["ping", "-c", "1", "-W", "2", &gw4.to_string()]);

    // Two pods talk over TCP, and see each other's own address.
    let rb = net.add(&b);
    let ip_b = pod_ip(&rb);
    let _server = a.tcp_server(sock(ip_a, 8080));
    let seen = b.tcp_request(sock(ip_a, 8080)).unwrap();
    assert!(seen.starts_with(&format!("{ip_b}:")), "{seen}");

    // With ipMasq the outside world sees the node's address.
    let _outside = client.tcp_server("203.0.113.2:9000".parse().unwrap());
    let seen = a.tcp_request("203.0.113.2:9000".parse().unwrap()).unwrap();
    assert!(
        seen.starts_with("203.0.113.1:"),
        "masquerade: the server saw {seen}"
    );
}

#[test]
fn a_host_port_is_reachable_from_outside_the_node() {
    require_root!();
    let net = Net::new("br-hostport", json!({"ipMasq": true}));
    let client = net.node.client("client");
    net.node
        .connect_client(&client, "203.0.113.2/24", "203.0.113.1/24");
    let web = net.node.pod("web");
    let mut conf = net.conf.clone();
    conf["runtimeConfig"] = json!({"portMappings": [
        {"hostPort": 8081, "containerPort": 80, "protocol": "tcp"},
        {"HostPort": 5353, "ContainerPort": 53, "Protocol": "udp"}
    ]});
    let r = CniCall::new(bridge(), "ADD", conf.clone())
        .for_pod(&web)
        .run_in(net.node())
        .ok();
    let ip = pod_ip(&r);
    let _tcp = web.tcp_server(sock(ip, 80));
    let _udp = web.udp_server(sock(ip, 53));
    let seen = client.tcp_request("203.0.113.1:8081".parse().unwrap()).unwrap();
    assert!(
        seen.starts_with("203.0.113.2:"),
        "the pod sees the client: {seen}"
    );
    let seen = client.udp_request("203.0.113.1:5353".parse().unwrap()).unwrap();
    assert!(seen.starts_with("203.0.113.2:"), "{seen}");

    // DEL removes exactly these rules: the port is closed afterwards.
    CniCall::new(bridge(), "DEL", conf)
        .for_pod(&web)
        .run_in(net.node())
        .ok();
    assert!(client.tcp_request("203.0.113.1:8081".parse().unwrap()).is_err());
    assert_eq!(net.leftovers(), Vec::<String>::new());
}

#[test]
fn fifty_pods_in_parallel_then_all_deleted_leave_nothing() {
    require_root!();
    let net = Net::new("br-fifty", json!({"ipMasq": true}));
    let pods: Vec<Pod> = (0..50).map(|i| net.node.pod(&format!("p{i}"))).collect();
    let children: Vec<_> = pods
        .iter()
        .map(|p| net.call("ADD", p).spawn_in(net.node()))
        .collect();
    let results: Vec<Value> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "parallel ADD failed: {stdout}");
            serde_json::from_str(&stdout).unwrap()
        })
        .collect();
    let ips: Vec<IpAddr> = results.iter().map(pod_ip).collect();
    let distinct: std::collections::HashSet<_> = ips.iter().collect();
    assert_eq!(distinct.len(), 50, "addresses handed out twice");

    // Sample pairs over TCP: each of 10 servers reached from a pod 7 positions away.
    for i in (0..50).step_by(5) {
        let j = (i + 7) % 50;
        let _s = pods[i].tcp_server(sock(ips[i], 7000));
        let seen = pods[j]
            .tcp_request(sock(ips[i], 7000))
            .unwrap_or_else(|e| panic!("pod {j} -> pod {i}: {e}"));
        assert!(seen.starts_with(&format!("{}:", ips[j])), "{seen}");
    }

    let children: Vec<_> = pods
        .iter()
        .map(|p| net.call("DEL", p).spawn_in(net.node()))
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "parallel DEL failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(net.leftovers(), Vec::<String>::new());
}

#[test]
fn del_succeeds_and_leaves_nothing_without_netns_twice_and_with_empty_netns() {
    require_root!();
    let net = Net::new("br-del", json!({"ipMasq": true, "macspoofchk": true}));
    // The netns is deleted before DEL.
    let gone = net.node.pod("gone");
    let id = gone.container_id();
    let path = gone.path();
    net.add(&gone);
    drop(gone);
    assert!(!path.exists());
    let del = |id: &str, netns: Option<&Path>| {
        CniCall::new(bridge(), "DEL", net.conf.clone())
            .container_id(id)
            .netns(netns)
            .run_in(net.node())
            .ok()
    };
    del(&id, Some(&path));
    assert_eq!(net.leftovers(), Vec::<String>::new());
    // Twice, and with an empty CNI_NETNS (containerd's second DEL).
    let pod = net.node.pod("twice");
    net.add(&pod);
    del(&pod.container_id(), Some(&pod.path()));
    del(&pod.container_id(), Some(&pod.path()));
    del(&pod.container_id(), None);
    assert_eq!(net.leftovers(), Vec::<String>::new());
    // Only the empty CNI_NETNS, the Pod still alive: everything goes too.
    let pod = net.node.pod("empty");
    net.add(&pod);
    del(&pod.container_id(), None);
    assert_eq!(net.leftovers(), Vec::<String>::new());
    assert!(
        links(&pod).iter().all(|l| l["ifname"] != "eth0"),
        "the Pod's end goes with the pair"
    );
}

#[test]
fn check_passes_then_names_an_address_removed_by_hand() {
    require_root!();
    let net = Net::new("br-check", json!({}));
    let pod = net.node.pod("pod");
    let result = net.add(&pod);
    let mut conf = net.conf.clone();
    conf["prevResult"] = result.clone();
    let check = || {
        CniCall::new(bridge(), "CHECK", conf.clone())
            .for_pod(&pod)
            .run_in(net.node())
    };
    assert_eq!(check().ok(), Value::Null);
    let ip = format!("{}/24", pod_ip(&result));
    pod.exec_ok(&["ip", "addr", "del", &ip, "dev", "eth0"]);
    let (code, msg, _) = check().err();
    assert_eq!(code, 110);
    assert!(msg.contains(&ip), "CHECK should name {ip}: {msg}");
}

#[test]
fn results_parse_as_each_version() {
    require_root!();
    for version in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let net = Net::new("br-ver", json!({"cniVersion": version, "mtu": 1400}));
        let pod = net.node.pod("pod");
        let r = net.add(&pod);
        assert_eq!(r["cniVersion"], version);
        let ips = r["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 2);
        for ip in ips {
            assert_eq!(
                ip.get("version").is_some(),
                version.starts_with("0."),
                "{version}: {ip}"
            );
            assert_eq!(ip["interface"], 2);
        }
        // Interface mtu is a 1.1.0 field.
        let mtu = r["interfaces"][2].get("mtu");
        assert_eq!(mtu.is_some(), version == "1.1.0", "{version}: {r}");
        // And a reference parser of that version reads it: Debian's host-local takes a
        // prevResult of the config's version in CHECK; here we check our own reader.
        let mut conf = net.conf.clone();
        conf["prevResult"] = r.clone();
        if version != "0.3.1" {
            assert_eq!(
                CniCall::new(bridge(), "CHECK", conf)
                    .for_pod(&pod)
                    .run_in(net.node())
                    .ok(),
                Value::Null
            );
        }
    }
}

#[test]
fn debians_host_local_works_as_the_ipam_plugin() {
    require_root!();
    let host_local =
        reference_plugin("host-local").expect("install containernetworking-plugins (scripts/setup.sh)");
    // Debian's host-local (1.1.1) speaks CNI up to 1.0.0.
    let net = Net::new(
        "br-hostlocal",
        json!({"cniVersion": "1.0.0", "ipam": {"type": "host-local"}}),
    );
    let pod = net.node.pod("pod");
    let out = net
        .call("ADD", &pod)
        .cni_path(format!(
            "{}:{}",
            ferry_bin("ferry-ipam").parent().unwrap().display(),
            host_local.parent().unwrap().display()
        ))
        .run_in(net.node());
    let r = out.ok();
    assert!(addresses(&pod, "eth0").contains(&format!("{}/24", pod_ip(&r))));
    pod.exec_ok(&["ping", "-c", "1", "-W", "2", &net.gw4().to_string()]);
}

#[test]
fn bad_input_gets_a_spec_code_and_leaves_nothing_behind() {
    require_root!();
    let net = Net::new("br-bad", json!({"ipMasq": true}));
    let pod = net.node.pod("pod");
    let with = |extra: Value| {
        let mut c = net.conf.clone();
        merge(&mut c, extra);
        c
    };
    // An eth0 already in the Pod.
    let taken = net.node.pod("taken");
    taken.exec_ok(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
    // A /30 network has room for one Pod (.2): the second ADD fails in IPAM.
    let tiny = json!({"ipam": {"ranges": [[{"subnet": "10.250.0.0/30"}]]}});
    let filler = net.node.pod("filler");
    CniCall::new(bridge(), "ADD", with(tiny.clone()))
        .for_pod(&filler)
        .run_in(net.node())
        .ok();
    let before = net.leftovers();

    let cases: Vec<(&str, CniCall, u64, &str)> = vec![
        (
            "bridge name too long",
            CniCall::new(
                bridge(),
                "ADD",
                with(json!({"bridge": "a-very-long-bridge-name"})),
            )
            .for_pod(&pod),
            7,
            "bridge",
        ),
        (
            "netns path missing",
            CniCall::new(bridge(), "ADD", net.conf.clone())
                .container_id("c1")
                .netns(Some(Path::new("/run/netns/nope"))),
            4,
            "CNI_NETNS",
        ),
        (
            "ifname taken",
            CniCall::new(bridge(), "ADD", net.conf.clone()).for_pod(&taken),
            4,
            "CNI_IFNAME eth0",
        ),
        (
            "IPAM plugin not on CNI_PATH",
            CniCall::new(bridge(), "ADD", with(json!({"ipam": {"type": "no-such-ipam"}}))).for_pod(&pod),
            7,
            "no-such-ipam",
        ),
        (
            "IPAM failing",
            CniCall::new(bridge(), "ADD", with(tiny)).for_pod(&pod),
            100,
            "ferry-ipam: no free address",
        ),
        (
            "unknown option",
            CniCall::new(bridge(), "ADD", with(json!({"isGateWay": true}))).for_pod(&pod),
            2,
            "isGateWay",
        ),
        (
            "hairpin and promisc",
            CniCall::new(
                bridge(),
                "ADD",
                with(json!({"hairpinMode": true, "promiscMode": true})),
            )
            .for_pod(&pod),
            7,
            "hairpinMode",
        ),
        (
            "bad MAC",
            CniCall::new(
                bridge(),
                "ADD",
                with(json!({"runtimeConfig": {"mac": "01:00:5e:00:00:01"}})),
            )
            .for_pod(&pod),
            7,
            "runtimeConfig.mac",
        ),
    ];
    for (what, call, code, needle) in cases {
        let out = call.run_in(net.node());
        let (got, msg, _) = out.err();
        assert_eq!(got, code, "{what}: wrong code\n{out}");
        assert!(
            msg.contains(needle),
            "{what}: the message should name {needle:?}\n{out}"
        );
        assert_eq!(net.leftovers(), before, "{what}: something was left behind");
        assert!(
            links(&pod).iter().all(|l| l["ifname"] != "eth0"),
            "{what}: eth0 left in the Pod"
        );
    }
}

// ---- Each option, shown by its observable effect ----

#[test]
fn mtu_applies_to_the_bridge_and_both_ends() {
    require_root!();
    let net = Net::new("br-mtu", json!({"mtu": 1400}));
    let pod = net.node.pod("pod");
    let r = net.add(&pod);
    assert_eq!(link(&pod, "eth0")["mtu"], 1400);
    assert_eq!(
        link(net.node(), r["interfaces"][1]["name"].as_str().unwrap())["mtu"],
        1400
    );
    assert_eq!(link(net.node(), "cni0")["mtu"], 1400);
}

#[test]
fn without_is_default_gateway_there_is_no_default_route() {
    require_root!();
    let net = Net::new("br-nodefgw", json!({"isDefaultGateway": false}));
    let pod = net.node.pod("pod");
    net.add(&pod);
    assert_eq!(
        json_of(&pod, &["ip", "-j", "route", "show", "default"]),
        json!([])
    );
    // The subnet is still reachable: the gateway answers.
    pod.exec_ok(&["ping", "-c", "1", "-W", "2", &net.gw4().to_string()]);
}

#[test]
fn promisc_mode_makes_the_bridge_promiscuous_and_hairpin_off_by_default() {
    require_root!();
    let net = Net::new("br-promisc", json!({"promiscMode": true}));
    let pod = net.node.pod("pod");
    let r = net.add(&pod);
    let flags = link(net.node(), "cni0")["flags"].clone();
    assert!(flags.as_array().unwrap().contains(&json!("PROMISC")), "{flags}");
    let port = link(net.node(), r["interfaces"][1]["name"].as_str().unwrap());
    assert_eq!(port["linkinfo"]["info_slave_data"]["hairpin"], false);
}

#[test]
fn hairpin_mode_false_turns_it_off() {
    require_root!();
    let net = Net::new("br-nohairpin", json!({"hairpinMode": false}));
    let pod = net.node.pod("pod");
    let r = net.add(&pod);
    let port = link(net.node(), r["interfaces"][1]["name"].as_str().unwrap());
    assert_eq!(port["linkinfo"]["info_slave_data"]["hairpin"], false);
}

#[test]
fn port_isolation_blocks_pod_to_pod_but_not_the_gateway() {
    require_root!();
    let net = Net::new("br-isolated", json!({"portIsolation": true}));
    let (a, b) = (net.node.pod("a"), net.node.pod("b"));
    let ra = net.add(&a);
    net.add(&b);
    let ip_a = pod_ip(&ra);
    let _s = a.tcp_server(sock(ip_a, 8080));
    assert!(
        b.tcp_request(sock(ip_a, 8080)).is_err(),
        "isolated ports must not reach each other"
    );
    b.exec_ok(&["ping", "-c", "1", "-W", "2", &net.gw4().to_string()]);
    let port = link(net.node(), ra["interfaces"][1]["name"].as_str().unwrap());
    assert_eq!(port["linkinfo"]["info_slave_data"]["isolated"], true);
}

#[test]
fn disable_container_interface_leaves_it_down() {
    require_root!();
    let node = Node::new("br-down");
    let conf = json!({"cniVersion": "1.1.0", "name": "l2", "type": "ferry-bridge", "disableContainerInterface": true});
    let pod = node.pod("pod");
    CniCall::new(bridge(), "ADD", conf)
        .for_pod(&pod)
        .run_in(node.netns())
        .ok();
    let eth0 = link(&pod, "eth0");
    assert!(
        !eth0["flags"].as_array().unwrap().contains(&json!("UP")),
        "{eth0}"
    );
}

/// Whether this kernel has bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING).
fn kernel_has_vlan_filtering(ns: &Netns) -> bool {
    let ok = ns
        .exec(&[
            "ip",
            "link",
            "add",
            "fyprobe",
            "type",
            "bridge",
            "vlan_filtering",
            "1",
        ])
        .status
        .success();
    if ok {
        ns.exec_ok(&["ip", "link", "del", "fyprobe"]);
    }
    ok
}

/// Without kernel support, a VLAN option is refused with code 2 naming it, and nothing
/// is left behind; returns false then, so the caller skips the behaviour checks.
fn vlans_supported_or_refused(node: &Node, conf: &Value) -> bool {
    if kernel_has_vlan_filtering(node.netns()) {
        return true;
    }
    eprintln!(
        "this kernel has no bridge VLAN filtering: checking that ferry-bridge refuses VLAN options clearly"
    );
    let pod = node.pod("novlan");
    let (code, msg, _) = CniCall::new(bridge(), "ADD", conf.clone())
        .for_pod(&pod)
        .run_in(node.netns())
        .err();
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("vlan") && msg.contains("VLAN filtering"), "{msg}");
    assert!(
        links(node.netns())
            .iter()
            .all(|l| !l["ifname"].as_str().unwrap().starts_with("fy")),
        "a veth was left"
    );
    false
}

#[test]
fn vlans_separate_pods_on_one_bridge() {
    require_root!();
    // Layer 2 only: static addresses set by hand, so the VLANs alone decide who talks.
    let node = Node::new("br-vlan");
    let conf = |vlan: u32| json!({"cniVersion": "1.1.0", "name": "l2", "type": "ferry-bridge", "vlan": vlan});
    if !vlans_supported_or_refused(&node, &conf(100)) {
        return;
    }
    let pods: Vec<Pod> = ["a", "b", "c"].iter().map(|t| node.pod(t)).collect();
    for (pod, (vlan, ip)) in pods.iter().zip([
        (100, "10.199.0.1/24"),
        (100, "10.199.0.2/24"),
        (200, "10.199.0.3/24"),
    ]) {
        CniCall::new(bridge(), "ADD", conf(vlan))
            .for_pod(pod)
            .run_in(node.netns())
            .ok();
        pod.exec_ok(&["ip", "addr", "add", ip, "dev", "eth0"]);
    }
    let _s = pods[0].tcp_server("10.199.0.1:8080".parse().unwrap());
    assert!(
        pods[1].tcp_request("10.199.0.1:8080".parse().unwrap()).is_ok(),
        "same VLAN"
    );
    assert!(
        pods[2].tcp_request("10.199.0.1:8080".parse().unwrap()).is_err(),
        "another VLAN"
    );
    assert_eq!(
        link(node.netns(), "cni0")["linkinfo"]["info_data"]["vlan_filtering"],
        1
    );
}

#[test]
fn vlan_trunk_puts_tagged_vlans_on_the_port() {
    require_root!();
    let node = Node::new("br-trunk");
    let conf = json!({"cniVersion": "1.1.0", "name": "l2", "type": "ferry-bridge",
        "vlanTrunk": [{"id": 10}, {"minID": 20, "maxID": 22}]});
    if !vlans_supported_or_refused(&node, &conf) {
        return;
    }
    let pod = node.pod("pod");
    let r = CniCall::new(bridge(), "ADD", conf)
        .for_pod(&pod)
        .run_in(node.netns())
        .ok();
    let port = r["interfaces"][1]["name"].as_str().unwrap().to_string();
    let vlans = json_of(node.netns(), &["bridge", "-j", "vlan", "show", "dev", &port]);
    let ids: Vec<u64> = vlans[0]["vlans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vlan"].as_u64().unwrap())
        .collect();
    // 20-22 may be shown as one range entry with vlanEnd.
    assert!(ids.contains(&10) && ids.contains(&20), "{vlans}");
    assert!(
        !ids.contains(&1),
        "the default VLAN is removed unless preserveDefaultVlan: {vlans}"
    );
}

#[test]
fn force_address_replaces_a_wrong_gateway_address_on_the_bridge() {
    require_root!();
    let net = Net::new("br-force", json!({}));
    net.node()
        .exec_ok(&["ip", "link", "add", "cni0", "type", "bridge"]);
    let wrong = format!("{}/24", nth(&net.v4, 99));
    net.node().exec_ok(&["ip", "addr", "add", &wrong, "dev", "cni0"]);
    let pod = net.node.pod("pod");
    let (code, msg, _) = net.call("ADD", &pod).run_in(net.node()).err();
    assert_eq!(code, 7);
    assert!(
        msg.contains(&wrong),
        "the message names the address in the way: {msg}"
    );
    assert_eq!(
        net.leftovers(),
        Vec::<String>::new(),
        "a refused ADD leaves nothing"
    );
    let mut conf = net.conf.clone();
    conf["forceAddress"] = json!(true);
    CniCall::new(bridge(), "ADD", conf)
        .for_pod(&pod)
        .run_in(net.node())
        .ok();
    let have = addresses(net.node(), "cni0");
    assert!(
        have.contains(&format!("{}/24", net.gw4())) && !have.contains(&wrong),
        "{have:?}"
    );
}

#[test]
fn enabledad_controls_duplicate_address_detection_in_the_pod() {
    require_root!();
    for (dad, want) in [(false, "0"), (true, "1")] {
        let net = Net::new("br-dad", json!({"enabledad": dad}));
        let pod = net.node.pod("pod");
        net.add(&pod);
        let got = pod.exec_ok(&["cat", "/proc/sys/net/ipv6/conf/eth0/accept_dad"]);
        assert_eq!(got.trim(), want, "enabledad {dad}");
    }
}

#[test]
fn macspoofchk_drops_frames_from_a_spoofed_source_mac() {
    require_root!();
    let net = Net::new("br-spoof", json!({"macspoofchk": true}));
    let (a, b) = (net.node.pod("a"), net.node.pod("b"));
    let ra = net.add(&a);
    net.add(&b);
    let ip_a = pod_ip(&ra);
    let _s = a.tcp_server(sock(ip_a, 8080));
    assert!(b.tcp_request(sock(ip_a, 8080)).is_ok(), "before spoofing");
    b.exec_ok(&["ip", "link", "set", "eth0", "address", "02:00:00:00:be:ef"]);
    b.exec_ok(&["ip", "neigh", "flush", "all"]);
    a.exec_ok(&["ip", "neigh", "flush", "all"]);
    assert!(
        b.tcp_request(sock(ip_a, 8080)).is_err(),
        "a spoofed source MAC must be dropped"
    );
}

#[test]
fn gc_removes_the_veths_rules_and_leases_of_attachments_not_in_the_list() {
    require_root!();
    let net = Net::new("br-gc", json!({"ipMasq": true, "macspoofchk": true}));
    let pods: Vec<Pod> = ["keep", "stale1", "stale2"]
        .iter()
        .map(|t| net.node.pod(t))
        .collect();
    let results: Vec<Value> = pods.iter().map(|p| net.add(p)).collect();
    let mut gc = net.conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": pods[0].container_id(), "ifname": "eth0"}]);
    CniCall::new(bridge(), "GC", gc).run_in(net.node()).ok();

    // What is left is exactly the kept attachment's: its veth, its two leases, its rules.
    let left = net.leftovers();
    let keep_veth = results[0]["interfaces"][1]["name"].as_str().unwrap();
    assert!(left.contains(&format!("link \"{keep_veth}\"")), "{left:?}");
    for r in &results[1..] {
        let veth = r["interfaces"][1]["name"].as_str().unwrap();
        assert!(
            !left.iter().any(|l| l.contains(veth)),
            "{veth} survived GC: {left:?}"
        );
        assert!(!left.contains(&format!("lease {}", pod_ip(r))), "{left:?}");
    }
    assert_eq!(
        left.iter().filter(|l| l.starts_with("lease")).count(),
        2,
        "{left:?}"
    );
    let rules: Vec<&String> = left.iter().filter(|l| l.starts_with("rule")).collect();
    assert!(
        !rules.is_empty() && rules.iter().all(|r| r.contains(&pods[0].container_id())),
        "{rules:?}"
    );
    // And the kept Pod still works.
    pods[0].exec_ok(&["ping", "-c", "1", "-W", "2", &net.gw4().to_string()]);
}

#[test]
fn status_reports_what_the_ipam_plugin_reports() {
    require_root!();
    let net = Net::new(
        "br-status",
        json!({"ipam": {"ranges": [[{"subnet": "10.251.0.0/30"}]]}}),
    );
    let status = || CniCall::new(bridge(), "STATUS", net.conf.clone()).run_in(net.node());
    assert_eq!(status().ok(), Value::Null);
    net.add(&net.node.pod("only"));
    let (code, msg, _) = status().err();
    assert_eq!(code, 50);
    assert!(
        msg.contains("ferry-ipam") && msg.contains("no free address"),
        "{msg}"
    );
}

#[test]
fn del_frees_the_names_at_once_so_the_same_attachment_can_be_added_again() {
    require_root!();
    let net = Net::new("br-readd", json!({"ipMasq": true}));
    let pod = net.node.pod("pod");
    for _ in 0..3 {
        let r = net.add(&pod);
        let veth = r["interfaces"][1]["name"].as_str().unwrap().to_string();
        net.node()
            .exec_ok(&["ping", "-c", "1", "-W", "2", &pod_ip(&r).to_string()]);
        net.call("DEL", &pod).run_in(net.node()).ok();
        // The names are free the moment DEL returns: eth0 in the Pod, the veth on the node.
        assert!(links(&pod).iter().all(|l| l["ifname"] != "eth0"));
        assert!(links(net.node()).iter().all(|l| l["ifname"] != veth.as_str()));
    }
    assert_eq!(
        net.leftovers(),
        Vec::<String>::new(),
        "the retired pairs are deleted"
    );
}

#[test]
fn gc_deletes_a_retired_pair_whose_reaper_never_ran() {
    require_root!();
    let net = Net::new("br-reaper", json!({}));
    // What a DEL whose reaper was killed leaves: a retired pair on the node.
    net.node().exec_ok(&[
        "ip",
        "link",
        "add",
        "fyr0123456789ab",
        "type",
        "veth",
        "peer",
        "name",
        "fyr-peer",
    ]);
    net.node().exec_ok(&[
        "ip",
        "link",
        "set",
        "fyr0123456789ab",
        "alias",
        "ferry-bridge:retired",
    ]);
    let mut gc = net.conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    CniCall::new(bridge(), "GC", gc).run_in(net.node()).ok();
    assert!(links(net.node()).iter().all(|l| l["ifname"] != "fyr0123456789ab"));
}
