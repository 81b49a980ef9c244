//! The nftables back end: Services as one table, `inet ferry-proxy`, changed by diff.
//!
//! # Layout
//!
//! One `inet` table holds both families. Ferry owns it and nothing else: it never lists,
//! flushes or edits another table, and never flushes the ruleset.
//!
//! ```text
//! base chains                       hook         priority  rules
//! filter-prerouting                 prerouting   -110      ct state new jump firewall-check
//! filter-input / filter-forward     input/fwd    -110      ct state new jump endpoints-check
//! filter-output                     output       -110      both of the above
//! nat-prerouting / nat-output       pre/output   -100      jump services
//! nat-postrouting                   postrouting  100       jump masquerading
//!
//! services          ip daddr . meta l4proto . th dport vmap @service-ips-v4    (and -v6)
//!                   fib daddr type local ip daddr != 127.0.0.0/8              (or ip daddr
//!                       meta l4proto . th dport vmap @service-nodeports-v4     @nodeport-ips-v4)
//! endpoints-check   the same two lookups in @no-endpoint-services-v4 / @no-endpoint-nodeports-v4,
//!                   whose verdicts are `goto reject-chain` (no endpoints at all) or `drop`
//!                   (a Local traffic policy without local endpoints)
//! firewall-check    ip daddr . meta l4proto . th dport vmap @firewall-ips-v4   (source ranges)
//! reject-chain      meta l4proto tcp reject with tcp reset; reject
//! masquerading      ct status dnat ip saddr . ip daddr @hairpin-v4 masquerade fully-random
//!                   meta mark & 0x4000 == 0 return; meta mark set meta mark xor 0x4000;
//!                   masquerade fully-random
//! sets              cluster-cidrs-v4 (--cluster-cidr), nodeport-ips-v4 (--nodeport-addresses),
//!                   hairpin-v4 (every endpoint address A as the pair A . A)
//! endpoint maps     endpoints-v4-tcp-00 … endpoints-v4-tcp-31 (and udp, sctp, v6):
//!                   typeof numgen random mod 1 : ip daddr . tcp dport
//! ```
//!
//! "Mark for masquerade" below is the statement `meta mark set meta mark or 0x4000`,
//! written inline: a jump to a shared chain would be walked again for every Service by the
//! kernel's validation of each commit (see "Measurements").
//!
//! Per Service port (one [`ServicePortId`], so one family), names `<kind>-<HASH>-<ns/name/
//! proto/port>/<v4|v6>` with HASH the first 8 base32 characters of a SHA-256 of the id:
//!
//! - `service-…`: traffic to the ClusterIP (and short-circuited traffic, below), over
//!   `cluster_endpoints`: `ip saddr != @cluster-cidrs-v4` mark for masquerade (when the
//!   family has a cluster CIDR), then the random choice.
//! - `external-…`: NodePort, external and load-balancer IPs. Mark for masquerade, then
//!   `goto service-…`; with `externalTrafficPolicy: Local` instead: sources in the
//!   cluster CIDRs `goto service-…` (so a Local LB IP is not blackholed from inside), the
//!   node itself is masqueraded and goes there too, and the rest goes to the local
//!   endpoints (`goto ext-endpoints-…` when they differ from the cluster ones, or when
//!   externalTrafficPolicy Local must keep the client address the service chain would mask).
//! - `ext-endpoints-…`: the choice over `external_endpoints`, when `external-…` cannot share
//!   the service chain.
//! - `firewall-…`: `loadBalancerSourceRanges`: `ip saddr <range> return` per range, `drop`.
//!
//! The random choice is ONE rule, `meta l4proto tcp dnat ip to numgen random mod N offset
//! O map @endpoints-v4-tcp-S`: the port owns keys O .. O+N of endpoint map S (S fixed by a
//! hash of the port's id, O handed out by a [`SlotAllocator`] in power-of-two blocks), each
//! key mapping to one endpoint's `address . port`. A changed endpoint is one element
//! replaced; only a changed endpoint count rewrites the rule. Endpoint maps rather than one
//! chain or one named map per Service: the kernel finds a named set by walking the table's
//! list of sets (10k maps took a full sync from 3 s to 10 s), binding a map to a rule walks
//! all its elements and adding an element walks all rules bound to its map (one shared map
//! took 14 s), so the endpoints are spread over 32 maps per family and protocol (the
//! protocol is in the map because nft 1.0.6 refuses `th dport` data after `meta l4proto
//! tcp`).
//!
//! Session affinity (sessionAffinity ClientIP) keeps one rule per endpoint, since the choice
//! must also record the client per endpoint: `affinity-…__<ip>/<port>` sets, one per
//! endpoint, `flags dynamic,timeout`; `ip saddr @affinity-X update @affinity-X { ip saddr }
//! … dnat to X` per endpoint, then `numgen random mod N-i == 0 update @affinity-X { ip saddr
//! } … dnat to X` for endpoint i of N (the last unconditional), which is uniform.
//!
//! There are no per-endpoint chains and no anonymous sets (see "Measurements"). Hairpin traffic (a Pod reaching itself through its Service) is
//! recognised after the DNAT, in postrouting, by the pair set `hairpin-v4`, which holds
//! `A . A` for every endpoint address A: source == destination can only be hairpin.
//!
//! # Measurements that chose the format and the layout
//!
//! nft 1.0.6 (Debian 12), Linux 6.18, 2 CPUs, in a fresh netns; 10,000 Services with 10
//! endpoints each (`nft -f` wall time; the machine was shared, so ±30%):
//!
//! | layout                                                   | text `-f`  | JSON `-j -f` |
//! |----------------------------------------------------------|-----------:|-------------:|
//! | kube-proxy's: chain per endpoint, `numgen … vmap {…}`     |   91 s     |  132 s       |
//! | chain per endpoint, sequential `numgen … == 0 goto`      |   9.8 s    |              |
//! | chain per Service, sequential `numgen … == 0 dnat` (ours)|   3.3 s    |  5.2 s       |
//!
//! One more Service (its chains, rules, one map element) on top of those tables: 1.0-1.2 s
//! (kube-proxy's), 1.7 s (chain per endpoint), 70-110 ms (ours), text and JSON alike.
//!
//! - Every commit that adds a rule or a `goto` element makes the kernel validate the whole
//!   table (`nf_tables_validate`): it walks every rule reachable from every base chain,
//!   through the verdict maps, with no memory of chains already seen. With 11 rules per
//!   Service and two base chains reaching them, that walk was 70% of a one-Service change
//!   (perf, 10k Services). One rule for the choice and the masquerade mark inline (no
//!   `jump` to a shared chain) make the walk about five times shorter.
//! - Anonymous sets (the `vmap { 0 : goto … }` of the random choice) cost the kernel a walk
//!   of the whole transaction each when they are bound (`__nft_set_trans_bind`): quadratic
//!   in the size of a full sync. Sequential `numgen` rules have no set at all.
//! - Every nft 1.0.6 command that adds or deletes a rule or an element first fetches the
//!   table's chain list (its cache needs `NFT_CACHE_CHAIN`), and the kernel's chain dump is
//!   quadratic in the number of chains (each dump batch restarts from the first chain):
//!   110,000 chains cost about 1 s per sync, 10,000 about 60 ms. Hence no chain per
//!   endpoint.
//! - Text is parsed faster than JSON by nft (2.2 s against 3.7 s of user time here) and is
//!   half the size, so the back end writes text itself (`nft -f -`). Every name it writes is
//!   built from `[A-Za-z0-9_./-]` and starts with a letter, every value is an address,
//!   a number or a protocol keyword, so nothing needs quoting (see [`sanitize`]).
//! - Reading the table back: `nft -j list table` takes 10 s at that size, `nft -j list
//!   chains inet` 80 ms, so a restart reads chain and set names only.
//!
//! - New chains are written in nft's block syntax (`table inet ferry-proxy { chain X { … }
//!   }`), changed ones as `flush chain` + `add rule` lines: the block form is a third
//!   smaller and a little quicker to parse.
//!
//! The back end itself, with that layout (the ignored test `timings` in
//! `proxy/tests/nftables.rs`, release build, same machine), plan diff + render + nft:
//!
//! | Services x endpoints | full sync | one added Service | one endpoint changed | no change | restart (first sync over an existing table) |
//! |---------------------:|----------:|------------------:|---------------------:|----------:|---------:|
//! | 1,000 x 10           | 0.22 s    | 19 ms             | 15 ms                | 0.4 ms    | 0.36 s   |
//! | 10,000 x 10          | 2.4 s     | 49 ms             | 44 ms                | 9 ms      | 5.4 s    |
//!
//! (With a chain of 11 rules per Service instead of endpoint maps: 3.4-3.6 s, 74-95 ms,
//! 80-117 ms.) At 10k, 2.2 s of the full sync is nft itself (`nft -f` of the same text:
//! 1.35 s user, 0.85 s kernel). What remains of a one-Service change is nft's start, its
//! chain-cache fetch and the kernel's validation walk.
//!
//! # Sync
//!
//! The back end keeps, per Service port, the plan it applied and what it rendered from it
//! (chains with their rule lines, affinity sets, map elements). A sync walks the new
//! table: an unchanged [`ServicePort`] is skipped without rendering; a changed one is
//! rendered and compared chain by chain and element by element. The difference goes to
//! nft as ONE transaction, in this order: new sets, new chains (empty, so references
//! resolve), deleted elements, flushed-and-refilled chains, added elements, deleted chains
//! (the chains that jump first), deleted sets, hairpin pairs. A port that vanished loses its
//! elements before its chains. Nothing to change means nft is not run at all.
//!
//! # Restart
//!
//! The first sync reads the names of Ferry's chains and sets (`nft -j list chains inet`,
//! `nft -j list sets inet`, keeping only this table's), then in one transaction: ensures
//! the table, base chains, maps and sets; flushes the maps and every existing chain;
//! refills everything the plan wants; deletes the chains and sets it does not. The
//! transaction is atomic, so no packet sees a half-written table, and conntrack is never
//! flushed: established connections keep their NAT whatever the rules become. A failed
//! transaction (nothing applied) forgets the in-memory state, so the next sync converges
//! from the kernel again.
//!
//! # Conntrack
//!
//! After a sync that removed UDP endpoints, the conntrack entries of UDP flows from a
//! Service address (ClusterIP, external or LB IP, or the NodePort on any address) to each
//! removed endpoint are deleted over netlink ([`crate::conntrack`]), so clients move to the
//! remaining endpoints at once. TCP entries are never touched.
//!
//! # Node requirements
//!
//! Pod → ClusterIP → Pod on the same bridge needs `net.bridge.bridge-nf-call-iptables=1`
//! (and `bridge-nf-call-ip6tables=1`) in the node's network namespace, or replies are
//! bridged straight back and never un-NATed. The mark bit 0x4000 is used for masquerading,
//! as kube-proxy does.
//!
//! `nft` runs in the network namespace of the calling thread: a process spawned from a
//! thread inherits that thread's namespace.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Instant;

