//! NetworkPolicy in the kernel: the policy plan ([`PolicyTable`]) as one nftables table,
//! `inet ferry-policy`, changed by diff. ONE implementation for both Service back ends:
//! the nftables back end puts these steps in the same nfnetlink batch as its Service diff
//! (a change that touches both is one transaction); the eBPF back end commits them in a
//! batch of their own ([`PolicyEnforcer`]).
//!
//! # Layout
//!
//! ```text
//! chain forward      type filter hook forward priority 0; policy accept;
//!                    ct state established,related accept
//!                    icmpv6 type nd-neighbor-solicit accept  (and nd-neighbor-advert)
//!                    ip saddr vmap @egress-v4        (ip6 saddr vmap @egress-v6)
//!                    ip daddr vmap @ingress-v4       (ip6 daddr vmap @ingress-v6)
//! map egress-v4      type ipv4_addr : verdict    Pod address : jump egress-<H>
//! map ingress-v4     type ipv4_addr : verdict    Pod address : goto ingress-<H>
//! chain egress-<H>   ip daddr @peers-<S>-v4 meta l4proto tcp th dport 80 return   (per clause,
//!                    ... one rule per family of its peers and port range)         family and
//!                    drop                                                          port range)
//! chain ingress-<H>  ip saddr @peers-<S>-v4 meta l4proto tcp th dport >= 80 th dport <= 81 accept
//!                    drop
//! set peers-<S>-v4   type ipv4_addr; flags interval;     the peers of one or more clauses,
//!                                                        named by what they select
//! ```
//!
//! - A connection passes both directions: the source Pod's egress (entered with `jump`,
//!   `return` when allowed, so the base chain goes on to the destination's ingress) and
//!   the destination Pod's ingress (`goto`, `accept` when allowed). A Pod that no policy
//!   isolates has no element: the lookup misses and the packet goes on. Denied is `drop`
//!   (not reject), as upstream's implementations do.
//! - Chains are shared by content: `<H>` is a hash of the chain's rules, so Pods whose
//!   direction resolves to the same clauses get one chain (1,000 Pods under one policy:
//!   one chain and 1,000 map elements; a relabelled Pod is an element replaced). Ports
//!   are matched inline, not in anonymous sets (each bound anonymous set costs the
//!   kernel a walk of the transaction; see the nftables back end's "Measurements").
//! - Peer sets are named by identity, not content: `<S>` is the plan's [`PeerSetId`], a
//!   hash of what the clause's peers ARE (the rule's normalised selectors and ipBlocks,
//!   the policy's namespace where a selector picks Pods of it; for a named-port
//!   destination also the names and the number), one interval set per id and family.
//!   Pods coming, going or relabelled change the elements of the sets they join or
//!   leave and nothing else: the name stays, so the chains naming it stay, and so do
//!   their Pods' map elements. Named by content (as they were), a new Pod that joins the
//!   peers of many rules renamed each of those sets: a new set with all its elements,
//!   every chain using it re-created under a new name, every Pod's map element switched
//!   to it, the old set and chains deleted (see "Measurements" for the cost). Chains
//!   change only when rules do, and when a set gains or loses its first address of a
//!   family (an empty family has no rule).
//! - `ct state established,related accept` comes first: replies of allowed connections
//!   pass, and so do ICMP errors about them. There is no `ct state invalid drop`: it
//!   would drop packets conntrack cannot follow (e.g. after a conntrack table flush, or
//!   TCP window tracking corner cases) for Pods no policy isolates too, which is not this
//!   table's business.
//!
//! # Where: `inet` forward, after DNAT, with br_netfilter
//!
//! The hook is `forward` at priority 0, after the Service DNAT of prerouting (-100): the
//! destination is the real backend Pod, so traffic through a ClusterIP or NodePort is
//! judged exactly as traffic to the Pod itself. Pod-to-Pod traffic on the same bridge
//! only reaches the `inet` hooks when `net.bridge.bridge-nf-call-iptables=1` (and
//! `-ip6tables`): br_netfilter then runs bridged IP packets through prerouting, forward
//! and postrouting. Services need that setting already (replies of Pod -> ClusterIP ->
//! Pod on one bridge must be un-NATed), and routed traffic in or out of the node passes
//! the same forward hook, so one chain covers both. A `bridge` family table would see
//! routed traffic only on its way out of the bridge, with conntrack of its own
//! (nf_conntrack_bridge, missing on this kernel), and would judge Service traffic before
//! the `inet` DNAT of routed packets.
//!
//! The node itself is not judged: its own packets to a local Pod (kubelet probes) leave
//! through `output`, and the Pod's replies arrive through `input`; neither passes
//! `forward` (`proxy/tests/policy_nftables.rs` proves it under a default-deny policy).
//! The same holds with the eBPF back end: its socket-level load balancing rewrites the
//! connect() of the client, so the packets already carry the backend Pod's address.
//!
//! # Sync
//!
//! The [`PolicyWriter`] keeps what the kernel holds: each map element (address ->
//! chain), each chain (with the sets it uses) and each set. A sync renders the plan's
//! chains, each distinct one once (keyed by the plan's shared address lists and ports, so
//! 1,000 Pods under the same policies cost one rendering, not 1,000 comparisons of their
//! peer lists), and compares names, and each kept set's elements with what it wrote
//! last: the transaction adds the new sets (with their elements), deletes and adds the
//! elements of kept sets that differ (a diff of sorted ranges: a range that merged with
//! a new neighbour is deleted and added whole), adds the new chains (with their rules),
//! switches the map elements that differ, and deletes the chains and sets nothing uses
//! any more, in that order, as ONE transaction: no packet ever sees a state between the old policy and the new one. Two
//! Pods claiming one address (a transient state) give the address to the first by
//! `namespace/name`, with a warning, rather than failing the transaction.
//!
//! # Restart
//!
//! The table outlives the process: a Pod stays enforced while no `ferry-proxy` runs. A
//! new process reads the names of the chains and sets in the table (no rules, no
//! elements), and does NOT flush or delete anything before its first sync, which the
//! sync loop holds back until Pods, Namespaces and NetworkPolicies are all listed. That
//! sync keeps the chains (named by their rules) and sets (named by identity) it still
//! needs, adds the missing ones, and flushes and refills the four maps and every kept
//! peer set in the same transaction (their elements are not read back, and a kept set's
//! name says what it selects, not what it held; the refill is part of the same atomic
//! commit, so no packet sees the set empty). A failed
//! commit leaves the writer knowing nothing, and the next sync starts from the kernel the
//! same way. `--network-policy=false` and `ferry-proxy cleanup` delete the table.
//!
//! # Measurements
//!
//! `cargo bench -p ferry-proxy --bench policy_backend` (release, Linux 6.18, 2 CPUs
//! shared with other engineers' builds, load 1.4-2.0): 10,000 Pods (1,000 on the node),
//! 1,000 policies; 435 rules, 142 chains, 27 peer sets. Per change, what the daemon does:
//! `PolicyPlanner::update` with the store's changes, then this writer's sync; median / p90
//! of 21 changes of each kind, two runs:
//!
//! | change                  | planner update    | back end          | total              | steps | same tables, sets named by content |
//! |-------------------------|------------------:|------------------:|-------------------:|------:|-----------------------------------:|
//! | one policy changed      | 0.50 / 0.56 ms    | 1.97-2.06 / 2.4   | 2.5 / 2.9 ms       |    44 | 2.5-2.7 / 2.9 ms                   |
//! | one local Pod relabelled| 0.35-0.40 / 0.5   | 1.6-2.6 / 2.0-2.8 | 1.9-3.0 / 2.6-3.2  |     2 | 2.1-3.6 / 2.4-3.7                  |
//! | one local Pod added     | 4.7-5.8 / 5.2-9.2 | 2.9-3.0 / 4.0-5.0 | 7.9-9.2 / 9.0-15.2 |     3 | 6.1-10.2 / 17.6-23.5               |
//! | one local Pod deleted   | 4.6-5.2 / 5.5-6.8 | 2.6-2.8 / 3.8-4.5 | 7.3-8.5 / 8.9-13.2 |     3 | 5.9-7.9 / 17.4-21.1                |
//! | one Namespace relabelled| 4.4-4.6 / 4.9-6.0 | 4.7-4.8 / 5.4-6.8 | 8.9-9.6 / 10.4-11.5|    20 | 15.1-17.4 / 16.3-24.5              |
//!
//! Same runs: a full plan + full sync 125-137 ms (plan 97-108, back end 27-30; with no
//! policy 10 + 1.3 ms); the first sync of a new back end over the table (a restart)
//! 34-52 ms. Before peer sets were named by identity, a local Pod added cost 27.7-121 ms
//! in the planner (it re-planned all 1,000 entries, whose egress holds the named-port
//! destination set the Pod joins) plus 44.9 ms in the back end (that set renamed: a new
//! set with every element, every chain using it re-created and its Pods' map elements
//! switched). The last column syncs the same tables with content-named sets in a second
//! netns, with today's writer (which re-renders only the chains whose sets changed): a
//! Pod added is 3 element steps by identity; by content it is a new set with all its
//! elements, every chain using it re-created and its Pods' map elements switched, and
//! its p90 is 4-5x the element diff's. A Namespace moving 33 Pods in and out of 20 sets
//! is 20 element steps by identity and 20 renames by content (3.5x). Before the writer kept its rendered chains across syncs (it rendered every
//! distinct chain, and hashed an allocated key per Pod, at every sync), a relabel's back
//! end took 5-6 ms at load 1.4; 1.6-2.6 ms now.
//!
//! Connect latency on a bridge, p50 (2,000 connects per case, interleaved, two runs):
//! 11.1-11.2 us with no table, -0.3/+0.9 us with the table and no policy, +1.8/+1.9 us at
//! 100 policies, +1.3/+2.0 us at 1,000.
//!
//! # Files
//!
//! - `render`: rules, peer sets and map elements as data (nft text and kernel
//!   expressions), and one Pod's direction as a chain;
//! - `transaction`: the steps of one transaction;
//! - `sync`: the [`PolicyWriter`] (what was applied, the diff) and the [`PolicyEnforcer`]
//!   (the writer with a socket of its own);
//! - `layout`: the table a plan gives, as names and text, for `ferry-proxy dump --policy`.
//!
//! [`PolicyTable`]: crate::plan::policy::PolicyTable
//! [`PeerSetId`]: crate::plan::policy::PeerSetId

mod layout;
mod render;
mod sync;
mod transaction;

pub use layout::{layout, DirectionLayout, PodLayout, PolicyLayout};
pub use render::{Direction, MapElement, PeerSet, PolicyChain, PolicyRule, FORWARD, TABLE};
pub use sync::{KernelPolicy, PolicyEnforcer, PolicyWriter, Prepared};
pub use transaction::{ops_text, PolicyOp};
