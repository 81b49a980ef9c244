//! What the policy table holds, and each sync as one diff from it (see "Sync" and
//! "Restart" in the module docs of [`super`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::Instant;

use super::render::{render_chain, Direction, MapElement, PeerSet, PolicyChain, SetCache, FAMILIES, TABLE};
use super::transaction::{ops_text, PolicyOp};
use crate::backend::BackendError;
use crate::nft;
use crate::plan::policy::{AddressRange, Addresses, Isolation, PeerSetId, PodPolicy, PolicyTable, Ports};
use std::sync::Arc;

/// Chain and set names found in the kernel at the first sync of a process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelPolicy {
    pub exists: bool,
    pub chains: Vec<String>,
    pub sets: Vec<String>,
}

impl KernelPolicy {
    /// Reads the names (two netlink dumps; no rules, no elements).
    pub fn read(socket: &mut nft::Socket) -> std::io::Result<KernelPolicy> {
        if !socket.list_tables()?.iter().any(|t| t == TABLE) {
            return Ok(KernelPolicy::default());
        }
        Ok(KernelPolicy {
            exists: true,
            chains: socket.list_chains(TABLE)?,
            sets: socket.list_sets(TABLE)?,
        })
    }
}

/// One Pod's addresses and its chains (egress, ingress) in this sync.
struct PodChains {
    ips: Vec<IpAddr>,
    chains: [Option<String>; 2],
}

#[derive(Debug, Default)]
struct AppliedChain {
    rules: usize,
    sets: Vec<String>,
}

/// The policy table as the kernel holds it after the last successful commit.
#[derive(Debug, Default)]
struct Applied {
    /// The table exists (policy on).
    enabled: bool,
    elements: HashMap<(Direction, IpAddr), String>,
    chains: HashMap<String, AppliedChain>,
    /// Each peer set and its elements; `None`: found in the kernel by name, elements
    /// unknown (flushed and refilled in the first transaction that uses it).
    sets: HashMap<String, Option<Arc<PeerSet>>>,
    /// Only after reading the kernel: its maps' elements are unknown (flushed and
    /// refilled in the first transaction).
    unknown_elements: bool,
}

impl Applied {
    fn from_kernel(kernel: &KernelPolicy) -> Applied {
        if !kernel.exists {
            return Applied::default();
        }
        Applied {
            enabled: true,
            chains: kernel
                .chains
                .iter()
                .filter(|c| c.starts_with("egress-") || c.starts_with("ingress-"))
                .map(|c| (c.clone(), AppliedChain::default()))
                .collect(),
            sets: kernel
                .sets
                .iter()
                .filter(|s| s.starts_with("peers-"))
                .map(|s| (s.clone(), None))
                .collect(),
            unknown_elements: true,
            ..Applied::default()
        }
    }

    fn rules(&self) -> usize {
        if !self.enabled {
            return 0;
        }
        super::render::base_rules().len() + self.chains.values().map(|c| c.rules).sum::<usize>()
    }
}

/// A transaction prepared by [`PolicyWriter::prepare`]: its steps, and the state the
/// kernel will hold once they are committed.
pub struct Prepared {
    pub ops: Vec<PolicyOp>,
    next: Applied,
    /// Isolated Pods (either direction) after the commit.
    pub isolated_pods: usize,
}

/// The policy table's diff engine, shared by both back ends: it turns a [`PolicyTable`]
/// (or none: policy off) into the steps from what it applied last. The back end sends the
/// steps (in its own batch or one of its own) and reports back.
#[derive(Debug, Default)]
pub struct PolicyWriter {
    /// `None`: nothing known (a new process, or after a failed commit): the next sync
    /// starts from the kernel's names.
    state: Option<Applied>,
    last_transaction: String,
    /// Chains rendered by the last sync (a cache: names and rules follow from the plan,
    /// whatever the kernel holds).
    chains: ChainCache,
}

impl PolicyWriter {
    pub fn new() -> PolicyWriter {
        PolicyWriter::default()
    }

    /// Whether the next [`Self::prepare`] needs the kernel's names.
    pub fn needs_kernel(&self) -> bool {
        self.state.is_none()
    }

