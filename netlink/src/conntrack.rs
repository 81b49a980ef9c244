//! ctnetlink (`NETLINK_NETFILTER`, subsystem `NFNL_SUBSYS_CTNETLINK`): listing conntrack
//! entries and deleting one by its tuple, with netlink-packet-netfilter's messages.
//!
//! Why netlink-packet-netfilter (0.4): it is built on netlink-packet-core 0.9 like the
//! rtnetlink codecs here (one core in the build), builds with this workspace's toolchain,
//! and has what a delete-by-tuple needs: `IPCTNL_MSG_CT_GET` as a dump, and
//! `IPCTNL_MSG_CT_DELETE` with `CTA_TUPLE_ORIG` (addresses, protocol, ports). The one
//! attribute it has no type for, `CTA_ZONE`, travels as a raw attribute (a big-endian u16).
//!
//! - [`Socket::<Conntrack>::entries`]: one dump of a family's table; every protocol is
//!   listed, an entry the kernel sends without both tuples is skipped.
//! - [`Socket::<Conntrack>::delete`]: deletes exactly one entry, named by its original
//!   tuple and zone; an entry already gone (`ENOENT`, it timed out or another process
//!   deleted it) is `Ok(false)`, not an error.
//!
//! Which entries to delete is policy, and stays with the caller (the proxy's UDP flow
//! filters).

use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{DefaultNla, Nla};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::protocols::NETLINK_NETFILTER;

use crate::error::{Error, Result};
use crate::socket::{Family, Socket};

/// The ctnetlink family marker: `Socket<Conntrack>`.
#[derive(Debug, Clone, Copy)]
pub enum Conntrack {}

/// `CTA_ZONE` (linux/netfilter/nfnetlink_conntrack.h), not typed by the codec.
const CTA_ZONE: u16 = 18;
const NLA_TYPE_MASK: u16 = 0x3fff;

impl Family for Conntrack {
    const PROTOCOL: isize = NETLINK_NETFILTER;
    const NAME: &'static str = "ctnetlink";
    type Message = NetfilterMessage;

    fn describe(msg: &NetfilterMessage) -> String {
        let family = match msg.header.family {
            NetfilterProtoFamily::IPv4 => "ipv4",
            NetfilterProtoFamily::IPv6 => "ipv6",
            _ => "of another family",
        };
        match &msg.inner {
            NetfilterMessageInner::Conntrack(ConntrackMessage::Get(_)) => {
                format!("IPCTNL_MSG_CT_GET {family}")
            }
            NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(attrs)) => match entry_of(attrs) {
                Some((e, _)) => format!("IPCTNL_MSG_CT_DELETE {}", e.describe()),
                None => format!("IPCTNL_MSG_CT_DELETE {family}"),
            },
            NetfilterMessageInner::Conntrack(m) => format!("ctnetlink message {:?}", m.message_type()),
            _ => format!("netfilter subsystem {:?} message", msg.subsys()),
        }
    }
}

/// An address family of the conntrack table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// From `libc::AF_INET` / `AF_INET6` (which are also `NFPROTO_IPV4` / `NFPROTO_IPV6`).
    pub fn from_af(af: u8) -> Result<IpFamily> {
        match i32::from(af) {
            libc::AF_INET => Ok(IpFamily::V4),
            libc::AF_INET6 => Ok(IpFamily::V6),
            _ => Err(Error::InvalidRequest {
                what: format!("address family {af} has no conntrack table"),
                fix: "ask for AF_INET (2) or AF_INET6 (10)",
            }),
        }
    }

    fn header(self) -> NetfilterHeader {
        let family = match self {
            IpFamily::V4 => NetfilterProtoFamily::IPv4,
            IpFamily::V6 => NetfilterProtoFamily::IPv6,
        };
        NetfilterHeader::new(family, 0, 0)
    }
}

/// One conntrack entry's identity: protocol, original tuple, the reply's source (where a
/// DNATed flow really goes) and the zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub proto: u8,
    pub orig_src: SocketAddr,
    pub orig_dst: SocketAddr,
    pub reply_src: SocketAddr,
    pub zone: u16,
}

impl Entry {
    fn describe(&self) -> String {
        let proto = match self.proto {
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            132 => "sctp".to_string(),
            p => format!("protocol {p}"),
        };
        let zone = match self.zone {
            0 => String::new(),
            z => format!(" zone {z}"),
        };
        format!("{proto} {} -> {}{zone}", self.orig_src, self.orig_dst)
    }
}

