//! The driver: lists Ferry's two tables and commits one transaction per call, over one
//! NETLINK_NETFILTER socket (ferry-nft), in the network namespace of the calling thread.

use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};

use ferry_nft::{Batch, ListedRule, Socket, TableFamily};

use cni::{Code, Error};

use super::plan::{Planned, CHAINS};
use super::{owner_key, TABLE};
use crate::detached::in_grandchild;

#[cfg(test)]
thread_local! {
    /// How many transactions this thread committed (tests check "no write").
    pub(crate) static WRITES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// What the two Ferry tables hold: their rules, and which base chains exist.
#[derive(Debug, Default)]
pub(crate) struct Listed {
    pub rules: Vec<ListedRule>,
    pub chains: Vec<(TableFamily, &'static str)>,
}

/// A socket in the calling thread's network namespace (a socket stays in the namespace it
/// was opened in, so it is opened per call, on the caller's thread).
pub(crate) struct Driver {
    /// Dropped by hand in `Drop`, before the hand-over pipe is closed.
    socket: ManuallyDrop<Socket>,
    /// A committed transaction deleted rules: see [`Driver`]'s `Drop`.
    deleted: bool,
}

impl Driver {
    pub fn open() -> Result<Driver, Error> {
        let socket = Socket::open()
            .map_err(|e| Error::io("cannot open a netfilter netlink socket for nftables", &e))?;
        Ok(Driver {
            socket: ManuallyDrop::new(socket),
            deleted: false,
        })
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

    /// Rules of both tables, and which of the plan's base chains exist when `with_chains`
    /// (only an add needs them): a request per chain, never a dump of all chains.
    pub fn list(&mut self, with_chains: bool) -> Result<Listed, Error> {
        let rules = self.rules()?;
        let mut chains = Vec::new();
        if with_chains {
            for c in CHAINS {
                let exists = self.socket.has_chain(c.family, TABLE, c.name).map_err(|e| {
                    Error::io(
                        format!("cannot look up chain {} {TABLE} {}", c.family, c.name),
                        &e,
                    )
                })?;
                if exists {
                    chains.push((c.family, c.name));
                }
            }
        }
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

    /// Lists (see [`Driver::list`]), lets `build` fill a batch from the listing, and commits it. `build` returns
    /// None when there is nothing to write, else whether the batch deletes rules. A failure
    /// of a batch that deletes is retried once on a fresh listing: a concurrent DEL or GC may
    /// have deleted a listed rule in between, and its handle is then gone.
    pub fn list_and_commit(
        &mut self,
        what: &str,
        with_chains: bool,
        mut build: impl FnMut(&Listed, &mut Batch) -> Result<Option<bool>, Error>,
    ) -> Result<(), Error> {
        let mut retried = false;
        loop {
            let listed = self.list(with_chains)?;
            let mut batch = Batch::new(TABLE);
            let Some(deletes) = build(&listed, &mut batch)? else {
                return Ok(());
            };
            match self.commit(&batch, what) {
                Err(_) if deletes && !retried => retried = true,
                other => {
                    self.deleted |= deletes && other.is_ok();
                    return other;
                }
            }
        }
    }
}

/// Releasing a NETLINK_NETFILTER socket makes the kernel first finish freeing what earlier
/// transactions deleted, which waits for an RCU grace period: close() took 4-22 ms here
/// after a transaction that deleted rules (Linux 6.18, `strace -T`), about as long as all
/// the rest of a DEL. A CNI call is a process, and its exit would wait just the same. So
/// after a deleting transaction the last reference to the socket goes to a detached
/// grandchild process that closes it and exits; the plugin closes its own descriptor
/// without waiting. (The bridge plugin leaves its veth deletion to a detached child for the
/// same kind of reason.) The wait does not vanish: the release holds the namespace's
/// nf_tables commit lock meanwhile, so a transaction that follows at once (the next ADD
/// on the node, within ~10 ms) waits for it instead.
impl Drop for Driver {
    fn drop(&mut self) {
        let handed_over = self
            .deleted
            .then(|| release_in_background(self.socket.as_raw_fd()))
            .flatten();
        // SAFETY: the socket is dropped exactly once, here; `self` is not used after.
        unsafe { ManuallyDrop::drop(&mut self.socket) };
        if let Some(go) = handed_over {
            // Our descriptor is closed: the grandchild's is now the last one. Closing the
            // pipe tells it to close that.
            // SAFETY: `go` is the pipe's write end, ours alone in this process.
            unsafe { libc::close(go) };
        }
    }
}

/// Hands `fd` to a detached grandchild ([`in_grandchild`]) that waits until the pipe's
/// write end is closed (the caller closes its own `fd` first), then closes `fd` and exits.
/// Returns the pipe's write end, or None if the hand-over failed (the caller's own close
/// then does the waiting).
fn release_in_background(fd: RawFd) -> Option<RawFd> {
    let mut pipe = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two-element array it is given; the job makes raw system calls
    // only (read, close); each descriptor is closed once.
    unsafe {
        if libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return None;
        }
        let [read_end, write_end] = pipe;
        let started = in_grandchild(&[fd, read_end], || {
            let mut byte = 0u8;
            while libc::read(read_end, (&mut byte as *mut u8).cast(), 1) < 0
                && *libc::__errno_location() == libc::EINTR
            {}
            libc::close(fd);
        });
        libc::close(read_end);
        if !started {
            libc::close(write_end);
            return None;
        }
        Some(write_end)
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
