//! ferry-ipam end to end: the real binary, run in a testbed node as a runtime runs it.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::{ferry_bin, reference_plugin, require_root, CniCall, Node};
use serde_json::{json, Value};

fn ipam() -> PathBuf {
    ferry_bin("ferry-ipam")
}

fn host_local() -> PathBuf {
    reference_plugin("host-local")
        .expect("Debian's host-local is missing from /usr/lib/cni: run scripts/setup.sh (make test does)")
}

/// A network configuration as a main plugin hands it to its IPAM plugin.
fn conf(version: &str, data_dir: &Path, ranges: Value) -> Value {
    json!({
        "cniVersion": version,
        "name": "testnet",
        "type": "ferry-bridge",
        "ipam": {
            "type": "ferry-ipam",
            "ranges": ranges,
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.10.0.254"}],
            "dataDir": data_dir,
        }
    })
}

fn dual_stack(data_dir: &Path) -> Value {
    conf(
        "1.1.0",
        data_dir,
        json!([[{"subnet": "10.10.0.0/24"}], [{"subnet": "fd00:10::/64"}]]),
    )
}

/// Every file below `dir`, with its bytes: "nothing on disk changed" is an equal snapshot.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.insert(p.clone(), b"<dir>".to_vec());
            out.extend(snapshot(&p));
        } else {
            out.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
        }
    }
    out
}

/// The leases of network `testnet`: address -> file content.
fn leases(data_dir: &Path) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(data_dir.join("testnet")) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(ip) = name.parse::<IpAddr>() {
            out.insert(ip, std::fs::read_to_string(e.path()).unwrap());
        }
    }
    out
}

/// ferry-ipam's owner index, inside the lease directory.
const OWNERS_DIR: &str = ".ferry-owners";

/// The entries of the owner index in lease directory `dir`: (owner key, address). Each
/// is an empty file, so host-local, which reads every file under the directory, never
/// takes one for a lease.
fn owner_index(dir: &Path) -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.join(OWNERS_DIR)) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // The stamp, and the one empty file that entries are links to.
        if name.starts_with("exact-at.") || name == "empty" {
            continue;
        }
        let (key, ip) = name
            .split_once('.')
            .unwrap_or_else(|| panic!("{name} in the owner index"));
        assert_eq!(e.metadata().unwrap().len(), 0, "index entry {name} is not empty");
        out.push((key.to_string(), ip.parse().unwrap()));
    }
    out
}

fn addresses(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ip| ip["address"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn two_hundred_parallel_adds_get_distinct_dual_stack_addresses_and_dels_free_them_all() {
    require_root!();
    let node = Node::new("ipam-par");
    let pod = node.pod("pod");
    let data = node.state_dir().join("ipam");
    let config = dual_stack(&data);

    let call = |verb: &str, i: usize| {
        CniCall::new(ipam(), verb, config.clone())
            .container_id(format!("ctr-{i}"))
            .netns(Some(&pod.path()))
            .spawn_in(node.netns())
    };
    let children: Vec<_> = (0..200).map(|i| call("ADD", i)).collect();
    let mut v4 = HashSet::new();
    let mut v6 = HashSet::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "ADD failed: {stdout}");
        let result: Value = serde_json::from_str(&stdout).unwrap();
        let [a4, a6] = <[String; 2]>::try_from(addresses(&result)).unwrap();
        assert!(a4.starts_with("10.10.0.") && a4.ends_with("/24"), "{a4}");
        assert!(a6.starts_with("fd00:10::") && a6.ends_with("/64"), "{a6}");
        assert_ne!(a4, "10.10.0.1/24", "the gateway is never handed out");
        assert!(v4.insert(a4.clone()), "{a4} handed out twice");
        assert!(v6.insert(a6.clone()), "{a6} handed out twice");
    }
    assert_eq!((v4.len(), v6.len()), (200, 200));
    let on_disk = leases(&data);
    assert_eq!(on_disk.len(), 400);
    let owners: HashSet<&String> = on_disk.values().collect();
    assert_eq!(owners.len(), 200, "each container holds one v4 and one v6 lease");

    let children: Vec<_> = (0..200).map(|i| call("DEL", i)).collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "DEL failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(leases(&data), BTreeMap::new(), "DEL left leases behind");
}

