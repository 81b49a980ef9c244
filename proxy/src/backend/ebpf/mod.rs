//! The eBPF back end (`ferry-proxy run --backend ebpf --cgroup PATH`): Services as entries
//! of the `ferry-ebpf` maps, programmed one frontend at a time.
//!
//! # Which path serves what
//!
//! | traffic | served by |
//! |---|---|
//! | Pods and node processes in the `--cgroup` tree → ClusterIP, externalIPs, LB IPs, NodePorts on node addresses (TCP, UDP; IPv4 and IPv6) | cgroup socket programs: `connect`/`sendmsg` pick an endpoint, `getpeername`/`recvmsg` show the Service address |
//! | outside → NodePort, externalIPs, LB IPs (TCP and UDP, IPv4 and IPv6) | tc (tcx) ingress program on every node interface: DNAT, SNAT to the node unless `externalTrafficPolicy: Local`, `loadBalancerSourceRanges` (other sources dropped), session affinity by client address |
//! | hairpin (a Pod reaching itself through its Service) | nothing to do: the socket connects to the Pod's own address |
//! | ClusterIP from a node process outside the cluster CIDR | nothing to do: no packet is NATed, the endpoint sees the node's address and answers it |
//! | masquerade of Pod traffic leaving the cluster | ferry-bridge's nftables rules (`ipMasq`), as with the nftables back end |
//! | health check node ports | the daemon's HTTP side (both back ends) |
//! | not served: SCTP (why: [`Skipped::Sctp`]), processes outside `--cgroup` | use `--backend nftables` |
//!
//! No nftables rule of this back end rewrites Service traffic: a socket already connected
//! to an endpoint never meets a ClusterIP rule, and one that should not be translated
//! (outside the cgroup) must not be either.
//!
//! # Changes
//!
//! A sync looks only at the Service ports [`Changes`] names (every one on
//! [`ServiceChanges::All`], then also removing frontends the maps hold that no port has,
//! e.g. after a restart over pinned maps). Each port's frontends are upserted
//! ([`EbpfDataplane::upsert_service`] writes only the slots that differ) and the ones it no
//! longer has removed.
//!
//! # Measurements
//!
//! `cargo bench -p ferry-proxy --bench ebpf_backend` (release, Linux 6.18, 2 shared CPUs,
//! one run; apply only, planning excluded), 10,000 ClusterIP Services x 10 endpoints,
//! against the nftables back end in the same run:
//!
//! | | nftables | eBPF |
//! |---|---:|---:|
//! | full sync | 859 ms | 111 ms |
//! | one endpoint changed (median of 20) | 0.15 ms | 0.07 ms |
//! | one Service added (median of 20) | 3.29 ms | 0.08 ms |
//! | nothing changed, every port compared | 10.4 ms | 20.1 ms |
//! | first sync after a restart | 824 ms | 46 ms |
//!
//! NodePort from outside, same bench and run: a UDP flood from one socket pinned to one
//! CPU, counted at the Pod; CPU per packet is the sender thread's plus ksoftirqd's CPU time
//! (load average 4-6 from other builds, so packets per second vary from run to run; CPU
//! per packet less). Straight to the Pod through the same node as the baseline: nftables
//! node 2297 ns/packet direct, 2418 ns through the NodePort; eBPF node 1899 ns direct,
//! 2163 ns through the NodePort. NodePort eBPF / nftables: 0.89x the CPU per packet
//! (0.83x in two earlier runs), 1.11x the packets per second.
//!
//! Latency a connection sees, `FERRY_BENCH_CONNECTS=20000 cargo bench -p ferry-proxy
//! --bench service_latency` (release, 2 shared CPUs, three runs): a client Pod and a
//! server Pod on one node (ferry-bridge), TCP, through the ClusterIP and to the server's
//! Pod IP on the same node as the baseline, all series interleaved in one run, clients on
//! one CPU and servers on the other. Ratio ClusterIP / Pod IP, range over the runs (the
//! goal of issue 12 for eBPF is <= 1.05x; the table, with p90 and p99.9, is in
//! README.md, "The eBPF back end"): connect p50
//! 1.05x the Pod IP's with eBPF, 1.06-1.12x with nftables; connect p99 1.04-1.14x with
//! either; request/response 0.93-1.03x with eBPF (the packets carry the Pod's address),
//! 1.01-1.07x with nftables (two packets NATed). The table size does not show. The eBPF
//! connect's cost is its `connect4` program (600-640 ns on a hit; `sock_addr.c` says
//! where it goes).
//!
//! A resync compares plan values with what was programmed and touches no map; it
//! first read every frontend's slots back from the maps (94 ms at 10k Services).
//!
//! # UDP when an endpoint goes
//!
//! There is no conntrack entry to delete for socket-translated UDP: a connected socket
//! keeps the endpoint it connected to (as with any connected socket to a vanished peer),
//! and an unconnected one re-picks on its next `sendmsg`, since the program reuses a
//! remembered endpoint only while the Service still has it at the same slot. Flows from
//! outside live in the tc program's flow table until they are idle past their timeout
//! (UDP 30 s, 120 s once replied, as conntrack's defaults): a thread of this back end
//! sweeps the table every few seconds (`flow_sweep.rs`, timeouts replaceable with
//! `FERRY_EBPF_FLOW_TIMEOUTS`), so the next datagram after that picks a current endpoint.
//! TCP flows end 120 s after a FIN, 10 s after a RST, at once when their client port
//! opens a new connection, and after 6 h without a packet.
//!
//! # Where it runs
//!
//! On the back-end thread, in the node's network namespace (tc attaches to that
//! namespace's interfaces). Pins live under `<pin root>/<node name>/` (default
//! `/sys/fs/bpf/ferry/<node>/`), so several nodes on one host each keep their own, and a
//! restart reuses the maps and replaces the links without a gap.

