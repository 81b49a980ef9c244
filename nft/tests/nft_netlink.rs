//! nftables over netlink (`ferry_nft`), checked against nft itself.
//!
//! - `encodings_are_what_nft_sends` (no root): the messages of a batch are compared with
//!   the ones nft 1.0.6 sent for the same nft text ([`GOLDEN_NFT`]), captured with
//!   `strace -f -e trace=sendmsg -e write=all nft -f golden.nft`.
//! - The other tests need root: each builds its table through the API in a fresh netns
//!   and asserts what `nft list table` prints, or how a failing batch is reported.
//! - The last section does the same for [`Rule`]s, comments, the bridge family and rule
//!   listing (what ferry-bridge uses): `rule_encodings_are_what_nft_sends` against
//!   [`GOLDEN_RULES`], and the oracle `rules_list_as_nft_lists_its_own`.
//!
//! `FERRY_REQUIRE_ROOT=1 cargo test -p ferry-nft --test nft_netlink`; the timing test:
//! `cargo test --release -p ferry-nft --test nft_netlink -- --ignored --nocapture`.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ferry_nft::*;
use ferry_tests::{require_root, Netns};

const MARK: u32 = 0x4000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ipb(s: &str) -> Vec<u8> {
    ip_bytes(ip(s))
}

fn chain(name: &str) -> String {
    name.to_string()
}

/// `ip saddr != @set` / `ip saddr @set` (v4) or the ip6 equivalents.
fn saddr_in(family: Family, set: &str, invert: bool) -> Vec<Expr> {
    let mut e = match_family(family).to_vec();
    e.push(ip_addr(family, Addr::Saddr, Reg::R32(0)));
    e.push(Expr::Lookup {
        sreg: Reg::R32(0),
        set: set.into(),
        dreg: None,
        invert,
    });
    e
}

/// `numgen random mod <m> offset <o> map @<map>` then `dnat ip|ip6 to` it.
fn dnat_numgen_map(family: Family, proto: u8, modulus: u32, offset: u32, map: &str) -> Vec<Expr> {
    let mut e = match_l4proto(proto).to_vec();
    e.push(Expr::Numgen {
        dreg: Reg::R32(0),
        modulus,
        offset,
    });
    e.push(Expr::Lookup {
        sreg: Reg::R32(0),
        set: map.into(),
        dreg: Some(Reg::R32(0)),
        invert: false,
    });
    // The address fills 1 or 4 registers; the port follows it.
    let port_reg = Reg::R32(family.addr_len() as u8 / 4);
    e.push(Expr::Nat {
        kind: NatKind::Dnat,
        family,
        addr: Some(Reg::R32(0)),
        proto: Some(port_reg),
        flags: 0,
    });
    e
}

/// `dnat ip|ip6 to <addr>:<port>` (nft loads the port into the second 128-bit register).
fn dnat_to(addr: &str, port: u16) -> Vec<Expr> {
    let a = ip(addr);
    let family = if a.is_ipv4() { Family::Ipv4 } else { Family::Ipv6 };
    vec![
        Expr::Immediate {
            dreg: Reg::R32(0),
            data: ip_bytes(a),
        },
        Expr::Immediate {
            dreg: Reg::R32(4),
            data: port_bytes(port).to_vec(),
        },
        Expr::Nat {
            kind: NatKind::Dnat,
            family,
            addr: Some(Reg::R32(0)),
            proto: Some(Reg::R32(4)),
            flags: NAT_PROTO_SPECIFIED,
        },
    ]
}

/// `update @set { ip saddr }`.
fn update_saddr(set: &str) -> Vec<Expr> {
    vec![
        ip_addr(Family::Ipv4, Addr::Saddr, Reg::R32(0)),
        Expr::Dynset {
            op: DynsetOp::Update,
            set: set.into(),
            sreg_key: Reg::R32(0),
            timeout: None,
        },
    ]
}

/// `ip daddr . meta l4proto . th dport vmap @map` (or ip6).
fn service_vmap(family: Family, map: &str) -> Vec<Expr> {
    let next = family.addr_len() as u8 / 4;
    let mut e = match_family(family).to_vec();
    e.extend([
        ip_addr(family, Addr::Daddr, Reg::R32(0)),
        Expr::Meta {
            key: MetaKey::L4Proto,
            dreg: Reg::R32(next),
        },
        th_dport(Reg::R32(next + 1)),
        Expr::Lookup {
            sreg: Reg::R32(0),
            set: map.into(),
            dreg: Some(Reg::Verdict),
            invert: false,
        },
    ]);
    e
}

/// `meta l4proto . th dport vmap @map`.
fn nodeport_vmap(map: &str) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: MetaKey::L4Proto,
            dreg: Reg::R32(0),
        },
        th_dport(Reg::R32(1)),
        Expr::Lookup {
            sreg: Reg::R32(0),
            set: map.into(),
            dreg: Some(Reg::Verdict),
            invert: false,
        },
    ]
}

fn with(mut a: Vec<Expr>, b: impl IntoIterator<Item = Expr>) -> Vec<Expr> {
    a.extend(b);
    a
}

fn verdict(v: Verdict) -> Expr {
    Expr::Verdict(v)
}

fn vmap(name: &str, key: Vec<DataType>) -> SetSpec {
    SetSpec {
        data: Some(vec![DataType::Verdict]),
        ..SetSpec::new(name, key)
    }
}

fn endpoints_map(name: &str, family: Family) -> SetSpec {
    let addr = match family {
        Family::Ipv4 => Typeof::IpDaddr,
        Family::Ipv6 => Typeof::Ip6Daddr,
    };
    SetSpec {
        data: Some(vec![DataType::Typeof(addr), DataType::Typeof(Typeof::ThDport)]),
        ..SetSpec::new(name, vec![DataType::Typeof(Typeof::NumgenRandom)])
    }
}

fn affinity_set(name: &str) -> SetSpec {
    SetSpec {
        dynamic: true,
        timeout: Some(Duration::from_secs(10800)),
        ..SetSpec::new(name, vec![DataType::Ipv4Addr])
    }
}

fn interval_set(name: &str, addr: DataType) -> SetSpec {
    SetSpec {
        interval: true,
        ..SetSpec::new(name, vec![addr])
    }
}

/// The rules of chain `c` in [`GOLDEN_NFT`], in order, with the line nft lists for each.
fn golden_rules() -> Vec<(Vec<Expr>, &'static str)> {
    use Family::{Ipv4, Ipv6};
    let x = || chain("X");
    vec![
        (
            with(saddr_in(Ipv4, "cluster-cidrs-v4", true), mark_set(MARK, false)),
            "ip saddr != @cluster-cidrs-v4 meta mark set meta mark | 0x00004000",
        ),
        (
            dnat_numgen_map(Ipv4, IPPROTO_TCP, 10, 300, "e4"),
            "meta l4proto tcp dnat ip to numgen random mod 10 offset 300 map @e4",
        ),
        (
            dnat_numgen_map(Ipv6, IPPROTO_TCP, 10, 300, "e6"),
            "meta l4proto tcp dnat ip6 to numgen random mod 10 offset 300 map @e6",
        ),
        (
            with(match_l4proto(IPPROTO_UDP).to_vec(), dnat_to("10.0.0.1", 8080)),
            "meta l4proto udp dnat ip to 10.0.0.1:8080",
        ),
        (
            with(match_l4proto(IPPROTO_UDP).to_vec(), dnat_to("fd00::1", 8080)),
            "meta l4proto udp dnat ip6 to [fd00::1]:8080",
        ),
        (
            with(
                with(with(saddr_in(Ipv4, "S", false), update_saddr("S")), match_l4proto(IPPROTO_TCP)),
                dnat_to("10.0.0.1", 80),
            ),
            "ip saddr @S update @S { ip saddr } meta l4proto tcp dnat ip to 10.0.0.1:80",
        ),
        (
            with(
                with(
                    with(
                        vec![
                            Expr::Numgen {
                                dreg: Reg::R32(0),
                                modulus: 3,
                                offset: 0,
                            },
                            Expr::Cmp {
                                sreg: Reg::R32(0),
                                op: CmpOp::Eq,
                                data: u32_bytes(0).to_vec(),
                            },
                        ],
                        with(match_family(Ipv4).to_vec(), update_saddr("S")),
                    ),
                    match_l4proto(IPPROTO_TCP),
                ),
                dnat_to("10.0.0.2", 80),
            ),
            // nft 1.0.6 prints `numgen ... == 0` without its `==`.
            "numgen random mod 3 0 update @S { ip saddr } meta l4proto tcp dnat ip to 10.0.0.2:80",
        ),
        (
            service_vmap(Ipv4, "service-ips-v4"),
            "ip daddr . meta l4proto . th dport vmap @service-ips-v4",
        ),
        (
            service_vmap(Ipv6, "service-ips-v6"),
            "ip6 daddr . meta l4proto . th dport vmap @service-ips-v6",
        ),
        (
            with(
                with(
                    match_fib_local(FIB_DADDR).to_vec(),
                    match_prefix(Ipv4, Addr::Daddr, &ipb("127.0.0.0"), 8, CmpOp::Neq),
                ),
                nodeport_vmap("service-nodeports-v4"),
            ),
            "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports-v4",
        ),
        (
            with(
                with(
                    with(
                        match_family(Ipv4).to_vec(),
                        [
                            ip_addr(Ipv4, Addr::Daddr, Reg::R32(0)),
                            Expr::Lookup {
                                sreg: Reg::R32(0),
                                set: "cluster-cidrs-v4".into(),
                                dreg: None,
                                invert: false,
                            },
                        ],
                    ),
                    match_fib_local(FIB_DADDR),
                ),
                nodeport_vmap("service-nodeports-v4"),
            ),
            "ip daddr @cluster-cidrs-v4 fib daddr type local meta l4proto . th dport vmap @service-nodeports-v4",
        ),
        (
            with(
                match_prefix(Ipv6, Addr::Daddr, &ipb("::1"), 128, CmpOp::Neq),
                nodeport_vmap("service-nodeports-v4"),
            ),
            "ip6 daddr != ::1 meta l4proto . th dport vmap @service-nodeports-v4",
        ),
        (
            with(
                match_prefix(Ipv4, Addr::Saddr, &ipb("10.0.0.0"), 8, CmpOp::Eq),
                [verdict(Verdict::Return)],
            ),
            "ip saddr 10.0.0.0/8 return",
        ),
        (
            with(
                match_prefix(Ipv4, Addr::Saddr, &ipb("10.96.0.0"), 12, CmpOp::Eq),
                [verdict(Verdict::Return)],
            ),
            "ip saddr 10.96.0.0/12 return",
        ),
        (vec![verdict(Verdict::Drop)], "drop"),
        (vec![verdict(Verdict::Goto(x()))], "goto X"),
        (vec![verdict(Verdict::Jump(x()))], "jump X"),
        (
            with(match_fib_local(FIB_SADDR).to_vec(), [verdict(Verdict::Goto(x()))]),
            "fib saddr type local goto X",
        ),
        (
            with(saddr_in(Ipv4, "cluster-cidrs-v4", false), [verdict(Verdict::Goto(x()))]),
            "ip saddr @cluster-cidrs-v4 goto X",
        ),
        (
            with(
                match_l4proto(IPPROTO_TCP).to_vec(),
                [Expr::Reject {
                    kind: RejectKind::TcpReset,
                }],
            ),
            "meta l4proto tcp reject with tcp reset",
        ),
        (
            vec![Expr::Reject {
                kind: RejectKind::IcmpxPortUnreachable,
            }],
            "reject",
        ),
        (mark_set(MARK, false).to_vec(), "meta mark set meta mark | 0x00004000"),
        (
            vec![
                Expr::Meta {
                    key: MetaKey::Mark,
                    dreg: Reg::R32(0),
                },
                Expr::Bitwise {
                    sreg: Reg::R32(0),
                    dreg: Reg::R32(0),
                    len: 4,
                    mask: u32_bytes(MARK).to_vec(),
                    xor: u32_bytes(0).to_vec(),
                },
                Expr::Cmp {
                    sreg: Reg::R32(0),
                    op: CmpOp::Eq,
                    data: u32_bytes(0).to_vec(),
                },
                verdict(Verdict::Return),
            ],
            "meta mark & 0x00004000 == 0x00000000 return",
        ),
        (mark_set(MARK, true).to_vec(), "meta mark set meta mark ^ 0x00004000"),
        (
            vec![Expr::Masquerade {
                flags: NAT_FULLY_RANDOM,
            }],
            "masquerade fully-random",
        ),
        (
            with(
                with(match_ct_bits(CtKey::Status, CT_STATUS_DNAT).to_vec(), match_family(Ipv4)),
                [
                    ip_addr(Ipv4, Addr::Saddr, Reg::R32(0)),
                    ip_addr(Ipv4, Addr::Daddr, Reg::R32(1)),
                    Expr::Lookup {
                        sreg: Reg::R32(0),
                        set: "hairpin-v4".into(),
                        dreg: None,
                        invert: false,
                    },
                    Expr::Masquerade {
                        flags: NAT_FULLY_RANDOM,
                    },
                ],
            ),
            "ct status dnat ip saddr . ip daddr @hairpin-v4 masquerade fully-random",
        ),
        (
            with(
                match_ct_bits(CtKey::State, CT_STATE_NEW).to_vec(),
                [verdict(Verdict::Jump(chain("firewall-check")))],
            ),
            "ct state new jump firewall-check",
        ),
        (vec![Expr::Counter], "counter packets 0 bytes 0"),
    ]
}