#[test]
fn exhaustion_names_the_range_and_rolls_back_the_other_family() {
    require_root!();
    let node = Node::new("ipam-full");
    let pod = node.pod("pod");
    let data = node.state_dir().join("ipam");
    let config = conf(
        "1.1.0",
        &data,
        json!([[{"subnet": "10.20.0.0/29"}], [{"subnet": "fd00:20::/64"}]]),
    );
    let add = |id: &str| {
        CniCall::new(ipam(), "ADD", config.clone())
            .container_id(id)
            .netns(Some(&pod.path()))
            .run_in(node.netns())
    };
    // A /29 has 6 host addresses; .1 is the gateway: .2 to .6 are handed out.
    let mut got: Vec<String> = (0..5)
        .map(|i| addresses(&add(&format!("c{i}")).ok())[0].clone())
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "10.20.0.2/29",
            "10.20.0.3/29",
            "10.20.0.4/29",
            "10.20.0.5/29",
            "10.20.0.6/29"
        ]
    );

    let before = snapshot(&data);
    let (code, msg, _) = add("c5").err();
    assert_eq!(code, 100, "{msg}");
    assert!(
        msg.contains("10.20.0.1-10.20.0.6"),
        "the message names the range: {msg}"
    );
    assert_eq!(
        snapshot(&data),
        before,
        "a failed ADD changed the store (the IPv6 lease must be rolled back)"
    );

    // STATUS says the same before anyone tries an ADD.
    let (code, msg, _) = CniCall::new(ipam(), "STATUS", config.clone())
        .run_in(node.netns())
        .err();
    assert_eq!(code, 50);
    assert!(msg.contains("range set 0") && msg.contains("5 of 5"), "{msg}");
}

#[test]
fn add_is_idempotent_check_finds_missing_leases_and_del_of_unknown_succeeds() {
    require_root!();
    let node = Node::new("ipam-idem");
    let pod = node.pod("pod");
    let data = node.state_dir().join("ipam");
    let config = dual_stack(&data);
    let call = |verb: &str, id: &str, config: &Value| {
        CniCall::new(ipam(), verb, config.clone())
            .container_id(id)
            .netns(Some(&pod.path()))
            .run_in(node.netns())
    };
    let first = call("ADD", "c1", &config).ok();
    assert_eq!(
        call("ADD", "c1", &config).ok(),
        first,
        "a repeated ADD returns the same result"
    );
    assert_eq!(leases(&data).len(), 2);

    let mut with_prev = config.clone();
    with_prev["prevResult"] = first.clone();
    assert_eq!(call("CHECK", "c1", &with_prev).ok(), Value::Null);

    let v6 = addresses(&first)[1].split('/').next().unwrap().to_string();
    std::fs::remove_file(data.join("testnet").join(&v6)).unwrap();
    let (code, msg, _) = call("CHECK", "c1", &with_prev).err();
    assert_eq!(code, 102);
    assert!(msg.contains("range set 1") && msg.contains("c1/eth0"), "{msg}");

    assert_eq!(call("DEL", "never-added", &config).ok(), Value::Null);
    assert_eq!(call("DEL", "c1", &config).ok(), Value::Null);
    assert_eq!(call("DEL", "c1", &config).ok(), Value::Null, "DEL twice succeeds");
    assert!(leases(&data).is_empty());
}

#[test]
fn static_addresses_from_cni_args_and_runtime_config() {
    require_root!();
    let node = Node::new("ipam-static");
    let pod = node.pod("pod");
    let data = node.state_dir().join("ipam");
    let config = dual_stack(&data);
    let out = CniCall::new(ipam(), "ADD", config.clone())
        .container_id("c1")
        .netns(Some(&pod.path()))
        .args("IgnoreUnknown=1;K8S_POD_NAME=web;IP=10.10.0.77")
        .run_in(node.netns())
        .ok();
    assert_eq!(addresses(&out)[0], "10.10.0.77/24");

    let mut rc = config.clone();
    rc["runtimeConfig"] = json!({"ips": ["10.10.0.88/24", "fd00:10::88/64"]});
    let out = CniCall::new(ipam(), "ADD", rc)
        .container_id("c2")
        .netns(Some(&pod.path()))
        .run_in(node.netns())
        .ok();
    assert_eq!(addresses(&out), ["10.10.0.88/24", "fd00:10::88/64"]);

    // Taken by c1: refused, and c3 holds nothing afterwards (its IPv6 lease rolled back).
    let (code, msg, _) = CniCall::new(ipam(), "ADD", config.clone())
        .container_id("c3")
        .netns(Some(&pod.path()))
        .args("IP=10.10.0.77")
        .run_in(node.netns())
        .err();
    assert_eq!(code, 101);
    assert!(msg.contains("10.10.0.77") && msg.contains("c1/eth0"), "{msg}");
    assert!(!leases(&data).values().any(|owner| owner.starts_with("c3")));
}

