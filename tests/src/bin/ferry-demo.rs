//! `make demo`: a tour of ferry-ipam on a throwaway node.
//!
//! Builds a node netns and three pod netns, then runs the real `ferry-ipam` binary the
//! way a runtime would (ADD, DEL, GC, STATUS) and shows what it answers and what it keeps
//! on disk. Everything lives in namespaces and a temp directory made here, and is removed
//! at the end. Needs root.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ferry_tests::{bin_dir, root_missing, unique_v4_subnet, unique_v6_subnet, CniCall, Node, Pod};
use serde_json::{json, Value};

const NETWORK: &str = "demo";

fn main() -> ExitCode {
    if let Some(reason) = root_missing() {
        eprintln!("ferry-demo: cannot run: {reason}.\nRun it as root: `sudo make demo`.");
        return ExitCode::FAILURE;
    }
    let ipam = bin_dir().join("ferry-ipam");
    if !ipam.is_file() {
        eprintln!(
            "ferry-demo: {} not found: build it with `cargo build --release --workspace --bins` \
             (`make demo` does), or set FERRY_BIN_DIR to the directory holding ferry-ipam.",
            ipam.display()
        );
        return ExitCode::FAILURE;
    }
    // Errors are returned, not panicked: the release profile aborts on panic, which would
    // skip the teardown below (the next testbed run would sweep the leftovers, though).
    match demo(&ipam) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(ipam: &Path) -> Result<(), String> {
    let node = Node::new("demo");
    let data_dir = node.state_dir().join("ipam");
    let (v4, v6) = (unique_v4_subnet(24), unique_v6_subnet());
    println!(
        "== A node: netns {}, state in {}",
        node.name(),
        node.state_dir().display()
    );

    // The runtime hands the IPAM plugin the whole network config; the main plugin
    // (ferry-bridge) would normally delegate to it. Here we call it directly. Written out
    // by hand so it prints in the order people write it (serde_json sorts keys).
    let config_text = format!(
        r#"{{
  "cniVersion": "1.1.0",
  "name": "{NETWORK}",
  "type": "ferry-bridge",
  "ipam": {{
    "type": "ferry-ipam",
    "ranges": [[{{"subnet": "{v4}"}}], [{{"subnet": "{v6}"}}]],
    "routes": [{{"dst": "0.0.0.0/0"}}],
    "dataDir": {}
  }}
}}"#,
        Value::from(data_dir.to_string_lossy())
    );
    let config: Value =
        serde_json::from_str(&config_text).map_err(|e| format!("bug: the demo config is not JSON: {e}"))?;
    println!("\n== The network config, given to ferry-ipam on stdin");
    println!("{config_text}");

    let pods: Vec<(&str, Pod)> = ["web", "db", "cache"]
        .into_iter()
        .map(|name| (name, node.pod(name)))
        .collect();

    println!("\n== ADD: ferry-ipam allocates an IPv4 and an IPv6 address for each pod");
    println!(
        "{:<6} {:<28} {:<18} {:<30} GATEWAYS",
        "POD", "CONTAINER ID", "IPv4", "IPv6"
    );
    for (name, pod) in &pods {
        let result = cni(ipam, "ADD", &config, &node, |c| c.for_pod(pod))?;
        let ips = result["ips"].as_array().cloned().unwrap_or_default();
        let addr = |v6: bool| {
            ips.iter()
                .filter_map(|ip| ip["address"].as_str())
                .find(|a| a.contains(':') == v6)
                .unwrap_or("-")
                .to_owned()
        };
        let gateways: Vec<&str> = ips.iter().filter_map(|ip| ip["gateway"].as_str()).collect();
        println!(
            "{:<6} {:<28} {:<18} {:<30} {}",
            name,
            pod.container_id(),
            addr(false),
            addr(true),
            gateways.join(", ")
        );
    }
    println!(
        "\nferry-ipam keeps one file per leased address (holding container id and interface),\n\
         and per range the last address it handed out, where the next search starts."
    );
    print_store(&data_dir)?;

    let (gone, _) = &pods[0];
    println!("\n== DEL {gone}: its addresses go back to the pool");
    cni(ipam, "DEL", &config, &node, |c| c.for_pod(&pods[0].1))?;
    print_store(&data_dir)?;

    let (kept, kept_pod) = &pods[1];
    println!("\n== GC: the runtime says only {kept} is still attached; every other lease is released");
    let mut gc_config = config.clone();
    gc_config["cni.dev/valid-attachments"] =
        json!([{"containerID": kept_pod.container_id(), "ifname": "eth0"}]);
    cni(ipam, "GC", &gc_config, &node, |c| c)?;
    print_store(&data_dir)?;

    println!("\n== STATUS: can ferry-ipam take new ADDs?");
    cni(ipam, "STATUS", &config, &node, |c| c)?;
    println!("yes (exit 0)");

    println!("\n== Teardown: pod and node namespaces and the state directory are removed");
    drop(pods);
    drop(node);
    println!("done");
    Ok(())
}

/// Runs one ferry-ipam verb inside the node's netns; returns its JSON result (Null when
/// it prints nothing) or an error with the plugin's own message.
fn cni(
    ipam: &Path,
    verb: &str,
    config: &Value,
    node: &Node,
    setup: impl FnOnce(CniCall) -> CniCall,
) -> Result<Value, String> {
    let out = setup(CniCall::new(ipam, verb, config.clone())).run_in(node.netns());
    if !out.status.success() {
        return Err(format!("ferry-ipam {verb} failed:\n{out}"));
    }
    if out.stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&out.stdout)
        .map_err(|e| format!("ferry-ipam {verb} printed something that is not JSON ({e}):\n{out}"))
}

/// Lists the store of network "demo": one file per leased address (holding the container
/// id and interface), plus the allocator's bookkeeping files.
fn print_store(data_dir: &Path) -> Result<(), String> {
    let dir = data_dir.join(NETWORK);
    println!("-- files in {}", dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    for path in files {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let content = std::fs::read_to_string(&path).unwrap_or_default();
        // Lease files hold "<container id>\r\n<ifname>", as host-local writes them.
        let content: Vec<&str> = content.split_whitespace().collect();
        println!("   {name:<24} {}", content.join("  "));
    }
    Ok(())
}
