//! `ferry-proxy trace` as a user runs it: a manifests directory, a Pod, a Service address.

use std::process::Command;

const CLUSTER: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-a
  containers: [{name: web, image: nginx, ports: [{name: http, containerPort: 8080}]}]
status: {phase: Running, podIP: 10.244.0.5, podIPs: [{ip: 10.244.0.5}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: node-b, containers: [{name: c, image: busybox}]}
status: {phase: Running, podIPs: [{ip: 10.244.1.7}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.5], nodeName: node-a}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-frontend, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: frontend}}}]
    ports: [{port: http}]
"#;

fn trace(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-proxy"))
        .args(["trace", "--manifests"])
        .arg(dir)
        .args(["--hostname-override", "node-a"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn trace_explains_a_denial_then_the_allow_that_a_relabel_brings() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.yaml");
    std::fs::write(&file, CLUSTER).unwrap();
    let (ok, text, err) = trace(dir.path(), &["shop/client", "10.96.0.20:80"]);
    assert!(ok, "{err}");
    assert!(text.contains("Service shop/web:http: 1 endpoint(s)"), "{text}");
    assert!(
        text.contains("-> 10.244.0.5:8080 (Pod shop/web): DENIED"),
        "{text}"
    );
    assert!(
        text.contains(
            "ingress: denied: isolated by shop/web-from-frontend and no rule matches (on node node-a)"
        ),
        "{text}"
    );

    // The client takes the label the policy allows: the same question, another answer.
    let relabelled = CLUSTER.replace("labels: {app: client}", "labels: {app: frontend}");
    std::fs::write(&file, relabelled).unwrap();
    let (ok, json, err) = trace(dir.path(), &["shop/client", "10.96.0.20:80/tcp", "-o", "json"]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["paths"][0]["allowed"], true, "{json}");
    assert_eq!(json["paths"][0]["ingress"]["verdict"], "allowed");
    assert_eq!(
        json["paths"][0]["ingress"]["rules"][0],
        "shop/web-from-frontend ingress[0]"
    );

    let (ok, _, err) = trace(dir.path(), &["shop/nobody", "10.96.0.20:80"]);
    assert!(!ok);
    assert!(err.contains("Pod shop/nobody: not found"), "{err}");
    let (ok, _, err) = trace(dir.path(), &["shop/client", "10.96.0.20"]);
    assert!(!ok);
    assert!(err.contains("give a port"), "{err}");
}
