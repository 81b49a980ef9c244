//! `ferry-netlink`: Ferry's kernel layer over netlink.
//!
//! One socket type, [`Socket<F>`], specialised per netlink family by a marker type that
//! says which protocol to open and which messages travel on it:
//!
//! | family | marker | messages | used by |
//! |---|---|---|---|
//! | rtnetlink (`NETLINK_ROUTE`) | [`route::Route`] | netlink-packet-route's `RouteNetlinkMessage` | ferry-bridge: links, addresses, routes; ferry-proxy: the VXLAN device, FDB and neighbour entries, routes to other nodes ([`overlay`]) |
//! | ctnetlink (`NETLINK_NETFILTER`) | [`conntrack::Conntrack`] | netlink-packet-netfilter's conntrack messages | ferry-proxy: stale UDP flows |
//! | nf_tables (`NETLINK_NETFILTER`) | [`nftables::NfTables`] | [`nftables::RawMessage`], framed by ferry-nft | ferry-nft: batches and dumps for the proxy and ferry-bridge |
//!
//! Every family shares one send/receive loop ([`socket`]): a request with an ACK, a dump
//! read to `NLMSG_DONE` across as many datagrams as the kernel sends, a `GET` of one
//! object; the kernel's refusals come back as [`Error::Kernel`], naming the request
//! (`rtnetlink RTM_NEWLINK veth1`) with the kernel's extended-ack text when it sent one.
//! A socket belongs to the network namespace of the thread that opened it;
//! [`Netns::run`] opens it in another one, on a thread of its own.
//!
//! # nf_tables batches on the same socket
//!
//! nf_tables is the third family ([`nftables::NfTables`], used by ferry-nft). Its
//! transactions are not one typed message but a batch of raw messages (`BATCH_BEGIN`, the
//! changes, `BATCH_END`) in one `sendmsg`, each with its own sequence number, the kernel
//! answering with an error for each failing message and an ACK for the last. That is the
//! raw layer of [`Socket`]:
//!
//! 1. the batch takes its sequence numbers from [`Socket::next_seq`] (or numbers them
//!    itself: the kernel only echoes them) and goes out whole with
//!    [`Socket::send_vectored`], after [`Socket::reserve_send_buffer`] made room for it
//!    (SO_SNDBUFFORCE: a 10k-Service sync is 11 MiB in one datagram);
//! 2. [`Socket::receive_within`] hands over every [`Frame`] whatever its sequence number:
//!    the commit collects the [`Frame::Error`]s of its sequence range (their extended-ack
//!    `offset` locates the rejected attribute inside the batch) and stops at the
//!    [`Frame::Ack`] of the last message; an ENOBUFS (thousands of errors overflowed the
//!    receive queue) ends one call and the next reads on;
//! 3. dumps of tables, chains, sets and rules read [`Frame::Message`]s, whose header
//!    carries `NLM_F_DUMP_INTR` when the ruleset changed during the dump.
//!
//! The socket asks for capped acks, so an error does not echo a whole batch.

pub mod conntrack;
mod error;
pub mod netns;
pub mod nftables;
pub mod overlay;
pub mod route;
pub mod socket;

pub use error::{Error, Result};
pub use netns::Netns;
pub use socket::{Family, Frame, Socket};
