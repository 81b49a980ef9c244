//! The back end itself: what it applied, and each sync as named steps from a new plan to
//! one transaction (see "Sync", "Restart" and "Conntrack" in the module docs of [`super`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::time::Instant;

use super::elements::{Element, Key};
use super::names::TABLE;
use super::render::{base_rules, hairpin_element, render_port, PortObjects, RenderCtx};
use super::slots::{slots_needed, Slot, SlotAllocator};
use super::transaction::{ops_text, Op, Tx};
use crate::backend::policy::{KernelPolicy, PolicyWriter, Prepared, TABLE as POLICY_TABLE};
use crate::backend::{Backend, BackendError, SyncStats};
use crate::changes::{stale_udp_flows, Changes, ServiceChanges};
use crate::conntrack;
use crate::nft;
use crate::plan::policy::PolicyTable;
use crate::plan::{NodeSettings, Plan, ServicePort, ServicePortId, ServiceTable};

/// What the back end applied last, per Service port.
#[derive(Debug, Default)]
struct Applied {
    settings: NodeSettings,
    ports: HashMap<ServicePortId, AppliedPort>,
    /// Map keys and the port that holds each (two Services claiming one external IP and
    /// port must not fail the whole transaction).
    owners: HashMap<(String, Key), ServicePortId>,
    /// Ports that could not have all their elements: retried every sync.
    blocked: HashSet<ServicePortId>,
    /// Endpoint address -> number of ports using it (the hairpin set holds those > 0).
    hairpin: HashMap<IpAddr, usize>,
    slots: SlotAllocator,
    rules: usize,
}

/// The ports one sync looks at.
struct Work<'t> {
    /// Ports new or different from what was applied (or to re-render).
    changed: Vec<&'t ServicePort>,
    /// Ports applied and no longer in the plan.
    removed: Vec<ServicePortId>,
}

/// A changed port rendered for this sync, in the slot it will keep.
struct Rendered<'t> {
    port: &'t ServicePort,
    slot: Slot,
    objects: PortObjects,
    /// Elements left out because another port holds their key.
    skipped: Vec<Element>,
}

/// A port as it was applied before this sync, and its objects.
struct Old {
    applied: AppliedPort,
    objects: PortObjects,
}

impl Applied {
    /// Writes the base layout at the first sync and when the settings change; returns
    /// whether every port must be rendered again (the settings change what ports render).
    fn write_base(&mut self, tx: &mut Tx, settings: &NodeSettings, first: bool) -> bool {
        if first {
            tx.write_base(settings);
            self.settings = settings.clone();
            self.rules = base_rules(settings);
            return false;
        }
        if self.settings == *settings {
            return false;
        }
        tx.write_base(settings);
        let rerender = RenderCtx::of(&self.settings) != RenderCtx::of(settings);
        self.settings = settings.clone();
        rerender
    }

