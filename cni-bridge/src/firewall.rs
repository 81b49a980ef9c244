//! nftables rules of one attachment: masquerade, hostPort DNAT and the MAC spoof check.
//!
//! # Tables and chains
//!
//! Ferry owns `table inet ferry-bridge` and, only once a MAC spoof check is asked for,
//! `table bridge ferry-bridge`. Nothing else is read or written: no ruleset flush, no
//! other table, and within our tables only rules whose comment names the attachment.
//!
//! ```text
//! table inet ferry-bridge {
//!     chain postrouting { type nat hook postrouting priority srcnat (100); }
//!         ip saddr 10.22.0.5 ip daddr != 10.22.0.0/24 ip daddr != 224.0.0.0/4 masquerade    # masq
//!         ip6 saddr fd00::5 ip6 daddr != fd00::/64 ip6 daddr != ff00::/8 masquerade         # masq
//!         ct status dnat ip saddr 10.22.0.5 ip daddr 10.22.0.5 masquerade                   # hairpin
//!     chain prerouting { type nat hook prerouting priority dstnat (-100); }
//!         meta l4proto tcp th dport 8080 meta nfproto ipv4 fib daddr type local
//!             dnat ip to 10.22.0.5:80                                                       # dnat
//!         meta l4proto tcp th dport 8081 ip daddr 192.0.2.1 dnat ip to 10.22.0.5:81         # dnat (hostIP)
//!     chain output { type nat hook output priority -100; }
//!         meta l4proto tcp th dport 8080 ip daddr != 127.0.0.0/8 fib daddr type local
//!             dnat ip to 10.22.0.5:80                                                       # dnat
//! }
//! table bridge ferry-bridge {
//!     chain prerouting { type filter hook prerouting priority -300; }
//!         iifname "fy0123456789ab" ether saddr != 0a:58:0a:16:00:05 drop                    # mac
//! }
//! ```
//!
//! Every rule carries a comment `<key> <tag>` (see [`AttachmentId::key`]): the key names the
//! attachment, the tag the kind of rule plus 8 hex digits of a SHA-256 of what the rule does.
//! The key lets DEL and GC find an attachment's rules without knowing its addresses; the
//! tag lets CHECK name a missing rule and notice a rule that no longer matches the config.
//!
//! Why the DNAT rules sit directly in `prerouting` and `output` rather than behind a jump
//! to a shared `hostports` chain: then every rule of the table belongs to exactly one
//! attachment. A shared jump rule would need its own lifecycle (created once, never
//! duplicated by concurrent ADDs, never removed by a DEL), i.e. a listing or a flush of a
//! shared chain in every ADD. The price, two rules per mapping instead of one, is small:
//! NAT chains only see the first packet of a connection, and each rule tests the port
//! before it does the FIB lookup. `output` leaves loopback destinations alone, so a
//! hostPort never hijacks a node-local service on 127.0.0.1 / ::1 (reaching a Pod through
//! a loopback address would need `route_localnet`, which Ferry does not turn on).
//!
//! The base chains and tables stay when their last rule goes: empty NAT chains cost
//! nothing measurable, and deleting them would race with a concurrent ADD.
//!
//! # Calls and their cost
//!
//! Writes are one `nft -j -f -` transaction each, so an attachment's rules appear and
//! disappear atomically. `add`, `remove` and `remove_stale` first list the two Ferry tables
//! (`nft -j list table ...`, both listings run in parallel; a missing table is an empty
//! one). `add` deletes what carries the attachment's key in the same transaction as it adds
//! the new rules: ADD is idempotent, and a re-ADD after a failed or crashed one (or with
//! new addresses) replaces the old rules instead of leaving a stale DNAT ahead of the new
//! one. Tables and chains are only added when the listing lacks them. Nothing to delete
//! means no write; rules with nothing in them run no nft at all.
//!
//! Measured with nft 1.0.6 on Linux 6.18 (release build, 2 CPUs, median of 50 in a fresh
//! netns, an attachment of 5 rules: v4+v6 masquerade, one hostPort): `add` 4.5-6 ms, `check`
//! 2-3.5 ms, `remove` about 16 ms, `add` over existing rules of the same attachment about
//! 16 ms. With 200 other rules in the table: `add` 15 ms, `check` 13 ms, `remove`
//! 24-28 ms. Two costs dominate. Listing: nft's JSON listing takes about 50 us per rule
//! in the table. Deleting: after a transaction that deletes rules (or re-adds an existing
//! base chain), nft's exit waits about 12 ms in close() of its netlink socket while the
//! kernel releases the old objects after an RCU grace period, so any removal costs that.
//!
//! `nft` runs in the network namespace of the calling thread: a process spawned from a
//! thread inherits that thread's namespace (clone copies the calling task's nsproxy).
//! The tests rely on it and check it.

use std::collections::{BTreeSet, HashSet};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};

