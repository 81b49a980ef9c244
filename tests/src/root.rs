//! Whether this process may build network namespaces, and what a test does when not.

use std::process::Command;
use std::sync::OnceLock;

/// Why tests that need network namespaces cannot run here, or `None` when they can.
///
/// They need euid 0 (creating namespaces and links needs CAP_SYS_ADMIN and CAP_NET_ADMIN)
/// and a working `ip netns` (iproute2). Checked once per process.
pub fn root_missing() -> Option<String> {
    static MISSING: OnceLock<Option<String>> = OnceLock::new();
    MISSING.get_or_init(check).clone()
}

fn check() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some(format!(
            "not running as root (euid {}): network namespaces need root",
            nix::unistd::geteuid()
        ));
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Err(e) => Some(format!(
            "cannot run `ip` ({e}): install iproute2 (`make setup` does)"
        )),
        Ok(out) if !out.status.success() => Some(format!(
            "`ip netns list` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// True when `test` can run (root and `ip netns` work). Otherwise prints
/// `SKIP <test>: <reason>` and returns false, or panics when `FERRY_REQUIRE_ROOT=1`:
/// CI sets that so a run without root fails loudly instead of passing while skipping.
pub fn require_root(test: &str) -> bool {
    let Some(reason) = root_missing() else {
        return true;
    };
    if std::env::var("FERRY_REQUIRE_ROOT").as_deref() == Ok("1") {
        panic!(
            "{test} needs root and `ip netns`, but {reason}.\n\
             FERRY_REQUIRE_ROOT=1 forbids skipping: run the tests as root with `make test` \
             (it installs iproute2 and builds the plugin binaries first), \
             or unset FERRY_REQUIRE_ROOT to skip them."
        );
    }
    eprintln!("SKIP {test}: {reason}");
    false
}
