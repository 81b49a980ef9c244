//! Upstream's cases, transcribed by hand from kubernetes' `test/e2e/network/netpol/
//! network_policy.go` in the form where every case starts all nine pods and states the
//! whole 9x9 table (the `f.It(..., feature.NetworkPolicy, ...)` form; the newest form
//! starts only the pods a case looks at, and its tables say less). Titles are word for word; policies keep upstream's names and
//! live in namespaces x, y, z. Upstream builds policies with helpers whose JSON is:
//! `SetSpecIngressRules(...)` adds `"policyTypes": ["Ingress"]` and the rules (none for a
//! deny), `SetSpecEgressRules(...)` likewise for egress, and a pod selector of
//! `map[string]string{}` is `{}`. Ports with no protocol are upstream's, not omissions.
//!
//! Expectations use upstream's statements in upstream's order (see `reachability`).
//!
//! Three cases come from an older form of the file (before v1.25, when namespaces were
//! selected by an `ns` label and egress rules also let DNS through): the two of the
//! "using port range" context, upstream's only `endPort` cases, and the SCTP twin of
//! "should not allow access by TCP when a policy specifies only UDP". They are written
//! against today's topology; their tables are unchanged.

use serde_json::json;

use super::super::model::Protocol::{Sctp, Tcp, Udp};
use super::super::reachability::Reachability as R;
use super::{case, policy, probe, step, Action, Case, Suite};

pub fn cases() -> Vec<Case> {
    let mut cases = tcp_cases();
    cases.extend(other_protocol_cases());
    cases.extend(older_cases());
    cases
}

