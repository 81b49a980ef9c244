//! The NETLINK_NETFILTER socket: commits a [`Batch`] as one transaction, dumps chain and
//! set names and the rules of a table (with their handles and comments). The socket, its
//! send and receive loop and the parsing of the kernel's answers (acks, errors with their
//! extended ack, ends of dumps) are ferry-netlink's `Socket<NfTables>`.

use std::fmt;
use std::io;
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::time::Duration;

use ferry_netlink::nftables::NfTables;
use ferry_netlink::Frame;

use super::batch::{Batch, TableFamily};
use super::wire::*;

/// A commit that failed: nothing of the batch was applied.
///
/// The kernel reports every message that failed; this names the first (later failures
/// are usually its consequences, e.g. rules added to a chain whose creation failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitError {
    /// The errno the kernel (or the socket) returned.
    pub errno: i32,
    /// The failing message (0-based, see [`Batch::describe`]); `None` when the batch as a
    /// whole failed: while sending it, or in the commit phase after every message passed.
    pub index: Option<usize>,
    /// What the failing message does (`add rule to chain service-X`), or what failed.
    pub description: String,
    /// What the kernel pointed at inside the message, when it did: `expression 4
    /// (lookup)`, `element 12 (key 0a000001 06000000 00500000)`, and its text if any.
    pub detail: Option<String>,
    /// Messages of the batch.
    pub batch_len: usize,
    /// How many other messages failed too, of those the kernel reported (when thousands
    /// fail, it drops the errors the socket's receive buffer cannot hold; the first ones
    /// always arrive).
    pub more_failures: usize,
}

impl fmt::Display for CommitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.description)?;
        if let Some(d) = &self.detail {
            write!(f, ", {d}")?;
        }
        write!(f, ": {}", io::Error::from_raw_os_error(self.errno))?;
        match self.index {
            Some(i) => write!(f, " (message {} of {}", i + 1, self.batch_len)?,
            None => write!(f, " (batch of {} messages", self.batch_len)?,
        }
        if self.more_failures > 0 {
            write!(f, "; {} more failed", self.more_failures)?;
        }
        write!(f, "; nothing was applied)")
    }
}

impl std::error::Error for CommitError {}

impl From<CommitError> for io::Error {
    fn from(e: CommitError) -> io::Error {
        io::Error::new(io::Error::from_raw_os_error(e.errno).kind(), e)
    }
}

/// How long to wait for the kernel's answer to a commit that is not in the receive queue
/// when `sendmsg` returns. The kernel processes a batch inside `sendmsg` and queues its
/// answers before returning, so this only guards against surprises.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A rule as the kernel lists it: enough to find it again ([`Batch::delete_rule`]) and to
/// tell whose it is (its comment). The expressions are not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedRule {
    pub family: TableFamily,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    /// The comment nft (or [`Batch::add_rule_with_comment`]) stored, if any.
    pub comment: Option<String>,
}

/// A NETLINK_NETFILTER socket in the network namespace of the thread that opened it:
/// ferry-netlink's `Socket<NfTables>`, whose one receive loop every netlink family of the
/// workspace shares; this adds what nf_tables asks of it (batches, dumps with restarts).
pub struct Socket {
    sock: ferry_netlink::Socket<NfTables>,
}

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Socket")
            .field("fd", &self.sock.as_raw_fd())
            .finish()
    }
}

/// The descriptor, for a caller that must manage its lifetime itself (e.g. leave the last
/// reference, whose release can wait for the kernel, to another process).
impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }
}

impl Socket {
    /// Opens and binds the socket; asks for extended acks (the kernel then says which
    /// attribute of a message it rejected) and capped acks (errors do not echo the
    /// message, which may be 64 KiB of elements).
    pub fn open() -> io::Result<Socket> {
        Ok(Socket {
            sock: ferry_netlink::Socket::open()?,
        })
    }

