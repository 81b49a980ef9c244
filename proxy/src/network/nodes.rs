//! Every Node from the API server, for the Pod network. The daemon's own source watches
//! only this node's Node (all `/healthz` needs); routes need every peer, so the Pod network
//! runs a watcher of its own, with the source's retry and relist behaviour
//! ([`crate::source::kube::watch_kind`]). RBAC: `list`/`watch` on `nodes`, which the
//! ClusterRole grants already.

use std::sync::mpsc::Sender;

use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher;
use kube::Api;
use tracing::error;

use super::agent::NodeUpdate;
use crate::source::{kube as source, Kind};

/// Watches every Node and sends the changes to `to`; returns when `to`'s receiver is gone
/// or no client can be made (logged: the Pod network then keeps what is in place).
pub async fn watch(connection: source::Connection, to: Sender<NodeUpdate>) {
    let client = match source::config_from(&connection)
        .await
        .and_then(source::client_from)
    {
        Ok(client) => client,
        Err(e) => {
            error!("Pod network: cannot watch Nodes: {e}");
            return;
        }
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let watcher = source::watch_kind(
        Api::<Node>::all(client),
        watcher::Config::default(),
        Kind::Node,
        &tx,
    );
    let forward = async {
        while let Some(event) = rx.recv().await {
            if let Some(update) = NodeUpdate::from_event(&event) {
                if to.send(update).is_err() {
                    return;
                }
            }
        }
    };
    tokio::select! {
        () = watcher => {}
        () = forward => {}
    }
}