use cni::{Attachment, Code, Error, PortMapping};
use ipnetwork::IpNetwork;
use nftables::batch::Batch;
use nftables::expr::{
    Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, CT,
};
use nftables::schema::{Chain, NfListObject, Rule, Table};
use nftables::stmt::{Match, NATFamily, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The name of both Ferry tables (`inet` and `bridge`).
pub const TABLE: &str = "ferry-bridge";

/// The code of a CHECK failure: the same value as `plugin::codes::STATE_DIFFERS`.
pub const RULES_DIFFER: Code = Code::Other(110);

/// Every comment starts with this.
const KEY_PREFIX: &str = "ferry:";
/// nft keeps at most 128 bytes of a rule comment, and its JSON parser truncates longer
/// ones silently, which would break matching: every comment stays within this.
const COMMENT_MAX: usize = 128;
/// The longest tag: `hairpin.` and 8 hex digits.
const TAG_MAX: usize = 16;
/// The longest key, so that `<key> <tag>` fits in [`COMMENT_MAX`].
const KEY_MAX: usize = COMMENT_MAX - 1 - TAG_MAX;
/// A network name longer than this is hashed in the key.
const NETWORK_MAX: usize = 64;

/// One attachment: the rules it owns carry its [`key`](AttachmentId::key) in their comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachmentId<'a> {
    pub network: &'a str,
    pub container_id: &'a str,
    pub ifname: &'a str,
}

impl AttachmentId<'_> {
    /// The attachment's key, the first word of its rules' comments:
    /// `ferry:<network>:<container id>:<ifname>` when that is at most 111 bytes and the parts
    /// only use `A-Z a-z 0-9 _ . -` (as the CNI spec requires of network names and container
    /// ids). Otherwise a part is replaced by `#` and hex digits of a SHA-256: the network by 16
    /// (`ferry:#<16 hex>:...`) when it is longer than 64 bytes or has other characters, the
    /// container id and ifname together by 32 (`ferry:<network>:#<32 hex>`). The network stays
    /// recognisable either way, which GC needs. With a 64-hex container id and `eth0`, the
    /// network name can be up to 35 bytes before the hashed form is used.
    pub fn key(&self) -> String {
        let network = network_part(self.network);
        let plain = format!("{KEY_PREFIX}{network}:{}:{}", self.container_id, self.ifname);
        if is_clean(self.container_id) && is_clean(self.ifname) && plain.len() <= KEY_MAX {
            return plain;
        }
        let digest = Sha256::digest(format!("{}\0{}", self.container_id, self.ifname));
        format!("{KEY_PREFIX}{network}:#{}", hex(&digest[..16]))
    }
}

/// The rules of one attachment, as [`add`] installs them and [`check`] expects them.
#[derive(Debug, Clone)]
pub struct AttachmentRules<'a> {
    pub id: AttachmentId<'a>,
    /// Pod addresses with their subnet prefix (e.g. 10.22.0.5/24, fd00::5/64): masquerade
    /// traffic from the pod address to anything outside its subnet and outside multicast
    /// (224.0.0.0/4, ff00::/8). A /0 prefix leaves nothing outside: no rule.
    pub masquerade: Vec<IpNetwork>,
    /// hostPort DNAT to the pod address of the mapping's family. A mapping with `host_ip`
    /// applies to that destination address only; without (or with 0.0.0.0 / ::), to every
    /// local address of the node. Traffic from outside (prerouting) and from the node itself
    /// (output) is covered, and a Pod reaching its own hostPort is masqueraded (hairpin).
    /// A mapping whose `host_ip` is of the other family than the pod address is skipped, so
    /// callers may pair every mapping with every pod address.
    pub port_mappings: Vec<(PortMapping, IpAddr)>,
    /// MAC spoof check: frames entering the bridge from this host-side veth whose source MAC
    /// is not this one are dropped: (host veth name, container MAC `aa:bb:cc:dd:ee:ff`).
    pub mac_spoof_check: Option<(String, String)>,
}

impl AttachmentRules<'_> {
    /// Nothing to install: no masquerade, no port, no spoof check.
    pub fn is_empty(&self) -> bool {
        self.masquerade.is_empty() && self.port_mappings.is_empty() && self.mac_spoof_check.is_none()
    }
}

/// Installs the rules of one attachment in one transaction. When a table or chain is
/// missing (a node's first Pod), the tables are listed and one transaction creates what is
/// missing, deletes rules already carrying the attachment's key, and adds the rules. Rules
/// without anything in them (no masquerade, no port, no spoof check) run no `nft` at all.
pub fn add(rules: &AttachmentRules) -> Result<(), Error> {
    Nft::DEFAULT.add(rules)
}

/// Removes every rule of that attachment from both Ferry tables. Success when there are none
/// or the tables do not exist; then nothing is written.
pub fn remove(id: &AttachmentId) -> Result<(), Error> {
    Nft::DEFAULT.remove(id)
}

/// GC: removes the rules of every attachment of `network` not in `valid`. Rules of other
/// networks, and rules whose comment is not one of Ferry's, are untouched.
pub fn remove_stale(network: &str, valid: &[Attachment]) -> Result<(), Error> {
    Nft::DEFAULT.remove_stale(network, valid)
}

