//! Ending the tc program's flows from outside as conntrack ends its connections.
//!
//! Every connection from outside through a NodePort, externalIP or load-balancer IP has two
//! entries in `ferry_nat4` (`ferry_nat6`): the client's direction and the endpoint's reply
//! direction, each with when a packet last matched it and whether a FIN or RST passed
//! (`src/bpf/tc.c`). Without an end the table fills with dead flows until LRU eviction
//! pushes out live ones, and a client reusing a port keeps the endpoint of an old flow. A
//! [`FlowSweeper`] pass deletes both entries of every flow idle for longer than its
//! timeout, judged on the two directions together (last packet either way, FIN or RST
//! either way, replied or not).
//!
//! Default timeouts ([`FlowTimeouts::default`]) and the conntrack settings they follow
//! (Linux defaults, `net.netfilter.*`):
//!
//! | flow | timeout | conntrack |
//! |---|---:|---|
//! | UDP, no reply yet | 30 s | `nf_conntrack_udp_timeout` = 30 |
//! | UDP, replied | 120 s | `nf_conntrack_udp_timeout_stream` = 120 |
//! | TCP, open | 6 h | `nf_conntrack_tcp_timeout_established` = 432000 (5 days) |
//! | TCP, FIN seen | 120 s | `..._fin_wait` = `..._time_wait` = 120, `..._close_wait` = 60, `..._last_ack` = 30 |
//! | TCP, RST seen | 10 s | `nf_conntrack_tcp_timeout_close` = 10 |
//!
//! An open TCP flow gets 6 h rather than conntrack's 5 days: this table has a fixed size
//! (LRU), a client that vanished without a FIN would hold its two entries for days, and a
//! connection that sends keepalives (Linux default every 2 h, `tcp_keepalive_time`) stays
//! well within 6 h. A closed flow does not wait for its timeout when its client port is
//! reused: the tc program ends it at the new SYN (conntrack does the same in TIME_WAIT).
//!
//! A pass reads every entry (two system calls each), decides, then re-reads each entry it
//! is about to delete and keeps it if a packet refreshed it meanwhile. Its cost grows with
//! the table, not with what expires: `cargo bench -p ferry-ebpf --bench flow_sweep`
//! (release, Linux 6.18, 2 shared CPUs, load average 5.6), a full `ferry_nat4` (262,144
//! entries, 131,072 connections), medians of 5 passes in one run:
//!
//! | | pass | per entry | vs read |
//! |---|---:|---:|---:|
//! | read every entry (baseline) | 206 ms | 787 ns | 1.00x |
//! | sweep, nothing expired | 333 ms | 1269 ns | 1.61x |
//! | sweep, everything expired | 592 ms | 2256 ns | 2.87x |
//!
//! At the daemon's default of a pass every 5 s that is under 7% of one CPU with the table
//! full, and in proportion less with fewer flows (10,000 connections: about 25 ms a pass).
//! Batched reads (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6; aya 0.14 has no call for it) would
//! take most of the system calls out.

use std::collections::HashMap;
use std::hash::Hash;
use std::path::Path;
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};

use crate::dataplane::open_pinned;
use crate::error::map_err;
use crate::maps::{Flow4, Flow6, Nat4Entry, Nat6Entry, FLOW_FIN, FLOW_RST, FLOW_SEEN};
use crate::{sys, Error};

/// How long a flow from outside may stay idle, by what it has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTimeouts {
    /// UDP flow without a reply yet.
    pub udp: Duration,
    /// UDP flow that had replies.
    pub udp_stream: Duration,
    /// Open TCP flow.
    pub tcp: Duration,
    /// TCP flow that saw a FIN (and no RST).
    pub tcp_fin: Duration,
    /// TCP flow that saw a RST.
    pub tcp_rst: Duration,
}

impl Default for FlowTimeouts {
    fn default() -> FlowTimeouts {
        FlowTimeouts {
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
            tcp: Duration::from_secs(6 * 3600),
            tcp_fin: Duration::from_secs(120),
            tcp_rst: Duration::from_secs(10),
        }
    }
}

