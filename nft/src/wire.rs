//! Netlink framing: the constants of `linux/netlink.h`, `linux/netfilter/nfnetlink.h` and
//! `linux/netfilter/nf_tables.h` this module uses, an attribute writer and an attribute
//! reader.
//!
//! Everything is written straight into one growing `Vec<u8>`: a nested attribute is opened
//! by writing a placeholder header and closed by patching its length, so encoding a rule
//! or an element allocates nothing. Integers inside nf_tables attributes are big endian
//! (`NLA_BE32`/`NLA_BE64`); the netlink and attribute headers are in host order.

// linux/netlink.h
pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP_INTR: u16 = 0x10;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
/// In an error message: the original message is cut to its header (NETLINK_CAP_ACK).
pub const NLM_F_CAPPED: u16 = 0x100;
/// In an error message: extended ack attributes follow (NETLINK_EXT_ACK).
pub const NLM_F_ACK_TLVS: u16 = 0x200;
pub const NLA_F_NESTED: u16 = 0x8000;
pub const NLA_TYPE_MASK: u16 = 0x3fff;
pub const NLMSGERR_ATTR_MSG: u16 = 1;
pub const NLMSGERR_ATTR_OFFS: u16 = 2;

// linux/netfilter/nfnetlink.h
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub const NFNL_MSG_BATCH_BEGIN: u16 = 0x10; // NLMSG_MIN_TYPE
pub const NFNL_MSG_BATCH_END: u16 = 0x11;
pub const NFNETLINK_V0: u8 = 0;
/// struct nfgenmsg: family, version, res_id (big endian).
pub const NFGENMSG_LEN: usize = 4;

// linux/netfilter.h
pub const NFPROTO_UNSPEC: u8 = 0;
pub const NFPROTO_INET: u8 = 1;
pub const NFPROTO_BRIDGE: u8 = 7;
pub const NFPROTO_IPV4: u32 = 2;
pub const NFPROTO_IPV6: u32 = 10;
pub const NF_DROP: i32 = 0;
pub const NF_ACCEPT: i32 = 1;

// enum nf_tables_msg_types
pub const NFT_MSG_NEWTABLE: u16 = 0;
pub const NFT_MSG_GETTABLE: u16 = 1;
pub const NFT_MSG_DELTABLE: u16 = 2;
pub const NFT_MSG_NEWCHAIN: u16 = 3;
pub const NFT_MSG_GETCHAIN: u16 = 4;
pub const NFT_MSG_DELCHAIN: u16 = 5;
pub const NFT_MSG_NEWRULE: u16 = 6;
pub const NFT_MSG_GETRULE: u16 = 7;
pub const NFT_MSG_DELRULE: u16 = 8;
pub const NFT_MSG_NEWSET: u16 = 9;
pub const NFT_MSG_GETSET: u16 = 10;
pub const NFT_MSG_DELSET: u16 = 11;
pub const NFT_MSG_NEWSETELEM: u16 = 12;
pub const NFT_MSG_DELSETELEM: u16 = 14;

// enum nft_table_attributes
pub const NFTA_TABLE_NAME: u16 = 1;
pub const NFTA_TABLE_FLAGS: u16 = 2;

// enum nft_chain_attributes
pub const NFTA_CHAIN_TABLE: u16 = 1;
pub const NFTA_CHAIN_NAME: u16 = 3;
pub const NFTA_CHAIN_HOOK: u16 = 4;
pub const NFTA_CHAIN_POLICY: u16 = 5;
pub const NFTA_CHAIN_TYPE: u16 = 7;
// enum nft_hook_attributes
pub const NFTA_HOOK_HOOKNUM: u16 = 1;
pub const NFTA_HOOK_PRIORITY: u16 = 2;

