//! Running another plugin, as the spec's section 4 describes: the bridge hands addresses
//! to an IPAM plugin found through `CNI_PATH`, with the same environment but the verb,
//! and the same configuration on stdin.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};

use serde_json::Value;

use crate::env::{Command, Env, DELEGATION_DEPTH_VAR, MAX_DELEGATION_DEPTH};
use crate::error::{Code, Error};
use crate::result::CniResult;

/// Finds the executable named `plugin_type` in the `CNI_PATH` directories, in order.
pub fn find_plugin(plugin_type: &str, path: &[PathBuf]) -> Result<PathBuf, Error> {
    if plugin_type.is_empty() || plugin_type.contains('/') || plugin_type == ".." {
        return Err(Error::invalid_config(
            format!("plugin type {plugin_type:?} is not a plugin name"),
            "a type names an executable in a CNI_PATH directory, without any '/'",
        ));
    }
    if path.is_empty() {
        return Err(Error::new(
            Code::InvalidEnvironment,
            format!("CNI_PATH is empty, so plugin {plugin_type:?} cannot be found"),
            "set CNI_PATH to the directories holding the CNI plugins, e.g. /opt/cni/bin",
        ));
    }
    path.iter()
        .map(|dir| dir.join(plugin_type))
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            Error::invalid_config(
                format!(
                    "plugin {plugin_type:?} not found in CNI_PATH ({})",
                    path.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(":")
                ),
                format!(
                    "install {plugin_type} in one of those directories, or fix the type in the configuration"
                ),
            )
        })
}

