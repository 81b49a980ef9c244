//! Builders for the rtnetlink messages a node network between hosts needs, which
//! ferry-bridge never sends: a VXLAN link, bridge forwarding database (FDB) entries on it
//! (`AF_BRIDGE` neighbour messages: which underlay address a MAC lives behind), static
//! neighbour entries, and routes tagged with an owner's route protocol number, so that an
//! owner can list exactly its routes and never confuses them with the administrator's.
//!
//! They build netlink-packet-route messages; [`crate::Socket`]`<`[`crate::route::Route`]`>`
//! sends them. The tests pin the attributes the kernel reads (type numbers and payloads as
//! `ip link add type vxlan`, `bridge fdb append` and `ip neigh replace` send them).

use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;

use crate::route::{address_family, ip_of, route_address};

/// A VXLAN device: VNI, the UDP port, the local underlay address and the link it leaves by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vxlan {
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
    /// The underlay link's index: encapsulated packets leave by it.
    pub underlay: u32,
}

/// `ip link add NAME address MAC mtu MTU type vxlan id VNI local LOCAL dev UNDERLAY dstport
/// PORT nolearning`: learning is off because every FDB entry is written by its owner; a
/// learnt entry would outlive a node's deletion.
pub fn vxlan_link(name: &str, mac: [u8; 6], mtu: u32, vxlan: &Vxlan) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.into()));
    m.attributes.push(LinkAttribute::Address(mac.to_vec()));
    m.attributes.push(LinkAttribute::Mtu(mtu));
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Vxlan),
        LinkInfo::Data(InfoData::Vxlan(vec![
            InfoVxlan::Id(vxlan.vni),
            InfoVxlan::Local(vxlan.local),
            InfoVxlan::Link(vxlan.underlay),
            InfoVxlan::Port(vxlan.port),
            InfoVxlan::Learning(false),
        ])),
    ]));
    m
}

/// The VXLAN settings of a link as the kernel reports them (`None` for another kind).
pub fn vxlan_of(link: &LinkMessage) -> Option<Vxlan> {
    let info = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(info) => Some(info),
        _ => None,
    })?;
    let data = info.iter().find_map(|i| match i {
        LinkInfo::Data(InfoData::Vxlan(d)) => Some(d),
        _ => None,
    })?;
    let mut v = Vxlan {
        vni: 0,
        port: 0,
        local: Ipv4Addr::UNSPECIFIED,
        underlay: 0,
    };
    for attr in data {
        match attr {
            InfoVxlan::Id(id) => v.vni = *id,
            InfoVxlan::Port(p) => v.port = *p,
            InfoVxlan::Local(l) => v.local = *l,
            InfoVxlan::Link(l) => v.underlay = *l,
            _ => {}
        }
    }
    Some(v)
}

/// A permanent FDB entry on VXLAN link `ifindex`: frames to `mac` go to underlay address
/// `remote` (`bridge fdb replace MAC dev DEV dst REMOTE self permanent`).
pub fn fdb_entry(ifindex: u32, mac: [u8; 6], remote: Ipv4Addr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(remote)));
    m
}

/// A permanent neighbour entry on link `ifindex`: `ip` has MAC `mac` (`ip neigh replace IP
/// lladdr MAC dev DEV nud permanent`), so the kernel never needs ARP or neighbour discovery
/// across the overlay.
pub fn static_neighbour(ifindex: u32, ip: IpAddr, mac: [u8; 6]) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = address_family(ip);
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::Permanent;
    m.header.kind = RouteType::Unicast;
    m.attributes
        .push(NeighbourAttribute::Destination(neighbour_address(ip)));
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    m
}

/// What a neighbour or FDB message says: its link, destination address (the underlay
/// address for FDB entries), MAC and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourEntry {
    pub ifindex: u32,
    pub ip: Option<IpAddr>,
    pub mac: Option<[u8; 6]>,
    pub permanent: bool,
}

pub fn neighbour_entry(m: &NeighbourMessage) -> NeighbourEntry {
    let mut e = NeighbourEntry {
        ifindex: m.header.ifindex,
        ip: None,
        mac: None,
        permanent: m.header.state == NeighbourState::Permanent,
    };
    for attr in &m.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => e.ip = Some((*a).into()),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => e.ip = Some((*a).into()),
            // AF_BRIDGE messages carry the underlay address undecoded.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                e.ip = match b.len() {
                    4 => Some(IpAddr::from(<[u8; 4]>::try_from(&b[..]).unwrap())),
                    16 => Some(IpAddr::from(<[u8; 16]>::try_from(&b[..]).unwrap())),
                    _ => None,
                }
            }
            NeighbourAttribute::LinkLayerAddress(mac) if mac.len() == 6 => {
                e.mac = Some(<[u8; 6]>::try_from(&mac[..]).unwrap())
            }
            _ => {}
        }
    }
    e
}

