//! The incremental policy planner against the whole plan: random sequences of store
//! events (Pods added, relabelled, moved, given or stripped of addresses and ports,
//! finished, put on the host's network, deleted; Namespaces relabelled or deleted;
//! policies added, changed, deleted) over a small universe, taken in batches of one to
//! a few events. After each take, the updated table must equal `plan(store, node)`
//! exactly, and the planner must report exactly the Pods whose entry differs from the
//! table before. No root: nothing is programmed.
//!
//! Then the same kind of sequence through the nftables back end into a node netns (root):
//! after each sync, the peer sets and verdict maps the kernel lists must be exactly what
//! the plan says (set by set, element by element), also across a restart of the back
//! end over the table it left: sets are named by what they select and changed by
//! element diff, so the kernel's elements are what must be proved.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferry_proxy::backend::nftables::NftablesBackend;
use ferry_proxy::backend::policy::{layout, TABLE};
use ferry_proxy::backend::Backend;
use ferry_proxy::changes::Changes;
use ferry_proxy::plan::policy::{plan, PolicyPlanner, PolicyTable};
use ferry_proxy::plan::Plan;
use ferry_proxy::source::{Event, Object};
use ferry_proxy::store::Store;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{json, Value};

const NODE: &str = "node-a";
const NAMESPACES: [&str; 3] = ["x", "y", "z"];

fn config() -> Config {
    ferry_tests::property::config(0x70_6f_6c_69)
}

/// Picks one of `choices` with the next digits of `seed`.
fn pick<T: Clone>(seed: &mut u64, choices: &[T]) -> T {
    let choice = choices[(*seed % choices.len() as u64) as usize].clone();
    *seed /= choices.len() as u64;
    choice
}

fn labels(seed: &mut u64) -> Value {
    let mut labels = serde_json::Map::new();
    if let Some(app) = pick(seed, &[Some("web"), Some("db"), None]) {
        labels.insert("app".into(), app.into());
    }
    if let Some(tier) = pick(seed, &[Some("1"), Some("2"), None]) {
        labels.insert("tier".into(), tier.into());
    }
    Value::Object(labels)
}

fn pod(mut seed: u64) -> Object {
    let seed = &mut seed;
    let namespace = pick(seed, &NAMESPACES);
    let name = format!("p{}", pick(seed, &[0, 1, 2, 3]));
    let labels = labels(seed);
    let node = pick(seed, &[NODE, NODE, "node-b"]);
    // Few addresses, so two Pods sometimes share one (a finished Pod and its successor).
    let ips: Vec<Value> = match pick(seed, &[0, 1, 1, 1, 2]) {
        0 => vec![],
        1 => vec![json!({"ip": format!("10.0.0.{}", pick(seed, &[1, 2, 3, 4, 5, 6, 9]))})],
        _ => vec![
            json!({"ip": format!("10.0.0.{}", pick(seed, &[1, 2, 3, 4, 5, 6, 9]))}),
            json!({"ip": format!("fd00::{}", pick(seed, &[1, 2, 3]))}),
        ],
    };
    let phase = pick(seed, &["Running", "Running", "Running", "Pending", "Succeeded"]);
    let host_network = pick(seed, &[false, false, false, false, true]);
    let ports: Vec<Value> = match pick(seed, &[0, 1, 2, 3]) {
        0 => vec![],
        1 => vec![json!({"name": "http", "containerPort": 80})],
        2 => vec![json!({"name": "http", "containerPort": 8080})],
        _ => vec![
            json!({"name": "http", "containerPort": 81, "protocol": "UDP"}),
            json!({"name": "dns", "containerPort": 53, "protocol": "UDP"}),
        ],
    };
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"namespace": namespace, "name": name, "labels": labels},
        "spec": {"nodeName": node, "hostNetwork": host_network,
                 "containers": [{"name": "c", "ports": ports}]},
        "status": {"phase": phase, "podIPs": ips}
    }))
    .unwrap();
    pod.into()
}

