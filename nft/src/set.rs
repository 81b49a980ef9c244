//! Sets and maps: their declaration ([`SetSpec`]), element values ([`Element`]) and the
//! user data nft reads back to print them.
//!
//! The kernel knows a set's key and data only as a type number and a length; nft stores
//! the rest in `NFTA_SET_USERDATA` (byte order of key and data, `typeof` expressions) and
//! needs it to print elements as addresses, ports and protocol names instead of hex. The
//! encoding below is what nft 1.0.6 writes for the same declaration (the tests compare the
//! bytes).

use std::net::IpAddr;
use std::time::Duration;

use super::expr::Verdict;

/// nft's userspace data types (`enum datatypes` in nftables' datatype.h), one per key or
/// data field. A concatenation is several fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// Only as map data: a verdict map.
    Verdict,
    /// An integer of this many bytes, host byte order. nft cannot declare it with `type`;
    /// prefer a [`Typeof`] that yields one (e.g. [`Typeof::NumgenRandom`]).
    Integer(u32),
    Ipv4Addr,
    Ipv6Addr,
    /// A protocol number, printed as `tcp`, `udp`, ...
    InetProto,
    /// A port, network byte order.
    InetService,
    /// A packet mark, host byte order.
    Mark,
    /// Declared by the expression that produces it (`typeof ...`): same key bytes as the
    /// underlying type, but nft lists the declaration as that expression.
    Typeof(Typeof),
}

/// The expressions a set may be declared with (`typeof numgen random mod 1 : ip daddr .
/// th dport`). A key or data whose fields are all `Typeof` is declared with `typeof`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Typeof {
    /// `numgen random mod 1`: a 4-byte host-order integer (the key of the maps a
    /// `numgen random mod N offset O map @m` rule looks into).
    NumgenRandom,
    IpSaddr,
    IpDaddr,
    Ip6Saddr,
    Ip6Daddr,
    /// `th sport` / `th dport`: a port, whatever the transport protocol.
    ThSport,
    ThDport,
    MetaL4proto,
    MetaMark,
}

// nftables' enum datatypes.
const TYPE_VERDICT: u32 = 1;
const TYPE_INTEGER: u32 = 4;
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_MARK: u32 = 19;
/// Bits per field in a concatenation's type number.
const TYPE_BITS: u32 = 6;

// nftables' enum byteorder.
const BYTEORDER_INVALID: u32 = 0;
const BYTEORDER_HOST: u32 = 1;
const BYTEORDER_BIG: u32 = 2;

// nftables' enum expr_types (what a typeof udata names).
const EXPR_PAYLOAD: u32 = 7;
const EXPR_META: u32 = 9;
const EXPR_CONCAT: u32 = 13;
const EXPR_NUMGEN: u32 = 23;

// libnftnl's enum nftnl_udata_set_types.
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_DATABYTEORDER: u8 = 1;
const UDATA_SET_KEY_TYPEOF: u8 = 3;
const UDATA_SET_DATA_TYPEOF: u8 = 4;
const UDATA_SET_DATA_INTERVAL: u8 = 6;
// Inside a typeof: the expression type, then its data.
const UDATA_TYPEOF_EXPR: u8 = 0;
const UDATA_TYPEOF_DATA: u8 = 1;
// libnftnl's enum nftnl_udata_set_elem_types / flags.
pub(crate) const UDATA_SET_ELEM_FLAGS: u8 = 1;
pub(crate) const SET_ELEM_F_INTERVAL_OPEN: u32 = 1;

// nftables' enum proto_desc_id and header field numbers.
const PROTO_DESC_TH: u32 = 11;
const PROTO_DESC_IP: u32 = 12;
const PROTO_DESC_IP6: u32 = 13;
const IPHDR_SADDR: u32 = 11;
const IPHDR_DADDR: u32 = 12;
const IP6HDR_SADDR: u32 = 8;
const IP6HDR_DADDR: u32 = 9;
const THDR_SPORT: u32 = 1;
const THDR_DPORT: u32 = 2;

