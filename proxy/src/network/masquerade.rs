//! Masquerade of Pod traffic that leaves the cluster: table `inet ferry-network`, one
//! postrouting rule per Pod CIDR of this node, `ip saddr <pod cidr> ip daddr != <cluster
//! cidr> ... masquerade`.
//!
//! Why the daemon and not ferry-bridge: ferry-bridge's `ipMasq` masquerades everything
//! that leaves the Pod's own subnet, which includes other nodes' Pods, whose servers must
//! see the client Pod's address. Teaching the bridge to exempt the cluster CIDR would put
//! the cluster CIDR in every node's conflist and one rule per Pod in the kernel, fixed at
//! each Pod's ADD; a changed cluster CIDR would need every Pod re-added. Here one rule
//! per Pod CIDR is kept in step by the daemon, which knows the cluster CIDR and every
//! node's Pod CIDRs, and the conflist turns `ipMasq` off. The table is replaced in one
//! transaction (flush and refill of its one chain), so no packet sees it half-made.

use std::net::IpAddr;

use ferry_nft::{Addr, BaseChain, Batch, ChainType, CmpOp, Hook, Match, Rule, Statement};
use ipnetwork::IpNetwork;

use super::NetworkSettings;
use crate::store::objects::NodeInfo;

pub const TABLE: &str = "ferry-network";
const CHAIN: &str = "postrouting";

/// Traffic from `source` to anywhere but `exempt` gets the outgoing interface's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasqueradeRule {
    pub source: IpNetwork,
    pub exempt: Vec<IpNetwork>,
}

impl MasqueradeRule {
    pub fn to_rule(&self) -> Rule {
        let prefix = |which, op, net: IpNetwork| Match::Addr {
            which,
            op,
            addr: net.network(),
            prefix_len: net.prefix(),
        };
        let mut matches = vec![prefix(Addr::Saddr, CmpOp::Eq, self.source)];
        matches.extend(
            self.exempt
                .iter()
                .map(|net| prefix(Addr::Daddr, CmpOp::Neq, *net)),
        );
        Rule {
            matches,
            statement: Statement::Masquerade,
            comment: None,
        }
    }
}

/// Multicast stays as it is, as with ferry-bridge's own rule.
fn multicast(v4: bool) -> IpNetwork {
    if v4 {
        "224.0.0.0/4".parse().unwrap()
    } else {
        "ff00::/8".parse().unwrap()
    }
}

/// One rule per Pod CIDR of `this`: exempt are the `--cluster-cidr`s of its family, or,
/// when none is given for that family, every node's Pod CIDRs of it.
pub fn plan(settings: &NetworkSettings, this: &NodeInfo, nodes: &[&NodeInfo]) -> Vec<MasqueradeRule> {
    this.pod_cidrs
        .iter()
        .map(|source| {
            let v4 = source.is_ipv4();
            let mut exempt: Vec<IpNetwork> = settings
                .cluster_cidrs
                .iter()
                .filter(|c| c.is_ipv4() == v4)
                .copied()
                .collect();
            if exempt.is_empty() {
                exempt = nodes
                    .iter()
                    .flat_map(|n| n.pod_cidrs.iter())
                    .filter(|c| c.is_ipv4() == v4)
                    .copied()
                    .collect();
                exempt.sort();
                exempt.dedup();
            }
            exempt.push(multicast(v4));
            MasqueradeRule {
                source: *source,
                exempt,
            }
        })
        .collect()
}

/// The batch that makes the table hold exactly `rules` (or removes it when there are
/// none and it exists).
pub fn batch(rules: &[MasqueradeRule], table_exists: bool) -> Batch {
    let mut batch = Batch::new(TABLE);
    if rules.is_empty() {
        if table_exists {
            batch.delete_table();
        }
        return batch;
    }
    batch.add_table();
    batch.add_chain(
        CHAIN,
        Some(&BaseChain {
            kind: ChainType::Nat,
            hook: Hook::Postrouting,
            priority: 100,
        }),
    );
    batch.flush_chain(CHAIN);
    for rule in rules {
        batch.add_rule(CHAIN, &rule.to_rule().exprs());
    }
    batch
}

/// The rules as nft text, for logs and tests.
pub fn text(rules: &[MasqueradeRule]) -> Vec<String> {
    rules.iter().map(|r| r.to_rule().to_string()).collect()
}

/// Whether `ip` is one of the addresses a rule exempts (for tests and `trace`-like checks).
pub fn exempts(rules: &[MasqueradeRule], from: IpAddr, to: IpAddr) -> bool {
    rules
        .iter()
        .filter(|r| r.source.contains(from))
        .all(|r| r.exempt.iter().any(|e| e.contains(to)))
}
