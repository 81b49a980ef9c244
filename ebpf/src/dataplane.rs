//! Loading the socket programs, attaching them to a cgroup, and keeping the Service maps
//! in step with the daemon's plan, one frontend at a time.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::{CgroupSockAddr, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ipnetwork::IpNetwork;

use crate::error::map_err;
use crate::layout::MAX_BACKENDS_PER_SERVICE;
use crate::maps::{
    same_family, AffinityKey, BackendKey, ClientKey, Flow4, Flow6, Nat4Entry, Nat6Entry, NodeConfig,
    NodeConfig6, Protocol, SockAddr, SockKey, Sticky, Svc, SvcKey, SVC_KEEP_SOURCE, SVC_SOURCE_RANGES,
};
use crate::source_ranges::{self, RangeMap};
use crate::sys::{self, attached_program_ids};
use crate::Error;

/// The objects built from `src/bpf/sock_addr.c` and `src/bpf/tc.c`.
static SOCK_ADDR_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_addr.o"));
static TC_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tc.o"));

/// The tc program, attached to the ingress of the node's interfaces.
pub const TC_PROGRAM: &str = "ferry_tc_ingress";

/// The cgroup programs: function name in sock_addr.c and `enum bpf_attach_type` value.
pub const PROGRAMS: [(&str, u32); 8] = [
    ("ferry_connect4", 10),
    ("ferry_connect6", 11),
    ("ferry_sendmsg4", 14),
    ("ferry_sendmsg6", 15),
    ("ferry_recvmsg4", 19),
    ("ferry_recvmsg6", 20),
    ("ferry_getpeername4", 29),
    ("ferry_getpeername6", 30),
];

/// Every map of the objects (all pinned by name under `<pin_dir>/maps`).
pub const MAPS: [&str; 13] = [
    "ferry_services",
    "ferry_backends",
    "ferry_revnat",
    "ferry_udp_sticky",
    "ferry_affinity",
    "ferry_nat4",
    "ferry_node_config",
    "ferry_source_ranges",
    "ferry_client_affinity",
    "ferry_nat6",
    "ferry_node_config6",
    "ferry_affinity_group",
    "ferry_sock_peer",
];

/// Whom a frontend entry serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Sockets of the node's Pods and processes (cgroup programs): ClusterIPs, and
    /// external, load-balancer and node addresses reached from inside.
    Inside,
    /// Packets arriving from outside (tc program): NodePorts on node addresses, externalIPs,
    /// load-balancer IPs; IPv4 and IPv6.
    Outside,
}

impl Scope {
    fn number(self) -> u8 {
        match self {
            Scope::Inside => 0,
            Scope::Outside => 1,
        }
    }
}

/// A Service frontend: an address clients reach (ClusterIP, externalIP, load-balancer IP,
/// node address for a NodePort), its port and protocol, and whom it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl Frontend {
    /// A frontend for the node's own sockets.
    pub fn inside(ip: IpAddr, port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            ip,
            port,
            protocol,
            scope: Scope::Inside,
        }
    }

    /// A frontend for packets from outside the node.
    pub fn outside(ip: IpAddr, port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            scope: Scope::Outside,
            ..Frontend::inside(ip, port, protocol)
        }
    }

    fn key(&self) -> SvcKey {
        SvcKey::new(self.ip, self.port, self.protocol, self.scope.number())
    }
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", SocketAddr::new(self.ip, self.port), self.protocol)?;
        if self.scope == Scope::Outside {
            f.write_str(" (from outside)")?;
        }
        Ok(())
    }
}

/// What a frontend leads to: the endpoints the plan chose for traffic from Pods and the
/// node (its `cluster_endpoints`, after the terminating fallback and
/// internalTrafficPolicy), and the session affinity timeout. Order does not matter on the
/// way in; [`EbpfDataplane::dump`] gives them in slot order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceBackends {
    pub endpoints: Vec<SocketAddr>,
    /// `sessionAffinity: ClientIP` timeout in seconds; `None` without affinity.
    pub affinity_seconds: Option<u32>,
    /// Outside scope only: keep the client's source address (externalTrafficPolicy Local)
    /// instead of SNATing to the node's.
    pub keep_source: bool,
    /// Outside scope only: `loadBalancerSourceRanges`; when not empty, new flows from
    /// other sources are dropped. Of the frontend's address family.
    pub source_ranges: Vec<IpNetwork>,
}

/// One frontend as the maps hold it, for `dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpedService {
    pub frontend: Frontend,
    pub id: u32,
    pub backends: ServiceBackends,
}

