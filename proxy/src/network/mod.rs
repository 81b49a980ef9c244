//! The Pod network between nodes: what this node needs, given every Node, so that its Pods
//! reach the Pods of every other node, and how it is put in place.
//!
//! Data flow, as elsewhere in the daemon: Nodes (their `spec.podCIDRs` and `InternalIP`
//! addresses, from the store's [`NodeInfo`]) and a few facts of this host ([`HostFacts`]:
//! its connected subnets and link MTUs) go into [`plan`], a pure function, which gives a
//! [`NodeNetwork`]; [`agent`] applies it, each concern in its own file:
//!
//! - [`conflist`]: `10-ferry.conflist` for the container runtime (ferry-bridge delegating
//!   to ferry-ipam, one range set per Pod CIDR of this node), written atomically and only
//!   when its bytes change;
//! - [`masquerade`]: Pod traffic leaving the cluster CIDR gets the node's address; traffic
//!   between Pods keeps its source (table `inet ferry-network`);
//! - [`routes`]: a route per peer Pod CIDR, straight via the peer's address of the same
//!   family when it is on a connected subnet (host-gw), else over [`vxlan`] (one device,
//!   an FDB and a neighbour entry per peer). Every route carries Ferry's route protocol
//!   number, [`ROUTE_PROTOCOL`], so Ferry lists and changes only its own.
//!
//! Nothing is derived from anything but Node objects: the VXLAN VNI and port are flags
//! every node gets alike, and a node's VTEP MAC is a function of its IPv4 InternalIP
//! ([`vtep_mac`]), so no node writes to the API.
//!
//! # What the paths cost (measured)
//!
//! `cargo bench -p ferry-tests --bench multinode`, Linux 6.18 in namespaces on 2 loaded
//! cores, two runs: TCP connect p50 from a Pod to a Pod on the same node 9.5-10.0 us, on a
//! host-gw peer 13.9-14.5 us (1.45x), on a VXLAN peer 22.7-23.2 us (2.3-2.4x); bulk
//! rates over veths stay within the noise of one another (18-27 Gb/s, GSO carries
//! VXLAN's encapsulation). A Node written to a manifests directory has its route on the
//! other nodes 190 ms later (median of 5), the 200 ms poll of that directory included.
//!
//! # When it is on
//!
//! The daemon manages the Pod network only with `--cluster-cidr` (needed to masquerade
//! what leaves the cluster, since the conflist turns ferry-bridge's own masquerade off)
//! and `--pod-network-mode` other than `none`, and only once this node's Node has Pod
//! CIDRs. `none` is for users who run another CNI (flannel, Calico, kindnet) and want
//! Ferry only as kube-proxy: with it the daemon writes no conflist and no route. Without
//! `--cluster-cidr` the daemon is a kube-proxy replacement only, as before.

pub mod agent;
pub mod conflist;
mod error;
pub mod masquerade;
pub mod nodes;
pub mod routes;
pub mod vxlan;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;

use ipnetwork::IpNetwork;

use crate::store::objects::NodeInfo;

pub use error::NetworkError;

/// Ferry's route protocol number (`ip route show proto 118`). Unused by the numbers
/// iproute2 lists in `/etc/iproute2/rt_protos` (routing daemons take 8-18, 42, 99 and
/// 186-192); put `118 ferry` in `/etc/iproute2/rt_protos.d/ferry.conf` to see it by name.
pub const ROUTE_PROTOCOL: u8 = 118;

/// The VXLAN device's name on every node.
pub const VXLAN_DEVICE: &str = "ferry.vxlan";

/// VXLAN over IPv4: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) bytes.
pub const VXLAN_OVERHEAD_V4: u32 = 50;

/// flannel's VNI and Linux's VXLAN port: a cluster that moves from flannel's vxlan backend
/// keeps its firewall rules (UDP 8472 between nodes).
pub const DEFAULT_VNI: u32 = 1;
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

/// When the MTU of the link holding the node's address is unknown.
const FALLBACK_MTU: u32 = 1500;