#[test]
fn gc_releases_every_lease_not_in_the_valid_list() {
    require_root!();
    let node = Node::new("ipam-gc");
    let pod = node.pod("pod");
    let data = node.state_dir().join("ipam");
    let config = dual_stack(&data);
    for id in ["keep1", "drop1", "keep2", "drop2"] {
        CniCall::new(ipam(), "ADD", config.clone())
            .container_id(id)
            .netns(Some(&pod.path()))
            .run_in(node.netns())
            .ok();
    }
    // A lease an old host-local wrote (container id only) for a container still in use.
    std::fs::write(data.join("testnet/10.10.0.200"), "keep3").unwrap();
    let mut gc = config.clone();
    gc["cni.dev/valid-attachments"] = json!([
        {"containerID": "keep1", "ifname": "eth0"},
        {"containerID": "keep2", "ifname": "eth0"},
        {"containerID": "keep3", "ifname": "eth0"},
    ]);
    assert_eq!(
        CniCall::new(ipam(), "GC", gc).run_in(node.netns()).ok(),
        Value::Null
    );
    let mut owners: Vec<String> = leases(&data).into_values().collect();
    owners.sort();
    assert_eq!(
        owners,
        [
            "keep1\r\neth0",
            "keep1\r\neth0",
            "keep2\r\neth0",
            "keep2\r\neth0",
            "keep3"
        ]
    );
}

#[test]
fn status_reports_an_unusable_data_dir() {
    require_root!();
    let node = Node::new("ipam-status");
    let data = node.state_dir().join("ipam");
    let config = dual_stack(&data);
    assert_eq!(
        CniCall::new(ipam(), "STATUS", config.clone())
            .run_in(node.netns())
            .ok(),
        Value::Null
    );
    std::fs::write(&data, "a file where the data directory should be").unwrap();
    let (code, msg, details) = CniCall::new(ipam(), "STATUS", config).run_in(node.netns()).err();
    assert_eq!(code, 50);
    assert!(
        msg.contains("dataDir") && details.contains(&data.display().to_string()),
        "{msg} / {details}"
    );
}

/// A small deterministic generator: the seed is printed, and `FERRY_SEED` replays a run.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("FERRY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("seed: FERRY_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn kill_9_at_random_moments_leaves_a_store_gc_can_clean() {
    require_root!();
    let node = Node::new("ipam-crash");
    let pod = node.pod("pod");
    let data = node.state_dir().join("ipam");
    // A /27 keeps the allocator busy wrapping around while calls die.
    let config = conf(
        "1.1.0",
        &data,
        json!([[{"subnet": "10.30.0.0/27"}], [{"subnet": "fd00:30::/64"}]]),
    );
    let mut rng = Rng::from_env();
    let mut killed = 0;
    for _ in 0..100 {
        let id = format!("c{}", rng.below(20));
        let verb = if rng.below(3) == 0 { "DEL" } else { "ADD" };
        let mut child = CniCall::new(ipam(), verb, config.clone())
            .container_id(&id)
            .netns(Some(&pod.path()))
            .spawn_in(node.netns());
        std::thread::sleep(Duration::from_micros(rng.below(2500)));
        if child.try_wait().unwrap().is_none() {
            killed += 1;
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
    eprintln!("{killed} of 100 calls were killed before they finished");
    assert!(killed > 0, "no call was killed mid-way: the test tested nothing");

    let valid: Vec<String> = (0..20).filter(|i| i % 2 == 0).map(|i| format!("c{i}")).collect();
    let mut gc = config.clone();
    gc["cni.dev/valid-attachments"] = Value::Array(
        valid
            .iter()
            .map(|id| json!({"containerID": id, "ifname": "eth0"}))
            .collect(),
    );
    CniCall::new(ipam(), "GC", gc).run_in(node.netns()).ok();

    // The store parses: every file is the lock, a cursor, or a complete lease.
    let dir = data.join("testnet");
    let mut per_owner: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == OWNERS_DIR {
            continue; // The owner index: checked below.
        }
        let content = std::fs::read_to_string(e.path()).unwrap();
        if name == "lock" {
            continue;
        }
        if let Some(set) = name.strip_prefix("last_reserved_ip.") {
            assert!(set == "0" || set == "1", "{name}");
            content
                .parse::<IpAddr>()
                .unwrap_or_else(|_| panic!("{name} holds {content:?}"));
            continue;
        }
        let ip: IpAddr = name
            .parse()
            .unwrap_or_else(|_| panic!("stray file {name} in the store"));
        let (id, ifname) = content
            .split_once("\r\n")
            .unwrap_or_else(|| panic!("lease {ip} holds {content:?}"));
        assert_eq!(ifname, "eth0");
        assert!(valid.contains(&id.to_string()), "lease {ip} of {id} survived GC");
        per_owner.entry(id.to_string()).or_default().push(ip);
    }
    for (id, ips) in &per_owner {
        let v4 = ips.iter().filter(|ip| ip.is_ipv4()).count();
        assert!(
            v4 <= 1 && ips.len() - v4 <= 1,
            "{id} holds {ips:?}: duplicate leases"
        );
    }
    // GC read every lease and repaired the index: each lease is filed exactly once, the
    // leases of one owner under one key, and no entry names a lease that is gone.
    let index = owner_index(&dir);
    let mut leased: Vec<IpAddr> = per_owner.values().flatten().copied().collect();
    leased.sort();
    let mut filed: Vec<IpAddr> = index.iter().map(|(_, ip)| *ip).collect();
    filed.sort();
    assert_eq!(filed, leased, "index {index:?}");
    for ips in per_owner.values() {
        let keys: HashSet<&String> = index
            .iter()
            .filter(|(_, ip)| ips.contains(ip))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys.len(), 1, "{ips:?} filed under {keys:?}");
    }
    // And the store still works: every valid container can be added and gets one address each.
    for id in &valid {
        let out = CniCall::new(ipam(), "ADD", config.clone())
            .container_id(id)
            .netns(Some(&pod.path()))
            .run_in(node.netns())
            .ok();
        // A lease that survived (a killed ADD may have left one family only) is the one returned.
        for a in addresses(&out) {
            let ip: IpAddr = a.split('/').next().unwrap().parse().unwrap();
            let held = per_owner
                .get(id)
                .into_iter()
                .flatten()
                .find(|h| h.is_ipv4() == ip.is_ipv4());
            assert!(
                held.is_none_or(|h| *h == ip),
                "{id}: got {ip}, but it holds {held:?}"
            );
        }
    }
}

