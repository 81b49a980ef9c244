//! `ferry-netlink`: Ferry's kernel layer over netlink.
//!
//! One socket type, [`Socket<F>`], specialised per netlink family by a marker type that
//! says which protocol to open and which messages travel on it:
//!
//! | family | marker | messages | used by |
//! |---|---|---|---|
//! | rtnetlink (`NETLINK_ROUTE`) | [`route::Route`] | netlink-packet-route's `RouteNetlinkMessage` | ferry-bridge: links, addresses, routes |
//! | ctnetlink (`NETLINK_NETFILTER`) | [`conntrack::Conntrack`] | netlink-packet-netfilter's conntrack messages | ferry-proxy: stale UDP flows |
//!
//! Every family shares one send/receive loop ([`socket`]): a request with an ACK, a dump
//! read to `NLMSG_DONE` across as many datagrams as the kernel sends, a `GET` of one
//! object; the kernel's refusals come back as [`Error::Kernel`], naming the request
//! (`rtnetlink RTM_NEWLINK veth1`) with the kernel's extended-ack text when it sent one.
//! A socket belongs to the network namespace of the thread that opened it;
//! [`Netns::run`] opens it in another one, on a thread of its own.
//!
//! # nf_tables batches on the same socket (next)
//!
//! nf_tables is the third family (today in its own module with its own socket). Its
//! transactions are not one typed message but a batch of raw messages (`BATCH_BEGIN`, the
//! changes, `BATCH_END`) in one `sendmsg`, each with its own sequence number, the kernel
//! answering with an error for each failing message and an ACK for the last. That fits
//! the raw layer of [`Socket`] as it is:
//!
//! 1. a marker `NfTables` implementing [`Family`] with `PROTOCOL = NETLINK_NETFILTER`
//!    (its dumps of tables, chains and sets can then use [`Socket::dump`] once their
//!    messages are typed, or the raw calls meanwhile);
//! 2. the batch takes its sequence numbers from [`Socket::next_seq`] and goes out with
//!    [`Socket::send_raw`] (a vectored variant and a forced `SO_SNDBUF` are the two
//!    additions a 64 KiB+ batch needs);
//! 3. [`Socket::receive`] hands over every [`Frame`] whatever its sequence number: the
//!    commit collects the [`Frame::Error`]s of its sequence range (their extended-ack
//!    `offset` locates the rejected attribute inside the batch) and stops at the
//!    [`Frame::Ack`] of the last message.
//!
//! The socket already asks for capped acks, so an error does not echo a whole batch.

pub mod conntrack;
mod error;
pub mod netns;
pub mod route;
pub mod socket;

pub use error::{Error, Result};
pub use netns::Netns;
pub use socket::{Family, Frame, Socket};