impl DataType {
    fn base(self) -> DataType {
        match self {
            DataType::Typeof(t) => match t {
                Typeof::NumgenRandom => DataType::Integer(4),
                Typeof::IpSaddr | Typeof::IpDaddr => DataType::Ipv4Addr,
                Typeof::Ip6Saddr | Typeof::Ip6Daddr => DataType::Ipv6Addr,
                Typeof::ThSport | Typeof::ThDport => DataType::InetService,
                Typeof::MetaL4proto => DataType::InetProto,
                Typeof::MetaMark => DataType::Mark,
            },
            other => other,
        }
    }

    /// nft's type number.
    pub fn type_id(self) -> u32 {
        match self.base() {
            DataType::Verdict => TYPE_VERDICT,
            DataType::Integer(_) => TYPE_INTEGER,
            DataType::Ipv4Addr => TYPE_IPADDR,
            DataType::Ipv6Addr => TYPE_IP6ADDR,
            DataType::InetProto => TYPE_INET_PROTOCOL,
            DataType::InetService => TYPE_INET_SERVICE,
            DataType::Mark => TYPE_MARK,
            DataType::Typeof(_) => unreachable!(),
        }
    }

    /// Length of one value in bytes, unpadded.
    pub fn size(self) -> u32 {
        match self.base() {
            DataType::Verdict => 0,
            DataType::Integer(n) => n,
            DataType::Ipv4Addr | DataType::Mark => 4,
            DataType::Ipv6Addr => 16,
            DataType::InetProto => 1,
            DataType::InetService => 2,
            DataType::Typeof(_) => unreachable!(),
        }
    }

    fn byteorder(self) -> u32 {
        match self.base() {
            DataType::Integer(_) | DataType::Mark => BYTEORDER_HOST,
            DataType::Ipv4Addr | DataType::Ipv6Addr | DataType::InetService => BYTEORDER_BIG,
            DataType::Verdict | DataType::InetProto | DataType::Typeof(_) => BYTEORDER_INVALID,
        }
    }

    /// The typeof udata of one field: `[EXPR type] [DATA { ... }]`.
    fn typeof_udata(self, u: &mut Udata) -> bool {
        let DataType::Typeof(t) = self else {
            return false;
        };
        let (etype, fields): (u32, &[u32]) = match t {
            // numgen: type NFT_NG_RANDOM, modulus 1, offset 0.
            Typeof::NumgenRandom => (EXPR_NUMGEN, &[1, 1, 0]),
            Typeof::IpSaddr => (EXPR_PAYLOAD, &[PROTO_DESC_IP, IPHDR_SADDR]),
            Typeof::IpDaddr => (EXPR_PAYLOAD, &[PROTO_DESC_IP, IPHDR_DADDR]),
            Typeof::Ip6Saddr => (EXPR_PAYLOAD, &[PROTO_DESC_IP6, IP6HDR_SADDR]),
            Typeof::Ip6Daddr => (EXPR_PAYLOAD, &[PROTO_DESC_IP6, IP6HDR_DADDR]),
            Typeof::ThSport => (EXPR_PAYLOAD, &[PROTO_DESC_TH, THDR_SPORT]),
            Typeof::ThDport => (EXPR_PAYLOAD, &[PROTO_DESC_TH, THDR_DPORT]),
            Typeof::MetaL4proto => (EXPR_META, &[16]), // NFT_META_L4PROTO
            Typeof::MetaMark => (EXPR_META, &[3]),     // NFT_META_MARK
        };
        u.put_u32(UDATA_TYPEOF_EXPR, etype);
        let d = u.begin(UDATA_TYPEOF_DATA);
        for (i, v) in fields.iter().enumerate() {
            u.put_u32(i as u8, *v);
        }
        u.end(d);
        true
    }
}

/// The kernel's view of a key or data made of `fields`: (type number, length). Fields of a
/// concatenation are padded to 4 bytes each, and the type numbers are packed 6 bits each.
pub(crate) fn kernel_type(fields: &[DataType]) -> (u32, u32) {
    if let [one] = fields {
        return (one.type_id(), one.size());
    }
    let id = fields.iter().fold(0, |acc, f| (acc << TYPE_BITS) | f.type_id());
    let len = fields.iter().map(|f| (f.size() + 3) & !3).sum();
    (id, len)
}

