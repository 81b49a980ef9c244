//! Real container runtimes on a Ferry network: Debian's podman 4.3 (CNI backend) and
//! containerd 1.6 (`ctr run --cni`), started by the project's own scripts
//! (`scripts/runtimes/`), each inside the test node's network namespace.
//!
//! Every test runs the same scenario with one runtime and one set of plugins:
//! - a node netns and a client netns outside it, wired with a veth pair;
//! - a conflist in a private directory, plugins in another (each wrapped by
//!   `cni-log-wrapper.sh`, so every call the runtime makes is recorded);
//! - container A runs busybox httpd; container B fetches A's page over TCP, then a page
//!   from a server in the client netns, which answers with the address it saw: with
//!   `ipMasq` that is the node's address on the client link;
//! - with podman, A's port is also published on the node (`--publish`, which podman
//!   sends as runtimeConfig `portMappings`) and the client fetches it there; `ctr` has
//!   no way to publish ports;
//! - A is removed; the runtime must have sent a DEL for each ADD, the IPAM plugin must
//!   hold no lease, no veth may be left on cni0, and (for Ferry's plugins) no rule of
//!   the node's ruleset may name a Pod address. (The reference bridge plugin leaves its
//!   masquerade rules when DEL comes without a netns, as containerd's does: printed, not
//!   failed.)
//!
//! The runtime, its daemons, shims and containers live in a sandbox (`sandbox.sh`): the
//! node's netns, a private mount namespace (the CNI directories a runtime insists on,
//! /run, /var/lib/cni are the test's own) and a PID namespace whose end kills them all.
//! So cni0, veths and firewall rules land in the node's netns, and nothing outlives the
//! test: the guards stop the runtime on drop, also when an assertion fails.
//!
//! The calls each runtime made are written to
//! `target/tmp/runtimes/<test>.cni-calls.log`, and printed when a test fails.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_tests::{ferry_bin, list_netns, reference_plugin, unique_v4_subnet, Netns, Node};
use serde_json::{json, Value};

/// The image `build-image.sh` makes and the runtime scripts import.
const IMAGE: &str = "localhost/ferry/busybox:latest";
/// The network's name, in the conflist and on `podman run --network`.
const NETWORK: &str = "ferry";
/// The client link: the client's address and the node's (what masquerading shows).
const CLIENT_ADDR: &str = "192.168.201.2";
const NODE_ADDR: &str = "192.168.201.1";
/// The port busybox httpd listens on in container A.
const HTTP_PORT: u16 = 8080;
/// The node port A's port is published on, where the runtime can publish ports.
const HOST_PORT: u16 = 18080;
/// The page busybox httpd serves (written by build-image.sh).
const PAGE: &str = "hello from ferry-busybox";
/// Longest wait for a container to come up or go away.
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// The tests

/// podman, reference `bridge` + `host-local` (+ `portmap`): proves the harness.
#[test]
fn podman_with_reference_plugins() {
    ferry_tests::require_root!();
    if !runtime_available(ferry_tests::__function_name!(), "podman", "podman") {
        return;
    }
    scenario::<Podman>(Plugins::Reference, "pm-ref");
}

/// podman, `ferry-bridge` + `ferry-ipam`.
#[test]
fn podman_with_ferry_plugins() {
    ferry_tests::require_root!();
    if !runtime_available(ferry_tests::__function_name!(), "podman", "podman") {
        return;
    }
    scenario::<Podman>(Plugins::Ferry, "pm-ferry");
}

/// containerd's `ctr run --cni`, reference `bridge` + `host-local` (+ `portmap`).
#[test]
fn containerd_with_reference_plugins() {
    ferry_tests::require_root!();
    if !runtime_available(ferry_tests::__function_name!(), "containerd", "containerd") {
        return;
    }
    scenario::<Containerd>(Plugins::Reference, "ctrd-ref");
}

/// containerd's `ctr run --cni`, `ferry-bridge` + `ferry-ipam`.
#[test]
fn containerd_with_ferry_plugins() {
    ferry_tests::require_root!();
    if !runtime_available(ferry_tests::__function_name!(), "containerd", "containerd") {
        return;
    }
    scenario::<Containerd>(Plugins::Ferry, "ctrd-ferry");
}

