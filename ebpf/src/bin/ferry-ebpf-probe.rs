//! A socket client that shows what an application sees of Ferry's socket-level Services:
//! the peer address `getpeername()` gives, the source of UDP replies, the errno of a
//! refused connect, and connect latency. The tests run it inside the cgroup under test.
//!
//! ```text
//! ferry-ebpf-probe [--cgroup DIR] [--netns PATH] tcp ADDR           connect, print peer and what the server said
//! ferry-ebpf-probe [--cgroup DIR] [--netns PATH] udp ADDR [COUNT]   COUNT datagrams on one unconnected socket
//! ferry-ebpf-probe [--cgroup DIR] [--netns PATH] connect-times ADDR COUNT
//! ferry-ebpf-probe [--cgroup DIR] [--netns PATH] udp-reconnect ADDR1 ADDR2  one UDP socket connected to each in turn, peer after each
//! ```
//!
//! `--cgroup` moves this process into the cgroup v2 directory, and `--netns` into the
//! network namespace, before any socket is made (a socket belongs to the cgroup and netns
//! of the process that creates it). Output is `key=value` lines; a failed socket call
//! prints `errno=N` and exits with status 2.

use std::io::Read;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::exit;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(dir) = take_flag(&mut args, "--cgroup") {
        let procs = std::path::Path::new(&dir).join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .unwrap_or_else(|e| usage(&format!("cannot join {}: {e}", procs.display())));
    }
    if let Some(path) = take_flag(&mut args, "--netns") {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| usage(&format!("cannot open {path}: {e}")));
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| usage(&format!("cannot enter {path}: {e}")));
    }
    let addr = |i: usize| -> SocketAddr {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| usage("give an address as IP:PORT or [IP6]:PORT"))
    };
    let count = |i: usize, default: usize| -> usize {
        match args.get(i) {
            None => default,
            Some(n) => n.parse().unwrap_or_else(|_| usage("COUNT is a number")),
        }
    };
    match args.first().map(String::as_str) {
        Some("tcp") => tcp(addr(1)),
        Some("udp") => udp(addr(1), count(2, 1)),
        Some("connect-times") => connect_times(addr(1), count(2, 1000)),
        Some("udp-reconnect") => udp_reconnect(addr(1), addr(2)),
        _ => usage("say tcp, udp, connect-times or udp-reconnect"),
    }
}

fn tcp(to: SocketAddr) {
    let mut conn = TcpStream::connect_timeout(&to, TIMEOUT).unwrap_or_else(|e| fail(e));
    let peer = conn.peer_addr().unwrap_or_else(|e| fail(e));
    println!("peer={peer}");
    conn.set_read_timeout(Some(TIMEOUT)).unwrap_or_else(|e| fail(e));
    let mut said = String::new();
    conn.read_to_string(&mut said).unwrap_or_else(|e| fail(e));
    println!("said={}", said.trim());
}

fn udp(to: SocketAddr, count: usize) {
    let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket = UdpSocket::bind(bind).unwrap_or_else(|e| fail(e));
    socket.set_read_timeout(Some(TIMEOUT)).unwrap_or_else(|e| fail(e));
    let mut buf = [0u8; 1500];
    for _ in 0..count {
        socket.send_to(b"who am i", to).unwrap_or_else(|e| fail(e));
        let (n, from) = socket.recv_from(&mut buf).unwrap_or_else(|e| fail(e));
        println!("from={from} said={}", String::from_utf8_lossy(&buf[..n]).trim());
    }
}

/// Times `count` connects (each a fresh socket, closed at once) and prints the median, 90th
/// percentile and maximum in microseconds.
fn connect_times(to: SocketAddr, count: usize) {
    let mut times: Vec<Duration> = (0..count.max(1))
        .map(|_| {
            let start = Instant::now();
            let conn = TcpStream::connect_timeout(&to, TIMEOUT).unwrap_or_else(|e| fail(e));
            let took = start.elapsed();
            drop(conn);
            took
        })
        .collect();
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    println!(
        "count={} median_us={:.1} p90_us={:.1}",
        times.len(),
        at(0.5),
        at(0.9)
    );
}

/// A UDP socket connected to `first`, then to `second`: `peer=` after each (no datagram
/// is sent; connecting a UDP socket only sets its peer).
fn udp_reconnect(first: SocketAddr, second: SocketAddr) {
    let any: SocketAddr = if first.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .unwrap();
    let sock = UdpSocket::bind(any).unwrap_or_else(|e| fail(e));
    for to in [first, second] {
        sock.connect(to).unwrap_or_else(|e| fail(e));
        println!("peer={}", sock.peer_addr().unwrap_or_else(|e| fail(e)));
    }
}

fn take_flag(args: &mut Vec<String>, flag: &str) -> Option<String> {
    let i = args.iter().position(|a| a == flag)?;
    if i + 1 >= args.len() {
        usage(&format!("{flag} needs a value"));
    }
    let value = args.remove(i + 1);
    args.remove(i);
    Some(value)
}

fn fail(e: std::io::Error) -> ! {
    println!("errno={} error={e}", e.raw_os_error().unwrap_or(0));
    exit(2)
}

fn usage(why: &str) -> ! {
    eprintln!(
        "ferry-ebpf-probe: {why}\nusage: ferry-ebpf-probe [--cgroup DIR] [--netns PATH] \
         (tcp ADDR | udp ADDR [COUNT] | connect-times ADDR COUNT)"
    );
    exit(1)
}
