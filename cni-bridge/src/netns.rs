//! Entering the Pod's network namespace.
//!
//! A network namespace belongs to a thread, not to a process: the Pod-side work runs on a
//! thread of its own that enters the namespace and ends with it, so the plugin's main
//! thread never leaves the node's namespace, whatever fails in between.

use std::fs::File;
use std::io;
use std::path::Path;

use cni::{Code, Error};
use nix::sched::{setns, CloneFlags};

/// The Pod's namespace, opened (so it cannot go away under us while we work).
pub struct PodNetns {
    file: File,
    path: String,
}

impl PodNetns {
    /// Opens `CNI_NETNS`; a path that is missing or not a network namespace is code 4.
    pub fn open(path: &Path) -> Result<PodNetns, Error> {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|e| {
            Error::new(
                Code::InvalidEnvironment,
                format!("CNI_NETNS {shown}: {e}"),
                "CNI_NETNS must be the path of the container's network namespace, e.g. /run/netns/<name>",
            )
        })?;
        Ok(PodNetns { file, path: shown })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Runs `f` on a new thread inside this namespace and returns what it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T, Error> + Send) -> Result<T, Error> {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    Error::new(
                        Code::InvalidEnvironment,
                        format!("CNI_NETNS {} is not a network namespace: {e}", self.path),
                        "CNI_NETNS must be the path of the container's network namespace",
                    )
                })?;
                f()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(Error::new(
                    Code::INTERNAL,
                    "the thread in the Pod's namespace panicked",
                    "",
                ))
            })
        })
    }
}

/// Writes a sysctl of the calling thread's network namespace, given as a path below
/// `/proc/sys` (`net/ipv4/ip_forward`): interface names may hold dots, so no dotted form.
pub fn sysctl(path: &str, value: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/{path}"), value)
}
