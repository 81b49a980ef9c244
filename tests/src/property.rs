//! The one configuration of the workspace's property tests: a fixed seed per test file (a
//! failure reproduces on every machine, and CI never meets a case nobody saw), no
//! failure-persistence files in the source tree, and `PROPTEST_CASES` to run more (or
//! fewer) cases than the default 256.

use proptest::test_runner::{Config, RngSeed};

/// The configuration for a property test file whose seed is `seed`.
pub fn config(seed: u64) -> Config {
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(256),
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    }
}
