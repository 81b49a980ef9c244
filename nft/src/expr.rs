//! Kernel expressions (`struct nft_expr_type`s) and their netlink encoding.
//!
//! A rule is a list of [`Expr`]s the kernel runs in order on 32-bit registers: loads
//! (payload, meta, ct, fib, numgen) write a destination register, comparisons and lookups
//! read a source register and stop the rule when they do not match, statements (nat,
//! masquerade, reject, immediate verdicts) act. Each expression is encoded as nft 1.0.6
//! encodes it (the same attributes, the same values), so `nft list` prints it back as the
//! nft syntax it came from; [`crate`]'s tests compare the encodings with nft's own.
//!
//! The helpers at the end ([`match_family`], [`ip_addr`], [`match_prefix`], ...) build
//! the expression sequences nft emits for the common matches of an `inet` table.

use std::time::Duration;

use super::wire::*;

/// A register. `R32(n)` is the n-th 32-bit data register (`NFT_REG32_00 + n`, n in 0..16);
/// a value longer than 4 bytes (an IPv6 address, a concatenation) fills consecutive ones.
/// A concatenation `a . b . c` is loaded field after field, each field starting at the next
/// free register (fields are padded to 4 bytes, see [`super::concat`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reg {
    /// The verdict register (immediate verdicts, verdict maps).
    Verdict,
    R32(u8),
}

impl Reg {
    /// The register number as nft sends it: a 32-bit register that starts one of the four
    /// 128-bit registers goes as `NFT_REG_1..4`, the others as `NFT_REG32_xx`; the kernel
    /// treats both the same, and `nft --debug=netlink` then prints the same numbers.
    pub(crate) fn code(self) -> u32 {
        match self {
            Reg::Verdict => 0,
            Reg::R32(n) if n % 4 == 0 => u32::from(n / 4) + 1,
            Reg::R32(n) => 8 + u32::from(n),
        }
    }
}

/// A verdict: in a rule ([`Expr::Verdict`]), as a verdict map's data, as a chain policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

impl Verdict {
    pub(crate) fn code(&self) -> (i32, Option<&str>) {
        match self {
            Verdict::Accept => (NF_ACCEPT, None),
            Verdict::Drop => (NF_DROP, None),
            Verdict::Return => (NFT_RETURN, None),
            Verdict::Jump(c) => (NFT_JUMP, Some(c)),
            Verdict::Goto(c) => (NFT_GOTO, Some(c)),
        }
    }
}

/// Where a payload offset counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayloadBase {
    Link,
    Network,
    Transport,
}

/// `meta` keys (enum nft_meta_keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaKey {
    Len,
    Protocol,
    Mark,
    Iif,
    Oif,
    IifName,
    OifName,
    NfProto,
    L4Proto,
    PktType,
}

impl MetaKey {
    fn code(self) -> u32 {
        match self {
            MetaKey::Len => 0,
            MetaKey::Protocol => 1,
            MetaKey::Mark => 3,
            MetaKey::Iif => 4,
            MetaKey::Oif => 5,
            MetaKey::IifName => 6,
            MetaKey::OifName => 7,
            MetaKey::NfProto => 15,
            MetaKey::L4Proto => 16,
            MetaKey::PktType => 19,
        }
    }
}

/// Comparison operators (enum nft_cmp_ops).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
}

/// An address family: of a NAT statement, of the `ip`/`ip6` helpers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// The family of a NAT statement (`dnat ip to` / `dnat ip6 to`).
pub type NatFamily = Family;

impl Family {
    /// NFPROTO_IPV4 / NFPROTO_IPV6, what `meta nfproto` loads.
    pub fn nfproto(self) -> u8 {
        match self {
            Family::Ipv4 => NFPROTO_IPV4 as u8,
            Family::Ipv6 => NFPROTO_IPV6 as u8,
        }
    }

