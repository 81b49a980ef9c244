//! The endpoint maps' keys: which map a port's endpoints go to, and which keys of it
//! (see "Endpoint maps" in the module docs of [`super`]).

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::names::{endpoint_map, port_base_name};
use crate::backend::BackendError;
use crate::plan::{Family, Protocol, ServicePort, ServicePortId};

/// Endpoint maps per family and protocol (see "Endpoint maps" in the module docs).
pub const ENDPOINT_MAPS: u32 = 32;

/// Where a port's endpoints sit in the endpoint maps: map `endpoints-<v4|v6>-<shard>`,
/// keys `offset .. offset + capacity` (the cluster endpoints first, then the external ones
/// when they have a chain of their own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot {
    pub(super) shard: u32,
    pub(super) offset: u32,
    pub(super) capacity: u32,
}

/// The endpoint map of a port, fixed by its identity (so a port keeps its map for life).
pub(super) fn endpoint_shard(id: &ServicePortId) -> u32 {
    let digest = Sha256::digest(port_base_name(id).as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % ENDPOINT_MAPS
}

/// How many keys a port needs in its endpoint map. Ports with session affinity need none:
/// their choice must also record the client per endpoint, so it stays one rule per
/// endpoint.
pub(super) fn slots_needed(p: &ServicePort) -> u32 {
    if p.affinity_seconds.is_some() {
        0
    } else {
        (p.cluster_endpoints.len() + p.external_endpoints.len() + p.short_circuit_endpoints.len()) as u32
    }
}

/// One endpoint map: family, protocol, shard.
pub(super) type EndpointMapId = (Family, Protocol, u32);

/// Hands out key ranges of the endpoint maps. Capacities are powers of two (at least 4),
/// so a range freed by one port is reused by the next port of the same size class.
#[derive(Debug, Default)]
pub(super) struct SlotAllocator {
    /// Endpoint map -> the first key never handed out.
    next: HashMap<EndpointMapId, u32>,
    /// (endpoint map, capacity) -> freed offsets.
    free: HashMap<(EndpointMapId, u32), Vec<u32>>,
}

impl SlotAllocator {
    /// A slot for `needed` keys in `shard`: `old` when it is big enough, else a new one
    /// (and `old` goes back).
    pub(super) fn fit(
        &mut self,
        id: &ServicePortId,
        needed: u32,
        old: Option<Slot>,
    ) -> Result<Slot, BackendError> {
        let shard = endpoint_shard(id);
        if let Some(old) = old {
            if old.capacity >= needed && (needed > 0 || old.capacity == 0) {
                return Ok(old);
            }
            self.give_back(id, old);
        }
        let map = (id.family, id.protocol, shard);
        if needed == 0 {
            return Ok(Slot {
                shard,
                offset: 0,
                capacity: 0,
            });
        }
        let capacity = needed.next_power_of_two().max(4);
        if let Some(offset) = self.free.get_mut(&(map, capacity)).and_then(Vec::pop) {
            return Ok(Slot {
                shard,
                offset,
                capacity,
            });
        }
        let next = self.next.entry(map).or_default();
        let offset = *next;
        *next = offset
            .checked_add(capacity)
            .ok_or_else(|| BackendError::Exhausted {
                what: format!(
                    "the keys of endpoint map {} are used up; restart ferry-proxy to renumber",
                    endpoint_map(id.family, id.protocol, shard)
                ),
            })?;
        Ok(Slot {
            shard,
            offset,
            capacity,
        })
    }

    pub(super) fn give_back(&mut self, id: &ServicePortId, slot: Slot) {
        if slot.capacity > 0 {
            self.free
                .entry(((id.family, id.protocol, slot.shard), slot.capacity))
                .or_default()
                .push(slot.offset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nftables::render::tests::port;

    #[test]
    fn endpoint_slots_grow_by_powers_of_two_and_are_reused() {
        let id = port("web", Family::V4).id;
        let mut slots = SlotAllocator::default();
        let a = slots.fit(&id, 3, None).unwrap();
        assert_eq!((a.offset, a.capacity), (0, 4));
        // Still fits: kept.
        assert_eq!(slots.fit(&id, 4, Some(a)).unwrap(), a);
        // Outgrown: a new range, the old one freed and handed to the next port of its size.
        let b = slots.fit(&id, 5, Some(a)).unwrap();
        assert_eq!((b.offset, b.capacity), (4, 8));
        let other = port("api", Family::V4).id;
        let c = slots.fit(&other, 2, None).unwrap();
        if endpoint_shard(&other) == endpoint_shard(&id) {
            assert_eq!((c.offset, c.capacity), (0, 4));
        }
        // No endpoints (or session affinity): no keys.
        let d = slots.fit(&id, 0, Some(b)).unwrap();
        assert_eq!(d.capacity, 0);
        assert_eq!(slots.fit(&id, 8, Some(d)).unwrap().offset, 4);
    }
}
