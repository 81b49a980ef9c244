//! The test bench of the socket data plane: a cgroup v2 directory and a bpf file system of
//! the test's own, a node netns with two servers behind it, and the probe client run inside
//! (or outside) that cgroup.
//!
//! Safety rule: cgroup programs act on every socket of every process in their cgroup,
//! whatever its netns, so they are attached only to a cgroup made here, holding only the
//! probe processes the test starts. Drop order (the fields' order) detaches the programs,
//! removes the pins and the cgroup, then the namespaces, also when a test panics.

#![allow(dead_code)] // each test file uses its part

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use ferry_ebpf::{EbpfDataplane, Frontend, Protocol, ServiceBackends};
use ferry_tests::{unique_v4_subnet, unique_v6_subnet, Netns, Node, Server};

/// Where this hybrid machine mounts the cgroup v2 hierarchy.
const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";
const ECONNREFUSED: i32 = 111;
const ENETUNREACH: i32 = 101;
pub const SERVER_PORT: u16 = 8080;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A cgroup v2 directory of this test, removed on drop after killing what is left in it
/// (only probes this test started can be there).
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new(tag: &str) -> TestCgroup {
        #[allow(clippy::unnecessary_cast)] // __fsword_t is narrower on some architectures
        let magic = nix::sys::statfs::statfs(CGROUP2_ROOT)
            .map(|s| s.filesystem_type().0 as i64)
            .unwrap_or(0);
        assert_eq!(
            magic, 0x6367_7270,
            "{CGROUP2_ROOT} is not a cgroup v2 mount: the socket tests need one (mount -t cgroup2 none {CGROUP2_ROOT})"
        );
        sweep_stale_once();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(CGROUP2_ROOT).join(format!("{CGROUP_PREFIX}{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TestCgroup { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            }
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        eprintln!(
            "warning: could not remove the test cgroup {}",
            self.path.display()
        );
    }
}

const CGROUP_PREFIX: &str = "ferry-test-";
const BPFFS_PREFIX: &str = "ferry-bpffs-";

/// The pid in `<prefix><pid>-...`, if that process is gone.
fn dead_owner(name: &str, prefix: &str) -> bool {
    let Some(pid) = name
        .strip_prefix(prefix)
        .and_then(|r| r.split('-').next())
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return false;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH)
}

/// Once per process, removes the cgroups and bpffs mounts of test processes killed before
/// their guards ran (those of live processes are left alone).
fn sweep_stale_once() {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| {
        for entry in std::fs::read_dir(CGROUP2_ROOT).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead_owner(&name, CGROUP_PREFIX) {
                drop(TestCgroup { path: entry.path() });
                eprintln!("ferry-ebpf tests: removed stale cgroup {name}");
            }
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for mount_point in mountinfo.lines().filter_map(|l| l.split_whitespace().nth(4)) {
            let name = Path::new(mount_point)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy();
            if dead_owner(&name, BPFFS_PREFIX) {
                let _ = nix::mount::umount2(mount_point, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_dir(mount_point);
                eprintln!("ferry-ebpf tests: unmounted stale bpffs {mount_point}");
            }
        }
    });
}

/// A private bpf file system mounted on a temporary directory, unmounted on drop: the
/// test's pins never meet the machine's /sys/fs/bpf.
pub struct TestBpffs {
    dir: tempfile::TempDir,
}