    /// Which ports to look at: those `changes` names (and the blocked ones), or all of
    /// them when `all` (no list of changes, a first sync, every port to re-render).
    fn select<'t>(
        &self,
        table: &'t ServiceTable,
        changes: &ServiceChanges,
        all: bool,
        rerender: bool,
    ) -> Work<'t> {
        let mut work = Work {
            changed: Vec::new(),
            removed: Vec::new(),
        };
        let is_changed = |id: &ServicePortId, port: &ServicePort| match self.ports.get(id) {
            Some(old) => old.port != *port || rerender || self.blocked.contains(id),
            None => true,
        };
        match changes {
            ServiceChanges::Ports(named) if !all => {
                let blocked = self.blocked.iter().filter(|id| !named.contains(*id));
                for id in named.iter().chain(blocked) {
                    match table.ports.get(id) {
                        Some(port) if is_changed(id, port) => work.changed.push(port),
                        Some(_) => {}
                        None if self.ports.contains_key(id) => work.removed.push(id.clone()),
                        None => {}
                    }
                }
            }
            _ => {
                work.changed.extend(
                    table
                        .ports
                        .iter()
                        .filter(|(id, p)| is_changed(id, p))
                        .map(|(_, p)| p),
                );
                work.removed.extend(
                    self.ports
                        .keys()
                        .filter(|id| !table.ports.contains_key(*id))
                        .cloned(),
                );
                // In id order, as when the changes name them: the same plan gives the same
                // transaction text, whichever way the ports were selected.
                work.removed.sort_unstable();
            }
        }
        work
    }

    /// Renders the changed ports in their slots (a port keeps its slot while it fits) and
    /// frees the slots of the removed ones.
    fn render<'t>(&mut self, work: &Work<'t>, ctx: RenderCtx) -> Result<Vec<Rendered<'t>>, BackendError> {
        let mut rendered = Vec::with_capacity(work.changed.len());
        for port in &work.changed {
            let old = self.ports.get(&port.id).map(|a| a.slot);
            let slot = self.slots.fit(&port.id, slots_needed(port), old)?;
            rendered.push(Rendered {
                port,
                slot,
                objects: render_port(port, ctx, slot),
                skipped: Vec::new(),
            });
        }
        for id in &work.removed {
            if let Some(old) = self.ports.get(id) {
                self.slots.give_back(id, old.slot);
            }
        }
        Ok(rendered)
    }

    /// Takes the ports that change or go out of the state, with their objects as the
    /// kernel holds them, and releases their keys: a key moving from one port to another
    /// in this sync is then not taken for a conflict.
    fn release_old(&mut self, work: &Work, ctx: RenderCtx) -> HashMap<ServicePortId, Old> {
        let mut old = HashMap::new();
        for id in work.changed.iter().map(|p| &p.id).chain(&work.removed) {
            if let Some(applied) = self.ports.remove(id) {
                let objects = applied.objects(ctx);
                for e in objects.elements.iter().filter(|e| contested(&e.map)) {
                    self.owners.remove(&(e.map.clone(), e.key.clone()));
                }
                old.insert(id.clone(), Old { applied, objects });
            }
        }
        old
    }

    /// Gives each rendered port the contested keys (Service addresses, NodePorts) no other
    /// port holds; the others are left out, and the port is retried every sync until they
    /// are free (two Services claiming one external IP and port must not fail the whole
    /// transaction).
    fn claim_keys(&mut self, rendered: &mut [Rendered]) {
        for r in rendered {
            self.blocked.remove(&r.port.id);
            let mut kept = BTreeSet::new();
            for e in std::mem::take(&mut r.objects.elements) {
                if !contested(&e.map) {
                    kept.insert(e);
                    continue;
                }
                let key = (e.map.clone(), e.key.clone());
                match self.owners.get(&key) {
                    Some(owner) if *owner != r.port.id => {
                        tracing::warn!(
                            "{}: {} {} is already used by {owner}; skipped until that is resolved",
                            r.port.id,
                            e.map,
                            e.key
                        );
                        self.blocked.insert(r.port.id.clone());
                        r.skipped.push(e);
                    }
                    _ => {
                        self.owners.insert(key, r.port.id.clone());
                        kept.insert(e);
                    }
                }
            }
            r.objects.elements = kept;
        }
    }

    /// Writes what differs between the old and new objects of every port that changed or
    /// went, and the hairpin pairs that follow; returns the UDP flows the change leaves
    /// stale (the choice is shared with every back end: [`stale_udp_flows`]).
    fn write_diffs(
        &mut self,
        tx: &mut Tx,
        rendered: &[Rendered],
        old: &HashMap<ServicePortId, Old>,
        removed: &[ServicePortId],
    ) -> Vec<conntrack::UdpFlowFilter> {
        let empty = PortObjects::default();
        let mut hairpin = HairpinChanges::default();
        let mut stale_udp = Vec::new();
        for r in rendered {
            let before = old.get(&r.port.id);
            let old_objects = before.map_or(&empty, |o| &o.objects);
            self.write_diff(tx, old_objects, &r.objects, &mut hairpin);
            if let Some(before) = before {
                stale_udp.extend(stale_udp_flows(&before.applied.port, Some(r.port)));
            }
        }
        for id in removed {
            if let Some(before) = old.get(id) {
                self.write_diff(tx, &before.objects, &empty, &mut hairpin);
                stale_udp.extend(stale_udp_flows(&before.applied.port, None));
            }
        }
        for ip in &hairpin.add {
            tx.add_element(&hairpin_element(*ip));
        }
        for ip in &hairpin.del {
            tx.del_element(&hairpin_element(*ip));
        }
        stale_udp
    }

    /// One port's difference, and what it does to the hairpin pairs and the rule count.
    fn write_diff(
        &mut self,
        tx: &mut Tx,
        old: &PortObjects,
        new: &PortObjects,
        hairpin: &mut HairpinChanges,
    ) {
        tx.write_port_diff(old, new);
        for ip in old.endpoint_ips.difference(&new.endpoint_ips) {
            let n = self.hairpin.entry(*ip).or_default();
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.hairpin.remove(ip);
                if !hairpin.add.remove(ip) {
                    hairpin.del.insert(*ip);
                }
            }
        }
        for ip in new.endpoint_ips.difference(&old.endpoint_ips) {
            let n = self.hairpin.entry(*ip).or_default();
            *n += 1;
            if *n == 1 && !hairpin.del.remove(ip) {
                hairpin.add.insert(*ip);
            }
        }
        self.rules = self.rules + new.rules() - old.rules();
    }

    /// Remembers the rendered ports as applied (their objects are dropped: see
    /// [`AppliedPort`]).
    fn keep(&mut self, rendered: Vec<Rendered>) {
        for r in rendered {
            self.ports.insert(
                r.port.id.clone(),
                AppliedPort {
                    port: r.port.clone(),
                    slot: r.slot,
                    skipped: r.skipped,
                },
            );
        }
    }
}