fn byteorder(fields: &[DataType]) -> u32 {
    match fields {
        [one] => one.byteorder(),
        _ => BYTEORDER_INVALID,
    }
}

/// A set or map of the table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SetSpec {
    pub name: String,
    /// More than one field: a concatenation `a . b . c`.
    pub key: Vec<DataType>,
    /// `Some([Verdict])`: a verdict map; `Some(fields)`: a data map; `None`: a set.
    pub data: Option<Vec<DataType>>,
    /// `flags interval`: elements are ranges (single-field keys only, see [`Element`]).
    pub interval: bool,
    /// `flags dynamic`: rules may add elements (`update @set { ... }`).
    pub dynamic: bool,
    /// `flags timeout` with this default timeout.
    pub timeout: Option<Duration>,
}

impl SetSpec {
    /// A set of `key` with no flags.
    pub fn new(name: impl Into<String>, key: Vec<DataType>) -> SetSpec {
        SetSpec {
            name: name.into(),
            key,
            data: None,
            interval: false,
            dynamic: false,
            timeout: None,
        }
    }

    pub(crate) fn is_verdict_map(&self) -> bool {
        matches!(self.data.as_deref(), Some([DataType::Verdict]))
    }

    /// NFTA_SET_USERDATA as nft writes it (libnftnl's TLV format: one byte type, one byte
    /// length, unaligned values, u32 in host order).
    pub(crate) fn udata(&self) -> Vec<u8> {
        let mut u = Udata::default();
        u.put_u32(UDATA_SET_KEYBYTEORDER, byteorder(&self.key));
        if let Some(data) = &self.data {
            u.put_u32(UDATA_SET_DATABYTEORDER, byteorder(data));
        }
        fields_typeof(&mut u, UDATA_SET_KEY_TYPEOF, &self.key);
        if let Some(data) = &self.data {
            if !self.is_verdict_map() {
                fields_typeof(&mut u, UDATA_SET_DATA_TYPEOF, data);
            }
            u.put_u32(UDATA_SET_DATA_INTERVAL, 0);
        }
        u.buf
    }
}

/// The typeof udata of a key or data: nothing for one plain field; the expression of a
/// single typeof field; for a concatenation, the concat with its typeof fields, or an
/// empty concat (nft's marker for `type a . b`) when they are not all typeof.
fn fields_typeof(u: &mut Udata, ty: u8, fields: &[DataType]) {
    let all_typeof = fields.iter().all(|f| matches!(f, DataType::Typeof(_)));
    match fields {
        [] => {}
        [one] => {
            if all_typeof {
                let n = u.begin(ty);
                one.typeof_udata(u);
                u.end(n);
            }
        }
        _ => {
            let n = u.begin(ty);
            u.put_u32(UDATA_TYPEOF_EXPR, EXPR_CONCAT);
            let d = u.begin(UDATA_TYPEOF_DATA);
            if all_typeof {
                for (i, f) in fields.iter().enumerate() {
                    let sub = u.begin(i as u8);
                    f.typeof_udata(u);
                    u.end(sub);
                }
            }
            u.end(d);
            u.end(n);
        }
    }
}

/// libnftnl user data: TLVs of one byte type, one byte length.
#[derive(Default)]
pub(crate) struct Udata {
    pub buf: Vec<u8>,
}

impl Udata {
    pub fn put_u32(&mut self, ty: u8, v: u32) {
        self.buf.extend_from_slice(&[ty, 4]);
        self.buf.extend_from_slice(&v.to_ne_bytes());
    }

    fn begin(&mut self, ty: u8) -> usize {
        self.buf.extend_from_slice(&[ty, 0]);
        self.buf.len() - 2
    }

