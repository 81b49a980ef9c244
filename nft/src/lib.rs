//! nftables over netlink: tables, chains, rules, sets and maps in the `inet` and `bridge`
//! families, programmed with nf_tables messages on a NETLINK_NETFILTER socket, without the
//! `nft` program. Used by ferry-proxy (Services) and ferry-bridge (masquerade, hostPorts,
//! MAC spoof check).
//!
//! This crate knows kernel objects, not Kubernetes or CNI: its users decide which chains,
//! rules and elements exist; this encodes them and commits them. [`Rule`] holds a rule as
//! data that prints as nft text and lowers to the expressions nft would send for it.
//!
//! Rules may carry a comment ([`Batch::add_rule_with_comment`], stored as nft stores it);
//! [`Socket::list_rules`] lists a table's rules with their handles and comments, and
//! [`Batch::delete_rule`] deletes one by handle: how a user finds and removes the rules it
//! owns in a shared table. One batch may span tables of several families
//! ([`Batch::use_table`]) and still commits as one transaction.
//!
//! # Message flow
//!
//! ```text
//! Batch::new("ferry-proxy")            BATCH_BEGIN (res_id NFNL_SUBSYS_NFTABLES, seq 0)
//!   .add_table()                       NFT_MSG_NEWTABLE   CREATE            seq 1
//!   .add_chain("services", None)       NFT_MSG_NEWCHAIN   CREATE            seq 2
//!   .add_set(&spec)                    NFT_MSG_NEWSET     CREATE            seq 3
//!   .add_rule("services", &exprs)      NFT_MSG_NEWRULE    CREATE|APPEND     seq 4
//!   .add_elements("m", &elems)         NFT_MSG_NEWSETELEM CREATE            seq 5, 6, ... (<= 64 KiB each)
//! Socket::commit(&batch)               the above, ACK on the last message, BATCH_END: ONE sendmsg
//!   <- NLMSG_ERROR for each message that failed (seq = its number), even without ACK
//!   <- NLMSG_ERROR with seq 0 if the commit phase failed
//!   <- the ack (error 0) of the last message: the transaction is done
//! ```
//!
//! The kernel applies a batch as one transaction: every message is checked and prepared,
//! and either all of them are committed or, if any failed, none is. Sending the whole
//! batch in a single `sendmsg` (the send buffer is raised to fit with SO_SNDBUFFORCE) is
//! what makes it one transaction; the kernel processes it inside that system call, so
//! its answers are queued when `sendmsg` returns.
//!
//! # Choices
//!
//! - **Encoded as built.** Each `Batch::add_*` writes its message into one buffer right
//!   away (nested attributes get their length patched when closed), so a full sync of
//!   10k Services costs one buffer and a description per message, and committing sends
//!   that buffer as is. Message `i` has sequence number `i + 1`, which is how an error
//!   names it; the ACK flag of the last message is set in a separate iovec at commit, so a
//!   batch can be committed twice (e.g. retried) without being rebuilt.
//! - **No ack per message.** With NLM_F_ACK on every message, a 100k-message batch would
//!   get 100k acks and overflow the receive buffer. The kernel reports a failing message
//!   whether or not it asked for an ack, and sends acks only after the whole batch, so an
//!   ack on the last message alone tells that the batch was processed. The socket asks
//!   for capped acks (errors do not echo a 64 KiB message back) and extended acks (the
//!   kernel's offset of the bad attribute, turned into "expression 4 (lookup)" or
//!   "element 12 (key ...)" in [`CommitError`]).
//! - **Element messages are split** so that each element list stays under 64 KiB: the
//!   list is one netlink attribute, whose length is 16 bits (nft splits the same way).
//!   Elements are grouped hundreds per message, so their cost is the element itself
//!   (a verdict map element is about 80 bytes).
//! - **Idempotent adds.** Table, chain and set messages carry NLM_F_CREATE without
//!   NLM_F_EXCL, like `nft add`: adding what exists is not an error (a different
//!   declaration is). Element adds do not use NLM_F_EXCL either: an element with the same
//!   key and data is left alone, one with other data fails with EEXIST.
//! - **As nft encodes them.** Expressions, set declarations and their user data are
//!   what nft 1.0.6 sends for the same nft text (the unit tests compare the encodings with
//!   nft's, captured with `strace -e write=all`), so `nft list table inet <t>` prints
//!   everything as ordinary nft syntax: sets with their `type a . b : c` or `typeof`
//!   declaration, elements as addresses, ports and protocol names, rules as written.
//!   Registers are numbered as nft numbers them, so `nft --debug=netlink list` shows the
//!   same register numbers too.
//! - **Interval sets** (single-field keys) use nft's encoding: a range is its first key
//!   and, flagged as an interval end, the key after its last; a range that reaches the
//!   largest key has no end element and carries nft's "open interval" flag. nft 1.0.6
//!   also sends a leading `0.0.0.0` interval end; the kernel does not need it, and nft
//!   lists the set the same without it.
//!
//! # Kernel facts the caller should know (Linux 6.18, measured)
//!
//! - Sets are looked up by name with a walk of the table's set list, for every rule and
//!   element message that names one: keep few sets.
//! - Binding a map to a rule walks the map's elements (for rules in a chain not yet bound
//!   to it), and adding an element to a map walks the rules bound to it: order a big batch
//!   as sets, chains, rules, then elements, and prefer few rules per map.
//! - A rule whose expressions the kernel must validate against their chain's hooks (nat,
//!   masquerade, reject, lookups into maps) and a verdict map element that jumps make the
//!   commit walk the table's whole jump graph from every base chain: at 10k Services that
//!   costs 3-6 ms per commit, whatever the batch's size; an empty chain, a counter rule or
//!   a data map element commit in about 0.06 ms.
//! - Errors: a failing message reports its own errno (ENOENT for a missing chain or set,
//!   EEXIST for a set declared differently or an element with other data, EBUSY for
//!   deleting a chain or set still in use, EMLINK for the rule or map element that closes
//!   a jump loop), with an extended-ack offset for most; messages after it are still
//!   checked, so one missing chain fails every rule that names it.
//! - Closing a socket after a transaction that deleted anything waits until the kernel has
//!   freed the deleted objects (an RCU grace period, 4-22 ms measured), holding the
//!   namespace's commit lock: keep sockets open in a daemon; a short-lived process can
//!   hand the last reference to another process ([`Socket`] is `AsRawFd`).
//! - `delete_chain` removes the chain's rules itself; it fails while something else
//!   still jumps to the chain (a flush of the jumping chain earlier in the same batch
//!   counts).
//! - A 10k-Service table (10k chains, 20k rules, 110k elements, 11 MiB in 30k messages)
//!   takes this module about 45 ms to build and encode, and the kernel about 1 s to
//!   commit into an empty table (`timing_at_ten_thousand_services` in
//!   `nft/tests/nft_netlink.rs`).
//!
//! ```no_run
//! use ferry_nft::*;
//!
//! let mut b = Batch::new("example");
//! b.add_table();
//! b.add_chain("nat-prerouting", Some(&BaseChain { kind: ChainType::Nat, hook: Hook::Prerouting, priority: -100 }));
//! b.add_chain("services", None);
//! b.add_rule("nat-prerouting", &[Expr::Verdict(Verdict::Jump("services".into()))]);
//! let mut rule = match_l4proto(17).to_vec();
//! rule.extend([
//!     Expr::Immediate { dreg: Reg::R32(0), data: vec![10, 0, 0, 1] },
//!     Expr::Immediate { dreg: Reg::R32(1), data: port_bytes(8080).to_vec() },
//!     Expr::Nat { kind: NatKind::Dnat, family: Family::Ipv4, addr: Some(Reg::R32(0)),
//!                 proto: Some(Reg::R32(1)), flags: NAT_PROTO_SPECIFIED },
//! ]);
//! b.add_rule("services", &rule); // meta l4proto udp dnat ip to 10.0.0.1:8080
//! Socket::open()?.commit(&b)?;
//! # Ok::<(), std::io::Error>(())
//! ```