/// Endpoint addresses whose hairpin pair comes or goes in this sync.
#[derive(Default)]
struct HairpinChanges {
    add: BTreeSet<IpAddr>,
    del: BTreeSet<IpAddr>,
}

/// What was applied for one port. Its objects are not kept (they are most of the back
/// end's memory): rendering the port again with the same context and slot gives them back.
#[derive(Debug)]
struct AppliedPort {
    port: ServicePort,
    slot: Slot,
    /// Elements left out because another port held their key.
    skipped: Vec<Element>,
}

impl AppliedPort {
    /// The objects in the kernel for this port, given the context it was rendered in.
    fn objects(&self, ctx: RenderCtx) -> PortObjects {
        let mut o = render_port(&self.port, ctx, self.slot);
        for e in &self.skipped {
            o.elements.remove(e);
        }
        o
    }
}

/// Whether two ports can claim the same key of this map (a Service address, a NodePort);
/// keys of the endpoint maps are handed out, never shared.
pub(super) fn contested(map: &str) -> bool {
    !map.starts_with("endpoints-")
}

pub struct NftablesBackend {
    /// Programs nothing (unit tests without root): reads an empty kernel, commits nowhere.
    dry_run: bool,
    socket: Option<nft::Socket>,
    /// Kept open for the same reason as `socket`.
    ct: Option<conntrack::Conntrack>,
    state: Option<Applied>,
    last_transaction: String,
    conntrack: bool,
    /// The policy table: its steps join the Services' batch.
    policy: PolicyWriter,
}

impl Default for NftablesBackend {
    fn default() -> Self {
        NftablesBackend::new()
    }
}

impl NftablesBackend {
    /// A back end that programs the network namespace of the thread that calls `sync`.
    /// Nothing happens until the first sync.
    pub fn new() -> NftablesBackend {
        NftablesBackend {
            dry_run: false,
            socket: None,
            ct: None,
            state: None,
            last_transaction: String::new(),
            conntrack: true,
            policy: PolicyWriter::new(),
        }
    }

    /// A back end that computes its transactions (see [`Self::last_transaction`]) but
    /// sends nothing to the kernel, and finds it empty at the first sync.
    pub fn dry_run() -> NftablesBackend {
        NftablesBackend {
            dry_run: true,
            conntrack: false,
            ..NftablesBackend::new()
        }
    }

    /// Switches the clearing of stale UDP conntrack entries (on by default).
    pub fn set_conntrack_cleanup(&mut self, on: bool) {
        self.conntrack = on;
    }

    /// The last transaction as nft commands, one per line ("" when the last sync had
    /// nothing to do; a one-line summary above 5,000 steps): for logs and tests. `nft -f`
    /// accepts it.
    pub fn last_transaction(&self) -> &str {
        &self.last_transaction
    }