    /// The steps from what was applied to `table` (`None`: policy off, the table goes).
    /// `kernel` is read when [`Self::needs_kernel`] says so. Until [`Self::committed`],
    /// the writer knows nothing (a failed commit makes the next sync start from the
    /// kernel again).
    pub fn prepare(&mut self, table: Option<&PolicyTable>, kernel: Option<&KernelPolicy>) -> Prepared {
        let old = match self.state.take() {
            Some(old) => old,
            None => Applied::from_kernel(kernel.unwrap_or(&KernelPolicy::default())),
        };
        match table {
            None => {
                let ops = if old.enabled {
                    vec![PolicyOp::DelTable]
                } else {
                    Vec::new()
                };
                Prepared {
                    ops,
                    next: Applied::default(),
                    isolated_pods: 0,
                }
            }
            Some(table) => {
                self.chains.next_sync();
                let prepared = diff(old, table, &mut self.chains);
                self.chains.keep_used();
                prepared
            }
        }
    }

    /// The prepared steps are in the kernel.
    pub fn committed(&mut self, prepared: Prepared) {
        self.last_transaction = ops_text(&prepared.ops);
        self.state = Some(prepared.next);
    }

    /// The steps of the last committed transaction as nft commands ("" when there was
    /// nothing to do); `nft -f` accepts it.
    pub fn last_transaction(&self) -> &str {
        &self.last_transaction
    }

    /// Rules in the policy table.
    pub fn rules(&self) -> usize {
        self.state.as_ref().map_or(0, Applied::rules)
    }

    /// Forgets everything (after a cleanup).
    pub fn reset(&mut self) {
        self.state = None;
    }
}

/// A chain rendered in an earlier sync, and what it was rendered from: per clause, the
/// plan's shared set id and address list (held here, so that no other list can be
/// allocated at their addresses while the entry lives) and the ports. Pods under the same
/// policies hold the same `Arc`s, and entries the planner did not touch keep theirs
/// from sync to sync, so a sync finds each Pod's chains by pointer comparisons: no
/// chain is rendered (rules, text, hash) again unless its clauses changed, and nothing
/// is allocated per Pod. Comparing the Isolations' contents instead would walk every
/// peer list for every Pod (measured: seconds per sync at 1,000 policies, in a debug
/// build); rendering every distinct chain and hashing an allocated key per Pod at every
/// sync made a relabel's back end 5-6 ms (1.6-2.6 ms with this cache; module docs).
#[derive(Debug)]
struct CachedChain {
    direction: Direction,
    clauses: Vec<(PeerSetId, Arc<Addresses>, Ports)>,
    chain: Arc<PolicyChain>,
    /// The sync that used it last.
    used: u64,
}

impl CachedChain {
    fn rendered_from(&self, direction: Direction, isolation: &Isolation) -> bool {
        let clauses = isolation.allows.iter().flat_map(|a| &a.clauses);
        self.direction == direction
            && self.clauses.len() == isolation.allows.iter().map(|a| a.clauses.len()).sum::<usize>()
            && self.clauses.iter().zip(clauses).all(|((id, peers, ports), c)| {
                Arc::ptr_eq(&id.0, &c.peer_set.0) && Arc::ptr_eq(peers, &c.peers) && *ports == c.ports
            })
    }
}

/// The chains of the last syncs, by a fingerprint of what they were rendered from.
#[derive(Debug, Default)]
struct ChainCache {
    by_fingerprint: HashMap<u64, Vec<CachedChain>>,
    sync: u64,
}

/// A hash of the pointers and ports [`CachedChain::rendered_from`] compares (FNV-1a over
/// words: SipHash over these keys was the largest item of a sync's profile).
fn fingerprint(direction: Direction, isolation: &Isolation) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |word: u64| h = (h ^ word).wrapping_mul(0x0100_0000_01b3);
    mix(direction as u64);
    for c in isolation.allows.iter().flat_map(|a| &a.clauses) {
        mix(Arc::as_ptr(&c.peer_set.0) as *const u8 as u64);
        mix(Arc::as_ptr(&c.peers) as u64);
        match &c.ports {
            Ports::Any => mix(u64::MAX),
            Ports::Ranges(ranges) => {
                for r in ranges {
                    mix((r.protocol as u64) << 32 | u64::from(r.first) << 16 | u64::from(r.last));
                }
                mix(ranges.len() as u64);
            }
        }
    }
    h
}

