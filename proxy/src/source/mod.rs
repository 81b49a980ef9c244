//! Where cluster objects come from: the Kubernetes API (`kube.rs`) or a directory of
//! manifests (`manifests.rs`). Both send [`Event`]s on one channel; the sync loop applies
//! them to the store. A source never drops what it sent before because of an error: it
//! reports the error and keeps the last good state.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

pub mod kube;
pub mod manifests;

/// A cluster object the proxy reads.
// Not boxed: objects move from a source to the store once and are stored unwrapped, so the
// size of a Node in an event costs nothing worth an allocation per object.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
}

/// The kinds of object the proxy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
        }
    }
}

/// What a source tells the sync loop.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The complete current set of objects of the given kinds (a manifests directory read
    /// gives all three; an API watcher's initial list or relist gives its one kind).
    /// Objects of those kinds not in it are gone.
    Snapshot { kinds: Vec<Kind>, objects: Vec<Object> },
    /// One object added or changed.
    Upsert(Object),
    /// One object deleted.
    Delete(Object),
    /// The source hit an error; the last good state stays programmed.
    Error(String),
}
