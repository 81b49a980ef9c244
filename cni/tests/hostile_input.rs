//! Hostile input, generated and from a corpus: the protocol layer (environment, network
//! configuration, results in every version) never panics, and every rejection is the
//! spec's error object with one of the spec's codes.
//!
//! Property tests run a fixed number of cases from a fixed seed, so `cargo test` is short
//! and gives the same cases each run; `PROPTEST_CASES` raises the count for a longer hunt.
//! The corpus (`tests/corpus/`) holds the spec's example configurations and the cases
//! found by hand; each file is fed as stdin to every verb.

use std::collections::HashMap;
use std::path::Path;

use cni::plugin::{dispatch, Outcome};
use cni::{
    Attachment, CniResult, Code, Dns, Env, Error, Interface, IpConfig, Plugin, Request, Route, Version,
};
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{json, Map, Value};

/// Accepts every call: what is rejected here, the protocol layer rejected.
struct Accepting;

impl Plugin for Accepting {
    fn add(&self, req: &Request) -> Result<CniResult, Error> {
        Ok(req.config.prev_result.clone().unwrap_or_else(|| CniResult {
            ips: vec![IpConfig {
                address: "10.1.0.5/16".parse().unwrap(),
                gateway: None,
                interface: None,
            }],
            ..Default::default()
        }))
    }
    fn del(&self, _: &Request) -> Result<(), Error> {
        Ok(())
    }
    fn check(&self, _: &Request) -> Result<(), Error> {
        Ok(())
    }
    fn status(&self, _: &Request) -> Result<(), Error> {
        Ok(())
    }
    fn gc(&self, _: &Request, _: &[Attachment]) -> Result<(), Error> {
        Ok(())
    }
}

/// The codes the spec defines for the protocol layer (plugins add theirs from 100 up).
const SPEC_CODES: [u64; 10] = [1, 2, 3, 4, 5, 6, 7, 11, 50, 51];

fn config() -> Config {
    ferry_tests::property::config(0x0f_e7_72_10)
}

/// What must hold of any call's outcome.
fn check_outcome(out: &Outcome, command: &str, stdin: &[u8]) {
    let shown = || String::from_utf8_lossy(&stdin[..stdin.len().min(300)]).into_owned();
    if out.exit_code != 0 {
        assert_eq!(out.exit_code, 1, "{command} {}", shown());
        let err = out.stdout.as_ref().expect("a failure prints an error object");
        let code = err["code"].as_u64().expect("the error object has a numeric code");
        assert!(
            SPEC_CODES.contains(&code),
            "code {code} is not a spec code: {err} for {}",
            shown()
        );
        assert!(
            err["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "no msg: {err}"
        );
        let version = err["cniVersion"]
            .as_str()
            .expect("the error object has a cniVersion");
        Version::parse(version).expect("a supported cniVersion");
        return;
    }
    if command == "ADD" {
        let result = out.stdout.as_ref().expect("ADD prints its result");
        let version = Version::parse(result["cniVersion"].as_str().unwrap()).unwrap();
        let model = CniResult::from_json(result).unwrap_or_else(|e| panic!("{e}: {result}"));
        assert_eq!(
            model.to_json(version),
            *result,
            "a printed result reads back the same"
        );
    }
}

fn run(env: &HashMap<String, String>, stdin: &[u8]) -> Outcome {
    let out = dispatch(&Accepting, Env::from_lookup(|k| env.get(k).cloned()), stdin);
    check_outcome(&out, env.get("CNI_COMMAND").map_or("", String::as_str), stdin);
    out
}

fn standard_env(command: &str) -> HashMap<String, String> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "0123456789abcdef"),
        ("CNI_NETNS", "/run/netns/blue"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

const VERBS: [&str; 6] = ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"];

#[test]
fn every_corpus_file_under_every_verb() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 20, "the corpus is in {}", dir.display());
    let mut rejected = 0;
    for file in &files {
        let stdin = std::fs::read(file).unwrap();
        for verb in VERBS {
            if run(&standard_env(verb), &stdin).exit_code != 0 {
                rejected += 1;
            }
        }
        // The spec's own examples are accepted by the protocol layer for ADD.
        let name = file.file_name().unwrap().to_string_lossy();
        if name.starts_with("spec-") {
            let out = run(&standard_env("ADD"), &stdin);
            assert_eq!(out.exit_code, 0, "{name}: {:?}", out.stdout);
        }
    }
    assert!(rejected > 0);
}

