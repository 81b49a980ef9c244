//! [`Socket<F>`]: one blocking netlink socket type, specialised per family by a marker type
//! implementing [`Family`], with the one send/receive loop every family shares.
//!
//! Layers, from the wire up:
//! - [`Socket::send_raw`] and [`Socket::send_vectored`] (with
//!   [`Socket::reserve_send_buffer`] for a batch larger than the default send buffer),
//!   [`Socket::receive`] and [`Socket::receive_within`]: bytes already framed go out in
//!   one `sendmsg`; answers come back as [`Frame`]s (a message, an ACK, an error with the
//!   kernel's extended ack, the end of a dump), whatever their sequence number;
//! - [`Socket::request`], [`Socket::dump`], [`Socket::get`]: one typed message of the
//!   family out, its answer back, errors turned into [`Error`]s naming the request.
//!
//! The typed calls are built on the raw ones, so a family whose messages are not typed
//! (nf_tables batches) uses the same socket and the same loop.

use std::fmt;
use std::marker::PhantomData;
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_ACK,
    NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_sys::{Socket as RawSocket, SocketAddr};

use crate::error::{Error, Result};

/// A netlink protocol as this crate speaks it: which socket to open and which messages
/// travel on it.
pub trait Family {
    /// The protocol number for `socket(AF_NETLINK, SOCK_RAW, PROTOCOL)`.
    const PROTOCOL: isize;
    /// How errors name the family: `rtnetlink`, `ctnetlink`.
    const NAME: &'static str;
    /// The typed messages of the family.
    type Message: NetlinkSerializable + NetlinkDeserializable + fmt::Debug;

    /// A short name of a request for error messages: its message type and subject,
    /// `RTM_NEWLINK veth1`, `IPCTNL_MSG_CT_DELETE udp 10.0.0.2:4000 -> 10.96.0.10:53`.
    fn describe(msg: &Self::Message) -> String;
}

/// One answer of the kernel, as [`Socket::receive`] hands it over.
#[derive(Debug)]
pub enum Frame<'a> {
    /// A message of the family (part of a dump, or the answer to a `GET`).
    Message {
        header: NetlinkHeader,
        payload: &'a [u8],
    },
    /// The request with this sequence number was applied (`NLMSG_ERROR` with errno 0).
    Ack { seq: u32 },
    /// The request with this sequence number failed. `message` and `offset` are the
    /// extended ack: the kernel's text and the byte offset, inside the request, of the
    /// attribute it rejected.
    Error {
        seq: u32,
        errno: i32,
        message: Option<String>,
        offset: Option<u32>,
    },
    /// The end of a dump; `errno` is non-zero when the dump stopped on an error.
    /// `interrupted`: the kernel set `NLM_F_DUMP_INTR` on it (what was dumped changed
    /// meanwhile; the kernel may set it on any message of a dump, this one included).
    Done { seq: u32, errno: i32, interrupted: bool },
}

/// Receive buffer. A dump datagram is at most 32 KiB (the kernel's cap for dump skbs); a
/// datagram larger than this is reported, not cut silently (`MSG_TRUNC`).
const RECV_BUF: usize = 64 * 1024;
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;

/// A netlink socket of family `F`, bound to the network namespace of the thread that
/// opened it for its whole life (see [`crate::netns`]).
///
/// Blocking, one request at a time: a CNI call makes a dozen requests and exits, and the
/// daemon's syncs are sequential, so an async runtime would only add start-up time.
/// Keep a socket for as long as there is work: closing a `NETLINK_NETFILTER` socket waits
/// for an RCU grace period (~10 ms).
pub struct Socket<F: Family> {
    raw: RawSocket,
    seq: u32,
    buf: Vec<u8>,
    /// SO_SNDBUF as the kernel last reported it; read on the first large send.
    sndbuf: Option<usize>,
    // fn() -> F: the socket owns no F, and is Send whatever F is.
    family: PhantomData<fn() -> F>,
}

impl<F: Family> fmt::Debug for Socket<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Socket")
            .field("family", &F::NAME)
            .field("fd", &self.raw.as_raw_fd())
            .finish()
    }
}