    /// Address length in bytes.
    pub fn addr_len(self) -> u32 {
        match self {
            Family::Ipv4 => 4,
            Family::Ipv6 => 16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatKind {
    Snat,
    Dnat,
}

/// NAT range flags (`NF_NAT_RANGE_*`), for [`Expr::Nat`] and [`Expr::Masquerade`].
pub const NAT_PROTO_SPECIFIED: u32 = 0x2;
pub const NAT_RANDOM: u32 = 0x4;
pub const NAT_PERSISTENT: u32 = 0x8;
/// `fully-random`.
pub const NAT_FULLY_RANDOM: u32 = 0x10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectKind {
    /// `reject with tcp reset` (only valid after a `meta l4proto tcp` match).
    TcpReset,
    /// `reject` in an inet table: ICMP or ICMPv6 port unreachable.
    IcmpxPortUnreachable,
    IcmpxHostUnreachable,
    IcmpxAdminProhibited,
    IcmpxNoRoute,
}

/// `fib` flags (enum nft_fib_flags): what to look up.
pub const FIB_SADDR: u32 = 1 << 0;
pub const FIB_DADDR: u32 = 1 << 1;
pub const FIB_MARK: u32 = 1 << 2;
pub const FIB_IIF: u32 = 1 << 3;
pub const FIB_OIF: u32 = 1 << 4;
pub const FIB_PRESENT: u32 = 1 << 5;

/// What a `fib` lookup returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FibResult {
    Oif,
    OifName,
    /// The route type (`type local` compares it with RTN_LOCAL, see [`RTN_LOCAL`]).
    AddrType,
}

/// Route types as `fib ... type` loads them (host-order u32).
pub const RTN_UNICAST: u32 = 1;
pub const RTN_LOCAL: u32 = 2;

/// `ct` keys (enum nft_ct_keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CtKey {
    /// Bits: see [`CT_STATE_NEW`] and the others.
    State,
    Direction,
    /// Bits: see [`CT_STATUS_DNAT`] and the others.
    Status,
    Mark,
}

/// `ct state` bits (host-order u32).
pub const CT_STATE_INVALID: u32 = 1;
pub const CT_STATE_ESTABLISHED: u32 = 2;
pub const CT_STATE_RELATED: u32 = 4;
pub const CT_STATE_NEW: u32 = 8;
pub const CT_STATE_UNTRACKED: u32 = 64;
/// `ct status` bits (host-order u32).
pub const CT_STATUS_SNAT: u32 = 0x10;
pub const CT_STATUS_DNAT: u32 = 0x20;

/// Dynamic set operations from the packet path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DynsetOp {
    /// `add @S { key }`: insert if absent.
    Add,
    /// `update @S { key }`: insert, or refresh the timeout of an existing element.
    Update,
    Delete,
}

/// One kernel expression.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    /// Loads `len` bytes at `offset` of a header.
    Payload {
        base: PayloadBase,
        offset: u32,
        len: u32,
        dreg: Reg,
    },
    Meta {
        key: MetaKey,
        dreg: Reg,
    },
    /// `meta <key> set ...` from a register.
    MetaSet {
        key: MetaKey,
        sreg: Reg,
    },
    /// Compares a register with `data`; the rule stops when it does not hold.
    Cmp {
        sreg: Reg,
        op: CmpOp,
        data: Vec<u8>,
    },
    /// `dreg = (sreg & mask) ^ xor` over `len` bytes.
    Bitwise {
        sreg: Reg,
        dreg: Reg,
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// Set membership (`@set`, `!= @set` with `invert`), or a map lookup into `dreg`
    /// (`Reg::Verdict` for a verdict map: `vmap @set`).
    Lookup {
        sreg: Reg,
        set: String,
        dreg: Option<Reg>,
        invert: bool,
    },
    Immediate {
        dreg: Reg,
        data: Vec<u8>,
    },
    /// A verdict: `accept`, `drop`, `return`, `jump X`, `goto X`.
    Verdict(Verdict),
    /// `numgen random mod <modulus> offset <offset>` into `dreg` (NFT_NG_RANDOM).
    Numgen {
        dreg: Reg,
        modulus: u32,
        offset: u32,
    },
    /// `snat`/`dnat ip|ip6 to <addr>:<port>` from registers; `flags` are `NAT_*`.
    Nat {
        kind: NatKind,
        family: NatFamily,
        addr: Option<Reg>,
        proto: Option<Reg>,
        flags: u32,
    },
    /// `masquerade`; `flags` are `NAT_*` (e.g. [`NAT_FULLY_RANDOM`]).
    Masquerade {
        flags: u32,
    },
    Reject {
        kind: RejectKind,
    },
    /// `fib <flags> <result>` into `dreg`; `flags` are `FIB_*`.
    Fib {
        flags: u32,
        result: FibResult,
        dreg: Reg,
    },
    Ct {
        key: CtKey,
        dreg: Reg,
    },
    /// `add`/`update @set { key }` from the packet path, the key read from `sreg_key`;
    /// `timeout` overrides the set's.
    Dynset {
        op: DynsetOp,
        set: String,
        sreg_key: Reg,
        timeout: Option<Duration>,
    },
    Counter,
}

