//! The firewall's tests: plans without root; as root, each in namespaces of its own
//! (ferry-tests' testbed): what nft lists, the nft-vs-netlink oracle, real packets.

use super::driver::{Driver, WRITES};
use super::plan::{parse_mac, plan};
use super::*;

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use cni::PortMapping;
use ferry_nft::TableFamily;
use ferry_tests::Netns;

const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

// -----------------------------------------------------------------------------------
// Helpers: root gating and the shared testbed's namespaces.

/// True when the test can run as root; otherwise it skips with a message, or fails when
/// FERRY_REQUIRE_ROOT=1 (CI), so that a run that tested nothing never looks green.
fn root_or_skip(test: &str) -> bool {
    ferry_tests::require_root(test)
}

/// What the old private testbed offered, on the shared one: commands and sysctls run
/// on a thread inside the namespace (without `ip netns exec`'s remount of /sys).
trait NetnsExt {
    fn sh(&self, cmd: &str) -> String;
    fn sysctl(&self, key: &str, value: &str);
}

impl NetnsExt for Netns {
    fn sh(&self, cmd: &str) -> String {
        self.run(|| {
            let args: Vec<&str> = cmd.split_whitespace().collect();
            let out = Command::new(args[0]).args(&args[1..]).output().expect(args[0]);
            assert!(
                out.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    }

    fn sysctl(&self, key: &str, value: &str) {
        self.run(|| std::fs::write(format!("/proc/sys/{}", key.replace('.', "/")), value))
            .unwrap_or_else(|e| panic!("sysctl {key}={value}: {e}"));
    }
}

/// Runs `f` in a fresh network namespace (on a thread of its own).
fn in_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    Netns::new("fw").run(f)
}

fn writes() -> usize {
    WRITES.with(|w| w.get())
}

fn nft(cmd: &str) -> String {
    let args: Vec<&str> = cmd.split_whitespace().collect();
    let out = Command::new("nft").args(&args).output().expect("nft");
    assert!(
        out.status.success(),
        "nft {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn id<'a>(container_id: &'a str) -> AttachmentId<'a> {
    AttachmentId {
        network: "net1",
        container_id,
        ifname: "eth0",
    }
}

fn mapping(host_port: u16, container_port: u16, protocol: &str, host_ip: Option<&str>) -> PortMapping {
    PortMapping {
        host_port,
        container_port,
        protocol: protocol.to_string(),
        host_ip: host_ip.map(|h| h.parse().unwrap()),
    }
}

fn masq_only<'a>(id: AttachmentId<'a>, net: &str) -> AttachmentRules<'a> {
    AttachmentRules {
        id,
        masquerade: vec![net.parse().unwrap()],
        port_mappings: Vec::new(),
        mac_spoof_check: None,
    }
}

fn full<'a>(id: AttachmentId<'a>) -> AttachmentRules<'a> {
    AttachmentRules {
        id,
        masquerade: vec!["10.22.0.5/24".parse().unwrap(), "fd00::5/64".parse().unwrap()],
        port_mappings: vec![
            (mapping(8080, 80, "tcp", None), "10.22.0.5".parse().unwrap()),
            (mapping(8080, 80, "tcp", None), "fd00::5".parse().unwrap()),
        ],
        mac_spoof_check: None,
    }
}

