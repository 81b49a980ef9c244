//! The vocabulary of the policy table, as data: its rules, peer sets and verdict-map
//! elements, each with its nft text (`Display`, what `nft -f` accepts) and what goes to
//! the kernel (`exprs()`, `spec()`, `to_nft()`), the same expressions nft 1.0.6 sends for
//! that text. `proxy/tests/policy_nftables.rs` holds the two faces together by loading
//! one transaction both ways and comparing `nft list table` outputs.
//!
//! And the rendering itself: one direction of one Pod ([`Isolation`]) becomes a chain
//! named by the hash of its rules, so Pods under the same policies share it.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::nft::{
    self, match_ct_bits, match_family, match_l4proto, Addr, CmpOp, CtKey, DataType, Expr, Reg, SetSpec,
    Verdict,
};
use crate::plan::policy::{AddressRange, Addresses, Isolation, PeerSetId, PortRange, Ports};
use crate::plan::{Family, Protocol};

/// The table the policy back end owns, in family `inet`.
pub const TABLE: &str = "ferry-policy";
/// `inet ferry-policy`, as nft commands name it.
pub(super) const T: &str = "inet ferry-policy";
/// The base chain.
pub const FORWARD: &str = "forward";
/// Both families, in the order their objects are written.
pub(super) const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

/// Which side of a connection a chain judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// What the source Pod may send: judged first, `return`s when allowed.
    Egress,
    /// What the destination Pod may receive: judged second, `accept`s when allowed.
    Ingress,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }

    /// The verdict map keyed by the isolated Pod's address (`egress-v4`, ...).
    pub fn map(self, family: Family) -> String {
        format!("{}-{}", self.name(), fam(family))
    }

    /// The field holding the isolated Pod's own address.
    fn own(self) -> Addr {
        match self {
            Direction::Egress => Addr::Saddr,
            Direction::Ingress => Addr::Daddr,
        }
    }

    /// The field holding the other end's address.
    fn peer(self) -> Addr {
        match self {
            Direction::Egress => Addr::Daddr,
            Direction::Ingress => Addr::Saddr,
        }
    }

    /// What an allowed connection gets: egress `return`s to the base chain, whose next
    /// lookup judges the destination's ingress; ingress is the last word.
    fn allowed(self) -> Verdict {
        match self {
            Direction::Egress => Verdict::Return,
            Direction::Ingress => Verdict::Accept,
        }
    }

    /// How the base chain enters this direction's chains: egress by `jump` (its `return`
    /// must come back for the ingress lookup), ingress by `goto`.
    fn enter(self, chain: &str) -> Verdict {
        match self {
            Direction::Egress => Verdict::Jump(chain.to_string()),
            Direction::Ingress => Verdict::Goto(chain.to_string()),
        }
    }
}

pub(super) fn fam(f: Family) -> &'static str {
    match f {
        Family::V4 => "v4",
        Family::V6 => "v6",
    }
}

fn ipx(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn nft_family(f: Family) -> nft::Family {
    match f {
        Family::V4 => nft::Family::Ipv4,
        Family::V6 => nft::Family::Ipv6,
    }
}

fn addr_type(f: Family) -> DataType {
    match f {
        Family::V4 => DataType::Ipv4Addr,
        Family::V6 => DataType::Ipv6Addr,
    }
}

fn addr_type_text(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// One rule of the policy table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PolicyRule {
    /// `ct state established,related accept`: replies (and ICMP errors) of connections
    /// whose first packet was allowed.
    Established,
    /// `icmpv6 type nd-neighbor-solicit accept` (135) / `nd-neighbor-advert` (136):
    /// Pods on one bridge resolve each other's IPv6 addresses with these, and conntrack
    /// does not track them, so without this an isolated Pod could not even answer the
    /// neighbour solicitation of a peer it allows (nor learn an allowed peer's address).
    NeighbourDiscovery(u8),
    /// `ip saddr vmap @egress-v4` (egress) / `ip daddr vmap @ingress-v4` (ingress).
    Dispatch { direction: Direction, family: Family },
    /// `[ip daddr @peers-…-v4] [meta l4proto tcp [th dport 80 | th dport >= 80 th dport <= 81]]
    /// return|accept`: one clause of an allow, for one family of its peers and one port
    /// range.
    Allow {
        direction: Direction,
        peers: Option<(Family, String)>,
        ports: Option<PortRange>,
    },
    /// `drop`: nothing allowed this direction.
    Drop,
}

impl fmt::Display for PolicyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyRule::Established => f.write_str("ct state established,related accept"),
            PolicyRule::NeighbourDiscovery(t) => match t {
                135 => f.write_str("icmpv6 type nd-neighbor-solicit accept"),
                _ => f.write_str("icmpv6 type nd-neighbor-advert accept"),
            },
            PolicyRule::Dispatch { direction, family } => {
                let field = match direction.own() {
                    Addr::Saddr => "saddr",
                    Addr::Daddr => "daddr",
                };
                write!(f, "{} {field} vmap @{}", ipx(*family), direction.map(*family))
            }
            PolicyRule::Allow {
                direction,
                peers,
                ports,
            } => {
                if let Some((family, set)) = peers {
                    let field = match direction.peer() {
                        Addr::Saddr => "saddr",
                        Addr::Daddr => "daddr",
                    };
                    write!(f, "{} {field} @{set} ", ipx(*family))?;
                }
                if let Some(r) = ports {
                    write!(f, "meta l4proto {} ", r.protocol.as_str())?;
                    if r.first == r.last {
                        write!(f, "th dport {} ", r.first)?;
                    } else if (r.first, r.last) != (0, u16::MAX) {
                        write!(f, "th dport >= {} th dport <= {} ", r.first, r.last)?;
                    }
                }
                match direction.allowed() {
                    Verdict::Return => f.write_str("return"),
                    _ => f.write_str("accept"),
                }
            }
            PolicyRule::Drop => f.write_str("drop"),
        }
    }
}

