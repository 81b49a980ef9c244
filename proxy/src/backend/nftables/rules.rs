//! The vocabulary of Ferry's table, as data: every rule shape the back end writes (its
//! map elements and sets are in [`super::elements`]).
//!
//! Each item has two faces that must say the same thing:
//! - `Display`: the nft syntax, as an operator reads it in the back end's transaction log
//!   and would type it (`nft -f` accepts it);
//! - `exprs()` / `key_bytes()` / `spec()`: what goes to the kernel over netlink, the same
//!   expressions nft itself sends for that text (`nft --debug=netlink -f`).
//!
//! `proxy/tests/nftables.rs` holds them to it: it applies one transaction through netlink
//! in one namespace and its text through `nft -f` in another, and compares the two
//! `nft list table` outputs.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;

use crate::nft::{
    self, match_ct_bits, match_family, match_fib_local, match_l4proto, match_prefix, CmpOp, CtKey, Expr,
    MetaKey, NatFamily, NatKind, Reg, RejectKind, Verdict,
};
use crate::plan::{Family, Protocol};

/// The packet mark bit that asks `masquerading` to masquerade (kube-proxy's).
pub const MASQ_MARK: u32 = 0x4000;

pub fn ipx(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

pub fn fam(f: Family) -> &'static str {
    match f {
        Family::V4 => "v4",
        Family::V6 => "v6",
    }
}

fn nft_family(f: Family) -> nft::Family {
    match f {
        Family::V4 => nft::Family::Ipv4,
        Family::V6 => nft::Family::Ipv6,
    }
}

fn nat_family(f: Family) -> NatFamily {
    match f {
        Family::V4 => NatFamily::Ipv4,
        Family::V6 => NatFamily::Ipv6,
    }
}

pub fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

pub(super) fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The 32-bit register after an address of family `f` loaded at register 0 (nft's
/// numbering: an IPv6 address fills four).
fn after_addr(f: Family) -> Reg {
    match f {
        Family::V4 => Reg::R32(1),
        Family::V6 => Reg::R32(4),
    }
}

/// `ip saddr`/`ip daddr` into register `reg` (the family already matched).
fn load_addr(f: Family, which: nft::Addr, reg: Reg) -> Expr {
    nft::ip_addr(nft_family(f), which, reg)
}

/// `meta mark set meta mark or 0x4000`.
fn mark_for_masquerade() -> [Expr; 3] {
    nft::mark_set(MASQ_MARK, false)
}

/// One rule: a list of matches and statements nft would print on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// `ip daddr . meta l4proto . th dport vmap @map`
    ServiceLookup {
        family: Family,
        map: String,
    },
    /// `[ip daddr @nodeport-ips-v4] fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto
    /// . th dport vmap @map` (`restricted`: only `--nodeport-addresses`).
    NodePortLookup {
        family: Family,
        map: String,
        restricted: bool,
    },
    /// `meta l4proto tcp reject with tcp reset`
    RejectTcpReset,
    /// `reject` (ICMP or ICMPv6 port unreachable)
    Reject,
    /// `ct status dnat ip saddr . ip daddr @hairpin-v4 masquerade fully-random`
    HairpinMasquerade {
        family: Family,
    },
    /// `meta mark & 0x4000 == 0 return`
    ReturnUnlessMarked,
    /// `meta mark set meta mark xor 0x4000`
    ClearMark,
    /// `masquerade fully-random`
    Masquerade,
    /// `ct state new jump <chain>`
    NewConnectionJump(String),
    Jump(String),
    Goto(String),
    Drop,
    /// `ip saddr != @cluster-cidrs-v4 meta mark set meta mark or 0x4000`
    MarkUnlessFromCluster {
        family: Family,
    },
    /// `meta mark set meta mark or 0x4000`
    Mark,
    /// `ip saddr @cluster-cidrs-v4 goto <chain>`
    GotoIfFromCluster {
        family: Family,
        chain: String,
    },
    /// `fib saddr type local meta mark set meta mark or 0x4000`
    MarkIfFromNode,
    /// `fib saddr type local goto <chain>`
    GotoIfFromNode(String),
    /// `meta l4proto tcp dnat ip to numgen random mod N offset O map @endpoints-…`
    DnatChoice {
        family: Family,
        proto: Protocol,
        modulus: u32,
        offset: u32,
        map: String,
    },
    /// `ip saddr @S update @S { ip saddr } meta l4proto tcp dnat ip to A:P`: a client seen
    /// within the affinity timeout goes back to its endpoint.
    DnatSticky {
        proto: Protocol,
        set: String,
        to: SocketAddr,
    },
    /// `[numgen random mod N == 0] update @S { ip saddr } meta l4proto tcp dnat ip to A:P`:
    /// the random choice of a Service with affinity, recording the client.
    DnatRecorded {
        proto: Protocol,
        set: String,
        modulus: Option<u32>,
        to: SocketAddr,
    },
    /// `ip saddr <net> return`
    ReturnIfFrom(IpNetwork),
}