/// [`GOLDEN_NFT`] through the API, message for message in nft's order: table, chains,
/// sets, rules, elements.
fn golden_batch(table: &str) -> Batch {
    use DataType::{InetProto, InetService, Ipv4Addr, Ipv6Addr};
    let mut b = Batch::new(table);
    b.add_table();
    b.add_chain("X", None);
    b.add_chain("firewall-check", None);
    let base = |kind, hook, priority| BaseChain { kind, hook, priority };
    b.add_chain(
        "nat-prerouting",
        Some(&base(ChainType::Nat, Hook::Prerouting, -100)),
    );
    b.add_chain("filter-input", Some(&base(ChainType::Filter, Hook::Input, -110)));
    b.add_chain(
        "nat-postrouting",
        Some(&base(ChainType::Nat, Hook::Postrouting, 100)),
    );
    b.add_chain("c", None);
    b.add_set(&interval_set("cluster-cidrs-v4", Ipv4Addr));
    b.add_set(&affinity_set("S"));
    b.add_set(&SetSpec::new("hairpin-v4", vec![Ipv4Addr, Ipv4Addr]));
    b.add_set(&vmap("service-ips-v4", vec![Ipv4Addr, InetProto, InetService]));
    b.add_set(&vmap("service-ips-v6", vec![Ipv6Addr, InetProto, InetService]));
    b.add_set(&vmap("service-nodeports-v4", vec![InetProto, InetService]));
    b.add_set(&endpoints_map("e4", Family::Ipv4));
    b.add_set(&endpoints_map("e6", Family::Ipv6));
    for (rule, _) in golden_rules() {
        b.add_rule("c", &rule);
    }
    b.add_elements(
        "cluster-cidrs-v4",
        &[
            Element::prefix(ip("10.0.0.0"), 8),
            Element::prefix(ip("224.0.0.0"), 3),
        ],
    );
    b.add_elements(
        "service-ips-v4",
        &[Element::verdict(
            concat(&[&ipb("10.96.0.1"), &proto_bytes(IPPROTO_TCP), &port_bytes(80)]),
            Verdict::Goto(chain("X")),
        )],
    );
    let ep = |addr: &str, port: u16| concat(&[&ipb(addr), &port_bytes(port)]);
    b.add_elements("e4", &[Element::value(u32_bytes(0), ep("10.1.2.3", 8080))]);
    b.add_elements("e6", &[Element::value(u32_bytes(0), ep("fd00::1", 8080))]);
    b.add_elements(
        "hairpin-v4",
        &[Element::key(concat(&[&ipb("10.1.2.3"), &ipb("10.1.2.3")]))],
    );
    b
}

/// The nft text the golden batch mirrors.
const GOLDEN_NFT: &str = r#"table inet t {
  set cluster-cidrs-v4 { type ipv4_addr; flags interval; }
  set S { type ipv4_addr; flags dynamic,timeout; timeout 3h; }
  set hairpin-v4 { type ipv4_addr . ipv4_addr; }
  map service-ips-v4 { type ipv4_addr . inet_proto . inet_service : verdict; }
  map service-ips-v6 { type ipv6_addr . inet_proto . inet_service : verdict; }
  map service-nodeports-v4 { type inet_proto . inet_service : verdict; }
  map e4 { typeof numgen random mod 1 : ip daddr . th dport; }
  map e6 { typeof numgen random mod 1 : ip6 daddr . th dport; }
  chain X { }
  chain firewall-check { }
  chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; }
  chain filter-input { type filter hook input priority -110; policy accept; }
  chain nat-postrouting { type nat hook postrouting priority srcnat; policy accept; }
  chain c {
    ip saddr != @cluster-cidrs-v4 meta mark set meta mark | 0x00004000
    meta l4proto tcp dnat ip to numgen random mod 10 offset 300 map @e4
    meta l4proto tcp dnat ip6 to numgen random mod 10 offset 300 map @e6
    meta l4proto udp dnat ip to 10.0.0.1:8080
    meta l4proto udp dnat ip6 to [fd00::1]:8080
    ip saddr @S update @S { ip saddr } meta l4proto tcp dnat ip to 10.0.0.1:80
    numgen random mod 3 == 0 update @S { ip saddr } meta l4proto tcp dnat ip to 10.0.0.2:80
    ip daddr . meta l4proto . th dport vmap @service-ips-v4
    ip6 daddr . meta l4proto . th dport vmap @service-ips-v6
    fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports-v4
    ip daddr @cluster-cidrs-v4 fib daddr type local meta l4proto . th dport vmap @service-nodeports-v4
    ip6 daddr != ::1 meta l4proto . th dport vmap @service-nodeports-v4
    ip saddr 10.0.0.0/8 return
    ip saddr 10.96.0.0/12 return
    drop
    goto X
    jump X
    fib saddr type local goto X
    ip saddr @cluster-cidrs-v4 goto X
    meta l4proto tcp reject with tcp reset
    reject
    meta mark set meta mark | 0x00004000
    meta mark & 0x00004000 == 0x00000000 return
    meta mark set meta mark ^ 0x00004000
    masquerade fully-random
    ct status dnat ip saddr . ip daddr @hairpin-v4 masquerade fully-random
    ct state new jump firewall-check
    counter
  }
}
add element inet t cluster-cidrs-v4 { 10.0.0.0/8, 224.0.0.0/3 }
add element inet t service-ips-v4 { 10.96.0.1 . tcp . 80 : goto X }
add element inet t e4 { 0 : 10.1.2.3 . 8080 }
add element inet t e6 { 0 : fd00::1 . 8080 }
add element inet t hairpin-v4 { 10.1.2.3 . 10.1.2.3 }
"#;