    /// The policy table's part of the last transaction, as nft commands ("" when it had
    /// nothing to do there); `nft -f` accepts it.
    pub fn last_policy_transaction(&self) -> &str {
        self.policy.last_transaction()
    }

    /// Rules in the policy table.
    pub fn policy_rules(&self) -> usize {
        self.policy.rules()
    }

    /// The back end's netlink socket, opened at first use in the calling thread's network
    /// namespace and kept: closing a netfilter netlink socket waits for an RCU grace
    /// period in the kernel (7-15 ms measured with strace here), more than a one-element
    /// commit costs.
    fn socket(&mut self) -> Result<&mut nft::Socket, BackendError> {
        if self.socket.is_none() {
            let socket = nft::Socket::open().map_err(|source| BackendError::Socket {
                what: "opening a netfilter netlink socket".into(),
                source,
            })?;
            self.socket = Some(socket);
        }
        Ok(self.socket.as_mut().expect("just opened"))
    }

    /// Whether Ferry's table is in the kernel.
    fn table_exists(&mut self) -> Result<bool, BackendError> {
        Ok(self.tables()?.iter().any(|t| t == TABLE))
    }

    /// The inet tables in the kernel (none in a dry run).
    fn tables(&mut self) -> Result<Vec<String>, BackendError> {
        if self.dry_run {
            return Ok(Vec::new());
        }
        self.socket()?.list_tables().map_err(|source| {
            self.socket = None;
            BackendError::Socket {
                what: "listing the inet tables".into(),
                source,
            }
        })
    }

    /// The policy steps of this sync, from the kernel's names when the writer knows
    /// nothing yet (a new process, or after a failed commit).
    fn prepare_policy(&mut self, table: Option<&PolicyTable>) -> Result<Prepared, BackendError> {
        let kernel = if self.policy.needs_kernel() && !self.dry_run {
            let read = KernelPolicy::read(self.socket()?);
            Some(read.map_err(|source| {
                self.socket = None;
                BackendError::Socket {
                    what: format!("reading the names in table inet {POLICY_TABLE}"),
                    source,
                }
            })?)
        } else {
            None
        };
        Ok(self.policy.prepare(table, kernel.as_ref()))
    }

    /// Sends `batch` as one transaction (`what` says what it does, for the error). A
    /// socket that failed is not used again.
    fn send(&mut self, batch: &nft::Batch, what: &str) -> Result<(), BackendError> {
        let result = self.socket()?.commit(batch);
        result.map_err(|source| {
            self.socket = None;
            BackendError::Commit {
                what: what.to_string(),
                source,
            }
        })
    }

    /// One sync, in the steps the module docs describe. The state is taken out for the
    /// sync and put back only when the kernel has what it describes: a failure (here or in
    /// the commit) leaves `state` empty, and the next sync rebuilds the table.
    fn sync_plan(
        &mut self,
        table: &ServiceTable,
        changes: &ServiceChanges,
        policy: Option<&PolicyTable>,
    ) -> Result<SyncStats, BackendError> {
        let start = Instant::now();
        let mut tx = Tx::default();
        let first = self.state.is_none();
        let mut state = self.state.take().unwrap_or_default();
        if first && self.table_exists()? {
            tx.delete_table();
        }
        // What the applied objects were rendered with.
        let old_ctx = RenderCtx::of(&state.settings);
        let rerender_all = state.write_base(&mut tx, &table.settings, first);
        let work = state.select(table, changes, first || rerender_all, rerender_all);
        let changed_ports = work.changed.len() + work.removed.len();
        let mut rendered = state.render(&work, RenderCtx::of(&table.settings))?;
        let old = state.release_old(&work, old_ctx);
        state.claim_keys(&mut rendered);
        let stale_udp = state.write_diffs(&mut tx, &rendered, &old, &work.removed);
        state.keep(rendered);
        let policy = self.prepare_policy(policy)?;
        self.commit(tx, state, policy)?;
        self.clear_stale_udp_flows(&stale_udp);
        Ok(SyncStats {
            changed_ports,
            rules: self.rules(),
            apply_time: start.elapsed(),
        })
    }