fn family_of_socket(to: &SocketAddr) -> Family {
    Family::of(to.ip())
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MARK: &str = "meta mark set meta mark or 0x4000";
        match self {
            Rule::ServiceLookup { family, map } => {
                write!(f, "{} daddr . meta l4proto . th dport vmap @{map}", ipx(*family))
            }
            Rule::NodePortLookup {
                family,
                map,
                restricted,
            } => {
                let ip = ipx(*family);
                if *restricted {
                    write!(f, "{ip} daddr @nodeport-ips-{} ", fam(*family))?;
                }
                let lo = match family {
                    Family::V4 => "127.0.0.0/8",
                    Family::V6 => "::1",
                };
                write!(
                    f,
                    "fib daddr type local {ip} daddr != {lo} meta l4proto . th dport vmap @{map}"
                )
            }
            Rule::RejectTcpReset => f.write_str("meta l4proto tcp reject with tcp reset"),
            Rule::Reject => f.write_str("reject"),
            Rule::HairpinMasquerade { family } => {
                let ip = ipx(*family);
                write!(
                    f,
                    "ct status dnat {ip} saddr . {ip} daddr @hairpin-{} masquerade fully-random",
                    fam(*family)
                )
            }
            Rule::ReturnUnlessMarked => write!(f, "meta mark & {MASQ_MARK:#x} == 0 return"),
            Rule::ClearMark => write!(f, "meta mark set meta mark xor {MASQ_MARK:#x}"),
            Rule::Masquerade => f.write_str("masquerade fully-random"),
            Rule::NewConnectionJump(c) => write!(f, "ct state new jump {c}"),
            Rule::Jump(c) => write!(f, "jump {c}"),
            Rule::Goto(c) => write!(f, "goto {c}"),
            Rule::Drop => f.write_str("drop"),
            Rule::MarkUnlessFromCluster { family } => write!(
                f,
                "{} saddr != @cluster-cidrs-{} {MARK}",
                ipx(*family),
                fam(*family)
            ),
            Rule::Mark => f.write_str(MARK),
            Rule::GotoIfFromCluster { family, chain } => write!(
                f,
                "{} saddr @cluster-cidrs-{} goto {chain}",
                ipx(*family),
                fam(*family)
            ),
            Rule::MarkIfFromNode => write!(f, "fib saddr type local {MARK}"),
            Rule::GotoIfFromNode(c) => write!(f, "fib saddr type local goto {c}"),
            Rule::DnatChoice {
                family,
                proto,
                modulus,
                offset,
                map,
            } => write!(
                f,
                "meta l4proto {} dnat {} to numgen random mod {modulus} offset {offset} map @{map}",
                proto.as_str(),
                ipx(*family)
            ),
            Rule::DnatSticky { proto, set, to } => {
                let ip = ipx(family_of_socket(to));
                write!(
                    f,
                    "{ip} saddr @{set} update @{set} {{ {ip} saddr }} meta l4proto {} dnat {ip} to {to}",
                    proto.as_str()
                )
            }
            Rule::DnatRecorded {
                proto,
                set,
                modulus,
                to,
            } => {
                let ip = ipx(family_of_socket(to));
                if let Some(m) = modulus {
                    write!(f, "numgen random mod {m} == 0 ")?;
                }
                write!(
                    f,
                    "update @{set} {{ {ip} saddr }} meta l4proto {} dnat {ip} to {to}",
                    proto.as_str()
                )
            }
            Rule::ReturnIfFrom(net) => {
                let net = IpNetwork::new(net.network(), net.prefix()).unwrap_or(*net);
                write!(f, "{} saddr {net} return", ipx(Family::of(net.ip())))
            }
        }
    }
}