#[test]
fn bad_input_gets_its_spec_code_and_changes_nothing_on_disk() {
    require_root!();
    let node = Node::new("ipam-bad");
    let pod = node.pod("pod");
    let data = node.state_dir().join("ipam");
    let good = dual_stack(&data);
    // A lease already there, so "nothing changed" also covers the existing store.
    CniCall::new(ipam(), "ADD", good.clone())
        .container_id("existing")
        .netns(Some(&pod.path()))
        .run_in(node.netns())
        .ok();
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v
    };
    let add = |config: Value| {
        CniCall::new(ipam(), "ADD", config)
            .container_id("c1")
            .netns(Some(&pod.path()))
    };

    let cases: Vec<(&str, CniCall, u64, &str)> = vec![
        (
            "malformed JSON",
            add(good.clone()).stdin_raw(&b"{\"cniVersion\": \"1.1.0\", "[..]),
            6,
            "not valid JSON",
        ),
        (
            "no ipam section",
            add(edit(&|v| drop(v.as_object_mut().unwrap().remove("ipam")))),
            7,
            "ipam",
        ),
        (
            "no name",
            add(edit(&|v| drop(v.as_object_mut().unwrap().remove("name")))),
            7,
            "name",
        ),
        (
            "no ranges",
            add(edit(&|v| {
                drop(v["ipam"].as_object_mut().unwrap().remove("ranges"))
            })),
            7,
            "no address range",
        ),
        (
            "subnet missing in a range",
            add(edit(&|v| {
                v["ipam"]["ranges"] = json!([[{"gateway": "10.1.0.1"}]])
            })),
            7,
            "ipam.ranges[0][0]",
        ),
        (
            "subnet not a subnet",
            add(edit(&|v| {
                v["ipam"]["ranges"][0][0]["subnet"] = json!("10.1.0.0/33")
            })),
            7,
            "ipam.ranges[0][0].subnet",
        ),
        (
            "host bits set",
            add(edit(&|v| {
                v["ipam"]["ranges"][0][0]["subnet"] = json!("10.10.0.5/24")
            })),
            7,
            "host bits",
        ),
        (
            "too small",
            add(edit(&|v| {
                v["ipam"]["ranges"][0][0]["subnet"] = json!("10.10.0.0/31")
            })),
            7,
            "too small",
        ),
        (
            "rangeStart outside the subnet",
            add(edit(&|v| {
                v["ipam"]["ranges"][0][0]["rangeStart"] = json!("10.11.0.5")
            })),
            7,
            "ipam.ranges[0][0].rangeStart 10.11.0.5 is not inside subnet 10.10.0.0/24",
        ),
        (
            "rangeEnd on the broadcast address",
            add(edit(&|v| {
                v["ipam"]["ranges"][0][0]["rangeEnd"] = json!("10.10.0.255")
            })),
            7,
            "broadcast",
        ),
        (
            "overlapping range sets",
            add(edit(&|v| {
                v["ipam"]["ranges"][1] = json!([{"subnet": "10.10.0.128/25"}])
            })),
            7,
            "overlaps",
        ),
        (
            "relative dataDir",
            add(edit(&|v| v["ipam"]["dataDir"] = json!("var/lib/x"))),
            7,
            "ipam.dataDir",
        ),
        (
            "IP= outside every range",
            add(good.clone()).args("IP=192.0.2.7"),
            4,
            "CNI_ARGS IP: 192.0.2.7 is not inside any range",
        ),
        (
            "IP= not an address",
            add(good.clone()).args("IP=banana"),
            4,
            "CNI_ARGS IP=banana",
        ),
        (
            "IP= the gateway",
            add(good.clone()).args("IP=10.10.0.1"),
            7,
            "gateway",
        ),
        (
            "runtimeConfig ips outside",
            add(edit(&|v| v["runtimeConfig"] = json!({"ips": ["172.16.0.1/24"]}))),
            7,
            "runtimeConfig.ips: 172.16.0.1",
        ),
        (
            "unknown CNI_ARGS key",
            add(good.clone()).args("COLOUR=blue"),
            4,
            "COLOUR",
        ),
        (
            "path traversal in the name",
            add(edit(&|v| v["name"] = json!("../escape"))),
            7,
            "../escape",
        ),
        (
            "unknown cniVersion",
            add(edit(&|v| v["cniVersion"] = json!("9.9.9"))),
            1,
            "9.9.9",
        ),
        (
            "cniVersion missing",
            add(edit(&|v| drop(v.as_object_mut().unwrap().remove("cniVersion")))),
            7,
            "cniVersion",
        ),
        (
            "CNI_COMMAND missing",
            add(good.clone()).unset_env("CNI_COMMAND"),
            4,
            "CNI_COMMAND",
        ),
        (
            "CNI_CONTAINERID missing",
            add(good.clone()).unset_env("CNI_CONTAINERID"),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "CNI_NETNS missing",
            add(good.clone()).unset_env("CNI_NETNS"),
            4,
            "CNI_NETNS",
        ),
        (
            "CNI_IFNAME missing",
            add(good.clone()).unset_env("CNI_IFNAME"),
            4,
            "CNI_IFNAME",
        ),
        (
            "CNI_IFNAME too long",
            add(good.clone()).ifname("a-very-long-ifname"),
            4,
            "CNI_IFNAME",
        ),
        (
            "container id with a slash",
            add(good.clone()).container_id("../x"),
            4,
            "CNI_CONTAINERID",
        ),
    ];
    let before = snapshot(node.state_dir());
    for (what, call, code, needle) in cases {
        let out = call.run_in(node.netns());
        let (got, msg, _) = out.err();
        assert_eq!(got, code, "{what}: wrong code\n{out}");
        assert!(
            msg.contains(needle),
            "{what}: the message should name {needle:?}\n{out}"
        );
        assert_eq!(snapshot(node.state_dir()), before, "{what}: the disk changed");
    }
}

