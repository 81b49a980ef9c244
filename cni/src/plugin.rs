//! The verb dispatcher: env + stdin in, a result or the spec's error object out.

use std::io::{Read, Write};

use serde_json::{json, Value};

use crate::config::{self, Attachment, NetConf};
use crate::env::{Command, Env};
use crate::error::{Code, Error};
use crate::result::CniResult;
use crate::version::Version;

/// One call, validated: the variables the verb needs are there and the configuration parsed.
#[derive(Debug, Clone)]
pub struct Request {
    pub env: Env,
    pub config: NetConf,
    /// The configuration bytes exactly as received, for delegation.
    pub stdin: Vec<u8>,
}

/// A CNI plugin: one method per verb. VERSION is answered by [`run`] itself.
pub trait Plugin {
    /// `CNI_ARGS` keys this plugin reads (the `K8S_POD_*` keys are always accepted).
    const ARGS: &'static [&'static str] = &[];

    fn add(&self, req: &Request) -> Result<CniResult, Error>;
    fn del(&self, req: &Request) -> Result<(), Error>;
    fn check(&self, req: &Request) -> Result<(), Error>;
    fn status(&self, req: &Request) -> Result<(), Error>;
    /// Remove whatever belongs to attachments not in `valid`.
    fn gc(&self, req: &Request, valid: &[Attachment]) -> Result<(), Error>;
}

/// What a call prints on stdout and how it exits.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub stdout: Option<Value>,
    pub exit_code: i32,
}

/// Runs `plugin` for the verb in the process environment and exits the process.
pub fn run<P: Plugin>(plugin: &P) -> ! {
    report_panics();
    // Configurations are a few KiB: read them in one go, not in growing chunks.
    let mut stdin = Vec::with_capacity(64 * 1024);
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => dispatch(plugin, Env::from_process(), &stdin),
        Err(e) => failure(
            Version::LATEST,
            &Error::io("reading the network configuration from stdin", &e),
        ),
    };
    if let Some(v) = &outcome.stdout {
        let mut out = std::io::stdout().lock();
        // Nothing useful can be done if stdout is gone: the exit code still tells.
        let _ = serde_json::to_writer(&mut out, v);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }
    std::process::exit(outcome.exit_code)
}

/// A panic is a bug, but the runtime still gets the spec's error object on stdout rather
/// than nothing. With `panic = "abort"` (the release profile) the process dies right after
/// the hook, so it reports a panic on any thread; when unwinding, a panic off the thread
/// that called [`run`] is caught where the thread is joined and becomes the call's error,
/// so the hook reports only that thread's.
fn report_panics() {
    let default = std::panic::take_hook();
    let main = std::thread::current().id();
    std::panic::set_hook(Box::new(move |info| {
        if cfg!(panic = "abort") || std::thread::current().id() == main {
            let mut out = std::io::stdout().lock();
            let _ = serde_json::to_writer(&mut out, &panic_error(&info.to_string()).to_json(Version::LATEST));
            let _ = out.write_all(b"\n");
            let _ = out.flush();
        }
        default(info);
    }));
}

fn panic_error(what: &str) -> Error {
    Error::new(
        Code::INTERNAL,
        format!("internal error (a bug in the plugin): {what}"),
        "what the call made may be left behind: DEL the attachment, and report the bug with \
         the configuration and CNI_* variables that caused it",
    )
}

/// The whole protocol minus process I/O, so it can be tested without spawning anything.
pub fn dispatch<P: Plugin>(plugin: &P, env: Result<Env, Error>, stdin: &[u8]) -> Outcome {
    // Errors are reported in the configuration's version when it can be read at all.
    let version_hint = config::parse_json(stdin)
        .ok()
        .and_then(|v| config::version_of(&v).ok())
        .unwrap_or(Version::LATEST);
    let env = match env {
        Ok(env) => env,
        Err(e) => return failure(version_hint, &e),
    };
    if env.command == Command::Version {
        return version_info(stdin);
    }
    let config = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return failure(version_hint, &e),
    };
    let version = config.cni_version;
    let req = Request {
        env,
        config,
        stdin: stdin.to_vec(),
    };
    match call(plugin, &req) {
        Ok(Some(result)) => Outcome {
            stdout: Some(result.to_json(version)),
            exit_code: 0,
        },
        Ok(None) => Outcome {
            stdout: None,
            exit_code: 0,
        },
        Err(e) => failure(version, &e),
    }
}

