//! The sync loop: source events -> store -> plan (only the Services that changed) ->
//! back end.
//!
//! One task owns the store, the current [`Plan`] and the [`ChangeTracker`]. It waits for
//! events, drains every event already queued (a burst of changes is one sync), re-plans the
//! dirty Services, notes which ports that changed, and hands the plan and those changes to
//! the back end, which runs on a thread of its own (it blocks on netlink, and need not be
//! `Send`). A failed sync is retried with exponential backoff while events keep being
//! applied, unless the back end says a retry cannot help: then the loop stops, leaving the
//! rules in place, so the process exits and is restarted (a restart rebuilds the table
//! from scratch). A periodic resync re-plans everything from the store and lets the back
//! end compare every port with what it applied.
//!
//! Nothing is programmed before the source has delivered a complete picture (a snapshot
//! of Services and of EndpointSlices; with NetworkPolicy on, of Pods, Namespaces and
//! NetworkPolicies too): a proxy that restarts must not replace good rules with the plan
//! of an empty store, nor plan Services without their endpoints, nor open a Pod whose
//! policies are not listed yet (no fail-open).
//!
//! The policy plan is kept by a [`PolicyPlanner`]: planned whole at the first sync and at
//! each periodic resync, and between them brought up to date with exactly the Pods,
//! Namespaces and NetworkPolicies the store says changed (all of them since the last sync,
//! taken once per sync). The back end diffs the table against what it applied, Pod by Pod.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info};

use crate::backend::{Backend, BackendError, SyncStats};
use crate::changes::{ChangeTracker, Changes};
use crate::metrics::Metrics;
use crate::plan::policy::PolicyPlanner;
use crate::plan::services::{plan, plan_services};
use crate::plan::{NodeSettings, Plan, ServiceTable};
use crate::source::{Event, Kind, SourceError};
use crate::store::Store;

/// How many events a source may queue ahead of the loop before its sends wait.
pub const EVENT_QUEUE: usize = 4096;

/// What the loop needs besides its inputs.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub settings: NodeSettings,
    /// How often everything is re-planned and synced even without changes.
    pub resync_period: Duration,
    /// The first retry after a failed sync; doubles up to `max_retry`.
    pub min_retry: Duration,
    pub max_retry: Duration,
    /// Enforce NetworkPolicy (`--network-policy`, on by default): the plan then carries a
    /// policy table, and Pods, Namespaces and NetworkPolicies must be listed before the
    /// first sync. Off: the back end removes its policy table.
    pub network_policy: bool,
}

impl LoopConfig {
    pub fn new(settings: NodeSettings) -> LoopConfig {
        LoopConfig {
            settings,
            resync_period: Duration::from_secs(60),
            min_retry: Duration::from_secs(1),
            max_retry: Duration::from_secs(30),
            network_policy: true,
        }
    }
}

/// Called after every successful sync with the table just applied and the store it came
/// from (health check node ports follow the table; `/healthz` follows this node's Node).
pub type OnSynced = Box<dyn FnMut(&ServiceTable, &Store) + Send>;

/// Why the loop (or [`read_store`], or starting the back end) stopped on its own.
#[derive(Debug)]
pub enum RunError {
    /// The back end's thread could not be started.
    BackendThread(std::io::Error),
    /// The back end's thread stopped: it panicked (the log says where).
    BackendGone,
    /// The back end could not be made, or failed in a way a retry cannot help.
    Backend(BackendError),
    /// The source delivered no complete list of the objects within this time.
    SourceTimeout(Duration),
    /// The source stopped before listing everything.
    SourceStopped,
    /// The source failed.
    Source(SourceError),
}

