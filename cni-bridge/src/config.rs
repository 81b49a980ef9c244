//! The bridge plugin's configuration: every option of the reference bridge plugin,
//! checked before anything is touched. An option Ferry cannot honour is code 2, never
//! silently ignored.

use cni::{Code, Error, Request};
use serde::Deserialize;
use serde_json::Value;

use crate::link::parse_mac;

pub const DEFAULT_BRIDGE: &str = "cni0";

#[derive(Debug, Clone, PartialEq)]
pub struct BridgeConfig {
    pub bridge: String,
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    pub force_address: bool,
    pub ip_masq: bool,
    pub mtu: Option<u32>,
    pub hairpin: bool,
    pub promisc: bool,
    /// Access VLAN of the Pod's port (untagged, PVID); 0 for none.
    pub vlan: u16,
    /// VLANs the Pod's port carries tagged.
    pub vlan_trunk: Vec<u16>,
    pub preserve_default_vlan: bool,
    pub mac_spoof_check: bool,
    pub enable_dad: bool,
    pub disable_container_interface: bool,
    pub port_isolation: bool,
    /// The IPAM plugin's type, if the network has addresses (layer 3).
    pub ipam_type: Option<String>,
    /// The container interface's MAC, from runtimeConfig `mac`, `args.cni.mac` or `CNI_ARGS` `MAC`.
    pub mac: Option<[u8; 6]>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Options {
    bridge: Option<String>,
    #[serde(default)]
    is_gateway: bool,
    #[serde(default)]
    is_default_gateway: bool,
    #[serde(default)]
    force_address: bool,
    #[serde(default)]
    ip_masq: bool,
    ip_masq_backend: Option<String>,
    mtu: Option<u32>,
    hairpin_mode: Option<bool>,
    #[serde(default)]
    promisc_mode: bool,
    #[serde(default)]
    vlan: u32,
    vlan_trunk: Option<Vec<VlanTrunk>>,
    #[serde(default)]
    preserve_default_vlan: bool,
    #[serde(default, rename = "macspoofchk")]
    mac_spoof_check: bool,
    #[serde(default, rename = "enabledad")]
    enable_dad: bool,
    #[serde(default)]
    disable_container_interface: bool,
    #[serde(default)]
    port_isolation: bool,
    ipam: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VlanTrunk {
    #[serde(rename = "minID")]
    min_id: Option<u32>,
    #[serde(rename = "maxID")]
    max_id: Option<u32>,
    id: Option<u32>,
}

/// Main plugins: each makes an interface, none hands out addresses. Named as an IPAM type,
/// one would be run for addresses and, reading the same configuration, run its own IPAM
/// type again: ferry-bridge as its own IPAM plugin spawned processes without end.
const MAIN_PLUGINS: &[&str] = &[
    "ferry-bridge",
    "bridge",
    "ptp",
    "macvlan",
    "ipvlan",
    "vlan",
    "host-device",
    "loopback",
    "tap",
    "dummy",
];

/// Keys of the configuration ferry-bridge reads, or that the spec and runtimes put there.
const KNOWN_KEYS: &[&str] = &[
    // The spec's and runtimes' own.
    "cniVersion",
    "cniVersions",
    "name",
    "type",
    "ipam",
    "dns",
    "args",
    "runtimeConfig",
    "prevResult",
    "capabilities",
    // The bridge plugin's options.
    "bridge",
    "isGateway",
    "isDefaultGateway",
    "forceAddress",
    "ipMasq",
    "ipMasqBackend",
    "mtu",
    "hairpinMode",
    "promiscMode",
    "vlan",
    "vlanTrunk",
    "preserveDefaultVlan",
    "macspoofchk",
    "enabledad",
    "disableContainerInterface",
    "portIsolation",
];

impl BridgeConfig {
    pub fn from_request(req: &Request) -> Result<BridgeConfig, Error> {
        // Only an IPAM plugin is ever run by a Ferry plugin: run by one, ferry-bridge is
        // some configuration's ipam.type (or a program that ipam.type runs), and would run
        // its own IPAM plugin again.
        if req.env.delegation_depth > 0 {
            return Err(Error::invalid_config(
                format!(
                    "ipam.type leads to ferry-bridge, a main plugin, run here as an IPAM plugin ({} = {})",
                    cni::env::DELEGATION_DEPTH_VAR,
                    req.env.delegation_depth
                ),
                "name an IPAM plugin in ipam.type, e.g. \"ferry-ipam\" or \"host-local\"",
            ));
        }
        let raw = &req.config.raw;
        // Unknown options are refused rather than ignored: a typo ("isGateWay") would
        // otherwise give a network that silently behaves differently. Namespaced keys
        // ("cni.dev/...") belong to runtimes.
        if let Some(obj) = raw.as_object() {
            if let Some(key) = obj
                .keys()
                .find(|k| !KNOWN_KEYS.contains(&k.as_str()) && !k.contains('/'))
            {
                return Err(Error::new(
                    Code::UnsupportedField,
                    format!("unknown option {key:?} = {}", cni::config::shown(&obj[key])),
                    "ferry-bridge takes the reference bridge plugin's options; remove it or check its spelling",
                ));
            }
        }
        let o: Options = cni::config::parse_at(raw, "")?;

        let bridge = o.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        check_ifname("bridge", &bridge)?;
        if let Some(backend) = o.ip_masq_backend.as_deref().filter(|b| *b != "nftables") {
            return Err(Error::new(
                Code::UnsupportedField,
                format!("ipMasqBackend = {backend:?}"),
                "ferry-bridge masquerades with nftables only: set \"ipMasqBackend\": \"nftables\" or leave it out",
            ));
        }
        if let Some(mtu) = o.mtu.filter(|m| !(68..=65535).contains(m)) {
            return Err(Error::invalid_config(
                format!("mtu = {mtu} is out of range"),
                "use 68 to 65535",
            ));
        }
        if o.vlan > 4094 {
            return Err(Error::invalid_config(
                format!("vlan = {} is not a VLAN id", o.vlan),
                "use 1 to 4094, or 0 for none",
            ));
        }
        let vlan_trunk = trunk_vlans(o.vlan_trunk.as_deref().unwrap_or_default())?;
        // Promiscuous bridges reflect frames back to their sender, as hairpin does: one of
        // them at a time. Hairpin is on by default unless promiscMode asks otherwise.
        let hairpin = o.hairpin_mode.unwrap_or(!o.promisc_mode);
        if hairpin && o.promisc_mode {
            return Err(Error::invalid_config(
                "hairpinMode and promiscMode are both true",
                "a bridge can do one or the other: set one of them to false",
            ));
        }
        let ipam_type = match &o.ipam {
            None | Some(Value::Null) => None,
            Some(v) => match v.get("type").and_then(Value::as_str) {
                Some(t) if !t.is_empty() => Some(t.to_string()),
                _ => {
                    return Err(Error::invalid_config(
                        "ipam.type is missing or not a non-empty string",
                        "name the IPAM plugin, e.g. \"ferry-ipam\"",
                    ))
                }
            },
        };
        if let Some(t) = ipam_type
            .as_deref()
            .filter(|t| MAIN_PLUGINS.contains(t) || *t == req.config.plugin_type)
        {
            return Err(Error::invalid_config(
                format!("ipam.type {t:?} is a main plugin, not an IPAM plugin"),
                "name an IPAM plugin in ipam.type, e.g. \"ferry-ipam\" or \"host-local\"",
            ));
        }
        if o.disable_container_interface && ipam_type.is_some() {
            return Err(Error::invalid_config(
                "disableContainerInterface is set together with ipam",
                "an interface left down cannot use addresses: remove ipam, or disableContainerInterface",
            ));
        }
        let is_gateway = o.is_gateway || o.is_default_gateway;
        if o.vlan != 0 && is_gateway {
            return Err(Error::new(
                Code::UnsupportedField,
                format!("isGateway together with vlan = {}", o.vlan),
                "ferry-bridge does not yet put the gateway on a VLAN interface: use a bridge per VLAN, or no isGateway",
            ));
        }
        Ok(BridgeConfig {
            bridge,
            is_gateway,
            is_default_gateway: o.is_default_gateway,
            force_address: o.force_address,
            ip_masq: o.ip_masq,
            mtu: o.mtu,
            hairpin,
            promisc: o.promisc_mode,
            vlan: o.vlan as u16,
            vlan_trunk,
            preserve_default_vlan: o.preserve_default_vlan,
            mac_spoof_check: o.mac_spoof_check,
            enable_dad: o.enable_dad,
            disable_container_interface: o.disable_container_interface,
            port_isolation: o.port_isolation,
            ipam_type,
            mac: container_mac(req)?,
        })
    }

    /// Whether the bridge needs VLAN filtering.
    pub fn uses_vlans(&self) -> bool {
        self.vlan != 0 || !self.vlan_trunk.is_empty()
    }
}

fn check_ifname(field: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 15 || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(Error::invalid_config(
            format!("{field} = {name:?} is not a valid interface name"),
            "an interface name has 1 to 15 bytes, none of them '/', ':' or white space",
        ));
    }
    Ok(())
}

fn trunk_vlans(trunk: &[VlanTrunk]) -> Result<Vec<u16>, Error> {
    let mut vlans = Vec::new();
    for (i, t) in trunk.iter().enumerate() {
        let range = match (t.id, t.min_id, t.max_id) {
            (Some(id), None, None) => id..=id,
            (None, Some(min), Some(max)) if min <= max => min..=max,
            _ => {
                return Err(Error::invalid_config(
                    format!("vlanTrunk[{i}] must have either id, or minID and maxID with minID <= maxID"),
                    "",
                ))
            }
        };
        if *range.start() < 1 || *range.end() > 4094 {
            return Err(Error::invalid_config(
                format!("vlanTrunk[{i}] is outside 1-4094"),
                "",
            ));
        }
        vlans.extend(range.map(|v| v as u16));
    }
    vlans.sort_unstable();
    vlans.dedup();
    Ok(vlans)
}

/// runtimeConfig `mac` wins over `args.cni.mac`, which wins over `CNI_ARGS` `MAC`.
fn container_mac(req: &Request) -> Result<Option<[u8; 6]>, Error> {
    let candidates = [
        (req.config.runtime_config.mac.clone(), "runtimeConfig.mac"),
        (
            req.config
                .raw
                .pointer("/args/cni/mac")
                .and_then(Value::as_str)
                .map(str::to_string),
            "args.cni.mac",
        ),
        (req.env.args.get("MAC").map(str::to_string), "CNI_ARGS MAC"),
    ];
    for (value, from) in candidates {
        let Some(s) = value.filter(|s| !s.is_empty()) else {
            continue;
        };
        return parse_mac(&s).map(Some).ok_or_else(|| {
            let code = if from.starts_with("CNI_ARGS") {
                Code::InvalidEnvironment
            } else {
                Code::InvalidConfig
            };
            Error::new(
                code,
                format!("{from} = {s:?} is not a unicast MAC address"),
                "write it as six hex pairs, e.g. 0a:58:0a:f4:01:02, without the multicast bit",
            )
        });
    }
    Ok(None)
}