fn call<P: Plugin>(plugin: &P, req: &Request) -> Result<Option<CniResult>, Error> {
    let version = req.config.cni_version;
    let command = req.env.command;
    let too_old = |since: &str| {
        Error::new(
            Code::IncompatibleVersion,
            format!("{} is not defined for cniVersion {version}", command.as_str()),
            format!(
                "{} needs cniVersion {since} or later in the network configuration",
                command.as_str()
            ),
        )
    };
    match command {
        Command::Add | Command::Del | Command::Check => req.env.args.check_known(P::ARGS)?,
        _ => {}
    }
    match command {
        Command::Add => plugin.add(req).map(Some),
        Command::Del => plugin.del(req).map(|_| None),
        Command::Check if !version.has_check() => Err(too_old("0.4.0")),
        Command::Check => plugin.check(req).map(|_| None),
        Command::Status | Command::Gc if !version.has_status_and_gc() => Err(too_old("1.1.0")),
        Command::Status => plugin.status(req).map(|_| None),
        Command::Gc => {
            // Without the list every lease would look stale: refuse rather than guess.
            let valid = req.config.valid_attachments.as_deref().ok_or_else(|| {
                Error::invalid_config(
                    "GC needs cni.dev/valid-attachments in the network configuration",
                    "list the attachments still in use as [{\"containerID\": ..., \"ifname\": ...}] (an empty list releases everything)",
                )
            })?;
            plugin.gc(req, valid).map(|_| None)
        }
        Command::Version => unreachable!("answered before the configuration is parsed"),
    }
}

/// VERSION: echoes the input's `cniVersion` (the newest when stdin is empty).
fn version_info(stdin: &[u8]) -> Outcome {
    let version = if stdin.iter().all(u8::is_ascii_whitespace) {
        Ok(Version::LATEST)
    } else {
        config::parse_json(stdin).and_then(|v| config::version_of(&v))
    };
    match version {
        Ok(v) => Outcome {
            stdout: Some(json!({
                "cniVersion": v.as_str(),
                "supportedVersions": Version::ALL.map(Version::as_str),
            })),
            exit_code: 0,
        },
        Err(e) => failure(Version::LATEST, &e),
    }
}

