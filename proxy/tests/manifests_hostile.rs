//! Hostile manifests: the parser of `--manifests` files never panics, whatever a file
//! holds, and a file it refuses is named in the error with what to fix.
//!
//! Inputs are valid objects of every kind the proxy reads, mutated structurally (a value
//! replaced by one of another type or an absurd one, a key removed, a list emptied or
//! repeated) and then written as YAML or JSON, plus texts cut or spliced at random. A fixed
//! number of cases from a fixed seed, so `cargo test` is short and repeatable;
//! `PROPTEST_CASES` raises the count for a longer hunt.

use std::path::Path;

use ferry_proxy::source::manifests::parse_file;
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{json, Value};

fn config() -> Config {
    ferry_tests::property::config(0x6d_61_6e_69)
}

/// One valid object of each kind the proxy reads, as `kubectl get -o yaml` writes them.
fn seeds() -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
               "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                        "ipFamilies": ["IPv4", "IPv6"], "externalIPs": ["192.0.2.7"],
                        "externalTrafficPolicy": "Local", "healthCheckNodePort": 30999,
                        "sessionAffinity": "ClientIP",
                        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                        "loadBalancerSourceRanges": ["198.51.100.0/24"],
                        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "nodePort": 30080}]},
               "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "web-1", "namespace": "default",
                            "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [{"addresses": ["10.244.0.5"], "nodeName": "node-a",
                              "conditions": {"ready": true, "serving": true, "terminating": false}}]}),
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": "node-a", "labels": {"kubernetes.io/hostname": "node-a"}},
               "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
               "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}]}}),
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"}},
               "spec": {"nodeName": "node-a",
                        "containers": [{"name": "c", "ports": [{"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"}]}]},
               "status": {"phase": "Running", "podIP": "10.244.0.5", "podIPs": [{"ip": "10.244.0.5"}]}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x", "labels": {"ns": "x"}}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "deny", "namespace": "x"},
               "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                        "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                                     "ports": [{"protocol": "TCP", "port": 80, "endPort": 90}]}]}}),
    ]
}

/// Values of every JSON type, and the absurd ones hostile files used.
fn hostile_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        prop_oneof![Just(0i64), Just(-1), Just(65536), Just(70000), Just(i64::MAX)].prop_map(Value::from),
        prop_oneof![
            Just("10.96.0.300"),
            Just("garbage"),
            Just("fd00::1"),
            Just("0.0.0.0/0"),
            Just("v2"),
            Just(""),
            Just("UDPX"),
        ]
        .prop_map(|s| Value::from(s.to_string())),
        ".{0,40}".prop_map(Value::from),
        Just(json!({})),
        Just(json!([])),
        Just(json!([[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]])),
    ]
}

/// Every path to a value in `v`, as keys and indices.
fn paths(v: &Value, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(prefix.clone());
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                prefix.push(Step::Key(k.clone()));
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                prefix.push(Step::Index(i));
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn at<'a>(v: &'a mut Value, path: &[Step]) -> &'a mut Value {
    path.iter().fold(v, |v, step| match step {
        Step::Key(k) => &mut v[k.as_str()],
        Step::Index(i) => &mut v[*i],
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Replace(Value),
    Remove,
    Repeat,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => hostile_value().prop_map(Mutation::Replace),
        1 => Just(Mutation::Remove),
        1 => Just(Mutation::Repeat),
    ]
}

/// Applies `m` at the `pick`-th path of `v` (modulo the number of paths).
fn mutate(v: &mut Value, pick: usize, m: &Mutation) {
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let path = &all[pick % all.len()];
    match m {
        Mutation::Replace(new) => *at(v, path) = new.clone(),
        Mutation::Remove => match path.split_last() {
            Some((Step::Key(k), parent)) => {
                if let Some(map) = at(v, parent).as_object_mut() {
                    map.remove(k);
                }
            }
            Some((Step::Index(i), parent)) => {
                if let Some(items) = at(v, parent).as_array_mut() {
                    items.remove(*i);
                }
            }
            None => *v = Value::Null,
        },
        Mutation::Repeat => {
            let target = at(v, path);
            *target = json!([target.clone(), target.clone()]);
        }
    }
}

/// The parser's whole contract with a file: objects, or an error naming the file.
fn parse_names_the_file_or_succeeds(name: &str, text: &str) {
    let path = Path::new("/manifests").join(name);
    if let Err(e) = parse_file(&path, text) {
        let shown = e.to_string();
        assert!(shown.contains(name), "the error does not name the file: {shown}");
        assert!(!e.message.is_empty(), "an error without a message for {text:?}");
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_objects_never_panic_the_parser(
        seed in 0usize..6,
        edits in prop::collection::vec((any::<usize>(), mutation()), 1..4),
        as_list in any::<bool>(),
        as_json in any::<bool>(),
    ) {
        let mut object = seeds()[seed].clone();
        for (pick, m) in &edits {
            mutate(&mut object, *pick, m);
        }
        let document = if as_list {
            json!({"apiVersion": "v1", "kind": "List", "items": [object, seeds()[(seed + 1) % 6].clone()]})
        } else {
            object
        };
        let (name, text) = if as_json {
            ("hostile.json", serde_json::to_string(&document).unwrap())
        } else {
            ("hostile.yaml", serde_yaml_ng::to_string(&document).unwrap())
        };
        parse_names_the_file_or_succeeds(name, &text);
    }

    #[test]
    fn cut_and_spliced_texts_never_panic_the_parser(
        seed in 0usize..6,
        cut in any::<usize>(),
        splice in ".{0,20}",
        multi in any::<bool>(),
    ) {
        let mut text = serde_yaml_ng::to_string(&seeds()[seed]).unwrap();
        if multi {
            text = format!("{text}---\n{}", serde_yaml_ng::to_string(&seeds()[(seed + 3) % 6]).unwrap());
        }
        let at = text.char_indices().map(|(i, _)| i).nth(cut % text.chars().count()).unwrap_or(0);
        text.insert_str(at, &splice);
        parse_names_the_file_or_succeeds("cut.yaml", &text);
        parse_names_the_file_or_succeeds("cut.yaml", &text[..at]);
    }
}

/// Every seed parses as it stands: the mutations above start from valid objects.
#[test]
fn the_seeds_are_valid() {
    for seed in seeds() {
        let text = serde_yaml_ng::to_string(&seed).unwrap();
        parse_file(Path::new("/manifests/seed.yaml"), &text)
            .unwrap_or_else(|e| panic!("seed {} does not parse: {e}", seed["kind"]));
    }
}
