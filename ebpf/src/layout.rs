// The byte layout of every map key and value, as one table that both sides check against:
// `build.rs` `include!`s this file and turns it into `_Static_assert`s compiled with the C
// programs, and `maps.rs` turns it into `const` assertions on the Rust mirrors. A field
// moved on one side only stops the build instead of corrupting a map at run time.
//
// Plain data only: this file is compiled both inside the crate and inside build.rs.

/// One shared struct: its C name, size in bytes, and the byte offset of each field.
pub struct Layout {
    pub c_name: &'static str,
    pub size: usize,
    pub fields: &'static [(&'static str, usize)],
}

pub const SVC_KEY: Layout = Layout {
    c_name: "ferry_svc_key",
    size: 20,
    fields: &[("ip", 0), ("port", 16), ("proto", 18), ("scope", 19)],
};

pub const SVC: Layout = Layout {
    c_name: "ferry_svc",
    size: 16,
    fields: &[("id", 0), ("count", 4), ("affinity_timeout_s", 8), ("flags", 12)],
};

pub const BACKEND_KEY: Layout = Layout {
    c_name: "ferry_backend_key",
    size: 8,
    fields: &[("svc_id", 0), ("slot", 4)],
};

pub const SOCKADDR: Layout = Layout {
    c_name: "ferry_sockaddr",
    size: 20,
    fields: &[("ip", 0), ("port", 16), ("pad", 18)],
};

pub const SOCK_KEY: Layout = Layout {
    c_name: "ferry_sock_key",
    size: 32,
    fields: &[
        ("cookie", 0),
        ("ip", 8),
        ("port", 24),
        ("proto", 26),
        ("pad", 27),
        ("pad2", 28),
    ],
};

pub const AFFINITY_KEY: Layout = Layout {
    c_name: "ferry_affinity_key",
    size: 16,
    fields: &[("netns_cookie", 0), ("svc_id", 8), ("pad", 12)],
};

pub const STICKY: Layout = Layout {
    c_name: "ferry_sticky",
    size: 40,
    fields: &[
        ("last_used_ns", 0),
        ("slot", 8),
        ("pad", 12),
        ("backend", 16),
        ("pad2", 36),
    ],
};

pub const FLOW4: Layout = Layout {
    c_name: "ferry_flow4",
    size: 16,
    fields: &[
        ("saddr", 0),
        ("daddr", 4),
        ("sport", 8),
        ("dport", 10),
        ("proto", 12),
        ("pad", 13),
    ],
};

pub const NODE_CONFIG: Layout = Layout {
    c_name: "ferry_node_config",
    size: 8,
    fields: &[("snat_ip4", 0), ("pad", 4)],
};

pub const RANGE_KEY: Layout = Layout {
    c_name: "ferry_range_key",
    size: 24,
    fields: &[("prefixlen", 0), ("svc_id", 4), ("ip", 8)],
};

pub const CLIENT_KEY: Layout = Layout {
    c_name: "ferry_client_key",
    size: 20,
    fields: &[("ip", 0), ("svc_id", 16)],
};

pub const FLOW6: Layout = Layout {
    c_name: "ferry_flow6",
    size: 40,
    fields: &[
        ("saddr", 0),
        ("daddr", 16),
        ("sport", 32),
        ("dport", 34),
        ("proto", 36),
        ("pad", 37),
    ],
};

pub const NAT4_ENTRY: Layout = Layout {
    c_name: "ferry_nat4_entry",
    size: 32,
    fields: &[("to", 0), ("last_seen_ns", 16), ("flags", 24), ("pad", 28)],
};

pub const NAT6_ENTRY: Layout = Layout {
    c_name: "ferry_nat6_entry",
    size: 56,
    fields: &[("to", 0), ("last_seen_ns", 40), ("flags", 48), ("pad", 52)],
};

pub const NODE_CONFIG6: Layout = Layout {
    c_name: "ferry_node_config6",
    size: 16,
    fields: &[("snat_ip6", 0)],
};

pub const ALL: &[Layout] = &[
    SVC_KEY,
    SVC,
    BACKEND_KEY,
    SOCKADDR,
    SOCK_KEY,
    AFFINITY_KEY,
    STICKY,
    FLOW4,
    NODE_CONFIG,
    RANGE_KEY,
    CLIENT_KEY,
    FLOW6,
    NODE_CONFIG6,
    NAT4_ENTRY,
    NAT6_ENTRY,
];

/// Sizes of the maps (entries), passed to C as `-D` so both sides agree.
pub const MAX_SERVICES: u32 = 65_536;
/// Endpoints of all frontends together.
pub const MAX_BACKENDS: u32 = 262_144;
/// Endpoints one frontend may have (the C side's loops do not depend on it; the Rust side
/// refuses more).
pub const MAX_BACKENDS_PER_SERVICE: u32 = 4_096;
/// Live sockets remembered for reverse translation and UDP stickiness (LRU).
pub const MAX_SOCKETS: u32 = 262_144;
/// Translated connections from outside (two entries each, LRU).
pub const MAX_NAT_FLOWS: u32 = 262_144;
/// Client netns x Service pairs remembered for session affinity (LRU).
pub const MAX_AFFINITY: u32 = 65_536;
/// loadBalancerSourceRanges of all frontends together.
pub const MAX_SOURCE_RANGES: u32 = 65_536;