impl Expr {
    /// The kernel's name of the expression type.
    pub fn kind(&self) -> &'static str {
        match self {
            Expr::Payload { .. } => "payload",
            Expr::Meta { .. } | Expr::MetaSet { .. } => "meta",
            Expr::Cmp { .. } => "cmp",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Lookup { .. } => "lookup",
            Expr::Immediate { .. } | Expr::Verdict(_) => "immediate",
            Expr::Numgen { .. } => "numgen",
            Expr::Nat { .. } => "nat",
            Expr::Masquerade { .. } => "masq",
            Expr::Reject { .. } => "reject",
            Expr::Fib { .. } => "fib",
            Expr::Ct { .. } => "ct",
            Expr::Dynset { .. } => "dynset",
            Expr::Counter => "counter",
        }
    }

    /// Appends `NFTA_LIST_ELEM { NAME, DATA { ... } }`. Attribute order follows nft's.
    pub(crate) fn encode(&self, w: &mut Writer) {
        // enum nft_*_attributes of each expression type.
        const DREG: u16 = 1;
        let elem = w.begin_nest(NFTA_LIST_ELEM);
        w.put_strz(NFTA_EXPR_NAME, self.kind());
        let data = w.begin_nest(NFTA_EXPR_DATA);
        match self {
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                let base = match base {
                    PayloadBase::Link => 0,
                    PayloadBase::Network => 1,
                    PayloadBase::Transport => 2,
                };
                w.put_be32(DREG, dreg.code());
                w.put_be32(2, base); // NFTA_PAYLOAD_BASE
                w.put_be32(3, *offset); // NFTA_PAYLOAD_OFFSET
                w.put_be32(4, *len); // NFTA_PAYLOAD_LEN
            }
            Expr::Meta { key, dreg } => {
                w.put_be32(2, key.code()); // NFTA_META_KEY
                w.put_be32(DREG, dreg.code());
            }
            Expr::MetaSet { key, sreg } => {
                w.put_be32(2, key.code());
                w.put_be32(3, sreg.code()); // NFTA_META_SREG
            }
            Expr::Cmp { sreg, op, data } => {
                let op = match op {
                    CmpOp::Eq => 0,
                    CmpOp::Neq => 1,
                    CmpOp::Lt => 2,
                    CmpOp::Lte => 3,
                    CmpOp::Gt => 4,
                    CmpOp::Gte => 5,
                };
                w.put_be32(1, sreg.code()); // NFTA_CMP_SREG
                w.put_be32(2, op); // NFTA_CMP_OP
                w.put_data(3, data); // NFTA_CMP_DATA
            }
            Expr::Bitwise {
                sreg,
                dreg,
                len,
                mask,
                xor,
            } => {
                w.put_be32(1, sreg.code()); // NFTA_BITWISE_SREG
                w.put_be32(2, dreg.code()); // NFTA_BITWISE_DREG
                w.put_be32(6, 0); // NFTA_BITWISE_OP: NFT_BITWISE_MASK_XOR
                w.put_be32(3, *len); // NFTA_BITWISE_LEN
                w.put_data(4, mask); // NFTA_BITWISE_MASK
                w.put_data(5, xor); // NFTA_BITWISE_XOR
            }
            Expr::Lookup {
                sreg,
                set,
                dreg,
                invert,
            } => {
                w.put_be32(2, sreg.code()); // NFTA_LOOKUP_SREG
                if let Some(dreg) = dreg {
                    w.put_be32(3, dreg.code()); // NFTA_LOOKUP_DREG
                }
                w.put_strz(1, set); // NFTA_LOOKUP_SET
                if *invert {
                    w.put_be32(5, 1); // NFTA_LOOKUP_FLAGS: NFT_LOOKUP_F_INV
                }
            }
            Expr::Immediate { dreg, data } => {
                w.put_be32(1, dreg.code()); // NFTA_IMMEDIATE_DREG
                w.put_data(2, data); // NFTA_IMMEDIATE_DATA
            }
            Expr::Verdict(v) => {
                let (code, chain) = v.code();
                w.put_be32(1, Reg::Verdict.code());
                w.put_verdict(2, code, chain);
            }
            Expr::Numgen {
                dreg,
                modulus,
                offset,
            } => {
                w.put_be32(1, dreg.code()); // NFTA_NG_DREG
                w.put_be32(2, *modulus); // NFTA_NG_MODULUS
                w.put_be32(3, 1); // NFTA_NG_TYPE: NFT_NG_RANDOM
                w.put_be32(4, *offset); // NFTA_NG_OFFSET
            }
            Expr::Nat {
                kind,
                family,
                addr,
                proto,
                flags,
            } => {
                let kind = match kind {
                    NatKind::Snat => 0,
                    NatKind::Dnat => 1,
                };
                let family = match family {
                    Family::Ipv4 => NFPROTO_IPV4,
                    Family::Ipv6 => NFPROTO_IPV6,
                };
                w.put_be32(1, kind); // NFTA_NAT_TYPE
                w.put_be32(2, family); // NFTA_NAT_FAMILY
                if let Some(addr) = addr {
                    w.put_be32(3, addr.code()); // NFTA_NAT_REG_ADDR_MIN
                }
                if let Some(proto) = proto {
                    w.put_be32(5, proto.code()); // NFTA_NAT_REG_PROTO_MIN
                }
                if *flags != 0 {
                    w.put_be32(7, *flags); // NFTA_NAT_FLAGS
                }
            }
            Expr::Masquerade { flags } => {
                if *flags != 0 {
                    w.put_be32(1, *flags); // NFTA_MASQ_FLAGS
                }
            }
            Expr::Reject { kind } => {
                // (NFT_REJECT_*, code): ICMPX codes are enum nft_reject_inet_code.
                let (ty, code) = match kind {
                    RejectKind::TcpReset => (1, 0),
                    RejectKind::IcmpxNoRoute => (2, 0),
                    RejectKind::IcmpxPortUnreachable => (2, 1),
                    RejectKind::IcmpxHostUnreachable => (2, 2),
                    RejectKind::IcmpxAdminProhibited => (2, 3),
                };
                w.put_be32(1, ty); // NFTA_REJECT_TYPE
                w.put(2, &[code]); // NFTA_REJECT_ICMP_CODE (u8)
            }
            Expr::Fib { flags, result, dreg } => {
                let result = match result {
                    FibResult::Oif => 1,
                    FibResult::OifName => 2,
                    FibResult::AddrType => 3,
                };
                w.put_be32(3, *flags); // NFTA_FIB_FLAGS
                w.put_be32(2, result); // NFTA_FIB_RESULT
                w.put_be32(1, dreg.code()); // NFTA_FIB_DREG
            }
            Expr::Ct { key, dreg } => {
                let key = match key {
                    CtKey::State => 0,
                    CtKey::Direction => 1,
                    CtKey::Status => 2,
                    CtKey::Mark => 3,
                };
                w.put_be32(2, key); // NFTA_CT_KEY
                w.put_be32(1, dreg.code()); // NFTA_CT_DREG
            }
            Expr::Dynset {
                op,
                set,
                sreg_key,
                timeout,
            } => {
                let op = match op {
                    DynsetOp::Add => 0,
                    DynsetOp::Update => 1,
                    DynsetOp::Delete => 2,
                };
                w.put_be32(4, sreg_key.code()); // NFTA_DYNSET_SREG_KEY
                w.put_be32(3, op); // NFTA_DYNSET_OP
                w.put_strz(1, set); // NFTA_DYNSET_SET_NAME
                if let Some(t) = timeout {
                    w.put_be64(6, t.as_millis() as u64); // NFTA_DYNSET_TIMEOUT
                }
            }
            Expr::Counter => {}
        }
        w.end_nest(data);
        w.end_nest(elem);
    }
}

