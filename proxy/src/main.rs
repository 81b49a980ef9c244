//! `ferry-proxy`: run (watch and program), dump (print the plan), cleanup (remove what was
//! programmed). The flags are kube-proxy's where kube-proxy has one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnetwork::IpNetwork;
use tokio::sync::mpsc;
use tracing::info;

use ferry_proxy::metrics::Metrics;
use ferry_proxy::plan::services::plan;
use ferry_proxy::plan::NodeSettings;
use ferry_proxy::run::{BackendThread, LoopConfig, RunError, EVENT_QUEUE};
use ferry_proxy::source::{manifests, Event, Kind};
use ferry_proxy::store::Store;
use ferry_proxy::{dump, run};

#[derive(Parser)]
#[command(
    name = "ferry-proxy",
    version,
    about = "Ferry's kube-proxy replacement: Kubernetes Services in nftables"
)]
struct Cli {
    /// Log lines as text (colours only on a terminal) or as one JSON object a line, for
    /// log pipelines. RUST_LOG sets what is logged (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch Services, EndpointSlices and Nodes and keep the node's rules in line.
    Run(RunArgs),
    /// Read the source once and print the plan: what `run` would program.
    Dump(DumpArgs),
    /// Remove everything Ferry programmed (its nftables tables).
    Cleanup(CleanupArgs),
}

#[derive(Args)]
struct SourceArgs {
    /// kubeconfig file of the API server to watch (default: in-cluster when run as a Pod,
    /// else $KUBECONFIG or ~/.kube/config).
    #[arg(long, value_name = "PATH", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Read Services, EndpointSlices and Nodes from YAML/JSON files in DIR instead of an
    /// API server; changes are applied within a second.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
}

#[derive(Args)]
struct NodeArgs {
    /// This node's name, as EndpointSlices' nodeName says it (default: the host name).
    #[arg(long, value_name = "NAME")]
    hostname_override: Option<String>,
    /// The Pod network(s): traffic to a ClusterIP from outside them is masqueraded.
    #[arg(long, value_name = "CIDR[,CIDR]", value_delimiter = ',')]
    cluster_cidr: Vec<IpNetwork>,
    /// Node addresses NodePorts answer on, by range (default: every node address).
    #[arg(long, value_name = "CIDR[,CIDR]", value_delimiter = ',')]
    nodeport_addresses: Vec<IpNetwork>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    node: NodeArgs,
    /// Where /healthz and /livez are served.
    #[arg(long, value_name = "IP:PORT", default_value = "0.0.0.0:10256")]
    healthz_bind_address: SocketAddr,
    /// Where /metrics is served.
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:10249")]
    metrics_bind_address: SocketAddr,
    #[arg(long, value_enum, default_value_t = BackendKind::Nftables)]
    backend: BackendKind,
}