use ipnetwork::IpNetwork;
use sha2::{Digest, Sha256};

use super::{Backend, BackendError, SyncStats};
use crate::conntrack;
use crate::plan::{Endpoint, Family, NodeSettings, Protocol, ServicePort, ServicePortId, ServiceTable};

/// The table Ferry owns, in family `inet`.
pub const TABLE: &str = "ferry-proxy";
/// `inet ferry-proxy`, as nft commands name the table.
const T: &str = "inet ferry-proxy";
/// The packet mark bit that asks `masquerading` to masquerade (kube-proxy's).
pub const MASQ_MARK: u32 = 0x4000;
/// Longest object name nft accepts is 255 bytes; ours stay well below.
const MAX_BASE: usize = 200;

/// Base chains: name, type, hook, priority.
const BASE_CHAINS: [(&str, &str, &str, i32); 7] = [
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];
/// Regular chains of the base layout.
const HELPER_CHAINS: [&str; 5] = [
    "services",
    "endpoints-check",
    "firewall-check",
    "reject-chain",
    "masquerading",
];
/// Chains an older Ferry made that this one no longer has: deleted when converging.
const FORMER_HELPER_CHAINS: [&str; 1] = ["mark-for-masquerade"];
/// Endpoint maps per family and protocol (see "Endpoint maps" in the module docs).
pub const ENDPOINT_MAPS: u32 = 32;
/// The statement that asks `masquerading` to masquerade the packet.
const MARK_FOR_MASQUERADE: &str = "meta mark set meta mark or 0x4000";
/// Prefixes of per-port chains, in the order they are deleted (a chain that jumps to
/// another comes before it).
const PORT_CHAIN_PREFIXES: [&str; 4] = ["external-", "firewall-", "ext-endpoints-", "service-"];
const AFFINITY_PREFIX: &str = "affinity-";

/// A per-port chain: one of the prefixes and a `/` (names of the base layout never have
/// one, so `firewall-check` is not taken for a port's `firewall-…`).
fn is_port_chain(name: &str) -> bool {
    name.contains('/') && PORT_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}

fn is_affinity_set(name: &str) -> bool {
    name.contains('/') && name.starts_with(AFFINITY_PREFIX)
}

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];
const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

fn fam(f: Family) -> &'static str {
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

fn addr_type(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

/// The names of the base maps of one family: what they key on.
fn base_maps(f: Family) -> [(String, String); 5] {
    let a = addr_type(f);
    let f = fam(f);
    [
        (
            format!("service-ips-{f}"),
            format!("{a} . inet_proto . inet_service : verdict"),
        ),
        (
            format!("service-nodeports-{f}"),
            "inet_proto . inet_service : verdict".to_string(),
        ),
        (
            format!("no-endpoint-services-{f}"),
            format!("{a} . inet_proto . inet_service : verdict"),
        ),
        (
            format!("no-endpoint-nodeports-{f}"),
            "inet_proto . inet_service : verdict".to_string(),
        ),
        (
            format!("firewall-ips-{f}"),
            format!("{a} . inet_proto . inet_service : verdict"),
        ),
    ]
}

/// The base sets of one family: name and declaration body.
fn base_sets(f: Family) -> [(String, String); 3] {
    let a = addr_type(f);
    let f = fam(f);
    [
        (
            format!("cluster-cidrs-{f}"),
            format!("type {a}; flags interval; auto-merge;"),
        ),
        (
            format!("nodeport-ips-{f}"),
            format!("type {a}; flags interval; auto-merge;"),
        ),
        (format!("hairpin-{f}"), format!("type {a} . {a};")),
    ]
}

/// Makes `s` safe inside an nft identifier: `[A-Za-z0-9_./-]` stay, `:` (IPv6) becomes `.`,
/// anything else `_`. Kubernetes names are DNS labels and never change here; the hash in
/// every name keeps two sanitized names apart.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '_' | '.' | '/' | '-' => c,
            ':' => '.',
            _ => '_',
        })
        .collect()
}

/// The first 8 base32 characters of SHA-256(`s`).
fn hash8(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(s.as_bytes());
    let bits = digest[..5].iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
    (0..8)
        .rev()
        .map(|i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// `HASH-<readable>`, the readable part cut to keep names within nft's limits.
fn hashed(full: &str) -> String {
    let mut readable = sanitize(full);
    if readable.len() > MAX_BASE {
        readable.truncate(MAX_BASE - 3);
        readable.push_str("...");
    }
    format!("{}-{}", hash8(full), readable)
}

/// The stable part of every chain name of one Service port: `HASH-ns/name/proto/port/v4`.
pub fn port_base_name(id: &ServicePortId) -> String {
    hashed(&format!(
        "{}/{}/{}/{}/{}",
        id.namespace,
        id.name,
        id.protocol.as_str(),
        id.port_name,
        fam(id.family)
    ))
}

/// The affinity set of one endpoint of one port (the timeout is part of the identity: a
/// new timeout is a new set, since nft cannot change a set's timeout in place).
fn affinity_set_name(id: &ServicePortId, ep: &Endpoint, timeout: u32) -> String {
    let ip = ep.ip.to_string().replace(':', ".");
    format!(
        "{AFFINITY_PREFIX}{}",
        hashed(&format!(
            "{}/{}/{}/{}__{}/{}/t{}",
            id.namespace,
            id.name,
            id.protocol.as_str(),
            id.port_name,
            ip,
            ep.port,
            timeout
        ))
    )
}

/// An address with a port as nft writes it in `dnat ... to`.
fn socket(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// What the node settings mean for the rules of each port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RenderCtx {
    /// The family has at least one cluster CIDR (then traffic from elsewhere to a
    /// ClusterIP is masqueraded, and Local external traffic from inside short-circuits).
    cidrs_v4: bool,
    cidrs_v6: bool,
}

impl RenderCtx {
    fn of(settings: &NodeSettings) -> RenderCtx {
        RenderCtx {
            cidrs_v4: settings.cluster_cidrs.iter().any(|c| c.is_ipv4()),
            cidrs_v6: settings.cluster_cidrs.iter().any(|c| c.is_ipv6()),
        }
    }

    fn has_cidrs(&self, f: Family) -> bool {
        match f {
            Family::V4 => self.cidrs_v4,
            Family::V6 => self.cidrs_v6,
        }
    }
}

/// One element of a base map or set: the map, the key as nft writes it, the value
/// (verdict) or "" in a set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Element {
    map: String,
    key: String,
    value: String,
}

/// Everything one Service port puts in the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PortObjects {
    /// Chain name -> its rules, in order.
    chains: BTreeMap<String, Vec<String>>,
    /// Affinity set name -> its declaration body.
    sets: BTreeMap<String, String>,
    elements: BTreeSet<Element>,
    /// Endpoint addresses (for the hairpin set).
    endpoint_ips: BTreeSet<IpAddr>,
}

