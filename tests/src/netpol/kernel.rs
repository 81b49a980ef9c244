//! Upstream's model on a real node: the nine Pods on `ferry-bridge` (dual stack), each
//! serving every port of the cases on TCP, UDP and SCTP, their Services, the objects a
//! `--manifests` directory needs to describe them, and probes that fill a [`TruthTable`]
//! from real packets.
//!
//! What a probe counts as "connects":
//! - TCP: the connection opens and the server's `ok` arrives (the reply path is judged
//!   too, as conntrack must let it back);
//! - UDP: a datagram from a fresh socket (a new source port, so conntrack holds no earlier
//!   flow) is echoed; it is sent twice within the timeout in case the first one waits on
//!   neighbour discovery;
//! - SCTP: an INIT with a tag of its own arrives at the destination Pod's raw socket (see
//!   [`crate::sctp`]; no SCTP stack answers it, so only the first packet is judged, which
//!   is what policy judges).
//!
//! A denied probe is one that sees nothing within its timeout (or a refusal): probes of
//! one matrix run in parallel, one thread each, so a matrix costs about one timeout.

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::libc;
use serde_json::{json, Value};

use super::cluster::{pod_keys, service_name, service_port_name, PORTS, PORT_RANGE_PORTS};
use super::{Family, PodAddresses, Protocol, State, TruthTable};
use crate::netns::run_ip;
use crate::proxy::{sockaddr, socket_in_cgroup};
use crate::{ferry_bin, sctp, unique_v4_subnet, unique_v6_subnet, CniCall, Netns, Node, Pod};

/// Every port any case probes: each Pod serves all of them on every protocol.
pub fn served_ports() -> Vec<u16> {
    PORTS.iter().chain(PORT_RANGE_PORTS.iter()).copied().collect()
}

/// Where a probe is sent: the Pod's own address, or its Service's ClusterIP (the same
/// port: the Services map every port to itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Through {
    PodAddress,
    ClusterIp,
}

impl Through {
    pub const BOTH: [Through; 2] = [Through::PodAddress, Through::ClusterIp];
}

/// The source name [`PairProbe`] uses for the machine outside the node.
pub const OUTSIDE: &str = "outside";

/// The node, its nine Pods (in [`pod_keys`] order) and their servers, and a machine
/// outside the node whose traffic to the Pods is routed through it.
pub struct UpstreamNode {
    // Field order is drop order: servers stop before their namespaces go.
    servers: Vec<PodServer>,
    /// Each Pod's namespace held open, for probe threads to enter.
    entered: Vec<ferry_netlink::Netns>,
    outside_entered: ferry_netlink::Netns,
    pods: Vec<Pod>,
    outside: Netns,
    /// The outside machine's IPv4 and IPv6 addresses.
    outside_ips: [IpAddr; 2],
    /// Where probes from Pods make their TCP and UDP sockets (the eBPF back end's cgroup:
    /// its socket programs translate Services only for sockets made there).
    client_cgroup: Option<PathBuf>,
    pub addresses: PodAddresses,
    /// The IPv4 and IPv6 Pod subnets (what `--cluster-cidr` gets).
    pub subnets: [String; 2],
    pub node: Node,
}