/// The descriptor, for a caller that must manage the socket's lifetime itself (e.g. leave
/// the last reference to a `NETLINK_NETFILTER` socket, whose release can wait for an RCU
/// grace period, to another process).
impl<F: Family> AsRawFd for Socket<F> {
    fn as_raw_fd(&self) -> RawFd {
        self.raw.as_raw_fd()
    }
}

impl<F: Family> Socket<F> {
    /// Opens a socket in the calling thread's network namespace, and asks the kernel for
    /// extended acks (its reason for refusing a request, in words).
    pub fn open() -> Result<Socket<F>> {
        let open_error = |source| Error::Open {
            family: F::NAME,
            source,
        };
        let mut raw = RawSocket::new(F::PROTOCOL).map_err(open_error)?;
        raw.bind_auto().map_err(open_error)?;
        raw.connect(&SocketAddr::new(0, 0)).map_err(open_error)?;
        // Optional: a kernel without them answers the same, with less detail.
        let _ = raw.set_ext_ack(true);
        // Errors then echo only the request's header, not the whole request.
        let _ = raw.set_cap_ack(true);
        Ok(Socket {
            raw,
            seq: 0,
            buf: vec![0; RECV_BUF],
            sndbuf: None,
            family: PhantomData,
        })
    }

    /// Sends one request and waits for its ACK; `flags` adds e.g. `NLM_F_CREATE | NLM_F_EXCL`.
    pub fn request(&mut self, msg: F::Message, flags: u16) -> Result<()> {
        self.exchange(msg, NLM_F_REQUEST | NLM_F_ACK | flags).map(|_| ())
    }

    /// Sends a dump request and collects every message of the answer, up to `NLMSG_DONE`
    /// (the kernel splits a dump over as many datagrams as it needs).
    pub fn dump(&mut self, msg: F::Message) -> Result<Vec<F::Message>> {
        self.exchange(msg, NLM_F_REQUEST | NLM_F_DUMP)
    }

    /// Sends a `GET` for one object (not a dump): its answer, or the kernel's error.
    pub fn get(&mut self, msg: F::Message) -> Result<F::Message> {
        let request = describe::<F>(&msg);
        self.exchange(msg, NLM_F_REQUEST)?
            .pop()
            .ok_or_else(|| Error::Unexpected {
                request,
                what: "the kernel answered a GET with nothing".into(),
            })
    }

