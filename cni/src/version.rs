//! Spec versions Ferry speaks.

use std::fmt;

use crate::error::{Code, Error};

/// A CNI specification version this crate can read and write.
///
/// 0.1.0 and 0.2.0 are not supported: their result format (`ip4`/`ip6`) cannot carry
/// dual-stack or multi-interface results, and no runtime in use today needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    /// Every supported version, oldest first (the order `VERSION` prints them in).
    pub const ALL: [Version; 5] = [
        Version::V0_3_0,
        Version::V0_3_1,
        Version::V0_4_0,
        Version::V1_0_0,
        Version::V1_1_0,
    ];

    /// The newest version: used for output when the input's version is unknown.
    pub const LATEST: Version = Version::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    /// Parses a `cniVersion` value; an unsupported one is the spec's code 1.
    pub fn parse(s: &str) -> Result<Version, Error> {
        Version::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| {
            Error::new(
                Code::IncompatibleVersion,
                format!("cniVersion \"{s}\" is not supported"),
                format!(
                    "set cniVersion to one of: {}",
                    Version::ALL.map(Version::as_str).join(", ")
                ),
            )
        })
    }

    /// CHECK appeared in 0.4.0.
    pub fn has_check(self) -> bool {
        self >= Version::V0_4_0
    }

    /// STATUS and GC appeared in 1.1.0.
    pub fn has_status_and_gc(self) -> bool {
        self >= Version::V1_1_0
    }

    /// Results before 1.0.0 carry a `version` ("4"/"6") on every IP.
    pub fn ips_carry_family(self) -> bool {
        self < Version::V1_0_0
    }

    /// 1.1.0 added interface `mtu`/`socketPath`/`pciID` and route `mtu`/`advmss`/...
    pub fn has_extended_fields(self) -> bool {
        self >= Version::V1_1_0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_supported_version_and_rejects_others() {
        for v in Version::ALL {
            assert_eq!(Version::parse(v.as_str()).unwrap(), v);
        }
        for bad in ["0.1.0", "0.2.0", "1.2.0", "", "1.0"] {
            let e = Version::parse(bad).unwrap_err();
            assert_eq!(e.code, Code::IncompatibleVersion);
            assert!(e.details.contains("1.1.0"), "{e:?}");
        }
    }

    #[test]
    fn verbs_follow_the_version_they_appeared_in() {
        assert!(!Version::V0_3_1.has_check());
        assert!(Version::V0_4_0.has_check());
        assert!(!Version::V1_0_0.has_status_and_gc());
        assert!(Version::V1_1_0.has_status_and_gc());
    }
}