/// The comments of the rules in `table` (e.g. "inet ferry-bridge"), as listed by nft.
fn comments(table: &str) -> Vec<String> {
    let out = Command::new("nft")
        .args(["-j", "list", "table"])
        .args(table.split(' '))
        .output()
        .unwrap();
    if !out.status.success() {
        return Vec::new();
    }
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    listing["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| Some(o.get("rule")?.get("comment")?.as_str()?.to_string()))
        .collect()
}

fn owned_by(table: &str, key: &str) -> usize {
    comments(table)
        .iter()
        .filter(|c| owner_key(c) == Some(key))
        .count()
}

// -----------------------------------------------------------------------------------
// Without root: keys, plans, validation, nft missing.

#[test]
fn keys_are_readable_when_they_fit_and_hashed_when_not() {
    assert_eq!(id(CID).key(), format!("ferry:net1:{CID}:eth0"));
    // A network name of 35 bytes still fits beside a 64-hex container id and eth0.
    let net35 = "n".repeat(35);
    let k = AttachmentId {
        network: &net35,
        container_id: CID,
        ifname: "eth0",
    }
    .key();
    assert_eq!(k, format!("ferry:{net35}:{CID}:eth0"));
    let net36 = "n".repeat(36);
    let k = AttachmentId {
        network: &net36,
        container_id: CID,
        ifname: "eth0",
    }
    .key();
    assert!(
        k.starts_with(&format!("ferry:{net36}:#")) && k.len() == 6 + 36 + 2 + 32,
        "{k}"
    );
    // Unclean characters or an over-long network are hashed too, and stay distinct.
    let a = AttachmentId {
        network: "n",
        container_id: "a:b",
        ifname: "eth0",
    }
    .key();
    let b = AttachmentId {
        network: "n",
        container_id: "a",
        ifname: "b:eth0",
    }
    .key();
    assert!(a.starts_with("ferry:n:#") && a != b);
    let long = "x".repeat(300);
    let k = AttachmentId {
        network: &long,
        container_id: &long,
        ifname: &long,
    }
    .key();
    assert!(k.starts_with("ferry:#") && k.len() <= KEY_MAX, "{k}");
    assert_eq!(key_network(&k), Some(network_part(&long).as_str()));
    assert_eq!(owner_key(&format!("{k} masq.0011aabb")), Some(k.as_str()));
    assert_eq!(owner_key("ferry-something else"), None);
    assert_eq!(owner_key("x"), None);
}

#[test]
fn every_comment_fits_in_nfts_limit() {
    let long = "y".repeat(200);
    for network in ["n", "k8s-pod-network", &"z".repeat(64), &long] {
        let id = AttachmentId {
            network,
            container_id: CID,
            ifname: "averylongifnam",
        };
        let mut rules = full(id);
        rules.port_mappings.push((
            mapping(65535, 65535, "sctp", Some("fd00::ffff")),
            "fd00::5".parse().unwrap(),
        ));
        rules.mac_spoof_check = Some(("fy0123456789ab".into(), "0A:58:0A:16:00:05".into()));
        for p in plan(&rules).unwrap() {
            assert!(
                p.comment().len() <= COMMENT_MAX,
                "{} bytes: {}",
                p.comment().len(),
                p.comment()
            );
            assert_eq!(owner_key(p.comment()), Some(id.key().as_str()));
        }
    }
}

#[test]
fn plan_covers_both_chains_both_families_and_hairpin() {
    let planned = plan(&full(id("c1"))).unwrap();
    let kinds: Vec<(&str, &str)> = planned
        .iter()
        .map(|p| {
            (
                p.chain.name,
                p.comment().split(' ').nth(1).unwrap().split('.').next().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("postrouting", "masq"),
            ("postrouting", "masq"),
            ("prerouting", "dnat"),
            ("output", "dnat"),
            ("postrouting", "hairpin"),
            ("prerouting", "dnat"),
            ("output", "dnat"),
            ("postrouting", "hairpin"),
        ]
    );
    // A mapping whose hostIP is of the other family is skipped; 0.0.0.0 means "any".
    let mut rules = masq_only(id("c1"), "10.22.0.5/24");
    rules.masquerade.clear();
    rules.port_mappings = vec![
        (
            mapping(80, 80, "tcp", Some("fd00::1")),
            "10.22.0.5".parse().unwrap(),
        ),
        (
            mapping(81, 81, "tcp", Some("0.0.0.0")),
            "10.22.0.5".parse().unwrap(),
        ),
    ];
    let planned = plan(&rules).unwrap();
    assert_eq!(planned.len(), 3);
    assert!(
        planned[0].what.contains("local addresses port 81"),
        "{}",
        planned[0].what
    );
    // A duplicate mapping gives no duplicate rule.
    let mut rules = full(id("c1"));
    rules.port_mappings.extend(rules.port_mappings.clone());
    assert_eq!(plan(&rules).unwrap().len(), 8);
}

#[test]
fn bad_input_is_an_invalid_config_error_before_any_write() {
    let mut rules = masq_only(id("c1"), "10.22.0.5/24");
    rules.port_mappings = vec![(mapping(8080, 80, "icmp", None), "10.22.0.5".parse().unwrap())];
    let e = add(&rules).unwrap_err();
    assert_eq!(e.code, Code::InvalidConfig);
    assert!(e.msg.contains("\"icmp\""), "{e}");
    rules.port_mappings = vec![(mapping(0, 80, "tcp", None), "10.22.0.5".parse().unwrap())];
    assert_eq!(add(&rules).unwrap_err().code, Code::InvalidConfig);
    rules.port_mappings.clear();
    rules.mac_spoof_check = Some(("veth0".into(), "0a:58:zz:00:00:01".into()));
    let e = check(&rules).unwrap_err();
    assert_eq!(e.code, Code::InvalidConfig);
    assert!(e.msg.contains("MAC"), "{e}");
    rules.mac_spoof_check = Some(("a/b".into(), "0a:58:0a:00:00:01".into()));
    assert_eq!(add(&rules).unwrap_err().code, Code::InvalidConfig);
    assert_eq!(
        parse_mac("0A-58-0a-00-00-01").unwrap(),
        ("0a:58:0a:00:00:01".to_string(), [0x0a, 0x58, 0x0a, 0, 0, 1])
    );
    assert_eq!(writes(), 0);
}

#[test]
fn empty_rules_touch_nothing() {
    let empty = AttachmentRules {
        id: id("c1"),
        masquerade: Vec::new(),
        port_mappings: Vec::new(),
        mac_spoof_check: None,
    };
    add(&empty).unwrap();
    check(&empty).unwrap();
    // A /0 "subnet" has nothing outside it: nothing to masquerade, nothing to write.
    add(&masq_only(id("c1"), "10.22.0.5/0")).unwrap();
    assert_eq!(writes(), 0);
}

// -----------------------------------------------------------------------------------
// As root, each in a private netns.

#[test]
fn rules_go_to_the_namespace_of_the_calling_thread() {
    if !root_or_skip("rules_go_to_the_namespace_of_the_calling_thread") {
        return;
    }
    let a = Netns::new("fw-a");
    let b = Netns::new("fw-b");
    a.run(|| {
        let thread_ns = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let main_ns = std::fs::read_link(format!("/proc/{}/ns/net", std::process::id())).unwrap();
        assert_ne!(
            thread_ns, main_ns,
            "the test thread must not be in the process's netns"
        );
        add(&masq_only(id("c1"), "10.22.0.5/24")).unwrap();
        assert_eq!(
            attachments_with_rules().unwrap(),
            ["inet ferry-bridge ferry:net1:c1:eth0"]
        );
    });
    b.run(|| assert!(attachments_with_rules().unwrap().is_empty()));
    a.run(|| assert_eq!(attachments_with_rules().unwrap().len(), 1));
}

#[test]
fn add_installs_the_rules_with_the_attachment_comment() {
    if !root_or_skip("add_installs_the_rules_with_the_attachment_comment") {
        return;
    }
    in_netns(|| {
        let rules = full(id(CID));
        add(&rules).unwrap();
        // One transaction creates tables, chains and rules.
        assert_eq!(writes(), 1);
        // Every later attachment is a single write too.
        add(&masq_only(id("second"), "10.22.0.6/24")).unwrap();
        assert_eq!(writes(), 2);
        let key = format!("ferry:net1:{CID}:eth0");
        assert_eq!(owned_by("inet ferry-bridge", &key), 8);
        let text = nft("list table inet ferry-bridge");
        for shape in [
            "type nat hook postrouting priority srcnat; policy accept;",
            "type nat hook prerouting priority dstnat; policy accept;",
            "type nat hook output priority -100; policy accept;",
            "ip saddr 10.22.0.5 ip daddr != 10.22.0.0/24 ip daddr != 224.0.0.0/4 masquerade comment \"ferry:net1:",
            "ip6 saddr fd00::5 ip6 daddr != fd00::/64 ip6 daddr != ff00::/8 masquerade",
            "tcp dport 8080 meta nfproto ipv4 fib daddr type local dnat ip to 10.22.0.5:80",
            "tcp dport 8080 ip daddr != 127.0.0.0/8 fib daddr type local dnat ip to 10.22.0.5:80",
            "tcp dport 8080 meta nfproto ipv6 fib daddr type local dnat ip6 to [fd00::5]:80",
            "tcp dport 8080 ip6 daddr != ::1 fib daddr type local dnat ip6 to [fd00::5]:80",
            "ct status dnat ip saddr 10.22.0.5 ip daddr 10.22.0.5 masquerade",
            "ct status dnat ip6 saddr fd00::5 ip6 daddr fd00::5 masquerade",
        ] {
            assert!(text.contains(shape), "missing {shape:?} in\n{text}");
        }
        // No spoof check asked: no bridge table.
        assert!(!nft("list tables").contains("table bridge"));
        check(&rules).unwrap();

        // DEL then ADD with a changed address: only the new rules remain.
        remove(&rules.id).unwrap();
        assert_eq!(owned_by("inet ferry-bridge", &key), 0);
        let mut moved = full(id(CID));
        moved.masquerade[0] = "10.22.0.9/24".parse().unwrap();
        moved.port_mappings[0].1 = "10.22.0.9".parse().unwrap();
        add(&moved).unwrap();
        assert_eq!(owned_by("inet ferry-bridge", &key), 8);
        let text = nft("list table inet ferry-bridge");
        assert!(
            !text.contains("10.22.0.5") && text.contains("dnat ip to 10.22.0.9:80"),
            "{text}"
        );
        // CHECK against the old description names both what is missing and what is not its.
        let e = check(&rules).unwrap_err();
        assert!(e.msg.contains("missing") && e.msg.contains("unexpected"), "{e}");
    });
}

#[test]
fn remove_removes_exactly_that_attachment() {
    if !root_or_skip("remove_removes_exactly_that_attachment") {
        return;
    }
    in_netns(|| {
        // A foreign table, with a rule whose comment even looks like one of ours.
        nft("add table inet other");
        nft("add chain inet other postrouting { type nat hook postrouting priority 100 ; }");
        Command::new("nft")
            .args(["add rule inet other postrouting ip saddr 10.22.0.5 masquerade comment \"ferry:net1:a:eth0 masq.00000000\""])
            .status()
            .unwrap();
        let foreign = nft("-j list table inet other");
        let (a, b) = (id("a"), id("b"));
        let mut rules_a = full(a);
        rules_a.mac_spoof_check = Some(("veth-a".into(), "0a:58:0a:16:00:05".into()));
        let mut rules_b = full(b);
        rules_b.masquerade = vec!["10.22.0.6/24".parse().unwrap()];
        rules_b.port_mappings = vec![(mapping(9090, 90, "udp", None), "10.22.0.6".parse().unwrap())];
        rules_b.mac_spoof_check = Some(("veth-b".into(), "0a:58:0a:16:00:06".into()));
        add(&rules_a).unwrap();
        add(&rules_b).unwrap();
        assert_eq!(
            attachments_with_rules().unwrap(),
            [
                "bridge ferry-bridge ferry:net1:a:eth0",
                "bridge ferry-bridge ferry:net1:b:eth0",
                "inet ferry-bridge ferry:net1:a:eth0",
                "inet ferry-bridge ferry:net1:b:eth0",
            ]
        );
        let b_before = (comments("inet ferry-bridge"), comments("bridge ferry-bridge"));
        let b_before: Vec<&String> = b_before
            .0
            .iter()
            .chain(&b_before.1)
            .filter(|c| owner_key(c) == Some("ferry:net1:b:eth0"))
            .collect();
        assert_eq!(b_before.len(), 5);

        let before = writes();
        remove(&a).unwrap();
        assert_eq!(writes(), before + 1, "one transaction");
        assert_eq!(
            attachments_with_rules().unwrap(),
            [
                "bridge ferry-bridge ferry:net1:b:eth0",
                "inet ferry-bridge ferry:net1:b:eth0"
            ]
        );
        let after = (comments("inet ferry-bridge"), comments("bridge ferry-bridge"));
        let b_after: Vec<&String> = after.0.iter().chain(&after.1).collect();
        assert_eq!(b_after, b_before);
        assert_eq!(
            nft("-j list table inet other"),
            foreign,
            "the foreign table is untouched"
        );
        check(&rules_b).unwrap();

        // Removing it again, or an attachment that never was, writes nothing.
        let before = writes();
        remove(&a).unwrap();
        remove(&id("never")).unwrap();
        assert_eq!(writes(), before);
    });
}

#[test]
fn remove_without_tables_succeeds_without_a_write() {
    if !root_or_skip("remove_without_tables_succeeds_without_a_write") {
        return;
    }
    in_netns(|| {
        remove(&id("c1")).unwrap();
        remove_stale("net1", &[]).unwrap();
        assert_eq!(writes(), 0);
        assert!(attachments_with_rules().unwrap().is_empty());
        assert_eq!(nft("list ruleset").trim(), "", "nothing was created");
    });
}

#[test]
fn remove_stale_keeps_valid_attachments_and_other_networks() {
    if !root_or_skip("remove_stale_keeps_valid_attachments_and_other_networks") {
        return;
    }
    in_netns(|| {
        let long_net = "a-network-name-that-is-far-too-long-to-stay-readable-in-a-comment-of-nft";
        let ids = [
            AttachmentId {
                network: "net1",
                container_id: "keep",
                ifname: "eth0",
            },
            AttachmentId {
                network: "net1",
                container_id: "keep",
                ifname: "net1",
            },
            AttachmentId {
                network: "net1",
                container_id: "stale",
                ifname: "eth0",
            },
            AttachmentId {
                network: "net1",
                container_id: CID,
                ifname: "eth0",
            },
            AttachmentId {
                network: "net2",
                container_id: "stale",
                ifname: "eth0",
            },
            AttachmentId {
                network: long_net,
                container_id: CID,
                ifname: "eth0",
            },
            AttachmentId {
                network: long_net,
                container_id: "x",
                ifname: "eth0",
            },
        ];
        for (i, id) in ids.iter().enumerate() {
            add(&masq_only(*id, &format!("10.22.0.{}/24", i + 2))).unwrap();
        }
        let valid = [
            Attachment {
                container_id: "keep".into(),
                ifname: "eth0".into(),
            },
            Attachment {
                container_id: "keep".into(),
                ifname: "net1".into(),
            },
        ];
        remove_stale("net1", &valid).unwrap();
        let keys: Vec<String> = attachments_with_rules().unwrap();
        let expect: Vec<String> = [ids[0], ids[1], ids[4], ids[5], ids[6]]
            .iter()
            .map(|id| format!("inet ferry-bridge {}", id.key()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(keys, expect);
        // A network with a hashed name is told apart from the others too.
        remove_stale(
            long_net,
            &[Attachment {
                container_id: CID.into(),
                ifname: "eth0".into(),
            }],
        )
        .unwrap();
        assert_eq!(attachments_with_rules().unwrap().len(), 4);
        assert_eq!(owned_by("inet ferry-bridge", &ids[5].key()), 1);
        // Nothing stale: no write.
        let before = writes();
        remove_stale("net1", &valid).unwrap();
        assert_eq!(writes(), before);
    });
}

#[test]
fn check_names_a_rule_deleted_by_hand() {
    if !root_or_skip("check_names_a_rule_deleted_by_hand") {
        return;
    }
    in_netns(|| {
        let mut rules = full(id(CID));
        rules.mac_spoof_check = Some(("fy0123456789ab".into(), "0a:58:0a:16:00:05".into()));
        add(&rules).unwrap();
        check(&rules).unwrap();
        // Delete the IPv6 prerouting DNAT by its handle, as an operator would.
        let listed = Driver::open().unwrap().rules().unwrap();
        let victim = listed
            .iter()
            .find(|r| r.chain == "prerouting" && r.family == TableFamily::Inet)
            .map(|r| r.handle)
            .unwrap();
        let text = nft("-a list chain inet ferry-bridge prerouting");
        let line = text
            .lines()
            .find(|l| l.ends_with(&format!("# handle {victim}")))
            .unwrap()
            .to_string();
        nft(&format!(
            "delete rule inet ferry-bridge prerouting handle {victim}"
        ));
        let e = check(&rules).unwrap_err();
        assert_eq!(e.code, RULES_DIFFER);
        let target = if line.contains("ip6") {
            "[fd00::5]:80"
        } else {
            "10.22.0.5:80"
        };
        assert!(
            e.msg.contains(&format!(
                "missing: hostPort tcp to local addresses port 8080 -> {target} from outside (chain inet ferry-bridge prerouting)"
            )),
            "{e}"
        );
        assert_eq!(e.msg.matches("missing").count(), 1, "{e}");
        // The bridge table's rule too.
        let bridge = Driver::open()
            .unwrap()
            .rules()
            .unwrap()
            .into_iter()
            .find(|r| r.family == TableFamily::Bridge)
            .unwrap();
        nft(&format!(
            "delete rule bridge ferry-bridge prerouting handle {}",
            bridge.handle
        ));
        let e = check(&rules).unwrap_err();
        assert!(
            e.msg
                .contains("MAC spoof check: frames from fy0123456789ab must come from 0a:58:0a:16:00:05"),
            "{e}"
        );
        // ADD again repairs it.
        add(&rules).unwrap();
        check(&rules).unwrap();
    });
}

#[test]
fn host_ip_mapping_matches_only_that_address() {
    if !root_or_skip("host_ip_mapping_matches_only_that_address") {
        return;
    }
    in_netns(|| {
        let rules = AttachmentRules {
            id: id("c1"),
            masquerade: Vec::new(),
            port_mappings: vec![
                (
                    mapping(8443, 443, "tcp", Some("192.0.2.1")),
                    "10.22.0.5".parse().unwrap(),
                ),
                (
                    mapping(8443, 443, "tcp", Some("192.0.2.1")),
                    "fd00::5".parse().unwrap(),
                ),
                (
                    mapping(5353, 53, "udp", Some("2001:db8::1")),
                    "fd00::5".parse().unwrap(),
                ),
                (mapping(5000, 5000, "sctp", None), "10.22.0.5".parse().unwrap()),
            ],
            mac_spoof_check: None,
        };
        add(&rules).unwrap();
        let text = nft("list table inet ferry-bridge");
        assert!(
            text.contains("tcp dport 8443 ip daddr 192.0.2.1 dnat ip to 10.22.0.5:443"),
            "{text}"
        );
        assert!(
            text.contains("udp dport 5353 ip6 daddr 2001:db8::1 dnat ip6 to [fd00::5]:53"),
            "{text}"
        );
        assert!(
            text.contains("sctp dport 5000 meta nfproto ipv4 fib daddr type local dnat ip to 10.22.0.5:5000")
        );
        assert!(
            !text.contains("fd00::5]:443"),
            "the v4 hostIP is not applied to the v6 address:\n{text}"
        );
        assert_eq!(text.matches("8443").count(), 2, "prerouting and output:\n{text}");
        check(&rules).unwrap();
        remove(&rules.id).unwrap();
        assert!(attachments_with_rules().unwrap().is_empty());
    });
}

#[test]
fn ipv6_masquerade() {
    if !root_or_skip("ipv6_masquerade") {
        return;
    }
    in_netns(|| {
        let rules = masq_only(id(CID), "fd00:10:244:1::17/64");
        add(&rules).unwrap();
        let text = nft("list chain inet ferry-bridge postrouting");
        assert!(
            text.contains(
                "ip6 saddr fd00:10:244:1::17 ip6 daddr != fd00:10:244:1::/64 ip6 daddr != ff00::/8 masquerade"
            ),
            "{text}"
        );
        assert!(!nft("list tables").contains("table bridge"));
        check(&rules).unwrap();
        remove(&rules.id).unwrap();
        assert_eq!(owned_by("inet ferry-bridge", &rules.id.key()), 0);
    });
}

#[test]
fn mac_spoof_check_lives_in_the_bridge_table() {
    if !root_or_skip("mac_spoof_check_lives_in_the_bridge_table") {
        return;
    }
    in_netns(|| {
        let rules = AttachmentRules {
            id: id(CID),
            masquerade: Vec::new(),
            port_mappings: Vec::new(),
            mac_spoof_check: Some(("fy0123456789ab".into(), "0A:58:0A:16:00:05".into())),
        };
        add(&rules).unwrap();
        let text = nft("list table bridge ferry-bridge");
        assert!(
            text.contains("type filter hook prerouting priority dstnat; policy accept;"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "iifname \"fy0123456789ab\" ether saddr != 0a:58:0a:16:00:05 drop comment \"ferry:net1:{CID}:eth0 mac."
            )),
            "{text}"
        );
        check(&rules).unwrap();
        remove(&rules.id).unwrap();
        assert!(attachments_with_rules().unwrap().is_empty());
    });
}

#[test]
fn a_long_network_name_uses_the_hashed_key() {
    if !root_or_skip("a_long_network_name_uses_the_hashed_key") {
        return;
    }
    in_netns(|| {
        let network = "n".repeat(90);
        let id = AttachmentId {
            network: &network,
            container_id: CID,
            ifname: "eth0",
        };
        let mut rules = full(id);
        rules.mac_spoof_check = Some(("fy0123456789ab".into(), "0a:58:0a:16:00:05".into()));
        add(&rules).unwrap();
        let all: Vec<String> = [comments("inet ferry-bridge"), comments("bridge ferry-bridge")].concat();
        assert_eq!(all.len(), 9);
        assert!(
            all.iter()
                .all(|c| c.len() <= COMMENT_MAX && owner_key(c) == Some(id.key().as_str())),
            "{all:?}"
        );
        check(&rules).unwrap();
        remove(&id).unwrap();
        assert!(attachments_with_rules().unwrap().is_empty());
    });
}

/// The oracle: each of the bridge's rule shapes, printed as nft text ([`nft_script`]) and
/// loaded by `nft -f` in one namespace, lists (`nft list ruleset`) exactly as what [`add`]
/// programs over netlink in another.
#[test]
fn rules_list_as_nft_lists_their_text() {
    if !root_or_skip("rules_list_as_nft_lists_their_text") {
        return;
    }
    let v4: IpAddr = "10.22.0.5".parse().unwrap();
    let v6: IpAddr = "fd00::5".parse().unwrap();
    let with_ports = |ports: Vec<(PortMapping, IpAddr)>| AttachmentRules {
        id: id(CID),
        masquerade: Vec::new(),
        port_mappings: ports,
        mac_spoof_check: None,
    };
    let mut everything = full(id(CID));
    everything.mac_spoof_check = Some(("fy0123456789ab".into(), "0a:58:0a:16:00:05".into()));
    let cases = [
        ("masquerade v4", masq_only(id(CID), "10.22.0.5/24")),
        ("masquerade v6", masq_only(id(CID), "fd00:10:244:1::17/64")),
        (
            "hostPort without hostIP, with hairpin",
            with_ports(vec![
                (mapping(8080, 80, "tcp", None), v4),
                (mapping(8080, 80, "tcp", None), v6),
                (mapping(5000, 5000, "sctp", Some("0.0.0.0")), v4),
            ]),
        ),
        (
            "hostPort with hostIP",
            with_ports(vec![
                (mapping(8443, 443, "tcp", Some("192.0.2.1")), v4),
                (mapping(5353, 53, "udp", Some("2001:db8::1")), v6),
            ]),
        ),
        (
            "macspoofchk",
            AttachmentRules {
                mac_spoof_check: Some(("fy0123456789ab".into(), "0A:58:0A:16:00:05".into())),
                ..with_ports(Vec::new())
            },
        ),
        ("all of them", everything),
    ];
    for (label, rules) in cases {
        let text = nft_script(&rules).unwrap();
        let theirs = Netns::new("fw-nft");
        let ours = Netns::new("fw-netlink");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &text).unwrap();
        theirs.exec_ok(&["nft", "-f", file.path().to_str().unwrap()]);
        ours.run(|| add(&rules)).unwrap();
        let want = theirs.exec_ok(&["nft", "list", "ruleset"]);
        let got = ours.exec_ok(&["nft", "list", "ruleset"]);
        assert_eq!(
            got, want,
            "{label}: netlink and nft -f differ; the text was\n{text}"
        );
        assert_eq!(
            got.matches(" comment \"ferry:").count(),
            plan(&rules).unwrap().len(),
            "{label}:\n{got}"
        );
    }
}

// -----------------------------------------------------------------------------------
// Real packets: node, pod and outside namespaces.

/// Binds, retrying briefly while the port is in use: a socket just closed may live on
/// for a moment in a process another test thread is spawning (the copy of our file
/// table it holds until exec closes the close-on-exec descriptors).
fn bind_retrying<T>(bind: impl Fn() -> std::io::Result<T>) -> std::io::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match bind() {
            Err(e) if e.kind() == ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            other => return other,
        }
    }
}