impl RunError {
    /// Whether starting again (the loop, `dump`) may succeed: yes when the back end's error
    /// was transient or the source was slow or failing; no when a thread died or the
    /// back end's error needs a person.
    pub fn is_retryable(&self) -> bool {
        match self {
            RunError::BackendThread(_) | RunError::SourceTimeout(_) => true,
            RunError::Source(e) => e.is_retryable(),
            RunError::Backend(e) => e.is_retryable(),
            RunError::BackendGone | RunError::SourceStopped => false,
        }
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::BackendThread(e) => write!(f, "cannot start the back end thread: {e}"),
            RunError::BackendGone => {
                f.write_str("the back end thread stopped (it panicked; see the log above)")
            }
            RunError::Backend(e) if e.is_retryable() => write!(f, "back end: {e}"),
            RunError::Backend(e) => write!(f, "back end: {e} (a retry cannot help)"),
            RunError::SourceTimeout(t) => write!(f, "the source gave no complete list within {t:?}"),
            RunError::SourceStopped => f.write_str("the source stopped before listing everything"),
            RunError::Source(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for RunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RunError::BackendThread(e) => Some(e),
            RunError::Backend(e) => Some(e),
            RunError::Source(e) => Some(e),
            _ => None,
        }
    }
}

/// The kinds the store must have seen in full before anything is programmed. Nodes are
/// not among them: the plan does not read them.
const NEEDED_KINDS: [Kind; 2] = [Kind::Service, Kind::EndpointSlice];
/// What the policy plan reads, needed as well when NetworkPolicy is enforced.
const POLICY_KINDS: [Kind; 3] = [Kind::Pod, Kind::Namespace, Kind::NetworkPolicy];

/// A back end on a dedicated thread: created there, used only there.
pub struct BackendThread {
    requests: std::sync::mpsc::Sender<BackendRequest>,
}

enum BackendRequest {
    Sync(
        Arc<Plan>,
        Changes,
        oneshot::Sender<Result<SyncStats, BackendError>>,
    ),
}

