//! Running a CNI plugin binary the way a container runtime does: `CNI_*` variables in a
//! cleared environment, the network config on stdin, the result or error on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{bin_dir, Netns, Pod, REFERENCE_PLUGIN_DIR};

/// One plugin invocation, built up and then run with [`CniCall::run_in`].
///
/// Environment, as a runtime sets it:
/// - `ADD`, `DEL`, `CHECK`: `CNI_COMMAND`, `CNI_CONTAINERID` (default empty),
///   `CNI_NETNS` (empty when `None`), `CNI_IFNAME` (default `eth0`), `CNI_PATH`, and
///   `CNI_ARGS` when given;
/// - `VERSION`, `STATUS`, `GC` (and anything else): `CNI_COMMAND`, `CNI_PATH`, plus each
///   of the others only when the builder was given it.
///
/// Everything else is cleared but `PATH`. [`CniCall::unset_env`] removes a variable
/// entirely, for "missing variable" tests.
#[derive(Debug, Clone)]
pub struct CniCall {
    plugin: PathBuf,
    command: String,
    container_id: Option<String>,
    netns: Option<PathBuf>,
    ifname: Option<String>,
    args: Option<String>,
    cni_path: Option<String>,
    stdin: Vec<u8>,
    unset: Vec<String>,
}

/// What a plugin run gave back.
#[derive(Debug)]
pub struct CniOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Wall time from spawn to exit, including writing stdin.
    pub elapsed: Duration,
}

impl CniCall {
    /// A call of `plugin` with verb `command` (`ADD`, `DEL`, `CHECK`, `VERSION`, `STATUS`,
    /// `GC`) and `config` as stdin.
    pub fn new(plugin: impl AsRef<Path>, command: &str, config: Value) -> CniCall {
        CniCall {
            plugin: plugin.as_ref().to_path_buf(),
            command: command.to_owned(),
            container_id: None,
            netns: None,
            ifname: None,
            args: None,
            cni_path: None,
            stdin: serde_json::to_vec(&config).expect("a serde_json::Value always serializes"),
            unset: Vec::new(),
        }
    }

    pub fn container_id(mut self, id: impl Into<String>) -> Self {
        self.container_id = Some(id.into());
        self
    }

    /// `CNI_NETNS`; `None` sends an empty value (as runtimes do for DEL of a gone netns).
    pub fn netns(mut self, path: Option<&Path>) -> Self {
        self.netns = path.map(Path::to_path_buf);
        self
    }

    /// Sets container id and netns path from a testbed pod.
    pub fn for_pod(self, pod: &Pod) -> Self {
        self.container_id(pod.container_id()).netns(Some(&pod.path()))
    }

    pub fn ifname(mut self, ifname: impl Into<String>) -> Self {
        self.ifname = Some(ifname.into());
        self
    }

    /// `CNI_ARGS` verbatim, e.g. `"IgnoreUnknown=1;K8S_POD_NAME=web"` (malformed ones too).
    pub fn args(mut self, args: impl Into<String>) -> Self {
        self.args = Some(args.into());
        self
    }

    /// `CNI_ARGS` from key/value pairs, joined as `K=V;K=V`.
    pub fn args_pairs(self, pairs: &[(&str, &str)]) -> Self {
        let joined: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.args(joined.join(";"))
    }

    /// `CNI_PATH`; the default is the Ferry binaries' directory, then /usr/lib/cni.
    pub fn cni_path(mut self, path: impl Into<String>) -> Self {
        self.cni_path = Some(path.into());
        self
    }

    /// Sends `bytes` on stdin instead of the JSON config (for malformed-input tests).
    pub fn stdin_raw(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = bytes.into();
        self
    }

    /// Leaves the variable `name` (e.g. `CNI_IFNAME`) out of the environment entirely.
    pub fn unset_env(mut self, name: &str) -> Self {
        self.unset.push(name.to_owned());
        self
    }

