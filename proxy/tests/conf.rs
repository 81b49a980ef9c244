//! `conf/ferry-proxy.yaml` parses, every field is one Kubernetes knows (a typo would be
//! dropped by the typed round trip and show up as a difference), and it says what the
//! README and the proxy rely on: RBAC limited to get/list/watch on what the proxy reads,
//! the DaemonSet's node settings, probe and capabilities.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/ferry-proxy.yaml");

fn documents() -> Vec<Value> {
    let text = std::fs::read_to_string(PATH).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{PATH}: {e}")))
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

#[test]
fn ferry_proxy_yaml() {
    let docs = documents();
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
    let tolerations = pod.tolerations.unwrap();
    assert!(tolerations
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()));

    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("ghcr.io/ferry/ferry-proxy:dev"));
    let args = c.args.as_ref().unwrap();
    assert_eq!(args[0], "run");
    assert!(
        args.contains(&"--hostname-override=$(NODE_NAME)".to_string()),
        "{args:?}"
    );
    assert!(args.iter().any(|a| a.starts_with("--cluster-cidr=")));
    let env = c.env.as_ref().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node_name.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    for name in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        assert!(env.iter().any(|e| e.name == name && e.value.is_some()), "{name}");
    }

    let probe = c.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(probe.path.as_deref(), Some("/livez"));
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256)
    );

    let sc = c.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(caps.add.as_deref(), Some(&["NET_ADMIN".to_string()][..]));
    assert!(
        c.volume_mounts.is_none() && pod.volumes.is_none(),
        "no host paths are needed"
    );
}
