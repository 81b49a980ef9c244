//! Routes to other nodes' Pod CIDRs in the main table, each tagged with
//! [`super::ROUTE_PROTOCOL`], kept in step by difference: Ferry lists the routes of its
//! protocol, adds what is missing, replaces what differs and deletes what no Node asks
//! for any more. It never flushes, so a restarted daemon finds its routes in place and
//! changes nothing while they are right; and it never replaces a route of another
//! protocol (the administrator's, another CNI's): such a destination is left alone and
//! logged.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferry_netlink::overlay::{owned_route, owned_route_key, route_entry, NextHop, RouteEntry};
use ferry_netlink::route::Route;
use ferry_netlink::Socket;
use ipnetwork::IpNetwork;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use tracing::info;

use super::{HostAddress, HostFacts, PeerRoute, Via, ROUTE_PROTOCOL};

/// The host's addresses with their links' MTUs (two dumps).
pub fn host_facts(sock: &mut Socket<Route>) -> ferry_netlink::Result<HostFacts> {
    let mut mtus = BTreeMap::new();
    for m in sock.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))? {
        if let RouteNetlinkMessage::NewLink(l) = m {
            let mtu = l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            });
            mtus.insert(l.header.index, mtu.unwrap_or(0));
        }
    }
    let mut facts = HostFacts::default();
    for m in sock.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))? {
        let RouteNetlinkMessage::NewAddress(a) = m else {
            continue;
        };
        let ip = a.attributes.iter().find_map(|at| match at {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let ip = ip.or_else(|| {
            a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        if let Some(net) = ip.and_then(|ip| IpNetwork::new(ip, a.header.prefix_len).ok()) {
            facts.addresses.push(HostAddress {
                net,
                link: a.header.index,
                mtu: mtus.get(&a.header.index).copied().unwrap_or(0),
            });
        }
    }
    Ok(facts)
}

/// Every route of both families in the main table.
pub fn main_routes(sock: &mut Socket<Route>) -> ferry_netlink::Result<Vec<RouteEntry>> {
    let mut out = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut query = RouteMessage::default();
        query.header.address_family = family;
        for m in sock.dump(RouteNetlinkMessage::GetRoute(query))? {
            if let RouteNetlinkMessage::NewRoute(r) = m {
                out.extend(route_entry(&r));
            }
        }
    }
    Ok(out)
}

/// What a sync changed, for the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouteChanges {
    pub added: usize,
    pub replaced: usize,
    pub deleted: usize,
    /// Pod CIDRs with a route of another protocol, left alone.
    pub foreign: Vec<IpNetwork>,
}

fn next_hop(via: &Via, vxlan_index: Option<u32>) -> Option<NextHop> {
    match *via {
        Via::Direct(gw) => Some(NextHop::Gateway(gw)),
        Via::Vxlan { gateway, .. } => vxlan_index.map(|oif| NextHop::Onlink { gateway, oif }),
    }
}

fn matches(have: &RouteEntry, hop: NextHop) -> bool {
    match hop {
        NextHop::Gateway(gw) => have.gateway == Some(gw) && !have.onlink,
        NextHop::Onlink { gateway, oif } => {
            have.gateway == Some(gateway) && have.oif == Some(oif) && have.onlink
        }
    }
}

/// Makes Ferry's routes exactly `want`. `vxlan_index` is the VXLAN device's, when there
/// is one (routes over it are skipped without it).
pub fn converge(
    sock: &mut Socket<Route>,
    want: &BTreeMap<IpNetwork, PeerRoute>,
    vxlan_index: Option<u32>,
) -> ferry_netlink::Result<RouteChanges> {
    let routes = main_routes(sock)?;
    let key = |e: &RouteEntry| (e.dst, e.prefix_len);
    let ours: BTreeMap<(IpAddr, u8), &RouteEntry> = routes
        .iter()
        .filter(|e| e.protocol == ROUTE_PROTOCOL)
        .map(|e| (key(e), e))
        .collect();
    let theirs: BTreeMap<(IpAddr, u8), &RouteEntry> = routes
        .iter()
        .filter(|e| e.protocol != ROUTE_PROTOCOL)
        .map(|e| (key(e), e))
        .collect();
    let mut changes = RouteChanges::default();
    for (cidr, route) in want {
        let Some(hop) = next_hop(&route.via, vxlan_index) else {
            continue;
        };
        let k = (cidr.network(), cidr.prefix());
        let msg = owned_route(cidr.network(), cidr.prefix(), hop, ROUTE_PROTOCOL);
        match ours.get(&k) {
            Some(have) if matches(have, hop) => {}
            Some(_) => {
                sock.request(RouteNetlinkMessage::NewRoute(msg), NLM_F_CREATE | NLM_F_REPLACE)?;
                info!(dst = %cidr, via = %describe(&route.via), node = %route.node, "route to a node's Pods changed");
                changes.replaced += 1;
            }
            None if theirs.contains_key(&k) => changes.foreign.push(*cidr),
            None => {
                sock.request(RouteNetlinkMessage::NewRoute(msg), NLM_F_CREATE | NLM_F_EXCL)?;
                info!(dst = %cidr, via = %describe(&route.via), node = %route.node, "route to a node's Pods added");
                changes.added += 1;
            }
        }
    }
    for ((dst, prefix), have) in &ours {
        let Ok(cidr) = IpNetwork::new(*dst, *prefix) else {
            continue;
        };
        let still_wanted = want
            .get(&cidr)
            .is_some_and(|r| next_hop(&r.via, vxlan_index).is_some());
        if !still_wanted {
            delete(sock, have)?;
            info!(dst = %cidr, "route to a node's Pods removed");
            changes.deleted += 1;
        }
    }
    Ok(changes)
}

/// Deletes one of Ferry's routes by destination and protocol (the kernel then needs no
/// next hop to find it).
fn delete(sock: &mut Socket<Route>, have: &RouteEntry) -> ferry_netlink::Result<()> {
    let msg = owned_route_key(have.dst, have.prefix_len, ROUTE_PROTOCOL);
    match sock.request(RouteNetlinkMessage::DelRoute(msg), 0) {
        Err(e) if e.errno() == Some(libc::ESRCH) => Ok(()),
        other => other,
    }
}

/// Deletes every route of Ferry's protocol (`ferry-proxy cleanup`); how many.
pub fn remove_all(sock: &mut Socket<Route>) -> ferry_netlink::Result<usize> {
    let mut n = 0;
    for e in main_routes(sock)?.iter().filter(|e| e.protocol == ROUTE_PROTOCOL) {
        delete(sock, e)?;
        n += 1;
    }
    Ok(n)
}

pub fn describe(via: &Via) -> String {
    match via {
        Via::Direct(gw) => format!("{gw} (host-gw)"),
        Via::Vxlan { gateway, remote, .. } => format!("{gateway} over VXLAN to {remote}"),
    }
}
