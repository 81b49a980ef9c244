//! The elements and sets of Ferry's table, as data: map keys and values, set
//! declarations. Like the rules ([`super::rules`]), each has its nft text (`Display`) and
//! what goes to the kernel (`key_bytes()`, `spec()`), and `proxy/tests/nftables.rs` holds
//! the two to the same meaning.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnetwork::IpNetwork;

use super::rules::{addr_bytes, ipx, proto_number};
use crate::nft::{self, DataType, SetSpec, Typeof, Verdict};
use crate::plan::{Family, Protocol};

/// The key of a map or set element.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// `10.96.0.10 . tcp . 80` (service-ips, no-endpoint-services, firewall-ips)
    Service {
        addr: IpAddr,
        proto: Protocol,
        port: u16,
    },
    /// `tcp . 30080` (service-nodeports, no-endpoint-nodeports)
    NodePort { proto: Protocol, port: u16 },
    /// `100` (endpoint maps: a numgen result)
    Index(u32),
    /// `10.1.0.2 . 10.1.0.2` (hairpin)
    Pair(IpAddr),
    /// `10.0.0.0/8` (cluster-cidrs, nodeport-ips: interval sets)
    Net(IpNetwork),
}

/// The value an element maps its key to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    /// A set element.
    None,
    Goto(String),
    Drop,
    /// An endpoint map's `address . port`.
    Endpoint(IpAddr, u16),
}

/// One element of one of the table's maps or sets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub map: String,
    pub key: Key,
    pub value: Value,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Service { addr, proto, port } => write!(f, "{addr} . {} . {port}", proto.as_str()),
            Key::NodePort { proto, port } => write!(f, "{} . {port}", proto.as_str()),
            Key::Index(i) => write!(f, "{i}"),
            Key::Pair(a) => write!(f, "{a} . {a}"),
            Key::Net(n) => {
                let n = IpNetwork::new(n.network(), n.prefix()).unwrap_or(*n);
                write!(f, "{n}")
            }
        }
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.key)?;
        match &self.value {
            Value::None => Ok(()),
            Value::Goto(c) => write!(f, " : goto {c}"),
            Value::Drop => f.write_str(" : drop"),
            Value::Endpoint(a, p) => write!(f, " : {a} . {p}"),
        }
    }
}

impl Element {
    /// The element as the kernel stores it.
    pub fn to_nft(&self) -> nft::Element {
        let data = match &self.value {
            Value::None => nft::ElemData::None,
            Value::Goto(c) => nft::ElemData::Verdict(Verdict::Goto(c.clone())),
            Value::Drop => nft::ElemData::Verdict(Verdict::Drop),
            Value::Endpoint(a, p) => {
                nft::ElemData::Value(nft::concat(&[&addr_bytes(*a)[..], &p.to_be_bytes()[..]]))
            }
        };
        let key = match &self.key {
            Key::Service { addr, proto, port } => nft::concat(&[
                &addr_bytes(*addr)[..],
                &[proto_number(*proto)],
                &port.to_be_bytes()[..],
            ]),
            Key::NodePort { proto, port } => {
                nft::concat(&[&[proto_number(*proto)][..], &port.to_be_bytes()[..]])
            }
            Key::Index(i) => i.to_ne_bytes().to_vec(),
            Key::Pair(a) => nft::concat(&[&addr_bytes(*a)[..], &addr_bytes(*a)[..]]),
            Key::Net(n) => return nft::Element::prefix(n.network(), n.prefix()),
        };
        nft::Element {
            key,
            key_end: None,
            data,
        }
    }
}

/// What a set or map of the table is for; its declaration follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// `address . inet_proto . inet_service : verdict`
    ServiceMap(Family),
    /// `inet_proto . inet_service : verdict`
    NodePortMap,
    /// `address`, intervals (without nft's auto-merge, which is done in userspace: the
    /// back end adds disjoint prefixes only)
    Cidrs(Family),
    /// `address . address`
    Hairpin(Family),
    /// `numgen … : address . port`
    Endpoints(Family, Protocol),
    /// `address`, dynamic with a timeout in seconds
    Affinity(Family, u32),
}

/// A set or map declaration.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SetDecl {
    pub name: String,
    pub kind: SetKind,
}

fn addr_type(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

fn addr_data_type(f: Family) -> DataType {
    match f {
        Family::V4 => DataType::Ipv4Addr,
        Family::V6 => DataType::Ipv6Addr,
    }
}

impl SetDecl {
    /// The declaration body in nft syntax (between the braces of `add set|map … { }`).
    pub fn body(&self) -> String {
        match self.kind {
            SetKind::ServiceMap(f) => format!("type {} . inet_proto . inet_service : verdict;", addr_type(f)),
            SetKind::NodePortMap => "type inet_proto . inet_service : verdict;".into(),
            SetKind::Cidrs(f) => format!("type {}; flags interval;", addr_type(f)),
            SetKind::Hairpin(f) => format!("type {} . {};", addr_type(f), addr_type(f)),
            SetKind::Endpoints(f, _) => format!("typeof numgen random mod 1 : {} daddr . th dport;", ipx(f)),
            SetKind::Affinity(f, t) => format!("type {}; flags dynamic,timeout; timeout {t}s;", addr_type(f)),
        }
    }

    /// `set` or `map`, as nft's commands name it.
    pub fn noun(&self) -> &'static str {
        match self.kind {
            SetKind::ServiceMap(_) | SetKind::NodePortMap | SetKind::Endpoints(..) => "map",
            _ => "set",
        }
    }

    /// The declaration the kernel gets.
    pub fn spec(&self) -> SetSpec {
        let mut spec = SetSpec::new(&self.name, vec![]);
        match self.kind {
            SetKind::ServiceMap(f) => {
                spec.key = vec![addr_data_type(f), DataType::InetProto, DataType::InetService];
                spec.data = Some(vec![DataType::Verdict]);
            }
            SetKind::NodePortMap => {
                spec.key = vec![DataType::InetProto, DataType::InetService];
                spec.data = Some(vec![DataType::Verdict]);
            }
            SetKind::Cidrs(f) => {
                spec.key = vec![addr_data_type(f)];
                spec.interval = true;
            }
            SetKind::Hairpin(f) => spec.key = vec![addr_data_type(f), addr_data_type(f)],
            SetKind::Endpoints(f, _) => {
                let daddr = match f {
                    Family::V4 => Typeof::IpDaddr,
                    Family::V6 => Typeof::Ip6Daddr,
                };
                spec.key = vec![DataType::Typeof(Typeof::NumgenRandom)];
                spec.data = Some(vec![DataType::Typeof(daddr), DataType::Typeof(Typeof::ThDport)]);
            }
            SetKind::Affinity(f, t) => {
                spec.key = vec![addr_data_type(f)];
                spec.dynamic = true;
                spec.timeout = Some(Duration::from_secs(u64::from(t)));
            }
        }
        spec
    }
}
