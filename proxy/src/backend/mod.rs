//! Back ends: turn a [`Plan`] into kernel state: nftables (`nftables/`) or eBPF maps
//! (`ebpf/`) for Services, on the same plan; both enforce NetworkPolicy through the one
//! policy table writer (`policy/`).
//!
//! A back end gets the whole plan and, from the sync loop's [`ChangeTracker`], the parts
//! of it that may differ from what it last applied ([`Changes`]): it need not work out
//! itself what changed, and a plan holds no change log. What is common to every back end
//! (which conntrack entries go stale when endpoints go) lives in [`crate::changes`] too.
//!
//! [`ChangeTracker`]: crate::changes::ChangeTracker

use std::fmt;
use std::io;
use std::time::Duration;

use crate::changes::Changes;
use crate::nft::CommitError;
use crate::plan::Plan;

pub mod ebpf;
pub mod nftables;
pub mod policy;

/// What one sync did, for logs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Service ports whose rules were added, changed or removed.
    pub changed_ports: usize,
    /// Rules in Ferry's table after the sync.
    pub rules: usize,
    /// Time spent applying (not planning).
    pub apply_time: Duration,
}

/// A back end keeps the kernel in line with the latest plan.
pub trait Backend {
    /// Makes the kernel match `plan`. `changes` names what may differ from the plan of
    /// the last successful sync; a back end may look at more (after a failure it converges
    /// from the kernel), never at less. The first call after start converges from whatever
    /// the kernel holds, without breaking established connections.
    fn sync(&mut self, plan: &Plan, changes: &Changes) -> Result<SyncStats, BackendError>;
    /// Removes everything this back end ever programmed.
    fn cleanup(&mut self) -> Result<(), BackendError>;
}

/// Why a back end could not apply a plan. Nothing of a failed sync is applied: the kernel
/// keeps the previous state.
#[derive(Debug)]
pub enum BackendError {
    /// A netlink socket could not be opened or read (`what` says which and for what).
    Socket { what: String, source: io::Error },
    /// The kernel refused the transaction; nothing of it was applied.
    Commit { what: String, source: CommitError },
    /// The plan needs more than the back end's fixed-size structures hold (`what` names
    /// the structure and how to recover).
    Exhausted { what: String },
    /// The eBPF data plane failed (`what` says at which step; the source says what to do).
    Ebpf { what: String, source: ferry_ebpf::Error },
    /// Reading or setting node state outside netlink failed (a sysctl, the interface list).
    System { what: String, source: io::Error },
}

impl BackendError {
    /// Whether trying the same sync again may succeed: the kernel was busy or short of
    /// memory, the call was interrupted, or the kernel's state differed from what the back
    /// end thought (a failed back end rebuilds its table from scratch on the next sync).
    /// Not when the process lacks the permission, the kernel lacks a feature, the kernel
    /// calls the request invalid, or a structure is used up: those need a person, a
    /// restart or another kernel.
    pub fn is_retryable(&self) -> bool {
        match self {
            BackendError::Socket { source, .. } => source.raw_os_error().is_none_or(errno_is_transient),
            BackendError::Commit { source, .. } => errno_is_transient(source.errno),
            BackendError::Exhausted { .. } => false,
            // A map write can fail for want of memory; loading or attaching will fail again.
            BackendError::Ebpf { source, .. } => matches!(source, ferry_ebpf::Error::Map { .. }),
            BackendError::System { source, .. } => source.raw_os_error().is_none_or(errno_is_transient),
        }
    }
}

/// Errors of the kernel that say "not now" or "not as you thought" rather than "never".
fn errno_is_transient(errno: i32) -> bool {
    !matches!(
        errno,
        libc::EPERM
            | libc::EACCES
            | libc::EINVAL
            | libc::EOPNOTSUPP
            | libc::EAFNOSUPPORT
            | libc::EPROTONOSUPPORT
            | libc::ENOSYS
            | libc::ERANGE
            | libc::E2BIG
    )
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Socket { what, source } => write!(f, "{what}: {source}"),
            BackendError::Commit { what, source } => write!(f, "{what}: {source}"),
            BackendError::Exhausted { what } => f.write_str(what),
            BackendError::Ebpf { what, source } => write!(f, "{what}: {source}"),
            BackendError::System { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BackendError::Socket { source, .. } => Some(source),
            BackendError::Commit { source, .. } => Some(source),
            BackendError::Exhausted { .. } => None,
            BackendError::Ebpf { source, .. } => Some(source),
            BackendError::System { source, .. } => Some(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit_failing_with(errno: i32) -> BackendError {
        BackendError::Commit {
            what: "nftables transaction".into(),
            source: CommitError {
                errno,
                index: None,
                description: "commit".into(),
                detail: None,
                batch_len: 1,
                more_failures: 0,
            },
        }
    }

    #[test]
    fn busy_or_short_kernels_are_worth_a_retry_missing_features_are_not() {
        for errno in [
            libc::EBUSY,
            libc::ENOBUFS,
            libc::EINTR,
            libc::ENOMEM,
            libc::EEXIST,
        ] {
            assert!(commit_failing_with(errno).is_retryable(), "errno {errno}");
        }
        for errno in [libc::EOPNOTSUPP, libc::EPERM, libc::EINVAL, libc::EAFNOSUPPORT] {
            assert!(!commit_failing_with(errno).is_retryable(), "errno {errno}");
        }
        let no_socket = BackendError::Socket {
            what: "opening a netfilter netlink socket".into(),
            source: io::Error::from_raw_os_error(libc::EPROTONOSUPPORT),
        };
        assert!(!no_socket.is_retryable());
        assert!(!BackendError::Exhausted { what: "keys".into() }.is_retryable());
        let text = commit_failing_with(libc::EBUSY).to_string();
        assert!(text.starts_with("nftables transaction: commit"), "{text}");
    }
}
