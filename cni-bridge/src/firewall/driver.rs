//! The driver: lists Ferry's two tables and commits one transaction per call, over one
//! NETLINK_NETFILTER socket (ferry-nft), in the network namespace of the calling thread.

use ferry_nft::{Batch, ListedRule, Socket, TableFamily};

use cni::{Code, Error};

use super::plan::{Planned, CHAINS};
use super::{owner_key, TABLE};

#[cfg(test)]
thread_local! {
    /// How many transactions this thread committed (tests check "no write").
    pub(crate) static WRITES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// What the two Ferry tables hold: their rules, and which base chains exist.
#[derive(Debug, Default)]
pub(crate) struct Listed {
    pub rules: Vec<ListedRule>,
    pub chains: Vec<(TableFamily, String)>,
}

/// A socket in the calling thread's network namespace (a socket stays in the namespace it
/// was opened in, so it is opened per call, on the caller's thread).
pub(crate) struct Driver {
    socket: Socket,
}

impl Driver {
    pub fn open() -> Result<Driver, Error> {
        let socket = Socket::open()
            .map_err(|e| Error::io("cannot open a netfilter netlink socket for nftables", &e))?;
        Ok(Driver { socket })
    }

    /// The rules of `inet ferry-bridge` and `bridge ferry-bridge` (none for a table that
    /// does not exist): two dumps, as the kernel filters a rule dump to one table.
    pub fn rules(&mut self) -> Result<Vec<ListedRule>, Error> {
        let mut rules = Vec::new();
        for family in [TableFamily::Inet, TableFamily::Bridge] {
            let listed = self
                .socket
                .list_rules(family, TABLE)
                .map_err(|e| Error::io(format!("cannot list the rules of table {family} {TABLE}"), &e))?;
            rules.extend(listed);
        }
        Ok(rules)
    }

    /// Rules and chains of both tables.
    pub fn list(&mut self) -> Result<Listed, Error> {
        let rules = self.rules()?;
        let chains = self
            .socket
            .list_chains_in(None, TABLE)
            .map_err(|e| Error::io(format!("cannot list the chains of the {TABLE} tables"), &e))?;
        Ok(Listed { rules, chains })
    }

    /// Commits `batch` as one transaction.
    pub fn commit(&mut self, batch: &Batch, what: &str) -> Result<(), Error> {
        #[cfg(test)]
        WRITES.with(|w| w.set(w.get() + 1));
        self.socket.commit(batch).map_err(|e| {
            Error::new(
                Code::Io,
                format!("nftables refused to {what}: {e}"),
                "check that the kernel has nf_tables (nft list ruleset works), and run the plugin with CAP_NET_ADMIN",
            )
        })
    }

    /// Lists, lets `build` fill a batch from the listing, and commits it. `build` returns
    /// None when there is nothing to write, else whether the batch deletes rules. A failure
    /// of a batch that deletes is retried once on a fresh listing: a concurrent DEL or GC may
    /// have deleted a listed rule in between, and its handle is then gone.
    pub fn list_and_commit(
        &mut self,
        what: &str,
        mut build: impl FnMut(&Listed, &mut Batch) -> Result<Option<bool>, Error>,
    ) -> Result<(), Error> {
        let mut retried = false;
        loop {
            let listed = self.list()?;
            let mut batch = Batch::new(TABLE);
            let Some(deletes) = build(&listed, &mut batch)? else {
                return Ok(());
            };
            match self.commit(&batch, what) {
                Err(_) if deletes && !retried => retried = true,
                other => return other,
            }
        }
    }
}

/// Adds to `batch` the tables and base chains `planned` needs that `listed` lacks, then
/// the planned rules. Existing base chains are not added again: re-adding one is valid,
/// but it is a chain update the kernel frees after an RCU grace period, which the exit of
/// the plugin would then wait for.
pub(crate) fn add_planned(listed: &Listed, planned: &[Planned], batch: &mut Batch) -> Result<(), Error> {
    for family in [TableFamily::Inet, TableFamily::Bridge] {
        let wanted: Vec<_> = CHAINS
            .iter()
            .filter(|c| c.family == family && planned.iter().any(|p| p.chain == **c))
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let exists = |name: &str| listed.chains.iter().any(|c| c.0 == family && c.1 == name);
        let table_exists = listed.chains.iter().any(|c| c.0 == family);
        batch.use_table(family, TABLE);
        if !table_exists {
            batch.add_table();
        }
        for chain in wanted {
            if !exists(chain.name) {
                batch.add_chain(chain.name, Some(&chain.base));
            }
        }
        for p in planned.iter().filter(|p| p.chain.family == family) {
            batch
                .add_rule_with_comment(p.chain.name, &p.rule.exprs(), p.comment())
                .map_err(|e| Error::new(Code::Io, format!("cannot add {}: {e}", p.what), ""))?;
        }
    }
    Ok(())
}

/// Adds to `batch` a delete of every listed rule whose key `doomed` picks. True when it
/// added any.
pub(crate) fn delete_owned(listed: &[ListedRule], batch: &mut Batch, doomed: impl Fn(&str) -> bool) -> bool {
    let mut any = false;
    for r in listed {
        let Some(key) = r.comment.as_deref().and_then(owner_key) else {
            continue;
        };
        if doomed(key) {
            batch.use_table(r.family, TABLE);
            batch.delete_rule(&r.chain, r.handle);
            any = true;
        }
    }
    any
}
