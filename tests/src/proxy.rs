//! Running `ferry-proxy` in a testbed node, fed by a manifests directory, and writing the
//! Services and EndpointSlices it reads; for the eBPF back end, the test's own cgroup and
//! bpf file system, and clients whose sockets belong to that cgroup.

use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{ferry_bin, Netns};

/// Writes a kubeconfig named `name` into `dir` whose one cluster is `server` (e.g.
/// `http://127.0.0.1:8080`, a mock API server) and whose user has no credentials.
pub fn write_kubeconfig(dir: &Path, name: &str, server: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: nobody\n\
             current-context: c\nusers:\n- name: nobody\n  user: {{}}\n"
        ),
    )
    .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// A `ferry-proxy run --manifests DIR` process inside a node's netns; killed on drop.
pub struct ProxyProcess {
    child: Option<Child>,
    pub manifests: PathBuf,
    log: PathBuf,
}

impl ProxyProcess {
    /// Starts the proxy in `node` reading `manifests`, with extra flags (e.g.
    /// `--cluster-cidr`). Its log goes to `<manifests>/../proxy.log`.
    pub fn start(node: &Netns, manifests: &Path, node_name: &str, flags: &[&str]) -> ProxyProcess {
        ProxyProcess::start_bin(&ferry_bin("ferry-proxy"), node, manifests, node_name, flags)
    }

    /// [`ProxyProcess::start`] with another build of the proxy (benchmarks compare one
    /// with a baseline build in the same run).
    pub fn start_bin(
        bin: &Path,
        node: &Netns,
        manifests: &Path,
        node_name: &str,
        flags: &[&str],
    ) -> ProxyProcess {
        std::fs::create_dir_all(manifests).unwrap();
        let log = manifests.with_file_name(format!(
            "proxy-{}.log",
            manifests.file_name().unwrap().to_string_lossy()
        ));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = node
            .command(bin)
            .args(["run", "--manifests"])
            .arg(manifests)
            .args(["--hostname-override", node_name])
            // Loopback only: tests in parallel each have their own netns anyway.
            .args([
                "--healthz-bind-address",
                "127.0.0.1:10256",
                "--metrics-bind-address",
                "127.0.0.1:10249",
            ])
            .args(flags)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("start ferry-proxy");
        ProxyProcess {
            child: Some(child),
            manifests: manifests.to_path_buf(),
            log,
        }
    }

    /// The process id while it runs (benchmarks read `/proc/<pid>/status`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Writes `objects` (Services, EndpointSlices, Nodes as JSON) as `<name>.json`.
    pub fn write(&self, name: &str, objects: &[Value]) {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        let tmp = self.manifests.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
        std::fs::rename(tmp, self.manifests.join(format!("{name}.json"))).unwrap();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `ok` every 20 ms until it holds or `timeout` passes; returns how long it took.
pub fn wait_until(timeout: Duration, mut ok: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ok() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A container port of a Pod, for [`pod`]: (name, protocol, number).
pub type ContainerPort<'a> = (&'a str, &'a str, u16);

/// A running Pod on `node_name` as `kubectl get -o json` shows it: its labels, its
/// addresses (the first is `status.podIP`) and one container serving `ports`.
pub fn pod(
    namespace: &str,
    name: &str,
    node_name: &str,
    labels: Value,
    ips: &[IpAddr],
    ports: &[ContainerPort],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, proto, port)| json!({"name": n, "protocol": proto, "containerPort": port}))
        .collect();
    let ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node_name, "containers": [{"name": "server", "image": "server", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ips.first().map(|ip| ip["ip"].clone()), "podIPs": ips}
    })
}

/// A Namespace with `labels` (like the API server, ferry-proxy adds
/// `kubernetes.io/metadata.name` itself).
pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// One port of a Service, for [`service`]: (name, protocol, port, targetPort).
pub type SvcPort<'a> = (&'a str, &'a str, u16, Value);

