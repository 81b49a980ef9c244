//! The Kubernetes API source against a mock API server on loopback that answers list and
//! watch requests the way a real one does (the JSON of kube-apiserver 1.33: lists whose items
//! carry no kind, chunked watch streams of `{"type":...,"object":...}` lines, bookmarks,
//! `Status` errors, the `410 Gone` of an expired resourceVersion).
//!
//! What kube-runtime 5's watcher sends (default `watcher::Config`, the ListWatch strategy):
//! - list: `GET /api/v1/services?labelSelector=...&limit=500` (no resourceVersion: a quorum
//!   read), following `metadata.continue` for more pages;
//! - watch: `GET ...?watch=true&timeoutSeconds=290&labelSelector=...&allowWatchBookmarks=true
//!   &resourceVersion=<the list's>` (no `sendInitialEvents`: that is the StreamingList
//!   strategy), resumed from the last seen resourceVersion when the stream ends, relisted
//!   after a `410` ERROR event.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use ferry_proxy::source::kube as api_source;
use ferry_proxy::source::{Event, Kind, Object};
use ferry_tests::write_kubeconfig;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------------------
// The mock API server.

/// One scripted answer.
#[derive(Clone)]
enum Reply {
    /// A list: resourceVersion and items (full objects; the mock strips kind/apiVersion
    /// from items as the API server does).
    List(&'static str, Vec<Value>),
    /// An error `Status` with this HTTP code.
    Status(Value),
    /// A watch: these events, then the stream stays open (`true`) or ends (`false`).
    Watch(Vec<Value>, bool),
}

struct Resource {
    list_kind: &'static str,
    api_version: &'static str,
    lists: VecDeque<Reply>,
    watches: VecDeque<Reply>,
    /// Answered again when the list script is used up.
    last_list: Option<Reply>,
}

/// Decoded query pairs, in order.
type Query = Vec<(String, String)>;

#[derive(Default)]
struct Mock {
    resources: Mutex<HashMap<&'static str, Resource>>,
    /// Every request: path and decoded query pairs.
    requests: Mutex<Vec<(String, Query)>>,
    /// Every scripted answer: path, when, and whether it was a watch.
    answers: Mutex<Vec<(String, Instant, bool)>>,
    /// While true the server is away: every connection breaks and open watches end.
    down: Arc<tokio::sync::watch::Sender<bool>>,
    /// How many requests found the server away.
    broken: Mutex<usize>,
    /// Until then every request gets the `403` of a starting API server (its authorizer
    /// not yet synced), whatever the script says.
    starting_until: Mutex<Option<Instant>>,
}

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NODES: &str = "/api/v1/nodes";
const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const NETWORK_POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";

impl Mock {
    fn script(
        &self,
        path: &'static str,
        list_kind: &'static str,
        api_version: &'static str,
        lists: Vec<Reply>,
        watches: Vec<Reply>,
    ) {
        self.resources.lock().unwrap().insert(
            path,
            Resource {
                list_kind,
                api_version,
                lists: lists.into(),
                watches: watches.into(),
                last_list: None,
            },
        );
    }

    /// The server goes away (`true`) or comes back.
    fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }

