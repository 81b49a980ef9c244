//! `ferry-ipam`: a CNI IPAM plugin that does what host-local does, on host-local's own
//! store layout, and adds what it lacks: idempotent ADD, GC, STATUS, crash-safe writes,
//! and checks that keep bad input from touching the disk.
//!
//! Data flow of a call: [`config`] reads and checks everything from the request, then
//! [`store`] takes the network's lock and lists the leases (its owner index says whose
//! each is, so only the caller's own lease files are read), [`allocator`] picks addresses
//! (pure), and the store writes the leases.

pub mod allocator;
pub mod config;
pub mod store;

use std::collections::HashSet;
use std::net::IpAddr;

use cni::{Attachment, CniResult, Code, Error, IpConfig, Plugin, Request};
use ipnetwork::IpNetwork;

use config::IpamConfig;
use store::{Lease, Store};

/// Codes of ferry-ipam's own failures (the spec leaves 100 and up to plugins).
pub mod codes {
    use cni::Code;
    /// ADD: a range set has no free address left.
    pub const POOL_EXHAUSTED: Code = Code::Other(100);
    /// ADD: a static address asked for is leased to another attachment.
    pub const ADDRESS_TAKEN: Code = Code::Other(101);
    /// CHECK: the attachment holds no lease (in some range set) or not the expected one.
    pub const LEASE_MISSING: Code = Code::Other(102);
}

/// The plugin. It holds no state: everything lives in the store.
pub struct HostLocal;

