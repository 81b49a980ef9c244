//! The policy table a plan gives, as names and text (`ferry-proxy dump --policy`): which
//! Pods are isolated and by which chain, each chain's rules and each set's ranges. Names
//! are content hashes, so these are the names `nft list table inet ferry-policy` shows
//! once the plan is applied.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use super::render::{render_chain, Direction, SetCache};
use crate::plan::policy::{Isolation, PolicyTable};

/// The table for one plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyLayout {
    /// Every Pod of the node with an address, by `namespace/name`.
    pub pods: BTreeMap<String, PodLayout>,
    /// Chain name -> its rules as nft text.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Set name -> its address ranges.
    pub sets: BTreeMap<String, Vec<String>>,
}

/// One Pod: its addresses and, per direction, the chain isolating it (none: open).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodLayout {
    pub ips: Vec<IpAddr>,
    pub ingress: Option<DirectionLayout>,
    pub egress: Option<DirectionLayout>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectionLayout {
    pub chain: String,
    /// The policies that isolate the Pod this way.
    pub policies: Vec<String>,
}

/// What the back end programs for `table`.
pub fn layout(table: &PolicyTable) -> PolicyLayout {
    let mut out = PolicyLayout::default();
    let mut cache = SetCache::default();
    for (key, pod) in &table.pods {
        let mut direction = |d: Direction, isolation: &Option<Isolation>| {
            isolation.as_ref().map(|isolation| {
                let chain = render_chain(d, isolation, &mut cache);
                for set in &chain.sets {
                    out.sets
                        .entry(set.name.clone())
                        .or_insert_with(|| set.elements_text().split(", ").map(String::from).collect());
                }
                out.chains
                    .entry(chain.name.clone())
                    .or_insert_with(|| chain.rules.iter().map(ToString::to_string).collect());
                DirectionLayout {
                    chain: chain.name,
                    policies: isolation.policies.clone(),
                }
            })
        };
        let ingress = direction(Direction::Ingress, &pod.ingress);
        let egress = direction(Direction::Egress, &pod.egress);
        out.pods.insert(
            key.clone(),
            PodLayout {
                ips: pod.ips.clone(),
                ingress,
                egress,
            },
        );
    }
    out
}
