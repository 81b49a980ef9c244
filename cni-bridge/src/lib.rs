//! `ferry-bridge`: puts a Pod on the node's bridge.
//!
//! Data flow of an ADD: [`config`] reads and checks the configuration, [`plugin`] creates
//! the bridge and the veth pair through [`link`] (netlink over one small socket type,
//! [`netlink`], opened in the right namespace by [`netns`]), delegates addresses to the
//! IPAM plugin, and installs the attachment's masquerade and hostPort rules with
//! [`firewall`]. Every step registers its undo, so a failure leaves nothing behind. DEL
//! leaves the slow part of deleting a veth pair to a process of its own ([`detached`]).

pub mod firewall;

pub mod config;
pub mod detached;
pub mod link;
pub mod netlink;
pub mod netns;
pub mod plugin;

pub use plugin::Bridge;