impl TestBpffs {
    pub fn new() -> TestBpffs {
        sweep_stale_once();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{BPFFS_PREFIX}{}-", std::process::id()))
            .tempdir()
            .unwrap();
        nix::mount::mount(
            Some("bpf"),
            dir.path(),
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount bpffs on {}: {e}", dir.path().display()));
        TestBpffs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestBpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A node netns with two servers (TCP and UDP "who am I" on each), the cgroup and the bpf
/// file system, and the pin directory the data plane uses.
pub struct Bench {
    // Field order is drop order: pins and links go first, then the cgroup, then the bpffs,
    // then the servers and namespaces.
    pub pins: PinsGuard,
    pub cgroup: TestCgroup,
    pub bpffs: TestBpffs,
    _servers: Vec<Server>,
    pub servers: Vec<Netns>,
    pub node: Node,
    /// The servers' addresses, port SERVER_PORT.
    pub endpoints: Vec<SocketAddr>,
    /// The node's interfaces towards the servers.
    pub server_links: Vec<String>,
    /// The same servers' IPv6 addresses.
    pub endpoints6: Vec<SocketAddr>,
    /// A Service address nothing has: only translation makes it reachable.
    pub vip: IpAddr,
    /// An IPv6 one.
    pub vip6: IpAddr,
}

fn v6_host(net: std::net::Ipv6Addr, host: u128) -> std::net::Ipv6Addr {
    (u128::from(net) + host).into()
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `EbpfDataplane::cleanup` on drop, so a panicking test leaves no attached program.
pub struct PinsGuard {
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
}

impl Drop for PinsGuard {
    fn drop(&mut self) {
        if let Err(e) = EbpfDataplane::cleanup(&self.pin_dir, &self.cgroup) {
            eprintln!("warning: cleanup after the test failed: {e}");
        }
    }
}

impl Bench {
    pub fn new(tag: &str) -> Bench {
        let node = Node::new(tag);
        let mut servers = Vec::new();
        let mut running = Vec::new();
        let mut endpoints = Vec::new();
        let mut endpoints6 = Vec::new();
        let mut server_links = Vec::new();
        for i in 0..2 {
            let server = node.client(&format!("srv{i}"));
            let subnet = unique_v4_subnet(30);
            let base: std::net::Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
            let node_ip = std::net::Ipv4Addr::from(u32::from(base) + 1);
            let server_ip = std::net::Ipv4Addr::from(u32::from(base) + 2);
            let node_if = node.connect_client(&server, &format!("{server_ip}/30"), &format!("{node_ip}/30"));
            server_links.push(node_if.clone());
            let addr = SocketAddr::new(server_ip.into(), SERVER_PORT);
            running.push(server.tcp_server(addr));
            running.push(server.udp_server(addr));
            endpoints.push(addr);
            // The same link in IPv6 (on-link both ways, so no route is needed).
            let net6: std::net::Ipv6Addr = unique_v6_subnet().split('/').next().unwrap().parse().unwrap();
            let (node6, server6) = (v6_host(net6, 1), v6_host(net6, 2));
            ip(&[
                "-n",
                node.name(),
                "addr",
                "add",
                &format!("{node6}/64"),
                "dev",
                &node_if,
                "nodad",
            ]);
            ip(&[
                "-n",
                server.name(),
                "addr",
                "add",
                &format!("{server6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            let addr6 = SocketAddr::new(server6.into(), SERVER_PORT);
            running.push(server.tcp_server(addr6));
            running.push(server.udp_server(addr6));
            endpoints6.push(addr6);
            servers.push(server);
        }
        let vip = unique_v4_subnet(30).split('/').next().unwrap().parse().unwrap();
        let net6: std::net::Ipv6Addr = unique_v6_subnet().split('/').next().unwrap().parse().unwrap();
        let vip6 = v6_host(net6, 1).into();
        let cgroup = TestCgroup::new(tag);
        let bpffs = TestBpffs::new();
        let pins = PinsGuard {
            pin_dir: bpffs.path().join("ferry").join(node.name()),
            cgroup: cgroup.path().to_owned(),
        };
        Bench {
            pins,
            cgroup,
            bpffs,
            _servers: running,
            servers,
            node,
            endpoints,
            endpoints6,
            server_links,
            vip,
            vip6,
        }
    }

    pub fn load(&self) -> EbpfDataplane {
        EbpfDataplane::load(&self.pins.pin_dir, self.cgroup.path()).unwrap_or_else(|e| panic!("load: {e}"))
    }

    pub fn frontend(&self, port: u16, protocol: Protocol) -> Frontend {
        Frontend::inside(self.vip, port, protocol)
    }

    pub fn backends(&self) -> ServiceBackends {
        ServiceBackends {
            endpoints: self.endpoints.clone(),
            affinity_seconds: None,
            keep_source: false,
            source_ranges: Vec::new(),
        }
    }

    /// Runs the probe in the node netns, inside the test cgroup or not.
    pub fn probe(&self, in_cgroup: bool, args: &[&str]) -> Probe {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-ebpf-probe"));
        if in_cgroup {
            cmd.arg("--cgroup").arg(self.cgroup.path());
        }
        cmd.arg("--netns").arg(self.node.netns().path()).args(args);
        let out = cmd.output().expect("run ferry-ebpf-probe");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.code() == Some(0) || out.status.code() == Some(2),
            "probe {args:?} failed to run ({}): {}{stdout}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Probe { stdout }
    }
}

/// What the probe printed.
pub struct Probe {
    pub stdout: String,
}

impl Probe {
    pub fn value(&self, key: &str) -> Option<String> {
        self.values(key).into_iter().next()
    }

    /// Every `key=value` of `key`, in order (values end at a space).
    pub fn values(&self, key: &str) -> Vec<String> {
        let prefix = format!("{key}=");
        self.stdout
            .split_whitespace()
            .filter_map(|w| w.strip_prefix(&prefix))
            .map(str::to_owned)
            .collect()
    }

    pub fn errno(&self) -> Option<i32> {
        self.value("errno").map(|e| e.parse().unwrap())
    }

    /// The server's own address as it reported it (`said=<peer> <local>`).
    pub fn servers_said(&self) -> Vec<SocketAddr> {
        self.stdout
            .lines()
            .filter_map(|l| l.split("said=").nth(1))
            .map(|s| s.split_whitespace().nth(1).unwrap().parse().unwrap())
            .collect()
    }
}

pub fn refused() -> Option<i32> {
    Some(ECONNREFUSED)
}

/// What a connect to the VIP gives when nothing translates it: the node has no route.
pub fn unreachable() -> Option<i32> {
    Some(ENETUNREACH)
}
