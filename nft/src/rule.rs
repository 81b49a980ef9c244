//! Rules as data: a list of matches and one statement, with two faces that must say the
//! same thing.
//!
//! - `Display`: the nft text (`ip saddr 10.22.0.5 ip daddr != 10.22.0.0/24 masquerade
//!   comment "..."`), what an operator reads in a log and what `nft -f` accepts;
//! - [`Rule::exprs`]: the kernel expressions nft 1.0.6 sends for that text, which
//!   [`super::Batch::add_rule_with_comment`] encodes.
//!
//! The tests in `nft/tests/nft_netlink.rs` hold the two together: the encodings are
//! compared with nft's own bytes, and a table made of these rules through netlink lists
//! (`nft list`) exactly as the same text loaded with `nft -f` does.
//!
//! The vocabulary is what the bridge plugin's rules need; it grows with its users. Matches
//! on `ip`/`ip6` fields assume an `inet` table (nft's `meta nfproto` dependency);
//! `iifname` and `ether saddr` work in any family (`ether` needs a bridge or netdev table).

use std::fmt;
use std::net::IpAddr;

use super::expr::{
    match_addr_prefix, match_ct_bits, match_ether_saddr, match_family, match_fib_local, match_ifname,
    match_l4proto, th_dport, Addr, CmpOp, CtKey, Expr, Family, MetaKey, NatKind, Reg, Verdict,
    CT_STATUS_DNAT, FIB_DADDR, NAT_PROTO_SPECIFIED,
};
use super::set::{ip_bytes, port_bytes};

/// One match of a rule. Comparisons are `==` or `!=` ([`CmpOp::Eq`], [`CmpOp::Neq`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    /// `meta nfproto ipv4|ipv6`
    Nfproto(Family),
    /// `meta l4proto tcp|udp|sctp` (or the protocol number)
    L4proto(u8),
    /// `th dport <port>`: the destination port of any protocol with ports.
    ThDport(u16),
    /// `ip saddr 10.22.0.5`, `ip daddr != 10.22.0.0/24`, `ip6 daddr != ::1`: an address, or
    /// a prefix when `prefix_len` is shorter than the address (its host bits are ignored).
    Addr {
        which: Addr,
        op: CmpOp,
        addr: IpAddr,
        prefix_len: u8,
    },
    /// `iifname "<name>"`: the interface the packet came in on, by name.
    IifName(String),
    /// `ether saddr [!=] <mac>`
    EtherSaddr { op: CmpOp, mac: [u8; 6] },
    /// `ct status dnat`: the connection's destination was NATed.
    CtStatusDnat,
    /// `fib daddr type local`: the destination is one of this host's addresses.
    FibDaddrLocal,
}

impl Match {
    /// `ip saddr <addr>` / `ip6 saddr <addr>`: one whole address.
    pub fn addr(which: Addr, op: CmpOp, addr: IpAddr) -> Match {
        let prefix_len = if addr.is_ipv4() { 32 } else { 128 };
        Match::Addr {
            which,
            op,
            addr,
            prefix_len,
        }
    }
}

/// What a rule does when every match holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Statement {
    Accept,
    Drop,
    /// `masquerade`: source NAT to the outgoing interface's address.
    Masquerade,
    /// `dnat ip to 10.22.0.5:80` / `dnat ip6 to [fd00::5]:80`
    Dnat {
        addr: IpAddr,
        port: u16,
    },
}

/// A rule: matches, then a statement, and an optional comment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub statement: Statement,
    /// Stored in the rule's user data; at most [`super::COMMENT_MAX`] bytes, no `"`.
    pub comment: Option<String>,
}

fn family_of(addr: IpAddr) -> Family {
    if addr.is_ipv4() {
        Family::Ipv4
    } else {
        Family::Ipv6
    }
}

fn ipx(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ip",
        Family::Ipv6 => "ip6",
    }
}

fn op_text(op: CmpOp) -> &'static str {
    match op {
        CmpOp::Eq => "",
        CmpOp::Neq => "!= ",
        CmpOp::Lt => "< ",
        CmpOp::Lte => "<= ",
        CmpOp::Gt => "> ",
        CmpOp::Gte => ">= ",
    }
}

