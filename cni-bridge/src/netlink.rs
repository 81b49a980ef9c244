//! The plugin's rtnetlink socket: ferry-netlink's `Socket<Route>`.
//!
//! A CNI call makes a dozen requests and exits: a blocking socket with an ACK per request
//! is all it needs, and keeps an async runtime out of the plugin's start-up. The socket is
//! bound to the network namespace of the thread that opened it, for its whole life; see
//! [`crate::netns`]. This type only gives the plugin's requests (in [`crate::link`]) a
//! home as methods; the send/receive loop and its errors are ferry-netlink's.

use std::ops::{Deref, DerefMut};

use ferry_netlink::route::Route;

pub use ferry_netlink::{Error, Result};

pub struct Socket(ferry_netlink::Socket<Route>);

impl Socket {
    /// Opens a socket in the calling thread's network namespace.
    pub fn new() -> Result<Socket> {
        ferry_netlink::Socket::open().map(Socket)
    }
}

impl Deref for Socket {
    type Target = ferry_netlink::Socket<Route>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Socket {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}