impl ChainCache {
    fn chain(
        &mut self,
        direction: Direction,
        isolation: &Isolation,
        sets: &mut SetCache,
    ) -> Arc<PolicyChain> {
        let sync = self.sync;
        let bucket = self
            .by_fingerprint
            .entry(fingerprint(direction, isolation))
            .or_default();
        if let Some(cached) = bucket.iter_mut().find(|c| c.rendered_from(direction, isolation)) {
            cached.used = sync;
            return cached.chain.clone();
        }
        let chain = Arc::new(render_chain(direction, isolation, sets));
        bucket.push(CachedChain {
            direction,
            clauses: isolation
                .allows
                .iter()
                .flat_map(|a| &a.clauses)
                .map(|c| (c.peer_set.clone(), c.peers.clone(), c.ports.clone()))
                .collect(),
            chain: chain.clone(),
            used: sync,
        });
        chain
    }

    /// Starts a sync.
    fn next_sync(&mut self) {
        self.sync += 1;
    }

    /// Drops what the sync just made did not use.
    fn keep_used(&mut self) {
        let sync = self.sync;
        self.by_fingerprint.retain(|_, bucket| {
            bucket.retain(|c| c.used == sync);
            !bucket.is_empty()
        });
    }
}

/// The chains of one sync: found in the cache or rendered, each distinct one once.
struct Renderer<'c> {
    cache: &'c mut ChainCache,
    sets: SetCache,
    rendered: HashMap<String, Arc<PolicyChain>>,
}

impl Renderer<'_> {
    fn chain(&mut self, direction: Direction, isolation: &Option<Isolation>) -> Option<String> {
        let isolation = isolation.as_ref()?;
        let chain = self.cache.chain(direction, isolation, &mut self.sets);
        if let Some(known) = self.rendered.get(&chain.name) {
            return Some(known.name.clone());
        }
        let name = chain.name.clone();
        self.rendered.insert(name.clone(), chain);
        Some(name)
    }

    fn pod(&mut self, pod: &PodPolicy) -> PodChains {
        PodChains {
            ips: pod.ips.clone(),
            chains: [
                self.chain(Direction::Egress, &pod.egress),
                self.chain(Direction::Ingress, &pod.ingress),
            ],
        }
    }
}

const DIRECTIONS: [Direction; 2] = [Direction::Egress, Direction::Ingress];

