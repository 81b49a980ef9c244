//! A plugin that panics still answers with the spec's error object: the runtime is never
//! left with an empty stdout. The test runs this test binary again as the plugin.

use std::process::{Command, Stdio};

use cni::{Attachment, CniResult, Error, Plugin, Request};

struct Panicking;

impl Plugin for Panicking {
    fn add(&self, req: &Request) -> Result<CniResult, Error> {
        let slice: &[u8] = req.env.container_id.as_bytes();
        // Out of bounds, as netlink-packet-core's writer was on an over-long attribute.
        let _ = slice[slice.len() + usize::from(!req.env.ifname.is_empty())];
        unreachable!()
    }
    fn del(&self, _: &Request) -> Result<(), Error> {
        Ok(())
    }
    fn check(&self, _: &Request) -> Result<(), Error> {
        Ok(())
    }
    fn status(&self, _: &Request) -> Result<(), Error> {
        Ok(())
    }
    fn gc(&self, _: &Request, _: &[Attachment]) -> Result<(), Error> {
        Ok(())
    }
}

const CHILD: &str = "CNI_PANIC_REPORT_CHILD";

/// In the child, the plugin's main; in a plain test run, nothing.
#[test]
fn child_plugin() {
    if std::env::var_os(CHILD).is_some() {
        cni::run(&Panicking);
    }
}

#[test]
fn a_panic_prints_an_error_object_with_code_999() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_plugin", "--exact", "--test-threads=1", "--nocapture", "-q"])
        .env(CHILD, "1")
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "c1")
        .env("CNI_NETNS", "/run/netns/x")
        .env("CNI_IFNAME", "eth0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"cniVersion": "1.0.0", "name": "n", "type": "t"}"#)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    // libtest prints its own lines first; the plugin's answer is a line of JSON.
    let error: serde_json::Value = stdout
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON on stdout: {stdout}"));
    assert_eq!(error["code"], 999, "{error}");
    assert!(
        error["msg"].as_str().unwrap().contains("index out of bounds"),
        "{error}"
    );
    assert!(
        error["details"].as_str().unwrap().contains("DEL the attachment"),
        "{error}"
    );
}
