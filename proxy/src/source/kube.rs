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
//! [`Event::Error`] carrying a [`SourceError`] and logged once, with the delay before the
//! next try. A `410` relists at once; other failures back off ([`Backoff`]: 0.8 s doubling
//! to 30 s, jitter within that, reset by the next list or watch that answers), and `403`s
//! are blamed on RBAC only once they outlast [`FORBIDDEN_GRACE`]. The watcher then resumes
//! the watch or relists, which ends in a fresh snapshot, and logs once that it is back.
//! The sync loop keeps the last programmed state meanwhile.
//!
//! Like kube-proxy, Services and EndpointSlices labelled `service.kubernetes.io/service-proxy-name`
//! (meant for another proxy) or `service.kubernetes.io/headless` are filtered out by the
//! API server (label selector), and the Node watcher sees only this node
//! (`metadata.name=<node>` field selector).

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ::kube::api::Api;
use ::kube::config::{KubeConfigOptions, Kubeconfig};
use ::kube::runtime::watcher;
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

/// How to reach the API server: `--kubeconfig` and `--api-server-from`.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// A kubeconfig to connect with (its current context). Without one: in-cluster (a
    /// Pod's service account), else kube's usual inference (`$KUBECONFIG`, `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// A kubeconfig, the node's kubelet's, to take only the API server's address from; the
    /// credentials stay the in-cluster ones. In a Pod, the API server's address is the
    /// `kubernetes` Service's ClusterIP, which only works once a proxy runs: the proxy
    /// itself must go to the real address, and the kubelet's kubeconfig is where every
    /// node already has it (kind: `/etc/kubernetes/kubelet.conf`, k3s:
    /// `/var/lib/rancher/k3s/agent/kubelet.kubeconfig`).
    pub api_server_from: Option<PathBuf>,
}

/// Watches the API server and sends [`Event`]s to `tx` until `tx`'s receiver is dropped
/// (then returns `Ok`). Fails only when no client can be built; everything that goes
/// wrong later is an [`Event::Error`] followed by a retry.
pub async fn run(connection: Connection, node_name: String, tx: Sender<Event>) -> Result<(), SourceError> {
    let config = config_from(&connection).await?;
    let client = client_from(config)?;
    watch(client, &node_name, tx).await
}

/// The client configuration: from the kubeconfig when given (its current context), else
/// in-cluster, else inferred; then the API server's address from `api_server_from`.
pub async fn config_from(connection: &Connection) -> Result<::kube::Config, SourceError> {
    let mut config = match &connection.kubeconfig {
        Some(path) => {
            let bad_file = |e: &dyn std::fmt::Display| SourceError::Kubeconfig {
                path: path.to_path_buf(),
                message: e.to_string(),
            };
            let file = Kubeconfig::read_from(path).map_err(|e| bad_file(&e))?;
            ::kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| bad_file(&e))?
        }
        None => match ::kube::Config::incluster() {
            Ok(config) => config,
            Err(in_cluster) => {
                ::kube::Config::infer()
                    .await
                    .map_err(|inferred| SourceError::NoApiServer {
                        in_cluster: in_cluster.to_string(),
                        inferred: inferred.to_string(),
                    })?
            }
        },
    };
    if let Some(path) = &connection.api_server_from {
        let server = api_server_in(path)?;
        config.cluster_url = server.parse().map_err(|e| SourceError::ApiServerFrom {
            path: path.clone(),
            message: format!("server {server:?} is not a URL: {e}"),
        })?;
    }
    Ok(config)
}

/// The server of the current context's cluster in the kubeconfig at `path`.
pub fn api_server_in(path: &Path) -> Result<String, SourceError> {
    let bad_file = |message: String| SourceError::ApiServerFrom {
        path: path.to_path_buf(),
        message,
    };
    let file = Kubeconfig::read_from(path).map_err(|e| bad_file(e.to_string()))?;
    let context = match &file.current_context {
        Some(name) => file.contexts.iter().find(|c| &c.name == name),
        None => file.contexts.first(),
    };
    let cluster_name = context
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.as_str());
    let cluster = match cluster_name {
        Some(name) => file.clusters.iter().find(|c| c.name == name),
        None => file.clusters.first(),
    };
    cluster
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .ok_or_else(|| bad_file("its current context names no cluster with a server".into()))
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

