//! What `/metrics` and `/healthz` report, updated by the sync loop.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Shared between the sync loop (writer) and the HTTP server (reader).
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<MetricsState>,
}

#[derive(Debug, Clone, Default)]
pub struct MetricsState {
    /// Every sync's duration (plan + apply), for the histogram.
    pub sync_durations: Vec<Duration>,
    pub services: usize,
    pub endpoints: usize,
    pub rules: usize,
    pub last_successful_sync: Option<SystemTime>,
    /// When the sync loop last received something to do (a change, or a resync tick).
    pub last_queued: Option<SystemTime>,
    pub sync_errors: u64,
}

impl Metrics {
    pub fn update(&self, f: impl FnOnce(&mut MetricsState)) {
        f(&mut self.inner.lock().expect("metrics lock"));
    }

    pub fn snapshot(&self) -> MetricsState {
        self.inner.lock().expect("metrics lock").clone()
    }
}
