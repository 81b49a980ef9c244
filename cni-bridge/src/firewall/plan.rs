//! The plan: which rules an attachment has, as data. No I/O here: each [`Planned`] rule
//! prints as nft text ([`script`] makes a whole `nft -f` file of them) and lowers to the
//! kernel's expressions through [`ferry_nft::Rule`]; the driver only commits them.

use std::net::IpAddr;

use cni::{Error, PortMapping};
use ferry_nft::{Addr, BaseChain, ChainType, CmpOp, Family, Hook, Match, Rule, Statement, TableFamily};
use ipnetwork::IpNetwork;
use sha2::{Digest, Sha256};

use super::{hex, AttachmentRules, COMMENT_MAX, TABLE};

/// A base chain of a Ferry table.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ChainSpec {
    pub family: TableFamily,
    pub name: &'static str,
    pub base: BaseChain,
}

impl ChainSpec {
    /// `add chain <family> ferry-bridge <name> { type ... hook ... priority N; policy accept; }`
    fn declaration(&self) -> String {
        let kind = match self.base.kind {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
            ChainType::Route => "route",
        };
        let hook = match self.base.hook {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        };
        format!(
            "add chain {} {TABLE} {} {{ type {kind} hook {hook} priority {}; policy accept; }}",
            self.family, self.name, self.base.priority
        )
    }
}

pub(crate) const POSTROUTING: ChainSpec = ChainSpec {
    family: TableFamily::Inet,
    name: "postrouting",
    base: BaseChain {
        kind: ChainType::Nat,
        hook: Hook::Postrouting,
        priority: 100,
    },
};
// nft 1.0.6 refuses the `dstnat` keyword on the output hook: numeric priorities throughout.
pub(crate) const PREROUTING: ChainSpec = ChainSpec {
    family: TableFamily::Inet,
    name: "prerouting",
    base: BaseChain {
        kind: ChainType::Nat,
        hook: Hook::Prerouting,
        priority: -100,
    },
};
pub(crate) const OUTPUT: ChainSpec = ChainSpec {
    family: TableFamily::Inet,
    name: "output",
    base: BaseChain {
        kind: ChainType::Nat,
        hook: Hook::Output,
        priority: -100,
    },
};
/// The bridge family's earliest usual priority (`dstnat`): a spoofed frame is dropped
/// before any other bridge chain sees it.
pub(crate) const BRIDGE_PREROUTING: ChainSpec = ChainSpec {
    family: TableFamily::Bridge,
    name: "prerouting",
    base: BaseChain {
        kind: ChainType::Filter,
        hook: Hook::Prerouting,
        priority: -300,
    },
};

/// Every chain the plan may use, tables in order (inet first).
pub(crate) const CHAINS: [&ChainSpec; 4] = [&POSTROUTING, &PREROUTING, &OUTPUT, &BRIDGE_PREROUTING];

/// One rule to install: where, what it does in words (for CHECK's messages), and the rule
/// itself, whose comment is `<key> <tag>`.
#[derive(Debug)]
pub(crate) struct Planned {
    pub chain: &'static ChainSpec,
    pub what: String,
    pub rule: Rule,
}

impl Planned {
    pub fn comment(&self) -> &str {
        self.rule.comment.as_deref().unwrap_or_default()
    }
}