impl PolicyRule {
    /// The expressions nft sends for the rule's text (register 1 for every match).
    pub fn exprs(&self) -> Vec<Expr> {
        let mut e = Vec::with_capacity(10);
        match self {
            PolicyRule::Established => {
                e.extend(match_ct_bits(
                    CtKey::State,
                    nft::CT_STATE_ESTABLISHED | nft::CT_STATE_RELATED,
                ));
                e.push(Expr::Verdict(Verdict::Accept));
            }
            PolicyRule::NeighbourDiscovery(t) => {
                e.extend(match_family(nft::Family::Ipv6));
                e.extend(match_l4proto(58));
                e.push(Expr::Payload {
                    base: nft::PayloadBase::Transport,
                    offset: 0,
                    len: 1,
                    dreg: Reg::R32(0),
                });
                e.push(Expr::Cmp {
                    sreg: Reg::R32(0),
                    op: CmpOp::Eq,
                    data: vec![*t],
                });
                e.push(Expr::Verdict(Verdict::Accept));
            }
            PolicyRule::Dispatch { direction, family } => {
                e.extend(match_family(nft_family(*family)));
                e.push(nft::ip_addr(nft_family(*family), direction.own(), Reg::R32(0)));
                e.push(Expr::Lookup {
                    sreg: Reg::R32(0),
                    set: direction.map(*family),
                    dreg: Some(Reg::Verdict),
                    invert: false,
                });
            }
            PolicyRule::Allow {
                direction,
                peers,
                ports,
            } => {
                if let Some((family, set)) = peers {
                    e.extend(match_family(nft_family(*family)));
                    e.push(nft::ip_addr(nft_family(*family), direction.peer(), Reg::R32(0)));
                    e.push(Expr::Lookup {
                        sreg: Reg::R32(0),
                        set: set.clone(),
                        dreg: None,
                        invert: false,
                    });
                }
                if let Some(r) = ports {
                    e.extend(match_l4proto(proto_number(r.protocol)));
                    let mut compare = |op, port: u16| {
                        e.push(nft::th_dport(Reg::R32(0)));
                        e.push(Expr::Cmp {
                            sreg: Reg::R32(0),
                            op,
                            data: port.to_be_bytes().to_vec(),
                        });
                    };
                    if r.first == r.last {
                        compare(CmpOp::Eq, r.first);
                    } else if (r.first, r.last) != (0, u16::MAX) {
                        compare(CmpOp::Gte, r.first);
                        compare(CmpOp::Lte, r.last);
                    }
                }
                e.push(Expr::Verdict(direction.allowed()));
            }
            PolicyRule::Drop => e.push(Expr::Verdict(Verdict::Drop)),
        }
        e
    }
}

/// The base chain's rules, in order: replies and IPv6 neighbour discovery first, then the
/// source's egress, then the destination's ingress.
pub(super) fn base_rules() -> Vec<PolicyRule> {
    let mut rules = vec![
        PolicyRule::Established,
        PolicyRule::NeighbourDiscovery(135),
        PolicyRule::NeighbourDiscovery(136),
    ];
    for direction in [Direction::Egress, Direction::Ingress] {
        for family in FAMILIES {
            rules.push(PolicyRule::Dispatch { direction, family });
        }
    }
    rules
}

