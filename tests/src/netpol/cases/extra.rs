//! Ferry's own cases, for what upstream's cases leave unprobed: an `endPort` range with a
//! protocol and a range that ends inside the served ports, two policies of one name in
//! two namespaces, `ipBlock` on ingress (upstream's are all egress), `Exists` and
//! `DoesNotExist`, the `policyTypes` defaults (upstream always writes them), and named
//! ports of UDP and SCTP. The expectations are written by hand in upstream's statements,
//! from the API reference, and checked against the oracle like upstream's.

use serde_json::json;

use super::super::model::Protocol::{Sctp, Tcp, Udp};
use super::super::reachability::Reachability as R;
use super::{case, policy, probe, step, Action, Case, Suite};

pub fn cases() -> Vec<Case> {
    let f = Suite::Ferry;
    let ns_y = json!({"matchLabels": {"kubernetes.io/metadata.name": "y"}});
    let only_y = || R::all().peer("x/*", "x/a", false).peer("z/*", "x/a", false);
    vec![
        case(
            f,
            "should allow every port of an endPort range and no other",
            vec![
                step(
                    vec![policy(
                        "x",
                        "allow-80-81-from-y",
                        json!({
                    "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"namespaceSelector": ns_y}],
                                 "ports": [{"protocol": "TCP", "port": 80, "endPort": 81}]}]}),
                    )],
                    vec![
                        probe(80, Tcp, only_y()),
                        probe(81, Tcp, only_y()),
                        probe(80, Udp, R::all().all_ingress("x/a", false)),
                    ],
                ),
                step(
                    vec![policy(
                        "x",
                        "allow-80-81-from-y",
                        json!({
                    "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"namespaceSelector": ns_y}],
                                 "ports": [{"protocol": "TCP", "port": 79, "endPort": 80}]}]}),
                    )],
                    vec![
                        probe(80, Tcp, only_y()),
                        probe(81, Tcp, R::all().all_ingress("x/a", false)),
                    ],
                ),
            ],
        ),
        case(
            f,
            "should allow egress on an endPort range",
            vec![step(
                vec![policy(
                    "x",
                    "egress-81-82",
                    json!({
                "podSelector": {}, "policyTypes": ["Egress"],
                "egress": [{"ports": [{"port": 81, "endPort": 82}]}]}),
                )],
                vec![
                    probe(81, Tcp, R::all()),
                    probe(80, Tcp, R::all().peer("x/*", "*/*", false)),
                ],
            )],
        ),
        case(
            f,
            "should keep policies of the same name in two namespaces apart",
            vec![
                step(
                    vec![
                        policy(
                            "x",
                            "same-name",
                            json!({
                        "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                        "ingress": [{"from": [{"namespaceSelector": ns_y}]}]}),
                        ),
                        policy(
                            "y",
                            "same-name",
                            json!({
                        "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]}),
                        ),
                    ],
                    vec![probe(80, Tcp, only_y().all_ingress("y/a", false))],
                ),
                step(
                    vec![policy(
                        "y",
                        "same-name",
                        json!({
                    "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                    "ingress": [{}]}),
                    )],
                    vec![probe(80, Tcp, only_y())],
                ),
                step(vec![Action::DeleteAllPolicies], vec![probe(80, Tcp, R::all())]),
            ],
        ),
        case(
            f,
            "should match pod sources with an ingress ipBlock and its except",
            vec![step(
                vec![policy(
                    "x",
                    "from-cidr-but-y-b",
                    json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"ipBlock": {"cidr": "<x/a>/4", "except": ["<y/b>/host"]}}]}]}),
                )],
                vec![probe(80, Tcp, R::all().pair("y/b", "x/a", false))],
            )],
        ),
        case(
            f,
            "should allow ingress from one pod's host route only",
            vec![step(
                vec![policy(
                    "x",
                    "from-z-c",
                    json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"ipBlock": {"cidr": "<z/c>/host"}}]}]}),
                )],
                vec![probe(
                    80,
                    Tcp,
                    R::all().all_ingress("x/a", false).pair("z/c", "x/a", true),
                )],
            )],
        ),
        case(
            f,
            "should follow Exists and DoesNotExist as pods are relabelled",
            vec![
                step(
                    vec![policy(
                        "x",
                        "isolate-targets",
                        json!({
                    "podSelector": {"matchExpressions": [{"key": "target", "operator": "Exists"}]},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                        {"key": "pod2", "operator": "DoesNotExist"}]}}]}]}),
                    )],
                    vec![probe(80, Tcp, R::all())],
                ),
                step(
                    vec![Action::LabelPod {
                        namespace: "x",
                        pod: "a",
                        key: "target",
                        value: "yes",
                    }],
                    vec![probe(
                        80,
                        Tcp,
                        R::all().all_ingress("x/a", false).peer("x/*", "x/a", true),
                    )],
                ),
                step(
                    vec![Action::LabelPod {
                        namespace: "x",
                        pod: "b",
                        key: "pod2",
                        value: "yes",
                    }],
                    vec![probe(
                        80,
                        Tcp,
                        R::all()
                            .all_ingress("x/a", false)
                            .peer("x/*", "x/a", true)
                            .pair("x/b", "x/a", false),
                    )],
                ),
            ],
        ),
        // No policyTypes: ingress always, egress because there is an egress rule.
        case(
            f,
            "should default policyTypes to Ingress and Egress when egress rules are present",
            vec![step(
                vec![policy(
                    "x",
                    "defaults-with-egress",
                    json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
                )],
                vec![probe(
                    80,
                    Tcp,
                    R::all()
                        .all_ingress("x/a", false)
                        .all_egress("x/a", false)
                        .pair("x/a", "x/b", true),
                )],
            )],
        ),
        // No policyTypes and an empty egress list: ingress only.
        case(
            f,
            "should default policyTypes to Ingress alone when there is no egress rule",
            vec![step(
                vec![policy(
                    "x",
                    "defaults-without-egress",
                    json!({
                "podSelector": {"matchLabels": {"pod": "b"}}, "egress": []}),
                )],
                vec![probe(80, Tcp, R::all().all_ingress("x/b", false))],
            )],
        ),
        case(
            f,
            "should allow egress on one named UDP port",
            vec![step(
                vec![policy(
                    "x",
                    "egress-serve-81-udp",
                    json!({
                "podSelector": {}, "policyTypes": ["Egress"],
                "egress": [{"ports": [{"protocol": "UDP", "port": "serve-81-udp"}]}]}),
                )],
                vec![
                    probe(81, Udp, R::all()),
                    probe(81, Tcp, R::all().peer("x/*", "*/*", false)),
                    probe(80, Udp, R::all().peer("x/*", "*/*", false)),
                ],
            )],
        ),
        case(
            f,
            "should allow ingress on one named SCTP port",
            vec![step(
                vec![policy(
                    "x",
                    "ingress-serve-80-sctp",
                    json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"ports": [{"protocol": "SCTP", "port": "serve-80-sctp"}]}]}),
                )],
                vec![
                    probe(80, Sctp, R::all()),
                    probe(80, Tcp, R::all().all_ingress("x/a", false)),
                    probe(81, Sctp, R::all().all_ingress("x/a", false)),
                ],
            )],
        ),
    ]
}