mod flow_sweep;
mod frontends;
pub mod host;
mod node;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry_ebpf::{EbpfDataplane, Frontend};
use tracing::{info, warn};

pub use flow_sweep::{timeouts_from_env, FLOW_TIMEOUTS_ENV};
use frontends::affinity_leaders;
pub use frontends::{frontends, Skipped};

use crate::backend::policy::PolicyEnforcer;
use crate::backend::{Backend, BackendError, SyncStats};
use crate::changes::{Changes, ServiceChanges};
use crate::plan::{Plan, ServicePort, ServicePortId};

/// Where pins go by default: `<this>/<node name>/`.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/ferry";

/// The eBPF back end: the loaded data plane and what it programmed for which port.
pub struct EbpfBackend {
    dp: EbpfDataplane,
    /// Per Service port: what it was when programmed, and its frontends (to remove those
    /// it no longer has).
    applied: BTreeMap<ServicePortId, Applied>,
    /// The node addresses NodePorts were programmed on.
    node_ips: Vec<IpAddr>,
    /// Interfaces the tc program is attached to.
    tc_on: BTreeSet<String>,
    /// Whether the IPv4 and the IPv6 SNAT address are set.
    snat_set: [bool; 2],
    /// Messages already logged about what is not served, so each is said once.
    said: BTreeSet<String>,
    /// NetworkPolicy: the same policy table as with the nftables back end, committed in
    /// a transaction of its own (socket-level load balancing leaves the real backend
    /// address in the packets the forward hook judges).
    policy: PolicyEnforcer,
    /// Ends idle flows from outside while the back end lives (a thread with handles of its
    /// own on the flow tables).
    _flow_sweep: flow_sweep::FlowSweepThread,
}

/// One Service port as last programmed.
struct Applied {
    port: ServicePort,
    frontends: BTreeSet<Frontend>,
}

fn ebpf_err(what: impl Into<String>) -> impl FnOnce(ferry_ebpf::Error) -> BackendError {
    let what = what.into();
    move |source| BackendError::Ebpf { what, source }
}

fn system_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackendError {
    let what = what.into();
    move |source| BackendError::System { what, source }
}

/// The cgroup v2 directory `--cgroup` stands for ([`host::attach_cgroup`]), logged when it
/// was found through a hybrid host's cgroup mount.
fn resolve_cgroup(given: &Path) -> Result<PathBuf, BackendError> {
    let found = host::attach_cgroup(given).map_err(|e| BackendError::System {
        what: "choosing the cgroup for the socket programs".into(),
        source: std::io::Error::other(e),
    })?;
    if found.through_hybrid_mount {
        info!(
            given = %given.display(),
            cgroup = %found.path.display(),
            "--cgroup is a hybrid host's cgroup mount: its cgroup v2 hierarchy is used"
        );
    }
    Ok(found.path)
}