// Helpers: the expression sequences nft emits for the usual matches of an inet table.

/// `meta nfproto ipv4|ipv6`, which nft puts before every `ip`/`ip6` match in an inet
/// table (the payload offsets mean something only for that family). Uses register 0.
pub fn match_family(family: Family) -> [Expr; 2] {
    [
        Expr::Meta {
            key: MetaKey::NfProto,
            dreg: Reg::R32(0),
        },
        Expr::Cmp {
            sreg: Reg::R32(0),
            op: CmpOp::Eq,
            data: vec![family.nfproto()],
        },
    ]
}

/// `meta l4proto <proto>` (6 tcp, 17 udp, 132 sctp). Uses register 0.
pub fn match_l4proto(proto: u8) -> [Expr; 2] {
    [
        Expr::Meta {
            key: MetaKey::L4Proto,
            dreg: Reg::R32(0),
        },
        Expr::Cmp {
            sreg: Reg::R32(0),
            op: CmpOp::Eq,
            data: vec![proto],
        },
    ]
}

/// Which address of the network header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Addr {
    Saddr,
    Daddr,
}

/// Loads `ip saddr|daddr` (or `ip6 ...`) into `dreg`; put [`match_family`] first.
pub fn ip_addr(family: Family, which: Addr, dreg: Reg) -> Expr {
    let offset = match (family, which) {
        (Family::Ipv4, Addr::Saddr) => 12,
        (Family::Ipv4, Addr::Daddr) => 16,
        (Family::Ipv6, Addr::Saddr) => 8,
        (Family::Ipv6, Addr::Daddr) => 24,
    };
    Expr::Payload {
        base: PayloadBase::Network,
        offset,
        len: family.addr_len(),
        dreg,
    }
}