/// The verdict map declaration of one direction and family.
pub(super) fn map_spec(direction: Direction, family: Family) -> SetSpec {
    let mut spec = SetSpec::new(direction.map(family), vec![addr_type(family)]);
    spec.data = Some(vec![DataType::Verdict]);
    spec
}

pub(super) fn map_body(family: Family) -> String {
    format!("type {} : verdict;", addr_type_text(family))
}

/// One element of a verdict map: an isolated Pod's address and its chain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MapElement {
    pub direction: Direction,
    pub ip: IpAddr,
    pub chain: String,
}

impl MapElement {
    pub(super) fn map(&self) -> String {
        self.direction.map(Family::of(self.ip))
    }

    pub(super) fn to_nft(&self) -> nft::Element {
        nft::Element::verdict(addr_bytes(self.ip), self.direction.enter(&self.chain))
    }
}

impl fmt::Display for MapElement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.direction.enter(&self.chain) {
            Verdict::Jump(c) => write!(f, "{} : jump {c}", self.ip),
            _ => write!(f, "{} : goto {}", self.ip, self.chain),
        }
    }
}

/// A named interval set of peer addresses of one family, named by what it selects
/// (`peers-<PeerSetId>-v4`): its elements change, its name does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSet {
    pub name: String,
    pub family: Family,
    pub ranges: Vec<AddressRange>,
}

impl PeerSet {
    pub(super) fn spec(&self) -> SetSpec {
        let mut spec = SetSpec::new(&self.name, vec![addr_type(self.family)]);
        spec.interval = true;
        spec
    }

    pub(super) fn body(&self) -> String {
        format!("type {}; flags interval;", addr_type_text(self.family))
    }

    pub(super) fn elements(&self) -> Vec<nft::Element> {
        self.ranges
            .iter()
            .map(|r| nft::Element {
                key: addr_bytes(r.first),
                key_end: Some(addr_bytes(r.last)),
                data: nft::ElemData::None,
            })
            .collect()
    }

    pub(super) fn elements_text(&self) -> String {
        self.ranges.iter().map(range_text).collect::<Vec<_>>().join(", ")
    }
}

fn range_text(r: &AddressRange) -> String {
    if r.first == r.last {
        r.first.to_string()
    } else {
        format!("{}-{}", r.first, r.last)
    }
}

/// The first 16 hex digits of the SHA-256 of `bytes`: names that stay the same for the
/// same content, across restarts.
fn content_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A chain for one direction of one or more Pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyChain {
    pub name: String,
    pub rules: Vec<PolicyRule>,
    /// The peer sets its rules look up.
    pub sets: Vec<Arc<PeerSet>>,
}

/// The peer sets of one sync, by the plan's set ids and shared address lists: the plan
/// shares one `Arc` among every clause with the same peers, so each set is split by
/// family once per sync.
#[derive(Default)]
pub(super) struct SetCache {
    by_pointer: HashMap<(PeerSetId, usize), SplitByFamily>,
}

/// An address list (held, so its pointer stays its own during the sync) and its sets.
type SplitByFamily = (Arc<Addresses>, Vec<Arc<PeerSet>>);

impl SetCache {
    /// The non-empty per-family sets of `addresses` (which are `Ranges`), named by `id`.
    fn sets(&mut self, id: &PeerSetId, addresses: &Arc<Addresses>) -> &[Arc<PeerSet>] {
        let key = (id.clone(), Arc::as_ptr(addresses) as usize);
        &self
            .by_pointer
            .entry(key)
            .or_insert_with(|| (addresses.clone(), peer_sets(id, addresses)))
            .1
    }
}

fn peer_sets(id: &PeerSetId, addresses: &Addresses) -> Vec<Arc<PeerSet>> {
    let Addresses::Ranges(ranges) = addresses else {
        return Vec::new();
    };
    FAMILIES
        .iter()
        .filter_map(|family| {
            let ranges: Vec<AddressRange> = ranges
                .iter()
                .filter(|r| Family::of(r.first) == *family)
                .copied()
                .collect();
            if ranges.is_empty() {
                return None;
            }
            Some(Arc::new(PeerSet {
                name: format!("peers-{id}-{}", fam(*family)),
                family: *family,
                ranges,
            }))
        })
        .collect()
}

