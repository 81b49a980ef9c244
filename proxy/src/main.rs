//! `ferry-proxy`: run (watch and program), dump (print the plan), trace (explain one
//! connection from the plans), cleanup (remove what was programmed). The flags are kube-proxy's where kube-proxy has one.

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
use ferry_proxy::{dump, run, trace};

#[derive(Parser)]
#[command(
    name = "ferry-proxy",
    version,
    about = "Ferry's kube-proxy replacement: Kubernetes Services in nftables or eBPF"
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
    /// Read the source once and print the plan: what `run` would program; with
    /// `--backend ebpf`, what the eBPF maps of this node hold.
    Dump(DumpArgs),
    /// Remove everything Ferry programmed (its nftables tables; with `--backend ebpf`, its
    /// eBPF programs and pins).
    Cleanup(CleanupArgs),
    /// Say what the node does with the first packet from FROM to TO: the Service and its
    /// endpoints when TO is a Service address, then per endpoint the NetworkPolicy verdict
    /// and the policies and rules behind it. Reads the source once; programs nothing.
    Trace(TraceArgs),
}

#[derive(Args)]
struct SourceArgs {
    /// kubeconfig file of the API server to watch (default: in-cluster when run as a Pod,
    /// else $KUBECONFIG or ~/.kube/config).
    #[arg(long, value_name = "PATH", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Take only the API server's address from this kubeconfig (the node's kubelet's, e.g.
    /// /etc/kubernetes/kubelet.conf), keeping the Pod's service account: as a DaemonSet,
    /// the proxy cannot reach the API server through the `kubernetes` Service it is
    /// about to program.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["manifests", "kubeconfig"])]
    api_server_from: Option<PathBuf>,
    /// Read Services, EndpointSlices and Nodes from YAML/JSON files in DIR instead of an
    /// API server; changes are applied within a second.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
}

impl SourceArgs {
    fn connection(&self) -> ferry_proxy::source::kube::Connection {
        ferry_proxy::source::kube::Connection {
            kubeconfig: self.kubeconfig.clone(),
            api_server_from: self.api_server_from.clone(),
        }
    }
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
    /// Enforce NetworkPolicy for this node's Pods (table `inet ferry-policy`, hook forward).
    /// `--network-policy=false` for clusters with another policy engine: the table is then
    /// removed, and Pods, Namespaces and NetworkPolicies need not be listed before syncing.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    network_policy: bool,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    network: NetworkArgs,
}

/// The Pod network between nodes (see `ferry_proxy::network`): on with --cluster-cidr,
/// unless --pod-network-mode none.
#[derive(Args)]
struct NetworkArgs {
    /// How Pods reach other nodes' Pods: host-gw (a route via the peer's address; peers
    /// must share a subnet), vxlan (a tunnel to every peer), auto (host-gw where the peer
    /// shares a subnet, VXLAN otherwise), none (no conflist, no routes: Ferry as
    /// kube-proxy only, beside another CNI).
    #[arg(long, value_enum, default_value_t = PodNetworkMode::Auto)]
    pod_network_mode: PodNetworkMode,
    /// Where 10-ferry.conflist is written from this Node's Pod CIDRs; empty: not written.
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d",
          value_parser = clap::builder::TypedValueParser::map(clap::builder::OsStringValueParser::new(), PathBuf::from))]
    cni_conf_dir: PathBuf,
    /// Whether to write the conflist at all.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    write_cni_conf: bool,
    /// The conflist's bridge name.
    #[arg(long, value_name = "NAME", default_value = "cni0")]
    cni_bridge: String,
    /// The conflist's ferry-ipam dataDir (where leases live).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/cni/networks")]
    cni_ipam_data_dir: PathBuf,
    /// The VXLAN network identifier, the same on every node (flannel's default).
    #[arg(long, value_name = "VNI", default_value_t = ferry_proxy::network::DEFAULT_VNI,
          value_parser = clap::value_parser!(u32).range(1..16_777_216))]
    vxlan_vni: u32,
    /// The VXLAN UDP port, the same on every node (Linux's and flannel's default).
    #[arg(long, value_name = "PORT", default_value_t = ferry_proxy::network::DEFAULT_VXLAN_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    vxlan_port: u16,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PodNetworkMode {
    HostGw,
    Vxlan,
    Auto,
    None,
}