/// CHECK: Ok if every rule `rules` describes is present. Otherwise an error (code
/// [`RULES_DIFFER`]) naming each missing rule, and each rule that carries the attachment's
/// key but is not one `rules` describes (e.g. a DNAT to an old address).
pub fn check(rules: &AttachmentRules) -> Result<(), Error> {
    Nft::DEFAULT.check(rules)
}

/// Test/diagnostic helper: the attachments that currently own rules, one entry per table,
/// sorted, as `<family> <table> <key>`, e.g. `inet ferry-bridge ferry:net:0123abcd:eth0`.
pub fn attachments_with_rules() -> Result<Vec<String>, Error> {
    let listed = Nft::DEFAULT.list()?.rules;
    let owners: BTreeSet<String> = listed
        .iter()
        .filter_map(|r| {
            Some(format!(
                "{} {} {}",
                family_name(r.family),
                r.table,
                owner_key(r.comment.as_deref()?)?
            ))
        })
        .collect();
    Ok(owners.into_iter().collect())
}

// ---------------------------------------------------------------------------------------
// Keys and comments

fn is_clean(part: &str) -> bool {
    !part.is_empty()
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The network as it appears in keys: itself, or `#` and 16 hex digits of its SHA-256.
fn network_part(network: &str) -> String {
    if is_clean(network) && network.len() <= NETWORK_MAX {
        network.to_string()
    } else {
        format!("#{}", hex(&Sha256::digest(network)[..8]))
    }
}

/// The key in a comment Ferry wrote (everything before the tag), or None for other comments.
fn owner_key(comment: &str) -> Option<&str> {
    let key = comment.split(' ').next()?;
    let rest = key.strip_prefix(KEY_PREFIX)?;
    rest.contains(':').then_some(key)
}

/// The network part of a key (`ferry:<network part>:...`).
fn key_network(key: &str) -> Option<&str> {
    key.strip_prefix(KEY_PREFIX)?.split(':').next()
}

// ---------------------------------------------------------------------------------------
// The rules, built from an AttachmentRules

#[derive(Debug)]
struct ChainSpec {
    family: NfFamily,
    name: &'static str,
    kind: NfChainType,
    hook: NfHook,
    prio: i32,
}

const POSTROUTING: ChainSpec = ChainSpec {
    family: NfFamily::INet,
    name: "postrouting",
    kind: NfChainType::NAT,
    hook: NfHook::Postrouting,
    prio: 100,
};
// nft 1.0.6 refuses the `dstnat` keyword on the output hook: numeric priorities throughout.
const PREROUTING: ChainSpec = ChainSpec {
    family: NfFamily::INet,
    name: "prerouting",
    kind: NfChainType::NAT,
    hook: NfHook::Prerouting,
    prio: -100,
};
const OUTPUT: ChainSpec = ChainSpec {
    family: NfFamily::INet,
    name: "output",
    kind: NfChainType::NAT,
    hook: NfHook::Output,
    prio: -100,
};
/// The bridge family's earliest usual priority (`dstnat`): a spoofed frame is dropped
/// before any other bridge chain sees it.
const BRIDGE_PREROUTING: ChainSpec = ChainSpec {
    family: NfFamily::Bridge,
    name: "prerouting",
    kind: NfChainType::Filter,
    hook: NfHook::Prerouting,
    prio: -300,
};

/// One rule to install: where, its full comment, what it does in words, and its statements.
#[derive(Debug)]
struct Planned {
    chain: &'static ChainSpec,
    comment: String,
    what: String,
    expr: Vec<Statement<'static>>,
}

fn plan(rules: &AttachmentRules) -> Result<Vec<Planned>, Error> {
    let key = rules.id.key();
    let mut out: Vec<Planned> = Vec::new();
    let mut push = |chain: &'static ChainSpec, kind: &str, what: String, expr: Vec<Statement<'static>>| {
        let digest = Sha256::digest(format!("{} {} {what}", family_name(chain.family), chain.name));
        let comment = format!("{key} {kind}.{}", hex(&digest[..4]));
        debug_assert!(comment.len() <= COMMENT_MAX, "{comment}");
        if !out.iter().any(|p| p.comment == comment) {
            out.push(Planned {
                chain,
                comment,
                what,
                expr,
            });
        }
    };

    for net in &rules.masquerade {
        if net.prefix() == 0 {
            continue;
        }
        let (l3, multicast) = match net {
            IpNetwork::V4(_) => ("ip", "224.0.0.0/4".parse::<IpNetwork>().expect("valid prefix")),
            IpNetwork::V6(_) => ("ip6", "ff00::/8".parse::<IpNetwork>().expect("valid prefix")),
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
                eq(payload(l3, "saddr"), addr(net.ip())),
                matches(payload(l3, "daddr"), Operator::NEQ, network(subnet)),
                matches(payload(l3, "daddr"), Operator::NEQ, network(multicast)),
                Statement::Masquerade(None),
            ],
        );
    }

    for (mapping, pod) in &rules.port_mappings {
        let proto = protocol(mapping)?;
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
        let (l3, nfproto, nat_family, loopback) = if pod.is_ipv4() {
            (
                "ip",
                "ipv4",
                NATFamily::IP,
                "127.0.0.0/8".parse::<IpNetwork>().expect("valid prefix"),
            )
        } else {
            (
                "ip6",
                "ipv6",
                NATFamily::IP6,
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
            let mut expr = vec![
                eq(meta(MetaKey::L4proto), Expression::String(proto.into())),
                eq(
                    payload("th", "dport"),
                    Expression::Number(mapping.host_port.into()),
                ),
            ];
            match host_ip {
                Some(h) => expr.push(eq(payload(l3, "daddr"), addr(h))),
                None => {
                    // The family must be matched explicitly (fib is family-neutral); in output
                    // the loopback exclusion does it, as `ip daddr` implies `meta nfproto ipv4`.
                    if chain.hook == NfHook::Output {
                        expr.push(matches(payload(l3, "daddr"), Operator::NEQ, network(loopback)));
                    } else {
                        expr.push(eq(meta(MetaKey::Nfproto), Expression::String(nfproto.into())));
                    }
                    expr.push(eq(fib_daddr_type(), Expression::String("local".into())));
                }
            }
            expr.push(Statement::DNAT(Some(NAT {
                addr: Some(addr(*pod)),
                family: Some(nat_family),
                port: Some(Expression::Number(mapping.container_port.into())),
                flags: None,
            })));
            let from = if chain.hook == NfHook::Output {
                "from the node"
            } else {
                "from outside"
            };
            push(chain, "dnat", format!("hostPort {dest} -> {target} {from}"), expr);
        }
        push(
            &POSTROUTING,
            "hairpin",
            format!("hairpin masquerade of {pod} reaching its own hostPorts"),
            vec![
                matches(ct("status"), Operator::IN, Expression::String("dnat".into())),
                eq(payload(l3, "saddr"), addr(*pod)),
                eq(payload(l3, "daddr"), addr(*pod)),
                Statement::Masquerade(None),
            ],
        );
    }

    if let Some((veth, mac)) = &rules.mac_spoof_check {
        let mac = parse_mac(mac)?;
        if veth.is_empty()
            || veth.len() > 15
            || veth
                .bytes()
                .any(|b| b == b'/' || b == b':' || !b.is_ascii_graphic())
        {
            return Err(Error::invalid_config(
                format!("MAC spoof check: {veth:?} is not an interface name"),
                "the host-side veth name must be 1 to 15 printable characters without '/' or ':'",
            ));
        }
        push(
            &BRIDGE_PREROUTING,
            "mac",
            format!("MAC spoof check: frames from {veth} must come from {mac}"),
            vec![
                eq(meta(MetaKey::Iifname), Expression::String(veth.clone().into())),
                matches(
                    payload("ether", "saddr"),
                    Operator::NEQ,
                    Expression::String(mac.into()),
                ),
                Statement::Drop(None),
            ],
        );
    }
    Ok(out)
}

fn protocol(mapping: &PortMapping) -> Result<&'static str, Error> {
    match mapping.protocol.to_ascii_lowercase().as_str() {
        "tcp" => Ok("tcp"),
        "udp" => Ok("udp"),
        "sctp" => Ok("sctp"),
        other => Err(Error::invalid_config(
            format!(
                "portMappings: protocol {other:?} of hostPort {} is not supported",
                mapping.host_port
            ),
            "use tcp, udp or sctp",
        )),
    }
}