    fn requests(&self, path: &str) -> Vec<HashMap<String, String>> {
        let requests = self.requests.lock().unwrap();
        requests
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, q)| q.iter().cloned().collect())
            .collect()
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).expect("a percent escape"));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn query_pairs(uri: &Uri) -> Query {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// The selectors this mock understands: `metadata.name=X` fields, `!key` labels.
fn selected(obj: &Value, query: &[(String, String)]) -> bool {
    for (k, v) in query {
        match k.as_str() {
            "fieldSelector" => {
                for term in v.split(',') {
                    let (field, want) = term.split_once('=').expect("field=value");
                    assert_eq!(field, "metadata.name", "the mock knows only metadata.name");
                    if obj["metadata"]["name"] != want {
                        return false;
                    }
                }
            }
            "labelSelector" => {
                for term in v.split(',') {
                    let key = term.strip_prefix('!').expect("the mock knows only !key");
                    if obj["metadata"]["labels"].get(key).is_some() {
                        return false;
                    }
                }
            }
            _ => {}
        }
    }
    true
}

fn status_response(status: &Value) -> Response {
    let code = StatusCode::from_u16(status["code"].as_u64().unwrap() as u16).unwrap();
    (code, [("content-type", "application/json")], status.to_string()).into_response()
}

async fn handle(State(mock): State<Arc<Mock>>, uri: Uri) -> Response {
    let path = uri.path().to_string();
    let query = query_pairs(&uri);
    mock.requests.lock().unwrap().push((path.clone(), query.clone()));
    let watch = query.iter().any(|(k, v)| k == "watch" && v == "true");
    if *mock.down.borrow() {
        *mock.broken.lock().unwrap() += 1;
        // The connection breaks (not a 503, which kube's client retries by itself).
        let broken = futures::stream::once(async {
            Err::<Bytes, std::io::Error>(std::io::Error::other("the server is away"))
        });
        return Body::from_stream(broken).into_response();
    }
    if mock
        .starting_until
        .lock()
        .unwrap()
        .is_some_and(|t| Instant::now() < t)
    {
        let forbidden = "services is forbidden: User \"system:serviceaccount:kube-system:ferry-proxy\" \
                         cannot list resource \"services\": RBAC: clusterrole.rbac.authorization.k8s.io \
                         \"ferry-proxy\" not found";
        return status_response(&status(403, "Forbidden", forbidden));
    }
    let (reply, list_kind, api_version) = {
        let mut resources = mock.resources.lock().unwrap();
        let Some(r) = resources.get_mut(path.as_str()) else {
            return (StatusCode::NOT_FOUND, "404 page not found").into_response();
        };
        let reply = if watch {
            r.watches.pop_front().unwrap_or(Reply::Watch(vec![], true))
        } else {
            let reply = r
                .lists
                .pop_front()
                .or_else(|| r.last_list.clone())
                .expect("a scripted list");
            if matches!(reply, Reply::List(..)) {
                r.last_list = Some(reply.clone());
            }
            reply
        };
        (reply, r.list_kind, r.api_version)
    };
    mock.answers
        .lock()
        .unwrap()
        .push((path.clone(), Instant::now(), watch));
    match reply {
        Reply::Status(status) => status_response(&status),
        Reply::List(rv, items) => {
            assert!(!watch);
            let items: Vec<Value> = items
                .into_iter()
                .filter(|o| selected(o, &query))
                .map(|mut o| {
                    // A real list's items carry no kind or apiVersion.
                    let m = o.as_object_mut().unwrap();
                    m.remove("kind");
                    m.remove("apiVersion");
                    o
                })
                .collect();
            let body = json!({
                "kind": list_kind,
                "apiVersion": api_version,
                "metadata": { "resourceVersion": rv },
                "items": items,
            });
            ([("content-type", "application/json")], body.to_string()).into_response()
        }
        Reply::Watch(events, keep_open) => {
            assert!(watch);
            let lines: Vec<Result<Bytes, Infallible>> = events
                .into_iter()
                .filter(|e| {
                    e["type"] != "ADDED" && e["type"] != "MODIFIED" && e["type"] != "DELETED"
                        || selected(&e["object"], &query)
                })
                .map(|e| Ok(Bytes::from(format!("{e}\n"))))
                .collect();
            let stream = futures::stream::iter(lines);
            let body = if keep_open {
                // Open until the server goes away.
                let mut down = mock.down.subscribe();
                let outage = futures::stream::once(async move {
                    let _ = down.wait_for(|d| *d).await;
                })
                .filter_map(|()| async { None });
                Body::from_stream(stream.chain(outage))
            } else {
                Body::from_stream(stream)
            };
            ([("content-type", "application/json")], body).into_response()
        }
    }
}

async fn start(mock: Arc<Mock>) -> SocketAddr {
    start_on(mock, tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()).await
}

async fn start_on(mock: Arc<Mock>, listener: tokio::net::TcpListener) -> SocketAddr {
    let app = Router::new()
        .route(SERVICES, get(handle))
        .route(SLICES, get(handle))
        .route(NODES, get(handle))
        .route(PODS, get(handle))
        .route(NAMESPACES, get(handle))
        .route(NETWORK_POLICIES, get(handle))
        .with_state(mock);
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

// ---------------------------------------------------------------------------------------
// Realistic objects, as `kubectl get -o json` shows them.

fn service(rv: &str, target_port: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "web",
            "namespace": "default",
            "uid": "0b5f4d8e-7d0a-4a55-9f35-2c1f0c3c9e11",
            "resourceVersion": rv,
            "creationTimestamp": "2025-05-01T10:00:00Z",
            "labels": { "app": "web" },
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\",\"kind\":\"Service\"}\n",
                "example.com/owner": "team-a"
            },
            "managedFields": [{
                "manager": "kubectl-client-side-apply",
                "operation": "Update",
                "apiVersion": "v1",
                "time": "2025-05-01T10:00:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": { "f:spec": { "f:ports": {} } }
            }]
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.12.34",
            "clusterIPs": ["10.96.12.34"],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "ports": [
                { "name": "http", "port": 80, "protocol": "TCP", "targetPort": target_port },
                { "name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353 }
            ],
            "selector": { "app": "web" },
            "sessionAffinity": "None"
        },
        "status": { "loadBalancer": {} }
    })
}

fn lb_service(name: &str, rv: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": "shop", "resourceVersion": rv,
                      "creationTimestamp": "2025-05-01T10:05:00Z" },
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "10.96.40.2",
            "clusterIPs": ["10.96.40.2", "fd00:10:96::40:2"],
            "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "PreferDualStack",
            "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 31999,
            "allocateLoadBalancerNodePorts": true,
            "ports": [{ "port": 443, "protocol": "TCP", "targetPort": 8443, "nodePort": 30443 }],
            "selector": { "app": name },
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 10800 } }
        },
        "status": { "loadBalancer": { "ingress": [{ "ip": "203.0.113.10", "ipMode": "VIP" }] } }
    })
}

/// A Service another proxy handles: the label selector keeps it away from Ferry.
fn other_proxys_service() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": "mesh", "namespace": "default", "resourceVersion": "80",
                      "labels": { "service.kubernetes.io/service-proxy-name": "other-proxy" } },
        "spec": { "type": "ClusterIP", "clusterIP": "10.96.0.99", "ports": [{ "port": 80, "protocol": "TCP" }] }
    })
}

fn slice(rv: &str, second_terminating: bool) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-7xk2p",
            "generateName": "web-",
            "namespace": "default",
            "resourceVersion": rv,
            "creationTimestamp": "2025-05-01T10:00:01Z",
            "labels": {
                "kubernetes.io/service-name": "web",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
            },
            "ownerReferences": [{ "apiVersion": "v1", "kind": "Service", "name": "web",
                                  "uid": "0b5f4d8e-7d0a-4a55-9f35-2c1f0c3c9e11",
                                  "controller": true, "blockOwnerDeletion": true }]
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": ["10.244.1.5"],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "nodeName": "node-a",
                "zone": "zone-1",
                "targetRef": { "kind": "Pod", "namespace": "default", "name": "web-5d9c7-abcde",
                               "uid": "7e1c2b1a-0000-4000-8000-000000000001" }
            },
            {
                "addresses": ["10.244.2.9"],
                "conditions": { "ready": !second_terminating, "serving": true, "terminating": second_terminating },
                "nodeName": "node-b",
                "zone": "zone-2",
                "targetRef": { "kind": "Pod", "namespace": "default", "name": "web-5d9c7-fghij",
                               "uid": "7e1c2b1a-0000-4000-8000-000000000002" }
            }
        ],
        "ports": [
            { "name": "http", "port": 8080, "protocol": "TCP" },
            { "name": "dns", "port": 5353, "protocol": "UDP" }
        ]
    })
}