/// The first retry delay after a failure; each further failure doubles it up to
/// [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(800);
/// The longest wait between two attempts, jitter included: an API server back from an
/// outage is seen within this long at worst.
const MAX_DELAY: Duration = Duration::from_secs(30);
/// How long `403`s must last before they are blamed on RBAC: a starting kube-apiserver
/// answers `403` for about 2 s while its authorizer's caches fill, and those are retried
/// at [`FIRST_DELAY`] without growing the backoff.
pub const FORBIDDEN_GRACE: Duration = Duration::from_secs(5);

/// When one watcher tries again after a failure, and whether it has been failing.
///
/// kube-runtime's default backoff is not used: it is not reset by a success until two
/// minutes have passed, and its jitter goes beyond its cap, so after a 13 s outage the
/// relist that follows a `410` waited 39 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    /// The first failure of the current run of failures.
    failing_since: Option<Instant>,
    /// The first `403` of the current run of `403`s.
    forbidden_since: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: FIRST_DELAY,
            failing_since: None,
            forbidden_since: None,
        }
    }
}

impl Backoff {
    /// A list or watch answered: the next failure starts from [`FIRST_DELAY`] again.
    /// Returns how long the watcher had been failing, if it had.
    pub fn succeeded(&mut self) -> Option<Duration> {
        self.next = FIRST_DELAY;
        self.forbidden_since = None;
        self.failing_since.take().map(|since| since.elapsed())
    }

    /// Notes a failure; returns the delay before the next attempt.
    pub fn failed(&mut self, now: Instant) -> Duration {
        self.failing_since.get_or_insert(now);
        self.forbidden_since = None;
        let delay = self.next;
        self.next = (self.next * 2).min(MAX_DELAY);
        jitter(delay)
    }

    /// Notes a `403`; returns the delay before the next attempt and whether the `403`s
    /// have lasted longer than [`FORBIDDEN_GRACE`] (then it is RBAC, not a starting server).
    pub fn forbidden(&mut self, now: Instant) -> (Duration, bool) {
        let since = *self.forbidden_since.get_or_insert(now);
        if now.duration_since(since) < FORBIDDEN_GRACE {
            self.failing_since.get_or_insert(now);
            (jitter(FIRST_DELAY), false)
        } else {
            let delay = self.failed(now);
            self.forbidden_since = Some(since);
            (delay, true)
        }
    }
}

/// `delay` shortened by up to a quarter, at random, so that the watchers of many nodes
/// do not retry in step; never longer than `delay`, so the cap holds.
fn jitter(delay: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let fraction = (random % 1000) as f64 / 1000.0;
    delay.mul_f64(1.0 - 0.25 * fraction)
}

/// How a failure is retried.
enum Retry {
    /// Poll the same watcher after this delay (it resumes the watch or relists).
    After(Duration),
    /// Start a new watcher at once, which lists afresh.
    Relist,
}