impl BackendThread {
    /// Starts the thread and builds the back end on it with `make`; fails if `make` does.
    pub async fn start<F>(make: F) -> Result<BackendThread, RunError>
    where
        F: FnOnce() -> Result<Box<dyn Backend>, BackendError> + Send + 'static,
    {
        let (requests, incoming) = std::sync::mpsc::channel::<BackendRequest>();
        let (ready, started) = oneshot::channel();
        std::thread::Builder::new()
            .name("ferry-backend".into())
            .spawn(move || {
                let mut backend = match make() {
                    Ok(backend) => {
                        let _ = ready.send(Ok(()));
                        backend
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                while let Ok(BackendRequest::Sync(plan, changes, reply)) = incoming.recv() {
                    let result = backend.sync(&plan, &changes);
                    // Let go of the plan before answering, so the loop owns it alone
                    // again and can update it in place instead of copying it.
                    drop(plan);
                    let _ = reply.send(result);
                }
            })
            .map_err(RunError::BackendThread)?;
        started
            .await
            .map_err(|_| RunError::BackendGone)?
            .map_err(RunError::Backend)?;
        Ok(BackendThread { requests })
    }

    /// Syncs `plan`. The outer error means the thread is gone (it panicked): the loop
    /// cannot go on.
    async fn sync(
        &self,
        plan: Arc<Plan>,
        changes: Changes,
    ) -> Result<Result<SyncStats, BackendError>, RunError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(BackendRequest::Sync(plan, changes, reply))
            .map_err(|_| RunError::BackendGone)?;
        answer.await.map_err(|_| RunError::BackendGone)
    }
}

/// Runs until `shutdown` completes or every event sender is gone. Rules stay programmed
/// when it returns (as with kube-proxy, stopping the proxy does not stop the Services).
pub async fn run(
    events: mpsc::Receiver<Event>,
    backend: BackendThread,
    config: LoopConfig,
    metrics: Arc<Metrics>,
    on_synced: OnSynced,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let services = ServiceTable {
        settings: config.settings.clone(),
        ..Default::default()
    };
    let mut state = SyncLoop {
        store: Store::new(),
        plan: Arc::new(Plan {
            services,
            policy: None,
        }),
        policy_planner: PolicyPlanner::new(&config.settings.node_name),
        changes: ChangeTracker::new(),
        pending: false,
        full_replan: true,
        retry_at: None,
        backoff: config.min_retry,
        synced_once: false,
        config,
        metrics,
        on_synced,
        backend,
    };
    state.run(events, shutdown).await
}

struct SyncLoop {
    store: Store,
    /// Shared with the back end thread only during a sync.
    plan: Arc<Plan>,
    /// What changed in `plan` since the last successful sync.
    changes: ChangeTracker,
    /// The kernel may differ from the store: a change arrived, a resync is due, or the
    /// last sync failed.
    pending: bool,
    /// Re-plan everything (first sync, periodic resync) rather than the dirty Services.
    full_replan: bool,
    /// Keeps the policy plan up to date change by change (when NetworkPolicy is on).
    policy_planner: PolicyPlanner,
    /// After a failure: no sync before this.
    retry_at: Option<Instant>,
    backoff: Duration,
    synced_once: bool,
    config: LoopConfig,
    metrics: Arc<Metrics>,
    on_synced: OnSynced,
    backend: BackendThread,
}

impl SyncLoop {
    async fn run(
        &mut self,
        mut events: mpsc::Receiver<Event>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), RunError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let period = self.config.resync_period;
        let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.pending && self.ready() && self.retry_at.is_none_or(|at| Instant::now() >= at) {
                self.sync().await?;
                continue;
            }
            let retry_at = self.retry_at;
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                event = events.recv() => {
                    let Some(event) = event else {
                        info!("the source stopped; leaving the programmed rules in place");
                        return Ok(());
                    };
                    self.apply(event);
                    // Everything already queued joins this sync.
                    while let Ok(event) = events.try_recv() {
                        self.apply(event);
                    }
                }
                _ = resync.tick() => {
                    debug!("periodic resync");
                    self.full_replan = true;
                    self.queue();
                }
                () = sleep_until(retry_at) => {}
            }
        }
    }

    /// Whether the store knows enough to program the node.
    fn ready(&self) -> bool {
        let policy: &[Kind] = if self.config.network_policy {
            &POLICY_KINDS
        } else {
            &[]
        };
        NEEDED_KINDS
            .iter()
            .chain(policy)
            .all(|kind| self.store.has_synced(*kind))
    }

    fn apply(&mut self, event: Event) {
        if let Event::Error(message) = &event {
            // The source keeps its last good state; so does the kernel. The source has
            // logged the failure already, with when it tries again.
            debug!("source: {message}");
            return;
        }
        self.store.apply(event);
        // Policy changes wait in the store until the sync takes them; with NetworkPolicy
        // off nobody will, so they are dropped at once.
        let policy_dirty = self.store.has_policy_dirty();
        if policy_dirty && !self.config.network_policy {
            self.store.take_policy_changes();
        }
        // The first time the store is complete, the node is programmed even when nothing in
        // it is dirty: an empty cluster still needs the base table (and a restart must
        // replace whatever the last process left).
        if self.store.has_dirty()
            || (policy_dirty && self.config.network_policy)
            || (!self.synced_once && !self.pending && self.ready())
        {
            self.queue();
        }
    }

    /// Notes that a sync is needed (and when the work was queued, for `/healthz`).
    fn queue(&mut self) {
        self.pending = true;
        let now = SystemTime::now();
        self.metrics.update(|m| {
            // The oldest unsynced change counts, as kube-proxy's QueuedUpdate.
            let already_queued = match (m.last_queued, m.last_successful_sync) {
                (Some(queued), Some(synced)) => queued > synced,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if !already_queued {
                m.last_queued = Some(now);
            }
        });
    }

    async fn sync(&mut self) -> Result<(), RunError> {
        let started = Instant::now();
        let dirty = self.store.take_dirty();
        // The back end dropped its reference before answering the last sync, so this
        // updates in place; it would copy only if that ever changed.
        let plan_now = Arc::make_mut(&mut self.plan);
        if !self.config.network_policy {
            plan_now.policy = None;
        } else {
            let policy_changes = self.store.take_policy_changes();
            match &mut plan_now.policy {
                Some(table) if !self.full_replan => {
                    if !policy_changes.is_empty() {
                        self.policy_planner.update(&self.store, &policy_changes, table);
                    }
                }
                _ => plan_now.policy = Some(self.policy_planner.full(&self.store)),
            }
        }
        let services = &mut plan_now.services;
        if self.full_replan {
            *services = plan(&self.store, &self.config.settings);
            self.changes.all_services();
            self.full_replan = false;
        } else {
            self.changes
                .service_ports(plan_services(services, &self.store, &dirty));
        }
        let planned = started.elapsed();
        let changes = self.changes.take();
        let result = self.backend.sync(Arc::clone(&self.plan), changes.clone()).await?;
        let took = started.elapsed();
        match result {
            Ok(stats) => self.succeeded(stats, planned, took),
            Err(e) if e.is_retryable() => {
                self.changes.give_back(changes);
                self.failed(e);
            }
            Err(e) => {
                error!("sync failed and a retry cannot help: {e}; the previous rules stay, stopping");
                self.metrics.update(|m| m.sync_errors += 1);
                return Err(RunError::Backend(e));
            }
        }
        Ok(())
    }

    fn succeeded(&mut self, stats: SyncStats, planned: Duration, took: Duration) {
        let (services, endpoints) = count(&self.plan.services);
        let recovered = self.retry_at.is_some();
        self.pending = false;
        self.retry_at = None;
        self.backoff = self.config.min_retry;
        self.metrics.update(|m| {
            m.sync_durations.observe(took);
            m.services = services;
            m.endpoints = endpoints;
            m.rules = stats.rules;
            m.last_successful_sync = Some(SystemTime::now());
        });
        if !self.synced_once || recovered {
            info!(
                services,
                endpoints,
                rules = stats.rules,
                plan_ms = millis(planned),
                apply_ms = millis(stats.apply_time),
                "{}",
                if recovered {
                    "synced again after failures"
                } else {
                    "first sync done"
                }
            );
        } else {
            debug!(
                changed_ports = stats.changed_ports,
                rules = stats.rules,
                plan_ms = millis(planned),
                apply_ms = millis(stats.apply_time),
                "synced"
            );
        }
        self.synced_once = true;
        (self.on_synced)(&self.plan.services, &self.store);
    }

    fn failed(&mut self, e: BackendError) {
        error!(
            "sync failed: {e}; the previous rules stay, retrying in {:?}",
            self.backoff
        );
        self.metrics.update(|m| m.sync_errors += 1);
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(self.config.max_retry);
        // The store's changes are already in the plan and the tracker: the retry sends the
        // same plan and changes (plus whatever arrives meanwhile).
        self.pending = true;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Distinct Services, and endpoints summed over Service ports (each port's cluster and
/// external endpoints together, counted once).
fn count(table: &ServiceTable) -> (usize, usize) {
    let mut services = 0;
    let mut last: Option<(&str, &str)> = None;
    let mut endpoints = 0;
    for port in table.ports.values() {
        let name = (port.id.namespace.as_str(), port.id.name.as_str());
        if last != Some(name) {
            services += 1;
            last = Some(name);
        }
        endpoints += port.cluster_endpoints.len()
            + port
                .external_endpoints
                .iter()
                .filter(|e| !port.cluster_endpoints.contains(e))
                .count();
    }
    (services, endpoints)
}

/// A duration in milliseconds for a log field, to the microsecond: `1.486`, not the
/// float noise of `1.4857939999999998`.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// What `dump` and `trace` wait for: the Services plan's kinds and the policy plan's.
const READ_KINDS: [Kind; 5] = [
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Pod,
    Kind::Namespace,
    Kind::NetworkPolicy,
];

/// Reads events until the store holds a full picture (for `dump` and `trace`): the first
/// source error ends it, as does `timeout`.
pub async fn read_store(events: &mut mpsc::Receiver<Event>, timeout: Duration) -> Result<Store, RunError> {
    let mut store = Store::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !READ_KINDS.iter().all(|kind| store.has_synced(*kind)) {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .map_err(|_| RunError::SourceTimeout(timeout))?
            .ok_or(RunError::SourceStopped)?;
        if let Event::Error(error) = event {
            return Err(RunError::Source(error));
        }
        store.apply(event);
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifests;
    use std::sync::Mutex;

    /// Records every Services table it is given and the changes that came with it; fails
    /// while `fail` is set (with an error worth a retry).
    struct FakeBackend {
        seen: Arc<Mutex<Vec<ServiceTable>>>,
        changes: Arc<Mutex<Vec<Changes>>>,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    /// A commit the kernel refused with `errno`.
    fn commit_error(errno: i32) -> BackendError {
        BackendError::Commit {
            what: "nftables transaction".into(),
            source: crate::nft::CommitError {
                errno,
                index: None,
                description: "simulated failure".into(),
                detail: None,
                batch_len: 1,
                more_failures: 0,
            },
        }
    }

    impl FakeBackend {
        fn new(seen: Arc<Mutex<Vec<ServiceTable>>>, fail: Arc<std::sync::atomic::AtomicBool>) -> FakeBackend {
            FakeBackend {
                seen,
                changes: Arc::default(),
                fail,
            }
        }
    }

    /// Fails every sync as a kernel without nf_tables would.
    struct UnsupportedBackend;

    impl Backend for UnsupportedBackend {
        fn sync(&mut self, _: &Plan, _: &Changes) -> Result<SyncStats, BackendError> {
            Err(commit_error(libc::EOPNOTSUPP))
        }

        fn cleanup(&mut self) -> Result<(), BackendError> {
            Ok(())
        }
    }

    impl Backend for FakeBackend {
        fn sync(&mut self, plan: &Plan, changes: &Changes) -> Result<SyncStats, BackendError> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(commit_error(libc::EBUSY));
            }
            self.seen.lock().unwrap().push(plan.services.clone());
            self.changes.lock().unwrap().push(changes.clone());
            Ok(SyncStats {
                changed_ports: 0,
                rules: plan.services.ports.len(),
                apply_time: Duration::ZERO,
            })
        }

        fn cleanup(&mut self) -> Result<(), BackendError> {
            Ok(())
        }
    }

    struct Harness {
        seen: Arc<Mutex<Vec<ServiceTable>>>,
        changes: Arc<Mutex<Vec<Changes>>>,
        fail: Arc<std::sync::atomic::AtomicBool>,
        metrics: Arc<Metrics>,
        source_errors: Arc<Mutex<Vec<String>>>,
        stop: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<Result<(), RunError>>,
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n";
    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n- name: \"\"\n  port: 8080\nendpoints:\n- addresses: [10.244.0.5]\n";

    /// A manifests source on `dir`, the loop, and a fake back end; source errors are
    /// recorded on the way.
    async fn start(dir: &std::path::Path, config: LoopConfig) -> Harness {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let source_errors = Arc::new(Mutex::new(Vec::new()));
        let (source_tx, mut source_rx) = mpsc::channel(EVENT_QUEUE);
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        tokio::spawn(manifests::run(dir.to_path_buf(), source_tx));
        let errors = source_errors.clone();
        tokio::spawn(async move {
            while let Some(event) = source_rx.recv().await {
                if let Event::Error(error) = &event {
                    errors.lock().unwrap().push(error.to_string());
                }
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        let changes = Arc::new(Mutex::new(Vec::new()));
        let (seen2, changes2, fail2) = (seen.clone(), changes.clone(), fail.clone());
        let backend = BackendThread::start(move || {
            Ok(Box::new(FakeBackend {
                seen: seen2,
                changes: changes2,
                fail: fail2,
            }) as _)
        })
        .await
        .unwrap();
        let metrics = Arc::new(Metrics::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(
            rx,
            backend,
            config,
            metrics.clone(),
            Box::new(|_, _| {}),
            async {
                let _ = stopped.await;
            },
        ));
        Harness {
            seen,
            changes,
            fail,
            metrics,
            source_errors,
            stop: Some(stop),
            task,
        }
    }

    impl Harness {
        /// Waits up to `within` for a recorded table satisfying `f`.
        async fn wait_for(&self, within: Duration, f: impl Fn(&ServiceTable) -> bool) -> Option<Duration> {
            let started = Instant::now();
            while started.elapsed() < within {
                if self.seen.lock().unwrap().iter().any(&f) {
                    return Some(started.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            None
        }

        fn syncs(&self) -> usize {
            self.seen.lock().unwrap().len()
        }

        async fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            self.task.await.unwrap().unwrap();
        }
    }

    fn port_of(table: &ServiceTable) -> Option<u16> {
        table.ports.values().next().map(|p| p.port)
    }

    fn endpoints_of(table: &ServiceTable) -> Vec<String> {
        let port = table.ports.values().next();
        port.map(|p| {
            p.cluster_endpoints
                .iter()
                .map(|e| format!("{}:{}", e.ip, e.port))
                .collect()
        })
        .unwrap_or_default()
    }

    fn config() -> LoopConfig {
        LoopConfig::new(NodeSettings {
            node_name: "node-a".into(),
            ..Default::default()
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_edited_manifest_is_applied_within_a_second() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), format!("{SERVICE}---\n{SLICE}")).unwrap();
        let h = start(dir.path(), config()).await;
        assert!(
            h.wait_for(Duration::from_secs(2), |t| port_of(t) == Some(80))
                .await
                .is_some(),
            "first sync"
        );
        assert_eq!(endpoints_of(&h.seen.lock().unwrap()[0]), ["10.244.0.5:8080"]);

        // Edit: a new port number, and a second endpoint in another file.
        std::fs::write(
            dir.path().join("web.yaml"),
            format!("{}---\n{SLICE}", SERVICE.replace("80\n", "81\n")),
        )
        .unwrap();
        let took = h
            .wait_for(Duration::from_secs(1), |t| port_of(t) == Some(81))
            .await;
        assert!(took.is_some(), "the edit was not applied within a second");

        let more = SLICE
            .replace("web-1", "web-2")
            .replace("10.244.0.5", "10.244.0.6");
        std::fs::write(dir.path().join("more.yml"), more).unwrap();
        let took = h
            .wait_for(Duration::from_secs(1), |t| endpoints_of(t).len() == 2)
            .await;
        assert!(took.is_some(), "the new file was not applied within a second");
        // The loop updates the metrics after the back end's sync returns: give it a moment.
        let mut state = h.metrics.snapshot();
        for _ in 0..100 {
            if (state.services, state.endpoints) == (1, 2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            state = h.metrics.snapshot();
        }
        assert!(state.last_successful_sync.is_some());
        assert_eq!((state.services, state.endpoints), (1, 2));
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_file_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), format!("{SERVICE}---\n{SLICE}")).unwrap();
        let h = start(dir.path(), config()).await;
        assert!(h
            .wait_for(Duration::from_secs(2), |t| port_of(t) == Some(80))
            .await
            .is_some());
        let before = h.syncs();

        // Broken: reported with file and line, and no sync follows.
        std::fs::write(
            dir.path().join("web.yaml"),
            format!(
                "{}---\n{SLICE}",
                SERVICE.replace("10.96.0.10", "10.96.0.10: oops")
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("other.yaml"),
            SERVICE.replace("name: web", "name: db"),
        )
        .unwrap();
        let started = Instant::now();
        while h.source_errors.lock().unwrap().is_empty() && started.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let errors = h.source_errors.lock().unwrap().clone();
        let file = dir.path().join("web.yaml");
        assert!(
            errors
                .iter()
                .any(|e| e.contains(&format!("{}:6:", file.display()))),
            "{errors:?}"
        );
        // The broken file keeps its last good Service; the other file is not held back.
        assert!(
            h.wait_for(Duration::from_secs(1), |t| t.ports.len() == 2)
                .await
                .is_some(),
            "the other file's Service is applied beside the broken file's last good one"
        );
        assert!(h.syncs() > before);

        // Fixed: both files apply.
        std::fs::write(dir.path().join("web.yaml"), format!("{SERVICE}---\n{SLICE}")).unwrap();
        assert!(h
            .wait_for(Duration::from_secs(1), |t| t.ports.len() == 2)
            .await
            .is_some());
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_is_retried_with_backoff() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), SERVICE).unwrap();
        let mut config = config();
        config.min_retry = Duration::from_millis(50);
        config.max_retry = Duration::from_millis(200);
        let h = start(dir.path(), config).await;
        assert!(h
            .wait_for(Duration::from_secs(2), |t| port_of(t) == Some(80))
            .await
            .is_some());

        h.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        std::fs::write(dir.path().join("web.yaml"), SERVICE.replace("80\n", "81\n")).unwrap();
        let errors = || h.metrics.snapshot().sync_errors;
        let started = Instant::now();
        while errors() < 3 && started.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(errors() >= 3, "a failed sync is retried");
        // Backoff capped at 200 ms: about five retries a second, not a busy loop.
        let before = errors();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let retries = errors() - before;
        assert!((1..=7).contains(&retries), "{retries} retries in a second");

        h.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(h
            .wait_for(Duration::from_secs(1), |t| port_of(t) == Some(81))
            .await
            .is_some());
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_back_end_gets_the_ports_that_changed_since_its_last_success() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), format!("{SERVICE}---\n{SLICE}")).unwrap();
        let db = SERVICE
            .replace("name: web", "name: db")
            .replace("10.96.0.10", "10.96.0.11");
        std::fs::write(dir.path().join("db.yaml"), &db).unwrap();
        let mut config = config();
        config.min_retry = Duration::from_millis(50);
        config.max_retry = Duration::from_millis(50);
        let h = start(dir.path(), config).await;
        assert!(h
            .wait_for(Duration::from_secs(2), |t| t.ports.len() == 2)
            .await
            .is_some());
        assert_eq!(h.changes.lock().unwrap()[0], Changes::all(), "the first sync");
        let id_of = |name: &str| {
            let table = h.seen.lock().unwrap().last().unwrap().clone();
            table.ports.keys().find(|id| id.name == name).unwrap().clone()
        };
        let (web, db_id) = (id_of("web"), id_of("db"));

        // web's endpoint moves while the back end fails; then db changes and the back end
        // recovers: the sync that succeeds names both, and nothing else.
        h.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        std::fs::write(
            dir.path().join("web.yaml"),
            format!("{SERVICE}---\n{}", SLICE.replace("10.244.0.5", "10.244.0.7")),
        )
        .unwrap();
        let started = Instant::now();
        while h.metrics.snapshot().sync_errors == 0 && started.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(h.metrics.snapshot().sync_errors > 0, "the failing sync happened");
        std::fs::write(dir.path().join("db.yaml"), db.replace("80\n", "81\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        h.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(h
            .wait_for(Duration::from_secs(2), |t| {
                let moved = |p: &crate::plan::ServicePort| {
                    p.cluster_endpoints
                        .iter()
                        .any(|e| e.ip.to_string() == "10.244.0.7")
                };
                t.ports.values().any(moved) && t.ports.values().any(|p| p.port == 81)
            })
            .await
            .is_some());
        let last = h.changes.lock().unwrap().last().cloned().unwrap();
        assert_eq!(last, Changes::service_ports([web, db_id]));
        h.stop().await;
    }

    #[tokio::test]
    async fn a_back_end_error_no_retry_can_help_stops_the_loop() {
        let backend = BackendThread::start(|| Ok(Box::new(UnsupportedBackend) as _))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), SERVICE).unwrap();
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let source = tokio::spawn(manifests::run(dir.path().to_path_buf(), tx));
        let metrics = Arc::new(Metrics::default());
        let task = tokio::spawn(run(
            rx,
            backend,
            config(),
            metrics.clone(),
            Box::new(|_, _| {}),
            std::future::pending(),
        ));
        // The source keeps running: the loop stops on its own, not for lack of events.
        let result = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the loop stops instead of retrying")
            .unwrap();
        source.abort();
        let Err(e) = result else {
            panic!("the loop went on")
        };
        assert!(matches!(e, RunError::Backend(_)) && !e.is_retryable(), "{e:?}");
        assert!(e.to_string().contains("a retry cannot help"), "{e}");
        assert_eq!(metrics.snapshot().sync_errors, 1);
    }

    /// The loop with a fake back end and events sent by the test (no source): the sender,
    /// the loop's task, and the tables the back end was given. NetworkPolicy is off, so
    /// Services and EndpointSlices are all it waits for.
    async fn loop_fed_by_hand() -> (
        mpsc::Sender<Event>,
        tokio::task::JoinHandle<Result<(), RunError>>,
        Arc<Mutex<Vec<ServiceTable>>>,
    ) {
        loop_fed_by_hand_with(LoopConfig {
            network_policy: false,
            ..config()
        })
        .await
    }

    async fn loop_fed_by_hand_with(
        config: LoopConfig,
    ) -> (
        mpsc::Sender<Event>,
        tokio::task::JoinHandle<Result<(), RunError>>,
        Arc<Mutex<Vec<ServiceTable>>>,
    ) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, f) = (seen.clone(), fail.clone());
        let backend = BackendThread::start(move || Ok(Box::new(FakeBackend::new(s, f)) as _))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(run(
            rx,
            backend,
            config,
            Arc::new(Metrics::default()),
            Box::new(|_, _| {}),
            std::future::pending(),
        ));
        (tx, task, seen)
    }

    #[tokio::test]
    async fn with_network_policy_nothing_is_programmed_before_pods_namespaces_and_policies_are_listed() {
        let (tx, task, seen) = loop_fed_by_hand_with(config()).await;
        tx.send(Event::Snapshot {
            kinds: vec![Kind::Service, Kind::EndpointSlice, Kind::Pod, Kind::Namespace],
            objects: vec![],
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            seen.lock().unwrap().is_empty(),
            "synced before NetworkPolicies were listed: Pods would be open for a while"
        );
        tx.send(Event::Snapshot {
            kinds: vec![Kind::NetworkPolicy],
            objects: vec![],
        })
        .await
        .unwrap();
        drop(tx);
        task.await.unwrap().unwrap();
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn nothing_is_programmed_before_services_and_slices_are_listed() {
        let (tx, task, seen) = loop_fed_by_hand().await;

        let service: k8s_openapi::api::core::v1::Service =
            serde_yaml_ng::from_str(&SERVICE.replace("name: web", "name: web\n  namespace: default"))
                .unwrap();
        tx.send(Event::Snapshot {
            kinds: vec![Kind::Service],
            objects: vec![service.into()],
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            seen.lock().unwrap().is_empty(),
            "synced with Services but no EndpointSlices listed"
        );

        tx.send(Event::Snapshot {
            kinds: vec![Kind::EndpointSlice],
            objects: vec![],
        })
        .await
        .unwrap();
        drop(tx);
        task.await.unwrap().unwrap();
        // One sync, with the whole picture, before the loop saw the source go away.
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].ports.len(), 1);
    }

    #[tokio::test]
    async fn an_empty_cluster_is_programmed_once_everything_is_listed() {
        let (tx, task, seen) = loop_fed_by_hand().await;
        tx.send(Event::Snapshot {
            kinds: vec![Kind::Service, Kind::EndpointSlice],
            objects: vec![],
        })
        .await
        .unwrap();
        drop(tx);
        task.await.unwrap().unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.len(),
            1,
            "no sync of the empty plan: the base table would be missing"
        );
        assert!(seen[0].ports.is_empty());
    }

    #[test]
    fn counts_services_and_endpoints() {
        use crate::plan::{Endpoint, Family, Protocol, ServicePort, ServicePortId};
        let ep = |last: u8, is_local| Endpoint {
            ip: [10, 0, 0, last].into(),
            port: 80,
            is_local,
            ready: true,
        };
        let port = |name: &str, family| ServicePort {
            internal_local: true,
            cluster_endpoints: vec![ep(1, true)],
            external_endpoints: vec![ep(1, true), ep(2, false)],
            ..ServicePort::new(
                ServicePortId {
                    namespace: "ns".into(),
                    name: name.into(),
                    port_name: String::new(),
                    protocol: Protocol::Tcp,
                    family,
                },
                None,
                80,
            )
        };
        let table = ServiceTable {
            settings: NodeSettings::default(),
            ports: [
                port("a", Family::V4),
                port("a", Family::V6),
                port("b", Family::V4),
            ]
            .into_iter()
            .map(|p| (p.id.clone(), p))
            .collect(),
        };
        assert_eq!(count(&table), (2, 6));
    }
}