/// The EndpointSlice of a headless Service: filtered by the label selector, as in kube-proxy.
fn headless_slice() -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": { "name": "db-q2w3e", "namespace": "default", "resourceVersion": "41",
                      "labels": { "kubernetes.io/service-name": "db", "service.kubernetes.io/headless": "" } },
        "addressType": "IPv4",
        "endpoints": [{ "addresses": ["10.244.1.8"], "conditions": { "ready": true } }],
        "ports": [{ "port": 5432, "protocol": "TCP" }]
    })
}

fn node(name: &str, rv: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "resourceVersion": rv,
            "uid": "5c0b7a52-1111-4222-8333-444455556666",
            "creationTimestamp": "2025-04-30T08:00:00Z",
            "labels": { "kubernetes.io/hostname": name, "kubernetes.io/os": "linux" }
        },
        "spec": { "podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"] },
        "status": {
            "addresses": [{ "type": "InternalIP", "address": ip }, { "type": "Hostname", "address": name }],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": "2025-05-01T10:00:00Z", "lastTransitionTime": "2025-04-30T08:00:30Z"
            }],
            "nodeInfo": {
                "architecture": "amd64", "bootID": "b", "containerRuntimeVersion": "containerd://2.0.3",
                "kernelVersion": "6.12.0", "kubeProxyVersion": "", "kubeletVersion": "v1.33.1",
                "machineID": "m", "operatingSystem": "linux", "osImage": "Debian GNU/Linux 12", "systemUUID": "s"
            }
        }
    })
}

fn pod(name: &str, rv: &str, ip: Option<&str>) -> Value {
    let status = match ip {
        Some(ip) => json!({ "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }],
                            "conditions": [{ "type": "Ready", "status": "True" }] }),
        None => json!({ "phase": "Pending" }),
    };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "default", "resourceVersion": rv,
            "uid": "7e1c2b1a-0000-4000-8000-000000000001",
            "labels": { "app": "web", "pod-template-hash": "5d9c7" },
            "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d9c7",
                                  "uid": "u", "controller": true }]
        },
        "spec": {
            "nodeName": "node-a",
            "containers": [{ "name": "web", "image": "nginx:1.27",
                             "ports": [{ "name": "http", "containerPort": 8080, "protocol": "TCP" }] }]
        },
        "status": status
    })
}

fn namespace(name: &str, rv: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name, "resourceVersion": rv,
                      "labels": { "kubernetes.io/metadata.name": name } },
        "spec": { "finalizers": ["kubernetes"] },
        "status": { "phase": "Active" }
    })
}

/// A NetworkPolicy as the API server serves it.
fn network_policy(name: &str, rv: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": name, "namespace": "shop", "resourceVersion": rv },
        "spec": { "podSelector": { "matchLabels": { "app": "web" } },
                  "ingress": [{ "ports": [{ "port": "http", "protocol": "TCP" }] }],
                  "policyTypes": ["Ingress"] }
    })
}

/// No EndpointSlice and this node (`node-a`), listed once, then quiet watches: for tests
/// about how the other kinds are listed and watched.
fn script_quiet_slices_and_node(mock: &Mock) {
    mock.script(
        SLICES,
        "EndpointSliceList",
        "discovery.k8s.io/v1",
        vec![Reply::List("3", vec![])],
        vec![],
    );
    mock.script(
        NODES,
        "NodeList",
        "v1",
        vec![Reply::List("3", vec![node("node-a", "1", "10.0.0.5")])],
        vec![],
    );
}

/// Pods and Namespaces that list `items`, and no NetworkPolicy, then watch quietly.
fn script_policy_kinds(mock: &Mock, pods: Vec<Value>, namespaces: Vec<Value>) {
    mock.script(
        NETWORK_POLICIES,
        "NetworkPolicyList",
        "networking.k8s.io/v1",
        vec![Reply::List("9", vec![])],
        vec![],
    );
    mock.script(PODS, "PodList", "v1", vec![Reply::List("9", pods)], vec![]);
    mock.script(
        NAMESPACES,
        "NamespaceList",
        "v1",
        vec![Reply::List("9", namespaces)],
        vec![],
    );
}

fn event(kind: &str, object: Value) -> Value {
    json!({ "type": kind, "object": object })
}

fn bookmark(kind: &str, api_version: &str, rv: &str) -> Value {
    json!({ "type": "BOOKMARK",
            "object": { "kind": kind, "apiVersion": api_version, "metadata": { "resourceVersion": rv } } })
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code })
}

/// What the source hands on: the object in the store's slim form.
fn svc(v: Value) -> Object {
    Object::from(serde_json::from_value::<Service>(v).unwrap())
}
fn eps(v: Value) -> Object {
    Object::from(serde_json::from_value::<EndpointSlice>(v).unwrap())
}
fn nod(v: Value) -> Object {
    Object::from(serde_json::from_value::<Node>(v).unwrap())
}

// ---------------------------------------------------------------------------------------
// Collecting events.

