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
//! - `all-endpoints-…`: with both traffic policies Local, the choice over every endpoint
//!   (`short_circuit_endpoints`) that traffic from Pods and from the node to an external
//!   address goes to, as kube-proxy's "short-circuit" does (the service chain then holds
//!   local endpoints only).
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
//! - The `nft` program itself: at 10k Services, parsing the text cost 1.35 s of a 2.2 s
//!   full sync, and each change paid nft's start and its cache fetch. So the back end
//!   speaks netlink ([`crate::nft`]): the transaction is built as data ([`rules`]: each
//!   rule, element and set knows its nft text and its kernel expressions) and sent as one
//!   nfnetlink batch. The text is still kept (`last_transaction`) for logs and tests; it is
//!   valid `nft -f` input, and a test applies it through nft beside the netlink batch and
//!   compares the two tables. Every name is built from `[A-Za-z0-9_./-]` and starts with a
//!   letter (see [`sanitize`]), so the text needs no quoting.
//! - Reading the table back at a restart: chain and set names only (two netlink dumps).
//!
//! The back end itself (the ignored test `timings` in `proxy/tests/nftables.rs`, release
//! build, same machine, one run each), plan diff + render + commit; "one added Service" and
//! "one endpoint changed" with the table's change log, as the sync loop runs them:
//!
//! | Services x endpoints | full sync | one added Service | one endpoint changed | no change (log / no log) | restart (first sync over an existing table) |
//! |---------------------:|----------:|------------------:|---------------------:|----------:|---------:|
//! | 1,000 x 10           | 0.07 s    | 1.0 ms            | 0.13 ms              | 0.04 / 0.5 ms | 0.07 s |
//! | 10,000 x 10          | 1.05 s    | 10 ms             | 0.8 ms               | 0.1 / 11 ms   | 1.03 s |
//!
//! Before, through `nft -f` with the same layout: 2.4 s, 49 ms, 44 ms, 9 ms, 5.4 s at 10k;
//! with a chain of 11 rules per Service: 3.4-3.6 s, 74-95 ms, 80-117 ms. What remains of an
//! added Service is the kernel's validation walk (a goto element and a chain with a nat
//! rule ask for one); an endpoint change (elements of a data map) needs none.
//!
//! # Sync
//!
//! The back end keeps, per Service port, the plan it applied and what it rendered from it
//! (chains with their rule lines, affinity sets, map elements). A sync walks the new
//! table: an unchanged [`ServicePort`] is skipped without rendering; a changed one is
//! rendered and compared chain by chain and element by element. The difference goes to
//! the kernel as ONE transaction, in this order: new sets, new chains (empty, so references
//! resolve), deleted elements, flushed-and-refilled chains, added elements, deleted chains
//! (the chains that jump first), deleted sets, hairpin pairs. A port that vanished loses its
//! elements before its chains. Nothing to change sends nothing.
//!
//! # Restart
//!
//! The first sync of a back end (a new process, or after a failed transaction) does not
//! trust what an earlier run left: if the table exists, the transaction deletes it and
//! builds the whole table again, in ONE transaction. It is atomic, so no packet sees a
//! half-written table (until the commit packets meet the old table, after it the new), and
//! conntrack is never touched: established connections keep their NAT whatever the rules
//! become. Deleting and rebuilding costs the kernel less than flushing every map and chain
//! in place (measured at 10k Services: 1.3 s against 3.5 s; with the old elements still in
//! the maps until the commit, every element added walks every rule bound to its map and
//! every rule bound walks every element). What is lost is the memory of session affinity
//! (the dynamic sets): a client may land on another endpoint once after a restart.
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
//! The netlink socket is opened by the thread that calls `sync`, so the back end programs
//! that thread's network namespace. The `nft` program is not needed at run time (it is
//! still the best way to look at the table: `nft list table inet ferry-proxy`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use ipnetwork::IpNetwork;
use sha2::{Digest, Sha256};

use super::{Backend, BackendError, SyncStats};
use crate::changes::{stale_udp_flows, Changes, ServiceChanges};
use crate::conntrack;
use crate::nft;
use rules::{fam, Element, Key, Rule, SetDecl, SetKind, Value};

mod rules;
use crate::plan::{Endpoint, Family, NodeSettings, Plan, Protocol, ServicePort, ServicePortId, ServiceTable};