fn namespace(mut seed: u64) -> Object {
    let seed = &mut seed;
    let name = pick(seed, &NAMESPACES);
    let labels = match pick(seed, &[0, 1, 2]) {
        0 => json!({}),
        1 => json!({"team": "a"}),
        _ => json!({"team": "b"}),
    };
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
    ns.into()
}

fn selector(seed: &mut u64) -> Value {
    match pick(seed, &[0, 1, 2, 3, 4]) {
        0 => json!({}),
        1 => json!({"matchLabels": {"app": "web"}}),
        2 => json!({"matchLabels": {"app": "db"}}),
        3 => json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["1"]}]}),
        _ => json!({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}),
    }
}

fn namespace_selector(seed: &mut u64) -> Value {
    match pick(seed, &[0, 1, 2, 3]) {
        0 => json!({}),
        1 => json!({"matchLabels": {"team": "a"}}),
        2 => json!({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["a"]}]}),
        _ => json!({"matchLabels": {"kubernetes.io/metadata.name": "y"}}),
    }
}

fn peer(seed: &mut u64) -> Value {
    match pick(seed, &[0, 1, 2, 3, 4]) {
        0 => json!({"podSelector": selector(seed)}),
        1 => json!({"namespaceSelector": namespace_selector(seed)}),
        2 => json!({"namespaceSelector": namespace_selector(seed), "podSelector": selector(seed)}),
        3 => json!({"ipBlock": {"cidr": "10.0.0.0/29", "except": ["10.0.0.4/31"]}}),
        _ => json!({"ipBlock": {"cidr": "fd00::/126"}}),
    }
}

fn ports(seed: &mut u64) -> Value {
    match pick(seed, &[0, 1, 2, 3, 4]) {
        0 => json!([]),
        1 => json!([{"port": 80}]),
        2 => json!([{"port": "http"}]),
        3 => json!([{"port": "http", "protocol": "UDP"}, {"port": "dns", "protocol": "UDP"}]),
        _ => json!([{"port": 80, "endPort": 8080}, {"port": "http"}]),
    }
}

fn rules(seed: &mut u64, peers_field: &str) -> Value {
    let count = pick(seed, &[0, 1, 1, 2]);
    let rules: Vec<Value> = (0..count)
        .map(|_| {
            let peers: Vec<Value> = (0..pick(seed, &[0, 1, 1, 2])).map(|_| peer(seed)).collect();
            let mut rule = serde_json::Map::new();
            if !peers.is_empty() {
                rule.insert(peers_field.into(), peers.into());
            }
            let ports = ports(seed);
            if ports != json!([]) {
                rule.insert("ports".into(), ports);
            }
            Value::Object(rule)
        })
        .collect();
    rules.into()
}

fn policy(mut seed: u64) -> Object {
    let seed = &mut seed;
    let namespace = pick(seed, &NAMESPACES);
    let name = format!("q{}", pick(seed, &[0, 1, 2]));
    let types = pick(
        seed,
        &[
            json!(null),
            json!(["Ingress"]),
            json!(["Egress"]),
            json!(["Ingress", "Egress"]),
        ],
    );
    let mut spec = json!({"podSelector": selector(seed), "ingress": rules(seed, "from"),
                          "egress": rules(seed, "to")});
    if !types.is_null() {
        spec["policyTypes"] = types;
    }
    let policy: NetworkPolicy =
        serde_json::from_value(json!({"metadata": {"namespace": namespace, "name": name}, "spec": spec}))
            .unwrap();
    policy.into()
}

fn event(kind: u8, seed: u64) -> Event {
    match kind {
        0..=3 => Event::Upsert(pod(seed)),
        4 => Event::Delete(pod(seed)),
        5 => Event::Upsert(namespace(seed)),
        6 => Event::Delete(namespace(seed)),
        7 | 8 => Event::Upsert(policy(seed)),
        _ => Event::Delete(policy(seed)),
    }
}

/// The Pods whose entry differs between two tables.
fn differing(old: &PolicyTable, new: &PolicyTable) -> BTreeSet<String> {
    old.pods
        .keys()
        .chain(new.pods.keys())
        .filter(|key| old.pods.get(*key) != new.pods.get(*key))
        .cloned()
        .collect()
}