impl PortObjects {
    fn rules(&self) -> usize {
        self.chains.values().map(Vec::len).sum()
    }
}

/// Where a port's endpoints sit in the endpoint maps: map `endpoints-<v4|v6>-<shard>`,
/// keys `offset .. offset + capacity` (the cluster endpoints first, then the external ones
/// when they have a chain of their own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    shard: u32,
    offset: u32,
    capacity: u32,
}

/// The endpoint map of a port, fixed by its identity (so a port keeps its map for life).
fn endpoint_shard(id: &ServicePortId) -> u32 {
    let digest = Sha256::digest(port_base_name(id).as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % ENDPOINT_MAPS
}

fn endpoint_map(f: Family, proto: Protocol, shard: u32) -> String {
    format!("endpoints-{}-{}-{shard:02}", fam(f), proto.as_str())
}

/// How many keys a port needs in its endpoint map. Ports with session affinity need none:
/// their choice must also record the client per endpoint, so it stays one rule per
/// endpoint.
fn slots_needed(p: &ServicePort) -> u32 {
    if p.affinity_seconds.is_some() {
        0
    } else {
        (p.cluster_endpoints.len() + p.external_endpoints.len()) as u32
    }
}

/// One endpoint map: family, protocol, shard.
type EndpointMapId = (Family, Protocol, u32);

/// Hands out key ranges of the endpoint maps. Capacities are powers of two (at least 4),
/// so a range freed by one port is reused by the next port of the same size class.
#[derive(Debug, Default)]
struct SlotAllocator {
    /// Endpoint map -> the first key never handed out.
    next: HashMap<EndpointMapId, u32>,
    /// (endpoint map, capacity) -> freed offsets.
    free: HashMap<(EndpointMapId, u32), Vec<u32>>,
}

impl SlotAllocator {
    /// A slot for `needed` keys in `shard`: `old` when it is big enough, else a new one
    /// (and `old` goes back).
    fn fit(&mut self, id: &ServicePortId, needed: u32, old: Option<Slot>) -> Result<Slot, BackendError> {
        let shard = endpoint_shard(id);
        if let Some(old) = old {
            if old.capacity >= needed && (needed > 0 || old.capacity == 0) {
                return Ok(old);
            }
            self.give_back(id, old);
        }
        let map = (id.family, id.protocol, shard);
        if needed == 0 {
            return Ok(Slot {
                shard,
                offset: 0,
                capacity: 0,
            });
        }
        let capacity = needed.next_power_of_two().max(4);
        if let Some(offset) = self.free.get_mut(&(map, capacity)).and_then(Vec::pop) {
            return Ok(Slot {
                shard,
                offset,
                capacity,
            });
        }
        let next = self.next.entry(map).or_default();
        let offset = *next;
        *next = offset.checked_add(capacity).ok_or_else(|| {
            BackendError(format!(
                "the keys of endpoint map {} are used up; restart ferry-proxy to renumber",
                endpoint_map(id.family, id.protocol, shard)
            ))
        })?;
        Ok(Slot {
            shard,
            offset,
            capacity,
        })
    }

    fn give_back(&mut self, id: &ServicePortId, slot: Slot) {
        if slot.capacity > 0 {
            self.free
                .entry(((id.family, id.protocol, slot.shard), slot.capacity))
                .or_default()
                .push(slot.offset);
        }
    }
}

/// Renders one Service port: its chains, affinity sets and map elements. `slot` holds at
/// least [`slots_needed`] keys.
fn render_port(p: &ServicePort, ctx: RenderCtx, slot: Slot) -> PortObjects {
    let id = &p.id;
    let f = id.family;
    let (ip, fs, proto) = (ipx(f), fam(f), id.protocol.as_str());
    let base = port_base_name(id);
    let service = format!("service-{base}");
    let external = format!("external-{base}");
    let ext_endpoints = format!("ext-endpoints-{base}");
    let firewall = format!("firewall-{base}");
    let mut o = PortObjects::default();

    let has_cluster = !p.cluster_endpoints.is_empty();
    let has_external = !p.external_endpoints.is_empty();
    let has_endpoints = has_cluster || has_external;
    // kube-proxy: no endpoints anywhere is rejected; endpoints that a Local policy keeps
    // out of reach are dropped.
    let none_verdict = if has_endpoints {
        "drop"
    } else {
        "goto reject-chain"
    };
    let mut element = |map: String, key: String, value: String| {
        o.elements.insert(Element { map, key, value });
    };
    let service_key = |addr: IpAddr| format!("{addr} . {proto} . {}", p.port);

    // Destinations.
    if let Some(cip) = p.cluster_ip {
        if has_cluster {
            element(
                format!("service-ips-{fs}"),
                service_key(cip),
                format!("goto {service}"),
            );
        } else {
            element(
                format!("no-endpoint-services-{fs}"),
                service_key(cip),
                none_verdict.into(),
            );
        }
    }
    let external_ips: BTreeSet<IpAddr> = p
        .external_ips
        .iter()
        .chain(&p.load_balancer_ips)
        .copied()
        .filter(|a| Family::of(*a) == f)
        .collect();
    let uses_external_chain = has_endpoints && (p.node_port.is_some() || !external_ips.is_empty());
    for addr in &external_ips {
        if Some(*addr) == p.cluster_ip {
            continue;
        }
        if has_endpoints {
            element(
                format!("service-ips-{fs}"),
                service_key(*addr),
                format!("goto {external}"),
            );
        }
        if !has_external {
            element(
                format!("no-endpoint-services-{fs}"),
                service_key(*addr),
                none_verdict.into(),
            );
        }
    }
    if let Some(np) = p.node_port {
        let key = format!("{proto} . {np}");
        if has_endpoints {
            element(
                format!("service-nodeports-{fs}"),
                key.clone(),
                format!("goto {external}"),
            );
        }
        if !has_external {
            element(format!("no-endpoint-nodeports-{fs}"), key, none_verdict.into());
        }
    }
    let ranges: Vec<IpNetwork> = p
        .source_ranges
        .iter()
        .copied()
        .filter(|r| Family::of(r.ip()) == f)
        .collect();
    let lb_ips: BTreeSet<IpAddr> = p
        .load_balancer_ips
        .iter()
        .copied()
        .filter(|a| Family::of(*a) == f)
        .collect();
    if !ranges.is_empty() && !lb_ips.is_empty() {
        let mut rules: Vec<String> = ranges
            .iter()
            .map(|r| {
                let net = IpNetwork::new(r.network(), r.prefix()).unwrap_or(*r);
                format!("{ip} saddr {net} return")
            })
            .collect();
        rules.push("drop".into());
        o.chains.insert(firewall.clone(), rules);
        for addr in &lb_ips {
            element(
                format!("firewall-ips-{fs}"),
                service_key(*addr),
                format!("goto {firewall}"),
            );
        }
    }

    // Chains.
    let affinity = p.affinity_seconds.map(|t| t.max(1));
    let emap = endpoint_map(f, id.protocol, slot.shard);
    // `first`: the index in the port's slot of the first of `eps`.
    let mut choice = |eps: &[Endpoint], first: u32| -> Vec<String> {
        let mut rules = Vec::new();
        if affinity.is_none() {
            let offset = slot.offset + first;
            for (i, ep) in eps.iter().enumerate() {
                o.elements.insert(Element {
                    map: emap.clone(),
                    key: (offset + i as u32).to_string(),
                    value: format!("{} . {}", ep.ip, ep.port),
                });
            }
            rules.push(format!(
                "meta l4proto {proto} dnat {ip} to numgen random mod {} offset {offset} map @{emap}",
                eps.len()
            ));
            return rules;
        }
        if let Some(timeout) = affinity {
            for ep in eps {
                let set = affinity_set_name(id, ep, timeout);
                o.sets.insert(
                    set.clone(),
                    format!(
                        "type {}; flags dynamic,timeout; timeout {timeout}s;",
                        addr_type(f)
                    ),
                );
                rules.push(format!(
                    "{ip} saddr @{set} update @{set} {{ {ip} saddr }} meta l4proto {proto} dnat {ip} to {}",
                    socket(ep.ip, ep.port)
                ));
            }
        }
        let n = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            let mut rule = String::new();
            if i + 1 < n {
                let _ = write!(rule, "numgen random mod {} == 0 ", n - i);
            }
            if let Some(timeout) = affinity {
                let set = affinity_set_name(id, ep, timeout);
                let _ = write!(rule, "update @{set} {{ {ip} saddr }} ");
            }
            let _ = write!(
                rule,
                "meta l4proto {proto} dnat {ip} to {}",
                socket(ep.ip, ep.port)
            );
            rules.push(rule);
        }
        rules
    };
    if has_cluster {
        let mut rules = Vec::new();
        if ctx.has_cidrs(f) {
            rules.push(format!("{ip} saddr != @cluster-cidrs-{fs} {MARK_FOR_MASQUERADE}"));
        }
        rules.extend(choice(&p.cluster_endpoints, 0));
        o.chains.insert(service.clone(), rules);
    }
    // External traffic may share the service chain only when its masquerade rule (for
    // sources outside the cluster CIDRs) is right for it too: with externalTrafficPolicy
    // Local the client's address must be kept, so it gets a choice chain of its own.
    let shares_service_chain =
        p.external_endpoints == p.cluster_endpoints && (!p.external_local || !ctx.has_cidrs(f));
    let external_target = if shares_service_chain {
        service.clone()
    } else {
        ext_endpoints.clone()
    };
    if has_external && external_target == ext_endpoints {
        let rules = choice(&p.external_endpoints, p.cluster_endpoints.len() as u32);
        o.chains.insert(ext_endpoints.clone(), rules);
    }
    if uses_external_chain {
        let mut rules = Vec::new();
        if !p.external_local {
            rules.push(MARK_FOR_MASQUERADE.to_string());
        } else if has_cluster {
            if ctx.has_cidrs(f) {
                rules.push(format!("{ip} saddr @cluster-cidrs-{fs} goto {service}"));
            }
            rules.push(format!("fib saddr type local {MARK_FOR_MASQUERADE}"));
            rules.push(format!("fib saddr type local goto {service}"));
        }
        if has_external {
            rules.push(format!("goto {external_target}"));
        }
        o.chains.insert(external.clone(), rules);
    }
    o.endpoint_ips = p
        .cluster_endpoints
        .iter()
        .chain(&p.external_endpoints)
        .map(|e| e.ip)
        .collect();
    o
}

