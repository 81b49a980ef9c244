//! Back ends: turn a [`ServiceTable`] into kernel state. Only nftables for now; eBPF comes
//! later on the same plan.

use std::time::Duration;

use crate::plan::ServiceTable;

pub mod nftables;

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
    /// Makes the kernel match `table`, changing only what differs from the last plan it
    /// applied. The first call after start converges from whatever the kernel holds,
    /// without breaking established connections.
    fn sync(&mut self, table: &ServiceTable) -> Result<SyncStats, BackendError>;
    /// Removes everything this back end ever programmed.
    fn cleanup(&mut self) -> Result<(), BackendError>;
}

#[derive(Debug)]
pub struct BackendError(pub String);

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BackendError {}
