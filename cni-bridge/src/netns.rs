//! Entering the Pod's network namespace.
//!
//! A network namespace belongs to a thread, not to a process: the Pod-side work runs on a
//! thread of its own that enters the namespace and ends with it (ferry-netlink's
//! [`Netns::run`]), so the plugin's main thread never leaves the node's namespace,
//! whatever fails in between.

use std::fs::File;
use std::io;
use std::path::Path;

use cni::{Code, Error};
use ferry_netlink::Netns;

/// The Pod's namespace, opened (so it cannot go away under us while we work).
pub struct PodNetns(Netns);

impl PodNetns {
    /// Opens `CNI_NETNS`; a path that is missing or not a network namespace is code 4.
    pub fn open(path: &Path) -> Result<PodNetns, Error> {
        Netns::open(path).map(PodNetns).map_err(|e| {
            let reason = match &e {
                ferry_netlink::Error::NetnsOpen { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            Error::new(
                Code::InvalidEnvironment,
                format!("CNI_NETNS {}: {reason}", path.display()),
                "CNI_NETNS must be the path of the container's network namespace, e.g. /run/netns/<name>",
            )
        })
    }

    pub fn file(&self) -> &File {
        self.0.file()
    }

    pub fn path(&self) -> &str {
        self.0.path()
    }

    /// Runs `f` on a new thread inside this namespace and returns what it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T, Error> + Send) -> Result<T, Error> {
        std::thread::scope(|s| self.join(self.spawn(s, f)))
    }

    /// Starts `f` on a new thread of `scope` inside this namespace and returns at once;
    /// [`PodNetns::join`] waits for its result.
    pub fn spawn<'scope, 'env, T: Send + 'scope>(
        &'env self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        f: impl FnOnce() -> Result<T, Error> + Send + 'scope,
    ) -> std::thread::ScopedJoinHandle<'scope, ferry_netlink::Result<Result<T, Error>>> {
        self.0.spawn(scope, f)
    }

    pub fn join<T>(
        &self,
        thread: std::thread::ScopedJoinHandle<'_, ferry_netlink::Result<Result<T, Error>>>,
    ) -> Result<T, Error> {
        self.0.join(thread).unwrap_or_else(|e| {
            Err(match e {
                ferry_netlink::Error::NetnsEnter { source, .. } => Error::new(
                    Code::InvalidEnvironment,
                    format!("CNI_NETNS {} is not a network namespace: {source}", self.path()),
                    "CNI_NETNS must be the path of the container's network namespace",
                ),
                other => Error::new(Code::INTERNAL, other.to_string(), ""),
            })
        })
    }
}

/// Writes a sysctl of the calling thread's network namespace, given as a path below
/// `/proc/sys` (`net/ipv4/ip_forward`): interface names may hold dots, so no dotted form.
pub fn sysctl(path: &str, value: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/{path}"), value)
}