/// The network of `addr/prefix_len` (host bits cleared).
fn network(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len.min(32)))
                .unwrap_or(0);
            IpAddr::V4((bits & mask).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len.min(128)))
                .unwrap_or(0);
            IpAddr::V6((bits & mask).into())
        }
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::Nfproto(Family::Ipv4) => write!(f, "meta nfproto ipv4"),
            Match::Nfproto(Family::Ipv6) => write!(f, "meta nfproto ipv6"),
            Match::L4proto(p) => match p {
                6 => write!(f, "meta l4proto tcp"),
                17 => write!(f, "meta l4proto udp"),
                132 => write!(f, "meta l4proto sctp"),
                n => write!(f, "meta l4proto {n}"),
            },
            Match::ThDport(port) => write!(f, "th dport {port}"),
            Match::Addr {
                which,
                op,
                addr,
                prefix_len,
            } => {
                let field = match which {
                    Addr::Saddr => "saddr",
                    Addr::Daddr => "daddr",
                };
                let family = family_of(*addr);
                let full = family.addr_len() * 8;
                write!(f, "{} {field} {}", ipx(family), op_text(*op))?;
                if u32::from(*prefix_len) >= full {
                    write!(f, "{addr}")
                } else {
                    write!(f, "{}/{prefix_len}", network(*addr, *prefix_len))
                }
            }
            Match::IifName(name) => write!(f, "iifname \"{name}\""),
            Match::EtherSaddr { op, mac } => {
                let m = mac.map(|b| format!("{b:02x}")).join(":");
                write!(f, "ether saddr {}{m}", op_text(*op))
            }
            Match::CtStatusDnat => write!(f, "ct status dnat"),
            Match::FibDaddrLocal => write!(f, "fib daddr type local"),
        }
    }
}

impl fmt::Display for Statement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Statement::Accept => write!(f, "accept"),
            Statement::Drop => write!(f, "drop"),
            Statement::Masquerade => write!(f, "masquerade"),
            Statement::Dnat {
                addr: IpAddr::V4(a),
                port,
            } => write!(f, "dnat ip to {a}:{port}"),
            Statement::Dnat {
                addr: IpAddr::V6(a),
                port,
            } => write!(f, "dnat ip6 to [{a}]:{port}"),
        }
    }
}

/// `<matches> <statement> [comment "<comment>"]`, as `nft -f` takes it after
/// `add rule <family> <table> <chain>`.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in &self.matches {
            write!(f, "{m} ")?;
        }
        write!(f, "{}", self.statement)?;
        if let Some(c) = &self.comment {
            write!(f, " comment \"{c}\"")?;
        }
        Ok(())
    }
}

