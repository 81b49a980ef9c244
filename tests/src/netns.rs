//! Named network namespaces (`/run/netns/<name>`), unique per process, deleted on drop.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};

use nix::sched::CloneFlags;

/// Where `ip netns add` bind-mounts namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Every name this crate makes starts with this, followed by the creating process's pid.
const PREFIX: &str = "fy";
/// Longest name we make: short enough to embed in other identifiers later.
const MAX_NAME: usize = 31;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace made with `ip netns add`, deleted with `ip netns del` on drop
/// (also while a test unwinds from a panic).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `fy<pid>-<n>-<tag>` with its `lo` up. Panics if `ip` fails (tests call
    /// `require_root!()` first, so a failure here is a real problem worth a loud stop).
    pub fn new(tag: &str) -> Netns {
        sweep_stale_once();
        let name = unique_name(tag);
        run_ip(&["netns", "add", &name]);
        // From here on Drop deletes it, even if bringing lo up fails below.
        let ns = Netns { name };
        run_ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: what a runtime passes as `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `argv` inside the namespace with `ip netns exec` (test plumbing: it also gives
    /// the command a /sys of this namespace, at the cost of a few milliseconds).
    pub fn exec(&self, argv: &[&str]) -> Output {
        assert!(!argv.is_empty(), "Netns::exec needs a program");
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .unwrap_or_else(|e| panic!("cannot run `ip netns exec {} ...`: {e}", self.name))
    }

    /// Like [`Netns::exec`], but panics with the command, its status and stderr unless it
    /// exits 0. Returns stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        if !out.status.success() {
            panic!(
                "`{}` in netns {} failed ({}):\nstderr: {}\nstdout: {}",
                argv.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A `Command` whose child enters this namespace (`setns`) between fork and exec.
    ///
    /// This is how plugins run: the same as a runtime that enters the node's netns, and
    /// without the mount-namespace work of `ip netns exec`, so timings measure the plugin.
    /// The child keeps the caller's mount namespace, so its /sys shows the caller's
    /// network devices; netlink and /proc/sys/net follow the new netns.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        // Opened here, not in the child: between fork and exec only async-signal-safe
        // calls are allowed, and setns on an open fd is one syscall. The File is moved into
        // the closure, so it stays open as long as the Command; O_CLOEXEC (std's default)
        // keeps it out of the plugin.
        let path = self.path();
        let fd = File::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        let mut cmd = Command::new(program);
        // SAFETY: the closure only calls setns(2) on an fd opened before fork; it neither
        // allocates nor takes locks.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Never panic here: Drop also runs while a failed test unwinds, and a second panic
        // would abort the whole test process. Processes still inside keep the namespace
        // alive; the kernel frees it and its links when the last one exits.
        match Command::new("ip").args(["netns", "del", &self.name]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: `ip netns del {}` failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: cannot run `ip netns del {}`: {e}", self.name),
        }
    }
}

/// Names of all named network namespaces (`ip netns list`), ours and others'.
pub fn list_netns() -> Vec<String> {
    let out = run_ip(&["netns", "list"]);
    // Lines look like "name (id: 3)" or just "name".
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// `fy<pid>-<n>-<tag>`: the pid keeps processes apart, the counter keeps threads apart;
/// the tag (lowercased, non-alphanumerics turned into '-') only helps a human reading
/// `ip netns list`, so it is cut to keep the name within 31 characters.
pub(crate) fn unique_name(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let base = format!("{PREFIX}{}-{n}", std::process::id());
    let tag: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(MAX_NAME.saturating_sub(base.len() + 1))
        .collect();
    let tag = tag.trim_matches('-');
    if tag.is_empty() {
        base
    } else {
        format!("{base}-{tag}")
    }
}

/// The pid in a name made by [`unique_name`], or `None` for names that are not ours.
pub(crate) fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

fn pid_alive(pid: i32) -> bool {
    // Signal 0 checks existence only; EPERM means it exists but is not ours to signal.
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e != nix::errno::Errno::ESRCH,
    }
}

/// Once per process, deletes namespaces left by test processes that died without running
/// their destructors (kill -9, abort). Those of live processes are left alone, so tests
/// in parallel processes never delete each other's namespaces.
fn sweep_stale_once() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
            return; // no namespaces yet
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            match owner_pid(&name) {
                Some(pid) if pid > 0 && !pid_alive(pid) => {
                    // Another process may sweep the same one at once: failures are fine.
                    let _ = Command::new("ip").args(["netns", "del", &name]).output();
                    eprintln!("ferry-tests: deleted stale netns {name} (pid {pid} is gone)");
                }
                _ => {}
            }
        }
    });
}

/// Runs `ip` with `args`, panicking with its stderr on failure.
pub(crate) fn run_ip(args: &[&str]) -> Output {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2: `make setup`): {e}"));
    if !out.status.success() {
        panic!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    out
}

/// A fresh, aligned IPv4 subnet of `prefix_len` (12..=30) inside 10.96.0.0/12, distinct from
/// every other one this process handed out (until the /12 wraps around).
///
/// Each node lives in its own namespaces, so subnets only need to differ within a test;
/// starting at a pid-derived offset also keeps parallel processes apart most of the time,
/// which makes their output easier to tell apart.
pub fn unique_v4_subnet(prefix_len: u8) -> String {
    assert!(
        (12..=30).contains(&prefix_len),
        "unique_v4_subnet: prefix length {prefix_len} is outside 12..=30"
    );
    const BASE: u32 = 10 << 24 | 96 << 16; // 10.96.0.0
    const SPACE: u32 = 1 << 20; // a /12
                                // Offset of the next free address inside the /12, in addresses.
    static CURSOR: Mutex<Option<u32>> = Mutex::new(None);
    let size = 1u32 << (32 - prefix_len);
    let mut cursor = CURSOR.lock().unwrap_or_else(|e| e.into_inner());
    let next = cursor.get_or_insert_with(|| (std::process::id() % 4096) << 8);
    let start = next.div_ceil(size) * size % SPACE;
    *next = (start + size) % SPACE;
    let addr = std::net::Ipv4Addr::from(BASE + start);
    format!("{addr}/{prefix_len}")
}

/// A fresh IPv6 /64, `fd00:<pid>:<n>::/64` (ULA space, pid and counter as 16-bit groups).
pub fn unique_v6_subnet() -> String {
    static V6: AtomicU32 = AtomicU32::new(0);
    let n = V6.fetch_add(1, Ordering::Relaxed) as u16;
    let pid = std::process::id() as u16;
    let net = std::net::Ipv6Addr::new(0xfd00, pid, n, 0, 0, 0, 0, 0);
    format!("{net}/64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_are_unique_short_and_well_formed() {
        let names: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|t| {
                    s.spawn(move || {
                        (0..200)
                            .map(|i| unique_name(&format!("Some Long_Tag.{t}.{i}-xxxxxxxxxxxxxxxx")))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let set: HashSet<_> = names.iter().collect();
        assert_eq!(set.len(), names.len(), "duplicate netns names");
        for name in &names {
            assert!(name.len() <= MAX_NAME, "{name} is longer than {MAX_NAME}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{name} has characters other than [a-z0-9-]"
            );
            assert!(!name.ends_with('-'), "{name}");
            assert_eq!(owner_pid(name), Some(std::process::id() as i32));
        }
    }

    #[test]
    fn empty_or_symbol_tag_gives_a_bare_name() {
        let name = unique_name("");
        assert!(name.starts_with(&format!("fy{}-", std::process::id())));
        assert_eq!(name.matches('-').count(), 1, "{name}");
        assert_eq!(unique_name("__").matches('-').count(), 1);
        assert!(unique_name("Pod A").ends_with("-pod-a"));
    }

    #[test]
    fn owner_pid_only_parses_our_names() {
        assert_eq!(owner_pid("fy123-4-pod"), Some(123));
        assert_eq!(owner_pid("fy123-4"), Some(123));
        assert_eq!(owner_pid("fy123"), None);
        assert_eq!(owner_pid("fyx12-4"), None);
        assert_eq!(owner_pid("fy-4"), None);
        assert_eq!(owner_pid("cni-1234-5678"), None);
        assert_eq!(owner_pid("myns"), None);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(pid_alive(std::process::id() as i32));
    }

    #[test]
    fn v4_subnets_are_distinct_and_aligned() {
        let mut seen = HashSet::new();
        for len in [24, 24, 28, 16, 24, 30, 24] {
            let cidr = unique_v4_subnet(len);
            let (addr, plen) = cidr.split_once('/').unwrap();
            assert_eq!(plen.parse::<u8>().unwrap(), len);
            let addr: std::net::Ipv4Addr = addr.parse().unwrap();
            let a = u32::from(addr);
            assert_eq!(
                a >> 20,
                (10 << 24 | 96 << 16) >> 20,
                "{cidr} outside 10.96.0.0/12"
            );
            assert_eq!(a % (1 << (32 - len)), 0, "{cidr} not aligned");
            assert!(seen.insert(cidr.clone()), "{cidr} handed out twice");
        }
    }

    #[test]
    fn v6_subnets_are_distinct() {
        let a = unique_v6_subnet();
        let b = unique_v6_subnet();
        assert_ne!(a, b);
        for s in [&a, &b] {
            let (addr, len) = s.split_once('/').unwrap();
            assert_eq!(len, "64");
            let addr: std::net::Ipv6Addr = addr.parse().unwrap();
            assert_eq!(addr.segments()[0], 0xfd00);
            assert_eq!(&addr.segments()[3..], &[0; 5]);
        }
    }
}