fn kind_of(e: &Event) -> Kind {
    match e {
        Event::Snapshot { kinds, .. } => {
            assert_eq!(kinds.len(), 1, "one kind per API snapshot: {e:?}");
            kinds[0]
        }
        Event::Upsert(o) | Event::Delete(o) => o.kind(),
        Event::Error(e) => {
            let m = e.to_string();
            [
                ("watching services", Kind::Service),
                ("watching endpointslices", Kind::EndpointSlice),
                ("watching nodes", Kind::Node),
                ("watching pods", Kind::Pod),
                ("watching namespaces", Kind::Namespace),
                ("watching networkpolicies", Kind::NetworkPolicy),
            ]
            .into_iter()
            .find(|(prefix, _)| m.starts_with(prefix))
            .unwrap_or_else(|| panic!("an error that names no resource: {m}"))
            .1
        }
    }
}

/// Receives until each kind has at least `want[kind]` events; returns them per kind.
async fn collect(rx: &mut mpsc::Receiver<Event>, want: &[(Kind, usize)]) -> HashMap<Kind, Vec<Event>> {
    let mut got: HashMap<Kind, Vec<Event>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while want.iter().any(|(k, n)| got.get(k).map_or(0, Vec::len) < *n) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => got.entry(kind_of(&e)).or_default().push(e),
            Ok(None) => panic!("the source ended; so far: {got:#?}"),
            Err(_) => panic!("timed out; so far: {got:#?}"),
        }
    }
    got
}

fn snapshot(kind: Kind, objects: Vec<Object>) -> Event {
    Event::Snapshot {
        kinds: vec![kind],
        objects,
    }
}