/// Loads `th dport` (the transport header's destination port, any protocol with ports).
pub fn th_dport(dreg: Reg) -> Expr {
    Expr::Payload {
        base: PayloadBase::Transport,
        offset: 2,
        len: 2,
        dreg,
    }
}

/// Loads `th sport`.
pub fn th_sport(dreg: Reg) -> Expr {
    Expr::Payload {
        base: PayloadBase::Transport,
        offset: 0,
        len: 2,
        dreg,
    }
}

/// `ip saddr 10.0.0.0/8` (`op` Eq) or `ip daddr != 127.0.0.0/8` (`op` Neq), as nft emits
/// it: the family match, then a payload load cut to the prefix when it is a whole number
/// of bytes, else a full load and a mask. `net` is the address in network order (its
/// host bits are ignored). Uses register 0. A prefix of 0 matches the whole family.
pub fn match_prefix(family: Family, which: Addr, net: &[u8], prefix_len: u32, op: CmpOp) -> Vec<Expr> {
    let full = family.addr_len();
    assert_eq!(net.len() as u32, full, "address length for {family:?}");
    let prefix_len = prefix_len.min(full * 8);
    let mut out = match_family(family).to_vec();
    out.extend(match_addr_prefix(family, which, net, prefix_len, op));
    out
}

/// [`match_prefix`] without its `meta nfproto` match, for a rule that has matched the
/// family already (nft adds that dependency once per rule). Empty for a prefix of 0.
pub fn match_addr_prefix(family: Family, which: Addr, net: &[u8], prefix_len: u32, op: CmpOp) -> Vec<Expr> {
    let full = family.addr_len();
    assert_eq!(net.len() as u32, full, "address length for {family:?}");
    let prefix_len = prefix_len.min(full * 8);
    let mut out = Vec::with_capacity(3);
    if prefix_len == 0 {
        return out;
    }
    let Expr::Payload { offset, .. } = ip_addr(family, which, Reg::R32(0)) else {
        unreachable!()
    };
    let mask = prefix_mask(full as usize, prefix_len);
    let masked: Vec<u8> = net.iter().zip(&mask).map(|(a, m)| a & m).collect();
    if prefix_len & 7 == 0 {
        let len = prefix_len / 8;
        out.push(Expr::Payload {
            base: PayloadBase::Network,
            offset,
            len,
            dreg: Reg::R32(0),
        });
        out.push(Expr::Cmp {
            sreg: Reg::R32(0),
            op,
            data: masked[..len as usize].to_vec(),
        });
    } else {
        out.push(Expr::Payload {
            base: PayloadBase::Network,
            offset,
            len: full,
            dreg: Reg::R32(0),
        });
        out.push(Expr::Bitwise {
            sreg: Reg::R32(0),
            dreg: Reg::R32(0),
            len: full,
            mask,
            xor: vec![0; full as usize],
        });
        out.push(Expr::Cmp {
            sreg: Reg::R32(0),
            op,
            data: masked,
        });
    }
    out
}

/// `iifname "<name>"` (`MetaKey::IifName`) or `oifname`: nft compares the whole
/// 16-byte (IFNAMSIZ) name, zero-padded. Uses register 0. `name` must be shorter than
/// 16 bytes (the kernel's limit for interface names).
pub fn match_ifname(key: MetaKey, name: &str) -> [Expr; 2] {
    let mut data = vec![0u8; 16];
    let n = name.len().min(15);
    data[..n].copy_from_slice(&name.as_bytes()[..n]);
    [
        Expr::Meta {
            key,
            dreg: Reg::R32(0),
        },
        Expr::Cmp {
            sreg: Reg::R32(0),
            op: CmpOp::Eq,
            data,
        },
    ]
}

