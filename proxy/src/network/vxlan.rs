//! The VXLAN device [`super::VXLAN_DEVICE`] and, per peer reached over it, an FDB entry
//! (the peer's VTEP MAC lives behind its underlay address) and a static neighbour entry
//! (the peer's Pod gateway address has that MAC), as flannel's vxlan backend does. The
//! route over the device ([`super::routes`]) goes `via <peer gateway> onlink`, so the
//! kernel asks neither ARP nor the FDB's learning anything.
//!
//! A restarted daemon keeps the device when its VNI, port, local address and underlay
//! link are the ones wanted (changing MTU or MAC in place), and converges its FDB and
//! neighbour entries by difference: traffic through it never stops.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use ferry_netlink::overlay::{fdb_entry, neighbour_entry, static_neighbour, vxlan_link, vxlan_of, Vxlan};
use ferry_netlink::route::Route;
use ferry_netlink::Socket;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::NeighbourMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use tracing::info;

use super::{VxlanDevice, VXLAN_DEVICE};

fn by_name(name: &str) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.into()));
    m
}

/// The device's link message, if it exists.
fn get(sock: &mut Socket<Route>) -> ferry_netlink::Result<Option<LinkMessage>> {
    match sock.get(RouteNetlinkMessage::GetLink(by_name(VXLAN_DEVICE))) {
        Ok(RouteNetlinkMessage::NewLink(l)) => Ok(Some(l)),
        Ok(_) => Ok(None),
        Err(e) if matches!(e.errno(), Some(libc::ENODEV | libc::ENOENT)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Makes the device as `want` says, on underlay link `underlay`, up; returns its index.
pub fn ensure(sock: &mut Socket<Route>, want: &VxlanDevice, underlay: u32) -> ferry_netlink::Result<u32> {
    let settings = Vxlan {
        vni: want.vni,
        port: want.port,
        local: want.local,
        underlay,
    };
    let existing = get(sock)?;
    let link = match existing {
        Some(l) if vxlan_of(&l) == Some(settings) => l,
        other => {
            if let Some(old) = other {
                // Another VNI, port or underlay: peers could not reach us through it.
                info!(
                    device = VXLAN_DEVICE,
                    "VXLAN settings changed; making the device again"
                );
                delete_index(sock, old.header.index)?;
            }
            sock.request(
                RouteNetlinkMessage::NewLink(vxlan_link(VXLAN_DEVICE, want.mac, want.mtu, &settings)),
                NLM_F_CREATE | NLM_F_EXCL,
            )?;
            info!(device = VXLAN_DEVICE, vni = want.vni, port = want.port, local = %want.local, mtu = want.mtu, "VXLAN device made");
            get(sock)?.ok_or_else(|| ferry_netlink::Error::Unexpected {
                request: format!("rtnetlink RTM_GETLINK {VXLAN_DEVICE}"),
                what: "the device just made is not there".into(),
            })?
        }
    };
    let index = link.header.index;
    let mtu = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    });
    let mac = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.clone()),
        _ => None,
    });
    let up = link.header.flags.contains(LinkFlags::Up);
    if mtu != Some(want.mtu) || mac.as_deref() != Some(&want.mac[..]) || !up {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes.push(LinkAttribute::Mtu(want.mtu));
        m.attributes.push(LinkAttribute::Address(want.mac.to_vec()));
        sock.request(RouteNetlinkMessage::SetLink(m), 0)?;
    }
    Ok(index)
}

fn delete_index(sock: &mut Socket<Route>, index: u32) -> ferry_netlink::Result<()> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    sock.request(RouteNetlinkMessage::DelLink(m), 0)
}

/// Removes the device (its FDB and neighbour entries, and routes over it, go with it);
/// whether there was one.
pub fn remove(sock: &mut Socket<Route>) -> ferry_netlink::Result<bool> {
    match get(sock)? {
        Some(l) => delete_index(sock, l.header.index).map(|()| true),
        None => Ok(false),
    }
}

/// The device's index, if it exists.
pub fn index(sock: &mut Socket<Route>) -> ferry_netlink::Result<Option<u32>> {
    Ok(get(sock)?.map(|l| l.header.index))
}

fn dump_neighbours(
    sock: &mut Socket<Route>,
    family: AddressFamily,
    ifindex: u32,
) -> ferry_netlink::Result<Vec<NeighbourMessage>> {
    let mut query = NeighbourMessage::default();
    query.header.family = family;
    Ok(sock
        .dump(RouteNetlinkMessage::GetNeighbour(query))?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == ifindex => Some(n),
            _ => None,
        })
        .collect())
}

/// Makes the device's FDB exactly `want` (MAC -> underlay address); how many entries
/// were written and deleted.
pub fn converge_fdb(
    sock: &mut Socket<Route>,
    ifindex: u32,
    want: &BTreeSet<([u8; 6], Ipv4Addr)>,
) -> ferry_netlink::Result<(usize, usize)> {
    let have: BTreeSet<([u8; 6], Ipv4Addr)> = dump_neighbours(sock, AddressFamily::Bridge, ifindex)?
        .iter()
        .map(neighbour_entry)
        .filter_map(|e| match (e.mac, e.ip) {
            (Some(mac), Some(IpAddr::V4(ip))) => Some((mac, ip)),
            _ => None,
        })
        .collect();
    let mut added = 0;
    for (mac, remote) in want.difference(&have) {
        sock.request(
            RouteNetlinkMessage::NewNeighbour(fdb_entry(ifindex, *mac, *remote)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        added += 1;
    }
    let mut deleted = 0;
    for (mac, remote) in have.difference(want) {
        // A MAC wanted elsewhere was just moved by the replace above.
        if want.iter().any(|(m, _)| m == mac) {
            continue;
        }
        match sock.request(
            RouteNetlinkMessage::DelNeighbour(fdb_entry(ifindex, *mac, *remote)),
            0,
        ) {
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            other => other?,
        }
        deleted += 1;
    }
    Ok((added, deleted))
}

/// Makes the device's permanent neighbour entries exactly `want` (address -> MAC).
pub fn converge_neighbours(
    sock: &mut Socket<Route>,
    ifindex: u32,
    want: &BTreeSet<(IpAddr, [u8; 6])>,
) -> ferry_netlink::Result<(usize, usize)> {
    let mut have = BTreeSet::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        for n in dump_neighbours(sock, family, ifindex)? {
            let e = neighbour_entry(&n);
            if let (true, Some(ip), Some(mac)) = (e.permanent, e.ip, e.mac) {
                have.insert((ip, mac));
            }
        }
    }
    let mut added = 0;
    for (ip, mac) in want.difference(&have) {
        sock.request(
            RouteNetlinkMessage::NewNeighbour(static_neighbour(ifindex, *ip, *mac)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        added += 1;
    }
    let mut deleted = 0;
    for (ip, mac) in have.difference(want) {
        if want.iter().any(|(i, _)| i == ip) {
            continue;
        }
        match sock.request(
            RouteNetlinkMessage::DelNeighbour(static_neighbour(ifindex, *ip, *mac)),
            0,
        ) {
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            other => other?,
        }
        deleted += 1;
    }
    Ok((added, deleted))
}
