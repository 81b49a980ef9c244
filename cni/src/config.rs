//! The network configuration on stdin: the fields every plugin shares.
//!
//! A plugin's own fields (`ipam.ranges`, `bridge`, ...) stay in [`NetConf::raw`]; the plugin
//! reads them with [`parse_at`], which names the exact field when something is off.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{Code, Error};
use crate::result::CniResult;
use crate::version::Version;

#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: Version,
    /// The network name: validated as libcni does, so it is safe as a path component.
    pub name: String,
    pub plugin_type: String,
    pub runtime_config: RuntimeConfig,
    /// The previous plugin's (or the previous ADD's) result, in `cni_version`.
    pub prev_result: Option<CniResult>,
    /// GC's list of attachments still in use (`cni.dev/valid-attachments`).
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The whole configuration as received, for the plugin's own fields and for delegation.
    pub raw: Value,
}

/// Capabilities the runtime passes in `runtimeConfig`. Keys are matched without regard to
/// case: podman writes `portMappings[].hostPort`, containerd's CRI `HostPort`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Static addresses asked for (`ips`), with or without a prefix length.
    pub ips: Vec<IpAddr>,
    /// A MAC address for the container interface (`mac`).
    pub mac: Option<String>,
    pub port_mappings: Vec<PortMapping>,
}

/// The most `runtimeConfig.portMappings` a configuration may hold. Each becomes nftables
/// rules installed in one transaction while the runtime waits; a Pod publishing more ports
/// than this is refused (code 7) rather than left to take seconds per call.
pub const MAX_PORT_MAPPINGS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// Lower-case `tcp`, `udp` or `sctp`.
    pub protocol: String,
    pub host_ip: Option<IpAddr>,
}

/// One attachment a runtime still uses, as GC lists them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    /// Reads the configuration bytes from stdin. `cniVersion` is read first, so that every
    /// later error can be reported in the configuration's own version.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, Error> {
        let raw = parse_json(bytes)?;
        let cni_version = version_of(&raw)?;
        NetConf::from_value(raw, cni_version)
    }

    fn from_value(raw: Value, cni_version: Version) -> Result<NetConf, Error> {
        let obj = raw.as_object().expect("version_of checked it is an object");
        let name = required_str(obj, "name")?;
        validate_network_name(name)?;
        let plugin_type = required_str(obj, "type")?.to_string();
        let runtime_config = match obj.get("runtimeConfig") {
            None | Some(Value::Null) => RuntimeConfig::default(),
            Some(v) => RuntimeConfig::parse(v)?,
        };
        let prev_result = match obj.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v) => Some(CniResult::from_json(v).map_err(|e| Error {
                msg: format!("prevResult: {}", e.msg.trim_start_matches("result: ")),
                ..e
            })?),
        };
        // Some runtimes write `cni.dev/attachments`; the spec's key wins when both are there.
        let valid_attachments = match obj
            .get("cni.dev/valid-attachments")
            .or_else(|| obj.get("cni.dev/attachments"))
        {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_attachments(v)?),
        };
        Ok(NetConf {
            cni_version,
            name: name.to_string(),
            plugin_type,
            runtime_config,
            prev_result,
            valid_attachments,
            raw,
        })
    }
}

/// Parses stdin as JSON: malformed input is the spec's code 6.
pub fn parse_json(bytes: &[u8]) -> Result<Value, Error> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::new(
            Code::Decode,
            format!("network configuration on stdin is not valid JSON: {e}"),
            "the runtime writes the plugin's network configuration as one JSON object on stdin",
        )
    })
}

/// The `cniVersion` of a configuration: missing is code 7, unsupported code 1.
pub fn version_of(raw: &Value) -> Result<Version, Error> {
    let Some(obj) = raw.as_object() else {
        return Err(Error::new(
            Code::Decode,
            "network configuration on stdin is not a JSON object",
            "the configuration is an object such as {\"cniVersion\": \"1.1.0\", \"name\": ..., \"type\": ...}",
        ));
    };
    match obj.get("cniVersion") {
        Some(Value::String(s)) => Version::parse(s),
        Some(other) => Err(Error::invalid_config(
            format!("cniVersion must be a string, not {}", shown(other)),
            "write it as a string, for example \"cniVersion\": \"1.1.0\"",
        )),
        None => Err(Error::invalid_config(
            "cniVersion is missing from the network configuration",
            format!(
                "add \"cniVersion\" with one of: {}",
                Version::ALL.map(Version::as_str).join(", ")
            ),
        )),
    }
}