/// A Service as `kubectl get -o json` shows it; `spec` is merged over the basics.
pub fn service(name: &str, cluster_ip: &str, ports: &[SvcPort], spec: Value) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, proto, port, target)| json!({"name": n, "protocol": proto, "port": port, "targetPort": target}))
        .collect();
    let mut svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": ports}
    });
    if let (Some(base), Value::Object(extra)) = (svc["spec"].as_object_mut(), spec) {
        base.extend(extra);
    }
    svc
}

/// An endpoint of an EndpointSlice: (ip, node name, ready, serving, terminating).
pub type SliceEndpoint<'a> = (&'a str, &'a str, bool, bool, bool);

/// An EndpointSlice of Service `service` with `ports` (name, protocol, port).
pub fn endpoint_slice(
    service: &str,
    suffix: &str,
    endpoints: &[SliceEndpoint],
    ports: &[(&str, &str, u16)],
) -> Value {
    let family = if endpoints.first().is_some_and(|e| e.0.contains(':')) {
        "IPv6"
    } else {
        "IPv4"
    };
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node, ready, serving, terminating)| {
            json!({"addresses": [ip], "nodeName": node,
                   "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, proto, port)| json!({"name": n, "protocol": proto, "port": port}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-{suffix}"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": family, "endpoints": endpoints, "ports": ports
    })
}

/// Which Service back end a test runs `ferry-proxy` with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyBackend {
    Nftables,
    Ebpf,
}

/// Where this hybrid machine mounts the cgroup v2 hierarchy (see shared notes).
const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";
/// Test cgroups are `<prefix><pid>-<n>-<tag>`: the ferry-ebpf tests sweep the same names.
const CGROUP_PREFIX: &str = "ferry-test-";

/// What the eBPF back end needs from a test: a cgroup v2 directory of the test's own (the
/// socket programs act on every process in it, so never the machine's root) and a private
/// bpf file system for the pins. On drop: the bpffs is unmounted (dropping the pinned
/// links detaches the programs), what is left in the cgroup is killed (only this test's
/// socket makers can be there), and the cgroup removed; also after a panic.
pub struct EbpfSandbox {
    cgroup: PathBuf,
    bpffs: tempfile::TempDir,
}

impl EbpfSandbox {
    pub fn new(tag: &str) -> EbpfSandbox {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        sweep_dead_cgroups_once();
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cgroup = Path::new(CGROUP2_ROOT).join(format!("{CGROUP_PREFIX}{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir(&cgroup).unwrap_or_else(|e| {
            panic!(
                "mkdir {}: {e} (the eBPF back end's tests need the cgroup v2 hierarchy at {CGROUP2_ROOT})",
                cgroup.display()
            )
        });
        let bpffs = tempfile::Builder::new()
            .prefix(&format!("ferry-bpffs-{}-", std::process::id()))
            .tempdir()
            .unwrap();
        let sandbox = EbpfSandbox { cgroup, bpffs };
        nix::mount::mount(
            Some("bpf"),
            sandbox.bpffs.path(),
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount bpffs on {}: {e}", sandbox.bpffs.path().display()));
        sandbox
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    pub fn pin_root(&self) -> &Path {
        self.bpffs.path()
    }

    /// The flags that point `ferry-proxy` (run, dump, cleanup) at this sandbox.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--backend".into(),
            "ebpf".into(),
            "--cgroup".into(),
            self.cgroup.display().to_string(),
            "--bpf-pin-root".into(),
            self.pin_root().display().to_string(),
        ]
    }
}

impl Drop for EbpfSandbox {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.bpffs.path(), nix::mount::MntFlags::MNT_DETACH);
        remove_cgroup(&self.cgroup);
    }
}

fn remove_cgroup(path: &Path) {
    for _ in 0..100 {
        let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    eprintln!("warning: could not remove the test cgroup {}", path.display());
}

/// Removes test cgroups whose process is gone (killed before its guards ran).
fn sweep_dead_cgroups_once() {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| {
        for entry in std::fs::read_dir(CGROUP2_ROOT).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(CGROUP_PREFIX)
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<i32>().ok());
            if let Some(pid) = pid {
                let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                    == Err(nix::errno::Errno::ESRCH);
                if gone {
                    remove_cgroup(&entry.path());
                }
            }
        }
    });
}

