//! A node as the proxy sees it: a machine outside with the node's default route towards
//! it, pods on `ferry-bridge` (addresses from `ferry-ipam`), and bridged traffic sent
//! through netfilter so Service NAT is undone on the way back.

use std::net::IpAddr;

use serde_json::{json, Value};

use crate::{ferry_bin, unique_v4_subnet, CniCall, Netns, Node, Pod};

/// The node's address on the link to the outside machine.
pub const NODE_IP: &str = "203.0.113.1";
/// The outside machine's address.
pub const OUTSIDE_IP: &str = "203.0.113.2";

/// A node with an outside machine and a Pod network.
pub struct PodNetwork {
    pub node: Node,
    pub outside: Netns,
    /// The pods' IPv4 subnet (the cluster CIDR the proxy is given).
    pub subnet: String,
    conf: Value,
}

impl PodNetwork {
    pub fn new(tag: &str) -> PodNetwork {
        let node = Node::new(tag);
        let outside = node.client("outside");
        node.connect_client(&outside, &format!("{OUTSIDE_IP}/24"), &format!("{NODE_IP}/24"));
        // A route out, so "refused" never passes because the node had no route at all;
        // and bridged pod-to-Service traffic must cross netfilter to be un-NATed.
        node.netns()
            .exec_ok(&["ip", "route", "add", "default", "via", OUTSIDE_IP]);
        node.forward_and_filter_bridged();
        let subnet = unique_v4_subnet(24);
        let conf = json!({
            "cniVersion": "1.1.0", "name": "pods", "type": "ferry-bridge",
            "isGateway": true, "isDefaultGateway": true, "ipMasq": true,
            "ipam": {"type": "ferry-ipam", "ranges": [[{"subnet": subnet}]], "dataDir": node.state_dir().join("ipam")}
        });
        PodNetwork {
            node,
            outside,
            subnet,
            conf,
        }
    }

    /// A new pod on the network and its IPv4 address.
    pub fn add_pod(&self, name: &str) -> (Pod, IpAddr) {
        let pod = self.node.pod(name);
        let r = CniCall::new(ferry_bin("ferry-bridge"), "ADD", self.conf.clone())
            .for_pod(&pod)
            .run_in(self.node.netns())
            .ok();
        let ip = r["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in the ADD result {r}"));
        (pod, ip)
    }

    /// The gateway (the node's address on cni0): what a masqueraded packet comes from.
    pub fn gateway(&self) -> IpAddr {
        let net: std::net::Ipv4Addr = self.subnet.split('/').next().unwrap().parse().unwrap();
        IpAddr::V4((u32::from(net) + 1).into())
    }
}