fn error_text(e: &Event) -> String {
    match e {
        Event::Error(error) => error.to_string(),
        other => panic!("expected an Error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn list_watch_errors_and_resync_against_a_mock_api_server() {
    let mock = Arc::new(Mock::default());
    let web_v2 = service("101", json!(8080));
    mock.script(
        SERVICES,
        "ServiceList",
        "v1",
        vec![
            Reply::List("100", vec![service("90", json!("http")), other_proxys_service()]),
            // The relist after 410 Gone.
            Reply::List("200", vec![web_v2.clone(), lb_service("shop", "150")]),
        ],
        vec![
            Reply::Watch(
                vec![
                    event("MODIFIED", web_v2.clone()),
                    event("ADDED", lb_service("shop", "102")),
                    event("MODIFIED", other_proxys_service()), // filtered by the selector
                    bookmark("Service", "v1", "103"),
                    event("DELETED", lb_service("shop", "104")),
                    // The API server's answer when the watch fell out of its window.
                    event(
                        "ERROR",
                        status(410, "Expired", "too old resource version: 104 (190)"),
                    ),
                ],
                false,
            ),
            Reply::Watch(vec![], true),
        ],
    );
    mock.script(
        SLICES,
        "EndpointSliceList",
        "discovery.k8s.io/v1",
        vec![
            Reply::Status(status(
                403,
                "Forbidden",
                "endpointslices.discovery.k8s.io is forbidden: User \"system:serviceaccount:kube-system:ferry-proxy\" \
                 cannot list resource \"endpointslices\" in API group \"discovery.k8s.io\" at the cluster scope",
            )),
            Reply::Status(status(500, "InternalError", "Internal error occurred: etcdserver: request timed out")),
            Reply::List("50", vec![slice("45", false), headless_slice()]),
        ],
        vec![Reply::Watch(vec![event("MODIFIED", slice("51", true))], true)],
    );
    mock.script(
        NODES,
        "NodeList",
        "v1",
        vec![Reply::List(
            "7",
            vec![
                node("node-a", "5", "172.18.0.3"),
                node("node-b", "6", "172.18.0.4"),
            ],
        )],
        vec![
            // A server that refuses to start a watch from an expired resourceVersion with
            // HTTP 410 (kube-apiserver sends an ERROR event instead, as for Services above).
            Reply::Status(status(410, "Expired", "too old resource version: 7 (12)")),
            Reply::Watch(vec![event("MODIFIED", node("node-b", "8", "172.18.0.4"))], true),
        ],
    );
    mock.script(
        PODS,
        "PodList",
        "v1",
        vec![Reply::List("60", vec![pod("web-1", "58", None)])],
        vec![Reply::Watch(
            vec![event("MODIFIED", pod("web-1", "61", Some("10.244.1.5")))],
            true,
        )],
    );
    mock.script(
        NAMESPACES,
        "NamespaceList",
        "v1",
        vec![Reply::List("3", vec![namespace("default", "1")])],
        vec![],
    );
    mock.script(
        NETWORK_POLICIES,
        "NetworkPolicyList",
        "networking.k8s.io/v1",
        vec![Reply::List("7", vec![network_policy("web-http", "6")])],
        vec![Reply::Watch(
            vec![event("DELETED", network_policy("web-http", "8"))],
            true,
        )],
    );
    let addr = start(mock.clone()).await;

    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let client = api_source::client_from(config).unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let source = tokio::spawn(async move { api_source::watch(client, "node-a", tx).await });

    let got = collect(
        &mut rx,
        &[
            (Kind::Service, 6),
            (Kind::EndpointSlice, 4),
            (Kind::Node, 3),
            (Kind::Pod, 2),
            (Kind::Namespace, 1),
            (Kind::NetworkPolicy, 2),
        ],
    )
    .await;

    // Services: list, three watch events (the bookmark and the other proxy's Service
    // leave no trace), 410 Gone, relist.
    let s = &got[&Kind::Service];
    assert_eq!(
        s[0],
        snapshot(Kind::Service, vec![svc(service("90", json!("http")))])
    );
    assert_eq!(s[1], Event::Upsert(svc(web_v2.clone())));
    assert_eq!(s[2], Event::Upsert(svc(lb_service("shop", "102"))));
    assert_eq!(s[3], Event::Delete(svc(lb_service("shop", "104"))));
    let gone = error_text(&s[4]);
    assert!(
        gone.contains("410") || gone.contains("too old resource version"),
        "{gone}"
    );
    assert!(gone.contains("relisting"), "{gone}");
    assert_eq!(
        s[5],
        snapshot(Kind::Service, vec![svc(web_v2), svc(lb_service("shop", "150"))])
    );

    // EndpointSlices: 403 (the message says what to grant), 500, then the list and a watch
    // event; the headless Service's slice is filtered.
    let e = &got[&Kind::EndpointSlice];
    let forbidden = error_text(&e[0]);
    let Event::Error(typed) = &e[0] else {
        unreachable!()
    };
    assert!(typed.is_retryable(), "a 403 may pass once RBAC is granted");
    // One 403 may be a starting API server: the RBAC advice waits until 403s persist
    // (`a_forbidden_that_lasts_asks_for_rbac`).
    assert!(
        forbidden.contains("forbidden") && forbidden.contains("retrying"),
        "{forbidden}"
    );
    assert!(!forbidden.contains("conf/ferry.yaml"), "{forbidden}");
    let internal = error_text(&e[1]);
    assert!(
        internal.contains("etcdserver: request timed out") && internal.contains("retrying"),
        "{internal}"
    );
    assert_eq!(e[2], snapshot(Kind::EndpointSlice, vec![eps(slice("45", false))]));
    assert_eq!(e[3], Event::Upsert(eps(slice("51", true))));
    let Event::Upsert(Object::EndpointSlice(es)) = &e[3] else {
        unreachable!()
    };
    let second = &es.endpoints[1];
    assert_eq!(
        (second.ready, second.serving, second.terminating),
        (false, true, true)
    );
    assert_eq!(es.endpoints[0].node_name.as_deref(), Some("node-a"));

    // Pods and Namespaces, slim: the Pending Pod, then the same Pod Running with its address.
    let p = &got[&Kind::Pod];
    let pending = Object::from(serde_json::from_value::<Pod>(pod("web-1", "58", None)).unwrap());
    assert_eq!(p[0], snapshot(Kind::Pod, vec![pending]));
    let Event::Upsert(Object::Pod(running)) = &p[1] else {
        panic!("not a Pod update: {:?}", p[1])
    };
    assert_eq!(running.ips, ["10.244.1.5".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(running.labels.get("app"), Some("web"));
    let default_ns = Object::from(serde_json::from_value::<Namespace>(namespace("default", "1")).unwrap());
    assert_eq!(
        got[&Kind::Namespace][0],
        snapshot(Kind::Namespace, vec![default_ns])
    );

    // NetworkPolicies: validated into the store's form on the way, then deleted.
    let np = &got[&Kind::NetworkPolicy];
    let Event::Snapshot { objects, .. } = &np[0] else {
        panic!("not a snapshot: {:?}", np[0])
    };
    let [Object::NetworkPolicy(web_http)] = &objects[..] else {
        panic!("{objects:?}")
    };
    assert_eq!((&*web_http.namespace, &*web_http.name), ("shop", "web-http"));
    assert_eq!(web_http.ingress.as_ref().map(Vec::len), Some(1));
    assert!(matches!(&np[1], Event::Delete(Object::NetworkPolicy(p)) if &*p.name == "web-http"));

    // Nodes: only ours (the field selector keeps node-b's change away too); the watch
    // refused with HTTP 410 leads to a new list rather than retrying the stale version.
    let n = &got[&Kind::Node];
    let node_a = snapshot(Kind::Node, vec![nod(node("node-a", "5", "172.18.0.3"))]);
    assert_eq!(n[0], node_a);
    let gone = error_text(&n[1]);
    assert!(
        gone.contains("too old resource version") && gone.contains("relisting"),
        "{gone}"
    );
    assert_eq!(n[2], node_a);

    // The requests kube-runtime made, and that the mock answered as the API server would.
    let selector = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
    let svc_requests = mock.requests(SERVICES);
    let lists: Vec<_> = svc_requests.iter().filter(|q| !q.contains_key("watch")).collect();
    let watches: Vec<_> = svc_requests.iter().filter(|q| q.contains_key("watch")).collect();
    assert_eq!(lists.len(), 2, "{svc_requests:?}");
    for q in &lists {
        assert_eq!(q.get("limit").map(String::as_str), Some("500"), "{q:?}");
        assert_eq!(q.get("labelSelector").map(String::as_str), Some(selector));
        assert!(
            !q.contains_key("resourceVersion"),
            "a most-recent (quorum) list: {q:?}"
        );
    }
    assert_eq!(
        watches[0].get("resourceVersion").map(String::as_str),
        Some("100"),
        "{watches:?}"
    );
    assert_eq!(
        watches[1].get("resourceVersion").map(String::as_str),
        Some("200"),
        "{watches:?}"
    );
    for q in &watches {
        assert_eq!(q.get("allowWatchBookmarks").map(String::as_str), Some("true"));
        assert_eq!(q.get("timeoutSeconds").map(String::as_str), Some("290"));
        assert_eq!(q.get("labelSelector").map(String::as_str), Some(selector));
        assert!(
            !q.contains_key("sendInitialEvents"),
            "ListWatch, not streaming lists: {q:?}"
        );
    }
    assert_eq!(
        mock.requests(SLICES)
            .iter()
            .filter(|q| !q.contains_key("watch"))
            .count(),
        3
    );
    let node_requests = mock.requests(NODES);
    let node_lists = node_requests.iter().filter(|q| !q.contains_key("watch")).count();
    assert_eq!(node_lists, 2, "{node_requests:?}");
    for q in node_requests {
        assert_eq!(
            q.get("fieldSelector").map(String::as_str),
            Some("metadata.name=node-a"),
            "{q:?}"
        );
        assert!(!q.contains_key("labelSelector"));
    }

    // Dropping the receiver ends the source, even while every watch is idle.
    drop(rx);
    let result = tokio::time::timeout(Duration::from_secs(5), source)
        .await
        .expect("the source ends");
    result.unwrap().unwrap();
}

/// A mock API server with one Service and nothing else, for the connection tests.
async fn one_service_api_server() -> std::net::SocketAddr {
    let mock = Arc::new(Mock::default());
    mock.script(
        SERVICES,
        "ServiceList",
        "v1",
        vec![Reply::List("3", vec![service("2", json!(8080))])],
        vec![],
    );
    script_quiet_slices_and_node(&mock);
    script_policy_kinds(&mock, vec![], vec![namespace("default", "1")]);
    let addr = start(mock).await;
    addr
}

#[tokio::test]
async fn run_with_a_kubeconfig_file() {
    let addr = one_service_api_server().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = write_kubeconfig(dir.path(), "kubeconfig", &format!("http://{addr}"));

    let (tx, mut rx) = mpsc::channel(16);
    let connection = api_source::Connection {
        kubeconfig: Some(kubeconfig.clone()),
        api_server_from: None,
    };
    let source = tokio::spawn(api_source::run(connection, "node-a".to_string(), tx));
    let got = collect(
        &mut rx,
        &[(Kind::Service, 1), (Kind::EndpointSlice, 1), (Kind::Node, 1)],
    )
    .await;
    assert_eq!(
        got[&Kind::Service],
        vec![snapshot(Kind::Service, vec![svc(service("2", json!(8080)))])]
    );
    assert_eq!(
        got[&Kind::EndpointSlice],
        vec![snapshot(Kind::EndpointSlice, vec![])]
    );
    assert_eq!(
        got[&Kind::Node],
        vec![snapshot(Kind::Node, vec![nod(node("node-a", "1", "10.0.0.5"))])]
    );
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), source)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // A kubeconfig that is not there: the error names the flag and the path.
    let (tx, _rx) = mpsc::channel(1);
    let missing = dir.path().join("missing");
    let connection = api_source::Connection {
        kubeconfig: Some(missing.clone()),
        api_server_from: None,
    };
    let err = api_source::run(connection, "node-a".into(), tx)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("--kubeconfig {}", missing.display())),
        "{err}"
    );
    assert!(!err.is_retryable(), "a missing kubeconfig stays missing");
}

