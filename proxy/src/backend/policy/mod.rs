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
//! shared with other builds, one run each): 10,000 Pods (1,000 on the node), 1,000
//! policies; 435 rules, 142 chains, 27 peer sets.
//!
//! | sync                                  | plan (full re-plan) | back end |
//! |---------------------------------------|--------------------:|---------:|
//! | full, no policy (baseline)            |   3 ms              |  4 ms    |
//! | full, 1,000 policies                  | 611 ms              | 66 ms    |
//! | one policy changed                    | 313 ms              |  9 ms    |
//! | one local Pod relabelled              | 353 ms              | 12 ms    |
//! | one local Pod added                   | 302 ms              | 45 ms    |
//! | restart (new back end, table kept)    | 237 ms              | 16 ms    |
//!
//! The plan column is a full re-plan; the sync loop now updates its plan with
//! `PolicyPlanner` instead (0.5-0.6 ms for a policy changed or a Pod relabelled, 28-121
//! ms for a Pod added: `benches/policy_plan.rs`).
//!
//! An added Pod costs more than a relabel: its address joins peer sets shared by many
//! chains (every "to all namespaces on `http`" rule), and a set is named by its content,
//! so the set is written anew and every chain using it is re-created and its Pods'
//! elements switched. Updating such sets in place (names by identity, elements diffed)
//! would bring it to the relabel's cost. Connect latency on a bridge, p50 (4,000
//! connects per case, interleaved): 13.5 us with no table, +0.7 us with the table and
//! no policy, +2.4 us at 100 policies, +2.0 us at 1,000.
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
