//! ferry-proxy: watches Services, EndpointSlices and Nodes (and Pods and Namespaces, for
//! NetworkPolicy) and programs the node.
//!
//! Data flow: [`source`] (kube API watch | manifests directory) -> [`store`] (slim copies
//! of what the plans read) -> [`plan`] (pure: store + node settings -> ServiceTable) ->
//! [`backend`] (nftables: the difference of two plans, as one transaction).

pub mod backend;
pub mod conntrack;
pub mod dump;
pub mod http;
pub mod metrics;
pub mod nft;
pub mod plan;
pub mod run;
pub mod source;
pub mod store;
