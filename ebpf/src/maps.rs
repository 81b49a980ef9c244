//! Rust mirrors of the map keys and values in `src/bpf/ferry.h`, and the conversions
//! between them and Ferry's own terms (socket addresses, protocols).
//!
//! Every mirror is held to the table in `layout.rs` by `const` assertions below, and the C
//! structs are held to the same table by the `_Static_assert`s build.rs generates: a field
//! changed on one side only fails the build.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::layout::{self, Layout};

/// IP protocol of a Service port, as the kernel numbers it in the map key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub(crate) fn number(self) -> u8 {
        match self {
            Protocol::Tcp => libc::IPPROTO_TCP as u8,
            Protocol::Udp => libc::IPPROTO_UDP as u8,
        }
    }

    pub(crate) fn from_number(n: u8) -> Option<Protocol> {
        match i32::from(n) {
            libc::IPPROTO_TCP => Some(Protocol::Tcp),
            libc::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// `struct ferry_svc_key`: a frontend (ClusterIP, externalIP, load-balancer IP or node
/// address) and whom the entry serves (`FERRY_SCOPE_*`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SvcKey {
    pub ip: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// `FERRY_SVC_KEEP_SOURCE`: no SNAT for traffic from outside.
pub(crate) const SVC_KEEP_SOURCE: u32 = 1;
/// `FERRY_SVC_SOURCE_RANGES`: new flows from outside only from the Service's ranges in
/// `ferry_source_ranges`.
pub(crate) const SVC_SOURCE_RANGES: u32 = 2;

/// `struct ferry_range_key` without its leading `prefixlen`, which aya's
/// [`aya::maps::lpm_trie::Key`] adds: a Service and an address range's first address.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RangeData {
    pub svc_id: u32,
    pub ip: [u32; 4],
}

/// `struct ferry_client_key`: a client address and a Service (affinity from outside).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ClientKey {
    pub ip: [u32; 4],
    pub svc_id: u32,
}

/// `struct ferry_flow4`: an IPv4 flow, as a key of `ferry_nat4` or what it is rewritten to.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Flow4 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `struct ferry_flow6`: an IPv6 flow, as a key of `ferry_nat6` or what it is rewritten to.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Flow6 {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `struct ferry_nat4_entry`: a value of `ferry_nat4`, what a flow is rewritten to, when a
/// packet of it last passed (CLOCK_MONOTONIC ns) and what it saw (`FLOW_*`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Nat4Entry {
    pub to: Flow4,
    pub last_seen_ns: u64,
    pub flags: u32,
    pub pad: u32,
}

/// `struct ferry_nat6_entry`: the same for `ferry_nat6`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Nat6Entry {
    pub to: Flow6,
    pub last_seen_ns: u64,
    pub flags: u32,
    pub pad: u32,
}

/// `FERRY_FLOW_SEEN`: a packet matched the entry after the one that made the flow.
pub(crate) const FLOW_SEEN: u32 = 1;
/// `FERRY_FLOW_FIN`, `FERRY_FLOW_RST`: a TCP FIN (RST) passed in the entry's direction.
pub(crate) const FLOW_FIN: u32 = 2;
pub(crate) const FLOW_RST: u32 = 4;

/// `struct ferry_node_config6`: the node's IPv6 SNAT address, as the maps hold addresses.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NodeConfig6 {
    pub snat_ip6: [u32; 4],
}

/// `struct ferry_node_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NodeConfig {
    pub snat_ip4: u32,
    pub pad: u32,
}

/// `struct ferry_svc`: a frontend's Service id, endpoint count and affinity timeout.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Svc {
    pub id: u32,
    pub count: u32,
    pub affinity_timeout_s: u32,
    pub flags: u32,
}

/// `struct ferry_backend_key`: slot `slot` of Service `svc_id`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BackendKey {
    pub svc_id: u32,
    pub slot: u32,
}

/// `struct ferry_sockaddr`: an endpoint (or, in `ferry_revnat`, a frontend).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SockAddr {
    pub ip: [u32; 4],
    pub port: u16,
    pub pad: u16,
}

/// `struct ferry_sock_key`: a socket (cookie) and an address it talks to.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SockKey {
    pub cookie: u64,
    pub ip: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
    pub pad2: u32,
}

/// `struct ferry_affinity_key`: a client network namespace and a Service.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct AffinityKey {
    pub netns_cookie: u64,
    pub svc_id: u32,
    pub pad: u32,
}

/// `struct ferry_sticky`: an endpoint chosen earlier and when it was last used.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sticky {
    pub last_used_ns: u64,
    pub slot: u32,
    pub pad: u32,
    pub backend: SockAddr,
    pub pad2: u32,
}

// SAFETY: all are #[repr(C)] with explicit padding (checked below), so every byte
// pattern is a valid value and no byte is uninitialised.
unsafe impl aya::Pod for SvcKey {}
unsafe impl aya::Pod for Svc {}
unsafe impl aya::Pod for BackendKey {}
unsafe impl aya::Pod for SockAddr {}
unsafe impl aya::Pod for SockKey {}
unsafe impl aya::Pod for AffinityKey {}
unsafe impl aya::Pod for Sticky {}
unsafe impl aya::Pod for Flow4 {}
unsafe impl aya::Pod for NodeConfig {}
unsafe impl aya::Pod for RangeData {}
unsafe impl aya::Pod for Flow6 {}
unsafe impl aya::Pod for NodeConfig6 {}
unsafe impl aya::Pod for ClientKey {}
unsafe impl aya::Pod for Nat4Entry {}
unsafe impl aya::Pod for Nat6Entry {}