/// `<pin_root>/<node_name>`.
pub fn pin_dir(pin_root: &Path, node_name: &str) -> PathBuf {
    pin_root.join(node_name)
}

impl EbpfBackend {
    /// Loads the programs (reusing maps pinned in `pin_dir`) and attaches the socket
    /// programs to the cgroup v2 directory `cgroup`. Call it on the thread that will sync,
    /// in the node's network namespace.
    ///
    /// Flows from outside end after the timeouts of [`FLOW_TIMEOUTS_ENV`] (the defaults
    /// when it is unset).
    pub fn new(pin_dir: &Path, cgroup: &Path) -> Result<EbpfBackend, BackendError> {
        EbpfBackend::with_flow_timeouts(pin_dir, cgroup, timeouts_from_env()?)
    }

    /// [`EbpfBackend::new`] with the flow timeouts given.
    pub fn with_flow_timeouts(
        pin_dir: &Path,
        cgroup: &Path,
        timeouts: ferry_ebpf::FlowTimeouts,
    ) -> Result<EbpfBackend, BackendError> {
        let cgroup = &resolve_cgroup(cgroup)?;
        if !node::forwards_ipv4() {
            warn!("net.ipv4.ip_forward is 0 on this node: NodePorts and external IPs from outside will not be forwarded");
        }
        node::allow_local_sources().map_err(system_err(
            "net.ipv4.conf.all.accept_local must be 1 (the tc program's translated packets carry the \
             node's address) and this process cannot set it (/proc/sys is read-only in an \
             unprivileged container): set it on the node (`sysctl -w net.ipv4.conf.all.accept_local=1`; \
             conf/ferry-ebpf.yaml's init container does)",
        ))?;
        let dp = EbpfDataplane::load(pin_dir, cgroup).map_err(ebpf_err("loading the eBPF programs"))?;
        if !dp.recreated_maps().is_empty() {
            warn!(
                maps = ?dp.recreated_maps(),
                "pinned maps of an older layout were made anew: connections from outside open during the upgrade are lost"
            );
        }
        let flow_sweep = flow_sweep::FlowSweepThread::start(pin_dir, timeouts)?;
        info!(
            cgroup = %cgroup.display(),
            pins = %pin_dir.display(),
            "socket programs attached: processes in this cgroup (and below it) reach Services"
        );
        Ok(EbpfBackend {
            dp,
            applied: BTreeMap::new(),
            node_ips: Vec::new(),
            tc_on: BTreeSet::new(),
            snat_set: [false; 2],
            said: BTreeSet::new(),
            policy: PolicyEnforcer::new(),
            _flow_sweep: flow_sweep,
        })
    }

    /// Attaches the tc program to interfaces that appeared since the last sync.
    fn attach_tc_to_new_interfaces(&mut self) -> Result<(), BackendError> {
        let now = node::interfaces().map_err(system_err("listing the node's interfaces"))?;
        for ifname in now.difference(&self.tc_on.clone()) {
            self.dp
                .attach_tc(ifname)
                .map_err(ebpf_err(format!("attaching the tc program to {ifname}")))?;
            info!(interface = %ifname, "tc program attached (NodePorts, externalIPs, LB IPs from outside)");
            self.tc_on.insert(ifname.clone());
        }
        self.tc_on.retain(|i| now.contains(i));
        Ok(())
    }

