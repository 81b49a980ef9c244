//! From a plan's [`ServicePort`] to the frontends the eBPF maps hold: pure, so every
//! decision about which address leads to which endpoints is tested without root.

use std::net::{IpAddr, SocketAddr};

use ferry_ebpf::{Frontend, ServiceBackends};

use crate::plan::{Endpoint, Protocol, ServicePort};

/// Why a part of a Service port is not programmed by the eBPF back end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// SCTP: the whole port is left out, inside and outside.
    ///
    /// Inside, no cgroup socket hook runs for SCTP sockets (Linux 6.6 source):
    /// `net/sctp/socket.c` `sctp_inet_connect()` goes straight to `sctp_connect()` and
    /// `__sctp_connect()`, `struct proto sctp_prot` has no `pre_connect` (the member
    /// through which `__inet_stream_connect()` runs `BPF_CGROUP_INET4_CONNECT` for TCP),
    /// and `BPF_CGROUP_UDP4/6_SENDMSG` run from `udp_sendmsg()`/`udpv6_sendmsg()` only.
    /// So a socket program never sees an SCTP connect or send. Outside, a tc program
    /// could rewrite addresses, but SCTP's checksum is a CRC32c over the whole packet (no
    /// pseudo-header, so no incremental `bpf_l4_csum_replace`) that would have to be
    /// recomputed in the program. The test kernel has no SCTP socket stack at all
    /// (`CONFIG_IP_SCTP` unset: `socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP)` fails with
    /// EPROTONOSUPPORT), so neither path could be tested end to end here.
    Sctp,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skipped::Sctp => f.write_str("SCTP is not served by the eBPF back end (use --backend nftables)"),
        }
    }
}

/// Every frontend of `port` with what it leads to, and what was left out.
///
/// `node_ips` are the node's addresses a NodePort answers on (already filtered by
/// `--nodeport-addresses`, loopback left out).
pub fn frontends(
    port: &ServicePort,
    node_ips: &[IpAddr],
) -> (Vec<(Frontend, ServiceBackends)>, Vec<Skipped>) {
    let mut out = Vec::new();
    let skipped = Vec::new();
    let protocol = match port.id.protocol {
        Protocol::Tcp => ferry_ebpf::Protocol::Tcp,
        Protocol::Udp => ferry_ebpf::Protocol::Udp,
        Protocol::Sctp => return (out, vec![Skipped::Sctp]),
    };
    let family_v4 = matches!(port.id.family, crate::plan::Family::V4);
    let inside = |eps: &[Endpoint]| ServiceBackends {
        endpoints: addrs(eps),
        affinity_seconds: port.affinity_seconds,
        keep_source: false,
        source_ranges: Vec::new(),
    };
    let cluster = inside(&port.cluster_endpoints);
    // With both traffic policies Local, in-cluster traffic to external addresses goes to
    // every endpoint, as kube-proxy's short-circuit does (see ServicePort).
    let from_inside_to_external = if port.external_local && port.internal_local {
        inside(&port.short_circuit_endpoints)
    } else {
        cluster.clone()
    };
    let from_outside = ServiceBackends {
        endpoints: addrs(&port.external_endpoints),
        affinity_seconds: port.affinity_seconds,
        keep_source: port.external_local,
        source_ranges: Vec::new(),
    };
    // loadBalancerSourceRanges guard the load-balancer IPs only, as in kube-proxy.
    let from_outside_to_lb = ServiceBackends {
        source_ranges: port.source_ranges.clone(),
        ..from_outside.clone()
    };
    if let Some(ip) = port.cluster_ip {
        out.push((Frontend::inside(ip, port.port, protocol), cluster.clone()));
    }
    let outside =
        |ip: IpAddr, p: u16, backends: &ServiceBackends, out: &mut Vec<(Frontend, ServiceBackends)>| {
            out.push((Frontend::outside(ip, p, protocol), backends.clone()));
        };
    for ip in &port.external_ips {
        out.push((
            Frontend::inside(*ip, port.port, protocol),
            from_inside_to_external.clone(),
        ));
        outside(*ip, port.port, &from_outside, &mut out);
    }
    for ip in &port.load_balancer_ips {
        out.push((
            Frontend::inside(*ip, port.port, protocol),
            from_inside_to_external.clone(),
        ));
        outside(*ip, port.port, &from_outside_to_lb, &mut out);
    }
    if let Some(node_port) = port.node_port {
        for ip in node_ips.iter().filter(|ip| ip.is_ipv4() == family_v4) {
            out.push((
                Frontend::inside(*ip, node_port, protocol),
                from_inside_to_external.clone(),
            ));
            outside(*ip, node_port, &from_outside, &mut out);
        }
    }
    (out, skipped)
}