impl Rule {
    /// The kernel expressions of the rule, as nft sends them for its text.
    pub fn exprs(&self) -> Vec<Expr> {
        use nft::Addr::{Daddr, Saddr};
        let mut e: Vec<Expr> = Vec::with_capacity(8);
        match self {
            Rule::ServiceLookup { family, map } => {
                e.extend(match_family(nft_family(*family)));
                e.push(load_addr(*family, Daddr, Reg::R32(0)));
                let next = after_addr(*family);
                let Reg::R32(n) = next else { unreachable!() };
                e.push(Expr::Meta {
                    key: MetaKey::L4Proto,
                    dreg: next,
                });
                e.push(nft::th_dport(Reg::R32(n + 1)));
                e.push(Expr::Lookup {
                    sreg: Reg::R32(0),
                    set: map.clone(),
                    dreg: Some(Reg::Verdict),
                    invert: false,
                });
            }
            Rule::NodePortLookup {
                family,
                map,
                restricted,
            } => {
                let nf = nft_family(*family);
                if *restricted {
                    e.extend(match_family(nf));
                    e.push(load_addr(*family, Daddr, Reg::R32(0)));
                    e.push(Expr::Lookup {
                        sreg: Reg::R32(0),
                        set: format!("nodeport-ips-{}", fam(*family)),
                        dreg: None,
                        invert: false,
                    });
                }
                e.extend(match_fib_local(nft::FIB_DADDR));
                let (lo, len): (IpAddr, u32) = match family {
                    Family::V4 => ([127, 0, 0, 0].into(), 8),
                    Family::V6 => (std::net::Ipv6Addr::LOCALHOST.into(), 128),
                };
                let not_lo = match_prefix(nf, Daddr, &addr_bytes(lo), len, CmpOp::Neq);
                // match_prefix starts with the family match, which the restricted form has
                // made already (nft emits it once).
                e.extend(not_lo.into_iter().skip(if *restricted { 2 } else { 0 }));
                e.push(Expr::Meta {
                    key: MetaKey::L4Proto,
                    dreg: Reg::R32(0),
                });
                e.push(nft::th_dport(Reg::R32(1)));
                e.push(Expr::Lookup {
                    sreg: Reg::R32(0),
                    set: map.clone(),
                    dreg: Some(Reg::Verdict),
                    invert: false,
                });
            }
            Rule::RejectTcpReset => {
                e.extend(match_l4proto(6));
                e.push(Expr::Reject {
                    kind: RejectKind::TcpReset,
                });
            }
            Rule::Reject => e.push(Expr::Reject {
                kind: RejectKind::IcmpxPortUnreachable,
            }),
            Rule::HairpinMasquerade { family } => {
                e.extend(match_ct_bits(CtKey::Status, nft::CT_STATUS_DNAT));
                e.extend(match_family(nft_family(*family)));
                e.push(load_addr(*family, Saddr, Reg::R32(0)));
                e.push(load_addr(*family, Daddr, after_addr(*family)));
                e.push(Expr::Lookup {
                    sreg: Reg::R32(0),
                    set: format!("hairpin-{}", fam(*family)),
                    dreg: None,
                    invert: false,
                });
                e.push(Expr::Masquerade {
                    flags: nft::NAT_FULLY_RANDOM,
                });
            }
            Rule::ReturnUnlessMarked => {
                e.push(Expr::Meta {
                    key: MetaKey::Mark,
                    dreg: Reg::R32(0),
                });
                e.push(Expr::Bitwise {
                    sreg: Reg::R32(0),
                    dreg: Reg::R32(0),
                    len: 4,
                    mask: MASQ_MARK.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                });
                e.push(Expr::Cmp {
                    sreg: Reg::R32(0),
                    op: CmpOp::Eq,
                    data: vec![0; 4],
                });
                e.push(Expr::Verdict(Verdict::Return));
            }
            Rule::ClearMark => e.extend(nft::mark_set(MASQ_MARK, true)),
            Rule::Masquerade => e.push(Expr::Masquerade {
                flags: nft::NAT_FULLY_RANDOM,
            }),
            Rule::NewConnectionJump(c) => {
                e.extend(match_ct_bits(CtKey::State, nft::CT_STATE_NEW));
                e.push(Expr::Verdict(Verdict::Jump(c.clone())));
            }
            Rule::Jump(c) => e.push(Expr::Verdict(Verdict::Jump(c.clone()))),
            Rule::Goto(c) => e.push(Expr::Verdict(Verdict::Goto(c.clone()))),
            Rule::Drop => e.push(Expr::Verdict(Verdict::Drop)),
            Rule::MarkUnlessFromCluster { family } => {
                e.extend(from_cluster(*family, true));
                e.extend(mark_for_masquerade());
            }
            Rule::Mark => e.extend(mark_for_masquerade()),
            Rule::GotoIfFromCluster { family, chain } => {
                e.extend(from_cluster(*family, false));
                e.push(Expr::Verdict(Verdict::Goto(chain.clone())));
            }
            Rule::MarkIfFromNode => {
                e.extend(match_fib_local(nft::FIB_SADDR));
                e.extend(mark_for_masquerade());
            }
            Rule::GotoIfFromNode(c) => {
                e.extend(match_fib_local(nft::FIB_SADDR));
                e.push(Expr::Verdict(Verdict::Goto(c.clone())));
            }
            Rule::DnatChoice {
                family,
                proto,
                modulus,
                offset,
                map,
            } => {
                e.extend(match_l4proto(proto_number(*proto)));
                e.push(Expr::Numgen {
                    dreg: Reg::R32(0),
                    modulus: *modulus,
                    offset: *offset,
                });
                e.push(Expr::Lookup {
                    sreg: Reg::R32(0),
                    set: map.clone(),
                    dreg: Some(Reg::R32(0)),
                    invert: false,
                });
                e.push(Expr::Nat {
                    kind: NatKind::Dnat,
                    family: nat_family(*family),
                    addr: Some(Reg::R32(0)),
                    proto: Some(after_addr(*family)),
                    flags: 0,
                });
            }
            Rule::DnatSticky { proto, set, to } => {
                let family = family_of_socket(to);
                e.extend(match_family(nft_family(family)));
                e.push(load_addr(family, Saddr, Reg::R32(0)));
                e.push(Expr::Lookup {
                    sreg: Reg::R32(0),
                    set: set.clone(),
                    dreg: None,
                    invert: false,
                });
                e.push(load_addr(family, Saddr, Reg::R32(0)));
                e.push(record(set));
                e.extend(dnat_to(*proto, to));
            }
            Rule::DnatRecorded {
                proto,
                set,
                modulus,
                to,
            } => {
                let family = family_of_socket(to);
                if let Some(m) = modulus {
                    e.push(Expr::Numgen {
                        dreg: Reg::R32(0),
                        modulus: *m,
                        offset: 0,
                    });
                    e.push(Expr::Cmp {
                        sreg: Reg::R32(0),
                        op: CmpOp::Eq,
                        data: vec![0; 4],
                    });
                }
                e.extend(match_family(nft_family(family)));
                e.push(load_addr(family, Saddr, Reg::R32(0)));
                e.push(record(set));
                e.extend(dnat_to(*proto, to));
            }
            Rule::ReturnIfFrom(net) => {
                let f = Family::of(net.ip());
                e.extend(match_prefix(
                    nft_family(f),
                    Saddr,
                    &addr_bytes(net.network()),
                    u32::from(net.prefix()),
                    CmpOp::Eq,
                ));
                e.push(Expr::Verdict(Verdict::Return));
            }
        }
        e
    }
}