mod batch;
mod expr;
mod rule;
mod set;
mod socket;
/// Netlink framing of nf_tables messages (constants, attribute writer and reader). The
/// socket under them, its receive loop and the parsing of the kernel's acks and errors
/// are ferry-netlink's `Socket<NfTables>`, shared with rtnetlink and ctnetlink.
pub mod wire;

pub use batch::{BadComment, BaseChain, Batch, ChainType, Hook, TableFamily, COMMENT_MAX};
pub use expr::{
    ip_addr, mark_set, match_addr_prefix, match_ct_bits, match_ether_saddr, match_family, match_fib_local,
    match_ifname, match_l4proto, match_prefix, prefix_mask, th_dport, th_sport, Addr, CmpOp, CtKey, DynsetOp,
    Expr, Family, FibResult, MetaKey, NatFamily, NatKind, PayloadBase, Reg, RejectKind, Verdict,
    CT_STATE_ESTABLISHED, CT_STATE_INVALID, CT_STATE_NEW, CT_STATE_RELATED, CT_STATE_UNTRACKED,
    CT_STATUS_DNAT, CT_STATUS_SNAT, FIB_DADDR, FIB_IIF, FIB_MARK, FIB_OIF, FIB_PRESENT, FIB_SADDR,
    NAT_FULLY_RANDOM, NAT_PERSISTENT, NAT_PROTO_SPECIFIED, NAT_RANDOM, RTN_LOCAL, RTN_UNICAST,
};
pub use rule::{Match, Rule, Statement};
pub use set::{
    concat, ip_bytes, port_bytes, proto_bytes, u32_bytes, DataType, ElemData, Element, SetSpec, Typeof,
};
pub use socket::{CommitError, ListedRule, Socket};

/// IP protocol numbers for [`match_l4proto`] and `inet_proto` keys.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
