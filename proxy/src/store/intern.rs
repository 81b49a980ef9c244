//! Shared strings: the same namespace, node name or label appears on thousands of
//! objects, and each copy of a `String` costs its own allocation. Converting an object
//! for the store interns those strings, so every object holding "kube-system" holds the
//! same `Arc<str>`.
//!
//! One table for the process, not one per store: objects are converted by the sources (on
//! the watchers' tasks, or the manifests reader's thread) before any store sees them, and
//! the manifests source keeps the objects it sent, sharing them with the store. Strings no
//! object holds any more are dropped when the table has doubled since the last sweep, so
//! its size follows what the cluster holds now, not everything it ever held.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex};

/// Sweeps never run below this size: a small table costs nothing to keep.
const MIN_SWEEP_SIZE: usize = 1024;

struct Strings {
    set: HashSet<Arc<str>>,
    /// The size at which the next insertion first sweeps unused strings.
    sweep_at: usize,
}

impl Strings {
    fn new() -> Strings {
        Strings {
            set: HashSet::new(),
            sweep_at: MIN_SWEEP_SIZE,
        }
    }

    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.set.get(s) {
            return shared.clone();
        }
        if self.set.len() >= self.sweep_at {
            // Held only by the table: no object uses it any more.
            self.set.retain(|shared| Arc::strong_count(shared) > 1);
            self.sweep_at = (self.set.len() * 2).max(MIN_SWEEP_SIZE);
        }
        let shared: Arc<str> = Arc::from(s);
        self.set.insert(shared.clone());
        shared
    }
}

static STRINGS: LazyLock<Mutex<Strings>> = LazyLock::new(|| Mutex::new(Strings::new()));

/// The shared copy of `s`.
pub fn intern(s: &str) -> Arc<str> {
    // A poisoned lock only means another thread panicked while inserting: the set is
    // still a valid set.
    STRINGS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .intern(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_share_one_allocation() {
        let a = intern("intern-test-namespace");
        let b = intern(&String::from("intern-test-namespace"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "intern-test-namespace");
        assert!(!Arc::ptr_eq(&a, &intern("intern-test-other")));
    }

    #[test]
    fn unused_strings_are_swept() {
        let mut strings = Strings::new();
        let kept = strings.intern("kept");
        for i in 0..3 * MIN_SWEEP_SIZE {
            strings.intern(&format!("dropped-{i}"));
        }
        // Swept at MIN_SWEEP_SIZE and again at twice the survivors (or the minimum).
        assert!(strings.set.len() <= 2 * MIN_SWEEP_SIZE, "{}", strings.set.len());
        assert!(!strings.set.contains("dropped-0"));
        assert!(Arc::ptr_eq(&kept, &strings.intern("kept")));
    }
}