// enum nft_rule_attributes
pub const NFTA_RULE_TABLE: u16 = 1;
pub const NFTA_RULE_CHAIN: u16 = 2;
pub const NFTA_RULE_HANDLE: u16 = 3;
pub const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub const NFTA_RULE_USERDATA: u16 = 7;
/// libnftnl's enum nftnl_udata_rule_types: the comment TLV inside NFTA_RULE_USERDATA.
pub const UDATA_RULE_COMMENT: u8 = 0;

// enum nft_list_attributes, enum nft_expr_attributes
pub const NFTA_LIST_ELEM: u16 = 1;
pub const NFTA_EXPR_NAME: u16 = 1;
pub const NFTA_EXPR_DATA: u16 = 2;

// enum nft_data_attributes, enum nft_verdict_attributes
pub const NFTA_DATA_VALUE: u16 = 1;
pub const NFTA_DATA_VERDICT: u16 = 2;
pub const NFTA_VERDICT_CODE: u16 = 1;
pub const NFTA_VERDICT_CHAIN: u16 = 2;
/// enum nft_verdicts
pub const NFT_JUMP: i32 = -3;
pub const NFT_GOTO: i32 = -4;
pub const NFT_RETURN: i32 = -5;
/// NFT_DATA_VERDICT: the data type of a verdict map.
pub const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

// enum nft_set_attributes
pub const NFTA_SET_TABLE: u16 = 1;
pub const NFTA_SET_NAME: u16 = 2;
pub const NFTA_SET_FLAGS: u16 = 3;
pub const NFTA_SET_KEY_TYPE: u16 = 4;
pub const NFTA_SET_KEY_LEN: u16 = 5;
pub const NFTA_SET_DATA_TYPE: u16 = 6;
pub const NFTA_SET_DATA_LEN: u16 = 7;
pub const NFTA_SET_DESC: u16 = 9;
pub const NFTA_SET_ID: u16 = 10;
pub const NFTA_SET_TIMEOUT: u16 = 11;
pub const NFTA_SET_USERDATA: u16 = 13;
// enum nft_set_desc_attributes, enum nft_set_field_attributes
pub const NFTA_SET_DESC_CONCAT: u16 = 2;
pub const NFTA_SET_FIELD_LEN: u16 = 1;
// enum nft_set_flags
pub const NFT_SET_ANONYMOUS: u32 = 0x1;
pub const NFT_SET_INTERVAL: u32 = 0x4;
pub const NFT_SET_MAP: u32 = 0x8;
pub const NFT_SET_TIMEOUT: u32 = 0x10;
pub const NFT_SET_EVAL: u32 = 0x20;
pub const NFT_SET_CONCAT: u32 = 0x80;

// enum nft_set_elem_list_attributes, enum nft_set_elem_attributes
pub const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub const NFTA_SET_ELEM_KEY: u16 = 1;
pub const NFTA_SET_ELEM_DATA: u16 = 2;
pub const NFTA_SET_ELEM_FLAGS: u16 = 3;
pub const NFTA_SET_ELEM_USERDATA: u16 = 6;
pub const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;

/// Appends netlink messages and attributes to a byte buffer.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    pub buf: Vec<u8>,
}

