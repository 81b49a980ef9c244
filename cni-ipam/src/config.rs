//! The `ipam` section, in every form host-local accepts, made canonical and checked.
//!
//! Range sets come, in this order, from runtimeConfig `ipRanges`, the legacy flat
//! `subnet`/`rangeStart`/`rangeEnd`/`gateway`, then `ranges`. Static addresses come from
//! `CNI_ARGS` `IP=`, `args.cni.ips` and runtimeConfig `ips`. Everything is validated here,
//! before the store is opened, so bad input never changes anything on disk.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use cni::{Code, Error, Request, Route};
use ipnetwork::IpNetwork;
use serde::Deserialize;
use serde_json::Value;

use crate::allocator::{from_num, num, Range, RangeSet};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

/// The most range sets a configuration may hold, all sources together. Each gives the Pod
/// one address, so one per family is the norm; every set costs a lease file on every ADD.
pub const MAX_RANGE_SETS: usize = 16;
/// The most ranges in one range set.
pub const MAX_RANGES_PER_SET: usize = 64;
/// The most routes in `ipam.routes`: each is a netlink request in the Pod on every ADD.
pub const MAX_ROUTES: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct IpamConfig {
    /// The network name: the store's directory below `data_dir`.
    pub network: String,
    pub range_sets: Vec<RangeSet>,
    pub routes: Vec<Route>,
    pub data_dir: PathBuf,
    pub resolv_conf: Option<PathBuf>,
}

/// A range as written in the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RangeConf {
    subnet: String,
    range_start: Option<IpAddr>,
    range_end: Option<IpAddr>,
    gateway: Option<IpAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IpamSection {
    subnet: Option<String>,
    range_start: Option<IpAddr>,
    range_end: Option<IpAddr>,
    gateway: Option<IpAddr>,
    #[serde(default)]
    ranges: Vec<Vec<RangeConf>>,
    #[serde(default)]
    routes: Vec<Route>,
    data_dir: Option<PathBuf>,
    resolv_conf: Option<PathBuf>,
}

