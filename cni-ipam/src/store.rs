//! Leases on disk, in host-local's own layout, so a node can switch between host-local
//! and ferry-ipam without losing a lease:
//!
//! ```text
//! <dataDir>/<network>/
//!     lock                    flock'ed for the length of every call (host-local locks it too)
//!     10.22.0.5               one file per leased address: "<container id>\r\n<ifname>"
//!     fd00:22::5
//!     last_reserved_ip.0      the last address handed out in range set 0 (round-robin cursor)
//!     .ferry-owners/          ferry-ipam's owner index; host-local ignores it (see below)
//!         1c0ffee5a1b2c3d4.10.22.0.5     an entry per lease: <owner key>.<address>, a link to `empty`
//!         empty                          the one empty file (inode) all entries are names of
//!         exact-at.1732380000.123456788.<boot id>
//!                                        the index is exact while the lease directory has
//!                                        this mtime, in this boot
//! ```
//!
//! What host-local does not do: a lease is written to a file with no name yet (`O_TMPFILE`),
//! then linked into place. `link` fails if the name exists, so it is an exclusive create
//! whose file is never seen half-written, not even by a call that runs after kill -9 of
//! the writer (host-local creates the name first, then writes: killed in between, it
//! leaves an empty lease). An ADD writes its lease before it takes the lock (the bytes do
//! not depend on the address, and all its leases are links to that one file), so making
//! its inode, the dearest step of an ADD, does not hold up the other calls. Where
//! `O_TMPFILE` is not available, a named temporary file is used, under the lock; those a
//! killed call left behind are removed by the next call.
//!
//! What a new file costs, median of 600 each: 111-117 us on this machine's root ext4,
//! which has no journal (perf: the inode allocator's `recently_deleted` check dominates),
//! and 9-15 us on a journaled ext4 on the same disk (`O_TMPFILE`, write and link 14.5 us;
//! host-local's create then write 11.2 us; an empty file 9.0 us). A link costs a few.
//!
//! # Durability: what a lease must survive
//!
//! A lease means something only while its container lives. kill -9 of a plugin loses
//! nothing it wrote (the page cache belongs to the kernel, not the process), so every
//! call after it sees every lease complete. A power cut or kernel crash kills every
//! container on the node with it: after the reboot the runtime makes new sandboxes (new
//! ids), and DEL or GC of the old ids releases their leases. So no lease has to survive
//! a power cut; what must hold is that no two ADDs get one address, and that whatever a
//! power cut leaves is read safely. Hence no flush (`fdatasync`) on the ADD path, and
//! host-local does not flush either. It was 0.78 ms median, 3.5 ms p90 of an ADD of
//! ~1.9 ms on this machine's root ext4, which has no journal (strace -T, 60 ADDs). On a
//! journaled ext4 it is a journal commit per ADD: 200 single-stack ADDs on a loop ext4,
//! same run, took 6.15 ms median with it, 0.65 ms without, host-local 1.83 ms.
//!
//! What a power cut leaves, with ext4 (`data=ordered`, the default) and xfs: names and
//! sizes are journaled in order, a file's data is written back later (up to 30 s), and
//! its size on disk grows only once its data is there. So a lease file is absent,
//! complete, or named and empty; never garbage. Measured with a loop file system shut
//! down as a power cut does (`FS_IOC_SHUTDOWN` with the journal flushed, data not): 10 of
//! 10 leases were named and empty after remount, for ferry-ipam and host-local alike, on
//! ext4 and xfs. (`data=writeback` could show stale bytes instead: a lease of an unknown
//! owner, released by GC.)
//!
//! So an empty lease file is nobody's: no writer leaves one behind under the lock, only
//! a crash (or host-local killed between its create and its write, an ADD that failed).
//! A writable call that reads one removes it, and its address is free again. To read
//! them all after a reboot, every stamp names the boot it was made in
//! (`/proc/sys/kernel/random/boot_id`): the first call of a new boot does not trust the
//! index, reads every lease, and frees the empty ones. Complete leases of containers
//! gone with the reboot stay until DEL or GC releases them, as with host-local: a leak
//! until then, never a conflict. They are not freed at boot: a runtime that brings a
//! container back under its old id (podman's restart policy) ADDs it again and, the
//! lease being there, gets its old address back.
//!
//! # The owner index
//!
//! In host-local's layout, only a lease file's content says whose it is, so finding the
//! leases of one attachment means reading every lease file. The index says it in file
//! names instead: `.ferry-owners/<key>.<address>`, the key being the first 8 bytes of
//! SHA-256(container id, NUL, ifname) in hex. Listing the two directories tells whose each
//! lease is; a call reads only the lease files filed under its own key, to confirm them.
//! The files are empty because host-local walks the whole tree, subdirectories included,
//! and compares each file's content with `<id>\r\n<ifname>` (or `<id>`): an empty file
//! never matches, so host-local leaves the index alone.
//!
//! The index is exact when every lease that names an ifname is filed under its owner's
//! key, and an id-only lease (old host-local) under no key. Other entries may exist: one
//! whose lease is gone (a call died between its two removals, or host-local released the
//! lease) is removed when seen; a second key on a lease is resolved by reading the lease.
//! ferry-ipam keeps the index exact: an entry is created before its lease, and removed
//! after it.
//!
//! Others do not: host-local may release a lease and give its address to another
//! container, leaving an entry that names the wrong owner. So the index is trusted only
//! while nobody else has changed the lease directory since a ferry-ipam call last left
//! the index exact. That call, on its way out, sets the directory's mtime to one
//! nanosecond before the real one and records the value, with the boot id, in the name
//! of the `exact-at.` file. Creating, removing or renaming anything in the directory
//! afterwards sets its mtime to the current time, which is later, so the two no longer
//! match: this covers host-local, hand edits, and ferry-ipam calls killed before their
//! end; a new boot does too. A call that finds no match reads every lease file, as
//! before the index existed, and repairs the index.
//! With the index trusted, a call also reads the leases filed under no key, and falls back
//! to reading everything if a lease's content contradicts its entries.
//!
//! All the index ever decides alone is that a lease is not the caller's. Whatever is
//! released, returned or checked as the caller's was read from its lease file; addresses
//! are handed out by lease file names; GC reads every lease. What the stamp cannot see: a
//! lease file's content rewritten in place (the file changes, not the directory), and a
//! writer that ignores the lock; host-local does neither.