#[inline]
pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl Writer {
    pub fn with_capacity(n: usize) -> Writer {
        Writer {
            buf: Vec::with_capacity(n),
        }
    }

    /// Starts a netlink message of nfnetlink subsystem nf_tables (or a batch delimiter when
    /// `ty` is one of NFNL_MSG_BATCH_*) with its nfgenmsg header. Returns its offset, for
    /// [`Writer::end_msg`].
    pub fn begin_msg(&mut self, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by end_msg
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        self.buf.push(family);
        self.buf.push(NFNETLINK_V0);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    pub fn end_msg(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// One attribute; the payload is padded to 4 bytes.
    #[inline]
    pub fn put(&mut self, ty: u16, payload: &[u8]) {
        put_attr(&mut self.buf, ty, payload);
    }

    #[inline]
    pub fn put_be32(&mut self, ty: u16, v: u32) {
        self.put(ty, &v.to_be_bytes());
    }

    #[inline]
    pub fn put_be64(&mut self, ty: u16, v: u64) {
        self.put(ty, &v.to_be_bytes());
    }

    /// A NUL-terminated string (NLA_STRING as nf_tables expects names).
    #[inline]
    pub fn put_strz(&mut self, ty: u16, s: &str) {
        let len = 4 + s.len() + 1;
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(s.as_bytes());
        let pad = align4(len) - len;
        self.buf.extend_from_slice(&[0u8; 4][..pad + 1]);
    }

    /// Opens a nested attribute; returns its offset for [`Writer::end_nest`].
    #[inline]
    pub fn begin_nest(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    #[inline]
    pub fn end_nest(&mut self, start: usize) {
        let len = self.buf.len() - start;
        debug_assert!(len <= u16::MAX as usize, "nested attribute of {len} bytes");
        self.buf[start..start + 2].copy_from_slice(&(len as u16).to_ne_bytes());
    }

    /// `ty { NFTA_DATA_VALUE value }`: a value in a register, a set key, map data.
    #[inline]
    pub fn put_data(&mut self, ty: u16, value: &[u8]) {
        let n = self.begin_nest(ty);
        self.put(NFTA_DATA_VALUE, value);
        self.end_nest(n);
    }

    /// `ty { NFTA_DATA_VERDICT { CODE, CHAIN } }`.
    pub fn put_verdict(&mut self, ty: u16, code: i32, chain: Option<&str>) {
        let n = self.begin_nest(ty);
        let v = self.begin_nest(NFTA_DATA_VERDICT);
        self.put_be32(NFTA_VERDICT_CODE, code as u32);
        if let Some(chain) = chain {
            self.put_strz(NFTA_VERDICT_CHAIN, chain);
        }
        self.end_nest(v);
        self.end_nest(n);
    }
}

/// Appends one attribute (header, payload, padding) to `buf`.
#[inline]
pub fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    debug_assert!(len <= u16::MAX as usize, "attribute {ty} of {len} bytes");
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    let pad = align4(len) - len;
    buf.extend_from_slice(&[0u8; 3][..pad]);
}

/// The attributes in `data`: (type without flags, payload, offset of the attribute header
/// in `data`). Stops at the first malformed one.
pub fn attrs(data: &[u8]) -> impl Iterator<Item = (u16, &[u8], usize)> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + 4 > data.len() {
            return None;
        }
        let len = u16::from_ne_bytes([data[off], data[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([data[off + 2], data[off + 3]]) & NLA_TYPE_MASK;
        if len < 4 || off + len > data.len() {
            return None;
        }
        let item = (ty, &data[off + 4..off + len], off);
        off += align4(len);
        Some(item)
    })
}

/// A NUL-terminated string attribute's text.
pub fn attr_str(payload: &[u8]) -> String {
    let end = payload.iter().position(|&b| b == 0).unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

pub fn be32(payload: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(payload.get(..4)?.try_into().ok()?))
}

pub fn be64(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

pub fn ne32(payload: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_nul_terminated_and_padded() {
        let mut w = Writer::default();
        w.put_strz(1, "t");
        assert_eq!(w.buf, [6, 0, 1, 0, b't', 0, 0, 0]);
        w.buf.clear();
        w.put_strz(3, "abc");
        assert_eq!(w.buf, [8, 0, 3, 0, b'a', b'b', b'c', 0]);
    }

    #[test]
    fn nests_get_their_length_and_flag() {
        let mut w = Writer::default();
        let n = w.begin_nest(4);
        w.put_be32(1, 7);
        w.end_nest(n);
        assert_eq!(w.buf, [12, 0, 4, 0x80, 8, 0, 1, 0, 0, 0, 0, 7]);
        let parsed: Vec<_> = attrs(&w.buf).collect();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, 4);
        let inner: Vec<_> = attrs(parsed[0].1).collect();
        assert_eq!((inner[0].0, be32(inner[0].1)), (1, Some(7)));
    }
}
