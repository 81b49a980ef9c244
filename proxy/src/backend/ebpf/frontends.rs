//! From a plan's [`ServicePort`] to the frontends the eBPF maps hold: pure, so every
//! decision about which address leads to which endpoints is tested without root.

use std::net::{IpAddr, SocketAddr};

use ferry_ebpf::{Frontend, ServiceBackends};

use crate::plan::{Endpoint, Protocol, ServicePort};

/// Why a part of a Service port is not programmed by the eBPF back end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// SCTP: the socket programs translate TCP and UDP only; the whole port is left out.
    Sctp,
    /// An IPv6 address reached from outside: the tc program is IPv4 only.
    OutsideV6(IpAddr),
    /// `loadBalancerSourceRanges`: the tc program cannot filter sources, so the
    /// load-balancer IP is not served from outside at all (closed, never open to all).
    SourceRanges(IpAddr),
    /// Session affinity from outside is not implemented by the tc program: those
    /// frontends balance without it.
    OutsideAffinity,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skipped::Sctp => f.write_str("SCTP is not served by the eBPF back end (use --backend nftables)"),
            Skipped::OutsideV6(ip) => write!(f, "{ip} from outside: the tc program is IPv4 only"),
            Skipped::SourceRanges(ip) => write!(
                f,
                "{ip} from outside is not served: loadBalancerSourceRanges cannot be enforced by \
                 the tc program (use --backend nftables)"
            ),
            Skipped::OutsideAffinity => {
                f.write_str("session affinity is not applied to traffic from outside")
            }
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
    let mut skipped = Vec::new();
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
        affinity_seconds: None,
        keep_source: port.external_local,
    };
    if let Some(ip) = port.cluster_ip {
        out.push((Frontend::inside(ip, port.port, protocol), cluster.clone()));
    }
    let mut outside_affinity_dropped = false;
    let mut outside =
        |ip: IpAddr, p: u16, out: &mut Vec<(Frontend, ServiceBackends)>, skipped: &mut Vec<Skipped>| {
            if !family_v4 || !ip.is_ipv4() {
                skipped.push(Skipped::OutsideV6(ip));
                return;
            }
            outside_affinity_dropped |= port.affinity_seconds.is_some();
            out.push((Frontend::outside(ip, p, protocol), from_outside.clone()));
        };
    for ip in &port.external_ips {
        out.push((
            Frontend::inside(*ip, port.port, protocol),
            from_inside_to_external.clone(),
        ));
        outside(*ip, port.port, &mut out, &mut skipped);
    }
    for ip in &port.load_balancer_ips {
        out.push((
            Frontend::inside(*ip, port.port, protocol),
            from_inside_to_external.clone(),
        ));
        if port.source_ranges.is_empty() {
            outside(*ip, port.port, &mut out, &mut skipped);
        } else {
            skipped.push(Skipped::SourceRanges(*ip));
        }
    }
    if let Some(node_port) = port.node_port {
        for ip in node_ips.iter().filter(|ip| ip.is_ipv4() == family_v4) {
            out.push((
                Frontend::inside(*ip, node_port, protocol),
                from_inside_to_external.clone(),
            ));
            outside(*ip, node_port, &mut out, &mut skipped);
        }
    }
    if outside_affinity_dropped {
        skipped.push(Skipped::OutsideAffinity);
    }
    (out, skipped)
}

fn addrs(eps: &[Endpoint]) -> Vec<SocketAddr> {
    eps.iter().map(|e| SocketAddr::new(e.ip, e.port)).collect()
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
    fn every_address_gets_an_inside_frontend_and_the_v4_external_ones_an_outside_one() {
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
    fn what_ebpf_cannot_do_is_left_out_and_said() {
        assert_eq!(
            frontends(&port(Protocol::Sctp), &[]),
            (vec![], vec![Skipped::Sctp])
        );
        let mut p = port(Protocol::Tcp);
        p.load_balancer_ips = vec!["198.51.100.10".parse().unwrap()];
        p.source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
        p.affinity_seconds = Some(60);
        p.external_ips = vec!["198.51.100.20".parse().unwrap()];
        let (fes, skipped) = frontends(&p, &[]);
        assert!(
            !fes.iter()
                .any(|(f, _)| f.scope == Scope::Outside && f.ip == "198.51.100.10".parse::<IpAddr>().unwrap()),
            "a source-ranged LB IP is closed from outside: {fes:?}"
        );
        assert!(skipped.contains(&Skipped::SourceRanges("198.51.100.10".parse().unwrap())));
        assert!(skipped.contains(&Skipped::OutsideAffinity));
        let ext = find(&fes, "198.51.100.20", 80, Scope::Outside);
        assert_eq!(ext.affinity_seconds, None);
        assert_eq!(
            find(&fes, "10.96.0.10", 80, Scope::Inside).affinity_seconds,
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
