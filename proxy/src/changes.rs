//! What changed between two plans, for every back end: which Service ports differ, and
//! which UDP conntrack entries a change leaves stale.
//!
//! As kube-proxy's shared change trackers (pkg/proxy), this sits between the plans and the
//! back ends and belongs to neither. The plan says, for each re-planned Service, which of
//! its ports differ from before ([`diff_ports`], called by `plan_services`); the sync loop
//! collects those in a [`ChangeTracker`] until a sync succeeds and hands them to the back
//! end as [`Changes`]. A back end never trusts a log riding on the plan, and the plan holds
//! nothing but its value, so two plans compare with `==`.
//!
//! [`stale_udp_flows`] decides which UDP flows must lose their conntrack entries when a
//! port changes, so that every back end clears the same ones; the back end executes the
//! deletion (see its docs for why there).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};

use crate::conntrack::UdpFlowFilter;
use crate::plan::{Protocol, ServicePort, ServicePortId};

/// Which Service ports may differ from the plan a back end last applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceChanges {
    /// Unknown (the first sync, a periodic resync that re-planned everything): the back end
    /// compares every port with what it applied.
    All,
    /// Only these ports (added, changed or removed) may differ; every other port is as it
    /// was at the last successful sync.
    Ports(BTreeSet<ServicePortId>),
}

impl ServiceChanges {
    pub fn none() -> ServiceChanges {
        ServiceChanges::Ports(BTreeSet::new())
    }

    /// Whether port `id` may have changed.
    pub fn contains(&self, id: &ServicePortId) -> bool {
        match self {
            ServiceChanges::All => true,
            ServiceChanges::Ports(ids) => ids.contains(id),
        }
    }

    /// Adds what `other` says changed.
    fn merge(&mut self, other: ServiceChanges) {
        match (&mut *self, other) {
            (ServiceChanges::All, _) => {}
            (_, ServiceChanges::All) => *self = ServiceChanges::All,
            (ServiceChanges::Ports(mine), ServiceChanges::Ports(theirs)) => mine.extend(theirs),
        }
    }
}

/// What may differ, per part of the [`Plan`](crate::plan::Plan), since the last successful
/// sync: what a back end gets beside the plan. NetworkPolicy's part comes with its table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    pub services: ServiceChanges,
}

impl Changes {
    /// Everything may have changed: compare it all.
    pub fn all() -> Changes {
        Changes {
            services: ServiceChanges::All,
        }
    }

    /// Nothing changed.
    pub fn none() -> Changes {
        Changes {
            services: ServiceChanges::none(),
        }
    }

    /// Only these Service ports may have changed.
    pub fn service_ports(ids: impl IntoIterator<Item = ServicePortId>) -> Changes {
        Changes {
            services: ServiceChanges::Ports(ids.into_iter().collect()),
        }
    }
}

/// The sync loop's record of what changed since the last successful sync. It starts at
/// "everything" (nothing was synced yet); a failed sync gives its changes back, so the
/// next one covers them too.
#[derive(Debug)]
pub struct ChangeTracker {
    pending: Changes,
}

impl Default for ChangeTracker {
    fn default() -> Self {
        ChangeTracker::new()
    }
}

impl ChangeTracker {
    pub fn new() -> ChangeTracker {
        ChangeTracker {
            pending: Changes::all(),
        }
    }

    /// Every Service port may have changed (the Services were planned afresh).
    pub fn all_services(&mut self) {
        self.pending.services = ServiceChanges::All;
    }

    /// These Service ports changed (what `plan_services` returns).
    pub fn service_ports(&mut self, ids: impl IntoIterator<Item = ServicePortId>) {
        self.pending
            .services
            .merge(ServiceChanges::Ports(ids.into_iter().collect()));
    }

    /// What changed since the last successful sync.
    pub fn pending(&self) -> &Changes {
        &self.pending
    }

    /// Takes the changes for a sync, leaving "nothing": a success keeps it so, a failure
    /// hands them back with [`ChangeTracker::give_back`].
    pub fn take(&mut self) -> Changes {
        std::mem::replace(&mut self.pending, Changes::none())
    }

    /// The sync of `changes` failed: they are still to be applied, with whatever changed
    /// meanwhile.
    pub fn give_back(&mut self, changes: Changes) {
        self.pending.services.merge(changes.services);
    }
}

/// The ids of the ports that differ between `old` and `new` (ports of the same Services,
/// or whole tables): present in one only, or present in both with another value.
pub fn diff_ports<'a>(
    old: impl IntoIterator<Item = &'a ServicePort>,
    new: impl IntoIterator<Item = &'a ServicePort>,
) -> BTreeSet<ServicePortId> {
    let mut old: BTreeMap<&ServicePortId, &ServicePort> = old.into_iter().map(|p| (&p.id, p)).collect();
    let mut changed = BTreeSet::new();
    for port in new {
        if old.remove(&port.id) != Some(port) {
            changed.insert(port.id.clone());
        }
    }
    changed.extend(old.into_keys().cloned());
    changed
}