/// Deserializes `value` (found at `path` in the configuration, e.g. "ipam") into a plugin's
/// own config type; errors are code 7 and name the full path of the field at fault.
pub fn parse_at<T: DeserializeOwned>(value: &Value, path: &str) -> Result<T, Error> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let field = match (path.is_empty(), inner.as_str()) {
            (true, _) => inner.clone(),
            (false, ".") => path.to_string(),
            (false, _) => format!("{path}.{inner}"),
        };
        Error::invalid_config(format!("{field}: {}", e.inner()), "")
    })
}

/// A value as JSON for an error message, cut short: hostile input can be megabytes, and
/// the message only has to show which value it is.
pub fn shown(value: &Value) -> String {
    const MAX: usize = 64;
    let text = value.to_string();
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

fn required_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, Error> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) | None => Err(Error::invalid_config(
            format!("{key} is missing from the network configuration"),
            format!("add a non-empty \"{key}\""),
        )),
        Some(other) => Err(Error::invalid_config(
            format!("{key} must be a string, not {}", shown(other)),
            format!("write \"{key}\" as a string"),
        )),
    }
}

/// libcni's rule for network names: it also keeps `../x` from escaping a data directory.
fn validate_network_name(name: &str) -> Result<(), Error> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Ok(());
    }
    Err(Error::invalid_config(
        format!("name \"{name}\" is not a valid network name"),
        "a network name starts with a letter or digit, followed by letters, digits, '_', '.' or '-'",
    ))
}

impl RuntimeConfig {
    fn parse(value: &Value) -> Result<RuntimeConfig, Error> {
        let Some(obj) = value.as_object() else {
            return Err(Error::invalid_config(
                format!("runtimeConfig must be an object, not {}", shown(value)),
                "",
            ));
        };
        let mut rc = RuntimeConfig::default();
        for (key, v) in obj {
            match key.to_ascii_lowercase().as_str() {
                "ips" => rc.ips = parse_ips(v)?,
                "mac" => {
                    rc.mac = Some(
                        v.as_str()
                            .ok_or_else(|| {
                                Error::invalid_config(
                                    format!("runtimeConfig.mac must be a string, not {}", shown(v)),
                                    "",
                                )
                            })?
                            .to_string(),
                    )
                }
                "portmappings" => rc.port_mappings = parse_port_mappings(v)?,
                // Other capabilities (bandwidth, dns, ipRanges, ...) belong to plugins that
                // ask for them; they read them from `raw`.
                _ => {}
            }
        }
        Ok(rc)
    }
}

fn parse_ips(v: &Value) -> Result<Vec<IpAddr>, Error> {
    let list = v.as_array().ok_or_else(|| {
        Error::invalid_config(format!("runtimeConfig.ips must be a list, not {}", shown(v)), "")
    })?;
    list.iter()
        .enumerate()
        .map(|(i, ip)| {
            let s = ip.as_str().unwrap_or_default();
            s.parse::<IpAddr>()
                .or_else(|_| s.parse::<IpNetwork>().map(|n| n.ip()))
                .map_err(|_| {
                    Error::invalid_config(
                        format!("runtimeConfig.ips[{i}]: {} is not an IP address", shown(ip)),
                        "write addresses like \"10.22.0.5/16\" or \"fd00::5\"",
                    )
                })
        })
        .collect()
}

fn parse_port_mappings(v: &Value) -> Result<Vec<PortMapping>, Error> {
    let list = v.as_array().ok_or_else(|| {
        Error::invalid_config(
            format!("runtimeConfig.portMappings must be a list, not {}", shown(v)),
            "",
        )
    })?;
    if list.len() > MAX_PORT_MAPPINGS {
        return Err(Error::invalid_config(
            format!(
                "runtimeConfig.portMappings has {} entries, more than {MAX_PORT_MAPPINGS}",
                list.len()
            ),
            format!("publish at most {MAX_PORT_MAPPINGS} host ports per Pod"),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let at = |field: &str| format!("runtimeConfig.portMappings[{i}].{field}");
        let obj = item.as_object().ok_or_else(|| {
            Error::invalid_config(format!("runtimeConfig.portMappings[{i}] must be an object"), "")
        })?;
        let get = |name: &str| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
                .filter(|v| !v.is_null())
        };
        let port = |name: &str| -> Result<u16, Error> {
            let v = get(name).ok_or_else(|| Error::invalid_config(format!("{} is missing", at(name)), ""))?;
            v.as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
                .ok_or_else(|| {
                    Error::invalid_config(format!("{} = {} is not a port (1-65535)", at(name), shown(v)), "")
                })
        };
        let protocol = match get("protocol") {
            None => "tcp".to_string(),
            Some(p) => {
                let p = p
                    .as_str()
                    .map(str::to_ascii_lowercase)
                    .filter(|p| matches!(p.as_str(), "tcp" | "udp" | "sctp"))
                    .ok_or_else(|| {
                        Error::invalid_config(
                            format!(
                                "{} = {} is not \"tcp\", \"udp\" or \"sctp\"",
                                at("protocol"),
                                shown(p)
                            ),
                            "",
                        )
                    })?;
                p
            }
        };
        // Anything but an address (or nothing, or "") is refused: a hostIP silently dropped
        // would publish the port on every address of the node.
        let host_ip = match get("hostIP") {
            None => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s.parse::<IpAddr>().map_err(|_| {
                Error::invalid_config(
                    format!("{} = {s:?} is not an IP address", at("hostIP")),
                    "write hostIP as a string such as \"192.0.2.1\" or \"2001:db8::1\", or leave it out",
                )
            })?),
            Some(other) => {
                return Err(Error::invalid_config(
                    format!("{} = {} is not an IP address string", at("hostIP"), shown(other)),
                    "write hostIP as a string such as \"192.0.2.1\" or \"2001:db8::1\", or leave it out",
                ))
            }
        };
        out.push(PortMapping {
            host_port: port("hostPort")?,
            container_port: port("containerPort")?,
            protocol,
            host_ip,
        });
    }
    Ok(out)
}

