//! What can go wrong in the eBPF data plane, each saying what to do about it.

use std::path::PathBuf;

/// Errors of the eBPF data-plane layer (loading, attaching, map updates, cleanup).
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The kernel is older than the data plane needs.
    KernelTooOld { found: String, needed: &'static str },
    /// The cgroup directory cannot be opened.
    Cgroup { path: PathBuf, source: std::io::Error },
    /// The directory exists but is not on a cgroup v2 file system.
    NotCgroup2 { path: PathBuf },
    /// The pin directory cannot be made or read.
    PinDir { path: PathBuf, source: std::io::Error },
    /// The pin directory is not on a bpf file system, and none could be mounted for it.
    NotBpffs { path: PathBuf },
    /// Mounting bpffs at /sys/fs/bpf failed.
    MountBpffs { source: nix::Error },
    /// No cgroup v2 mount was visible and mounting one on /sys/fs/cgroup failed.
    MountCgroup2 { source: nix::Error },
    /// The embedded object could not be loaded (a map could not be made or reused).
    Load(Box<aya::EbpfError>),
    /// A program failed to load (verifier) or attach.
    Program {
        program: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    /// A link could not be pinned, read from its pin, or unpinned.
    Link { path: PathBuf, reason: String },
    /// A map operation failed.
    Map {
        map: &'static str,
        source: Box<aya::maps::MapError>,
    },
    /// A Service update that cannot be programmed as given.
    InvalidService { frontend: String, reason: String },
    /// Querying the programs attached to a cgroup failed.
    Query { path: PathBuf, source: std::io::Error },
    /// Flow timeouts given as text could not be read.
    InvalidFlowTimeouts { spec: String, reason: String },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::KernelTooOld { found, needed } => write!(
                f,
                "the eBPF data plane needs Linux {needed} or later (bpf_set_retval in cgroup \
                 socket programs), this kernel is {found}: use the nftables back end"
            ),
            Error::Cgroup { path, source } => write!(
                f,
                "cannot open the cgroup {}: {source}; give a cgroup v2 directory (on hybrid \
                 systems under /sys/fs/cgroup/unified; note that `ip netns exec` hides it, \
                 start the daemon with nsenter instead)",
                path.display()
            ),
            Error::NotCgroup2 { path } => write!(
                f,
                "{} is not a cgroup v2 directory: socket programs attach only to cgroup v2 \
                 (mount it, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`)",
                path.display()
            ),
            Error::PinDir { path, source } => {
                write!(f, "cannot use the pin directory {}: {source}", path.display())
            }
            Error::NotBpffs { path } => write!(
                f,
                "the pin directory {} is not on a bpf file system: put it under /sys/fs/bpf \
                 (mounted here when missing) or mount one (`mount -t bpf bpf DIR`)",
                path.display()
            ),
            Error::MountBpffs { source } => write!(
                f,
                "/sys/fs/bpf is not a bpf file system and mounting one there failed: {source} \
                 (the daemon needs CAP_SYS_ADMIN, or mount it before starting)"
            ),
            Error::MountCgroup2 { source } => write!(
                f,
                "no cgroup v2 hierarchy is mounted here and mounting one on /sys/fs/cgroup failed: \
                 {source} (start the daemon with nsenter rather than `ip netns exec`, or mount \
                 cgroup2 first)"
            ),
            Error::Load(e) => {
                write!(f, "cannot load the eBPF object: {e}")?;
                write_causes(f, &**e)
            }
            Error::Program { program, source } => {
                write!(f, "eBPF program {program}: {source}")?;
                write_causes(f, &**source)?;
                if let aya::programs::ProgramError::LoadError { verifier_log, .. } = &**source {
                    write!(f, "\nverifier log:\n{verifier_log}")?;
                }
                Ok(())
            }
            Error::Link { path, reason } => write!(f, "link pin {}: {reason}", path.display()),
            Error::Map { map, source } => {
                write!(f, "map {map}: {source}")?;
                write_causes(f, &**source)
            }
            Error::InvalidService { frontend, reason } => {
                write!(f, "cannot program Service frontend {frontend}: {reason}")
            }
            Error::Query { path, source } => write!(
                f,
                "cannot list the programs attached to cgroup {}: {source}",
                path.display()
            ),
            Error::InvalidFlowTimeouts { spec, reason } => write!(
                f,
                "flow timeouts `{spec}`: {reason}; give name=seconds pairs separated by commas, \
                 e.g. `udp=30,tcp-fin=120`"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Cgroup { source, .. } | Error::PinDir { source, .. } | Error::Query { source, .. } => {
                Some(source)
            }
            Error::MountBpffs { source } | Error::MountCgroup2 { source } => Some(source),
            Error::Load(e) => Some(&**e),
            Error::Program { source, .. } => Some(&**source),
            Error::Map { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

/// aya's errors name the failed call and keep the errno in their source: say both.
fn write_causes(f: &mut std::fmt::Formatter<'_>, e: &dyn std::error::Error) -> std::fmt::Result {
    let mut cause = e.source();
    while let Some(c) = cause {
        write!(f, ": {c}")?;
        cause = c.source();
    }
    Ok(())
}

pub(crate) fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |e| Error::Map {
        map,
        source: Box::new(e),
    }
}