/// What the maps hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dump {
    pub services: Vec<DumpedService>,
    /// Entries in the LRU maps the programs write.
    pub revnat_entries: usize,
    pub udp_sticky_entries: usize,
    pub affinity_entries: usize,
    /// Entries of translated flows from outside (two per flow).
    pub nat4_entries: usize,
    /// The same for IPv6 flows.
    pub nat6_entries: usize,
    /// Clients from outside remembered for session affinity.
    pub client_affinity_entries: usize,
}

/// What [`EbpfDataplane::cleanup`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    pub links_detached: usize,
    pub pins_removed: usize,
}

/// The socket-level Service data plane: programs attached to one cgroup v2 directory and
/// the maps they read.
///
/// Links are pinned under `<pin_dir>/links`, so the programs stay attached when this value
/// is dropped or the daemon exits: the kernel carries the node until the next daemon has
/// loaded. [`EbpfDataplane::cleanup`] detaches them.
pub struct EbpfDataplane {
    pin_dir: PathBuf,
    cgroup: PathBuf,
    // Own the programs; the links are pinned, so these can go without detaching them.
    _ebpf: Ebpf,
    tc: Ebpf,
    services: BpfHashMap<MapData, SvcKey, Svc>,
    backends: BpfHashMap<MapData, BackendKey, SockAddr>,
    /// Service id -> the id its session affinity is kept under (absent: its own).
    affinity_group: BpfHashMap<MapData, u32, u32>,
    // The programs' own maps, read by `dump` only.
    revnat: BpfHashMap<MapData, SockKey, SockAddr>,
    udp_sticky: BpfHashMap<MapData, SockKey, Sticky>,
    affinity: BpfHashMap<MapData, AffinityKey, Sticky>,
    nat4: BpfHashMap<MapData, Flow4, Nat4Entry>,
    nat6: BpfHashMap<MapData, Flow6, Nat6Entry>,
    client_affinity: BpfHashMap<MapData, ClientKey, Sticky>,
    source_ranges: RangeMap,
    node_config: aya::maps::Array<MapData, NodeConfig>,
    node_config6: aya::maps::Array<MapData, NodeConfig6>,
    /// What the maps hold, read back at load: the maps are the truth, this is an index.
    programmed: BTreeMap<Frontend, (u32, ServiceBackends)>,
    free_ids: BTreeSet<u32>,
    next_id: u32,
    /// What `affinity_group` holds.
    groups: BTreeMap<u32, u32>,
    /// Maps whose pins had another layout (an older build's) and were made anew.
    recreated_maps: Vec<&'static str>,
}

