//! `conf/ferry.yaml` (and its k3s twin, and the eBPF variants of both) parses, every field
//! is one Kubernetes knows (a typo would be dropped by the typed round trip and show up as
//! a difference), and it says what the README and the proxy rely on: RBAC limited to
//! get/list/watch on what the proxy reads, the DaemonSet's node settings, the init
//! container that installs the plugins, the host paths, probe and capabilities; and
//! `ferry-proxy` accepts its arguments. The generated files are what their scripts make.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

const CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf");

fn documents(file: &str) -> Vec<Value> {
    let path = format!("{CONF}/{file}");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// Parses `doc` as `T` and checks nothing was lost on the way (unknown or misplaced fields).
fn typed<T: DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let obj: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{}: {e}", doc["kind"]));
    let back = serde_json::to_value(&obj).unwrap();
    assert_eq!(
        &back, doc,
        "fields Kubernetes does not know in {} (left: what it keeps)",
        doc["kind"]
    );
    obj
}

/// The host paths of a distribution: CNI plugins, CNI configuration, kubelet kubeconfig.
struct Paths {
    cni_bin: &'static str,
    cni_conf: &'static str,
    kubelet_kubeconfig: &'static str,
    cluster_cidr: &'static str,
}

/// Which Service back end a manifest runs.
#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Nftables,
    Ebpf,
}

const KIND_PATHS: Paths = Paths {
    cni_bin: "/opt/cni/bin",
    cni_conf: "/etc/cni/net.d",
    kubelet_kubeconfig: "/etc/kubernetes/kubelet.conf",
    cluster_cidr: "10.244.0.0/16",
};

const K3S_PATHS: Paths = Paths {
    cni_bin: "/var/lib/rancher/k3s/data/cni",
    cni_conf: "/var/lib/rancher/k3s/agent/etc/cni/net.d",
    kubelet_kubeconfig: "/var/lib/rancher/k3s/agent/kubelet.kubeconfig",
    cluster_cidr: "10.42.0.0/16",
};

#[test]
fn ferry_yaml() {
    check("ferry.yaml", KIND_PATHS, Backend::Nftables);
}

/// Runs `script args...` into a temporary file and checks it made exactly `conf/<file>`.
fn generated_by(file: &str, script: &str, inputs: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(file);
    let status = std::process::Command::new(format!("{CONF}/../scripts/conf/{script}"))
        .args(inputs.iter().map(|i| format!("{CONF}/{i}")))
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "scripts/conf/{script} failed");
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(format!("{CONF}/{file}")).unwrap(),
        "conf/{file} is not what scripts/conf/{script} makes of {inputs:?}: run the script"
    );
}

#[test]
fn ferry_ebpf_yaml_is_ferry_yaml_with_the_ebpf_back_end() {
    check("ferry-ebpf.yaml", KIND_PATHS, Backend::Ebpf);
    generated_by("ferry-ebpf.yaml", "ebpf.sh", &["ferry.yaml"]);
}

#[test]
fn ferry_k3s_ebpf_yaml_is_ferry_k3s_yaml_with_the_ebpf_back_end() {
    check("ferry-k3s-ebpf.yaml", K3S_PATHS, Backend::Ebpf);
    generated_by("ferry-k3s-ebpf.yaml", "ebpf.sh", &["ferry-k3s.yaml"]);
}

#[test]
fn ferry_k3s_yaml_is_ferry_yaml_with_k3s_paths() {
    check("ferry-k3s.yaml", K3S_PATHS, Backend::Nftables);
    generated_by("ferry-k3s.yaml", "k3s.sh", &[]);
}

/// Where container `c` mounts `volume`, and whether read-only.
fn mounted_at(c: &k8s_openapi::api::core::v1::Container, volume: &str) -> Option<(String, bool)> {
    c.volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume)
        .map(|m| (m.mount_path.clone(), m.read_only == Some(true)))
}