impl NetworkArgs {
    /// The Pod network's settings, or `None` when it is off (and why, for the log).
    fn settings(&self, node: &NodeSettings) -> Result<ferry_proxy::network::NetworkSettings, &'static str> {
        use ferry_proxy::network::{Mode, NetworkSettings};
        let mode = match self.pod_network_mode {
            PodNetworkMode::HostGw => Mode::HostGw,
            PodNetworkMode::Vxlan => Mode::Vxlan,
            PodNetworkMode::Auto => Mode::Auto,
            PodNetworkMode::None => return Err("--pod-network-mode none"),
        };
        if node.cluster_cidrs.is_empty() {
            return Err("no --cluster-cidr (needed to masquerade what leaves the cluster)");
        }
        let write = self.write_cni_conf && !self.cni_conf_dir.as_os_str().is_empty();
        Ok(NetworkSettings {
            node_name: node.node_name.clone(),
            mode,
            cni_conf_dir: write.then(|| self.cni_conf_dir.clone()),
            ipam_data_dir: self.cni_ipam_data_dir.clone(),
            bridge: self.cni_bridge.clone(),
            cluster_cidrs: node.cluster_cidrs.clone(),
            vni: self.vxlan_vni,
            vxlan_port: self.vxlan_port,
        })
    }
}

/// Which back end programs Services, and where the eBPF one attaches and pins.
#[derive(Args)]
struct BackendArgs {
    /// nftables: rules in the node's netns; ebpf: cgroup socket programs and a tc program
    /// (needs --cgroup).
    #[arg(long, value_enum, default_value_t = BackendKind::Nftables)]
    backend: BackendKind,
    /// With --backend ebpf: the cgroup v2 directory whose processes (and those below it)
    /// reach Services; processes outside it are never translated. A DaemonSet passes the
    /// host's /sys/fs/cgroup: the cgroup2 root on pure v2 hosts, or on hybrid hosts the
    /// mount of the v1 tree, whose `unified` directory is then used (and logged).
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// With --backend ebpf: pins go to DIR/<node name>/ (a bpf file system).
    #[arg(long, value_name = "DIR", default_value = ferry_proxy::backend::ebpf::DEFAULT_PIN_ROOT)]
    bpf_pin_root: PathBuf,
}

/// The eBPF back end's settings, checked.
struct EbpfSettings {
    cgroup: PathBuf,
    pin_dir: PathBuf,
}

impl BackendArgs {
    /// `None` for nftables; for ebpf, the cgroup (required: never the root by default) and
    /// the pin directory of `node_name`.
    fn ebpf(&self, node_name: &str) -> Result<Option<EbpfSettings>, String> {
        match (self.backend, &self.cgroup) {
            (BackendKind::Nftables, None) => Ok(None),
            (BackendKind::Nftables, Some(_)) => {
                Err("--cgroup is for --backend ebpf only: drop it, or add --backend ebpf".into())
            }
            (BackendKind::Ebpf, None) => Err("--backend ebpf needs --cgroup PATH: the cgroup v2 directory \
                 whose processes reach Services (a DaemonSet passes the host's /sys/fs/cgroup: the \
                 cgroup2 root, or on hybrid hosts the tree holding it as `unified`); it is never \
                 chosen for you"
                .into()),
            (BackendKind::Ebpf, Some(cgroup)) => Ok(Some(EbpfSettings {
                cgroup: cgroup.clone(),
                pin_dir: ferry_proxy::backend::ebpf::pin_dir(&self.bpf_pin_root, node_name),
            })),
        }
    }
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
    /// `ebpf`: print what this node's eBPF maps hold (no source is read).
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
    /// Print the NetworkPolicy table instead of the Services: which Pods are isolated, by
    /// which chain and policies, and each chain's rules and set's ranges (the names
    /// `nft list table inet ferry-policy` shows).
    #[arg(long, conflicts_with = "backend")]
    policy: bool,
    /// With --backend ebpf: where the pins are (DIR/<node name>/).
    #[arg(long, value_name = "DIR", default_value = ferry_proxy::backend::ebpf::DEFAULT_PIN_ROOT)]
    bpf_pin_root: PathBuf,
}

