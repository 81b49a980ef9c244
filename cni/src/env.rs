//! The `CNI_*` environment variables, checked against what each verb requires.

use std::path::PathBuf;

use crate::args::CniArgs;
use crate::error::{Code, Error};

/// The operation the runtime asks for (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub const ALL: [Command; 6] = [
        Command::Add,
        Command::Del,
        Command::Check,
        Command::Status,
        Command::Gc,
        Command::Version,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }

    pub fn parse(s: &str) -> Result<Command, Error> {
        Command::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| {
            Error::new(
                Code::InvalidEnvironment,
                format!("CNI_COMMAND \"{s}\" is not a CNI verb"),
                "set CNI_COMMAND to one of ADD, DEL, CHECK, STATUS, GC, VERSION",
            )
        })
    }

    /// The variables the spec requires for this verb, besides `CNI_COMMAND`.
    fn required(self) -> &'static [&'static str] {
        match self {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Status | Command::Gc | Command::Version => &[],
        }
    }
}

/// The invocation parameters of one plugin call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    /// Set for ADD, DEL and CHECK.
    pub container_id: String,
    /// The container's netns path; `None` on DEL when the runtime sent none (containerd
    /// sends an empty one on its second DEL).
    pub netns: Option<PathBuf>,
    /// Set for ADD, DEL and CHECK.
    pub ifname: String,
    pub args: CniArgs,
    /// Directories to search for delegated plugins, in order.
    pub path: Vec<PathBuf>,
    /// How many plugins up the chain delegated to reach this call ([`DELEGATION_DEPTH_VAR`]):
    /// 0 when a runtime ran us.
    pub delegation_depth: u32,
}

/// The variable a delegating plugin sets for its delegate: its own depth plus one. A runtime
/// never sets it, so it counts the plugins between the runtime and this call; a chain that
/// comes back to a plugin already in it (an IPAM type naming a main plugin, directly or
/// through another) would otherwise spawn processes without end.
pub const DELEGATION_DEPTH_VAR: &str = "FERRY_CNI_DELEGATION_DEPTH";

/// The longest delegation chain allowed: a main plugin calling an IPAM plugin is depth 1;
/// a meta plugin in front of it makes 2. Anything past this is a loop.
pub const MAX_DELEGATION_DEPTH: u32 = 4;

/// The longest `CNI_CONTAINERID` accepted, in bytes. Runtimes send 64 hex digits; the bound
/// keeps every name and label derived from the id (lease files, link aliases, rule
/// comments, netlink attributes) within the kernel's and the file system's limits.
pub const MAX_CONTAINER_ID_LEN: usize = 128;

/// The kernel's IFNAMSIZ less its terminating NUL.
pub const MAX_IFNAME_LEN: usize = 15;

impl Env {
    /// Reads the process environment.
    pub fn from_process() -> Result<Env, Error> {
        Env::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the variables through `get`, so tests need not touch the process environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Env, Error> {
        let command = match get("CNI_COMMAND").filter(|c| !c.is_empty()) {
            Some(c) => Command::parse(&c)?,
            None => {
                return Err(Error::new(
                    Code::InvalidEnvironment,
                    "CNI_COMMAND is not set",
                    "a CNI plugin is run by a container runtime, which sets CNI_COMMAND \
                     (ADD, DEL, CHECK, STATUS, GC or VERSION) and the other CNI_* variables",
                ))
            }
        };
        let value = |k: &str| get(k).filter(|v| !v.is_empty());

        let missing: Vec<&str> = command
            .required()
            .iter()
            .copied()
            .filter(|k| value(k).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(Error::new(
                Code::InvalidEnvironment,
                format!(
                    "required variable(s) {} missing for {}",
                    missing.join(", "),
                    command.as_str()
                ),
                "the runtime must set CNI_CONTAINERID and CNI_IFNAME for ADD, CHECK and DEL, \
                 and CNI_NETNS for ADD and CHECK",
            ));
        }

        let container_id = value("CNI_CONTAINERID").unwrap_or_default();
        if !container_id.is_empty() {
            validate_container_id(&container_id)?;
        }
        let ifname = value("CNI_IFNAME").unwrap_or_default();
        if !ifname.is_empty() {
            validate_ifname(&ifname)?;
        }
        let args = CniArgs::parse(&value("CNI_ARGS").unwrap_or_default())?;
        let delegation_depth = match value(DELEGATION_DEPTH_VAR) {
            None => 0,
            Some(d) => d.parse::<u32>().map_err(|_| {
                Error::new(
                    Code::InvalidEnvironment,
                    format!("{DELEGATION_DEPTH_VAR} \"{d}\" is not a number"),
                    "this variable is set by a delegating CNI plugin; unset it when running a plugin by hand",
                )
            })?,
        };
        let path = value("CNI_PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .filter(|d| !d.as_os_str().is_empty())
                    .collect()
            })
            .unwrap_or_default();

        Ok(Env {
            command,
            container_id,
            netns: value("CNI_NETNS").map(PathBuf::from),
            ifname,
            args,
            path,
            delegation_depth,
        })
    }
}