/// A client in a Pod's (or the node's) netns whose sockets belong to `cgroup` when given:
/// how a Pod's process looks to the eBPF back end's socket programs. Without a cgroup it
/// is the plain [`Netns`] client.
pub struct Client<'a> {
    pub netns: &'a Netns,
    pub cgroup: Option<&'a Path>,
}

impl Client<'_> {
    fn socket(&self, v4: bool, tcp: bool) -> std::io::Result<std::os::fd::OwnedFd> {
        use nix::libc;
        let domain = if v4 { libc::AF_INET } else { libc::AF_INET6 };
        let ty = if tcp { libc::SOCK_STREAM } else { libc::SOCK_DGRAM };
        match self.cgroup {
            None => {
                // SAFETY: socket(2) with constant arguments; the fd is owned at once.
                let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: a fresh fd nobody else owns.
                Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
            }
            Some(cgroup) => socket_in_cgroup(cgroup, domain, ty),
        }
    }

    fn tcp_connected(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        let fd = self.socket(to.is_ipv4(), true)?;
        let timeout = nix::libc::timeval {
            tv_sec: crate::TIMEOUT.as_secs() as _,
            tv_usec: 0,
        };
        use std::os::fd::AsRawFd;
        // SAFETY: setsockopt/connect on a socket we own, with buffers that outlive the calls.
        unsafe {
            nix::libc::setsockopt(
                fd.as_raw_fd(),
                nix::libc::SOL_SOCKET,
                nix::libc::SO_SNDTIMEO,
                (&timeout as *const nix::libc::timeval).cast(),
                std::mem::size_of::<nix::libc::timeval>() as _,
            );
            let (storage, len) = sockaddr(to);
            if nix::libc::connect(
                fd.as_raw_fd(),
                (&storage as *const nix::libc::sockaddr_storage).cast(),
                len,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        let conn = TcpStream::from(fd);
        conn.set_read_timeout(Some(crate::TIMEOUT))?;
        Ok(conn)
    }

    /// `n` unconnected TCP sockets, made as [`Client::tcp_connect`] makes its own but all
    /// at once: for a bench that times `connect()` alone. In a cgroup a socket takes a
    /// fork, and the parent's first writes to each page after a fork fault, so one fork
    /// for all keeps that out of the timed calls. Call it on a thread inside `self.netns`,
    /// e.g. within [`Netns::run`].
    pub fn unconnected_tcp_sockets(&self, v4: bool, n: usize) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
        let domain = if v4 {
            nix::libc::AF_INET
        } else {
            nix::libc::AF_INET6
        };
        match self.cgroup {
            None => (0..n).map(|_| self.socket(v4, true)).collect(),
            Some(cgroup) => sockets_in_cgroup(cgroup, domain, nix::libc::SOCK_STREAM, n),
        }
    }

    /// A TCP connection, usable from any thread.
    pub fn tcp_connect(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        self.netns.run(|| self.tcp_connected(to))
    }

    /// Connects to `to` and returns what the server sent (trimmed).
    pub fn tcp_request(&self, to: SocketAddr) -> std::io::Result<String> {
        self.netns.run(|| {
            let mut conn = self.tcp_connected(to)?;
            let mut out = String::new();
            std::io::Read::read_to_string(&mut conn, &mut out)?;
            Ok(out.trim().to_string())
        })
    }

    /// An unconnected UDP socket kept across datagrams (one flow).
    pub fn udp_socket(&self, v4: bool) -> std::io::Result<UdpSocket> {
        self.netns.run(|| {
            let s = UdpSocket::from(self.socket(v4, false)?);
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            Ok(s)
        })
    }

    /// One datagram from a fresh socket, and the answer.
    pub fn udp_request(&self, to: SocketAddr) -> std::io::Result<String> {
        self.udp_exchange(to).map(|(answer, _)| answer)
    }

    /// One datagram from a fresh socket: the answer and the address it came from.
    pub fn udp_exchange(&self, to: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
        self.netns.run(|| {
            let s = UdpSocket::from(self.socket(to.is_ipv4(), false)?);
            s.set_read_timeout(Some(crate::TIMEOUT))?;
            s.send_to(b"who am i", to)?;
            let mut buf = [0u8; 1500];
            let (n, from) = s.recv_from(&mut buf)?;
            Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from))
        })
    }
}