#[derive(Args)]
struct TraceArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    node: NodeArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// The client: a Pod as namespace/name, or an address.
    #[arg(value_name = "FROM")]
    from: String,
    /// The destination: namespace/name, an address or a Service address, then :PORT and
    /// optionally /tcp, /udp or /sctp (e.g. x/b:80, 10.96.0.10:53/udp, [fd00::1]:80).
    #[arg(value_name = "TO:PORT[/PROTO]")]
    to: String,
}

#[derive(Args)]
struct CleanupArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// This node's name (default: the host name): whose pins to remove.
    #[arg(long, value_name = "NAME")]
    hostname_override: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    Nftables,
    Ebpf,
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
        Command::Trace(args) => trace_command(args),
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
    let ebpf = args.backend.ebpf(&settings.node_name)?;
    check_manifests_dir(&args.source)?;
    info!(node = %settings.node_name, "starting");
    // Before the runtime's threads exist, so none gets an arena of its own.
    ferry_proxy::store::use_one_allocator_arena();
    runtime()?.block_on(async move {
        // The back end first: if it cannot start, nothing else has been opened.
        let backend = BackendThread::start(move || wiring::backend(ebpf.as_ref()))
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
        let tx = wiring::pod_network(&args.network, &settings, &args.source, tx)?;
        spawn_source(args.source, settings.node_name.clone(), tx, fatal_tx);

        let mut fatal = None;
        let shutdown = async {
            tokio::select! {
                message = fatal_rx.recv() => fatal = message,
                () = terminated() => info!("stopping; the programmed rules stay in place"),
            }
        };
        let config = LoopConfig {
            network_policy: args.network_policy,
            ..LoopConfig::new(settings)
        };
        let result = run::run(rx, backend, config, metrics, on_synced, shutdown).await;
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
                if let Err(e) = wiring::kube_source(source.connection(), node_name, tx).await {
                    let _ = fatal.send(e).await;
                }
            });
        }
    }
}

fn dump_command(args: DumpArgs) -> Result<(), String> {
    let settings = node_settings(&args.node)?;
    if args.backend == Some(BackendKind::Ebpf) {
        let pin_dir = ferry_proxy::backend::ebpf::pin_dir(&args.bpf_pin_root, &settings.node_name);
        print!(
            "{}",
            ferry_proxy::backend::ebpf::dump_text(&pin_dir).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    let store = read_store_once(args.source, &settings)?;
    if args.policy {
        let table = ferry_proxy::plan::policy::plan(&store, &settings.node_name);
        let layout = ferry_proxy::backend::policy::layout(&table);
        print!(
            "{}",
            match args.output {
                Format::Table => dump::policy_table(&layout),
                Format::Json => dump::policy_json(&layout),
            }
        );
        return Ok(());
    }
    let table = plan(&store, &settings);
    let text = match args.output {
        Format::Table => dump::table(&table),
        Format::Json => dump::json(&table),
    };
    print!("{text}");
    Ok(())
}

fn trace_command(args: TraceArgs) -> Result<(), String> {
    let settings = node_settings(&args.node)?;
    // Bad arguments are told before the source is read.
    let from = trace::parse_party(&args.from).map_err(|e| e.to_string())?;
    let to = trace::parse_target(&args.to).map_err(|e| e.to_string())?;
    let store = read_store_once(args.source, &settings)?;
    let trace = trace::trace_parsed(&store, &settings, &from, &to).map_err(|e| e.to_string())?;
    match args.output {
        Format::Table => print!("{}", trace.to_text()),
        Format::Json => print!("{}", trace.to_json()),
    }
    Ok(())
}

/// Every object of the source, once: a manifests directory as it is now, or the API
/// server's lists.
fn read_store_once(source: SourceArgs, settings: &NodeSettings) -> Result<Store, String> {
    check_manifests_dir(&source)?;
    let store = match &source.manifests {
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
                source.connection(),
                settings.node_name.clone(),
                tx,
            ));
            let store = run::read_store(&mut rx, Duration::from_secs(30)).await;
            // Closed first, so the watchers see nobody listens and stop without
            // reporting the client's shutdown as a failed watch.
            drop(rx);
            source.abort();
            store.map_err(|e| e.to_string())
        })?,
    };
    Ok(store)
}

