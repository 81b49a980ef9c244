//! Links, addresses and routes: the rtnetlink requests the plugin makes, as methods on
//! [`Socket`]. Each method is one request (or one dump); a refusal comes back as
//! ferry-netlink's [`Error`], naming the request, with the kernel's errno and reason, which
//! the caller turns into a CNI error saying what it was doing.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use ipnetwork::IpNetwork;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    AfSpecBridge, BridgeVlanInfo, BridgeVlanInfoFlags, InfoBridge, InfoBridgePort, InfoData, InfoKind,
    InfoPortData, InfoPortKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, State,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::netlink::{Error, Result, Socket};
use ferry_netlink::route::{address_family, ip_of, route_address};

/// What the plugin needs to know of a link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<String>,
    pub mtu: Option<u32>,
    pub alias: Option<String>,
    /// Administratively up (IFF_UP).
    pub up: bool,
    pub promisc: bool,
    /// Operational state is "up" (carrier, and for a bridge port: forwarding).
    pub oper_up: bool,
    /// The bridge this link is a port of.
    pub controller: Option<u32>,
    pub kind: Option<InfoKind>,
    /// Bridge port options, for a bridge port.
    pub hairpin: Option<bool>,
    pub isolated: Option<bool>,
    /// For a bridge: VLAN filtering on.
    pub vlan_filtering: Option<bool>,
}

