//! Ferry's eBPF Service data plane: socket-level load balancing.
//!
//! Cgroup socket programs (`src/bpf/sock_addr.c`) translate a Service frontend into one of
//! its endpoints when a socket connects or sends, and back when it asks for its peer or
//! receives, so Pods and node processes reach ClusterIPs, externalIPs and load-balancer
//! IPs without any per-packet NAT:
//!
//! | program | hook | does |
//! |---|---|---|
//! | `ferry_connect4/6` | `connect()` (TCP, connected UDP) | frontend → endpoint; no endpoint: `ECONNREFUSED` |
//! | `ferry_sendmsg4/6` | `sendto()`/`sendmsg()` on unconnected UDP | the same, sticking to the socket's first choice |
//! | `ferry_recvmsg4/6` | `recvfrom()`/`recvmsg()` on UDP | endpoint → frontend as the reply's source |
//! | `ferry_getpeername4/6` | `getpeername()` | endpoint → frontend |
//!
//! Packets from outside the node to a NodePort, externalIP or load-balancer IP meet the tc
//! program `ferry_tc_ingress` (`src/bpf/tc.c`, tcx ingress on the node's interfaces): it
//! DNATs a new flow to an endpoint, SNATs it to the node's address unless the Service
//! keeps the source (externalTrafficPolicy Local), and translates the flow's later packets
//! and replies from its own flow table, IPv4 and IPv6. It also drops new flows from
//! sources outside a load-balancer IP's `loadBalancerSourceRanges`, and keeps session
//! affinity by client address. See tc.c for what the node must allow.
//!
//! The cgroup programs act on every socket made by a process in the cgroup they are attached to
//! (and its descendants), whatever its network namespace. A node attaches them to the root
//! of its cgroup v2 hierarchy; tests attach them only to a cgroup they make.
//!
//! # Maps
//!
//! Addresses are 16 bytes, IPv4 v4-mapped (so an IPv6 socket reaching `::ffff:<ClusterIP>`
//! is balanced too), ports in network order; layouts in `src/bpf/ferry.h`, mirrored in
//! `maps.rs` and checked against `layout.rs` at build time on both sides.
//!
//! | map | type | key → value | written by |
//! |---|---|---|---|
//! | `ferry_services` | hash | frontend ip . port . protocol → Service id, endpoint count, affinity timeout | daemon |
//! | `ferry_backends` | hash | Service id . slot → endpoint ip . port | daemon |
//! | `ferry_revnat` | LRU hash | socket cookie . endpoint → frontend, for unconnected UDP sockets | sendmsg |
//! | `ferry_sock_peer` | socket storage | socket → (endpoint, frontend) of its connect | connect |
//! | `ferry_udp_sticky` | LRU hash | socket cookie . frontend → endpoint (slot, last use) | sendmsg |
//! | `ferry_affinity` | LRU hash | client netns cookie . affinity group → endpoint (slot, last use) | connect, sendmsg |
//! | `ferry_affinity_group` | hash | Service id → the affinity group it shares (absent: its own id) | daemon |
//! | `ferry_nat4`, `ferry_nat6` | LRU hash | IPv4 (IPv6) flow on the wire → what to rewrite it to, last packet's time, FIN/RST seen (both directions) | tc; deleted by the sweep |
//! | `ferry_client_affinity` | LRU hash | client address . affinity group → endpoint (slot, last use), affinity from outside | tc |
//! | `ferry_source_ranges` | LPM trie | Service id . client range → allowed (`loadBalancerSourceRanges`) | daemon |
//! | `ferry_node_config`, `ferry_node_config6` | array | the node's IPv4 (IPv6) SNAT address | daemon |
//!
//! A frontend key also says whom the entry serves ([`Scope`]): the node's sockets, or
//! packets from outside. One address and port can lead to different endpoint lists for
//! each, as externalTrafficPolicy applies only to traffic from outside.
//!
//! Which endpoints a frontend has is decided by the daemon's plan: its
//! `cluster_endpoints` already apply the terminating fallback (ready endpoints, else
//! serving and terminating ones) and internalTrafficPolicy Local, so the maps hold that
//! list and the programs only pick among it, uniformly at random (or by affinity).
//! Session affinity keys on the client's network namespace, not its IP: at connect time a
//! socket has no source address yet, and one Pod is one netns. A remembered endpoint is
//! reused only while the Service still has it at the same slot, so endpoint changes never
//! send a client to a removed Pod.
//!
//! Flows from outside end as conntrack's do: [`FlowSweeper`] deletes flows idle past a
//! timeout that depends on what they saw (UDP replied or not, TCP open, FIN or RST; the
//! defaults and the conntrack settings they follow are in `flows.rs`), and the tc program
//! itself ends a closed flow when its client port opens a new connection. The daemon runs
//! a sweep every few seconds (ferry-proxy's eBPF back end).
//!
//! Session affinity is per Service port, as kube-proxy keeps it: each frontend has its own
//! Service id and endpoint slots, but the affinity maps key on the id of a group
//! (`ferry_affinity_group`, [`EbpfDataplane::set_affinity_group`]), one per Service port
//! and scope, so a client reaching one port by its NodePort and by its externalIP keeps
//! its endpoint. A remembered endpoint is still checked by slot: sibling frontends are
//! programmed together and number their endpoints alike, and where they do not (one added
//! later, after the others' slots moved) the client gets a fresh pick, never a wrong
//! endpoint. Inside and outside stay two groups: their clients are told apart differently
//! (network namespace, address).
//!
//! One changed frontend is a handful of map writes ([`EbpfDataplane::upsert_service`]
//! returns how many), never a reload. Maps and links are pinned under the pin directory
//! (`/sys/fs/bpf/ferry/<node>/` for the daemon): a restarted daemon reuses the maps as
//! they are and replaces the links without a moment where sockets go untranslated. A
//! pinned map whose key size, value size or capacity differ from this build's (an older
//! build's layout) is made anew instead ([`EbpfDataplane::recreated_maps`] names them; see
//! `pins.rs`): `build.rs` holds C and Rust to one layout at build time, this holds the
//! kernel's maps to it at load time.
//!
//! # From the plan to frontends
//!
//! For a plan `ServicePort` a back end programs one [`Frontend`] per address: the
//! ClusterIP, each externalIP and each load-balancer IP, all with `cluster_endpoints`
//! (with both traffic policies Local, the external and load-balancer IPs take
//! `short_circuit_endpoints` instead, as kube-proxy sends in-cluster traffic there). A
//! NodePort reached from the node or a Pod is one more frontend per node address. Traffic
//! from outside the node never passes a socket hook: for it, each node address with the
//! NodePort, each externalIP and each load-balancer IP is an outside-scope frontend with
//! `external_endpoints`, `keep_source` set under externalTrafficPolicy Local.
//!
//! # Where the daemon runs
//!
//! With `nsenter --net=...` the daemon sees the machine's mounts. `ip netns exec` gives it
//! a fresh /sys without bpffs and without cgroup mounts: [`EbpfDataplane::load`] then
//! mounts bpffs on /sys/fs/bpf and [`cgroup2_root`] mounts the cgroup v2 hierarchy on
//! /sys/fs/cgroup, both private to the command's mount namespace. Its pins go with that
//! namespace, so a restart under `ip netns exec` does not find the maps and links of the
//! last run; use nsenter where the node must be carried across a restart.
//!
//! # Kernel requirements
//!
//! The whole data plane needs Linux 5.18 ([`EbpfDataplane::load`] checks); the newest
//! feature sets that floor:
//!
//! | feature | since |
//! |---|---|
//! | cgroup `connect4/6` programs | 4.17 |
//! | cgroup `sendmsg4/6` | 4.18 |
//! | cgroup `recvmsg4/6` | 5.2 |
//! | BPF links for cgroups (`bpf_link_create`), `bpf_get_netns_cookie` in sock_addr programs | 5.7 |
//! | cgroup `getpeername4/6` | 5.8 |
//! | `bpf_set_retval` (ECONNREFUSED instead of EPERM) | 5.18 |
//! | tcx links for the tc program ([`EbpfDataplane::attach_tc`]; aya falls back to netlink before) | 6.6 |
//!
//! A connect to a frontend without endpoints: a cgroup program that rejects makes the
//! syscall fail with `EPERM`; the program first sets the return value to `-ECONNREFUSED`
//! (`bpf_set_retval`), which the kernel keeps, so the application sees what it would see
//! against a closed port. The same holds for `sendto` on UDP.
//!
//! # Building
//!
//! `build.rs` compiles the C with clang (`-target bpf -O2 -g`) against libbpf-dev's headers
//! (Debian packages `clang` and `libbpf-dev`, which `scripts/setup.sh` installs) and the
//! object is embedded in the crate.

mod dataplane;
mod error;
mod flows;
#[allow(dead_code)] // shared with build.rs, which reads the parts this crate does not
mod layout;
mod maps;
mod pins;
mod source_ranges;
mod sys;

pub use dataplane::{
    assign_slots, ferry_programs_attached, CleanupReport, Dump, DumpedService, EbpfDataplane, Frontend,
    Scope, ServiceBackends, MAPS, PROGRAMS, TC_PROGRAM,
};
pub use error::Error;
pub use flows::{monotonic_ns, FlowSweeper, FlowTimeouts, SweepReport};
pub use maps::Protocol;
pub use sys::{attached_program_ids, cgroup2_root, BPFFS_ROOT};