/// The base of the table for these settings: chains with their rules (regular and base),
/// and the elements of the cluster-cidrs and nodeport-ips sets.
fn render_base(settings: &NodeSettings) -> (Vec<(String, Vec<String>)>, Vec<Element>) {
    let all_nodeports = settings.nodeport_addresses.is_empty();
    let mut chains: Vec<(String, Vec<String>)> = Vec::new();
    let lookups = |maps: (&str, &str)| -> Vec<String> {
        let mut rules = Vec::new();
        for f in FAMILIES {
            let (ip, fs) = (ipx(f), fam(f));
            rules.push(format!(
                "{ip} daddr . meta l4proto . th dport vmap @{}-{fs}",
                maps.0
            ));
        }
        for f in FAMILIES {
            let (ip, fs) = (ipx(f), fam(f));
            let local = match f {
                Family::V4 => "ip daddr != 127.0.0.0/8",
                Family::V6 => "ip6 daddr != ::1",
            };
            let which = if all_nodeports {
                format!("fib daddr type local {local}")
            } else {
                format!("{ip} daddr @nodeport-ips-{fs} fib daddr type local {local}")
            };
            rules.push(format!("{which} meta l4proto . th dport vmap @{}-{fs}", maps.1));
        }
        rules
    };
    chains.push(("services".into(), lookups(("service-ips", "service-nodeports"))));
    chains.push((
        "endpoints-check".into(),
        lookups(("no-endpoint-services", "no-endpoint-nodeports")),
    ));
    chains.push((
        "firewall-check".into(),
        FAMILIES
            .iter()
            .map(|f| {
                format!(
                    "{} daddr . meta l4proto . th dport vmap @firewall-ips-{}",
                    ipx(*f),
                    fam(*f)
                )
            })
            .collect(),
    ));
    chains.push((
        "reject-chain".into(),
        vec!["meta l4proto tcp reject with tcp reset".into(), "reject".into()],
    ));
    let mut masq: Vec<String> = FAMILIES
        .iter()
        .map(|f| {
            let ip = ipx(*f);
            format!(
                "ct status dnat {ip} saddr . {ip} daddr @hairpin-{} masquerade fully-random",
                fam(*f)
            )
        })
        .collect();
    masq.push(format!("meta mark & {MASQ_MARK:#x} == 0 return"));
    masq.push(format!("meta mark set meta mark xor {MASQ_MARK:#x}"));
    masq.push("masquerade fully-random".into());
    chains.push(("masquerading".into(), masq));
    chains.push((
        "filter-prerouting".into(),
        vec!["ct state new jump firewall-check".into()],
    ));
    chains.push((
        "filter-input".into(),
        vec!["ct state new jump endpoints-check".into()],
    ));
    chains.push((
        "filter-forward".into(),
        vec!["ct state new jump endpoints-check".into()],
    ));
    chains.push((
        "filter-output".into(),
        vec![
            "ct state new jump endpoints-check".into(),
            "ct state new jump firewall-check".into(),
        ],
    ));
    chains.push(("nat-prerouting".into(), vec!["jump services".into()]));
    chains.push(("nat-output".into(), vec!["jump services".into()]));
    chains.push(("nat-postrouting".into(), vec!["jump masquerading".into()]));

    let mut elements = Vec::new();
    let nets = |list: &[IpNetwork], f: Family| -> Vec<String> {
        let set: BTreeSet<String> = list
            .iter()
            .filter(|n| Family::of(n.ip()) == f)
            .map(|n| IpNetwork::new(n.network(), n.prefix()).unwrap_or(*n).to_string())
            .collect();
        set.into_iter().collect()
    };
    for f in FAMILIES {
        for key in nets(&settings.cluster_cidrs, f) {
            elements.push(Element {
                map: format!("cluster-cidrs-{}", fam(f)),
                key,
                value: String::new(),
            });
        }
        for key in nets(&settings.nodeport_addresses, f) {
            elements.push(Element {
                map: format!("nodeport-ips-{}", fam(f)),
                key,
                value: String::new(),
            });
        }
    }
    (chains, elements)
}

/// Rules in the base layout (for the rule count).
fn base_rules(settings: &NodeSettings) -> usize {
    render_base(settings).0.iter().map(|(_, r)| r.len()).sum()
}

/// An nft transaction being written, in sections that keep the order described in the
/// module docs.
#[derive(Default)]
struct Tx {
    head: String,
    add_sets: String,
    add_chains: String,
    /// Rules of chains new in this transaction, in nft's block syntax (`table … { chain X
    /// { … } }`), which nft parses about a third faster than one `add rule` per line.
    new_rules: String,
    del_elements: BTreeMap<String, Vec<String>>,
    fill: String,
    add_elements: BTreeMap<String, Vec<String>>,
    del_chains: Vec<String>,
    del_sets: String,
    commands: usize,
}

impl Tx {
    fn is_empty(&self) -> bool {
        self.commands == 0
    }

    fn fill_chain(&mut self, name: &str, rules: &[String], flush: bool) {
        if flush {
            let _ = writeln!(self.fill, "flush chain {T} {name}");
            self.commands += 1;
        }
        for r in rules {
            let _ = writeln!(self.fill, "add rule {T} {name} {r}");
            self.commands += 1;
        }
    }

    fn fill_new_chain(&mut self, name: &str, rules: &[String]) {
        let _ = writeln!(self.new_rules, "\tchain {name} {{");
        for r in rules {
            let _ = writeln!(self.new_rules, "\t\t{r}");
            self.commands += 1;
        }
        self.new_rules.push_str("\t}\n");
    }

    fn add_element(&mut self, e: &Element) {
        let item = if e.value.is_empty() {
            e.key.clone()
        } else {
            format!("{} : {}", e.key, e.value)
        };
        self.add_elements.entry(e.map.clone()).or_default().push(item);
        self.commands += 1;
    }

    fn del_element(&mut self, e: &Element) {
        self.del_elements
            .entry(e.map.clone())
            .or_default()
            .push(e.key.clone());
        self.commands += 1;
    }