#[test]
fn the_cases_of_issue_10_get_code_7_naming_the_field() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    for (file, field) in [
        ("hostile-host-ip-number.json", "portMappings[0].hostIP"),
        ("hostile-host-ip-bool.json", "portMappings[0].hostIP"),
        ("hostile-host-ip-object.json", "portMappings[0].hostIP"),
        ("hostile-host-ip-string-1.json", "portMappings[0].hostIP"),
        ("hostile-protocol-number.json", "portMappings[0].protocol"),
    ] {
        let out = run(&standard_env("ADD"), &std::fs::read(dir.join(file)).unwrap());
        let err = out.stdout.unwrap();
        assert_eq!(err["code"], 7, "{file}: {err}");
        assert!(err["msg"].as_str().unwrap().contains(field), "{file}: {err}");
    }
}

// ---- Generators ----

/// Strings a runtime or an attacker might send: plausible, empty, odd, long.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9]{1,12}",
        "[a-zA-Z0-9_.%/: -]{0,20}",
        "\\PC{0,16}",
        (1usize..300).prop_map(|n| "a".repeat(n)),
        Just("0".repeat(65_510)),
        Just("..".to_string()),
        Just("eth%d".to_string()),
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (0u64..70_000).prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        any_text().prop_map(Value::String),
        prop_oneof![
            Just("10.1.0.5/16"),
            Just("10.1.0.5"),
            Just("fd00::5/64"),
            Just("0.0.0.0/0"),
            Just("1.1.0"),
            Just("0.3.1"),
            Just("tcp"),
            Just("SCTP"),
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Keys the protocol layer reads, in their usual and in odd cases, and some it does not.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "cniVersion",
            "name",
            "type",
            "runtimeConfig",
            "prevResult",
            "ips",
            "mac",
            "portMappings",
            "hostPort",
            "HostPort",
            "containerPort",
            "protocol",
            "hostIP",
            "HostIP",
            "cni.dev/valid-attachments",
            "cni.dev/attachments",
            "containerID",
            "ifname",
            "interfaces",
            "routes",
            "dns",
            "address",
            "gateway",
            "interface",
            "version",
            "dst",
            "gw",
            "ipam",
            "subnet",
        ])
        .prop_map(str::to_string),
        "[a-zA-Z]{1,8}",
    ]
}

/// A configuration near enough to a valid one to get past the first checks.
fn near_config() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just(json!("1.1.0")),
            Just(json!("1.0.0")),
            Just(json!("0.4.0")),
            Just(json!("0.3.1")),
            any_json()
        ],
        prop_oneof![Just(json!("net")), any_json()],
        prop::collection::vec((key(), any_json()), 0..4),
        prop::option::of(port_mappings()),
        prop::option::of(any_json()),
        prop::option::of(any_json()),
    )
        .prop_map(|(version, name, extra, pms, prev, attachments)| {
            let mut c = json!({"cniVersion": version, "name": name, "type": "x"});
            for (k, v) in extra {
                c[k] = v;
            }
            if let Some(pms) = pms {
                c["runtimeConfig"] = json!({"portMappings": pms});
            }
            if let Some(prev) = prev {
                c["prevResult"] = prev;
            }
            if let Some(a) = attachments {
                c["cni.dev/valid-attachments"] = a;
            }
            c
        })
}

fn port_mappings() -> impl Strategy<Value = Value> {
    prop::collection::vec(
        (any_json(), any_json(), any_json(), any_json(), any::<bool>()).prop_map(
            |(hp, cp, proto, ip, upper)| {
                let k = |s: &str| {
                    if upper {
                        s[..1].to_uppercase() + &s[1..]
                    } else {
                        s.to_string()
                    }
                };
                json!({k("hostPort"): hp, k("containerPort"): cp, k("protocol"): proto, k("hostIP"): ip})
            },
        ),
        0..4,
    )
    .prop_map(Value::Array)
}

fn env_map() -> impl Strategy<Value = HashMap<String, String>> {
    let var = |name: &'static str| prop::option::of(any_text()).prop_map(move |v| (name, v));
    (
        prop_oneof![
            prop::sample::select(VERBS.to_vec()).prop_map(str::to_string),
            any_text()
        ],
        var("CNI_CONTAINERID"),
        var("CNI_NETNS"),
        var("CNI_IFNAME"),
        var("CNI_ARGS"),
        var("CNI_PATH"),
        var(cni::env::DELEGATION_DEPTH_VAR),
    )
        .prop_map(|(command, a, b, c, d, e, f)| {
            let mut m = HashMap::from([("CNI_COMMAND".to_string(), command)]);
            for (k, v) in [a, b, c, d, e, f] {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            }
            m
        })
}