impl IpamConfig {
    pub fn from_request(req: &Request) -> Result<IpamConfig, Error> {
        let raw = &req.config.raw;
        let section = match raw.get("ipam") {
            Some(v @ Value::Object(_)) => v,
            _ => return Err(Error::invalid_config(
                "ipam section missing from the network configuration",
                "add \"ipam\": {\"type\": \"ferry-ipam\", \"ranges\": [[{\"subnet\": \"10.22.0.0/16\"}]]}",
            )),
        };
        // The bounds are checked on the raw lists first, so a huge one costs no more than
        // reading the JSON: deserializing 30,000 range sets took most of a rejected call.
        for (list, at, max) in [
            (section.get("ranges"), "ipam.ranges", MAX_RANGE_SETS),
            (section.get("routes"), "ipam.routes", MAX_ROUTES),
            (
                raw.pointer("/runtimeConfig/ipRanges"),
                "runtimeConfig.ipRanges",
                MAX_RANGE_SETS,
            ),
        ] {
            if let Some(n) = list.and_then(Value::as_array).map(Vec::len).filter(|n| *n > max) {
                return Err(Error::invalid_config(
                    format!("{at}: {n} entries, more than {max}"),
                    "each range set gives the Pod one address (use one per address family); \
                     each route is a request on every ADD",
                ));
            }
        }
        let ipam: IpamSection = cni::config::parse_at(section, "ipam")?;

        // (where it was written, the ranges) for each range set, before canonicalization.
        let mut written: Vec<(String, Vec<RangeConf>)> = Vec::new();
        if let Some(rc) = raw.get("runtimeConfig").and_then(|r| r.get("ipRanges")) {
            let sets: Vec<Vec<RangeConf>> = cni::config::parse_at(rc, "runtimeConfig.ipRanges")?;
            written.extend(
                sets.into_iter()
                    .enumerate()
                    .map(|(i, s)| (format!("runtimeConfig.ipRanges[{i}]"), s)),
            );
        }
        if let Some(subnet) = ipam.subnet {
            let flat = RangeConf {
                subnet,
                range_start: ipam.range_start,
                range_end: ipam.range_end,
                gateway: ipam.gateway,
            };
            written.push(("ipam".to_string(), vec![flat]));
        }
        written.extend(
            ipam.ranges
                .into_iter()
                .enumerate()
                .map(|(i, s)| (format!("ipam.ranges[{i}]"), s)),
        );
        // Bounded before anything is canonicalised: overlap checks compare ranges pairwise.
        if written.len() > MAX_RANGE_SETS {
            return Err(Error::invalid_config(
                format!(
                    "runtimeConfig.ipRanges, ipam.subnet and ipam.ranges: {} range sets together, \
                     more than {MAX_RANGE_SETS}",
                    written.len()
                ),
                "each range set gives the Pod one address: use one per address family",
            ));
        }
        if let Some((at, set)) = written.iter().find(|(_, set)| set.len() > MAX_RANGES_PER_SET) {
            return Err(Error::invalid_config(
                format!("{at}: {} ranges, more than {MAX_RANGES_PER_SET}", set.len()),
                "use fewer, larger ranges (a subnet with rangeStart and rangeEnd)",
            ));
        }
        check_routes(&ipam.routes)?;
        if written.is_empty() {
            return Err(Error::invalid_config(
                "ipam: no address range given",
                "add \"ranges\": [[{\"subnet\": \"10.22.0.0/16\"}]] (one inner list per address family)",
            ));
        }

        let mut range_sets = Vec::with_capacity(written.len());
        for (at, set) in &written {
            range_sets.push(canonical_set(at, set)?);
        }
        check_no_overlap(&range_sets, &written)?;

        let data_dir = ipam.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if !data_dir.is_absolute() {
            return Err(Error::invalid_config(
                format!(
                    "ipam.dataDir {:?} is not an absolute path",
                    data_dir.display().to_string()
                ),
                format!("use an absolute directory such as {DEFAULT_DATA_DIR}"),
            ));
        }

        Ok(IpamConfig {
            network: req.config.name.clone(),
            range_sets,
            routes: ipam.routes,
            data_dir,
            resolv_conf: ipam.resolv_conf,
        })
    }

    /// Static addresses asked for, each with where it came from (for messages), checked
    /// to lie inside a range set, at most one per set. Only ADD asks: a DEL must never
    /// fail because of them.
    pub fn requested_ips(&self, req: &Request) -> Result<Vec<(IpAddr, &'static str)>, Error> {
        let requested = requested_ips(req)?;
        let range_sets = &self.range_sets;
        let mut sets_used = vec![None; range_sets.len()];
        for (ip, from) in &requested {
            let Some(set) = range_sets.iter().position(|s| s.range_for(*ip).is_some()) else {
                let code = if from.starts_with("CNI_ARGS") {
                    Code::InvalidEnvironment
                } else {
                    Code::InvalidConfig
                };
                return Err(Error::new(
                    code,
                    format!("{from}: {ip} is not inside any range"),
                    format!(
                        "ask for an address within {}",
                        range_sets
                            .iter()
                            .map(RangeSet::describe)
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ),
                ));
            };
            let range = range_sets[set].range_for(*ip).expect("found above");
            if range.gateway == *ip {
                return Err(Error::invalid_config(
                    format!("{from}: {ip} is the gateway of {}", range.subnet),
                    "ask for an address other than the gateway",
                ));
            }
            if let Some(other) = sets_used[set].replace(*ip).filter(|o| o != ip) {
                return Err(Error::invalid_config(
                    format!("{from}: {ip} and {other} are both in range set {set}"),
                    "ask for at most one address per range set (one per address family)",
                ));
            }
        }
        Ok(requested)
    }