/// The transaction from `old` to `table`, in the order the kernel needs: base objects,
/// new sets (with their elements), new chains (with their rules), map elements switched,
/// then what nothing refers to any more goes.
fn diff(mut old: Applied, table: &PolicyTable, cache: &mut ChainCache) -> Prepared {
    let mut ops = Vec::new();
    let first = !old.enabled || old.unknown_elements;
    if first {
        ops.push(PolicyOp::AddTable);
        ops.push(PolicyOp::AddBaseChain);
        // Refilled in the same transaction: whatever an earlier version wrote there.
        ops.push(PolicyOp::FlushChain(super::render::FORWARD.to_string()));
        for direction in DIRECTIONS {
            for family in FAMILIES {
                ops.push(PolicyOp::AddMap(direction, family));
                if old.unknown_elements {
                    ops.push(PolicyOp::FlushMap(direction, family));
                }
            }
        }
        for rule in super::render::base_rules() {
            ops.push(PolicyOp::AddRule(super::render::FORWARD.to_string(), rule));
        }
        old.elements.clear();
    }
    let mut renderer = Renderer {
        cache,
        sets: SetCache::default(),
        rendered: HashMap::new(),
    };
    let mut used_chains: Vec<String> = Vec::new();
    let mut elements: HashMap<(Direction, IpAddr), String> = HashMap::new();
    let mut isolated_pods = 0;
    for (key, pod) in &table.pods {
        let applied = renderer.pod(pod);
        if applied.chains.iter().any(Option::is_some) {
            isolated_pods += 1;
        }
        for (direction, chain) in DIRECTIONS.iter().zip(&applied.chains) {
            let Some(chain) = chain else { continue };
            for ip in &applied.ips {
                match elements.get(&(*direction, *ip)) {
                    Some(taken) if taken != chain => tracing::warn!(
                        "{key}: address {ip} is also another Pod's; its {} policy is that Pod's",
                        direction.name()
                    ),
                    Some(_) => {}
                    None => {
                        elements.insert((*direction, *ip), chain.clone());
                    }
                }
            }
        }
        used_chains.extend(applied.chains.into_iter().flatten());
    }
    // The chains and sets in use after this sync.
    let mut chains: HashMap<String, AppliedChain> = HashMap::new();
    for name in &used_chains {
        if chains.contains_key(name) {
            continue;
        }
        let known = match renderer.rendered.get(name) {
            Some(chain) => AppliedChain {
                rules: chain.rules.len(),
                sets: chain.sets.iter().map(|s| s.name.clone()).collect(),
            },
            None => old.chains.remove(name).unwrap_or_default(),
        };
        chains.insert(name.clone(), known);
    }
    // The sets in use after this sync, with their elements: every chain in use was
    // rendered in this sync (the renderer is fresh), so each set's content is known.
    let mut sets: BTreeMap<String, Option<Arc<PeerSet>>> = BTreeMap::new();
    for name in chains.keys() {
        match renderer.rendered.get(name) {
            Some(chain) => {
                for set in &chain.sets {
                    sets.insert(set.name.clone(), Some(set.clone()));
                }
            }
            None => {
                for set in &chains[name].sets {
                    let known = old.sets.get(set).cloned().flatten();
                    sets.entry(set.clone()).or_insert(known);
                }
            }
        }
    }

    // Sets: new ones with their elements; kept ones by element diff (their names say
    // what they select, not what they hold); ones found in the kernel flushed and
    // refilled. Then new chains: in name order, so one plan gives one text.
    for (name, set) in &sets {
        let Some(set) = set else { continue };
        match old.sets.get(name) {
            None => ops.push(PolicyOp::AddSet(set.clone())),
            Some(None) => {
                ops.push(PolicyOp::FlushSet(name.clone()));
                ops.push(PolicyOp::AddSetElements(set.clone()));
            }
            Some(Some(was)) if Arc::ptr_eq(was, set) || was.ranges == set.ranges => {}
            Some(Some(was)) => {
                let (gone, new) = range_diff(&was.ranges, &set.ranges);
                let part = |ranges: Vec<AddressRange>| {
                    Arc::new(PeerSet {
                        name: name.clone(),
                        family: set.family,
                        ranges,
                    })
                };
                if !gone.is_empty() {
                    ops.push(PolicyOp::DelSetElements(part(gone)));
                }
                if !new.is_empty() {
                    ops.push(PolicyOp::AddSetElements(part(new)));
                }
            }
        }
    }
    let mut new_chains: Vec<&PolicyChain> = renderer
        .rendered
        .values()
        .map(|c| &**c)
        .filter(|c| chains.contains_key(&c.name) && !old.chains.contains_key(&c.name))
        .collect();
    new_chains.sort_by(|a, b| a.name.cmp(&b.name));
    for chain in &new_chains {
        ops.push(PolicyOp::AddChain(chain.name.clone()));
        for rule in &chain.rules {
            ops.push(PolicyOp::AddRule(chain.name.clone(), rule.clone()));
        }
    }

    // Elements: deleted where gone or changed, added where new or changed.
    let mut deleted: BTreeMap<String, BTreeSet<MapElement>> = BTreeMap::new();
    let mut added: BTreeMap<String, BTreeSet<MapElement>> = BTreeMap::new();
    for ((direction, ip), chain) in &old.elements {
        if elements.get(&(*direction, *ip)) != Some(chain) {
            let e = MapElement {
                direction: *direction,
                ip: *ip,
                chain: chain.clone(),
            };
            deleted.entry(e.map()).or_default().insert(e);
        }
    }
    for ((direction, ip), chain) in &elements {
        if old.elements.get(&(*direction, *ip)) != Some(chain) {
            let e = MapElement {
                direction: *direction,
                ip: *ip,
                chain: chain.clone(),
            };
            added.entry(e.map()).or_default().insert(e);
        }
    }
    for (map, e) in deleted {
        ops.push(PolicyOp::DelElements(map, e.into_iter().collect()));
    }
    for (map, e) in added {
        ops.push(PolicyOp::AddElements(map, e.into_iter().collect()));
    }

    // What nothing refers to any more.
    let mut gone_chains: Vec<&String> = old.chains.keys().filter(|c| !chains.contains_key(*c)).collect();
    gone_chains.sort();
    ops.extend(gone_chains.into_iter().map(|c| PolicyOp::DelChain(c.clone())));
    let mut gone_sets: Vec<&String> = old.sets.keys().filter(|s| !sets.contains_key(*s)).collect();
    gone_sets.sort();
    ops.extend(gone_sets.into_iter().map(|s| PolicyOp::DelSet(s.clone())));

    Prepared {
        ops,
        next: Applied {
            enabled: true,
            elements,
            chains,
            sets: sets.into_iter().collect(),
            unknown_elements: false,
        },
        isolated_pods,
    }
}

