//! Transactions: the steps (`Op`) of one nf_tables transaction, kept in the order the
//! kernel needs (see "Sync" in the module docs of [`super`]), each with its nft text (for
//! logs and tests) and its netlink messages.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::elements::{Element, SetDecl, SetKind};
use super::names::{PORT_CHAIN_PREFIXES, T};
use super::render::{base_sets, render_base, PortObjects, BASE_CHAINS, FAMILIES, HELPER_CHAINS};
use super::rules::Rule;
use crate::nft;
use crate::plan::NodeSettings;

/// One step of a transaction.
#[derive(Debug)]
pub(super) enum Op {
    /// Only at the first sync, when an earlier run left the table.
    DelTable,
    AddTable,
    /// A chain; base chains with their type, hook and priority.
    AddChain(String, Option<BaseChain>),
    AddSet(SetDecl),
    FlushSet(SetDecl),
    FlushChain(String),
    AddRule(String, Rule),
    DelElements(String, Vec<Element>),
    AddElements(String, Vec<Element>),
    DelChain(String),
    DelSet(String),
}

/// A base chain: type, hook, priority.
pub(super) type BaseChain = (&'static str, &'static str, i32);

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |elems: &[Element], keys_only: bool| -> String {
            elems
                .iter()
                .map(|e| {
                    if keys_only {
                        e.key.to_string()
                    } else {
                        e.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Op::DelTable => write!(f, "delete table {T}"),
            Op::AddTable => write!(f, "add table {T}"),
            Op::AddChain(name, None) => write!(f, "add chain {T} {name}"),
            Op::AddChain(name, Some((kind, hook, prio))) => write!(
                f,
                "add chain {T} {name} {{ type {kind} hook {hook} priority {prio}; policy accept; }}"
            ),
            Op::AddSet(d) => write!(f, "add {} {T} {} {{ {} }}", d.noun(), d.name, d.body()),
            Op::FlushSet(d) => write!(f, "flush {} {T} {}", d.noun(), d.name),
            Op::FlushChain(name) => write!(f, "flush chain {T} {name}"),
            Op::AddRule(chain, rule) => write!(f, "add rule {T} {chain} {rule}"),
            Op::DelElements(map, e) => write!(f, "delete element {T} {map} {{ {} }}", list(e, true)),
            Op::AddElements(map, e) => write!(f, "add element {T} {map} {{ {} }}", list(e, false)),
            Op::DelChain(name) => write!(f, "delete chain {T} {name}"),
            Op::DelSet(name) => write!(f, "delete set {T} {name}"),
        }
    }
}

impl Op {
    /// Appends the netlink message(s) of this step.
    pub(super) fn lower(&self, batch: &mut nft::Batch) {
        match self {
            Op::DelTable => batch.delete_table(),
            Op::AddTable => batch.add_table(),
            Op::AddChain(name, base) => {
                let base = base.map(|(kind, hook, priority)| nft::BaseChain {
                    kind: match kind {
                        "nat" => nft::ChainType::Nat,
                        _ => nft::ChainType::Filter,
                    },
                    hook: match hook {
                        "prerouting" => nft::Hook::Prerouting,
                        "input" => nft::Hook::Input,
                        "forward" => nft::Hook::Forward,
                        "output" => nft::Hook::Output,
                        _ => nft::Hook::Postrouting,
                    },
                    priority,
                });
                batch.add_chain(name, base.as_ref());
            }
            Op::AddSet(d) => batch.add_set(&d.spec()),
            Op::FlushSet(d) => batch.flush_set(&d.name),
            Op::FlushChain(name) => batch.flush_chain(name),
            Op::AddRule(chain, rule) => batch.add_rule(chain, &rule.exprs()),
            Op::DelElements(map, e) => {
                let e: Vec<nft::Element> = e.iter().map(Element::to_nft).collect();
                batch.delete_elements(map, &e);
            }
            Op::AddElements(map, e) => {
                let e: Vec<nft::Element> = e.iter().map(Element::to_nft).collect();
                batch.add_elements(map, &e);
            }
            Op::DelChain(name) => batch.delete_chain(name),
            Op::DelSet(name) => batch.delete_set(name),
        }
    }
}

/// A transaction being written, in sections that keep the order described in the module
/// docs.
#[derive(Default)]
pub(super) struct Tx {
    head: Vec<Op>,
    add_sets: Vec<Op>,
    add_chains: Vec<Op>,
    new_rules: Vec<Op>,
    del_elements: BTreeMap<String, Vec<Element>>,
    fill: Vec<Op>,
    add_elements: BTreeMap<String, Vec<Element>>,
    del_chains: Vec<String>,
    del_sets: Vec<Op>,
    commands: usize,
}

impl Tx {
    pub(super) fn is_empty(&self) -> bool {
        self.commands == 0
    }

    /// Deletes what an earlier run left, before anything else (see "Restart").
    pub(super) fn delete_table(&mut self) {
        self.head.push(Op::DelTable);
        self.commands += 1;
    }

    /// Writes the base layout: table, base and helper chains (flushed and refilled), maps
    /// and sets (the cluster-cidrs and nodeport-ips sets flushed and refilled: they follow
    /// the node settings; the other maps and sets keep their elements).
    pub(super) fn write_base(&mut self, settings: &NodeSettings) {
        let h = &mut self.head;
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
            self.fill_chain(name, rules, true);
        }
        for e in &elements {
            self.add_element(e);
        }
        self.commands += 1;
    }

    /// Turns a port's objects from `old` into `new` (either empty for a port that comes
    /// or goes): only what differs is written.
    pub(super) fn write_port_diff(&mut self, old: &PortObjects, new: &PortObjects) {
        for (name, decl) in &new.sets {
            if !old.sets.contains_key(name) {
                self.add_sets.push(Op::AddSet(decl.clone()));
                self.commands += 1;
            }
        }
        for (name, rules) in &new.chains {
            match old.chains.get(name) {
                None => {
                    self.add_chains.push(Op::AddChain(name.clone(), None));
                    self.commands += 1;
                    self.fill_new_chain(name, rules);
                }
                Some(old_rules) if old_rules != rules => self.fill_chain(name, rules, true),
                Some(_) => {}
            }
        }
        for e in old.elements.difference(&new.elements) {
            self.del_element(e);
        }
        for e in new.elements.difference(&old.elements) {
            self.add_element(e);
        }
        for name in old.chains.keys() {
            if !new.chains.contains_key(name) {
                self.del_chains.push(name.clone());
                self.commands += 1;
            }
        }
        for name in old.sets.keys() {
            if !new.sets.contains_key(name) {
                self.del_sets.push(Op::DelSet(name.clone()));
                self.commands += 1;
            }
        }
    }

    fn fill_chain(&mut self, name: &str, rules: &[Rule], flush: bool) {
        if flush {
            self.fill.push(Op::FlushChain(name.to_string()));
            self.commands += 1;
        }
        for r in rules {
            self.fill.push(Op::AddRule(name.to_string(), r.clone()));
            self.commands += 1;
        }
    }

    fn fill_new_chain(&mut self, name: &str, rules: &[Rule]) {
        for r in rules {
            self.new_rules.push(Op::AddRule(name.to_string(), r.clone()));
            self.commands += 1;
        }
    }

    pub(super) fn add_element(&mut self, e: &Element) {
        self.add_elements
            .entry(e.map.clone())
            .or_default()
            .push(e.clone());
        self.commands += 1;
    }

    pub(super) fn del_element(&mut self, e: &Element) {
        self.del_elements
            .entry(e.map.clone())
            .or_default()
            .push(e.clone());
        self.commands += 1;
    }

    /// The steps in the order they go to the kernel.
    pub(super) fn into_ops(mut self) -> Vec<Op> {
        let mut ops = std::mem::take(&mut self.head);
        ops.append(&mut self.add_sets);
        ops.append(&mut self.add_chains);
        ops.append(&mut self.new_rules);
        ops.extend(self.del_elements.into_iter().map(|(m, e)| Op::DelElements(m, e)));
        ops.append(&mut self.fill);
        ops.extend(self.add_elements.into_iter().map(|(m, e)| Op::AddElements(m, e)));
        // Chains that jump to others go first.
        let rank = |name: &str| {
            PORT_CHAIN_PREFIXES
                .iter()
                .position(|p| name.starts_with(p))
                .unwrap_or(0)
        };
        self.del_chains.sort_by_key(|c| rank(c));
        ops.extend(self.del_chains.into_iter().map(Op::DelChain));
        ops.append(&mut self.del_sets);
        ops
    }
}

/// The transaction as nft commands, one per line (what `last_transaction` shows).
/// Transactions longer than this are summed up in `last_transaction` instead of written
/// out: the text of a full sync at 10k Services is 10 MB the process would keep for
/// nothing.
pub(super) const MAX_LOGGED_OPS: usize = 5_000;

pub(super) fn ops_text(ops: &[Op]) -> String {
    let mut out = String::new();
    if ops.len() > MAX_LOGGED_OPS {
        let rules = ops.iter().filter(|op| matches!(op, Op::AddRule(..))).count();
        let chains = ops.iter().filter(|op| matches!(op, Op::AddChain(..))).count();
        let elements: usize = ops
            .iter()
            .map(|op| match op {
                Op::AddElements(_, e) => e.len(),
                _ => 0,
            })
            .sum();
        let _ = writeln!(
            out,
            "# {} steps, not written out (more than {MAX_LOGGED_OPS}): {chains} chains added, {rules} rules, {elements} elements",
            ops.len()
        );
        return out;
    }
    for op in ops {
        let _ = writeln!(out, "{op}");
    }
    out
}
