//! The steps of a policy transaction, each with its nft text and its netlink messages.

use std::fmt;
use std::sync::Arc;

use super::render::{map_body, map_spec, Direction, MapElement, PeerSet, PolicyRule, FORWARD, T, TABLE};
use crate::nft;
use crate::plan::Family;

/// One step.
#[derive(Debug, Clone)]
pub enum PolicyOp {
    /// `--network-policy=false`, or `cleanup`: the whole table goes.
    DelTable,
    AddTable,
    /// The base chain on `forward`, priority 0.
    AddBaseChain,
    FlushChain(String),
    AddMap(Direction, Family),
    /// Only at the first sync over a table an earlier process left: its elements are not
    /// read back; the refill follows in the same transaction.
    FlushMap(Direction, Family),
    /// A new set, with its elements.
    AddSet(Arc<PeerSet>),
    /// Every element of a set found in the kernel (a new process does not read them);
    /// the refill follows in the same transaction.
    FlushSet(String),
    /// These ranges join an existing set.
    AddSetElements(Arc<PeerSet>),
    /// These ranges leave an existing set (each exactly as it was added).
    DelSetElements(Arc<PeerSet>),
    AddChain(String),
    AddRule(String, PolicyRule),
    DelElements(String, Vec<MapElement>),
    AddElements(String, Vec<MapElement>),
    DelChain(String),
    DelSet(String),
}

impl fmt::Display for PolicyOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = |e: &[MapElement]| e.iter().map(|e| e.ip.to_string()).collect::<Vec<_>>().join(", ");
        let all = |e: &[MapElement]| e.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", ");
        match self {
            PolicyOp::DelTable => write!(f, "delete table {T}"),
            PolicyOp::AddTable => write!(f, "add table {T}"),
            PolicyOp::AddBaseChain => write!(
                f,
                "add chain {T} {FORWARD} {{ type filter hook forward priority 0; policy accept; }}"
            ),
            PolicyOp::FlushChain(c) => write!(f, "flush chain {T} {c}"),
            PolicyOp::AddMap(d, fam) => write!(f, "add map {T} {} {{ {} }}", d.map(*fam), map_body(*fam)),
            PolicyOp::FlushMap(d, fam) => write!(f, "flush map {T} {}", d.map(*fam)),
            PolicyOp::AddSet(s) => {
                write!(f, "add set {T} {} {{ {} }}", s.name, s.body())?;
                write!(f, "\nadd element {T} {} {{ {} }}", s.name, s.elements_text())
            }
            PolicyOp::FlushSet(s) => write!(f, "flush set {T} {s}"),
            PolicyOp::AddSetElements(s) => {
                write!(f, "add element {T} {} {{ {} }}", s.name, s.elements_text())
            }
            PolicyOp::DelSetElements(s) => {
                write!(f, "delete element {T} {} {{ {} }}", s.name, s.elements_text())
            }
            PolicyOp::AddChain(c) => write!(f, "add chain {T} {c}"),
            PolicyOp::AddRule(c, r) => write!(f, "add rule {T} {c} {r}"),
            PolicyOp::DelElements(m, e) => write!(f, "delete element {T} {m} {{ {} }}", keys(e)),
            PolicyOp::AddElements(m, e) => write!(f, "add element {T} {m} {{ {} }}", all(e)),
            PolicyOp::DelChain(c) => write!(f, "delete chain {T} {c}"),
            PolicyOp::DelSet(s) => write!(f, "delete set {T} {s}"),
        }
    }
}

impl PolicyOp {
    /// Appends the step's messages to `batch`, on the policy table (the batch may hold
    /// another table's steps before: one transaction).
    pub fn lower(&self, batch: &mut nft::Batch) {
        batch.use_table(nft::TableFamily::Inet, TABLE);
        match self {
            PolicyOp::DelTable => batch.delete_table(),
            PolicyOp::AddTable => batch.add_table(),
            PolicyOp::AddBaseChain => batch.add_chain(
                FORWARD,
                Some(&nft::BaseChain {
                    kind: nft::ChainType::Filter,
                    hook: nft::Hook::Forward,
                    priority: 0,
                }),
            ),
            PolicyOp::FlushChain(c) => batch.flush_chain(c),
            PolicyOp::AddMap(d, fam) => batch.add_set(&map_spec(*d, *fam)),
            PolicyOp::FlushMap(d, fam) => batch.flush_set(&d.map(*fam)),
            PolicyOp::AddSet(s) => {
                batch.add_set(&s.spec());
                batch.add_elements(&s.name, &s.elements());
            }
            PolicyOp::FlushSet(s) => batch.flush_set(s),
            PolicyOp::AddSetElements(s) => batch.add_elements(&s.name, &s.elements()),
            PolicyOp::DelSetElements(s) => batch.delete_elements(&s.name, &s.elements()),
            PolicyOp::AddChain(c) => batch.add_chain(c, None),
            PolicyOp::AddRule(c, r) => batch.add_rule(c, &r.exprs()),
            PolicyOp::DelElements(m, e) => {
                let e: Vec<nft::Element> = e.iter().map(MapElement::to_nft).collect();
                batch.delete_elements(m, &e);
            }
            PolicyOp::AddElements(m, e) => {
                let e: Vec<nft::Element> = e.iter().map(MapElement::to_nft).collect();
                batch.add_elements(m, &e);
            }
            PolicyOp::DelChain(c) => batch.delete_chain(c),
            PolicyOp::DelSet(s) => batch.delete_set(s),
        }
    }
}

/// The steps as nft commands, one per line; a summary line above
/// [`MAX_LOGGED_OPS`] steps (a full sync at 1,000 policies is megabytes of text).
pub const MAX_LOGGED_OPS: usize = 5_000;

pub fn ops_text(ops: &[PolicyOp]) -> String {
    if ops.len() > MAX_LOGGED_OPS {
        let count = |f: fn(&PolicyOp) -> bool| ops.iter().filter(|o| f(o)).count();
        return format!(
            "# {} policy steps, not written out (more than {MAX_LOGGED_OPS}): {} chains, {} rules, {} sets added\n",
            ops.len(),
            count(|o| matches!(o, PolicyOp::AddChain(_))),
            count(|o| matches!(o, PolicyOp::AddRule(..))),
            count(|o| matches!(o, PolicyOp::AddSet(_))),
        );
    }
    ops.iter().map(|op| format!("{op}\n")).collect()
}