impl Socket<Conntrack> {
    /// Every conntrack entry of `family` in this socket's network namespace.
    pub fn entries(&mut self, family: IpFamily) -> Result<Vec<Entry>> {
        let request = NetfilterMessage::new(family.header(), ConntrackMessage::Get(Vec::new()));
        Ok(self
            .dump(request)?
            .into_iter()
            .filter_map(|m| match m.inner {
                NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) => match entry_of(&attrs) {
                    Some((e, true)) => Some(e),
                    _ => None,
                },
                _ => None,
            })
            .collect())
    }

    /// Deletes the entry with `e`'s original tuple and zone. `Ok(false)` when there was
    /// none (already gone).
    pub fn delete(&mut self, e: &Entry) -> Result<bool> {
        let family = IpFamily::of(e.orig_src.ip());
        if IpFamily::of(e.orig_dst.ip()) != family {
            return Err(Error::InvalidRequest {
                what: format!("conntrack entry {} mixes IPv4 and IPv6", e.describe()),
                fix: "both addresses of a tuple must be of one family",
            });
        }
        let tuple = vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(e.orig_src.ip()),
                IPTuple::DestinationAddress(e.orig_dst.ip()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::from(e.proto)),
                ProtoTuple::SourcePort(e.orig_src.port()),
                ProtoTuple::DestinationPort(e.orig_dst.port()),
            ]),
        ];
        let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(tuple)];
        if e.zone != 0 {
            attrs.push(ConntrackAttribute::Other(DefaultNla::new(
                CTA_ZONE,
                e.zone.to_be_bytes().to_vec(),
            )));
        }
        let request = NetfilterMessage::new(family.header(), ConntrackMessage::Delete(attrs));
        match self.request(request, 0) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// (source, destination, protocol) of a tuple attribute; ports are 0 for protocols
/// without them (ICMP).
fn tuple_of(tuple: &[Tuple]) -> Option<(SocketAddr, SocketAddr, u8)> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
    for part in tuple {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(protos) => {
                for p in protos {
                    match p {
                        ProtoTuple::Protocol(p) => proto = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(p) => sport = *p,
                        ProtoTuple::DestinationPort(p) => dport = *p,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((SocketAddr::new(src?, sport), SocketAddr::new(dst?, dport), proto?))
}

/// The entry in a message's attributes, and whether it had a reply tuple (a delete
/// request has none: its reply source is then the original destination).
fn entry_of(attrs: &[ConntrackAttribute]) -> Option<(Entry, bool)> {
    let (mut orig, mut reply, mut zone) = (None, None, 0);
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = tuple_of(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = tuple_of(t),
            ConntrackAttribute::Other(nla)
                if nla.kind() & NLA_TYPE_MASK == CTA_ZONE && nla.value_len() == 2 =>
            {
                let mut be = [0u8; 2];
                nla.emit_value(&mut be);
                zone = u16::from_be_bytes(be);
            }
            _ => {}
        }
    }
    let (orig_src, orig_dst, proto) = orig?;
    let has_reply = reply.is_some();
    let reply_src = reply.map_or(orig_dst, |(src, _, _)| src);
    Some((
        Entry {
            proto,
            orig_src,
            orig_dst,
            reply_src,
            zone,
        },
        has_reply,
    ))
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{Emitable, NetlinkDeserializable, NetlinkHeader, NetlinkSerializable};

    use super::*;

    fn tuple(src: &str, dst: &str) -> Vec<Tuple> {
        let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(src.ip()),
                IPTuple::DestinationAddress(dst.ip()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Udp),
                ProtoTuple::SourcePort(src.port()),
                ProtoTuple::DestinationPort(dst.port()),
            ]),
        ]
    }

    #[test]
    fn an_entry_survives_encoding_and_parsing() {
        // A CT_NEW message as the kernel sends it in a dump, through the codec's bytes.
        let new = NetfilterMessage::new(
            IpFamily::V4.header(),
            ConntrackMessage::New(vec![
                ConntrackAttribute::CtaTupleOrig(tuple("10.2.0.5:4000", "10.96.0.10:53")),
                ConntrackAttribute::CtaTupleReply(tuple("10.1.0.2:5353", "10.2.0.5:4000")),
                ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, 7u16.to_be_bytes().to_vec())),
            ]),
        );
        let mut bytes = vec![0; Emitable::buffer_len(&new)];
        new.emit(&mut bytes);
        let mut header = NetlinkHeader::default();
        header.message_type = new.message_type();
        let parsed = NetfilterMessage::deserialize(&header, &bytes).unwrap();
        let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) = parsed.inner else {
            panic!("not a conntrack entry: {parsed:?}");
        };
        let (e, has_reply) = entry_of(&attrs).unwrap();
        assert!(has_reply);
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
        assert_eq!(e.describe(), "udp 10.2.0.5:4000 -> 10.96.0.10:53 zone 7");
    }

    #[test]
    fn only_inet_families_have_a_table() {
        assert_eq!(IpFamily::from_af(libc::AF_INET as u8).unwrap(), IpFamily::V4);
        assert_eq!(IpFamily::from_af(libc::AF_INET6 as u8).unwrap(), IpFamily::V6);
        let e = IpFamily::from_af(7).unwrap_err();
        assert!(e.to_string().contains("AF_INET (2) or AF_INET6 (10)"), "{e}");
    }
}