/// `ip saddr [!=] @cluster-cidrs-v4`.
fn from_cluster(family: Family, invert: bool) -> Vec<Expr> {
    let mut e = match_family(nft_family(family)).to_vec();
    e.push(load_addr(family, nft::Addr::Saddr, Reg::R32(0)));
    e.push(Expr::Lookup {
        sreg: Reg::R32(0),
        set: format!("cluster-cidrs-{}", fam(family)),
        dreg: None,
        invert,
    });
    e
}

/// `update @set { ip saddr }`, the source address at register 0.
fn record(set: &str) -> Expr {
    Expr::Dynset {
        op: nft::DynsetOp::Update,
        set: set.to_string(),
        sreg_key: Reg::R32(0),
        timeout: None,
    }
}

/// `meta l4proto <proto> dnat ip to A:P`.
fn dnat_to(proto: Protocol, to: &SocketAddr) -> Vec<Expr> {
    let family = family_of_socket(to);
    let mut e = match_l4proto(proto_number(proto)).to_vec();
    e.push(Expr::Immediate {
        dreg: Reg::R32(0),
        data: addr_bytes(to.ip()),
    });
    e.push(Expr::Immediate {
        dreg: after_addr(family),
        data: to.port().to_be_bytes().to_vec(),
    });
    e.push(Expr::Nat {
        kind: NatKind::Dnat,
        family: nat_family(family),
        addr: Some(Reg::R32(0)),
        proto: Some(after_addr(family)),
        flags: nft::NAT_PROTO_SPECIFIED,
    });
    e
}