impl EbpfDataplane {
    /// Loads the programs, reuses the maps pinned under `<pin_dir>/maps` (or makes and pins
    /// them), and attaches the programs to the cgroup v2 directory `cgroup`.
    ///
    /// Programs pinned by an earlier load stay attached until the new ones are: both run
    /// for a moment, which is harmless (the second sees an endpoint, not a frontend), so
    /// no connection is made untranslated during a restart.
    pub fn load(pin_dir: &Path, cgroup: &Path) -> Result<EbpfDataplane, Error> {
        check_kernel()?;
        let cgroup_dir = sys::open_cgroup2(cgroup)?;
        sys::prepare_pin_dir(pin_dir)?;
        for dir in [sys::maps_dir(pin_dir), sys::links_dir(pin_dir)] {
            std::fs::create_dir_all(&dir).map_err(|source| Error::PinDir { path: dir, source })?;
        }
        let recreated_maps = crate::pins::remove_changed(&sys::maps_dir(pin_dir))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(sys::maps_dir(pin_dir))
            .load(SOCK_ADDR_OBJ)
            .map_err(|e| Error::Load(Box::new(e)))?;
        for (name, _) in PROGRAMS {
            attach(&mut ebpf, name, &cgroup_dir, &sys::links_dir(pin_dir))?;
        }
        let services = take_map(&mut ebpf, "ferry_services")?;
        let backends = take_map(&mut ebpf, "ferry_backends")?;
        let affinity_group = take_map(&mut ebpf, "ferry_affinity_group")?;
        let revnat = take_map(&mut ebpf, "ferry_revnat")?;
        let udp_sticky = take_map(&mut ebpf, "ferry_udp_sticky")?;
        let affinity = take_map(&mut ebpf, "ferry_affinity")?;
        // The tc object finds the Service maps pinned by the first one.
        let mut tc = EbpfLoader::new()
            .default_map_pin_directory(sys::maps_dir(pin_dir))
            .load(TC_OBJ)
            .map_err(|e| Error::Load(Box::new(e)))?;
        let nat4 = take_map(&mut tc, "ferry_nat4")?;
        let client_affinity = take_map(&mut tc, "ferry_client_affinity")?;
        let source_ranges = tc.take_map(source_ranges::MAP).ok_or_else(|| Error::Map {
            map: source_ranges::MAP,
            source: Box::new(aya::maps::MapError::InvalidName {
                name: source_ranges::MAP.to_owned(),
            }),
        })?;
        let source_ranges = RangeMap::try_from(source_ranges).map_err(map_err(source_ranges::MAP))?;
        let node_config = tc.take_map("ferry_node_config").ok_or_else(|| Error::Map {
            map: "ferry_node_config",
            source: Box::new(aya::maps::MapError::InvalidName {
                name: "ferry_node_config".to_owned(),
            }),
        })?;
        let node_config = aya::maps::Array::try_from(node_config).map_err(map_err("ferry_node_config"))?;
        let nat6 = take_map(&mut tc, "ferry_nat6")?;
        let node_config6 = tc.take_map("ferry_node_config6").ok_or_else(|| Error::Map {
            map: "ferry_node_config6",
            source: Box::new(aya::maps::MapError::InvalidName {
                name: "ferry_node_config6".to_owned(),
            }),
        })?;
        let node_config6 = aya::maps::Array::try_from(node_config6).map_err(map_err("ferry_node_config6"))?;
        tc_program(&mut tc)?.load().map_err(|e| Error::Program {
            program: TC_PROGRAM,
            source: Box::new(e),
        })?;
        let mut dp = EbpfDataplane {
            pin_dir: pin_dir.to_owned(),
            cgroup: cgroup.to_owned(),
            _ebpf: ebpf,
            tc,
            services,
            backends,
            affinity_group,
            revnat,
            udp_sticky,
            affinity,
            nat4,
            nat6,
            client_affinity,
            source_ranges,
            node_config,
            node_config6,
            programmed: BTreeMap::new(),
            free_ids: BTreeSet::new(),
            next_id: 0,
            groups: BTreeMap::new(),
            recreated_maps,
        };
        dp.read_back()?;
        Ok(dp)
    }

    /// The frontends programmed, from the index kept beside the maps (read back from
    /// them at load): no map is read.
    pub fn frontends(&self) -> impl Iterator<Item = &Frontend> {
        self.programmed.keys()
    }