    /// The `CNI_*` variables the plugin gets, in a fixed order (`PATH` is added at spawn).
    pub fn env(&self) -> Vec<(String, String)> {
        let per_container = matches!(self.command.as_str(), "ADD" | "DEL" | "CHECK");
        let default_path = || format!("{}:{REFERENCE_PLUGIN_DIR}", bin_dir().display());
        let vars = [
            ("CNI_COMMAND", Some(self.command.clone())),
            (
                "CNI_CONTAINERID",
                self.container_id
                    .clone()
                    .or_else(|| per_container.then(String::new)),
            ),
            (
                "CNI_NETNS",
                self.netns
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .or_else(|| per_container.then(String::new)),
            ),
            (
                "CNI_IFNAME",
                self.ifname
                    .clone()
                    .or_else(|| per_container.then(|| "eth0".to_owned())),
            ),
            ("CNI_ARGS", self.args.clone()),
            (
                "CNI_PATH",
                Some(self.cni_path.clone().unwrap_or_else(default_path)),
            ),
        ];
        vars.into_iter()
            .filter(|(k, _)| !self.unset.iter().any(|u| u == k))
            .filter_map(|(k, v)| Some((k.to_owned(), v?)))
            .collect()
    }

    fn spawn(&self, netns: &Netns) -> Child {
        let mut cmd = netns.command(&self.plugin);
        cmd.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        cmd.envs(self.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run {} in netns {}: {e}",
                self.plugin.display(),
                netns.name()
            )
        });
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // A plugin may exit without reading stdin (VERSION, early errors): a broken pipe is
        // its business, the exit status and output tell the test what happened.
        match stdin.write_all(&self.stdin) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => panic!("writing stdin of {}: {e}", self.plugin.display()),
        }
        drop(stdin); // EOF: the plugin reads to the end
        child
    }

    /// Runs the plugin inside `netns` (usually the node's), waits, and returns its output.
    pub fn run_in(&self, netns: &Netns) -> CniOutput {
        let start = Instant::now();
        let child = self.spawn(netns);
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.plugin.display()));
        let elapsed = start.elapsed();
        CniOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed,
        }
    }

    /// Starts the plugin inside `netns` with stdin written and closed, and returns at once
    /// (for tests that kill a plugin half-way). stdout and stderr are piped.
    pub fn spawn_in(&self, netns: &Netns) -> Child {
        self.spawn(netns)
    }
}

impl CniOutput {
    /// stdout parsed as JSON; panics showing stdout and stderr when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("plugin stdout is not JSON ({e}):\n{self}"))
    }

    /// Asserts exit status 0; returns stdout as JSON, or `Value::Null` when it is empty
    /// (DEL, CHECK, STATUS and GC print nothing on success).
    pub fn ok(&self) -> Value {
        assert!(self.status.success(), "plugin failed:\n{self}");
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }

    /// Asserts a non-zero exit and returns the spec error object's `(code, msg, details)`
    /// (`details` is empty when absent). Panics unless stdout is such an object.
    ///
    /// `cniVersion` is not checked: before a config is read there is none to echo, and
    /// the reference plugins leave it out then. Check `json()["cniVersion"]` where it matters.
    pub fn err(&self) -> (u64, String, String) {
        assert!(
            !self.status.success(),
            "plugin succeeded where an error was expected:\n{self}"
        );
        let v = self.json();
        let code = v["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("error object has no numeric \"code\":\n{self}"));
        let msg = v["msg"]
            .as_str()
            .unwrap_or_else(|| panic!("error object has no string \"msg\":\n{self}"));
        let details = v["details"].as_str().unwrap_or_default();
        (code, msg.to_owned(), details.to_owned())
    }
}