impl UpstreamNode {
    /// Builds the node (IPv4 and IPv6 forwarding, bridged traffic through netfilter), adds
    /// the nine Pods with `ferry-bridge` and starts their servers.
    pub fn new(tag: &str) -> UpstreamNode {
        let node = Node::new(tag);
        node.forward_and_filter_bridged();
        let subnets = [unique_v4_subnet(24), unique_v6_subnet()];
        let conf = json!({
            "cniVersion": "1.1.0", "name": "netpol", "type": "ferry-bridge",
            "isGateway": true, "isDefaultGateway": true,
            "ipam": {"type": "ferry-ipam", "ranges": [[{"subnet": subnets[0]}], [{"subnet": subnets[1]}]],
                     "dataDir": node.state_dir().join("ipam")}
        });
        let mut addresses = PodAddresses::new();
        let mut pods = Vec::new();
        for key in pod_keys() {
            let pod = node.pod(&key.replace('/', "-"));
            let result = CniCall::new(ferry_bin("ferry-bridge"), "ADD", conf.clone())
                .for_pod(&pod)
                .run_in(node.netns())
                .ok();
            let ips: Vec<IpAddr> = result["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
                .collect();
            assert_eq!(ips.len(), 2, "pod {key}: not dual stack: {result}");
            addresses.set(&key, &ips).unwrap();
            pods.push(pod);
        }
        let entered: Vec<ferry_netlink::Netns> = pods
            .iter()
            .map(|p| ferry_netlink::Netns::open(p.path()).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        let servers = pods.iter().map(PodServer::start).collect();
        let (outside, outside_ips) = connect_outside(&node);
        let outside_entered = ferry_netlink::Netns::open(outside.path()).unwrap_or_else(|e| panic!("{e}"));
        UpstreamNode {
            servers,
            entered,
            outside_entered,
            pods,
            outside,
            outside_ips,
            client_cgroup: None,
            addresses,
            subnets,
            node,
        }
    }

    /// The namespace of Pod `key` (`x/a`), e.g. to run a command in it.
    pub fn pod(&self, key: &str) -> &Pod {
        &self.pods[index_of(key)]
    }

    /// Makes the Pods' TCP and UDP probe sockets inside `cgroup` from now on, as a Pod's
    /// processes would be on a node running the eBPF back end.
    pub fn set_client_cgroup(&mut self, cgroup: Option<PathBuf>) {
        self.client_cgroup = cgroup;
    }

    /// The outside machine's namespace.
    pub fn outside(&self) -> &Netns {
        &self.outside
    }

    /// The outside machine's address of `family`.
    pub fn outside_ip(&self, family: Family) -> IpAddr {
        self.outside_ips[match family {
            Family::V4 => 0,
            Family::V6 => 1,
        }]
    }

    /// Probes each Pod's address from the outside machine (routed through the node, not
    /// bridged); the verdicts in [`pod_keys`] order.
    pub fn probe_from_outside(
        &self,
        family: Family,
        port: u16,
        protocol: Protocol,
        timeout: Duration,
    ) -> Vec<bool> {
        let probes: Vec<PairProbe> = pod_keys()
            .into_iter()
            .map(|to| PairProbe {
                from: OUTSIDE.into(),
                address: SocketAddr::new(self.address(&to, family, Through::PodAddress), port),
                to,
                protocol,
            })
            .collect();
        self.probe_all(&probes, timeout)
    }

    /// The ClusterIP of `pod`'s Service in `family` (a fixed range no Pod subnet uses).
    pub fn cluster_ip(&self, pod: &str, family: Family) -> IpAddr {
        let i = index_of(pod);
        match family {
            Family::V4 => format!("172.30.0.{}", 10 + i).parse().unwrap(),
            Family::V6 => format!("fd9c:30::{:x}", 10 + i).parse().unwrap(),
        }
    }

    /// Where a probe to `pod` goes.
    pub fn address(&self, pod: &str, family: Family, through: Through) -> IpAddr {
        match through {
            Through::PodAddress => self.addresses.get(pod, family).unwrap(),
            Through::ClusterIp => self.cluster_ip(pod, family),
        }
    }

    /// One Service per Pod, dual stack, every served port on every protocol, and its two
    /// EndpointSlices: the objects never change, so they are written once.
    pub fn service_objects(&self, node_name: &str) -> Vec<Value> {
        let mut objects = Vec::new();
        for key in pod_keys() {
            let (namespace, name) = key.split_once('/').unwrap();
            let service = service_name(&key);
            let mut ports = Vec::new();
            let mut slice_ports = Vec::new();
            for port in served_ports() {
                for protocol in Protocol::ALL {
                    let port_name = service_port_name(port, protocol);
                    ports.push(json!({"name": port_name, "protocol": protocol.as_str(), "port": port, "targetPort": port}));
                    slice_ports.push(json!({"name": port_name, "protocol": protocol.as_str(), "port": port}));
                }
            }
            let (v4, v6) = (
                self.cluster_ip(&key, Family::V4),
                self.cluster_ip(&key, Family::V6),
            );
            objects.push(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": service, "namespace": namespace},
                "spec": {"type": "ClusterIP", "clusterIP": v4.to_string(), "clusterIPs": [v4.to_string(), v6.to_string()],
                         "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                         "selector": {"pod": name}, "ports": ports}
            }));
            for (family, address_type) in [(Family::V4, "IPv4"), (Family::V6, "IPv6")] {
                objects.push(json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": format!("{service}-{}", address_type.to_lowercase()), "namespace": namespace,
                                 "labels": {"kubernetes.io/service-name": service}},
                    "addressType": address_type,
                    "endpoints": [{"addresses": [self.addresses.get(&key, family).unwrap().to_string()],
                                   "nodeName": node_name,
                                   "conditions": {"ready": true, "serving": true, "terminating": false},
                                   "targetRef": {"kind": "Pod", "namespace": namespace, "name": name}}],
                    "ports": slice_ports,
                }));
            }
        }
        objects
    }

    /// Probes every pair for `port`/`protocol` in `family`, to each Pod's address and to
    /// its ClusterIP, all at once; the tables in [`Through::BOTH`] order.
    pub fn probe_matrices(
        &self,
        family: Family,
        port: u16,
        protocol: Protocol,
        timeout: Duration,
    ) -> [TruthTable; 2] {
        let keys = pod_keys();
        let mut probes = Vec::new();
        for through in Through::BOTH {
            for from in &keys {
                for to in &keys {
                    probes.push(PairProbe {
                        from: from.clone(),
                        to: to.clone(),
                        address: SocketAddr::new(self.address(to, family, through), port),
                        protocol,
                    });
                }
            }
        }
        let verdicts = self.probe_all(&probes, timeout);
        let mut verdicts = verdicts.into_iter();
        Through::BOTH.map(|_| TruthTable::from_fn(|_, _| verdicts.next().expect("one verdict per probe")))
    }

    /// Runs `probes` in parallel, one thread each inside its source Pod; the verdicts in
    /// order.
    pub fn probe_all(&self, probes: &[PairProbe], timeout: Duration) -> Vec<bool> {
        std::thread::scope(|scope| {
            let threads: Vec<_> = probes
                .iter()
                .map(|p| {
                    let source = if p.from == OUTSIDE {
                        &self.outside_entered
                    } else {
                        &self.entered[index_of(&p.from)]
                    };
                    let seen = &self.servers[index_of(&p.to)].sctp_seen;
                    // The outside machine is no Pod: its sockets stay out of the cgroup.
                    let cgroup = self.client_cgroup.as_deref().filter(|_| p.from != OUTSIDE);
                    (
                        source,
                        source.spawn(scope, move || probe_once(p, seen, timeout, cgroup)),
                    )
                })
                .collect();
            threads
                .into_iter()
                .map(|(source, thread)| source.join(thread).unwrap_or_else(|e| panic!("{e}")))
                .collect()
        })
    }

    /// One probe, from `from` to `to` (whose address is `address`).
    pub fn probe(
        &self,
        from: &str,
        to: &str,
        address: SocketAddr,
        protocol: Protocol,
        timeout: Duration,
    ) -> bool {
        let probe = PairProbe {
            from: from.into(),
            to: to.into(),
            address,
            protocol,
        };
        self.probe_all(std::slice::from_ref(&probe), timeout)[0]
    }
}