/// The spec: not empty, an alphanumeric first character, then alphanumerics, `_`, `.`, `-`;
/// and at most [`MAX_CONTAINER_ID_LEN`] bytes.
fn validate_container_id(id: &str) -> Result<(), Error> {
    if id.len() > MAX_CONTAINER_ID_LEN {
        // Not quoted in full: the message would be as long as the id.
        return Err(Error::new(
            Code::InvalidEnvironment,
            format!(
                "CNI_CONTAINERID is {} bytes long (\"{}...\"), more than {MAX_CONTAINER_ID_LEN}",
                id.len(),
                id.chars().take(32).collect::<String>()
            ),
            format!("a container id has at most {MAX_CONTAINER_ID_LEN} bytes (runtimes use 64 hex digits)"),
        ));
    }
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Ok(());
    }
    Err(Error::new(
        Code::InvalidEnvironment,
        format!("CNI_CONTAINERID {id:?} is not a valid container id"),
        "a container id starts with a letter or digit, followed by letters, digits, '_', '.' or '-'",
    ))
}

/// What the kernel accepts as an interface name, less `%`: the kernel reads a name with
/// `%d` as a template and picks a free name of its own, which the plugin would then not find.
fn validate_ifname(name: &str) -> Result<(), Error> {
    let problem = if name.len() > MAX_IFNAME_LEN {
        Some(format!(
            "is {} bytes long, more than {MAX_IFNAME_LEN}",
            name.len()
        ))
    } else if name == "." || name == ".." {
        Some("is . or ..".to_string())
    } else if name
        .chars()
        .any(|c| matches!(c, '/' | ':' | '%') || c.is_whitespace() || c.is_control())
    {
        Some("contains '/', ':', '%', white space or a control character".to_string())
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(Error::new(
            Code::InvalidEnvironment,
            format!("CNI_IFNAME {name:?} {p}"),
            "an interface name has 1 to 15 bytes, none of them '/', ':', '%' or white space, and is not . or ..",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, Error> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(|k| map.get(k).cloned())
    }

    const ADD: [(&str, &str); 5] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc-123"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
    ];

    #[test]
    fn reads_a_complete_add() {
        let e = env(&ADD).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.container_id, "abc-123");
        assert_eq!(e.netns, Some(PathBuf::from("/run/netns/x")));
        assert_eq!(
            e.path,
            vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
    }

    #[test]
    fn each_missing_variable_is_named() {
        for var in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let pairs: Vec<_> = ADD.iter().copied().filter(|(k, _)| *k != var).collect();
            let e = env(&pairs).unwrap_err();
            assert_eq!(e.code, Code::InvalidEnvironment);
            assert!(e.msg.contains(var), "{e}");
        }
        let e = env(&[]).unwrap_err();
        assert!(e.msg.contains("CNI_COMMAND"), "{e}");
    }

    #[test]
    fn del_without_netns_is_fine_and_empty_means_none() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ])
        .unwrap();
        assert_eq!(e.netns, None);
    }

    #[test]
    fn status_gc_and_version_need_only_the_command() {
        for c in ["STATUS", "GC", "VERSION"] {
            env(&[("CNI_COMMAND", c)]).unwrap();
        }
    }

    #[test]
    fn the_longest_names_allowed_are_accepted() {
        let id = "a".repeat(MAX_CONTAINER_ID_LEN);
        let pairs: Vec<_> = ADD
            .iter()
            .copied()
            .filter(|(k, _)| !matches!(*k, "CNI_CONTAINERID" | "CNI_IFNAME"))
            .chain([
                ("CNI_CONTAINERID", id.as_str()),
                ("CNI_IFNAME", "fifteen-bytes-x"),
            ])
            .collect();
        let e = env(&pairs).unwrap();
        assert_eq!((e.container_id.len(), e.ifname.len()), (128, 15));
        assert_eq!(e.delegation_depth, 0);
    }

    #[test]
    fn a_long_container_id_is_not_quoted_in_full() {
        let id = "0".repeat(65_510);
        let pairs: Vec<_> = ADD
            .iter()
            .copied()
            .filter(|(k, _)| *k != "CNI_CONTAINERID")
            .chain([("CNI_CONTAINERID", id.as_str())])
            .collect();
        let e = env(&pairs).unwrap_err();
        assert!(e.msg.contains("65510 bytes") && e.msg.len() < 200, "{e}");
    }

    #[test]
    fn bad_values_are_rejected_with_the_variable_named() {
        let cases = [
            ("CNI_COMMAND", "ADDD"),
            ("CNI_CONTAINERID", "-starts-with-dash"),
            ("CNI_CONTAINERID", "has/slash"),
            ("CNI_IFNAME", "much-too-long-ifname"),
            ("CNI_IFNAME", "a/b"),
            ("CNI_IFNAME", ".."),
            ("CNI_ARGS", "novalue"),
            ("CNI_CONTAINERID", &"a".repeat(MAX_CONTAINER_ID_LEN + 1)),
            ("CNI_CONTAINERID", &"0".repeat(65_510)),
            ("CNI_CONTAINERID", "has space"),
            ("CNI_IFNAME", "eth%d"),
            ("CNI_IFNAME", "."),
            ("CNI_IFNAME", "a b"),
            ("CNI_IFNAME", "eth\t0"),
            ("CNI_IFNAME", "sixteen-bytes-xx"),
            (DELEGATION_DEPTH_VAR, "x"),
        ];
        for (k, v) in cases {
            let pairs: Vec<_> = ADD
                .iter()
                .copied()
                .filter(|(key, _)| *key != k)
                .chain([(k, v)])
                .collect();
            let e = env(&pairs).unwrap_err();
            assert_eq!(e.code, Code::InvalidEnvironment, "{k}={v}");
            assert!(e.msg.contains(k), "{k}={v}: {e}");
        }
    }
}
