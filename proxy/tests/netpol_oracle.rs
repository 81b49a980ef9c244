//! The policy plan, through `trace`, against the testbed's independent oracle: for every
//! case (upstream's and Ferry's), every step, both families, every probed port and
//! protocol, each of the 9x9 pairs, to the Pod's address and through its Service's
//! ClusterIP. No root: the store is built from the case's objects, nothing is programmed.
//! The end-to-end test then holds the kernel to the same verdicts.

use std::net::IpAddr;

use ferry_proxy::plan::NodeSettings;
use ferry_proxy::source::{Event, Kind, Object};
use ferry_proxy::store::Store;
use ferry_proxy::trace;
use ferry_tests::netpol::cluster::{service_name, service_port_name};
use ferry_tests::netpol::{self, Family, PodAddresses, Protocol};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{json, Value};

const NODE: &str = "node-a";

/// Dual-stack addresses for the nine Pods, and their Services' ClusterIPs.
fn addresses() -> PodAddresses {
    let mut addresses = PodAddresses::new();
    for (i, pod) in netpol::pod_keys().iter().enumerate() {
        let ips: [IpAddr; 2] = [
            format!("10.244.0.{}", 10 + i).parse().unwrap(),
            format!("fd00:244::{:x}", 10 + i).parse().unwrap(),
        ];
        addresses.set(pod, &ips).unwrap();
    }
    addresses
}

fn cluster_ip(index: usize, family: Family) -> IpAddr {
    match family {
        Family::V4 => format!("10.96.0.{}", 10 + index).parse().unwrap(),
        Family::V6 => format!("fd00:96::{:x}", 10 + index).parse().unwrap(),
    }
}

fn protocol_name(protocol: Protocol) -> &'static str {
    protocol.as_str()
}

/// The store a node would build from the cluster of one step.
fn store_for(state: &netpol::State, ports: &[u16]) -> Store {
    let mut objects: Vec<Object> = Vec::new();
    for namespace in &state.cluster.namespaces {
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": namespace.name, "labels": namespace.labels}}))
                .unwrap();
        objects.push(ns.into());
    }
    for (index, pod) in state.cluster.pods.iter().enumerate() {
        let container_ports: Vec<Value> = pod
            .ports
            .iter()
            .map(|p| json!({"name": p.name, "containerPort": p.port, "protocol": protocol_name(p.protocol)}))
            .collect();
        let object: Pod = serde_json::from_value(json!({
            "metadata": {"namespace": pod.namespace, "name": pod.name, "labels": pod.labels},
            "spec": {"nodeName": NODE, "containers": [{"name": "server", "ports": container_ports}]},
            "status": {"phase": "Running", "podIPs": pod.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>()}
        }))
        .unwrap();
        objects.push(object.into());

        // Its Service: every served port on every protocol, dual stack.
        let key = pod.key();
        let mut service_ports = Vec::new();
        let mut slice_ports = Vec::new();
        for &port in ports {
            for protocol in Protocol::ALL {
                let name = service_port_name(port, protocol);
                service_ports.push(json!({"name": name, "port": port, "targetPort": port, "protocol": protocol_name(protocol)}));
                slice_ports.push(json!({"name": name, "port": port, "protocol": protocol_name(protocol)}));
            }
        }
        let service: Service = serde_json::from_value(json!({
            "metadata": {"namespace": pod.namespace, "name": service_name(&key)},
            "spec": {"clusterIP": cluster_ip(index, Family::V4).to_string(),
                     "clusterIPs": [cluster_ip(index, Family::V4).to_string(), cluster_ip(index, Family::V6).to_string()],
                     "ipFamilies": ["IPv4", "IPv6"], "ports": service_ports}
        }))
        .unwrap();
        objects.push(service.into());
        for (family, address_type) in [(Family::V4, "IPv4"), (Family::V6, "IPv6")] {
            let slice: EndpointSlice = serde_json::from_value(json!({
                "metadata": {"namespace": pod.namespace, "name": format!("{}-{address_type}", service_name(&key)),
                             "labels": {"kubernetes.io/service-name": service_name(&key)}},
                "addressType": address_type,
                "ports": slice_ports,
                "endpoints": [{"addresses": [pod.ip(family).unwrap().to_string()], "nodeName": NODE}]
            }))
            .unwrap();
            objects.push(slice.into());
        }
    }
    for policy in &state.policies {
        let policy: NetworkPolicy = serde_json::from_value(policy.clone()).unwrap();
        let info = ferry_proxy::store::policy::NetworkPolicyInfo::try_from(policy)
            .unwrap_or_else(|e| panic!("the case's policy is refused: {e}"));
        objects.push(Object::NetworkPolicy(info.into()));
    }
    let mut store = Store::new();
    store.apply(Event::Snapshot {
        kinds: Kind::ALL.to_vec(),
        objects,
    });
    store
}

#[test]
fn trace_agrees_with_the_oracle_on_every_case_step_probe_and_pair() {
    let addresses = addresses();
    let settings = NodeSettings {
        node_name: NODE.into(),
        ..NodeSettings::default()
    };
    let keys = netpol::pod_keys();
    let cases = netpol::all_cases();
    let mut failures = Vec::new();
    let mut judged = 0usize;
    for case in &cases {
        for family in [Family::V4, Family::V6] {
            let scenario = case.instantiate(&addresses, family).unwrap();
            for (step_index, step) in scenario.steps.iter().enumerate() {
                let store = store_for(&step.state, case.ports);
                for probe in &step.probes {
                    let proto = probe.protocol.as_str().to_lowercase();
                    let expected = step.state.truth_table(probe.port, probe.protocol);
                    for (through, to_address) in [
                        (
                            "Pod address",
                            &(|to: &str| addresses.get(to, family).unwrap()) as &dyn Fn(&str) -> IpAddr,
                        ),
                        ("ClusterIP", &|to: &str| {
                            cluster_ip(keys.iter().position(|k| k == to).unwrap(), family)
                        }),
                    ] {
                        let mut explanations = Vec::new();
                        let observed = netpol::TruthTable::from_fn(|from, to| {
                            let target = match to_address(to) {
                                IpAddr::V4(ip) => format!("{ip}:{}/{proto}", probe.port),
                                IpAddr::V6(ip) => format!("[{ip}]:{}/{proto}", probe.port),
                            };
                            let trace = trace::trace(&store, &settings, from, &target).unwrap();
                            assert_eq!(trace.paths.len(), 1, "{}", trace.to_text());
                            judged += 1;
                            explanations.push(trace.to_text());
                            trace.allowed()
                        });
                        let wrong = expected.mismatches(&observed, true);
                        if !wrong.is_empty() {
                            failures.push(format!(
                                "{} [{family:?}] step {step_index}, {}/{proto} through the {through}: {} pair(s) differ {wrong:?}\n{}\nexpected (oracle) vs trace:\n{}",
                                scenario.name,
                                probe.port,
                                wrong.len(),
                                serde_json::to_string(&step.state.policies).unwrap(),
                                expected.report(&observed),
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(cases.len() >= 61, "{} cases", cases.len());
    assert!(
        failures.is_empty(),
        "{} of the probes differ:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    eprintln!("{judged} verdicts of trace agree with the oracle");
}
