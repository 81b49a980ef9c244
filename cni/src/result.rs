//! The ADD result: one model, written in whichever spec version the configuration asks for.
//!
//! Versions differ only in a few fields: before 1.0.0 every IP carries `version` ("4"/"6");
//! 1.1.0 adds interface `mtu`/`socketPath`/`pciID` and route `mtu`/`advmss`/`priority`/
//! `table`/`scope`. The model holds the union, so converting a result (or a `prevResult`)
//! between versions is: read it in any version, write it in the target one.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Code, Error};
use crate::version::Version;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Always written, as an empty object when there is nothing in it, as libcni does.
    #[serde(default)]
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// 1.1.0 and later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for an interface inside the container; absent on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// 1.1.0 and later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    /// 1.1.0 and later.
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with its prefix length, e.g. `10.22.0.5/24`.
    #[serde(with = "cidr")]
    pub address: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`; absent in an IPAM plugin's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    #[serde(with = "cidr")]
    pub dst: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// 1.1.0 and later, like the four below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

impl Route {
    /// A route with only a destination and an optional next hop (all a pre-1.1 route has).
    pub fn new(dst: IpNetwork, gw: Option<IpAddr>) -> Route {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self == &Dns::default()
    }
}

const INTERFACE_FIELDS_SINCE_1_1: [&str; 3] = ["mtu", "socketPath", "pciID"];
const ROUTE_FIELDS_SINCE_1_1: [&str; 5] = ["mtu", "advmss", "priority", "table", "scope"];

impl CniResult {
    /// The result as `version` defines it, with `cniVersion` set.
    pub fn to_json(&self, version: Version) -> Value {
        let mut v = serde_json::to_value(self).expect("a result always serializes");
        let obj = v.as_object_mut().expect("a result is an object");
        if !version.has_extended_fields() {
            strip_fields(obj.get_mut("interfaces"), &INTERFACE_FIELDS_SINCE_1_1);
            strip_fields(obj.get_mut("routes"), &ROUTE_FIELDS_SINCE_1_1);
        }
        if version.ips_carry_family() {
            if let Some(Value::Array(ips)) = obj.get_mut("ips") {
                for (ip, model) in ips.iter_mut().zip(&self.ips) {
                    let family = if model.address.is_ipv4() { "4" } else { "6" };
                    ip["version"] = Value::String(family.to_string());
                }
            }
        }
        let mut out = serde_json::Map::new();
        out.insert("cniVersion".into(), Value::String(version.as_str().into()));
        out.append(obj);
        Value::Object(out)
    }

    /// Reads a result written in any supported version (`cniVersion` inside it, if any,
    /// is not trusted over the caller's: a `prevResult` is in the configuration's version).
    pub fn from_json(value: &Value) -> Result<CniResult, Error> {
        let result: CniResult = serde_path_to_error::deserialize(value).map_err(|e| {
            Error::new(
                Code::Decode,
                format!("result: field `{}`: {}", e.path(), e.inner()),
                "a result has interfaces, ips (address in CIDR form), routes and dns",
            )
        })?;
        // Pre-1.0 IPs carry their family; a family that contradicts the address is corrupt.
        if let Some(ips) = value.get("ips").and_then(Value::as_array) {
            for (i, (raw, ip)) in ips.iter().zip(&result.ips).enumerate() {
                let Some(family) = raw.get("version") else {
                    continue;
                };
                let expected = if ip.address.is_ipv4() { "4" } else { "6" };
                if family.as_str() != Some(expected) {
                    return Err(Error::new(
                        Code::Decode,
                        format!(
                            "result: ips[{i}].version is {family} but address {} is IPv{expected}",
                            ip.address
                        ),
                        "version must be \"4\" or \"6\" and match the address",
                    ));
                }
            }
        }
        for (i, ip) in result.ips.iter().enumerate() {
            if ip.interface.is_some_and(|idx| idx >= result.interfaces.len()) {
                return Err(Error::new(
                    Code::Decode,
                    format!(
                        "result: ips[{i}].interface points past the {} interface(s)",
                        result.interfaces.len()
                    ),
                    "interface is an index into the interfaces list",
                ));
            }
        }
        Ok(result)
    }
}

/// Addresses in CIDR form with the prefix length required: `ipnetwork` alone would read a
/// bare `10.1.0.5` as a /32, which in a result is a corrupt entry, not a host route.
pub mod cidr {
    use ipnetwork::IpNetwork;
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(net: &IpNetwork, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(net)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IpNetwork, D::Error> {
        let text = String::deserialize(d)?;
        if !text.contains('/') {
            return Err(D::Error::custom(format!(
                "{text:?} has no prefix length (write it as address/prefix)"
            )));
        }
        text.parse()
            .map_err(|e| D::Error::custom(format!("{text:?} is not an address/prefix: {e}")))
    }
}

fn strip_fields(list: Option<&mut Value>, fields: &[&str]) {
    if let Some(Value::Array(items)) = list {
        for item in items.iter_mut().filter_map(Value::as_object_mut) {
            for f in fields {
                item.remove(*f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The spec's ADD example result (bridge plugin with host-local, 1.1.0).
    fn spec_add_result() -> Value {
        json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "cni0", "mac": "00:11:22:33:44:55"},
                {"name": "veth3243", "mac": "55:44:33:22:11:11"},
                {"name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": "/var/run/netns/blue"}
            ],
            "ips": [{"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 2}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.1.0.1"]}
        })
    }

    #[test]
    fn the_spec_example_round_trips_in_1_1_0_and_1_0_0() {
        let r = CniResult::from_json(&spec_add_result()).unwrap();
        assert_eq!(r.to_json(Version::V1_1_0), spec_add_result());
        let mut v100 = spec_add_result();
        v100["cniVersion"] = json!("1.0.0");
        assert_eq!(r.to_json(Version::V1_0_0), v100);
    }

    #[test]
    fn pre_1_0_versions_tag_every_ip_with_its_family() {
        let mut r = CniResult::from_json(&spec_add_result()).unwrap();
        r.ips.push(IpConfig {
            address: "fd00::5/64".parse().unwrap(),
            gateway: Some("fd00::1".parse().unwrap()),
            interface: Some(2),
        });
        for v in [Version::V0_3_0, Version::V0_3_1, Version::V0_4_0] {
            let out = r.to_json(v);
            assert_eq!(out["cniVersion"], v.as_str());
            assert_eq!(out["ips"][0]["version"], "4");
            assert_eq!(out["ips"][1]["version"], "6");
            // ... and reading it back gives the same model: conversions lose nothing.
            assert_eq!(CniResult::from_json(&out).unwrap(), r);
        }
        assert!(r.to_json(Version::V1_0_0)["ips"][0].get("version").is_none());
    }

    #[test]
    fn fields_new_in_1_1_are_dropped_for_older_versions() {
        let r = CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mtu: Some(1400),
                socket_path: Some("/run/x.sock".into()),
                pci_id: Some("0000:00:1f.6".into()),
                ..Default::default()
            }],
            routes: vec![Route {
                mtu: Some(1400),
                table: Some(100),
                ..Route::new("10.0.0.0/8".parse().unwrap(), None)
            }],
            ..Default::default()
        };
        let new = r.to_json(Version::V1_1_0);
        assert_eq!(new["interfaces"][0]["mtu"], 1400);
        assert_eq!(new["interfaces"][0]["pciID"], "0000:00:1f.6");
        assert_eq!(new["routes"][0]["table"], 100);
        for v in [Version::V1_0_0, Version::V0_4_0, Version::V0_3_0] {
            let old = r.to_json(v);
            assert_eq!(old["interfaces"][0], json!({"name": "eth0"}));
            assert_eq!(old["routes"][0], json!({"dst": "10.0.0.0/8"}));
        }
    }

    #[test]
    fn an_ipam_result_has_no_interfaces_and_an_empty_dns() {
        let r = CniResult {
            ips: vec![IpConfig {
                address: "10.1.0.5/16".parse().unwrap(),
                gateway: Some("10.1.0.1".parse().unwrap()),
                interface: None,
            }],
            ..Default::default()
        };
        assert_eq!(
            r.to_json(Version::V0_4_0),
            json!({"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.1.0.5/16","gateway":"10.1.0.1"}],"dns":{}})
        );
    }

    #[test]
    fn corrupt_results_are_decode_errors_naming_the_field() {
        let cases = [
            (json!({"ips":[{"address":"10.1.0.5"}]}), "ips[0].address"),
            (
                json!({"ips":[{"address":"10.1.0.5/16","version":"6"}]}),
                "ips[0].version",
            ),
            (
                json!({"ips":[{"address":"10.1.0.5/16","interface":3}]}),
                "ips[0].interface",
            ),
            (json!({"routes":[{"gw":"10.0.0.1"}]}), "routes[0]"),
        ];
        for (value, field) in cases {
            let e = CniResult::from_json(&value).unwrap_err();
            assert_eq!(e.code, Code::Decode);
            assert!(e.msg.contains(field), "{field}: {e}");
        }
    }
}