use std::collections::{HashMap, HashSet};
use std::fs::{self, DirBuilder, File, FileTimes, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cni::{Code, Error};
use sha2::{Digest, Sha256};

const LOCK_FILE: &str = "lock";
const LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";
const TEMP_PREFIX: &str = ".ferry-tmp-";
/// host-local's separator between container id and ifname.
const LINE_BREAK: &str = "\r\n";
/// The owner index, inside the lease directory.
pub const OWNERS_DIR: &str = ".ferry-owners";
/// In the index: `exact-at.<seconds>.<nanoseconds>.<boot id>`, the lease directory's mtime
/// when the index was last known exact, and the boot that was in.
const STAMP_PREFIX: &str = "exact-at.";
/// In the index: the empty file that every entry is a link to.
const EMPTY_FILE: &str = "empty";
/// Changes at every boot: a stamp names the boot it was made in.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// An attachment's name in the owner index: the first 8 bytes of SHA-256(container id,
/// NUL, ifname), written as 16 hex digits. Two attachments sharing a key only cost reads:
/// a call always reads the leases filed under its key to confirm them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerKey([u8; 8]);

impl OwnerKey {
    pub fn of(container_id: &str, ifname: &str) -> OwnerKey {
        // Trimmed as in the lease file, so a lease and the request it matches share a key.
        let digest = Sha256::new()
            .chain_update(container_id.trim())
            .chain_update([0u8])
            .chain_update(ifname.trim())
            .finalize();
        let mut key = [0; 8];
        key.copy_from_slice(&digest[..8]);
        OwnerKey(key)
    }

    /// The key and address of an index entry named `<key>.<address>`, if `name` is one
    /// exactly as this module writes it.
    fn parse_entry(name: &str) -> Option<(OwnerKey, IpAddr)> {
        let (hex, addr) = name.split_once('.')?;
        if hex.len() != 16
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        let mut key = [0; 8];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some((OwnerKey(key), address_named(addr)?))
    }

    fn entry_name(self, ip: IpAddr) -> String {
        format!("{self}.{ip}")
    }
}

impl std::fmt::Display for OwnerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// One leased address and its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: IpAddr,
    pub container_id: String,
    /// `None` for leases written by old host-local versions, which stored only the id.
    pub ifname: Option<String>,
}

impl Lease {
    /// Whether this lease is the attachment's: old id-only leases match any ifname.
    pub fn belongs_to(&self, container_id: &str, ifname: &str) -> bool {
        self.container_id == container_id && self.ifname.as_deref().is_none_or(|i| i == ifname)
    }

    /// The key the index files this lease under; `None` for an id-only lease, which is
    /// filed under no key (it matches any ifname of its container).
    pub fn owner_key(&self) -> Option<OwnerKey> {
        self.ifname
            .as_deref()
            .map(|ifname| OwnerKey::of(&self.container_id, ifname))
    }

    fn parse(ip: IpAddr, content: &str) -> Lease {
        let content = content.trim();
        let (id, ifname) = match content.split_once(LINE_BREAK) {
            Some((id, ifname)) => (id.trim(), Some(ifname.trim().to_string())),
            None => (content, None),
        };
        Lease {
            ip,
            container_id: id.to_string(),
            ifname,
        }
    }

    fn content(&self) -> String {
        lease_content(&self.container_id, self.ifname.as_deref())
    }
}

/// A lease file's bytes, as host-local writes them.
fn lease_content(container_id: &str, ifname: Option<&str>) -> String {
    format!("{}{LINE_BREAK}{}", container_id.trim(), ifname.unwrap_or(""))
}

/// The lease directory of one network, locked for as long as this value lives.
///
/// Opening it lists the lease directory and the index (names only, no file is read);
/// the answers below come from that listing, kept current by this store's own changes.
/// When a writable store is dropped with the index exact, it records so (the `exact-at.`
/// file), still under the lock.
pub struct Store {
    dir: PathBuf,
    /// CHECK and STATUS open the store read-only: they neither repair nor stamp the index.
    writable: bool,
    /// Every leased address, with the keys the index files its lease under.
    leases: HashMap<IpAddr, Vec<OwnerKey>>,
    /// Whether the index is exact (module doc): trusted at open, or repaired since.
    exact: bool,
    /// An index write failed: the index may be wrong, so it is not stamped exact.
    index_failed: bool,
    /// The `exact-at.` files in the index.
    stamps: Vec<String>,
    /// This boot's id, part of every stamp: a stamp from an earlier boot is not trusted.
    boot_id: Option<String>,
    /// The lease an ADD wrote before taking the lock, ready to be linked.
    prepared: Option<Prepared>,
    /// Held for its flock; closing the file releases it.
    _lock: File,
}

/// What a lease file holds.
enum LeaseFile {
    /// No file: released since the listing.
    Gone,
    /// A file of no bytes: what a crash can leave (module doc, durability).
    Empty,
    Held(Lease),
}

/// A lease's bytes in a file that has no name yet: linking it into place is all that is
/// left to do. Closed without a link, it is gone. Not flushed (module doc, durability).
struct Prepared {
    content: String,
    file: File,
}

