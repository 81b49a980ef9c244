//! `loadBalancerSourceRanges` in the `ferry_source_ranges` LPM trie: one entry per
//! (Service id, range), which the tc program looks a new flow's source up in when the
//! frontend carries `FERRY_SVC_SOURCE_RANGES`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::MapData;
use ipnetwork::IpNetwork;

use crate::error::map_err;
use crate::maps::{ip_words, words_ip, RangeData};
use crate::Error;

pub(crate) const MAP: &str = "ferry_source_ranges";

pub(crate) type RangeMap = LpmTrie<MapData, RangeData, u8>;

/// The trie key of `range` for Service `id`. The prefix covers the id's 32 bits, then the
/// address: an IPv4 range is stored v4-mapped, so its prefix is 96 bits longer.
fn key(id: u32, range: IpNetwork) -> Key<RangeData> {
    let bits = u32::from(range.prefix()) + if range.is_ipv4() { 96 } else { 0 };
    Key::new(
        32 + bits,
        RangeData {
            svc_id: id,
            ip: ip_words(range.network()),
        },
    )
}

fn range_of(key: &Key<RangeData>) -> Option<(u32, IpNetwork)> {
    let data = key.data();
    let ip = words_ip(data.ip);
    let bits = key.prefix_len().checked_sub(32)?;
    let prefix = match ip {
        IpAddr::V4(_) => bits.checked_sub(96)?,
        IpAddr::V6(_) => bits,
    };
    Some((data.svc_id, IpNetwork::new(ip, u8::try_from(prefix).ok()?).ok()?))
}

/// Writes the ranges of Service `id` in `new` that `old` lacks. Returns the writes made.
///
/// Called before the frontend's entry changes, and [`remove_extra`] after it, so a source
/// allowed before and after is never refused in between.
pub(crate) fn add_missing(
    map: &mut RangeMap,
    id: u32,
    old: &[IpNetwork],
    new: &[IpNetwork],
) -> Result<usize, Error> {
    let mut ops = 0;
    for range in new.iter().filter(|r| !old.contains(r)) {
        map.insert(&key(id, *range), 1u8, 0).map_err(map_err(MAP))?;
        ops += 1;
    }
    Ok(ops)
}

/// Deletes the ranges of Service `id` in `old` that `new` lacks. Returns the deletes made.
pub(crate) fn remove_extra(
    map: &mut RangeMap,
    id: u32,
    old: &[IpNetwork],
    new: &[IpNetwork],
) -> Result<usize, Error> {
    let mut ops = 0;
    for range in old.iter().filter(|r| !new.contains(r)) {
        map.remove(&key(id, *range)).map_err(map_err(MAP))?;
        ops += 1;
    }
    Ok(ops)
}

/// Every Service's ranges, sorted, as the map holds them.
pub(crate) fn read(map: &RangeMap) -> Result<BTreeMap<u32, Vec<IpNetwork>>, Error> {
    let mut out: BTreeMap<u32, Vec<IpNetwork>> = BTreeMap::new();
    for key in map.keys() {
        let key = key.map_err(map_err(MAP))?;
        if let Some((id, range)) = range_of(&key) {
            out.entry(id).or_default().push(range);
        }
    }
    for ranges in out.values_mut() {
        ranges.sort();
    }
    Ok(out)
}

/// `ranges` as programmed: normalised to their network address, sorted, once each.
pub(crate) fn canonical(ranges: &[IpNetwork]) -> Vec<IpNetwork> {
    let set: BTreeSet<IpNetwork> = ranges
        .iter()
        .filter_map(|r| IpNetwork::new(r.network(), r.prefix()).ok())
        .collect();
    set.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_ipv4_prefixes_count_the_mapped_bits() {
        for (text, bits) in [
            ("203.0.113.0/24", 32 + 96 + 24),
            ("2001:db8::/64", 32 + 64),
            ("0.0.0.0/0", 32 + 96),
        ] {
            let range: IpNetwork = text.parse().unwrap();
            let k = key(7, range);
            assert_eq!(k.prefix_len(), bits, "{text}");
            assert_eq!(range_of(&k), Some((7, range)), "{text}");
        }
        assert_eq!(
            canonical(&["10.0.0.9/8".parse().unwrap(), "10.0.0.0/8".parse().unwrap()]),
            vec!["10.0.0.0/8".parse::<IpNetwork>().unwrap()]
        );
    }
}