/// The ranges only in `old` and those only in `new` (both sorted, as a plan writes them).
fn range_diff(old: &[AddressRange], new: &[AddressRange]) -> (Vec<AddressRange>, Vec<AddressRange>) {
    let (mut gone, mut added) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) if o == n => {
                i += 1;
                j += 1;
            }
            (Some(o), Some(n)) if o < n => {
                gone.push(*o);
                i += 1;
            }
            (Some(_), Some(n)) => {
                added.push(*n);
                j += 1;
            }
            (Some(o), None) => {
                gone.push(*o);
                i += 1;
            }
            (None, Some(n)) => {
                added.push(*n);
                j += 1;
            }
            (None, None) => unreachable!("the loop stops when both are done"),
        }
    }
    (gone, added)
}

/// The policy table on a socket of its own: what the eBPF back end (whose Services are
/// not in nftables) and `cleanup` use. The nftables back end puts the same steps in its
/// own batch instead.
#[derive(Default)]
pub struct PolicyEnforcer {
    writer: PolicyWriter,
    socket: Option<nft::Socket>,
}

impl PolicyEnforcer {
    pub fn new() -> PolicyEnforcer {
        PolicyEnforcer::default()
    }

    fn socket(&mut self) -> Result<&mut nft::Socket, BackendError> {
        if self.socket.is_none() {
            let socket = nft::Socket::open().map_err(|source| BackendError::Socket {
                what: "opening a netfilter netlink socket for the policy table".into(),
                source,
            })?;
            self.socket = Some(socket);
        }
        Ok(self.socket.as_mut().expect("just opened"))
    }

    /// Makes the policy table match `table` (`None`: no table) in one transaction;
    /// returns the policy rules and how long it took.
    pub fn sync(
        &mut self,
        table: Option<&PolicyTable>,
    ) -> Result<(usize, std::time::Duration), BackendError> {
        let start = Instant::now();
        let kernel = if self.writer.needs_kernel() {
            let socket = self.socket()?;
            let read = KernelPolicy::read(socket);
            Some(read.map_err(|source| {
                self.socket = None;
                BackendError::Socket {
                    what: format!("reading the names in table inet {TABLE}"),
                    source,
                }
            })?)
        } else {
            None
        };
        let prepared = self.writer.prepare(table, kernel.as_ref());
        if !prepared.ops.is_empty() {
            let mut batch = nft::Batch::new(TABLE);
            for op in &prepared.ops {
                op.lower(&mut batch);
            }
            let result = self.socket()?.commit(&batch);
            result.map_err(|source| {
                self.socket = None;
                BackendError::Commit {
                    what: "policy transaction failed, nothing applied".into(),
                    source,
                }
            })?;
        }
        self.writer.committed(prepared);
        Ok((self.writer.rules(), start.elapsed()))
    }

    /// Deletes the policy table if it exists.
    pub fn cleanup(&mut self) -> Result<(), BackendError> {
        self.writer.reset();
        self.sync(None).map(|_| ())
    }