    /// Sends the transaction, Services and policy together (if there is anything to do),
    /// and keeps `state` when it took.
    fn commit(&mut self, tx: Tx, state: Applied, policy: Prepared) -> Result<(), BackendError> {
        if tx.is_empty() && policy.ops.is_empty() {
            self.last_transaction.clear();
            self.state = Some(state);
            self.policy.committed(policy);
            return Ok(());
        }
        let ops = tx.into_ops();
        let result = self.send_ops(&ops, &policy);
        self.last_transaction = ops_text(&ops);
        // Nothing was applied when it failed (a transaction is all or nothing): the state
        // stays empty (the policy writer's too), so the next sync starts over from what
        // the kernel holds.
        result?;
        self.state = Some(state);
        self.policy.committed(policy);
        Ok(())
    }

    /// Sends `ops` and the policy steps as one transaction.
    fn send_ops(&mut self, ops: &[Op], policy: &Prepared) -> Result<(), BackendError> {
        if self.dry_run {
            return Ok(());
        }
        let mut batch = nft::Batch::new(TABLE);
        for op in ops {
            op.lower(&mut batch);
        }
        for op in &policy.ops {
            op.lower(&mut batch);
        }
        self.send(&batch, "nftables transaction failed, nothing applied")
    }

    /// Deletes the conntrack entries of UDP flows to endpoints that went away, once the
    /// rules that no longer lead there are in the kernel. A failure is only logged: the
    /// rules are right, and the flows end when their entries time out.
    fn clear_stale_udp_flows(&mut self, flows: &[conntrack::UdpFlowFilter]) {
        if !self.conntrack || flows.is_empty() {
            return;
        }
        let ct = match self.ct.take() {
            Some(ct) => Ok(ct),
            None => conntrack::Conntrack::open(),
        };
        match ct.and_then(|mut ct| ct.delete_udp_flows(flows).map(|_| ct)) {
            Ok(ct) => self.ct = Some(ct),
            Err(e) => tracing::warn!("clearing conntrack entries of removed UDP endpoints: {e}"),
        }
    }

    fn rules(&self) -> usize {
        self.state.as_ref().map_or(0, |s| s.rules)
    }
}

impl Backend for NftablesBackend {
    fn sync(&mut self, plan: &Plan, changes: &Changes) -> Result<SyncStats, BackendError> {
        self.sync_plan(&plan.services, &changes.services, plan.policy.as_ref())
    }

