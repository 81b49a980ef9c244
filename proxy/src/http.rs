//! The proxy's HTTP side: `/healthz` and `/livez` (kube-proxy's health server), `/metrics`
//! (Prometheus text), and the per-Service health check node ports of
//! `externalTrafficPolicy: Local` Services ([`HealthChecks`]).
//!
//! # Health
//!
//! As kube-proxy's: the proxy is healthy unless work was queued (a change arrived, or a
//! resync tick) and has not been synced for [`HEALTH_TIMEOUT`] or more. It is healthy while
//! starting up, before anything is queued. The sync loop writes the two times in
//! [`Metrics`]: `last_queued` is the oldest change not yet synced (set it only when it is
//! unset or not after `last_successful_sync`, as kube-proxy's `QueuedUpdate` does; setting
//! it on every change also works but postpones the verdict while changes keep coming),
//! and `last_successful_sync`, set after every sync that succeeded.
//!
//! - `/healthz`: `200` when healthy and the node is eligible (not being deleted, not
//!   tainted `ToBeDeletedByClusterAutoscaler`: see [`HealthChecks::sync_node`]), else `503`.
//!   Body exactly as kube-proxy writes it:
//!   `{"lastUpdated": "<time>","currentTime": "<time>", "nodeEligible": true}`, times in Go's
//!   `time.Time` format (`2025-01-02 03:04:05.123456789 +0000 UTC`); `lastUpdated` is the
//!   current time when healthy (kube-proxy's compatibility rule), else the last successful
//!   sync.
//! - `/livez`: the same without the node's eligibility (a node being drained must not get
//!   its proxy restarted): use it for the liveness probe.
//!
//! Both answer any method with `Content-Type: application/json` and
//! `X-Content-Type-Options: nosniff`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::future::IntoFuture;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::header::{CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use ipnetwork::IpNetwork;
use tokio::net::TcpListener;

use crate::metrics::{Metrics, MetricsState};
use crate::plan::ServiceTable;
use crate::store::objects::NodeInfo;

/// How long queued work may stay unsynced before the proxy reports itself unhealthy:
/// kube-proxy uses twice its sync period, 2 x 30 s by default.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

pub use crate::store::objects::TO_BE_DELETED_TAINT;

/// Upper bounds of the sync duration histogram, in seconds: kube-proxy's
/// `ExponentialBuckets(0.001, 2, 15)`.
pub use crate::metrics::SYNC_DURATION_BUCKETS;

/// The proxy's health at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHealth {
    pub healthy: bool,
    /// The last successful sync, if any.
    pub last_updated: Option<SystemTime>,
}

/// kube-proxy's rule: unhealthy when work queued at `last_queued` is still unsynced after
/// [`HEALTH_TIMEOUT`].
pub fn proxy_health(state: &MetricsState, now: SystemTime) -> ProxyHealth {
    let last_updated = state.last_successful_sync;
    let pending_since = match (state.last_queued, last_updated) {
        (Some(queued), Some(synced)) if synced >= queued => None,
        (queued, _) => queued,
    };
    let healthy = match pending_since {
        None => true,
        // A queued time in the future (clock stepped back) counts as just queued.
        Some(queued) => now
            .duration_since(queued)
            .map_or(true, |late| late < HEALTH_TIMEOUT),
    };
    ProxyHealth {
        healthy,
        last_updated,
    }
}

fn read<T>(m: &Metrics, f: impl FnOnce(&MetricsState) -> T) -> T {
    // `update` hands out the state without cloning it (`snapshot` clones the durations).
    let mut out = None;
    m.update(|s| out = Some(f(s)));
    out.expect("update runs the closure")
}

