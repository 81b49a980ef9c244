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
    /// Sync durations (plan + apply), as a histogram: a proxy runs for months, so it keeps
    /// counts per bucket, not every sample.
    pub sync_durations: SyncHistogram,
    pub services: usize,
    pub endpoints: usize,
    pub rules: usize,
    pub last_successful_sync: Option<SystemTime>,
    /// When the sync loop last received something to do (a change, or a resync tick).
    pub last_queued: Option<SystemTime>,
    pub sync_errors: u64,
}

/// Upper bounds of the sync duration histogram's buckets, in seconds.
pub const SYNC_DURATION_BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192, 16.384,
];

/// A Prometheus histogram of sync durations, with the buckets above.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncHistogram {
    /// Observations per bucket (not cumulative); beyond the last bound they count only in
    /// `count`.
    pub buckets: [u64; SYNC_DURATION_BUCKETS.len()],
    pub sum_seconds: f64,
    pub count: u64,
}

impl SyncHistogram {
    pub fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = SYNC_DURATION_BUCKETS.iter().position(|le| secs <= *le) {
            self.buckets[i] += 1;
        }
        self.sum_seconds += secs;
        self.count += 1;
    }
}

impl Metrics {
    pub fn update(&self, f: impl FnOnce(&mut MetricsState)) {
        f(&mut self.inner.lock().expect("metrics lock"));
    }

    pub fn snapshot(&self) -> MetricsState {
        self.inner.lock().expect("metrics lock").clone()
    }
}

/// Manifest objects refused since start (they decode but cannot be served): a counter
/// apart from [`Metrics`] because the manifests reader has no handle on it.
static REFUSED_OBJECTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn count_refused_objects(n: usize) {
    REFUSED_OBJECTS.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
}

/// `ferry_proxy_manifest_objects_refused_total`.
pub fn refused_objects() -> u64 {
    REFUSED_OBJECTS.load(std::sync::atomic::Ordering::Relaxed)
}