/// `--api-server-from`: the credentials come from where they always do (here a kubeconfig
/// whose own server is closed), the address from the other file (the kubelet's), so the
/// proxy lists from the server that file names.
#[tokio::test]
async fn the_api_server_address_from_the_kubelets_kubeconfig() {
    let addr = one_service_api_server().await;
    let dir = tempfile::tempdir().unwrap();
    let credentials = write_kubeconfig(dir.path(), "credentials", "http://127.0.0.1:1");
    let kubelet = write_kubeconfig(dir.path(), "kubelet.conf", &format!("http://{addr}"));

    let (tx, mut rx) = mpsc::channel(16);
    let connection = api_source::Connection {
        kubeconfig: Some(credentials.clone()),
        api_server_from: Some(kubelet),
    };
    let source = tokio::spawn(api_source::run(connection, "node-a".to_string(), tx));
    let got = collect(&mut rx, &[(Kind::Service, 1)]).await;
    assert_eq!(
        got[&Kind::Service],
        vec![snapshot(Kind::Service, vec![svc(service("2", json!(8080)))])]
    );
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), source)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // A file that is not there, or names no server: the error says which flag and file.
    let no_server = dir.path().join("no-server");
    std::fs::write(&no_server, "apiVersion: v1\nkind: Config\n").unwrap();
    for bad in [dir.path().join("missing"), no_server] {
        let (tx, _rx) = mpsc::channel(1);
        let connection = api_source::Connection {
            kubeconfig: Some(credentials.clone()),
            api_server_from: Some(bad.clone()),
        };
        let err = api_source::run(connection, "node-a".into(), tx)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("--api-server-from {}", bad.display())),
            "{err}"
        );
        assert!(!err.is_retryable(), "{err}");
    }
}

/// Receives events of `kind` (dropping the others) with the time each arrived, until one
/// matches `done`.
async fn until(
    rx: &mut mpsc::Receiver<Event>,
    kind: Kind,
    done: impl Fn(&Event) -> bool,
) -> Vec<(Instant, Event)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) if kind_of(&e) == kind => {
                let last = done(&e);
                got.push((Instant::now(), e));
                if last {
                    return got;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the source ended; so far: {got:#?}"),
            Err(_) => panic!("timed out; so far: {got:#?}"),
        }
    }
}

fn is_snapshot(e: &Event) -> bool {
    matches!(e, Event::Snapshot { .. })
}