impl std::fmt::Display for CniOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "  status: {} after {:?}\n  stdout: {}\n  stderr: {}",
            self.status,
            self.elapsed,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
        env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn add_sets_every_variable_with_defaults() {
        let env = CniCall::new("/x", "ADD", json!({}))
            .container_id("c1")
            .netns(Some(Path::new("/run/netns/p")))
            .env();
        assert_eq!(get(&env, "CNI_COMMAND"), Some("ADD"));
        assert_eq!(get(&env, "CNI_CONTAINERID"), Some("c1"));
        assert_eq!(get(&env, "CNI_NETNS"), Some("/run/netns/p"));
        assert_eq!(get(&env, "CNI_IFNAME"), Some("eth0"));
        assert_eq!(get(&env, "CNI_ARGS"), None);
        let path = get(&env, "CNI_PATH").unwrap();
        assert!(path.ends_with(":/usr/lib/cni"), "{path}");
    }

    #[test]
    fn del_without_netns_sends_it_empty() {
        let env = CniCall::new("/x", "DEL", json!({})).netns(None).env();
        assert_eq!(get(&env, "CNI_NETNS"), Some(""));
        assert_eq!(get(&env, "CNI_CONTAINERID"), Some(""));
    }

    #[test]
    fn args_and_overrides() {
        let env = CniCall::new("/x", "CHECK", json!({}))
            .ifname("net1")
            .cni_path("/a:/b")
            .args_pairs(&[("IgnoreUnknown", "1"), ("K8S_POD_NAME", "web")])
            .env();
        assert_eq!(get(&env, "CNI_IFNAME"), Some("net1"));
        assert_eq!(get(&env, "CNI_PATH"), Some("/a:/b"));
        assert_eq!(get(&env, "CNI_ARGS"), Some("IgnoreUnknown=1;K8S_POD_NAME=web"));
        let raw = CniCall::new("/x", "ADD", json!({})).args("garbage").env();
        assert_eq!(get(&raw, "CNI_ARGS"), Some("garbage"));
    }

    #[test]
    fn unset_env_removes_the_variable() {
        let env = CniCall::new("/x", "ADD", json!({}))
            .unset_env("CNI_IFNAME")
            .unset_env("CNI_PATH")
            .env();
        assert_eq!(get(&env, "CNI_IFNAME"), None);
        assert_eq!(get(&env, "CNI_PATH"), None);
        assert_eq!(get(&env, "CNI_COMMAND"), Some("ADD"));
    }

    #[test]
    fn gc_and_status_get_command_and_path_only() {
        for verb in ["GC", "STATUS", "VERSION"] {
            let env = CniCall::new("/x", verb, json!({})).env();
            let keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys, ["CNI_COMMAND", "CNI_PATH"], "{verb}");
        }
        let env = CniCall::new("/x", "GC", json!({})).container_id("c").env();
        assert_eq!(get(&env, "CNI_CONTAINERID"), Some("c"));
    }

    #[test]
    fn stdin_is_the_config_or_raw_bytes() {
        let call = CniCall::new("/x", "ADD", json!({"name": "n"}));
        assert_eq!(call.stdin, br#"{"name":"n"}"#);
        assert_eq!(call.stdin_raw("{not json").stdin, b"{not json");
    }

    fn output(code: i32, stdout: &str) -> CniOutput {
        use std::os::unix::process::ExitStatusExt;
        CniOutput {
            status: ExitStatus::from_raw(code << 8),
            stdout: stdout.into(),
            stderr: String::new(),
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn output_helpers() {
        assert_eq!(output(0, "").ok(), Value::Null);
        assert_eq!(output(0, r#"{"a":1}"#).ok(), json!({"a": 1}));
        let e = output(1, r#"{"cniVersion":"1.1.0","code":7,"msg":"bad","details":"d"}"#);
        assert_eq!(e.err(), (7, "bad".into(), "d".into()));
        let e = output(1, r#"{"cniVersion":"1.1.0","code":4,"msg":"m"}"#);
        assert_eq!(e.err(), (4, "m".into(), String::new()));
        assert!(std::panic::catch_unwind(|| output(1, "").ok()).is_err());
        assert!(std::panic::catch_unwind(|| output(0, "{}").err()).is_err());
    }
}
