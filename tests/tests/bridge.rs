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

// ---- Hostile input and killed calls (issue 10) ----

/// Everything on the node a call could change: links (kind, bridge, alias, flags), their
/// addresses, the nftables ruleset, and every file below the node's state directory (leases,
/// locks, indexes) with its size. A rejected call leaves this exactly as it was.
fn node_state(node: &Node) -> Vec<String> {
    let ns = node.netns();
    // A DEL's reaper deletes a retired pair moments after the DEL returned.
    ferry_tests::wait_until(std::time::Duration::from_secs(2), || {
        !links(ns)
            .iter()
            .any(|l| l["ifname"].as_str().is_some_and(|n| n.starts_with("fyr")))
    });
    let mut out: Vec<String> = links(ns)
        .iter()
        .map(|l| {
            // Administratively up or not; carrier comes and goes with the ports.
            let up = l["flags"].as_array().unwrap().contains(&json!("UP"));
            format!(
                "link {} kind={} master={} alias={} up={up}",
                l["ifname"], l["linkinfo"]["info_kind"], l["master"], l["ifalias"]
            )
        })
        .collect();
    for l in json_of(ns, &["ip", "-j", "addr", "show"]).as_array().unwrap() {
        for a in l["addr_info"].as_array().unwrap() {
            out.push(format!("addr {} {}/{}", l["ifname"], a["local"], a["prefixlen"]));
        }
    }
    out.extend(
        ns.exec_ok(&["nft", "list", "ruleset"])
            .lines()
            .map(|l| format!("nft {l}")),
    );
    fn files(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let (p, meta) = (e.path(), e.metadata().unwrap());
            out.push(format!("file {} {}", p.display(), meta.len()));
            if meta.is_dir() {
                files(&p, out);
            }
        }
    }
    files(node.state_dir(), &mut out);
    out.sort();
    out
}

/// Processes in process group `pgid`, whoever their parent is now.
fn group_members(pgid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after "(comm)": state, ppid, pgrp.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            rest.split_whitespace().nth(2) == Some(pgid.to_string().as_str())
        })
        .collect()
}

/// Starts `call` in `ns` as the leader of a process group of its own, so that what it
/// starts (the IPAM plugin, the reaper) can be found and waited for after it is killed.
fn spawn_in_group(call: &CniCall, plugin: &Path, conf: &Value, ns: &Netns) -> std::process::Child {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let mut cmd = ns.command(plugin);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.envs(call.env())
        .process_group(0)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(conf).unwrap());
    child
}

/// Runs `call` to its end, or kills its whole process group after `limit` and fails:
/// a plugin that calls itself without end must fail this test, not hang it.
fn run_bounded(
    call: &CniCall,
    conf: &Value,
    ns: &Netns,
    limit: std::time::Duration,
) -> ferry_tests::CniOutput {
    let start = std::time::Instant::now();
    let mut child = spawn_in_group(call, &bridge(), conf, ns);
    let pgid = child.id();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > limit {
            let members = group_members(pgid).len();
            // Processes may fork while the group is killed: until none is left.
            ferry_tests::wait_until(std::time::Duration::from_secs(10), || {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid as i32),
                    nix::sys::signal::SIGKILL,
                );
                group_members(pgid).is_empty()
            });
            let _ = child.wait();
            panic!("{call:?} still running after {limit:?}, {members} processes in its group");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The outcome again, now that it is known to return: through the runtime stand-in.
    call.run_in(ns)
}

#[test]
fn an_ipam_type_that_leads_back_to_a_main_plugin_is_refused_with_code_7() {
    require_root!();
    let net = Net::new("br-loop", json!({}));
    let pod = net.node.pod("pod");
    let bin = net.node.state_dir().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // The same program under another name, and a program that runs it.
    std::os::unix::fs::symlink(bridge(), bin.join("renamed-bridge")).unwrap();
    let wrapper = bin.join("wrapper-ipam");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec {} \"$@\"\n", bridge().display()),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cni_path = format!("{}:{}", bin.display(), ferry_tests::bin_dir().display());
    let before = node_state(&net.node);

    for ipam_type in ["ferry-bridge", "bridge", "renamed-bridge", "wrapper-ipam"] {
        for verb in ["ADD", "CHECK", "DEL", "STATUS", "GC"] {
            let mut conf = net.conf.clone();
            conf["ipam"]["type"] = json!(ipam_type);
            if verb == "GC" {
                conf["cni.dev/valid-attachments"] = json!([]);
            }
            if verb == "CHECK" {
                conf["prevResult"] = json!({"ips": [{"address": "10.1.0.5/24"}]});
            }
            let call = CniCall::new(bridge(), verb, conf.clone())
                .for_pod(&pod)
                .cni_path(cni_path.clone());
            let out = run_bounded(&call, &conf, net.node(), std::time::Duration::from_secs(5));
            let (code, msg, _) = out.err();
            assert_eq!(code, 7, "{ipam_type} {verb}\n{out}");
            assert!(
                msg.contains("ipam.type"),
                "{ipam_type} {verb}: name ipam.type\n{out}"
            );
        }
        assert_eq!(node_state(&net.node), before, "{ipam_type}: the node changed");
    }
}

