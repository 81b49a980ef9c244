//! `ferry-proxy run --backend ebpf` as `conf/ferry-ebpf.yaml` runs it, in the testbed. Needs
//! root.
//!
//! The daemon gets what its container gets and nothing more: the manifest's capabilities
//! only (bounding set), /proc/sys read-only (as in any unprivileged container; the init
//! container sets the sysctl), and `--cgroup` naming a hybrid host's cgroup mount (a tmpfs
//! holding the cgroup2 tree as `unified`, which the daemon must find and log). That mount
//! is made in the daemon's own cgroup and mount namespaces rooted at the test's cgroup (as
//! a container sees a host), so whatever it resolves, it can only ever reach the test's
//! cgroup, never the machine's root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_tests::{endpoint_slice, require_root, service, wait_until, Client, EbpfSandbox, Netns};
use serde::Deserialize;
use serde_json::json;

const NODE: &str = "node-a";
const CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf");

/// The capabilities conf/ferry-ebpf.yaml gives the daemon, as setpriv names them
/// (`+net_admin,+bpf,...`).
fn manifest_capabilities() -> String {
    let text = std::fs::read_to_string(format!("{CONF}/ferry-ebpf.yaml")).unwrap();
    let ds = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["name"], "ferry-proxy");
    let caps = &container["securityContext"]["capabilities"];
    assert_eq!(caps["drop"], json!(["ALL"]));
    caps["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("+{}", c.as_str().unwrap().to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Joins `$1` (the test's cgroup), then in new cgroup and mount namespaces: a tmpfs on
/// `$2` with the cgroup2 tree (rooted at the test's cgroup) on `$2/unified` when `$3` is 1,
/// /proc/sys read-only, and the bounding set `$4`; then runs the rest.
const AS_IN_A_CONTAINER: &str = r#"
cg=$1 hybrid=$2 unified=$3 caps=$4; shift 4
echo $$ >"$cg/cgroup.procs"
exec unshare --cgroup --mount --propagation private sh -ec '
    hybrid=$1 unified=$2 caps=$3; shift 3
    mount -t tmpfs ferry-test-cgroup-mount "$hybrid"
    if [ "$unified" = 1 ]; then mkdir "$hybrid/unified"; mount -t cgroup2 none "$hybrid/unified"; fi
    mount --bind /proc/sys /proc/sys
    mount -o remount,bind,ro /proc/sys
    exec setpriv --bounding-set=-all,$caps --inh-caps=-all "$@"' sh "$hybrid" "$unified" "$caps" "$@"
"#;

struct Daemonset {
    node: Netns,
    sandbox: EbpfSandbox,
    dir: tempfile::TempDir,
    caps: String,
}

impl Daemonset {
    fn new(tag: &str) -> Daemonset {
        let node = Netns::new(tag);
        node.exec_ok(&["ip", "link", "set", "lo", "up"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("manifests")).unwrap();
        std::fs::create_dir(dir.path().join("host-cgroup")).unwrap();
        Daemonset {
            node,
            sandbox: EbpfSandbox::new(tag),
            dir,
            caps: manifest_capabilities(),
        }
    }

    /// As the DaemonSet's `/sys/fs/bpf/ferry`: a directory in a bpffs, not its mount point.
    fn pin_root(&self) -> PathBuf {
        self.sandbox.pin_root().join("ferry")
    }

    fn hybrid_mount(&self) -> PathBuf {
        self.dir.path().join("host-cgroup")
    }

    fn accept_local(&self) -> String {
        self.node
            .exec_ok(&["cat", "/proc/sys/net/ipv4/conf/all/accept_local"])
            .trim()
            .to_owned()
    }

    /// `ferry-proxy ARGS --backend ebpf --cgroup <the hybrid mount> --bpf-pin-root ...`,
    /// in the node, as in the container; `unified`: whether the mount holds a cgroup2 tree.
    fn ferry_proxy(&self, unified: bool, args: &[&str], log: &str) -> Child {
        let log = std::fs::File::create(self.dir.path().join(log)).unwrap();
        self.node
            .command("sh")
            .args(["-ec", AS_IN_A_CONTAINER, "sh"])
            .arg(self.sandbox.cgroup())
            .arg(self.hybrid_mount())
            .arg(if unified { "1" } else { "0" })
            .arg(&self.caps)
            .arg(env!("CARGO_BIN_EXE_ferry-proxy"))
            .args(args)
            .args(["--hostname-override", NODE, "--backend", "ebpf", "--cgroup"])
            .arg(self.hybrid_mount())
            .arg("--bpf-pin-root")
            .arg(self.pin_root())
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap()
    }

    fn run(&self, unified: bool, log: &str) -> Child {
        let manifests = self.dir.path().join("manifests");
        self.ferry_proxy(
            unified,
            &[
                "run",
                "--manifests",
                manifests.to_str().unwrap(),
                "--healthz-bind-address",
                "127.0.0.1:10256",
                "--metrics-bind-address",
                "127.0.0.1:10249",
            ],
            log,
        )
    }

    fn log(&self, log: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(log)).unwrap_or_default()
    }

    fn dump(&self) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry-proxy"))
            .args([
                "dump",
                "--backend",
                "ebpf",
                "--hostname-override",
                NODE,
                "--bpf-pin-root",
            ])
            .arg(self.pin_root())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Waits for `child` to exit (at most 20 s) and returns whether it succeeded.
fn exited(child: &mut Child) -> Option<bool> {
    let mut status = None;
    wait_until(Duration::from_secs(20), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.map(|s| s.success())
}

fn programs_on(cgroup: &Path) -> Vec<String> {
    ferry_ebpf::ferry_programs_attached(cgroup).unwrap()
}

#[test]
fn the_daemonset_daemon_runs_with_its_capabilities_a_read_only_proc_sys_and_a_hybrid_cgroup_mount() {
    require_root!();
    let d = Daemonset::new("ebpfds");
    // What the init container does on the node: the daemon finds it done and writes nothing.
    d.node
        .exec_ok(&["sysctl", "-qw", "net.ipv4.conf.all.accept_local=1"]);
    // The Service's endpoint: a server on the node itself.
    d.node.exec_ok(&["ip", "addr", "add", "10.7.0.5/32", "dev", "lo"]);
    let _server = d.node.tcp_server("10.7.0.5:8080".parse().unwrap());
    let mut daemon = d.run(true, "run.log");
    let manifests = d.dir.path().join("manifests");
    let write = |name: &str, objects: serde_json::Value| {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        std::fs::write(manifests.join(format!("{name}.json")), list.to_string()).unwrap();
    };
    write(
        "web",
        json!([
            service("web", "10.96.7.7", &[("http", "TCP", 80, json!(8080))], json!({})),
            endpoint_slice(
                "web",
                "a",
                &[("10.7.0.5", NODE, true, true, false)],
                &[("http", "TCP", 8080)]
            ),
        ]),
    );
    let programmed = wait_until(Duration::from_secs(30), || d.dump().contains("10.96.7.7:80"));
    let log = d.log("run.log");
    assert!(
        programmed.is_some(),
        "the Service never reached the maps; dump: {}; log:\n{log}",
        d.dump()
    );
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon stopped:\n{log}");
    // The hybrid mount was resolved to its cgroup2 tree, said so, and attached there: in
    // the daemon's cgroup namespace that tree's root is the test's cgroup.
    let unified = d.hybrid_mount().join("unified");
    assert!(
        log.contains("hybrid host's cgroup mount") && log.contains(&format!("cgroup={}", unified.display())),
        "{log}"
    );
    assert!(
        !programs_on(d.sandbox.cgroup()).is_empty(),
        "nothing attached to the test's cgroup"
    );
    assert!(
        programs_on(Path::new("/sys/fs/cgroup/unified")).is_empty(),
        "a Ferry program on the machine's root cgroup"
    );
    // A socket made in the test's cgroup reaches the Service; the same connect from this
    // test process, outside that cgroup, is not translated (the node has no route to it).
    let frontend = "10.96.7.7:80".parse().unwrap();
    let inside = Client {
        netns: &d.node,
        cgroup: Some(d.sandbox.cgroup()),
    };
    let answer = inside.tcp_request(frontend).unwrap();
    assert!(answer.ends_with(" 10.7.0.5:8080"), "{answer}");
    let outside = Client {
        netns: &d.node,
        cgroup: None,
    };
    assert!(
        outside.tcp_request(frontend).is_err(),
        "translated outside the cgroup"
    );
    daemon.kill().unwrap();
    daemon.wait().unwrap();

    // The sysctl not set and /proc/sys read-only: a clear stop that says what to do.
    d.node
        .exec_ok(&["sysctl", "-qw", "net.ipv4.conf.all.accept_local=0"]);
    let mut refused = d.run(true, "refused.log");
    assert_eq!(exited(&mut refused), Some(false), "{}", d.log("refused.log"));
    let log = d.log("refused.log");
    assert!(
        log.contains("net.ipv4.conf.all.accept_local must be 1") && log.contains("init container"),
        "{log}"
    );
    assert_eq!(d.accept_local(), "0", "the read-only /proc/sys was written");

    // A tmpfs without a cgroup2 tree (a cgroup v1 only host): refused with what to pass.
    d.node
        .exec_ok(&["sysctl", "-qw", "net.ipv4.conf.all.accept_local=1"]);
    let mut v1_only = d.run(false, "v1.log");
    assert_eq!(exited(&mut v1_only), Some(false), "{}", d.log("v1.log"));
    let log = d.log("v1.log");
    assert!(
        log.contains("without a cgroup v2 `unified` directory") && log.contains("use --backend nftables"),
        "{log}"
    );

    // cleanup, with the same capabilities and the same --cgroup, detaches and unpins all.
    let mut cleanup = d.ferry_proxy(true, &["cleanup"], "cleanup.log");
    assert_eq!(exited(&mut cleanup), Some(true), "{}", d.log("cleanup.log"));
    assert!(
        programs_on(d.sandbox.cgroup()).is_empty(),
        "{}",
        d.log("cleanup.log")
    );
    assert!(
        !d.pin_root().exists(),
        "pins left: nothing of Ferry's stays in the host's bpffs"
    );
}