/// The peer address a listener at `server` sees when `client` connects to `to`, or the
/// connect error.
fn tcp_peer(server: &Netns, bind: &str, client: &Netns, to: &str) -> Result<IpAddr, String> {
    let listener = server
        .run(|| bind_retrying(|| TcpListener::bind(bind)))
        .map_err(|e| format!("bind {bind}: {e}"))?;
    let to: SocketAddr = to.parse().unwrap();
    let stream = client.run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)));
    let _stream = stream.map_err(|e| format!("connect {to}: {e}"))?;
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match listener.accept() {
            Ok((_, peer)) => return Ok(peer.ip().to_canonical()),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(format!("connected to {to} but {bind} accepted nothing: {e}")),
        }
    }
}

fn udp_peer(server: &Netns, bind: &str, client: &Netns, to: &str) -> Result<IpAddr, String> {
    let socket = server.run(|| bind_retrying(|| UdpSocket::bind(bind))).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    client.run(|| {
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.send_to(b"ping", to).unwrap();
    });
    let mut buf = [0u8; 16];
    socket
        .recv_from(&mut buf)
        .map(|(_, peer)| peer.ip())
        .map_err(|e| format!("udp to {to}: {e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Three namespaces: the node, a pod behind it (routed veth, as on the bridge) and a
/// host outside (which can route back to the pod subnet, so un-NATed traffic works too).
fn topology() -> (Netns, Netns, Netns) {
    let (node, pod, out) = (Netns::new("fw"), Netns::new("fw"), Netns::new("fw"));
    for ns in [&node, &pod, &out] {
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
        ns.sh("ip link set lo up");
    }
    node.sh(&format!(
        "ip link add to-pod type veth peer name eth0 netns {}",
        pod.path().display()
    ));
    node.sh(&format!(
        "ip link add to-out type veth peer name eth0 netns {}",
        out.path().display()
    ));
    for cmd in [
        "ip addr add 10.99.0.1/24 dev to-pod",
        "ip addr add fd00:99::1/64 dev to-pod nodad",
        "ip addr add 192.0.2.1/24 dev to-out",
        "ip addr add 2001:db8::1/64 dev to-out nodad",
        "ip link set to-pod up",
        "ip link set to-out up",
    ] {
        node.sh(cmd);
    }
    node.sysctl("net.ipv4.ip_forward", "1");
    node.sysctl("net.ipv6.conf.all.forwarding", "1");
    for cmd in [
        "ip addr add 10.99.0.2/24 dev eth0",
        "ip addr add fd00:99::2/64 dev eth0 nodad",
        "ip link set eth0 up",
        "ip route add default via 10.99.0.1",
        "ip -6 route add default via fd00:99::1",
    ] {
        pod.sh(cmd);
    }
    for cmd in [
        "ip addr add 192.0.2.2/24 dev eth0",
        "ip addr add 2001:db8::2/64 dev eth0 nodad",
        "ip link set eth0 up",
        "ip route add 10.99.0.0/24 via 192.0.2.1",
        "ip -6 route add fd00:99::/64 via 2001:db8::1",
    ] {
        out.sh(cmd);
    }
    (node, pod, out)
}

#[test]
fn packets_are_masqueraded_and_host_ports_reach_the_pod() {
    if !root_or_skip("packets_are_masqueraded_and_host_ports_reach_the_pod") {
        return;
    }
    let (node, pod, out) = topology();
    // Before any rule: the outside sees the pod's own addresses.
    assert_eq!(
        tcp_peer(&out, "0.0.0.0:7000", &pod, "192.0.2.2:7000"),
        Ok(ip("10.99.0.2"))
    );
    assert_eq!(
        tcp_peer(&out, "[::]:7000", &pod, "[2001:db8::2]:7000"),
        Ok(ip("fd00:99::2"))
    );

    let rules = AttachmentRules {
        id: AttachmentId {
            network: "net1",
            container_id: CID,
            ifname: "eth0",
        },
        masquerade: vec!["10.99.0.2/24".parse().unwrap(), "fd00:99::2/64".parse().unwrap()],
        port_mappings: vec![
            (mapping(8080, 80, "tcp", None), ip("10.99.0.2")),
            (mapping(8080, 80, "tcp", None), ip("fd00:99::2")),
            (mapping(8081, 81, "tcp", Some("192.0.2.1")), ip("10.99.0.2")),
            (mapping(8053, 53, "udp", None), ip("10.99.0.2")),
        ],
        mac_spoof_check: None,
    };
    node.run(|| add(&rules)).unwrap();

    // Masquerade: the outside sees the node's outside address.
    assert_eq!(
        tcp_peer(&out, "0.0.0.0:7000", &pod, "192.0.2.2:7000"),
        Ok(ip("192.0.2.1"))
    );
    assert_eq!(
        tcp_peer(&out, "[::]:7000", &pod, "[2001:db8::2]:7000"),
        Ok(ip("2001:db8::1"))
    );
    // Traffic inside the pod subnet is not masqueraded.
    assert_eq!(
        tcp_peer(&node, "10.99.0.1:7001", &pod, "10.99.0.1:7001"),
        Ok(ip("10.99.0.2"))
    );
    // hostPort from outside, both families: the pod sees the client.
    assert_eq!(
        tcp_peer(&pod, "[::]:80", &out, "192.0.2.1:8080"),
        Ok(ip("192.0.2.2"))
    );
    assert_eq!(
        tcp_peer(&pod, "[::]:80", &out, "[2001:db8::1]:8080"),
        Ok(ip("2001:db8::2"))
    );
    // hostPort on another local address of the node, from outside through the node.
    assert_eq!(
        tcp_peer(&pod, "[::]:80", &out, "10.99.0.1:8080"),
        Ok(ip("192.0.2.2"))
    );
    // hostPort from the node itself (output chain).
    assert_eq!(
        tcp_peer(&pod, "[::]:80", &node, "192.0.2.1:8080"),
        Ok(ip("192.0.2.1"))
    );
    assert_eq!(
        tcp_peer(&pod, "[::]:80", &node, "[2001:db8::1]:8080"),
        Ok(ip("2001:db8::1"))
    );
    // Hairpin: the pod reaches its own hostPort, masqueraded to the node's address.
    assert_eq!(
        tcp_peer(&pod, "[::]:80", &pod, "192.0.2.1:8080"),
        Ok(ip("10.99.0.1"))
    );
    assert_eq!(
        tcp_peer(&pod, "[::]:80", &pod, "[2001:db8::1]:8080"),
        Ok(ip("fd00:99::1"))
    );
    // Loopback is left alone: a node-local service on 127.0.0.1:8080 keeps its port.
    assert_eq!(
        tcp_peer(&node, "127.0.0.1:8080", &node, "127.0.0.1:8080"),
        Ok(ip("127.0.0.1"))
    );
    // hostIP: only that destination is mapped.
    assert_eq!(
        tcp_peer(&pod, "[::]:81", &out, "192.0.2.1:8081"),
        Ok(ip("192.0.2.2"))
    );
    let other = tcp_peer(&pod, "[::]:81", &out, "10.99.0.1:8081");
    assert!(other.as_ref().is_err_and(|e| e.contains("refused")), "{other:?}");
    // UDP.
    assert_eq!(
        udp_peer(&pod, "0.0.0.0:53", &out, "192.0.2.1:8053"),
        Ok(ip("192.0.2.2"))
    );

    node.run(|| remove(&rules.id)).unwrap();
    assert_eq!(
        tcp_peer(&out, "0.0.0.0:7000", &pod, "192.0.2.2:7000"),
        Ok(ip("10.99.0.2"))
    );
    assert_eq!(
        tcp_peer(&out, "[::]:7000", &pod, "[2001:db8::2]:7000"),
        Ok(ip("fd00:99::2"))
    );
    let gone = tcp_peer(&pod, "[::]:80", &out, "192.0.2.1:8080");
    assert!(gone.as_ref().is_err_and(|e| e.contains("refused")), "{gone:?}");
}

#[test]
fn spoofed_frames_are_dropped_at_the_bridge() {
    if !root_or_skip("spoofed_frames_are_dropped_at_the_bridge") {
        return;
    }
    let (node, pod) = (Netns::new("fw"), Netns::new("fw"));
    node.sh("ip link add br0 type bridge");
    node.sh(&format!(
        "ip link add fyhost type veth peer name eth0 netns {}",
        pod.path().display()
    ));
    for cmd in [
        "ip link set fyhost master br0",
        "ip addr add 10.98.0.1/24 dev br0",
        "ip link set br0 up",
    ] {
        node.sh(cmd);
    }
    node.sh("ip link set fyhost up");
    for cmd in [
        "ip link set eth0 address 0a:58:0a:62:00:02",
        "ip addr add 10.98.0.2/24 dev eth0",
        "ip link set eth0 up",
    ] {
        pod.sh(cmd);
    }
    let rules = AttachmentRules {
        id: id("c1"),
        masquerade: Vec::new(),
        port_mappings: Vec::new(),
        mac_spoof_check: Some(("fyhost".into(), "0a:58:0a:62:00:02".into())),
    };
    node.run(|| add(&rules)).unwrap();
    assert_eq!(
        tcp_peer(&node, "10.98.0.1:9000", &pod, "10.98.0.1:9000"),
        Ok(ip("10.98.0.2"))
    );
    pod.sh("ip link set eth0 address 0a:58:0a:62:00:66");
    pod.sh("ip neigh flush all");
    node.sh("ip neigh flush all");
    let spoofed = tcp_peer(&node, "10.98.0.1:9000", &pod, "10.98.0.1:9000");
    assert!(
        spoofed.is_err(),
        "a frame from a spoofed MAC got through: {spoofed:?}"
    );
    node.run(|| remove(&rules.id)).unwrap();
    pod.sh("ip neigh flush all");
    assert_eq!(
        tcp_peer(&node, "10.98.0.1:9000", &pod, "10.98.0.1:9000"),
        Ok(ip("10.98.0.2"))
    );
}

// -----------------------------------------------------------------------------------
// Timing (printed, not asserted: run with --nocapture to see it).

#[test]
#[ignore = "benchmark: cargo test -p ferry-bridge --release --lib firewall::tests::timing -- --ignored --nocapture"]
fn timing_of_add_and_remove() {
    if !root_or_skip("timing_of_add_and_remove") {
        return;
    }
    fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[v.len() / 2]
    }
    in_netns(|| {
        let ids: Vec<String> = (0..50).map(|i| format!("{CID:.60}{i:04}")).collect();
        let measure = |label: &str| {
            let (mut adds, mut checks, mut readds, mut removes) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            // A deleting call leaves the release of its socket, ~10 ms of kernel work under
            // the commit lock, to a detached process (see driver.rs): the next write would
            // wait for it. Each write is timed after that is over, as CNI calls of one Pod
            // are apart; the back-to-back figure shows the other case.
            let settle = || std::thread::sleep(Duration::from_millis(30));
            for cid in &ids {
                let mut rules = full(id(cid));
                rules.port_mappings.pop();
                settle();
                let t = Instant::now();
                add(&rules).unwrap();
                adds.push(t.elapsed());
                let t = Instant::now();
                check(&rules).unwrap();
                checks.push(t.elapsed());
                let t = Instant::now();
                add(&rules).unwrap();
                readds.push(t.elapsed());
                settle();
                let t = Instant::now();
                remove(&rules.id).unwrap();
                removes.push(t.elapsed());
            }
            settle();
            let rules = full(id("back-to-back"));
            let t = Instant::now();
            add(&rules).unwrap();
            remove(&rules.id).unwrap();
            add(&rules).unwrap();
            let back_to_back = t.elapsed();
            remove(&rules.id).unwrap();
            eprintln!(
                "firewall timing ({label}, median of 50): add {:?}, check {:?}, add again (replaces) {:?}, \
                 remove {:?}; add, remove, add back to back {:?}",
                median(adds),
                median(checks),
                median(readds),
                median(removes),
                back_to_back
            );
        };
        measure("empty tables");
        for i in 0..200 {
            add(&masq_only(id(&format!("other{i}")), "10.22.0.5/24")).unwrap();
        }
        measure("200 other attachments");
    });
}