pub(crate) fn sockaddr(to: SocketAddr) -> (nix::libc::sockaddr_storage, nix::libc::socklen_t) {
    use nix::libc;
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match to {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as _,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as _,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A socket of this thread's netns that belongs to `cgroup`.
///
/// A socket belongs to the cgroup of the process that creates it, for good; cgroup v2
/// moves whole processes, and the test process must stay where it is. So a forked child
/// (same netns as this thread) joins the cgroup, makes the socket and hands it back over a
/// Unix socket (SCM_RIGHTS), then exits. The child makes only raw system calls on buffers
/// prepared before the fork: the test process has other threads.
pub(crate) fn socket_in_cgroup(cgroup: &Path, domain: i32, ty: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    let mut one = sockets_in_cgroup(cgroup, domain, ty, 1)?;
    Ok(one.remove(0))
}

/// `n` sockets as [`socket_in_cgroup`] makes one, from one child.
fn sockets_in_cgroup(
    cgroup: &Path,
    domain: i32,
    ty: i32,
    n: usize,
) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
    use nix::libc;
    use std::os::fd::FromRawFd;
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes())
        .map_err(|_| std::io::Error::other("cgroup path with a NUL byte"))?;
    let mut pair = [0i32; 2];
    // SAFETY: socketpair fills the two ints.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds, owned from here.
    let (ours, theirs) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(pair[0]),
            std::os::fd::OwnedFd::from_raw_fd(pair[1]),
        )
    };
    use std::os::fd::AsRawFd;
    let child_end = theirs.as_raw_fd();
    // SAFETY: the child runs only async-signal-safe system calls on memory prepared before
    // the fork, then _exit; it never returns into Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(3);
            }
            libc::close(fd);
            for _ in 0..n {
                let s = libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0);
                if s < 0 {
                    libc::_exit(4);
                }
                // The message holds its own reference: the child's copy can go.
                send_fd(child_end, s);
                libc::close(s);
            }
            libc::_exit(0);
        }
    }
    drop(theirs);
    // Received as they come, so few are in flight at once (the kernel caps those).
    let received: Vec<_> = (0..n).map_while(|_| recv_fd(ours.as_raw_fd())).collect();
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    // SAFETY: each fd arrived over SCM_RIGHTS and is ours alone.
    let owned: Vec<_> = received
        .into_iter()
        .map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
        .collect();
    if owned.len() < n {
        return Err(std::io::Error::other(format!(
            "the child making sockets in {} failed after {} of {n} (wait status {status})",
            cgroup.display(),
            owned.len()
        )));
    }
    Ok(owned)
}

/// Control message buffer for one fd, aligned for cmsghdr.
#[repr(C, align(8))]
struct FdCmsg([u8; 64]);

/// Sends `fd` over the Unix socket `over` (async-signal-safe: stack buffers only).
unsafe fn send_fd(over: i32, fd: i32) {
    use nix::libc;
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut buf = FdCmsg([0; 64]);
    let mut msg: libc::msghdr = std::mem::zeroed();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = buf.0.as_mut_ptr().cast();
    msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) as _;
    let cmsg = libc::CMSG_FIRSTHDR(&msg);
    (*cmsg).cmsg_level = libc::SOL_SOCKET;
    (*cmsg).cmsg_type = libc::SCM_RIGHTS;
    (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
    libc::sendmsg(over, &msg, 0);
}

fn recv_fd(from: i32) -> Option<i32> {
    use nix::libc;
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut buf = FdCmsg([0; 64]);
    // SAFETY: a zeroed msghdr pointing at buffers that outlive the call.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = buf.0.as_mut_ptr().cast();
        msg.msg_controllen = buf.0.len() as _;
        if libc::recvmsg(from, &mut msg, libc::MSG_CMSG_CLOEXEC) != 1 {
            return None;
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return None;
        }
        Some(std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>()))
    }
}
