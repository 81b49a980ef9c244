//! Leases on disk, in host-local's own layout, so a node can switch between host-local
//! and ferry-ipam without losing a lease:
//!
//! ```text
//! <dataDir>/<network>/
//!     lock                    flock'ed for the length of every call (host-local locks it too)
//!     10.22.0.5               one file per leased address: "<container id>\r\n<ifname>"
//!     fd00:22::5
//!     last_reserved_ip.0      the last address handed out in range set 0 (round-robin cursor)
//! ```
//!
//! What host-local does not do: a lease is written to a temporary file, flushed to disk,
//! then linked into place. `link` fails if the name exists, so it is an exclusive create
//! whose file is never seen empty or half-written, even after kill -9 or a power cut.
//! Temporary files a killed call left behind are removed by the next call, under the lock.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cni::{Code, Error};

const LOCK_FILE: &str = "lock";
const LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";
const TEMP_PREFIX: &str = ".ferry-tmp-";
/// host-local's separator between container id and ifname.
const LINE_BREAK: &str = "\r\n";

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
        format!(
            "{}{LINE_BREAK}{}",
            self.container_id.trim(),
            self.ifname.as_deref().unwrap_or("")
        )
    }
}

/// The lease directory of one network, locked for as long as this value lives.
pub struct Store {
    dir: PathBuf,
    /// Held for its flock; closing the file releases it.
    _lock: File,
}

impl Store {
    /// Creates the directory if needed and takes the lock, waiting for other calls.
    pub fn open(dir: &Path) -> Result<Store, Error> {
        fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating lease directory {}", dir.display()), &e))?;
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
        Ok(Store {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every lease in the directory. Files whose name is not an address are not leases;
    /// temporary files a killed call left behind are removed on the way (we hold the lock,
    /// so no live call is writing one).
    pub fn leases(&self) -> Result<Vec<Lease>, Error> {
        let entries =
            fs::read_dir(&self.dir).map_err(|e| Error::io(format!("reading {}", self.dir.display()), &e))?;
        let mut leases = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("reading {}", self.dir.display()), &e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(TEMP_PREFIX) {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Ok(ip) = name.parse::<IpAddr>() else {
                continue;
            };
            match fs::read_to_string(entry.path()) {
                Ok(content) => leases.push(Lease::parse(ip, &content)),
                // Released by host-local between read_dir and read: it does not lock DEL's walk.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("reading lease {}", entry.path().display()), &e)),
            }
        }
        Ok(leases)
    }

    /// The round-robin cursor of range set `set`; unreadable means "start from the top".
    pub fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        let text = fs::read_to_string(self.dir.join(format!("{LAST_RESERVED_PREFIX}{set}"))).ok()?;
        text.trim().parse().ok()
    }

    /// Writes the lease unless its address is already leased; `Ok(false)` when it is.
    pub fn reserve(&self, lease: &Lease, set: usize) -> Result<bool, Error> {
        let name = lease.ip.to_string();
        let created = self.create_exclusive(&name, lease.content().as_bytes(), true)?;
        if created {
            self.write_last_reserved(set, lease.ip)?;
        }
        Ok(created)
    }

    /// Removes a lease; one that is already gone is fine (DEL is idempotent).
    pub fn release(&self, ip: IpAddr) -> Result<(), Error> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing lease {}", path.display()), &e)),
        }
    }

    /// The cursor is a hint: replaced atomically (rename), but not worth a flush.
    fn write_last_reserved(&self, set: usize, ip: IpAddr) -> Result<(), Error> {
        let name = format!("{LAST_RESERVED_PREFIX}{set}");
        let tmp = self.write_temp(&name, ip.to_string().as_bytes(), false)?;
        fs::rename(&tmp, self.dir.join(&name)).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(format!("replacing {}", self.dir.join(&name).display()), &e)
        })
    }

    /// Creates `name` with `data`, complete or not at all; `Ok(false)` if it exists.
    fn create_exclusive(&self, name: &str, data: &[u8], durable: bool) -> Result<bool, Error> {
        let tmp = self.write_temp(name, data, durable)?;
        let linked = fs::hard_link(&tmp, self.dir.join(name));
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

    fn write_temp(&self, name: &str, data: &[u8], durable: bool) -> Result<PathBuf, Error> {
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
            f.write_all(data)?;
            if durable {
                f.sync_data()?;
            }
            Ok(())
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(format!("writing {}", tmp.display()), &e)
        })?;
        Ok(tmp)
    }
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

    #[test]
    fn writes_host_local_bytes_and_reads_them_back() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        assert!(s.reserve(&lease("10.0.0.2", "c1", "eth0"), 0).unwrap());
        assert!(s.reserve(&lease("fd00::2", "c1", "eth0"), 1).unwrap());
        assert_eq!(fs::read(d.path().join("10.0.0.2")).unwrap(), b"c1\r\neth0");
        assert_eq!(fs::read(d.path().join("last_reserved_ip.1")).unwrap(), b"fd00::2");
        assert_eq!(s.last_reserved(0), Some("10.0.0.2".parse().unwrap()));
        let mut got = s.leases().unwrap();
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
        let s = Store::open(d.path()).unwrap();
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
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.leases().unwrap(), vec![]);
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "only the lock file is left"
        );
    }

    #[test]
    fn release_is_idempotent() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        s.reserve(&lease("10.0.0.2", "c1", "eth0"), 0).unwrap();
        s.release("10.0.0.2".parse().unwrap()).unwrap();
        s.release("10.0.0.2".parse().unwrap()).unwrap();
        assert!(s.leases().unwrap().is_empty());
    }
}
