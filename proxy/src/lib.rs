//! ferry-proxy: watches Services, EndpointSlices and Nodes and programs the node.
//!
//! Data flow: [`source`] (kube API watch | manifests directory) -> `store` (the objects
//! this node needs) -> [`plan`] (pure: store + node settings -> ServiceTable) ->
//! [`backend`] (nftables: the difference of two plans, as one transaction).

pub mod backend;
pub mod conntrack;
pub mod dump;
pub mod http;
pub mod metrics;
/// nf_tables over netlink, from the `ferry-nft` crate; kept under this name so that the
/// back end's `crate::nft::...` paths stay as they are.
pub use ferry_nft as nft;
pub mod plan;
pub mod run;
pub mod source;
pub mod store;