    /// The next sequence number, for a caller that frames its own messages.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends bytes already framed as netlink messages (one or several, e.g. an nf_tables
    /// batch) in one `send`. Their sequence numbers come from [`Socket::next_seq`].
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.send_vectored(&[bytes]).map(|_| ())
    }

    /// Sends the concatenation of `parts` as one datagram, in one `sendmsg` (an nf_tables
    /// batch is one transaction only if it arrives in one datagram; its parts need not be
    /// copied into one buffer). Returns the bytes sent.
    pub fn send_vectored(&mut self, parts: &[&[u8]]) -> std::io::Result<usize> {
        let iov: Vec<libc::iovec> = parts
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: an all-zero msghdr is a valid value; the socket is connected to the kernel.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        loop {
            // SAFETY: msg points at iovecs over slices that live for the call.
            let n = unsafe { libc::sendmsg(self.raw.as_raw_fd(), &msg, 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Makes the send buffer large enough for a datagram of `len` bytes (the kernel refuses
    /// a datagram larger than SO_SNDBUF less some overhead; the default is ~200 KiB, a full
    /// sync of 10k Services is 11 MiB). SO_SNDBUFFORCE passes `wmem_max` with
    /// CAP_NET_ADMIN; without it, SO_SNDBUF up to `wmem_max`, and a larger send then fails
    /// with EMSGSIZE, which the caller sees.
    pub fn reserve_send_buffer(&mut self, len: usize) -> std::io::Result<()> {
        let need = len + 4096;
        let have = match self.sndbuf {
            Some(n) => n,
            None => *self
                .sndbuf
                .insert(sockopt_int(self.raw.as_raw_fd(), libc::SO_SNDBUF, None)? as usize),
        };
        if need <= have {
            return Ok(());
        }
        let want = i32::try_from(need).unwrap_or(i32::MAX / 2);
        let fd = self.raw.as_raw_fd();
        if sockopt_int(fd, libc::SO_SNDBUFFORCE, Some(want)).is_err() {
            sockopt_int(fd, libc::SO_SNDBUF, Some(want))?;
        }
        self.sndbuf = Some(sockopt_int(fd, libc::SO_SNDBUF, None)? as usize);
        Ok(())
    }

    /// Reads datagrams and hands every frame in them to `on_frame`, whatever its sequence
    /// number, until `on_frame` breaks with a value.
    pub fn receive<T>(&mut self, on_frame: impl FnMut(Frame<'_>) -> ControlFlow<T>) -> std::io::Result<T> {
        self.receive_until(None, on_frame)
            .map(|t| t.expect("no deadline, so no timeout"))
    }

    /// Like [`Socket::receive`], but gives up with `None` when no datagram comes within
    /// `timeout` of the last one (zero: read only what is queued). An error of the socket
    /// (e.g. ENOBUFS: the kernel dropped answers that did not fit the receive queue) ends
    /// the call; the socket stays usable and the next call reads on.
    pub fn receive_within<T>(
        &mut self,
        timeout: Duration,
        on_frame: impl FnMut(Frame<'_>) -> ControlFlow<T>,
    ) -> std::io::Result<Option<T>> {
        self.receive_until(Some(timeout), on_frame)
    }

    fn receive_until<T>(
        &mut self,
        timeout: Option<Duration>,
        mut on_frame: impl FnMut(Frame<'_>) -> ControlFlow<T>,
    ) -> std::io::Result<Option<T>> {
        loop {
            if let Some(timeout) = timeout {
                if !self.wait_readable(timeout)? {
                    return Ok(None);
                }
            }
            let n = match self.raw.recv(&mut &mut self.buf[..], libc::MSG_TRUNC) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n > self.buf.len() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "a netlink datagram of {n} bytes does not fit the {} byte receive buffer",
                        self.buf.len()
                    ),
                ));
            }
            let mut data = &self.buf[..n];
            while !data.is_empty() {
                let (frame, len) = parse_frame(data)?;
                data = &data[align4(len).min(data.len())..];
                if let ControlFlow::Break(t) = on_frame(frame) {
                    return Ok(Some(t));
                }
            }
        }
    }

    /// Whether a datagram is queued within `timeout`.
    fn wait_readable(&self, timeout: Duration) -> std::io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.raw.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: one valid pollfd.
            match unsafe { libc::poll(&mut pfd, 1, ms) } {
                n if n > 0 => return Ok(true),
                0 => return Ok(false),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Frames `msg` with `flags` and the next sequence number, for a caller that sends it
    /// itself: e.g. from a forked child, which may make only raw system calls.
    pub fn encode(&mut self, msg: F::Message, flags: u16) -> Vec<u8> {
        let seq = self.next_seq();
        frame(msg, flags, seq).1
    }

    /// The one typed exchange: send `msg` with `flags`, collect the answer of its
    /// sequence number until its ACK, error or DONE.
    fn exchange(&mut self, msg: F::Message, flags: u16) -> Result<Vec<F::Message>> {
        let seq = self.next_seq();
        let (packet, bytes) = frame(msg, flags, seq);
        // Described only when something fails: most requests succeed.
        let request = || match &packet.payload {
            NetlinkPayload::InnerMessage(m) => describe::<F>(m),
            _ => F::NAME.to_string(),
        };
        if let Err(source) = self.send_raw(&bytes) {
            return Err(Error::Socket {
                request: request(),
                source,
            });
        }

        let is_dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let wants_ack = flags & NLM_F_ACK != 0;
        let mut answers = Vec::new();
        // A message we cannot decode does not stop the loop: the rest of the answer is
        // read, so the next request does not find it in the queue.
        let mut undecodable = None;
        let outcome = self.receive(|frame| match frame {
            Frame::Message { header, payload } if header.sequence_number == seq => {
                match F::Message::deserialize(&header, payload) {
                    Ok(m) => answers.push(m),
                    Err(e) => {
                        undecodable.get_or_insert_with(|| e.to_string());
                    }
                }
                if is_dump || wants_ack {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(None)
                }
            }
            Frame::Ack { seq: s } if s == seq => ControlFlow::Break(None),
            Frame::Done { seq: s, errno, .. } if s == seq => {
                ControlFlow::Break((errno != 0).then_some((errno, None)))
            }
            Frame::Error {
                seq: s,
                errno,
                message,
                ..
            } if s == seq => ControlFlow::Break(Some((errno, message))),
            // A late answer to an earlier request, or a message of another sequence.
            _ => ControlFlow::Continue(()),
        });
        match outcome {
            Err(source) => Err(Error::Socket {
                request: request(),
                source,
            }),
            Ok(Some((errno, message))) => Err(Error::Kernel {
                request: request(),
                errno,
                message,
            }),
            Ok(None) => match undecodable {
                Some(reason) => Err(Error::Decode {
                    request: request(),
                    reason,
                }),
                None => Ok(answers),
            },
        }
    }
}

/// `msg` as a netlink message with `flags` and `seq`, and its bytes.
fn frame<M: NetlinkSerializable + fmt::Debug>(msg: M, flags: u16, seq: u32) -> (NetlinkMessage<M>, Vec<u8>) {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    packet.finalize();
    let mut bytes = vec![0; packet.buffer_len()];
    packet.serialize(&mut bytes);
    (packet, bytes)
}

/// Reads (`set` None) or sets a SOL_SOCKET option of type int.
fn sockopt_int(fd: RawFd, opt: libc::c_int, set: Option<i32>) -> std::io::Result<i32> {
    let mut v: i32 = set.unwrap_or(0);
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    let p = &mut v as *mut i32 as *mut libc::c_void;
    // SAFETY: passes a pointer to a live c_int and its size.
    let r = unsafe {
        match set {
            Some(_) => libc::setsockopt(fd, libc::SOL_SOCKET, opt, p, len),
            None => libc::getsockopt(fd, libc::SOL_SOCKET, opt, p, &mut len),
        }
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

fn describe<F: Family>(msg: &F::Message) -> String {
    format!("{} {}", F::NAME, F::describe(msg))
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The first frame of `data` and its length (before alignment).
fn parse_frame(data: &[u8]) -> std::io::Result<(Frame<'_>, usize)> {
    let truncated = || std::io::Error::new(std::io::ErrorKind::InvalidData, "truncated netlink message");
    if data.len() < NLMSG_HDRLEN {
        return Err(truncated());
    }
    let len = u32_at(data, 0) as usize;
    if len < NLMSG_HDRLEN || len > data.len() {
        return Err(truncated());
    }
    let mut header = NetlinkHeader::default();
    header.length = len as u32;
    header.message_type = u16_at(data, 4);
    header.flags = u16_at(data, 6);
    header.sequence_number = u32_at(data, 8);
    header.port_number = u32_at(data, 12);
    let seq = header.sequence_number;
    let payload = &data[NLMSG_HDRLEN..len];
    let frame = match header.message_type {
        NLMSG_ERROR | NLMSG_DONE => {
            // Both start with an int errno (negative); DONE's is 0 unless a dump failed.
            let errno = payload.get(..4).map_or(0, |b| -(u32_at(b, 0) as i32));
            if header.message_type == NLMSG_DONE {
                Frame::Done {
                    seq,
                    errno,
                    interrupted: header.flags & NLM_F_DUMP_INTR != 0,
                }
            } else if errno == 0 {
                Frame::Ack { seq }
            } else {
                let (message, offset) = extended_ack(header.flags, payload);
                Frame::Error {
                    seq,
                    errno,
                    message,
                    offset,
                }
            }
        }
        _ => Frame::Message { header, payload },
    };
    Ok((frame, len))
}

/// The extended ack of an error payload (`struct nlmsgerr` then attributes): its text and
/// the offset of the attribute the kernel rejected, when it sent them.
fn extended_ack(flags: u16, payload: &[u8]) -> (Option<String>, Option<u32>) {
    if flags & NLM_F_ACK_TLVS == 0 || payload.len() < 4 + NLMSG_HDRLEN {
        return (None, None);
    }
    // The echoed request: its header only when capped, else the whole of it.
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        u32_at(payload, 4) as usize
    };
    let mut tlvs = payload.get(4 + align4(echoed)..).unwrap_or(&[]);
    let (mut message, mut offset) = (None, None);
    while tlvs.len() >= 4 {
        let len = u16_at(tlvs, 0) as usize;
        let ty = u16_at(tlvs, 2) & 0x3fff;
        if len < 4 || len > tlvs.len() {
            break;
        }
        let value = &tlvs[4..len];
        match ty {
            NLMSGERR_ATTR_MSG => {
                let text = value.split(|&b| b == 0).next().unwrap_or(&[]);
                message = Some(String::from_utf8_lossy(text).into_owned());
            }
            NLMSGERR_ATTR_OFFS if value.len() == 4 => offset = Some(u32_at(value, 0)),
            _ => {}
        }
        tlvs = &tlvs[align4(len).min(tlvs.len())..];
    }
    (message.filter(|m| !m.is_empty()), offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + payload.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn tlv(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        t.extend_from_slice(&ty.to_ne_bytes());
        t.extend_from_slice(value);
        t.resize(align4(t.len()), 0);
        t
    }

    #[test]
    fn an_error_with_extended_ack_gives_errno_text_and_offset() {
        // struct nlmsgerr: error, then the echoed request header (capped), then TLVs.
        let mut payload = (-libc::EINVAL).to_ne_bytes().to_vec();
        payload.extend_from_slice(&nlmsg(16, 0x405, 7, &[])); // the echoed RTM_NEWLINK header
        payload.extend(tlv(NLMSGERR_ATTR_MSG, b"Invalid VLAN id\0"));
        payload.extend(tlv(NLMSGERR_ATTR_OFFS, &36u32.to_ne_bytes()));
        let data = nlmsg(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 7, &payload);
        let (frame, len) = parse_frame(&data).unwrap();
        assert_eq!(len, data.len());
        match frame {
            Frame::Error {
                seq,
                errno,
                message,
                offset,
            } => {
                assert_eq!((seq, errno), (7, libc::EINVAL));
                assert_eq!(message.as_deref(), Some("Invalid VLAN id"));
                assert_eq!(offset, Some(36));
            }
            other => panic!("expected an error frame, got {other:?}"),
        }
    }

    #[test]
    fn a_capped_error_with_only_an_offset_gives_errno_and_offset() {
        // What nf_tables sends for a rejected batch message (moved from ferry-nft): error
        // -2 about seq 7, the echoed header only (its length field says 100), an offset.
        let mut payload = (-2i32).to_ne_bytes().to_vec();
        payload.extend_from_slice(&100u32.to_ne_bytes());
        payload.extend_from_slice(&[0; 4]);
        payload.extend_from_slice(&7u32.to_ne_bytes());
        payload.extend_from_slice(&[0; 4]);
        payload.extend(tlv(NLMSGERR_ATTR_OFFS, &48u32.to_ne_bytes()));
        let data = nlmsg(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 7, &payload);
        match parse_frame(&data).unwrap().0 {
            Frame::Error {
                seq,
                errno,
                message,
                offset,
            } => assert_eq!((errno, seq, message, offset), (2, 7, None, Some(48))),
            other => panic!("expected an error frame, got {other:?}"),
        }
    }

    #[test]
    fn ack_done_and_messages_are_told_apart() {
        let ack = nlmsg(NLMSG_ERROR, NLM_F_CAPPED, 3, &[0; 4 + NLMSG_HDRLEN]);
        assert!(matches!(parse_frame(&ack).unwrap().0, Frame::Ack { seq: 3 }));
        let done = nlmsg(NLMSG_DONE, 2, 4, &0i32.to_ne_bytes());
        assert!(matches!(
            parse_frame(&done).unwrap().0,
            Frame::Done {
                seq: 4,
                errno: 0,
                interrupted: false
            }
        ));
        let failed = nlmsg(NLMSG_DONE, 2, 4, &(-libc::EINTR).to_ne_bytes());
        assert!(matches!(
            parse_frame(&failed).unwrap().0,
            Frame::Done {
                errno: libc::EINTR,
                ..
            }
        ));
        let link = nlmsg(16, 2, 5, &[1, 2, 3, 4]);
        match parse_frame(&link).unwrap().0 {
            Frame::Message { header, payload } => {
                assert_eq!((header.message_type, header.sequence_number), (16, 5));
                assert_eq!(payload, &[1, 2, 3, 4]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_message_longer_than_the_datagram_is_an_error_not_a_panic() {
        let mut m = nlmsg(16, 0, 1, &[0; 8]);
        m[0] = 200; // claims 200 bytes
        assert!(parse_frame(&m).is_err());
        assert!(parse_frame(&m[..10]).is_err());
    }
}