/// `ether saddr <mac>` (`op` Eq) or `ether saddr != <mac>` (Neq): the link header's
/// source address, as a bridge (or netdev) table sees it. Uses register 0.
pub fn match_ether_saddr(mac: [u8; 6], op: CmpOp) -> [Expr; 2] {
    [
        Expr::Payload {
            base: PayloadBase::Link,
            offset: 6,
            len: 6,
            dreg: Reg::R32(0),
        },
        Expr::Cmp {
            sreg: Reg::R32(0),
            op,
            data: mac.to_vec(),
        },
    ]
}

/// `len` bytes with the first `prefix_len` bits set.
pub fn prefix_mask(len: usize, prefix_len: u32) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let bits = (prefix_len as usize).saturating_sub(i * 8).min(8);
            if bits == 0 {
                0
            } else {
                0xffu8 << (8 - bits)
            }
        })
        .collect()
}

/// `meta mark set meta mark | bits` (`xor` false) or `... ^ bits` (`xor` true), as nft
/// emits them: load, bitwise, set. Uses register 0.
pub fn mark_set(bits: u32, xor: bool) -> [Expr; 3] {
    let (mask, x) = if xor { (u32::MAX, bits) } else { (!bits, bits) };
    [
        Expr::Meta {
            key: MetaKey::Mark,
            dreg: Reg::R32(0),
        },
        Expr::Bitwise {
            sreg: Reg::R32(0),
            dreg: Reg::R32(0),
            len: 4,
            mask: mask.to_ne_bytes().to_vec(),
            xor: x.to_ne_bytes().to_vec(),
        },
        Expr::MetaSet {
            key: MetaKey::Mark,
            sreg: Reg::R32(0),
        },
    ]
}

/// `<ct key> & bits != 0` for flag keys (`ct state new`, `ct status dnat`), as nft emits
/// it. Uses register 0.
pub fn match_ct_bits(key: CtKey, bits: u32) -> [Expr; 3] {
    [
        Expr::Ct {
            key,
            dreg: Reg::R32(0),
        },
        Expr::Bitwise {
            sreg: Reg::R32(0),
            dreg: Reg::R32(0),
            len: 4,
            mask: bits.to_ne_bytes().to_vec(),
            xor: vec![0; 4],
        },
        Expr::Cmp {
            sreg: Reg::R32(0),
            op: CmpOp::Neq,
            data: vec![0; 4],
        },
    ]
}

/// `fib saddr|daddr type local`. Uses register 0.
pub fn match_fib_local(flags: u32) -> [Expr; 2] {
    [
        Expr::Fib {
            flags,
            result: FibResult::AddrType,
            dreg: Reg::R32(0),
        },
        Expr::Cmp {
            sreg: Reg::R32(0),
            op: CmpOp::Eq,
            data: RTN_LOCAL.to_ne_bytes().to_vec(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_are_numbered_as_nft_numbers_them() {
        assert_eq!(Reg::Verdict.code(), 0);
        assert_eq!(Reg::R32(0).code(), 1); // NFT_REG_1
        assert_eq!(Reg::R32(1).code(), 9); // NFT_REG32_01
        assert_eq!(Reg::R32(2).code(), 10);
        assert_eq!(Reg::R32(4).code(), 2); // NFT_REG_2
        assert_eq!(Reg::R32(5).code(), 13);
        assert_eq!(Reg::R32(15).code(), 23); // NFT_REG32_15
    }

    #[test]
    fn prefix_masks() {
        assert_eq!(prefix_mask(4, 12), [0xff, 0xf0, 0, 0]);
        assert_eq!(prefix_mask(4, 32), [0xff; 4]);
        assert_eq!(prefix_mask(4, 0), [0; 4]);
        assert_eq!(
            prefix_mask(16, 50)[..8],
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xc0, 0]
        );
    }

    #[test]
    fn byte_aligned_prefixes_load_fewer_bytes() {
        let m = match_prefix(Family::Ipv4, Addr::Saddr, &[10, 1, 2, 3], 8, CmpOp::Eq);
        assert_eq!(m.len(), 4);
        assert!(matches!(
            m[2],
            Expr::Payload {
                offset: 12,
                len: 1,
                ..
            }
        ));
        assert!(matches!(&m[3], Expr::Cmp { data, .. } if data == &[10]));
        let m = match_prefix(Family::Ipv4, Addr::Daddr, &[10, 96, 0, 0], 12, CmpOp::Neq);
        assert_eq!(m.len(), 5);
        assert!(matches!(&m[4], Expr::Cmp { op: CmpOp::Neq, data, .. } if data == &[10, 96, 0, 0]));
    }
}
