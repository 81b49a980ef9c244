//! Working inside another network namespace, on a thread of its own.
//!
//! A network namespace is a property of a thread, not of a process: [`Netns::run`] starts
//! a fresh thread, enters the namespace there, runs the closure and ends the thread with
//! it. The caller's thread never leaves its namespace, whatever fails in between. A socket
//! opened inside the closure stays bound to the namespace for its whole life, so it can be
//! returned and used from any thread afterwards:
//!
//! ```no_run
//! use ferry_netlink::{route::Route, Netns, Socket};
//!
//! let pod = Netns::open("/run/netns/pod1")?;
//! let mut in_pod = pod.run(Socket::<Route>::open)??;
//! # Ok::<(), ferry_netlink::Error>(())
//! ```

use std::any::Any;
use std::fs::File;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

use crate::error::{Error, Result};

/// A network namespace, held open (so it cannot go away while we work in it).
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: String,
}

impl Netns {
    /// Opens the namespace at `path` (`/run/netns/<name>`, `/proc/<pid>/ns/net`). Whether
    /// it is a network namespace shows when [`Netns::run`] enters it.
    pub fn open(path: impl AsRef<Path>) -> Result<Netns> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|source| Error::NetnsOpen {
            path: shown.clone(),
            source,
        })?;
        Ok(Netns { file, path: shown })
    }

    /// The namespace's file, e.g. for `IFLA_NET_NS_FD` (creating a link inside it).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path it was opened from, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Runs `f` on a new thread inside this namespace and returns what it returns.
    ///
    /// Errors when the thread cannot enter the namespace (not a network namespace, no
    /// CAP_SYS_ADMIN) or when `f` panics; `f`'s own errors are its return value.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|s| self.join(self.spawn(s, f)))
    }

    /// Like [`Netns::run`], but returns at once: `f` runs on a new thread of `scope`
    /// inside this namespace while the caller goes on (e.g. to work in its own namespace
    /// meanwhile); [`Netns::join`] waits for its result.
    pub fn spawn<'scope, 'env, T: Send + 'scope>(
        &'env self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        f: impl FnOnce() -> T + Send + 'scope,
    ) -> std::thread::ScopedJoinHandle<'scope, Result<T>> {
        scope.spawn(move || {
            setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|source| Error::NetnsEnter {
                path: self.path.clone(),
                source,
            })?;
            Ok(f())
        })
    }

    /// The result of a thread [`Netns::spawn`] started, a panic turned into an error.
    pub fn join<T>(&self, thread: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
        thread.join().unwrap_or_else(|panic| {
            Err(Error::NetnsThreadPanicked {
                path: self.path.clone(),
                message: panic_message(&*panic),
            })
        })
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}