/// The names [`FlowTimeouts::parse`] takes.
const NAMES: &str = "udp, udp-stream, tcp, tcp-fin, tcp-rst";

impl FlowTimeouts {
    /// The defaults with some timeouts replaced: `name=seconds` pairs separated by commas,
    /// names `udp`, `udp-stream`, `tcp`, `tcp-fin`, `tcp-rst` (e.g. `udp=5,tcp-fin=2`).
    pub fn parse(spec: &str) -> Result<FlowTimeouts, Error> {
        let invalid = |reason: String| Error::InvalidFlowTimeouts {
            spec: spec.to_owned(),
            reason,
        };
        let mut t = FlowTimeouts::default();
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| invalid(format!("`{pair}` is not name=seconds")))?;
            let seconds: u64 = value
                .trim()
                .parse()
                .ok()
                .filter(|s| *s > 0)
                .ok_or_else(|| invalid(format!("`{value}` is not a whole number of seconds above 0")))?;
            let slot = match name.trim() {
                "udp" => &mut t.udp,
                "udp-stream" => &mut t.udp_stream,
                "tcp" => &mut t.tcp,
                "tcp-fin" => &mut t.tcp_fin,
                "tcp-rst" => &mut t.tcp_rst,
                other => {
                    return Err(invalid(format!(
                        "unknown timeout `{other}`; the names are {NAMES}"
                    )))
                }
            };
            *slot = Duration::from_secs(seconds);
        }
        Ok(t)
    }

    /// The timeout of a flow of protocol `proto` whose two directions saw `flags` together;
    /// `replied`: both directions carried packets.
    fn of(&self, proto: u8, flags: u32, replied: bool) -> Duration {
        if i32::from(proto) == libc::IPPROTO_TCP {
            if flags & FLOW_RST != 0 {
                self.tcp_rst
            } else if flags & FLOW_FIN != 0 {
                self.tcp_fin
            } else {
                self.tcp
            }
        } else if replied {
            self.udp_stream
        } else {
            self.udp
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Entries read (two per flow), IPv4 and IPv6 together.
    pub entries: usize,
    /// Entries deleted.
    pub removed: usize,
    pub took: Duration,
}

/// The flow tables pinned under a pin directory, opened for sweeping (from any thread: map
/// operations do not depend on the network namespace).
pub struct FlowSweeper {
    nat4: BpfHashMap<MapData, Flow4, Nat4Entry>,
    nat6: BpfHashMap<MapData, Flow6, Nat6Entry>,
}

impl FlowSweeper {
    /// Opens the flow tables an [`crate::EbpfDataplane`] pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<FlowSweeper, Error> {
        let maps = sys::maps_dir(pin_dir);
        Ok(FlowSweeper {
            nat4: open_pinned(&maps, "ferry_nat4")?,
            nat6: open_pinned(&maps, "ferry_nat6")?,
        })
    }

    /// One pass over both tables: deletes the flows idle past their timeout.
    pub fn sweep(&mut self, timeouts: &FlowTimeouts) -> Result<SweepReport, Error> {
        let start = Instant::now();
        let now = monotonic_ns();
        let (e4, r4) = sweep_table(&mut self.nat4, "ferry_nat4", now, timeouts)?;
        let (e6, r6) = sweep_table(&mut self.nat6, "ferry_nat6", now, timeouts)?;
        Ok(SweepReport {
            entries: e4 + e6,
            removed: r4 + r6,
            took: start.elapsed(),
        })
    }
}

/// A flow table entry, either family.
trait FlowEntry<K>: Copy {
    /// The key of the flow's other direction: what this entry rewrites to, reversed.
    fn partner(&self) -> K;
    fn proto(&self) -> u8;
    fn last_seen_ns(&self) -> u64;
    fn flags(&self) -> u32;
}