/// What nft 1.0.6 sent for [`GOLDEN_NFT`]: (message type, attributes after the nfgenmsg
/// header, hex), in order.
const GOLDEN: &[(&str, &str)] = &[
    ("NEWTABLE", "06000100740000000800020000000000"),
    ("NEWCHAIN", "06000100740000000600030058000000"),
    ("NEWCHAIN", "0600010074000000130003006669726577616c6c2d636865636b0000"),
    ("NEWCHAIN", "0600010074000000130003006e61742d707265726f7574696e670000080007006e617400080005000000000114000480080001000000000008000200ffffff9c"),
    ("NEWCHAIN", "06000100740000001100030066696c7465722d696e707574000000000b00070066696c7465720000080005000000000114000480080001000000000108000200ffffff92"),
    ("NEWCHAIN", "0600010074000000140003006e61742d706f7374726f7574696e6700080007006e61740008000500000000011400048008000100000000040800020000000064"),
    ("NEWCHAIN", "06000100740000000600030063000000"),
    ("NEWSET", "060001007400000015000200636c75737465722d63696472732d76340000000008000300000000040800040000000007080005000000000408000a00000000010a000d000004020000000000"),
    ("NEWSETELEM", "060001007400000015000200636c75737465722d63696472732d7634000000000800040000000001600003801800018008000300000000010c0001800800010000000000100002800c000180080001000a0000001800038008000300000000010c000180080001000b0000001c0004800c00018008000100e00000000a0006000104010000000000"),
    ("NEWSET", "0600010074000000060002005300000008000300000000300800040000000007080005000000000408000a00000000020c000b000000000000a4cb800a000d000004020000000000"),
    ("NEWSET", "06000100740000000f0002006861697270696e2d76340000080003000000000008000400000001c7080005000000000808000a000000000314000d00000400000000030800040d0000000100"),
    ("NEWSET", "060001007400000013000200736572766963652d6970732d763400000800030000000008080004000000730d080005000000000c08000600ffffff00080007000000000008000a000000000420000d00000400000000010400000000030800040d0000000100060400000000"),
    ("NEWSET", "060001007400000013000200736572766963652d6970732d763600000800030000000008080004000000830d080005000000001808000600ffffff00080007000000000008000a000000000520000d00000400000000010400000000030800040d0000000100060400000000"),
    ("NEWSET", "060001007400000019000200736572766963652d6e6f6465706f7274732d7634000000000800030000000008080004000000030d080005000000000808000600ffffff00080007000000000008000a000000000620000d00000400000000010400000000030800040d0000000100060400000000"),
    ("NEWSET", "0600010074000000070002006534000008000300000000080800040000000004080005000000000408000600000001cd080007000000000808000a000000000768000d00000401000000010400000000031a0004170000000112000401000000010401000000020400000000043400040d000000012c0014000407000000010c00040c00000001040c0000000114000407000000010c00040b000000010402000000060400000000"),
    ("NEWSET", "06000100740000000700020065360000080003000000000808000400000000040800050000000004080006000000020d080007000000001408000a000000000868000d00000401000000010400000000031a0004170000000112000401000000010401000000020400000000043400040d000000012c0014000407000000010c00040d0000000104090000000114000407000000010c00040b000000010402000000060400000000"),
    ("NEWRULE", "060001007400000006000200630000006001048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c0800040000000004440001800b0001006c6f6f6b7570000034000280080002000000000115000100636c75737465722d63696472732d7634000000000800040000000001080005000000000124000180090001006d6574610000000014000280080002000000000308000100000000014c0001800c00010062697477697365003c00028008000100000000010800020000000001080006000000000008000300000000040c00048008000100ffbfffff0c000580080001000040000024000180090001006d657461000000001400028008000200000000030800030000000001"),
    ("NEWRULE", "06000100740000000600020063000000ec00048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000340001800b0001006e756d67656e0000240002800800010000000001080002000000000a0800030000000001080004000000012c340001800b0001006c6f6f6b7570000024000280080002000000000108000300000000010700010065340000080004000000000730000180080001006e617400240002800800010000000001080002000000000208000300000000010800050000000009"),
    ("NEWRULE", "06000100740000000600020063000000ec00048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000340001800b0001006e756d67656e0000240002800800010000000001080002000000000a0800030000000001080004000000012c340001800b0001006c6f6f6b7570000024000280080002000000000108000300000000010700010065360000080004000000000830000180080001006e617400240002800800010000000001080002000000000a08000300000000010800050000000002"),
    ("NEWRULE", "06000100740000000600020063000000e400048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c00038005000100110000002c0001800e000100696d6d6564696174650000001800028008000100000000010c000280080001000a0000012c0001800e000100696d6d6564696174650000001800028008000100000000020c000280060001001f90000038000180080001006e6174002c00028008000100000000010800020000000002080003000000000108000500000000020800070000000002"),
    ("NEWRULE", "06000100740000000600020063000000f000048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010011000000380001800e000100696d6d6564696174650000002400028008000100000000011800028014000100fd0000000000000000000000000000012c0001800e000100696d6d6564696174650000001800028008000100000000020c000280060001001f90000038000180080001006e6174002c0002800800010000000001080002000000000a080003000000000108000500000000020800070000000002"),
    ("NEWRULE", "06000100740000000600020063000000fc01048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c08000400000000042c0001800b0001006c6f6f6b757000001c000280080002000000000106000100530000000800040000000002340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c0800040000000004340001800b00010064796e736574000024000280080004000000000108000300000000010600010053000000080002000000000224000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c00038005000100060000002c0001800e000100696d6d6564696174650000001800028008000100000000010c000280080001000a0000012c0001800e000100696d6d6564696174650000001800028008000100000000020c000280060001000050000038000180080001006e6174002c00028008000100000000010800020000000002080003000000000108000500000000020800070000000002"),
    ("NEWRULE", "06000100740000000600020063000000fc010480340001800b0001006e756d67656e00002400028008000100000000010800020000000003080003000000000108000400000000002c00018008000100636d700020000280080001000000000108000200000000000c000380080001000000000024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c0800040000000004340001800b00010064796e736574000024000280080004000000000108000300000000010600010053000000080002000000000224000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c00038005000100060000002c0001800e000100696d6d6564696174650000001800028008000100000000010c000280080001000a0000022c0001800e000100696d6d6564696174650000001800028008000100000000020c000280060001000050000038000180080001006e6174002c00028008000100000000010800020000000002080003000000000108000500000000020800070000000002"),
    ("NEWRULE", "060001007400000006000200630000002001048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f61640024000280080001000000000108000200000000010800030000000010080004000000000424000180090001006d657461000000001400028008000200000000100800010000000009340001800c0001007061796c6f61640024000280080001000000000a080002000000000208000300000000020800040000000002400001800b0001006c6f6f6b75700000300002800800020000000001080003000000000013000100736572766963652d6970732d763400000800040000000004"),
    ("NEWRULE", "060001007400000006000200630000002001048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000a000000340001800c0001007061796c6f61640024000280080001000000000108000200000000010800030000000018080004000000001024000180090001006d657461000000001400028008000200000000100800010000000002340001800c0001007061796c6f61640024000280080001000000000d080002000000000208000300000000020800040000000002400001800b0001006c6f6f6b75700000300002800800020000000001080003000000000013000100736572766963652d6970732d763600000800040000000005"),
    ("NEWRULE", "06000100740000000600020063000000a80104802800018008000100666962001c0002800800030000000002080002000000000308000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380080001000200000024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000012c00018008000100636d700020000280080001000000000108000200000000010c000380050001007f00000024000180090001006d657461000000001400028008000200000000100800010000000001340001800c0001007061796c6f616400240002800800010000000009080002000000000208000300000000020800040000000002480001800b0001006c6f6f6b75700000380002800800020000000001080003000000000019000100736572766963652d6e6f6465706f7274732d7634000000000800040000000006"),
    ("NEWRULE", "06000100740000000600020063000000b801048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000043c0001800b0001006c6f6f6b757000002c000280080002000000000115000100636c75737465722d63696472732d76340000000008000400000000012800018008000100666962001c0002800800030000000002080002000000000308000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380080001000200000024000180090001006d657461000000001400028008000200000000100800010000000001340001800c0001007061796c6f616400240002800800010000000009080002000000000208000300000000020800040000000002480001800b0001006c6f6f6b75700000380002800800020000000001080003000000000019000100736572766963652d6e6f6465706f7274732d7634000000000800040000000006"),
    ("NEWRULE", "060001007400000006000200630000006001048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000a000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001808000400000000103800018008000100636d70002c0002800800010000000001080002000000000118000380140001000000000000000000000000000000000124000180090001006d657461000000001400028008000200000000100800010000000001340001800c0001007061796c6f616400240002800800010000000009080002000000000208000300000000020800040000000002480001800b0001006c6f6f6b75700000380002800800020000000001080003000000000019000100736572766963652d6e6f6465706f7274732d7634000000000800040000000006"),
    ("NEWRULE", "06000100740000000600020063000000e400048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c08000400000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000a000000300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb"),
    ("NEWRULE", "060001007400000006000200630000002801048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c0800040000000004440001800c0001006269747769736500340002800800010000000001080002000000000108000300000000040c00048008000100fff000000c00058008000100000000002c00018008000100636d700020000280080001000000000108000200000000000c000380080001000a600000300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb"),
    ("NEWRULE", "0600010074000000060002006300000034000480300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c0002800800010000000000"),
    ("NEWRULE", "060001007400000006000200630000003c000480380001800e000100696d6d656469617465000000240002800800010000000000180002801400028008000100fffffffc0600020058000000"),
    ("NEWRULE", "060001007400000006000200630000003c000480380001800e000100696d6d656469617465000000240002800800010000000000180002801400028008000100fffffffd0600020058000000"),
    ("NEWRULE", "06000100740000000600020063000000900004802800018008000100666962001c0002800800030000000001080002000000000308000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800800010002000000380001800e000100696d6d656469617465000000240002800800010000000000180002801400028008000100fffffffc0600020058000000"),
    ("NEWRULE", "06000100740000000600020063000000fc00048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c08000400000000043c0001800b0001006c6f6f6b757000002c000280080002000000000115000100636c75737465722d63696472732d7634000000000800040000000001380001800e000100696d6d656469617465000000240002800800010000000000180002801400028008000100fffffffc0600020058000000"),
    ("NEWRULE", "060001007400000006000200630000007800048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000240001800b00010072656a65637400001400028008000100000000010500020000000000"),
    ("NEWRULE", "0600010074000000060002006300000028000480240001800b00010072656a65637400001400028008000100000000020500020001000000"),
    ("NEWRULE", "060001007400000006000200630000009800048024000180090001006d6574610000000014000280080002000000000308000100000000014c0001800c00010062697477697365003c00028008000100000000010800020000000001080006000000000008000300000000040c00048008000100ffbfffff0c000580080001000040000024000180090001006d657461000000001400028008000200000000030800030000000001"),
    ("NEWRULE", "06000100740000000600020063000000d000048024000180090001006d6574610000000014000280080002000000000308000100000000014c0001800c00010062697477697365003c00028008000100000000010800020000000001080006000000000008000300000000040c00048008000100004000000c00058008000100000000002c00018008000100636d700020000280080001000000000108000200000000000c0003800800010000000000300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb"),
    ("NEWRULE", "060001007400000006000200630000009800048024000180090001006d6574610000000014000280080002000000000308000100000000014c0001800c00010062697477697365003c00028008000100000000010800020000000001080006000000000008000300000000040c00048008000100ffffffff0c000580080001000040000024000180090001006d657461000000001400028008000200000000030800030000000001"),
    ("NEWRULE", "06000100740000000600020063000000200004801c000180090001006d617371000000000c0002800800010000000010"),
    ("NEWRULE", "060001007400000006000200630000009c0104802000018007000100637400001400028008000200000000020800010000000001440001800c0001006269747769736500340002800800010000000001080002000000000108000300000000040c00048008000100200000000c00058008000100000000002c00018008000100636d700020000280080001000000000108000200000000010c000380080001000000000024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c0800040000000004340001800c0001007061796c6f616400240002800800010000000009080002000000000108000300000000100800040000000004340001800b0001006c6f6f6b757000002400028008000200000000010f0001006861697270696e2d7634000008000400000000031c000180090001006d617371000000000c0002800800010000000010"),
    ("NEWRULE", "06000100740000000600020063000000d80004802000018007000100637400001400028008000200000000000800010000000001440001800c0001006269747769736500340002800800010000000001080002000000000108000300000000040c00048008000100080000000c00058008000100000000002c00018008000100636d700020000280080001000000000108000200000000010c0003800800010000000000440001800e000100696d6d656469617465000000300002800800010000000000240002802000028008000100fffffffd130002006669726577616c6c2d636865636b0000"),
    ("NEWRULE", "0600010074000000060002006300000018000480140001800c000100636f756e7465720004000280"),
    ("NEWSETELEM", "060001007400000015000200636c75737465722d63696472732d763400000000080004000000000148000380100001800c000180080001000a0000001800028008000300000000010c000180080001000b0000001c0003800c00018008000100e00000000a0006000104010000000000"),
    ("NEWSETELEM", "060001007400000013000200736572766963652d6970732d763400000800040000000004340003803000018014000180100001000a6000010600000000500000180002801400028008000100fffffffc0600020058000000"),
    ("NEWSETELEM", "06000100740000000700020065340000080004000000000724000380200001800c0001800800010000000000100002800c0001000a0102031f900000"),
    ("NEWSETELEM", "060001007400000007000200653600000800040000000008300003802c0001800c00018008000100000000001c00028018000100fd0000000000000000000000000000011f900000"),
    ("NEWSETELEM", "06000100740000000f0002006861697270696e2d7634000008000400000000031800038014000180100001800c0001000a0102030a010203"),
];

/// An attribute tree, for comparing encodings regardless of attribute order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Node {
    Leaf(u16, Vec<u8>),
    Nest(u16, Vec<Node>),
}

impl Node {
    fn ty(&self) -> u16 {
        match self {
            Node::Leaf(t, _) | Node::Nest(t, _) => *t,
        }
    }
}