/// A time as Go's `time.Time.String()` writes it in UTC (what kube-proxy's `%q` prints,
/// minus the monotonic clock reading): `2025-01-02 03:04:05.123456789 +0000 UTC`, trailing
/// zeros of the fraction dropped. `None` is Go's zero time.
pub fn go_time(t: Option<SystemTime>) -> String {
    let Some(t) = t else {
        return "0001-01-01 00:00:00 +0000 UTC".to_string();
    };
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let mut out = format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    let nanos = since.subsec_nanos();
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push_str(" +0000 UTC");
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn unix_seconds(t: Option<SystemTime>) -> f64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `/metrics` in the Prometheus text format.
pub fn render_metrics(s: &MetricsState, requests: &RequestCounters) -> String {
    let mut out = String::with_capacity(4096);
    let name = "ferry_proxy_sync_proxy_rules_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} How long one sync took (plan and apply), in seconds."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    let h = &s.sync_durations;
    let mut cumulative = 0;
    for (le, n) in SYNC_DURATION_BUCKETS.iter().zip(h.buckets) {
        cumulative += n;
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let total = h.count;
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
    let _ = writeln!(out, "{name}_sum {}", h.sum_seconds);
    let _ = writeln!(out, "{name}_count {total}");

    let gauges: [(&str, &str, f64); 5] = [
        (
            "ferry_proxy_sync_proxy_rules_last_timestamp_seconds",
            "When the last successful sync ended, in seconds since the Unix epoch (0: none yet).",
            unix_seconds(s.last_successful_sync),
        ),
        (
            "ferry_proxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "When the sync loop was last given work, in seconds since the Unix epoch (0: never).",
            unix_seconds(s.last_queued),
        ),
        (
            "ferry_proxy_services",
            "Services in the last applied plan.",
            s.services as f64,
        ),
        (
            "ferry_proxy_endpoints",
            "Endpoints in the last applied plan.",
            s.endpoints as f64,
        ),
        (
            "ferry_proxy_rules",
            "Rules in Ferry's tables after the last sync.",
            s.rules as f64,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
    }
    let name = "ferry_proxy_sync_proxy_rules_failures_total";
    let _ = writeln!(
        out,
        "# HELP {name} Syncs that failed (the previous rules stayed in place)."
    );
    let _ = writeln!(out, "# TYPE {name} counter\n{name} {}", s.sync_errors);
    let name = "ferry_proxy_manifest_objects_refused_total";
    let _ = writeln!(
        out,
        "# HELP {name} Manifest objects left out because they cannot be served (each is logged)."
    );
    let refused = crate::metrics::refused_objects();
    let _ = writeln!(out, "# TYPE {name} counter\n{name} {refused}");
    for (name, what, [ok, unavailable]) in [
        ("ferry_proxy_healthz_total", "/healthz", &requests.healthz),
        ("ferry_proxy_livez_total", "/livez", &requests.livez),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} Answers to {what}, by status code.\n# TYPE {name} counter"
        );
        let _ = writeln!(out, "{name}{{code=\"200\"}} {}", ok.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "{name}{{code=\"503\"}} {}",
            unavailable.load(Ordering::Relaxed)
        );
    }
    out
}

/// How many times `/healthz` and `/livez` answered 200 and 503.
#[derive(Debug, Default)]
pub struct RequestCounters {
    healthz: [AtomicU64; 2],
    livez: [AtomicU64; 2],
}

#[derive(Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    health: Arc<HealthChecks>,
    requests: Arc<RequestCounters>,
}