fn cleanup_command(args: CleanupArgs) -> Result<(), String> {
    let node = NodeArgs {
        hostname_override: args.hostname_override.clone(),
        cluster_cidr: Vec::new(),
        nodeport_addresses: Vec::new(),
    };
    // The Service back end's state, then what either back end shares: the Pod network.
    if let Some(ebpf) = args.backend.ebpf(&node_settings(&node)?.node_name)? {
        let report = ferry_proxy::backend::ebpf::cleanup_pins(&ebpf.pin_dir, &ebpf.cgroup)
            .map_err(|e| format!("cleanup: {e}"))?;
        ferry_proxy::backend::policy::PolicyEnforcer::new()
            .cleanup()
            .map_err(|e| format!("cleanup: {e}"))?;
        info!(
            links = report.links_detached,
            pins = report.pins_removed,
            "removed Ferry's eBPF programs and pins"
        );
    } else {
        let mut backend = wiring::backend(None).map_err(|e| e.to_string())?;
        backend.cleanup().map_err(|e| format!("cleanup: {e}"))?;
    }
    let network =
        ferry_proxy::network::agent::cleanup().map_err(|e| format!("cleanup of the Pod network: {e}"))?;
    info!("removed the Pod network's {network}");
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

    /// Giving the memory a sync freed back to the system. A sync after a big change (the
    /// first one above all, or a huge EndpointSlice removed) leaves the planning and
    /// rendering buffers, and what the removed objects held, freed but kept by the
    /// allocator: -30 MiB of RSS at 10k Services (proxy bench). A trim walks the whole
    /// heap, so it runs at most every [`TRIM_INTERVAL`]; a sync within the interval gets
    /// one trim at its end, so that the last change is always followed by one (a removal
    /// right after an addition used to keep its memory until some later sync).
    #[derive(Default)]
    struct Trim {
        last: Option<Instant>,
        scheduled: bool,
    }

    impl Trim {
        fn after_sync(this: &Arc<std::sync::Mutex<Trim>>) {
            let mut trim = this.lock().unwrap();
            let wait = trim
                .last
                .map_or(Duration::ZERO, |at| TRIM_INTERVAL.saturating_sub(at.elapsed()));
            if wait.is_zero() {
                trim.run();
            } else if !trim.scheduled {
                trim.scheduled = true;
                let this = this.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    this.lock().unwrap().run();
                });
            }
        }

        fn run(&mut self) {
            ferry_proxy::store::release_freed_memory();
            self.last = Some(Instant::now());
            self.scheduled = false;
        }
    }

    /// The nftables back end, or the eBPF one when its settings are given.
    pub fn backend(ebpf: Option<&super::EbpfSettings>) -> Result<Box<dyn Backend>, BackendError> {
        match ebpf {
            None => Ok(Box::new(ferry_proxy::backend::nftables::NftablesBackend::new())),
            Some(e) => Ok(Box::new(ferry_proxy::backend::ebpf::EbpfBackend::new(
                &e.pin_dir, &e.cgroup,
            )?)),
        }
    }

    /// Starts the Pod network between nodes when it is on, and returns the sender the
    /// source should use: one that shows the Pod network every Node event on its way to
    /// the sync loop (the loop and the store are not involved).
    pub fn pod_network(
        args: &super::NetworkArgs,
        node: &ferry_proxy::plan::NodeSettings,
        source: &super::SourceArgs,
        to_loop: mpsc::Sender<Event>,
    ) -> Result<mpsc::Sender<Event>, String> {
        let settings = match args.settings(node) {
            Ok(settings) => settings,
            Err(why) => {
                tracing::info!("Pod network between nodes off: {why}");
                return Ok(to_loop);
            }
        };
        tracing::info!(mode = ?settings.mode, conflist = ?settings.cni_conf_dir, "Pod network between nodes on");
        let agent = ferry_proxy::network::agent::Agent::start(settings)
            .map_err(|e| format!("cannot start the Pod network thread: {e}"))?;
        if source.manifests.is_none() {
            // The API source watches this node's Node only; the Pod network needs all, so
            // it watches them itself and sees none of the source's events.
            tokio::spawn(ferry_proxy::network::nodes::watch(
                source.connection(),
                agent.sender(),
            ));
            return Ok(to_loop);
        }
        let (tx, mut rx) = mpsc::channel::<Event>(ferry_proxy::run::EVENT_QUEUE);
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                agent.observe(&event);
                if to_loop.send(event).await.is_err() {
                    break;
                }
            }
        });
        Ok(tx)
    }

    /// The Kubernetes API source; returns when `tx`'s receiver is gone, or fails when no
    /// client can be made.
    pub async fn kube_source(
        connection: ferry_proxy::source::kube::Connection,
        node_name: String,
        tx: mpsc::Sender<Event>,
    ) -> Result<(), String> {
        ferry_proxy::source::kube::run(connection, node_name, tx)
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
        let trim = Arc::new(std::sync::Mutex::new(Trim::default()));
        Box::new(move |table, store| {
            health.sync(table);
            Trim::after_sync(&trim);
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

    #[test]
    fn the_pod_network_is_on_with_a_cluster_cidr_unless_mode_none() {
        let network = |extra: &[&str]| {
            let base = ["ferry-proxy", "run", "--hostname-override", "a"];
            let cli = Cli::try_parse_from([&base[..], extra].concat()).unwrap();
            let Command::Run(args) = cli.command else {
                panic!("not run")
            };
            args.network.settings(&node_settings(&args.node).unwrap())
        };
        let on = network(&["--cluster-cidr", "10.244.0.0/16"]).unwrap();
        assert_eq!(on.mode, ferry_proxy::network::Mode::Auto);
        assert_eq!(on.cni_conf_dir, Some(PathBuf::from("/etc/cni/net.d")));
        assert_eq!((on.vni, on.vxlan_port), (1, 8472));
        assert!(network(&[]).unwrap_err().contains("--cluster-cidr"));
        let none = ["--cluster-cidr", "10.244.0.0/16", "--pod-network-mode", "none"];
        assert!(network(&none).is_err());
        let no_conf = network(&["--cluster-cidr", "10.244.0.0/16", "--cni-conf-dir", ""]).unwrap();
        assert_eq!(no_conf.cni_conf_dir, None);
        let no_write = network(&["--cluster-cidr", "10.244.0.0/16", "--write-cni-conf=false"]).unwrap();
        assert_eq!(no_write.cni_conf_dir, None);
        let vxlan = [
            "--cluster-cidr",
            "10.244.0.0/16",
            "--pod-network-mode",
            "vxlan",
            "--vxlan-vni",
            "42",
        ];
        assert_eq!(network(&vxlan).unwrap().vni, 42);
        for bad in [
            &["--vxlan-vni", "0"][..],
            &["--vxlan-vni", "16777216"],
            &["--pod-network-mode", "flannel"],
        ] {
            let argv = [&["ferry-proxy", "run"][..], bad].concat();
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_ebpf_back_end_needs_a_cgroup_and_pins_per_node() {
        let run = |extra: &[&str]| {
            let cli = Cli::try_parse_from([&["ferry-proxy", "run"], extra].concat()).unwrap();
            let Command::Run(args) = cli.command else {
                panic!("not run")
            };
            args.backend.ebpf("node-a")
        };
        let err = run(&["--backend", "ebpf"]).err().unwrap();
        assert!(err.contains("needs --cgroup PATH"), "{err}");
        assert!(
            run(&["--cgroup", "/sys/fs/cgroup"]).is_err(),
            "--cgroup without ebpf"
        );
        assert!(run(&[]).unwrap().is_none());
        let e = run(&["--backend", "ebpf", "--cgroup", "/sys/fs/cgroup/unified"])
            .unwrap()
            .unwrap();
        assert_eq!(e.cgroup, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(e.pin_dir, PathBuf::from("/sys/fs/bpf/ferry/node-a"));
    }
}