    pub fn writer(&self) -> &PolicyWriter {
        &self.writer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::policy::{Allow, Clause, PortRange};
    use crate::plan::Protocol;

    /// Pods `names`, each isolated for ingress by one policy allowing 10.0.0.1 on TCP 80.
    fn table(names: &[&str], peers: &Arc<Addresses>) -> PolicyTable {
        let isolation = Isolation {
            policies: vec!["x/p".into()],
            allows: vec![Allow {
                policy: "x/p".into(),
                rule: 0,
                clauses: vec![Clause::by_content(
                    peers.clone(),
                    Ports::Ranges(vec![PortRange {
                        protocol: Protocol::Tcp,
                        first: 80,
                        last: 80,
                    }]),
                )],
            }],
        };
        let mut t = PolicyTable::default();
        for (i, name) in names.iter().enumerate() {
            t.pods.insert(
                format!("x/{name}"),
                PodPolicy {
                    namespace: "x".into(),
                    name: name.to_string(),
                    ips: vec![format!("10.1.0.{}", i + 1).parse().unwrap()],
                    ingress: Some(isolation.clone()),
                    egress: None,
                },
            );
        }
        t
    }

    fn peers() -> Arc<Addresses> {
        let ip = "10.0.0.1".parse().unwrap();
        Arc::new(Addresses::Ranges(vec![AddressRange { first: ip, last: ip }]))
    }

    fn sync(writer: &mut PolicyWriter, t: Option<&PolicyTable>, kernel: Option<&KernelPolicy>) -> String {
        let prepared = writer.prepare(t, kernel);
        writer.committed(prepared);
        writer.last_transaction().to_string()
    }

    #[test]
    fn pods_under_one_policy_share_a_chain_and_a_relabel_is_an_element() {
        let mut writer = PolicyWriter::new();
        let t = table(&["a", "b", "c"], &peers());
        let tx = sync(&mut writer, Some(&t), None);
        assert_eq!(
            tx.matches("add chain inet ferry-policy ingress-").count(),
            1,
            "{tx}"
        );
        assert_eq!(tx.matches("add set inet ferry-policy peers-").count(), 1, "{tx}");
        assert!(
            tx.contains("10.1.0.1 : goto ingress-") && tx.contains("10.1.0.3 : goto ingress-"),
            "{tx}"
        );
        // The same plan, with new (equal) address lists: nothing to do.
        assert_eq!(
            sync(&mut writer, Some(&table(&["a", "b", "c"], &peers())), None),
            ""
        );
        // c no longer selected: one element goes, nothing else.
        let mut fewer = table(&["a", "b", "c"], &peers());
        fewer.pods.get_mut("x/c").unwrap().ingress = None;
        let tx = sync(&mut writer, Some(&fewer), None);
        assert_eq!(
            tx.lines().collect::<Vec<_>>(),
            ["delete element inet ferry-policy ingress-v4 { 10.1.0.3 }"]
        );
        // Nobody isolated: elements, then the chain, then its set.
        let tx = sync(&mut writer, Some(&table(&[], &peers())), None);
        let lines: Vec<&str> = tx.lines().collect();
        assert_eq!(lines.len(), 3, "{tx}");
        assert!(
            lines[0].starts_with("delete element") && lines[1].starts_with("delete chain"),
            "{tx}"
        );
        assert!(
            lines[2].starts_with("delete set inet ferry-policy peers-"),
            "{tx}"
        );
        // Policy off: the table goes, once.
        assert_eq!(sync(&mut writer, None, None), "delete table inet ferry-policy\n");
        assert_eq!(sync(&mut writer, None, None), "");
    }

    #[test]
    fn a_new_process_keeps_what_it_still_needs_and_refills_the_maps_in_one_go() {
        let t = table(&["a"], &peers());
        let mut first = PolicyWriter::new();
        let tx = sync(&mut first, Some(&t), None);
        let chain = tx
            .lines()
            .find_map(|l| l.strip_prefix("add chain inet ferry-policy ingress-"))
            .map(|h| format!("ingress-{h}"))
            .unwrap();
        let set = tx
            .lines()
            .find_map(|l| l.strip_prefix("add set inet ferry-policy "))
            .and_then(|l| l.split(' ').next())
            .unwrap()
            .to_string();
        let kernel = KernelPolicy {
            exists: true,
            chains: vec!["forward".into(), chain.clone(), "ingress-0000000000000000".into()],
            sets: vec![
                "ingress-v4".into(),
                set.clone(),
                "peers-0000000000000000-v4".into(),
            ],
        };
        let mut restarted = PolicyWriter::new();
        assert!(restarted.needs_kernel());
        let tx = sync(&mut restarted, Some(&t), Some(&kernel));
        assert!(
            !tx.contains("delete table") && !tx.contains(&format!("add chain inet ferry-policy {chain}")),
            "{tx}"
        );
        assert!(!tx.contains(&format!("add set inet ferry-policy {set}")), "{tx}");
        let flush = tx
            .find("flush map inet ferry-policy ingress-v4")
            .expect("maps flushed");
        let refill = tx
            .find("add element inet ferry-policy ingress-v4 { 10.1.0.1")
            .expect("and refilled");
        assert!(flush < refill, "{tx}");
        assert!(
            tx.contains("delete chain inet ferry-policy ingress-0000000000000000"),
            "{tx}"
        );
        assert!(
            tx.contains("delete set inet ferry-policy peers-0000000000000000-v4"),
            "{tx}"
        );
        assert!(!restarted.needs_kernel());
    }
}
