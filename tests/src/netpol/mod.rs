//! NetworkPolicy test material that does not depend on the proxy: upstream's model, its
//! cases, and an oracle that says what each probe should see.
//!
//! Data flow, in the order an end-to-end test uses it:
//!
//! 1. [`cluster`]: upstream's topology — namespaces x, y, z, pods a, b, c, ports 80/81
//!    on TCP, UDP and SCTP with upstream's port names — and [`PodAddresses`], which the
//!    test fills with the addresses the testbed gave each pod.
//! 2. [`cases`]: upstream's `network_policy.go` cases (and a few of Ferry's) as data:
//!    steps of policies to apply and labels to change, then probes, each with upstream's
//!    own expectation. [`Case::ports`] says which ports the pods must serve, and
//!    [`Case::instantiate`] makes the case concrete for an IP family.
//! 3. [`model`]: the oracle. [`State::expected`] answers "does x/a reach y/b on 80/TCP
//!    after this step", from the API reference alone.
//! 4. [`reachability`]: upstream's way of writing expectations, and its truth tables.
//! 5. [`kernel`]: the topology on a real node (Pods on `ferry-bridge`, servers, Services,
//!    the manifests that describe a step) and probes that fill a [`TruthTable`] from real
//!    packets; `proxy/tests/netpol_e2e.rs` holds `ferry-proxy` to the oracle with it.
//!
//! What an end-to-end test does with a case, step by step: start the nine pods, each
//! serving [`Case::ports`] on TCP, UDP and SCTP behind a Service named
//! [`cluster::service_name`]; [`Case::instantiate`] it for each family it probes; for each
//! step apply its actions in order (`Apply` creates or replaces by namespace and name),
//! then for each probe fill an observed [`TruthTable`] by probing every pair, to the pod's
//! address and to its ClusterIP, and compare it with `step.state.truth_table(port,
//! protocol)` through [`TruthTable::mismatches`] (upstream leaves the diagonal out:
//! [`UPSTREAM_IGNORES_LOOPBACK`]), printing [`TruthTable::report`] when they differ.
//!
//! ```
//! use ferry_tests::netpol::{self, Family, PodAddresses, Protocol};
//!
//! let mut addresses = PodAddresses::new();
//! for (i, pod) in netpol::pod_keys().iter().enumerate() {
//!     addresses.set(pod, &[format!("10.16.0.{}", 10 + i).parse().unwrap()]).unwrap();
//! }
//! let case = netpol::all_cases()
//!     .into_iter()
//!     .find(|c| c.title == "should support a 'default-deny-ingress' policy")
//!     .unwrap();
//! let scenario = case.instantiate(&addresses, Family::V4).unwrap();
//! let state = &scenario.steps[0].state;
//! assert!(!state.expected("y/a", "x/b", 80, Protocol::Tcp));
//! assert!(state.expected("x/a", "y/b", 80, Protocol::Tcp));
//! ```

pub mod cases;
pub mod cluster;
pub mod kernel;
pub mod model;
pub mod reachability;

pub use cases::{all as all_cases, Action, Case, CaseError, Probe, Scenario, State, Step, Suite};
pub use cluster::{pod_keys, AddressError, PodAddresses};
pub use model::{Family, NetworkPolicy, PolicyError, Protocol};
pub use reachability::{Reachability, TruthTable, UPSTREAM_IGNORES_LOOPBACK};

#[cfg(test)]
mod tests;