impl Rule {
    /// The expressions nft sends for [`Rule`]'s text. Like nft, it puts `meta nfproto`
    /// before the first `ip`/`ip6` match (or NAT statement) of a family the rule has not
    /// matched yet, and uses register 1 for every match (the address and port of a DNAT go
    /// to registers 1 and 2, as nft puts them).
    pub fn exprs(&self) -> Vec<Expr> {
        let mut out = Vec::with_capacity(4 * self.matches.len() + 3);
        let mut known: Option<Family> = None;
        fn need_family(out: &mut Vec<Expr>, known: &mut Option<Family>, family: Family) {
            if *known != Some(family) {
                out.extend(match_family(family));
                *known = Some(family);
            }
        }
        for m in &self.matches {
            match m {
                Match::Nfproto(family) => {
                    out.extend(match_family(*family));
                    known = Some(*family);
                }
                Match::L4proto(p) => out.extend(match_l4proto(*p)),
                Match::ThDport(port) => out.extend([
                    th_dport(Reg::R32(0)),
                    Expr::Cmp {
                        sreg: Reg::R32(0),
                        op: CmpOp::Eq,
                        data: port_bytes(*port).to_vec(),
                    },
                ]),
                Match::Addr {
                    which,
                    op,
                    addr,
                    prefix_len,
                } => {
                    let family = family_of(*addr);
                    need_family(&mut out, &mut known, family);
                    let bytes = ip_bytes(*addr);
                    out.extend(match_addr_prefix(
                        family,
                        *which,
                        &bytes,
                        u32::from(*prefix_len),
                        *op,
                    ));
                }
                Match::IifName(name) => out.extend(match_ifname(MetaKey::IifName, name)),
                Match::EtherSaddr { op, mac } => out.extend(match_ether_saddr(*mac, *op)),
                Match::CtStatusDnat => out.extend(match_ct_bits(CtKey::Status, CT_STATUS_DNAT)),
                Match::FibDaddrLocal => out.extend(match_fib_local(FIB_DADDR)),
            }
        }
        match &self.statement {
            Statement::Accept => out.push(Expr::Verdict(Verdict::Accept)),
            Statement::Drop => out.push(Expr::Verdict(Verdict::Drop)),
            Statement::Masquerade => out.push(Expr::Masquerade { flags: 0 }),
            Statement::Dnat { addr, port } => {
                let family = family_of(*addr);
                need_family(&mut out, &mut known, family);
                out.extend([
                    Expr::Immediate {
                        dreg: Reg::R32(0),
                        data: ip_bytes(*addr),
                    },
                    Expr::Immediate {
                        dreg: Reg::R32(4),
                        data: port_bytes(*port).to_vec(),
                    },
                    Expr::Nat {
                        kind: NatKind::Dnat,
                        family,
                        addr: Some(Reg::R32(0)),
                        proto: Some(Reg::R32(4)),
                        flags: NAT_PROTO_SPECIFIED,
                    },
                ]);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prints_as_nft_text() {
        let r = Rule {
            matches: vec![
                Match::addr(Addr::Saddr, CmpOp::Eq, ip("10.22.0.5")),
                Match::Addr {
                    which: Addr::Daddr,
                    op: CmpOp::Neq,
                    addr: ip("10.22.0.77"),
                    prefix_len: 24,
                },
            ],
            statement: Statement::Masquerade,
            comment: Some("k masq.1".into()),
        };
        assert_eq!(
            r.to_string(),
            "ip saddr 10.22.0.5 ip daddr != 10.22.0.0/24 masquerade comment \"k masq.1\""
        );
        let r = Rule {
            matches: vec![
                Match::IifName("veth0".into()),
                Match::EtherSaddr {
                    op: CmpOp::Neq,
                    mac: [0x0a, 0x58, 0, 0, 0, 0xff],
                },
            ],
            statement: Statement::Drop,
            comment: None,
        };
        assert_eq!(
            r.to_string(),
            "iifname \"veth0\" ether saddr != 0a:58:00:00:00:ff drop"
        );
        let d = Statement::Dnat {
            addr: ip("fd00::5"),
            port: 80,
        };
        assert_eq!(d.to_string(), "dnat ip6 to [fd00::5]:80");
        assert_eq!(network(ip("fd00::5"), 0), ip("::"));
    }

    #[test]
    fn the_family_is_matched_once_and_before_a_nat_that_needs_it() {
        let r = Rule {
            matches: vec![
                Match::addr(Addr::Saddr, CmpOp::Eq, ip("10.0.0.1")),
                Match::addr(Addr::Daddr, CmpOp::Eq, ip("10.0.0.1")),
            ],
            statement: Statement::Masquerade,
            comment: None,
        };
        let families = |e: &[Expr]| {
            e.iter()
                .filter(|x| {
                    matches!(
                        x,
                        Expr::Meta {
                            key: MetaKey::NfProto,
                            ..
                        }
                    )
                })
                .count()
        };
        assert_eq!(families(&r.exprs()), 1);
        let r = Rule {
            matches: vec![Match::L4proto(6), Match::ThDport(80)],
            statement: Statement::Dnat {
                addr: ip("10.0.0.1"),
                port: 8080,
            },
            comment: None,
        };
        let e = r.exprs();
        assert_eq!(families(&e), 1);
        assert!(matches!(e.last(), Some(Expr::Nat { .. })));
    }
}