    /// The maps this load made anew because their pins had another layout (an older
    /// build's), losing what they held; empty when every pinned map was reused.
    pub fn recreated_maps(&self) -> &[&'static str] {
        &self.recreated_maps
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Programs `frontend` to lead to `backends`, touching only what changed: endpoint
    /// slots that differ, then the frontend's entry, then slots no longer used. Returns
    /// the number of map writes and deletes made.
    ///
    /// An endpoint keeps its slot while it stays (see [`assign_slots`]), so adding or
    /// removing one endpoint is two or three map operations however many there are. New
    /// slots are written before the count that makes them reachable, and old ones deleted
    /// after it, so a connect racing the update sees the old or the new list, never a
    /// hole. No endpoints: connects to the frontend fail with ECONNREFUSED.
    pub fn upsert_service(&mut self, frontend: Frontend, backends: &ServiceBackends) -> Result<usize, Error> {
        validate(&frontend, backends)?;
        let (id, old) = match self.programmed.get(&frontend) {
            Some((id, old)) => (*id, Some(old.clone())),
            None => (self.allocate_id(), None),
        };
        let old_slots = old.as_ref().map(|o| o.endpoints.as_slice()).unwrap_or(&[]);
        let slots = assign_slots(old_slots, &backends.endpoints);
        let mut ops = 0;
        for (slot, ep) in slots.iter().enumerate() {
            if old_slots.get(slot) != Some(ep) {
                self.backends
                    .insert(
                        BackendKey {
                            svc_id: id,
                            slot: slot as u32,
                        },
                        SockAddr::new(*ep),
                        0,
                    )
                    .map_err(map_err("ferry_backends"))?;
                ops += 1;
            }
        }
        let programmed = ServiceBackends {
            endpoints: slots,
            affinity_seconds: backends.affinity_seconds,
            keep_source: backends.keep_source,
            source_ranges: source_ranges::canonical(&backends.source_ranges),
        };
        let old_ranges = old.as_ref().map(|o| o.source_ranges.as_slice()).unwrap_or(&[]);
        ops +=
            source_ranges::add_missing(&mut self.source_ranges, id, old_ranges, &programmed.source_ranges)?;
        let new_svc = svc_value(id, &programmed);
        if old.as_ref().map(|o| svc_value(id, o)) != Some(new_svc) {
            let key = frontend.key();
            self.services
                .insert(key, new_svc, 0)
                .map_err(map_err("ferry_services"))?;
            ops += 1;
        }
        ops +=
            source_ranges::remove_extra(&mut self.source_ranges, id, old_ranges, &programmed.source_ranges)?;
        for slot in programmed.endpoints.len()..old_slots.len() {
            self.backends
                .remove(&BackendKey {
                    svc_id: id,
                    slot: slot as u32,
                })
                .map_err(map_err("ferry_backends"))?;
            ops += 1;
        }
        self.programmed.insert(frontend, (id, programmed));
        Ok(ops)
    }

    /// Keeps `frontend`'s session affinity under `leader`'s (both programmed): one Service
    /// port's frontends of one scope share it, so a client keeps its endpoint whichever
    /// address of the port it comes by. `leader` itself, or any frontend never given one,
    /// keeps its own. Returns the map writes and deletes made (0 when already so).
    pub fn set_affinity_group(&mut self, frontend: &Frontend, leader: &Frontend) -> Result<usize, Error> {
        let id_of = |f: &Frontend| {
            self.programmed
                .get(f)
                .map(|(id, _)| *id)
                .ok_or_else(|| Error::InvalidService {
                    frontend: f.to_string(),
                    reason: "not programmed: upsert it before grouping its affinity".into(),
                })
        };
        let (id, group) = (id_of(frontend)?, id_of(leader)?);
        match (self.groups.get(&id).copied(), group == id) {
            (None, true) => Ok(0),
            (Some(g), false) if g == group => Ok(0),
            (Some(_), true) => {
                self.affinity_group
                    .remove(&id)
                    .map_err(map_err("ferry_affinity_group"))?;
                self.groups.remove(&id);
                Ok(1)
            }
            (_, false) => {
                self.affinity_group
                    .insert(id, group, 0)
                    .map_err(map_err("ferry_affinity_group"))?;
                self.groups.insert(id, group);
                Ok(1)
            }
        }
    }

    /// Removes `frontend`: its entry first (new connects pass untranslated from then on),
    /// then its endpoint slots. Returns whether it was programmed.
    pub fn remove_service(&mut self, frontend: &Frontend) -> Result<bool, Error> {
        let Some((id, old)) = self.programmed.remove(frontend) else {
            return Ok(false);
        };
        let key = frontend.key();
        self.services.remove(&key).map_err(map_err("ferry_services"))?;
        if self.groups.remove(&id).is_some() {
            self.affinity_group
                .remove(&id)
                .map_err(map_err("ferry_affinity_group"))?;
        }
        source_ranges::remove_extra(&mut self.source_ranges, id, &old.source_ranges, &[])?;
        for slot in 0..old.endpoints.len() {
            self.backends
                .remove(&BackendKey {
                    svc_id: id,
                    slot: slot as u32,
                })
                .map_err(map_err("ferry_backends"))?;
        }
        self.free_ids.insert(id);
        Ok(true)
    }

    /// The frontends programmed (read from the maps themselves) and the LRU maps' sizes.
    pub fn dump(&self) -> Result<Dump, Error> {
        Ok(Dump {
            services: read_all(&self.services, &self.backends, &self.source_ranges)?,
            revnat_entries: self.revnat.keys().count(),
            udp_sticky_entries: self.udp_sticky.keys().count(),
            affinity_entries: self.affinity.keys().count(),
            nat4_entries: self.nat4.keys().count(),
            nat6_entries: self.nat6.keys().count(),
            client_affinity_entries: self.client_affinity.keys().count(),
        })
    }

    /// What the maps pinned under `pin_dir` hold, read by another process than the one
    /// that loaded them (`ferry-proxy dump`): opens the pins only, so nothing is loaded,
    /// attached or replaced.
    pub fn dump_pinned(pin_dir: &Path) -> Result<Dump, Error> {
        let maps = sys::maps_dir(pin_dir);
        let services: BpfHashMap<MapData, SvcKey, Svc> = open_pinned(&maps, "ferry_services")?;
        let backends: BpfHashMap<MapData, BackendKey, SockAddr> = open_pinned(&maps, "ferry_backends")?;
        let ranges_data =
            MapData::from_pin(maps.join(source_ranges::MAP)).map_err(map_err(source_ranges::MAP))?;
        let ranges = aya::maps::Map::from_map_data(ranges_data)
            .map_err(map_err(source_ranges::MAP))
            .and_then(|m| RangeMap::try_from(m).map_err(map_err(source_ranges::MAP)))?;
        Ok(Dump {
            services: read_all(&services, &backends, &ranges)?,
            revnat_entries: open_pinned::<SockKey, SockAddr>(&maps, "ferry_revnat")?
                .keys()
                .count(),
            udp_sticky_entries: open_pinned::<SockKey, Sticky>(&maps, "ferry_udp_sticky")?
                .keys()
                .count(),
            affinity_entries: open_pinned::<AffinityKey, Sticky>(&maps, "ferry_affinity")?
                .keys()
                .count(),
            nat4_entries: open_pinned::<Flow4, Nat4Entry>(&maps, "ferry_nat4")?
                .keys()
                .count(),
            nat6_entries: open_pinned::<Flow6, Nat6Entry>(&maps, "ferry_nat6")?
                .keys()
                .count(),
            client_affinity_entries: open_pinned::<ClientKey, Sticky>(&maps, "ferry_client_affinity")?
                .keys()
                .count(),
        })
    }

    /// Detaches every program pinned under `pin_dir`, removes the pins and the directory,
    /// and checks that no Ferry program is left attached to `cgroup`.
    pub fn cleanup(pin_dir: &Path, cgroup: &Path) -> Result<CleanupReport, Error> {
        let mut report = CleanupReport::default();
        let links = sys::links_dir(pin_dir);
        if let Ok(entries) = std::fs::read_dir(&links) {
            for entry in entries.flatten() {
                let path = entry.path();
                let link_err = |reason: String| Error::Link {
                    path: path.clone(),
                    reason,
                };
                let pinned = PinnedLink::from_pin(&path).map_err(|e| link_err(e.to_string()))?;
                // Unpinning drops the file's reference; closing our fd the last one, which
                // detaches the program.
                let fd: FdLink = pinned.unpin().map_err(|e| link_err(e.to_string()))?;
                drop(fd);
                report.links_detached += 1;
                report.pins_removed += 1;
            }
        }
        let maps = sys::maps_dir(pin_dir);
        if let Ok(entries) = std::fs::read_dir(&maps) {
            for entry in entries.flatten() {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|source| Error::PinDir { path, source })?;
                report.pins_removed += 1;
            }
        }
        for dir in [links, maps, pin_dir.to_owned()] {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(Error::PinDir { path: dir, source }),
            }
        }
        if cgroup.exists() {
            let left = ferry_programs_attached(cgroup)?;
            if !left.is_empty() {
                return Err(Error::Link {
                    path: cgroup.to_owned(),
                    reason: format!(
                        "Ferry programs are still attached after removing the pins ({}): \
                         a process still holds their links",
                        left.join(", ")
                    ),
                });
            }
        }
        Ok(report)
    }

    /// Attaches the tc program to the ingress of interface `ifname` (tcx, Linux 6.6; the
    /// caller's thread must be in the node's network namespace, where the name is looked
    /// up) and pins the link as `links/tc-<ifname>`, replacing an earlier one. Outside
    /// frontends are served on every interface it is attached to: attach it to those
    /// packets from outside arrive on and those endpoints' replies arrive on.
    pub fn attach_tc(&mut self, ifname: &str) -> Result<(), Error> {
        let prog_err = |e: aya::programs::ProgramError| Error::Program {
            program: TC_PROGRAM,
            source: Box::new(e),
        };
        let program = tc_program(&mut self.tc)?;
        let link_id = program.attach(ifname, TcAttachType::Ingress).map_err(prog_err)?;
        let link = program.take_link(link_id).map_err(prog_err)?;
        let path = sys::links_dir(&self.pin_dir).join(format!("tc-{ifname}"));
        let fd_link: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| Error::Link {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        pin_replacing(fd_link, &path)
    }

    /// The node address packets from outside are SNATed to (unless their Service keeps
    /// the source): one of the node's own, so that endpoints' replies come back to it.
    pub fn set_snat_ipv4(&mut self, ip: std::net::Ipv4Addr) -> Result<(), Error> {
        let config = NodeConfig {
            snat_ip4: u32::from_ne_bytes(ip.octets()),
            pad: 0,
        };
        self.node_config
            .set(0, config, 0)
            .map_err(map_err("ferry_node_config"))
    }

    /// The node's IPv6 address packets from outside to IPv6 frontends are SNATed to.
    pub fn set_snat_ipv6(&mut self, ip: std::net::Ipv6Addr) -> Result<(), Error> {
        let config = NodeConfig6 {
            snat_ip6: crate::maps::ip_words(IpAddr::V6(ip)),
        };
        self.node_config6
            .set(0, config, 0)
            .map_err(map_err("ferry_node_config6"))
    }

    fn allocate_id(&mut self) -> u32 {
        if let Some(id) = self.free_ids.pop_first() {
            return id;
        }
        self.next_id += 1;
        self.next_id
    }

    /// Rebuilds the index from maps reused from pins.
    fn read_back(&mut self) -> Result<(), Error> {
        let mut used = BTreeSet::new();
        for s in read_all(&self.services, &self.backends, &self.source_ranges)? {
            used.insert(s.id);
            self.programmed.insert(s.frontend, (s.id, s.backends));
        }
        for entry in self.affinity_group.iter() {
            let (id, group) = entry.map_err(map_err("ferry_affinity_group"))?;
            self.groups.insert(id, group);
        }
        self.next_id = used.last().copied().unwrap_or(0);
        self.free_ids = (1..self.next_id).filter(|id| !used.contains(id)).collect();
        Ok(())
    }
}