    /// The directory holding this network's leases.
    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join(&self.network)
    }
}

fn canonical_set(at: &str, set: &[RangeConf]) -> Result<RangeSet, Error> {
    if set.is_empty() {
        return Err(Error::invalid_config(
            format!("{at} is an empty range set"),
            "give at least one {\"subnet\": ...}",
        ));
    }
    let ranges = set
        .iter()
        .enumerate()
        .map(|(i, r)| {
            canonical_range(
                &if at == "ipam" {
                    at.to_string()
                } else {
                    format!("{at}[{i}]")
                },
                r,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let v4 = ranges[0].start.is_ipv4();
    if let Some(i) = ranges.iter().position(|r| r.start.is_ipv4() != v4) {
        return Err(Error::invalid_config(
            format!("{at}[{i}] mixes IPv4 and IPv6 in one range set"),
            "put each address family in a range set of its own",
        ));
    }
    for (i, a) in ranges.iter().enumerate() {
        if let Some(j) = ranges[i + 1..].iter().position(|b| a.overlaps(b)) {
            return Err(Error::invalid_config(
                format!("{at}[{i}] overlaps {at}[{}]", i + 1 + j),
                "ranges must not overlap",
            ));
        }
    }
    Ok(RangeSet { ranges })
}

/// host-local's canonical form, plus what host-local does not check: a range must not
/// include the network or (IPv4) broadcast address, and must not end before it starts.
fn canonical_range(at: &str, r: &RangeConf) -> Result<Range, Error> {
    let subnet: IpNetwork = r.subnet.parse().map_err(|e| {
        Error::invalid_config(
            format!("{at}.subnet {:?} is not a subnet: {e}", r.subnet),
            "write a subnet in CIDR form, such as \"10.22.0.0/16\" or \"fd00:22::/64\"",
        )
    })?;
    if !r.subnet.contains('/') {
        return Err(Error::invalid_config(
            format!("{at}.subnet {:?} has no prefix length", r.subnet),
            "write a subnet in CIDR form, such as \"10.22.0.0/16\"",
        ));
    }
    let v4 = subnet.is_ipv4();
    let bits: u8 = if v4 { 32 } else { 128 };
    if subnet.prefix() > bits - 2 {
        return Err(Error::invalid_config(
            format!("{at}.subnet {subnet} is too small to allocate from"),
            format!("use a prefix of /{} or shorter", bits - 2),
        ));
    }
    let network = num(subnet.network());
    if num(subnet.ip()) != network {
        return Err(Error::invalid_config(
            format!("{at}.subnet {subnet} has host bits set"),
            format!(
                "the network address for /{} is {}",
                subnet.prefix(),
                subnet.network()
            ),
        ));
    }
    let host_bits = u32::from(bits - subnet.prefix());
    let last = network | (u128::MAX >> (128 - host_bits));
    let broadcast = if v4 { Some(last) } else { None };
    let in_subnet = |field: &str, ip: IpAddr| -> Result<IpAddr, Error> {
        if ip.is_ipv4() != v4 || !subnet.contains(ip) {
            return Err(Error::invalid_config(
                format!("{at}.{field} {ip} is not inside subnet {subnet}"),
                format!("choose an address within {subnet}"),
            ));
        }
        if num(ip) == network || Some(num(ip)) == broadcast {
            let what = if num(ip) == network {
                "network"
            } else {
                "broadcast"
            };
            return Err(Error::invalid_config(
                format!("{at}.{field} {ip} is the {what} address of {subnet}"),
                format!(
                    "choose an address strictly between {} and {}",
                    subnet.network(),
                    from_num(last, v4)
                ),
            ));
        }
        Ok(ip)
    };
    let start = match r.range_start {
        Some(ip) => in_subnet("rangeStart", ip)?,
        None => from_num(network + 1, v4),
    };
    let end = match r.range_end {
        Some(ip) => in_subnet("rangeEnd", ip)?,
        None => from_num(if v4 { last - 1 } else { last }, v4),
    };
    if num(start) > num(end) {
        return Err(Error::invalid_config(
            format!("{at}.rangeStart {start} comes after rangeEnd {end}"),
            "rangeStart must not be greater than rangeEnd",
        ));
    }
    let gateway = match r.gateway {
        Some(gw) if gw.is_ipv4() != v4 => {
            return Err(Error::invalid_config(
                format!("{at}.gateway {gw} is not of the same family as subnet {subnet}"),
                "",
            ))
        }
        Some(gw) => gw,
        None => from_num(network + 1, v4),
    };
    Ok(Range {
        subnet,
        start,
        end,
        gateway,
    })
}

/// A next hop of the destination's own family (their number is bounded on the raw list).
fn check_routes(routes: &[Route]) -> Result<(), Error> {
    for (i, r) in routes.iter().enumerate() {
        if let Some(gw) = r.gw.filter(|gw| gw.is_ipv4() != r.dst.is_ipv4()) {
            return Err(Error::invalid_config(
                format!(
                    "ipam.routes[{i}].gw {gw} is not of the same family as dst {}",
                    r.dst
                ),
                "give an IPv4 route an IPv4 gateway and an IPv6 route an IPv6 one",
            ));
        }
    }
    Ok(())
}

fn check_no_overlap(sets: &[RangeSet], written: &[(String, Vec<RangeConf>)]) -> Result<(), Error> {
    for (i, a) in sets.iter().enumerate() {
        for (j, b) in sets.iter().enumerate().skip(i + 1) {
            if a.ranges
                .iter()
                .any(|ra| b.ranges.iter().any(|rb| ra.overlaps(rb)))
            {
                return Err(Error::invalid_config(
                    format!("range set {} overlaps range set {}", written[i].0, written[j].0),
                    "an address may belong to one range set only",
                ));
            }
        }
    }
    Ok(())
}

/// Static addresses from `CNI_ARGS` `IP=` (comma-separated), `args.cni.ips` and
/// runtimeConfig `ips`.
fn requested_ips(req: &Request) -> Result<Vec<(IpAddr, &'static str)>, Error> {
    let mut out = Vec::new();
    if let Some(list) = req.env.args.get("IP") {
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let ip = item.parse::<IpAddr>().map_err(|_| {
                Error::new(
                    Code::InvalidEnvironment,
                    format!("CNI_ARGS IP={item} is not an IP address"),
                    "write IP=10.22.0.5 (several: IP=10.22.0.5,fd00:22::5)",
                )
            })?;
            out.push((ip, "CNI_ARGS IP"));
        }
    }
    if let Some(ips) = req.config.raw.pointer("/args/cni/ips") {
        let list: Vec<String> = cni::config::parse_at(ips, "args.cni.ips")?;
        for (i, s) in list.iter().enumerate() {
            let ip = s
                .parse::<IpAddr>()
                .or_else(|_| s.parse::<IpNetwork>().map(|n| n.ip()))
                .map_err(|_| {
                    Error::invalid_config(format!("args.cni.ips[{i}] {s:?} is not an IP address"), "")
                })?;
            out.push((ip, "args.cni.ips"));
        }
    }
    out.extend(
        req.config
            .runtime_config
            .ips
            .iter()
            .map(|ip| (*ip, "runtimeConfig.ips")),
    );
    Ok(out)
}

/// Reads a resolv.conf-style file into the result's `dns`.
pub fn read_resolv_conf(path: &Path) -> Result<cni::Dns, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("ipam.resolvConf: reading {}", path.display()), &e))?;
    let mut dns = cni::Dns::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => dns.nameservers.extend(words.next().map(str::to_string)),
            Some("domain") => dns.domain = words.next().map(str::to_string),
            Some("search") => dns.search = words.map(str::to_string).collect(),
            Some("options") => dns.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    Ok(dns)
}