/// The UDP flows whose conntrack entries must go when port `old` becomes `new` (None: the
/// port is gone): those toward endpoints `old` had and `new` has not, sent to any of the
/// Service's addresses and ports (cluster, external and load-balancer IPs, the NodePort on
/// any address). Without this, a UDP client that keeps its source port keeps talking to
/// the endpoint that went away. TCP and SCTP flows are never named: their connections end
/// on their own, and cutting them would break what still works.
pub fn stale_udp_flows(old: &ServicePort, new: Option<&ServicePort>) -> Vec<UdpFlowFilter> {
    if old.id.protocol != Protocol::Udp {
        return Vec::new();
    }
    let keep: HashSet<(IpAddr, u16)> = new.map(|n| all_endpoints(n).collect()).unwrap_or_default();
    let gone: BTreeSet<(IpAddr, u16)> = all_endpoints(old).filter(|e| !keep.contains(e)).collect();
    if gone.is_empty() {
        return Vec::new();
    }
    let service_ips: Vec<IpAddr> = old
        .cluster_ip
        .iter()
        .chain(&old.external_ips)
        .chain(&old.load_balancer_ips)
        .copied()
        .collect();
    gone.into_iter()
        .map(|(ip, port)| UdpFlowFilter {
            service_ips: service_ips.clone(),
            service_port: old.port,
            node_port: old.node_port,
            endpoint: SocketAddr::new(ip, port),
        })
        .collect()
}

/// Every endpoint a port sends traffic to, whichever the traffic.
fn all_endpoints(p: &ServicePort) -> impl Iterator<Item = (IpAddr, u16)> + '_ {
    p.cluster_endpoints
        .iter()
        .chain(&p.external_endpoints)
        .chain(&p.short_circuit_endpoints)
        .map(|e| (e.ip, e.port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Endpoint, Family};

    fn ep(ip: &str, port: u16) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port,
            is_local: true,
            ready: true,
        }
    }

    fn port(name: &str, protocol: Protocol) -> ServicePort {
        let id = ServicePortId {
            namespace: "default".into(),
            name: name.into(),
            port_name: String::new(),
            protocol,
            family: Family::V4,
        };
        ServicePort::new(id, Some("10.96.0.10".parse().unwrap()), 53)
    }

    #[test]
    fn stale_udp_flows_name_only_removed_endpoints() {
        let mut old = port("dns", Protocol::Udp);
        old.node_port = Some(30053);
        old.cluster_endpoints = vec![ep("10.1.0.2", 53), ep("10.1.0.3", 53)];
        old.external_endpoints = old.cluster_endpoints.clone();
        let mut new = old.clone();
        new.cluster_endpoints.remove(0);
        new.external_endpoints.remove(0);
        let flows = stale_udp_flows(&old, Some(&new));
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].endpoint, "10.1.0.2:53".parse().unwrap());
        assert_eq!(
            flows[0].service_ips,
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(flows[0].node_port, Some(30053));
        assert!(stale_udp_flows(&old, Some(&old)).is_empty());
        assert_eq!(stale_udp_flows(&old, None).len(), 2);
    }

    #[test]
    fn tcp_and_sctp_flows_are_never_stale() {
        for protocol in [Protocol::Tcp, Protocol::Sctp] {
            let mut old = port("web", protocol);
            old.cluster_endpoints = vec![ep("10.1.0.2", 80)];
            assert!(stale_udp_flows(&old, None).is_empty(), "{protocol:?}");
        }
    }

    #[test]
    fn diff_ports_names_added_removed_and_changed_ports_only() {
        let a = port("a", Protocol::Tcp);
        let b = port("b", Protocol::Tcp);
        let c = port("c", Protocol::Tcp);
        let mut b2 = b.clone();
        b2.cluster_endpoints = vec![ep("10.1.0.2", 80)];
        let d = port("d", Protocol::Tcp);
        let got = diff_ports([&a, &b, &c], [&a, &b2, &d]);
        let want: BTreeSet<ServicePortId> = [&b, &c, &d].iter().map(|p| p.id.clone()).collect();
        assert_eq!(got, want);
        assert!(diff_ports([&a, &b], [&b, &a]).is_empty());
    }

    #[test]
    fn the_tracker_keeps_changes_until_a_sync_succeeds() {
        let id = |name: &str| port(name, Protocol::Tcp).id;
        let mut tracker = ChangeTracker::new();
        assert_eq!(tracker.take(), Changes::all(), "nothing synced yet");
        assert_eq!(tracker.take(), Changes::none(), "the first sync succeeded");

        tracker.service_ports([id("a")]);
        let failed = tracker.take();
        assert_eq!(failed, Changes::service_ports([id("a")]));
        tracker.service_ports([id("b")]);
        tracker.give_back(failed);
        assert_eq!(tracker.pending(), &Changes::service_ports([id("a"), id("b")]));

        tracker.all_services();
        tracker.service_ports([id("c")]);
        assert_eq!(tracker.take(), Changes::all());
        tracker.service_ports([id("d")]);
        tracker.give_back(Changes::all());
        assert!(tracker.pending().services.contains(&id("z")));
    }
}