    /// Deletes both tables, Services' and policy's, in one transaction.
    fn cleanup(&mut self) -> Result<(), BackendError> {
        self.state = None;
        self.policy.reset();
        let tables = self.tables()?;
        let mut batch = nft::Batch::new(TABLE);
        for table in [TABLE, POLICY_TABLE] {
            if tables.iter().any(|t| t == table) {
                batch.use_table(nft::TableFamily::Inet, table);
                batch.delete_table();
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.send(
            &batch,
            &format!("deleting tables inet {TABLE} and inet {POLICY_TABLE}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nftables::names::port_base_name;
    use crate::backend::nftables::render::tests::{ep, port};
    use crate::backend::nftables::synthetic_table;
    use crate::plan::{Endpoint, Family, Protocol};
    use std::net::IpAddr;

    /// A sync that compares every port, as after a full plan.
    fn sync_all(backend: &mut NftablesBackend, t: &ServiceTable) -> Result<SyncStats, BackendError> {
        backend.sync(
            &Plan {
                services: t.clone(),
                policy: None,
            },
            &Changes::all(),
        )
    }

    #[test]
    fn a_contested_external_ip_goes_to_one_port_then_to_the_other() {
        let mut backend = NftablesBackend::dry_run();
        backend.set_conntrack_cleanup(false);
        let mut a = port("a", Family::V4);
        a.cluster_endpoints = vec![ep("10.1.0.2", 80)];
        a.external_endpoints = a.cluster_endpoints.clone();
        a.external_ips = vec!["192.0.2.1".parse().unwrap()];
        let mut b = a.clone();
        b.id.name = "b".into();
        b.cluster_ip = Some("10.96.0.11".parse().unwrap());
        let key = "192.0.2.1 . tcp . 80 : goto external-";
        let mut t = ServiceTable::default();
        t.ports.insert(a.id.clone(), a.clone());
        t.ports.insert(b.id.clone(), b.clone());
        sync_all(&mut backend, &t).unwrap();
        let tx = backend.last_transaction().to_string();
        assert_eq!(tx.matches(key).count(), 1, "{tx}");
        assert!(tx.contains(&format!("{key}{}", port_base_name(&a.id))), "{tx}");
        // Unchanged, but b is still waiting for the address: it is retried, and gets
        // nothing new while a holds it.
        sync_all(&mut backend, &t).unwrap();
        assert!(
            !backend.last_transaction().contains(key),
            "{}",
            backend.last_transaction()
        );
        // a goes away: b gets the address in the same transaction that removes a's.
        t.ports.remove(&a.id);
        let stats = sync_all(&mut backend, &t).unwrap();
        let tx = backend.last_transaction().to_string();
        assert!(tx.contains(&format!("{key}{}", port_base_name(&b.id))), "{tx}");
        assert!(
            tx.contains("delete element inet ferry-proxy service-ips-v4"),
            "{tx}"
        );
        assert_eq!(stats.changed_ports, 2);
        sync_all(&mut backend, &t).unwrap();
        assert_eq!(backend.last_transaction(), "");
    }

    #[test]
    fn settings_changes_rewrite_the_base_and_only_affected_chains() {
        let mut backend = NftablesBackend::dry_run();
        let mut a = port("a", Family::V4);
        a.cluster_endpoints = vec![ep("10.1.0.2", 80)];
        a.external_endpoints = a.cluster_endpoints.clone();
        let mut t = ServiceTable::default();
        t.settings.cluster_cidrs = vec!["10.1.0.0/16".parse().unwrap()];
        t.ports.insert(a.id.clone(), a.clone());
        let first = sync_all(&mut backend, &t).unwrap();
        let tx = backend.last_transaction().to_string();
        assert!(
            tx.contains("add element inet ferry-proxy cluster-cidrs-v4 { 10.1.0.0/16 }"),
            "{tx}"
        );
        assert!(tx.contains("add map inet ferry-proxy service-ips-v4"), "{tx}");
        // Another v4 CIDR and NodePort addresses: base only.
        t.settings.cluster_cidrs.push("10.2.0.0/16".parse().unwrap());
        t.settings.nodeport_addresses = vec!["192.168.1.0/24".parse().unwrap()];
        let stats = sync_all(&mut backend, &t).unwrap();
        let tx = backend.last_transaction().to_string();
        assert!(
            tx.contains("ip daddr @nodeport-ips-v4 fib daddr type local"),
            "{tx}"
        );
        assert!(
            !tx.contains("service-") || !tx.contains(&port_base_name(&a.id)),
            "{tx}"
        );
        assert!(!tx.contains("flush map"), "maps keep their elements: {tx}");
        assert_eq!(stats.rules, first.rules);
        // No v4 cluster CIDR any more: the masquerade rule of every v4 chain goes.
        t.settings.cluster_cidrs = vec!["fd00::/48".parse().unwrap()];
        let stats = sync_all(&mut backend, &t).unwrap();
        let tx = backend.last_transaction().to_string();
        assert!(
            tx.contains(&format!(
                "flush chain inet ferry-proxy service-{}",
                port_base_name(&a.id)
            )),
            "{tx}"
        );
        assert_eq!(stats.rules, first.rules - 1);
    }

    #[test]
    fn named_changes_give_the_same_transactions_as_a_full_comparison() {
        let mut logged = NftablesBackend::dry_run();
        let mut full = NftablesBackend::dry_run();
        let mut t = Plan {
            services: synthetic_table(300, 3, 0),
            policy: None,
        };
        logged.sync(&t, &Changes::all()).unwrap();
        full.sync(&t, &Changes::all()).unwrap();
        // Nothing changed: nothing to do, without looking at the 300 ports.
        logged.sync(&t, &Changes::none()).unwrap();
        assert_eq!(logged.last_transaction(), "");
        // One port changed, one removed, one added.
        let ports = &mut t.services.ports;
        let ids: Vec<ServicePortId> = ports.keys().take(2).cloned().collect();
        ports.get_mut(&ids[0]).unwrap().cluster_endpoints.pop();
        ports.remove(&ids[1]);
        let added = synthetic_table(1, 3, 300).ports;
        let changes = Changes::service_ports(ids.iter().chain(added.keys()).cloned());
        ports.extend(added);
        let stats = logged.sync(&t, &changes).unwrap();
        full.sync(&t, &Changes::all()).unwrap();
        assert_eq!(stats.changed_ports, 3);
        assert_eq!(logged.last_transaction(), full.last_transaction());
        assert!(!logged.last_transaction().is_empty());
        // After a full plan every port is compared, as before.
        logged.sync(&t, &Changes::all()).unwrap();
        assert_eq!(logged.last_transaction(), "");
    }

    /// A deterministic generator (xorshift64*): variety, and the same failure every run.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// Port `i` of a random shape: UDP or TCP, either family, endpoints that come and go
    /// (local or not), a NodePort, an external IP, session affinity, traffic policies.
    /// Addresses and NodePorts are the port's own, so no two ports contest a key.
    fn random_port(rng: &mut Rng, i: u8) -> ServicePort {
        let family = if rng.chance(30) { Family::V6 } else { Family::V4 };
        let mut p = port(&format!("svc-{i}"), family);
        p.id.protocol = if rng.chance(40) {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        let addr = |net: u8, host: u64| -> IpAddr {
            match family {
                Family::V4 => IpAddr::from([10, net, i, host as u8]),
                Family::V6 => IpAddr::from([0xfd00, u16::from(net), u16::from(i), 0, 0, 0, 0, host as u16]),
            }
        };
        p.cluster_ip = Some(addr(96, 1));
        if rng.chance(40) {
            p.node_port = Some(30000 + u16::from(i));
        }
        if rng.chance(30) {
            p.external_ips = vec![addr(200, 1)];
        }
        if rng.chance(20) {
            p.affinity_seconds = Some(60 + rng.below(3) as u32);
        }
        p.internal_local = rng.chance(20);
        p.external_local = rng.chance(30);
        let mut endpoints: Vec<Endpoint> = (0..rng.below(6))
            .map(|_| Endpoint {
                is_local: rng.chance(50),
                ..ep(&addr(244, 2 + rng.below(8)).to_string(), 8080)
            })
            .collect();
        endpoints.sort();
        endpoints.dedup_by_key(|e| e.ip);
        let local: Vec<Endpoint> = endpoints.iter().filter(|e| e.is_local).cloned().collect();
        let pick = |only_local: bool| {
            if only_local {
                local.clone()
            } else {
                endpoints.clone()
            }
        };
        p.cluster_endpoints = pick(p.internal_local);
        p.external_endpoints = pick(p.external_local);
        if p.internal_local && p.external_local {
            p.short_circuit_endpoints = endpoints.clone();
        }
        p
    }

    /// Random pairs of plans, the second a random edit of the first: a back end told only
    /// the ports that differ ([`crate::changes::diff_ports`], what the change tracker
    /// collects) sends exactly the transactions of one that compares every port.
    #[test]
    fn the_differing_ports_are_all_a_back_end_needs_to_see() {
        use crate::changes::diff_ports;
        for seed in 1..=10u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut named = NftablesBackend::dry_run();
            let mut compared = NftablesBackend::dry_run();
            let mut plan = Plan::default();
            plan.services.settings.cluster_cidrs = vec!["10.244.0.0/16".parse().unwrap()];
            for step in 0..150 {
                let mut next = plan.clone();
                for _ in 0..=rng.below(4) {
                    let i = rng.below(12) as u8;
                    let p = random_port(&mut rng, i);
                    next.services.ports.retain(|id, _| id.name != p.id.name);
                    if rng.chance(80) {
                        next.services.ports.insert(p.id.clone(), p);
                    }
                }
                let changes = Changes::service_ports(diff_ports(
                    plan.services.ports.values(),
                    next.services.ports.values(),
                ));
                let stats = named.sync(&next, &changes).unwrap();
                let expected = compared.sync(&next, &Changes::all()).unwrap();
                assert_eq!(
                    named.last_transaction(),
                    compared.last_transaction(),
                    "seed {seed}, step {step}"
                );
                assert_eq!(
                    (stats.changed_ports, stats.rules),
                    (expected.changed_ports, expected.rules),
                    "seed {seed}, step {step}"
                );
                plan = next;
            }
            assert!(
                plan.services.ports.len() > 3,
                "seed {seed}: the plans stayed small"
            );
        }
    }
}
