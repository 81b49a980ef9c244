//! SCTP without an SCTP stack: INIT packets built by hand, sent and read on raw sockets.
//!
//! This kernel tracks and translates SCTP (CONFIG_NF_CT_PROTO_SCTP) but has no SCTP
//! sockets (CONFIG_IP_SCTP unset: `socket(.., IPPROTO_SCTP)` fails with
//! EPROTONOSUPPORT), so no Pod can run an SCTP server. What Services and NetworkPolicy
//! judge is the first packet of an association, so a probe sends one INIT chunk on a raw
//! socket (the kernel adds the IP header) and the destination Pod reads what arrives on
//! a raw socket of its own; a raw socket taking the packet also keeps the Pod's kernel
//! from answering "protocol unreachable". The INIT's initiate tag names the probe, so the
//! receiver knows it whatever NAT did to addresses and ports.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::FromRawFd;

use nix::libc;

pub const IPPROTO_SCTP: i32 = 132;

/// CRC32c (Castagnoli), bit by bit: the checksum of SCTP (RFC 9260 appendix A). A probe
/// packet is 32 bytes, so a table would buy nothing.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            let carry = crc & 1;
            crc >>= 1;
            if carry != 0 {
                crc ^= 0x82F6_3B78;
            }
        }
    }
    !crc
}

/// An SCTP packet of one INIT chunk (RFC 9260 3.3.2) from `src_port` to `dst_port`. The
/// common header's verification tag is 0, as an INIT's must be (conntrack drops anything
/// else); `tag`, the initiate tag, must not be 0.
pub fn init_packet(src_port: u16, dst_port: u16, tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&src_port.to_be_bytes());
    p.extend_from_slice(&dst_port.to_be_bytes());
    p.extend_from_slice(&[0; 4]); // verification tag
    p.extend_from_slice(&[0; 4]); // checksum, filled in last
    p.extend_from_slice(&[1, 0]); // INIT, no flags
    p.extend_from_slice(&20u16.to_be_bytes()); // chunk length
    p.extend_from_slice(&tag.to_be_bytes());
    p.extend_from_slice(&65_535u32.to_be_bytes()); // advertised receiver window
    p.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&tag.to_be_bytes()); // initial TSN
                                             // Stored least significant byte first, as Linux's sctp_compute_cksum does.
    let sum = crc32c(&p).to_le_bytes();
    p[8..12].copy_from_slice(&sum);
    p
}

/// The initiate tag of an INIT packet as a raw socket delivers it (IPv4
/// raw sockets include the IP header, IPv6 ones do not), if it is an INIT with a valid
/// checksum.
pub fn received_init_tag(packet: &[u8], v4: bool) -> Option<u32> {
    let sctp = if v4 {
        let header = usize::from(packet.first()? & 0x0f) * 4;
        packet.get(header..)?
    } else {
        packet
    };
    if sctp.len() < 20 || sctp[12] != 1 {
        return None;
    }
    let mut zeroed = sctp.to_vec();
    zeroed[8..12].fill(0);
    if crc32c(&zeroed).to_le_bytes() != sctp[8..12] {
        return None;
    }
    Some(u32::from_be_bytes(sctp[16..20].try_into().ok()?))
}

/// A raw SCTP socket of this thread's network namespace (call it on a thread inside the
/// namespace). Returned as a `UdpSocket`, which only wraps the fd: `send_to`/`recv_from`
/// are the same calls on a raw socket, with port 0.
pub fn raw_socket(v4: bool) -> std::io::Result<UdpSocket> {
    let domain = if v4 { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket(2) with constant arguments; the fd is owned at once.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, IPPROTO_SCTP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(UdpSocket::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
}

/// Sends one INIT to `to` on `socket` (a [`raw_socket`] of `to`'s family).
pub fn send_init(socket: &UdpSocket, to: SocketAddr, src_port: u16, tag: u32) -> std::io::Result<()> {
    let packet = init_packet(src_port, to.port(), tag);
    // The port goes in the SCTP header; a raw socket's address carries none.
    socket.send_to(&packet, SocketAddr::new(to.ip(), 0))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_values() {
        // The standard check value, and RFC 3720 B.4's 32 zero bytes.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0; 32]), 0x8A91_36AA);
    }

    #[test]
    fn an_init_reads_back_its_tag_and_a_corrupt_one_does_not() {
        let p = init_packet(40_000, 80, 0xdead_beef);
        assert_eq!(p.len(), 32);
        assert_eq!(received_init_tag(&p, false), Some(0xdead_beef));
        let mut with_ip_header = vec![0x45; 20];
        with_ip_header.extend_from_slice(&p);
        assert_eq!(received_init_tag(&with_ip_header, true), Some(0xdead_beef));
        let mut corrupt = p.clone();
        corrupt[20] ^= 1;
        assert_eq!(received_init_tag(&corrupt, false), None);
    }
}