/// The same accessors for both families: the entries differ only in their address width.
macro_rules! flow_entry {
    ($entry:ty, $flow:ident) => {
        impl FlowEntry<$flow> for $entry {
            fn partner(&self) -> $flow {
                $flow {
                    saddr: self.to.daddr,
                    daddr: self.to.saddr,
                    sport: self.to.dport,
                    dport: self.to.sport,
                    proto: self.to.proto,
                    pad: [0; 3],
                }
            }
            fn proto(&self) -> u8 {
                self.to.proto
            }
            fn last_seen_ns(&self) -> u64 {
                self.last_seen_ns
            }
            fn flags(&self) -> u32 {
                self.flags
            }
        }
    };
}
flow_entry!(Nat4Entry, Flow4);
flow_entry!(Nat6Entry, Flow6);

/// Deletes the expired entries of one table; returns (entries read, entries deleted).
fn sweep_table<K, V>(
    map: &mut BpfHashMap<MapData, K, V>,
    name: &'static str,
    now: u64,
    timeouts: &FlowTimeouts,
) -> Result<(usize, usize), Error>
where
    K: aya::Pod + Eq + Hash,
    V: aya::Pod + FlowEntry<K>,
{
    // Read first, delete after: deleting while walking restarts the kernel's walk.
    let mut entries: HashMap<K, V> = HashMap::new();
    for entry in map.iter() {
        match entry {
            Ok((k, v)) => {
                entries.insert(k, v);
            }
            // Deleted between the walk's steps (by the program or LRU eviction).
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    let expired: Vec<(K, u64)> = entries
        .iter()
        .filter_map(|(k, v)| {
            let partner = entries.get(&v.partner());
            let last = v.last_seen_ns().max(partner.map_or(0, |p| p.last_seen_ns()));
            let flags = v.flags() | partner.map_or(0, |p| p.flags());
            let replied = v.flags() & FLOW_SEEN != 0 && partner.is_some_and(|p| p.flags() & FLOW_SEEN != 0);
            let timeout = timeouts.of(v.proto(), flags, replied).as_nanos() as u64;
            (now.saturating_sub(last) > timeout).then_some((*k, last))
        })
        .collect();
    let mut removed = 0;
    for (k, last) in expired {
        // A packet since the read refreshed it: the flow lives on.
        match map.get(&k, 0) {
            Ok(v) if v.last_seen_ns() > last => continue,
            Ok(_) => {}
            Err(e) if not_found(&e) => continue,
            Err(e) => return Err(map_err(name)(e)),
        }
        match map.remove(&k) {
            Ok(()) => removed += 1,
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    Ok((entries.len(), removed))
}

fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, which the flow
/// entries' last-seen times are read on.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_follow_what_the_flow_saw() {
        let t = FlowTimeouts::default();
        let (tcp, udp) = (libc::IPPROTO_TCP as u8, libc::IPPROTO_UDP as u8);
        assert_eq!(t.of(tcp, FLOW_SEEN, true), Duration::from_secs(21600));
        assert_eq!(t.of(tcp, FLOW_SEEN | FLOW_FIN, true), Duration::from_secs(120));
        assert_eq!(t.of(tcp, FLOW_FIN | FLOW_RST, true), Duration::from_secs(10));
        assert_eq!(t.of(udp, FLOW_SEEN, false), Duration::from_secs(30));
        assert_eq!(t.of(udp, FLOW_SEEN, true), Duration::from_secs(120));
    }

    #[test]
    fn timeouts_parse_and_bad_ones_say_what_to_fix() {
        let t = FlowTimeouts::parse("udp=2, tcp-fin=1").unwrap();
        assert_eq!(t.udp, Duration::from_secs(2));
        assert_eq!(t.tcp_fin, Duration::from_secs(1));
        assert_eq!(t.tcp, FlowTimeouts::default().tcp);
        assert_eq!(FlowTimeouts::parse("").unwrap(), FlowTimeouts::default());
        let unknown = FlowTimeouts::parse("tcp-established=5").unwrap_err().to_string();
        assert!(
            unknown.contains("udp, udp-stream, tcp, tcp-fin, tcp-rst"),
            "{unknown}"
        );
        let zero = FlowTimeouts::parse("udp=0").unwrap_err().to_string();
        assert!(zero.contains("above 0"), "{zero}");
        let bare = FlowTimeouts::parse("udp").unwrap_err().to_string();
        assert!(bare.contains("name=seconds"), "{bare}");
    }
}
