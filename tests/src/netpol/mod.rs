//! NetworkPolicy test material that does not depend on the proxy.
//!
//! [`cluster`] is upstream's x/y/z topology, [`model`] the oracle that says whether a
//! connection is allowed, from the API reference alone, and [`reachability`] upstream's
//! way of writing expectations and printing truth tables.

pub mod cluster;
pub mod model;
pub mod reachability;