fn json(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (CONTENT_TYPE, "application/json"),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

fn health_answer(s: &Shared, with_node: bool) -> Response {
    let now = SystemTime::now();
    let health = read(&s.metrics, |st| proxy_health(st, now));
    let eligible = s.health.node_eligible();
    let healthy = health.healthy && (eligible || !with_node);
    let counters = if with_node {
        &s.requests.healthz
    } else {
        &s.requests.livez
    };
    counters[usize::from(!healthy)].fetch_add(1, Ordering::Relaxed);
    // kube-proxy: "lastUpdated" is the current time when healthy.
    let last = if healthy { Some(now) } else { health.last_updated };
    let (last, now) = (go_time(last), go_time(Some(now)));
    let body = if with_node {
        format!(r#"{{"lastUpdated": "{last}","currentTime": "{now}", "nodeEligible": {eligible}}}"#)
    } else {
        format!(r#"{{"lastUpdated": "{last}","currentTime": "{now}"}}"#)
    };
    json(
        if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body,
    )
}

async fn healthz(State(s): State<Shared>) -> Response {
    health_answer(&s, true)
}

async fn livez(State(s): State<Shared>) -> Response {
    health_answer(&s, false)
}

async fn metrics(State(s): State<Shared>) -> Response {
    let body = read(&s.metrics, |st| render_metrics(st, &s.requests));
    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

fn routers(m: Arc<Metrics>, health: Arc<HealthChecks>) -> (Router, Router) {
    let shared = Shared {
        metrics: m,
        health,
        requests: Arc::default(),
    };
    let healthz = Router::new()
        .route("/healthz", any(healthz))
        .route("/livez", any(livez))
        .with_state(shared.clone());
    let metrics = Router::new().route("/metrics", any(metrics)).with_state(shared);
    (healthz, metrics)
}

/// Serves `/healthz` and `/livez` on `healthz`, `/metrics` on `metrics` (one listener with
/// all three when the addresses are equal), until an error. An unspecified IPv4 address
/// (`0.0.0.0`) listens on IPv6 too where the host has it, as Go (kube-proxy) does.
pub async fn serve(
    healthz: SocketAddr,
    metrics: SocketAddr,
    m: Arc<Metrics>,
    health: Arc<HealthChecks>,
) -> io::Result<()> {
    let bind = |addr: SocketAddr, flag: &str| {
        bind_wildcard_dual(addr)
            .and_then(TcpListener::from_std)
            .map_err(|e| io::Error::new(e.kind(), format!("{flag} {addr}: {e}")))
    };
    if healthz == metrics {
        let (h, mt) = routers(m, health);
        let listener = bind(healthz, "--healthz-bind-address/--metrics-bind-address")?;
        return axum::serve(listener, h.merge(mt)).await;
    }
    let h = bind(healthz, "--healthz-bind-address")?;
    let mt = bind(metrics, "--metrics-bind-address")?;
    serve_listeners(h, mt, m, health).await
}

/// [`serve`] on listeners already bound (tests bind `127.0.0.1:0`).
pub async fn serve_listeners(
    healthz: TcpListener,
    metrics: TcpListener,
    m: Arc<Metrics>,
    health: Arc<HealthChecks>,
) -> io::Result<()> {
    let (h, mt) = routers(m, health);
    tokio::try_join!(
        axum::serve(healthz, h).into_future(),
        axum::serve(metrics, mt).into_future()
    )?;
    Ok(())
}

/// A non-blocking listening socket on `addr`; `0.0.0.0` and `[::]` take both families
/// when possible.
fn bind_wildcard_dual(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    if addr.ip().is_unspecified() {
        let any6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), addr.port());
        match bind_tcp(any6, true) {
            Ok(l) => return Ok(l),
            // No IPv6 on this host: IPv4 alone.
            Err(e) if addr.is_ipv4() && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
            Err(e) => return Err(e),
        }
    }
    bind_tcp(addr, false)
}

fn bind_tcp(addr: SocketAddr, dual: bool) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(!dual)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A Service, by namespace and name.
pub type ServiceName = (String, String);

/// The health check node ports of `externalTrafficPolicy: Local` Services, as kube-proxy's
/// service health server: `GET` any path on `healthCheckNodePort` answers `200` when the
/// node has local ready endpoints for the Service and the proxy is healthy, `503`
/// otherwise (a load balancer then stops sending this node traffic), with
///
/// ```text
/// {
///     "service": {
///         "namespace": "default",
///         "name": "web"
///     },
///     "localEndpoints": 2,
///     "serviceProxyHealthy": true
/// }
/// ```
///
/// (tab-indented, no trailing newline, `Content-Type: application/json`,
/// `X-Content-Type-Options: nosniff`).
///
/// Listeners follow the plan: [`HealthChecks::sync`] opens one for each new Service,
/// closes those of Services that went away or changed port, and updates the counts. They
/// listen on every address in both families (`[::]` dual-stack), or with
/// `--nodeport-addresses` only on the node addresses those select. A port that cannot be
/// opened (in use) is logged and tried again at the next sync.
pub struct HealthChecks {
    metrics: Arc<Metrics>,
    node_eligible: AtomicBool,
    runtime: tokio::runtime::Handle,
    services: Mutex<BTreeMap<ServiceName, HealthCheckPort>>,
}

struct HealthCheckPort {
    port: u16,
    /// The addresses asked for (`[::]` meaning every address of both families).
    ips: Vec<IpAddr>,
    bound: Vec<SocketAddr>,
    local_endpoints: Arc<AtomicUsize>,
    /// Dropped with this port: the servers stop accepting, close idle connections and end.
    _stop: tokio::sync::watch::Sender<()>,
}

#[derive(Clone)]
struct PortState {
    namespace: String,
    name: String,
    local_endpoints: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

async fn service_health(State(s): State<PortState>) -> Response {
    let count = s.local_endpoints.load(Ordering::Relaxed);
    let now = SystemTime::now();
    let proxy_healthy = read(&s.metrics, |st| proxy_health(st, now)).healthy;
    let quote = |v: &str| serde_json::to_string(v).expect("a string serializes");
    // kube-proxy's dedented template: tabs, no trailing newline.
    let body = format!(
        concat!(
            "{{\n",
            "\t\"service\": {{\n",
            "\t\t\"namespace\": {namespace},\n",
            "\t\t\"name\": {name}\n",
            "\t}},\n",
            "\t\"localEndpoints\": {count},\n",
            "\t\"serviceProxyHealthy\": {healthy}\n",
            "}}"
        ),
        namespace = quote(&s.namespace),
        name = quote(&s.name),
        count = count,
        healthy = proxy_healthy,
    );
    let ok = count != 0 && proxy_healthy;
    json(
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body,
    )
}

impl HealthChecks {
    /// Must be called inside a tokio runtime: the listeners run on it, whatever thread
    /// [`HealthChecks::sync`] is later called from.
    pub fn new(metrics: Arc<Metrics>) -> HealthChecks {
        HealthChecks {
            metrics,
            node_eligible: AtomicBool::new(true),
            runtime: tokio::runtime::Handle::current(),
            services: Mutex::new(BTreeMap::new()),
        }
    }

    /// Opens, closes and updates the health check ports to match `table`. The count for a
    /// Service is its distinct local endpoints (address and port) over all its ports and
    /// families, from the endpoints external traffic uses.
    pub fn sync(&self, table: &ServiceTable) {
        let mut wanted: BTreeMap<ServiceName, (u16, BTreeSet<(IpAddr, u16)>)> = BTreeMap::new();
        for sp in table.ports.values() {
            let Some(port) = sp.health_check_node_port else {
                continue;
            };
            let (_, local) = wanted
                .entry((sp.id.namespace.clone(), sp.id.name.clone()))
                .or_insert_with(|| (port, BTreeSet::new()));
            local.extend(
                sp.external_endpoints
                    .iter()
                    .filter(|e| e.is_local && e.ready)
                    .map(|e| (e.ip, e.port)),
            );
        }
        let ips = if wanted.is_empty() {
            Vec::new()
        } else {
            listen_ips(&table.settings.nodeport_addresses)
        };

        let mut services = self.services.lock().expect("health check lock");
        services.retain(|name, hc| {
            let keep = wanted.get(name).is_some_and(|(port, _)| *port == hc.port) && hc.ips == ips;
            if !keep {
                let service = format!("{}/{}", name.0, name.1);
                tracing::info!(%service, port = hc.port, "closing health check port");
            }
            keep
        });
        for (name, (port, local)) in wanted {
            if let Some(hc) = services.get(&name) {
                hc.local_endpoints.store(local.len(), Ordering::Relaxed);
                continue;
            }
            let service = format!("{}/{}", name.0, name.1);
            match self.open(&name, port, &ips, local.len()) {
                Ok(hc) => {
                    tracing::info!(%service, port, addresses = ?hc.bound, "health check port open");
                    services.insert(name, hc);
                }
                Err(e) => tracing::warn!(
                    "health check node port {port} of Service {service}: {e}; retrying at the next sync"
                ),
            }
        }
    }

    fn open(
        &self,
        name: &ServiceName,
        port: u16,
        ips: &[IpAddr],
        count: usize,
    ) -> io::Result<HealthCheckPort> {
        let local_endpoints = Arc::new(AtomicUsize::new(count));
        let state = PortState {
            namespace: name.0.clone(),
            name: name.1.clone(),
            local_endpoints: local_endpoints.clone(),
            metrics: self.metrics.clone(),
        };
        let router = Router::new().fallback(service_health).with_state(state);
        // Bind everything first: on failure nothing stays open.
        let mut listeners = Vec::new();
        for ip in ips {
            let addr = SocketAddr::new(*ip, port);
            let listener = if *ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
                bind_wildcard_dual(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
            } else {
                bind_tcp(addr, false)
            };
            listeners.push(listener.map_err(|e| io::Error::new(e.kind(), format!("listen on {addr}: {e}")))?);
        }
        let _enter = self.runtime.enter();
        let (stop, stopped) = tokio::sync::watch::channel(());
        let mut bound = Vec::new();
        for listener in listeners {
            let listener = TcpListener::from_std(listener)?;
            bound.push(listener.local_addr()?);
            let mut stopped = stopped.clone();
            let server = axum::serve(listener, router.clone())
                .with_graceful_shutdown(async move {
                    let _ = stopped.changed().await;
                })
                .into_future();
            self.runtime.spawn(async move {
                if let Err(e) = server.await {
                    tracing::warn!("health check server: {e}");
                }
            });
        }
        Ok(HealthCheckPort {
            port,
            ips: ips.to_vec(),
            bound,
            local_endpoints,
            _stop: stop,
        })
    }

    /// The open health check ports: Service, and the addresses listened on.
    pub fn listening(&self) -> BTreeMap<ServiceName, Vec<SocketAddr>> {
        let services = self.services.lock().expect("health check lock");
        services
            .iter()
            .map(|(name, hc)| (name.clone(), hc.bound.clone()))
            .collect()
    }

    /// Takes this node's Node (the store's copy) into account for `/healthz` (kube-proxy's
    /// `SyncNode`): a node being deleted or tainted `ToBeDeletedByClusterAutoscaler` is
    /// not eligible, so load balancers drain it before it goes.
    pub fn sync_node(&self, node: &NodeInfo) {
        self.node_eligible
            .store(!node.being_deleted && !node.to_be_deleted, Ordering::Relaxed);
    }

    /// Whether `/healthz` counts this node as eligible (true until told otherwise).
    pub fn node_eligible(&self) -> bool {
        self.node_eligible.load(Ordering::Relaxed)
    }
}

/// Where health check ports listen: `[::]` (every address, both families) when
/// `--nodeport-addresses` is empty, else the node's addresses inside those ranges.
fn listen_ips(nodeport_addresses: &[IpNetwork]) -> Vec<IpAddr> {
    if nodeport_addresses.is_empty() {
        return vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)];
    }
    let addrs = match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs,
        Err(e) => {
            tracing::warn!("listing the node's addresses for health check ports: {e}; listening on all");
            return vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)];
        }
    };
    let ips: BTreeSet<IpAddr> = addrs
        .filter_map(|a| {
            let a = a.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                // Link-local addresses need a scope id to bind: NodePorts do not use them.
                a.as_sockaddr_in6()
                    .map(|v6| IpAddr::V6(v6.ip()))
                    .filter(|ip| !is_link_local(ip))
            }
        })
        .filter(|ip| nodeport_addresses.iter().any(|n| n.contains(*ip)))
        .collect();
    if ips.is_empty() {
        tracing::warn!(
            "no node address is inside --nodeport-addresses {nodeport_addresses:?}: \
             health check ports listen nowhere"
        );
    }
    ips.into_iter().collect()
}