    /// Sets the SNAT address of each family once an endpoint of that family reached from
    /// outside exists: the node's address on the route towards it. Looks only at the ports
    /// `ids` (those of this sync): a first endpoint of a family comes with a changed port,
    /// and scanning every port on every sync cost 0.4 ms at 10k Services.
    fn set_snat_address(&mut self, plan: &Plan, ids: &BTreeSet<ServicePortId>) -> Result<(), BackendError> {
        for (done, v4) in [(0, true), (1, false)] {
            if self.snat_set[done] {
                continue;
            }
            let Some(endpoint) = ids
                .iter()
                .filter_map(|id| plan.services.ports.get(id))
                .flat_map(|p| &p.external_endpoints)
                .find(|e| e.ip.is_ipv4() == v4)
            else {
                continue;
            };
            let to = std::net::SocketAddr::new(endpoint.ip, endpoint.port);
            let set = match node::source_address_towards(to) {
                Ok(IpAddr::V4(ip)) => self.dp.set_snat_ipv4(ip).map(|()| IpAddr::V4(ip)),
                Ok(IpAddr::V6(ip)) => self.dp.set_snat_ipv6(ip).map(|()| IpAddr::V6(ip)),
                Err(e) => {
                    warn!("no route to endpoint {to} to choose the SNAT address: {e}");
                    continue;
                }
            };
            let ip = set.map_err(ebpf_err("setting the SNAT address"))?;
            info!(%ip, "traffic from outside is SNATed to this node address");
            if ip.is_ipv6() && !node::forwards_ipv6() {
                warn!("net.ipv6.conf.all.forwarding is 0 on this node: IPv6 NodePorts and external IPs from outside will not be forwarded");
            }
            self.snat_set[done] = true;
        }
        Ok(())
    }

    fn say_once(&mut self, port: &ServicePortId, skipped: &Skipped) {
        let text = format!("{}/{}: {skipped}", port.namespace, port.name);
        if self.said.insert(text.clone()) {
            warn!("{text}");
        }
    }
}

impl Backend for EbpfBackend {
    fn sync(&mut self, plan: &Plan, changes: &Changes) -> Result<SyncStats, BackendError> {
        let start = Instant::now();
        self.attach_tc_to_new_interfaces()?;
        let node_ips = node::nodeport_ips(&plan.services.settings.nodeport_addresses)
            .map_err(system_err("listing the node's addresses"))?;
        // New node addresses change every NodePort's frontends: compare every port.
        let node_ips_changed = node_ips != self.node_ips;
        let all = changes.services == ServiceChanges::All || node_ips_changed;
        self.node_ips = node_ips.clone();
        let ids: BTreeSet<ServicePortId> = match &changes.services {
            _ if all => plan
                .services
                .ports
                .keys()
                .chain(self.applied.keys())
                .cloned()
                .collect(),
            ServiceChanges::Ports(ids) => ids.clone(),
            ServiceChanges::All => unreachable!("handled above"),
        };
        self.set_snat_address(plan, &ids)?;
        let mut changed_ports = 0;
        for id in &ids {
            let port = plan.services.ports.get(id);
            if !node_ips_changed && port.is_some() && port == self.applied.get(id).map(|a| &a.port) {
                continue; // as programmed: a resync compares values, not map entries
            }
            let (wanted, skipped) = match port {
                Some(port) => frontends(port, &node_ips),
                None => (Vec::new(), Vec::new()),
            };
            for s in &skipped {
                self.say_once(id, s);
            }
            let mut ops = 0;
            let mut now = BTreeSet::new();
            for (frontend, backends) in &wanted {
                ops += self
                    .dp
                    .upsert_service(*frontend, backends)
                    .map_err(ebpf_err(format!("programming {frontend}")))?;
                now.insert(*frontend);
            }
            if port.is_some_and(|p| p.affinity_seconds.is_some()) {
                for (frontend, leader) in affinity_leaders(&wanted) {
                    ops += self
                        .dp
                        .set_affinity_group(&frontend, &leader)
                        .map_err(ebpf_err(format!("grouping the session affinity of {frontend}")))?;
                }
            }
            for gone in self.applied.get(id).into_iter().flat_map(|a| &a.frontends) {
                if !now.contains(gone) {
                    self.dp
                        .remove_service(gone)
                        .map_err(ebpf_err(format!("removing {gone}")))?;
                    ops += 1;
                }
            }
            if ops > 0 {
                changed_ports += 1;
            }
            match port {
                Some(port) => {
                    self.applied.insert(
                        id.clone(),
                        Applied {
                            port: port.clone(),
                            frontends: now,
                        },
                    );
                }
                None => {
                    self.applied.remove(id);
                }
            }
        }
        if all {
            // Frontends left in reused maps by an earlier run that no port has now.
            // The data plane's index holds what the maps held at load plus every change
            // since, so no map is read here (reading 10k Services' slots back cost 80 ms).
            let wanted: BTreeSet<Frontend> = self
                .applied
                .values()
                .flat_map(|a| &a.frontends)
                .copied()
                .collect();
            let stale: Vec<Frontend> = self
                .dp
                .frontends()
                .filter(|f| !wanted.contains(f))
                .copied()
                .collect();
            for frontend in stale {
                self.dp
                    .remove_service(&frontend)
                    .map_err(ebpf_err(format!("removing {frontend}")))?;
            }
        }
        self.policy.sync(plan.policy.as_ref())?;
        Ok(SyncStats {
            changed_ports,
            rules: self.applied.values().map(|a| a.frontends.len()).sum(),
            apply_time: start.elapsed(),
        })
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        let report = EbpfDataplane::cleanup(self.dp.pin_dir(), self.dp.cgroup())
            .map_err(ebpf_err("removing the eBPF programs and pins"))?;
        remove_pin_root_if_empty(self.dp.pin_dir());
        self.applied.clear();
        self.tc_on.clear();
        self.policy.cleanup()?;
        info!(
            links = report.links_detached,
            pins = report.pins_removed,
            "eBPF programs detached, pins removed"
        );
        Ok(())
    }
}