/// The chain of one direction of an isolated Pod: one rule per clause, family of its peers
/// and port range (a clause that can match nothing has none), the same rule once, then
/// `drop`. Named `<direction>-<hash of the rules>`.
pub(super) fn render_chain(direction: Direction, isolation: &Isolation, cache: &mut SetCache) -> PolicyChain {
    let mut rules: Vec<PolicyRule> = Vec::new();
    let mut sets: Vec<Arc<PeerSet>> = Vec::new();
    for clause in isolation.allows.iter().flat_map(|a| &a.clauses) {
        let ports: Vec<Option<PortRange>> = match &clause.ports {
            Ports::Any => vec![None],
            Ports::Ranges(ranges) => ranges.iter().copied().map(Some).collect(),
        };
        let peers: Vec<Option<Arc<PeerSet>>> = match &*clause.peers {
            Addresses::Any => vec![None],
            Addresses::Ranges(_) => cache
                .sets(&clause.peer_set, &clause.peers)
                .iter()
                .cloned()
                .map(Some)
                .collect(),
        };
        for set in &peers {
            for range in &ports {
                let rule = PolicyRule::Allow {
                    direction,
                    peers: set.as_ref().map(|s| (s.family, s.name.clone())),
                    ports: *range,
                };
                if !rules.contains(&rule) {
                    rules.push(rule);
                }
            }
            if let Some(set) = set {
                if !ports.is_empty() && !sets.iter().any(|s| s.name == set.name) {
                    sets.push(set.clone());
                }
            }
        }
    }
    rules.push(PolicyRule::Drop);
    let text: String = rules.iter().map(|r| r.to_string() + "\n").collect();
    PolicyChain {
        name: format!("{}-{}", direction.name(), content_hash(text.as_bytes())),
        rules,
        sets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::policy::{Allow, Clause};

    fn range(first: &str, last: &str) -> AddressRange {
        AddressRange {
            first: first.parse().unwrap(),
            last: last.parse().unwrap(),
        }
    }

    fn isolation(clauses: Vec<Clause>) -> Isolation {
        Isolation {
            policies: vec!["x/p".into()],
            allows: vec![Allow {
                policy: "x/p".into(),
                rule: 0,
                clauses,
            }],
        }
    }

    #[test]
    fn a_chain_has_a_rule_per_family_and_port_range_then_drop() {
        let peers = Arc::new(Addresses::Ranges(vec![
            range("10.0.0.1", "10.0.0.1"),
            range("10.0.1.0", "10.0.1.255"),
            range("fd00::1", "fd00::1"),
        ]));
        let ports = Ports::Ranges(vec![
            PortRange {
                protocol: Protocol::Tcp,
                first: 80,
                last: 80,
            },
            PortRange {
                protocol: Protocol::Udp,
                first: 100,
                last: 200,
            },
        ]);
        let chain = render_chain(
            Direction::Ingress,
            &isolation(vec![Clause::by_content(peers.clone(), ports.clone())]),
            &mut SetCache::default(),
        );
        let text: Vec<String> = chain.rules.iter().map(|r| r.to_string()).collect();
        let v4 = &chain.sets[0].name;
        let v6 = &chain.sets[1].name;
        assert_eq!(
            text,
            [
                format!("ip saddr @{v4} meta l4proto tcp th dport 80 accept"),
                format!("ip saddr @{v4} meta l4proto udp th dport >= 100 th dport <= 200 accept"),
                format!("ip6 saddr @{v6} meta l4proto tcp th dport 80 accept"),
                format!("ip6 saddr @{v6} meta l4proto udp th dport >= 100 th dport <= 200 accept"),
                "drop".to_string(),
            ]
        );
        assert_eq!(chain.sets[0].elements_text(), "10.0.0.1, 10.0.1.0-10.0.1.255");
        assert!(chain.name.starts_with("ingress-"));
        // The same content under another policy name is the same chain.
        let mut other = isolation(vec![Clause::by_content(Arc::new((*peers).clone()), ports)]);
        other.allows[0].policy = "y/q".into();
        assert_eq!(
            render_chain(Direction::Ingress, &other, &mut SetCache::default()),
            chain
        );
    }

    #[test]
    fn clauses_that_match_nothing_leave_only_drop() {
        let chain = render_chain(
            Direction::Egress,
            &isolation(vec![Clause::by_content(
                Arc::new(Addresses::Ranges(Vec::new())),
                Ports::Any,
            )]),
            &mut SetCache::default(),
        );
        assert_eq!(chain.rules, [PolicyRule::Drop]);
        assert!(chain.sets.is_empty());
        let open = render_chain(
            Direction::Egress,
            &isolation(vec![Clause::by_content(Arc::new(Addresses::Any), Ports::Any)]),
            &mut SetCache::default(),
        );
        assert_eq!(open.rules[0].to_string(), "return");
        assert_ne!(open.name, chain.name);
    }
}
