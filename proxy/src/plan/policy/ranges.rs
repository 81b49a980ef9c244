//! Address ranges: `ipBlock`s with their `except`s cut out, and sets of ranges merged
//! into the sorted, disjoint form an nftables interval set accepts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

use super::AddressRange;

/// An address as a number in one space: IPv4 below IPv6, so ranges of both families sort
/// and compare without mixing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Number(u8, u128);

impl Number {
    pub(super) fn of(ip: IpAddr) -> Number {
        match ip {
            IpAddr::V4(v4) => Number(4, u32::from(v4).into()),
            IpAddr::V6(v6) => Number(6, u128::from(v6)),
        }
    }

    fn ip(self) -> IpAddr {
        match self.0 {
            4 => IpAddr::V4(Ipv4Addr::from(self.1 as u32)),
            _ => IpAddr::V6(Ipv6Addr::from(self.1)),
        }
    }
}

fn network_bounds(network: IpNetwork) -> (Number, Number) {
    (
        Number::of(network.network()),
        Number::of(network.broadcast_or_last()),
    )
}

trait LastAddress {
    fn broadcast_or_last(&self) -> IpAddr;
}

impl LastAddress for IpNetwork {
    fn broadcast_or_last(&self) -> IpAddr {
        match self {
            IpNetwork::V4(n) => IpAddr::V4(n.broadcast()),
            IpNetwork::V6(n) => {
                let host_bits = 128 - u32::from(n.prefix());
                let mask = if host_bits == 128 {
                    u128::MAX
                } else {
                    (1u128 << host_bits) - 1
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | mask))
            }
        }
    }
}

/// `cidr` without its `except`s, as ranges.
pub(super) fn block_ranges(cidr: IpNetwork, except: &[IpNetwork]) -> Vec<AddressRange> {
    let mut ranges = vec![network_bounds(cidr)];
    for hole in except {
        let (lo, hi) = network_bounds(*hole);
        ranges = ranges
            .into_iter()
            .flat_map(|(first, last)| {
                let mut kept = Vec::new();
                if hi < first || last < lo {
                    kept.push((first, last));
                } else {
                    if first < lo {
                        kept.push((first, Number(lo.0, lo.1 - 1)));
                    }
                    if hi < last {
                        kept.push((Number(hi.0, hi.1 + 1), last));
                    }
                }
                kept
            })
            .collect();
    }
    ranges
        .into_iter()
        .map(|(first, last)| AddressRange {
            first: first.ip(),
            last: last.ip(),
        })
        .collect()
}

/// Sorts and merges overlapping or adjacent ranges: an nftables interval set refuses
/// overlaps, and a shorter list is a shorter set.
pub(super) fn normalize(ranges: Vec<AddressRange>) -> Vec<AddressRange> {
    let mut numbers: Vec<(Number, Number)> = ranges
        .into_iter()
        .map(|r| (Number::of(r.first), Number::of(r.last)))
        .collect();
    numbers.sort();
    let mut merged: Vec<(Number, Number)> = Vec::with_capacity(numbers.len());
    for (first, last) in numbers {
        match merged.last_mut() {
            Some((_, end)) if end.0 == first.0 && end.1.checked_add(1).is_none_or(|next| next >= first.1) => {
                *end = (*end).max(last);
            }
            _ => merged.push((first, last)),
        }
    }
    merged
        .into_iter()
        .map(|(first, last)| AddressRange {
            first: first.ip(),
            last: last.ip(),
        })
        .collect()
}

/// Takes `ip` out of `ranges` (sorted, disjoint, not adjacent; they stay so): the range
/// holding it is split around it.
pub(super) fn remove_address(ranges: &mut Vec<AddressRange>, ip: IpAddr) {
    let key = Number::of(ip);
    let after = ranges.partition_point(|r| Number::of(r.first) <= key);
    if after == 0 || Number::of(ranges[after - 1].last) < key {
        return;
    }
    let held = ranges[after - 1];
    let mut pieces = Vec::with_capacity(2);
    if Number::of(held.first) < key {
        pieces.push(AddressRange {
            first: held.first,
            last: Number(key.0, key.1 - 1).ip(),
        });
    }
    if key < Number::of(held.last) {
        pieces.push(AddressRange {
            first: Number(key.0, key.1 + 1).ip(),
            last: held.last,
        });
    }
    ranges.splice(after - 1..after, pieces);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: &str, last: &str) -> AddressRange {
        AddressRange {
            first: first.parse().unwrap(),
            last: last.parse().unwrap(),
        }
    }

    #[test]
    fn blocks_cut_out_their_excepts() {
        let ranges = block_ranges(
            "10.0.0.0/24".parse().unwrap(),
            &["10.0.0.16/28".parse().unwrap(), "10.0.0.255/32".parse().unwrap()],
        );
        assert_eq!(
            ranges,
            [range("10.0.0.0", "10.0.0.15"), range("10.0.0.32", "10.0.0.254")]
        );
        let v6 = block_ranges("fd00::/120".parse().unwrap(), &["fd00::/121".parse().unwrap()]);
        assert_eq!(v6, [range("fd00::80", "fd00::ff")]);
        let all = block_ranges("0.0.0.0/0".parse().unwrap(), &[]);
        assert_eq!(all, [range("0.0.0.0", "255.255.255.255")]);
    }

    #[test]
    fn an_address_taken_out_splits_its_range() {
        let mut ranges = vec![
            range("10.0.0.1", "10.0.0.1"),
            range("10.0.0.5", "10.0.0.9"),
            range("fd00::1", "fd00::3"),
        ];
        remove_address(&mut ranges, "10.0.0.7".parse().unwrap());
        remove_address(&mut ranges, "10.0.0.1".parse().unwrap());
        remove_address(&mut ranges, "10.0.0.3".parse().unwrap());
        remove_address(&mut ranges, "fd00::1".parse().unwrap());
        assert_eq!(
            ranges,
            [
                range("10.0.0.5", "10.0.0.6"),
                range("10.0.0.8", "10.0.0.9"),
                range("fd00::2", "fd00::3"),
            ]
        );
    }

    #[test]
    fn normalize_merges_adjacent_and_keeps_families_apart() {
        let merged = normalize(vec![
            range("fd00::1", "fd00::1"),
            range("10.0.0.2", "10.0.0.2"),
            range("10.0.0.1", "10.0.0.1"),
            range("10.0.0.5", "10.0.0.9"),
            range("10.0.0.6", "10.0.0.7"),
            range("255.255.255.255", "255.255.255.255"),
            range("::", "::"),
        ]);
        assert_eq!(
            merged,
            [
                range("10.0.0.1", "10.0.0.2"),
                range("10.0.0.5", "10.0.0.9"),
                range("255.255.255.255", "255.255.255.255"),
                range("::", "::"),
                range("fd00::1", "fd00::1"),
            ]
        );
    }
}
