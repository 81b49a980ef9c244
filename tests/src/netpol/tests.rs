//! The oracle against upstream's expectations, and against the API's rules one by one.

use std::net::IpAddr;

use serde_json::{json, Value};

use super::cases::{self, Case, Suite};
use super::cluster::{
    pod_keys, port_name, service_name, service_port_name, upstream_cluster, PodAddresses, PORTS,
};
use super::model::{
    Cluster, Connection, ContainerPort, Endpoint, Family, Labels, Namespace, NetworkPolicy, Pod, Protocol,
};
use super::reachability::{Reachability, TruthTable};

/// x/a = 10.16.1.10 ... z/c = 10.16.3.12, and fd00:16:1::10 ... in IPv6: every pod in
/// one /4 and in distinct /24s, as a cluster's pod network would put them.
fn addresses() -> PodAddresses {
    let mut addresses = PodAddresses::new();
    for (n, ns) in ["x", "y", "z"].iter().enumerate() {
        for (p, pod) in ["a", "b", "c"].iter().enumerate() {
            let v4: IpAddr = format!("10.16.{}.{}", n + 1, p + 10).parse().unwrap();
            let v6: IpAddr = format!("fd00:16:{}::{}", n + 1, p + 10).parse().unwrap();
            addresses.set(&format!("{ns}/{pod}"), &[v4, v6]).unwrap();
        }
    }
    addresses
}

/// Every probe of every case: the oracle's table against upstream's, diagonal included.
/// Returns one readable report per disagreement, grids in upstream's layout.
fn disagreements(cases: &[Case], family: Family) -> Vec<String> {
    let mut reports = Vec::new();
    for case in cases {
        let scenario = case
            .instantiate(&addresses(), family)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name()));
        for (index, step) in scenario.steps.iter().enumerate() {
            for probe in &step.probes {
                let expected = probe.upstream.truth_table();
                let oracle = step.state.truth_table(probe.port, probe.protocol);
                let wrong = expected.mismatches(&oracle, true);
                if !wrong.is_empty() {
                    // Expected is upstream's table, observed the oracle's.
                    reports.push(format!(
                        "{} ({family:?}), step {index}, {}/{}: {} pairs differ: {wrong:?}\n{}",
                        scenario.name,
                        probe.port,
                        probe.protocol,
                        wrong.len(),
                        expected.report(&oracle)
                    ));
                }
            }
        }
    }
    reports
}

#[test]
fn netpol_every_case_agrees_with_upstream_in_ipv4() {
    let reports = disagreements(&cases::all(), Family::V4);
    assert!(reports.is_empty(), "{}", reports.join("\n"));
}

#[test]
fn netpol_every_case_agrees_with_upstream_in_ipv6() {
    let reports = disagreements(&cases::all(), Family::V6);
    assert!(reports.is_empty(), "{}", reports.join("\n"));
}