/// Compile-time check of one mirror against the layout table: size, and each field's
/// offset in the table's order.
macro_rules! check_layout {
    ($ty:ty, $layout:expr, [$($field:ident),* $(,)?]) => {
        const _: () = {
            let l: Layout = $layout;
            assert!(std::mem::size_of::<$ty>() == l.size, "size differs from layout.rs");
            let offsets = [$(std::mem::offset_of!($ty, $field)),*];
            assert!(offsets.len() == l.fields.len(), "field count differs from layout.rs");
            let mut i = 0;
            while i < offsets.len() {
                assert!(offsets[i] == l.fields[i].1, "field offset differs from layout.rs");
                i += 1;
            }
        };
    };
}

check_layout!(SvcKey, layout::SVC_KEY, [ip, port, proto, scope]);
check_layout!(Svc, layout::SVC, [id, count, affinity_timeout_s, flags]);
check_layout!(BackendKey, layout::BACKEND_KEY, [svc_id, slot]);
check_layout!(SockAddr, layout::SOCKADDR, [ip, port, pad]);
check_layout!(SockKey, layout::SOCK_KEY, [cookie, ip, port, proto, pad, pad2]);
check_layout!(AffinityKey, layout::AFFINITY_KEY, [netns_cookie, svc_id, pad]);
check_layout!(Sticky, layout::STICKY, [last_used_ns, slot, pad, backend, pad2]);
check_layout!(Flow4, layout::FLOW4, [saddr, daddr, sport, dport, proto, pad]);
check_layout!(NodeConfig, layout::NODE_CONFIG, [snat_ip4, pad]);
check_layout!(ClientKey, layout::CLIENT_KEY, [ip, svc_id]);
check_layout!(Flow6, layout::FLOW6, [saddr, daddr, sport, dport, proto, pad]);
check_layout!(NodeConfig6, layout::NODE_CONFIG6, [snat_ip6]);
check_layout!(Nat4Entry, layout::NAT4_ENTRY, [to, last_seen_ns, flags, pad]);
check_layout!(Nat6Entry, layout::NAT6_ENTRY, [to, last_seen_ns, flags, pad]);
// RangeData sits after aya's 4-byte prefix length in the trie's key.
const _: () = {
    let l = layout::RANGE_KEY;
    assert!(std::mem::size_of::<aya::maps::lpm_trie::Key<RangeData>>() == l.size);
    assert!(l.fields[0].1 == 0 && l.fields[1].1 == 4 + std::mem::offset_of!(RangeData, svc_id));
    assert!(l.fields[2].1 == 4 + std::mem::offset_of!(RangeData, ip));
};

/// An address as the maps hold it: 16 bytes in network order, IPv4 v4-mapped.
pub(crate) fn ip_words(ip: IpAddr) -> [u32; 4] {
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    // Each word keeps the bytes in memory order, which is network order.
    std::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ])
    })
}

/// The inverse of [`ip_words`]: v4-mapped addresses come back as IPv4.
pub(crate) fn words_ip(words: [u32; 4]) -> IpAddr {
    let mut octets = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        octets[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// A port as the maps hold it: network byte order in memory.
pub(crate) fn port_word(port: u16) -> u16 {
    port.to_be()
}

pub(crate) fn word_port(word: u16) -> u16 {
    u16::from_be(word)
}

impl SvcKey {
    pub(crate) fn new(ip: IpAddr, port: u16, protocol: Protocol, scope: u8) -> SvcKey {
        SvcKey {
            ip: ip_words(ip),
            port: port_word(port),
            proto: protocol.number(),
            scope,
        }
    }
}

impl SockAddr {
    pub(crate) fn new(addr: SocketAddr) -> SockAddr {
        SockAddr {
            ip: ip_words(addr.ip()),
            port: port_word(addr.port()),
            pad: 0,
        }
    }

    pub(crate) fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(words_ip(self.ip), word_port(self.port))
    }
}

/// Whether two addresses are of one family for the data path: an IPv4 frontend needs IPv4
/// endpoints (a connect4 program can only write an IPv4 address).
pub(crate) fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_stored_in_network_order_and_v4_mapped() {
        let w = ip_words("10.96.0.1".parse().unwrap());
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_ne_bytes()).collect();
        assert_eq!(bytes, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 1]);
        assert_eq!(words_ip(w), "10.96.0.1".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(words_ip(ip_words(v6)), v6);
        assert_eq!(port_word(80).to_ne_bytes(), [0, 80]);
        let sa: SocketAddr = "[fd00::2]:8080".parse().unwrap();
        assert_eq!(SockAddr::new(sa).socket_addr(), sa);
    }

    #[test]
    fn protocol_numbers_round_trip() {
        for p in [Protocol::Tcp, Protocol::Udp] {
            assert_eq!(Protocol::from_number(p.number()), Some(p));
        }
        assert_eq!(Protocol::from_number(132), None);
    }
}