fn addrs(eps: &[Endpoint]) -> Vec<SocketAddr> {
    eps.iter().map(|e| SocketAddr::new(e.ip, e.port)).collect()
}

/// For a port with session affinity: each frontend and the one whose affinity it shares,
/// the first of its scope (the ClusterIP inside; outside, the first node address with the
/// NodePort, else the first external or load-balancer IP). kube-proxy keeps affinity per
/// Service port, so a client that reaches the port by its NodePort and then by its
/// externalIP keeps its endpoint; the two scopes stay apart, as their clients are told
/// apart differently (network namespace inside, address outside).
pub(super) fn affinity_leaders(wanted: &[(Frontend, ServiceBackends)]) -> Vec<(Frontend, Frontend)> {
    let mut leaders: Vec<Frontend> = Vec::new();
    wanted
        .iter()
        .map(|(f, _)| {
            let leader = match leaders.iter().find(|l| l.scope == f.scope) {
                Some(l) => *l,
                None => {
                    leaders.push(*f);
                    *f
                }
            };
            (*f, leader)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Family, ServicePortId};
    use ferry_ebpf::Scope;

    fn ep(ip: &str, local: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port: 8080,
            is_local: local,
            ready: true,
        }
    }

    fn port(protocol: Protocol) -> ServicePort {
        let id = ServicePortId {
            namespace: "default".into(),
            name: "web".into(),
            port_name: String::new(),
            protocol,
            family: Family::V4,
        };
        let mut p = ServicePort::new(id, Some("10.96.0.10".parse().unwrap()), 80);
        p.cluster_endpoints = vec![ep("10.244.0.2", true), ep("10.244.1.2", false)];
        p.external_endpoints = p.cluster_endpoints.clone();
        p
    }

    fn find(fes: &[(Frontend, ServiceBackends)], ip: &str, port: u16, scope: Scope) -> ServiceBackends {
        fes.iter()
            .find(|(f, _)| f.ip == ip.parse::<IpAddr>().unwrap() && f.port == port && f.scope == scope)
            .unwrap_or_else(|| panic!("no frontend {ip}:{port} {scope:?} in {fes:?}"))
            .1
            .clone()
    }

    #[test]
    fn every_address_gets_an_inside_frontend_and_the_external_ones_an_outside_one() {
        let mut p = port(Protocol::Tcp);
        p.node_port = Some(30080);
        p.external_ips = vec!["198.51.100.20".parse().unwrap()];
        p.load_balancer_ips = vec!["198.51.100.10".parse().unwrap()];
        p.external_local = true;
        p.external_endpoints = vec![ep("10.244.0.2", true)];
        let node_ips: Vec<IpAddr> = vec!["192.168.1.7".parse().unwrap(), "fd00::7".parse().unwrap()];
        let (fes, skipped) = frontends(&p, &node_ips);
        // ClusterIP, 2 external addresses and 1 node address, each inside and outside (but the ClusterIP).
        assert_eq!(fes.len(), 7, "{fes:?}");
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(find(&fes, "10.96.0.10", 80, Scope::Inside).endpoints.len(), 2);
        let np = find(&fes, "192.168.1.7", 30080, Scope::Outside);
        assert_eq!(np.endpoints, vec!["10.244.0.2:8080".parse().unwrap()]);
        assert!(
            np.keep_source,
            "externalTrafficPolicy Local keeps the client address"
        );
        // From inside, eTP Local does not apply.
        assert_eq!(find(&fes, "198.51.100.10", 80, Scope::Inside).endpoints.len(), 2);
    }

    #[test]
    fn ipv6_addresses_are_served_from_outside_too() {
        let mut p = port(Protocol::Udp);
        p.id.family = Family::V6;
        p.cluster_ip = Some("fd00:96::10".parse().unwrap());
        p.cluster_endpoints = vec![ep("fd00:244::2", true)];
        p.external_endpoints = p.cluster_endpoints.clone();
        p.external_ips = vec!["2001:db8::20".parse().unwrap()];
        p.node_port = Some(30053);
        let node_ips: Vec<IpAddr> = vec!["192.168.1.7".parse().unwrap(), "fd00::7".parse().unwrap()];
        let (fes, skipped) = frontends(&p, &node_ips);
        assert!(skipped.is_empty(), "{skipped:?}");
        let ext = find(&fes, "2001:db8::20", 80, Scope::Outside);
        assert_eq!(ext.endpoints, vec!["[fd00:244::2]:8080".parse().unwrap()]);
        find(&fes, "fd00::7", 30053, Scope::Outside);
        assert!(
            !fes.iter()
                .any(|(f, _)| f.ip == "192.168.1.7".parse::<IpAddr>().unwrap()),
            "an IPv6 port has no frontend on the node's IPv4 address: {fes:?}"
        );
    }

    #[test]
    fn a_ports_frontends_share_affinity_per_scope() {
        let mut p = port(Protocol::Tcp);
        p.affinity_seconds = Some(60);
        p.external_ips = vec!["198.51.100.20".parse().unwrap()];
        p.node_port = Some(30080);
        let (fes, _) = frontends(&p, &["192.168.1.7".parse().unwrap()]);
        let pairs = affinity_leaders(&fes);
        assert_eq!(pairs.len(), fes.len());
        for scope in [Scope::Inside, Scope::Outside] {
            let leaders: std::collections::BTreeSet<_> = pairs
                .iter()
                .filter(|(f, _)| f.scope == scope)
                .map(|(_, l)| *l)
                .collect();
            assert_eq!(leaders.len(), 1, "one leader per scope: {pairs:?}");
            assert!(leaders.iter().all(|l| l.scope == scope), "{pairs:?}");
        }
    }

    #[test]
    fn what_ebpf_cannot_do_is_left_out_and_said() {
        assert_eq!(
            frontends(&port(Protocol::Sctp), &[]),
            (vec![], vec![Skipped::Sctp])
        );
    }

    #[test]
    fn source_ranges_guard_only_the_lb_ip_from_outside_and_affinity_applies_outside_too() {
        let mut p = port(Protocol::Tcp);
        p.load_balancer_ips = vec!["198.51.100.10".parse().unwrap()];
        p.source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
        p.affinity_seconds = Some(60);
        p.external_ips = vec!["198.51.100.20".parse().unwrap()];
        p.node_port = Some(30080);
        let (fes, skipped) = frontends(&p, &["192.168.1.7".parse().unwrap()]);
        assert!(skipped.is_empty(), "{skipped:?}");
        let lb = find(&fes, "198.51.100.10", 80, Scope::Outside);
        assert_eq!(lb.source_ranges, p.source_ranges);
        assert_eq!(lb.affinity_seconds, Some(60));
        assert!(find(&fes, "198.51.100.10", 80, Scope::Inside)
            .source_ranges
            .is_empty());
        assert!(find(&fes, "198.51.100.20", 80, Scope::Outside)
            .source_ranges
            .is_empty());
        assert!(find(&fes, "192.168.1.7", 30080, Scope::Outside)
            .source_ranges
            .is_empty());
        assert_eq!(
            find(&fes, "198.51.100.20", 80, Scope::Outside).affinity_seconds,
            Some(60)
        );
    }

    #[test]
    fn with_both_policies_local_inside_traffic_to_external_addresses_short_circuits() {
        let mut p = port(Protocol::Udp);
        p.external_local = true;
        p.internal_local = true;
        p.cluster_endpoints = vec![ep("10.244.0.2", true)];
        p.short_circuit_endpoints = vec![ep("10.244.0.2", true), ep("10.244.1.2", false)];
        p.external_ips = vec!["198.51.100.20".parse().unwrap()];
        let (fes, _) = frontends(&p, &[]);
        assert_eq!(find(&fes, "10.96.0.10", 80, Scope::Inside).endpoints.len(), 1);
        assert_eq!(find(&fes, "198.51.100.20", 80, Scope::Inside).endpoints.len(), 2);
    }
}
