//! `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
//!
//! A plugin declares the keys it understands; any other key is an error unless the runtime
//! set `IgnoreUnknown` (podman and the kubelet always do, because they send their
//! `K8S_POD_*` keys to every plugin).

use crate::error::{Code, Error};

/// Keys every plugin accepts: the ones Kubernetes runtimes send to all plugins.
pub const KUBERNETES_KEYS: [&str; 4] = [
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// The variable as received, passed on unchanged to delegated plugins.
    raw: String,
    pairs: Vec<(String, String)>,
    ignore_unknown: bool,
}

impl CniArgs {
    /// Parses the raw variable. A pair without `=` is code 4, naming the pair.
    pub fn parse(raw: &str) -> Result<CniArgs, Error> {
        let mut args = CniArgs {
            raw: raw.to_string(),
            ..CniArgs::default()
        };
        for pair in raw.split(';').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(Error::new(
                    Code::InvalidEnvironment,
                    format!("CNI_ARGS: \"{pair}\" is not a KEY=VALUE pair"),
                    "CNI_ARGS must look like \"KEY1=VALUE1;KEY2=VALUE2\"",
                ));
            };
            if key.is_empty() {
                return Err(Error::new(
                    Code::InvalidEnvironment,
                    format!("CNI_ARGS: \"{pair}\" has an empty key"),
                    "CNI_ARGS must look like \"KEY1=VALUE1;KEY2=VALUE2\"",
                ));
            }
            if key.eq_ignore_ascii_case("IgnoreUnknown") {
                args.ignore_unknown = matches!(value.to_ascii_lowercase().as_str(), "1" | "true");
                continue;
            }
            args.pairs.push((key.to_string(), value.to_string()));
        }
        Ok(args)
    }

    /// The value of `key`, if given (the last one wins when repeated).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn raw(&self) -> &str {
        &self.raw
    }

    pub fn ignore_unknown(&self) -> bool {
        self.ignore_unknown
    }

    /// Fails with code 4 on a key that is neither in `known` nor a Kubernetes key,
    /// unless `IgnoreUnknown` was set.
    pub fn check_known(&self, known: &[&str]) -> Result<(), Error> {
        if self.ignore_unknown {
            return Ok(());
        }
        let unknown: Vec<&str> = self
            .pairs
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| !known.contains(k) && !KUBERNETES_KEYS.contains(k))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            Code::InvalidEnvironment,
            format!("CNI_ARGS: unknown key(s) {}", unknown.join(", ")),
            format!(
                "this plugin understands {}; add IgnoreUnknown=1 to CNI_ARGS to pass other keys",
                if known.is_empty() {
                    "no keys of its own".to_string()
                } else {
                    known.join(", ")
                }
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_ignore_unknown() {
        let a = CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;IP=10.0.0.5").unwrap();
        assert!(a.ignore_unknown());
        assert_eq!(a.get("IP"), Some("10.0.0.5"));
        assert_eq!(a.get("K8S_POD_NAMESPACE"), Some("default"));
        assert_eq!(a.get("missing"), None);
        a.check_known(&[]).unwrap();
    }

    #[test]
    fn values_may_contain_equals_signs_and_empty_pairs_are_skipped() {
        let a = CniArgs::parse(";A=b=c;;").unwrap();
        assert_eq!(a.get("A"), Some("b=c"));
    }

    #[test]
    fn unknown_keys_are_code_4_naming_them() {
        let a = CniArgs::parse("K8S_POD_NAME=x;FOO=1;BAR=2").unwrap();
        let e = a.check_known(&["IP"]).unwrap_err();
        assert_eq!(e.code, Code::InvalidEnvironment);
        assert!(e.msg.contains("FOO, BAR"), "{e}");
        assert!(e.details.contains("IgnoreUnknown"), "{e}");
        a.check_known(&["FOO", "BAR"]).unwrap();
    }

    #[test]
    fn a_pair_without_equals_is_rejected() {
        let e = CniArgs::parse("A=1;oops").unwrap_err();
        assert_eq!(e.code, Code::InvalidEnvironment);
        assert!(e.msg.contains("\"oops\""));
    }
}