/// Issue 10, item 9: an API server restarted after an outage answers `403` for its first
/// seconds, then starts the watch and says inside it that the resourceVersion is too old.
/// The source relists at once (not after the backoff the outage grew), does not blame RBAC
/// for the starting server's `403`s, and a success resets the backoff.
#[tokio::test]
async fn after_an_api_server_restart_a_new_service_arrives_within_2_s() {
    let mock = Arc::new(Mock::default());
    let web = service("90", json!(8080));
    let late = lb_service("late", "250");
    mock.script(
        SERVICES,
        "ServiceList",
        "v1",
        vec![
            Reply::List("100", vec![web.clone()]),
            Reply::List("300", vec![web.clone(), late.clone()]),
        ],
        vec![
            Reply::Watch(vec![], true),
            Reply::Watch(
                vec![event(
                    "ERROR",
                    status(410, "Expired", "too old resource version: 100 (280)"),
                )],
                true,
            ),
            Reply::Status(status(500, "InternalError", "etcdserver: leader changed")),
            Reply::Watch(vec![event("ADDED", lb_service("later", "301"))], true),
        ],
    );
    script_quiet_slices_and_node(&mock);
    script_policy_kinds(&mock, vec![], vec![]);
    let addr = start(mock.clone()).await;
    let client =
        api_source::client_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap();
    let (tx, mut rx) = mpsc::channel(256);
    let _source = tokio::spawn(async move { api_source::watch(client, "node-a", tx).await });

    let first = until(&mut rx, Kind::Service, is_snapshot).await;
    assert_eq!(
        first.last().unwrap().1,
        snapshot(Kind::Service, vec![svc(web.clone())])
    );

    // Once the watch is open: away for 3 s (the backoff grows to 3.2 s), then 403s for 3 s
    // while it starts.
    while !mock
        .answers
        .lock()
        .unwrap()
        .iter()
        .any(|(p, _, watch)| p == SERVICES && *watch)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    mock.set_down(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    *mock.starting_until.lock().unwrap() = Some(Instant::now() + Duration::from_secs(3));
    mock.set_down(false);

    let back = until(&mut rx, Kind::Service, is_snapshot).await;
    let (arrived, relisted) = back.last().unwrap();
    assert_eq!(*relisted, snapshot(Kind::Service, vec![svc(web), svc(late)]));
    let errors: Vec<String> = back
        .iter()
        .filter(|(_, e)| matches!(e, Event::Error(_)))
        .map(|(_, e)| error_text(e))
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("forbidden")),
        "the starting server's 403s: {errors:#?}"
    );
    for e in &errors {
        assert!(
            !e.contains("conf/ferry.yaml"),
            "a starting server's 403 is no RBAC problem: {e}"
        );
    }
    assert!(
        errors
            .iter()
            .any(|e| e.contains("too old resource version") && e.contains("relisting")),
        "{errors:#?}"
    );
    // The late Service was created before the watch that said 410: it is in the relist,
    // which follows that watch at once.
    let answers = mock.answers.lock().unwrap().clone();
    let watches: Vec<Instant> = answers
        .iter()
        .filter(|(p, _, watch)| p == SERVICES && *watch)
        .map(|(_, t, _)| *t)
        .collect();
    let gone_at = watches[1];
    let waited = arrived.duration_since(gone_at);
    assert!(
        waited < Duration::from_secs(2),
        "the relist after the in-stream 410 came {waited:?} after the server was back"
    );

    // The list succeeded, so the next failure waits the first delay (0.8 s), not the
    // grown one.
    let next = until(&mut rx, Kind::Service, |e| matches!(e, Event::Upsert(_))).await;
    let failed_at = next
        .iter()
        .find(|(_, e)| error_text_opt(e).is_some_and(|t| t.contains("leader changed")))
        .expect("the 500 after the relist")
        .0;
    let (upserted_at, upsert) = next.last().unwrap();
    assert_eq!(*upsert, Event::Upsert(svc(lb_service("later", "301"))));
    let waited = upserted_at.duration_since(failed_at);
    assert!(
        waited < Duration::from_millis(1500),
        "after a success the backoff starts again at 0.8 s; waited {waited:?}"
    );
}

fn error_text_opt(e: &Event) -> Option<String> {
    match e {
        Event::Error(error) => Some(error.to_string()),
        _ => None,
    }
}

/// `403`s that outlast a starting API server's are RBAC's: then, and not before, the error
/// says which permission to grant and where.
#[tokio::test]
async fn a_forbidden_that_lasts_asks_for_rbac() {
    let mock = Arc::new(Mock::default());
    let forbidden = status(
        403,
        "Forbidden",
        "services is forbidden: User \"system:serviceaccount:kube-system:ferry-proxy\" cannot list \
         resource \"services\" in API group \"\" at the cluster scope",
    );
    let mut lists = vec![Reply::Status(forbidden); 10];
    lists.push(Reply::List("3", vec![]));
    mock.script(SERVICES, "ServiceList", "v1", lists, vec![]);
    script_quiet_slices_and_node(&mock);
    script_policy_kinds(&mock, vec![], vec![]);
    let addr = start(mock.clone()).await;
    let client =
        api_source::client_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap();
    let (tx, mut rx) = mpsc::channel(256);
    let _source = tokio::spawn(async move { api_source::watch(client, "node-a", tx).await });

    let got = until(&mut rx, Kind::Service, is_snapshot).await;
    let errors: Vec<(Instant, String)> = got
        .iter()
        .filter_map(|(t, e)| error_text_opt(e).map(|m| (*t, m)))
        .collect();
    assert_eq!(errors.len(), 10, "{errors:#?}");
    let (first_at, first) = &errors[0];
    assert!(
        !first.contains("conf/ferry.yaml") && first.contains("retrying"),
        "{first}"
    );
    let (last_at, last) = errors.last().unwrap();
    assert!(
        last_at.duration_since(*first_at) >= api_source::FORBIDDEN_GRACE,
        "{errors:#?}"
    );
    assert!(
        last.contains("get/list/watch on services") && last.contains("conf/ferry.yaml"),
        "{last}"
    );
    for (at, e) in &errors {
        if at.duration_since(*first_at) + Duration::from_millis(200) < api_source::FORBIDDEN_GRACE {
            assert!(!e.contains("conf/ferry.yaml"), "too early for RBAC advice: {e}");
        }
    }
}

