//! Maps pinned by an earlier build whose layout differs from this build's.
//!
//! A map is reused from its pin by name (aya opens the pin and checks nothing), so after an
//! upgrade that changed a key or value (e.g. the flow entries gaining a timestamp) the new
//! programs would meet a map of the old shape: the verifier refuses a program that reads
//! past an old, shorter value, and a longer old value would be read wrong. `build.rs`
//! checks C against Rust at build time; this checks the kernel's pinned maps against both
//! at load time, and removes the pins of those that differ, so the load makes them anew.
//! What such a map held is lost: for the flow tables, the connections from outside that
//! were open during the upgrade (connections of Pods and node processes keep working, they
//! are translated once at connect). Maps of the same shape are reused as before.

use std::mem::size_of;
use std::path::Path;

use aya::maps::MapInfo;

use crate::layout;
use crate::maps::{
    AffinityKey, BackendKey, ClientKey, Flow4, Flow6, Nat4Entry, Nat6Entry, NodeConfig, NodeConfig6,
    RangeData, SockAddr, SockKey, Sticky, Svc, SvcKey,
};
use crate::Error;

/// A map's shape as this build's programs define it.
struct Shape {
    name: &'static str,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
}

const fn shape<K, V>(name: &'static str, max_entries: u32) -> Shape {
    Shape {
        name,
        key_size: size_of::<K>(),
        value_size: size_of::<V>(),
        max_entries,
    }
}

/// Every map of the objects (the same names as [`crate::MAPS`]).
const SHAPES: [Shape; 13] = [
    shape::<SvcKey, Svc>("ferry_services", layout::MAX_SERVICES),
    shape::<BackendKey, SockAddr>("ferry_backends", layout::MAX_BACKENDS),
    shape::<SockKey, SockAddr>("ferry_revnat", layout::MAX_SOCKETS),
    shape::<SockKey, Sticky>("ferry_udp_sticky", layout::MAX_SOCKETS),
    shape::<AffinityKey, Sticky>("ferry_affinity", layout::MAX_AFFINITY),
    shape::<Flow4, Nat4Entry>("ferry_nat4", layout::MAX_NAT_FLOWS),
    shape::<u32, NodeConfig>("ferry_node_config", 1),
    shape::<aya::maps::lpm_trie::Key<RangeData>, u8>("ferry_source_ranges", layout::MAX_SOURCE_RANGES),
    shape::<ClientKey, Sticky>("ferry_client_affinity", layout::MAX_AFFINITY),
    shape::<Flow6, Nat6Entry>("ferry_nat6", layout::MAX_NAT_FLOWS),
    shape::<u32, NodeConfig6>("ferry_node_config6", 1),
    shape::<u32, u32>("ferry_affinity_group", layout::MAX_SERVICES),
    // Socket storage: an int key (the socket fd, in user space), `struct ferry_sock_peer`
    // (endpoint, frontend); no capacity (it grows with the sockets).
    shape::<i32, [SockAddr; 2]>("ferry_sock_peer", 0),
];

/// Removes the pins under `maps_dir` of maps whose key size, value size or capacity differ
/// from this build's, and returns their names. A pin that cannot be read is left for the
/// load to report.
pub(crate) fn remove_changed(maps_dir: &Path) -> Result<Vec<&'static str>, Error> {
    let mut removed = Vec::new();
    for s in &SHAPES {
        let path = maps_dir.join(s.name);
        let Ok(info) = MapInfo::from_pin(&path) else {
            continue;
        };
        let same = info.key_size() as usize == s.key_size
            && info.value_size() as usize == s.value_size
            && info.max_entries() == s.max_entries;
        if !same {
            std::fs::remove_file(&path).map_err(|source| Error::PinDir { path, source })?;
            removed.push(s.name);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_map_has_a_shape() {
        let shaped: Vec<&str> = super::SHAPES.iter().map(|s| s.name).collect();
        let mut all = crate::MAPS.to_vec();
        all.sort();
        let mut shaped_sorted = shaped.clone();
        shaped_sorted.sort();
        assert_eq!(shaped_sorted, all);
    }
}
