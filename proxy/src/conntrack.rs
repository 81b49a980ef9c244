//! Deleting the conntrack entries of UDP flows to endpoints that went away.
//!
//! UDP has no connection to close: a client that keeps sending from one socket keeps
//! matching its conntrack entry, whose NAT still points at the removed endpoint, until the
//! entry times out (30 s to 180 s). kube-proxy deletes those entries, and so does Ferry,
//! over ctnetlink (`NETLINK_NETFILTER`), with no `conntrack` program:
//!
//! 1. one dump of the conntrack table per address family concerned;
//! 2. the entries that match a [`UdpFlowFilter`] are collected: protocol UDP, reply source
//!    the removed endpoint (so the flow was DNATed to it), original destination a Service
//!    address and port, or the NodePort on any address other than the endpoint itself;
//! 3. each one is deleted by its original tuple and zone; one that is already gone is fine.
//!
//! TCP entries are never deleted: the filter requires protocol 17, and a delete names one
//! UDP tuple. Which flows are stale is the proxy's policy and lives here; the socket, the
//! dump and the delete-by-tuple are the kernel layer's (`ferry_netlink::conntrack`). The
//! socket is opened in the network namespace of the calling thread.

use std::net::{IpAddr, SocketAddr};

pub use ferry_netlink::conntrack::Entry;
use ferry_netlink::conntrack::IpFamily;
pub use ferry_netlink::Error;

/// Which UDP flows to delete: those DNATed to `endpoint` from a Service address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpFlowFilter {
    /// ClusterIP, external and load-balancer IPs of the Service port.
    pub service_ips: Vec<IpAddr>,
    /// The Service port clients send to on those addresses.
    pub service_port: u16,
    /// The NodePort, matched on any destination address.
    pub node_port: Option<u16>,
    /// The endpoint that went away.
    pub endpoint: SocketAddr,
}

const IPPROTO_UDP: u8 = 17;

impl UdpFlowFilter {
    pub fn matches(&self, e: &Entry) -> bool {
        if e.proto != IPPROTO_UDP || e.reply_src != self.endpoint {
            return false;
        }
        let to_service =
            e.orig_dst.port() == self.service_port && self.service_ips.contains(&e.orig_dst.ip());
        let to_node_port = self.node_port == Some(e.orig_dst.port()) && e.orig_dst.ip() != self.endpoint.ip();
        to_service || to_node_port
    }
}

/// A ctnetlink socket in the network namespace of the thread that opened it. Keep it:
/// closing a netfilter netlink socket waits for an RCU grace period (~10 ms).
#[derive(Debug)]
pub struct Conntrack(ferry_netlink::Socket<ferry_netlink::conntrack::Conntrack>);

impl Conntrack {
    pub fn open() -> Result<Conntrack, Error> {
        ferry_netlink::Socket::open().map(Conntrack)
    }

    /// Deletes every UDP conntrack entry that one of `filters` matches. Returns how many
    /// were deleted.
    pub fn delete_udp_flows(&mut self, filters: &[UdpFlowFilter]) -> Result<usize, Error> {
        let mut deleted = 0;
        for family in [IpFamily::V4, IpFamily::V6] {
            if !filters.iter().any(|f| IpFamily::of(f.endpoint.ip()) == family) {
                continue;
            }
            let entries = self.0.entries(family)?;
            for e in entries.iter().filter(|e| filters.iter().any(|f| f.matches(e))) {
                if self.0.delete(e)? {
                    deleted += 1;
                }
            }
        }
        Ok(deleted)
    }
}

/// Every conntrack entry of one family (`libc::AF_INET` or `AF_INET6`) in the calling
/// thread's network namespace. For tests and diagnostics.
pub fn list(family: u8) -> Result<Vec<Entry>, Error> {
    let family = IpFamily::from_af(family)?;
    Conntrack::open()?.0.entries(family)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(proto: u8, dst: &str, reply_src: &str) -> Entry {
        Entry {
            proto,
            orig_src: "10.2.0.5:40000".parse().unwrap(),
            orig_dst: dst.parse().unwrap(),
            reply_src: reply_src.parse().unwrap(),
            zone: 0,
        }
    }

    #[test]
    fn filter_matches_only_udp_to_the_service_and_the_endpoint() {
        let f = UdpFlowFilter {
            service_ips: vec!["10.96.0.10".parse().unwrap()],
            service_port: 53,
            node_port: Some(30053),
            endpoint: "10.1.0.2:5353".parse().unwrap(),
        };
        assert!(f.matches(&entry(17, "10.96.0.10:53", "10.1.0.2:5353")));
        assert!(f.matches(&entry(17, "192.168.1.1:30053", "10.1.0.2:5353")));
        assert!(
            !f.matches(&entry(6, "10.96.0.10:53", "10.1.0.2:5353")),
            "TCP is never touched"
        );
        assert!(
            !f.matches(&entry(17, "10.96.0.10:53", "10.1.0.3:5353")),
            "another endpoint"
        );
        assert!(
            !f.matches(&entry(17, "10.96.0.11:53", "10.1.0.2:5353")),
            "another service"
        );
        assert!(
            !f.matches(&entry(17, "10.1.0.2:30053", "10.1.0.2:5353")),
            "not NATed"
        );
    }
}
