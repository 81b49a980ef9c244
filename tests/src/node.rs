//! A node (the netns where plugins and the proxy run), its pods and outside clients.

use std::ops::Deref;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use tempfile::TempDir;

use crate::netns::run_ip;
use crate::Netns;

/// A Kubernetes node in miniature: its own netns and a temp directory for node state
/// (IPAM data dirs, conflists). Both go away on drop.
#[derive(Debug)]
pub struct Node {
    // Field order is drop order: the namespace goes before the state directory.
    netns: Netns,
    state: TempDir,
    links: AtomicU32,
}

/// A pod's network namespace; derefs to its [`Netns`].
#[derive(Debug)]
pub struct Pod {
    netns: Netns,
}

impl Node {
    pub fn new(tag: &str) -> Node {
        let netns = Netns::new(tag);
        let state = tempfile::Builder::new()
            .prefix(&format!("ferry-{}-", netns.name()))
            .tempdir()
            .expect("cannot create the node's state directory under $TMPDIR");
        Node {
            netns,
            state,
            links: AtomicU32::new(0),
        }
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The node's netns name.
    pub fn name(&self) -> &str {
        self.netns.name()
    }

    /// A private directory for this node's state, removed on drop.
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// A new, empty pod netns (only `lo`, up). Plugins wire it to the node.
    pub fn pod(&self, tag: &str) -> Pod {
        Pod {
            netns: Netns::new(tag),
        }
    }

    /// Makes the node forward IPv4 and IPv6 and pass bridged traffic through netfilter, as
    /// a node with Services and NetworkPolicy must: Pod-to-Pod traffic on one bridge is
    /// judged (and un-NATed) only when br_netfilter hands it to the `inet` hooks. Writes
    /// only this node's netns's sysctls; panics if br_netfilter is not loaded.
    pub fn forward_and_filter_bridged(&self) {
        self.netns.run(|| {
            for path in [
                "net/ipv4/ip_forward",
                "net/ipv6/conf/all/forwarding",
                "net/bridge/bridge-nf-call-iptables",
                "net/bridge/bridge-nf-call-ip6tables",
            ] {
                std::fs::write(format!("/proc/sys/{path}"), "1").unwrap_or_else(|e| {
                    panic!(
                        "sysctl {path} in node {}: {e} (is br_netfilter loaded?)",
                        self.name()
                    )
                });
            }
        });
    }

    /// A netns standing for a machine outside the node (see [`Node::connect_client`]).
    pub fn client(&self, tag: &str) -> Netns {
        Netns::new(tag)
    }

    /// Wires `client` to this node with a veth pair: `eth0` in the client with
    /// `client_cidr`, a fresh interface in the node with `node_cidr` (returned), both up,
    /// and the client's default route via the node's address. One pair per client; both
    /// CIDRs of one family (`10.0.0.2/24`, `10.0.0.1/24`). Runs `ip` only inside these
    /// two namespaces.
    pub fn connect_client(&self, client: &Netns, client_cidr: &str, node_cidr: &str) -> String {
        let node_if = format!("fyc{}", self.links.fetch_add(1, Ordering::Relaxed));
        let (c, n) = (client.name(), self.name());
        run_ip(&[
            "-n", c, "link", "add", "eth0", "type", "veth", "peer", "name", &node_if, "netns", n,
        ]);
        // IPv6 duplicate address detection would leave the addresses unusable for a while.
        let nodad: &[&str] = if client_cidr.contains(':') {
            &["nodad"]
        } else {
            &[]
        };
        for (ns, dev, cidr) in [(c, "eth0", client_cidr), (n, node_if.as_str(), node_cidr)] {
            run_ip(&[&["-n", ns, "addr", "add", cidr, "dev", dev], nodad].concat());
            run_ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        let gateway = node_cidr.split('/').next().unwrap_or(node_cidr);
        run_ip(&["-n", c, "route", "add", "default", "via", gateway, "dev", "eth0"]);
        node_if
    }

    /// Wires `pod` to bridge `bridge` of this node by hand, without a CNI plugin, for tests
    /// that need Pods but not ferry-bridge: a veth pair, `eth0` in the Pod, `port` on the
    /// bridge with hairpin on; `cidrs` on `eth0` (IPv6 without duplicate address
    /// detection), a default route via each of `gateways`. Runs `ip` only inside these two
    /// namespaces.
    pub fn wire_pod(&self, pod: &Pod, bridge: &str, port: &str, cidrs: &[&str], gateways: &[&str]) {
        let (n, p) = (self.name(), pod.name());
        run_ip(&[
            "-n", n, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", p,
        ]);
        run_ip(&["-n", n, "link", "set", port, "master", bridge]);
        run_ip(&[
            "-n",
            n,
            "link",
            "set",
            port,
            "type",
            "bridge_slave",
            "hairpin",
            "on",
        ]);
        run_ip(&["-n", n, "link", "set", port, "up"]);
        for cidr in cidrs {
            let nodad: &[&str] = if cidr.contains(':') { &["nodad"] } else { &[] };
            run_ip(&[&["-n", p, "addr", "add", cidr, "dev", "eth0"], nodad].concat());
        }
        run_ip(&["-n", p, "link", "set", "eth0", "up"]);
        for gateway in gateways {
            let family = if gateway.contains(':') { "-6" } else { "-4" };
            run_ip(&["-n", p, family, "route", "add", "default", "via", gateway]);
        }
    }
}

impl Pod {
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The container id a runtime would use for this pod (unique, like the netns name).
    pub fn container_id(&self) -> String {
        format!("ctr-{}", self.netns.name())
    }
}

impl Deref for Pod {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.netns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{list_netns, reference_plugin, CniCall};

    #[test]
    fn node_and_pod_exist_until_dropped() {
        crate::require_root!();
        let node = Node::new("node-test");
        let pod = node.pod("pod-test");
        let (node_name, pod_name) = (node.name().to_owned(), pod.name().to_owned());
        let state = node.state_dir().to_path_buf();
        let names = list_netns();
        assert!(names.contains(&node_name), "{node_name} not in {names:?}");
        assert!(names.contains(&pod_name), "{pod_name} not in {names:?}");
        assert!(pod.path().exists() && state.is_dir());
        // lo is up, so a pod can talk to itself.
        let lo = pod.exec_ok(&["ip", "-o", "link", "show", "lo"]);
        assert!(lo.contains("UP"), "{lo}");
        drop(pod);
        drop(node);
        let names = list_netns();
        assert!(!names.contains(&node_name), "{node_name} still in {names:?}");
        assert!(!names.contains(&pod_name), "{pod_name} still in {names:?}");
        assert!(!state.exists(), "{} still exists", state.display());
    }

    #[test]
    fn a_panicking_test_still_removes_its_netns() {
        crate::require_root!();
        let name = std::sync::Mutex::new(String::new());
        let result = std::panic::catch_unwind(|| {
            let ns = Netns::new("panics");
            *name.lock().unwrap() = ns.name().to_owned();
            panic!("test failure while {} exists", ns.name());
        });
        assert!(result.is_err());
        let name = name.into_inner().unwrap();
        assert!(!name.is_empty());
        assert!(!list_netns().contains(&name), "{name} survived the panic");
    }

    #[test]
    fn command_runs_inside_the_netns() {
        crate::require_root!();
        let node = Node::new("cmd");
        let name = node.name();
        run_ip(&[
            "-n", name, "link", "add", "fytest0", "type", "veth", "peer", "fytest1",
        ]);
        let out = node
            .netns()
            .command("ip")
            .args(["-o", "link", "show"])
            .output()
            .unwrap();
        let links = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        // Exactly this namespace's links: lo and the veth pair, nothing from the host.
        assert_eq!(links.lines().count(), 3, "{links}");
        assert!(links.contains("fytest0"), "{links}");
    }

    #[test]
    fn client_is_connected_to_the_node() {
        crate::require_root!();
        let node = Node::new("conn");
        let client = node.client("client");
        let node_if = node.connect_client(&client, "192.168.77.2/24", "192.168.77.1/24");
        let addrs = node
            .netns()
            .exec_ok(&["ip", "-o", "addr", "show", "dev", &node_if]);
        assert!(addrs.contains("192.168.77.1/24"), "{addrs}");
        let routes = client.exec_ok(&["ip", "route", "show", "default"]);
        assert!(routes.contains("via 192.168.77.1 dev eth0"), "{routes}");
        // A TCP connect to a closed port answered with a reset ("Connection refused") is a
        // round trip across the pair, using nothing beyond bash.
        let out = client.exec(&["bash", "-c", "exec 3<>/dev/tcp/192.168.77.1/9"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Connection refused"), "{err}");
    }

    /// The runtime stand-in against Debian's host-local, when installed: proves the env
    /// and stdin plumbing with a known-good plugin.
    #[test]
    fn cni_call_drives_the_reference_host_local() {
        crate::require_root!();
        let Some(host_local) = reference_plugin("host-local") else {
            crate::skip_or_fail(
                crate::__function_name!(),
                "no /usr/lib/cni/host-local: install containernetworking-plugins (scripts/setup.sh does)",
            );
            return;
        };
        let node = Node::new("hl");
        let pod = node.pod("p");
        let subnet = crate::unique_v4_subnet(24);
        let conf = serde_json::json!({
            "cniVersion": "1.0.0", "name": "hl", "type": "bridge",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                     "dataDir": node.state_dir().join("ipam")},
        });
        let version = CniCall::new(&host_local, "VERSION", conf.clone()).run_in(node.netns());
        assert!(version.ok()["supportedVersions"].is_array(), "{version}");

        let add = CniCall::new(&host_local, "ADD", conf.clone())
            .for_pod(&pod)
            .run_in(node.netns())
            .ok();
        let ip = add["ips"][0]["address"].as_str().unwrap();
        let prefix = subnet.rsplit_once(".0/").unwrap().0;
        assert!(ip.starts_with(prefix), "{ip} not in {subnet}");

        let (code, msg, _) = CniCall::new(&host_local, "ADD", conf.clone())
            .for_pod(&pod)
            .unset_env("CNI_IFNAME")
            .run_in(node.netns())
            .err();
        assert_eq!(code, 4, "{msg}");
        assert!(msg.contains("CNI_IFNAME"), "{msg}");
        let (code, _, _) = CniCall::new(&host_local, "ADD", conf.clone())
            .stdin_raw("{nope")
            .for_pod(&pod)
            .run_in(node.netns())
            .err();
        assert_ne!(code, 0);

        let del = CniCall::new(&host_local, "DEL", conf)
            .container_id(pod.container_id())
            .netns(None)
            .run_in(node.netns());
        assert_eq!(del.ok(), serde_json::Value::Null);
    }
}