/// Detaches every program pinned in `pin_dir` and removes the pins, without loading
/// anything (`ferry-proxy cleanup --backend ebpf`).
pub fn cleanup_pins(pin_dir: &Path, cgroup: &Path) -> Result<ferry_ebpf::CleanupReport, BackendError> {
    // A cgroup already gone holds no program: only the pins are left to remove.
    let cgroup = match cgroup.exists() {
        true => resolve_cgroup(cgroup)?,
        false => cgroup.to_owned(),
    };
    let report =
        EbpfDataplane::cleanup(pin_dir, &cgroup).map_err(ebpf_err("removing the eBPF programs and pins"))?;
    remove_pin_root_if_empty(pin_dir);
    Ok(report)
}

/// Removes the pin root (`/sys/fs/bpf/ferry`) once its last node's pins are gone, so that a
/// cleaned node keeps nothing of Ferry's in the host's bpffs. Left alone while other
/// nodes' pins are in it, or when it is a mount point (tests mount a bpffs of their own).
fn remove_pin_root_if_empty(pin_dir: &Path) {
    if let Some(root) = pin_dir.parent() {
        let _ = std::fs::remove_dir(root);
    }
}

/// What the maps pinned in `pin_dir` hold, as text: one frontend a line with its
/// endpoints (`ferry-proxy dump --backend ebpf`).
pub fn dump_text(pin_dir: &Path) -> Result<String, BackendError> {
    let dump = EbpfDataplane::dump_pinned(pin_dir).map_err(ebpf_err(format!(
        "reading the maps pinned in {} (is `ferry-proxy run --backend ebpf` running with the same node name?)",
        pin_dir.display()
    )))?;
    let mut out = String::new();
    for s in &dump.services {
        let eps: Vec<String> = s.backends.endpoints.iter().map(ToString::to_string).collect();
        let mut extra = String::new();
        if let Some(t) = s.backends.affinity_seconds {
            extra.push_str(&format!(" affinity={t}s"));
        }
        if s.backends.keep_source {
            extra.push_str(" keep-source");
        }
        if !s.backends.source_ranges.is_empty() {
            let ranges: Vec<String> = s.backends.source_ranges.iter().map(ToString::to_string).collect();
            extra.push_str(&format!(" from=[{}]", ranges.join(", ")));
        }
        out.push_str(&format!(
            "{} id={} -> [{}]{extra}\n",
            s.frontend,
            s.id,
            if eps.is_empty() {
                "none: refused".to_owned()
            } else {
                eps.join(", ")
            }
        ));
    }
    out.push_str(&format!(
        "# {} frontends; revnat {} entries, udp-sticky {}, affinity {}, flows from outside {}, \
         affinity from outside {}\n",
        dump.services.len(),
        dump.revnat_entries,
        dump.udp_sticky_entries,
        dump.affinity_entries,
        (dump.nat4_entries + dump.nat6_entries) / 2,
        dump.client_affinity_entries
    ));
    Ok(out)
}