/// How Pod traffic reaches other nodes (`--pod-network-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A route via the peer's address; peers not on a connected subnet are left out (and
    /// logged).
    HostGw,
    /// Every peer over VXLAN.
    Vxlan,
    /// Per peer: host-gw when its address is on a connected subnet, VXLAN otherwise.
    Auto,
    /// No Pod network: Ferry is a kube-proxy replacement only.
    None,
}

/// What the Pod network needs besides Nodes: the flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSettings {
    pub node_name: String,
    pub mode: Mode,
    /// Where `10-ferry.conflist` goes; `None`: it is not written.
    pub cni_conf_dir: Option<PathBuf>,
    /// ferry-ipam's `dataDir` in the conflist.
    pub ipam_data_dir: PathBuf,
    /// The bridge ferry-bridge makes (`bridge` in the conflist).
    pub bridge: String,
    pub cluster_cidrs: Vec<IpNetwork>,
    pub vni: u32,
    pub vxlan_port: u16,
}

/// What the plan needs to know of this host: the subnets of its addresses and the MTU of
/// the link each address is on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    pub addresses: Vec<HostAddress>,
}

/// One address of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostAddress {
    /// The address with its prefix (`192.168.1.10/24`).
    pub net: IpNetwork,
    /// Its link's index and MTU.
    pub link: u32,
    pub mtu: u32,
}

impl HostFacts {
    fn is_connected(&self, ip: IpAddr) -> bool {
        self.addresses.iter().any(|a| {
            a.net.prefix() < if ip.is_ipv4() { 32 } else { 128 } && a.net.contains(ip) && a.net.ip() != ip
        })
    }

    /// The address entry holding `ip`.
    pub fn holding(&self, ip: IpAddr) -> Option<&HostAddress> {
        self.addresses.iter().find(|a| a.net.ip() == ip)
    }

    fn mtu_of(&self, ip: IpAddr) -> Option<u32> {
        self.holding(ip).map(|a| a.mtu)
    }
}

/// Everything this node's Pod network consists of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeNetwork {
    /// The conflist's bytes; `None` until this node has Pod CIDRs.
    pub conflist: Option<String>,
    /// Masquerade rules; empty: the table is removed.
    pub masquerade: Vec<masquerade::MasqueradeRule>,
    /// The VXLAN device: always with `vxlan`, while a peer is reached over it with `auto`.
    pub vxlan: Option<VxlanDevice>,
    /// One route per peer Pod CIDR, by destination.
    pub routes: BTreeMap<IpNetwork, PeerRoute>,
    /// Peers (or their CIDRs) that get no route, and why: logged when they change.
    pub unreachable: Vec<String>,
}

/// The VXLAN device of this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanDevice {
    pub vni: u32,
    pub port: u16,
    /// This node's IPv4 InternalIP: the tunnel's local end.
    pub local: Ipv4Addr,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// A route to a peer's Pod CIDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRoute {
    pub node: Arc<str>,
    pub via: Via,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// host-gw: via the peer's address, on a connected subnet.
    Direct(IpAddr),
    /// Over the VXLAN device: via the peer's gateway address in its Pod CIDR (`onlink`),
    /// which a static neighbour entry maps to the peer's VTEP MAC, which an FDB entry
    /// maps to the peer's underlay address.
    Vxlan {
        gateway: IpAddr,
        mac: [u8; 6],
        remote: Ipv4Addr,
    },
}

/// A node's VTEP MAC: `0e:fe` and its IPv4 address, locally administered and unicast, so
/// every node computes every other node's from the Node object alone.
pub fn vtep_mac(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x0e, 0xfe, a, b, c, d]
}

/// The gateway address of a Pod CIDR: its first address, as ferry-ipam (and host-local)
/// choose it when the conflist names none, and as ferry-bridge puts it on the bridge.
pub fn pod_gateway(cidr: IpNetwork) -> IpAddr {
    match cidr.network() {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a).wrapping_add(1))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add(1))),
    }
}

fn first_v4(ips: &[IpAddr]) -> Option<Ipv4Addr> {
    ips.iter().find_map(|ip| match ip {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    })
}