fn scenario<R: Runtime>(plugins: Plugins, tag: &str) {
    let started = Instant::now();
    let node = Node::new(tag);
    let client = node.client("out");
    node.connect_client(&client, &format!("{CLIENT_ADDR}/24"), &format!("{NODE_ADDR}/24"));
    let outside = WhoAmI::start(&client);
    let net = Network::new(&node, plugins, tag);
    let node_name = node.name().to_owned();
    let client_name = client.name().to_owned();

    let mut runtime = R::start(&node, &net);
    let ready = started.elapsed();
    let sandbox_id = runtime.sandbox_id();

    // A publishes its port on the node where the runtime can (podman's -p: runtimeConfig
    // portMappings); ctr has no such flag.
    let host_port = R::PORT_MAPPINGS.then_some(HOST_PORT);
    runtime.start_server(
        "a",
        host_port,
        &["httpd", "-f", "-p", &HTTP_PORT.to_string(), "-h", "/www"],
    );
    let a_ip = runtime.ipv4_of("a");
    assert!(
        net.contains(&a_ip),
        "container a got {a_ip}, outside the network's subnet {}",
        net.subnet
    );

    // B: A's page over the bridge (retried while httpd starts), then the outside server.
    // (`timeout`, not wget's -T: Debian's busybox 1.35 wget crashes with -T.)
    let script = format!(
        "n=0; until page=$(timeout 3 wget -q -O - http://{a_ip}:{HTTP_PORT}/); do \
           n=$((n+1)); [ $n -lt 15 ] || {{ echo 'cannot fetch from a' >&2; exit 1; }}; sleep 0.2; done; \
         echo \"from-a: $page\"; \
         echo \"from-outside: $(timeout 5 wget -q -O - http://{CLIENT_ADDR}:{}/)\"",
        outside.port
    );
    let out = runtime.run("b", &["sh", "-c", &script]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "container b failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("from-a: {PAGE}")),
        "b did not get a's page from {a_ip}:{HTTP_PORT}:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!("from-outside: {NODE_ADDR}")),
        "the outside server should see the node's address {NODE_ADDR} (ipMasq), b printed:\n{stdout}"
    );

    if let Some(port) = host_port {
        let page = http_get(
            &client,
            SocketAddr::from((NODE_ADDR.parse::<Ipv4Addr>().unwrap(), port)),
        );
        assert!(
            page.contains(PAGE),
            "the client should get a's page through hostPort {NODE_ADDR}:{port}, got:\n{page}"
        );
    }

    runtime.remove_server("a");
    let traffic_done = started.elapsed();

    // The runtime tore both attachments down through the plugins.
    let calls = net.calls();
    let main = plugins.main_type();
    let added: BTreeSet<&str> = calls
        .iter()
        .filter(|c| c.ok(main, "ADD"))
        .map(|c| c.container_id())
        .collect();
    let deleted: BTreeSet<&str> = calls
        .iter()
        .filter(|c| c.ok(main, "DEL"))
        .map(|c| c.container_id())
        .collect();
    assert_eq!(
        added.len(),
        2,
        "expected an ADD of {main} for a and b, got {added:?}"
    );
    assert_eq!(added, deleted, "every container added must be deleted");
    let leases = net.leases();
    assert!(leases.is_empty(), "leases left after every DEL: {leases:?}");
    let ports = node
        .netns()
        .exec_ok(&["ip", "-o", "link", "show", "master", "cni0"]);
    assert!(
        ports.trim().is_empty(),
        "veths left on cni0 after every DEL:\n{ports}"
    );
    // No rule of the node's firewall names a Pod address any more (masquerade, hostPort).
    let ruleset = node.netns().exec_ok(&["nft", "list", "ruleset"]);
    let pod_ips: BTreeSet<String> = calls
        .iter()
        .filter(|c| c.ok(main, "ADD"))
        .flat_map(|c| c.result_ips())
        .collect();
    let words: BTreeSet<&str> = ruleset
        .split(|c: char| !(c.is_ascii_hexdigit() || c == '.' || c == ':'))
        .collect();
    let stale: Vec<&String> = pod_ips.iter().filter(|ip| words.contains(ip.as_str())).collect();
    match plugins {
        Plugins::Ferry => assert!(
            stale.is_empty(),
            "rules for {stale:?} left in the node's ruleset after every DEL:\n{ruleset}"
        ),
        // Known: the reference bridge plugin leaves its masquerade rules when DEL comes
        // without a netns (containerd's ctr sends CNI_NETNS empty).
        Plugins::Reference if !stale.is_empty() => {
            eprintln!("{tag}: the reference plugins left rules for {stale:?} after DEL (known leak)")
        }
        Plugins::Reference => {}
    }

    drop(runtime);
    // Nothing of the runtime is left: no cgroup of its sandbox in any hierarchy.
    let left: Vec<String> = fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|h| h.path().join(&sandbox_id))
        .chain([Path::new("/sys/fs/cgroup").join(&sandbox_id)])
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
    let mounts = Command::new("findmnt")
        .args(["-l", "-n", "-o", "SOURCE,TARGET"])
        .output()
        .unwrap();
    let mounts = String::from_utf8_lossy(&mounts.stdout);
    let ours: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains("ferry-sandbox") || l.contains(&*node.state_dir().to_string_lossy()))
        .collect();
    assert!(ours.is_empty(), "mounts visible on the machine: {ours:?}");

    drop(net);
    drop(outside);
    drop(client);
    drop(node);
    let names = list_netns();
    assert!(
        !names.contains(&node_name) && !names.contains(&client_name),
        "namespaces left: {names:?}"
    );
    eprintln!(
        "{tag}: runtime ready after {ready:?}, traffic checked after {traffic_done:?}, \
         everything removed after {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// Plugins and the network configuration

#[derive(Clone, Copy, Debug)]
enum Plugins {
    /// Debian's containernetworking-plugins: bridge, host-local, portmap.
    Reference,
    /// ferry-bridge and ferry-ipam, as built by cargo.
    Ferry,
}

impl Plugins {
    fn main_type(self) -> &'static str {
        match self {
            Plugins::Reference => "bridge",
            Plugins::Ferry => "ferry-bridge",
        }
    }
}