    /// Sends `batch` as one transaction and waits for the kernel's verdict: either every
    /// message is applied, or none is and the error names the first failing message.
    ///
    /// One `sendmsg` carries BATCH_BEGIN, the messages and BATCH_END (the send buffer is
    /// raised to fit with SO_SNDBUFFORCE). Only the last message asks for an ack: the
    /// kernel sends an error for every failing message anyway, and acks are delivered
    /// after the whole batch was processed, so the ack of the last message says the
    /// transaction is done. An empty batch sends nothing.
    pub fn commit(&mut self, batch: &Batch) -> Result<(), CommitError> {
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len();
        let batch_error = |errno: i32, description: String| CommitError {
            errno,
            index: None,
            description,
            detail: None,
            batch_len: n,
            more_failures: 0,
        };
        let bytes = batch.bytes();
        let flags_at = batch.offset(n - 1) + 6;
        let last_flags = u16::from_ne_bytes([bytes[flags_at], bytes[flags_at + 1]]) | NLM_F_ACK;
        let mut end = Writer::with_capacity(20);
        let e = end.begin_msg(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            n as u32 + 1,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        end.end_msg(e);
        let total = bytes.len() + end.buf.len();
        let sending = || format!("send the batch ({n} messages, {total} bytes)");

        self.drain();
        self.sock.reserve_send_buffer(total).map_err(|e| {
            batch_error(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("{}: SO_SNDBUFFORCE", sending()),
            )
        })?;
        let parts: [&[u8]; 4] = [
            &bytes[..flags_at],
            &last_flags.to_ne_bytes(),
            &bytes[flags_at + 2..],
            &end.buf,
        ];
        match self.sock.send_vectored(&parts) {
            Ok(sent) if sent == total => {}
            Ok(sent) => return Err(batch_error(libc::EIO, format!("{}: only {sent} sent", sending()))),
            Err(e) => return Err(batch_error(e.raw_os_error().unwrap_or(libc::EIO), sending())),
        }

        // The answers: an error per failing message (seq = index + 1), an error with seq 0
        // if the commit phase failed, the ack (or error) of the last message, in that
        // order. They are queued when sendmsg returns; the timeout only guards against
        // surprises.
        let last_seq = n as u32;
        let mut first: Option<(u32, i32, Option<String>, Option<u32>)> = None;
        let mut failures = 0usize;
        let mut answered = false;
        let mut lost = false;
        let mut timeout = ANSWER_TIMEOUT;
        loop {
            let got = self.sock.receive_within(timeout, |frame| match frame {
                Frame::Ack { seq } if seq == last_seq => ControlFlow::Break(()),
                Frame::Error {
                    seq,
                    errno,
                    message,
                    offset,
                } => {
                    failures += 1;
                    first.get_or_insert((seq, errno, message, offset));
                    match seq == last_seq {
                        true => ControlFlow::Break(()),
                        false => ControlFlow::Continue(()),
                    }
                }
                _ => ControlFlow::Continue(()),
            });
            match got {
                Ok(Some(())) => {
                    answered = true;
                    break;
                }
                Ok(None) => break,
                // The queue overflowed: some errors were dropped. The first ones came in
                // first, so what we have names the first failure; read what is left.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    lost = true;
                    timeout = Duration::ZERO;
                }
                Err(e) => {
                    return Err(batch_error(
                        e.raw_os_error().unwrap_or(libc::EIO),
                        "read the kernel's answer to the batch".into(),
                    ))
                }
            }
        }

        if let Some((seq, errno, msg, offset)) = first {
            let (index, description, mut detail) = match seq {
                0 => (None, "commit of the batch".to_string(), None),
                s if (s as usize) <= n => {
                    let i = s as usize - 1;
                    let detail = offset.and_then(|o| locate(batch, i, o as usize));
                    (Some(i), batch.describe(i), detail)
                }
                s => (None, format!("message with sequence number {s}"), None),
            };
            if let Some(msg) = msg {
                detail = Some(match detail {
                    Some(d) => format!("{d}, \"{msg}\""),
                    None => format!("\"{msg}\""),
                });
            }
            return Err(CommitError {
                errno,
                index,
                description,
                detail,
                batch_len: n,
                more_failures: failures - 1,
            });
        }
        if lost {
            return Err(batch_error(
                libc::ENOBUFS,
                "read the kernel's answer to the batch (answers were lost)".into(),
            ));
        }
        if !answered {
            return Err(batch_error(
                libc::ETIMEDOUT,
                "the kernel did not acknowledge the batch".into(),
            ));
        }
        Ok(())
    }