    fn text(mut self) -> String {
        let mut out = std::mem::take(&mut self.head);
        out.push_str(&self.add_sets);
        out.push_str(&self.add_chains);
        if !self.new_rules.is_empty() {
            let _ = write!(out, "table {T} {{\n{}}}\n", self.new_rules);
        }
        for (map, keys) in &self.del_elements {
            let _ = writeln!(out, "delete element {T} {map} {{ {} }}", keys.join(", "));
        }
        out.push_str(&self.fill);
        for (map, items) in &self.add_elements {
            let _ = writeln!(out, "add element {T} {map} {{ {} }}", items.join(", "));
        }
        // Chains that jump to others go first.
        let rank = |name: &str| {
            PORT_CHAIN_PREFIXES
                .iter()
                .position(|p| name.starts_with(p))
                .unwrap_or(0)
        };
        self.del_chains.sort_by_key(|c| rank(c));
        for c in &self.del_chains {
            let _ = writeln!(out, "delete chain {T} {c}");
        }
        out.push_str(&self.del_sets);
        out
    }
}

/// What the back end applied last, per Service port.
#[derive(Debug, Default)]
struct Applied {
    settings: NodeSettings,
    ports: HashMap<ServicePortId, AppliedPort>,
    /// Map keys and the port that holds each (two Services claiming one external IP and
    /// port must not fail the whole transaction).
    owners: HashMap<(String, String), ServicePortId>,
    /// Ports that could not have all their elements: retried every sync.
    blocked: HashSet<ServicePortId>,
    /// Endpoint address -> number of ports using it (the hairpin set holds those > 0).
    hairpin: HashMap<IpAddr, usize>,
    slots: SlotAllocator,
    rules: usize,
}

#[derive(Debug)]
struct AppliedPort {
    port: ServicePort,
    slot: Slot,
    objects: PortObjects,
}

/// What the kernel held at start: names of Ferry's chains and sets.
#[derive(Debug, Default)]
struct KernelState {
    chains: HashSet<String>,
    sets: HashSet<String>,
}

/// The nftables back end. See the module docs.
#[derive(Debug)]
pub struct NftablesBackend {
    nft: String,
    state: Option<Applied>,
    last_transaction: String,
    conntrack: bool,
}

impl Default for NftablesBackend {
    fn default() -> Self {
        NftablesBackend::new()
    }
}

impl NftablesBackend {
    /// A back end that runs `nft` from `PATH`. Nothing happens until the first sync.
    pub fn new() -> NftablesBackend {
        NftablesBackend {
            nft: "nft".into(),
            state: None,
            last_transaction: String::new(),
            conntrack: true,
        }
    }

    /// The same with another `nft` program.
    pub fn with_nft(program: impl Into<String>) -> NftablesBackend {
        NftablesBackend {
            nft: program.into(),
            ..NftablesBackend::new()
        }
    }

    /// Switches the clearing of stale UDP conntrack entries (on by default).
    pub fn set_conntrack_cleanup(&mut self, on: bool) {
        self.conntrack = on;
    }

    /// The text of the last transaction sent to nft ("" when the last sync had nothing to
    /// do): for logs and tests.
    pub fn last_transaction(&self) -> &str {
        &self.last_transaction
    }

