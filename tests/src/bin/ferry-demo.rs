//! `make demo`: a node in network namespaces, with pods on Ferry's network.
//!
//! Builds a node netns, a client netns outside it (a machine on the node's network), and
//! three pod netns; runs the real `ferry-bridge` (which delegates addresses to
//! `ferry-ipam`) the way a runtime would, then shows what it made: the bridge, the
//! veths, the addresses, the nftables rules, the leases on disk, and packets flowing pod to
//! pod and pod to outside (masqueraded); ferry-proxy with a Service, then a NetworkPolicy
//! that denies and then allows, explained by `ferry-proxy trace`. Then DEL, GC and STATUS.
//! Everything lives in namespaces and a temp directory made here, and is removed at the
//! end. Needs root.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ferry_tests::{
    bin_dir, endpoint_slice, namespace, pod, root_missing, service, unique_v4_subnet, unique_v6_subnet,
    wait_until, CniCall, Node, Pod, ProxyProcess,
};
use serde_json::{json, Value};

const NETWORK: &str = "demo";

fn main() -> ExitCode {
    if let Some(reason) = root_missing() {
        eprintln!("ferry-demo: cannot run: {reason}.\nRun it as root: `sudo make demo`.");
        return ExitCode::FAILURE;
    }
    let bridge = bin_dir().join("ferry-bridge");
    for bin in [
        &bridge,
        &bin_dir().join("ferry-ipam"),
        &bin_dir().join("ferry-proxy"),
    ] {
        if !bin.is_file() {
            eprintln!(
                "ferry-demo: {} not found: build it with `cargo build --release --workspace --bins` \
                 (`make demo` does), or set FERRY_BIN_DIR to the directory holding the plugins.",
                bin.display()
            );
            return ExitCode::FAILURE;
        }
    }
    // Errors are returned, not panicked: the release profile aborts on panic, which would
    // skip the teardown below (the next testbed run would sweep the leftovers, though).
    match demo(&bridge) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(bridge: &Path) -> Result<(), String> {
    let node = Node::new("demo");
    let client = node.client("outside");
    node.connect_client(&client, "203.0.113.2/24", "203.0.113.1/24");
    let data_dir = node.state_dir().join("ipam");
    let (v4, v6) = (unique_v4_subnet(24), unique_v6_subnet());
    println!(
        "== A node (netns {}) and a machine outside it (203.0.113.2, netns {})",
        node.name(),
        client.name()
    );

    // Written out by hand so it prints in the order people write it (serde_json sorts keys).
    let config_text = format!(
        r#"{{
  "cniVersion": "1.1.0",
  "name": "{NETWORK}",
  "type": "ferry-bridge",
  "bridge": "cni0",
  "isGateway": true,
  "isDefaultGateway": true,
  "ipMasq": true,
  "ipam": {{
    "type": "ferry-ipam",
    "ranges": [[{{"subnet": "{v4}"}}], [{{"subnet": "{v6}"}}]],
    "dataDir": {}
  }}
}}"#,
        Value::from(data_dir.to_string_lossy())
    );
    let config: Value =
        serde_json::from_str(&config_text).map_err(|e| format!("bug: the demo config is not JSON: {e}"))?;
    println!("\n== The network config a runtime gives ferry-bridge on stdin");
    println!("{config_text}");

    let pods: Vec<(&str, Pod)> = ["web", "db", "cache"]
        .into_iter()
        .map(|name| (name, node.pod(name)))
        .collect();
    println!(
        "\n== ADD: ferry-bridge wires each pod to cni0; ferry-ipam gives it an IPv4 and an IPv6 address"
    );
    println!(
        "{:<6} {:<16} {:<18} {:<28} GATEWAYS",
        "POD", "HOST VETH", "IPv4", "IPv6"
    );
    let mut addrs = Vec::new();
    for (name, pod) in &pods {
        let result = cni(bridge, "ADD", &config, &node, |c| c.for_pod(pod))?;
        let ips = result["ips"].as_array().cloned().unwrap_or_default();
        let addr = |v6: bool| {
            ips.iter()
                .filter_map(|ip| ip["address"].as_str())
                .find(|a| a.contains(':') == v6)
                .unwrap_or("-")
                .to_owned()
        };
        let gateways: Vec<&str> = ips.iter().filter_map(|ip| ip["gateway"].as_str()).collect();
        let veth = result["interfaces"][1]["name"].as_str().unwrap_or("-");
        println!(
            "{:<6} {:<16} {:<18} {:<28} {}",
            name,
            veth,
            addr(false),
            addr(true),
            gateways.join(", ")
        );
        let ip: IpAddr = addr(false)
            .split('/')
            .next()
            .unwrap_or("")
            .parse()
            .map_err(|_| "no IPv4 address")?;
        addrs.push(ip);
    }

    println!("\n== In the node: the bridge with the gateway addresses, one veth per pod (ip -br)");
    print!(
        "{}",
        node.netns()
            .exec_ok(&["ip", "-br", "addr", "show", "dev", "cni0"])
    );
    print!(
        "{}",
        node.netns()
            .exec_ok(&["ip", "-br", "link", "show", "master", "cni0"])
    );
    println!("\n== Ferry's nftables table: masquerade per pod, tagged with its attachment");
    print!(
        "{}",
        node.netns()
            .exec_ok(&["nft", "list", "table", "inet", "ferry-bridge"])
    );

    println!("\n== Packets: every pod runs a small TCP server that answers with the address it sees");
    let servers: Vec<_> = pods
        .iter()
        .zip(&addrs)
        .map(|((_, pod), ip)| pod.tcp_server(SocketAddr::new(*ip, 8080)))
        .collect();
    for (i, (from, pod)) in pods.iter().enumerate() {
        let j = (i + 1) % pods.len();
        let seen = pod
            .tcp_request(SocketAddr::new(addrs[j], 8080))
            .map_err(|e| format!("{from} -> {}: {e}", pods[j].0))?;
        println!(
            "   {from:<5} -> {:<5} {}:8080   {} saw the connection come from {seen}",
            pods[j].0, addrs[j], pods[j].0
        );
    }
    let _outside = client.tcp_server("203.0.113.2:9000".parse().expect("an address"));
    let seen = pods[0]
        .1
        .tcp_request("203.0.113.2:9000".parse().expect("an address"))
        .map_err(|e| format!("web -> outside: {e}"))?;
    println!("   web   -> outside 203.0.113.2:9000   outside saw {seen}: the node's address (ipMasq)");

    services(&node, &client, &pods, &addrs, &v4)?;
    drop(servers);

    println!("\n== ferry-ipam's leases on disk: one file per address, holding container id and interface");
    print_store(&data_dir)?;

    let (gone, gone_pod) = &pods[0];
    println!("\n== DEL {gone}: its veth, its rules and its leases go");
    cni(bridge, "DEL", &config, &node, |c| c.for_pod(gone_pod))?;
    print!(
        "{}",
        node.netns()
            .exec_ok(&["ip", "-br", "link", "show", "master", "cni0"])
    );
    print_store(&data_dir)?;

    let (kept, kept_pod) = &pods[1];
    println!("\n== GC: the runtime says only {kept} is still attached; everything of the others goes");
    let mut gc_config = config.clone();
    gc_config["cni.dev/valid-attachments"] =
        json!([{"containerID": kept_pod.container_id(), "ifname": "eth0"}]);
    cni(bridge, "GC", &gc_config, &node, |c| c)?;
    print!(
        "{}",
        node.netns()
            .exec_ok(&["ip", "-br", "link", "show", "master", "cni0"])
    );
    print_store(&data_dir)?;

    println!("\n== STATUS: can the network take new pods?");
    cni(bridge, "STATUS", &config, &node, |c| c)?;
    println!("yes (exit 0)");

    println!("\n== Teardown: pod, client and node namespaces and the state directory are removed");
    drop(pods);
    drop(client);
    drop(node);
    println!("done");
    Ok(())
}