/// A listening socket on the loopback of `netns` (opened on a thread that entered it; the
/// socket stays there).
fn listener_in(netns: &ferry_tests::Netns) -> tokio::net::TcpListener {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(netns.path()).unwrap();
    let listener = std::thread::spawn(move || {
        // SAFETY: setns on an open namespace fd, on this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    })
    .join()
    .unwrap();
    listener.set_nonblocking(true).unwrap();
    tokio::net::TcpListener::from_std(listener).unwrap()
}

/// Issue 10, item 10: `ferry-proxy run` against an API server that goes away for 2.5 s and
/// comes back (restarted: each watch is told in-stream that its version is too old). Each
/// failed request is one log line with its retry delay, each watch says once that it is
/// back, no line carries a colour escape when stderr is no terminal, and `--log-format
/// json` lines parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_each_failure_once_and_each_recovery() {
    ferry_tests::require_root!();
    let paths = [SERVICES, SLICES, NODES, PODS, NAMESPACES, NETWORK_POLICIES];
    for format in ["text", "json"] {
        let netns = ferry_tests::Netns::new("plog");
        let mock = Arc::new(Mock::default());
        let gone = || {
            let e = event("ERROR", status(410, "Expired", "too old resource version: 3 (9)"));
            vec![Reply::Watch(vec![], true), Reply::Watch(vec![e], true)]
        };
        let web = service("2", json!(8080));
        mock.script(
            SERVICES,
            "ServiceList",
            "v1",
            vec![Reply::List("3", vec![web])],
            gone(),
        );
        let slices = vec![Reply::List("3", vec![])];
        mock.script(SLICES, "EndpointSliceList", "discovery.k8s.io/v1", slices, gone());
        let nodes = vec![Reply::List("3", vec![node("node-a", "1", "10.0.0.5")])];
        mock.script(NODES, "NodeList", "v1", nodes, gone());
        mock.script(PODS, "PodList", "v1", vec![Reply::List("3", vec![])], gone());
        let namespaces = vec![Reply::List("3", vec![namespace("default", "1")])];
        mock.script(NAMESPACES, "NamespaceList", "v1", namespaces, gone());
        let policies = vec![Reply::List("3", vec![])];
        mock.script(
            NETWORK_POLICIES,
            "NetworkPolicyList",
            "networking.k8s.io/v1",
            policies,
            gone(),
        );
        let addr = start_on(mock.clone(), listener_in(&netns)).await;

        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = write_kubeconfig(dir.path(), "kubeconfig", &format!("http://{addr}"));
        let stderr_path = dir.path().join("stderr");
        let mut child = netns
            .command(env!("CARGO_BIN_EXE_ferry-proxy"))
            .args(["run", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--hostname-override", "node-a", "--log-format", format])
            .args(["--healthz-bind-address", "127.0.0.1:0"])
            .args(["--metrics-bind-address", "127.0.0.1:0"])
            .env_remove("RUST_LOG")
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();

        let watches = |mock: &Mock| {
            let answers = mock.answers.lock().unwrap();
            paths.map(|p| answers.iter().filter(|(a, _, w)| a == p && *w).count())
        };
        let wait_for = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !done() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        wait_for("every watch", &|| watches(&mock).iter().all(|n| *n >= 1));
        mock.set_down(true);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        mock.set_down(false);
        // Back: the 410 watch, then the relist's watch, for every kind.
        wait_for("every watch back", &|| watches(&mock).iter().all(|n| *n >= 3));
        tokio::time::sleep(Duration::from_millis(300)).await;
        child.kill().unwrap();
        child.wait().unwrap();

        let log = std::fs::read(&stderr_path).unwrap();
        assert!(
            !log.contains(&0x1b),
            "an escape code in:\n{}",
            String::from_utf8_lossy(&log)
        );
        let log = String::from_utf8(log).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        // (level, message) of every line.
        let parsed: Vec<(String, String)> = lines
            .iter()
            .map(|line| {
                if format == "json" {
                    let v: Value =
                        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                    let level = v["level"].as_str().unwrap().to_string();
                    (level, v["fields"]["message"].as_str().unwrap_or("").to_string())
                } else {
                    let level = ["ERROR", "WARN", "INFO", "DEBUG"]
                        .into_iter()
                        .find(|l| line.contains(&format!(" {l} ")))
                        .unwrap_or("")
                        .to_string();
                    (level, line.to_string())
                }
            })
            .collect();
        let broken = *mock.broken.lock().unwrap();
        let failures: Vec<&String> = parsed
            .iter()
            .filter(|(level, _)| level == "WARN" || level == "ERROR")
            .map(|(_, m)| m)
            .collect();
        let retries = failures.iter().filter(|m| m.contains("next try in")).count();
        let relists = failures.iter().filter(|m| m.contains("relisting")).count();
        assert!(
            broken >= paths.len(),
            "every watch failed at least once: {broken}"
        );
        assert_eq!(retries, broken, "one line per failed request:\n{log}");
        assert_eq!(relists, paths.len(), "one line per 410:\n{log}");
        assert_eq!(failures.len(), broken + paths.len(), "no other warning:\n{log}");
        let back = parsed.iter().filter(|(_, m)| m.contains("again after")).count();
        assert_eq!(back, paths.len(), "one line per watch back:\n{log}");
        drop(netns);
    }
}