    /// Runs nft with `args`, `input` on stdin; returns stdout.
    fn run_nft(&self, args: &[&str], input: Option<&str>) -> Result<String, BackendError> {
        let mut child = Command::new(&self.nft)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                BackendError(format!(
                    "cannot run `{}`: {e}; install nftables (Debian: apt-get install nftables) \
                     or put nft on PATH",
                    self.nft
                ))
            })?;
        let stdin = child.stdin.take();
        let output = std::thread::scope(|s| {
            if let (Some(mut stdin), Some(input)) = (stdin, input) {
                s.spawn(move || {
                    // nft reads all of its input before it answers; an error here shows up
                    // as nft's own error below.
                    let _ = stdin.write_all(input.as_bytes());
                });
            }
            child.wait_with_output()
        })
        .map_err(|e| BackendError(format!("waiting for `{} {}`: {e}", self.nft, args.join(" "))))?;
        if !output.status.success() {
            let mut err = String::from_utf8_lossy(&output.stderr).trim().to_string();
            if err.len() > 4000 {
                let mut cut = 4000;
                while !err.is_char_boundary(cut) {
                    cut -= 1;
                }
                err.truncate(cut);
                err.push_str(" …");
            }
            return Err(BackendError(format!(
                "`{} {}` failed ({}): {err}",
                self.nft,
                args.join(" "),
                output.status
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Names of the chains and sets of Ferry's table in the kernel.
    fn read_kernel(&self) -> Result<KernelState, BackendError> {
        let mut state = KernelState::default();
        for (what, key) in [("chains", "chain"), ("sets", "set")] {
            let out = self.run_nft(&["-j", "list", what, "inet"], None)?;
            let json: serde_json::Value = serde_json::from_str(&out)
                .map_err(|e| BackendError(format!("`nft -j list {what} inet` gave bad JSON: {e}")))?;
            let items = json["nftables"].as_array().cloned().unwrap_or_default();
            for item in items {
                let obj = &item[key];
                if obj["table"] == TABLE && obj["family"] == "inet" {
                    if let Some(name) = obj["name"].as_str() {
                        let set = if key == "chain" {
                            &mut state.chains
                        } else {
                            &mut state.sets
                        };
                        set.insert(name.to_string());
                    }
                }
            }
        }
        Ok(state)
    }

    /// Writes the base layout: table, base and helper chains (flushed and refilled), maps
    /// and sets (the cluster-cidrs and nodeport-ips sets flushed and refilled; the maps
    /// and hairpin sets flushed too when `flush_maps`).
    fn write_base(tx: &mut Tx, settings: &NodeSettings, flush_maps: bool) {
        let h = &mut tx.head;
        let _ = writeln!(h, "add table {T}");
        for (name, kind, hook, prio) in BASE_CHAINS {
            let _ = writeln!(
                h,
                "add chain {T} {name} {{ type {kind} hook {hook} priority {prio}; policy accept; }}"
            );
        }
        for name in HELPER_CHAINS {
            let _ = writeln!(h, "add chain {T} {name}");
        }
        for f in FAMILIES {
            for (name, ty) in base_maps(f) {
                let _ = writeln!(h, "add map {T} {name} {{ type {ty}; }}");
                if flush_maps {
                    let _ = writeln!(h, "flush map {T} {name}");
                }
            }
            for (name, body) in base_sets(f) {
                let _ = writeln!(h, "add set {T} {name} {{ {body} }}");
                if flush_maps || !name.starts_with("hairpin-") {
                    let _ = writeln!(h, "flush set {T} {name}");
                }
            }
            for proto in PROTOCOLS {
                for shard in 0..ENDPOINT_MAPS {
                    let name = endpoint_map(f, proto, shard);
                    let _ = writeln!(
                        h,
                        "add map {T} {name} {{ typeof numgen random mod 1 : {} daddr . {} dport; }}",
                        ipx(f),
                        proto.as_str()
                    );
                    if flush_maps {
                        let _ = writeln!(h, "flush map {T} {name}");
                    }
                }
            }
        }
        let (chains, elements) = render_base(settings);
        for (name, rules) in &chains {
            tx.fill_chain(name, rules, true);
        }
        for e in &elements {
            tx.add_element(e);
        }
        tx.commands += 1;
    }

    fn sync_inner(&mut self, table: &ServiceTable) -> Result<SyncStats, BackendError> {
        let start = Instant::now();
        let ctx = RenderCtx::of(&table.settings);
        let mut tx = Tx::default();
        let first = self.state.is_none();
        let kernel = if first { Some(self.read_kernel()?) } else { None };
        let mut state = self.state.take().unwrap_or_default();

        if first {
            Self::write_base(&mut tx, &table.settings, true);
            // Every chain and affinity set already there is emptied now and either refilled
            // below or deleted at the end.
            if let Some(k) = &kernel {
                for c in &k.chains {
                    if is_port_chain(c) || FORMER_HELPER_CHAINS.contains(&c.as_str()) {
                        tx.fill_chain(c, &[], true);
                    }
                }
            }
            state.settings = table.settings.clone();
        }
        let settings_changed = !first && state.settings != table.settings;
        let ctx_changed = settings_changed && RenderCtx::of(&state.settings) != ctx;
        if settings_changed {
            Self::write_base(&mut tx, &table.settings, false);
            state.settings = table.settings.clone();
        }

        // Which ports to look at.
        let mut changed: Vec<&ServicePort> = Vec::new();
        for (id, port) in &table.ports {
            match state.ports.get(id) {
                Some(old) if old.port == *port && !ctx_changed && !state.blocked.contains(id) => {}
                _ => changed.push(port),
            }
        }
        let removed: Vec<ServicePortId> = state
            .ports
            .keys()
            .filter(|id| !table.ports.contains_key(*id))
            .cloned()
            .collect();
        let changed_ports = changed.len() + removed.len();

        // Render the changed ports; release the keys of everything that changes first, so a
        // key moving from one port to another in this sync is not taken for a conflict.
        let mut rendered: Vec<(&ServicePort, Slot, PortObjects)> = Vec::with_capacity(changed.len());
        for p in &changed {
            let old = state.ports.get(&p.id).map(|a| a.slot);
            let slot = state.slots.fit(&p.id, slots_needed(p), old)?;
            rendered.push((*p, slot, render_port(p, ctx, slot)));
        }
        for id in &removed {
            if let Some(old) = state.ports.get(id) {
                state.slots.give_back(id, old.slot);
            }
        }
        let mut stale_udp: Vec<conntrack::UdpFlowFilter> = Vec::new();
        let mut olds: HashMap<ServicePortId, AppliedPort> = HashMap::new();
        for id in changed.iter().map(|p| &p.id).chain(&removed) {
            if let Some(old) = state.ports.remove(id) {
                for e in &old.objects.elements {
                    state.owners.remove(&(e.map.clone(), e.key.clone()));
                }
                olds.insert(id.clone(), old);
            }
        }
        for (port, _, objects) in &mut rendered {
            state.blocked.remove(&port.id);
            let mut kept = BTreeSet::new();
            for e in std::mem::take(&mut objects.elements) {
                let key = (e.map.clone(), e.key.clone());
                match state.owners.get(&key) {
                    Some(owner) if *owner != port.id => {
                        tracing::warn!(
                            "{}: {} {} is already used by {owner}; skipped until that is resolved",
                            port.id,
                            e.map,
                            e.key
                        );
                        state.blocked.insert(port.id.clone());
                    }
                    _ => {
                        state.owners.insert(key, port.id.clone());
                        kept.insert(e);
                    }
                }
            }
            objects.elements = kept;
        }

        let empty = PortObjects::default();
        let mut hairpin_add: BTreeSet<IpAddr> = BTreeSet::new();
        let mut hairpin_del: BTreeSet<IpAddr> = BTreeSet::new();
        let mut diff = |tx: &mut Tx, old: &PortObjects, new: &PortObjects, state: &mut Applied| {
            for (name, body) in &new.sets {
                if !old.sets.contains_key(name) {
                    let _ = writeln!(tx.add_sets, "add set {T} {name} {{ {body} }}");
                    tx.commands += 1;
                }
            }
            for (name, rules) in &new.chains {
                match old.chains.get(name) {
                    None => {
                        let existed = kernel.as_ref().is_some_and(|k| k.chains.contains(name));
                        if existed {
                            // Flushed already, in the same section that refills it.
                            tx.fill_chain(name, rules, false);
                        } else {
                            let _ = writeln!(tx.add_chains, "add chain {T} {name}");
                            tx.commands += 1;
                            tx.fill_new_chain(name, rules);
                        }
                    }
                    Some(old_rules) if old_rules != rules => tx.fill_chain(name, rules, true),
                    Some(_) => {}
                }
            }
            for e in &old.elements {
                if !new.elements.contains(e) {
                    tx.del_element(e);
                }
            }
            for e in &new.elements {
                if !old.elements.contains(e) {
                    tx.add_element(e);
                }
            }
            for name in old.chains.keys() {
                if !new.chains.contains_key(name) {
                    tx.del_chains.push(name.clone());
                    tx.commands += 1;
                }
            }
            for name in old.sets.keys() {
                if !new.sets.contains_key(name) {
                    let _ = writeln!(tx.del_sets, "delete set {T} {name}");
                    tx.commands += 1;
                }
            }
            for ip in old.endpoint_ips.difference(&new.endpoint_ips) {
                let n = state.hairpin.entry(*ip).or_default();
                *n = n.saturating_sub(1);
                if *n == 0 {
                    state.hairpin.remove(ip);
                    if !hairpin_add.remove(ip) {
                        hairpin_del.insert(*ip);
                    }
                }
            }
            for ip in new.endpoint_ips.difference(&old.endpoint_ips) {
                let n = state.hairpin.entry(*ip).or_default();
                *n += 1;
                if *n == 1 && !hairpin_del.remove(ip) {
                    hairpin_add.insert(*ip);
                }
            }
            state.rules = state.rules + new.rules() - old.rules();
        };

        for (port, _, objects) in &rendered {
            let old = olds.get(&port.id);
            diff(&mut tx, old.map_or(&empty, |o| &o.objects), objects, &mut state);
            if let Some(old) = old {
                if port.id.protocol == Protocol::Udp {
                    stale_udp.extend(stale_udp_flows(&old.port, Some(port)));
                }
            }
        }
        for id in &removed {
            if let Some(old) = olds.get(id) {
                diff(&mut tx, &old.objects, &empty, &mut state);
                if id.protocol == Protocol::Udp {
                    stale_udp.extend(stale_udp_flows(&old.port, None));
                }
            }
        }
        for ip in &hairpin_add {
            tx.add_element(&hairpin_element(*ip));
        }
        for ip in &hairpin_del {
            tx.del_element(&hairpin_element(*ip));
        }
        if let Some(k) = &kernel {
            // Converging at start: what the kernel has and the plan does not want goes.
            let wanted_chains: HashSet<&String> =
                rendered.iter().flat_map(|(_, _, o)| o.chains.keys()).collect();
            let wanted_sets: HashSet<&String> = rendered.iter().flat_map(|(_, _, o)| o.sets.keys()).collect();
            for c in &k.chains {
                let former = FORMER_HELPER_CHAINS.contains(&c.as_str());
                if former || (is_port_chain(c) && !wanted_chains.contains(c)) {
                    tx.del_chains.push(c.clone());
                }
            }
            for s in &k.sets {
                if is_affinity_set(s) && !wanted_sets.contains(s) {
                    let _ = writeln!(tx.del_sets, "delete set {T} {s}");
                }
            }
            state.rules += base_rules(&table.settings);
        }
        for (port, slot, objects) in rendered {
            state.ports.insert(
                port.id.clone(),
                AppliedPort {
                    port: port.clone(),
                    slot,
                    objects,
                },
            );
        }

        if tx.is_empty() {
            self.last_transaction.clear();
            self.state = Some(state);
            return Ok(SyncStats {
                changed_ports,
                rules: self.rules(),
                apply_time: start.elapsed(),
            });
        }
        let text = tx.text();
        let result = self.run_nft(&["-f", "-"], Some(&text));
        self.last_transaction = text;
        match result {
            Ok(_) => {
                self.state = Some(state);
            }
            Err(e) => {
                // Nothing was applied (a transaction is all or nothing); start over from
                // what the kernel holds next time.
                self.state = None;
                return Err(e);
            }
        }
        if self.conntrack && !stale_udp.is_empty() {
            if let Err(e) = conntrack::delete_udp_flows(&stale_udp) {
                tracing::warn!("clearing conntrack entries of removed UDP endpoints: {e}");
            }
        }
        Ok(SyncStats {
            changed_ports,
            rules: self.rules(),
            apply_time: start.elapsed(),
        })
    }

    fn rules(&self) -> usize {
        self.state.as_ref().map_or(0, |s| s.rules)
    }
}

fn hairpin_element(ip: IpAddr) -> Element {
    Element {
        map: format!("hairpin-{}", fam(Family::of(ip))),
        key: format!("{ip} . {ip}"),
        value: String::new(),
    }
}

/// The UDP flows toward endpoints that `old` had and `new` (None: the port is gone) has
/// not: the Service addresses and ports they were sent to, and the endpoint.
fn stale_udp_flows(old: &ServicePort, new: Option<&ServicePort>) -> Vec<conntrack::UdpFlowFilter> {
    let keep: HashSet<(IpAddr, u16)> = new
        .map(|n| {
            n.cluster_endpoints
                .iter()
                .chain(&n.external_endpoints)
                .map(|e| (e.ip, e.port))
                .collect()
        })
        .unwrap_or_default();
    let gone: BTreeSet<(IpAddr, u16)> = old
        .cluster_endpoints
        .iter()
        .chain(&old.external_endpoints)
        .map(|e| (e.ip, e.port))
        .filter(|e| !keep.contains(e))
        .collect();
    if gone.is_empty() {
        return Vec::new();
    }
    let service_ips: Vec<IpAddr> = old
        .cluster_ip
        .iter()
        .chain(&old.external_ips)
        .chain(&old.load_balancer_ips)
        .copied()
        .collect();
    gone.into_iter()
        .map(|(ip, port)| conntrack::UdpFlowFilter {
            service_ips: service_ips.clone(),
            service_port: old.port,
            node_port: old.node_port,
            endpoint: SocketAddr::new(ip, port),
        })
        .collect()
}

impl Backend for NftablesBackend {
    fn sync(&mut self, table: &ServiceTable) -> Result<SyncStats, BackendError> {
        self.sync_inner(table)
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        self.state = None;
        match self.run_nft(&["delete", "table", "inet", TABLE], None) {
            Ok(_) => Ok(()),
            Err(e) if e.0.contains("No such file or directory") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A synthetic plan for timing: `services` ClusterIP Services (TCP, port 80) with
/// `endpoints` endpoints each (port 8080), ClusterIPs from 172.16.0.0/12 and endpoints from
/// 10.0.0.0/8, cluster CIDR 10.0.0.0/8. `offset` shifts the Service numbers, so a table of
/// n Services plus `synthetic_table(1, m, n)` adds one new Service.
pub fn synthetic_table(services: usize, endpoints: usize, offset: usize) -> ServiceTable {
    let mut table = ServiceTable {
        settings: NodeSettings {
            node_name: "bench".into(),
            cluster_cidrs: vec!["10.0.0.0/8".parse().expect("valid CIDR")],
            nodeport_addresses: Vec::new(),
        },
        ports: BTreeMap::new(),
    };
    for i in offset..offset + services {
        let id = ServicePortId {
            namespace: format!("ns{}", i % 50),
            name: format!("svc-{i}"),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
            family: Family::V4,
        };
        let n = i as u32;
        let cluster_ip = IpAddr::from([172, 16 + ((n >> 16) & 15) as u8, (n >> 8) as u8, n as u8]);
        let eps: Vec<Endpoint> = (0..endpoints)
            .map(|j| Endpoint {
                ip: IpAddr::from([10, (n >> 8) as u8 ^ ((j as u32 >> 8) as u8), n as u8, j as u8 + 1]),
                port: 8080,
                is_local: j == 0,
                ready: true,
            })
            .collect();
        let mut eps = eps;
        eps.sort();
        table.ports.insert(
            id.clone(),
            ServicePort {
                cluster_endpoints: eps.clone(),
                external_endpoints: eps,
                ..ServicePort::new(id, Some(cluster_ip), 80)
            },
        );
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders with the port's endpoints at keys 100.. of its endpoint map.
    fn render(p: &ServicePort, ctx: RenderCtx) -> PortObjects {
        let slot = Slot {
            shard: endpoint_shard(&p.id),
            offset: 100,
            capacity: 16,
        };
        render_port(p, ctx, slot)
    }

    fn ep(ip: &str, port: u16) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port,
            is_local: true,
            ready: true,
        }
    }

    fn port(name: &str, family: Family) -> ServicePort {
        let id = ServicePortId {
            namespace: "default".into(),
            name: name.into(),
            port_name: "".into(),
            protocol: Protocol::Tcp,
            family,
        };
        let cluster_ip = if family == Family::V4 {
            "10.96.0.10"
        } else {
            "fd00::10"
        };
        ServicePort::new(id, Some(cluster_ip.parse().unwrap()), 80)
    }

    const CTX: RenderCtx = RenderCtx {
        cidrs_v4: true,
        cidrs_v6: false,
    };

    #[test]
    fn names_are_stable_safe_and_distinct() {
        let a = port("web", Family::V4);
        let b = port("web", Family::V6);
        let na = port_base_name(&a.id);
        assert_eq!(na, port_base_name(&a.id));
        assert_ne!(na, port_base_name(&b.id));
        assert!(na.ends_with("-default/web/tcp//v4"), "{na}");
        assert_eq!(na.len(), 8 + 1 + "default/web/tcp//v4".len());
        let long = ServicePortId {
            name: "x".repeat(300),
            ..a.id.clone()
        };
        let name = format!("ext-endpoints-{}", port_base_name(&long));
        assert!(name.len() < 256, "{}", name.len());
        assert_eq!(sanitize("a b:c\"d;"), "a_b.c_d_");
        let set = affinity_set_name(&b.id, &ep("fd00::1", 80), 10);
        assert!(
            set.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_./-".contains(c)),
            "{set}"
        );
    }

    #[test]
    fn endpoint_slots_grow_by_powers_of_two_and_are_reused() {
        let id = port("web", Family::V4).id;
        let mut slots = SlotAllocator::default();
        let a = slots.fit(&id, 3, None).unwrap();
        assert_eq!((a.offset, a.capacity), (0, 4));
        // Still fits: kept.
        assert_eq!(slots.fit(&id, 4, Some(a)).unwrap(), a);
        // Outgrown: a new range, the old one freed and handed to the next port of its size.
        let b = slots.fit(&id, 5, Some(a)).unwrap();
        assert_eq!((b.offset, b.capacity), (4, 8));
        let other = port("api", Family::V4).id;
        let c = slots.fit(&other, 2, None).unwrap();
        if endpoint_shard(&other) == endpoint_shard(&id) {
            assert_eq!((c.offset, c.capacity), (0, 4));
        }
        // No endpoints (or session affinity): no keys.
        let d = slots.fit(&id, 0, Some(b)).unwrap();
        assert_eq!(d.capacity, 0);
        assert_eq!(slots.fit(&id, 8, Some(d)).unwrap().offset, 4);
    }

    #[test]
    fn cluster_ip_with_endpoints_gets_a_random_choice() {
        let mut p = port("web", Family::V4);
        p.cluster_endpoints = vec![ep("10.1.0.2", 8080), ep("10.1.0.3", 8080), ep("10.1.0.4", 8080)];
        p.external_endpoints = p.cluster_endpoints.clone();
        let o = render(&p, CTX);
        let service = format!("service-{}", port_base_name(&p.id));
        assert_eq!(o.chains.len(), 1);
        let emap = endpoint_map(Family::V4, Protocol::Tcp, endpoint_shard(&p.id));
        assert_eq!(
            o.chains[&service],
            vec![
                "ip saddr != @cluster-cidrs-v4 meta mark set meta mark or 0x4000".to_string(),
                format!("meta l4proto tcp dnat ip to numgen random mod 3 offset 100 map @{emap}"),
            ]
        );
        let elements: Vec<(&str, &str, &str)> = o
            .elements
            .iter()
            .map(|e| (e.map.as_str(), e.key.as_str(), e.value.as_str()))
            .collect();
        let goto = format!("goto {service}");
        assert_eq!(
            elements,
            vec![
                (emap.as_str(), "100", "10.1.0.2 . 8080"),
                (emap.as_str(), "101", "10.1.0.3 . 8080"),
                (emap.as_str(), "102", "10.1.0.4 . 8080"),
                ("service-ips-v4", "10.96.0.10 . tcp . 80", goto.as_str()),
            ]
        );
        // No cluster CIDR for the family: no masquerade rule.
        let o = render(
            &p,
            RenderCtx {
                cidrs_v4: false,
                cidrs_v6: false,
            },
        );
        assert_eq!(o.chains[&service].len(), 1);
    }

    #[test]
    fn no_endpoints_reject_and_local_without_local_endpoints_drops() {
        let mut p = port("web", Family::V4);
        p.node_port = Some(30080);
        p.load_balancer_ips = vec!["192.0.2.10".parse().unwrap()];
        let o = render(&p, CTX);
        assert!(o.chains.is_empty());
        let got: Vec<(&str, &str, &str)> = o
            .elements
            .iter()
            .map(|e| (e.map.as_str(), e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("no-endpoint-nodeports-v4", "tcp . 30080", "goto reject-chain"),
                (
                    "no-endpoint-services-v4",
                    "10.96.0.10 . tcp . 80",
                    "goto reject-chain"
                ),
                (
                    "no-endpoint-services-v4",
                    "192.0.2.10 . tcp . 80",
                    "goto reject-chain"
                ),
            ]
        );
        // externalTrafficPolicy Local, endpoints only elsewhere.
        p.external_local = true;
        p.cluster_endpoints = vec![ep("10.1.0.2", 8080)];
        let o = render(&p, CTX);
        let base = port_base_name(&p.id);
        let external = &o.chains[&format!("external-{base}")];
        assert_eq!(
            external,
            &vec![
                format!("ip saddr @cluster-cidrs-v4 goto service-{base}"),
                "fib saddr type local meta mark set meta mark or 0x4000".into(),
                format!("fib saddr type local goto service-{base}"),
            ]
        );
        assert!(o.elements.contains(&Element {
            map: "no-endpoint-nodeports-v4".into(),
            key: "tcp . 30080".into(),
            value: "drop".into()
        }));
        assert!(o.elements.contains(&Element {
            map: "service-nodeports-v4".into(),
            key: "tcp . 30080".into(),
            value: format!("goto external-{base}")
        }));
    }

    #[test]
    fn local_external_endpoints_get_their_own_chain_and_v6_syntax() {
        let mut p = port("web", Family::V6);
        p.node_port = Some(30080);
        p.external_local = true;
        p.affinity_seconds = Some(60);
        p.cluster_endpoints = vec![ep("fd00:1::2", 80), ep("fd00:1::3", 80)];
        p.external_endpoints = vec![ep("fd00:1::2", 80)];
        let o = render(&p, CTX);
        let base = port_base_name(&p.id);
        let ext = &o.chains[&format!("ext-endpoints-{base}")];
        let set = affinity_set_name(&p.id, &p.external_endpoints[0], 60);
        assert_eq!(
            ext,
            &vec![
                format!(
                    "ip6 saddr @{set} update @{set} {{ ip6 saddr }} meta l4proto tcp dnat ip6 to [fd00:1::2]:80"
                ),
                format!("update @{set} {{ ip6 saddr }} meta l4proto tcp dnat ip6 to [fd00:1::2]:80"),
            ]
        );
        assert_eq!(o.sets.len(), 2);
        assert!(o.sets[&set].contains("timeout 60s"));
        // v6 has no cluster CIDR in CTX: no short-circuit by source, only the node's own.
        assert_eq!(
            o.chains[&format!("external-{base}")],
            vec![
                "fib saddr type local meta mark set meta mark or 0x4000".to_string(),
                format!("fib saddr type local goto service-{base}"),
                format!("goto ext-endpoints-{base}"),
            ]
        );
    }

    #[test]
    fn source_ranges_make_a_firewall_chain() {
        let mut p = port("lb", Family::V4);
        p.load_balancer_ips = vec!["192.0.2.10".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        p.source_ranges = vec![
            "198.51.100.7/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        p.cluster_endpoints = vec![ep("10.1.0.2", 8080)];
        p.external_endpoints = p.cluster_endpoints.clone();
        let o = render(&p, CTX);
        let base = port_base_name(&p.id);
        assert_eq!(
            o.chains[&format!("firewall-{base}")],
            vec!["ip saddr 198.51.100.0/24 return".to_string(), "drop".into()]
        );
        assert!(o.elements.contains(&Element {
            map: "firewall-ips-v4".into(),
            key: "192.0.2.10 . tcp . 80".into(),
            value: format!("goto firewall-{base}")
        }));
        assert_eq!(
            o.elements.iter().filter(|e| e.key.contains("2001:db8")).count(),
            0
        );
    }

    #[test]
    fn stale_udp_flows_name_only_removed_endpoints() {
        let mut old = port("dns", Family::V4);
        old.id.protocol = Protocol::Udp;
        old.node_port = Some(30053);
        old.cluster_endpoints = vec![ep("10.1.0.2", 53), ep("10.1.0.3", 53)];
        old.external_endpoints = old.cluster_endpoints.clone();
        let mut new = old.clone();
        new.cluster_endpoints.remove(0);
        new.external_endpoints.remove(0);
        let flows = stale_udp_flows(&old, Some(&new));
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].endpoint, "10.1.0.2:53".parse().unwrap());
        assert_eq!(
            flows[0].service_ips,
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(flows[0].node_port, Some(30053));
        assert!(stale_udp_flows(&old, Some(&old)).is_empty());
        assert_eq!(stale_udp_flows(&old, None).len(), 2);
    }

    /// An `nft` stand-in that swallows its input and lists an empty ruleset.
    fn fake_nft(dir: &std::path::Path) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("nft");
        std::fs::write(&path, "#!/bin/sh\ncat >/dev/null\necho '{\"nftables\": []}'\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    #[test]
    fn a_contested_external_ip_goes_to_one_port_then_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend = NftablesBackend::with_nft(fake_nft(dir.path()));
        backend.set_conntrack_cleanup(false);
        let mut a = port("a", Family::V4);
        a.cluster_endpoints = vec![ep("10.1.0.2", 80)];
        a.external_endpoints = a.cluster_endpoints.clone();
        a.external_ips = vec!["192.0.2.1".parse().unwrap()];
        let mut b = a.clone();
        b.id.name = "b".into();
        b.cluster_ip = Some("10.96.0.11".parse().unwrap());
        let key = "192.0.2.1 . tcp . 80 : goto external-";
        let mut t = ServiceTable::default();
        t.ports.insert(a.id.clone(), a.clone());
        t.ports.insert(b.id.clone(), b.clone());
        backend.sync(&t).unwrap();
        let tx = backend.last_transaction().to_string();
        assert_eq!(tx.matches(key).count(), 1, "{tx}");
        assert!(tx.contains(&format!("{key}{}", port_base_name(&a.id))), "{tx}");
        // Unchanged, but b is still waiting for the address: it is retried, and gets
        // nothing new while a holds it.
        backend.sync(&t).unwrap();
        assert!(
            !backend.last_transaction().contains(key),
            "{}",
            backend.last_transaction()
        );
        // a goes away: b gets the address in the same transaction that removes a's.
        t.ports.remove(&a.id);
        let stats = backend.sync(&t).unwrap();
        let tx = backend.last_transaction().to_string();
        assert!(tx.contains(&format!("{key}{}", port_base_name(&b.id))), "{tx}");
        assert!(
            tx.contains("delete element inet ferry-proxy service-ips-v4"),
            "{tx}"
        );
        assert_eq!(stats.changed_ports, 2);
        backend.sync(&t).unwrap();
        assert_eq!(backend.last_transaction(), "");
    }

    #[test]
    fn settings_changes_rewrite_the_base_and_only_affected_chains() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend = NftablesBackend::with_nft(fake_nft(dir.path()));
        let mut a = port("a", Family::V4);
        a.cluster_endpoints = vec![ep("10.1.0.2", 80)];
        a.external_endpoints = a.cluster_endpoints.clone();
        let mut t = ServiceTable::default();
        t.settings.cluster_cidrs = vec!["10.1.0.0/16".parse().unwrap()];
        t.ports.insert(a.id.clone(), a.clone());
        let first = backend.sync(&t).unwrap();
        let tx = backend.last_transaction().to_string();
        assert!(
            tx.contains("add element inet ferry-proxy cluster-cidrs-v4 { 10.1.0.0/16 }"),
            "{tx}"
        );
        assert!(tx.contains("flush map inet ferry-proxy service-ips-v4"), "{tx}");
        // Another v4 CIDR and NodePort addresses: base only.
        t.settings.cluster_cidrs.push("10.2.0.0/16".parse().unwrap());
        t.settings.nodeport_addresses = vec!["192.168.1.0/24".parse().unwrap()];
        let stats = backend.sync(&t).unwrap();
        let tx = backend.last_transaction().to_string();
        assert!(
            tx.contains("ip daddr @nodeport-ips-v4 fib daddr type local"),
            "{tx}"
        );
        assert!(
            !tx.contains("service-") || !tx.contains(&port_base_name(&a.id)),
            "{tx}"
        );
        assert!(!tx.contains("flush map"), "maps keep their elements: {tx}");
        assert_eq!(stats.rules, first.rules);
        // No v4 cluster CIDR any more: the masquerade rule of every v4 chain goes.
        t.settings.cluster_cidrs = vec!["fd00::/48".parse().unwrap()];
        let stats = backend.sync(&t).unwrap();
        let tx = backend.last_transaction().to_string();
        assert!(
            tx.contains(&format!(
                "flush chain inet ferry-proxy service-{}",
                port_base_name(&a.id)
            )),
            "{tx}"
        );
        assert_eq!(stats.rules, first.rules - 1);
    }

    #[test]
    fn synthetic_tables_are_distinct() {
        let t = synthetic_table(300, 10, 0);
        assert_eq!(t.ports.len(), 300);
        let ips: HashSet<_> = t.ports.values().map(|p| p.cluster_ip).collect();
        assert_eq!(ips.len(), 300);
        let one = synthetic_table(1, 10, 300);
        assert!(!t.ports.contains_key(one.ports.keys().next().unwrap()));
    }
}
