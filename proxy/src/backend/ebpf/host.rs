//! Which cgroup v2 directory `--cgroup` names, as the DaemonSet passes it.
//!
//! A DaemonSet cannot know whether its node mounts cgroup v2 alone at /sys/fs/cgroup (pure
//! v2: recent distributions) or beside the v1 controllers, at /sys/fs/cgroup/unified
//! (hybrid: systemd's older default, this project's CI machines). So `--cgroup` takes
//! either a cgroup v2 directory, used as given, or the mount point of a hybrid host's
//! cgroup tree (a tmpfs holding the v1 controllers), whose `unified` directory is then
//! used, and the log says so. Anything else is refused with what to pass instead: a wrong
//! guess would translate the sockets of processes nobody meant to, or of none.

use std::path::{Path, PathBuf};

use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC, TMPFS_MAGIC};

/// The cgroup v2 directory `given` stands for, and whether it was found through a hybrid
/// host's cgroup mount (then `given/unified`).
#[derive(Debug, PartialEq, Eq)]
pub struct AttachCgroup {
    pub path: PathBuf,
    pub through_hybrid_mount: bool,
}

/// What was wrong with `--cgroup`.
#[derive(Debug)]
pub struct CgroupError {
    pub given: PathBuf,
    pub reason: String,
}

impl std::fmt::Display for CgroupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--cgroup {}: {}; give a cgroup v2 directory (the root of the host's cgroup2 mount: \
             /sys/fs/cgroup on pure cgroup v2 hosts, /sys/fs/cgroup/unified on hybrid ones) or the \
             mount point of a hybrid host's cgroup tree (its `unified` directory is then used); a \
             host without cgroup v2 cannot run --backend ebpf, use --backend nftables",
            self.given.display(),
            self.reason
        )
    }
}

impl std::error::Error for CgroupError {}

/// Resolves `--cgroup`: `given` when it is on cgroup2; `given/unified` when `given` is a
/// tmpfs and that directory is on cgroup2 (a hybrid host's /sys/fs/cgroup); an error
/// otherwise.
pub fn attach_cgroup(given: &Path) -> Result<AttachCgroup, CgroupError> {
    let err = |reason: String| CgroupError {
        given: given.to_owned(),
        reason,
    };
    let fs = statfs(given).map_err(|e| err(format!("cannot read it: {e}")))?;
    if fs.filesystem_type() == CGROUP2_SUPER_MAGIC {
        return Ok(AttachCgroup {
            path: given.to_owned(),
            through_hybrid_mount: false,
        });
    }
    if fs.filesystem_type() != TMPFS_MAGIC {
        return Err(err(
            "not a cgroup v2 directory, nor a hybrid host's cgroup mount (a tmpfs)".into(),
        ));
    }
    let unified = given.join("unified");
    match statfs(&unified) {
        Ok(fs) if fs.filesystem_type() == CGROUP2_SUPER_MAGIC => Ok(AttachCgroup {
            path: unified,
            through_hybrid_mount: true,
        }),
        Ok(_) => Err(err(format!(
            "a tmpfs whose {} is not on cgroup2 (a cgroup v1 only host?)",
            unified.display()
        ))),
        Err(e) => Err(err(format!(
            "a tmpfs without a cgroup v2 `unified` directory ({}: {e}; a cgroup v1 only host?)",
            unified.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_on_neither_cgroup2_nor_a_hybrid_mount_is_refused_with_what_to_pass() {
        // The source tree: on disk here; should it be a tmpfs, it has no `unified` either.
        let tree = Path::new(env!("CARGO_MANIFEST_DIR"));
        let e = attach_cgroup(tree).unwrap_err().to_string();
        let on_tmpfs = statfs(tree).unwrap().filesystem_type() == TMPFS_MAGIC;
        let why = match on_tmpfs {
            true => "without a cgroup v2 `unified` directory",
            false => "not a cgroup v2 directory, nor a hybrid host's cgroup mount",
        };
        assert!(e.contains(why), "{e}");
        assert!(e.contains("/sys/fs/cgroup/unified on hybrid ones"), "{e}");
        assert!(e.contains("use --backend nftables"), "{e}");
        let e = attach_cgroup(&tree.join("no-such-cgroup"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read it"), "{e}");
    }
}