/// A delay as logs show it: seconds with one decimal.
fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// One watcher: returns when the receiver is gone (the watcher stream itself never ends).
///
/// Any `410 Gone` relists at once: kube-runtime relists by itself after a `410` ERROR
/// event inside a watch stream (what kube-apiserver sends), but retries a watch that a
/// server refused to *start* with HTTP 410 from the same stale resourceVersion forever,
/// so that case starts a new watcher. Other failures wait out a [`Backoff`].
pub async fn watch_kind<K>(api: Api<K>, config: watcher::Config, kind: Kind, tx: &Sender<Event>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    Object: From<K>,
{
    let mut backoff = Backoff::default();
    loop {
        let stream = watcher(api.clone(), config.clone());
        let mut stream = std::pin::pin!(stream);
        // Objects of the (re)list in progress (kube-runtime pages through it: 500 a request).
        let mut listing: Vec<Object> = Vec::new();
        while let Some(item) = stream.next().await {
            if matches!(&item, Ok(e) if !matches!(e, watcher::Event::Init)) {
                if let Some(down) = backoff.succeeded() {
                    tracing::info!(
                        resource = kind.resource(),
                        down = seconds(down),
                        "watching {} again after {} of failures",
                        kind.resource(),
                        seconds(down)
                    );
                }
            }
            let (event, retry) = match item {
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
                    let snapshot = Event::Snapshot {
                        kinds: vec![kind],
                        objects,
                    };
                    (snapshot, None)
                }
                Ok(watcher::Event::Apply(obj)) => (Event::Upsert(Object::from(obj)), None),
                Ok(watcher::Event::Delete(obj)) => (Event::Delete(Object::from(obj)), None),
                // Nobody listens any more (a one-shot read such as `trace` got its
                // snapshot and is shutting the client down): nothing to report.
                Err(_) if tx.is_closed() => return,
                Err(err) => {
                    let (error, retry) = classify(kind, &err, &mut backoff);
                    match retry {
                        Retry::Relist => tracing::warn!(resource = kind.resource(), "{error}"),
                        Retry::After(delay) => tracing::warn!(
                            resource = kind.resource(),
                            retry_in = seconds(delay),
                            "{error} (next try in {})",
                            seconds(delay)
                        ),
                    }
                    (Event::Error(error), Some(retry))
                }
            };
            if tx.send(event).await.is_err() {
                return;
            }
            match retry {
                None => {}
                Some(Retry::After(delay)) => tokio::time::sleep(delay).await,
                Some(Retry::Relist) => break,
            }
        }
    }
}

/// A watcher error, typed, and how to retry it.
fn classify(kind: Kind, err: &watcher::Error, backoff: &mut Backoff) -> (SourceError, Retry) {
    let now = Instant::now();
    let error = describe(kind, err, false);
    match &error {
        SourceError::Expired { .. } => {
            backoff.failing_since.get_or_insert(now);
            (error, Retry::Relist)
        }
        SourceError::Forbidden { .. } => {
            let (delay, persists) = backoff.forbidden(now);
            (describe(kind, err, persists), Retry::After(delay))
        }
        _ => (error, Retry::After(backoff.failed(now))),
    }
}

/// A watcher error, typed: forbidden and unauthorized say what to check, `410 Gone` that
/// the watcher relists; the message names the watch (see [`SourceError`]'s `Display`).
fn describe(kind: Kind, err: &watcher::Error, forbidden_persists: bool) -> SourceError {
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
            persists: forbidden_persists,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_a_success_resets_it() {
        let mut backoff = Backoff::default();
        let now = Instant::now();
        let delays: Vec<Duration> = (0..12).map(|_| backoff.failed(now)).collect();
        assert!(
            delays[0] <= FIRST_DELAY && delays[0] >= FIRST_DELAY * 3 / 4,
            "{delays:?}"
        );
        assert!(delays[1] > FIRST_DELAY, "{delays:?}");
        assert!(
            delays.iter().all(|d| *d <= MAX_DELAY),
            "jitter stays under the cap: {delays:?}"
        );
        assert!(delays[11] >= MAX_DELAY * 3 / 4, "{delays:?}");
        assert!(backoff.succeeded().is_some(), "it had been failing");
        assert!(backoff.failed(now) <= FIRST_DELAY);
        // 403s within the grace retry at the first delay and do not grow the backoff.
        let mut backoff = Backoff::default();
        for _ in 0..5 {
            let (delay, persists) = backoff.forbidden(now);
            assert!(delay <= FIRST_DELAY && !persists);
        }
        let (_, persists) = backoff.forbidden(now + FORBIDDEN_GRACE);
        assert!(persists);
    }
}
