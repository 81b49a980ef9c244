//! Real packets between namespaces: a TCP/UDP "who am I" server and its client.
//!
//! The server answers every connection (or datagram) with the address it saw the peer
//! come from, then its own (`"<peer> <local>"`), so a test asserts masquerading, DNAT,
//! balancing and reachability on what actually crossed the wire. Sockets are made on a thread that has entered the namespace (a
//! socket stays in the namespace it was created in); the test thread never moves.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::Netns;

/// How long a client waits for a connection or an answer.
pub const TIMEOUT: Duration = Duration::from_secs(3);

impl Netns {
    /// Runs `f` on a thread of its own inside this namespace (ferry-netlink's helper, the
    /// one the plugins use); a failure to enter it, or a panic in `f`, fails the test.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        ferry_netlink::Netns::open(self.path())
            .and_then(|netns| netns.run(f))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A TCP server on `addr` (inside this namespace) that writes the peer's address and
    /// its own as text, then closes. Stops when the handle is dropped.
    pub fn tcp_server(&self, addr: SocketAddr) -> Server {
        self.tcp_accept_loop(addr, move |mut conn, peer| {
            let _ = conn.write_all(format!("{peer} {addr}\n").as_bytes());
        })
    }

    /// Listens on `addr` inside this namespace and hands each connection to `serve`, until
    /// the returned handle is dropped.
    fn tcp_accept_loop(
        &self,
        addr: SocketAddr,
        serve: impl Fn(TcpStream, SocketAddr) + Send + 'static,
    ) -> Server {
        let listener = self
            .run(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        // Non-blocking, so the loop sees the stop flag between connections.
        listener.set_nonblocking(true).unwrap();
        Server::start(move |stop| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        conn.set_nonblocking(false).unwrap();
                        serve(conn, peer);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })
    }

    /// A UDP server on `addr` answering each datagram with the sender's address.
    pub fn udp_server(&self, addr: SocketAddr) -> Server {
        let socket = self
            .run(|| UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        Server::start(move |stop| {
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(format!("{peer} {addr}\n").as_bytes(), peer);
                }
            }
        })
    }

    /// A TCP server that echoes every line back on long-lived connections, each served on a
    /// thread of its own.
    pub fn tcp_echo_server(&self, addr: SocketAddr) -> Server {
        self.tcp_accept_loop(addr, |conn, _| {
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut writer = conn;
                let mut line = String::new();
                while std::io::BufRead::read_line(&mut reader, &mut line).is_ok_and(|n| n > 0) {
                    if writer.write_all(line.as_bytes()).is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        })
    }

    /// A TCP connection opened from inside this namespace, usable from any thread.
    pub fn tcp_connect(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        self.run(|| {
            let conn = TcpStream::connect_timeout(&to, TIMEOUT)?;
            conn.set_read_timeout(Some(TIMEOUT))?;
            Ok(conn)
        })
    }

    /// A UDP socket bound inside this namespace, kept across datagrams: one conntrack flow.
    pub fn udp_socket(&self, v4: bool) -> std::io::Result<UdpSocket> {
        self.run(|| {
            let s = UdpSocket::bind(if v4 { "0.0.0.0:0" } else { "[::]:0" })?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            Ok(s)
        })
    }

    /// Connects from this namespace to `to` and returns what the server sent (trimmed).
    pub fn tcp_request(&self, to: SocketAddr) -> std::io::Result<String> {
        self.run(|| {
            let mut conn = TcpStream::connect_timeout(&to, TIMEOUT)?;
            conn.set_read_timeout(Some(TIMEOUT))?;
            let mut out = String::new();
            conn.read_to_string(&mut out)?;
            Ok(out.trim().to_string())
        })
    }

    /// Sends one datagram from a fresh socket (so conntrack sees a new flow) and returns
    /// the answer.
    pub fn udp_request(&self, to: SocketAddr) -> std::io::Result<String> {
        self.run(|| {
            let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
            let s = UdpSocket::bind(bind)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            s.send_to(b"who am i", to)?;
            let mut buf = [0u8; 1500];
            let (n, _) = s.recv_from(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
        })
    }
}

/// A running server; stopped and joined on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(serve: impl FnOnce(&AtomicBool) + Send + 'static) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || serve(&flag));
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::Node;

    #[test]
    fn tcp_and_udp_answers_name_the_peer_inside_one_namespace() {
        crate::require_root!();
        let node = Node::new("traffic");
        let _tcp = node.netns().tcp_server("127.0.0.1:7000".parse().unwrap());
        let _udp = node.netns().udp_server("127.0.0.1:7001".parse().unwrap());
        assert!(node
            .netns()
            .tcp_request("127.0.0.1:7000".parse().unwrap())
            .unwrap()
            .starts_with("127.0.0.1:"));
        assert!(node
            .netns()
            .udp_request("127.0.0.1:7001".parse().unwrap())
            .unwrap()
            .starts_with("127.0.0.1:"));
        // Another namespace has its own loopback: nothing listens there.
        let other = node.pod("other");
        assert!(other.tcp_request("127.0.0.1:7000".parse().unwrap()).is_err());
    }
}