/// The CNI side of a test: a conflist directory, a plugin directory whose plugins are
/// wrapped by the logging wrapper, the IPAM data directory, and the log of calls.
struct Network {
    test: String,
    conf_dir: PathBuf,
    plugin_dir: PathBuf,
    log_dir: PathBuf,
    data_dir: PathBuf,
    subnet: String,
}

impl Network {
    fn new(node: &Node, plugins: Plugins, test: &str) -> Network {
        let state = node.state_dir();
        let (conf_dir, plugin_dir) = (state.join("cni-conf"), state.join("cni-bin"));
        let (log_dir, data_dir) = (state.join("cni-log"), state.join("ipam"));
        for dir in [&conf_dir, &plugin_dir, &log_dir] {
            fs::create_dir_all(dir).unwrap();
        }
        let subnet = unique_v4_subnet(24);
        let ipam = |ty: &str| {
            json!({
                "type": ty,
                "ranges": [[{"subnet": subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": data_dir,
            })
        };
        // cniVersion 1.0.0: both runtimes' libcni (1.1.x) refuse a 1.1.0 result
        // ("unsupported CNI result version"), and podman drops a network whose plugins'
        // VERSION does not list the conflist's version.
        let (binaries, conf): (Vec<(&str, PathBuf)>, Value) = match plugins {
            Plugins::Reference => {
                let bins = ["bridge", "host-local", "portmap"].map(|name| {
                    let path = reference_plugin(name).unwrap_or_else(|| {
                        panic!("reference plugin {name} missing from /usr/lib/cni: install containernetworking-plugins (scripts/setup.sh does)")
                    });
                    (name, path)
                });
                let conf = json!({
                    "cniVersion": "1.0.0",
                    "name": NETWORK,
                    "plugins": [
                        {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
                         "hairpinMode": true, "ipam": ipam("host-local")},
                        {"type": "portmap", "capabilities": {"portMappings": true}},
                    ],
                });
                (bins.into(), conf)
            }
            Plugins::Ferry => {
                // ferry_bin fails the test, saying how to build them, when they are missing.
                let bins = vec![
                    ("ferry-bridge", ferry_bin("ferry-bridge")),
                    ("ferry-ipam", ferry_bin("ferry-ipam")),
                ];
                let conf = json!({
                    "cniVersion": "1.0.0",
                    "name": NETWORK,
                    "plugins": [
                        {"type": "ferry-bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
                         "hairpinMode": true, "capabilities": {"portMappings": true},
                         "ipam": ipam("ferry-ipam")},
                    ],
                });
                (bins, conf)
            }
        };
        for (name, path) in &binaries {
            std::os::unix::fs::symlink(path, plugin_dir.join(name)).unwrap();
        }
        fs::write(
            conf_dir.join("10-ferry.conflist"),
            serde_json::to_string_pretty(&conf).unwrap(),
        )
        .unwrap();
        script_ok(
            "cni-log-wrapper.sh",
            &["wrap".as_ref(), plugin_dir.as_os_str(), log_dir.as_os_str()],
        );
        Network {
            test: test.to_owned(),
            conf_dir,
            plugin_dir,
            log_dir,
            data_dir,
            subnet,
        }
    }

    fn contains(&self, ip: &str) -> bool {
        let prefix = self
            .subnet
            .rsplit_once(".0/")
            .map(|(p, _)| p)
            .unwrap_or(&self.subnet);
        ip.starts_with(&format!("{prefix}."))
    }

    /// Every recorded call, in order.
    fn calls(&self) -> Vec<Call> {
        let mut dirs: Vec<PathBuf> = fs::read_dir(&self.log_dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        dirs.into_iter().map(Call::read).collect()
    }

    /// Addresses the IPAM plugin still holds (files other than its bookkeeping).
    fn leases(&self) -> Vec<String> {
        let dir = self.data_dir.join(NETWORK);
        fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip") && !n.starts_with('.'))
            .collect()
    }

    /// The calls as text (`cni-log-wrapper.sh show`).
    fn render_calls(&self) -> String {
        let out = script("cni-log-wrapper.sh", &["show".as_ref(), self.log_dir.as_os_str()]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Network {
    /// Keeps the record of the calls in target/tmp/runtimes/, and prints it when the
    /// test failed.
    fn drop(&mut self) {
        let log = self.render_calls();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("runtimes");
        let file = dir.join(format!("{}.cni-calls.log", self.test));
        if fs::create_dir_all(&dir)
            .and_then(|()| fs::write(&file, &log))
            .is_ok()
        {
            eprintln!("{}: CNI calls recorded in {}", self.test, file.display());
        }
        if std::thread::panicking() {
            eprintln!(
                "---- CNI calls of {} ({} plugin dir, {} conf dir)\n{log}",
                self.test,
                self.plugin_dir.display(),
                self.conf_dir.display()
            );
        }
    }
}

/// One recorded plugin call (see cni-log-wrapper.sh).
struct Call {
    plugin: String,
    env: Vec<(String, String)>,
    stdout: String,
    exit: i32,
}

impl Call {
    fn read(dir: PathBuf) -> Call {
        // <nanoseconds>-<pid>-<plugin>-<verb>; plugin names may contain '-'.
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let mut parts = name.splitn(3, '-');
        let (_, _, rest) = (parts.next(), parts.next(), parts.next().unwrap_or_default());
        let plugin = rest.rsplit_once('-').map(|(p, _)| p).unwrap_or(rest).to_owned();
        let env = fs::read_to_string(dir.join("env"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let exit = fs::read_to_string(dir.join("exit"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(-1);
        let stdout = fs::read_to_string(dir.join("stdout")).unwrap_or_default();
        Call {
            plugin,
            env,
            stdout,
            exit,
        }
    }

    fn var(&self, key: &str) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }

    fn container_id(&self) -> &str {
        self.var("CNI_CONTAINERID")
    }

    /// The addresses (without prefix length) of the result the call printed.
    fn result_ips(&self) -> Vec<String> {
        let result: Value = serde_json::from_str(&self.stdout).unwrap_or(Value::Null);
        result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str())
            .filter_map(|cidr| cidr.split('/').next())
            .map(str::to_owned)
            .collect()
    }

    /// A successful `verb` of `plugin`.
    fn ok(&self, plugin: &str, verb: &str) -> bool {
        self.plugin == plugin && self.var("CNI_COMMAND") == verb && self.exit == 0
    }
}

// ---------------------------------------------------------------------------------------
// The runtimes

/// What the scenario needs of a runtime. Implementations stop everything on drop.
trait Runtime: Sized {
    /// Whether the runtime can publish a container port on the node (hostPort).
    const PORT_MAPPINGS: bool;
    /// Starts the runtime in the node's netns, on the network's directories.
    fn start(node: &Node, net: &Network) -> Self;
    /// Starts a long-running container `name` on the network, its port HTTP_PORT
    /// published on the node's `host_port` if given.
    fn start_server(&mut self, name: &str, host_port: Option<u16>, argv: &[&str]);
    /// Runs `argv` in the running container `name`.
    fn exec(&self, name: &str, argv: &[&str]) -> Output;
    /// Runs a container `name` on the network to completion, then removes it.
    fn run(&self, name: &str, argv: &[&str]) -> Output;
    /// Stops and removes the container `name` from start_server, network included.
    fn remove_server(&mut self, name: &str);
    /// The sandbox's id (its cgroups are named after it).
    fn sandbox_id(&self) -> String;
    /// Why the server container `name` ended already, if it did (a failed ADD, say).
    fn server_ended(&mut self, _name: &str) -> Option<String> {
        None
    }

    /// The IPv4 address of eth0 in the running container `name`; waits for it to start.
    fn ipv4_of(&mut self, name: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(why) = self.server_ended(name) {
                panic!("container {name} ended before it got an address: {why}");
            }
            let out = self.exec(name, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
            let text = String::from_utf8_lossy(&out.stdout);
            // "2: eth0    inet 10.96.1.2/24 brd ... scope global eth0"
            let ip = text
                .split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .and_then(|cidr| cidr.split('/').next());
            if let (true, Some(ip)) = (out.status.success(), ip) {
                return ip.to_owned();
            }
            if Instant::now() > deadline {
                panic!(
                    "no IPv4 address on eth0 of container {name} after {WAIT:?} ({}):\n{text}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// podman 4.3 through scripts/runtimes/podman.sh.
struct Podman {
    state: PathBuf,
}

impl Podman {
    fn podman(&self, args: &[&str]) -> Output {
        let mut argv: Vec<&std::ffi::OsStr> = vec![self.state.as_os_str(), "podman".as_ref()];
        argv.extend(args.iter().map(std::ffi::OsStr::new));
        script("podman.sh", &argv)
    }
}

impl Runtime for Podman {
    const PORT_MAPPINGS: bool = true;

    fn start(node: &Node, net: &Network) -> Podman {
        let state = node.state_dir().join("podman");
        // From here on Drop stops whatever start got to.
        let podman = Podman { state };
        script_ok(
            "podman.sh",
            &[
                podman.state.as_os_str(),
                "start".as_ref(),
                node.name().as_ref(),
                net.conf_dir.as_os_str(),
                net.plugin_dir.as_os_str(),
            ],
        );
        podman
    }

    fn start_server(&mut self, name: &str, host_port: Option<u16>, argv: &[&str]) {
        let publish = host_port.map(|p| format!("{p}:{HTTP_PORT}"));
        let mut args = vec!["run", "--detach", "--name", name, "--network", NETWORK];
        if let Some(publish) = &publish {
            args.extend(["--publish", publish]);
        }
        args.push(IMAGE);
        args.extend(argv);
        output_ok(self.podman(&args), &format!("podman run {name}"));
    }

    fn exec(&self, name: &str, argv: &[&str]) -> Output {
        self.podman(&[&["exec", name], argv].concat())
    }

    fn run(&self, name: &str, argv: &[&str]) -> Output {
        self.podman(
            &[
                &["run", "--rm", "--name", name, "--network", NETWORK, IMAGE],
                argv,
            ]
            .concat(),
        )
    }

    fn remove_server(&mut self, name: &str) {
        output_ok(
            self.podman(&["rm", "--force", "--time", "0", name]),
            &format!("podman rm {name}"),
        );
    }

    fn sandbox_id(&self) -> String {
        fs::read_to_string(self.state.join("sandbox/sandbox.id"))
            .unwrap()
            .trim()
            .to_owned()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let out = script("podman.sh", &[self.state.as_os_str(), "stop".as_ref()]);
        if !out.status.success() {
            eprintln!(
                "warning: podman.sh stop failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if std::thread::panicking() {
            print_file("podman events", &self.state.join("events.log"));
            print_file("sandbox log", &self.state.join("sandbox/sandbox.log"));
        }
    }
}

/// containerd 1.6 and `ctr run --cni` through scripts/runtimes/containerd.sh.
struct Containerd {
    state: PathBuf,
    /// The `ctr run` of each server container: it makes the DEL when its task ends.
    servers: Vec<(String, Child)>,
}

impl Containerd {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(scripts_dir().join("containerd.sh"));
        cmd.arg(&self.state).arg("ctr").args(args).stdin(Stdio::null());
        cmd
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("cannot run containerd.sh")
    }
}

impl Runtime for Containerd {
    const PORT_MAPPINGS: bool = false;

    fn start(node: &Node, net: &Network) -> Containerd {
        let containerd = Containerd {
            state: node.state_dir().join("containerd"),
            servers: Vec::new(),
        };
        script_ok(
            "containerd.sh",
            &[
                containerd.state.as_os_str(),
                "start".as_ref(),
                node.name().as_ref(),
                net.conf_dir.as_os_str(),
                net.plugin_dir.as_os_str(),
            ],
        );
        containerd
    }

    fn start_server(&mut self, name: &str, host_port: Option<u16>, argv: &[&str]) {
        assert!(host_port.is_none(), "ctr run cannot publish ports");
        // `ctr run` stays attached: it is the process that made the ADD and makes the DEL
        // when the task ends (--rm also removes the container). Output goes to files.
        let log = |ext: &str| fs::File::create(self.state.join(format!("{name}.{ext}"))).unwrap();
        let child = self
            .command(&[&["run", "--cni", "--rm", IMAGE, name], argv].concat())
            .stdout(log("out"))
            .stderr(log("err"))
            .spawn()
            .expect("cannot run containerd.sh");
        self.servers.push((name.to_owned(), child));
    }

    fn exec(&self, name: &str, argv: &[&str]) -> Output {
        static EXEC: AtomicU32 = AtomicU32::new(0);
        let id = format!("exec{}", EXEC.fetch_add(1, Ordering::Relaxed));
        self.ctr(&[&["tasks", "exec", "--exec-id", &id, name], argv].concat())
    }

    fn run(&self, name: &str, argv: &[&str]) -> Output {
        self.ctr(&[&["run", "--cni", "--rm", IMAGE, name], argv].concat())
    }

    fn remove_server(&mut self, name: &str) {
        let i = self
            .servers
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no server container {name}"));
        let (_, mut child) = self.servers.remove(i);
        // busybox httpd is PID 1 of its container: only SIGKILL ends it.
        output_ok(
            self.ctr(&["tasks", "kill", "--signal", "SIGKILL", name]),
            &format!("ctr tasks kill {name}"),
        );
        let status = wait_timeout(&mut child, WAIT).unwrap_or_else(|| {
            panic!("`ctr run` of {name} still running {WAIT:?} after its task was killed")
        });
        // 137: the task's own status (SIGKILL), which ctr run passes on.
        assert_eq!(status.code(), Some(137), "ctr run of {name} ended with {status}");
    }

    fn sandbox_id(&self) -> String {
        fs::read_to_string(self.state.join("sandbox/sandbox.id"))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn server_ended(&mut self, name: &str) -> Option<String> {
        let (_, child) = self.servers.iter_mut().find(|(n, _)| n == name)?;
        let status = child.try_wait().ok()??;
        let stderr = fs::read_to_string(self.state.join(format!("{name}.err"))).unwrap_or_default();
        Some(format!("`ctr run` exited ({status}):\n{}", stderr.trim()))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let out = Command::new(scripts_dir().join("containerd.sh"))
            .arg(&self.state)
            .arg("stop")
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: containerd.sh stop failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("warning: cannot run containerd.sh stop: {e}"),
        }
        // The sandbox is gone, and with it every ctr inside; the nsenter processes that
        // waited for them end too. Kill ours if one did not.
        for (name, child) in &mut self.servers {
            if wait_timeout(child, Duration::from_secs(5)).is_none() {
                eprintln!("warning: `ctr run` of {name} outlived the sandbox; killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for (name, _) in &self.servers {
                print_file(
                    &format!("ctr run {name} stderr"),
                    &self.state.join(format!("{name}.err")),
                );
            }
            print_file("containerd log (end)", &self.state.join("containerd.log"));
            print_file("sandbox log", &self.state.join("sandbox/sandbox.log"));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Outside the node: a server that answers with the address it saw

/// An HTTP server in a netns (on a thread that entered it) answering every request with
/// the peer's IP address as the body. Stops on drop.
struct WhoAmI {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WhoAmI {
    fn start(ns: &Netns) -> WhoAmI {
        // The listener is made in the client's netns; a socket stays where it was made.
        let listener = ns
            .run(|| TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], 0))))
            .expect("bind in the client netns");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        // Read the request head (one read is enough for wget's), answer, close.
                        let mut buf = [0u8; 2048];
                        let _ = conn.read(&mut buf);
                        let body = format!("{}\n", peer.ip());
                        let _ = write!(
                            conn,
                            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        WhoAmI {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for WhoAmI {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/runtimes")
}

/// Runs scripts/runtimes/`name` with `args`, stdin closed, and returns its output.
fn script(name: &str, args: &[&std::ffi::OsStr]) -> Output {
    let path = scripts_dir().join(name);
    Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()))
}

/// Like [`script`], panicking with its output unless it exits 0.
fn script_ok(name: &str, args: &[&std::ffi::OsStr]) -> Output {
    let what = format!(
        "{name} {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    output_ok(script(name, args), &what)
}

fn output_ok(out: Output, what: &str) -> Output {
    if !out.status.success() {
        panic!(
            "`{what}` failed ({}):\nstderr: {}\nstdout: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    out
}

/// GET / from `to`, from a thread inside `ns`; retried for a few seconds (the server may
/// still be starting). Returns the whole response.
fn http_get(ns: &Netns, to: SocketAddr) -> String {
    ns.run(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let attempt = (|| -> std::io::Result<String> {
                let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
                conn.set_read_timeout(Some(Duration::from_secs(3)))?;
                conn.write_all(b"GET / HTTP/1.0\r\nHost: ferry\r\n\r\n")?;
                let mut out = String::new();
                conn.read_to_string(&mut out)?;
                Ok(out)
            })();
            match attempt {
                Ok(out) if !out.is_empty() => return out,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                Ok(_) => return String::from("(empty response)"),
                Err(e) => return format!("(error: {e})"),
            }
        }
    })
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

fn print_file(what: &str, path: &Path) {
    match fs::read_to_string(path) {
        Ok(text) => {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("---- {what} ({})\n{}", path.display(), tail.join("\n"));
        }
        Err(e) => eprintln!("---- {what}: cannot read {}: {e}", path.display()),
    }
}

/// Whether `program` (from Debian package `package`) is installed. When it is not, the
/// test skips or fails as [`ferry_tests::skip_or_fail`] says.
fn runtime_available(test: &str, program: &str, package: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    ferry_tests::skip_or_fail(
        test,
        &format!("{program} is not installed: install the Debian package {package} (scripts/setup.sh does)"),
    )
}
