//! The few kernel interfaces aya does not wrap for us: which file system a path is on,
//! mounting bpffs where `ip netns exec` left none, and asking a cgroup which programs are
//! attached to it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::Error;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// Where bpffs lives by convention, and the one place we mount it ourselves.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

// The magic's type (__fsword_t) is i64 here but narrower on some architectures.
#[allow(clippy::unnecessary_cast)]
fn fs_magic(path: &Path) -> Option<i64> {
    nix::sys::statfs::statfs(path)
        .ok()
        .map(|s| s.filesystem_type().0 as i64)
}

/// Opens `path` as a cgroup v2 directory.
pub(crate) fn open_cgroup2(path: &Path) -> Result<File, Error> {
    let file = File::open(path).map_err(|source| Error::Cgroup {
        path: path.to_owned(),
        source,
    })?;
    if fs_magic(path) != Some(CGROUP2_SUPER_MAGIC) {
        return Err(Error::NotCgroup2 {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

/// Makes sure `pin_dir` is on a bpf file system, then creates it.
///
/// `ip netns exec` gives its command a fresh /sys without bpffs: then, and only for pin
/// directories under /sys/fs/bpf, a bpffs is mounted there (in that command's mount
/// namespace: pins made in it are not seen by other mount namespaces, so a daemon that
/// must find its pins after a restart is better started with nsenter).
pub(crate) fn prepare_pin_dir(pin_dir: &Path) -> Result<(), Error> {
    let existing = pin_dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if fs_magic(existing) != Some(BPF_FS_MAGIC) {
        let root = Path::new(BPFFS_ROOT);
        if !pin_dir.starts_with(root) || fs_magic(root) == Some(BPF_FS_MAGIC) {
            return Err(Error::NotBpffs {
                path: pin_dir.to_owned(),
            });
        }
        std::fs::create_dir_all(root).map_err(|source| Error::PinDir {
            path: root.to_owned(),
            source,
        })?;
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| Error::MountBpffs { source })?;
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| Error::PinDir {
        path: pin_dir.to_owned(),
        source,
    })
}

/// Where the cgroup v2 hierarchy's root is mounted as this process sees it (the first
/// `cgroup2` mount of the root cgroup in /proc/self/mountinfo: /sys/fs/cgroup on unified
/// systems, /sys/fs/cgroup/unified on hybrid ones).
///
/// `ip netns exec` gives its command a fresh /sys with no cgroup mount at all: then the
/// hierarchy is mounted on /sys/fs/cgroup, which is an empty directory in that fresh /sys and
/// private to the command's mount namespace. It is the same hierarchy, so programs attached
/// through it act on the node's processes as through any other mount.
pub fn cgroup2_root() -> Result<PathBuf, Error> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| Error::PinDir {
        path: PathBuf::from("/proc/self/mountinfo"),
        source,
    })?;
    if let Some(found) = mountinfo.lines().find_map(cgroup2_root_mount) {
        return Ok(found);
    }
    let target = Path::new("/sys/fs/cgroup");
    nix::mount::mount(
        Some("cgroup2"),
        target,
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| Error::MountCgroup2 { source })?;
    Ok(target.to_owned())
}

/// The mount point of a mountinfo line that mounts the root of the cgroup v2 hierarchy.
fn cgroup2_root_mount(line: &str) -> Option<PathBuf> {
    // "<id> <parent> <maj:min> <root> <mount point> <options> [<optional>...] - <type> ..."
    let (before, after) = line.split_once(" - ")?;
    let fstype = after.split_whitespace().next()?;
    let mut fields = before.split_whitespace();
    let root = fields.nth(3)?;
    let mount_point = fields.next()?;
    // Spaces and the like are octal-escaped; a cgroup mount point with them is not ours.
    (fstype == "cgroup2" && root == "/" && !mount_point.contains('\\')).then(|| PathBuf::from(mount_point))
}

/// The ids of the programs attached to `cgroup` (directly, not inherited) for one attach
/// type (`BPF_PROG_QUERY`, Linux 4.15).
pub fn attached_program_ids(cgroup: &Path, attach_type: u32) -> Result<Vec<u32>, Error> {
    let err = |source| Error::Query {
        path: cgroup.to_owned(),
        source,
    };
    let dir = File::open(cgroup).map_err(err)?;
    let mut ids = [0u32; 64];
    // union bpf_attr's `query` member, zero beyond the fields we set, as the kernel checks.
    let mut attr = [0u64; 16];
    let words = attr.as_mut_ptr() as *mut u32;
    // SAFETY: offsets are those of `struct { target_fd; attach_type; query_flags;
    // attach_flags; prog_ids; prog_cnt; ... } query` in linux/bpf.h, all inside `attr`.
    let rc = unsafe {
        *words = dir.as_raw_fd() as u32;
        *words.add(1) = attach_type;
        *(attr.as_mut_ptr().add(2)) = ids.as_mut_ptr() as u64;
        *words.add(6) = ids.len() as u32;
        libc::syscall(
            libc::SYS_bpf,
            16, /* BPF_PROG_QUERY */
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel wrote prog_cnt at the same place.
    let count = unsafe { *words.add(6) } as usize;
    Ok(ids[..count.min(ids.len())].to_vec())
}

/// The link pins under `pin_dir`.
pub(crate) fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

pub(crate) fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_root_mount_is_found_in_mountinfo() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_root_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let v1 = "36 25 0:31 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu";
        assert_eq!(cgroup2_root_mount(v1), None);
        // A container's view of its own sub-cgroup is not the root.
        let nested = "40 25 0:30 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        assert_eq!(cgroup2_root_mount(nested), None);
    }
}