fn failure(version: Version, e: &Error) -> Outcome {
    Outcome {
        stdout: Some(e.to_json(version)),
        exit_code: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    use crate::result::IpConfig;

    /// Records which verb it saw and answers with a fixed address.
    #[derive(Default)]
    struct Recorder {
        seen: RefCell<Vec<String>>,
    }

    impl Plugin for Recorder {
        const ARGS: &'static [&'static str] = &["IP"];
        fn add(&self, _: &Request) -> Result<CniResult, Error> {
            self.seen.borrow_mut().push("add".into());
            Ok(CniResult {
                ips: vec![IpConfig {
                    address: "10.1.0.5/16".parse().unwrap(),
                    gateway: Some("10.1.0.1".parse().unwrap()),
                    interface: None,
                }],
                ..Default::default()
            })
        }
        fn del(&self, _: &Request) -> Result<(), Error> {
            self.seen.borrow_mut().push("del".into());
            Ok(())
        }
        fn check(&self, _: &Request) -> Result<(), Error> {
            self.seen.borrow_mut().push("check".into());
            Err(Error::new(Code::UnknownContainer, "no lease", ""))
        }
        fn status(&self, _: &Request) -> Result<(), Error> {
            self.seen.borrow_mut().push("status".into());
            Ok(())
        }
        fn gc(&self, _: &Request, valid: &[Attachment]) -> Result<(), Error> {
            self.seen.borrow_mut().push(format!("gc {}", valid.len()));
            Ok(())
        }
    }

    fn env(command: &str, extra: &[(&str, &str)]) -> Result<Env, Error> {
        let mut map: HashMap<&str, &str> = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/p1"),
            ("CNI_IFNAME", "eth0"),
        ]
        .into_iter()
        .collect();
        map.extend(extra.iter().copied());
        Env::from_lookup(|k| map.get(k).map(|v| v.to_string()))
    }

    fn conf(version: &str) -> Vec<u8> {
        json!({"cniVersion": version, "name": "net1", "type": "recorder"})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn add_prints_the_result_in_each_version() {
        for v in Version::ALL {
            let p = Recorder::default();
            let out = dispatch(&p, env("ADD", &[]), &conf(v.as_str()));
            assert_eq!(out.exit_code, 0);
            let json = out.stdout.unwrap();
            assert_eq!(json["cniVersion"], v.as_str());
            assert_eq!(json["ips"][0]["address"], "10.1.0.5/16");
            assert_eq!(json["ips"][0].get("version").is_some(), v < Version::V1_0_0);
        }
    }

    #[test]
    fn del_check_status_gc_print_nothing_on_success() {
        let p = Recorder::default();
        assert_eq!(
            dispatch(&p, env("DEL", &[]), &conf("1.1.0")),
            Outcome {
                stdout: None,
                exit_code: 0
            }
        );
        assert_eq!(dispatch(&p, env("STATUS", &[]), &conf("1.1.0")).exit_code, 0);
        let mut gc: Value = serde_json::from_slice(&conf("1.1.0")).unwrap();
        gc["cni.dev/valid-attachments"] = json!([{"containerID": "c1", "ifname": "eth0"}]);
        assert_eq!(
            dispatch(&p, env("GC", &[]), gc.to_string().as_bytes()).exit_code,
            0
        );
        assert_eq!(*p.seen.borrow(), vec!["del", "status", "gc 1"]);
    }

    #[test]
    fn plugin_errors_are_printed_with_the_config_version() {
        let p = Recorder::default();
        let out = dispatch(&p, env("CHECK", &[]), &conf("0.4.0"));
        assert_eq!(out.exit_code, 1);
        assert_eq!(
            out.stdout.unwrap(),
            json!({"cniVersion": "0.4.0", "code": 3, "msg": "no lease"})
        );
    }

    #[test]
    fn verbs_newer_than_the_config_version_are_code_1() {
        let p = Recorder::default();
        for (verb, version) in [("CHECK", "0.3.1"), ("STATUS", "1.0.0"), ("GC", "0.4.0")] {
            let out = dispatch(&p, env(verb, &[]), &conf(version));
            assert_eq!(out.exit_code, 1);
            assert_eq!(out.stdout.as_ref().unwrap()["code"], 1, "{verb} {version}");
        }
        assert!(p.seen.borrow().is_empty(), "the plugin must not be called");
    }

    #[test]
    fn gc_without_a_list_is_refused() {
        let p = Recorder::default();
        let out = dispatch(&p, env("GC", &[]), &conf("1.1.0"));
        assert_eq!(out.stdout.unwrap()["code"], 7);
        assert!(p.seen.borrow().is_empty());
    }

    #[test]
    fn version_lists_every_supported_version_and_echoes_the_input() {
        let p = Recorder::default();
        let out = dispatch(&p, env("VERSION", &[]), br#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(
            out.stdout.unwrap(),
            json!({"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
        let out = dispatch(&p, env("VERSION", &[]), b"");
        assert_eq!(out.stdout.unwrap()["cniVersion"], "1.1.0");
        let out = dispatch(&p, env("VERSION", &[]), br#"{"cniVersion":"0.2.0"}"#);
        assert_eq!(out.stdout.unwrap()["code"], 1);
    }

    #[test]
    fn unknown_cni_args_are_refused_unless_ignored() {
        let p = Recorder::default();
        let out = dispatch(
            &p,
            env("ADD", &[("CNI_ARGS", "IP=10.1.0.9;FOO=1")]),
            &conf("1.0.0"),
        );
        assert_eq!(out.stdout.unwrap()["code"], 4);
        let out = dispatch(
            &p,
            env("ADD", &[("CNI_ARGS", "IgnoreUnknown=1;FOO=1")]),
            &conf("1.0.0"),
        );
        assert_eq!(out.exit_code, 0);
    }

    #[test]
    fn env_errors_use_the_config_version_when_readable() {
        let p = Recorder::default();
        let out = dispatch(&p, env("ADD", &[("CNI_IFNAME", "")]), &conf("0.3.1"));
        let json = out.stdout.unwrap();
        assert_eq!(json["code"], 4);
        assert_eq!(json["cniVersion"], "0.3.1");
        assert!(json["msg"].as_str().unwrap().contains("CNI_IFNAME"));
    }
}