/// `aa:bb:cc:dd:ee:ff` (or with `-`, any case) in nft's spelling, lower case with colons.
fn parse_mac(mac: &str) -> Result<String, Error> {
    let octets: Vec<&str> = mac.split([':', '-']).collect();
    if octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Ok(octets.join(":").to_ascii_lowercase());
    }
    Err(Error::invalid_config(
        format!("MAC spoof check: {mac:?} is not a MAC address"),
        "write it as six hex octets, e.g. 0a:58:0a:f4:01:05",
    ))
}

fn family_name(family: NfFamily) -> &'static str {
    match family {
        NfFamily::IP => "ip",
        NfFamily::IP6 => "ip6",
        NfFamily::INet => "inet",
        NfFamily::ARP => "arp",
        NfFamily::Bridge => "bridge",
        NfFamily::NetDev => "netdev",
    }
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: field.into(),
    })))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

fn fib_daddr_type() -> Expression<'static> {
    Expression::Named(NamedExpression::Fib(Fib {
        result: FibResult::Type,
        flags: HashSet::from([FibFlag::Daddr]),
    }))
}

fn addr(ip: IpAddr) -> Expression<'static> {
    Expression::String(ip.to_string().into())
}

/// A network as an nft prefix, or a plain address when the prefix covers all bits.
fn network(net: IpNetwork) -> Expression<'static> {
    let full = if net.is_ipv4() { 32 } else { 128 };
    if net.prefix() == full {
        return addr(net.ip());
    }
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(addr(net.network())),
        len: net.prefix().into(),
    }))
}

fn matches(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    matches(left, Operator::EQ, right)
}

// ---------------------------------------------------------------------------------------
// Running nft