/// A machine outside the node on a veth of its own, dual stack, its default routes via the
/// node; the node reaches it on the connected subnets.
fn connect_outside(node: &Node) -> (Netns, [IpAddr; 2]) {
    let outside = node.client(OUTSIDE);
    let v4 = unique_v4_subnet(24);
    let v4 = v4.rsplit_once(".0/").expect("an aligned /24").0;
    let node_if = node.connect_client(&outside, &format!("{v4}.2/24"), &format!("{v4}.1/24"));
    let v6 = unique_v6_subnet();
    let v6 = v6.trim_end_matches("/64");
    // No duplicate address detection: the addresses would be unusable for a while.
    run_ip(&[
        "-n",
        outside.name(),
        "addr",
        "add",
        &format!("{v6}2/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    run_ip(&[
        "-n",
        node.name(),
        "addr",
        "add",
        &format!("{v6}1/64"),
        "dev",
        &node_if,
        "nodad",
    ]);
    run_ip(&[
        "-n",
        outside.name(),
        "-6",
        "route",
        "add",
        "default",
        "via",
        &format!("{v6}1"),
    ]);
    let ips = [
        format!("{v4}.2").parse().unwrap(),
        format!("{v6}2").parse().unwrap(),
    ];
    (outside, ips)
}

/// One probe of a matrix: from Pod `from` (or [`OUTSIDE`]) to `address`, which belongs to Pod `to` (its own
/// address or its Service's).
#[derive(Clone, Debug)]
pub struct PairProbe {
    pub from: String,
    pub to: String,
    pub address: SocketAddr,
    pub protocol: Protocol,
}

fn index_of(pod: &str) -> usize {
    pod_keys()
        .iter()
        .position(|k| k == pod)
        .unwrap_or_else(|| panic!("{pod:?} is not a pod of the x/y/z topology"))
}

/// Runs on a thread inside the source Pod's namespace.
fn probe_once(
    probe: &PairProbe,
    sctp_seen: &Mutex<HashSet<u32>>,
    timeout: Duration,
    cgroup: Option<&Path>,
) -> bool {
    match probe.protocol {
        Protocol::Tcp => {
            let Ok(mut conn) = tcp_connect(probe.address, timeout, cgroup) else {
                return false;
            };
            let _ = conn.set_read_timeout(Some(timeout));
            let mut answer = Vec::new();
            let _ = conn.read_to_end(&mut answer);
            answer == b"ok"
        }
        Protocol::Udp => {
            let bind: SocketAddr = if probe.address.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .unwrap();
            let socket = match cgroup {
                // Unbound: the first send picks a fresh source port.
                Some(cgroup) => UdpSocket::from(
                    socket_in_cgroup(cgroup, domain(probe.address), libc::SOCK_DGRAM)
                        .expect("a UDP socket in the client cgroup"),
                ),
                None => UdpSocket::bind(bind).expect("a UDP socket in the source Pod"),
            };
            socket.set_read_timeout(Some(timeout / 2)).unwrap();
            let message = format!("probe {} -> {}", probe.from, probe.address);
            let mut buf = [0u8; 256];
            for _ in 0..2 {
                if socket.send_to(message.as_bytes(), probe.address).is_err() {
                    return false;
                }
                if let Ok(n) = socket.recv(&mut buf) {
                    return &buf[..n] == message.as_bytes();
                }
            }
            false
        }
        Protocol::Sctp => {
            static NEXT_TAG: AtomicU32 = AtomicU32::new(1);
            let tag = NEXT_TAG.fetch_add(1, Ordering::Relaxed);
            // A source port of its own per probe: conntrack keys SCTP flows on ports.
            let src_port = 20_000 + (tag % 40_000) as u16;
            let socket =
                sctp::raw_socket(probe.address.is_ipv4()).expect("a raw SCTP socket in the source Pod");
            let start = Instant::now();
            let mut sent = 0;
            while start.elapsed() < timeout {
                if sent == 0 || (sent == 1 && start.elapsed() >= timeout / 2) {
                    if sctp::send_init(&socket, probe.address, src_port, tag).is_err() {
                        return false;
                    }
                    sent += 1;
                }
                if sctp_seen.lock().unwrap().remove(&tag) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            false
        }
    }
}

fn domain(address: SocketAddr) -> i32 {
    if address.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

/// `TcpStream::connect_timeout`, from a socket made in `cgroup` when given.
fn tcp_connect(to: SocketAddr, timeout: Duration, cgroup: Option<&Path>) -> std::io::Result<TcpStream> {
    let Some(cgroup) = cgroup else {
        return TcpStream::connect_timeout(&to, timeout);
    };
    let conn = TcpStream::from(socket_in_cgroup(cgroup, domain(to), libc::SOCK_STREAM)?);
    conn.set_nonblocking(true)?;
    let (address, length) = sockaddr(to);
    // SAFETY: connect(2) on a socket we own, with an address that outlives the call.
    let started = unsafe {
        libc::connect(
            conn.as_raw_fd(),
            (&address as *const libc::sockaddr_storage).cast(),
            length,
        )
    };
    if started != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(error);
        }
        let mut pollfd = libc::pollfd {
            fd: conn.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        let ready = unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as libc::c_int) };
        if ready <= 0 {
            return Err(std::io::Error::from(ErrorKind::TimedOut));
        }
        if let Some(error) = conn.take_error()? {
            return Err(error);
        }
    }
    conn.set_nonblocking(false)?;
    Ok(conn)
}

