//! The batch: nf_tables object messages, encoded as they are added, for one transaction.

use std::fmt;

use super::expr::{Expr, Verdict};
use super::set::{
    kernel_type, successor, ElemData, Element, SetSpec, SET_ELEM_F_INTERVAL_OPEN, UDATA_SET_ELEM_FLAGS,
};
use super::wire::*;

/// The family of a table: `inet` (IPv4 and IPv6, what the proxy and the bridge's NAT
/// use) or `bridge` (frames crossing a Linux bridge, for the MAC spoof check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TableFamily {
    Inet,
    Bridge,
}

impl TableFamily {
    /// NFPROTO_INET / NFPROTO_BRIDGE, the nfgenmsg family of the table's messages.
    pub fn nfproto(self) -> u8 {
        match self {
            TableFamily::Inet => NFPROTO_INET,
            TableFamily::Bridge => NFPROTO_BRIDGE,
        }
    }

    /// The family as nft writes it (`inet`, `bridge`).
    pub fn name(self) -> &'static str {
        match self {
            TableFamily::Inet => "inet",
            TableFamily::Bridge => "bridge",
        }
    }
}

impl fmt::Display for TableFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// nft keeps at most this many bytes of a rule comment (NFTNL_UDATA_COMMENT_MAXLEN) and
/// refuses longer ones; [`Batch::add_rule_with_comment`] does the same.
pub const COMMENT_MAX: usize = 128;

/// A comment nft would refuse: longer than [`COMMENT_MAX`] bytes, or with a NUL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadComment {
    pub comment: String,
}

impl fmt::Display for BadComment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rule comment {:?} ({} bytes) is not usable: keep it within {COMMENT_MAX} bytes, without NUL",
            self.comment,
            self.comment.len()
        )
    }
}

impl std::error::Error for BadComment {}

/// A chain's hook, for base chains (`type nat hook prerouting priority dstnat; policy
/// accept;`). The policy is always accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BaseChain {
    pub kind: ChainType,
    pub hook: Hook,
    /// `dstnat` is -100, `srcnat` 100, `filter` 0.
    pub priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainType {
    Filter,
    Nat,
    Route,
}

impl ChainType {
    fn name(self) -> &'static str {
        match self {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
            ChainType::Route => "route",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    fn number(self) -> u32 {
        match self {
            Hook::Prerouting => 0,
            Hook::Input => 1,
            Hook::Forward => 2,
            Hook::Output => 3,
            Hook::Postrouting => 4,
        }
    }
}

/// The largest `NFTA_SET_ELEM_LIST_ELEMENTS` nest: its length is a u16, and its
/// contents are 4-byte aligned. Element messages are split to stay within it.
const MAX_ELEMENTS_NEST: usize = 65532;

/// What one message does, to name it in errors and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum What {
    AddTable,
    DeleteTable,
    AddChain(String),
    FlushChain(String),
    DeleteChain(String),
    AddRule(String),
    DeleteRule {
        chain: String,
        handle: u64,
    },
    AddSet(String),
    FlushSet(String),
    DeleteSet(String),
    /// Elements `first..first + count` of one `add_elements` call.
    AddElements {
        set: String,
        first: usize,
        count: usize,
    },
    DeleteElements {
        set: String,
        first: usize,
        count: usize,
    },
}

#[derive(Debug, Clone)]
struct Msg {
    offset: usize,
    what: What,
    /// Index into `Batch::tables`.
    table: usize,
}

/// An ordered list of nf_tables messages on one table (or several, see
/// [`Batch::use_table`]), already encoded: what
/// [`super::Socket::commit`] sends as one transaction.
///
/// Each `add_*`/`delete_*` call appends one message (element lists may take several,
/// see [`Batch::add_elements`]); message `i` is numbered `i + 1` (its netlink sequence
/// number), so an error from the kernel names it. Nothing is checked here: a rule that
/// jumps to a missing chain fails at commit, with the message's description.
#[derive(Clone)]
pub struct Batch {
    /// The tables the messages go to; the last one takes the next message.
    tables: Vec<(TableFamily, String)>,
    w: Writer,
    msgs: Vec<Msg>,
    /// NFTA_SET_ID of the last set added (the kernel requires one per new set).
    set_id: u32,
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("tables", &self.tables)
            .field("messages", &self.msgs.len())
            .field("bytes", &self.w.buf.len())
            .finish()
    }
}