/// Applies `batches` of events, updating the planner after each batch, and checks it
/// against the whole plan each time.
fn check(batches: &[Vec<(u8, u64)>]) -> Result<(), TestCaseError> {
    let mut store = Store::new();
    let mut planner = PolicyPlanner::new(NODE);
    store.take_policy_changes();
    let mut table = planner.full(&store);
    for (step, batch) in batches.iter().enumerate() {
        let before = table.clone();
        for (kind, seed) in batch {
            store.apply(event(*kind, *seed));
        }
        let dirty = store.take_policy_changes();
        let changed = planner.update(&store, &dirty, &mut table);
        let expected = plan(&store, NODE);
        prop_assert_eq!(&table, &expected, "step {}: {:?}", step, dirty);
        prop_assert_eq!(changed, differing(&before, &expected), "step {}", step);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn incremental_plan_equals_the_whole_plan_after_every_change(
        batches in prop::collection::vec(prop::collection::vec((0u8..10, any::<u64>()), 1..4), 1..40)
    ) {
        check(&batches)?;
    }
}

/// A seeded universe first, so changes meet policies that already select and peers
/// already resolved (random sequences start from nothing).
#[test]
fn incremental_plan_equals_the_whole_plan_from_a_busy_store() {
    let mut batches: Vec<Vec<(u8, u64)>> = Vec::new();
    let mut seed = 0x5eed_u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed >> 11
    };
    let start: Vec<(u8, u64)> = (0..60)
        .map(|i| (if i % 3 == 0 { 7 } else { (i % 7) as u8 }, next()))
        .collect();
    batches.push(start);
    for _ in 0..400 {
        let kind = (next() % 10) as u8;
        batches.push(vec![(kind, next())]);
    }
    check(&batches).unwrap();
}

/// Peer sets (name -> address ranges as `first-last`) and verdict map elements
/// (map -> address -> `jump|goto chain`) as `nft -j list table` shows them.
type Kernel = (
    BTreeMap<String, BTreeSet<(IpAddr, IpAddr)>>,
    BTreeMap<String, BTreeMap<IpAddr, String>>,
);

fn ip(v: &Value) -> IpAddr {
    v.as_str()
        .unwrap_or_else(|| panic!("an address: {v}"))
        .parse()
        .unwrap()
}

/// The first and last address of one element of an interval set, whichever form nft
/// prints it in (an address, a range, a prefix).
fn bounds(e: &Value) -> (IpAddr, IpAddr) {
    if let Some(range) = e.get("range") {
        return (ip(&range[0]), ip(&range[1]));
    }
    if let Some(prefix) = e.get("prefix") {
        let net: ipnetwork::IpNetwork = format!("{}/{}", prefix["addr"].as_str().unwrap(), prefix["len"])
            .parse()
            .unwrap();
        let last = match net {
            ipnetwork::IpNetwork::V4(n) => IpAddr::V4(n.broadcast()),
            ipnetwork::IpNetwork::V6(n) => {
                let host = 128 - u32::from(n.prefix());
                let mask = if host == 128 {
                    u128::MAX
                } else {
                    (1u128 << host) - 1
                };
                IpAddr::V6((u128::from(n.network()) | mask).into())
            }
        };
        return (net.network(), last);
    }
    (ip(e), ip(e))
}

fn kernel_of(listed: &str) -> Kernel {
    let json: Value = serde_json::from_str(listed).unwrap();
    let (mut sets, mut maps) = (BTreeMap::new(), BTreeMap::new());
    for item in json["nftables"].as_array().unwrap() {
        if let Some(set) = item.get("set") {
            let name = set["name"].as_str().unwrap().to_string();
            let elems = set
                .get("elem")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            sets.insert(name, elems.iter().map(bounds).collect());
        } else if let Some(map) = item.get("map") {
            let name = map["name"].as_str().unwrap().to_string();
            let elems = map
                .get("elem")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let entries: BTreeMap<IpAddr, String> = elems
                .iter()
                .map(|pair| {
                    let verdict = &pair[1];
                    let (kind, target) = ["jump", "goto"]
                        .iter()
                        .find_map(|k| verdict.get(*k).map(|v| (*k, v["target"].as_str().unwrap())))
                        .unwrap_or_else(|| panic!("a jump or goto: {verdict}"));
                    (ip(&pair[0]), format!("{kind} {target}"))
                })
                .collect();
            maps.insert(name, entries);
        }
    }
    (sets, maps)
}

