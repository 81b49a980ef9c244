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
//! hash of the port's id, O handed out by a `SlotAllocator` (in `slots`) in power-of-two blocks), each
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
//!   speaks netlink ([`crate::nft`]): the transaction is built as data (`rules` and
//!   `elements`: each rule, element and set knows its nft text and its kernel expressions) and sent as one
//!   nfnetlink batch. The text is still kept (`last_transaction`) for logs and tests; it is
//!   valid `nft -f` input, and a test applies it through nft beside the netlink batch and
//!   compares the two tables. Every name is built from `[A-Za-z0-9_./-]` and starts with a
//!   letter (see [`sanitize`]), so the text needs no quoting.
//! - Reading the table back at a restart: chain and set names only (two netlink dumps).
//!
//! The back end itself (the ignored test `timings` in `proxy/tests/nftables.rs`, release
//! build, same machine, one run each), plan diff + render + commit; "one added Service" and
//! "one endpoint changed" with the changed ports named, as the sync loop hands them:
//!
//! | Services x endpoints | full sync | one added Service | one endpoint changed | no change (named / all compared) | restart (first sync over an existing table) |
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
//! The back end keeps, per Service port, the plan it applied (and its slot, from which the
//! chains, rules, affinity sets and elements render again). A sync looks at the ports the
//! [`Changes`](crate::changes::Changes) name, or at every port when they say "all" (or
//! after a failure, or when the settings change what every port renders): an unchanged
//! [`ServicePort`] is skipped without rendering; a changed one is rendered and compared
//! chain by chain and element by element. The difference goes to
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
//! remaining endpoints at once. TCP entries are never touched. Which flows those are is
//! decided by [`crate::changes::stale_udp_flows`], shared with every back end; this back
//! end executes the deletion because only it knows when the new rules are in the kernel
//! (after the commit, not before: a packet in between would recreate the entry) and what
//! it replaced (after a failed commit or a restart, the loop's previous plan is not what
//! the kernel holds), and its conntrack socket belongs to its thread's network namespace.
//!
//! # Files, in the order of a sync
//!
//! - `sync`: the [`NftablesBackend`], what it applied, and each sync as named steps;
//! - `slots`: which keys of which endpoint map a port's endpoints use;
//! - `render`: a Service port as chains, rules, sets and elements, and the base layout;
//! - `rules`, `elements`: those objects as data, each knowing its nft text and what goes
//!   to the kernel;
//! - `transaction`: the steps of one transaction in the kernel's order;
//! - `names`: every name in the table, derived from the port's identity.
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

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::plan::{Endpoint, Family, NodeSettings, Protocol, ServicePort, ServicePortId, ServiceTable};

mod elements;
mod names;
mod render;
mod rules;
mod slots;
mod sync;
mod transaction;

pub use names::{port_base_name, sanitize, TABLE};
pub use rules::MASQ_MARK;
pub use slots::ENDPOINT_MAPS;
pub use sync::NftablesBackend;

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
    use std::collections::HashSet;

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