/// A rule as `nft -j list table` shows it. Only what identifies a rule is read: the
/// expressions are skipped, so a listing never fails on a statement this crate's schema (or
/// the `nftables` crate's) does not know, which would otherwise make DEL impossible.
#[derive(Debug, Deserialize)]
struct ListedRule {
    family: NfFamily,
    table: String,
    chain: String,
    handle: u32,
    #[serde(default)]
    comment: Option<String>,
}

/// A chain as `nft -j list table` shows it: enough to tell whether `add` must create it.
#[derive(Debug, Deserialize)]
struct ListedChain {
    family: NfFamily,
    name: String,
    #[serde(default, rename = "type")]
    kind: Option<NfChainType>,
    #[serde(default)]
    hook: Option<NfHook>,
    #[serde(default)]
    prio: Option<serde_json::Value>,
}

impl ListedChain {
    fn is(&self, spec: &ChainSpec) -> bool {
        self.family == spec.family
            && self.name == spec.name
            && self.kind == Some(spec.kind)
            && self.hook == Some(spec.hook)
            && self.prio.as_ref().and_then(serde_json::Value::as_i64) == Some(spec.prio.into())
    }
}

#[derive(Deserialize)]
struct Listing {
    nftables: Vec<ListedObject>,
}

/// One element of a listing; anything but rules and chains (metainfo, table, set...) is
/// skipped. An unknown variant of either is skipped too rather than failing the listing.
#[derive(Deserialize)]
struct ListedObject {
    #[serde(default, deserialize_with = "lenient")]
    rule: Option<ListedRule>,
    #[serde(default, deserialize_with = "lenient")]
    chain: Option<ListedChain>,
}

fn lenient<'de, D: serde::Deserializer<'de>, T: serde::de::DeserializeOwned>(
    d: D,
) -> Result<Option<T>, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(value).ok())
}

/// The rules and chains of both Ferry tables.
#[derive(Debug, Default)]
struct Listed {
    rules: Vec<ListedRule>,
    chains: Vec<ListedChain>,
}