impl Prepared {
    fn write(dir: &Path, content: String) -> std::io::Result<Prepared> {
        let mut file = OpenOptions::new()
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)?;
        file.write_all(content.as_bytes())?;
        Ok(Prepared { content, file })
    }

    /// Gives the file the name `to`, as `link` does (fails if `to` exists).
    fn link(&self, to: &Path) -> std::io::Result<()> {
        // The documented way to name an O_TMPFILE file without privileges: its /proc link.
        let from = std::ffi::CString::new(format!("/proc/self/fd/{}", self.file.as_raw_fd()))?;
        let to = std::ffi::CString::new(to.as_os_str().as_encoded_bytes())?;
        // SAFETY: linkat(2) reads two NUL-terminated paths we own.
        let linked = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if linked == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl Store {
    /// Creates the directory if needed, takes the lock (waiting for other calls), and
    /// lists the leases and the index.
    pub fn open(dir: &Path) -> Result<Store, Error> {
        Store::open_with(dir, true, None)
    }

    /// As [`Store::open`], for an ADD of this attachment: its lease is written before the
    /// lock is taken, for [`Store::reserve`] to link into place.
    pub fn open_to_add(dir: &Path, container_id: &str, ifname: &str) -> Result<Store, Error> {
        Store::open_with(dir, true, Some(lease_content(container_id, Some(ifname))))
    }

    /// As [`Store::open`], for calls that only look: the index is neither repaired nor
    /// stamped (leftover temporary files are still removed).
    pub fn open_read_only(dir: &Path) -> Result<Store, Error> {
        Store::open_with(dir, false, None)
    }

    fn open_with(dir: &Path, writable: bool, lease: Option<String>) -> Result<Store, Error> {
        fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating lease directory {}", dir.display()), &e))?;
        // Where this fails (no O_TMPFILE), reserve writes a named temporary file instead.
        let prepared = lease.and_then(|content| Prepared::write(dir, content).ok());
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("opening lock file {}", lock_path.display()), &e))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::io(format!("locking {}", lock_path.display()), &e));
        }
        let mut store = Store {
            dir: dir.to_path_buf(),
            writable,
            leases: HashMap::new(),
            exact: false,
            index_failed: false,
            stamps: Vec::new(),
            boot_id: boot_id(),
            prepared,
            _lock: lock,
        };
        store.list()?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every leased address: the names of the lease files, none read.
    pub fn addresses(&self) -> HashSet<IpAddr> {
        self.leases.keys().copied().collect()
    }

    /// The leases of one attachment. With the index trusted, only the leases filed under
    /// its key or under no key are read; otherwise every lease is.
    pub fn leases_of(&mut self, container_id: &str, ifname: &str) -> Result<Vec<Lease>, Error> {
        let mine = |l: &Lease| l.belongs_to(container_id, ifname);
        if self.exact {
            let key = OwnerKey::of(container_id, ifname);
            let candidates: Vec<IpAddr> = self
                .leases
                .iter()
                .filter(|(_, keys)| keys.is_empty() || keys.contains(&key))
                .map(|(ip, _)| *ip)
                .collect();
            let read = self.read(candidates)?;
            if self.exact {
                return Ok(read.into_iter().filter(mine).collect());
            }
            // A lease contradicted the index: trust none of it.
        }
        Ok(self.all_leases()?.into_iter().filter(mine).collect())
    }

    /// Every lease, each file read. The index is repaired on the way (writable stores).
    pub fn all_leases(&mut self) -> Result<Vec<Lease>, Error> {
        let all: Vec<IpAddr> = self.leases.keys().copied().collect();
        let leases = self.read(all)?;
        // Every lease was read and filed under its owner: the index is exact, unless a
        // write to it failed.
        self.exact = self.writable && !self.index_failed;
        Ok(leases)
    }

    /// The lease of `ip`, read from its file; `None` if there is none, or only an empty
    /// file (nobody's: module doc, durability).
    pub fn lease(&self, ip: IpAddr) -> Result<Option<Lease>, Error> {
        Ok(match self.lease_file(ip)? {
            LeaseFile::Held(lease) => Some(lease),
            LeaseFile::Gone | LeaseFile::Empty => None,
        })
    }

    fn lease_file(&self, ip: IpAddr) -> Result<LeaseFile, Error> {
        let path = self.dir.join(ip.to_string());
        match fs::read_to_string(&path) {
            // No writer leaves an empty lease behind under the lock, only a crash does.
            Ok(content) if content.is_empty() => Ok(LeaseFile::Empty),
            Ok(content) => Ok(LeaseFile::Held(Lease::parse(ip, &content))),
            // Released by host-local between listing and reading; it holds the lock when
            // it does, so this is for writers that do not.
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(LeaseFile::Gone),
            Err(e) => Err(Error::io(format!("reading lease {}", path.display()), &e)),
        }
    }

    /// The round-robin cursor of range set `set`; unreadable means "start from the top".
    pub fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        let text = fs::read_to_string(self.dir.join(format!("{LAST_RESERVED_PREFIX}{set}"))).ok()?;
        text.trim().parse().ok()
    }

    /// Writes the lease unless its address is already leased; `Ok(false)` when it is.
    pub fn reserve(&mut self, lease: &Lease, set: usize) -> Result<bool, Error> {
        if self.leases.contains_key(&lease.ip) {
            return Ok(false);
        }
        // The index entry first: a call killed before the lease leaves an entry without a
        // lease, which the next call removes; never a lease the index misfiles.
        let key = lease.owner_key().filter(|k| self.create_entry(*k, lease.ip));
        let created = match self.link_prepared(lease) {
            Some(linked) => linked,
            None => self.create_exclusive(&lease.ip.to_string(), lease.content().as_bytes()),
        };
        if !matches!(created, Ok(true)) {
            if let Some(k) = key {
                self.remove_entry(k, lease.ip);
            }
        }
        if !created? {
            // A lease file appeared that the listing did not show: a writer that does not
            // take the lock. Whatever else it did is unknown, so the index is not stamped.
            self.index_failed = true;
            self.leases.insert(lease.ip, Vec::new());
            return Ok(false);
        }
        self.leases.insert(lease.ip, key.into_iter().collect());
        self.write_last_reserved(set, lease.ip)?;
        Ok(true)
    }

    /// Links the prepared file into place as `lease`, if it holds `lease`'s bytes; `None`
    /// if there is none, or it cannot be linked (then it is dropped: write another).
    fn link_prepared(&mut self, lease: &Lease) -> Option<Result<bool, Error>> {
        let prepared = self.prepared.as_ref().filter(|p| p.content == lease.content())?;
        let path = self.dir.join(lease.ip.to_string());
        match prepared.link(&path) {
            Ok(()) => Some(Ok(true)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Some(Ok(false)),
            // No /proc, or a file linked then released (it cannot be linked again).
            Err(_) => {
                self.prepared = None;
                None
            }
        }
    }

    /// Removes a lease; one that is already gone is fine (DEL is idempotent).
    pub fn release(&mut self, ip: IpAddr) -> Result<(), Error> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing lease {}", path.display()), &e)),
        }
        // Then its index entries: a call killed in between leaves entries without a lease,
        // which the next call removes.
        for key in self.leases.remove(&ip).unwrap_or_default() {
            self.remove_entry(key, ip);
        }
        Ok(())
    }

    /// Lists the lease directory and the index, names only. Removes leftover temporary
    /// files (we hold the lock, so no live call is writing one) and, in a writable store,
    /// index entries whose lease is gone. The index is trusted if the lease directory's
    /// mtime is the one an `exact-at.` file records.
    fn list(&mut self) -> Result<(), Error> {
        // Before anything below changes it.
        let mtime = fs::metadata(&self.dir).and_then(|m| m.modified()).ok();
        let reading = |e: std::io::Error| Error::io(format!("reading {}", self.dir.display()), &e);
        for entry in fs::read_dir(&self.dir).map_err(reading)? {
            let entry = entry.map_err(reading)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(TEMP_PREFIX) {
                let _ = fs::remove_file(entry.path());
            } else if let Some(ip) = address_named(name) {
                self.leases.insert(ip, Vec::new());
            }
        }
        let owners = self.dir.join(OWNERS_DIR);
        // Without a readable index, every lease is read: the index only ever saves reads.
        let Ok(entries) = fs::read_dir(&owners) else {
            return Ok(());
        };
        let mut dangling = Vec::new();
        let mut complete = true;
        for entry in entries {
            // A listing cut short may miss the entry naming a lease's owner: not trusted.
            let Ok(entry) = entry else {
                complete = false;
                break;
            };
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(STAMP_PREFIX) {
                self.stamps.push(name.to_string());
            } else if let Some((key, ip)) = OwnerKey::parse_entry(name) {
                match self.leases.get_mut(&ip) {
                    Some(keys) => keys.push(key),
                    None => dangling.push((key, ip)),
                }
            }
        }
        if self.writable {
            for (key, ip) in dangling {
                self.remove_entry(key, ip);
            }
        }
        let stamp = mtime.and_then(|t| stamp_name(t, self.boot_id.as_deref()));
        self.exact = complete && stamp.is_some_and(|s| self.stamps.contains(&s));
        Ok(())
    }

    /// Reads the leases of `ips`, checking each against the index (a contradiction means
    /// the index is not exact) and, in a writable store, filing it under its owner's key
    /// and no other.
    fn read(&mut self, ips: Vec<IpAddr>) -> Result<Vec<Lease>, Error> {
        let mut out = Vec::with_capacity(ips.len());
        for ip in ips {
            let lease = match self.lease_file(ip)? {
                LeaseFile::Held(lease) => lease,
                LeaseFile::Gone => {
                    let keys = self.leases.remove(&ip).unwrap_or_default();
                    if self.writable {
                        for key in keys {
                            self.remove_entry(key, ip);
                        }
                    }
                    continue;
                }
                // Left by a crash: nobody's, so the address is free again (module doc,
                // durability). A read-only call leaves it taken; a failed removal too.
                LeaseFile::Empty => {
                    if self.writable {
                        let _ = self.release(ip);
                    }
                    continue;
                }
            };
            let want = lease.owner_key();
            let keys = self.leases.get(&ip).cloned().unwrap_or_default();
            let filed_right = match want {
                Some(k) => keys.contains(&k),
                None => keys.is_empty(),
            };
            if !filed_right {
                self.exact = false;
            }
            if self.writable {
                let mut kept = Vec::new();
                for k in keys {
                    if Some(k) == want {
                        kept.push(k);
                    } else if !self.remove_entry(k, ip) {
                        self.index_failed = true;
                        kept.push(k);
                    }
                }
                if let Some(k) = want.filter(|k| !kept.contains(k)) {
                    if self.create_entry(k, ip) {
                        kept.push(k);
                    }
                }
                self.leases.insert(ip, kept);
            }
            out.push(lease);
        }
        Ok(out)
    }

    /// Creates the (empty) index entry filing `ip` under `key`. Not flushed: the index
    /// is a hint that the next call checks. Returns whether it exists now.
    ///
    /// The entry is a link to the index's one empty file: a new name, not a new inode
    /// (module doc: a new file costs 9 to 111 us, a link a few), and an ADD makes one
    /// entry per family. Where a link cannot be made, the entry is a file of its own.
    fn create_entry(&mut self, key: OwnerKey, ip: IpAddr) -> bool {
        let owners = self.dir.join(OWNERS_DIR);
        let path = owners.join(key.entry_name(ip));
        let empty = owners.join(EMPTY_FILE);
        let link = || match fs::hard_link(&empty, &path) {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            other => other,
        };
        let linked = match link() {
            Err(e) if e.kind() == ErrorKind::NotFound => self.create_empty_file().and_then(|()| link()),
            other => other,
        };
        let created = linked.or_else(|_| {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map(drop)
        });
        self.index_failed |= created.is_err();
        created.is_ok()
    }

    /// Creates the index (if needed) and its empty file, which entries are links to.
    fn create_empty_file(&self) -> std::io::Result<()> {
        self.create_owners_dir()?;
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.dir.join(OWNERS_DIR).join(EMPTY_FILE))
            .map(drop)
    }

    /// Removes an index entry; returns whether it is gone. One left behind names a lease
    /// that is gone or not its owner's: the index stays exact (module doc).
    fn remove_entry(&mut self, key: OwnerKey, ip: IpAddr) -> bool {
        let path = self.dir.join(OWNERS_DIR).join(key.entry_name(ip));
        match fs::remove_file(path) {
            Ok(()) => true,
            Err(e) => e.kind() == ErrorKind::NotFound,
        }
    }

    fn create_owners_dir(&self) -> std::io::Result<()> {
        match DirBuilder::new().mode(0o700).create(self.dir.join(OWNERS_DIR)) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    }

    /// Records that the index is exact for the lease directory as it is now: sets the
    /// directory's mtime one nanosecond back, which no later change can produce, and names
    /// the `exact-at.` file after it (module doc).
    fn stamp(&mut self) -> std::io::Result<()> {
        let now = fs::metadata(&self.dir)?.modified()?;
        if stamp_name(now, self.boot_id.as_deref()).is_some_and(|s| self.stamps.contains(&s)) {
            return Ok(()); // Nothing changed since the last stamp.
        }
        // Creating the index directory changes the lease directory: first.
        self.create_owners_dir()?;
        let dir = File::open(&self.dir)?;
        let mtime = dir.metadata()?.modified()?;
        dir.set_times(FileTimes::new().set_modified(mtime - Duration::from_nanos(1)))?;
        // As the file system stored it (some keep only seconds).
        let stamped = dir.metadata()?.modified()?;
        let name = stamp_name(stamped, self.boot_id.as_deref()).ok_or(ErrorKind::InvalidData)?;
        let owners = self.dir.join(OWNERS_DIR);
        let renamed = match self.stamps.pop() {
            Some(old) => fs::rename(owners.join(old), owners.join(&name)),
            None => Err(ErrorKind::NotFound.into()),
        };
        if renamed.is_err() {
            File::create(owners.join(&name))?;
        }
        for old in self.stamps.drain(..) {
            let _ = fs::remove_file(owners.join(old));
        }
        self.stamps.push(name);
        Ok(())
    }

    /// The cursor is a hint, not worth a flush. It is rewritten in place, one `pwrite`,
    /// when the new address is at least as long as the old one (no new file, no rename);
    /// a shorter one would leave the old one's tail behind if the call died before
    /// truncating, so it replaces the file through a temporary one and `rename`. Either
    /// way kill -9 leaves the old value or the new one.
    fn write_last_reserved(&self, set: usize, ip: IpAddr) -> Result<(), Error> {
        let name = format!("{LAST_RESERVED_PREFIX}{set}");
        let path = self.dir.join(&name);
        let text = ip.to_string();
        let in_place = || -> std::io::Result<bool> {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)?;
            if f.metadata()?.len() > text.len() as u64 {
                return Ok(false);
            }
            f.write_all_at(text.as_bytes(), 0)?;
            Ok(true)
        };
        let replace = || -> std::io::Result<()> {
            let tmp = self
                .dir
                .join(format!("{TEMP_PREFIX}{}-{name}", std::process::id()));
            let renamed = fs::write(&tmp, &text).and_then(|()| fs::rename(&tmp, &path));
            if renamed.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            renamed
        };
        match in_place() {
            Ok(true) => Ok(()),
            Ok(false) => replace(),
            Err(e) => Err(e),
        }
        .map_err(|e| Error::io(format!("writing {}", path.display()), &e))
    }

    /// Creates `name` with `data`, complete or not at all, through a named temporary file
    /// (where there is no prepared one); `Ok(false)` if it exists.
    fn create_exclusive(&self, name: &str, data: &[u8]) -> Result<bool, Error> {
        let tmp = self
            .dir
            .join(format!("{TEMP_PREFIX}{}-{name}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(data)
        };
        let linked = write().and_then(|()| fs::hard_link(&tmp, self.dir.join(name)));
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::io(
                format!("creating {}", self.dir.join(name).display()),
                &e,
            )),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.writable && self.exact && !self.index_failed {
            // Best effort: without a stamp, the next call reads every lease and stamps.
            let _ = self.stamp();
        }
    }
}

