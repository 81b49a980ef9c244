//! Deleting the conntrack entries of UDP flows to endpoints that went away.
//!
//! UDP has no connection to close: a client that keeps sending from one socket keeps
//! matching its conntrack entry, whose NAT still points at the removed endpoint, until the
//! entry times out (30 s to 180 s). kube-proxy deletes those entries, and so does Ferry,
//! over ctnetlink (`NETLINK_NETFILTER`), with no `conntrack` program:
//!
//! 1. one dump of the conntrack table per address family concerned
//!    (`IPCTNL_MSG_CT_GET` with `NLM_F_DUMP`);
//! 2. the entries that match a [`UdpFlowFilter`] are collected: protocol UDP, reply source
//!    the removed endpoint (so the flow was DNATed to it), original destination a Service
//!    address and port, or the NodePort on any address other than the endpoint itself;
//! 3. each one is deleted by its original tuple and zone (`IPCTNL_MSG_CT_DELETE`); one that
//!    is already gone (`ENOENT`) is fine.
//!
//! TCP entries are never deleted: the filter requires protocol 17, and a delete names one
//! UDP tuple. The socket is opened in the network namespace of the calling thread.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

use crate::nft::wire::{
    align4, attrs, put_attr, NLA_F_NESTED, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};

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

/// One conntrack entry's identity: the original tuple, the reply source and the zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub proto: u8,
    pub orig_src: SocketAddr,
    pub orig_dst: SocketAddr,
    pub reply_src: SocketAddr,
    pub zone: u16,
}

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

const IPPROTO_UDP: u8 = 17;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

impl Conntrack {
    /// Deletes every UDP conntrack entry that one of `filters` matches. Returns how many
    /// were deleted.
    pub fn delete_udp_flows(&mut self, filters: &[UdpFlowFilter]) -> io::Result<usize> {
        let mut deleted = 0;
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            let wanted = filters.iter().any(|f| family_of(f.endpoint.ip()) == family);
            if !wanted {
                continue;
            }
            let entries = self.dump(family)?;
            for e in entries.iter().filter(|e| filters.iter().any(|f| f.matches(e))) {
                if self.delete(family, e)? {
                    deleted += 1;
                }
            }
        }
        Ok(deleted)
    }
}

/// Every conntrack entry of one family (`libc::AF_INET` or `AF_INET6`) in the calling
/// thread's network namespace. For tests and diagnostics.
pub fn list(family: u8) -> io::Result<Vec<Entry>> {
    Conntrack::open()?.dump(family)
}

fn family_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

/// A ctnetlink socket in the network namespace of the thread that opened it. Keep it:
/// closing a netfilter netlink socket waits for an RCU grace period (~10 ms).
pub struct Conntrack {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Conntrack {
    pub fn open() -> io::Result<Conntrack> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        Ok(Conntrack {
            socket,
            seq: 0,
            buf: Vec::with_capacity(1 << 18),
        })
    }