#[derive(Args)]
struct DumpArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    node: NodeArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Args)]
struct CleanupArgs {
    #[arg(long, value_enum, default_value_t = BackendKind::Nftables)]
    backend: BackendKind,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendKind {
    Nftables,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

/// Logs go to stderr. The sources log each failure once, with the delay before the next
/// try, so kube's client, which logs every failed request again at ERROR, is silenced
/// unless RUST_LOG asks for it.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_client=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // `kubectl logs` is no terminal: escape codes there are noise on every line.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run_command(args),
        Command::Dump(args) => dump_command(args),
        Command::Cleanup(args) => cleanup_command(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ferry-proxy: {message}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn run_command(args: RunArgs) -> Result<(), String> {
    let settings = node_settings(&args.node)?;
    let BackendKind::Nftables = args.backend;
    check_manifests_dir(&args.source)?;
    info!(node = %settings.node_name, "starting");
    runtime()?.block_on(async move {
        // The back end first: if it cannot start, nothing else has been opened.
        let backend = BackendThread::start(wiring::backend)
            .await
            .map_err(|e| e.to_string())?;
        let metrics = Arc::new(Metrics::default());
        // Background tasks that cannot go on (no API client, a port in use) stop the proxy.
        let (fatal_tx, mut fatal_rx) = mpsc::channel::<String>(4);
        let on_synced = wiring::http(
            args.healthz_bind_address,
            args.metrics_bind_address,
            &metrics,
            fatal_tx.clone(),
        );
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        spawn_source(args.source, settings.node_name.clone(), tx, fatal_tx);

        let mut fatal = None;
        let shutdown = async {
            tokio::select! {
                message = fatal_rx.recv() => fatal = message,
                () = terminated() => info!("stopping; the programmed rules stay in place"),
            }
        };
        let result = run::run(
            rx,
            backend,
            LoopConfig::new(settings),
            metrics,
            on_synced,
            shutdown,
        )
        .await;
        result.map_err(|e: RunError| e.to_string())?;
        fatal.map_or(Ok(()), Err)
    })
}

/// SIGTERM (a Pod being stopped) or Ctrl-C.
async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn spawn_source(source: SourceArgs, node_name: String, tx: mpsc::Sender<Event>, fatal: mpsc::Sender<String>) {
    match source.manifests {
        Some(dir) => {
            tokio::spawn(manifests::run(dir, tx));
        }
        None => {
            tokio::spawn(async move {
                if let Err(e) = wiring::kube_source(source.kubeconfig, node_name, tx).await {
                    let _ = fatal.send(e).await;
                }
            });
        }
    }
}

fn dump_command(args: DumpArgs) -> Result<(), String> {
    let settings = node_settings(&args.node)?;
    check_manifests_dir(&args.source)?;
    let store = match &args.source.manifests {
        Some(dir) => {
            let objects = manifests::read_dir(dir).map_err(|errors| {
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
            let mut store = Store::new();
            store.apply(Event::Snapshot {
                kinds: Kind::ALL.to_vec(),
                objects,
            });
            store
        }
        None => runtime()?.block_on(async {
            let (tx, mut rx) = mpsc::channel(EVENT_QUEUE);
            let source = tokio::spawn(wiring::kube_source(
                args.source.kubeconfig,
                settings.node_name.clone(),
                tx,
            ));
            let store = run::read_store(&mut rx, Duration::from_secs(30)).await;
            source.abort();
            store.map_err(|e| e.to_string())
        })?,
    };
    let table = plan(&store, &settings);
    let text = match args.output {
        Format::Table => dump::table(&table),
        Format::Json => dump::json(&table),
    };
    print!("{text}");
    Ok(())
}

fn cleanup_command(args: CleanupArgs) -> Result<(), String> {
    let BackendKind::Nftables = args.backend;
    let mut backend = wiring::backend().map_err(|e| e.to_string())?;
    backend.cleanup().map_err(|e| format!("cleanup: {e}"))?;
    info!("removed everything Ferry programmed");
    Ok(())
}

fn check_manifests_dir(source: &SourceArgs) -> Result<(), String> {
    match &source.manifests {
        Some(dir) if !dir.is_dir() => Err(format!(
            "--manifests {}: not a directory (give the directory holding the YAML/JSON files)",
            dir.display()
        )),
        _ => Ok(()),
    }
}

fn node_settings(node: &NodeArgs) -> Result<NodeSettings, String> {
    let node_name = match &node.hostname_override {
        Some(name) => name.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_err(|e| format!("cannot read the host name ({e}); pass --hostname-override NAME"))?,
    };
    // kube-proxy trims and lower-cases the name (Node names are lower case).
    let node_name = node_name.trim().to_lowercase();
    if node_name.is_empty() {
        return Err("the node name is empty: pass --hostname-override NAME".into());
    }
    // Normalised to the network address: `10.244.1.7/16` means 10.244.0.0/16.
    let networks = |nets: &[IpNetwork]| -> Vec<IpNetwork> {
        nets.iter()
            .map(|n| IpNetwork::new(n.network(), n.prefix()).expect("same prefix"))
            .collect()
    };
    Ok(NodeSettings {
        node_name,
        cluster_cidrs: networks(&node.cluster_cidr),
        nodeport_addresses: networks(&node.nodeport_addresses),
    })
}

/// What other modules provide, each behind one function: switching one on is one line.
mod wiring {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use ferry_proxy::backend::{Backend, BackendError};
    use ferry_proxy::http::HealthChecks;
    use ferry_proxy::metrics::Metrics;
    use ferry_proxy::run::OnSynced;
    use ferry_proxy::source::Event;
    use tokio::sync::mpsc;

    /// How often at most the sync loop's freed memory is given back to the system.
    const TRIM_INTERVAL: Duration = Duration::from_secs(10);

    /// The nftables back end.
    pub fn backend() -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(ferry_proxy::backend::nftables::NftablesBackend::new()))
    }

    /// The Kubernetes API source; returns when `tx`'s receiver is gone, or fails when no
    /// client can be made.
    pub async fn kube_source(
        kubeconfig: Option<PathBuf>,
        node_name: String,
        tx: mpsc::Sender<Event>,
    ) -> Result<(), String> {
        ferry_proxy::source::kube::run(kubeconfig, node_name, tx)
            .await
            .map_err(|e| e.to_string())
    }

    /// Starts /healthz, /livez, /metrics and the health check node ports; returns what the
    /// loop calls after each sync. Serving errors (an address in use) go to `fatal`.
    pub fn http(
        healthz: SocketAddr,
        metrics_addr: SocketAddr,
        metrics: &Arc<Metrics>,
        fatal: mpsc::Sender<String>,
    ) -> OnSynced {
        let health = Arc::new(HealthChecks::new(metrics.clone()));
        let server = ferry_proxy::http::serve(healthz, metrics_addr, metrics.clone(), health.clone());
        tokio::spawn(async move {
            if let Err(e) = server.await {
                let _ = fatal.send(format!("HTTP server: {e}")).await;
            }
        });
        let mut last_trim = None;
        Box::new(move |table, store| {
            health.sync(table);
            // A sync after a big change (the first one above all) leaves the planning and
            // rendering buffers freed but held by the allocator: -30 MiB of RSS at 10k
            // Services (proxy bench). Not after every sync: a trim walks the whole heap.
            if last_trim.is_none_or(|at: Instant| at.elapsed() >= TRIM_INTERVAL) {
                ferry_proxy::store::release_freed_memory();
                last_trim = Some(Instant::now());
            }
            if let Some(node) = store.node(&table.settings.node_name) {
                health.sync_node(node);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_parse_as_kube_proxy_spells_them() {
        let cli = Cli::try_parse_from([
            "ferry-proxy",
            "run",
            "--manifests",
            "/m",
            "--hostname-override",
            " Node-A ",
            "--cluster-cidr",
            "10.244.0.0/16,fd00:10:244::/56",
            "--nodeport-addresses",
            "192.168.1.7/24",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.healthz_bind_address, "0.0.0.0:10256".parse().unwrap());
        assert_eq!(args.metrics_bind_address, "127.0.0.1:10249".parse().unwrap());
        let settings = node_settings(&args.node).unwrap();
        assert_eq!(settings.node_name, "node-a");
        assert_eq!(settings.cluster_cidrs.len(), 2);
        assert_eq!(
            settings.nodeport_addresses,
            vec!["192.168.1.0/24".parse::<IpNetwork>().unwrap()]
        );

        assert!(
            Cli::try_parse_from(["ferry-proxy", "run", "--manifests", "/m", "--kubeconfig", "/k"]).is_err()
        );
        assert!(Cli::try_parse_from(["ferry-proxy", "run", "--backend", "iptables"]).is_err());
        assert!(Cli::try_parse_from(["ferry-proxy", "dump", "-o", "json"]).is_ok());
    }
}
