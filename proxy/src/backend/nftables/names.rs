//! Names of everything in Ferry's table: the table itself, and per Service port its chains,
//! affinity sets and endpoint map, all derived from the port's identity so that a port
//! keeps its names for life and a restart finds them again.
//!
//! Every name is built from `[A-Za-z0-9_./-]` and starts with a letter (see [`sanitize`]),
//! so the nft text of a transaction needs no quoting.

use sha2::{Digest, Sha256};

use super::rules::fam;
use crate::plan::{Endpoint, Family, Protocol, ServicePortId};

/// The table Ferry owns, in family `inet`.
pub const TABLE: &str = "ferry-proxy";
/// `inet ferry-proxy`, as nft commands name the table.
pub(super) const T: &str = "inet ferry-proxy";
/// Longest object name nft accepts is 255 bytes; ours stay well below.
const MAX_BASE: usize = 200;
/// Prefixes of per-port chains, in the order they are deleted (a chain that jumps to
/// another comes before it).
pub(super) const PORT_CHAIN_PREFIXES: [&str; 5] = [
    "external-",
    "firewall-",
    "ext-endpoints-",
    "all-endpoints-",
    "service-",
];
const AFFINITY_PREFIX: &str = "affinity-";

/// Makes `s` safe inside an nft identifier: `[A-Za-z0-9_./-]` stay, `:` (IPv6) becomes `.`,
/// anything else `_`. Kubernetes names are DNS labels and never change here; the hash in
/// every name keeps two sanitized names apart.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '_' | '.' | '/' | '-' => c,
            ':' => '.',
            _ => '_',
        })
        .collect()
}

/// The first 8 base32 characters of SHA-256(`s`).
fn hash8(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(s.as_bytes());
    let bits = digest[..5].iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
    (0..8)
        .rev()
        .map(|i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// `HASH-<readable>`, the readable part cut to keep names within nft's limits.
fn hashed(full: &str) -> String {
    let mut readable = sanitize(full);
    if readable.len() > MAX_BASE {
        readable.truncate(MAX_BASE - 3);
        readable.push_str("...");
    }
    format!("{}-{}", hash8(full), readable)
}

/// The stable part of every chain name of one Service port: `HASH-ns/name/proto/port/v4`.
pub fn port_base_name(id: &ServicePortId) -> String {
    hashed(&format!(
        "{}/{}/{}/{}/{}",
        id.namespace,
        id.name,
        id.protocol.as_str(),
        id.port_name,
        fam(id.family)
    ))
}

/// The affinity set of one endpoint of one port (the timeout is part of the identity: a
/// new timeout is a new set, since nft cannot change a set's timeout in place).
pub(super) fn affinity_set_name(id: &ServicePortId, ep: &Endpoint, timeout: u32) -> String {
    let ip = ep.ip.to_string().replace(':', ".");
    format!(
        "{AFFINITY_PREFIX}{}",
        hashed(&format!(
            "{}/{}/{}/{}__{}/{}/t{}",
            id.namespace,
            id.name,
            id.protocol.as_str(),
            id.port_name,
            ip,
            ep.port,
            timeout
        ))
    )
}

pub(super) fn endpoint_map(f: Family, proto: Protocol, shard: u32) -> String {
    format!("endpoints-{}-{}-{shard:02}", fam(f), proto.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nftables::render::tests::{ep, port};

    #[test]
    fn names_are_stable_safe_and_distinct() {
        let a = port("web", Family::V4);
        let b = port("web", Family::V6);
        let na = port_base_name(&a.id);
        assert_eq!(na, port_base_name(&a.id));
        assert_ne!(na, port_base_name(&b.id));
        assert!(na.ends_with("-default/web/tcp//v4"), "{na}");
        assert_eq!(na.len(), 8 + 1 + "default/web/tcp//v4".len());
        let long = ServicePortId {
            name: "x".repeat(300),
            ..a.id.clone()
        };
        let name = format!("ext-endpoints-{}", port_base_name(&long));
        assert!(name.len() < 256, "{}", name.len());
        assert_eq!(sanitize("a b:c\"d;"), "a_b.c_d_");
        let set = affinity_set_name(&b.id, &ep("fd00::1", 80), 10);
        assert!(
            set.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_./-".contains(c)),
            "{set}"
        );
    }
}
