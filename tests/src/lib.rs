//! The Ferry testbed: throwaway network namespaces standing in for a node, its pods and
//! clients outside it, and a stand-in for the container runtime that runs CNI plugins.
//!
//! Rules it enforces (see DESIGN.md, "Rules of the house"):
//! - nothing here touches the root network namespace: every link, address and route is
//!   made inside a namespace created by this crate;
//! - every name and subnet is unique per process and per call, so tests run in parallel
//!   threads and parallel processes;
//! - every namespace is deleted on drop, also when the test panics, and namespaces left
//!   by a killed test process are swept by the next one.
//!
//! ```no_run
//! use ferry_tests::{ferry_bin, CniCall, Node};
//!
//! ferry_tests::require_root!();
//! let node = Node::new("ipam");
//! let pod = node.pod("web");
//! let conf = serde_json::json!({"cniVersion": "1.1.0", "name": "t", "type": "x",
//!     "ipam": {"type": "ferry-ipam", "ranges": [[{"subnet": "10.96.0.0/24"}]],
//!              "dataDir": node.state_dir().join("ipam")}});
//! let result = CniCall::new(ferry_bin("ferry-ipam"), "ADD", conf)
//!     .for_pod(&pod)
//!     .run_in(node.netns())
//!     .ok();
//! ```

pub mod bench;
mod bins;
pub mod cluster;
mod cni;
mod netns;
pub mod netpol;
mod node;
mod pods;
pub mod property;
mod proxy;
mod root;
pub mod sctp;
mod traffic;

pub use bins::{bin_dir, ferry_bin, reference_plugin, REFERENCE_PLUGIN_DIR};
pub use cni::{CniCall, CniOutput};
pub use netns::{list_netns, unique_v4_subnet, unique_v6_subnet, Netns};
pub use node::{Node, Pod};
pub use pods::{PodNetwork, NODE_IP, OUTSIDE_IP};
pub use proxy::{
    endpoint_slice, namespace, pod, service, wait_until, write_kubeconfig, Client, ContainerPort,
    EbpfSandbox, ProxyBackend, ProxyProcess, SliceEndpoint, SvcPort,
};
pub use root::{require_root, root_missing, skip_or_fail};
pub use traffic::{Server, TIMEOUT};

/// Returns from the calling test (printing `SKIP`) when it cannot run for lack of root
/// or of `ip netns`; panics instead when `FERRY_REQUIRE_ROOT=1` (as CI sets it).
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::require_root($crate::__function_name!()) {
            return;
        }
    };
}

/// The path of the function that expands this, e.g. `cni_ipam::add_twice`.
#[doc(hidden)]
#[macro_export]
macro_rules! __function_name {
    () => {{
        // The type name of a nested fn item is "<enclosing fn path>::__here".
        fn __here() {}
        let name = ::std::any::type_name_of_val(&__here);
        let name = name.strip_suffix("::__here").unwrap_or(name);
        // Inside closures the path ends with "::{{closure}}" once per level.
        name.trim_end_matches("::{{closure}}")
    }};
}

#[cfg(test)]
mod tests {
    #[test]
    fn function_name_is_the_enclosing_fn() {
        assert_eq!(
            crate::__function_name!(),
            "ferry_tests::tests::function_name_is_the_enclosing_fn"
        );
        let closure = || crate::__function_name!();
        let from_closure = closure();
        assert_eq!(
            from_closure,
            "ferry_tests::tests::function_name_is_the_enclosing_fn"
        );
    }
}
