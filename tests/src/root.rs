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

/// True when `test` can run (root and `ip netns` work). Otherwise [`skip_or_fail`]s.
pub fn require_root(test: &str) -> bool {
    match root_missing() {
        None => true,
        Some(reason) => skip_or_fail(
            test,
            &format!(
                "it needs root and `ip netns`, but {reason}; run the tests as root with `make test` \
                 (it installs iproute2 and builds the plugin binaries first)"
            ),
        ),
    }
}

/// The one way a test gives up for lack of something on the machine (root, a reference
/// plugin, a runtime): prints `SKIP <test>: <reason>` and returns false, or panics when
/// `FERRY_REQUIRE_ROOT=1`. CI sets that, so a run that tested nothing never looks green:
/// whatever a test needs, `scripts/setup.sh` installs, and CI must have it.
pub fn skip_or_fail(test: &str, reason: &str) -> bool {
    if std::env::var("FERRY_REQUIRE_ROOT").as_deref() == Ok("1") {
        panic!(
            "{test} cannot run: {reason}.\n\
             FERRY_REQUIRE_ROOT=1 forbids skipping; unset it to skip such tests instead."
        );
    }
    eprintln!("SKIP {test}: {reason}");
    false
}