fn tcp_cases() -> Vec<Case> {
    let t = Suite::Tcp;
    let ns_y = json!({"matchLabels": {"kubernetes.io/metadata.name": "y"}});
    let not_ns_x = json!({"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x"]}]});
    let port_81_allow = || {
        R::all()
            .peer("x/*", "x/a", false)
            .peer("y/*", "x/a", true)
            .peer("z/*", "x/a", false)
    };
    let cidr_except = policy(
        "x",
        "allow-client-a-via-cidr-egress-rule",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"ipBlock": {"cidr": "<x/a>/4", "except": ["<x/b>/host"]}}]}]}),
    );
    vec![
        case(t, "should support a 'default-deny-ingress' policy", vec![step(
            vec![policy("x", "deny-ingress", json!({"podSelector": {}, "policyTypes": ["Ingress"]}))],
            vec![probe(80, Tcp, R::all().peer("*/*", "x/*", false))],
        )]),
        case(t, "should support a 'default-deny-all' policy", vec![step(
            vec![policy("x", "deny-all",
                json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))],
            vec![probe(80, Tcp, R::all().peer("*/*", "x/*", false).peer("x/*", "*/*", false))],
        )]),
        case(t, "should enforce policy to allow traffic from pods within server namespace based on PodSelector", vec![step(
            vec![policy("x", "x-a-allows-x-b", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}))],
            vec![probe(80, Tcp, R::all().all_ingress("x/a", false).pair("x/b", "x/a", true))],
        )]),
        case(t, "should enforce policy to allow ingress traffic for a target", vec![step(
            vec![
                policy("x", "deny-all", json!({"podSelector": {}, "policyTypes": ["Ingress"]})),
                policy("x", "allow-all-to-a", json!({
                    "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": {}, "namespaceSelector": {}}]}]})),
            ],
            vec![probe(80, Tcp, R::all()
                .all_ingress("x/a", true)
                .all_ingress("x/b", false)
                .all_ingress("x/c", false))],
        )]),
        case(t, "should enforce policy to allow ingress traffic from pods in all namespaces", vec![step(
            vec![policy("x", "allow-from-another-ns", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {}}]}]}))],
            vec![probe(80, Tcp, R::all())],
        )]),
        case(t, "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector", vec![step(
            vec![policy("x", "allow-client-a-via-ns-selector", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": ns_y}]}]}))],
            vec![probe(80, Tcp, R::all().peer("x/*", "x/a", false).peer("z/*", "x/a", false))],
        )]),
        case(t, "should enforce policy based on PodSelector with MatchExpressions", vec![step(
            vec![policy("x", "x-a-allows-x-b", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                    {"key": "pod", "operator": "In", "values": ["b"]}]}}]}]}))],
            vec![probe(80, Tcp, R::all().all_ingress("x/a", false).pair("x/b", "x/a", true))],
        )]),
        case(t, "should enforce policy based on NamespaceSelector with MatchExpressions", vec![step(
            vec![policy("x", "allow-ns-y-match-selector", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["y"]}]}}]}]}))],
            vec![probe(80, Tcp, R::all().peer("x/*", "x/a", false).peer("z/*", "x/a", false))],
        )]),
        case(t, "should enforce policy based on PodSelector or NamespaceSelector", vec![step(
            vec![policy("x", "allow-ns-y-match-selector", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [
                    {"namespaceSelector": not_ns_x},
                    {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}))],
            vec![probe(80, Tcp, R::all().pair("x/a", "x/a", false).pair("x/c", "x/a", false))],
        )]),
        case(t, "should enforce policy based on PodSelector and NamespaceSelector", vec![step(
            vec![policy("x", "allow-ns-y-podselector-and-nsselector", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": not_ns_x,
                                       "podSelector": {"matchLabels": {"pod": "b"}}}]}]}))],
            vec![probe(80, Tcp, R::all()
                .all_ingress("x/a", false)
                .pair("y/b", "x/a", true)
                .pair("z/b", "x/a", true))],
        )]),
        case(t, "should enforce policy based on Multiple PodSelectors and NamespaceSelectors", vec![step(
            vec![policy("x", "allow-ns-y-z-pod-b-c", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": not_ns_x,
                    "podSelector": {"matchExpressions": [
                        {"key": "pod", "operator": "In", "values": ["b", "c"]}]}}]}]}))],
            vec![probe(80, Tcp, R::all()
                .peer("x/*", "x/a", false)
                .pair("y/a", "x/a", false)
                .pair("z/a", "x/a", false))],
        )]),
        case(t, "should enforce policy based on any PodSelectors", vec![step(
            vec![policy("x", "allow-ns-x-pod-b-c", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [
                    {"podSelector": {"matchLabels": {"pod": "b"}}},
                    {"podSelector": {"matchLabels": {"pod": "c"}}}]}]}))],
            vec![probe(80, Tcp, R::all()
                .all_ingress("x/a", false)
                .pair("x/b", "x/a", true)
                .pair("x/c", "x/a", true))],
        )]),
        pod_in_other_namespace(t, 80, Tcp),
        case(t, "should enforce policy based on Ports", vec![step(
            vec![policy("x", "allow-client-a-via-ns-selector", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": ns_y}],
                             "ports": [{"port": 81, "protocol": "TCP"}]}]}))],
            vec![probe(81, Tcp, port_81_allow())],
        )]),
        case(t, "should enforce multiple, stacked policies with overlapping podSelectors", vec![
            step(
                vec![policy("x", "allow-client-a-via-ns-selector", json!({
                    "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"namespaceSelector": ns_y}],
                                 "ports": [{"port": 81, "protocol": "TCP"}]}]}))],
                vec![
                    probe(81, Tcp, port_81_allow()),
                    probe(80, Tcp, R::all().all_ingress("x/a", false)),
                ],
            ),
            step(
                vec![policy("x", "allow-client-a-via-ns-selector-80", json!({
                    "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"namespaceSelector": ns_y}],
                                 "ports": [{"port": 80, "protocol": "TCP"}]}]}))],
                vec![probe(80, Tcp, port_81_allow())],
            ),
        ]),
        case(t, "should support allow-all policy", vec![step(
            vec![policy("x", "allow-all",
                json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}))],
            vec![probe(80, Tcp, R::all()), probe(81, Tcp, R::all())],
        )]),
        case(t, "should allow ingress access on one named port", vec![step(
            vec![policy("x", "allow-all", json!({
                "podSelector": {}, "policyTypes": ["Ingress"],
                "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]}))],
            vec![
                probe(81, Tcp, R::all()),
                probe(80, Tcp, R::all().peer("*/*", "x/*", false)),
            ],
        )]),
        case(t, "should allow ingress access from namespace on one named port", vec![step(
            vec![policy("x", "allow-client-a-via-ns-selector-80", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": ns_y}],
                             "ports": [{"port": "serve-80-tcp", "protocol": "TCP"}]}]}))],
            vec![
                probe(80, Tcp, R::all().peer("x/*", "x/a", false).peer("z/*", "x/a", false)),
                probe(81, Tcp, R::all().all_ingress("x/a", false)),
            ],
        )]),
        case(t, "should allow egress access on one named port", vec![step(
            vec![policy("x", "allow-egress", json!({
                "podSelector": {}, "policyTypes": ["Egress"],
                "egress": [{"ports": [{"port": "serve-80-tcp"}]}]}))],
            vec![
                probe(80, Tcp, R::all()),
                probe(81, Tcp, R::all().peer("x/*", "*/*", false)),
            ],
        )]),
        case(t, "should enforce updated policy", vec![
            step(
                vec![policy("x", "allow-all-mutate-to-deny-all",
                    json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}))],
                vec![probe(81, Tcp, R::all())],
            ),
            step(
                vec![policy("x", "allow-all-mutate-to-deny-all",
                    json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}))],
                vec![probe(81, Tcp, R::all().peer("*/*", "x/*", false))],
            ),
        ]),
        case(t, "should allow ingress access from updated namespace", vec![
            step(
                vec![policy("x", "allow-client-a-via-ns-selector", json!({
                    "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns2": "updated"}}}]}]}))],
                vec![probe(80, Tcp, R::all().all_ingress("x/a", false))],
            ),
            step(
                vec![Action::LabelNamespace { namespace: "y", key: "ns2", value: "updated" }],
                vec![probe(80, Tcp, R::all().all_ingress("x/a", false).peer("y/*", "*/*", true))],
            ),
        ]),
        case(t, "should allow ingress access from updated pod", vec![
            step(
                vec![policy("x", "allow-client-a-via-pod-selector", json!({
                    "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b", "pod2": "updated"}}}]}]}))],
                vec![probe(80, Tcp, R::all().all_ingress("x/a", false))],
            ),
            step(
                // Upstream sets {pod: b, pod2: updated} on x/b; pod: b is already there.
                vec![Action::LabelPod { namespace: "x", pod: "b", key: "pod2", value: "updated" }],
                vec![probe(80, Tcp, R::all().all_ingress("x/a", false).pair("x/b", "x/a", true))],
            ),
        ]),
        case(t, "should deny ingress from pods on other namespaces", vec![step(
            vec![policy("x", "deny-empty-policy", json!({
                "podSelector": {}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {}}]}]}))],
            vec![probe(80, Tcp, R::all().peer("y/*", "x/*", false).peer("z/*", "x/*", false))],
        )]),
        case(t, "should deny ingress access to updated pod", vec![
            step(
                vec![policy("x", "deny-ingress-via-label-selector", json!({
                    "podSelector": {"matchLabels": {"target": "isolated"}}, "policyTypes": ["Ingress"]}))],
                vec![probe(80, Tcp, R::all())],
            ),
            step(
                vec![Action::LabelPod { namespace: "x", pod: "a", key: "target", value: "isolated" }],
                vec![probe(80, Tcp, R::all().all_ingress("x/a", false))],
            ),
        ]),
        case(t, "should deny egress from pods based on PodSelector", vec![step(
            vec![policy("x", "deny-egress-pod-a", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"]}))],
            vec![probe(80, Tcp, R::all().all_egress("x/a", false))],
        )]),
        case(t, "should deny egress from all pods in a namespace", vec![step(
            vec![policy("x", "deny-egress-ns-x", json!({"podSelector": {}, "policyTypes": ["Egress"]}))],
            vec![probe(80, Tcp, R::all().peer("x/*", "*/*", false))],
        )]),
        case(t, "should work with Ingress, Egress specified together", vec![step(
            vec![policy("x", "allow-client-a-via-pod-selector", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress", "Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
                "egress": [{"ports": [{"port": 80}]}]}))],
            vec![
                probe(80, Tcp, R::all().all_ingress("x/a", false).pair("x/b", "x/a", true)),
                probe(81, Tcp, R::all()
                    .all_ingress("x/a", false)
                    .all_egress("x/a", false)
                    .pair("x/b", "x/a", true)),
            ],
        )]),
        case(t, "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)", vec![step(
            vec![
                policy("x", "allow-to-ns-y-pod-a", json!({
                    "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                    "egress": [{"to": [{"namespaceSelector": ns_y,
                                        "podSelector": {"matchLabels": {"pod": "a"}}}]}]})),
                policy("y", "allow-from-xa-on-ya-match-selector", json!({
                    "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}},
                        "podSelector": {"matchLabels": {"pod": "a"}}}]}]})),
                policy("y", "allow-from-xa-on-yb-match-selector", json!({
                    "podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}},
                        "podSelector": {"matchLabels": {"pod": "a"}}}]}]})),
            ],
            vec![probe(80, Tcp, R::all()
                .peer("x/a", "*/*", false)
                .peer("*/*", "y/a", false)
                .peer("x/a", "y/a", true)
                .peer("*/*", "y/b", false))],
        )]),
        case(t, "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector", vec![step(
            vec![policy("x", "allow-to-ns-y-pod-a", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"namespaceSelector": ns_y,
                                    "podSelector": {"matchLabels": {"pod": "a"}}}]}]}))],
            vec![probe(80, Tcp, R::all().all_egress("x/a", false).pair("x/a", "y/a", true))],
        )]),
        case(t, "should enforce ingress policy allowing any port traffic to a server on a specific protocol", vec![step(
            vec![policy("x", "allow-ingress-by-proto", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"ports": [{"protocol": "TCP"}]}]}))],
            vec![
                probe(80, Tcp, R::all()),
                probe(80, Udp, R::all().peer("*/*", "x/a", false)),
            ],
        )]),
        case(t, "should enforce multiple ingress policies with ingress allow-all policy taking precedence", vec![
            step(
                vec![policy("x", "allow-ingress-port-80", json!({
                    "podSelector": {}, "policyTypes": ["Ingress"],
                    "ingress": [{"ports": [{"port": 80}]}]}))],
                vec![probe(81, Tcp, R::all().peer("*/*", "x/*", false))],
            ),
            step(
                vec![policy("x", "allow-ingress",
                    json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}))],
                vec![probe(81, Tcp, R::all())],
            ),
        ]),
        case(t, "should enforce multiple egress policies with egress allow-all policy taking precedence", vec![
            step(
                vec![policy("x", "allow-egress-port-80", json!({
                    "podSelector": {}, "policyTypes": ["Egress"],
                    "egress": [{"ports": [{"port": 80}]}]}))],
                vec![probe(81, Tcp, R::all().peer("x/*", "*/*", false))],
            ),
            step(
                vec![policy("x", "allow-egress",
                    json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}))],
                vec![probe(81, Tcp, R::all())],
            ),
        ]),
        case(t, "should stop enforcing policies after they are deleted", vec![
            step(
                vec![policy("x", "deny-all",
                    json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))],
                vec![probe(80, Tcp, R::all().peer("x/*", "*/*", false).peer("*/*", "x/*", false))],
            ),
            step(vec![Action::DeleteAllPolicies], vec![probe(80, Tcp, R::all())]),
        ]),
        case(t, "should allow egress access to server in CIDR block", vec![step(
            vec![policy("x", "allow-client-a-via-cidr-egress-rule", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": "<y/b>/host"}}]}]}))],
            vec![probe(80, Tcp, R::all().all_egress("x/a", false).pair("x/a", "y/b", true))],
        )]),
        // Upstream takes the /4 around x/a's address: it holds every pod of the cluster.
        case(t, "should enforce except clause while egress access to server in CIDR block", vec![step(
            vec![cidr_except.clone()],
            vec![probe(80, Tcp, R::all().pair("x/a", "x/b", false))],
        )]),
        case(t, "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed", vec![
            step(vec![cidr_except], vec![probe(80, Tcp, R::all().pair("x/a", "x/b", false))]),
            step(
                // Same name: this replaces the policy above (upstream's UpdatePolicy).
                vec![policy("x", "allow-client-a-via-cidr-egress-rule", json!({
                    "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                    "egress": [{"to": [{"ipBlock": {"cidr": "<x/b>/host"}}]}]}))],
                vec![probe(80, Tcp, R::all().all_egress("x/a", false).pair("x/a", "x/b", true))],
            ),
        ]),
        case(t, "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector", vec![
            step(
                vec![policy("x", "allow-egress-for-target", json!({
                    "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                    "egress": [{}]}))],
                vec![probe(80, Tcp, R::all())],
            ),
            step(
                vec![policy("x", "deny-ingress-via-label-selector", json!({
                    "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]}))],
                vec![probe(80, Tcp, R::all().all_ingress("x/a", false))],
            ),
        ]),
        case(t, "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP", vec![step(
            vec![
                policy("x", "deny-ingress", json!({"podSelector": {}, "policyTypes": ["Ingress"]})),
                policy("x", "allow-only-sctp-ingress-on-port-81", json!({
                    "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                    "ingress": [{"ports": [{"port": 81, "protocol": "SCTP"}]}]})),
            ],
            vec![probe(81, Tcp, R::all().peer("*/*", "x/*", false))],
        )]),
        case(t, "should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP", vec![step(
            vec![policy("x", "allow-only-sctp-ingress-on-port-80", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}))],
            vec![probe(81, Tcp, R::all().all_ingress("x/a", false))],
        )]),
        case(t, "should not allow access by TCP when a policy specifies only UDP", vec![step(
            vec![policy("x", "allow-only-udp-ingress-on-port-81", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"ports": [{"port": 81, "protocol": "UDP"}]}]}))],
            vec![probe(81, Tcp, R::all().all_ingress("x/a", false))],
        )]),
        case(t, "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label", vec![step(
            vec![policy("x", "allow-client-a-via-ns-selector-for-immutable-ns-label", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": ns_y}]}]}))],
            vec![probe(80, Tcp, R::all().peer("x/*", "x/a", false).peer("z/*", "x/a", false))],
        )]),
        case(t, "should enforce policy based on NamespaceSelector with MatchExpressions using default ns label", vec![step(
            vec![policy("x", "allow-ns-y-match-selector-for-immutable-ns-label", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"namespaceSelector": {"matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["y"]}]}}]}]}))],
            vec![probe(80, Tcp, R::all().peer("x/a", "y/*", false))],
        )]),
    ]
}

/// The UDP and SCTP suites repeat three TCP cases on their protocol.
fn other_protocol_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (suite, protocol) in [(Suite::Udp, Udp), (Suite::Sctp, Sctp)] {
        let name = protocol.as_str();
        cases.push(case(
            suite,
            "should support a 'default-deny-ingress' policy",
            vec![step(
                vec![policy(
                    "x",
                    "deny-all",
                    json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
                )],
                vec![probe(80, protocol, R::all().peer("*/*", "x/*", false))],
            )],
        ));
        cases.push(case(suite, "should enforce policy based on Ports", vec![step(
            vec![policy("x", "allow-ingress-on-port-81-ns-x", json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}],
                             "ports": [{"port": 81, "protocol": name}]}]}))],
            vec![probe(81, protocol, R::all().peer("x/*", "x/a", false).peer("z/*", "x/a", false))],
        )]));
        cases.push(pod_in_other_namespace(suite, 80, protocol));
    }
    cases
}

/// In all three suites, on port 80 of the suite's protocol.
fn pod_in_other_namespace(suite: Suite, port: u16, protocol: super::super::model::Protocol) -> Case {
    case(suite, "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector", vec![step(
        vec![policy("x", "allow-ns-y-pod-a-via-namespace-pod-selector", json!({
            "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}},
                "podSelector": {"matchLabels": {"pod": "a"}}}]}]}))],
        vec![probe(port, protocol, R::all().all_ingress("x/a", false).pair("y/a", "x/a", true))],
    )])
}

/// From the pre-v1.25 file; see the module docs.
fn older_cases() -> Vec<Case> {
    let range = Suite::PortRange;
    let ingress_probes = || {
        let mut probes: Vec<_> = (111..=115)
            .map(|port| probe(port, Tcp, R::all().all_ingress("x/a", true)))
            .collect();
        probes.push(probe(116, Tcp, R::all().all_ingress("x/a", false)));
        probes
    };
    let egress_probes = || {
        let mut probes: Vec<_> = (111..=115)
            .map(|port| probe(port, Tcp, R::all().all_egress("x/a", true)))
            .collect();
        probes.push(probe(116, Tcp, R::all().all_egress("x/a", false)));
        probes
    };
    vec![
        case(
            Suite::Tcp,
            "should not allow access by TCP when a policy specifies only SCTP",
            vec![step(
                vec![policy(
                    "x",
                    "allow-only-sctp-ingress-on-port-81",
                    json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"ports": [{"port": 81, "protocol": "SCTP"}]}]}),
                )],
                vec![probe(81, Tcp, R::all().all_ingress("x/a", false))],
            )],
        ),
        case(
            range,
            "should enforce policy to allow ingress traffic using port range",
            vec![step(
                vec![policy(
                    "x",
                    "allow-ingress-use-port-range",
                    json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"ports": [{"port": 111, "endPort": 115}]}]}),
                )],
                ingress_probes(),
            )],
        ),
        case(
            range,
            "should enforce policy to allow egress traffic using port range",
            vec![step(
                vec![policy(
                    "x",
                    "allow-egress-use-port-range",
                    json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                "egress": [{"ports": [{"port": 111, "endPort": 115}]}]}),
                )],
                egress_probes(),
            )],
        ),
    ]
}