    /// Names of the `inet` tables.
    pub fn list_tables(&mut self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        self.dump(NFT_MSG_GETTABLE, NFPROTO_INET, None, |payload| {
            if let Some((_, name, _)) = attrs(payload).find(|a| a.0 == NFTA_TABLE_NAME) {
                out.push(attr_str(name));
            }
        })?;
        Ok(out)
    }

    /// Names of the chains of `inet <table>`; empty if there is no such table. One dump
    /// of the inet family's chains (the kernel has no table filter for chain dumps).
    pub fn list_chains(&mut self, table: &str) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        self.dump(NFT_MSG_GETCHAIN, NFPROTO_INET, None, |payload| {
            let mut in_table = false;
            let mut name = None;
            for (ty, p, _) in attrs(payload) {
                match ty {
                    NFTA_CHAIN_TABLE => in_table = strz(p) == table.as_bytes(),
                    NFTA_CHAIN_NAME => name = Some(p),
                    _ => {}
                }
            }
            if let (true, Some(name)) = (in_table, name) {
                out.push(attr_str(name));
            }
        })?;
        Ok(out)
    }

    /// Names of the named sets and maps of `inet <table>`; empty if there is no such
    /// table. One dump, filtered to the table by the kernel.
    pub fn list_sets(&mut self, table: &str) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        let res = self.dump(
            NFT_MSG_GETSET,
            NFPROTO_INET,
            Some((NFTA_SET_TABLE, table)),
            |payload| {
                let mut name = None;
                let mut anonymous = false;
                for (ty, p, _) in attrs(payload) {
                    match ty {
                        NFTA_SET_NAME => name = Some(p),
                        NFTA_SET_FLAGS => anonymous = be32(p).unwrap_or(0) & NFT_SET_ANONYMOUS != 0,
                        _ => {}
                    }
                }
                if let (false, Some(name)) = (anonymous, name) {
                    out.push(attr_str(name));
                }
            },
        );
        match res {
            Ok(()) => Ok(out),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Whether chain `<family> <table> <chain>` exists (false also when the table does
    /// not). One request for that chain alone: a chain dump has no table filter and would
    /// read every chain of the family, e.g. the proxy's thousands.
    pub fn has_chain(&mut self, family: TableFamily, table: &str, chain: &str) -> io::Result<bool> {
        self.drain();
        let seq = self.sock.next_seq();
        let mut w = Writer::with_capacity(64);
        let m = w.begin_msg(
            NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETCHAIN,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            family.nfproto(),
            0,
        );
        w.put_strz(NFTA_CHAIN_TABLE, table);
        w.put_strz(NFTA_CHAIN_NAME, chain);
        w.end_msg(m);
        self.sock.send_raw(&w.buf)?;
        // The chain (if any), then the ack or the error.
        let mut found = false;
        self.sock.receive(|frame| match frame {
            Frame::Message { header, .. } if header.sequence_number == seq => {
                found = true;
                ControlFlow::Continue(())
            }
            Frame::Ack { seq: s } if s == seq => ControlFlow::Break(Ok(found)),
            Frame::Error { seq: s, errno, .. } if s == seq => ControlFlow::Break(match errno {
                libc::ENOENT => Ok(false),
                errno => Err(io::Error::from_raw_os_error(errno)),
            }),
            _ => ControlFlow::Continue(()),
        })?
    }

    /// The rules of table `<family> <table>`, in the kernel's order, with their handles and
    /// comments. A missing table lists as empty. One dump, filtered to the table by the
    /// kernel (which stops a filtered rule dump after the first table of that name, so
    /// there is no one-dump listing of several families).
    pub fn list_rules(&mut self, family: TableFamily, table: &str) -> io::Result<Vec<ListedRule>> {
        let mut out = Vec::new();
        let nfproto = family.nfproto();
        let res = self.dump(
            NFT_MSG_GETRULE,
            nfproto,
            Some((NFTA_RULE_TABLE, table)),
            |payload| {
                let mut rule = ListedRule {
                    family,
                    table: String::new(),
                    chain: String::new(),
                    handle: 0,
                    comment: None,
                };
                for (ty, p, _) in attrs(payload) {
                    match ty {
                        NFTA_RULE_TABLE => rule.table = attr_str(p),
                        NFTA_RULE_CHAIN => rule.chain = attr_str(p),
                        NFTA_RULE_HANDLE => rule.handle = be64(p).unwrap_or(0),
                        NFTA_RULE_USERDATA => rule.comment = rule_comment(p),
                        _ => {}
                    }
                }
                if rule.table == table {
                    out.push(rule);
                }
            },
        );
        match res {
            Ok(()) => Ok(out),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Runs a dump of `ty` over `family`, calling `f` with the attributes of each object.
    /// Restarts (up to 10 times) when the kernel says the ruleset changed during the dump.
    fn dump(
        &mut self,
        ty: u16,
        family: u8,
        filter: Option<(u16, &str)>,
        mut f: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        let mut collected: Vec<Vec<u8>> = Vec::new();
        for _ in 0..10 {
            collected.clear();
            self.drain();
            let seq = self.sock.next_seq();
            let mut w = Writer::with_capacity(64);
            let m = w.begin_msg(
                NFNL_SUBSYS_NFTABLES << 8 | ty,
                NLM_F_REQUEST | NLM_F_DUMP,
                seq,
                family,
                0,
            );
            if let Some((attr, value)) = filter {
                w.put_strz(attr, value);
            }
            w.end_msg(m);
            self.sock.send_raw(&w.buf)?;
            // Read to the end of the dump even when it was interrupted, so the next
            // attempt finds nothing of this one in the queue.
            let mut intr = false;
            let end = self.sock.receive(|frame| match frame {
                Frame::Message { header, payload } if header.sequence_number == seq => {
                    intr |= header.flags & NLM_F_DUMP_INTR != 0;
                    if let Some(a) = payload.get(NFGENMSG_LEN..) {
                        collected.push(a.to_vec());
                    }
                    ControlFlow::Continue(())
                }
                Frame::Done {
                    seq: s,
                    errno,
                    interrupted,
                } if s == seq => {
                    intr |= interrupted;
                    ControlFlow::Break(errno)
                }
                Frame::Error { seq: s, errno, .. } if s == seq => ControlFlow::Break(errno),
                _ => ControlFlow::Continue(()),
            })?;
            if end != 0 {
                return Err(io::Error::from_raw_os_error(end));
            }
            if !intr {
                for obj in &collected {
                    f(obj);
                }
                return Ok(());
            }
        }
        Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "the ruleset kept changing during 10 dumps in a row",
        ))
    }

    /// Throws away whatever is queued (answers to an earlier call that gave up early).
    fn drain(&mut self) {
        loop {
            match self
                .sock
                .receive_within(Duration::ZERO, |_| ControlFlow::<()>::Continue(()))
            {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(_) => return,
            }
        }
    }
}

/// The comment in a rule's user data (libnftnl TLVs: type, length, value), if any.
fn rule_comment(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while let [ty, len, tail @ ..] = rest {
        let value = tail.get(..usize::from(*len))?;
        if *ty == UDATA_RULE_COMMENT {
            return Some(attr_str(value));
        }
        rest = &tail[usize::from(*len)..];
    }
    None
}

/// A string attribute's bytes without the NUL.
fn strz(p: &[u8]) -> &[u8] {
    p.split(|&b| b == 0).next().unwrap_or(p)
}

/// What the attribute at `offset` of message `index` is part of: which expression of a
/// rule, which element of an element list, else the attribute's number.
fn locate(batch: &Batch, index: usize, offset: usize) -> Option<String> {
    let msg = batch.message(index);
    let base = NLMSG_HDRLEN + NFGENMSG_LEN;
    let ty = u16::from_ne_bytes([msg[4], msg[5]]) & 0xff;
    let rel = offset.checked_sub(base)?;
    let top = msg.get(base..)?;
    let (attr, payload, at) = attrs(top).find(|(_, p, at)| rel >= *at && rel < at + 4 + p.len())?;
    // The offset inside the attribute's payload; the kernel may point at the attribute's
    // header itself, then there is nothing inside to name.
    let inner = rel.checked_sub(at + 4);
    let containing = |list: &[u8]| {
        let inner = inner?;
        attrs(list)
            .enumerate()
            .find(|(_, (_, p, at))| inner >= *at && inner < at + 4 + p.len())
            .map(|(k, (_, p, _))| (k, p.to_vec()))
    };
    match (ty, attr) {
        (NFT_MSG_NEWRULE, NFTA_RULE_EXPRESSIONS) => {
            let (k, e) = containing(payload)?;
            let name = attrs(&e)
                .find(|a| a.0 == NFTA_EXPR_NAME)
                .map(|a| attr_str(a.1))
                .unwrap_or_default();
            Some(format!("expression {} ({name})", k + 1))
        }
        (NFT_MSG_NEWSETELEM | NFT_MSG_DELSETELEM, NFTA_SET_ELEM_LIST_ELEMENTS) => {
            let (k, _) = containing(payload)?;
            // Kernel elements flagged as interval ends belong to the element before them.
            let mut caller = 0usize;
            let mut key = Vec::new();
            for (j, (_, e, _)) in attrs(payload).enumerate().take(k + 1) {
                let is_end = attrs(e).any(|a| {
                    a.0 == NFTA_SET_ELEM_FLAGS && be32(a.1).unwrap_or(0) & NFT_SET_ELEM_INTERVAL_END != 0
                });
                if j > 0 && !is_end {
                    caller += 1;
                }
                if j == k {
                    if let Some((_, k, _)) = attrs(e).find(|a| a.0 == NFTA_SET_ELEM_KEY) {
                        key = attrs(k).next().map(|v| v.1.to_vec()).unwrap_or_default();
                    }
                }
            }
            let first = batch.first_element(index).unwrap_or(0);
            Some(format!("element {} (key {})", first + caller, hex_words(&key)))
        }
        _ => Some(format!("attribute {attr} of the message")),
    }
}

/// `0a000001 06000000`: bytes in groups of four, as nft's debug output shows registers.
fn hex_words(b: &[u8]) -> String {
    b.chunks(4)
        .map(|c| c.iter().map(|x| format!("{x:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{concat, Element, Expr, Verdict};

    #[test]
    fn errors_name_the_message_the_expression_and_the_element() {
        let mut b = Batch::new("t");
        b.add_chain("c", None);
        b.add_rule(
            "c",
            &[
                Expr::Counter,
                Expr::Lookup {
                    sreg: crate::Reg::R32(0),
                    set: "nope".into(),
                    dreg: None,
                    invert: false,
                },
            ],
        );
        b.add_elements(
            "m",
            &[
                Element::prefix("10.0.0.0".parse().unwrap(), 8),
                Element::verdict(concat(&[&[10, 0, 0, 1], &[6]]), Verdict::Drop),
            ],
        );
        // Offsets as the kernel would report them: inside the 2nd expression, inside the
        // 3rd kernel element (the 2nd caller element, after a range's start and end).
        let rule = b.message(1);
        let (_, list, at) = attrs(&rule[20..]).find(|a| a.0 == NFTA_RULE_EXPRESSIONS).unwrap();
        let (_, _, second) = attrs(list).nth(1).unwrap();
        let off = 20 + at + 4 + second + 8;
        assert_eq!(locate(&b, 1, off).as_deref(), Some("expression 2 (lookup)"));
        let elems = b.message(2);
        let (_, list, at) = attrs(&elems[20..])
            .find(|a| a.0 == NFTA_SET_ELEM_LIST_ELEMENTS)
            .unwrap();
        let (_, _, third) = attrs(list).nth(2).unwrap();
        let off = 20 + at + 4 + third + 4;
        assert_eq!(
            locate(&b, 2, off).as_deref(),
            Some("element 1 (key 0a000001 06000000)")
        );
    }

    #[test]
    fn error_text_says_what_failed() {
        let e = CommitError {
            errno: libc::ENOENT,
            index: Some(16),
            description: "add rule to chain service-X".into(),
            detail: Some("expression 5 (lookup)".into()),
            batch_len: 20,
            more_failures: 2,
        };
        assert_eq!(
            e.to_string(),
            "add rule to chain service-X, expression 5 (lookup): No such file or directory (os error 2) \
             (message 17 of 20; 2 more failed; nothing was applied)"
        );
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
    }
}