/// The same configuration and calls, given to host-local and to ferry-ipam.
fn compat_run(plugin: &Path, node: &Node, data: &Path, version: &str) -> Vec<Value> {
    let pod = node.pod("pod");
    let resolv = data.with_extension("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 10.10.0.53\nsearch svc.cluster.local cluster.local\noptions ndots:5\n",
    )
    .unwrap();
    let mut config = conf(
        version,
        data,
        json!([
            [{"subnet": "10.10.0.0/24", "rangeStart": "10.10.0.10", "rangeEnd": "10.10.0.20", "gateway": "10.10.0.1"}],
            [{"subnet": "fd00:10::/64"}]
        ]),
    );
    config["ipam"]["resolvConf"] = json!(resolv);
    let call = |verb: &str, id: &str, args: Option<&str>| {
        let mut c = CniCall::new(plugin, verb, config.clone())
            .container_id(id)
            .netns(Some(&pod.path()));
        if let Some(a) = args {
            c = c.args(a);
        }
        let out = c.run_in(node.netns());
        assert!(out.status.success(), "{} {verb} {id}:\n{out}", plugin.display());
        out.ok()
    };
    vec![
        call("ADD", "c1", None),
        call("ADD", "c2", None),
        call("DEL", "c1", None),
        // Round robin: c3 gets .12, not c1's freed .10.
        call("ADD", "c3", None),
        call("ADD", "c4", Some("IgnoreUnknown=1;IP=10.10.0.15")),
        call("DEL", "c2", None),
    ]
}

