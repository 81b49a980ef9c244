//! The timer that ends flows from outside: a thread of the eBPF back end that sweeps the tc
//! program's flow tables (`ferry_ebpf::FlowSweeper`, whose docs give the timeouts and the
//! conntrack settings they follow) while the back end lives.
//!
//! `FERRY_EBPF_FLOW_TIMEOUTS` replaces timeouts, as `name=seconds` pairs separated by
//! commas: `udp` (30), `udp-stream` (120), `tcp` (21600), `tcp-fin` (120), `tcp-rst` (10);
//! e.g. `FERRY_EBPF_FLOW_TIMEOUTS=udp=60,tcp=86400`. Tests shorten them to seconds.
//!
//! A pass runs every half of the shortest timeout, between 1 s and 30 s (5 s with the
//! defaults), so a flow is gone at most half a timeout (plus the one second its timestamp
//! may lag) after it expired. A pass reads the whole table, so its cost grows with the
//! number of flows, not with how many expire: 333 ms over a full table (131,072
//! connections) with nothing expired, so under 7% of a CPU at the default interval (see
//! `ferry_ebpf::FlowSweeper` for the figures).

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_ebpf::{FlowSweeper, FlowTimeouts};
use tracing::{debug, warn};

use crate::backend::BackendError;

/// The environment variable that replaces flow timeouts.
pub const FLOW_TIMEOUTS_ENV: &str = "FERRY_EBPF_FLOW_TIMEOUTS";

/// The timeouts from [`FLOW_TIMEOUTS_ENV`], or the defaults when it is unset.
pub fn timeouts_from_env() -> Result<FlowTimeouts, BackendError> {
    match std::env::var(FLOW_TIMEOUTS_ENV) {
        Ok(spec) => FlowTimeouts::parse(&spec).map_err(|source| BackendError::Ebpf {
            what: format!("reading {FLOW_TIMEOUTS_ENV}"),
            source,
        }),
        Err(_) => Ok(FlowTimeouts::default()),
    }
}

/// How often a pass runs for `t`.
fn interval(t: &FlowTimeouts) -> Duration {
    let shortest = [t.udp, t.udp_stream, t.tcp, t.tcp_fin, t.tcp_rst]
        .into_iter()
        .min()
        .unwrap_or_default();
    (shortest / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// The sweeping thread; stopped and joined on drop.
pub(super) struct FlowSweepThread {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl FlowSweepThread {
    /// Opens the flow tables pinned in `pin_dir` and starts sweeping them.
    pub(super) fn start(pin_dir: &Path, timeouts: FlowTimeouts) -> Result<FlowSweepThread, BackendError> {
        let mut sweeper = FlowSweeper::open(pin_dir).map_err(|source| BackendError::Ebpf {
            what: "opening the flow tables to sweep".into(),
            source,
        })?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let every = interval(&timeouts);
        let thread = std::thread::Builder::new()
            .name("ferry-flow-sweep".into())
            .spawn(move || {
                let (lock, wake) = &*flag;
                let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    stopped = wake
                        .wait_timeout(stopped, every)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    if *stopped {
                        return;
                    }
                    match sweeper.sweep(&timeouts) {
                        Ok(r) if r.removed > 0 => debug!(
                            removed = r.removed,
                            entries = r.entries,
                            took_ms = r.took.as_secs_f64() * 1e3,
                            "flows from outside ended by timeout"
                        ),
                        Ok(_) => {}
                        Err(e) => warn!("sweeping the flows from outside: {e}"),
                    }
                }
            })
            .map_err(|source| BackendError::System {
                what: "starting the flow sweep thread".into(),
                source,
            })?;
        Ok(FlowSweepThread {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for FlowSweepThread {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_runs_every_half_shortest_timeout_within_bounds() {
        assert_eq!(interval(&FlowTimeouts::default()), Duration::from_secs(5));
        let short = FlowTimeouts::parse("tcp-rst=1").unwrap();
        assert_eq!(interval(&short), Duration::from_secs(1));
        let long = FlowTimeouts::parse("udp=600,udp-stream=600,tcp-fin=600,tcp-rst=600").unwrap();
        assert_eq!(interval(&long), Duration::from_secs(30));
    }
}