    fn request(&mut self, msg_type: u16, flags: u16, family: u8, attrs: &[u8]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let len = 16 + 4 + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8 | msg_type).to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        // struct nfgenmsg: family, version 0, res_id 0.
        msg.extend_from_slice(&[family, 0, 0, 0]);
        msg.extend_from_slice(attrs);
        self.socket.send(&msg, 0)?;
        Ok(self.seq)
    }

    /// Receives datagrams, calling `f` with each message (type, payload after the
    /// header) of sequence `seq`, until DONE or an ack/error. Returns the errno of an
    /// error message (0 for an ack), or 0 at DONE.
    fn receive(&mut self, seq: u32, mut f: impl FnMut(u16, &[u8])) -> io::Result<i32> {
        loop {
            self.buf.clear();
            let n = self.socket.recv(&mut self.buf, 0)?;
            let data = &self.buf[..n.min(self.buf.len())];
            let mut off = 0;
            while off + 16 <= data.len() {
                let len = u32::from_ne_bytes(data[off..off + 4].try_into().unwrap()) as usize;
                let ty = u16::from_ne_bytes(data[off + 4..off + 6].try_into().unwrap());
                let mseq = u32::from_ne_bytes(data[off + 8..off + 12].try_into().unwrap());
                if len < 16 || off + len > data.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let payload = &data[off + 16..off + len];
                off += align4(len);
                if mseq != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(0),
                    NLMSG_ERROR => {
                        let code = payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                            .unwrap_or(0);
                        return Ok(-code);
                    }
                    _ => f(ty, payload),
                }
            }
        }
    }

    fn dump(&mut self, family: u8) -> io::Result<Vec<Entry>> {
        let seq = self.request(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, family, &[])?;
        let mut entries = Vec::new();
        let errno = self.receive(seq, |_, payload| {
            if let Some(e) = payload.get(4..).and_then(parse_entry) {
                entries.push(e);
            }
        })?;
        if errno != 0 {
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok(entries)
    }

    /// Deletes one entry; false when it was already gone.
    fn delete(&mut self, family: u8, e: &Entry) -> io::Result<bool> {
        let mut ip = Vec::new();
        match (e.orig_src.ip(), e.orig_dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                put_attr(&mut ip, CTA_IP_V4_SRC, &s.octets());
                put_attr(&mut ip, CTA_IP_V4_DST, &d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                put_attr(&mut ip, CTA_IP_V6_SRC, &s.octets());
                put_attr(&mut ip, CTA_IP_V6_DST, &d.octets());
            }
            _ => return Ok(false),
        }
        let mut proto = Vec::new();
        put_attr(&mut proto, CTA_PROTO_NUM, &[e.proto]);
        put_attr(&mut proto, CTA_PROTO_SRC_PORT, &e.orig_src.port().to_be_bytes());
        put_attr(&mut proto, CTA_PROTO_DST_PORT, &e.orig_dst.port().to_be_bytes());
        let mut tuple = Vec::new();
        put_attr(&mut tuple, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
        put_attr(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
        let mut attrs = Vec::new();
        put_attr(&mut attrs, CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple);
        if e.zone != 0 {
            put_attr(&mut attrs, CTA_ZONE, &e.zone.to_be_bytes());
        }
        let seq = self.request(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, family, &attrs)?;
        match self.receive(seq, |_, _| {})? {
            0 => Ok(true),
            libc::ENOENT => Ok(false),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// (source, destination, protocol) of a CTA_TUPLE_* attribute.
fn parse_tuple(data: &[u8]) -> Option<(SocketAddr, SocketAddr, u8)> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0u16, 0u16);
    for (ty, p, _) in attrs(data) {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, a, _) in attrs(p) {
                    let ip = match (ty, a.len()) {
                        (CTA_IP_V4_SRC | CTA_IP_V4_DST, 4) => {
                            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(a).ok()?))
                        }
                        (CTA_IP_V6_SRC | CTA_IP_V6_DST, 16) => {
                            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(a).ok()?))
                        }
                        _ => continue,
                    };
                    if ty == CTA_IP_V4_SRC || ty == CTA_IP_V6_SRC {
                        src = Some(ip);
                    } else {
                        dst = Some(ip);
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, a, _) in attrs(p) {
                    match (ty, a.len()) {
                        (CTA_PROTO_NUM, 1) => proto = Some(a[0]),
                        (CTA_PROTO_SRC_PORT, 2) => sport = u16::from_be_bytes([a[0], a[1]]),
                        (CTA_PROTO_DST_PORT, 2) => dport = u16::from_be_bytes([a[0], a[1]]),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((SocketAddr::new(src?, sport), SocketAddr::new(dst?, dport), proto?))
}

/// One conntrack entry from the attributes of an IPCTNL_MSG_CT_NEW message.
fn parse_entry(data: &[u8]) -> Option<Entry> {
    let (mut orig, mut reply, mut zone) = (None, None, 0u16);
    for (ty, p, _) in attrs(data) {
        match ty {
            CTA_TUPLE_ORIG => orig = parse_tuple(p),
            CTA_TUPLE_REPLY => reply = parse_tuple(p),
            CTA_ZONE if p.len() == 2 => zone = u16::from_be_bytes([p[0], p[1]]),
            _ => {}
        }
    }
    let (orig_src, orig_dst, proto) = orig?;
    let (reply_src, _, _) = reply?;
    Some(Entry {
        proto,
        orig_src,
        orig_dst,
        reply_src,
        zone,
    })
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

    #[test]
    fn an_entry_survives_encoding_and_parsing() {
        // Build a CT_NEW payload the way the kernel does and parse it back.
        let tuple = |src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16| {
            let mut ip = Vec::new();
            put_attr(&mut ip, CTA_IP_V4_SRC, &src);
            put_attr(&mut ip, CTA_IP_V4_DST, &dst);
            let mut proto = Vec::new();
            put_attr(&mut proto, CTA_PROTO_NUM, &[17]);
            put_attr(&mut proto, CTA_PROTO_SRC_PORT, &sport.to_be_bytes());
            put_attr(&mut proto, CTA_PROTO_DST_PORT, &dport.to_be_bytes());
            let mut t = Vec::new();
            put_attr(&mut t, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
            put_attr(&mut t, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
            t
        };
        let mut data = Vec::new();
        put_attr(
            &mut data,
            CTA_TUPLE_ORIG | NLA_F_NESTED,
            &tuple([10, 2, 0, 5], [10, 96, 0, 10], 4000, 53),
        );
        put_attr(
            &mut data,
            CTA_TUPLE_REPLY | NLA_F_NESTED,
            &tuple([10, 1, 0, 2], [10, 2, 0, 5], 5353, 4000),
        );
        put_attr(&mut data, CTA_ZONE, &7u16.to_be_bytes());
        let e = parse_entry(&data).unwrap();
        assert_eq!(
            e,
            Entry {
                proto: 17,
                orig_src: "10.2.0.5:4000".parse().unwrap(),
                orig_dst: "10.96.0.10:53".parse().unwrap(),
                reply_src: "10.1.0.2:5353".parse().unwrap(),
                zone: 7,
            }
        );
    }
}
