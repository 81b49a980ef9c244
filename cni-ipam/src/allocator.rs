//! Address ranges and the choice of the next free address. Pure: no disk, no lock.
//!
//! Like host-local, allocation is round-robin: it continues after the last address
//! reserved in the range set and wraps around, so a just-freed address is not handed out
//! again at once (a restarting Pod does not inherit a stale conntrack entry or ARP cache).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

/// One contiguous range of a subnet, canonical: `start..=end` holds neither the network
/// address nor (IPv4) the broadcast; the gateway, if inside, is skipped when allocating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNetwork,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: IpAddr,
}

impl Range {
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.start.is_ipv4() && num(ip) >= num(self.start) && num(ip) <= num(self.end)
    }

    /// Addresses this range can hand out (the gateway excluded).
    pub fn capacity(&self) -> u128 {
        let all = num(self.end) - num(self.start) + 1;
        all - u128::from(self.contains(self.gateway))
    }

    pub fn overlaps(&self, other: &Range) -> bool {
        self.start.is_ipv4() == other.start.is_ipv4()
            && num(self.start) <= num(other.end)
            && num(other.start) <= num(self.end)
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// Ranges of one family from which one address is allocated per attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSet {
    pub ranges: Vec<Range>,
}

impl RangeSet {
    pub fn range_for(&self, ip: IpAddr) -> Option<&Range> {
        self.ranges.iter().find(|r| r.contains(ip))
    }

    pub fn capacity(&self) -> u128 {
        self.ranges.iter().map(Range::capacity).sum()
    }

    /// The next address that `is_taken` does not claim, starting after `last_reserved`
    /// (or at the first range's start), wrapping around the whole set once.
    pub fn next_free(
        &self,
        last_reserved: Option<IpAddr>,
        is_taken: impl Fn(IpAddr) -> bool,
    ) -> Option<(IpAddr, &Range)> {
        let after_last = last_reserved.and_then(|ip| {
            let i = self.ranges.iter().position(|r| r.contains(ip))?;
            Some(self.advance((i, num(ip))))
        });
        let first = after_last.unwrap_or((0, num(self.ranges[0].start)));
        let mut pos = first;
        loop {
            let range = &self.ranges[pos.0];
            let ip = from_num(pos.1, range.start.is_ipv4());
            if ip != range.gateway && !is_taken(ip) {
                return Some((ip, range));
            }
            pos = self.advance(pos);
            if pos == first {
                return None;
            }
        }
    }

    /// The position after `(range index, address)`: the next address, or the next range's start.
    fn advance(&self, (idx, cur): (usize, u128)) -> (usize, u128) {
        if cur < num(self.ranges[idx].end) {
            (idx, cur + 1)
        } else {
            let next = (idx + 1) % self.ranges.len();
            (next, num(self.ranges[next].start))
        }
    }

    /// The ranges as `start-end` pairs, for messages.
    pub fn describe(&self) -> String {
        self.ranges
            .iter()
            .map(Range::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Addresses as integers, so ranges are plain arithmetic for both families.
pub fn num(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

pub fn from_num(n: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(n as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn range(subnet: &str, start: &str, end: &str, gw: &str) -> Range {
        Range {
            subnet: subnet.parse().unwrap(),
            start: start.parse().unwrap(),
            end: end.parse().unwrap(),
            gateway: gw.parse().unwrap(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn skips_the_gateway_and_continues_after_the_last_reserved() {
        let set = RangeSet {
            ranges: vec![range("10.0.0.0/29", "10.0.0.1", "10.0.0.6", "10.0.0.1")],
        };
        assert_eq!(set.capacity(), 5);
        assert_eq!(set.next_free(None, |_| false).unwrap().0, ip("10.0.0.2"));
        assert_eq!(
            set.next_free(Some(ip("10.0.0.3")), |_| false).unwrap().0,
            ip("10.0.0.4")
        );
        // After the end it wraps to the start, skipping the gateway.
        assert_eq!(
            set.next_free(Some(ip("10.0.0.6")), |_| false).unwrap().0,
            ip("10.0.0.2")
        );
    }

    #[test]
    fn hands_out_every_address_once_then_none() {
        let set = RangeSet {
            ranges: vec![range("10.0.0.0/29", "10.0.0.1", "10.0.0.6", "10.0.0.1")],
        };
        let mut taken = HashSet::new();
        let mut last = None;
        while let Some((a, _)) = set.next_free(last, |x| taken.contains(&x)) {
            assert!(taken.insert(a));
            last = Some(a);
        }
        let mut got: Vec<_> = taken.into_iter().collect();
        got.sort();
        assert_eq!(
            got,
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"].map(ip)
        );
    }

    #[test]
    fn a_just_freed_address_is_not_reused_at_once() {
        let set = RangeSet {
            ranges: vec![range("10.0.0.0/24", "10.0.0.1", "10.0.0.254", "10.0.0.1")],
        };
        // .2 and .3 were leased, .2 was released: the next one is .4, not .2.
        let taken = [ip("10.0.0.3")];
        assert_eq!(
            set.next_free(Some(ip("10.0.0.3")), |x| taken.contains(&x))
                .unwrap()
                .0,
            ip("10.0.0.4")
        );
    }

    #[test]
    fn moves_across_ranges_of_a_set() {
        let set = RangeSet {
            ranges: vec![
                range("10.0.0.0/24", "10.0.0.10", "10.0.0.11", "10.0.0.1"),
                range("10.0.1.0/24", "10.0.1.10", "10.0.1.10", "10.0.1.1"),
            ],
        };
        let taken = [ip("10.0.0.10"), ip("10.0.0.11")];
        let (a, r) = set.next_free(None, |x| taken.contains(&x)).unwrap();
        assert_eq!(a, ip("10.0.1.10"));
        assert_eq!(r.gateway, ip("10.0.1.1"));
        assert_eq!(
            set.next_free(Some(ip("10.0.1.10")), |x| taken.contains(&x)
                || x == ip("10.0.1.10")),
            None
        );
    }

    #[test]
    fn ipv6_ranges_work_on_the_same_arithmetic() {
        let set = RangeSet {
            ranges: vec![range(
                "fd00::/64",
                "fd00::1",
                "fd00::ffff:ffff:ffff:ffff",
                "fd00::1",
            )],
        };
        assert_eq!(set.next_free(None, |_| false).unwrap().0, ip("fd00::2"));
        assert_eq!(
            set.next_free(Some(ip("fd00::ffff:ffff:ffff:ffff")), |_| false)
                .unwrap()
                .0,
            ip("fd00::2")
        );
        assert_eq!(set.capacity(), (1u128 << 64) - 2);
    }
}
