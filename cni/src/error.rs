//! Errors with the spec's codes.
//!
//! Every error a plugin returns ends up as the spec's error object on stdout. `msg` says
//! what was wrong, naming the field or variable at fault; `details` says what to do.

use std::fmt;

use serde_json::{json, Value};

use crate::version::Version;

/// The spec's well-known error codes, plus libcni's catch-all 999.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// 1: the configuration's `cniVersion` is not one the plugin speaks.
    IncompatibleVersion,
    /// 2: a field the plugin cannot honour; the message names key and value.
    UnsupportedField,
    /// 3: the container is unknown; the runtime need not clean up.
    UnknownContainer,
    /// 4: a `CNI_*` variable is missing or invalid; the message names it.
    InvalidEnvironment,
    /// 5: reading or writing failed.
    Io,
    /// 6: the input could not be decoded (not JSON, wrong types).
    Decode,
    /// 7: the configuration is well-formed but invalid.
    InvalidConfig,
    /// 11: a transient condition; retry later.
    TryAgainLater,
    /// 50 (STATUS): cannot serve ADD.
    NotAvailable,
    /// 51 (STATUS): cannot serve ADD, existing containers may be affected.
    NotAvailableLimitedConnectivity,
    /// Any other code, as received from a delegated plugin.
    Other(u32),
}

impl Code {
    /// libcni's code for failures outside the spec's list.
    pub const INTERNAL: Code = Code::Other(999);

    pub fn value(self) -> u32 {
        match self {
            Code::IncompatibleVersion => 1,
            Code::UnsupportedField => 2,
            Code::UnknownContainer => 3,
            Code::InvalidEnvironment => 4,
            Code::Io => 5,
            Code::Decode => 6,
            Code::InvalidConfig => 7,
            Code::TryAgainLater => 11,
            Code::NotAvailable => 50,
            Code::NotAvailableLimitedConnectivity => 51,
            Code::Other(n) => n,
        }
    }

    pub fn from_value(n: u32) -> Code {
        match n {
            1 => Code::IncompatibleVersion,
            2 => Code::UnsupportedField,
            3 => Code::UnknownContainer,
            4 => Code::InvalidEnvironment,
            5 => Code::Io,
            6 => Code::Decode,
            7 => Code::InvalidConfig,
            11 => Code::TryAgainLater,
            50 => Code::NotAvailable,
            51 => Code::NotAvailableLimitedConnectivity,
            n => Code::Other(n),
        }
    }
}

/// A CNI error: a code, a short message naming what is wrong, and details saying what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl Error {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Error {
        Error {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn invalid_config(msg: impl Into<String>, details: impl Into<String>) -> Error {
        Error::new(Code::InvalidConfig, msg, details)
    }

    pub fn io(msg: impl Into<String>, err: &std::io::Error) -> Error {
        Error::new(Code::Io, format!("{}: {err}", msg.into()), "")
    }

    /// The error object the spec defines, tagged with the version in use.
    pub fn to_json(&self, version: Version) -> Value {
        let mut obj = json!({
            "cniVersion": version.as_str(),
            "code": self.code.value(),
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            obj["details"] = Value::String(self.details.clone());
        }
        obj
    }

    /// Reads an error object another plugin printed.
    pub fn from_json(value: &Value) -> Option<Error> {
        let code = value.get("code")?.as_u64()?;
        Some(Error {
            code: Code::from_value(u32::try_from(code).ok()?),
            msg: value.get("msg").and_then(Value::as_str).unwrap_or("").to_string(),
            details: value
                .get("details")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code.value())?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_code_round_trips() {
        for n in [1, 2, 3, 4, 5, 6, 7, 11, 50, 51, 999, 120] {
            assert_eq!(Code::from_value(n).value(), n);
        }
    }

    #[test]
    fn error_object_matches_the_spec_example() {
        // The spec's own example error.
        let spec: Value = serde_json::from_str(
            r#"{"cniVersion":"1.1.0","code":7,"msg":"Invalid Configuration",
                "details":"Network 192.168.0.0/31 too small to allocate from."}"#,
        )
        .unwrap();
        let e = Error::from_json(&spec).unwrap();
        assert_eq!(e.code, Code::InvalidConfig);
        assert_eq!(e.to_json(Version::V1_1_0), spec);
    }

    #[test]
    fn details_are_omitted_when_empty() {
        let v = Error::new(Code::Io, "disk full", "").to_json(Version::V0_4_0);
        assert_eq!(v, json!({"cniVersion":"0.4.0","code":5,"msg":"disk full"}));
    }
}