fn parse_attachments(v: &Value) -> Result<Vec<Attachment>, Error> {
    let bad = || {
        Error::invalid_config(
            "cni.dev/valid-attachments must be a list of {\"containerID\": ..., \"ifname\": ...}",
            "",
        )
    };
    let list = v.as_array().ok_or_else(bad)?;
    list.iter()
        .map(|a| {
            let field = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
            Ok(Attachment {
                container_id: field("containerID").ok_or_else(bad)?,
                ifname: field("ifname").ok_or_else(bad)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NetConf, Error> {
        NetConf::parse(v.to_string().as_bytes())
    }

    /// A plugin configuration as the spec's example list derives it for the bridge plugin.
    fn spec_bridge_conf() -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "dbnet",
            "type": "bridge",
            "bridge": "cni0",
            "keyA": ["some more", "plugin specific", "configuration"],
            "ipam": {
                "type": "host-local",
                "subnet": "10.1.0.0/16",
                "gateway": "10.1.0.1"
            },
            "dns": {"nameservers": ["10.1.0.1"]},
            "runtimeConfig": {"mac": "00:11:22:33:44:66"}
        })
    }

    #[test]
    fn reads_the_spec_example() {
        let c = parse(spec_bridge_conf()).unwrap();
        assert_eq!(c.cni_version, Version::V1_1_0);
        assert_eq!(c.name, "dbnet");
        assert_eq!(c.plugin_type, "bridge");
        assert_eq!(c.runtime_config.mac.as_deref(), Some("00:11:22:33:44:66"));
        assert_eq!(c.raw["ipam"]["type"], "host-local");
    }

    #[test]
    fn port_mappings_keys_are_case_insensitive() {
        let mut v = spec_bridge_conf();
        v["runtimeConfig"] = json!({"portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
            {"HostPort": 5353, "ContainerPort": 53, "Protocol": "UDP", "HostIP": "192.0.2.1"}
        ]});
        let pm = parse(v).unwrap().runtime_config.port_mappings;
        assert_eq!(pm[0].host_port, 8080);
        assert_eq!(pm[0].protocol, "tcp");
        assert_eq!(pm[1].container_port, 53);
        assert_eq!(pm[1].protocol, "udp");
        assert_eq!(pm[1].host_ip, Some("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn runtime_ips_accept_bare_and_cidr_forms() {
        let mut v = spec_bridge_conf();
        v["runtimeConfig"] = json!({"ips": ["10.1.0.7/16", "fd00::7"]});
        let ips = parse(v).unwrap().runtime_config.ips;
        assert_eq!(
            ips,
            vec!["10.1.0.7".parse::<IpAddr>().unwrap(), "fd00::7".parse().unwrap()]
        );
    }

    #[test]
    fn gc_attachments_under_either_key() {
        for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
            let mut v = spec_bridge_conf();
            v[key] = json!([{"containerID": "c1", "ifname": "eth0"}]);
            let a = parse(v).unwrap().valid_attachments.unwrap();
            assert_eq!(
                a,
                vec![Attachment {
                    container_id: "c1".into(),
                    ifname: "eth0".into()
                }]
            );
        }
    }

    #[test]
    fn prev_result_is_read_in_the_config_version() {
        let mut v = spec_bridge_conf();
        v["cniVersion"] = json!("0.4.0");
        v["prevResult"] = json!({"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.1.0.5/16"}]});
        let c = parse(v).unwrap();
        assert_eq!(c.prev_result.unwrap().ips[0].address.to_string(), "10.1.0.5/16");
    }

    #[test]
    fn each_bad_input_gets_its_code_and_names_the_field() {
        let with = |k: &str, val: Value| {
            let mut v = spec_bridge_conf();
            v[k] = val;
            v
        };
        let without = |k: &str| {
            let mut v = spec_bridge_conf();
            v.as_object_mut().unwrap().remove(k);
            v
        };
        let cases: Vec<(Result<NetConf, Error>, Code, &str)> = vec![
            (NetConf::parse(b"{not json"), Code::Decode, "not valid JSON"),
            (NetConf::parse(b"[1]"), Code::Decode, "not a JSON object"),
            (parse(without("cniVersion")), Code::InvalidConfig, "cniVersion"),
            (
                parse(with("cniVersion", json!("0.2.0"))),
                Code::IncompatibleVersion,
                "0.2.0",
            ),
            (
                parse(with("cniVersion", json!(1))),
                Code::InvalidConfig,
                "cniVersion",
            ),
            (parse(without("name")), Code::InvalidConfig, "name"),
            (
                parse(with("name", json!("../etc"))),
                Code::InvalidConfig,
                "../etc",
            ),
            (parse(without("type")), Code::InvalidConfig, "type"),
            (
                parse(with("runtimeConfig", json!({"ips": ["nope"]}))),
                Code::InvalidConfig,
                "runtimeConfig.ips[0]",
            ),
            (
                parse(with(
                    "runtimeConfig",
                    json!({"portMappings": [{"hostPort": 0, "containerPort": 80}]}),
                )),
                Code::InvalidConfig,
                "portMappings[0].hostPort",
            ),
            (
                parse(with(
                    "runtimeConfig",
                    json!({"portMappings": [{"hostPort": 80, "containerPort": 80, "hostIP": 1}]}),
                )),
                Code::InvalidConfig,
                "portMappings[0].hostIP",
            ),
            (
                parse(with(
                    "runtimeConfig",
                    json!({"portMappings": [{"hostPort": 80, "containerPort": 80}, {"hostPort": 80, "containerPort": 80, "HostIP": true}]}),
                )),
                Code::InvalidConfig,
                "portMappings[1].hostIP",
            ),
            (
                parse(with(
                    "runtimeConfig",
                    json!({"portMappings": [{"hostPort": 80, "containerPort": 80, "hostIP": {}}]}),
                )),
                Code::InvalidConfig,
                "portMappings[0].hostIP",
            ),
            (
                parse(with(
                    "runtimeConfig",
                    json!({"portMappings": [{"hostPort": 80, "containerPort": 80, "hostIP": "1"}]}),
                )),
                Code::InvalidConfig,
                "portMappings[0].hostIP",
            ),
            (
                parse(with(
                    "runtimeConfig",
                    json!({"portMappings": [{"hostPort": 80, "containerPort": 80, "protocol": 6}]}),
                )),
                Code::InvalidConfig,
                "portMappings[0].protocol = 6",
            ),
            (
                parse(with(
                    "runtimeConfig",
                    json!({"portMappings": vec![json!({"hostPort": 80, "containerPort": 80}); MAX_PORT_MAPPINGS + 1]}),
                )),
                Code::InvalidConfig,
                "portMappings has 1025 entries, more than 1024",
            ),
            (
                parse(with("prevResult", json!({"ips": [{"address": "x"}]}))),
                Code::Decode,
                "prevResult: field `ips[0].address`",
            ),
        ];
        for (result, code, needle) in cases {
            let e = result.unwrap_err();
            assert_eq!(e.code, code, "{needle}: {e}");
            assert!(e.msg.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn a_huge_value_is_shown_cut_short() {
        let mut v = spec_bridge_conf();
        v["runtimeConfig"] = json!({"portMappings": {"x": "y".repeat(1_000_000)}});
        let e = parse(v).unwrap_err();
        assert!(
            e.msg
                .starts_with("runtimeConfig.portMappings must be a list, not {\"x\""),
            "{e}"
        );
        assert!(e.msg.len() < 200, "{} bytes", e.msg.len());
    }

    #[test]
    fn parse_at_names_the_nested_field() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Ipam {
            subnet: IpNetwork,
        }
        let e = parse_at::<Ipam>(&json!({"subnet": "10.1.0.0/33"}), "ipam").unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(e.msg.starts_with("ipam.subnet:"), "{e}");
    }
}