/// Where an owned route goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHop {
    /// Via a gateway on a connected subnet; the kernel picks the link.
    Gateway(IpAddr),
    /// Via a gateway reached over link `oif` whatever its subnet (`onlink`): the gateway
    /// of a peer's Pod CIDR behind a VXLAN device.
    Onlink { gateway: IpAddr, oif: u32 },
}

/// A unicast route in the main table tagged with route protocol `protocol` (`ip route
/// replace DST via GW [dev DEV onlink] proto PROTOCOL`).
pub fn owned_route(dst: IpAddr, prefix_len: u8, hop: NextHop, protocol: u8) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = address_family(dst);
    m.header.destination_prefix_length = prefix_len;
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::from(protocol);
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unicast;
    if prefix_len > 0 {
        m.attributes.push(RouteAttribute::Destination(route_address(dst)));
    }
    match hop {
        NextHop::Gateway(gw) => m.attributes.push(RouteAttribute::Gateway(route_address(gw))),
        NextHop::Onlink { gateway, oif } => {
            m.header.flags = RouteFlags::Onlink;
            m.attributes.push(RouteAttribute::Gateway(route_address(gateway)));
            m.attributes.push(RouteAttribute::Oif(oif));
        }
    }
    m
}

/// The main-table route to `dst/prefix_len` of `protocol`, without a next hop: what
/// `RTM_DELROUTE` needs to find an owner's route whatever its next hop.
pub fn owned_route_key(dst: IpAddr, prefix_len: u8, protocol: u8) -> RouteMessage {
    let mut m = owned_route(dst, prefix_len, NextHop::Gateway(dst), protocol);
    m.attributes.retain(|a| !matches!(a, RouteAttribute::Gateway(_)));
    m
}

/// A route of the main table as a dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub protocol: u8,
    pub onlink: bool,
}

/// `None` for routes of other tables or kinds than main unicast.
pub fn route_entry(m: &RouteMessage) -> Option<RouteEntry> {
    if m.header.table != RouteHeader::RT_TABLE_MAIN || m.header.kind != RouteType::Unicast {
        return None;
    }
    let v4 = m.header.address_family == AddressFamily::Inet;
    let mut e = RouteEntry {
        dst: if v4 {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        },
        prefix_len: m.header.destination_prefix_length,
        gateway: None,
        oif: None,
        protocol: u8::from(m.header.protocol),
        onlink: m.header.flags.contains(RouteFlags::Onlink),
    };
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Destination(a) => e.dst = ip_of(a)?,
            RouteAttribute::Gateway(a) => e.gateway = ip_of(a),
            RouteAttribute::Oif(i) => e.oif = Some(*i),
            _ => {}
        }
    }
    Some(e)
}

fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Emitable;
    use netlink_packet_route::RouteNetlinkMessage;

    fn bytes<T: Emitable>(m: &T) -> Vec<u8> {
        let mut buf = vec![0; m.buffer_len()];
        m.emit(&mut buf);
        buf
    }

    /// The netlink attribute of `kind` at the top level of `payload` (after `header`
    /// bytes), as (type, value).
    fn attr(payload: &[u8], header: usize, kind: u16) -> Option<Vec<u8>> {
        let mut at = header;
        while at + 4 <= payload.len() {
            let len = u16::from_ne_bytes([payload[at], payload[at + 1]]) as usize;
            let ty = u16::from_ne_bytes([payload[at + 2], payload[at + 3]]) & 0x3fff;
            if ty == kind {
                return Some(payload[at + 4..at + len].to_vec());
            }
            at += len.div_ceil(4) * 4;
        }
        None
    }

    #[test]
    fn an_fdb_entry_is_an_af_bridge_permanent_self_neighbour() {
        let m = fdb_entry(7, [0x0e, 0xfe, 192, 168, 1, 2], "192.168.1.2".parse().unwrap());
        let b = bytes(&m);
        // struct ndmsg: family, pad x3, ifindex (i32), state (u16), flags (u8), type (u8).
        assert_eq!(b[0], libc::AF_BRIDGE as u8);
        assert_eq!(i32::from_ne_bytes(b[4..8].try_into().unwrap()), 7);
        assert_eq!(u16::from_ne_bytes(b[8..10].try_into().unwrap()), 0x80); // NUD_PERMANENT
        assert_eq!(b[10], 0x02); // NTF_SELF: the VXLAN device's own FDB
        assert_eq!(attr(&b, 12, 1), Some(vec![192, 168, 1, 2])); // NDA_DST
        assert_eq!(attr(&b, 12, 2), Some(vec![0x0e, 0xfe, 192, 168, 1, 2])); // NDA_LLADDR
                                                                             // And it reads back as it was written.
        let e = neighbour_entry(&m);
        assert_eq!(e.ip, Some("192.168.1.2".parse().unwrap()));
        assert!(e.permanent);
    }

    #[test]
    fn a_static_neighbour_is_permanent_in_its_family() {
        let m = static_neighbour(9, "fd00:10:244:2::1".parse().unwrap(), [0x0e, 0xfe, 1, 2, 3, 4]);
        let b = bytes(&m);
        assert_eq!(b[0], libc::AF_INET6 as u8);
        assert_eq!(u16::from_ne_bytes(b[8..10].try_into().unwrap()), 0x80);
        let dst = attr(&b, 12, 1).unwrap();
        assert_eq!(dst.len(), 16);
        assert_eq!(attr(&b, 12, 2), Some(vec![0x0e, 0xfe, 1, 2, 3, 4]));
        assert_eq!(
            <crate::route::Route as crate::socket::Family>::describe(&RouteNetlinkMessage::NewNeighbour(m)),
            "RTM_NEWNEIGH fd00:10:244:2::1 on link index 9"
        );
    }

    #[test]
    fn a_vxlan_link_carries_vni_port_local_and_no_learning() {
        let v = Vxlan {
            vni: 1,
            port: 8472,
            local: "192.168.1.1".parse().unwrap(),
            underlay: 3,
        };
        let m = vxlan_link("ferry.vxlan", [0x0e, 0xfe, 192, 168, 1, 1], 1450, &v);
        let b = bytes(&m);
        // struct ifinfomsg is 16 bytes; IFLA_MTU = 4, IFLA_LINKINFO = 18.
        assert_eq!(attr(&b, 16, 4), Some(1450u32.to_ne_bytes().to_vec()));
        let info = attr(&b, 16, 18).unwrap();
        assert_eq!(attr(&info, 0, 1), Some(b"vxlan\0".to_vec())); // IFLA_INFO_KIND, NUL-terminated as iproute2 sends it
        let data = attr(&info, 0, 2).unwrap(); // IFLA_INFO_DATA
        assert_eq!(attr(&data, 0, 1), Some(1u32.to_ne_bytes().to_vec())); // IFLA_VXLAN_ID
        assert_eq!(attr(&data, 0, 4), Some(vec![192, 168, 1, 1])); // IFLA_VXLAN_LOCAL
        assert_eq!(attr(&data, 0, 3), Some(3u32.to_ne_bytes().to_vec())); // IFLA_VXLAN_LINK
        assert_eq!(attr(&data, 0, 7), Some(vec![0])); // IFLA_VXLAN_LEARNING off
        assert_eq!(attr(&data, 0, 15), Some(8472u16.to_be_bytes().to_vec())); // IFLA_VXLAN_PORT, network order
        assert_eq!(vxlan_of(&m), Some(v));
    }

    #[test]
    fn owned_routes_carry_the_protocol_and_onlink() {
        let m = owned_route(
            "10.244.2.0".parse().unwrap(),
            24,
            NextHop::Onlink {
                gateway: "10.244.2.1".parse().unwrap(),
                oif: 5,
            },
            118,
        );
        let b = bytes(&m);
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        assert_eq!(b[0], libc::AF_INET as u8);
        assert_eq!(b[1], 24);
        assert_eq!(b[4], libc::RT_TABLE_MAIN);
        assert_eq!(b[5], 118);
        assert_eq!(b[7], libc::RTN_UNICAST);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 4); // RTNH_F_ONLINK
        assert_eq!(attr(&b, 12, 1), Some(vec![10, 244, 2, 0])); // RTA_DST
        assert_eq!(attr(&b, 12, 5), Some(vec![10, 244, 2, 1])); // RTA_GATEWAY
        assert_eq!(attr(&b, 12, 4), Some(5u32.to_ne_bytes().to_vec())); // RTA_OIF
        let e = route_entry(&m).unwrap();
        assert_eq!((e.protocol, e.onlink, e.oif), (118, true, Some(5)));

        let key = bytes(&owned_route_key("10.244.2.0".parse().unwrap(), 24, 118));
        assert_eq!((key[1], key[5]), (24, 118));
        assert_eq!(attr(&key, 12, 5), None, "a key has no gateway");

        let direct = owned_route(
            "fd00:10:244:2::".parse().unwrap(),
            64,
            NextHop::Gateway("fd00::2".parse().unwrap()),
            118,
        );
        let e = route_entry(&direct).unwrap();
        assert_eq!(e.gateway, Some("fd00::2".parse().unwrap()));
        assert!(!e.onlink && e.oif.is_none());
    }
}