/// One Pod's servers: TCP and UDP on every served port (one dual-stack socket each) and a
/// raw SCTP socket per family, all served by one thread polling them.
struct PodServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Initiate tags of the SCTP INITs that arrived, taken by the probe that sent them.
    sctp_seen: Arc<Mutex<HashSet<u32>>>,
}

enum Served {
    Tcp(TcpListener),
    Udp(UdpSocket),
    Sctp { socket: UdpSocket, v4: bool },
}

impl Served {
    fn fd(&self) -> i32 {
        match self {
            Served::Tcp(s) => s.as_raw_fd(),
            Served::Udp(s) => s.as_raw_fd(),
            Served::Sctp { socket, .. } => socket.as_raw_fd(),
        }
    }
}

impl PodServer {
    fn start(pod: &Pod) -> PodServer {
        // Sockets are made inside the Pod's namespace; the serving thread need not be.
        let served: Vec<Served> = pod.run(|| {
            let mut served = Vec::new();
            for port in served_ports() {
                // `[::]` takes IPv4 too (bindv6only is 0 in a new namespace).
                let any = SocketAddr::from(([0u16; 8], port));
                let tcp = TcpListener::bind(any).unwrap_or_else(|e| panic!("bind TCP {any}: {e}"));
                let udp = UdpSocket::bind(any).unwrap_or_else(|e| panic!("bind UDP {any}: {e}"));
                served.push(Served::Tcp(tcp));
                served.push(Served::Udp(udp));
            }
            for v4 in [true, false] {
                let socket = sctp::raw_socket(v4).unwrap_or_else(|e| panic!("raw SCTP socket: {e}"));
                served.push(Served::Sctp { socket, v4 });
            }
            served
        });
        for s in &served {
            match s {
                Served::Tcp(l) => l.set_nonblocking(true).unwrap(),
                Served::Udp(u) | Served::Sctp { socket: u, .. } => u.set_nonblocking(true).unwrap(),
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sctp_seen = Arc::new(Mutex::new(HashSet::new()));
        let (flag, seen) = (stop.clone(), sctp_seen.clone());
        let thread = std::thread::spawn(move || serve(&served, &flag, &seen));
        PodServer {
            stop,
            thread: Some(thread),
            sctp_seen,
        }
    }
}

fn serve(served: &[Served], stop: &AtomicBool, sctp_seen: &Mutex<HashSet<u32>>) {
    let mut fds: Vec<libc::pollfd> = served
        .iter()
        .map(|s| libc::pollfd {
            fd: s.fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `fds` is a live array of pollfd of the length given.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if ready <= 0 {
            continue;
        }
        for (pollfd, s) in fds.iter_mut().zip(served) {
            if pollfd.revents == 0 {
                continue;
            }
            pollfd.revents = 0;
            match s {
                Served::Tcp(listener) => {
                    while let Ok((mut conn, _)) = listener.accept() {
                        let _ = conn.write_all(b"ok");
                    }
                }
                Served::Udp(socket) => loop {
                    match socket.recv_from(&mut buf) {
                        Ok((n, peer)) => {
                            let _ = socket.send_to(&buf[..n], peer);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => break,
                    }
                },
                Served::Sctp { socket, v4 } => {
                    while let Ok(n) = socket.recv(&mut buf) {
                        if let Some(tag) = sctp::received_init_tag(&buf[..n], *v4) {
                            sctp_seen.lock().unwrap().insert(tag);
                        }
                    }
                }
            }
        }
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The Namespaces, Pods and NetworkPolicies of one step's state as a runtime's API server
/// would show them: every Pod on `node_name`, running, with its addresses and its
/// container ports (named as upstream names them).
pub fn state_objects(state: &State, node_name: &str) -> Vec<Value> {
    let mut objects = Vec::new();
    for namespace in &state.cluster.namespaces {
        objects.push(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": namespace.name, "labels": namespace.labels},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}
        }));
    }
    for pod in &state.cluster.pods {
        let ports: Vec<Value> = pod
            .ports
            .iter()
            .map(|p| json!({"name": p.name, "containerPort": p.port, "protocol": p.protocol.as_str()}))
            .collect();
        let ips: Vec<Value> = pod.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
        objects.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels},
            "spec": {"nodeName": node_name,
                     "containers": [{"name": "server", "image": "registry.k8s.io/e2e-test-images/agnhost:2.47",
                                     "ports": ports}]},
            "status": {"phase": "Running", "podIP": pod.ips.first().map(|ip| ip.to_string()), "podIPs": ips}
        }));
    }
    objects.extend(state.policies.iter().cloned());
    objects
}