fn check(file: &str, paths: Paths, backend: Backend) {
    let docs = documents(file);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"]
    );

    let sa: ServiceAccount = typed(&docs[0]);
    let role: ClusterRole = typed(&docs[1]);
    let binding: ClusterRoleBinding = typed(&docs[2]);
    let ds: DaemonSet = typed(&docs[3]);
    let (sa_name, sa_ns) = (sa.metadata.name.unwrap(), sa.metadata.namespace.unwrap());

    // Only get/list/watch, only on what the proxy reads.
    let mut granted = Vec::new();
    for rule in role.rules.unwrap() {
        assert_eq!(rule.verbs, ["get", "list", "watch"]);
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.unwrap() {
            for resource in rule.resources.as_ref().unwrap() {
                granted.push(format!("{group}/{resource}"));
            }
        }
    }
    granted.sort();
    assert_eq!(
        granted,
        [
            "/namespaces",
            "/nodes",
            "/pods",
            "/services",
            "discovery.k8s.io/endpointslices",
            "networking.k8s.io/networkpolicies"
        ]
    );

    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), Some(&sa_name), subject.namespace.as_ref()),
        ("ServiceAccount", Some(&subject.name), Some(&sa_ns))
    );

    let spec = ds.spec.unwrap();
    assert_eq!(ds.metadata.namespace.as_ref(), Some(&sa_ns));
    let labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    for (k, v) in spec.selector.match_labels.as_ref().unwrap() {
        assert_eq!(labels.get(k), Some(v), "the selector matches the Pod template");
    }
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_ref(), Some(&sa_name));
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    let tolerations = pod.tolerations.as_ref().unwrap();
    assert!(tolerations
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()));

    // Host paths, by volume name.
    let volumes = pod.volumes.as_ref().unwrap();
    let host_path = |name: &str| {
        let v = volumes
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("volume {name}"));
        v.host_path.as_ref().unwrap().path.clone()
    };
    assert_eq!(host_path("cni-bin"), paths.cni_bin);
    assert_eq!(host_path("cni-conf"), paths.cni_conf);
    assert_eq!(host_path("kubelet-kubeconfig"), paths.kubelet_kubeconfig);
    // The init container installs the plugins into the mounted plugin directory; the eBPF
    // variant prepares the node first.
    let inits = pod.init_containers.as_ref().unwrap();
    let names: Vec<&str> = inits.iter().map(|c| c.name.as_str()).collect();
    match backend {
        Backend::Nftables => assert_eq!(names, ["install-cni"]),
        Backend::Ebpf => assert_eq!(names, ["prepare-node", "install-cni"]),
    }
    let init = inits.iter().find(|c| c.name == "install-cni").unwrap();
    assert_eq!(init.image.as_deref(), Some("localhost/ferry:dev"));
    let command = init.command.as_ref().unwrap();
    assert_eq!(command[0], "/usr/local/bin/ferry-install-cni");
    assert_eq!(mounted_at(init, "cni-bin"), Some((command[1].clone(), false)));
    assert_eq!(init.security_context.as_ref().unwrap().privileged, None);

    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("localhost/ferry:dev"));
    let args = c.args.as_ref().unwrap();
    assert_eq!(args[0], "run");
    let arg = |flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{flag}=")))
            .unwrap_or_else(|| panic!("--{flag} in {args:?}"))
    };
    assert_eq!(arg("hostname-override"), "$(NODE_NAME)");
    assert_eq!(arg("cluster-cidr"), paths.cluster_cidr);
    assert_eq!(
        mounted_at(c, "kubelet-kubeconfig"),
        Some((arg("api-server-from").to_string(), true))
    );
    assert_eq!(
        mounted_at(c, "cni-conf"),
        Some((arg("cni-conf-dir").to_string(), false))
    );
    let env = c.env.as_ref().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node_name.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    for name in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        assert!(
            env.iter().all(|e| e.name != name),
            "{name}: the address comes from --api-server-from, nothing to edit"
        );
    }

    // The binary under test takes these arguments (clap stops at --help only when every
    // argument before it parsed).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-proxy"))
        .args(args.iter().map(|a| a.replace("$(NODE_NAME)", "node-a")))
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ferry-proxy refuses the DaemonSet's arguments {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let probe = c.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(probe.path.as_deref(), Some("/livez"));
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256)
    );

    for c in [init, c] {
        let sc = c.security_context.as_ref().unwrap();
        assert_ne!(sc.privileged, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    }
    let caps = c
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    match backend {
        Backend::Nftables => {
            assert_eq!(caps.add.as_deref(), Some(&["NET_ADMIN".to_string()][..]));
            assert!(args.iter().all(|a| !a.starts_with("--backend")));
        }
        Backend::Ebpf => check_ebpf(&pod, c, caps, &host_path),
    }
}

/// What `--backend=ebpf` needs in the DaemonSet (README.md, "Installing Ferry on a
/// cluster"): the host's cgroup tree as `--cgroup`, the host's bpffs where the pins go,
/// the capabilities found by trying, and the node preparation the daemon cannot do.
fn check_ebpf(
    pod: &k8s_openapi::api::core::v1::PodSpec,
    c: &k8s_openapi::api::core::v1::Container,
    caps: &k8s_openapi::api::core::v1::Capabilities,
    host_path: &dyn Fn(&str) -> String,
) {
    let args = c.args.as_ref().unwrap();
    assert!(args.contains(&"--backend=ebpf".to_string()), "{args:?}");
    // --cgroup is the host's whole cgroup tree, mounted read-only (opening it is enough).
    assert_eq!(host_path("cgroup"), "/sys/fs/cgroup");
    let cgroup = args.iter().find_map(|a| a.strip_prefix("--cgroup=")).unwrap();
    assert_eq!(mounted_at(c, "cgroup"), Some((cgroup.to_string(), true)));
    // The pins go to the default root, on the host's bpffs, which the daemon sees mounted
    // later too.
    assert!(args.iter().all(|a| !a.starts_with("--bpf-pin-root")));
    assert_eq!(host_path("bpffs"), "/sys/fs/bpf");
    let (bpffs, read_only) = mounted_at(c, "bpffs").unwrap();
    assert!(!read_only);
    assert!(Path::new(ferry_proxy::backend::ebpf::DEFAULT_PIN_ROOT).starts_with(&bpffs));
    let propagation = |c: &k8s_openapi::api::core::v1::Container, volume: &str| {
        c.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == volume)
            .and_then(|m| m.mount_propagation.clone())
    };
    assert_eq!(propagation(c, "bpffs").as_deref(), Some("HostToContainer"));
    let add: Vec<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(add, ["NET_ADMIN", "BPF", "PERFMON"]);

    // The one privileged container sets the sysctl and mounts the host's bpffs when
    // missing, so that the mount is the host's (Bidirectional), then exits.
    let prepare = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(prepare.security_context.as_ref().unwrap().privileged, Some(true));
    let (at, _) = mounted_at(prepare, "bpffs").unwrap();
    assert_eq!(propagation(prepare, "bpffs").as_deref(), Some("Bidirectional"));
    let script = prepare.command.as_ref().unwrap().join(" ");
    assert!(
        script.contains("/proc/sys/net/ipv4/conf/all/accept_local"),
        "{script}"
    );
    assert!(script.contains(&format!("mount -t bpf bpf {at}")), "{script}");
}
