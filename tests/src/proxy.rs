//! Running `ferry-proxy` in a testbed node, fed by a manifests directory, and writing the
//! Services and EndpointSlices it reads.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{ferry_bin, Netns};

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