    fn end(&mut self, start: usize) {
        let len = self.buf.len() - start - 2;
        assert!(len <= 255, "user data nest of {len} bytes");
        self.buf[start + 1] = len as u8;
    }
}

/// What an element maps to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ElemData {
    /// A set element.
    None,
    /// A data map element (e.g. [`concat()`] of an address and a port).
    Value(Vec<u8>),
    /// A verdict map element.
    Verdict(Verdict),
}

/// One element. Keys are the bytes the kernel compares: [`concat()`] for a concatenation,
/// addresses and ports in network order ([`ip_bytes`], [`port_bytes`]), integers and marks
/// in host order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Element {
    pub key: Vec<u8>,
    /// For `interval` sets: the last key of the range, inclusive (`10.255.255.255` for
    /// `10.0.0.0/8`); `None` is the single key. Encoded as nft does for single-field
    /// interval sets: the start, then `last + 1` flagged as an interval end (or, when the
    /// range reaches the largest key, the start alone marked open).
    pub key_end: Option<Vec<u8>>,
    pub data: ElemData,
}

impl Element {
    /// A set element.
    pub fn key(key: impl Into<Vec<u8>>) -> Element {
        Element {
            key: key.into(),
            key_end: None,
            data: ElemData::None,
        }
    }

    /// A verdict map element.
    pub fn verdict(key: impl Into<Vec<u8>>, verdict: Verdict) -> Element {
        Element {
            key: key.into(),
            key_end: None,
            data: ElemData::Verdict(verdict),
        }
    }

