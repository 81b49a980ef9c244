//! The Pod network's watcher of every Node (`network::nodes::watch`) against a mock API
//! server on loopback: the full list (no field selector: every Node, not just this one)
//! arrives as one snapshot, then watch events as upserts and deletes, with the Pod CIDRs
//! and InternalIPs the routes are made from.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::RawQuery;
use axum::routing::get;
use axum::Router;
use ferry_proxy::network::agent::NodeUpdate;
use futures::StreamExt;
use serde_json::{json, Value};

fn node(name: &str, rv: &str, cidr: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "resourceVersion": rv},
           "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
           "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
}

async fn nodes(RawQuery(query): RawQuery) -> axum::response::Response {
    let query = query.unwrap_or_default();
    assert!(
        !query.contains("fieldSelector"),
        "the Pod network needs every Node: {query}"
    );
    if query.contains("watch=true") {
        let events = [
            json!({"type": "ADDED", "object": node("c", "11", "10.244.2.0/24", "192.168.1.3")}),
            json!({"type": "DELETED", "object": node("b", "12", "10.244.1.0/24", "192.168.1.2")}),
        ];
        let lines: Vec<Result<Bytes, std::convert::Infallible>> =
            events.iter().map(|e| Ok(Bytes::from(format!("{e}\n")))).collect();
        // The stream stays open after the events, as a real watch does.
        let stream = futures::stream::iter(lines).chain(futures::stream::pending());
        return axum::response::Response::new(Body::from_stream(stream));
    }
    let list = json!({"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": "10"},
                      "items": [node("a", "5", "10.244.0.0/24", "192.168.1.1"),
                                node("b", "6", "10.244.1.0/24", "192.168.1.2")]});
    axum::response::Response::new(Body::from(list.to_string()))
}

#[tokio::test]
async fn every_node_is_listed_then_followed() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, Router::new().route("/api/v1/nodes", get(nodes)))
            .await
            .unwrap()
    });
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ferry_tests::write_kubeconfig(dir.path(), "kubeconfig", &format!("http://{addr}"));
    let (tx, rx) = std::sync::mpsc::channel();
    let connection = ferry_proxy::source::kube::Connection {
        kubeconfig: Some(kubeconfig),
        api_server_from: None,
    };
    tokio::spawn(ferry_proxy::network::nodes::watch(connection, tx));
    let updates = tokio::task::spawn_blocking(move || {
        (0..3)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).expect("a Node update"))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let NodeUpdate::Snapshot(listed) = &updates[0] else {
        panic!("first a snapshot: {updates:?}")
    };
    let names: Vec<&str> = listed.iter().map(|n| &*n.name).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(listed[1].pod_cidrs, ["10.244.1.0/24".parse().unwrap()]);
    assert_eq!(
        listed[1].internal_ips,
        ["192.168.1.2".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(
        matches!(&updates[1], NodeUpdate::Upsert(n) if &*n.name == "c"),
        "{updates:?}"
    );
    assert!(
        matches!(&updates[2], NodeUpdate::Delete(name) if &**name == "b"),
        "{updates:?}"
    );
}