fn is_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Endpoint, Family, NodeSettings, Protocol, ServicePort, ServicePortId};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn go_time_matches_gos_format() {
        assert_eq!(go_time(None), "0001-01-01 00:00:00 +0000 UTC");
        assert_eq!(go_time(Some(at(0, 0))), "1970-01-01 00:00:00 +0000 UTC");
        // 2024-02-29 23:59:59.5 UTC (a leap day).
        assert_eq!(
            go_time(Some(at(1_709_251_199, 500_000_000))),
            "2024-02-29 23:59:59.5 +0000 UTC"
        );
        assert_eq!(
            go_time(Some(at(1_735_787_045, 123_456_789))),
            "2025-01-02 03:04:05.123456789 +0000 UTC"
        );
    }

    #[test]
    fn health_follows_kube_proxys_rule() {
        let now = at(10_000, 0);
        let state = |queued: Option<u64>, synced: Option<u64>| MetricsState {
            last_queued: queued.map(|s| at(s, 0)),
            last_successful_sync: synced.map(|s| at(s, 0)),
            ..MetricsState::default()
        };
        // Starting up: nothing queued.
        assert!(proxy_health(&state(None, None), now).healthy);
        // Queued, not synced yet, but recently.
        assert!(proxy_health(&state(Some(9_990), None), now).healthy);
        // Queued 60 s ago or more and never synced since.
        assert!(!proxy_health(&state(Some(9_940), None), now).healthy);
        assert!(!proxy_health(&state(Some(9_000), Some(8_000)), now).healthy);
        // Synced after it was queued: healthy however old.
        let h = proxy_health(&state(Some(5_000), Some(5_001)), now);
        assert!(h.healthy);
        assert_eq!(h.last_updated, Some(at(5_001, 0)));
    }

    #[test]
    fn metrics_text() {
        let state = MetricsState {
            sync_durations: {
                let mut h = crate::metrics::SyncHistogram::default();
                for d in [
                    Duration::from_micros(500),
                    Duration::from_millis(3),
                    Duration::from_secs(20),
                ] {
                    h.observe(d);
                }
                h
            },
            services: 4,
            endpoints: 9,
            rules: 120,
            last_successful_sync: Some(at(1_700_000_000, 250_000_000)),
            last_queued: None,
            sync_errors: 2,
        };
        let text = render_metrics(&state, &RequestCounters::default());
        for line in [
            "# TYPE ferry_proxy_sync_proxy_rules_duration_seconds histogram",
            "ferry_proxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"} 1",
            "ferry_proxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 1",
            "ferry_proxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 2",
            "ferry_proxy_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\"} 2",
            "ferry_proxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 3",
            "ferry_proxy_sync_proxy_rules_duration_seconds_sum 20.0035",
            "ferry_proxy_sync_proxy_rules_duration_seconds_count 3",
            "ferry_proxy_sync_proxy_rules_last_timestamp_seconds 1700000000.25",
            "ferry_proxy_sync_proxy_rules_last_queued_timestamp_seconds 0",
            "ferry_proxy_services 4",
            "ferry_proxy_endpoints 9",
            "ferry_proxy_rules 120",
            "# TYPE ferry_proxy_sync_proxy_rules_failures_total counter",
            "ferry_proxy_sync_proxy_rules_failures_total 2",
            "ferry_proxy_healthz_total{code=\"503\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // Every sample line belongs to a declared metric family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {family} ")), "{line}");
        }
    }

    /// One HTTP/1.1 request; returns status, headers (lower-case names) and body.
    async fn get(addr: SocketAddr, path: &str) -> io::Result<(u16, Vec<(String, String)>, String)> {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await?;
        let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
        let mut lines = head.lines();
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok((status, headers, body.to_string()))
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    #[tokio::test]
    async fn healthz_livez_and_metrics_over_http() {
        let m = Arc::new(Metrics::default());
        let health = Arc::new(HealthChecks::new(m.clone()));
        let hl = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ml = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (ha, ma) = (hl.local_addr().unwrap(), ml.local_addr().unwrap());
        tokio::spawn(serve_listeners(hl, ml, m.clone(), health.clone()));

        let (status, headers, body) = get(ha, "/healthz").await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(header(&headers, "content-type"), Some("application/json"));
        assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["nodeEligible"], true);
        assert_eq!(v["lastUpdated"], v["currentTime"], "healthy: lastUpdated is now");
        assert!(
            body.starts_with(r#"{"lastUpdated": ""#) && body.contains(r#"","currentTime": ""#),
            "{body}"
        );

        // Work queued two minutes ago and never synced: unhealthy, lastUpdated is the last sync.
        let synced = SystemTime::now() - Duration::from_secs(300);
        m.update(|s| {
            s.last_successful_sync = Some(synced);
            s.last_queued = Some(SystemTime::now() - Duration::from_secs(120));
        });
        let (status, _, body) = get(ha, "/healthz").await.unwrap();
        assert_eq!(status, 503, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["lastUpdated"], go_time(Some(synced)));
        assert_eq!(get(ha, "/livez").await.unwrap().0, 503);

        // Synced again: healthy; then the node is being deleted: /healthz 503, /livez 200.
        m.update(|s| s.last_successful_sync = Some(SystemTime::now()));
        assert_eq!(get(ha, "/healthz").await.unwrap().0, 200);
        let mut node = k8s_openapi::api::core::v1::Node::default();
        node.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        health.sync_node(&NodeInfo::from(node));
        let (status, _, body) = get(ha, "/healthz").await.unwrap();
        assert_eq!(status, 503);
        assert!(body.ends_with(r#", "nodeEligible": false}"#), "{body}");
        let (status, _, body) = get(ha, "/livez").await.unwrap();
        assert_eq!(status, 200);
        assert!(!body.contains("nodeEligible"), "{body}");
        health.sync_node(&NodeInfo::from(k8s_openapi::api::core::v1::Node::default()));
        assert_eq!(get(ha, "/healthz").await.unwrap().0, 200);

        let (status, headers, body) = get(ma, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        assert!(header(&headers, "content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        assert!(
            body.contains("ferry_proxy_healthz_total{code=\"200\"} 3\n"),
            "{body}"
        );
        assert!(
            body.contains("ferry_proxy_healthz_total{code=\"503\"} 2\n"),
            "{body}"
        );
        assert!(
            body.contains("ferry_proxy_livez_total{code=\"503\"} 1\n"),
            "{body}"
        );
        // /metrics is not on the health port and the health endpoints are not on the metrics port.
        assert_eq!(get(ha, "/metrics").await.unwrap().0, 404);
        assert_eq!(get(ma, "/healthz").await.unwrap().0, 404);
    }

    /// A port free for listeners on 127.0.0.1 and ::1, taken below the ephemeral range:
    /// the client sockets of tests running in parallel draw their source ports from that
    /// range, and one of them in TIME_WAIT on a port blocks a listener there even with
    /// SO_REUSEADDR (the kernel waives the conflict only when both sockets set it).
    fn free_port() -> u16 {
        static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        // 20000-29999: below the ephemeral range (32768 and up by default).
        let offset = (std::process::id() % 500) as u16 * 20;
        for _ in 0..10_000 {
            let port = 20_000 + (offset + NEXT.fetch_add(1, Ordering::Relaxed) % 10_000) % 10_000;
            let free = |ip: IpAddr| std::net::TcpListener::bind(SocketAddr::new(ip, port)).is_ok();
            if free(Ipv4Addr::LOCALHOST.into()) && free(Ipv6Addr::LOCALHOST.into()) {
                return port;
            }
        }
        panic!("no free port below the ephemeral range");
    }

    /// Syncs until `services` Services have their health check port open, as the proxy's
    /// loop retries a port it could not open at its next sync. In a test process a port
    /// just freed can stay held for a moment: a child that another test thread is spawning
    /// holds copies of every descriptor until it execs.
    fn sync_until_listening(checks: &HealthChecks, table: &ServiceTable, services: usize) {
        for _ in 0..200 {
            checks.sync(table);
            if checks.listening().len() == services {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn lb_port(
        ns: &str,
        name: &str,
        port_name: &str,
        hc: u16,
        family: Family,
        eps: &[(&str, bool)],
    ) -> ServicePort {
        let endpoints: Vec<Endpoint> = eps
            .iter()
            .map(|(ip, is_local)| Endpoint {
                ip: ip.parse().unwrap(),
                port: 8080,
                is_local: *is_local,
                ready: true,
            })
            .collect();
        ServicePort {
            id: ServicePortId {
                namespace: ns.into(),
                name: name.into(),
                port_name: port_name.into(),
                protocol: Protocol::Tcp,
                family,
            },
            cluster_ip: None,
            port: 80,
            node_port: Some(30080),
            external_ips: vec![],
            load_balancer_ips: vec![],
            source_ranges: vec![],
            external_local: true,
            internal_local: false,
            health_check_node_port: Some(hc),
            affinity_seconds: None,
            cluster_endpoints: endpoints.clone(),
            external_endpoints: endpoints.into_iter().filter(|e| e.is_local).collect(),
            short_circuit_endpoints: Vec::new(),
        }
    }

    fn table(ports: Vec<ServicePort>) -> ServiceTable {
        ServiceTable {
            settings: NodeSettings {
                node_name: "node-a".into(),
                cluster_cidrs: vec![],
                // Loopback only: the tests never listen on the machine's other addresses.
                nodeport_addresses: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            },
            ports: ports.into_iter().map(|p| (p.id.clone(), p)).collect(),
        }
    }

    #[tokio::test]
    async fn health_check_node_ports_follow_the_plan() {
        let m = Arc::new(Metrics::default());
        let checks = HealthChecks::new(m.clone());
        let port = free_port();
        let web = ("default".to_string(), "web".to_string());
        // Two ports of one Service, two families, three local endpoints (one shared).
        sync_until_listening(
            &checks,
            &table(vec![
                lb_port(
                    "default",
                    "web",
                    "http",
                    port,
                    Family::V4,
                    &[("10.0.0.1", true), ("10.0.1.1", false)],
                ),
                lb_port(
                    "default",
                    "web",
                    "https",
                    port,
                    Family::V4,
                    &[("10.0.0.1", true), ("10.0.0.2", true)],
                ),
                lb_port("default", "web", "http", port, Family::V6, &[("fd00::1", true)]),
            ]),
            1,
        );
        let listening = checks.listening();
        let addrs = &listening[&web];
        assert!(
            addrs.contains(&SocketAddr::from(([127, 0, 0, 1], port))),
            "{addrs:?}"
        );
        let v4 = SocketAddr::from(([127, 0, 0, 1], port));

        let (status, headers, body) = get(v4, "/").await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(header(&headers, "content-type"), Some("application/json"));
        assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
        let want = "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\
                    \"localEndpoints\": 3,\n\t\"serviceProxyHealthy\": true\n}";
        assert_eq!(body, want);
        if let Some(v6) = addrs.iter().find(|a| a.is_ipv6()) {
            assert_eq!(get(*v6, "/any/path").await.unwrap().0, 200);
        }

        // No local endpoint left: 503 with 0, same listener.
        checks.sync(&table(vec![lb_port(
            "default",
            "web",
            "http",
            port,
            Family::V4,
            &[("10.0.1.1", false)],
        )]));
        let (status, _, body) = get(v4, "/").await.unwrap();
        assert_eq!(status, 503);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["localEndpoints"], 0);
        assert_eq!(v["serviceProxyHealthy"], true);

        // Local endpoints, but the proxy is unhealthy: 503, serviceProxyHealthy false.
        checks.sync(&table(vec![lb_port(
            "default",
            "web",
            "http",
            port,
            Family::V4,
            &[("10.0.0.1", true)],
        )]));
        m.update(|s| s.last_queued = Some(SystemTime::now() - Duration::from_secs(600)));
        let (status, _, body) = get(v4, "/").await.unwrap();
        assert_eq!(status, 503);
        assert!(
            body.contains("\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": false"),
            "{body}"
        );
        m.update(|s| s.last_successful_sync = Some(SystemTime::now()));

        // The port changes: the old one closes, the new one opens.
        let port2 = free_port();
        sync_until_listening(
            &checks,
            &table(vec![lb_port(
                "default",
                "web",
                "http",
                port2,
                Family::V4,
                &[("10.0.0.1", true)],
            )]),
            1,
        );
        let v4b = SocketAddr::from(([127, 0, 0, 1], port2));
        assert_eq!(get(v4b, "/").await.unwrap().0, 200);
        wait_refused(v4).await;

        // The Service goes away: closed.
        checks.sync(&table(vec![]));
        assert!(checks.listening().is_empty());
        wait_refused(v4b).await;
    }

    #[tokio::test]
    async fn a_node_with_only_terminating_local_endpoints_is_not_healthy_for_the_service() {
        // The plan's terminating fallback still sends traffic to them, but like
        // kube-proxy the health check counts ready endpoints only, so load balancers
        // move away from this node.
        let checks = HealthChecks::new(Arc::new(Metrics::default()));
        let port = free_port();
        let mut p = lb_port("default", "web", "http", port, Family::V4, &[("10.0.0.1", true)]);
        for e in p
            .external_endpoints
            .iter_mut()
            .chain(p.cluster_endpoints.iter_mut())
        {
            e.ready = false;
        }
        sync_until_listening(&checks, &table(vec![p]), 1);
        let (status, _, body) = get(SocketAddr::from(([127, 0, 0, 1], port)), "/").await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("\"localEndpoints\": 0"), "{body}");
    }

    #[tokio::test]
    async fn a_busy_port_is_retried_at_the_next_sync() {
        let checks = HealthChecks::new(Arc::new(Metrics::default()));
        let port = free_port();
        let busy = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let t = table(vec![lb_port(
            "ns",
            "svc",
            "",
            port,
            Family::V4,
            &[("10.0.0.1", true)],
        )]);
        checks.sync(&t);
        assert!(checks.listening().is_empty(), "bound a busy port");
        drop(busy);
        sync_until_listening(&checks, &t, 1);
        assert_eq!(checks.listening().len(), 1);
        assert_eq!(
            get(SocketAddr::from(([127, 0, 0, 1], port)), "/")
                .await
                .unwrap()
                .0,
            200
        );
    }

    async fn wait_refused(addr: SocketAddr) {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{addr} still accepts connections");
    }
}