fn any_result() -> impl Strategy<Value = CniResult> {
    let v4 = (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| ipnetwork::IpNetwork::new(a.into(), p).unwrap());
    let v6 =
        (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, p)| ipnetwork::IpNetwork::new(a.into(), p).unwrap());
    let net = prop_oneof![v4, v6];
    let opt_u32 = || prop::option::of(any::<u32>());
    let interface = (
        "[a-z0-9]{1,15}",
        prop::option::of("[0-9a-f:]{17}"),
        opt_u32(),
        prop::option::of("/run/netns/[a-z]{1,6}"),
        prop::option::of("/[a-z]{1,6}"),
        prop::option::of("[0-9a-f:.]{12}"),
    )
        .prop_map(|(name, mac, mtu, sandbox, socket_path, pci_id)| Interface {
            name,
            mac,
            mtu,
            sandbox,
            socket_path,
            pci_id,
        });
    let route = (
        net.clone(),
        prop::option::of(any::<[u8; 4]>()),
        opt_u32(),
        opt_u32(),
        opt_u32(),
        opt_u32(),
        opt_u32(),
    )
        .prop_map(|(dst, gw, mtu, advmss, priority, table, scope)| Route {
            dst,
            gw: gw.map(Into::into),
            mtu,
            advmss,
            priority,
            table,
            scope,
        });
    (
        prop::collection::vec(interface, 0..4),
        prop::collection::vec(
            (
                net,
                prop::option::of(any::<[u8; 4]>()),
                prop::option::of(0usize..4),
            ),
            0..4,
        ),
        prop::collection::vec(route, 0..4),
        prop::collection::vec("[0-9.]{1,15}", 0..3),
    )
        .prop_map(|(interfaces, ips, routes, nameservers)| {
            let n = interfaces.len();
            CniResult {
                ips: ips
                    .into_iter()
                    .map(|(address, gw, i)| IpConfig {
                        address,
                        gateway: gw.map(Into::into),
                        interface: i.filter(|i| *i < n),
                    })
                    .collect(),
                interfaces,
                routes,
                dns: Dns {
                    nameservers,
                    ..Default::default()
                },
            }
        })
}

/// What a result keeps when written in `version`: the fields 1.1.0 added go before it.
fn as_seen_in(result: &CniResult, version: Version) -> CniResult {
    let mut r = result.clone();
    if !version.has_extended_fields() {
        for i in &mut r.interfaces {
            (i.mtu, i.socket_path, i.pci_id) = (None, None, None);
        }
        for route in &mut r.routes {
            (route.mtu, route.advmss, route.priority, route.table, route.scope) =
                (None, None, None, None, None);
        }
    }
    r
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_environment_with_a_near_valid_config(env in env_map(), conf in near_config()) {
        run(&env, conf.to_string().as_bytes());
    }

    #[test]
    fn any_config_under_every_verb(conf in near_config(), verb in prop::sample::select(VERBS.to_vec())) {
        run(&standard_env(verb), conf.to_string().as_bytes());
    }

    #[test]
    fn any_json_at_all(value in any_json()) {
        run(&standard_env("ADD"), value.to_string().as_bytes());
    }

    #[test]
    fn any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64), cut in 0usize..200) {
        run(&standard_env("ADD"), &bytes);
        // A valid configuration cut short anywhere.
        let whole = json!({"cniVersion": "1.1.0", "name": "n", "type": "t",
            "runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80}]}}).to_string();
        run(&standard_env("ADD"), &whole.as_bytes()[..cut.min(whole.len())]);
    }

    #[test]
    fn a_result_reads_back_the_same_in_every_version(result in any_result()) {
        for version in Version::ALL {
            let written = result.to_json(version);
            let read = CniResult::from_json(&written).unwrap_or_else(|e| panic!("{e}: {written}"));
            prop_assert_eq!(&read, &as_seen_in(&result, version));
            prop_assert_eq!(read.to_json(version), written);
        }
    }

    #[test]
    fn any_json_as_a_result_is_read_or_refused_as_undecodable(value in any_json()) {
        if let Err(e) = CniResult::from_json(&value) {
            prop_assert_eq!(e.code, Code::Decode);
        }
    }
}