#[test]
fn netpol_a_wrong_expectation_is_reported_with_its_grid() {
    // Upstream's default-deny-ingress, with one statement too many: the comparison must
    // catch exactly that pair, or the agreement tests above could not fail.
    let mut case = cases::all()
        .into_iter()
        .find(|c| c.suite == Suite::Tcp && c.title.contains("'default-deny-ingress'"))
        .unwrap();
    let probe = &mut case.steps[0].probes[0];
    probe.upstream = probe.upstream.clone().pair("y/c", "x/b", true);
    let reports = disagreements(&[case], Family::V4);
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(reports[0].contains(r#"[("y/c", "x/b")]"#), "{}", reports[0]);
    // The comparison grid marks the one pair that differs.
    assert!(
        reports[0].contains("y/c\t.\tX\t.\t.\t.\t.\t.\t.\t."),
        "{}",
        reports[0]
    );
}

#[test]
fn netpol_cases_cover_what_the_issue_asks_for() {
    let all = cases::all();
    let upstream: Vec<&Case> = all.iter().filter(|c| c.suite != Suite::Ferry).collect();
    assert!(upstream.len() >= 35, "only {} upstream cases", upstream.len());
    let mut names: Vec<String> = all.iter().map(Case::name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), all.len(), "two cases share a name");

    let policies = |case: &Case| -> String {
        let mut text = String::new();
        for step in &case.steps {
            for action in &step.actions {
                if let cases::Action::Apply(policy) = action {
                    text.push_str(&policy.to_string());
                }
            }
        }
        text
    };
    let count = |needle: &str| all.iter().filter(|c| policies(c).contains(needle)).count();
    assert!(count("\"except\"") >= 3, "ipBlock/except");
    assert!(count("\"ipBlock\"") >= 5, "ipBlock");
    assert!(count("\"serve-") >= 5, "named ports");
    assert!(count("\"endPort\"") >= 2, "endPort");
    assert!(count("\"Egress\"") >= 10, "egress");
    assert!(count("NotIn") >= 3, "namespace expressions");
    let relabels = all
        .iter()
        .filter(|c| {
            c.steps.iter().flat_map(|s| &s.actions).any(|a| {
                matches!(
                    a,
                    cases::Action::LabelNamespace { .. } | cases::Action::LabelPod { .. }
                )
            })
        })
        .count();
    assert!(relabels >= 3, "relabel cases");
    for protocol in Protocol::ALL {
        let probed = all
            .iter()
            .flat_map(|c| &c.steps)
            .flat_map(|s| &s.probes)
            .any(|p| p.protocol == protocol);
        assert!(probed, "no probe on {protocol}");
    }
}

#[test]
fn netpol_templates_become_cidrs_of_the_family() {
    let case = cases::all()
        .into_iter()
        .find(|c| c.title == "should enforce except clause while egress access to server in CIDR block")
        .unwrap();
    for (family, cidr, except) in [
        (Family::V4, "0.0.0.0/4", "10.16.1.11/32"),
        (Family::V6, "f000::/4", "fd00:16:1::11/128"),
    ] {
        let scenario = case.instantiate(&addresses(), family).unwrap();
        let block = &scenario.steps[0].state.policies[0]["spec"]["egress"][0]["to"][0]["ipBlock"];
        assert_eq!(block, &json!({"cidr": cidr, "except": [except]}), "{family:?}");
    }
    let mut only_v4 = PodAddresses::new();
    only_v4.set("x/a", &["10.1.0.1".parse().unwrap()]).unwrap();
    let error = case.instantiate(&only_v4, Family::V6).unwrap_err().to_string();
    assert!(error.contains("x/a has no V6 address"), "{error}");
    let error = PodAddresses::new().set("w/a", &[]).unwrap_err().to_string();
    assert!(error.contains("x/a, x/b"), "{error}");
}

#[test]
fn netpol_truth_table_prints_like_upstream() {
    let table = Reachability::all().all_ingress("x/a", false).truth_table();
    let text = table.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "-\tx/a\tx/b\tx/c\ty/a\ty/b\ty/c\tz/a\tz/b\tz/c");
    assert_eq!(lines[1], "x/a\tX\t.\t.\t.\t.\t.\t.\t.\t.");
    assert_eq!(lines[9], "z/c\tX\t.\t.\t.\t.\t.\t.\t.\t.");
    assert_eq!(lines.len(), 10);
}

#[test]
fn netpol_later_statements_override_earlier_ones() {
    let r = Reachability::all()
        .peer("x/*", "*/*", false)
        .pair("x/a", "y/a", true);
    assert!(r.expects("x/a", "y/a"));
    assert!(!r.expects("x/a", "y/b"));
    assert!(r.expects("y/a", "x/a"));
    let t: TruthTable = r.truth_table();
    assert_eq!(t.cells.iter().flatten().filter(|c| !**c).count(), 26);
}

// The oracle rule by rule, on clusters and policies built here.

fn parse(policy: Value) -> NetworkPolicy {
    NetworkPolicy::from_json(&policy).unwrap_or_else(|e| panic!("{e}"))
}

fn np(namespace: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"namespace": namespace, "name": "p"}, "spec": spec})
}

fn pod_to_pod(
    cluster: &Cluster,
    policies: &[Value],
    from: &str,
    to: &str,
    port: u16,
    protocol: Protocol,
    family: Family,
) -> bool {
    let parsed: Vec<NetworkPolicy> = policies.iter().cloned().map(parse).collect();
    let pod = |key: &str| {
        let (ns, name) = key.split_once('/').unwrap();
        cluster.pod(ns, name).unwrap()
    };
    let connection = Connection {
        from: Endpoint::Pod(pod(from)),
        to: Endpoint::Pod(pod(to)),
        family,
        port,
        protocol,
    };
    cluster.allows(&parsed, &connection)
}