/// Names of the Ferry programs attached directly to `cgroup`, for every attach type we use.
pub fn ferry_programs_attached(cgroup: &Path) -> Result<Vec<String>, Error> {
    let mut ids = BTreeSet::new();
    for (_, attach_type) in PROGRAMS {
        ids.extend(attached_program_ids(cgroup, attach_type)?);
    }
    let mut names = Vec::new();
    for info in aya::programs::loaded_programs().flatten() {
        if ids.contains(&info.id()) {
            let name = info.name_as_str().unwrap_or("?").to_owned();
            // The kernel keeps 15 characters of a program name.
            if name.starts_with("ferry_") {
                names.push(name);
            }
        }
    }
    names.sort();
    Ok(names)
}

fn check_kernel() -> Result<(), Error> {
    let v = aya::util::KernelVersion::current().map_err(|e| Error::KernelTooOld {
        found: format!("unknown ({e})"),
        needed: "5.18",
    })?;
    if v < aya::util::KernelVersion::new(5, 18, 0) {
        return Err(Error::KernelTooOld {
            found: format!("{v:?}"),
            needed: "5.18",
        });
    }
    Ok(())
}

/// Loads program `name`, attaches it to the cgroup and pins the link as `links/<name>`,
/// replacing (after the new link is in place) a link pinned there by an earlier load.
fn attach(ebpf: &mut Ebpf, name: &'static str, cgroup: &File, links: &Path) -> Result<(), Error> {
    let prog_err = |e: aya::programs::ProgramError| Error::Program {
        program: name,
        source: Box::new(e),
    };
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or_else(|| prog_err(aya::programs::ProgramError::UnexpectedProgramType))?
        .try_into()
        .map_err(prog_err)?;
    program.load().map_err(prog_err)?;
    // A cgroup link is always attached as one of many (the old daemon's link and other
    // tools' programs coexist with it); the kernel refuses any flag on link creation, which
    // is what aya's `Single` sends.
    let link_id = program
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(prog_err)?;
    let link = program.take_link(link_id).map_err(prog_err)?;
    let path = links.join(name);
    let fd_link: FdLink = link
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| Error::Link {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    pin_replacing(fd_link, &path)
}

fn tc_program(tc: &mut Ebpf) -> Result<&mut SchedClassifier, Error> {
    tc.program_mut(TC_PROGRAM)
        .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
        .and_then(TryInto::try_into)
        .map_err(|e| Error::Program {
            program: TC_PROGRAM,
            source: Box::new(e),
        })
}

/// Pins `link` at `path`; a link pinned there before is detached only once the new one
/// is in place.
fn pin_replacing(link: FdLink, path: &Path) -> Result<(), Error> {
    let link_err = |reason: String| Error::Link {
        path: path.to_owned(),
        reason,
    };
    let old = if path.exists() {
        let old = PinnedLink::from_pin(path).map_err(|e| link_err(e.to_string()))?;
        Some(old.unpin().map_err(|e| link_err(e.to_string()))?)
    } else {
        None
    };
    link.pin(path).map_err(|e| link_err(e.to_string()))?;
    // The old program detaches here, after the new one runs.
    drop(old);
    Ok(())
}

pub(crate) fn open_pinned<K: aya::Pod, V: aya::Pod>(
    maps: &Path,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, Error> {
    let data = MapData::from_pin(maps.join(name)).map_err(map_err(name))?;
    let map = aya::maps::Map::from_map_data(data).map_err(map_err(name))?;
    BpfHashMap::try_from(map).map_err(map_err(name))
}

fn take_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, Error> {
    let map = ebpf.take_map(name).ok_or_else(|| Error::Map {
        map: name,
        source: Box::new(aya::maps::MapError::InvalidName {
            name: name.to_owned(),
        }),
    })?;
    BpfHashMap::try_from(map).map_err(map_err(name))
}

/// The slot of each endpoint of `new`, given the slots `old` held: endpoints that stay
/// keep their slot, new ones fill the slots of removed ones, then go at the end, and the
/// last ones move down into holes left over. Keeping slots keeps the map writes per
/// update proportional to what changed, and keeps session affinity (which remembers a
/// slot) for the clients of endpoints that stay.
pub fn assign_slots(old: &[SocketAddr], new: &[SocketAddr]) -> Vec<SocketAddr> {
    let wanted: HashSet<&SocketAddr> = new.iter().collect();
    let had: HashSet<&SocketAddr> = old.iter().collect();
    let mut added = new.iter().filter(|ep| !had.contains(ep));
    let mut slots: Vec<Option<SocketAddr>> = old
        .iter()
        .map(|ep| {
            if wanted.contains(ep) {
                Some(*ep)
            } else {
                added.next().copied()
            }
        })
        .collect();
    slots.extend(added.map(|ep| Some(*ep)));
    // Fill the lowest hole with the last endpoint until no hole is left.
    while let Some(hole) = slots.iter().position(Option::is_none) {
        let last = slots.pop().flatten();
        if hole < slots.len() {
            slots[hole] = last;
        }
    }
    slots.into_iter().flatten().collect()
}

fn svc_value(id: u32, b: &ServiceBackends) -> Svc {
    let mut flags = 0;
    if b.keep_source {
        flags |= SVC_KEEP_SOURCE;
    }
    if !b.source_ranges.is_empty() {
        flags |= SVC_SOURCE_RANGES;
    }
    Svc {
        id,
        count: b.endpoints.len() as u32,
        affinity_timeout_s: b.affinity_seconds.unwrap_or(0),
        flags,
    }
}

fn validate(frontend: &Frontend, backends: &ServiceBackends) -> Result<(), Error> {
    let invalid = |reason: String| Error::InvalidService {
        frontend: frontend.to_string(),
        reason,
    };
    if frontend.port == 0 {
        return Err(invalid(
            "port 0 cannot be connected to; give the Service port".into(),
        ));
    }
    if backends.endpoints.len() > MAX_BACKENDS_PER_SERVICE as usize {
        return Err(invalid(format!(
            "{} endpoints, more than the {MAX_BACKENDS_PER_SERVICE} one frontend may have",
            backends.endpoints.len()
        )));
    }
    if let Some(ep) = backends
        .endpoints
        .iter()
        .find(|ep| !same_family(ep.ip(), frontend.ip))
    {
        return Err(invalid(format!(
            "endpoint {ep} is not of the frontend's address family: an IPv4 Service needs IPv4 \
             endpoints and an IPv6 one IPv6 endpoints"
        )));
    }
    let mut seen = HashSet::with_capacity(backends.endpoints.len());
    if let Some(ep) = backends.endpoints.iter().find(|ep| !seen.insert(**ep)) {
        return Err(invalid(format!("endpoint {ep} is listed twice")));
    }
    if let Some(ep) = backends.endpoints.iter().find(|ep| ep.port() == 0) {
        return Err(invalid(format!("endpoint {ep} has port 0")));
    }
    if frontend.scope == Scope::Inside && backends.keep_source {
        return Err(invalid(
            "keep_source (externalTrafficPolicy Local) applies to frontends from outside only; \
             inside, sockets are never SNATed"
                .into(),
        ));
    }
    if frontend.scope == Scope::Inside && !backends.source_ranges.is_empty() {
        return Err(invalid(
            "source ranges (loadBalancerSourceRanges) apply to frontends from outside only".into(),
        ));
    }
    if let Some(range) = backends
        .source_ranges
        .iter()
        .find(|r| r.is_ipv4() != frontend.ip.is_ipv4())
    {
        return Err(invalid(format!(
            "source range {range} is not of the frontend's address family: give an IPv4 \
             frontend IPv4 ranges and an IPv6 one IPv6 ranges"
        )));
    }
    if backends.affinity_seconds == Some(0) {
        return Err(invalid(
            "session affinity timeout 0: give 1..=86400 seconds, or None for no affinity".into(),
        ));
    }
    Ok(())
}

fn read_services(map: &BpfHashMap<MapData, SvcKey, Svc>) -> Result<Vec<(Frontend, u32, Svc)>, Error> {
    let mut out = Vec::new();
    for entry in map.iter() {
        let (key, svc) = entry.map_err(map_err("ferry_services"))?;
        let (Some(protocol), Some(scope)) = (
            Protocol::from_number(key.proto),
            [Scope::Inside, Scope::Outside]
                .into_iter()
                .find(|s| s.number() == key.scope),
        ) else {
            continue; // never written by us
        };
        let frontend = Frontend {
            ip: crate::maps::words_ip(key.ip),
            port: crate::maps::word_port(key.port),
            protocol,
            scope,
        };
        out.push((frontend, svc.id, svc));
    }
    Ok(out)
}

/// Every frontend the maps hold, with its endpoints and source ranges, in frontend order.
fn read_all(
    services: &BpfHashMap<MapData, SvcKey, Svc>,
    backends: &BpfHashMap<MapData, BackendKey, SockAddr>,
    ranges: &RangeMap,
) -> Result<Vec<DumpedService>, Error> {
    let mut ranges = source_ranges::read(ranges)?;
    let mut out = Vec::new();
    for (frontend, id, svc) in read_services(services)? {
        let mut backends = read_backends(backends, id, &svc)?;
        if svc.flags & SVC_SOURCE_RANGES != 0 {
            backends.source_ranges = ranges.remove(&id).unwrap_or_default();
        }
        out.push(DumpedService {
            frontend,
            id,
            backends,
        });
    }
    out.sort_by_key(|s| s.frontend);
    Ok(out)
}

fn read_backends(
    map: &BpfHashMap<MapData, BackendKey, SockAddr>,
    id: u32,
    svc: &Svc,
) -> Result<ServiceBackends, Error> {
    let mut endpoints = Vec::with_capacity(svc.count as usize);
    for slot in 0..svc.count {
        let be = map
            .get(&BackendKey { svc_id: id, slot }, 0)
            .map_err(map_err("ferry_backends"))?;
        endpoints.push(be.socket_addr());
    }
    Ok(ServiceBackends {
        endpoints,
        affinity_seconds: (svc.affinity_timeout_s != 0).then_some(svc.affinity_timeout_s),
        keep_source: svc.flags & SVC_KEEP_SOURCE != 0,
        source_ranges: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(ports: &[u16]) -> Vec<SocketAddr> {
        ports
            .iter()
            .map(|p| SocketAddr::from(([10, 0, 0, 1], *p)))
            .collect()
    }

    #[test]
    fn endpoints_keep_their_slots_and_holes_are_filled_from_the_end() {
        assert_eq!(assign_slots(&[], &eps(&[3, 1, 2])), eps(&[3, 1, 2]));
        // Added: at the end, the others stay.
        assert_eq!(assign_slots(&eps(&[1, 2]), &eps(&[0, 1, 2])), eps(&[1, 2, 0]));
        // Removed in the middle: the last one moves into its slot.
        assert_eq!(
            assign_slots(&eps(&[1, 2, 3, 4]), &eps(&[1, 3, 4])),
            eps(&[1, 4, 3])
        );
        // Replaced: the newcomer takes the leaver's slot.
        assert_eq!(assign_slots(&eps(&[1, 2, 3]), &eps(&[1, 9, 3])), eps(&[1, 9, 3]));
        // Several removed, the last ones included.
        assert_eq!(assign_slots(&eps(&[1, 2, 3, 4, 5]), &eps(&[2, 5])), eps(&[5, 2]));
        assert_eq!(assign_slots(&eps(&[1, 2]), &[]), vec![]);
    }

    #[test]
    fn bad_services_are_refused_naming_the_fix() {
        let fe = Frontend::inside("10.96.0.1".parse().unwrap(), 80, Protocol::Tcp);
        let check = |endpoints: Vec<SocketAddr>, affinity_seconds, fe: &Frontend| {
            validate(
                fe,
                &ServiceBackends {
                    endpoints,
                    affinity_seconds,
                    keep_source: false,
                    source_ranges: Vec::new(),
                },
            )
            .unwrap_err()
            .to_string()
        };
        let twice = check(eps(&[1, 1]), None, &fe);
        assert!(twice.contains("listed twice"), "{twice}");
        let zero = check(eps(&[0]), None, &fe);
        assert!(zero.contains("port 0"), "{zero}");
        let aff = check(eps(&[1]), Some(0), &fe);
        assert!(aff.contains("1..=86400"), "{aff}");
        let many = check(
            (1..=4097).map(|p| SocketAddr::from(([10, 0, 0, 1], p))).collect(),
            None,
            &fe,
        );
        assert!(many.contains("4097 endpoints"), "{many}");
        assert!(validate(
            &fe,
            &ServiceBackends {
                endpoints: eps(&[1, 2]),
                affinity_seconds: Some(10800),
                keep_source: false,
                source_ranges: Vec::new(),
            }
        )
        .is_ok());
    }
}
