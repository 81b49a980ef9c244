//! Where cluster objects come from: the Kubernetes API (`kube.rs`) or a directory of
//! manifests (`manifests.rs`). Both convert each object to the store's slim form
//! ([`crate::store::objects`]) as it arrives, drop the original, and send [`Event`]s on
//! one channel; the sync loop applies them to the store. A source never drops what it
//! sent before because of an error: it reports the error and keeps the last good state.

use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::store::objects::{EndpointSliceInfo, NamespaceInfo, NodeInfo, PodInfo, ServiceInfo};
use crate::store::policy::NetworkPolicyInfo;

pub mod checks;
pub mod kube;
pub mod manifests;

pub use manifests::ManifestError;

/// A cluster object the proxy reads, in the store's form. Shared (`Arc`): the manifests
/// source keeps what it sent to tell a changed file from an unchanged one, and the store
/// holds the same copy.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Arc<ServiceInfo>),
    EndpointSlice(Arc<EndpointSliceInfo>),
    Node(Arc<NodeInfo>),
    Pod(Arc<PodInfo>),
    Namespace(Arc<NamespaceInfo>),
    NetworkPolicy(Arc<NetworkPolicyInfo>),
}

/// The kinds of object the proxy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    Pod,
    Namespace,
    NetworkPolicy,
}

impl Kind {
    /// Every kind, as a manifests directory's snapshot covers them.
    pub const ALL: [Kind; 6] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::Pod,
        Kind::Namespace,
        Kind::NetworkPolicy,
    ];

    /// The resource's name as RBAC and `kubectl` spell it.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices.discovery.k8s.io",
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::NetworkPolicy => "networkpolicies.networking.k8s.io",
        }
    }
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
            Object::Pod(_) => Kind::Pod,
            Object::Namespace(_) => Kind::Namespace,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
        }
    }

    /// Namespace ("" for cluster-scoped kinds) and name.
    pub fn identity(&self) -> (&str, &str) {
        match self {
            Object::Service(s) => (&s.namespace, &s.name),
            Object::EndpointSlice(s) => (&s.namespace, &s.name),
            Object::Node(n) => ("", &n.name),
            Object::Pod(p) => (&p.namespace, &p.name),
            Object::Namespace(n) => ("", &n.name),
            Object::NetworkPolicy(p) => (&p.namespace, &p.name),
        }
    }
}

impl From<Service> for Object {
    fn from(service: Service) -> Object {
        Object::Service(Arc::new(service.into()))
    }
}

impl From<EndpointSlice> for Object {
    fn from(slice: EndpointSlice) -> Object {
        Object::EndpointSlice(Arc::new(slice.into()))
    }
}

impl From<Node> for Object {
    fn from(node: Node) -> Object {
        Object::Node(Arc::new(node.into()))
    }
}

impl From<Pod> for Object {
    fn from(pod: Pod) -> Object {
        Object::Pod(Arc::new(pod.into()))
    }
}

impl From<Namespace> for Object {
    fn from(namespace: Namespace) -> Object {
        Object::Namespace(Arc::new(namespace.into()))
    }
}

/// The API server has validated what a watch delivers, so a refusal here means Ferry is
/// stricter than the cluster: the policy's namespace is then isolated both ways rather
/// than left open (fail closed), and the log says which field to look at. The manifests
/// source refuses such a file instead (see `manifests.rs`).
impl From<NetworkPolicy> for Object {
    fn from(policy: NetworkPolicy) -> Object {
        let info = NetworkPolicyInfo::try_from(policy.clone()).unwrap_or_else(|error| {
            tracing::warn!("{error}; denying all traffic of its namespace until it is fixed");
            NetworkPolicyInfo::deny_namespace(&policy.metadata)
        });
        Object::NetworkPolicy(Arc::new(info))
    }
}

/// What a source tells the sync loop.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The complete current set of objects of the given kinds (a manifests directory read
    /// gives all of them; an API watcher's initial list or relist gives its one kind).
    /// Objects of those kinds not in it are gone.
    Snapshot { kinds: Vec<Kind>, objects: Vec<Object> },
    /// One object added or changed.
    Upsert(Object),
    /// One object deleted.
    Delete(Object),
    /// The source hit an error; the last good state stays programmed.
    Error(SourceError),
}