#[test]
fn netpol_a_pod_no_policy_selects_is_not_isolated() {
    let cluster = upstream_cluster(&addresses(), &PORTS);
    let policies = [np("x", json!({"podSelector": {"matchLabels": {"pod": "a"}}}))];
    assert!(!pod_to_pod(
        &cluster,
        &policies,
        "y/a",
        "x/a",
        80,
        Protocol::Tcp,
        Family::V4
    ));
    assert!(pod_to_pod(
        &cluster,
        &policies,
        "y/a",
        "x/b",
        80,
        Protocol::Tcp,
        Family::V4
    ));
    // Without policyTypes and egress rules the policy does not touch egress.
    assert!(pod_to_pod(
        &cluster,
        &policies,
        "x/a",
        "y/a",
        80,
        Protocol::Tcp,
        Family::V4
    ));
}

#[test]
fn netpol_rules_of_several_policies_add_up() {
    let cluster = upstream_cluster(&addresses(), &PORTS);
    let from = |pod: &str| {
        np(
            "x",
            json!({"podSelector": {}, "ingress": [{"from": [
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": pod}}}]}]}),
        )
    };
    let policies = [from("b"), from("c")];
    let allowed = |src: &str| pod_to_pod(&cluster, &policies, src, "x/a", 81, Protocol::Udp, Family::V4);
    assert!(allowed("z/b"));
    assert!(allowed("y/c"));
    assert!(!allowed("z/a"));
}

#[test]
fn netpol_selector_operators_follow_the_api() {
    let selector = |expressions: Value| {
        let policy = parse(np("x", json!({"podSelector": {"matchExpressions": expressions}})));
        policy.pod_selector
    };
    let labels = |pairs: &[(&str, &str)]| -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let plain = labels(&[("pod", "a")]);
    let tier = labels(&[("pod", "a"), ("tier", "web")]);
    let not_in = selector(json!([{"key": "tier", "operator": "NotIn", "values": ["web"]}]));
    assert!(not_in.matches(&plain), "NotIn holds when the key is absent");
    assert!(!not_in.matches(&tier));
    let is_in = selector(json!([{"key": "tier", "operator": "In", "values": ["db", "web"]}]));
    assert!(!is_in.matches(&plain), "In needs the key");
    assert!(is_in.matches(&tier));
    let exists = selector(json!([{"key": "tier", "operator": "Exists"}]));
    assert!(exists.matches(&tier) && !exists.matches(&plain));
    let absent = selector(json!([{"key": "tier", "operator": "DoesNotExist"}]));
    assert!(!absent.matches(&tier) && absent.matches(&plain));
    let both = parse(np(
        "x",
        json!({"podSelector": {
        "matchLabels": {"pod": "a"},
        "matchExpressions": [{"key": "tier", "operator": "Exists"}]}}),
    ));
    assert!(both.pod_selector.matches(&tier) && !both.pod_selector.matches(&plain));
}

#[test]
fn netpol_named_ports_resolve_on_each_destination_pod() {
    let pod = |name: &str, http: u16, ip: &str| Pod {
        namespace: "web".into(),
        name: name.into(),
        labels: Labels::from([("app".to_string(), "web".to_string())]),
        ips: vec![ip.parse().unwrap()],
        ports: vec![ContainerPort {
            name: Some("http".into()),
            protocol: Protocol::Tcp,
            port: http,
        }],
    };
    let cluster = Cluster {
        namespaces: vec![Namespace::new("web", Labels::new())],
        pods: vec![pod("old", 8080, "10.0.0.1"), pod("new", 9090, "10.0.0.2")],
    };
    let policies = [np(
        "web",
        json!({"podSelector": {}, "policyTypes": ["Ingress"],
        "ingress": [{"ports": [{"port": "http"}]}]}),
    )];
    let reach = |to: &str, port: u16| {
        pod_to_pod(
            &cluster,
            &policies,
            "web/old",
            to,
            port,
            Protocol::Tcp,
            Family::V4,
        )
    };
    assert!(reach("web/old", 8080));
    assert!(!reach("web/old", 9090));
    assert!(reach("web/new", 9090));
    assert!(!reach("web/new", 8080));
    assert!(!pod_to_pod(
        &cluster,
        &policies,
        "web/old",
        "web/new",
        9090,
        Protocol::Udp,
        Family::V4
    ));
}

#[test]
fn netpol_ip_blocks_match_pods_and_outside_addresses_of_their_family() {
    let addresses = addresses();
    let cluster = upstream_cluster(&addresses, &PORTS);
    let policies = vec![parse(np(
        "x",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [
            {"ipBlock": {"cidr": "10.16.0.0/16", "except": ["10.16.2.0/24"]}},
            {"ipBlock": {"cidr": "fd00:16::/32", "except": ["fd00:16:3::/48"]}}]}]}),
    ))];
    let x_a = cluster.pod("x", "a").unwrap();
    let from = |from: Endpoint, family: Family| {
        cluster.allows(
            &policies,
            &Connection {
                from,
                to: Endpoint::Pod(x_a),
                family,
                port: 80,
                protocol: Protocol::Tcp,
            },
        )
    };
    let pod = |ns: &str, name: &str| Endpoint::Pod(cluster.pod(ns, name).unwrap());
    assert!(from(pod("z", "c"), Family::V4));
    assert!(!from(pod("y", "b"), Family::V4), "y is in the v4 except");
    assert!(from(pod("y", "b"), Family::V6));
    assert!(!from(pod("z", "c"), Family::V6), "z is in the v6 except");
    let outside = |ip: &str| Endpoint::Ip(ip.parse().unwrap());
    assert!(from(outside("10.16.200.1"), Family::V4));
    assert!(!from(outside("10.17.0.1"), Family::V4));
    assert!(from(outside("fd00:16:99::1"), Family::V6));
    assert!(!from(outside("fd00:17::1"), Family::V6));
}

#[test]
fn netpol_outside_sources_meet_only_ingress_and_never_a_selector() {
    let cluster = upstream_cluster(&addresses(), &PORTS);
    let case = cases::all()
        .into_iter()
        .find(|c| c.title == "should enforce policy to allow ingress traffic for a target")
        .unwrap();
    let scenario = case.instantiate(&addresses(), Family::V4).unwrap();
    let state = &scenario.steps[0].state;
    let outside: IpAddr = "192.0.2.7".parse().unwrap();
    // x/a's rule names every pod of every namespace, which an outside address is not.
    assert!(!state.expected_from_address(outside, "x/a", 80, Protocol::Tcp));
    assert!(state.expected_from_address(outside, "y/a", 80, Protocol::Tcp));
    assert_eq!(state.cluster, cluster);
}

#[test]
fn netpol_every_upstream_pod_serves_named_ports() {
    let cluster = upstream_cluster(&addresses(), &PORTS);
    assert_eq!(cluster.pods.len(), 9);
    for (pod, key) in cluster.pods.iter().zip(pod_keys()) {
        assert_eq!(pod.key(), key);
        assert_eq!(pod.ports.len(), 6);
        assert!(pod
            .ports
            .iter()
            .any(|p| p.name.as_deref() == Some("serve-81-sctp")
                && p.port == 81
                && p.protocol == Protocol::Sctp));
        assert_eq!(pod.ips.len(), 2);
    }
    assert_eq!(port_name(80, Protocol::Udp), "serve-80-udp");
    assert_eq!(service_name("y/c"), "s-y-c");
    assert_eq!(service_port_name(81, Protocol::Sctp), "service-port-sctp-81");
    let y = cluster.namespace("y").unwrap();
    assert_eq!(y.labels.get("ns").map(String::as_str), Some("y"));
    assert_eq!(
        y.labels.get("kubernetes.io/metadata.name").map(String::as_str),
        Some("y")
    );
}

#[test]
fn netpol_policies_the_api_would_refuse_are_refused_with_their_path() {
    let refused = |spec: Value| NetworkPolicy::from_json(&np("x", spec)).unwrap_err().to_string();
    let cases = [
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}),
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
            "endPort 80 is below port 90",
        ),
        (
            json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]}),
            "spec.egress[0].to[0].ipBlock.except[0]",
        ),
        (
            json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.1"}}]}]}),
            "has no prefix length",
        ),
        (
            json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
            "ipBlock cannot be combined",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["b"]}]}}),
            "spec.podSelector.matchExpressions[0].operator",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
            "In needs at least one value",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
            "\"ICMP\" is not TCP, UDP or SCTP",
        ),
        (
            json!({"podSelector": {}, "policyTypes": ["Both"]}),
            "spec.policyTypes[0]",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"form": []}]}),
            "spec.ingress[0]",
        ),
        (json!({"podselector": {}}), "podselector"),
        (
            json!({"podSelector": {}, "ingress": [{"from": [{}]}]}),
            "a peer needs",
        ),
    ];
    for (spec, needle) in cases {
        let message = refused(spec.clone());
        assert!(message.starts_with("NetworkPolicy x/p: "), "{message}");
        assert!(message.contains(needle), "{spec}: {message}");
    }
}