/// The rules of an attachment, in the order they are added. Bad input (an unknown
/// protocol, a zero port, a malformed MAC or interface name) is an invalid-config error.
pub(crate) fn plan(rules: &AttachmentRules) -> Result<Vec<Planned>, Error> {
    let key = rules.id.key();
    let mut out: Vec<Planned> = Vec::new();
    let mut push = |chain: &'static ChainSpec, kind: &str, what: String, matches: Vec<Match>, statement| {
        // The tag hashes the words, not the encoding: rules installed by earlier versions
        // (through the nft program) keep their tags, so CHECK, DEL and GC still know them.
        let digest = Sha256::digest(format!("{} {} {what}", chain.family, chain.name));
        let comment = format!("{key} {kind}.{}", hex(&digest[..4]));
        debug_assert!(comment.len() <= COMMENT_MAX, "{comment}");
        if !out.iter().any(|p| p.comment() == comment) {
            out.push(Planned {
                chain,
                what,
                rule: Rule {
                    matches,
                    statement,
                    comment: Some(comment),
                },
            });
        }
    };
    let neq_prefix = |which, net: IpNetwork| Match::Addr {
        which,
        op: CmpOp::Neq,
        addr: net.network(),
        prefix_len: net.prefix(),
    };

    for net in &rules.masquerade {
        if net.prefix() == 0 {
            continue;
        }
        let multicast = match net {
            IpNetwork::V4(_) => "224.0.0.0/4".parse::<IpNetwork>().expect("valid prefix"),
            IpNetwork::V6(_) => "ff00::/8".parse::<IpNetwork>().expect("valid prefix"),
        };
        let subnet = IpNetwork::new(net.network(), net.prefix()).expect("prefix of a valid network");
        push(
            &POSTROUTING,
            "masq",
            format!(
                "masquerade of {} to destinations outside {subnet} and {multicast}",
                net.ip()
            ),
            vec![
                Match::addr(Addr::Saddr, CmpOp::Eq, net.ip()),
                neq_prefix(Addr::Daddr, subnet),
                neq_prefix(Addr::Daddr, multicast),
            ],
            Statement::Masquerade,
        );
    }

    for (mapping, pod) in &rules.port_mappings {
        let (proto, proto_number) = protocol(mapping)?;
        if mapping.host_port == 0 || mapping.container_port == 0 {
            return Err(Error::invalid_config(
                format!(
                    "portMappings: hostPort {} -> containerPort {} ({proto}): a port must not be 0",
                    mapping.host_port, mapping.container_port
                ),
                "give both hostPort and containerPort between 1 and 65535",
            ));
        }
        let host_ip = mapping.host_ip.filter(|h| !h.is_unspecified());
        if host_ip.is_some_and(|h| h.is_ipv4() != pod.is_ipv4()) {
            continue;
        }
        let (family, loopback) = if pod.is_ipv4() {
            (
                Family::Ipv4,
                "127.0.0.0/8".parse::<IpNetwork>().expect("valid prefix"),
            )
        } else {
            (
                Family::Ipv6,
                "::1/128".parse::<IpNetwork>().expect("valid prefix"),
            )
        };
        let target = match pod {
            IpAddr::V4(a) => format!("{a}:{}", mapping.container_port),
            IpAddr::V6(a) => format!("[{a}]:{}", mapping.container_port),
        };
        let dest = match host_ip {
            Some(h) => format!("{proto} to {h} port {}", mapping.host_port),
            None => format!("{proto} to local addresses port {}", mapping.host_port),
        };
        for chain in [&PREROUTING, &OUTPUT] {
            let mut matches = vec![Match::L4proto(proto_number), Match::ThDport(mapping.host_port)];
            match host_ip {
                Some(h) => matches.push(Match::addr(Addr::Daddr, CmpOp::Eq, h)),
                None => {
                    // The family must be matched explicitly (fib is family-neutral); in output
                    // the loopback exclusion does it, as `ip daddr` implies `meta nfproto ipv4`.
                    if chain.base.hook == Hook::Output {
                        matches.push(neq_prefix(Addr::Daddr, loopback));
                    } else {
                        matches.push(Match::Nfproto(family));
                    }
                    matches.push(Match::FibDaddrLocal);
                }
            }
            let from = if chain.base.hook == Hook::Output {
                "from the node"
            } else {
                "from outside"
            };
            push(
                chain,
                "dnat",
                format!("hostPort {dest} -> {target} {from}"),
                matches,
                Statement::Dnat {
                    addr: *pod,
                    port: mapping.container_port,
                },
            );
        }
        push(
            &POSTROUTING,
            "hairpin",
            format!("hairpin masquerade of {pod} reaching its own hostPorts"),
            vec![
                Match::CtStatusDnat,
                Match::addr(Addr::Saddr, CmpOp::Eq, *pod),
                Match::addr(Addr::Daddr, CmpOp::Eq, *pod),
            ],
            Statement::Masquerade,
        );
    }

    if let Some((veth, mac)) = &rules.mac_spoof_check {
        let (text, octets) = parse_mac(mac)?;
        if veth.is_empty()
            || veth.len() > 15
            || veth
                .bytes()
                .any(|b| b == b'/' || b == b':' || b == b'"' || !b.is_ascii_graphic())
        {
            return Err(Error::invalid_config(
                format!("MAC spoof check: {veth:?} is not an interface name"),
                "the host-side veth name must be 1 to 15 printable characters without '/', ':' or '\"'",
            ));
        }
        push(
            &BRIDGE_PREROUTING,
            "mac",
            format!("MAC spoof check: frames from {veth} must come from {text}"),
            vec![
                Match::IifName(veth.clone()),
                Match::EtherSaddr {
                    op: CmpOp::Neq,
                    mac: octets,
                },
            ],
            Statement::Drop,
        );
    }
    Ok(out)
}

/// The protocol of a mapping: its nft name and number.
fn protocol(mapping: &PortMapping) -> Result<(&'static str, u8), Error> {
    match mapping.protocol.to_ascii_lowercase().as_str() {
        "tcp" => Ok(("tcp", 6)),
        "udp" => Ok(("udp", 17)),
        "sctp" => Ok(("sctp", 132)),
        other => Err(Error::invalid_config(
            format!(
                "portMappings: protocol {other:?} of hostPort {} is not supported",
                mapping.host_port
            ),
            "use tcp, udp or sctp",
        )),
    }
}

/// `aa:bb:cc:dd:ee:ff` (or with `-`, any case): nft's spelling (lower case with colons)
/// and the octets.
pub(crate) fn parse_mac(mac: &str) -> Result<(String, [u8; 6]), Error> {
    let parts: Vec<&str> = mac.split([':', '-']).collect();
    let mut octets = [0u8; 6];
    let ok = parts.len() == 6
        && parts
            .iter()
            .zip(octets.iter_mut())
            .all(|(p, o)| p.len() == 2 && u8::from_str_radix(p, 16).map(|v| *o = v).is_ok());
    if ok {
        return Ok((parts.join(":").to_ascii_lowercase(), octets));
    }
    Err(Error::invalid_config(
        format!("MAC spoof check: {mac:?} is not a MAC address"),
        "write it as six hex octets, e.g. 0a:58:0a:f4:01:05",
    ))
}

/// The plan as an `nft -f` file: the tables and chains it uses, then its rules. What the
/// driver commits over netlink says the same (the oracle test holds them to it), and an
/// operator can read or replay it.
pub(crate) fn script(planned: &[Planned]) -> String {
    let mut out = String::new();
    for family in [TableFamily::Inet, TableFamily::Bridge] {
        if !planned.iter().any(|p| p.chain.family == family) {
            continue;
        }
        out.push_str(&format!("add table {family} {TABLE}\n"));
        for chain in CHAINS.iter().filter(|c| c.family == family) {
            if planned.iter().any(|p| p.chain == *chain) {
                out.push_str(&chain.declaration());
                out.push('\n');
            }
        }
    }
    for p in planned {
        out.push_str(&format!(
            "add rule {} {TABLE} {} {}\n",
            p.chain.family, p.chain.name, p.rule
        ));
    }
    out
}