#[test]
fn results_and_store_match_host_local_in_every_version_host_local_speaks() {
    require_root!();
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"] {
        let node = Node::new("ipam-compat");
        let (ours, theirs) = (node.state_dir().join("ferry"), node.state_dir().join("hostlocal"));
        let a = compat_run(&ipam(), &node, &ours, version);
        let b = compat_run(&host_local(), &node, &theirs, version);
        assert_eq!(a, b, "cniVersion {version}: results differ from host-local's");
        assert_eq!(a[0]["cniVersion"], version);
        // Same leases, same bytes, same round-robin cursors; ferry-ipam's owner index aside.
        let files = |d: &Path| -> BTreeMap<String, Vec<u8>> {
            snapshot(&d.join("testnet"))
                .into_iter()
                .filter(|(p, _)| !p.ends_with("lock"))
                .filter(|(p, _)| !p.components().any(|c| c.as_os_str() == OWNERS_DIR))
                .map(|(p, c)| (p.file_name().unwrap().to_string_lossy().into_owned(), c))
                .collect()
        };
        assert_eq!(
            files(&ours),
            files(&theirs),
            "cniVersion {version}: stores differ"
        );
    }
}

#[test]
fn leases_written_by_one_plugin_are_honoured_and_released_by_the_other() {
    require_root!();
    let node = Node::new("ipam-switch");
    let pod = node.pod("pod");
    let data = node.state_dir().join("ipam");
    let config = conf(
        "1.0.0",
        &data,
        json!([[{"subnet": "10.10.0.0/24"}], [{"subnet": "fd00:10::/64"}]]),
    );
    let call = |plugin: &Path, verb: &str, id: &str| {
        CniCall::new(plugin, verb, config.clone())
            .container_id(id)
            .netns(Some(&pod.path()))
            .run_in(node.netns())
            .ok()
    };
    let by_host_local = call(&host_local(), "ADD", "hl1");
    let by_ferry = call(&ipam(), "ADD", "fy1");
    assert_ne!(
        addresses(&by_host_local),
        addresses(&by_ferry),
        "ferry-ipam reused host-local's lease"
    );
    // host-local's cursor is honoured too: ferry continued after its last address.
    assert_eq!(addresses(&by_ferry)[0], "10.10.0.3/24");
    // A repeated ADD through ferry-ipam finds host-local's lease.
    assert_eq!(addresses(&call(&ipam(), "ADD", "hl1")), addresses(&by_host_local));
    // host-local honours ferry's lease, then each releases the other's.
    let by_host_local2 = call(&host_local(), "ADD", "hl2");
    assert_eq!(addresses(&by_host_local2)[0], "10.10.0.4/24");
    call(&ipam(), "DEL", "hl1");
    call(&host_local(), "DEL", "fy1");
    call(&ipam(), "DEL", "hl2");
    assert_eq!(leases(&data), BTreeMap::new());
}

#[test]
fn an_address_host_local_released_and_gave_to_another_container_is_that_containers() {
    require_root!();
    let node = Node::new("ipam-reuse");
    let pod = node.pod("pod");
    let data = node.state_dir().join("ipam");
    let config = conf("1.0.0", &data, json!([[{"subnet": "10.10.0.0/24"}]]));
    let call = |plugin: &Path, verb: &str, id: &str, args: Option<&str>| {
        let mut c = CniCall::new(plugin, verb, config.clone())
            .container_id(id)
            .netns(Some(&pod.path()));
        if let Some(a) = args {
            c = c.args(a);
        }
        c.run_in(node.netns()).ok()
    };
    let dir = data.join("testnet");
    // ferry-ipam leases .2 to k and files it under k's key; host-local releases it (and
    // leaves the entry: it never touches the index), then leases .2 to j.
    assert_eq!(addresses(&call(&ipam(), "ADD", "k", None)), ["10.10.0.2/24"]);
    let k_entry = owner_index(&dir);
    assert_eq!(k_entry.len(), 1);
    call(&host_local(), "DEL", "k", None);
    assert_eq!(leases(&data), BTreeMap::new());
    assert_eq!(owner_index(&dir), k_entry, "host-local left the index alone");
    call(&host_local(), "ADD", "j", Some("IgnoreUnknown=1;IP=10.10.0.2"));

    // ferry-ipam knows .2 is j's, not k's: a repeated ADD returns it, CHECK finds it...
    let again = call(&ipam(), "ADD", "j", None);
    assert_eq!(addresses(&again), ["10.10.0.2/24"]);
    let mut with_prev = config.clone();
    with_prev["prevResult"] = again;
    assert_eq!(
        CniCall::new(ipam(), "CHECK", with_prev)
            .container_id("j")
            .netns(Some(&pod.path()))
            .run_in(node.netns())
            .ok(),
        Value::Null
    );
    assert_ne!(owner_index(&dir), k_entry, "the stale entry was replaced");
    // ... GC keeps it for j even though k is gone, and DEL releases it.
    let mut gc = config.clone();
    gc["cniVersion"] = json!("1.1.0"); // GC's; host-local 1.1.1 speaks up to 1.0.0.
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "j", "ifname": "eth0"}]);
    CniCall::new(ipam(), "GC", gc).run_in(node.netns()).ok();
    assert_eq!(leases(&data).into_values().collect::<Vec<_>>(), ["j\r\neth0"]);
    call(&ipam(), "DEL", "j", None);
    assert_eq!(leases(&data), BTreeMap::new());
    assert_eq!(owner_index(&dir), vec![], "DEL removed the entry with the lease");
}