/// The address a lease file named `name` is for, if `name` is an address written as both
/// plugins write them: host-local would not see "fd00:0::5" when it creates "fd00::5".
fn address_named(name: &str) -> Option<IpAddr> {
    // Called for every name in the store on every call: no allocation.
    struct Buf([u8; 48], usize);
    impl std::fmt::Write for Buf {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let end = self.1 + s.len();
            self.0
                .get_mut(self.1..end)
                .ok_or(std::fmt::Error)?
                .copy_from_slice(s.as_bytes());
            self.1 = end;
            Ok(())
        }
    }
    let ip: IpAddr = name.parse().ok()?;
    // The IPv4 parser takes the canonical dotted form only (no leading zeros).
    if ip.is_ipv6() {
        let mut buf = Buf([0; 48], 0);
        std::fmt::Write::write_fmt(&mut buf, format_args!("{ip}")).ok()?;
        if &buf.0[..buf.1] != name.as_bytes() {
            return None;
        }
    }
    Some(ip)
}

/// The name of the `exact-at.` file recording mtime `t` in boot `boot_id`.
fn stamp_name(t: SystemTime, boot_id: Option<&str>) -> Option<String> {
    let d = t.duration_since(UNIX_EPOCH).ok()?;
    let name = format!("{STAMP_PREFIX}{}.{:09}", d.as_secs(), d.subsec_nanos());
    Some(match boot_id {
        Some(boot) => format!("{name}.{boot}"),
        None => name,
    })
}