#[cfg(test)]
thread_local! {
    /// How many write transactions this thread ran (tests check "no write").
    static WRITES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How nft is found: `program` for tests, else `nft` in PATH, then the usual sbin paths
/// (a container runtime may run plugins with a PATH that lacks them).
#[derive(Debug, Clone, Copy)]
struct Nft {
    program: Option<&'static str>,
}

const NFT_PATHS: [&str; 3] = ["nft", "/usr/sbin/nft", "/sbin/nft"];

/// The outcome of an nft run that could be started: stdout on success, stderr on failure.
type NftOutcome = Result<String, String>;

impl Nft {
    const DEFAULT: Nft = Nft { program: None };

    /// Starts nft with `args`; stdin is piped when `with_stdin`.
    fn spawn(&self, args: &[&str], with_stdin: bool, what: &str) -> Result<Child, Error> {
        let candidates: &[&str] = match &self.program {
            Some(p) => std::slice::from_ref(p),
            None => &NFT_PATHS,
        };
        let mut not_found = None;
        for program in candidates {
            // LC_ALL=C: a missing table is recognised by nft's (strerror) message.
            let spawned = Command::new(program)
                .args(args)
                .env("LC_ALL", "C")
                .stdin(if with_stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn();
            match spawned {
                Ok(child) => return Ok(child),
                Err(e) if e.kind() == ErrorKind::NotFound => not_found = Some(e),
                Err(e) => return Err(Error::io(format!("cannot run {program} to {what}"), &e)),
            }
        }
        let e = not_found.expect("at least one candidate");
        Err(Error::new(
            Code::Io,
            format!("cannot run nft to {what}: {e} (tried {})", candidates.join(", ")),
            "install nftables (Debian/Ubuntu: apt-get install nftables), which provides the nft command",
        ))
    }

    fn finish(child: Child, what: &str) -> Result<NftOutcome, Error> {
        let out = child
            .wait_with_output()
            .map_err(|e| Error::io(format!("waiting for nft to {what}"), &e))?;
        if out.status.success() {
            Ok(Ok(String::from_utf8_lossy(&out.stdout).into_owned()))
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr = stderr
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" | ");
            Ok(Err(format!("{} ({})", stderr, out.status)))
        }
    }

    /// The rules of both Ferry tables (none for a table that does not exist). The two
    /// listings run in parallel: nft cannot list two tables in one run when one is missing.
    fn list(&self) -> Result<Listed, Error> {
        let what = "list the ferry-bridge tables";
        let inet = self.spawn(&["-j", "list", "table", "inet", TABLE], false, what)?;
        let bridge = self.spawn(&["-j", "list", "table", "bridge", TABLE], false, what);
        let inet = Self::finish(inet, what);
        let mut listed = Listed::default();
        for (family, outcome) in [
            ("inet", inet),
            ("bridge", bridge.and_then(|c| Self::finish(c, what))),
        ] {
            match outcome? {
                Ok(json) => {
                    let listing: Listing = serde_json::from_str(&json).map_err(|e| {
                        Error::new(
                            Code::Io,
                            format!("cannot read nft's listing of table {family} {TABLE}: {e}"),
                            "",
                        )
                    })?;
                    for object in listing.nftables {
                        listed.rules.extend(object.rule);
                        listed.chains.extend(object.chain);
                    }
                }
                Err(stderr) if stderr.contains("No such file or directory") => {}
                Err(stderr) => {
                    return Err(Error::new(
                        Code::Io,
                        format!("nft failed to list table {family} {TABLE}: {stderr}"),
                        "",
                    ))
                }
            }
        }
        Ok(listed)
    }

    /// Runs one transaction.
    fn apply(&self, batch: Batch, what: &str) -> Result<(), Error> {
        #[cfg(test)]
        WRITES.with(|w| w.set(w.get() + 1));
        let payload = serde_json::to_string(&batch.to_nftables()).expect("the nftables schema serializes");
        let mut child = self.spawn(&["-j", "-f", "-"], true, what)?;
        let written = child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(payload.as_bytes());
        match (Self::finish(child, what)?, written) {
            (Err(stderr), _) => Err(Error::new(
                Code::Io,
                format!("nft failed to {what}: {stderr}"),
                "",
            )),
            (Ok(_), Err(e)) => Err(Error::io(format!("writing the rules to nft to {what}"), &e)),
            (Ok(_), Ok(())) => Ok(()),
        }
    }

    /// Lists, lets `build` fill a batch from the listing, and applies it. `build` returns
    /// None when there is nothing to write, else whether the batch deletes rules. A failure
    /// of a batch that deletes is retried once on a fresh listing: a concurrent DEL or GC may
    /// have deleted a listed rule in between, and its handle is then gone.
    fn list_and_apply(
        &self,
        what: &str,
        mut build: impl FnMut(&Listed, &mut Batch<'static>) -> Option<bool>,
    ) -> Result<(), Error> {
        let mut retried = false;
        loop {
            let listed = self.list()?;
            let mut batch = Batch::new();
            let Some(deletes) = build(&listed, &mut batch) else {
                return Ok(());
            };
            match self.apply(batch, what) {
                Err(_) if deletes && !retried => retried = true,
                other => return other,
            }
        }
    }

    fn add(&self, rules: &AttachmentRules) -> Result<(), Error> {
        let planned = plan(rules)?;
        if planned.is_empty() {
            return Ok(());
        }
        let key = rules.id.key();
        let what = format!("add the rules of {key}");
        // The common case, every Pod after a node's first: tables and chains exist, so the
        // rules go in with one nft run and no listing (a listing costs ~50 µs per rule in
        // the table). A failed ADD rolls its rules back and ADD refuses an interface that
        // exists, so there is nothing of this attachment to replace here.
        let mut batch = Batch::new();
        for p in &planned {
            batch.add(rule_of(p));
        }
        match self.apply(batch, &what) {
            Ok(()) => return Ok(()),
            Err(e) if e.msg.contains("No such file or directory") => {} // a table or chain is missing
            Err(e) => return Err(e),
        }
        self.list_and_apply(&what, |listed, batch| {
            let deleted = delete_owned(&listed.rules, batch, |k| k == key);
            // Tables and chains are only added when the listing lacks them: adding an
            // existing base chain again is valid but makes the kernel wait for an RCU grace
            // period when nft closes its socket (about 12 ms). Two concurrent ADDs that both
            // add them are fine: `add` of an existing table or chain is a no-op.
            let mut tables: Vec<NfFamily> = Vec::new();
            let mut chains: Vec<&ChainSpec> = Vec::new();
            for p in &planned {
                let family = p.chain.family;
                let table_exists = listed.chains.iter().any(|c| c.family == family);
                if !table_exists && !tables.contains(&family) {
                    tables.push(family);
                    batch.add(NfListObject::Table(Table {
                        family,
                        name: TABLE.into(),
                        handle: None,
                    }));
                }
                let chain_exists = listed.chains.iter().any(|c| c.is(p.chain));
                let chain_added = chains
                    .iter()
                    .any(|c| c.family == family && c.name == p.chain.name);
                if !chain_exists && !chain_added {
                    chains.push(p.chain);
                    batch.add(NfListObject::Chain(Chain {
                        family: p.chain.family,
                        table: TABLE.into(),
                        name: p.chain.name.into(),
                        _type: Some(p.chain.kind),
                        hook: Some(p.chain.hook),
                        prio: Some(p.chain.prio),
                        policy: Some(NfChainPolicy::Accept),
                        ..Chain::default()
                    }));
                }
            }
            for p in &planned {
                batch.add(rule_of(p));
            }
            Some(deleted)
        })
    }

    fn remove(&self, id: &AttachmentId) -> Result<(), Error> {
        let key = id.key();
        self.list_and_apply(&format!("delete the rules of {key}"), |listed, batch| {
            delete_owned(&listed.rules, batch, |k| k == key).then_some(true)
        })
    }

    fn remove_stale(&self, network: &str, valid: &[Attachment]) -> Result<(), Error> {
        let ours = network_part(network);
        let keep: HashSet<String> = valid
            .iter()
            .map(|a| {
                AttachmentId {
                    network,
                    container_id: &a.container_id,
                    ifname: &a.ifname,
                }
                .key()
            })
            .collect();
        self.list_and_apply(
            &format!("delete stale rules of network {network}"),
            |listed, batch| {
                delete_owned(&listed.rules, batch, |k| {
                    key_network(k) == Some(ours.as_str()) && !keep.contains(k)
                })
                .then_some(true)
            },
        )
    }

    fn check(&self, rules: &AttachmentRules) -> Result<(), Error> {
        let planned = plan(rules)?;
        if planned.is_empty() {
            return Ok(());
        }
        let key = rules.id.key();
        let listed = self.list()?.rules;
        let present = |p: &Planned| {
            listed.iter().any(|r| {
                r.family == p.chain.family
                    && r.table == TABLE
                    && r.chain == p.chain.name
                    && r.comment.as_deref() == Some(p.comment.as_str())
            })
        };
        let mut problems: Vec<String> = planned
            .iter()
            .filter(|p| !present(p))
            .map(|p| {
                format!(
                    "missing: {} (chain {} {TABLE} {})",
                    p.what,
                    family_name(p.chain.family),
                    p.chain.name
                )
            })
            .collect();
        for r in &listed {
            let Some(comment) = r.comment.as_deref() else {
                continue;
            };
            if owner_key(comment) == Some(key.as_str()) && !planned.iter().any(|p| p.comment == comment) {
                problems.push(format!(
                    "unexpected: rule {comment:?} (chain {} {} {}, handle {})",
                    family_name(r.family),
                    r.table,
                    r.chain,
                    r.handle
                ));
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            RULES_DIFFER,
            format!(
                "nftables rules of attachment {key} differ: {}",
                problems.join("; ")
            ),
            "DEL and ADD the attachment again to reinstall its rules",
        ))
    }
}

fn rule_of(p: &Planned) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family: p.chain.family,
        table: TABLE.into(),
        chain: p.chain.name.into(),
        expr: p.expr.clone().into(),
        comment: Some(p.comment.clone().into()),
        ..Rule::default()
    })
}

