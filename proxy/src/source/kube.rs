//! The Kubernetes API source: kube-runtime watchers for Services, EndpointSlices, this
//! node's Node, and every Pod, Namespace and NetworkPolicy (for the policy plan), turned
//! into [`Event`]s.
//!
//! API versions read: `v1` Services, Nodes, Pods and Namespaces, `discovery.k8s.io/v1`
//! EndpointSlices (GA since Kubernetes 1.21), `networking.k8s.io/v1` NetworkPolicies, so any API server from 1.21 on works; 1.25
//! and later are what is supported.
//!
//! Each object is converted to the store's slim form as it arrives
//! ([`crate::store::objects`]) and the decoded k8s-openapi object dropped at once, as
//! kube-rs reflectors do with `.modify()`: a relist of 10k Services never holds 10k whole
//! objects, only their slim copies.
//!
//! Each kind has its own watcher (list, then watch from the list's resourceVersion, with
//! bookmarks). A (re)list becomes one [`Event::Snapshot`] naming that kind, a watch event
//! an [`Event::Upsert`] or [`Event::Delete`]. A failure (the API server unreachable, a
//! `403`, a watch that fell out of the server's window with `410 Gone`, ...) is reported as
//! [`Event::Error`] carrying a [`SourceError`]; the watcher then backs off (kube-runtime's default: 0.8 s doubling to
//! 30 s, with jitter) and resumes the watch or relists, which ends in a fresh snapshot.
//! The sync loop keeps the last programmed state meanwhile.
//!
//! Like kube-proxy, Services and EndpointSlices labelled `service.kubernetes.io/service-proxy-name`
//! (meant for another proxy) or `service.kubernetes.io/headless` are filtered out by the
//! API server (label selector), and the Node watcher sees only this node
//! (`metadata.name=<node>` field selector).

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ::kube::api::Api;
use ::kube::config::{KubeConfigOptions, Kubeconfig};
use ::kube::runtime::watcher;
use ::kube::runtime::WatchStreamExt;
use ::kube::{Client, Resource};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::Sender;

use super::{Event, Kind, Object, SourceError};

/// The label selector kube-proxy puts on its Service and EndpointSlice informers: objects
/// meant for another proxy, and the EndpointSlices of headless Services, are not ours.
pub const SERVICE_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Watches the API server and sends [`Event`]s to `tx` until `tx`'s receiver is dropped
/// (then returns `Ok`). Connects with the kubeconfig file when one is given, else with the
/// in-cluster configuration (a Pod's service account), else with kube's usual inference
/// (`$KUBECONFIG`, `~/.kube/config`). Fails only when no client can be built; everything
/// that goes wrong later is an [`Event::Error`] followed by a retry.
pub async fn run(
    kubeconfig: Option<PathBuf>,
    node_name: String,
    tx: Sender<Event>,
) -> Result<(), SourceError> {
    let config = config_from(kubeconfig.as_deref()).await?;
    let client = client_from(config)?;
    watch(client, &node_name, tx).await
}