/// `FS_IOC_SHUTDOWN` (`_IOR('X', 125, u32)`, ext4 and xfs) and its flag that commits the
/// journal but writes back no data: what a power cut does a few seconds after a write.
const FS_IOC_SHUTDOWN: nix::libc::c_ulong = 0x8004_587d;
const FS_GOING_FLAGS_LOGFLUSH: u32 = 1;

/// Runs `f` on a thread of its own in a private mount namespace, with a fresh ext4 file
/// system (a loop-mounted file under `scratch`) at the path it is given. The machine's
/// mounts are untouched: the namespace, and the mount in it, end with the thread.
fn on_scratch_ext4<T: Send>(scratch: &Path, f: impl FnOnce(&Path) -> T + Send) -> T {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    let run = |what: &str, cmd: &mut std::process::Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            unshare(CloneFlags::CLONE_NEWNS).expect("a mount namespace of our own");
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .expect("making our mounts private");
            let image = scratch.join("disk.img");
            let mnt = scratch.join("mnt");
            std::fs::create_dir_all(&mnt).unwrap();
            std::fs::File::create(&image).unwrap().set_len(32 << 20).unwrap();
            run(
                "mkfs.ext4",
                std::process::Command::new("mkfs.ext4")
                    .args(["-q", "-F"])
                    .arg(&image),
            );
            run(
                "mount",
                std::process::Command::new("mount")
                    .args(["-o", "loop"])
                    .arg(&image)
                    .arg(&mnt),
            );
            f(&mnt)
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

#[test]
fn after_a_power_cut_leases_are_whole_or_empty_and_the_next_boot_frees_the_empty_ones() {
    require_root!();
    let node = Node::new("ipam-crash");
    let pod = node.pod("pod");
    let add = |config: &Value, id: &str| {
        CniCall::new(ipam(), "ADD", config.clone())
            .container_id(id)
            .netns(Some(&pod.path()))
            .run_in(node.netns())
            .ok()
    };
    on_scratch_ext4(node.state_dir(), |mnt| {
        let data = mnt.join("ipam");
        let config = dual_stack(&data);
        let before: Vec<String> = (0..6).map(|i| format!("old{i}")).collect();
        for id in &before {
            add(&config, id);
        }
        // The power cut: the journal (names, sizes) reaches the disk, the leases' bytes
        // (no fdatasync) do not. Then the disk is mounted again, as after the reboot.
        let fd = std::fs::File::open(mnt).unwrap();
        // SAFETY: ioctl(2) on an fd we own, reading one u32 we own.
        let shut = unsafe {
            nix::libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                FS_IOC_SHUTDOWN,
                &FS_GOING_FLAGS_LOGFLUSH,
            )
        };
        assert_eq!(shut, 0, "FS_IOC_SHUTDOWN: {}", std::io::Error::last_os_error());
        drop(fd);
        let remount = |args: &[&str]| {
            let out = std::process::Command::new(args[0])
                .args(&args[1..])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let m = mnt.to_str().unwrap();
        let image = mnt.parent().unwrap().join("disk.img");
        remount(&["umount", m]);
        remount(&["mount", "-o", "loop", image.to_str().unwrap(), m]);

        // Every lease is whole or empty, never garbage.
        let survived = leases(&data);
        let empty: Vec<IpAddr> = survived
            .iter()
            .filter(|(_, c)| c.is_empty())
            .map(|(ip, _)| *ip)
            .collect();
        for (ip, content) in &survived {
            assert!(
                content.is_empty() || before.iter().any(|id| *content == format!("{id}\r\neth0")),
                "{ip} holds {content:?}"
            );
        }
        println!(
            "after the power cut: {} lease files, {} of them empty",
            survived.len(),
            empty.len()
        );

        // The reboot: the index stamp names another boot, so the first call reads every
        // lease and frees the empty ones; new sandboxes get addresses no whole lease holds.
        let owners = data.join("testnet").join(OWNERS_DIR);
        for e in std::fs::read_dir(&owners).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((at, _boot)) = name.strip_prefix("exact-at.").and_then(|n| n.rsplit_once('.')) {
                let earlier = format!("exact-at.{at}.00000000-0000-4000-8000-000000000000");
                std::fs::rename(e.path(), owners.join(earlier)).unwrap();
            }
        }
        let after: Vec<String> = (0..6).map(|i| format!("new{i}")).collect();
        let mut given = HashSet::new();
        for id in &after {
            for a in addresses(&add(&config, id)) {
                let ip: IpAddr = a.split('/').next().unwrap().parse().unwrap();
                assert!(given.insert(ip), "{ip} given twice");
                assert!(
                    survived.get(&ip).is_none_or(|c| c.is_empty()),
                    "{ip} is still leased to {:?}",
                    survived[&ip]
                );
            }
        }
        assert!(
            !leases(&data).values().any(String::is_empty),
            "no empty lease is left: {:?}",
            leases(&data)
        );
        // GC of the runtime, which knows only the new sandboxes, releases the rest.
        let mut gc = config.clone();
        gc["cni.dev/valid-attachments"] = json!(after
            .iter()
            .map(|id| json!({"containerID": id, "ifname": "eth0"}))
            .collect::<Vec<_>>());
        CniCall::new(ipam(), "GC", gc).run_in(node.netns()).ok();
        let mut owners: Vec<String> = leases(&data).into_values().collect();
        owners.sort();
        // One lease per family.
        let mut want: Vec<String> = after
            .iter()
            .flat_map(|id| [format!("{id}\r\neth0"), format!("{id}\r\neth0")])
            .collect();
        want.sort();
        assert_eq!(owners, want);
    });
}