/// Adds to `batch` a delete of every listed rule in a Ferry table whose key `doomed` picks.
/// True when it added any.
fn delete_owned(listed: &[ListedRule], batch: &mut Batch<'static>, doomed: impl Fn(&str) -> bool) -> bool {
    let mut any = false;
    for r in listed {
        let Some(key) = r.comment.as_deref().and_then(owner_key) else {
            continue;
        };
        if r.table == TABLE && doomed(key) {
            batch.delete(NfListObject::Rule(Rule {
                family: r.family,
                table: TABLE.into(),
                chain: r.chain.clone().into(),
                handle: Some(r.handle),
                ..Rule::default()
            }));
            any = true;
        }
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs::File;
    use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    use nix::sched::{setns, unshare, CloneFlags};

    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    // -----------------------------------------------------------------------------------
    // Helpers: root gating and private network namespaces.

    /// True when the test can run as root. Without root it skips with a message, or fails
    /// when FERRY_REQUIRE_ROOT=1 (CI), so that a run that tested nothing never looks green.
    fn root_or_skip(test: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        if std::env::var("FERRY_REQUIRE_ROOT").as_deref() == Ok("1") {
            panic!("{test} needs root, and FERRY_REQUIRE_ROOT=1 forbids skipping it");
        }
        eprintln!("skipping {test}: needs root (set FERRY_REQUIRE_ROOT=1 to fail instead)");
        false
    }

    /// A private, anonymous network namespace, kept alive by an open file: it disappears
    /// when dropped (also on panic), so nothing is left behind even if cleanup never runs.
    struct Netns {
        file: File,
    }

    impl Netns {
        fn new() -> Netns {
            let file = std::thread::spawn(|| {
                unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
                File::open("/proc/thread-self/ns/net").expect("open the new netns")
            })
            .join()
            .expect("netns thread");
            Netns { file }
        }

        /// Runs `f` on a thread of its own that entered this namespace; panics propagate.
        fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            std::thread::scope(|s| {
                s.spawn(|| {
                    setns(&self.file, CloneFlags::CLONE_NEWNET).expect("setns into the test netns");
                    f()
                })
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        }

        /// A path naming this namespace for `ip ... netns <path>`.
        fn path(&self) -> String {
            format!("/proc/{}/fd/{}", std::process::id(), self.file.as_raw_fd())
        }

        /// Runs a command in this namespace and returns its stdout; panics when it fails.
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
        Netns::new().run(f)
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
        let listing: Listing = serde_json::from_slice(&out.stdout).unwrap();
        listing
            .nftables
            .into_iter()
            .filter_map(|o| o.rule?.comment)
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
                    p.comment.len() <= COMMENT_MAX,
                    "{} bytes: {}",
                    p.comment.len(),
                    p.comment
                );
                assert_eq!(owner_key(&p.comment), Some(id.key().as_str()));
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
                    p.comment.split(' ').nth(1).unwrap().split('.').next().unwrap(),
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
    fn bad_input_is_an_invalid_config_error_before_any_nft_run() {
        let missing = Nft {
            program: Some("/nonexistent/nft"),
        };
        let mut rules = masq_only(id("c1"), "10.22.0.5/24");
        rules.port_mappings = vec![(mapping(8080, 80, "icmp", None), "10.22.0.5".parse().unwrap())];
        let e = missing.add(&rules).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(e.msg.contains("\"icmp\""), "{e}");
        rules.port_mappings = vec![(mapping(0, 80, "tcp", None), "10.22.0.5".parse().unwrap())];
        assert_eq!(missing.add(&rules).unwrap_err().code, Code::InvalidConfig);
        rules.port_mappings.clear();
        rules.mac_spoof_check = Some(("veth0".into(), "0a:58:zz:00:00:01".into()));
        let e = missing.check(&rules).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(e.msg.contains("MAC"), "{e}");
        rules.mac_spoof_check = Some(("a/b".into(), "0a:58:0a:00:00:01".into()));
        assert_eq!(missing.add(&rules).unwrap_err().code, Code::InvalidConfig);
        assert_eq!(parse_mac("0A-58-0a-00-00-01").unwrap(), "0a:58:0a:00:00:01");
    }

    #[test]
    fn empty_rules_run_no_nft_and_a_missing_nft_says_install_nftables() {
        let missing = Nft {
            program: Some("/nonexistent/nft"),
        };
        let empty = AttachmentRules {
            id: id("c1"),
            masquerade: Vec::new(),
            port_mappings: Vec::new(),
            mac_spoof_check: None,
        };
        missing.add(&empty).unwrap();
        missing.check(&empty).unwrap();
        // A /0 "subnet" has nothing outside it: nothing to masquerade, nothing to run.
        missing.add(&masq_only(id("c1"), "10.22.0.5/0")).unwrap();
        let e = missing.add(&masq_only(id("c1"), "10.22.0.5/24")).unwrap_err();
        assert_eq!(e.code, Code::Io);
        assert!(
            e.msg.contains("cannot run nft") && e.details.contains("install nftables"),
            "{e}"
        );
        let e = missing.remove(&id("c1")).unwrap_err();
        assert!(e.details.contains("install nftables"), "{e}");
    }

    // -----------------------------------------------------------------------------------
    // As root, each in a private netns.

    #[test]
    fn nft_runs_in_the_namespace_of_the_calling_thread() {
        if !root_or_skip("nft_runs_in_the_namespace_of_the_calling_thread") {
            return;
        }
        let a = Netns::new();
        let b = Netns::new();
        a.run(|| {
            // The spawned process sees the thread's namespace, not the process's.
            let thread_ns = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
            let out = Command::new("readlink")
                .arg("/proc/self/ns/net")
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                thread_ns.to_string_lossy()
            );
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
            // The rules-only attempt fails on the empty netns, then one transaction creates
            // tables, chains and rules.
            assert_eq!(writes(), 2);
            // Every later attachment is a single write.
            add(&masq_only(id("second"), "10.22.0.6/24")).unwrap();
            assert_eq!(writes(), 3);
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
            let listed = Nft::DEFAULT.list().unwrap().rules;
            let victim = listed
                .iter()
                .find(|r| r.chain == "prerouting" && r.family == NfFamily::INet)
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
            let bridge = Nft::DEFAULT
                .list()
                .unwrap()
                .rules
                .into_iter()
                .find(|r| r.family == NfFamily::Bridge)
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
            assert!(text.contains(
                "sctp dport 5000 meta nfproto ipv4 fib daddr type local dnat ip to 10.22.0.5:5000"
            ));
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
        let (node, pod, out) = (Netns::new(), Netns::new(), Netns::new());
        for ns in [&node, &pod, &out] {
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
            ns.sh("ip link set lo up");
        }
        node.sh(&format!(
            "ip link add to-pod type veth peer name eth0 netns {}",
            pod.path()
        ));
        node.sh(&format!(
            "ip link add to-out type veth peer name eth0 netns {}",
            out.path()
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
        let (node, pod) = (Netns::new(), Netns::new());
        node.sh("ip link add br0 type bridge");
        node.sh(&format!(
            "ip link add fyhost type veth peer name eth0 netns {}",
            pod.path()
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
                for cid in &ids {
                    let mut rules = full(id(cid));
                    rules.port_mappings.pop();
                    let t = Instant::now();
                    add(&rules).unwrap();
                    adds.push(t.elapsed());
                    let t = Instant::now();
                    check(&rules).unwrap();
                    checks.push(t.elapsed());
                    let t = Instant::now();
                    add(&rules).unwrap();
                    readds.push(t.elapsed());
                    let t = Instant::now();
                    remove(&rules.id).unwrap();
                    removes.push(t.elapsed());
                }
                eprintln!(
                    "firewall timing ({label}, median of 50): add {:?}, check {:?}, add again (replaces) {:?}, \
                     remove {:?}",
                    median(adds),
                    median(checks),
                    median(readds),
                    median(removes)
                );
            };
            measure("empty tables");
            for i in 0..200 {
                add(&masq_only(id(&format!("other{i}")), "10.22.0.5/24")).unwrap();
            }
            measure("200 other attachments");
        });
    }
}