/// This node's Pod network given every Node (this one among them) and the host's facts.
/// Pure: the same inputs give the same network, byte for byte.
pub fn plan<'a>(
    settings: &NetworkSettings,
    nodes: impl IntoIterator<Item = &'a NodeInfo>,
    host: &HostFacts,
) -> NodeNetwork {
    let mut out = NodeNetwork::default();
    if settings.mode == Mode::None {
        return out;
    }
    let nodes: Vec<&NodeInfo> = nodes.into_iter().collect();
    let Some(this) = nodes.iter().find(|n| *n.name == *settings.node_name) else {
        return out;
    };
    if this.pod_cidrs.is_empty() {
        return out;
    }
    let local_v4 = first_v4(&this.internal_ips);
    let underlay_mtu = local_v4
        .and_then(|ip| host.mtu_of(ip.into()))
        .unwrap_or(FALLBACK_MTU);
    let overlay_mtu = underlay_mtu.saturating_sub(VXLAN_OVERHEAD_V4);
    // auto lowers the Pods' MTU even while every peer is on a connected subnet: Pods live
    // longer than the set of peers, and one made with the full MTU would black-hole
    // full-size packets to a VXLAN peer that joins later.
    let pod_mtu = match settings.mode {
        Mode::Vxlan | Mode::Auto => Some(overlay_mtu),
        Mode::HostGw | Mode::None => None,
    };
    if settings.cni_conf_dir.is_some() {
        out.conflist = Some(conflist::render(settings, &this.pod_cidrs, pod_mtu));
    }
    out.vxlan = match (settings.mode, local_v4) {
        (Mode::Vxlan | Mode::Auto, Some(local)) => Some(VxlanDevice {
            vni: settings.vni,
            port: settings.vxlan_port,
            local,
            mac: vtep_mac(local),
            mtu: overlay_mtu,
        }),
        (Mode::Vxlan, None) => {
            out.unreachable.push(format!(
                "node {} has no IPv4 InternalIP: VXLAN needs one as its underlay address",
                this.name
            ));
            None
        }
        _ => None,
    };

    for peer in &nodes {
        if peer.name == this.name {
            continue;
        }
        for cidr in &peer.pod_cidrs {
            if this
                .pod_cidrs
                .iter()
                .any(|own| own.contains(cidr.network()) || cidr.contains(own.network()))
            {
                out.unreachable.push(format!(
                    "node {}: Pod CIDR {cidr} overlaps this node's; no route",
                    peer.name
                ));
                continue;
            }
            let same_family = peer
                .internal_ips
                .iter()
                .find(|ip| ip.is_ipv4() == cidr.is_ipv4())
                .copied();
            let direct = same_family.filter(|ip| host.is_connected(*ip));
            let over_vxlan = || {
                let remote = first_v4(&peer.internal_ips)?;
                out.vxlan.map(|_| Via::Vxlan {
                    gateway: pod_gateway(*cidr),
                    mac: vtep_mac(remote),
                    remote,
                })
            };
            let via = match settings.mode {
                Mode::HostGw => direct.map(Via::Direct),
                Mode::Vxlan => over_vxlan(),
                Mode::Auto => direct.map(Via::Direct).or_else(over_vxlan),
                Mode::None => None,
            };
            match via {
                Some(via) => {
                    out.routes.insert(
                        *cidr,
                        PeerRoute {
                            node: peer.name.clone(),
                            via,
                        },
                    );
                }
                None => out.unreachable.push(format!(
                    "node {}: no route to Pod CIDR {cidr} ({})",
                    peer.name,
                    match settings.mode {
                        Mode::HostGw =>
                            "its InternalIP of that family is on no subnet of this node; \
                                         use --pod-network-mode auto or vxlan",
                        _ => "VXLAN needs an IPv4 InternalIP on both nodes",
                    }
                )),
            }
        }
    }
    // auto makes the device only while a peer needs it: a cluster whose nodes share a
    // subnet has no tunnel to look at.
    if settings.mode == Mode::Auto && !out.routes.values().any(|r| matches!(r.via, Via::Vxlan { .. })) {
        out.vxlan = None;
    }
    out.masquerade = masquerade::plan(settings, this, &nodes);
    out
}

#[cfg(test)]
mod tests;