#[test]
fn hostile_input_is_refused_with_code_7_or_4_and_changes_nothing_on_disk() {
    require_root!();
    let node = Node::new("ipam-hostile");
    let pod = node.pod("pod");
    let data = node.state_dir().join("ipam");
    let good = dual_stack(&data);
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v
    };
    let call = |verb: &str, config: Value| {
        CniCall::new(ipam(), verb, config)
            .container_id("c1")
            .netns(Some(&pod.path()))
    };
    let many_sets: Vec<Value> = (0..30_000)
        .map(|i| json!([{"subnet": format!("10.{}.{}.0/24", 100 + i / 256, i % 256)}]))
        .collect();
    let many_ranges: Vec<Value> = (0..65)
        .map(|i| json!({"subnet": format!("10.20.{i}.0/24")}))
        .collect();
    let many_routes: Vec<Value> = (0..257)
        .map(|i| json!({"dst": format!("10.{}.{}.0/24", 30 + i / 256, i % 256)}))
        .collect();
    let cases: Vec<(&str, CniCall, u64, &str)> = vec![
        (
            "an IPv4 route via an IPv6 gateway",
            call(
                "ADD",
                edit(&|v| v["ipam"]["routes"] = json!([{"dst": "0.0.0.0/0", "gw": "fd00::1"}])),
            ),
            7,
            "ipam.routes[0].gw fd00::1",
        ),
        (
            "an IPv6 route via an IPv4 gateway",
            call(
                "ADD",
                edit(&|v| v["ipam"]["routes"][1] = json!({"dst": "fd00:1::/64", "gw": "10.10.0.254"})),
            ),
            7,
            "ipam.routes[1].gw",
        ),
        (
            "30,000 range sets",
            call("ADD", edit(&|v| v["ipam"]["ranges"] = json!(many_sets))),
            7,
            "ipam.ranges: 30000 entries, more than 16",
        ),
        (
            "17 range sets from two sources",
            call(
                "ADD",
                edit(&|v| {
                    v["ipam"]["ranges"] = json!(many_sets[..8]);
                    v["runtimeConfig"] = json!({"ipRanges": many_sets[8..17]});
                }),
            ),
            7,
            "17 range sets together, more than 16",
        ),
        (
            "65 ranges in one set",
            call("ADD", edit(&|v| v["ipam"]["ranges"] = json!([many_ranges]))),
            7,
            "ipam.ranges[0]: 65 ranges, more than 64",
        ),
        (
            "257 routes",
            call("ADD", edit(&|v| v["ipam"]["routes"] = json!(many_routes))),
            7,
            "ipam.routes: 257 entries, more than 256",
        ),
        (
            "a container id of 65,510 bytes",
            call("ADD", good.clone()).container_id("0".repeat(65_510)),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "a container id of 240 bytes",
            call("ADD", good.clone()).container_id("a".repeat(240)),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "CHECK of a network with no lease yet",
            call("CHECK", good.clone()),
            102,
            "holds no lease",
        ),
    ];
    // An empty node first: no lease directory may appear.
    let before = snapshot(node.state_dir());
    for (what, call, code, needle) in cases {
        let out = call.run_in(node.netns());
        let (got, msg, _) = out.err();
        assert_eq!(got, code, "{what}: wrong code\n{out}");
        assert!(
            msg.contains(needle),
            "{what}: the message should name {needle:?}\n{out}"
        );
        assert_eq!(snapshot(node.state_dir()), before, "{what}: the disk changed");
    }
}