impl From<LinkMessage> for Link {
    fn from(m: LinkMessage) -> Link {
        let mut link = Link {
            index: m.header.index,
            up: m.header.flags.contains(LinkFlags::Up),
            promisc: m.header.flags.contains(LinkFlags::Promisc),
            ..Link::default()
        };
        for attr in m.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::Address(a) => link.mac = Some(format_mac(&a)),
                LinkAttribute::Mtu(mtu) => link.mtu = Some(mtu),
                LinkAttribute::IfAlias(a) => link.alias = Some(a),
                LinkAttribute::OperState(s) => link.oper_up = s == State::Up,
                LinkAttribute::Controller(c) => link.controller = Some(c),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => link.kind = Some(k),
                            LinkInfo::Data(InfoData::Bridge(opts)) => {
                                for o in opts {
                                    if let InfoBridge::VlanFiltering(on) = o {
                                        link.vlan_filtering = Some(on);
                                    }
                                }
                            }
                            LinkInfo::PortData(InfoPortData::BridgePort(opts)) => {
                                for o in opts {
                                    match o {
                                        InfoBridgePort::HairpinMode(on) => link.hairpin = Some(on),
                                        InfoBridgePort::Isolated(on) => link.isolated = Some(on),
                                        _ => {}
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// A route as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
    /// The output link's index.
    pub oif: Option<u32>,
}

/// One end of a veth pair to create.
pub struct VethEnd<'a> {
    pub name: &'a str,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
}

pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`); `None` if it is not a unicast MAC address.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    // A multicast (group) bit set, or all zeros, cannot be an interface's address.
    (mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

fn link_message(index: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m
}

/// "No such device" from the kernel: the link is not there.
pub fn is_missing(e: &Error) -> bool {
    matches!(e.errno(), Some(libc::ENODEV | libc::ENOENT))
}

pub fn is_exists(e: &Error) -> bool {
    e.errno() == Some(libc::EEXIST)
}

impl Socket {
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        let mut m = link_message(0);
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.get(RouteNetlinkMessage::GetLink(m)) {
            Ok(RouteNetlinkMessage::NewLink(m)) => Ok(Some(m.into())),
            Ok(other) => Err(Error::Unexpected {
                request: format!("rtnetlink RTM_GETLINK {name}"),
                what: format!("the kernel answered with {other:?}"),
            }),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn links(&mut self) -> Result<Vec<Link>> {
        Ok(self
            .dump(RouteNetlinkMessage::GetLink(link_message(0)))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(m) => Some(m.into()),
                _ => None,
            })
            .collect())
    }

    /// Creates a bridge; `EEXIST` is returned as is (another call may have made it first).
    pub fn create_bridge(
        &mut self,
        name: &str,
        mtu: Option<u32>,
        vlan_filtering: bool,
        mac: [u8; 6],
    ) -> Result<()> {
        let mut m = link_message(0);
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes.push(LinkAttribute::Address(mac.to_vec()));
        if let Some(mtu) = mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        let mut info = vec![LinkInfo::Kind(InfoKind::Bridge)];
        if vlan_filtering {
            info.push(LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::VlanFiltering(
                true,
            )])));
        }
        m.attributes.push(LinkAttribute::LinkInfo(info));
        self.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Turns VLAN filtering on for an existing bridge.
    pub fn set_vlan_filtering(&mut self, bridge: u32) -> Result<()> {
        let mut m = link_message(bridge);
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bridge),
            LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::VlanFiltering(true)])),
        ]));
        self.request(RouteNetlinkMessage::NewLink(m), 0)
    }

    /// Creates a veth pair with `peer` placed directly in `peer_netns`, in one request.
    ///
    /// Each end is given one transmit and one receive queue. Without them the kernel gives
    /// a veth one queue per possible CPU and then cuts the queues in use down to one, and
    /// cutting transmit queues of a registered device waits for an RCU grace period
    /// (`netif_set_real_num_tx_queues` -> `synchronize_net`): two per pair, under the RTNL
    /// lock, measured at 1.5-8 ms of an ADD on a loaded 2-core machine (Linux 6.18,
    /// `perf record -e sched:sched_switch -g`). Either way one queue pair is in use.
    pub fn create_veth(&mut self, host: &VethEnd, peer: &VethEnd, peer_netns: &File) -> Result<()> {
        let mut p = link_message(0);
        p.attributes.push(LinkAttribute::IfName(peer.name.to_string()));
        p.attributes.push(LinkAttribute::NetNsFd(peer_netns.as_raw_fd()));
        p.attributes.push(LinkAttribute::NumTxQueues(1));
        p.attributes.push(LinkAttribute::NumRxQueues(1));
        if let Some(mtu) = peer.mtu {
            p.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(mac) = peer.mac {
            p.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        let mut m = link_message(0);
        m.attributes.push(LinkAttribute::IfName(host.name.to_string()));
        m.attributes.push(LinkAttribute::NumTxQueues(1));
        m.attributes.push(LinkAttribute::NumRxQueues(1));
        if let Some(mtu) = host.mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(mac) = host.mac {
            m.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
        ]));
        self.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Sets the flags in `mask` to the values in `flags` (e.g. `Up`, `Promisc`).
    pub fn set_flags(&mut self, index: u32, flags: LinkFlags, mask: LinkFlags) -> Result<()> {
        let mut m = link_message(index);
        m.header.flags = flags;
        m.header.change_mask = mask;
        self.request(RouteNetlinkMessage::SetLink(m), 0)
    }

    pub fn set_up(&mut self, index: u32) -> Result<()> {
        self.set_flags(index, LinkFlags::Up, LinkFlags::Up)
    }

    /// Makes the link a port of `bridge`.
    pub fn set_controller(&mut self, index: u32, bridge: u32) -> Result<()> {
        let mut m = link_message(index);
        m.attributes.push(LinkAttribute::Controller(bridge));
        self.request(RouteNetlinkMessage::SetLink(m), 0)
    }

    /// Renames a link (it must be down).
    pub fn set_name(&mut self, index: u32, name: &str) -> Result<()> {
        let mut m = link_message(index);
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.request(RouteNetlinkMessage::SetLink(m), 0)
    }

    /// A free-text label on the link: how GC finds the veths of an attachment.
    pub fn set_alias(&mut self, index: u32, alias: &str) -> Result<()> {
        let mut m = link_message(index);
        m.attributes.push(LinkAttribute::IfAlias(alias.to_string()));
        self.request(RouteNetlinkMessage::SetLink(m), 0)
    }

    /// Sets bridge port options (hairpin, isolation, ...) of a link that is a bridge port.
    pub fn set_bridge_port(&mut self, index: u32, options: Vec<InfoBridgePort>) -> Result<()> {
        let mut m = link_message(index);
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(options)),
        ]));
        self.request(RouteNetlinkMessage::NewLink(m), 0)
    }

    /// Adds (or with `add == false` removes) VLAN `vid` on bridge port `index`.
    pub fn bridge_vlan(&mut self, index: u32, vid: u16, flags: BridgeVlanInfoFlags, add: bool) -> Result<()> {
        let mut m = link_message(index);
        m.header.interface_family = AddressFamily::Bridge;
        m.attributes
            .push(LinkAttribute::AfSpecBridge(vec![AfSpecBridge::VlanInfo(
                BridgeVlanInfo { flags, vid },
            )]));
        let msg = if add {
            RouteNetlinkMessage::SetLink(m)
        } else {
            RouteNetlinkMessage::DelLink(m)
        };
        self.request(msg, 0)
    }

    pub fn delete_link(&mut self, index: u32) -> Result<()> {
        self.request(RouteNetlinkMessage::DelLink(link_message(index)), 0)
    }

    /// The bytes of a request that deletes link `index`, asking for no ACK: for a process
    /// that sends it and exits without reading (see `detached::send_rtnetlink`).
    pub fn delete_link_request(&mut self, index: u32) -> Vec<u8> {
        self.encode(RouteNetlinkMessage::DelLink(link_message(index)), NLM_F_REQUEST)
    }

    /// Adds an address; `EEXIST` is returned as is.
    pub fn add_address(&mut self, index: u32, addr: IpNetwork, nodad: bool) -> Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = address_family(addr.ip());
        m.header.prefix_len = addr.prefix();
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(addr.ip()));
        m.attributes.push(AddressAttribute::Address(addr.ip()));
        if nodad {
            m.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.request(RouteNetlinkMessage::NewAddress(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    pub fn delete_address(&mut self, index: u32, addr: IpNetwork) -> Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = address_family(addr.ip());
        m.header.prefix_len = addr.prefix();
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(addr.ip()));
        self.request(RouteNetlinkMessage::DelAddress(m), 0)
    }

    /// The addresses of link `index`, with their prefix lengths.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<IpNetwork>> {
        let mut out = Vec::new();
        for m in self.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))? {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if a.header.index != index {
                continue;
            }
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS the peer's on p2p links.
            let local = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                a.attributes.iter().find_map(|at| match at {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr.and_then(|ip| IpNetwork::new(ip, a.header.prefix_len).ok()) {
                out.push(ip);
            }
        }
        Ok(out)
    }

    /// Adds a route out of link `oif` in the main table; `EEXIST` is returned as is.
    pub fn add_route(&mut self, route: &cni::Route, oif: u32) -> Result<()> {
        let dst = route.dst;
        let mut m = RouteMessage::default();
        m.header.address_family = address_family(dst.ip());
        m.header.destination_prefix_length = dst.prefix();
        m.header.table = route
            .table
            .map_or(RouteHeader::RT_TABLE_MAIN, |t| t.min(255) as u8);
        m.header.protocol = RouteProtocol::Boot;
        m.header.kind = RouteType::Unicast;
        m.header.scope = match (route.scope, route.gw) {
            (Some(253), _) | (None, None) => RouteScope::Link,
            (Some(254), _) => RouteScope::Host,
            _ => RouteScope::Universe,
        };
        if dst.prefix() > 0 {
            m.attributes
                .push(RouteAttribute::Destination(route_address(dst.network())));
        }
        if let Some(gw) = route.gw {
            m.attributes.push(RouteAttribute::Gateway(route_address(gw)));
        }
        m.attributes.push(RouteAttribute::Oif(oif));
        if let Some(p) = route.priority {
            m.attributes.push(RouteAttribute::Priority(p));
        }
        let mut metrics = Vec::new();
        if let Some(mtu) = route.mtu {
            metrics.push(netlink_packet_route::route::RouteMetric::Mtu(mtu));
        }
        if let Some(mss) = route.advmss {
            metrics.push(netlink_packet_route::route::RouteMetric::Advmss(mss));
        }
        if !metrics.is_empty() {
            m.attributes.push(RouteAttribute::Metrics(metrics));
        }
        self.request(RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Unicast routes of the main table of one family.
    pub fn routes(&mut self, v4: bool) -> Result<Vec<RouteEntry>> {
        let mut query = RouteMessage::default();
        query.header.address_family = if v4 {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let mut out = Vec::new();
        for m in self.dump(RouteNetlinkMessage::GetRoute(query))? {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            if r.header.table != RouteHeader::RT_TABLE_MAIN || r.header.kind != RouteType::Unicast {
                continue;
            }
            let (mut dst, mut gw, mut oif) = (None, None, None);
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = ip_of(d),
                    RouteAttribute::Gateway(g) => gw = ip_of(g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let unspecified: IpAddr = if v4 { [0u8; 4].into() } else { [0u8; 16].into() };
            let dst = IpNetwork::new(dst.unwrap_or(unspecified), r.header.destination_prefix_length);
            if let Ok(dst) = dst {
                out.push(RouteEntry { dst, gw, oif });
            }
        }
        Ok(out)
    }
}

/// Tells whether a link name is taken in the network namespace the probe was opened in,
/// without the RTNL lock: an `SIOCGIFINDEX` ioctl reads the namespace's name table under
/// RCU, where an rtnetlink `GET` waits while another request holds RTNL (a deletion holds
/// it across two RCU grace periods, 10+ ms under load).
pub struct NameProbe(OwnedFd);

impl NameProbe {
    /// Opens a probe in the calling thread's network namespace (it stays bound to it).
    pub fn open() -> std::io::Result<NameProbe> {
        // SAFETY: socket() returns a new descriptor or -1.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is ours alone.
        Ok(NameProbe(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Whether a link is called `name` in the probe's namespace.
    pub fn exists(&self, name: &str) -> std::io::Result<bool> {
        // SAFETY: ifreq is plain data.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        if name.len() >= req.ifr_name.len() {
            return Ok(false); // no link can have a name this long
        }
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: a valid descriptor and a valid, NUL-terminated ifreq.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) } == 0 {
            return Ok(true);
        }
        match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            e => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_probe_tells_taken_names_from_free_ones() {
        // Reads only: every network namespace has "lo".
        let probe = NameProbe::open().unwrap();
        assert!(probe.exists("lo").unwrap());
        assert!(!probe.exists("fy-no-such-if").unwrap());
        assert!(!probe.exists("longer-than-ifnamsiz").unwrap());
    }

    #[test]
    fn macs_parse_and_format() {
        assert_eq!(
            parse_mac("0a:58:0A:F4:01:02"),
            Some([0x0a, 0x58, 0x0a, 0xf4, 1, 2])
        );
        assert_eq!(format_mac(&[0x0a, 0x58, 0x0a, 0xf4, 1, 2]), "0a:58:0a:f4:01:02");
        for bad in [
            "",
            "0a:58:0a:f4:01",
            "zz:58:0a:f4:01:02",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