    /// A data map element.
    pub fn value(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Element {
        Element {
            key: key.into(),
            key_end: None,
            data: ElemData::Value(value.into()),
        }
    }

    /// The range of an address prefix (`10.0.0.0/8`), for an interval set.
    pub fn prefix(net: IpAddr, prefix_len: u8) -> Element {
        let bytes = ip_bytes(net);
        let mask = super::expr::prefix_mask(bytes.len(), u32::from(prefix_len));
        let start: Vec<u8> = bytes.iter().zip(&mask).map(|(b, m)| b & m).collect();
        let end: Vec<u8> = start.iter().zip(&mask).map(|(b, m)| b | !m).collect();
        Element {
            key: start,
            key_end: Some(end),
            data: ElemData::None,
        }
    }
}

/// The fields of a concatenation, each padded with zeros to 4 bytes, as the kernel's
/// registers and set keys lay them out (`10.0.0.1 . tcp . 80` is 12 bytes).
pub fn concat(fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(fields.iter().map(|f| (f.len() + 3) & !3).sum());
    for f in fields {
        out.extend_from_slice(f);
        out.resize((out.len() + 3) & !3, 0);
    }
    out
}

/// An address in network order (4 or 16 bytes).
pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// A port in network order (`inet_service`).
pub fn port_bytes(port: u16) -> [u8; 2] {
    port.to_be_bytes()
}

/// A protocol number (`inet_proto`): 6 tcp, 17 udp, 132 sctp.
pub fn proto_bytes(proto: u8) -> [u8; 1] {
    [proto]
}

/// A 32-bit integer or mark as the kernel holds it (host order): keys of `mark` and
/// `numgen` maps.
pub fn u32_bytes(v: u32) -> [u8; 4] {
    v.to_ne_bytes()
}

/// `bytes + 1` as a big-endian number, or `None` when it overflows (all ones).
pub(crate) fn successor(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = bytes.to_vec();
    for b in out.iter_mut().rev() {
        if *b == 0xff {
            *b = 0;
        } else {
            *b += 1;
            return Some(out);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use DataType::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn map(name: &str, key: Vec<DataType>, data: Vec<DataType>) -> SetSpec {
        SetSpec {
            data: Some(data),
            ..SetSpec::new(name, key)
        }
    }

    #[test]
    fn concat_pads_each_field() {
        let k = concat(&[&[10, 0, 0, 1], &proto_bytes(6), &port_bytes(80)]);
        assert_eq!(k, [10, 0, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]);
    }

    #[test]
    fn kernel_types_of_concatenations() {
        assert_eq!(kernel_type(&[Ipv4Addr]), (7, 4));
        assert_eq!(kernel_type(&[InetService]), (13, 2));
        assert_eq!(kernel_type(&[Ipv4Addr, InetProto, InetService]), (0x730d, 12));
        assert_eq!(kernel_type(&[Ipv6Addr, InetProto, InetService]), (0x830d, 24));
        assert_eq!(kernel_type(&[InetProto, InetService]), (0x30d, 8));
        assert_eq!(kernel_type(&[Ipv4Addr, Ipv4Addr]), (0x1c7, 8));
        assert_eq!(
            kernel_type(&[Typeof(super::Typeof::Ip6Daddr), Typeof(super::Typeof::ThDport)]),
            (0x20d, 20)
        );
    }

    // The expected bytes are NFTA_SET_USERDATA as nft 1.0.6 sent it for the same
    // declaration (captured with strace, see the module docs of `nft`).
    #[test]
    fn user_data_is_what_nft_writes() {
        let s = SetSpec {
            interval: true,
            ..SetSpec::new("cluster-cidrs-v4", vec![Ipv4Addr])
        };
        assert_eq!(hex(&s.udata()), "000402000000");
        assert_eq!(hex(&SetSpec::new("p", vec![InetProto]).udata()), "000400000000");
        assert_eq!(hex(&SetSpec::new("m", vec![Mark]).udata()), "000401000000");
        assert_eq!(
            hex(&SetSpec::new("hairpin-v4", vec![Ipv4Addr, Ipv4Addr]).udata()),
            "000400000000030800040d0000000100"
        );
        assert_eq!(
            hex(&map(
                "service-ips-v4",
                vec![Ipv4Addr, InetProto, InetService],
                vec![Verdict]
            )
            .udata()),
            "000400000000010400000000030800040d0000000100060400000000"
        );
        assert_eq!(
            hex(&map("pm", vec![InetService], vec![Ipv4Addr]).udata()),
            "000402000000010402000000060400000000"
        );
        assert_eq!(
            hex(&map("a", vec![Mark], vec![Ipv4Addr, InetService]).udata()),
            "000401000000010400000000040800040d0000000100060400000000"
        );
        use super::Typeof as T;
        assert_eq!(
            hex(&SetSpec::new("i", vec![Typeof(T::IpSaddr)]).udata()),
            "0004020000000314000407000000010c00040c00000001040b000000"
        );
        assert_eq!(
            hex(&map(
                "endpoints-v4-07",
                vec![Typeof(T::NumgenRandom)],
                vec![Typeof(T::IpDaddr), Typeof(T::ThDport)]
            )
            .udata()),
            "000401000000010400000000031a0004170000000112000401000000010401000000020400000000043400040d000000012c0014000407000000010c00040c00000001040c0000000114000407000000010c00040b000000010402000000060400000000"
        );
        assert_eq!(
            hex(&map("mk", vec![Typeof(T::MetaMark)], vec![Typeof(T::Ip6Saddr)]).udata()),
            "000401000000010402000000030e00040900000001060004030000000414000407000000010c00040d000000010408000000060400000000"
        );
        assert_eq!(
            hex(&SetSpec::new("l", vec![Typeof(T::MetaL4proto), Typeof(T::ThSport)]).udata()),
            "000400000000032e00040d0000000126000e00040900000001060004100000000114000407000000010c00040b000000010401000000"
        );
    }

    #[test]
    fn prefixes_become_ranges() {
        let e = Element::prefix("10.0.0.0".parse().unwrap(), 8);
        assert_eq!(e.key, [10, 0, 0, 0]);
        assert_eq!(e.key_end.as_deref(), Some(&[10, 255, 255, 255][..]));
        let e = Element::prefix("192.168.7.9".parse().unwrap(), 16);
        assert_eq!(e.key, [192, 168, 0, 0]);
        assert_eq!(
            successor(e.key_end.as_deref().unwrap()),
            Some(vec![192, 169, 0, 0])
        );
        assert_eq!(successor(&[0xff; 4]), None);
    }
}