/// One line per message: `1 add chain X`, ...
impl fmt::Display for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for i in 0..self.msgs.len() {
            writeln!(f, "{} {}", i + 1, self.describe(i))?;
        }
        Ok(())
    }
}

impl Batch {
    /// An empty batch on table `inet <table>`.
    pub fn new(table: &str) -> Batch {
        Batch::new_in(TableFamily::Inet, table)
    }

    /// An empty batch on table `<family> <table>`.
    pub fn new_in(family: TableFamily, table: &str) -> Batch {
        let mut w = Writer::with_capacity(4096);
        let begin = w.begin_msg(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        w.end_msg(begin);
        Batch {
            tables: vec![(family, table.to_string())],
            w,
            msgs: Vec::new(),
            set_id: 0,
        }
    }

    /// The table the next message goes to.
    pub fn table(&self) -> &str {
        current(&self.tables)
    }

    /// The family of [`Batch::table`].
    pub fn family(&self) -> TableFamily {
        self.tables[self.tables.len() - 1].0
    }

    /// Sends the messages added from now on to table `<family> <table>`: one batch, and
    /// so one transaction, may change tables of several families.
    pub fn use_table(&mut self, family: TableFamily, table: &str) {
        if self.family() != family || self.table() != table {
            self.tables.push((family, table.to_string()));
        }
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Size of the encoded batch in bytes (what one commit sends, less 20 bytes of end).
    pub fn encoded_len(&self) -> usize {
        self.w.buf.len()
    }

    /// Empties the batch, keeping its buffer.
    pub fn clear(&mut self) {
        self.w.buf.truncate(20);
        self.msgs.clear();
        self.tables.truncate(1);
        self.set_id = 0;
    }

    /// What message `index` (0-based) does, e.g. `add rule to chain X`.
    pub fn describe(&self, index: usize) -> String {
        let Some(m) = self.msgs.get(index) else {
            return format!("message {index} (not in the batch)");
        };
        let (family, t) = &self.tables[m.table];
        let what = match &m.what {
            What::AddTable => return format!("add table {family} {t}"),
            What::DeleteTable => return format!("delete table {family} {t}"),
            What::AddChain(c) => format!("add chain {c}"),
            What::FlushChain(c) => format!("flush chain {c}"),
            What::DeleteChain(c) => format!("delete chain {c}"),
            What::AddRule(c) => format!("add rule to chain {c}"),
            What::DeleteRule { chain, handle } => format!("delete rule handle {handle} of chain {chain}"),
            What::AddSet(s) => format!("add set {s}"),
            What::FlushSet(s) => format!("flush set {s}"),
            What::DeleteSet(s) => format!("delete set {s}"),
            What::AddElements { set, first, count } => {
                format!("add elements {first}..{} to set {set}", first + count)
            }
            What::DeleteElements { set, first, count } => {
                format!("delete elements {first}..{} from set {set}", first + count)
            }
        };
        // A batch on one table says nothing more; one on several names the table.
        if self.tables.len() > 1 {
            format!("{what} in table {family} {t}")
        } else {
            what
        }
    }

    /// The encoded bytes: BATCH_BEGIN and the messages (without BATCH_END).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.w.buf
    }

    /// Offset of message `index` in [`Batch::bytes`].
    pub(crate) fn offset(&self, index: usize) -> usize {
        self.msgs[index].offset
    }

    /// The encoded netlink message `index` (0-based), header included: for tests and
    /// debugging (`nft --debug=netlink,mnl` shows nft's own in the same form).
    pub fn message(&self, index: usize) -> &[u8] {
        let start = self.msgs[index].offset;
        let end = self.msgs.get(index + 1).map_or(self.w.buf.len(), |m| m.offset);
        &self.w.buf[start..end]
    }

    /// The first element index of an element message (for errors).
    pub(crate) fn first_element(&self, index: usize) -> Option<usize> {
        match &self.msgs.get(index)?.what {
            What::AddElements { first, .. } | What::DeleteElements { first, .. } => Some(*first),
            _ => None,
        }
    }

    fn begin(&mut self, ty: u16, flags: u16) -> usize {
        let seq = self.msgs.len() as u32 + 1;
        self.w.begin_msg(
            NFNL_SUBSYS_NFTABLES << 8 | ty,
            NLM_F_REQUEST | flags,
            seq,
            self.family().nfproto(),
            0,
        )
    }

    fn finish(&mut self, start: usize, what: What) {
        self.w.end_msg(start);
        let table = self.tables.len() - 1;
        self.msgs.push(Msg {
            offset: start,
            what,
            table,
        });
    }

    /// `add table <family> <t>`: creates the table, or does nothing if it exists.
    pub fn add_table(&mut self) {
        let m = self.begin(NFT_MSG_NEWTABLE, NLM_F_CREATE);
        self.w.put_strz(NFTA_TABLE_NAME, current(&self.tables));
        self.w.put_be32(NFTA_TABLE_FLAGS, 0);
        self.finish(m, What::AddTable);
    }

    /// `delete table <family> <t>`, with everything in it. Fails (ENOENT) if it does not exist.
    pub fn delete_table(&mut self) {
        let m = self.begin(NFT_MSG_DELTABLE, 0);
        self.w.put_strz(NFTA_TABLE_NAME, current(&self.tables));
        self.finish(m, What::DeleteTable);
    }

    /// `add chain`: creates the chain, or does nothing if it exists (a base chain must
    /// then have the same hook and priority, else EEXIST/EBUSY at commit).
    pub fn add_chain(&mut self, name: &str, base: Option<&BaseChain>) {
        let m = self.begin(NFT_MSG_NEWCHAIN, NLM_F_CREATE);
        self.w.put_strz(NFTA_CHAIN_TABLE, current(&self.tables));
        self.w.put_strz(NFTA_CHAIN_NAME, name);
        if let Some(b) = base {
            self.w.put_strz(NFTA_CHAIN_TYPE, b.kind.name());
            self.w.put_be32(NFTA_CHAIN_POLICY, NF_ACCEPT as u32);
            let hook = self.w.begin_nest(NFTA_CHAIN_HOOK);
            self.w.put_be32(NFTA_HOOK_HOOKNUM, b.hook.number());
            self.w.put_be32(NFTA_HOOK_PRIORITY, b.priority as u32);
            self.w.end_nest(hook);
        }
        self.finish(m, What::AddChain(name.to_string()));
    }

    /// `flush chain`: deletes every rule of the chain.
    pub fn flush_chain(&mut self, name: &str) {
        let m = self.begin(NFT_MSG_DELRULE, 0);
        self.w.put_strz(NFTA_RULE_TABLE, current(&self.tables));
        self.w.put_strz(NFTA_RULE_CHAIN, name);
        self.finish(m, What::FlushChain(name.to_string()));
    }

    /// `delete chain`, with its rules (no need to flush it first). Fails (EBUSY) while a
    /// rule or a map element elsewhere still jumps to it, counting the changes made
    /// earlier in the same batch.
    pub fn delete_chain(&mut self, name: &str) {
        let m = self.begin(NFT_MSG_DELCHAIN, 0);
        self.w.put_strz(NFTA_CHAIN_TABLE, current(&self.tables));
        self.w.put_strz(NFTA_CHAIN_NAME, name);
        self.finish(m, What::DeleteChain(name.to_string()));
    }

    /// `add rule`: appends a rule at the end of the chain.
    pub fn add_rule(&mut self, chain: &str, exprs: &[Expr]) {
        self.encode_rule(chain, exprs, None);
    }

    /// `add rule ... comment "<comment>"`: the comment goes in the rule's user data as nft
    /// writes it, so `nft list` shows it and [`super::Socket::list_rules`] reads it back.
    pub fn add_rule_with_comment(
        &mut self,
        chain: &str,
        exprs: &[Expr],
        comment: &str,
    ) -> Result<(), BadComment> {
        if comment.len() > COMMENT_MAX || comment.contains('\0') {
            return Err(BadComment {
                comment: comment.to_string(),
            });
        }
        self.encode_rule(chain, exprs, Some(comment));
        Ok(())
    }

    fn encode_rule(&mut self, chain: &str, exprs: &[Expr], comment: Option<&str>) {
        let m = self.begin(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
        self.w.put_strz(NFTA_RULE_TABLE, current(&self.tables));
        self.w.put_strz(NFTA_RULE_CHAIN, chain);
        let list = self.w.begin_nest(NFTA_RULE_EXPRESSIONS);
        for e in exprs {
            e.encode(&mut self.w);
        }
        self.w.end_nest(list);
        if let Some(c) = comment {
            // libnftnl's TLV: type, length (with the NUL), the NUL-terminated text.
            let mut udata = Vec::with_capacity(c.len() + 3);
            udata.extend_from_slice(&[UDATA_RULE_COMMENT, c.len() as u8 + 1]);
            udata.extend_from_slice(c.as_bytes());
            udata.push(0);
            self.w.put(NFTA_RULE_USERDATA, &udata);
        }
        self.finish(m, What::AddRule(chain.to_string()));
    }

    /// `delete rule <chain> handle <h>`: deletes one rule, by the handle the kernel gave
    /// it (see [`super::Socket::list_rules`]). Fails (ENOENT) when it is gone.
    pub fn delete_rule(&mut self, chain: &str, handle: u64) {
        let m = self.begin(NFT_MSG_DELRULE, 0);
        self.w.put_strz(NFTA_RULE_TABLE, current(&self.tables));
        self.w.put_strz(NFTA_RULE_CHAIN, chain);
        self.w.put_be64(NFTA_RULE_HANDLE, handle);
        self.finish(
            m,
            What::DeleteRule {
                chain: chain.to_string(),
                handle,
            },
        );
    }

    /// `add set`/`add map`: creates it, or does nothing if one with the same
    /// declaration exists (a different declaration fails with EEXIST at commit).
    pub fn add_set(&mut self, spec: &SetSpec) {
        let (key_type, key_len) = kernel_type(&spec.key);
        let mut flags = 0;
        if spec.interval {
            flags |= NFT_SET_INTERVAL;
            if spec.key.len() > 1 {
                flags |= NFT_SET_CONCAT;
            }
        }
        if spec.data.is_some() {
            flags |= NFT_SET_MAP;
        }
        if spec.timeout.is_some() {
            flags |= NFT_SET_TIMEOUT;
        }
        if spec.dynamic {
            flags |= NFT_SET_EVAL;
        }
        let m = self.begin(NFT_MSG_NEWSET, NLM_F_CREATE);
        self.w.put_strz(NFTA_SET_TABLE, current(&self.tables));
        self.w.put_strz(NFTA_SET_NAME, &spec.name);
        self.w.put_be32(NFTA_SET_FLAGS, flags);
        self.w.put_be32(NFTA_SET_KEY_TYPE, key_type);
        self.w.put_be32(NFTA_SET_KEY_LEN, key_len);
        if let Some(data) = &spec.data {
            let (data_type, data_len) = if spec.is_verdict_map() {
                (NFT_DATA_VERDICT, 0)
            } else {
                kernel_type(data)
            };
            self.w.put_be32(NFTA_SET_DATA_TYPE, data_type);
            self.w.put_be32(NFTA_SET_DATA_LEN, data_len);
        }
        // Required by the kernel; it names a set of this batch in later messages, which
        // this module does by name instead (nft numbers its sets the same way).
        self.set_id += 1;
        self.w.put_be32(NFTA_SET_ID, self.set_id);
        if let Some(t) = spec.timeout {
            self.w.put_be64(NFTA_SET_TIMEOUT, t.as_millis() as u64);
        }
        if flags & NFT_SET_CONCAT != 0 {
            let desc = self.w.begin_nest(NFTA_SET_DESC);
            let concat = self.w.begin_nest(NFTA_SET_DESC_CONCAT);
            for f in &spec.key {
                let field = self.w.begin_nest(NFTA_LIST_ELEM);
                self.w.put_be32(NFTA_SET_FIELD_LEN, f.size());
                self.w.end_nest(field);
            }
            self.w.end_nest(concat);
            self.w.end_nest(desc);
        }
        self.w.put(NFTA_SET_USERDATA, &spec.udata());
        self.finish(m, What::AddSet(spec.name.clone()));
    }

    /// `flush set`: deletes every element.
    pub fn flush_set(&mut self, name: &str) {
        let m = self.begin(NFT_MSG_DELSETELEM, 0);
        self.w.put_strz(NFTA_SET_ELEM_LIST_TABLE, current(&self.tables));
        self.w.put_strz(NFTA_SET_ELEM_LIST_SET, name);
        self.finish(m, What::FlushSet(name.to_string()));
    }

    /// `delete set`. Fails (EBUSY) while a rule uses it.
    pub fn delete_set(&mut self, name: &str) {
        let m = self.begin(NFT_MSG_DELSET, 0);
        self.w.put_strz(NFTA_SET_TABLE, current(&self.tables));
        self.w.put_strz(NFTA_SET_NAME, name);
        self.finish(m, What::DeleteSet(name.to_string()));
    }

    /// `add element`: adds `elems`, as many messages as their size needs (each element
    /// list is limited to 64 KiB by its 16-bit attribute length). An element that exists
    /// already with the same data is left alone; one with other data fails (EEXIST): delete
    /// it first, in the same batch.
    pub fn add_elements(&mut self, set: &str, elems: &[Element]) {
        self.elements(NFT_MSG_NEWSETELEM, NLM_F_CREATE, set, elems);
    }

    /// `delete element`: deletes the elements with these keys (data is ignored; a range
    /// needs its `key_end`). A missing element fails (ENOENT).
    pub fn delete_elements(&mut self, set: &str, keys: &[Element]) {
        self.elements(NFT_MSG_DELSETELEM, 0, set, keys);
    }

    fn elements(&mut self, ty: u16, flags: u16, set: &str, elems: &[Element]) {
        let with_data = ty == NFT_MSG_NEWSETELEM;
        let mut i = 0;
        while i < elems.len() {
            let first = i;
            let m = self.begin(ty, flags);
            self.w.put_strz(NFTA_SET_ELEM_LIST_TABLE, current(&self.tables));
            self.w.put_strz(NFTA_SET_ELEM_LIST_SET, set);
            let list = self.w.begin_nest(NFTA_SET_ELEM_LIST_ELEMENTS);
            while i < elems.len() {
                let mark = self.w.buf.len();
                encode_element(&mut self.w, &elems[i], with_data);
                if self.w.buf.len() - list > MAX_ELEMENTS_NEST && i > first {
                    self.w.buf.truncate(mark);
                    break;
                }
                i += 1;
            }
            self.w.end_nest(list);
            let what = if with_data {
                What::AddElements {
                    set: set.to_string(),
                    first,
                    count: i - first,
                }
            } else {
                What::DeleteElements {
                    set: set.to_string(),
                    first,
                    count: i - first,
                }
            };
            self.finish(m, what);
        }
    }
}

/// The name of the table that takes the next message (a free function so that the
/// encoder can borrow it beside the writer).
fn current(tables: &[(TableFamily, String)]) -> &str {
    &tables[tables.len() - 1].1
}

/// One element as the kernel wants it: a range becomes its start and, as a separate
/// kernel element flagged NFT_SET_ELEM_INTERVAL_END, the key after its end (nft's
/// encoding for single-field interval sets, which the kernel keeps in an rbtree); a range
/// that ends at the largest key has no end element, and its start carries nft's "open
/// interval" user data flag so nft prints it as a prefix.
fn encode_element(w: &mut Writer, e: &Element, with_data: bool) {
    let end = e.key_end.as_deref().map(successor);
    let elem = w.begin_nest(NFTA_LIST_ELEM);
    w.put_data(NFTA_SET_ELEM_KEY, &e.key);
    if with_data {
        match &e.data {
            ElemData::None => {}
            ElemData::Value(v) => w.put_data(NFTA_SET_ELEM_DATA, v),
            ElemData::Verdict(v) => {
                let (code, chain) = Verdict::code(v);
                w.put_verdict(NFTA_SET_ELEM_DATA, code, chain);
            }
        }
    }
    if let Some(None) = end {
        let mut u = [UDATA_SET_ELEM_FLAGS, 4, 0, 0, 0, 0];
        u[2..].copy_from_slice(&SET_ELEM_F_INTERVAL_OPEN.to_ne_bytes());
        w.put(NFTA_SET_ELEM_USERDATA, &u);
    }
    w.end_nest(elem);
    if let Some(Some(end)) = end {
        let elem = w.begin_nest(NFTA_LIST_ELEM);
        w.put_be32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
        w.put_data(NFTA_SET_ELEM_KEY, &end);
        w.end_nest(elem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::set::{concat, port_bytes, proto_bytes};

    fn messages(b: &Batch) -> Vec<&[u8]> {
        (0..b.len()).map(|i| b.message(i)).collect()
    }

    #[test]
    fn messages_are_numbered_and_framed() {
        let mut b = Batch::new("t");
        b.add_table();
        b.add_chain("c", None);
        b.flush_chain("c");
        assert_eq!(b.len(), 3);
        let begin = &b.bytes()[..20];
        assert_eq!(u32::from_ne_bytes(begin[..4].try_into().unwrap()), 20);
        assert_eq!(
            u16::from_ne_bytes(begin[4..6].try_into().unwrap()),
            NFNL_MSG_BATCH_BEGIN
        );
        assert_eq!(&begin[16..], &[0, 0, 0, 10]); // res_id NFNL_SUBSYS_NFTABLES
        for (i, m) in messages(&b).into_iter().enumerate() {
            let len = u32::from_ne_bytes(m[..4].try_into().unwrap()) as usize;
            assert_eq!(len, m.len());
            let seq = u32::from_ne_bytes(m[8..12].try_into().unwrap());
            assert_eq!(seq as usize, i + 1);
            assert_eq!(m[16], NFPROTO_INET);
        }
        assert_eq!(b.describe(1), "add chain c");
        assert_eq!(
            b.to_string(),
            "1 add table inet t\n2 add chain c\n3 flush chain c\n"
        );
        b.clear();
        assert!(b.is_empty());
        assert_eq!(b.encoded_len(), 20);
    }

    #[test]
    fn large_element_lists_are_split_under_the_attribute_limit() {
        let elems: Vec<Element> = (0..20_000u32)
            .map(|i| {
                let key = concat(&[&i.to_be_bytes(), &proto_bytes(6), &port_bytes(80)]);
                Element::verdict(key, Verdict::Goto(format!("service-{i:08}")))
            })
            .collect();
        let mut b = Batch::new("t");
        b.add_elements("m", &elems);
        assert!(b.len() > 1, "20k elements fit in one message?");
        let mut total = 0;
        let mut next_first = 0;
        for i in 0..b.len() {
            let m = b.message(i);
            assert_eq!(b.first_element(i), Some(next_first));
            let (_, list, _) = attrs(&m[20..])
                .find(|a| a.0 == NFTA_SET_ELEM_LIST_ELEMENTS)
                .unwrap();
            assert!(list.len() + 4 <= MAX_ELEMENTS_NEST);
            let n = attrs(list).count();
            next_first += n;
            total += n;
        }
        assert_eq!(total, elems.len());
        assert!(b.describe(0).starts_with("add elements 0.."), "{}", b.describe(0));
    }

    #[test]
    fn ranges_become_start_and_end_elements() {
        let mut b = Batch::new("t");
        b.add_elements(
            "s",
            &[
                Element::prefix("10.0.0.0".parse().unwrap(), 8),
                Element::prefix("224.0.0.0".parse().unwrap(), 3),
            ],
        );
        let m = b.message(0);
        let (_, list, _) = attrs(&m[20..])
            .find(|a| a.0 == NFTA_SET_ELEM_LIST_ELEMENTS)
            .unwrap();
        let elems: Vec<Vec<(u16, Vec<u8>)>> = attrs(list)
            .map(|(_, e, _)| attrs(e).map(|(t, p, _)| (t, p.to_vec())).collect())
            .collect();
        assert_eq!(elems.len(), 3);
        let key = |e: &Vec<(u16, Vec<u8>)>| {
            let k = &e.iter().find(|a| a.0 == NFTA_SET_ELEM_KEY).unwrap().1;
            attrs(k).next().unwrap().1.to_vec()
        };
        assert_eq!(key(&elems[0]), [10, 0, 0, 0]);
        assert_eq!(key(&elems[1]), [11, 0, 0, 0]);
        assert!(elems[1]
            .iter()
            .any(|a| a.0 == NFTA_SET_ELEM_FLAGS && a.1 == [0, 0, 0, 1]));
        assert_eq!(key(&elems[2]), [224, 0, 0, 0]);
        assert!(elems[2].iter().any(|a| a.0 == NFTA_SET_ELEM_USERDATA));
    }
}