#[test]
fn gc_removes_what_adds_killed_at_every_step_left() {
    require_root!();
    let net = Net::new(
        "br-kill",
        json!({"ipMasq": true, "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80}]}}),
    );
    // How long a whole ADD takes here, so the kills cover it from start to end.
    let first = net.node.pod("whole");
    let whole = net.call("ADD", &first).run_in(net.node());
    whole.ok();
    let span = whole.elapsed.mul_f64(1.3);
    const ROUNDS: u32 = 40;
    let mut pods = vec![first];
    for round in 0..ROUNDS {
        let pod = net.node.pod(&format!("k{round}"));
        let call = net.call("ADD", &pod);
        let mut child = spawn_in_group(&call, &bridge(), &net.conf, net.node());
        std::thread::sleep(span * round / ROUNDS);
        // As a runtime does at a timeout: the plugin only. What it started runs on.
        let _ = child.kill();
        let _ = child.wait();
        let pgid = child.id();
        assert!(
            ferry_tests::wait_until(std::time::Duration::from_secs(10), || group_members(pgid)
                .is_empty())
            .is_some(),
            "round {round}: processes of the killed ADD still run: {:?}",
            group_members(pgid)
        );
        pods.push(pod);
    }
    let mut gc = net.conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    CniCall::new(bridge(), "GC", gc).run_in(net.node()).ok();

    assert_eq!(
        net.leftovers(),
        Vec::<String>::new(),
        "GC left something of the network"
    );
    for pod in &pods {
        assert!(
            links(pod).iter().all(|l| l["ifname"] != "eth0"),
            "eth0 left in {}",
            pod.name()
        );
    }
}

#[test]
fn a_container_id_or_ifname_the_kernel_cannot_take_is_refused_before_anything_is_made() {
    require_root!();
    let net = Net::new("br-ids", json!({"ipMasq": true}));
    let pod = net.node.pod("pod");
    let before = node_state(&net.node);
    let cases = [
        ("0".repeat(65_510), "eth0", "CNI_CONTAINERID"),
        ("a".repeat(240), "eth0", "CNI_CONTAINERID"),
        ("a".repeat(129), "eth0", "CNI_CONTAINERID"),
        ("-starts-with-a-dash".into(), "eth0", "CNI_CONTAINERID"),
        ("ctr".into(), "eth%d", "CNI_IFNAME"),
        ("ctr".into(), "a b", "CNI_IFNAME"),
        ("ctr".into(), "..", "CNI_IFNAME"),
        ("ctr".into(), "sixteen-bytes-xx", "CNI_IFNAME"),
    ];
    for verb in ["ADD", "CHECK", "DEL"] {
        for (id, ifname, var) in &cases {
            let out = net
                .call(verb, &pod)
                .container_id(id.clone())
                .ifname(*ifname)
                .run_in(net.node());
            let (code, msg, _) = out.err();
            assert_eq!(code, 4, "{verb} {var} ({} bytes)\n{}", id.len(), msg);
            assert!(msg.contains(var) && msg.len() < 300, "{verb}: {msg}");
            assert_eq!(node_state(&net.node), before, "{verb} {var}: the node changed");
        }
    }
    // The longest id and ifname allowed work, and DEL takes them all away.
    let id = "a".repeat(128);
    let r = net
        .call("ADD", &pod)
        .container_id(id.clone())
        .ifname("fifteen-bytes-x")
        .run_in(net.node())
        .ok();
    assert_eq!(r["interfaces"][2]["name"], "fifteen-bytes-x");
    net.call("DEL", &pod)
        .container_id(id)
        .ifname("fifteen-bytes-x")
        .run_in(net.node())
        .ok();
    assert_eq!(net.leftovers(), Vec::<String>::new());
}

#[test]
fn rejected_calls_change_nothing_on_the_node() {
    require_root!();
    // A node with no bridge yet: a rejected first ADD must not leave one.
    let net = Net::new("br-rej", json!({"ipMasq": true}));
    let pod = net.node.pod("pod");
    let with = |extra: Value| {
        let mut c = net.conf.clone();
        merge(&mut c, extra);
        c
    };
    let many_sets: Vec<Value> = (0..30_000)
        .map(|i| json!([{"subnet": format!("10.{}.{}.0/24", 100 + i / 256, i % 256)}]))
        .collect();
    let many_ports: Vec<Value> = (0..10_000)
        .map(|i| json!({"hostPort": 10_000 + i, "containerPort": 80}))
        .collect();
    let pm = |host_ip: Value| json!({"runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "hostIP": host_ip}]}});
    let cases: Vec<(&str, &str, Value, u64, &str)> = vec![
        (
            "ADD",
            "IPAM refuses its config",
            with(json!({"ipam": {"ranges": [[{"subnet": "10.1.0.0/33"}]]}})),
            7,
            "ipam.ranges[0][0].subnet",
        ),
        (
            "ADD",
            "IPAM plugin missing",
            with(json!({"ipam": {"type": "no-such-ipam"}})),
            7,
            "no-such-ipam",
        ),
        (
            "ADD",
            "ipam.type a main plugin",
            with(json!({"ipam": {"type": "ferry-bridge"}})),
            7,
            "ipam.type",
        ),
        (
            "ADD",
            "hostIP a number",
            with(pm(json!(1))),
            7,
            "portMappings[0].hostIP",
        ),
        (
            "ADD",
            "hostIP true",
            with(pm(json!(true))),
            7,
            "portMappings[0].hostIP",
        ),
        (
            "ADD",
            "hostIP an object",
            with(pm(json!({}))),
            7,
            "portMappings[0].hostIP",
        ),
        (
            "ADD",
            "hostIP \"1\"",
            with(pm(json!("1"))),
            7,
            "portMappings[0].hostIP",
        ),
        (
            "ADD",
            "route gw of the other family",
            with(json!({"ipam": {"routes": [{"dst": "0.0.0.0/0", "gw": "fd00::1"}]}})),
            7,
            "ipam.routes[0].gw",
        ),
        (
            "ADD",
            "30,000 range sets",
            with(json!({"ipam": {"ranges": many_sets}})),
            7,
            "more than 16",
        ),
        (
            "ADD",
            "10,000 portMappings",
            with(json!({"runtimeConfig": {"portMappings": many_ports}})),
            7,
            "more than 1024",
        ),
        (
            "CHECK",
            "CHECK of an attachment never added",
            with(json!({"prevResult": {"ips": [{"address": "10.1.0.5/24"}]}})),
            102,
            "holds no lease",
        ),
    ];
    for (verb, what, conf, code, needle) in cases {
        let before = node_state(&net.node);
        let out = CniCall::new(bridge(), verb, conf)
            .for_pod(&pod)
            .run_in(net.node());
        let (got, msg, _) = out.err();
        assert_eq!(got, code, "{what}: wrong code\n{out}");
        assert!(
            msg.contains(needle),
            "{what}: the message should name {needle:?}\n{out}"
        );
        assert_eq!(node_state(&net.node), before, "{what}: the node changed");
        assert!(
            links(&pod).iter().all(|l| l["ifname"] != "eth0"),
            "{what}: eth0 left in the Pod"
        );
    }
}

#[test]
fn the_hostile_corpus_end_to_end_leaves_nothing_when_rejected() {
    require_root!();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cni/tests/corpus");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", corpus.display());
    let node = Node::new("br-corpus");
    let pod = node.pod("pod");
    let data = node.state_dir().join("ipam");
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        // Leases go to the node's own directory, never the machine's.
        let stdin = match serde_json::from_slice::<Value>(&bytes) {
            Ok(mut v) if v.get("ipam").is_some_and(Value::is_object) => {
                v["ipam"]["dataDir"] = json!(data);
                serde_json::to_vec(&v).unwrap()
            }
            _ => bytes,
        };
        for plugin in [bridge(), ferry_bin("ferry-ipam")] {
            for verb in ["ADD", "CHECK", "DEL", "GC", "STATUS"] {
                let before = node_state(&node);
                let out = CniCall::new(&plugin, verb, Value::Null)
                    .stdin_raw(stdin.clone())
                    .for_pod(&pod)
                    .run_in(node.netns());
                if out.status.success() {
                    if verb == "ADD" {
                        CniCall::new(&plugin, "DEL", Value::Null)
                            .stdin_raw(stdin.clone())
                            .for_pod(&pod)
                            .run_in(node.netns())
                            .ok();
                    }
                    continue;
                }
                let what = format!("{name} {verb} {}", plugin.display());
                let (code, _, _) = out.err();
                assert!(
                    [1, 2, 3, 4, 5, 6, 7, 11, 50, 51].contains(&code) || code >= 100,
                    "{what}: code {code}\n{out}"
                );
                assert!(out.status.code() == Some(1), "{what}: no clean exit\n{out}");
                assert_eq!(node_state(&node), before, "{what}: the node changed\n{out}");
            }
        }
    }
}