/// A delegate that is this very program, or a chain already [`MAX_DELEGATION_DEPTH`] deep,
/// would call itself again and again (each call a process, none ever returning): code 7.
fn refuse_loops(env: &Env, plugin_type: &str, exe: &Path) -> Result<(), Error> {
    let same_program = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .ok()
        .is_some_and(|me| std::fs::canonicalize(exe).is_ok_and(|it| it == me));
    if same_program {
        return Err(Error::invalid_config(
            format!(
                "ipam.type {plugin_type:?} is this plugin itself ({})",
                exe.display()
            ),
            "name an IPAM plugin in ipam.type, e.g. \"ferry-ipam\" or \"host-local\"",
        ));
    }
    if env.delegation_depth >= MAX_DELEGATION_DEPTH {
        return Err(Error::invalid_config(
            format!(
                "ipam.type {plugin_type:?}: {} plugins already delegated in a chain to get here, \
                 a loop",
                env.delegation_depth
            ),
            "an IPAM plugin's configuration names a plugin that leads back to a main plugin: \
             name an IPAM plugin in ipam.type, e.g. \"ferry-ipam\" or \"host-local\"",
        ));
    }
    Ok(())
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs `plugin_type` for `command` with `config` on stdin. Returns what it printed on
/// success (if anything), or its error with the plugin named in the message.
pub fn delegate(
    env: &Env,
    command: Command,
    plugin_type: &str,
    config: &[u8],
) -> Result<Option<Value>, Error> {
    let exe = find_plugin(plugin_type, &env.path)?;
    refuse_loops(env, plugin_type, &exe)?;
    // The delegate sees the same CNI_* parameters as we did, except the verb; they are set
    // from `env` rather than inherited so a caller's `Env` is the one source of truth.
    let mut process = Process::new(&exe);
    process
        .env("CNI_COMMAND", command.as_str())
        .env("CNI_CONTAINERID", &env.container_id)
        .env("CNI_IFNAME", &env.ifname)
        .env("CNI_ARGS", env.args.raw())
        .env("CNI_PATH", std::env::join_paths(&env.path).unwrap_or_default())
        .env(DELEGATION_DEPTH_VAR, (env.delegation_depth + 1).to_string());
    match &env.netns {
        Some(netns) => process.env("CNI_NETNS", netns),
        None => process.env_remove("CNI_NETNS"),
    };
    let mut child = process
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(format!("starting plugin {}", exe.display()), &e))?;
    // A plugin that exits without reading stdin closes the pipe; its exit status tells why.
    let _ = child.stdin.take().expect("stdin is piped").write_all(config);
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io(format!("waiting for plugin {}", exe.display()), &e))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let parsed: Option<Value> = if stdout.trim().is_empty() {
        None
    } else {
        serde_json::from_str(&stdout).ok()
    };

    if !out.status.success() {
        if let Some(mut e) = parsed.as_ref().and_then(Error::from_json) {
            e.msg = format!("{plugin_type}: {}", e.msg);
            return Err(e);
        }
        return Err(Error::new(
            Code::INTERNAL,
            format!(
                "{plugin_type} {} failed ({}) without a CNI error",
                command.as_str(),
                out.status
            ),
            format!(
                "stdout: {} stderr: {}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    match (parsed, stdout.trim().is_empty()) {
        (Some(v), _) => Ok(Some(v)),
        (None, true) => Ok(None),
        (None, false) => Err(Error::new(
            Code::Decode,
            format!(
                "{plugin_type} {} printed something that is not JSON",
                command.as_str()
            ),
            format!("stdout: {}", stdout.trim()),
        )),
    }
}

/// ADD through a delegated (IPAM) plugin: its result, read in whatever version it wrote.
pub fn delegate_add(env: &Env, plugin_type: &str, config: &[u8]) -> Result<CniResult, Error> {
    let value = delegate(env, Command::Add, plugin_type, config)?.ok_or_else(|| {
        Error::new(
            Code::Decode,
            format!("{plugin_type} ADD succeeded but printed no result"),
            "a plugin must print its result on stdout after a successful ADD",
        )
    })?;
    CniResult::from_json(&value).map_err(|e| Error {
        msg: format!("{plugin_type}: {}", e.msg),
        ..e
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::CniArgs;
    use std::fs;

    fn env(dir: &Path) -> Env {
        Env {
            command: Command::Add,
            container_id: "c1".into(),
            netns: Some("/run/netns/x".into()),
            ifname: "eth0".into(),
            args: CniArgs::parse("IgnoreUnknown=1").unwrap(),
            path: vec!["/nonexistent".into(), dir.to_path_buf()],
            delegation_depth: 0,
        }
    }

    /// A shell-script plugin: stands in for an IPAM binary in these unit tests.
    fn script(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cni-delegate-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn passes_verb_env_and_stdin_and_reads_the_result() {
        let d = tempdir("ok");
        // Echoes back what it received, as an IPAM result.
        script(
            &d,
            "echo-ipam",
            r#"read -r conf; printf '{"cniVersion":"1.0.0","ips":[{"address":"10.9.0.2/24"}],"dns":{"domain":"%s-%s-%s-%s-%s"}}' "$CNI_COMMAND" "$CNI_CONTAINERID" "$CNI_IFNAME" "$CNI_ARGS" "$conf""#,
        );
        let r = delegate_add(&env(&d), "echo-ipam", b"stdin-conf\n").unwrap();
        assert_eq!(r.ips[0].address.to_string(), "10.9.0.2/24");
        assert_eq!(
            r.dns.domain.as_deref(),
            Some("ADD-c1-eth0-IgnoreUnknown=1-stdin-conf")
        );
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_delegate_error_keeps_its_code_and_names_the_plugin() {
        let d = tempdir("err");
        script(
            &d,
            "failing",
            r#"echo '{"cniVersion":"1.0.0","code":11,"msg":"busy"}'; exit 1"#,
        );
        script(&d, "crashing", "echo boom >&2; exit 2");
        let e = delegate(&env(&d), Command::Del, "failing", b"{}").unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (Code::TryAgainLater, "failing: busy"));
        let e = delegate(&env(&d), Command::Del, "crashing", b"{}").unwrap_err();
        assert_eq!(e.code, Code::INTERNAL);
        assert!(e.details.contains("boom"), "{e}");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_delegate_learns_its_depth_and_a_chain_too_deep_is_refused() {
        let d = tempdir("depth");
        script(
            &d,
            "depth-ipam",
            &format!(
                r#"printf '{{"cniVersion":"1.0.0","ips":[{{"address":"10.9.0.2/24"}}],"dns":{{"domain":"%s"}}}}' "${DELEGATION_DEPTH_VAR}""#
            ),
        );
        let mut e = env(&d);
        e.delegation_depth = 2;
        let r = delegate_add(&e, "depth-ipam", b"{}").unwrap();
        assert_eq!(r.dns.domain.as_deref(), Some("3"));
        e.delegation_depth = MAX_DELEGATION_DEPTH;
        let err = delegate_add(&e, "depth-ipam", b"{}").unwrap_err();
        assert_eq!(err.code, Code::InvalidConfig);
        assert!(err.msg.contains("ipam.type \"depth-ipam\""), "{err}");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_plugin_never_delegates_to_itself() {
        // This test binary stands in for the plugin: put it on the path under another name.
        let d = tempdir("self");
        std::os::unix::fs::symlink(std::env::current_exe().unwrap(), d.join("me-again")).unwrap();
        let err = delegate(&env(&d), Command::Del, "me-again", b"{}").unwrap_err();
        assert_eq!(err.code, Code::InvalidConfig);
        assert!(
            err.msg.contains("ipam.type \"me-again\" is this plugin itself"),
            "{err}"
        );
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_missing_plugin_names_the_path_searched() {
        let d = tempdir("missing");
        let e = delegate(&env(&d), Command::Add, "nope", b"{}").unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(e.msg.contains("nope") && e.msg.contains("/nonexistent"), "{e}");
        let e = find_plugin("../bin/sh", std::slice::from_ref(&d)).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        let e = find_plugin("x", &[]).unwrap_err();
        assert_eq!(e.code, Code::InvalidEnvironment);
        fs::remove_dir_all(d).unwrap();
    }
}
