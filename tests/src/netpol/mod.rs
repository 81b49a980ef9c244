//! NetworkPolicy test material that does not depend on the proxy.
//!
//! [`model`] is the oracle: it says whether a connection is allowed, from the API
//! reference alone.

pub mod model;
