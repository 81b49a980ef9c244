//! The back end itself: what it applied, and each sync as named steps from a new plan to
//! one transaction (see "Sync", "Restart" and "Conntrack" in the module docs of [`super`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::time::Instant;

use super::names::TABLE;
use super::render::{
    base_rules, base_sets, hairpin_element, render_base, render_port, PortObjects, RenderCtx, BASE_CHAINS,
    FAMILIES, HELPER_CHAINS,
};
use super::rules::{Element, Key, SetKind};
use super::slots::{slots_needed, Slot, SlotAllocator};
use super::transaction::{ops_text, Op, Tx};
use crate::backend::{Backend, BackendError, SyncStats};
use crate::changes::{stale_udp_flows, Changes, ServiceChanges};
use crate::conntrack;
use crate::nft;
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
        if self.dry_run {
            return Ok(false);
        }
        let tables = self.socket()?.list_tables().map_err(|source| {
            self.socket = None;
            BackendError::Socket {
                what: "listing the inet tables".into(),
                source,
            }
        })?;
        Ok(tables.iter().any(|t| t == TABLE))
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

    /// Sends `ops` as one transaction.
    fn commit(&mut self, ops: &[Op]) -> Result<(), BackendError> {
        if self.dry_run {
            return Ok(());
        }
        let mut batch = nft::Batch::new(TABLE);
        for op in ops {
            op.lower(&mut batch);
        }
        self.send(&batch, "nftables transaction failed, nothing applied")
    }

    /// Writes the base layout: table, base and helper chains (flushed and refilled), maps
    /// and sets (the cluster-cidrs and nodeport-ips sets flushed and refilled: they follow
    /// the node settings; the other maps and sets keep their elements).
    fn write_base(tx: &mut Tx, settings: &NodeSettings) {
        let h = &mut tx.head;
        h.push(Op::AddTable);
        for (name, kind, hook, prio) in BASE_CHAINS {
            h.push(Op::AddChain(name.into(), Some((kind, hook, prio))));
        }
        for name in HELPER_CHAINS {
            h.push(Op::AddChain(name.into(), None));
        }
        for f in FAMILIES {
            for set in base_sets(f) {
                let flush = matches!(set.kind, SetKind::Cidrs(_));
                h.push(Op::AddSet(set.clone()));
                if flush {
                    h.push(Op::FlushSet(set));
                }
            }
        }
        let (chains, elements) = render_base(settings);
        for (name, rules) in &chains {
            tx.fill_chain(name, rules, true);
        }
        for e in &elements {
            tx.add_element(e);
        }
        tx.commands += 1;
    }

    fn sync_inner(
        &mut self,
        table: &ServiceTable,
        changes: &ServiceChanges,
    ) -> Result<SyncStats, BackendError> {
        let start = Instant::now();
        let ctx = RenderCtx::of(&table.settings);
        let mut tx = Tx::default();
        let first = self.state.is_none();
        let mut state = self.state.take().unwrap_or_default();
        // What the applied objects were rendered with.
        let old_ctx = RenderCtx::of(&state.settings);

        if first {
            // Whatever an earlier run left is replaced in the same transaction (see
            // "Restart" in the module docs).
            if self.table_exists()? {
                tx.head.push(Op::DelTable);
            }
            Self::write_base(&mut tx, &table.settings);
            state.settings = table.settings.clone();
            state.rules = base_rules(&table.settings);
        }
        let settings_changed = !first && state.settings != table.settings;
        let ctx_changed = settings_changed && RenderCtx::of(&state.settings) != ctx;
        if settings_changed {
            Self::write_base(&mut tx, &table.settings);
            state.settings = table.settings.clone();
        }

        // Which ports to look at: those the table's change log names (and the blocked ones),
        // or all of them when there is no log or everything must be re-rendered.
        let mut changed: Vec<&ServicePort> = Vec::new();
        let mut removed: Vec<ServicePortId> = Vec::new();
        let is_changed = |id: &ServicePortId, port: &ServicePort| match state.ports.get(id) {
            Some(old) => old.port != *port || ctx_changed || state.blocked.contains(id),
            None => true,
        };
        match changes {
            ServiceChanges::Ports(log) if !first && !ctx_changed => {
                for id in log
                    .iter()
                    .chain(state.blocked.iter().filter(|id| !log.contains(*id)))
                {
                    match table.ports.get(id) {
                        Some(port) if is_changed(id, port) => changed.push(port),
                        Some(_) => {}
                        None if state.ports.contains_key(id) => removed.push(id.clone()),
                        None => {}
                    }
                }
            }
            _ => {
                changed.extend(
                    table
                        .ports
                        .iter()
                        .filter(|(id, p)| is_changed(id, p))
                        .map(|(_, p)| p),
                );
                removed.extend(
                    state
                        .ports
                        .keys()
                        .filter(|id| !table.ports.contains_key(*id))
                        .cloned(),
                );
            }
        }
        let changed_ports = changed.len() + removed.len();

        // Render the changed ports; release the keys of everything that changes first, so a
        // key moving from one port to another in this sync is not taken for a conflict.
        let mut rendered: Vec<(&ServicePort, Slot, PortObjects)> = Vec::with_capacity(changed.len());
        for p in &changed {
            let old = state.ports.get(&p.id).map(|a| a.slot);
            let slot = state.slots.fit(&p.id, slots_needed(p), old)?;
            rendered.push((*p, slot, render_port(p, ctx, slot)));
        }
        for id in &removed {
            if let Some(old) = state.ports.get(id) {
                state.slots.give_back(id, old.slot);
            }
        }
        let mut stale_udp: Vec<conntrack::UdpFlowFilter> = Vec::new();
        let mut olds: HashMap<ServicePortId, (AppliedPort, PortObjects)> = HashMap::new();
        for id in changed.iter().map(|p| &p.id).chain(&removed) {
            if let Some(old) = state.ports.remove(id) {
                let objects = old.objects(old_ctx);
                for e in objects.elements.iter().filter(|e| contested(&e.map)) {
                    state.owners.remove(&(e.map.clone(), e.key.clone()));
                }
                olds.insert(id.clone(), (old, objects));
            }
        }
        let mut skipped: HashMap<ServicePortId, Vec<Element>> = HashMap::new();
        for (port, _, objects) in &mut rendered {
            state.blocked.remove(&port.id);
            let mut kept = BTreeSet::new();
            for e in std::mem::take(&mut objects.elements) {
                if !contested(&e.map) {
                    kept.insert(e);
                    continue;
                }
                let key = (e.map.clone(), e.key.clone());
                match state.owners.get(&key) {
                    Some(owner) if *owner != port.id => {
                        tracing::warn!(
                            "{}: {} {} is already used by {owner}; skipped until that is resolved",
                            port.id,
                            e.map,
                            e.key
                        );
                        state.blocked.insert(port.id.clone());
                        skipped.entry(port.id.clone()).or_default().push(e);
                    }
                    _ => {
                        state.owners.insert(key, port.id.clone());
                        kept.insert(e);
                    }
                }
            }
            objects.elements = kept;
        }

        let empty = PortObjects::default();
        let mut hairpin_add: BTreeSet<IpAddr> = BTreeSet::new();
        let mut hairpin_del: BTreeSet<IpAddr> = BTreeSet::new();
        let mut diff = |tx: &mut Tx, old: &PortObjects, new: &PortObjects, state: &mut Applied| {
            for (name, decl) in &new.sets {
                if !old.sets.contains_key(name) {
                    tx.add_sets.push(Op::AddSet(decl.clone()));
                    tx.commands += 1;
                }
            }
            for (name, rules) in &new.chains {
                match old.chains.get(name) {
                    None => {
                        tx.add_chains.push(Op::AddChain(name.clone(), None));
                        tx.commands += 1;
                        tx.fill_new_chain(name, rules);
                    }
                    Some(old_rules) if old_rules != rules => tx.fill_chain(name, rules, true),
                    Some(_) => {}
                }
            }
            for e in &old.elements {
                if !new.elements.contains(e) {
                    tx.del_element(e);
                }
            }
            for e in &new.elements {
                if !old.elements.contains(e) {
                    tx.add_element(e);
                }
            }
            for name in old.chains.keys() {
                if !new.chains.contains_key(name) {
                    tx.del_chains.push(name.clone());
                    tx.commands += 1;
                }
            }
            for name in old.sets.keys() {
                if !new.sets.contains_key(name) {
                    tx.del_sets.push(Op::DelSet(name.clone()));
                    tx.commands += 1;
                }
            }
            for ip in old.endpoint_ips.difference(&new.endpoint_ips) {
                let n = state.hairpin.entry(*ip).or_default();
                *n = n.saturating_sub(1);
                if *n == 0 {
                    state.hairpin.remove(ip);
                    if !hairpin_add.remove(ip) {
                        hairpin_del.insert(*ip);
                    }
                }
            }
            for ip in new.endpoint_ips.difference(&old.endpoint_ips) {
                let n = state.hairpin.entry(*ip).or_default();
                *n += 1;
                if *n == 1 && !hairpin_del.remove(ip) {
                    hairpin_add.insert(*ip);
                }
            }
            state.rules = state.rules + new.rules() - old.rules();
        };

        for (port, _, objects) in &rendered {
            let old = olds.get(&port.id);
            diff(&mut tx, old.map_or(&empty, |(_, o)| o), objects, &mut state);
            if let Some((old, _)) = old {
                stale_udp.extend(stale_udp_flows(&old.port, Some(port)));
            }
        }
        for id in &removed {
            if let Some((old, objects)) = olds.get(id) {
                diff(&mut tx, objects, &empty, &mut state);
                stale_udp.extend(stale_udp_flows(&old.port, None));
            }
        }
        for ip in &hairpin_add {
            tx.add_element(&hairpin_element(*ip));
        }
        for ip in &hairpin_del {
            tx.del_element(&hairpin_element(*ip));
        }
        for (port, slot, _) in rendered {
            state.ports.insert(
                port.id.clone(),
                AppliedPort {
                    port: port.clone(),
                    slot,
                    skipped: skipped.remove(&port.id).unwrap_or_default(),
                },
            );
        }

        if tx.is_empty() {
            self.last_transaction.clear();
            self.state = Some(state);
            return Ok(SyncStats {
                changed_ports,
                rules: self.rules(),
                apply_time: start.elapsed(),
            });
        }
        let ops = tx.into_ops();
        let result = self.commit(&ops);
        self.last_transaction = ops_text(&ops);
        match result {
            Ok(_) => {
                self.state = Some(state);
            }
            Err(e) => {
                // Nothing was applied (a transaction is all or nothing); start over from
                // what the kernel holds next time.
                self.state = None;
                return Err(e);
            }
        }
        if self.conntrack && !stale_udp.is_empty() {
            let ct = match self.ct.take() {
                Some(ct) => Ok(ct),
                None => conntrack::Conntrack::open(),
            };
            match ct.and_then(|mut ct| ct.delete_udp_flows(&stale_udp).map(|_| ct)) {
                Ok(ct) => self.ct = Some(ct),
                Err(e) => tracing::warn!("clearing conntrack entries of removed UDP endpoints: {e}"),
            }
        }
        Ok(SyncStats {
            changed_ports,
            rules: self.rules(),
            apply_time: start.elapsed(),
        })
    }

    fn rules(&self) -> usize {
        self.state.as_ref().map_or(0, |s| s.rules)
    }
}

impl Backend for NftablesBackend {
    fn sync(&mut self, plan: &Plan, changes: &Changes) -> Result<SyncStats, BackendError> {
        self.sync_inner(&plan.services, &changes.services)
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        self.state = None;
        if self.dry_run {
            return Ok(());
        }
        if !self.table_exists()? {
            return Ok(());
        }
        let mut batch = nft::Batch::new(TABLE);
        batch.delete_table();
        self.send(&batch, &format!("deleting table inet {TABLE}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nftables::names::port_base_name;
    use crate::backend::nftables::render::tests::{ep, port};
    use crate::backend::nftables::synthetic_table;
    use crate::plan::Family;

    /// A sync that compares every port, as after a full plan.
    fn sync_all(backend: &mut NftablesBackend, t: &ServiceTable) -> Result<SyncStats, BackendError> {
        backend.sync(&Plan { services: t.clone() }, &Changes::all())
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
}