impl Plugin for HostLocal {
    const ARGS: &'static [&'static str] = &["IP"];

    fn add(&self, req: &Request) -> Result<CniResult, Error> {
        let cfg = IpamConfig::from_request(req)?;
        let requested = cfg.requested_ips(req)?;
        let dns = match &cfg.resolv_conf {
            Some(path) => config::read_resolv_conf(path)?,
            None => cni::Dns::default(),
        };
        // Everything is checked: from here on the disk changes.
        let (id, ifname) = (&req.env.container_id, &req.env.ifname);
        let mut store = Store::open_to_add(&cfg.store_dir(), id, ifname)?;
        let mine = store.leases_of(id, ifname)?;
        let mut taken = store.addresses();
        let mut reserved_now = Vec::new();
        let mut ips = Vec::with_capacity(cfg.range_sets.len());

        for (i, set) in cfg.range_sets.iter().enumerate() {
            let wanted = requested.iter().find(|(ip, _)| set.range_for(*ip).is_some());
            let held = mine.iter().find(|l| set.range_for(l.ip).is_some());
            let picked = match (held, wanted) {
                // A repeated ADD gets what the first one got.
                (Some(l), None) => Ok(l.ip),
                (Some(l), Some((ip, _))) if l.ip == *ip => Ok(l.ip),
                (Some(l), Some((ip, from))) => Err(Error::new(
                    codes::ADDRESS_TAKEN,
                    format!(
                        "{from}: asked for {ip}, but {id}/{ifname} already holds {} in range set {i}",
                        l.ip
                    ),
                    "DEL the attachment first to change its address",
                )),
                (None, Some((ip, from))) => reserve_static(&mut store, *ip, from, i, id, ifname),
                (None, None) => reserve_next(&mut store, set, i, &mut taken, id, ifname),
            };
            let ip = match picked {
                Ok(ip) => ip,
                Err(e) => {
                    // Leave nothing behind: release what this call reserved.
                    for ip in reserved_now {
                        let _ = store.release(ip);
                    }
                    return Err(e);
                }
            };
            if held.is_none() {
                reserved_now.push(ip);
            }
            taken.insert(ip);
            let range = set.range_for(ip).expect("picked inside the set");
            ips.push(IpConfig {
                address: IpNetwork::new(ip, range.subnet.prefix()).expect("prefix of a valid subnet"),
                gateway: Some(range.gateway),
                interface: None,
            });
        }
        Ok(CniResult {
            ips,
            routes: cfg.routes,
            dns,
            ..Default::default()
        })
    }

    fn del(&self, req: &Request) -> Result<(), Error> {
        let cfg = IpamConfig::from_request(req)?;
        let mut store = Store::open(&cfg.store_dir())?;
        for lease in store.leases_of(&req.env.container_id, &req.env.ifname)? {
            store.release(lease.ip)?;
        }
        Ok(())
    }

    fn check(&self, req: &Request) -> Result<(), Error> {
        let cfg = IpamConfig::from_request(req)?;
        let (id, ifname) = (&req.env.container_id, &req.env.ifname);
        // No store, no lease: opening one would make the directory and its lock file, and
        // a failed CHECK must leave nothing behind.
        if !cfg.store_dir().is_dir() {
            return Err(Error::new(
                codes::LEASE_MISSING,
                format!("{id}/{ifname} holds no lease: network {} has none", cfg.network),
                format!(
                    "no lease directory {}; ADD the attachment",
                    cfg.store_dir().display()
                ),
            ));
        }
        let mut store = Store::open_read_only(&cfg.store_dir())?;
        let mine = store.leases_of(id, ifname)?;
        for (i, set) in cfg.range_sets.iter().enumerate() {
            if !mine.iter().any(|l| set.range_for(l.ip).is_some()) {
                return Err(Error::new(
                    codes::LEASE_MISSING,
                    format!(
                        "{id}/{ifname} holds no lease in range set {i} ({})",
                        set.describe()
                    ),
                    format!(
                        "the lease files are in {}; ADD the attachment again",
                        store.dir().display()
                    ),
                ));
            }
        }
        // Every address the previous result reported from our ranges must still be ours.
        let prev = req
            .config
            .prev_result
            .as_ref()
            .map(|r| r.ips.as_slice())
            .unwrap_or_default();
        for ip in prev.iter().map(|c| c.address.ip()) {
            if cfg.range_sets.iter().any(|s| s.range_for(ip).is_some()) && !mine.iter().any(|l| l.ip == ip) {
                return Err(Error::new(
                    codes::LEASE_MISSING,
                    format!("prevResult lists {ip}, but {id}/{ifname} holds no lease for it"),
                    format!("the lease files are in {}", store.dir().display()),
                ));
            }
        }
        Ok(())
    }

    fn status(&self, req: &Request) -> Result<(), Error> {
        let cfg = IpamConfig::from_request(req)?;
        let dir = cfg.store_dir();
        let unavailable = |e: Error| {
            Error::new(
                Code::NotAvailable,
                format!("ipam.dataDir cannot hold leases: {}", e.msg),
                format!("make {} a writable directory", cfg.data_dir.display()),
            )
        };
        store::check_usable(&dir).map_err(unavailable)?;
        if !dir.exists() {
            return Ok(()); // Nothing leased yet, and the directory can be made.
        }
        // Addresses only: no lease file is read.
        let leased = Store::open_read_only(&dir).map_err(unavailable)?.addresses();
        for (i, set) in cfg.range_sets.iter().enumerate() {
            let used = leased
                .iter()
                .filter(|ip| set.range_for(**ip).is_some_and(|r| r.gateway != **ip))
                .count() as u128;
            if used >= set.capacity() {
                return Err(Error::new(
                    Code::NotAvailable,
                    format!(
                        "range set {i} ({}) has no free address: {used} of {} leased",
                        set.describe(),
                        set.capacity()
                    ),
                    "delete unused pods, or add a range to the range set",
                ));
            }
        }
        Ok(())
    }

    fn gc(&self, req: &Request, valid: &[Attachment]) -> Result<(), Error> {
        let cfg = IpamConfig::from_request(req)?;
        let mut store = Store::open(&cfg.store_dir())?;
        let keep = |l: &Lease| valid.iter().any(|a| l.belongs_to(&a.container_id, &a.ifname));
        // Go on past a failure, to release as much as possible, then report the first one.
        // Every lease is read: what GC releases, it releases on the lease files' word, not
        // the index's (reading also repairs the index).
        let mut first_error = None;
        for lease in store.all_leases()?.iter().filter(|l| !keep(l)) {
            if let Err(e) = store.release(lease.ip) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn reserve_static(
    store: &mut Store,
    ip: IpAddr,
    from: &str,
    set: usize,
    id: &str,
    ifname: &str,
) -> Result<IpAddr, Error> {
    let lease = Lease {
        ip,
        container_id: id.to_string(),
        ifname: Some(ifname.to_string()),
    };
    if store.reserve(&lease, set)? {
        return Ok(ip);
    }
    let owner = store
        .lease(ip)?
        .map(|l| format!("{}/{}", l.container_id, l.ifname.as_deref().unwrap_or("?")))
        .unwrap_or_else(|| "another attachment".into());
    Err(Error::new(
        codes::ADDRESS_TAKEN,
        format!("{from}: {ip} is already leased to {owner}"),
        "ask for a free address, or none to get one allocated",
    ))
}

fn reserve_next(
    store: &mut Store,
    set: &allocator::RangeSet,
    set_index: usize,
    taken: &mut HashSet<IpAddr>,
    id: &str,
    ifname: &str,
) -> Result<IpAddr, Error> {
    let mut last = store.last_reserved(set_index);
    loop {
        let Some((ip, _)) = set.next_free(last, |ip| taken.contains(&ip)) else {
            return Err(Error::new(
                codes::POOL_EXHAUSTED,
                format!(
                    "no free address left in range set {set_index} ({})",
                    set.describe()
                ),
                "delete unused pods, or add a range to the range set",
            ));
        };
        let lease = Lease {
            ip,
            container_id: id.to_string(),
            ifname: Some(ifname.to_string()),
        };
        if store.reserve(&lease, set_index)? {
            return Ok(ip);
        }
        // A file of that name appeared without being a lease we read: skip it.
        taken.insert(ip);
        last = Some(ip);
    }
}
