//! ferry-proxy: watches Services, EndpointSlices and Nodes (and Pods, Namespaces and
//! NetworkPolicies) and programs the node.
//!
//! Data flow: [`source`] (kube API watch | manifests directory) -> [`store`] (slim copies
//! of what the plans read) -> [`plan`] (pure: store + node settings -> ServiceTable, and
//! store -> PolicyTable) -> [`backend`] (nftables: the difference of two plans, as one
//! transaction). [`trace`] explains one connection from the plans alone; the policy plan
//! is not programmed yet.

pub mod backend;
pub mod conntrack;
pub mod dump;
pub mod http;
pub mod metrics;
// The Pod network between nodes: conflist, masquerade, routes, VXLAN.
pub mod network;
/// nf_tables over netlink, from the `ferry-nft` crate; kept under this name so that the
/// back end's `crate::nft::...` paths stay as they are.
pub use ferry_nft as nft;
pub mod plan;
// Between the plans and the back ends: what changed, for every back end.
pub mod changes;
pub mod run;
pub mod source;
pub mod store;
pub mod trace;
