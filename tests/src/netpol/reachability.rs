//! Upstream's expectations, written the way upstream writes them, and its truth tables.
//!
//! Upstream starts every probe from "everything connects" (`NewReachability(pods, true)`)
//! and then states exceptions in order, later ones overriding earlier ones:
//! `ExpectPeer(from, to, bool)` over namespace/pod patterns, `ExpectAllIngress(pod, bool)`
//! (every source to `pod`), `ExpectAllEgress(pod, bool)` (`pod` to every destination) and
//! `Expect(from, to, bool)` for one pair. [`Reachability`] keeps those statements as data
//! and expands them over the nine pods.
//!
//! Upstream ignores the diagonal (`ignoreLoopback = true`: a pod reaching itself is left
//! out of pass/fail, because plugins disagree on it). The tables here still fill the
//! diagonal from the statements, and for every transcribed case the oracle agrees with
//! them there too (the unit tests count the diagonal). [`TruthTable::mismatches`] lets
//! an end-to-end test leave it out as upstream does: a pod reaching its own address
//! never leaves its network namespace, so no node-level rule sees it.

use std::fmt;

use super::cluster::pod_keys;

/// Whether upstream counts a pod reaching itself (it does not).
pub const UPSTREAM_IGNORES_LOOPBACK: bool = true;

/// A set of pods as upstream's `Peer{Namespace, Pod}` names it: `x/*`, `*/a`, `*/*`, `x/a`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerPattern {
    namespace: Option<&'static str>,
    pod: Option<&'static str>,
}

impl PeerPattern {
    /// Parses `ns/pod` where either side may be `*`.
    pub fn parse(text: &'static str) -> PeerPattern {
        let (namespace, pod) = text
            .split_once('/')
            .unwrap_or_else(|| panic!("peer pattern {text:?} must look like x/a, x/* or */*"));
        let part = |s: &'static str| if s == "*" { None } else { Some(s) };
        PeerPattern {
            namespace: part(namespace),
            pod: part(pod),
        }
    }

    fn matches(&self, pod_key: &str) -> bool {
        let (namespace, pod) = pod_key.split_once('/').unwrap_or((pod_key, ""));
        self.namespace.is_none_or(|n| n == namespace) && self.pod.is_none_or(|p| p == pod)
    }
}

impl fmt::Display for PeerPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace.unwrap_or("*"), self.pod.unwrap_or("*"))
    }
}

/// One of upstream's statements over the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delta {
    /// `ExpectPeer(from, to, allowed)`.
    Peer {
        from: PeerPattern,
        to: PeerPattern,
        allowed: bool,
    },
    /// `ExpectAllIngress(to, allowed)`: every pod to `to`.
    AllIngress { to: &'static str, allowed: bool },
    /// `ExpectAllEgress(from, allowed)`: `from` to every pod.
    AllEgress { from: &'static str, allowed: bool },
    /// `Expect(from, to, allowed)`: one pair.
    Pair {
        from: &'static str,
        to: &'static str,
        allowed: bool,
    },
}

impl Delta {
    fn covers(&self, from: &str, to: &str) -> Option<bool> {
        let (hit, allowed) = match *self {
            Delta::Peer {
                from: f,
                to: t,
                allowed,
            } => (f.matches(from) && t.matches(to), allowed),
            Delta::AllIngress { to: t, allowed } => (t == to, allowed),
            Delta::AllEgress { from: f, allowed } => (f == from, allowed),
            Delta::Pair {
                from: f,
                to: t,
                allowed,
            } => (f == from && t == to, allowed),
        };
        hit.then_some(allowed)
    }
}

/// Upstream's expected reachability for one probe: everything connects, except...
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reachability {
    pub deltas: Vec<Delta>,
}

impl Reachability {
    /// Everything connects (upstream's `NewReachability(pods, true)` with nothing more).
    pub fn all() -> Reachability {
        Reachability::default()
    }

    pub fn peer(mut self, from: &'static str, to: &'static str, allowed: bool) -> Self {
        self.deltas.push(Delta::Peer {
            from: PeerPattern::parse(from),
            to: PeerPattern::parse(to),
            allowed,
        });
        self
    }

    pub fn all_ingress(mut self, to: &'static str, allowed: bool) -> Self {
        self.deltas.push(Delta::AllIngress { to, allowed });
        self
    }

    pub fn all_egress(mut self, from: &'static str, allowed: bool) -> Self {
        self.deltas.push(Delta::AllEgress { from, allowed });
        self
    }

    pub fn pair(mut self, from: &'static str, to: &'static str, allowed: bool) -> Self {
        self.deltas.push(Delta::Pair { from, to, allowed });
        self
    }

    /// Whether upstream expects `from` to reach `to`: the last statement that covers the
    /// pair wins, and the default is that it connects.
    pub fn expects(&self, from: &str, to: &str) -> bool {
        self.deltas
            .iter()
            .rev()
            .find_map(|delta| delta.covers(from, to))
            .unwrap_or(true)
    }

    pub fn truth_table(&self) -> TruthTable {
        TruthTable::from_fn(|from, to| self.expects(from, to))
    }
}

/// A 9x9 grid of "does `from` (row) reach `to` (column)".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TruthTable {
    pub pods: Vec<String>,
    /// `cells[row][column]`.
    pub cells: Vec<Vec<bool>>,
}

impl TruthTable {
    pub fn from_fn(mut connects: impl FnMut(&str, &str) -> bool) -> TruthTable {
        let pods = pod_keys();
        let cells = pods
            .iter()
            .map(|from| pods.iter().map(|to| connects(from, to)).collect())
            .collect();
        TruthTable { pods, cells }
    }

    /// The pairs where the two tables differ, as `(from, to)`; the diagonal only when
    /// `count_loopback`.
    pub fn mismatches(&self, other: &TruthTable, count_loopback: bool) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (row, from) in self.pods.iter().enumerate() {
            for (column, to) in self.pods.iter().enumerate() {
                if row == column && !count_loopback {
                    continue;
                }
                if self.cells[row][column] != other.cells[row][column] {
                    out.push((from.clone(), to.clone()));
                }
            }
        }
        out
    }

    /// The three grids upstream logs when a probe fails: expected (`self`), observed, and
    /// their comparison, each under its heading.
    pub fn report(&self, observed: &TruthTable) -> String {
        format!(
            "expected:\n{self}\nobserved:\n{observed}\ncomparison:\n{}",
            self.comparison(observed)
        )
    }

    /// Upstream's "comparison" grid: `.` where the tables agree, `X` where they differ.
    pub fn comparison(&self, other: &TruthTable) -> TruthTable {
        let cells = self
            .cells
            .iter()
            .zip(&other.cells)
            .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x == y).collect())
            .collect();
        TruthTable {
            pods: self.pods.clone(),
            cells,
        }
    }
}

/// Upstream's layout: a header row of destinations, one row per source, `.` for
/// "connects" and `X` for "blocked", tab-separated.
impl fmt::Display for TruthTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-")?;
        for pod in &self.pods {
            write!(f, "\t{pod}")?;
        }
        writeln!(f)?;
        for (from, row) in self.pods.iter().zip(&self.cells) {
            write!(f, "{from}")?;
            for connects in row {
                write!(f, "\t{}", if *connects { "." } else { "X" })?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