/// What went wrong in a source, and whether trying again can help: the API source retries
/// on its own (with backoff) and the manifests source re-reads a file when it changes,
/// so [`SourceError::is_retryable`] says whether waiting may be enough or whether the
/// configuration must change and the proxy restart.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceError {
    /// `--kubeconfig` could not be read or used.
    Kubeconfig { path: PathBuf, message: String },
    /// `--api-server-from` could not be read or names no server.
    ApiServerFrom { path: PathBuf, message: String },
    /// Neither in a Pod nor with a kubeconfig to fall back on.
    NoApiServer { in_cluster: String, inferred: String },
    /// No client could be made from the configuration (TLS material, proxy settings).
    Client { url: String, message: String },
    /// The API server said `403`: the ServiceAccount lacks a permission (it may be granted
    /// while the proxy waits), or, while `persists` is false, the API server is starting
    /// (its authorizer answers `403` for its first seconds).
    Forbidden {
        kind: Kind,
        message: String,
        persists: bool,
    },
    /// The API server said `401` (a token being rotated may pass).
    Unauthorized { kind: Kind, message: String },
    /// The watch fell behind the API server's window (`410 Gone`): the watcher relists.
    Expired { kind: Kind, message: String },
    /// Any other failure of a list or watch (API server away, `5xx`, a broken stream).
    Watch { kind: Kind, message: String },
    /// Manifest files that do not parse: each keeps its last good objects meanwhile.
    Manifests(Vec<ManifestError>),
    /// The manifests reader stopped (it panicked).
    ManifestsReader(String),
}

impl SourceError {
    /// Whether the same configuration can still work later (a `403` may pass once RBAC
    /// is granted, a broken manifest once it is fixed), as opposed to an error only a
    /// change of flags or files and a restart cures (a malformed kubeconfig).
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::Kubeconfig { .. }
            | SourceError::ApiServerFrom { .. }
            | SourceError::NoApiServer { .. }
            | SourceError::Client { .. }
            | SourceError::ManifestsReader(_) => false,
            SourceError::Forbidden { .. }
            | SourceError::Unauthorized { .. }
            | SourceError::Expired { .. }
            | SourceError::Watch { .. }
            | SourceError::Manifests(_) => true,
        }
    }
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceError::Kubeconfig { path, message } => {
                write!(f, "--kubeconfig {}: {message}", path.display())
            }
            SourceError::ApiServerFrom { path, message } => write!(
                f,
                "--api-server-from {}: {message} (mount the node's kubelet kubeconfig there, or \
                 leave the flag out to use KUBERNETES_SERVICE_HOST)",
                path.display()
            ),
            SourceError::NoApiServer {
                in_cluster,
                inferred,
            } => write!(
                f,
                "no way to reach the Kubernetes API: not in a Pod ({in_cluster}) and no usable \
                 kubeconfig ({inferred}); pass --kubeconfig PATH, or --manifests DIR to run without \
                 an API server"
            ),
            SourceError::Client { url, message } => write!(f, "cannot make a client for {url}: {message}"),
            SourceError::Forbidden {
                kind,
                message,
                persists: false,
            } => write!(
                f,
                "watching {}: forbidden ({message}); an API server answers so while it starts; retrying",
                kind.resource()
            ),
            SourceError::Forbidden { kind, message, .. } => {
                let what = kind.resource();
                write!(
                    f,
                    "watching {what}: forbidden ({message}): give ferry-proxy's ServiceAccount \
                     get/list/watch on {what} (the ClusterRole in conf/ferry.yaml); retrying"
                )
            }
            SourceError::Unauthorized { kind, message } => write!(
                f,
                "watching {}: unauthorized ({message}): check the kubeconfig or service account token; retrying",
                kind.resource()
            ),
            SourceError::Expired { kind, message } => write!(
                f,
                "watching {}: the watch fell behind the API server ({message}); relisting",
                kind.resource()
            ),
            SourceError::Watch { kind, message } => write!(
                f,
                "watching {}: {message}; retrying with backoff (programmed rules stay)",
                kind.resource()
            ),
            SourceError::Manifests(errors) => {
                let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "manifests: {} (a broken file keeps its last good objects; the other files are applied)",
                    all.join("; ")
                )
            }
            SourceError::ManifestsReader(message) => {
                write!(f, "manifests: the directory reader failed: {message}")
            }
        }
    }
}

impl std::error::Error for SourceError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_whether_waiting_can_help() {
        let forbidden = SourceError::Forbidden {
            kind: Kind::Pod,
            message: "pods is forbidden".into(),
            persists: true,
        };
        assert!(forbidden.is_retryable());
        assert!(
            forbidden.to_string().contains("get/list/watch on pods"),
            "{forbidden}"
        );
        let kubeconfig = SourceError::Kubeconfig {
            path: "/k".into(),
            message: "invalid type: sequence".into(),
        };
        assert!(!kubeconfig.is_retryable());
        assert!(
            kubeconfig.to_string().starts_with("--kubeconfig /k: "),
            "{kubeconfig}"
        );
    }
}
