//! One small, synchronous rtnetlink socket.
//!
//! A CNI call makes a dozen requests and exits: a blocking socket with an ACK per request
//! is all it needs, and keeps an async runtime out of the plugin's start-up. The socket is
//! bound to the network namespace of the thread that opened it, for its whole life; see
//! [`crate::netns`].

use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket as RawSocket, SocketAddr};

pub struct Socket {
    raw: RawSocket,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    /// Opens a socket in the calling thread's network namespace.
    pub fn new() -> io::Result<Socket> {
        let mut raw = RawSocket::new(NETLINK_ROUTE)?;
        raw.bind_auto()?;
        raw.connect(&SocketAddr::new(0, 0))?;
        // Ask the kernel to report errors for requests it could not fully apply.
        let _ = raw.set_ext_ack(true);
        Ok(Socket {
            raw,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends one request and waits for its ACK; `flags` adds e.g. `NLM_F_CREATE | NLM_F_EXCL`.
    pub fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.exchange(msg, NLM_F_REQUEST | NLM_F_ACK | flags).map(|_| ())
    }

    /// Sends a dump request and collects every message of the answer.
    pub fn dump(&mut self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.exchange(msg, NLM_F_REQUEST | NLM_F_DUMP)
    }

    /// Sends a `GET` for one object (not a dump): its answer, or the kernel's error.
    pub fn get(&mut self, msg: RouteNetlinkMessage) -> io::Result<RouteNetlinkMessage> {
        self.exchange(msg, NLM_F_REQUEST)?
            .pop()
            .ok_or_else(|| io::Error::other("the kernel answered a GET with nothing"))
    }

    fn exchange(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.raw.send(&out, 0)?;

        let is_dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let wants_ack = flags & NLM_F_ACK != 0;
        let mut answers = Vec::new();
        loop {
            let n = self.raw.recv(&mut &mut self.buf[..], 0)?;
            let mut offset = 0;
            while offset < n {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "netlink message of length 0",
                    ));
                }
                offset += len;
                if reply.header.sequence_number != seq {
                    continue; // a late answer to an earlier request
                }
                match reply.payload {
                    NetlinkPayload::Error(e) => match e.code {
                        Some(_) => return Err(e.to_io()),
                        None => return Ok(answers), // the ACK
                    },
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::InnerMessage(m) => {
                        answers.push(m);
                        if !is_dump && !wants_ack {
                            return Ok(answers);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