fn parse(data: &[u8]) -> Vec<Node> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= data.len() {
        let len = u16::from_ne_bytes([data[off], data[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([data[off + 2], data[off + 3]]);
        assert!(
            len >= 4 && off + len <= data.len(),
            "malformed attribute at {off}"
        );
        let p = &data[off + 4..off + len];
        out.push(if ty & 0x8000 != 0 {
            Node::Nest(ty & 0x3fff, parse(p))
        } else {
            Node::Leaf(ty, p.to_vec())
        });
        off += (len + 3) & !3;
    }
    out
}

/// Sorts the attributes of every nest whose attribute types are distinct (a struct, not
/// a list), so that order does not matter where the kernel does not care.
fn sort_structs(nodes: &mut [Node]) {
    for n in nodes.iter_mut() {
        if let Node::Nest(_, kids) = n {
            sort_structs(kids);
        }
    }
    let mut types: Vec<u16> = nodes.iter().map(Node::ty).collect();
    types.sort_unstable();
    types.dedup();
    if types.len() == nodes.len() {
        nodes.sort_by_key(Node::ty);
    }
}

/// Drops what nft sends and this module deliberately does not: references to sets by
/// their id in the batch (names are enough for named sets), element numbers, and a zero NFTA_BITWISE_OP (the
/// kernel's default, which nft sends for some bitwise expressions and not others).
fn drop_nft_only(kind: &str, nodes: &mut Vec<Node>) {
    match kind {
        "NEWSETELEM" => {
            nodes.retain(|n| n.ty() != 4); // NFTA_SET_ELEM_LIST_SET_ID
                                           // nft numbers the elements of a list 1, 2, 3...; the kernel ignores the
                                           // numbers, this module sends NFTA_LIST_ELEM (1) for all.
            for n in nodes.iter_mut() {
                if let Node::Nest(3, elems) = n {
                    for e in elems.iter_mut() {
                        if let Node::Nest(t, _) = e {
                            *t = 1;
                        }
                    }
                }
            }
        }
        "NEWRULE" => {
            for n in nodes.iter_mut() {
                let Node::Nest(4, exprs) = n else { continue };
                for e in exprs.iter_mut() {
                    let Node::Nest(1, parts) = e else { continue };
                    let name = parts.iter().find_map(|p| match p {
                        Node::Leaf(1, v) => {
                            Some(String::from_utf8_lossy(v).trim_end_matches('\0').to_string())
                        }
                        _ => None,
                    });
                    for p in parts.iter_mut() {
                        let Node::Nest(2, data) = p else { continue };
                        match name.as_deref() {
                            Some("lookup") => data.retain(|d| d.ty() != 4), // NFTA_LOOKUP_SET_ID
                            Some("dynset") => data.retain(|d| d.ty() != 2), // NFTA_DYNSET_SET_ID
                            Some("bitwise") => data.retain(|d| *d != Node::Leaf(6, vec![0; 4])),
                            _ => {}
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn encodings_are_what_nft_sends() {
    let batch = golden_batch("t");
    let mut golden: Vec<(&str, Vec<Node>)> = GOLDEN
        .iter()
        .map(|(kind, hex)| (*kind, parse(&hex_decode(hex))))
        .collect();
    // nft 1.0.6 follows an interval set's creation with a message adding a lone
    // `0.0.0.0` interval end; the kernel does not need it (and nft lists the set the same
    // without it).
    golden.remove(8);
    assert_eq!(batch.len(), golden.len(), "{batch}");
    for (i, (kind, mut want)) in golden.into_iter().enumerate() {
        let mut got = parse(&batch.message(i)[20..]);
        drop_nft_only(kind, &mut want);
        drop_nft_only(kind, &mut got);
        sort_structs(&mut want);
        sort_structs(&mut got);
        assert_eq!(
            got,
            want,
            "message {} ({}) differs from nft's {kind}",
            i + 1,
            batch.describe(i)
        );
    }
}

// Root tests.

fn commit(ns: &Netns, b: &Batch) -> Result<(), CommitError> {
    ns.run(|| Socket::open().expect("open a netfilter socket").commit(b))
}

fn nft_list(ns: &Netns, table: &str) -> String {
    ns.exec_ok(&["nft", "list", "table", "inet", table])
}

/// The listing's lines, trimmed.
fn lines(listing: &str) -> Vec<String> {
    listing
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The rule lines of `chain` in a listing.
fn chain_rules(listing: &str, chain: &str) -> Vec<String> {
    let all = lines(listing);
    let start = all
        .iter()
        .position(|l| *l == format!("chain {chain} {{"))
        .unwrap_or_else(|| panic!("no chain {chain} in:\n{listing}"));
    all[start + 1..]
        .iter()
        .take_while(|l| *l != "}")
        .filter(|l| !l.starts_with("type "))
        .cloned()
        .collect()
}

/// The declaration lines of set or map `name` in a listing.
fn set_lines(listing: &str, name: &str) -> Vec<String> {
    let all = lines(listing);
    let start = all
        .iter()
        .position(|l| *l == format!("set {name} {{") || *l == format!("map {name} {{"))
        .unwrap_or_else(|| panic!("no set {name} in:\n{listing}"));
    all[start + 1..]
        .iter()
        .take_while(|l| *l != "}")
        .cloned()
        .collect()
}

#[test]
fn golden_table_lists_as_nft_lists_its_own() {
    require_root!();
    let ns = Netns::new("nft-golden");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), GOLDEN_NFT).unwrap();
    ns.exec_ok(&["nft", "-f", file.path().to_str().unwrap()]);
    commit(&ns, &golden_batch("u")).unwrap();
    let theirs = nft_list(&ns, "t");
    let ours = nft_list(&ns, "u").replacen("table inet u {", "table inet t {", 1);
    assert_eq!(ours, theirs);
    let want: Vec<&str> = golden_rules().iter().map(|(_, line)| *line).collect();
    assert_eq!(chain_rules(&ours, "c"), want);
}

#[test]
fn service_rules_list_as_nft_syntax() {
    require_root!();
    use DataType::Ipv4Addr;
    let ns = Netns::new("nft-services");
    let mut b = Batch::new("ferry");
    b.add_table();
    for c in ["service-X", "service-Y", "service-U", "service-V"] {
        b.add_chain(c, None);
    }
    b.add_set(&interval_set("cluster-cidrs-v4", Ipv4Addr));
    b.add_set(&endpoints_map("endpoints-v4-07", Family::Ipv4));
    b.add_set(&endpoints_map("endpoints-v6-07", Family::Ipv6));
    b.add_rule(
        "service-X",
        &with(
            saddr_in(Family::Ipv4, "cluster-cidrs-v4", true),
            mark_set(MARK, false),
        ),
    );
    b.add_rule(
        "service-X",
        &dnat_numgen_map(Family::Ipv4, IPPROTO_TCP, 10, 300, "endpoints-v4-07"),
    );
    b.add_rule(
        "service-Y",
        &dnat_numgen_map(Family::Ipv6, IPPROTO_TCP, 2, 40, "endpoints-v6-07"),
    );
    b.add_rule(
        "service-U",
        &with(match_l4proto(IPPROTO_UDP).to_vec(), dnat_to("10.0.0.1", 8080)),
    );
    b.add_rule(
        "service-V",
        &with(match_l4proto(IPPROTO_UDP).to_vec(), dnat_to("fd00::1", 8080)),
    );
    b.add_elements("cluster-cidrs-v4", &[Element::prefix(ip("10.0.0.0"), 8)]);
    let ep = |addr: &str, port: u16| concat(&[&ipb(addr), &port_bytes(port)]);
    b.add_elements(
        "endpoints-v4-07",
        &[
            Element::value(u32_bytes(300), ep("10.1.2.3", 8080)),
            Element::value(u32_bytes(301), ep("10.1.2.4", 8080)),
        ],
    );
    b.add_elements(
        "endpoints-v6-07",
        &[Element::value(u32_bytes(40), ep("fd00::1", 8080))],
    );
    commit(&ns, &b).unwrap();
    let l = nft_list(&ns, "ferry");
    assert_eq!(
        chain_rules(&l, "service-X"),
        [
            "ip saddr != @cluster-cidrs-v4 meta mark set meta mark | 0x00004000",
            "meta l4proto tcp dnat ip to numgen random mod 10 offset 300 map @endpoints-v4-07",
        ],
        "{l}"
    );
    assert_eq!(
        chain_rules(&l, "service-Y"),
        ["meta l4proto tcp dnat ip6 to numgen random mod 2 offset 40 map @endpoints-v6-07"]
    );
    assert_eq!(
        chain_rules(&l, "service-U"),
        ["meta l4proto udp dnat ip to 10.0.0.1:8080"]
    );
    assert_eq!(
        chain_rules(&l, "service-V"),
        ["meta l4proto udp dnat ip6 to [fd00::1]:8080"]
    );
    assert_eq!(
        set_lines(&l, "endpoints-v4-07"),
        [
            "typeof numgen random mod 1 : ip daddr . th dport",
            "elements = { 300 : 10.1.2.3 . 8080, 301 : 10.1.2.4 . 8080 }",
        ]
    );
    assert_eq!(
        set_lines(&l, "endpoints-v6-07"),
        [
            "typeof numgen random mod 1 : ip6 daddr . th dport",
            "elements = { 40 : fd00::1 . 8080 }"
        ]
    );
    assert_eq!(
        set_lines(&l, "cluster-cidrs-v4"),
        ["type ipv4_addr", "flags interval", "elements = { 10.0.0.0/8 }"]
    );
}

#[test]
fn session_affinity_rules_list_as_nft_syntax() {
    require_root!();
    let ns = Netns::new("nft-affinity");
    let mut b = Batch::new("ferry");
    b.add_table();
    b.add_chain("service-X", None);
    b.add_set(&affinity_set("affinity-X"));
    let rules = golden_rules();
    let (first, second) = (&rules[5].0, &rules[6].0);
    let rename = |r: &[Expr]| -> Vec<Expr> {
        r.iter()
            .map(|e| match e {
                Expr::Lookup {
                    sreg, dreg, invert, ..
                } => Expr::Lookup {
                    sreg: *sreg,
                    set: "affinity-X".into(),
                    dreg: *dreg,
                    invert: *invert,
                },
                Expr::Dynset {
                    op,
                    sreg_key,
                    timeout,
                    ..
                } => Expr::Dynset {
                    op: *op,
                    set: "affinity-X".into(),
                    sreg_key: *sreg_key,
                    timeout: *timeout,
                },
                e => e.clone(),
            })
            .collect()
    };
    b.add_rule("service-X", &rename(first));
    b.add_rule("service-X", &rename(second));
    commit(&ns, &b).unwrap();
    let l = nft_list(&ns, "ferry");
    assert_eq!(
        chain_rules(&l, "service-X"),
        [
            "ip saddr @affinity-X update @affinity-X { ip saddr } meta l4proto tcp dnat ip to 10.0.0.1:80",
            // nft 1.0.6 prints `numgen random mod 3 == 0` without its `==`.
            "numgen random mod 3 0 update @affinity-X { ip saddr } meta l4proto tcp dnat ip to 10.0.0.2:80",
        ],
        "{l}"
    );
    assert_eq!(
        set_lines(&l, "affinity-X"),
        [
            "type ipv4_addr",
            "size 65535",
            "flags dynamic,timeout",
            "timeout 3h"
        ]
    );
}

#[test]
fn service_and_node_port_maps_list_as_nft_syntax() {
    require_root!();
    use DataType::{InetProto, InetService, Ipv4Addr, Ipv6Addr};
    let ns = Netns::new("nft-maps");
    let mut b = Batch::new("ferry");
    b.add_table();
    for c in ["services", "service-X", "external-X"] {
        b.add_chain(c, None);
    }
    b.add_set(&vmap("service-ips-v4", vec![Ipv4Addr, InetProto, InetService]));
    b.add_set(&vmap("service-ips-v6", vec![Ipv6Addr, InetProto, InetService]));
    b.add_set(&vmap("service-nodeports-v4", vec![InetProto, InetService]));
    b.add_set(&vmap("service-nodeports-v6", vec![InetProto, InetService]));
    b.add_set(&interval_set("nodeport-ips-v4", Ipv4Addr));
    b.add_set(&interval_set("nodeport-ips-v6", Ipv6Addr));
    b.add_rule("services", &service_vmap(Family::Ipv4, "service-ips-v4"));
    b.add_rule("services", &service_vmap(Family::Ipv6, "service-ips-v6"));
    for (family, local, v) in [(Family::Ipv4, "127.0.0.0", 8), (Family::Ipv6, "::1", 128)] {
        let suffix = if family == Family::Ipv4 { "v4" } else { "v6" };
        let map = format!("service-nodeports-{suffix}");
        b.add_rule(
            "services",
            &with(
                with(
                    match_fib_local(FIB_DADDR).to_vec(),
                    match_prefix(family, Addr::Daddr, &ipb(local), v, CmpOp::Neq),
                ),
                nodeport_vmap(&map),
            ),
        );
        b.add_rule(
            "services",
            &with(
                with(
                    with(
                        match_family(family).to_vec(),
                        [
                            ip_addr(family, Addr::Daddr, Reg::R32(0)),
                            Expr::Lookup {
                                sreg: Reg::R32(0),
                                set: format!("nodeport-ips-{suffix}"),
                                dreg: None,
                                invert: false,
                            },
                        ],
                    ),
                    match_fib_local(FIB_DADDR),
                ),
                nodeport_vmap(&map),
            ),
        );
    }
    let goto = |c: &str| Verdict::Goto(chain(c));
    b.add_elements(
        "service-ips-v4",
        &[
            Element::verdict(
                concat(&[&ipb("10.96.0.1"), &proto_bytes(IPPROTO_TCP), &port_bytes(80)]),
                goto("service-X"),
            ),
            Element::verdict(
                concat(&[&ipb("10.96.0.10"), &proto_bytes(IPPROTO_UDP), &port_bytes(53)]),
                goto("service-X"),
            ),
        ],
    );
    b.add_elements(
        "service-ips-v6",
        &[Element::verdict(
            concat(&[&ipb("fd00::96:1"), &proto_bytes(IPPROTO_SCTP), &port_bytes(80)]),
            goto("service-X"),
        )],
    );
    b.add_elements(
        "service-nodeports-v4",
        &[Element::verdict(
            concat(&[&proto_bytes(IPPROTO_TCP), &port_bytes(30080)]),
            goto("external-X"),
        )],
    );
    b.add_elements("nodeport-ips-v4", &[Element::prefix(ip("192.168.0.0"), 16)]);
    b.add_elements(
        "nodeport-ips-v6",
        &[
            Element::prefix(ip("fd00:1::"), 64),
            Element::prefix(ip("2001:db8::1"), 128),
        ],
    );
    commit(&ns, &b).unwrap();
    let l = nft_list(&ns, "ferry");
    assert_eq!(
        chain_rules(&l, "services"),
        [
            "ip daddr . meta l4proto . th dport vmap @service-ips-v4",
            "ip6 daddr . meta l4proto . th dport vmap @service-ips-v6",
            "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports-v4",
            "ip daddr @nodeport-ips-v4 fib daddr type local meta l4proto . th dport vmap @service-nodeports-v4",
            "fib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @service-nodeports-v6",
            "ip6 daddr @nodeport-ips-v6 fib daddr type local meta l4proto . th dport vmap @service-nodeports-v6",
        ],
        "{l}"
    );
    // Elements are listed in the kernel's (hash) order.
    let v4 = set_lines(&l, "service-ips-v4").join(" ");
    assert!(
        v4.starts_with("type ipv4_addr . inet_proto . inet_service : verdict elements = { "),
        "{v4}"
    );
    assert!(v4.contains("10.96.0.1 . tcp . 80 : goto service-X"), "{v4}");
    assert!(v4.contains("10.96.0.10 . udp . 53 : goto service-X"), "{v4}");
    assert_eq!(
        set_lines(&l, "service-ips-v6"),
        [
            "type ipv6_addr . inet_proto . inet_service : verdict",
            "elements = { fd00::96:1 . sctp . 80 : goto service-X }",
        ]
    );
    assert_eq!(
        set_lines(&l, "service-nodeports-v4"),
        [
            "type inet_proto . inet_service : verdict",
            "elements = { tcp . 30080 : goto external-X }"
        ]
    );
    assert_eq!(
        set_lines(&l, "nodeport-ips-v4"),
        [
            "type ipv4_addr",
            "flags interval",
            "elements = { 192.168.0.0/16 }"
        ]
    );
    assert_eq!(
        set_lines(&l, "nodeport-ips-v6"),
        [
            "type ipv6_addr",
            "flags interval",
            "elements = { 2001:db8::1,",
            "fd00:1::/64 }"
        ]
    );
}

#[test]
fn verdicts_rejects_and_masquerading_list_as_nft_syntax() {
    require_root!();
    use DataType::Ipv4Addr;
    let ns = Netns::new("nft-verdicts");
    let mut b = Batch::new("ferry");
    b.add_table();
    for c in ["X", "firewall-check", "reject-chain", "masquerading", "c"] {
        b.add_chain(c, None);
    }
    b.add_set(&interval_set("cluster-cidrs-v4", Ipv4Addr));
    b.add_set(&SetSpec::new("hairpin-v4", vec![Ipv4Addr, Ipv4Addr]));
    let goto_x = || verdict(Verdict::Goto(chain("X")));
    let rules: Vec<(Vec<Expr>, &str)> = vec![
        (
            with(
                match_prefix(Family::Ipv4, Addr::Saddr, &ipb("10.0.0.0"), 8, CmpOp::Eq),
                [verdict(Verdict::Return)],
            ),
            "ip saddr 10.0.0.0/8 return",
        ),
        (
            with(
                match_prefix(Family::Ipv6, Addr::Saddr, &ipb("fd00:10::"), 28, CmpOp::Eq),
                [verdict(Verdict::Return)],
            ),
            "ip6 saddr fd00:10::/28 return",
        ),
        (vec![verdict(Verdict::Drop)], "drop"),
        (vec![verdict(Verdict::Accept)], "accept"),
        (vec![goto_x()], "goto X"),
        (vec![verdict(Verdict::Jump(chain("X")))], "jump X"),
        (
            with(match_fib_local(FIB_SADDR).to_vec(), [goto_x()]),
            "fib saddr type local goto X",
        ),
        (
            with(saddr_in(Family::Ipv4, "cluster-cidrs-v4", false), [goto_x()]),
            "ip saddr @cluster-cidrs-v4 goto X",
        ),
        (
            with(
                match_ct_bits(CtKey::State, CT_STATE_NEW).to_vec(),
                [verdict(Verdict::Jump(chain("firewall-check")))],
            ),
            "ct state new jump firewall-check",
        ),
    ];
    for (r, _) in &rules {
        b.add_rule("c", r);
    }
    let golden = golden_rules();
    for i in [19, 20] {
        b.add_rule("reject-chain", &golden[i].0);
    }
    for i in [21, 22, 23, 24, 25] {
        b.add_rule("masquerading", &golden[i].0);
    }
    commit(&ns, &b).unwrap();
    let l = nft_list(&ns, "ferry");
    let want: Vec<&str> = rules.iter().map(|(_, line)| *line).collect();
    assert_eq!(chain_rules(&l, "c"), want, "{l}");
    assert_eq!(
        chain_rules(&l, "reject-chain"),
        ["meta l4proto tcp reject with tcp reset", "reject"]
    );
    assert_eq!(
        chain_rules(&l, "masquerading"),
        [
            "meta mark set meta mark | 0x00004000",
            "meta mark & 0x00004000 == 0x00000000 return",
            "meta mark set meta mark ^ 0x00004000",
            "masquerade fully-random",
            "ct status dnat ip saddr . ip daddr @hairpin-v4 masquerade fully-random",
        ]
    );
}

#[test]
fn base_chains_list_with_their_hooks() {
    require_root!();
    let ns = Netns::new("nft-base");
    let mut b = Batch::new("ferry");
    b.add_table();
    let base = |kind, hook, priority| Some(BaseChain { kind, hook, priority });
    let chains = [
        (
            "filter-prerouting",
            base(ChainType::Filter, Hook::Prerouting, -110),
        ),
        ("filter-input", base(ChainType::Filter, Hook::Input, -110)),
        ("filter-forward", base(ChainType::Filter, Hook::Forward, -110)),
        ("filter-output", base(ChainType::Filter, Hook::Output, -110)),
        ("nat-prerouting", base(ChainType::Nat, Hook::Prerouting, -100)),
        ("nat-output", base(ChainType::Nat, Hook::Output, -100)),
        ("nat-postrouting", base(ChainType::Nat, Hook::Postrouting, 100)),
    ];
    for (name, base) in &chains {
        b.add_chain(name, base.as_ref());
    }
    commit(&ns, &b).unwrap();
    let l = lines(&nft_list(&ns, "ferry"));
    let header = |chain: &str| {
        let i = l.iter().position(|x| *x == format!("chain {chain} {{")).unwrap();
        l[i + 1].clone()
    };
    // nft names priorities relative to the standard ones where it can.
    assert_eq!(
        header("filter-prerouting"),
        "type filter hook prerouting priority dstnat - 10; policy accept;"
    );
    assert_eq!(
        header("filter-input"),
        "type filter hook input priority -110; policy accept;"
    );
    assert_eq!(
        header("filter-forward"),
        "type filter hook forward priority -110; policy accept;"
    );
    assert_eq!(
        header("filter-output"),
        "type filter hook output priority -110; policy accept;"
    );
    assert_eq!(
        header("nat-prerouting"),
        "type nat hook prerouting priority dstnat; policy accept;"
    );
    assert_eq!(
        header("nat-output"),
        "type nat hook output priority -100; policy accept;"
    );
    assert_eq!(
        header("nat-postrouting"),
        "type nat hook postrouting priority srcnat; policy accept;"
    );
}

#[test]
fn adding_what_exists_is_not_an_error() {
    require_root!();
    use DataType::{InetProto, InetService, Ipv4Addr};
    let ns = Netns::new("nft-idempotent");
    let mut b = Batch::new("ferry");
    b.add_table();
    b.add_chain(
        "nat-prerouting",
        Some(&BaseChain {
            kind: ChainType::Nat,
            hook: Hook::Prerouting,
            priority: -100,
        }),
    );
    b.add_chain("service-X", None);
    b.add_set(&vmap("service-ips-v4", vec![Ipv4Addr, InetProto, InetService]));
    b.add_set(&affinity_set("affinity-X"));
    b.add_set(&interval_set("cluster-cidrs-v4", Ipv4Addr));
    b.add_set(&endpoints_map("endpoints-v4-00", Family::Ipv4));
    let key = concat(&[&ipb("10.96.0.1"), &proto_bytes(IPPROTO_TCP), &port_bytes(80)]);
    b.add_elements(
        "service-ips-v4",
        &[Element::verdict(key.clone(), Verdict::Goto(chain("service-X")))],
    );
    b.add_elements("cluster-cidrs-v4", &[Element::prefix(ip("10.0.0.0"), 8)]);
    commit(&ns, &b).unwrap();
    let first = nft_list(&ns, "ferry");
    commit(&ns, &b).unwrap();
    assert_eq!(nft_list(&ns, "ferry"), first);

    // A set declared differently is an error that says which.
    let mut b = Batch::new("ferry");
    b.add_set(&SetSpec::new("service-ips-v4", vec![Ipv4Addr]));
    let e = commit(&ns, &b).unwrap_err();
    assert_eq!((e.errno, e.index), (libc::EEXIST, Some(0)), "{e}");
    assert!(e.to_string().starts_with("add set service-ips-v4"), "{e}");
    assert!(e.to_string().contains("File exists (os error 17)"), "{e}");

    // An element with other data must be deleted first; both in one batch is fine.
    let mut b = Batch::new("ferry");
    b.add_chain("service-Y", None);
    b.add_elements(
        "service-ips-v4",
        &[Element::verdict(key.clone(), Verdict::Goto(chain("service-Y")))],
    );
    let e = commit(&ns, &b).unwrap_err();
    assert_eq!((e.errno, e.index), (libc::EEXIST, Some(1)), "{e}");
    assert_eq!(
        e.detail.as_deref(),
        Some("element 0 (key 0a600001 06000000 00500000)"),
        "{e}"
    );
    let mut b = Batch::new("ferry");
    b.add_chain("service-Y", None);
    b.delete_elements("service-ips-v4", &[Element::key(key.clone())]);
    b.add_elements(
        "service-ips-v4",
        &[Element::verdict(key, Verdict::Goto(chain("service-Y")))],
    );
    commit(&ns, &b).unwrap();
    assert!(nft_list(&ns, "ferry").contains("10.96.0.1 . tcp . 80 : goto service-Y"));
}

#[test]
fn flushes_and_deletes() {
    require_root!();
    use DataType::Ipv4Addr;
    let ns = Netns::new("nft-delete");
    let mut b = Batch::new("ferry");
    b.add_table();
    for c in ["a", "b", "c"] {
        b.add_chain(c, None);
        b.add_rule(c, &[Expr::Counter]);
        b.add_rule(c, &[Expr::Counter]);
    }
    b.add_rule("a", &[verdict(Verdict::Jump(chain("b")))]);
    b.add_set(&SetSpec::new("used", vec![Ipv4Addr]));
    b.add_set(&SetSpec::new("unused", vec![Ipv4Addr]));
    b.add_rule("c", &saddr_in(Family::Ipv4, "used", false));
    b.add_elements(
        "used",
        &[Element::key(ipb("10.0.0.1")), Element::key(ipb("10.0.0.2"))],
    );
    commit(&ns, &b).unwrap();

    // A chain still jumped to, a set still used: EBUSY.
    for (what, b) in [
        ("chain", {
            let mut b = Batch::new("ferry");
            b.delete_chain("b");
            b
        }),
        ("set", {
            let mut b = Batch::new("ferry");
            b.delete_set("used");
            b
        }),
    ] {
        let e = commit(&ns, &b).unwrap_err();
        assert_eq!(e.errno, libc::EBUSY, "{what}: {e}");
    }

    // Flushing the jumping chain and deleting the target in one batch works; a chain with
    // rules is deleted with them.
    let mut b = Batch::new("ferry");
    b.flush_chain("a");
    b.delete_chain("b");
    b.flush_set("used");
    b.delete_set("unused");
    commit(&ns, &b).unwrap();
    let l = nft_list(&ns, "ferry");
    assert!(chain_rules(&l, "a").is_empty(), "{l}");
    assert!(!l.contains("chain b {"), "{l}");
    assert_eq!(set_lines(&l, "used"), ["type ipv4_addr"]);
    assert!(!l.contains("unused"), "{l}");

    let mut b = Batch::new("ferry");
    b.delete_table();
    commit(&ns, &b).unwrap();
    let tables = ns.run(|| Socket::open().unwrap().list_tables()).unwrap();
    assert!(tables.is_empty(), "{tables:?}");
    let e = commit(&ns, &b).unwrap_err();
    assert_eq!(e.errno, libc::ENOENT, "{e}");
}

#[test]
fn a_failing_message_is_named_and_nothing_is_applied() {
    require_root!();
    let ns = Netns::new("nft-fail");
    // Nothing exists: the third message fails, the first two are not applied.
    let mut b = Batch::new("ferry");
    b.add_table();
    b.add_chain("a", None);
    b.add_rule("a", &[verdict(Verdict::Jump(chain("missing")))]);
    b.add_chain("b", None);
    let e = commit(&ns, &b).unwrap_err();
    assert_eq!(
        (e.errno, e.index, e.more_failures),
        (libc::ENOENT, Some(2), 0),
        "{e}"
    );
    assert_eq!(e.description, "add rule to chain a");
    assert_eq!(e.detail.as_deref(), Some("expression 1 (immediate)"), "{e}");
    assert_eq!(
        e.to_string(),
        "add rule to chain a, expression 1 (immediate): No such file or directory (os error 2) \
         (message 3 of 4; nothing was applied)"
    );
    let tables = ns.run(|| Socket::open().unwrap().list_tables()).unwrap();
    assert!(!tables.contains(&"ferry".to_string()), "{tables:?}");

    // Over an existing table: a missing set in a lookup, after new chains and a set.
    let mut b = Batch::new("ferry");
    b.add_table();
    b.add_chain("pre", None);
    commit(&ns, &b).unwrap();
    let mut b = Batch::new("ferry");
    b.add_chain("a", None);
    b.add_set(&SetSpec::new("s", vec![DataType::Ipv4Addr]));
    b.add_rule("a", &saddr_in(Family::Ipv4, "nope", false));
    b.add_rule("a", &[Expr::Counter]);
    let e = commit(&ns, &b).unwrap_err();
    assert_eq!((e.errno, e.index), (libc::ENOENT, Some(2)), "{e}");
    assert_eq!(e.detail.as_deref(), Some("expression 4 (lookup)"), "{e}");
    let (chains, sets) = ns.run(|| {
        let mut s = Socket::open().unwrap();
        (s.list_chains("ferry").unwrap(), s.list_sets("ferry").unwrap())
    });
    assert_eq!(chains, ["pre"]);
    assert!(sets.is_empty(), "{sets:?}");

    // Deleting what is not there names the element.
    let mut b = Batch::new("ferry");
    b.add_set(&SetSpec::new("s", vec![DataType::Ipv4Addr]));
    b.add_elements(
        "s",
        &[Element::key(ipb("10.0.0.1")), Element::key(ipb("10.0.0.2"))],
    );
    commit(&ns, &b).unwrap();
    let mut b = Batch::new("ferry");
    b.delete_elements(
        "s",
        &[Element::key(ipb("10.0.0.1")), Element::key(ipb("10.0.0.3"))],
    );
    let e = commit(&ns, &b).unwrap_err();
    assert_eq!((e.errno, e.index), (libc::ENOENT, Some(0)), "{e}");
    assert_eq!(e.detail.as_deref(), Some("element 1 (key 0a000003)"), "{e}");
    assert!(nft_list(&ns, "ferry").contains("elements = { 10.0.0.1, 10.0.0.2 }"));
}

#[test]
fn thousands_of_failures_still_name_the_first() {
    require_root!();
    let ns = Netns::new("nft-many-fail");
    let mut b = Batch::new("ferry");
    b.add_table();
    b.add_chain("a", None);
    // Every rule fails; their errors overflow the socket's receive buffer.
    for _ in 0..20_000 {
        b.add_rule("a", &[verdict(Verdict::Goto(chain("missing")))]);
    }
    let e = commit(&ns, &b).unwrap_err();
    assert_eq!((e.errno, e.index), (libc::ENOENT, Some(2)), "{e}");
    // The socket stays usable.
    let tables = ns.run(|| {
        let mut s = Socket::open().unwrap();
        let _ = s.commit(&b);
        s.list_tables()
    });
    assert!(tables.unwrap().is_empty());
}

#[test]
fn listing_names_reads_only_this_table() {
    require_root!();
    let ns = Netns::new("nft-list");
    let (chains, sets) = ns.run(|| {
        let mut s = Socket::open().unwrap();
        (s.list_chains("ferry").unwrap(), s.list_sets("ferry").unwrap())
    });
    assert!(
        chains.is_empty() && sets.is_empty(),
        "no table yet: {chains:?} {sets:?}"
    );
    let mut b = Batch::new("ferry");
    b.add_table();
    let mut other = Batch::new("other");
    other.add_table();
    let mut want_chains = Vec::new();
    for i in 0..3000 {
        let name = format!("service-{i:05}-with-a-long-name-to-fill-the-dump-buffers");
        b.add_chain(&name, None);
        want_chains.push(name);
        other.add_chain(&format!("other-{i}"), None);
    }
    let mut want_sets = Vec::new();
    for i in 0..50 {
        let name = format!("set-{i}");
        b.add_set(&SetSpec::new(&name, vec![DataType::Ipv4Addr]));
        want_sets.push(name);
        other.add_set(&SetSpec::new(format!("other-set-{i}"), vec![DataType::Ipv4Addr]));
    }
    commit(&ns, &b).unwrap();
    commit(&ns, &other).unwrap();
    let (mut chains, mut sets, tables) = ns.run(|| {
        let mut s = Socket::open().unwrap();
        (
            s.list_chains("ferry").unwrap(),
            s.list_sets("ferry").unwrap(),
            s.list_tables().unwrap(),
        )
    });
    chains.sort();
    sets.sort();
    want_chains.sort();
    want_sets.sort();
    assert_eq!(chains, want_chains);
    assert_eq!(sets, want_sets);
    let mut tables = tables;
    tables.sort();
    assert_eq!(tables, ["ferry", "other"]);
}

#[test]
fn packets_follow_the_rules() {
    require_root!();
    use std::net::{TcpListener, TcpStream};
    use DataType::{InetProto, InetService, Ipv4Addr};
    let ns = Netns::new("nft-packets");
    // Two "endpoints" on loopback; the "Service" is 127.0.0.2:80, and 127.0.0.3:80 is a
    // Service without endpoints.
    let listeners: Vec<TcpListener> = ns.run(|| {
        (0..2)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect()
    });
    let mut b = Batch::new("ferry");
    b.add_table();
    b.add_set(&vmap("service-ips-v4", vec![Ipv4Addr, InetProto, InetService]));
    b.add_set(&vmap("no-endpoints-v4", vec![Ipv4Addr, InetProto, InetService]));
    b.add_set(&endpoints_map("endpoints-v4-00", Family::Ipv4));
    let base = |kind, hook, priority| Some(BaseChain { kind, hook, priority });
    b.add_chain("nat-output", base(ChainType::Nat, Hook::Output, -100).as_ref());
    b.add_chain(
        "filter-output",
        base(ChainType::Filter, Hook::Output, -110).as_ref(),
    );
    for c in ["service-X", "reject-chain"] {
        b.add_chain(c, None);
    }
    b.add_rule("nat-output", &service_vmap(Family::Ipv4, "service-ips-v4"));
    b.add_rule("filter-output", &service_vmap(Family::Ipv4, "no-endpoints-v4"));
    b.add_rule(
        "service-X",
        &dnat_numgen_map(Family::Ipv4, IPPROTO_TCP, 2, 40, "endpoints-v4-00"),
    );
    b.add_rule("reject-chain", &golden_rules()[19].0);
    b.add_rule("reject-chain", &golden_rules()[20].0);
    let key = |addr: &str| concat(&[&ipb(addr), &proto_bytes(IPPROTO_TCP), &port_bytes(80)]);
    b.add_elements(
        "service-ips-v4",
        &[Element::verdict(
            key("127.0.0.2"),
            Verdict::Goto(chain("service-X")),
        )],
    );
    b.add_elements(
        "no-endpoints-v4",
        &[Element::verdict(
            key("127.0.0.3"),
            Verdict::Goto(chain("reject-chain")),
        )],
    );
    let endpoints: Vec<Element> = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let port = l.local_addr().unwrap().port();
            Element::value(
                u32_bytes(40 + i as u32),
                concat(&[&ipb("127.0.0.1"), &port_bytes(port)]),
            )
        })
        .collect();
    b.add_elements("endpoints-v4-00", &endpoints);
    commit(&ns, &b).unwrap();

    let refused = ns.run(|| {
        for _ in 0..40 {
            TcpStream::connect("127.0.0.2:80").expect("connect through the DNAT");
        }
        TcpStream::connect_timeout(&"127.0.0.3:80".parse().unwrap(), Duration::from_secs(3))
            .map(|_| ())
            .unwrap_err()
    });
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");
    let accepted: Vec<usize> = listeners
        .iter()
        .map(|l| {
            l.set_nonblocking(true).unwrap();
            std::iter::from_fn(|| l.accept().ok()).count()
        })
        .collect();
    assert_eq!(accepted.iter().sum::<usize>(), 40, "{accepted:?}");
    assert!(
        accepted.iter().all(|&n| n > 0),
        "numgen never chose one endpoint: {accepted:?}"
    );
}

/// A Service table's worth of objects, in the order the kernel handles best: sets,
/// chains, rules, elements. `services` Services with `endpoints` endpoints each; their
/// endpoints in 16 shared maps per family (`numgen ... offset O map @endpoints-v4-NN`).
fn service_batch(table: &str, services: usize, endpoints: usize) -> Batch {
    use DataType::{InetProto, InetService, Ipv4Addr};
    const MAPS: usize = 16;
    let mut b = Batch::new(table);
    b.add_table();
    b.add_set(&interval_set("cluster-cidrs-v4", Ipv4Addr));
    b.add_set(&vmap("service-ips-v4", vec![Ipv4Addr, InetProto, InetService]));
    for m in 0..MAPS {
        b.add_set(&endpoints_map(&format!("endpoints-v4-{m:02}"), Family::Ipv4));
    }
    b.add_chain(
        "nat-prerouting",
        Some(&BaseChain {
            kind: ChainType::Nat,
            hook: Hook::Prerouting,
            priority: -100,
        }),
    );
    b.add_chain("services", None);
    let names: Vec<String> = (0..services)
        .map(|i| format!("service-{i:05}-ns/name/tcp/http"))
        .collect();
    for n in &names {
        b.add_chain(n, None);
    }
    b.add_rule("nat-prerouting", &[verdict(Verdict::Jump(chain("services")))]);
    b.add_rule("services", &service_vmap(Family::Ipv4, "service-ips-v4"));
    for (i, n) in names.iter().enumerate() {
        let map = format!("endpoints-v4-{:02}", i % MAPS);
        let offset = (i / MAPS * endpoints) as u32;
        b.add_rule(
            n,
            &with(
                saddr_in(Family::Ipv4, "cluster-cidrs-v4", true),
                mark_set(MARK, false),
            ),
        );
        b.add_rule(
            n,
            &dnat_numgen_map(Family::Ipv4, IPPROTO_TCP, endpoints as u32, offset, &map),
        );
    }
    b.add_elements("cluster-cidrs-v4", &[Element::prefix(ip("10.0.0.0"), 8)]);
    let mut vm = Vec::with_capacity(services);
    let mut per_map: Vec<Vec<Element>> = vec![Vec::new(); MAPS];
    for (i, n) in names.iter().enumerate() {
        let cluster_ip = [172, 16 + (i >> 16) as u8, (i >> 8) as u8, i as u8];
        vm.push(Element::verdict(
            concat(&[&cluster_ip, &proto_bytes(IPPROTO_TCP), &port_bytes(80)]),
            Verdict::Goto(n.clone()),
        ));
        let offset = (i / MAPS * endpoints) as u32;
        for e in 0..endpoints {
            let k = i * endpoints + e;
            let addr = [10, (k >> 16) as u8, (k >> 8) as u8, k as u8];
            per_map[i % MAPS].push(Element::value(
                u32_bytes(offset + e as u32),
                concat(&[&addr, &port_bytes(8080)]),
            ));
        }
    }
    b.add_elements("service-ips-v4", &vm);
    for (m, elems) in per_map.iter().enumerate() {
        b.add_elements(&format!("endpoints-v4-{m:02}"), elems);
    }
    b
}

#[test]
fn a_large_batch_is_one_transaction() {
    require_root!();
    let ns = Netns::new("nft-large");
    let b = service_batch("ferry", 1000, 10);
    assert!(b.len() > 3000, "{}", b.len());
    commit(&ns, &b).unwrap();
    let (chains, sets) = ns.run(|| {
        let mut s = Socket::open().unwrap();
        (s.list_chains("ferry").unwrap(), s.list_sets("ferry").unwrap())
    });
    assert_eq!(chains.len(), 1002);
    assert_eq!(sets.len(), 18);
    let l = nft_list(&ns, "ferry");
    assert!(
        l.contains("172.16.3.231 . tcp . 80 : goto service-00999-ns/name/tcp/http"),
        "{}",
        &l[..2000]
    );
    assert!(l.contains("meta l4proto tcp dnat ip to numgen random mod 10 offset 620 map @endpoints-v4-07"));

    // The same again plus a failing message at the very end: nothing changes.
    let mut b = service_batch("ferry", 1000, 10);
    b.add_chain("late", None);
    b.delete_set("does-not-exist");
    let e = commit(&ns, &b).unwrap_err();
    assert_eq!((e.errno, e.index), (libc::ENOENT, Some(b.len() - 1)), "{e}");
    let chains = ns.run(|| Socket::open().unwrap().list_chains("ferry")).unwrap();
    assert_eq!(chains.len(), 1002, "the batch was partly applied");
}

/// `cargo test --release -p ferry-nft --test nft_netlink -- --ignored --nocapture timing`
#[test]
#[ignore = "timing: run in release with --nocapture"]
fn timing_at_ten_thousand_services() {
    require_root!();
    let ns = Netns::new("nft-timing");
    // Build + encode, several times for a stable figure.
    let mut build = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let b = service_batch("ferry", 10_000, 10);
        build.push(t.elapsed());
        drop(b);
    }
    build.sort();
    let b = service_batch("ferry", 10_000, 10);
    let rules = 2 + 2 * 10_000;
    println!(
        "full batch: {} messages, {:.1} MiB ({} chains, {rules} rules, {} elements); build+encode median {:?} (min {:?})",
        b.len(),
        b.encoded_len() as f64 / (1 << 20) as f64,
        10_002,
        10_000 * 10 + 10_000 + 1,
        build[2],
        build[0]
    );
    let (wall, user, sys) = ns.run(|| {
        let mut s = Socket::open().unwrap();
        let (u0, s0) = thread_cpu();
        let t = Instant::now();
        s.commit(&b).unwrap();
        let wall = t.elapsed();
        let (u1, s1) = thread_cpu();
        (wall, u1 - u0, s1 - s0)
    });
    println!("full commit (fresh table): {wall:?} wall, {user:?} user, {sys:?} system (the kernel's work)");
    let t = Instant::now();
    let chains = ns.run(|| Socket::open().unwrap().list_chains("ferry")).unwrap();
    println!("list_chains ({}): {:?}", chains.len(), t.elapsed());
    let t = Instant::now();
    let sets = ns.run(|| Socket::open().unwrap().list_sets("ferry")).unwrap();
    println!("list_sets ({}): {:?}", sets.len(), t.elapsed());

    // An incremental change: one new Service (chain, 2 rules, its elements).
    let samples: Vec<(Duration, Duration)> = ns.run(|| {
        (0..20)
            .map(|i| {
                let t = Instant::now();
                let mut s = Socket::open().unwrap();
                let mut b = Batch::new("ferry");
                let name = format!("new-{i}");
                b.add_chain(&name, None);
                b.add_rule(
                    &name,
                    &with(
                        saddr_in(Family::Ipv4, "cluster-cidrs-v4", true),
                        mark_set(MARK, false),
                    ),
                );
                b.add_rule(
                    &name,
                    &dnat_numgen_map(Family::Ipv4, IPPROTO_TCP, 1, 900_000 + i, "endpoints-v4-00"),
                );
                b.add_elements(
                    "endpoints-v4-00",
                    &[Element::value(
                        u32_bytes(900_000 + i),
                        concat(&[&[10, 99, 0, i as u8], &port_bytes(80)]),
                    )],
                );
                b.add_elements(
                    "service-ips-v4",
                    &[Element::verdict(
                        concat(&[&[172, 31, 0, i as u8], &proto_bytes(IPPROTO_TCP), &port_bytes(80)]),
                        Verdict::Goto(name.clone()),
                    )],
                );
                let ours = t.elapsed();
                s.commit(&b).unwrap();
                (ours, t.elapsed())
            })
            .collect()
    });
    let mut ours: Vec<Duration> = samples.iter().map(|s| s.0).collect();
    let mut total: Vec<Duration> = samples.iter().map(|s| s.1).collect();
    ours.sort();
    total.sort();
    println!(
        "one more Service (open + build 5 messages): median {:?}; with the kernel's commit: median {:?} (max {:?})",
        ours[10], total[10], total[19]
    );

    // Which part of a small commit the kernel spends its time on, at this size.
    let parts: Vec<(&str, Duration)> = ns.run(|| {
        let mut s = Socket::open().unwrap();
        let mut time = |what: &'static str, build: &dyn Fn(&mut Batch, u32)| {
            let mut t: Vec<Duration> = (0..11)
                .map(|i| {
                    let mut b = Batch::new("ferry");
                    build(&mut b, i);
                    let t = Instant::now();
                    s.commit(&b).unwrap();
                    t.elapsed()
                })
                .collect();
            t.sort();
            (what, t[5])
        };
        vec![
            time("an empty chain", &|b, i| b.add_chain(&format!("empty-{i}"), None)),
            time("a chain and a counter rule", &|b, i| {
                let name = format!("counter-{i}");
                b.add_chain(&name, None);
                b.add_rule(&name, &[Expr::Counter]);
            }),
            time("a chain and its 2 rules", &|b, i| {
                let name = format!("part-{i}");
                b.add_chain(&name, None);
                b.add_rule(
                    &name,
                    &with(
                        saddr_in(Family::Ipv4, "cluster-cidrs-v4", true),
                        mark_set(MARK, false),
                    ),
                );
                b.add_rule(
                    &name,
                    &dnat_numgen_map(Family::Ipv4, IPPROTO_TCP, 1, 800_000 + i, "endpoints-v4-01"),
                );
            }),
            time("a chain and a `dnat to` rule (no map)", &|b, i| {
                let name = format!("nat-only-{i}");
                b.add_chain(&name, None);
                b.add_rule(&name, &dnat_to("10.0.0.1", 80));
            }),
            time(
                "a chain and a rule looking up an endpoint map (no nat)",
                &|b, i| {
                    let name = format!("map-only-{i}");
                    b.add_chain(&name, None);
                    b.add_rule(
                        &name,
                        &[
                            Expr::Numgen {
                                dreg: Reg::R32(0),
                                modulus: 1,
                                offset: 0,
                            },
                            Expr::Lookup {
                                sreg: Reg::R32(0),
                                set: "endpoints-v4-03".into(),
                                dreg: Some(Reg::R32(0)),
                                invert: false,
                            },
                        ],
                    );
                },
            ),
            time("an endpoint map element", &|b, i| {
                b.add_elements(
                    "endpoints-v4-02",
                    &[Element::value(
                        u32_bytes(800_000 + i),
                        concat(&[&[10, 98, 0, i as u8], &port_bytes(80)]),
                    )],
                )
            }),
            time("a verdict map element (goto)", &|b, i| {
                b.add_elements(
                    "service-ips-v4",
                    &[Element::verdict(
                        concat(&[&[172, 30, 0, i as u8], &proto_bytes(IPPROTO_TCP), &port_bytes(80)]),
                        Verdict::Goto(format!("empty-{i}")),
                    )],
                )
            }),
        ]
    });
    for (what, t) in parts {
        println!("  commit of {what}: median {t:?}");
    }
}

/// (user, system) CPU time of the calling thread.
fn thread_cpu() -> (Duration, Duration) {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
    let d = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    (d(u.ru_utime), d(u.ru_stime))
}

#[test]
fn a_jump_loop_is_refused_by_the_message_that_closes_it() {
    require_root!();
    let ns = Netns::new("nft-loop");
    let mut b = Batch::new("ferry");
    b.add_table();
    b.add_chain(
        "in",
        Some(&BaseChain {
            kind: ChainType::Filter,
            hook: Hook::Input,
            priority: 0,
        }),
    );
    b.add_chain("a", None);
    b.add_chain("b", None);
    b.add_set(&vmap("m", vec![DataType::InetProto]));
    b.add_rule("in", &[verdict(Verdict::Jump(chain("a")))]);
    b.add_rule("a", &[verdict(Verdict::Jump(chain("b")))]);
    let mut looping = b.clone();
    looping.add_rule("b", &[verdict(Verdict::Jump(chain("a")))]);
    let e = commit(&ns, &looping).unwrap_err();
    assert_eq!((e.errno, e.index), (libc::EMLINK, Some(7)), "{e}");
    assert_eq!(e.description, "add rule to chain b");

    // Through a verdict map: the element that closes the loop fails.
    b.add_rule(
        "b",
        &[
            Expr::Meta {
                key: MetaKey::L4Proto,
                dreg: Reg::R32(0),
            },
            Expr::Lookup {
                sreg: Reg::R32(0),
                set: "m".into(),
                dreg: Some(Reg::Verdict),
                invert: false,
            },
        ],
    );
    commit(&ns, &b).unwrap();
    let mut b = Batch::new("ferry");
    b.add_elements(
        "m",
        &[Element::verdict(
            proto_bytes(IPPROTO_TCP),
            Verdict::Jump(chain("a")),
        )],
    );
    let e = commit(&ns, &b).unwrap_err();
    assert_eq!((e.errno, e.index), (libc::EMLINK, Some(0)), "{e}");
    assert_eq!(e.description, "add elements 0..1 to set m");
}

// ---------------------------------------------------------------------------------------
// Rules as data (`Rule`), rule comments, the bridge family, listing and deleting rules:
// what the bridge plugin uses.

/// The nft text [`rules_batch`] mirrors: the shapes of ferry-bridge's rules.
const GOLDEN_RULES_NFT: &str = r#"table inet t {
  chain postrouting { type nat hook postrouting priority srcnat; policy accept;
    ip saddr 10.22.0.5 ip daddr != 10.22.0.0/24 ip daddr != 224.0.0.0/4 masquerade comment "ferry:net1:c1:eth0 masq.00112233"
    ip6 saddr fd00::5 ip6 daddr != fd00::/64 ip6 daddr != ff00::/8 masquerade
    ct status dnat ip6 saddr fd00::5 ip6 daddr fd00::5 masquerade comment "k hairpin.1"
  }
  chain prerouting { type nat hook prerouting priority dstnat; policy accept;
    meta l4proto tcp th dport 8080 meta nfproto ipv4 fib daddr type local dnat ip to 10.22.0.5:80 comment "k dnat.1"
    meta l4proto udp th dport 5353 ip6 daddr 2001:db8::1 dnat ip6 to [fd00::5]:53
  }
  chain output { type nat hook output priority -100; policy accept;
    meta l4proto sctp th dport 8080 ip daddr != 127.0.0.0/8 fib daddr type local dnat ip to 10.22.0.5:80
  }
}
table bridge t {
  chain prerouting { type filter hook prerouting priority -300; policy accept;
    iifname "fy0123456789ab" ether saddr != 0a:58:0a:16:00:05 drop comment "k mac.1"
  }
}
"#;

/// What nft 1.0.6 sent for [`GOLDEN_RULES_NFT`]: (message type, nfgenmsg family, attributes
/// after the nfgenmsg header, hex), captured as [`GOLDEN`] was.
const GOLDEN_RULES: &[(&str, u8, &str)] = &[
    ("NEWTABLE", 1, "06000100740000000800020000000000"),
    ("NEWCHAIN", 1, "060001007400000010000300706f7374726f7574696e6700080007006e61740008000500000000011400048008000100000000040800020000000064"),
    ("NEWCHAIN", 1, "06000100740000000f000300707265726f7574696e670000080007006e617400080005000000000114000480080001000000000008000200ffffff9c"),
    ("NEWCHAIN", 1, "06000100740000000b0003006f75747075740000080007006e617400080005000000000114000480080001000000000308000200ffffff9c"),
    ("NEWRULE", 1, "060001007400000010000200706f7374726f7574696e6700cc01048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c08000400000000042c00018008000100636d700020000280080001000000000108000200000000000c000380080001000a160005340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000032c00018008000100636d700020000280080001000000000108000200000000010c000380070001000a160000340001800c0001007061796c6f616400240002800800010000000001080002000000000108000300000000100800040000000004440001800c0001006269747769736500340002800800010000000001080002000000000108000300000000040c00048008000100f00000000c00058008000100000000002c00018008000100636d700020000280080001000000000108000200000000010c00038008000100e000000014000180090001006d617371000000000400028027000700002166657272793a6e6574313a63313a65746830206d6173712e30303131323233330000"),
    ("NEWRULE", 1, "060001007400000010000200706f7374726f7574696e67009801048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000a000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000808000400000000103800018008000100636d70002c000280080001000000000108000200000000001800038014000100fd000000000000000000000000000005340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001808000400000000083000018008000100636d70002400028008000100000000010800020000000001100003800c000100fd00000000000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001808000400000000012c00018008000100636d700020000280080001000000000108000200000000010c00038005000100ff00000014000180090001006d6173710000000004000280"),
    ("NEWRULE", 1, "060001007400000010000200706f7374726f7574696e6700d00104802000018007000100637400001400028008000200000000020800010000000001440001800c0001006269747769736500340002800800010000000001080002000000000108000300000000040c00048008000100200000000c00058008000100000000002c00018008000100636d700020000280080001000000000108000200000000010c000380080001000000000024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000a000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000808000400000000103800018008000100636d70002c000280080001000000000108000200000000001800038014000100fd000000000000000000000000000005340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001808000400000000103800018008000100636d70002c000280080001000000000108000200000000001800038014000100fd00000000000000000000000000000514000180090001006d617371000000000400028012000700000c6b206861697270696e2e31000000"),
    ("NEWRULE", 1, "06000100740000000f000200707265726f7574696e670000e801048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000208000400000000022c00018008000100636d700020000280080001000000000108000200000000000c000380060001001f90000024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c00038005000100020000002800018008000100666962001c0002800800030000000002080002000000000308000100000000012c00018008000100636d700020000280080001000000000108000200000000000c00038008000100020000002c0001800e000100696d6d6564696174650000001800028008000100000000010c000280080001000a1600052c0001800e000100696d6d6564696174650000001800028008000100000000020c000280060001000050000038000180080001006e6174002c000280080001000000000108000200000000020800030000000001080005000000000208000700000000020f00070000096b20646e61742e310000"),
    ("NEWRULE", 1, "06000100740000000f000200707265726f7574696e6700000c02048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010011000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000208000400000000022c00018008000100636d700020000280080001000000000108000200000000000c0003800600010014e9000024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000a000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001808000400000000103800018008000100636d70002c00028008000100000000010800020000000000180003801400010020010db8000000000000000000000001380001800e000100696d6d6564696174650000002400028008000100000000011800028014000100fd0000000000000000000000000000052c0001800e000100696d6d6564696174650000001800028008000100000000020c000280060001000035000038000180080001006e6174002c0002800800010000000001080002000000000a080003000000000108000500000000020800070000000002"),
    ("NEWRULE", 1, "06000100740000000b0002006f757470757400004802048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010084000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000208000400000000022c00018008000100636d700020000280080001000000000108000200000000000c000380060001001f90000024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000012c00018008000100636d700020000280080001000000000108000200000000010c000380050001007f0000002800018008000100666962001c0002800800030000000002080002000000000308000100000000012c00018008000100636d700020000280080001000000000108000200000000000c00038008000100020000002c0001800e000100696d6d6564696174650000001800028008000100000000010c000280080001000a1600052c0001800e000100696d6d6564696174650000001800028008000100000000020c000280060001000050000038000180080001006e6174002c00028008000100000000010800020000000002080003000000000108000500000000020800070000000002"),
    ("NEWTABLE", 7, "06000100740000000800020000000000"),
    ("NEWCHAIN", 7, "06000100740000000f000300707265726f7574696e6700000b00070066696c7465720000080005000000000114000480080001000000000008000200fffffed4"),
    ("NEWRULE", 7, "06000100740000000f000200707265726f7574696e670000f400048024000180090001006d6574610000000014000280080002000000000608000100000000013800018008000100636d70002c00028008000100000000010800020000000000180003801400010066793031323334353637383961620000340001800c0001007061796c6f6164002400028008000100000000010800020000000000080003000000000608000400000000063000018008000100636d70002400028008000100000000010800020000000001100003800a0001000a580a1600050000300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100000000000e00070000086b206d61632e31000000"),
];

/// The rules of [`GOLDEN_RULES_NFT`], by table family and chain, in order.
fn golden_rule_list() -> Vec<(TableFamily, &'static str, Rule)> {
    use Addr::{Daddr, Saddr};
    use CmpOp::{Eq, Neq};
    let prefix = |which, addr: &str, prefix_len| Match::Addr {
        which,
        op: Neq,
        addr: ip(addr),
        prefix_len,
    };
    let rule = |matches: Vec<Match>, statement, comment: Option<&str>| Rule {
        matches,
        statement,
        comment: comment.map(str::to_string),
    };
    let dnat = |addr: &str, port| Statement::Dnat { addr: ip(addr), port };
    let inet = TableFamily::Inet;
    vec![
        (
            inet,
            "postrouting",
            rule(
                vec![
                    Match::addr(Saddr, Eq, ip("10.22.0.5")),
                    prefix(Daddr, "10.22.0.0", 24),
                    prefix(Daddr, "224.0.0.0", 4),
                ],
                Statement::Masquerade,
                Some("ferry:net1:c1:eth0 masq.00112233"),
            ),
        ),
        (
            inet,
            "postrouting",
            rule(
                vec![
                    Match::addr(Saddr, Eq, ip("fd00::5")),
                    prefix(Daddr, "fd00::", 64),
                    prefix(Daddr, "ff00::", 8),
                ],
                Statement::Masquerade,
                None,
            ),
        ),
        (
            inet,
            "postrouting",
            rule(
                vec![
                    Match::CtStatusDnat,
                    Match::addr(Saddr, Eq, ip("fd00::5")),
                    Match::addr(Daddr, Eq, ip("fd00::5")),
                ],
                Statement::Masquerade,
                Some("k hairpin.1"),
            ),
        ),
        (
            inet,
            "prerouting",
            rule(
                vec![
                    Match::L4proto(IPPROTO_TCP),
                    Match::ThDport(8080),
                    Match::Nfproto(Family::Ipv4),
                    Match::FibDaddrLocal,
                ],
                dnat("10.22.0.5", 80),
                Some("k dnat.1"),
            ),
        ),
        (
            inet,
            "prerouting",
            rule(
                vec![
                    Match::L4proto(IPPROTO_UDP),
                    Match::ThDport(5353),
                    Match::addr(Daddr, Eq, ip("2001:db8::1")),
                ],
                dnat("fd00::5", 53),
                None,
            ),
        ),
        (
            inet,
            "output",
            rule(
                vec![
                    Match::L4proto(IPPROTO_SCTP),
                    Match::ThDport(8080),
                    prefix(Daddr, "127.0.0.0", 8),
                    Match::FibDaddrLocal,
                ],
                dnat("10.22.0.5", 80),
                None,
            ),
        ),
        (
            TableFamily::Bridge,
            "prerouting",
            rule(
                vec![
                    Match::IifName("fy0123456789ab".into()),
                    Match::EtherSaddr {
                        op: Neq,
                        mac: [0x0a, 0x58, 0x0a, 0x16, 0x00, 0x05],
                    },
                ],
                Statement::Drop,
                Some("k mac.1"),
            ),
        ),
    ]
}

/// [`GOLDEN_RULES_NFT`] through the API, in nft's order: per table, the table, its
/// chains, its rules; both tables in one batch.
fn rules_batch(table: &str) -> Batch {
    let base = |kind, hook, priority| BaseChain { kind, hook, priority };
    let mut b = Batch::new(table);
    b.add_table();
    b.add_chain("postrouting", Some(&base(ChainType::Nat, Hook::Postrouting, 100)));
    b.add_chain("prerouting", Some(&base(ChainType::Nat, Hook::Prerouting, -100)));
    b.add_chain("output", Some(&base(ChainType::Nat, Hook::Output, -100)));
    let rules = golden_rule_list();
    for (_, chain, r) in rules.iter().filter(|r| r.0 == TableFamily::Inet) {
        add_rule(&mut b, chain, r);
    }
    b.use_table(TableFamily::Bridge, table);
    b.add_table();
    b.add_chain(
        "prerouting",
        Some(&base(ChainType::Filter, Hook::Prerouting, -300)),
    );
    for (_, chain, r) in rules.iter().filter(|r| r.0 == TableFamily::Bridge) {
        add_rule(&mut b, chain, r);
    }
    b
}

fn add_rule(b: &mut Batch, chain: &str, r: &Rule) {
    match &r.comment {
        Some(c) => b.add_rule_with_comment(chain, &r.exprs(), c).unwrap(),
        None => b.add_rule(chain, &r.exprs()),
    }
}

#[test]
fn rule_encodings_are_what_nft_sends() {
    let batch = rules_batch("t");
    assert_eq!(batch.len(), GOLDEN_RULES.len(), "{batch}");
    for (i, (kind, family, hex)) in GOLDEN_RULES.iter().enumerate() {
        let msg = batch.message(i);
        assert_eq!(
            msg[16],
            *family,
            "family of message {} ({})",
            i + 1,
            batch.describe(i)
        );
        let mut want = parse(&hex_decode(hex));
        let mut got = parse(&msg[20..]);
        drop_nft_only(kind, &mut want);
        drop_nft_only(kind, &mut got);
        sort_structs(&mut want);
        sort_structs(&mut got);
        assert_eq!(
            got,
            want,
            "message {} ({}) differs from nft's {kind}",
            i + 1,
            batch.describe(i)
        );
    }
    // Each rule prints as the text it encodes.
    let text: Vec<String> = golden_rule_list().iter().map(|(_, _, r)| r.to_string()).collect();
    for line in &text {
        assert!(GOLDEN_RULES_NFT.contains(line.as_str()), "{line}");
    }
    assert_eq!(
        batch.describe(12),
        "add rule to chain prerouting in table bridge t"
    );
}

#[test]
fn over_long_comments_are_refused() {
    let mut b = Batch::new("t");
    let e = b
        .add_rule_with_comment("c", &[Expr::Counter], &"x".repeat(COMMENT_MAX + 1))
        .unwrap_err();
    assert!(e.to_string().contains("129 bytes"), "{e}");
    assert!(b.is_empty());
    b.add_rule_with_comment("c", &[Expr::Counter], &"x".repeat(COMMENT_MAX))
        .unwrap();
}

/// The oracle: [`GOLDEN_RULES_NFT`] loaded by `nft -f` in one namespace, the same rules
/// through netlink in another, and `nft list ruleset` must print the same in both.
#[test]
fn rules_list_as_nft_lists_its_own() {
    require_root!();
    let theirs_ns = Netns::new("nft-rules-nft");
    let ours_ns = Netns::new("nft-rules-ours");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), GOLDEN_RULES_NFT).unwrap();
    theirs_ns.exec_ok(&["nft", "-f", file.path().to_str().unwrap()]);
    commit(&ours_ns, &rules_batch("t")).unwrap();
    let theirs = theirs_ns.exec_ok(&["nft", "list", "ruleset"]);
    let ours = ours_ns.exec_ok(&["nft", "list", "ruleset"]);
    assert_eq!(ours, theirs);
    assert!(ours.contains("comment \"k mac.1\""), "{ours}");
}

#[test]
fn rules_are_listed_with_handle_and_comment_and_deleted_by_handle() {
    require_root!();
    let ns = Netns::new("nft-rule-list");
    let listed = ns.run(|| {
        let mut s = Socket::open().unwrap();
        // No table yet: an empty listing, not an error.
        assert!(s.list_rules(TableFamily::Inet, "t").unwrap().is_empty());
        s.commit(&rules_batch("t")).unwrap();
        let mut all = s.list_rules(TableFamily::Inet, "t").unwrap();
        all.extend(s.list_rules(TableFamily::Bridge, "t").unwrap());
        assert!(s.has_chain(TableFamily::Inet, "t", "output").unwrap());
        assert!(s.has_chain(TableFamily::Bridge, "t", "prerouting").unwrap());
        assert!(!s.has_chain(TableFamily::Bridge, "t", "output").unwrap());
        assert!(!s.has_chain(TableFamily::Inet, "no-such-table", "output").unwrap());
        all
    });
    let mut seen: Vec<(TableFamily, String, Option<String>)> = listed
        .iter()
        .map(|r| (r.family, r.chain.clone(), r.comment.clone()))
        .collect();
    let mut want: Vec<(TableFamily, String, Option<String>)> = golden_rule_list()
        .into_iter()
        .map(|(f, c, r)| (f, c.to_string(), r.comment))
        .collect();
    seen.sort();
    want.sort();
    assert_eq!(seen, want);
    assert!(listed.iter().all(|r| r.table == "t" && r.handle > 0));
    // Handles are what `nft -a` prints.
    let mac = listed.iter().find(|r| r.family == TableFamily::Bridge).unwrap();
    let text = ns.exec_ok(&["nft", "-a", "list", "table", "bridge", "t"]);
    assert!(
        text.contains(&format!("comment \"k mac.1\" # handle {}", mac.handle)),
        "{text}"
    );
    // A delete by handle in a batch spanning both tables.
    let hairpin = listed
        .iter()
        .find(|r| r.comment.as_deref() == Some("k hairpin.1"))
        .unwrap();
    let mut b = Batch::new("t");
    b.delete_rule(&hairpin.chain, hairpin.handle);
    b.use_table(TableFamily::Bridge, "t");
    b.delete_rule(&mac.chain, mac.handle);
    commit(&ns, &b).unwrap();
    let left = ns.run(|| {
        let mut s = Socket::open().unwrap();
        let mut all = s.list_rules(TableFamily::Inet, "t").unwrap();
        all.extend(s.list_rules(TableFamily::Bridge, "t").unwrap());
        all
    });
    assert_eq!(left.len(), listed.len() - 2);
    assert!(left
        .iter()
        .all(|r| r.handle != hairpin.handle && r.handle != mac.handle));
    // Deleting a handle that is gone names the message and applies nothing.
    let e = commit(&ns, &b).unwrap_err();
    assert_eq!(e.errno, libc::ENOENT);
    assert_eq!(e.index, Some(0));
    assert!(e.description.starts_with("delete rule handle"), "{e}");
}
