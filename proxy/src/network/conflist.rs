//! `10-ferry.conflist`: the CNI configuration a container runtime finds in the CNI config
//! directory, made from this node's Pod CIDRs, and written so that a runtime never reads
//! half of it.
//!
//! The file is ferry-bridge delegating to ferry-ipam with one range set per Pod CIDR
//! (one per family on a dual-stack node). `ipMasq` is off: the daemon masquerades what
//! leaves the cluster CIDR itself ([`super::masquerade`]), since ferry-bridge would also
//! masquerade traffic to other nodes' Pods. With VXLAN possible (`vxlan`, `auto`) the
//! bridge's `mtu` is the underlay's minus the encapsulation, so Pods never send what the
//! tunnel would have to fragment.
//!
//! Writing: a temporary file in the same directory (a name a runtime ignores: libcni reads
//! only `.conf`, `.conflist` and `.json`), written, flushed to disk, then renamed over the
//! old one, so a reader sees the old bytes or the new ones. Nothing is written when the
//! bytes on disk are already the ones wanted, and no other file of the directory is
//! touched.

use std::io::Write;
use std::path::Path;

use ipnetwork::IpNetwork;
use serde_json::json;

use super::NetworkSettings;

pub const FILE_NAME: &str = "10-ferry.conflist";

/// The conflist's bytes (pretty JSON, keys in a fixed order, a final newline).
pub fn render(settings: &NetworkSettings, pod_cidrs: &[IpNetwork], mtu: Option<u32>) -> String {
    let ranges: Vec<_> = pod_cidrs
        .iter()
        .map(|cidr| json!([{ "subnet": cidr.to_string() }]))
        .collect();
    let mut routes = Vec::new();
    if pod_cidrs.iter().any(IpNetwork::is_ipv4) {
        routes.push(json!({ "dst": "0.0.0.0/0" }));
    }
    if pod_cidrs.iter().any(IpNetwork::is_ipv6) {
        routes.push(json!({ "dst": "::/0" }));
    }
    let mut bridge = json!({
        "type": "ferry-bridge",
        "bridge": settings.bridge,
        "isGateway": true,
        "isDefaultGateway": true,
        "ipMasq": false,
        "hairpinMode": true,
        "capabilities": { "portMappings": true, "ips": true, "mac": true },
        "ipam": {
            "type": "ferry-ipam",
            "ranges": ranges,
            "routes": routes,
            "dataDir": settings.ipam_data_dir,
        }
    });
    if let Some(mtu) = mtu {
        bridge["mtu"] = json!(mtu);
    }
    let conf = json!({
        // 1.0.0: containerd up to 1.7 and podman 4 refuse a 1.1.0 result (see the README).
        "cniVersion": "1.0.0",
        "name": "ferry",
        "plugins": [bridge],
    });
    let mut text = serde_json::to_string_pretty(&conf).expect("JSON values always serialise");
    text.push('\n');
    text
}

/// Puts `bytes` at `dir/10-ferry.conflist` unless the file holds them already; says
/// whether it wrote.
pub fn write_if_changed(dir: &Path, bytes: &str) -> std::io::Result<bool> {
    let path = dir.join(FILE_NAME);
    if std::fs::read(&path).is_ok_and(|old| old == bytes.as_bytes()) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes.as_bytes())?;
        // On disk before the name points at it: after a power cut the name holds the old
        // bytes or the new ones, never an empty file.
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        // The rename itself.
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| true)
}
