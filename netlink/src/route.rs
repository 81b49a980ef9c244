//! rtnetlink (`NETLINK_ROUTE`): links, addresses, routes and neighbours (also FDB
//! entries), as netlink-packet-route's messages; [`crate::overlay`] builds the ones the
//! node network between hosts sends. `Socket<Route>` (opened with `Socket::<Route>::open()`) carries them; what to ask for is the caller's business
//! (ferry-bridge's `link.rs` builds its requests on it).

use std::net::IpAddr;

use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::NeighbourMessage;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::socket::Family;

/// The address family of `ip`, as rtnetlink messages carry it.
pub fn address_family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// `ip` as a route attribute's address (destination, gateway, source).
pub fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

/// The IP address in a route attribute, if it holds one.
pub fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// The rtnetlink family marker: `Socket<Route>`.
#[derive(Debug, Clone, Copy)]
pub enum Route {}

impl Family for Route {
    const PROTOCOL: isize = NETLINK_ROUTE;
    const NAME: &'static str = "rtnetlink";
    type Message = RouteNetlinkMessage;

    fn describe(msg: &RouteNetlinkMessage) -> String {
        let ty = msg.message_type();
        let name = match ty {
            16 => "RTM_NEWLINK",
            17 => "RTM_DELLINK",
            18 => "RTM_GETLINK",
            19 => "RTM_SETLINK",
            20 => "RTM_NEWADDR",
            21 => "RTM_DELADDR",
            22 => "RTM_GETADDR",
            24 => "RTM_NEWROUTE",
            25 => "RTM_DELROUTE",
            26 => "RTM_GETROUTE",
            28 => "RTM_NEWNEIGH",
            29 => "RTM_DELNEIGH",
            30 => "RTM_GETNEIGH",
            _ => return format!("message type {ty}"),
        };
        let subject = match msg {
            RouteNetlinkMessage::NewLink(m)
            | RouteNetlinkMessage::DelLink(m)
            | RouteNetlinkMessage::GetLink(m)
            | RouteNetlinkMessage::SetLink(m) => link_subject(m),
            RouteNetlinkMessage::NewAddress(m)
            | RouteNetlinkMessage::DelAddress(m)
            | RouteNetlinkMessage::GetAddress(m) => address_subject(m),
            RouteNetlinkMessage::NewRoute(m)
            | RouteNetlinkMessage::DelRoute(m)
            | RouteNetlinkMessage::GetRoute(m) => route_subject(m),
            RouteNetlinkMessage::NewNeighbour(m)
            | RouteNetlinkMessage::DelNeighbour(m)
            | RouteNetlinkMessage::GetNeighbour(m) => neighbour_subject(m),
            _ => None,
        };
        match subject {
            Some(s) => format!("{name} {s}"),
            None => name.to_string(),
        }
    }
}

/// The link's name, else its index.
fn link_subject(m: &LinkMessage) -> Option<String> {
    let name = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    });
    name.or_else(|| (m.header.index != 0).then(|| format!("link index {}", m.header.index)))
}

fn address_subject(m: &AddressMessage) -> Option<String> {
    let ip = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    })?;
    Some(format!(
        "{ip}/{} on link index {}",
        m.header.prefix_len, m.header.index
    ))
}

/// A neighbour's address (for an FDB entry, its MAC), and its link.
fn neighbour_subject(m: &NeighbourMessage) -> Option<String> {
    let entry = crate::overlay::neighbour_entry(m);
    let what = match (m.header.family, entry.ip, entry.mac) {
        (netlink_packet_route::AddressFamily::Bridge, _, Some(mac)) => {
            mac.map(|b| format!("{b:02x}")).join(":")
        }
        (_, Some(ip), _) => ip.to_string(),
        _ => return None,
    };
    Some(format!("{what} on link index {}", m.header.ifindex))
}

fn route_subject(m: &RouteMessage) -> Option<String> {
    let dst = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(ip.to_string()),
        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(ip.to_string()),
        _ => None,
    });
    match dst {
        Some(d) => Some(format!("{d}/{}", m.header.destination_prefix_length)),
        // No destination attribute: the default route of the family, or a dump.
        None if m.header.destination_prefix_length == 0 && m.attributes.is_empty() => None,
        None => Some("default".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_named_by_type_and_subject() {
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::IfName("veth1".into()));
        assert_eq!(
            Route::describe(&RouteNetlinkMessage::NewLink(link)),
            "RTM_NEWLINK veth1"
        );
        let mut by_index = LinkMessage::default();
        by_index.header.index = 7;
        assert_eq!(
            Route::describe(&RouteNetlinkMessage::SetLink(by_index)),
            "RTM_SETLINK link index 7"
        );
        let mut addr = AddressMessage::default();
        addr.header.prefix_len = 24;
        addr.header.index = 3;
        addr.attributes
            .push(AddressAttribute::Local("10.1.0.1".parse().unwrap()));
        assert_eq!(
            Route::describe(&RouteNetlinkMessage::NewAddress(addr)),
            "RTM_NEWADDR 10.1.0.1/24 on link index 3"
        );
        assert_eq!(
            Route::describe(&RouteNetlinkMessage::GetRoute(RouteMessage::default())),
            "RTM_GETROUTE"
        );
    }
}