/// What the kernel must hold for `table`.
fn expected(table: &PolicyTable) -> Kernel {
    let layout = layout(table);
    let sets = layout
        .sets
        .iter()
        .map(|(name, ranges)| {
            let ranges = ranges
                .iter()
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                    None => (r.parse().unwrap(), r.parse().unwrap()),
                })
                .collect();
            (name.clone(), ranges)
        })
        .collect();
    let mut maps: BTreeMap<String, BTreeMap<IpAddr, String>> =
        ["egress-v4", "egress-v6", "ingress-v4", "ingress-v6"]
            .iter()
            .map(|m| (m.to_string(), BTreeMap::new()))
            .collect();
    // The first Pod by name keeps a shared address, as the back end does.
    for pod in layout.pods.values() {
        for (direction, verb, chain) in [("egress", "jump", &pod.egress), ("ingress", "goto", &pod.ingress)] {
            let Some(chain) = chain else { continue };
            for ip in &pod.ips {
                let family = if ip.is_ipv4() { "v4" } else { "v6" };
                maps.get_mut(&format!("{direction}-{family}"))
                    .unwrap()
                    .entry(*ip)
                    .or_insert_with(|| format!("{verb} {}", chain.chain));
            }
        }
    }
    (sets, maps)
}

#[test]
fn the_kernel_holds_what_the_plan_says_after_every_change_and_a_restart() {
    ferry_tests::require_root!();
    let netns = ferry_tests::Netns::new("pol-kernel");
    let mut store = Store::new();
    let mut planner = PolicyPlanner::new(NODE);
    store.take_policy_changes();
    let mut table = planner.full(&store);
    let mut backend = NftablesBackend::new();
    let mut seed = 0x6b65_726e_u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed >> 11
    };
    // A busy start (policies every third event), then single changes and small batches.
    let mut batches: Vec<Vec<(u8, u64)>> = vec![(0..60)
        .map(|i| (if i % 3 == 0 { 7 } else { (i % 7) as u8 }, next()))
        .collect()];
    for i in 0..150 {
        batches.push((0..1 + i % 3).map(|_| ((next() % 10) as u8, next())).collect());
    }
    let mut element_diffs = 0;
    for (step, batch) in batches.iter().enumerate() {
        for (kind, seed) in batch {
            store.apply(event(*kind, *seed));
        }
        let dirty = store.take_policy_changes();
        planner.update(&store, &dirty, &mut table);
        if step % 40 == 39 {
            // A new process over the table the last one left.
            backend = NftablesBackend::new();
        }
        let plan = Plan {
            services: Default::default(),
            policy: Some(table.clone()),
        };
        netns
            .run(|| backend.sync(&plan, &Changes::all()))
            .unwrap_or_else(|e| {
                panic!(
                    "step {step}: sync failed: {e}\n{}",
                    backend.last_policy_transaction()
                )
            });
        let tx = backend.last_policy_transaction();
        // Element changes of sets that stay (a new set's elements follow its `add set`).
        let lines: Vec<&str> = tx.lines().collect();
        element_diffs += (0..lines.len())
            .filter(|&i| {
                let set_element = lines[i].starts_with("add element inet ferry-policy peers-")
                    || lines[i].starts_with("delete element inet ferry-policy peers-");
                set_element && (i == 0 || !lines[i - 1].starts_with("add set "))
            })
            .count();
        let listed = netns.exec_ok(&["nft", "-j", "list", "table", "inet", TABLE]);
        assert_eq!(
            kernel_of(&listed),
            expected(&table),
            "step {step}: {dirty:?}\nthe transaction was:\n{tx}"
        );
    }
    assert!(
        element_diffs > 20,
        "the sequence changed set elements {element_diffs} times only"
    );
}