/// ferry-proxy on the node: a Service in front of web and db, reached by ClusterIP from
/// the cache pod and by NodePort from outside.
fn services(
    node: &Node,
    client: &ferry_tests::Netns,
    pods: &[(&str, Pod)],
    addrs: &[IpAddr],
    v4: &str,
) -> Result<(), String> {
    println!(
        "\n== ferry-proxy: Service \"web\" (ClusterIP 10.96.0.10:80, NodePort 30080) in front of web and db"
    );
    // The node needs a route out (so nothing fails for lack of one), and pod-to-Service
    // traffic on the same bridge must cross netfilter to be un-NATed (see the README).
    let _ = node
        .netns()
        .exec(&["ip", "route", "add", "default", "via", "203.0.113.2"]);
    let _ = node
        .netns()
        .exec(&["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]);
    let proxy = ProxyProcess::start(
        node.netns(),
        &node.state_dir().join("manifests"),
        "demo-node",
        &["--cluster-cidr", v4],
    );
    let (web, db) = (addrs[0].to_string(), addrs[1].to_string());
    let mut svc = service(
        "web",
        "10.96.0.10",
        &[("http", "TCP", 80, json!(8080))],
        json!({"type": "NodePort"}),
    );
    svc["spec"]["ports"][0]["nodePort"] = json!(30080);
    let slice = endpoint_slice(
        "web",
        "1",
        &[
            (&web, "demo-node", true, true, false),
            (&db, "demo-node", true, true, false),
        ],
        &[("http", "TCP", 8080)],
    );
    proxy.write("web", &[svc, slice]);
    println!(
        "   (written to {} as a kubectl-style List)",
        proxy.manifests.join("web.json").display()
    );
    let programmed = wait_until(std::time::Duration::from_secs(5), || {
        let out = node
            .netns()
            .exec(&["nft", "list", "table", "inet", "ferry-proxy"]);
        String::from_utf8_lossy(&out.stdout).contains("10.96.0.10")
    });
    let took = programmed.ok_or_else(|| {
        format!(
            "ferry-proxy did not program the Service; its log:\n{}",
            proxy.log()
        )
    })?;
    println!(
        "   programmed {:.0} ms after the file was written",
        took.as_secs_f64() * 1e3
    );
    let dump = node
        .netns()
        .command(bin_dir().join("ferry-proxy"))
        .args(["dump", "--manifests"])
        .arg(&proxy.manifests)
        .args(["--hostname-override", "demo-node"])
        .output()
        .map_err(|e| format!("ferry-proxy dump: {e}"))?;
    println!(
        "-- ferry-proxy dump\n{}",
        String::from_utf8_lossy(&dump.stdout).trim_end()
    );

    let cache = &pods[2].1;
    let mut answered: Vec<String> = Vec::new();
    for _ in 0..10 {
        let reply = cache
            .tcp_request("10.96.0.10:80".parse().expect("an address"))
            .map_err(|e| format!("cache -> ClusterIP: {e}"))?;
        let server = reply.split_whitespace().nth(1).unwrap_or("?").to_string();
        let name = if server.starts_with(&format!("{web}:")) {
            "web"
        } else if server.starts_with(&format!("{db}:")) {
            "db"
        } else {
            "?"
        };
        answered.push(name.to_string());
    }
    println!(
        "   cache -> 10.96.0.10:80, 10 connections, answered by: {}",
        answered.join(" ")
    );
    let reply = client
        .tcp_request("203.0.113.1:30080".parse().expect("an address"))
        .map_err(|e| format!("outside -> NodePort: {e}"))?;
    println!(
        "   outside -> 203.0.113.1:30080 (NodePort): the pod saw {} (the node, masqueraded)",
        reply.split_whitespace().next().unwrap_or("?")
    );
    network_policy(node, &proxy, pods, addrs)?;
    drop(proxy);
    let out = node
        .netns()
        .command(bin_dir().join("ferry-proxy"))
        .arg("cleanup")
        .output()
        .map_err(|e| format!("ferry-proxy cleanup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ferry-proxy cleanup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    println!("   ferry-proxy stopped; `ferry-proxy cleanup` removed its table");
    Ok(())
}

/// NetworkPolicy, by the same ferry-proxy: a policy isolates web and denies cache, then a
/// changed policy lets cache (and only cache) in; `ferry-proxy trace` explains both.
fn network_policy(
    node: &Node,
    proxy: &ProxyProcess,
    pods: &[(&str, Pod)],
    addrs: &[IpAddr],
) -> Result<(), String> {
    println!("\n== NetworkPolicy: the Pods and a policy that isolates web");
    let mut objects = vec![namespace("default", json!({}))];
    for ((name, _), ip) in pods.iter().zip(addrs) {
        objects.push(pod(
            "default",
            name,
            "demo-node",
            json!({ "app": name }),
            &[*ip],
            &[("http", "TCP", 8080)],
        ));
    }
    proxy.write("pods", &objects);
    let policy = |ingress: Value| {
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "web-ingress", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"], "ingress": ingress}
        })
    };
    let web = SocketAddr::new(addrs[0], 8080);
    let cache = &pods[2].1;
    let db = &pods[1].1;
    let trace = |from: &str| -> Result<String, String> {
        let out = node
            .netns()
            .command(bin_dir().join("ferry-proxy"))
            .args(["trace", "--manifests"])
            .arg(&proxy.manifests)
            .args(["--hostname-override", "demo-node", from, "default/web:8080"])
            .output()
            .map_err(|e| format!("ferry-proxy trace: {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    };
    // One step: write the policy, wait until the kernel says what trace says, show both.
    let step = |ingress: Value, what: &str| -> Result<(), String> {
        println!("   {what}");
        proxy.write("policy", &[policy(ingress)]);
        // Until the daemon has synced (within a second), the kernel may still hold the
        // last step: wait until it does what trace says.
        wait_until(std::time::Duration::from_secs(10), || {
            let expected = trace("default/cache").is_ok_and(|t| t.contains("ALLOWED"));
            cache.tcp_request(web).is_ok() == expected
        })
        .ok_or_else(|| {
            format!(
                "the kernel did not follow the policy; ferry-proxy's log:\n{}",
                proxy.log()
            )
        })?;
        for (name, from) in [("cache", cache), ("db", db)] {
            let verdict = match from.tcp_request(web) {
                Ok(_) => "connected".to_string(),
                Err(e) => format!("no answer ({e}): dropped"),
            };
            println!("   {name:<5} -> web {web}: {verdict}");
        }
        println!(
            "-- ferry-proxy trace default/cache default/web:8080\n{}",
            trace("default/cache")?
        );
        Ok(())
    };
    step(
        json!([]),
        "policy web-ingress: selects app=web, allows no ingress",
    )?;
    step(
        json!([{"from": [{"podSelector": {"matchLabels": {"app": "cache"}}}], "ports": [{"port": "http"}]}]),
        "policy web-ingress changed: allows app=cache on the named port http",
    )?;
    let table = node
        .netns()
        .exec(&["nft", "list", "table", "inet", "ferry-policy"]);
    println!(
        "-- nft list table inet ferry-policy\n{}",
        String::from_utf8_lossy(&table.stdout).trim_end()
    );
    Ok(())
}

/// Runs one plugin verb inside the node's netns; returns its JSON result (Null when it
/// prints nothing) or an error with the plugin's own message.
fn cni(
    plugin: &Path,
    verb: &str,
    config: &Value,
    node: &Node,
    setup: impl FnOnce(CniCall) -> CniCall,
) -> Result<Value, String> {
    let out = setup(CniCall::new(plugin, verb, config.clone())).run_in(node.netns());
    if !out.status.success() {
        return Err(format!("{} {verb} failed:\n{out}", plugin.display()));
    }
    if out.stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&out.stdout).map_err(|e| {
        format!(
            "{} {verb} printed something that is not JSON ({e}):\n{out}",
            plugin.display()
        )
    })
}

/// Lists the store of network "demo": one file per leased address (holding the container
/// id and interface), plus the allocator's bookkeeping files.
fn print_store(data_dir: &Path) -> Result<(), String> {
    let dir = data_dir.join(NETWORK);
    println!("-- files in {}", dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
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