/// The table Ferry owns, in family `inet`.
pub const TABLE: &str = "ferry-proxy";
/// `inet ferry-proxy`, as nft commands name the table.
const T: &str = "inet ferry-proxy";
pub use rules::MASQ_MARK;
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
/// Endpoint maps per family and protocol (see "Endpoint maps" in the module docs).
pub const ENDPOINT_MAPS: u32 = 32;
/// Prefixes of per-port chains, in the order they are deleted (a chain that jumps to
/// another comes before it).
const PORT_CHAIN_PREFIXES: [&str; 5] = [
    "external-",
    "firewall-",
    "ext-endpoints-",
    "all-endpoints-",
    "service-",
];
const AFFINITY_PREFIX: &str = "affinity-";

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];
const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// The sets and maps of the base layout of one family (the endpoint maps included).
fn base_sets(f: Family) -> Vec<SetDecl> {
    let fs = fam(f);
    let decl = |name: String, kind: SetKind| SetDecl { name, kind };
    let mut sets = vec![
        decl(format!("service-ips-{fs}"), SetKind::ServiceMap(f)),
        decl(format!("service-nodeports-{fs}"), SetKind::NodePortMap),
        decl(format!("no-endpoint-services-{fs}"), SetKind::ServiceMap(f)),
        decl(format!("no-endpoint-nodeports-{fs}"), SetKind::NodePortMap),
        decl(format!("firewall-ips-{fs}"), SetKind::ServiceMap(f)),
        decl(format!("cluster-cidrs-{fs}"), SetKind::Cidrs(f)),
        decl(format!("nodeport-ips-{fs}"), SetKind::Cidrs(f)),
        decl(format!("hairpin-{fs}"), SetKind::Hairpin(f)),
    ];
    for proto in PROTOCOLS {
        for shard in 0..ENDPOINT_MAPS {
            sets.push(decl(endpoint_map(f, proto, shard), SetKind::Endpoints(f, proto)));
        }
    }
    sets
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

/// Everything one Service port puts in the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PortObjects {
    /// Chain name -> its rules, in order.
    chains: BTreeMap<String, Vec<Rule>>,
    /// Affinity sets by name.
    sets: BTreeMap<String, SetDecl>,
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
        (p.cluster_endpoints.len() + p.external_endpoints.len() + p.short_circuit_endpoints.len()) as u32
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
        *next = offset
            .checked_add(capacity)
            .ok_or_else(|| BackendError::Exhausted {
                what: format!(
                    "the keys of endpoint map {} are used up; restart ferry-proxy to renumber",
                    endpoint_map(id.family, id.protocol, shard)
                ),
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
    let (fs, proto) = (fam(f), id.protocol);
    let base = port_base_name(id);
    let service = format!("service-{base}");
    let external = format!("external-{base}");
    let ext_endpoints = format!("ext-endpoints-{base}");
    let all_endpoints = format!("all-endpoints-{base}");
    let firewall = format!("firewall-{base}");
    let mut o = PortObjects::default();

    let has_cluster = !p.cluster_endpoints.is_empty();
    let has_external = !p.external_endpoints.is_empty();
    let has_short_circuit = !p.short_circuit_endpoints.is_empty();
    let has_endpoints = has_cluster || has_external || has_short_circuit;
    // kube-proxy: no endpoints anywhere is rejected; endpoints that a Local policy keeps
    // out of reach are dropped.
    let none_verdict = if has_endpoints {
        Value::Drop
    } else {
        Value::Goto("reject-chain".into())
    };
    let mut element = |map: String, key: Key, value: Value| {
        o.elements.insert(Element { map, key, value });
    };
    let service_key = |addr: IpAddr| Key::Service {
        addr,
        proto,
        port: p.port,
    };

    // Destinations.
    if let Some(cip) = p.cluster_ip {
        if has_cluster {
            element(
                format!("service-ips-{fs}"),
                service_key(cip),
                Value::Goto(service.clone()),
            );
        } else {
            element(
                format!("no-endpoint-services-{fs}"),
                service_key(cip),
                none_verdict.clone(),
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
                Value::Goto(external.clone()),
            );
        }
        if !has_external {
            element(
                format!("no-endpoint-services-{fs}"),
                service_key(*addr),
                none_verdict.clone(),
            );
        }
    }
    if let Some(np) = p.node_port {
        let key = Key::NodePort { proto, port: np };
        if has_endpoints {
            element(
                format!("service-nodeports-{fs}"),
                key.clone(),
                Value::Goto(external.clone()),
            );
        }
        if !has_external {
            element(format!("no-endpoint-nodeports-{fs}"), key, none_verdict.clone());
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
        let mut rules: Vec<Rule> = ranges.iter().map(|r| Rule::ReturnIfFrom(*r)).collect();
        rules.push(Rule::Drop);
        o.chains.insert(firewall.clone(), rules);
        for addr in &lb_ips {
            element(
                format!("firewall-ips-{fs}"),
                service_key(*addr),
                Value::Goto(firewall.clone()),
            );
        }
    }

    // Chains.
    let affinity = p.affinity_seconds.map(|t| t.max(1));
    let emap = endpoint_map(f, proto, slot.shard);
    // `first`: the index in the port's slot of the first of `eps`.
    let mut choice = |eps: &[Endpoint], first: u32| -> Vec<Rule> {
        let Some(timeout) = affinity else {
            let offset = slot.offset + first;
            for (i, ep) in eps.iter().enumerate() {
                o.elements.insert(Element {
                    map: emap.clone(),
                    key: Key::Index(offset + i as u32),
                    value: Value::Endpoint(ep.ip, ep.port),
                });
            }
            return vec![Rule::DnatChoice {
                family: f,
                proto,
                modulus: eps.len() as u32,
                offset,
                map: emap.clone(),
            }];
        };
        let mut rules = Vec::new();
        for ep in eps {
            let set = affinity_set_name(id, ep, timeout);
            o.sets.insert(
                set.clone(),
                SetDecl {
                    name: set.clone(),
                    kind: SetKind::Affinity(f, timeout),
                },
            );
            rules.push(Rule::DnatSticky {
                proto,
                set,
                to: SocketAddr::new(ep.ip, ep.port),
            });
        }
        let n = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            rules.push(Rule::DnatRecorded {
                proto,
                set: affinity_set_name(id, ep, timeout),
                modulus: (i + 1 < n).then_some((n - i) as u32),
                to: SocketAddr::new(ep.ip, ep.port),
            });
        }
        rules
    };
    if has_cluster {
        let mut rules = Vec::new();
        if ctx.has_cidrs(f) {
            rules.push(Rule::MarkUnlessFromCluster { family: f });
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
    // Traffic from Pods and from the node to an externalTrafficPolicy Local address
    // short-circuits to the Cluster-policy endpoints (kube-proxy's): the service chain's,
    // unless internalTrafficPolicy Local narrowed those; then a choice chain of its own.
    let short_circuit_target = if has_short_circuit {
        let rules = choice(
            &p.short_circuit_endpoints,
            (p.cluster_endpoints.len() + p.external_endpoints.len()) as u32,
        );
        o.chains.insert(all_endpoints.clone(), rules);
        Some(all_endpoints)
    } else if has_cluster {
        Some(service.clone())
    } else {
        None
    };
    if uses_external_chain {
        let mut rules = Vec::new();
        if !p.external_local {
            rules.push(Rule::Mark);
        } else if let Some(target) = short_circuit_target {
            if ctx.has_cidrs(f) {
                rules.push(Rule::GotoIfFromCluster {
                    family: f,
                    chain: target.clone(),
                });
            }
            rules.push(Rule::MarkIfFromNode);
            rules.push(Rule::GotoIfFromNode(target));
        }
        if has_external {
            rules.push(Rule::Goto(external_target));
        }
        o.chains.insert(external.clone(), rules);
    }
    o.endpoint_ips = p
        .cluster_endpoints
        .iter()
        .chain(&p.external_endpoints)
        .chain(&p.short_circuit_endpoints)
        .map(|e| e.ip)
        .collect();
    o
}

/// The base of the table for these settings: chains with their rules (regular and base),
/// and the elements of the cluster-cidrs and nodeport-ips sets.
fn render_base(settings: &NodeSettings) -> (Vec<(String, Vec<Rule>)>, Vec<Element>) {
    let restricted = !settings.nodeport_addresses.is_empty();
    let mut chains: Vec<(String, Vec<Rule>)> = Vec::new();
    let lookups = |maps: (&str, &str)| -> Vec<Rule> {
        let mut rules = Vec::new();
        for f in FAMILIES {
            rules.push(Rule::ServiceLookup {
                family: f,
                map: format!("{}-{}", maps.0, fam(f)),
            });
        }
        for f in FAMILIES {
            rules.push(Rule::NodePortLookup {
                family: f,
                map: format!("{}-{}", maps.1, fam(f)),
                restricted,
            });
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
            .map(|f| Rule::ServiceLookup {
                family: *f,
                map: format!("firewall-ips-{}", fam(*f)),
            })
            .collect(),
    ));
    chains.push(("reject-chain".into(), vec![Rule::RejectTcpReset, Rule::Reject]));
    let mut masq: Vec<Rule> = FAMILIES
        .iter()
        .map(|f| Rule::HairpinMasquerade { family: *f })
        .collect();
    masq.extend([Rule::ReturnUnlessMarked, Rule::ClearMark, Rule::Masquerade]);
    chains.push(("masquerading".into(), masq));
    let new_jump = |c: &str| Rule::NewConnectionJump(c.into());
    chains.push(("filter-prerouting".into(), vec![new_jump("firewall-check")]));
    chains.push(("filter-input".into(), vec![new_jump("endpoints-check")]));
    chains.push(("filter-forward".into(), vec![new_jump("endpoints-check")]));
    chains.push((
        "filter-output".into(),
        vec![new_jump("endpoints-check"), new_jump("firewall-check")],
    ));
    chains.push(("nat-prerouting".into(), vec![Rule::Jump("services".into())]));
    chains.push(("nat-output".into(), vec![Rule::Jump("services".into())]));
    chains.push(("nat-postrouting".into(), vec![Rule::Jump("masquerading".into())]));

    let mut elements = Vec::new();
    // An interval set refuses overlapping elements: a prefix inside another is left out.
    let nets = |list: &[IpNetwork], f: Family| -> BTreeSet<IpNetwork> {
        let all: BTreeSet<IpNetwork> = list
            .iter()
            .filter(|n| Family::of(n.ip()) == f)
            .map(|n| IpNetwork::new(n.network(), n.prefix()).unwrap_or(*n))
            .collect();
        all.iter()
            .filter(|n| {
                !all.iter()
                    .any(|m| m != *n && m.prefix() <= n.prefix() && m.contains(n.network()))
            })
            .copied()
            .collect()
    };
    for f in FAMILIES {
        for net in nets(&settings.cluster_cidrs, f) {
            elements.push(Element {
                map: format!("cluster-cidrs-{}", fam(f)),
                key: Key::Net(net),
                value: Value::None,
            });
        }
        for net in nets(&settings.nodeport_addresses, f) {
            elements.push(Element {
                map: format!("nodeport-ips-{}", fam(f)),
                key: Key::Net(net),
                value: Value::None,
            });
        }
    }
    (chains, elements)
}

/// Rules in the base layout (for the rule count).
fn base_rules(settings: &NodeSettings) -> usize {
    render_base(settings).0.iter().map(|(_, r)| r.len()).sum()
}

/// One step of a transaction.
#[derive(Debug)]
enum Op {
    /// Only at the first sync, when an earlier run left the table.
    DelTable,
    AddTable,
    /// A chain; base chains with their type, hook and priority.
    AddChain(String, Option<BaseChain>),
    AddSet(SetDecl),
    FlushSet(SetDecl),
    FlushChain(String),
    AddRule(String, Rule),
    DelElements(String, Vec<Element>),
    AddElements(String, Vec<Element>),
    DelChain(String),
    DelSet(String),
}

/// A base chain: type, hook, priority.
type BaseChain = (&'static str, &'static str, i32);

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |elems: &[Element], keys_only: bool| -> String {
            elems
                .iter()
                .map(|e| {
                    if keys_only {
                        e.key.to_string()
                    } else {
                        e.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Op::DelTable => write!(f, "delete table {T}"),
            Op::AddTable => write!(f, "add table {T}"),
            Op::AddChain(name, None) => write!(f, "add chain {T} {name}"),
            Op::AddChain(name, Some((kind, hook, prio))) => write!(
                f,
                "add chain {T} {name} {{ type {kind} hook {hook} priority {prio}; policy accept; }}"
            ),
            Op::AddSet(d) => write!(f, "add {} {T} {} {{ {} }}", d.noun(), d.name, d.body()),
            Op::FlushSet(d) => write!(f, "flush {} {T} {}", d.noun(), d.name),
            Op::FlushChain(name) => write!(f, "flush chain {T} {name}"),
            Op::AddRule(chain, rule) => write!(f, "add rule {T} {chain} {rule}"),
            Op::DelElements(map, e) => write!(f, "delete element {T} {map} {{ {} }}", list(e, true)),
            Op::AddElements(map, e) => write!(f, "add element {T} {map} {{ {} }}", list(e, false)),
            Op::DelChain(name) => write!(f, "delete chain {T} {name}"),
            Op::DelSet(name) => write!(f, "delete set {T} {name}"),
        }
    }
}

impl Op {
    /// Appends the netlink message(s) of this step.
    fn lower(&self, batch: &mut nft::Batch) {
        match self {
            Op::DelTable => batch.delete_table(),
            Op::AddTable => batch.add_table(),
            Op::AddChain(name, base) => {
                let base = base.map(|(kind, hook, priority)| nft::BaseChain {
                    kind: match kind {
                        "nat" => nft::ChainType::Nat,
                        _ => nft::ChainType::Filter,
                    },
                    hook: match hook {
                        "prerouting" => nft::Hook::Prerouting,
                        "input" => nft::Hook::Input,
                        "forward" => nft::Hook::Forward,
                        "output" => nft::Hook::Output,
                        _ => nft::Hook::Postrouting,
                    },
                    priority,
                });
                batch.add_chain(name, base.as_ref());
            }
            Op::AddSet(d) => batch.add_set(&d.spec()),
            Op::FlushSet(d) => batch.flush_set(&d.name),
            Op::FlushChain(name) => batch.flush_chain(name),
            Op::AddRule(chain, rule) => batch.add_rule(chain, &rule.exprs()),
            Op::DelElements(map, e) => {
                let e: Vec<nft::Element> = e.iter().map(Element::to_nft).collect();
                batch.delete_elements(map, &e);
            }
            Op::AddElements(map, e) => {
                let e: Vec<nft::Element> = e.iter().map(Element::to_nft).collect();
                batch.add_elements(map, &e);
            }
            Op::DelChain(name) => batch.delete_chain(name),
            Op::DelSet(name) => batch.delete_set(name),
        }
    }
}

/// A transaction being written, in sections that keep the order described in the module
/// docs.
#[derive(Default)]
struct Tx {
    head: Vec<Op>,
    add_sets: Vec<Op>,
    add_chains: Vec<Op>,
    new_rules: Vec<Op>,
    del_elements: BTreeMap<String, Vec<Element>>,
    fill: Vec<Op>,
    add_elements: BTreeMap<String, Vec<Element>>,
    del_chains: Vec<String>,
    del_sets: Vec<Op>,
    commands: usize,
}

impl Tx {
    fn is_empty(&self) -> bool {
        self.commands == 0
    }

    fn fill_chain(&mut self, name: &str, rules: &[Rule], flush: bool) {
        if flush {
            self.fill.push(Op::FlushChain(name.to_string()));
            self.commands += 1;
        }
        for r in rules {
            self.fill.push(Op::AddRule(name.to_string(), r.clone()));
            self.commands += 1;
        }
    }

    fn fill_new_chain(&mut self, name: &str, rules: &[Rule]) {
        for r in rules {
            self.new_rules.push(Op::AddRule(name.to_string(), r.clone()));
            self.commands += 1;
        }
    }

    fn add_element(&mut self, e: &Element) {
        self.add_elements
            .entry(e.map.clone())
            .or_default()
            .push(e.clone());
        self.commands += 1;
    }

    fn del_element(&mut self, e: &Element) {
        self.del_elements
            .entry(e.map.clone())
            .or_default()
            .push(e.clone());
        self.commands += 1;
    }

    /// The steps in the order they go to the kernel.
    fn into_ops(mut self) -> Vec<Op> {
        let mut ops = std::mem::take(&mut self.head);
        ops.append(&mut self.add_sets);
        ops.append(&mut self.add_chains);
        ops.append(&mut self.new_rules);
        ops.extend(self.del_elements.into_iter().map(|(m, e)| Op::DelElements(m, e)));
        ops.append(&mut self.fill);
        ops.extend(self.add_elements.into_iter().map(|(m, e)| Op::AddElements(m, e)));
        // Chains that jump to others go first.
        let rank = |name: &str| {
            PORT_CHAIN_PREFIXES
                .iter()
                .position(|p| name.starts_with(p))
                .unwrap_or(0)
        };
        self.del_chains.sort_by_key(|c| rank(c));
        ops.extend(self.del_chains.into_iter().map(Op::DelChain));
        ops.append(&mut self.del_sets);
        ops
    }
}

/// The transaction as nft commands, one per line (what `last_transaction` shows).
/// Transactions longer than this are summed up in `last_transaction` instead of written
/// out: the text of a full sync at 10k Services is 10 MB the process would keep for
/// nothing.
const MAX_LOGGED_OPS: usize = 5_000;

fn ops_text(ops: &[Op]) -> String {
    let mut out = String::new();
    if ops.len() > MAX_LOGGED_OPS {
        let rules = ops.iter().filter(|op| matches!(op, Op::AddRule(..))).count();
        let chains = ops.iter().filter(|op| matches!(op, Op::AddChain(..))).count();
        let elements: usize = ops
            .iter()
            .map(|op| match op {
                Op::AddElements(_, e) => e.len(),
                _ => 0,
            })
            .sum();
        let _ = writeln!(
            out,
            "# {} steps, not written out (more than {MAX_LOGGED_OPS}): {chains} chains added, {rules} rules, {elements} elements",
            ops.len()
        );
        return out;
    }
    for op in ops {
        let _ = writeln!(out, "{op}");
    }
    out
}

/// What the back end applied last, per Service port.
#[derive(Debug, Default)]
struct Applied {
    settings: NodeSettings,
    ports: HashMap<ServicePortId, AppliedPort>,
    /// Map keys and the port that holds each (two Services claiming one external IP and
    /// port must not fail the whole transaction).
    owners: HashMap<(String, Key), ServicePortId>,
    /// Ports that could not have all their elements: retried every sync.
    blocked: HashSet<ServicePortId>,
    /// Endpoint address -> number of ports using it (the hairpin set holds those > 0).
    hairpin: HashMap<IpAddr, usize>,
    slots: SlotAllocator,
    rules: usize,
}

/// What was applied for one port. Its objects are not kept (they are most of the back
/// end's memory): rendering the port again with the same context and slot gives them back.
#[derive(Debug)]
struct AppliedPort {
    port: ServicePort,
    slot: Slot,
    /// Elements left out because another port held their key.
    skipped: Vec<Element>,
}

impl AppliedPort {
    /// The objects in the kernel for this port, given the context it was rendered in.
    fn objects(&self, ctx: RenderCtx) -> PortObjects {
        let mut o = render_port(&self.port, ctx, self.slot);
        for e in &self.skipped {
            o.elements.remove(e);
        }
        o
    }
}

/// Whether two ports can claim the same key of this map (a Service address, a NodePort);
/// keys of the endpoint maps are handed out, never shared.
fn contested(map: &str) -> bool {
    !map.starts_with("endpoints-")
}

pub struct NftablesBackend {
    /// Programs nothing (unit tests without root): reads an empty kernel, commits nowhere.
    dry_run: bool,
    socket: Option<nft::Socket>,
    /// Kept open for the same reason as `socket`.
    ct: Option<conntrack::Conntrack>,
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
    /// A back end that programs the network namespace of the thread that calls `sync`.
    /// Nothing happens until the first sync.
    pub fn new() -> NftablesBackend {
        NftablesBackend {
            dry_run: false,
            socket: None,
            ct: None,
            state: None,
            last_transaction: String::new(),
            conntrack: true,
        }
    }

    /// A back end that computes its transactions (see [`Self::last_transaction`]) but
    /// sends nothing to the kernel, and finds it empty at the first sync.
    pub fn dry_run() -> NftablesBackend {
        NftablesBackend {
            dry_run: true,
            conntrack: false,
            ..NftablesBackend::new()
        }
    }

    /// Switches the clearing of stale UDP conntrack entries (on by default).
    pub fn set_conntrack_cleanup(&mut self, on: bool) {
        self.conntrack = on;
    }

    /// The last transaction as nft commands, one per line ("" when the last sync had
    /// nothing to do; a one-line summary above 5,000 steps): for logs and tests. `nft -f`
    /// accepts it.
    pub fn last_transaction(&self) -> &str {
        &self.last_transaction
    }

    /// The back end's netlink socket, opened at first use in the calling thread's network
    /// namespace and kept: closing a netfilter netlink socket waits for an RCU grace
    /// period in the kernel (7-15 ms measured with strace here), more than a one-element
    /// commit costs.
    fn socket(&mut self) -> Result<&mut nft::Socket, BackendError> {
        if self.socket.is_none() {
            let socket = nft::Socket::open().map_err(|source| BackendError::Socket {
                what: "opening a netfilter netlink socket".into(),
                source,
            })?;
            self.socket = Some(socket);
        }
        Ok(self.socket.as_mut().expect("just opened"))
    }

    /// Whether Ferry's table is in the kernel.
    fn table_exists(&mut self) -> Result<bool, BackendError> {
        if self.dry_run {
            return Ok(false);
        }
        let tables = self.socket()?.list_tables().map_err(|source| {
            self.socket = None;
            BackendError::Socket {
                what: "listing the inet tables".into(),
                source,
            }
        })?;
        Ok(tables.iter().any(|t| t == TABLE))
    }

    /// Sends `batch` as one transaction (`what` says what it does, for the error). A
    /// socket that failed is not used again.
    fn send(&mut self, batch: &nft::Batch, what: &str) -> Result<(), BackendError> {
        let result = self.socket()?.commit(batch);
        result.map_err(|source| {
            self.socket = None;
            BackendError::Commit {
                what: what.to_string(),
                source,
            }
        })
    }

    /// Sends `ops` as one transaction.
    fn commit(&mut self, ops: &[Op]) -> Result<(), BackendError> {
        if self.dry_run {
            return Ok(());
        }
        let mut batch = nft::Batch::new(TABLE);
        for op in ops {
            op.lower(&mut batch);
        }
        self.send(&batch, "nftables transaction failed, nothing applied")
    }

    /// Writes the base layout: table, base and helper chains (flushed and refilled), maps
    /// and sets (the cluster-cidrs and nodeport-ips sets flushed and refilled: they follow
    /// the node settings; the other maps and sets keep their elements).
    fn write_base(tx: &mut Tx, settings: &NodeSettings) {
        let h = &mut tx.head;
        h.push(Op::AddTable);
        for (name, kind, hook, prio) in BASE_CHAINS {
            h.push(Op::AddChain(name.into(), Some((kind, hook, prio))));
        }
        for name in HELPER_CHAINS {
            h.push(Op::AddChain(name.into(), None));
        }
        for f in FAMILIES {
            for set in base_sets(f) {
                let flush = matches!(set.kind, SetKind::Cidrs(_));
                h.push(Op::AddSet(set.clone()));
                if flush {
                    h.push(Op::FlushSet(set));
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

    fn sync_inner(
        &mut self,
        table: &ServiceTable,
        changes: &ServiceChanges,
    ) -> Result<SyncStats, BackendError> {
        let start = Instant::now();
        let ctx = RenderCtx::of(&table.settings);
        let mut tx = Tx::default();
        let first = self.state.is_none();
        let mut state = self.state.take().unwrap_or_default();
        // What the applied objects were rendered with.
        let old_ctx = RenderCtx::of(&state.settings);

        if first {
            // Whatever an earlier run left is replaced in the same transaction (see
            // "Restart" in the module docs).
            if self.table_exists()? {
                tx.head.push(Op::DelTable);
            }
            Self::write_base(&mut tx, &table.settings);
            state.settings = table.settings.clone();
            state.rules = base_rules(&table.settings);
        }
        let settings_changed = !first && state.settings != table.settings;
        let ctx_changed = settings_changed && RenderCtx::of(&state.settings) != ctx;
        if settings_changed {
            Self::write_base(&mut tx, &table.settings);
            state.settings = table.settings.clone();
        }

        // Which ports to look at: those the table's change log names (and the blocked ones),
        // or all of them when there is no log or everything must be re-rendered.
        let mut changed: Vec<&ServicePort> = Vec::new();
        let mut removed: Vec<ServicePortId> = Vec::new();
        let is_changed = |id: &ServicePortId, port: &ServicePort| match state.ports.get(id) {
            Some(old) => old.port != *port || ctx_changed || state.blocked.contains(id),
            None => true,
        };
        match changes {
            ServiceChanges::Ports(log) if !first && !ctx_changed => {
                for id in log
                    .iter()
                    .chain(state.blocked.iter().filter(|id| !log.contains(*id)))
                {
                    match table.ports.get(id) {
                        Some(port) if is_changed(id, port) => changed.push(port),
                        Some(_) => {}
                        None if state.ports.contains_key(id) => removed.push(id.clone()),
                        None => {}
                    }
                }
            }
            _ => {
                changed.extend(
                    table
                        .ports
                        .iter()
                        .filter(|(id, p)| is_changed(id, p))
                        .map(|(_, p)| p),
                );
                removed.extend(
                    state
                        .ports
                        .keys()
                        .filter(|id| !table.ports.contains_key(*id))
                        .cloned(),
                );
            }
        }
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
        let mut olds: HashMap<ServicePortId, (AppliedPort, PortObjects)> = HashMap::new();
        for id in changed.iter().map(|p| &p.id).chain(&removed) {
            if let Some(old) = state.ports.remove(id) {
                let objects = old.objects(old_ctx);
                for e in objects.elements.iter().filter(|e| contested(&e.map)) {
                    state.owners.remove(&(e.map.clone(), e.key.clone()));
                }
                olds.insert(id.clone(), (old, objects));
            }
        }
        let mut skipped: HashMap<ServicePortId, Vec<Element>> = HashMap::new();
        for (port, _, objects) in &mut rendered {
            state.blocked.remove(&port.id);
            let mut kept = BTreeSet::new();
            for e in std::mem::take(&mut objects.elements) {
                if !contested(&e.map) {
                    kept.insert(e);
                    continue;
                }
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
                        skipped.entry(port.id.clone()).or_default().push(e);
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
            for (name, decl) in &new.sets {
                if !old.sets.contains_key(name) {
                    tx.add_sets.push(Op::AddSet(decl.clone()));
                    tx.commands += 1;
                }
            }
            for (name, rules) in &new.chains {
                match old.chains.get(name) {
                    None => {
                        tx.add_chains.push(Op::AddChain(name.clone(), None));
                        tx.commands += 1;
                        tx.fill_new_chain(name, rules);
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
                    tx.del_sets.push(Op::DelSet(name.clone()));
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
            diff(&mut tx, old.map_or(&empty, |(_, o)| o), objects, &mut state);
            if let Some((old, _)) = old {
                stale_udp.extend(stale_udp_flows(&old.port, Some(port)));
            }
        }
        for id in &removed {
            if let Some((old, objects)) = olds.get(id) {
                diff(&mut tx, objects, &empty, &mut state);
                stale_udp.extend(stale_udp_flows(&old.port, None));
            }
        }
        for ip in &hairpin_add {
            tx.add_element(&hairpin_element(*ip));
        }
        for ip in &hairpin_del {
            tx.del_element(&hairpin_element(*ip));
        }
        for (port, slot, _) in rendered {
            state.ports.insert(
                port.id.clone(),
                AppliedPort {
                    port: port.clone(),
                    slot,
                    skipped: skipped.remove(&port.id).unwrap_or_default(),
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
        let ops = tx.into_ops();
        let result = self.commit(&ops);
        self.last_transaction = ops_text(&ops);
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
            let ct = match self.ct.take() {
                Some(ct) => Ok(ct),
                None => conntrack::Conntrack::open(),
            };
            match ct.and_then(|mut ct| ct.delete_udp_flows(&stale_udp).map(|_| ct)) {
                Ok(ct) => self.ct = Some(ct),
                Err(e) => tracing::warn!("clearing conntrack entries of removed UDP endpoints: {e}"),
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
        key: Key::Pair(ip),
        value: Value::None,
    }
}

impl Backend for NftablesBackend {
    fn sync(&mut self, plan: &Plan, changes: &Changes) -> Result<SyncStats, BackendError> {
        self.sync_inner(&plan.services, &changes.services)
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        self.state = None;
        if self.dry_run {
            return Ok(());
        }
        if !self.table_exists()? {
            return Ok(());
        }
        let mut batch = nft::Batch::new(TABLE);
        batch.delete_table();
        self.send(&batch, &format!("deleting table inet {TABLE}"))
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

    /// An element as nft text: map, key, value ("" in a set).
    #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
    struct El {
        map: String,
        key: String,
        value: String,
    }

    /// A port's objects as nft text, for readable assertions.
    struct Text {
        chains: BTreeMap<String, Vec<String>>,
        sets: BTreeMap<String, String>,
        elements: BTreeSet<El>,
    }

    /// Renders with the port's endpoints at keys 100.. of its endpoint map, as text.
    fn render(p: &ServicePort, ctx: RenderCtx) -> Text {
        let slot = Slot {
            shard: endpoint_shard(&p.id),
            offset: 100,
            capacity: 16,
        };
        let o = render_port(p, ctx, slot);
        Text {
            chains: o
                .chains
                .iter()
                .map(|(name, rules)| (name.clone(), rules.iter().map(Rule::to_string).collect()))
                .collect(),
            sets: o.sets.iter().map(|(name, d)| (name.clone(), d.body())).collect(),
            elements: o
                .elements
                .iter()
                .map(|e| {
                    let full = e.to_string();
                    let value = full.split_once(" : ").map_or("", |(_, v)| v).to_string();
                    El {
                        map: e.map.clone(),
                        key: e.key.to_string(),
                        value,
                    }
                })
                .collect(),
        }
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
        assert!(o.elements.contains(&El {
            map: "no-endpoint-nodeports-v4".into(),
            key: "tcp . 30080".into(),
            value: "drop".into()
        }));
        assert!(o.elements.contains(&El {
            map: "service-nodeports-v4".into(),
            key: "tcp . 30080".into(),
            value: format!("goto external-{base}")
        }));
    }

    #[test]
    fn both_policies_local_short_circuit_to_every_endpoint() {
        let mut p = port("web", Family::V4);
        p.node_port = Some(30080);
        p.internal_local = true;
        p.external_local = true;
        p.short_circuit_endpoints = vec![ep("10.1.0.2", 8080), ep("10.2.0.3", 8080)];
        let base = port_base_name(&p.id);
        let emap = endpoint_map(Family::V4, Protocol::Tcp, endpoint_shard(&p.id));
        // No local endpoint: the ClusterIP and outside traffic are dropped, Pods and the
        // node still reach the Service through its NodePort.
        let o = render(&p, CTX);
        assert_eq!(
            o.chains[&format!("external-{base}")],
            vec![
                format!("ip saddr @cluster-cidrs-v4 goto all-endpoints-{base}"),
                "fib saddr type local meta mark set meta mark or 0x4000".into(),
                format!("fib saddr type local goto all-endpoints-{base}"),
            ]
        );
        assert_eq!(
            o.chains[&format!("all-endpoints-{base}")],
            vec![format!(
                "meta l4proto tcp dnat ip to numgen random mod 2 offset 100 map @{emap}"
            )]
        );
        assert!(!o.chains.contains_key(&format!("service-{base}")));
        for (map, key) in [
            ("no-endpoint-services-v4", "10.96.0.10 . tcp . 80"),
            ("no-endpoint-nodeports-v4", "tcp . 30080"),
        ] {
            assert!(
                o.elements.contains(&El {
                    map: map.into(),
                    key: key.into(),
                    value: "drop".into()
                }),
                "{map}"
            );
        }
        // A local endpoint: it serves the ClusterIP and outside traffic; the short-circuit
        // still spreads over both, after the other two choices in the port's slot.
        p.cluster_endpoints = vec![ep("10.1.0.2", 8080)];
        p.external_endpoints = p.cluster_endpoints.clone();
        let o = render(&p, CTX);
        assert_eq!(
            o.chains[&format!("all-endpoints-{base}")],
            vec![format!(
                "meta l4proto tcp dnat ip to numgen random mod 2 offset 102 map @{emap}"
            )]
        );
        assert_eq!(
            o.chains[&format!("external-{base}")].last().unwrap(),
            &format!("goto ext-endpoints-{base}")
        );
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
        assert!(o.elements.contains(&El {
            map: "firewall-ips-v4".into(),
            key: "192.0.2.10 . tcp . 80".into(),
            value: format!("goto firewall-{base}")
        }));
        assert_eq!(
            o.elements.iter().filter(|e| e.key.contains("2001:db8")).count(),
            0
        );
    }

    /// An `nft` stand-in that swallows its input and lists an empty ruleset.
    /// A sync that compares every port, as after a full plan.
    fn sync_all(backend: &mut NftablesBackend, t: &ServiceTable) -> Result<SyncStats, BackendError> {
        backend.sync(&Plan { services: t.clone() }, &Changes::all())
    }

    #[test]
    fn a_contested_external_ip_goes_to_one_port_then_to_the_other() {
        let mut backend = NftablesBackend::dry_run();
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
        sync_all(&mut backend, &t).unwrap();
        let tx = backend.last_transaction().to_string();
        assert_eq!(tx.matches(key).count(), 1, "{tx}");
        assert!(tx.contains(&format!("{key}{}", port_base_name(&a.id))), "{tx}");
        // Unchanged, but b is still waiting for the address: it is retried, and gets
        // nothing new while a holds it.
        sync_all(&mut backend, &t).unwrap();
        assert!(
            !backend.last_transaction().contains(key),
            "{}",
            backend.last_transaction()
        );
        // a goes away: b gets the address in the same transaction that removes a's.
        t.ports.remove(&a.id);
        let stats = sync_all(&mut backend, &t).unwrap();
        let tx = backend.last_transaction().to_string();
        assert!(tx.contains(&format!("{key}{}", port_base_name(&b.id))), "{tx}");
        assert!(
            tx.contains("delete element inet ferry-proxy service-ips-v4"),
            "{tx}"
        );
        assert_eq!(stats.changed_ports, 2);
        sync_all(&mut backend, &t).unwrap();
        assert_eq!(backend.last_transaction(), "");
    }

    #[test]
    fn settings_changes_rewrite_the_base_and_only_affected_chains() {
        let mut backend = NftablesBackend::dry_run();
        let mut a = port("a", Family::V4);
        a.cluster_endpoints = vec![ep("10.1.0.2", 80)];
        a.external_endpoints = a.cluster_endpoints.clone();
        let mut t = ServiceTable::default();
        t.settings.cluster_cidrs = vec!["10.1.0.0/16".parse().unwrap()];
        t.ports.insert(a.id.clone(), a.clone());
        let first = sync_all(&mut backend, &t).unwrap();
        let tx = backend.last_transaction().to_string();
        assert!(
            tx.contains("add element inet ferry-proxy cluster-cidrs-v4 { 10.1.0.0/16 }"),
            "{tx}"
        );
        assert!(tx.contains("add map inet ferry-proxy service-ips-v4"), "{tx}");
        // Another v4 CIDR and NodePort addresses: base only.
        t.settings.cluster_cidrs.push("10.2.0.0/16".parse().unwrap());
        t.settings.nodeport_addresses = vec!["192.168.1.0/24".parse().unwrap()];
        let stats = sync_all(&mut backend, &t).unwrap();
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
        let stats = sync_all(&mut backend, &t).unwrap();
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
    fn named_changes_give_the_same_transactions_as_a_full_comparison() {
        let mut logged = NftablesBackend::dry_run();
        let mut full = NftablesBackend::dry_run();
        let mut t = Plan {
            services: synthetic_table(300, 3, 0),
        };
        logged.sync(&t, &Changes::all()).unwrap();
        full.sync(&t, &Changes::all()).unwrap();
        // Nothing changed: nothing to do, without looking at the 300 ports.
        logged.sync(&t, &Changes::none()).unwrap();
        assert_eq!(logged.last_transaction(), "");
        // One port changed, one removed, one added.
        let ports = &mut t.services.ports;
        let ids: Vec<ServicePortId> = ports.keys().take(2).cloned().collect();
        ports.get_mut(&ids[0]).unwrap().cluster_endpoints.pop();
        ports.remove(&ids[1]);
        let added = synthetic_table(1, 3, 300).ports;
        let changes = Changes::service_ports(ids.iter().chain(added.keys()).cloned());
        ports.extend(added);
        let stats = logged.sync(&t, &changes).unwrap();
        full.sync(&t, &Changes::all()).unwrap();
        assert_eq!(stats.changed_ports, 3);
        assert_eq!(logged.last_transaction(), full.last_transaction());
        assert!(!logged.last_transaction().is_empty());
        // After a full plan every port is compared, as before.
        logged.sync(&t, &Changes::all()).unwrap();
        assert_eq!(logged.last_transaction(), "");
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