/// The kernel's id of this boot, a UUID; `None` without /proc.
fn boot_id() -> Option<String> {
    let id = fs::read_to_string(BOOT_ID).ok()?;
    let id = id.trim();
    // As it goes into a file name: the UUID's characters only.
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then(|| id.to_string())
}

/// Whether `dir` can hold leases: for STATUS, which must not create anything to find out.
pub fn check_usable(dir: &Path) -> Result<(), Error> {
    // The first existing ancestor must be a writable directory.
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    let meta = fs::metadata(probe).map_err(|e| Error::io(format!("{}", probe.display()), &e))?;
    if !meta.is_dir() {
        return Err(Error::new(
            Code::Io,
            format!("{} is not a directory", probe.display()),
            "",
        ));
    }
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).expect("paths have no NUL");
    // SAFETY: access(2) reads a NUL-terminated path we own.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::io(format!("{} is not writable", probe.display()), &e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(ip: &str, id: &str, ifname: &str) -> Lease {
        Lease {
            ip: ip.parse().unwrap(),
            container_id: id.into(),
            ifname: Some(ifname.into()),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn entry(dir: &Path, id: &str, ifname: &str, ip: &str) -> PathBuf {
        dir.join(OWNERS_DIR)
            .join(OwnerKey::of(id, ifname).entry_name(ip.parse().unwrap()))
    }

    /// The names in the index, stamp and shared empty file excluded.
    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join(OWNERS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with(STAMP_PREFIX) && n != EMPTY_FILE)
            .collect();
        names.sort();
        names
    }

    /// Writes a lease as host-local does: an exclusive create in place, no index entry.
    fn host_local_writes(dir: &Path, ip: &str, content: &str) {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(ip))
            .unwrap();
        f.write_all(content.as_bytes()).unwrap();
    }

    /// Runs `change` on the lease directory, then puts its mtime back: a change the stamp
    /// cannot see, to show what a trusted index does (and does not) read.
    fn unseen(dir: &Path, change: impl FnOnce()) {
        let mtime = fs::metadata(dir).unwrap().modified().unwrap();
        change();
        File::open(dir)
            .unwrap()
            .set_times(FileTimes::new().set_modified(mtime))
            .unwrap();
    }

    /// A store as ferry-ipam leaves it: `owners` each hold a lease, the index stamped exact.
    fn stamped_store(dir: &Path, owners: &[(&str, &str)]) {
        let mut s = Store::open(dir).unwrap();
        s.all_leases().unwrap(); // What a call does first; an index never read is not exact.
        for (ip, id) in owners {
            assert!(s.reserve(&lease(ip, id, "eth0"), 0).unwrap());
        }
        drop(s);
        assert!(Store::open(dir).unwrap().exact, "the index was stamped exact");
    }

    #[test]
    fn writes_host_local_bytes_and_reads_them_back() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(d.path()).unwrap();
        assert!(s.reserve(&lease("10.0.0.2", "c1", "eth0"), 0).unwrap());
        assert!(s.reserve(&lease("fd00::2", "c1", "eth0"), 1).unwrap());
        assert_eq!(fs::read(d.path().join("10.0.0.2")).unwrap(), b"c1\r\neth0");
        assert_eq!(fs::read(d.path().join("last_reserved_ip.1")).unwrap(), b"fd00::2");
        assert_eq!(s.last_reserved(0), Some("10.0.0.2".parse().unwrap()));
        let mut got = s.all_leases().unwrap();
        got.sort_by_key(|l| l.ip);
        assert_eq!(
            got,
            vec![lease("10.0.0.2", "c1", "eth0"), lease("fd00::2", "c1", "eth0")]
        );
        assert!(d.path().join("lock").exists());
    }

    #[test]
    fn an_address_is_never_leased_twice() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(d.path()).unwrap();
        assert!(s.reserve(&lease("10.0.0.2", "c1", "eth0"), 0).unwrap());
        assert!(!s.reserve(&lease("10.0.0.2", "c2", "eth0"), 0).unwrap());
        assert_eq!(fs::read(d.path().join("10.0.0.2")).unwrap(), b"c1\r\neth0");
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            !names.iter().any(|n| n.to_string_lossy().starts_with(TEMP_PREFIX)),
            "{names:?}"
        );
        // Also when the listing did not show the lease (a writer that skips the lock).
        host_local_writes(d.path(), "10.0.0.3", "hl\r\neth0");
        assert!(!s.reserve(&lease("10.0.0.3", "c2", "eth0"), 0).unwrap());
        assert_eq!(fs::read(d.path().join("10.0.0.3")).unwrap(), b"hl\r\neth0");
        assert!(!entry(d.path(), "c2", "eth0", "10.0.0.3").exists());
    }

    #[test]
    fn old_id_only_leases_match_any_ifname() {
        let l = Lease::parse("10.0.0.2".parse().unwrap(), "c1\n");
        assert_eq!(l.ifname, None);
        assert!(l.belongs_to("c1", "eth1"));
        assert!(!l.belongs_to("c2", "eth1"));
    }

    #[test]
    fn leftover_temp_files_are_removed_when_leases_are_read() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(format!("{TEMP_PREFIX}999-10.0.0.9")), "c9\r\neth0").unwrap();
        let mut s = Store::open(d.path()).unwrap();
        assert_eq!(s.all_leases().unwrap(), vec![]);
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "only the lock file is left"
        );
    }

    #[test]
    fn release_is_idempotent() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(d.path()).unwrap();
        s.reserve(&lease("10.0.0.2", "c1", "eth0"), 0).unwrap();
        s.release("10.0.0.2".parse().unwrap()).unwrap();
        s.release("10.0.0.2".parse().unwrap()).unwrap();
        assert!(s.all_leases().unwrap().is_empty());
    }

    #[test]
    fn each_lease_is_filed_under_its_owner_in_an_empty_file() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(d.path()).unwrap();
        assert!(s.reserve(&lease("10.0.0.2", "c1", "eth0"), 0).unwrap());
        assert!(s.reserve(&lease("fd00::2", "c1", "eth0"), 1).unwrap());
        assert!(s.reserve(&lease("10.0.0.3", "c1", "eth1"), 0).unwrap());
        let key = OwnerKey::of("c1", "eth0");
        assert_eq!(key.to_string().len(), 16);
        assert_ne!(key, OwnerKey::of("c1", "eth1"));
        assert_eq!(
            entries(d.path()),
            [
                format!("{key}.10.0.0.2"),
                format!("{key}.fd00::2"),
                format!("{}.10.0.0.3", OwnerKey::of("c1", "eth1")),
            ]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
        );
        // Empty, so host-local's walk never takes one for a lease of the attachment.
        assert_eq!(
            fs::metadata(entry(d.path(), "c1", "eth0", "10.0.0.2"))
                .unwrap()
                .len(),
            0
        );
        s.release(ip("10.0.0.2")).unwrap();
        assert!(!entry(d.path(), "c1", "eth0", "10.0.0.2").exists());
        assert!(entry(d.path(), "c1", "eth0", "fd00::2").exists());
        assert_eq!(
            OwnerKey::parse_entry(&format!("{key}.fd00::2")),
            Some((key, ip("fd00::2")))
        );
        assert_eq!(OwnerKey::parse_entry(&format!("{key}.fd00:0::2")), None);
        assert_eq!(OwnerKey::parse_entry("exact-at.1.000000000"), None);
    }

    #[test]
    fn a_trusted_index_reads_no_lease_of_another_attachment() {
        let d = tempfile::tempdir().unwrap();
        let others: Vec<(String, String)> = (10..60)
            .map(|i| (format!("10.0.0.{i}"), format!("other{i}")))
            .collect();
        let mut owners: Vec<(&str, &str)> = others.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        owners.push(("10.0.0.5", "me"));
        stamped_store(d.path(), &owners);
        // Every other lease becomes something that cannot be read as a file. The change is
        // hidden from the stamp: a read of any of them would fail the call.
        unseen(d.path(), || {
            for (a, _) in &others {
                fs::remove_file(d.path().join(a)).unwrap();
                fs::create_dir(d.path().join(a)).unwrap();
            }
        });
        let mut s = Store::open(d.path()).unwrap();
        assert!(s.exact);
        assert_eq!(
            s.leases_of("me", "eth0").unwrap(),
            vec![lease("10.0.0.5", "me", "eth0")]
        );
        assert_eq!(s.leases_of("new", "eth0").unwrap(), vec![]);
        assert_eq!(s.addresses().len(), 51, "the other leases are still taken");
        assert!(s.reserve(&lease("10.0.0.60", "new", "eth0"), 0).unwrap());
        s.release(ip("10.0.0.5")).unwrap();
        drop(s);

        // The same directory with the change seen: every lease is read, and the call fails.
        fs::write(d.path().join("stray"), "").unwrap();
        let mut s = Store::open(d.path()).unwrap();
        assert!(!s.exact);
        let err = s.leases_of("new", "eth0").unwrap_err();
        assert!(err.msg.contains("reading lease"), "{}", err.msg);
    }

    #[test]
    fn leases_host_local_wrote_are_found_and_then_indexed() {
        let d = tempfile::tempdir().unwrap();
        stamped_store(d.path(), &[("10.0.0.2", "fy")]);
        host_local_writes(d.path(), "10.0.0.3", "hl\r\neth0");
        host_local_writes(d.path(), "10.0.0.4", "old"); // id-only: an old host-local
        let mut s = Store::open(d.path()).unwrap();
        assert!(!s.exact, "host-local changed the directory");
        assert_eq!(
            s.leases_of("hl", "eth0").unwrap(),
            vec![lease("10.0.0.3", "hl", "eth0")]
        );
        assert_eq!(s.leases_of("old", "eth3").unwrap()[0].ip, ip("10.0.0.4"));
        drop(s);
        assert_eq!(
            entries(d.path()),
            [
                OwnerKey::of("fy", "eth0").entry_name(ip("10.0.0.2")),
                OwnerKey::of("hl", "eth0").entry_name(ip("10.0.0.3")),
            ]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>(),
            "host-local's lease is indexed; the id-only one is filed under no key"
        );
        let mut s = Store::open(d.path()).unwrap();
        assert!(s.exact, "repaired and stamped");
        assert_eq!(s.leases_of("old", "eth0").unwrap()[0].ip, ip("10.0.0.4"));
    }

    #[test]
    fn an_unindexed_lease_is_read_even_when_the_index_is_trusted() {
        let d = tempfile::tempdir().unwrap();
        stamped_store(d.path(), &[("10.0.0.2", "fy")]);
        unseen(d.path(), || host_local_writes(d.path(), "10.0.0.3", "hl\r\neth0"));
        let mut s = Store::open(d.path()).unwrap();
        assert!(s.exact);
        assert_eq!(
            s.leases_of("hl", "eth0").unwrap(),
            vec![lease("10.0.0.3", "hl", "eth0")]
        );
        assert!(entry(d.path(), "hl", "eth0", "10.0.0.3").exists());
    }

    #[test]
    fn an_address_host_local_gave_to_another_container_is_its_new_owners() {
        let d = tempfile::tempdir().unwrap();
        stamped_store(d.path(), &[("10.0.0.2", "k"), ("10.0.0.3", "x")]);
        // host-local releases k's lease (leaving ferry's entry), then leases the address to j.
        fs::remove_file(d.path().join("10.0.0.2")).unwrap();
        host_local_writes(d.path(), "10.0.0.2", "j\r\neth0");
        let mut s = Store::open(d.path()).unwrap();
        assert_eq!(
            s.leases_of("j", "eth0").unwrap(),
            vec![lease("10.0.0.2", "j", "eth0")]
        );
        assert_eq!(s.leases_of("k", "eth0").unwrap(), vec![]);
        drop(s);
        assert!(!entry(d.path(), "k", "eth0", "10.0.0.2").exists());
        assert!(entry(d.path(), "j", "eth0", "10.0.0.2").exists());

        // The same, hidden from the stamp (which is what the stamp is for): when a lease
        // read contradicts its entry, every lease is read and the index repaired.
        unseen(d.path(), || {
            fs::remove_file(d.path().join("10.0.0.3")).unwrap();
            host_local_writes(d.path(), "10.0.0.3", "k\r\neth0");
        });
        let mut s = Store::open(d.path()).unwrap();
        assert!(s.exact);
        assert_eq!(s.leases_of("x", "eth0").unwrap(), vec![]);
        assert!(!entry(d.path(), "x", "eth0", "10.0.0.3").exists());
        assert!(entry(d.path(), "k", "eth0", "10.0.0.3").exists());
        assert_eq!(
            s.leases_of("k", "eth0").unwrap(),
            vec![lease("10.0.0.3", "k", "eth0")]
        );
    }

    #[test]
    fn entries_whose_lease_is_gone_are_removed() {
        let d = tempfile::tempdir().unwrap();
        stamped_store(d.path(), &[("10.0.0.2", "c1"), ("10.0.0.3", "c2")]);
        // A DEL killed between its two removals; host-local's DEL, which leaves entries.
        fs::remove_file(d.path().join("10.0.0.2")).unwrap();
        fs::remove_file(d.path().join("10.0.0.3")).unwrap();
        // An ADD killed between creating the entry and linking the lease.
        fs::write(entry(d.path(), "c3", "eth0", "10.0.0.4"), "").unwrap();
        drop(Store::open_read_only(d.path()).unwrap());
        assert_eq!(
            entries(d.path()).len(),
            3,
            "a read-only call leaves the index alone"
        );
        let mut s = Store::open(d.path()).unwrap();
        assert_eq!(entries(d.path()), Vec::<String>::new());
        assert!(s.addresses().is_empty());
        assert_eq!(s.leases_of("c3", "eth0").unwrap(), vec![]);
        assert!(s.reserve(&lease("10.0.0.4", "c4", "eth0"), 0).unwrap());
        assert_eq!(
            entries(d.path()),
            [OwnerKey::of("c4", "eth0").entry_name(ip("10.0.0.4"))]
        );
    }

    #[test]
    fn a_call_killed_before_its_stamp_leaves_the_index_untrusted() {
        let d = tempfile::tempdir().unwrap();
        stamped_store(d.path(), &[("10.0.0.2", "c1")]);
        // What a killed ADD leaves: its entry and lease, the stamp of the call before.
        fs::write(entry(d.path(), "c2", "eth0", "10.0.0.3"), "").unwrap();
        fs::write(d.path().join("10.0.0.3"), "c2\r\neth0").unwrap();
        let mut s = Store::open(d.path()).unwrap();
        assert!(!s.exact);
        assert_eq!(
            s.leases_of("c2", "eth0").unwrap(),
            vec![lease("10.0.0.3", "c2", "eth0")]
        );
        assert!(s.exact, "every lease was read and filed: exact again");
    }

    #[test]
    fn the_stamp_is_the_directory_mtime_and_read_only_stores_leave_it() {
        let d = tempfile::tempdir().unwrap();
        stamped_store(d.path(), &[("10.0.0.2", "c1")]);
        let mtime = fs::metadata(d.path()).unwrap().modified().unwrap();
        let stamp = stamp_name(mtime, boot_id().as_deref()).unwrap();
        assert!(d.path().join(OWNERS_DIR).join(&stamp).exists());
        // A call that changes nothing leaves everything as it was.
        let mut s = Store::open(d.path()).unwrap();
        s.leases_of("c1", "eth0").unwrap();
        drop(s);
        assert_eq!(fs::metadata(d.path()).unwrap().modified().unwrap(), mtime);
        // A read-only call does not stamp a changed directory.
        host_local_writes(d.path(), "10.0.0.3", "hl\r\neth0");
        let mut s = Store::open_read_only(d.path()).unwrap();
        assert_eq!(s.leases_of("hl", "eth0").unwrap().len(), 1);
        drop(s);
        assert!(!Store::open_read_only(d.path()).unwrap().exact);
        assert!(!entry(d.path(), "hl", "eth0", "10.0.0.3").exists());
        // A writable one repairs and stamps, replacing the old stamp.
        drop(Store::open(d.path()).unwrap().all_leases().unwrap());
        let stamps: Vec<_> = fs::read_dir(d.path().join(OWNERS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(STAMP_PREFIX))
            .collect();
        assert_eq!(stamps.len(), 1);
        assert_ne!(stamps[0], stamp);
        assert!(Store::open(d.path()).unwrap().exact);
    }

    #[test]
    fn an_add_links_one_file_written_before_the_lock_for_all_its_leases() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open_to_add(d.path(), "c1", "eth0").unwrap();
        assert!(s.prepared.is_some(), "O_TMPFILE works here");
        s.leases_of("c1", "eth0").unwrap();
        assert!(s.reserve(&lease("10.0.0.2", "c1", "eth0"), 0).unwrap());
        assert!(s.reserve(&lease("fd00::2", "c1", "eth0"), 1).unwrap());
        let (v4, v6) = (
            fs::metadata(d.path().join("10.0.0.2")).unwrap(),
            fs::metadata(d.path().join("fd00::2")).unwrap(),
        );
        assert_eq!((v4.ino(), v4.nlink()), (v6.ino(), 2), "two names of one file");
        assert_eq!(fs::read(d.path().join("fd00::2")).unwrap(), b"c1\r\neth0");
        // Taken addresses are refused as before, and nothing is left but leases and the index.
        assert!(!s.reserve(&lease("10.0.0.2", "c1", "eth0"), 0).unwrap());
        drop(s);
        let mut names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ".ferry-owners",
                "10.0.0.2",
                "fd00::2",
                "last_reserved_ip.0",
                "last_reserved_ip.1",
                "lock"
            ]
        );
        assert_eq!(entries(d.path()).len(), 2);
    }

    #[test]
    fn an_add_that_reserves_nothing_leaves_nothing_and_other_leases_get_their_own_file() {
        let d = tempfile::tempdir().unwrap();
        drop(Store::open_to_add(d.path(), "c1", "eth0").unwrap());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1, "only the lock file");

        let mut s = Store::open_to_add(d.path(), "c1", "eth0").unwrap();
        assert!(s.reserve(&lease("10.0.0.3", "c2", "eth0"), 0).unwrap());
        assert_eq!(fs::read(d.path().join("10.0.0.3")).unwrap(), b"c2\r\neth0");
        // Linked, then released (a rollback): the file cannot be linked again.
        assert!(s.reserve(&lease("10.0.0.4", "c1", "eth0"), 0).unwrap());
        s.release(ip("10.0.0.4")).unwrap();
        assert!(s.reserve(&lease("10.0.0.5", "c1", "eth0"), 0).unwrap());
        assert!(s.prepared.is_none());
        assert_eq!(fs::read(d.path().join("10.0.0.5")).unwrap(), b"c1\r\neth0");
        assert_eq!(s.last_reserved(0), Some(ip("10.0.0.5")));
    }

    /// Renames the stamp as if it had been made in an earlier boot: what the store looks
    /// like to the first call after a reboot.
    fn stamped_in_an_earlier_boot(dir: &Path) {
        let owners = dir.join(OWNERS_DIR);
        for e in fs::read_dir(&owners).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            if name.starts_with(STAMP_PREFIX) {
                let (at, _boot) = name.rsplit_once('.').unwrap();
                fs::rename(
                    owners.join(&name),
                    owners.join(format!("{at}.00000000-0000-4000-8000-000000000000")),
                )
                .unwrap();
            }
        }
    }

    #[test]
    fn an_empty_lease_left_by_a_killed_writer_is_nobodys_and_its_address_free() {
        let d = tempfile::tempdir().unwrap();
        stamped_store(d.path(), &[("10.0.0.2", "c1")]);
        // host-local killed between its create and its write.
        host_local_writes(d.path(), "10.0.0.3", "");
        let mut s = Store::open_read_only(d.path()).unwrap();
        assert_eq!(s.all_leases().unwrap(), vec![lease("10.0.0.2", "c1", "eth0")]);
        assert!(
            s.addresses().contains(&ip("10.0.0.3")),
            "a read-only call frees nothing"
        );
        drop(s);
        assert!(d.path().join("10.0.0.3").exists());

        let mut s = Store::open(d.path()).unwrap();
        assert_eq!(s.leases_of("c2", "eth0").unwrap(), vec![]);
        assert!(!d.path().join("10.0.0.3").exists(), "removed under the lock");
        assert_eq!(s.addresses(), HashSet::from([ip("10.0.0.2")]));
        assert!(s.reserve(&lease("10.0.0.3", "c2", "eth0"), 0).unwrap());
        assert_eq!(fs::read(d.path().join("10.0.0.3")).unwrap(), b"c2\r\neth0");
        // A lease of two bytes is not empty: whoever wrote it, it stays held.
        host_local_writes(d.path(), "10.0.0.4", "\r\n");
        drop(s);
        let mut s = Store::open(d.path()).unwrap();
        s.all_leases().unwrap();
        assert!(s.addresses().contains(&ip("10.0.0.4")));
    }

    #[test]
    fn the_first_call_after_a_reboot_frees_the_empty_leases_a_power_cut_left() {
        let d = tempfile::tempdir().unwrap();
        stamped_store(d.path(), &[("10.0.0.2", "c1"), ("10.0.0.3", "c2")]);
        // What a power cut leaves (module doc): the names and index were journaled, the
        // bytes of one lease were not. Emptying a file does not change the directory.
        fs::write(d.path().join("10.0.0.2"), "").unwrap();
        // In the same boot the index is trusted: an empty lease is not read, and stays
        // taken (it cannot be a live lease's, but only a call that reads it knows).
        let mut s = Store::open(d.path()).unwrap();
        assert!(s.exact);
        assert_eq!(s.leases_of("c3", "eth0").unwrap(), vec![]);
        assert!(s.addresses().contains(&ip("10.0.0.2")));
        drop(s);
        // After the reboot, the stamp is of another boot: every lease is read.
        stamped_in_an_earlier_boot(d.path());
        let mut s = Store::open(d.path()).unwrap();
        assert!(!s.exact, "a stamp of an earlier boot is not trusted");
        assert_eq!(s.leases_of("c3", "eth0").unwrap(), vec![]);
        assert_eq!(s.addresses(), HashSet::from([ip("10.0.0.3")]));
        assert!(!d.path().join("10.0.0.2").exists());
        assert_eq!(
            entries(d.path()),
            [OwnerKey::of("c2", "eth0").entry_name(ip("10.0.0.3"))]
        );
        drop(s);
        assert!(
            Store::open(d.path()).unwrap().exact,
            "stamped again, in this boot"
        );
        assert!(stamp_name(UNIX_EPOCH, boot_id().as_deref())
            .unwrap()
            .ends_with(&boot_id().expect("/proc is mounted")));
    }

    #[test]
    fn index_entries_are_names_of_one_empty_file_or_files_of_their_own() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(d.path()).unwrap();
        assert!(s.reserve(&lease("10.0.0.2", "c1", "eth0"), 0).unwrap());
        assert!(s.reserve(&lease("10.0.0.3", "c2", "eth0"), 0).unwrap());
        let meta = |id, ip| fs::metadata(entry(d.path(), id, "eth0", ip)).unwrap();
        let shared = fs::metadata(d.path().join(OWNERS_DIR).join(EMPTY_FILE)).unwrap();
        assert_eq!((shared.len(), shared.nlink()), (0, 3), "the file and two entries");
        assert_eq!(meta("c1", "10.0.0.2").ino(), shared.ino());
        assert_eq!(meta("c2", "10.0.0.3").ino(), shared.ino());
        // Removed: made again, a new inode.
        fs::remove_file(d.path().join(OWNERS_DIR).join(EMPTY_FILE)).unwrap();
        assert!(s.reserve(&lease("10.0.0.4", "c3", "eth0"), 0).unwrap());
        assert_eq!(meta("c3", "10.0.0.4").nlink(), 2);
        // Where no link can be made, an entry is an empty file of its own.
        fs::remove_file(d.path().join(OWNERS_DIR).join(EMPTY_FILE)).unwrap();
        fs::create_dir(d.path().join(OWNERS_DIR).join(EMPTY_FILE)).unwrap();
        assert!(s.reserve(&lease("10.0.0.5", "c4", "eth0"), 0).unwrap());
        assert_eq!(
            (meta("c4", "10.0.0.5").len(), meta("c4", "10.0.0.5").nlink()),
            (0, 1)
        );
        assert!(!s.index_failed);
        s.release(ip("10.0.0.2")).unwrap();
        assert_eq!(
            meta("c2", "10.0.0.3").nlink(),
            1,
            "the link of a released lease is gone"
        );
    }

    #[test]
    fn the_cursor_is_rewritten_in_place_unless_it_gets_shorter() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let cursor = d.path().join("last_reserved_ip.0");
        let mut s = Store::open(d.path()).unwrap();
        s.reserve(&lease("10.0.0.10", "c1", "eth0"), 0).unwrap();
        let ino = fs::metadata(&cursor).unwrap().ino();
        s.reserve(&lease("10.0.0.11", "c2", "eth0"), 0).unwrap();
        s.reserve(&lease("10.0.0.100", "c3", "eth0"), 0).unwrap();
        assert_eq!(fs::metadata(&cursor).unwrap().ino(), ino, "rewritten in place");
        assert_eq!(fs::read(&cursor).unwrap(), b"10.0.0.100");
        s.reserve(&lease("10.0.0.9", "c4", "eth0"), 0).unwrap();
        assert_eq!(fs::read(&cursor).unwrap(), b"10.0.0.9");
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            7,
            "4 leases, cursor, lock, index"
        );
    }
}