/// The client configuration: from `kubeconfig` when given (its current context), else
/// in-cluster, else inferred.
pub async fn config_from(kubeconfig: Option<&Path>) -> Result<::kube::Config, SourceError> {
    if let Some(path) = kubeconfig {
        let bad_file = |e: &dyn std::fmt::Display| SourceError::Kubeconfig {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let file = Kubeconfig::read_from(path).map_err(|e| bad_file(&e))?;
        return ::kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
            .await
            .map_err(|e| bad_file(&e));
    }
    match ::kube::Config::incluster() {
        Ok(config) => Ok(config),
        Err(in_cluster) => ::kube::Config::infer()
            .await
            .map_err(|inferred| SourceError::NoApiServer {
                in_cluster: in_cluster.to_string(),
                inferred: inferred.to_string(),
            }),
    }
}

/// A client for `config`. Tests point it at a local server with
/// `kube::Config::new("http://127.0.0.1:PORT".parse()?)`.
pub fn client_from(config: ::kube::Config) -> Result<Client, SourceError> {
    let url = config.cluster_url.clone();
    Client::try_from(config).map_err(|e| SourceError::Client {
        url: url.to_string(),
        message: e.to_string(),
    })
}

/// Runs the watchers with `client` until `tx`'s receiver is dropped.
pub async fn watch(client: Client, node_name: &str, tx: Sender<Event>) -> Result<(), SourceError> {
    let by_labels = watcher::Config::default().labels(SERVICE_LABEL_SELECTOR);
    let this_node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let everything = watcher::Config::default();
    let services = watch_kind(
        Api::<Service>::all(client.clone()),
        by_labels.clone(),
        Kind::Service,
        &tx,
    );
    let slices = watch_kind(
        Api::<EndpointSlice>::all(client.clone()),
        by_labels,
        Kind::EndpointSlice,
        &tx,
    );
    let nodes = watch_kind(Api::<Node>::all(client.clone()), this_node, Kind::Node, &tx);
    // Every Pod and Namespace of the cluster: NetworkPolicy selects peers anywhere.
    let pods = watch_kind(
        Api::<Pod>::all(client.clone()),
        everything.clone(),
        Kind::Pod,
        &tx,
    );
    let namespaces = watch_kind(
        Api::<Namespace>::all(client.clone()),
        everything.clone(),
        Kind::Namespace,
        &tx,
    );
    let policies = watch_kind(
        Api::<NetworkPolicy>::all(client),
        everything,
        Kind::NetworkPolicy,
        &tx,
    );
    tokio::select! {
        () = services => {}
        () = slices => {}
        () = nodes => {}
        () = pods => {}
        () = namespaces => {}
        () = policies => {}
        // The receiver is gone while every watch is idle.
        () = tx.closed() => {}
    }
    Ok(())
}

/// How long to wait before starting a watcher afresh (see [`watch_kind`]).
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// One watcher: returns when the receiver is gone (the watcher stream itself never ends).
///
/// kube-runtime relists after a `410 Gone` that arrives as a watch ERROR event (what
/// kube-apiserver sends), but when a server refuses to *start* a watch with HTTP 410, it
/// would retry the same stale resourceVersion forever. That case starts a new watcher,
/// which relists.
async fn watch_kind<K>(api: Api<K>, config: watcher::Config, kind: Kind, tx: &Sender<Event>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    Object: From<K>,
{
    loop {
        let stream = watcher(api.clone(), config.clone()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        // Objects of the (re)list in progress (kube-runtime pages through it: 500 a request).
        let mut listing: Vec<Object> = Vec::new();
        let mut restart = false;
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(watcher::Event::Init) => {
                    listing.clear();
                    continue;
                }
                Ok(watcher::Event::InitApply(obj)) => {
                    listing.push(Object::from(obj));
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    let objects = std::mem::take(&mut listing);
                    tracing::debug!(kind = ?kind, objects = objects.len(), "listed");
                    Event::Snapshot {
                        kinds: vec![kind],
                        objects,
                    }
                }
                Ok(watcher::Event::Apply(obj)) => Event::Upsert(Object::from(obj)),
                Ok(watcher::Event::Delete(obj)) => Event::Delete(Object::from(obj)),
                Err(err) => {
                    restart = matches!(
                        &err,
                        watcher::Error::WatchStartFailed(::kube::Error::Api(s)) if s.code == 410
                    );
                    let error = describe(kind, &err);
                    tracing::warn!("{error}");
                    Event::Error(error)
                }
            };
            if tx.send(event).await.is_err() {
                return;
            }
            if restart {
                break;
            }
        }
        tokio::time::sleep(RESTART_DELAY).await;
    }
}

/// A watcher error, typed: forbidden and unauthorized say what to check, `410 Gone` that
/// the watcher relists; the message names the watch (see [`SourceError`]'s `Display`).
fn describe(kind: Kind, err: &watcher::Error) -> SourceError {
    let status = match err {
        watcher::Error::InitialListFailed(::kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(::kube::Error::Api(s))
        | watcher::Error::WatchFailed(::kube::Error::Api(s)) => Some(&**s),
        watcher::Error::WatchError(s) => Some(&**s),
        _ => None,
    };
    match status {
        Some(s) if s.code == 403 => SourceError::Forbidden {
            kind,
            message: s.message.clone(),
        },
        Some(s) if s.code == 401 => SourceError::Unauthorized {
            kind,
            message: s.message.clone(),
        },
        Some(s) if s.code == 410 => SourceError::Expired {
            kind,
            message: s.message.clone(),
        },
        _ => SourceError::Watch {
            kind,
            message: err.to_string(),
        },
    }
}
