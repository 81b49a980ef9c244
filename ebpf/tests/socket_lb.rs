//! The socket-level Service data plane on real sockets: a probe process inside a test
//! cgroup connects to a Service address in a node netns and reaches one of two servers
//! behind it. Needs root (FERRY_REQUIRE_ROOT=1 makes a missing root fail, not skip).

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::{refused, unreachable, Bench};
use ferry_ebpf::{ferry_programs_attached, EbpfDataplane, Frontend, Protocol, ServiceBackends, PROGRAMS};

#[test]
fn tcp_connect_reaches_an_endpoint_and_getpeername_shows_the_service() {
    ferry_tests::require_root!();
    let bench = Bench::new("ebpf-tcp");
    let mut dp = bench.load();
    dp.upsert_service(bench.frontend(80, Protocol::Tcp), &bench.backends())
        .unwrap();
    let vip = SocketAddr::new(bench.vip, 80);

    let mut reached = BTreeSet::new();
    for _ in 0..20 {
        let p = bench.probe(true, &["tcp", &vip.to_string()]);
        assert_eq!(p.value("peer"), Some(vip.to_string()), "{}", p.stdout);
        let said = p.servers_said();
        assert_eq!(said.len(), 1, "{}", p.stdout);
        assert!(bench.endpoints.contains(&said[0]), "{}", p.stdout);
        reached.insert(said[0]);
    }
    assert_eq!(reached.len(), 2, "20 connects all went to {reached:?}");

    // An IPv6 socket reaching the IPv4 Service v4-mapped is balanced the same way.
    let mapped = format!("[::ffff:{}]:80", bench.vip);
    let p = bench.probe(true, &["tcp", &mapped]);
    assert_eq!(p.value("peer"), Some(mapped), "{}", p.stdout);
    assert!(bench.endpoints.contains(&p.servers_said()[0]), "{}", p.stdout);
}

#[test]
fn udp_replies_come_from_the_service_address_and_stick_to_one_endpoint() {
    ferry_tests::require_root!();
    let bench = Bench::new("ebpf-udp");
    let mut dp = bench.load();
    dp.upsert_service(bench.frontend(53, Protocol::Udp), &bench.backends())
        .unwrap();
    let vip = SocketAddr::new(bench.vip, 53);

    let mut reached = BTreeSet::new();
    for _ in 0..10 {
        // Five datagrams on one unconnected socket (sendto/recvfrom).
        let p = bench.probe(true, &["udp", &vip.to_string(), "5"]);
        let from = p.values("from");
        assert_eq!(from, vec![vip.to_string(); 5], "{}", p.stdout);
        let said: BTreeSet<_> = p.servers_said().into_iter().collect();
        assert_eq!(
            said.len(),
            1,
            "one socket's datagrams went to several endpoints: {}",
            p.stdout
        );
        assert!(bench.endpoints.contains(said.first().unwrap()));
        reached.extend(said);
    }
    assert_eq!(reached.len(), 2, "10 sockets all went to {reached:?}");
}

#[test]
fn ipv6_services_translate_connect_getpeername_sendto_and_replies() {
    ferry_tests::require_root!();
    let bench = Bench::new("ebpf-v6");
    let mut dp = bench.load();
    let v6 = |port, protocol| Frontend::inside(bench.vip6, port, protocol);
    let backends = ServiceBackends {
        endpoints: bench.endpoints6.clone(),
        affinity_seconds: None,
        keep_source: false,
        source_ranges: Vec::new(),
    };
    dp.upsert_service(v6(80, Protocol::Tcp), &backends).unwrap();
    dp.upsert_service(v6(53, Protocol::Udp), &backends).unwrap();
    let (tcp, udp) = (SocketAddr::new(bench.vip6, 80), SocketAddr::new(bench.vip6, 53));

    let p = bench.probe(true, &["tcp", &tcp.to_string()]);
    assert_eq!(p.value("peer"), Some(tcp.to_string()), "{}", p.stdout);
    assert!(bench.endpoints6.contains(&p.servers_said()[0]), "{}", p.stdout);
    let p = bench.probe(true, &["udp", &udp.to_string(), "3"]);
    assert_eq!(p.values("from"), vec![udp.to_string(); 3], "{}", p.stdout);
    assert!(bench.endpoints6.contains(&p.servers_said()[0]), "{}", p.stdout);

    dp.upsert_service(v6(80, Protocol::Tcp), &ServiceBackends::default())
        .unwrap();
    assert_eq!(bench.probe(true, &["tcp", &tcp.to_string()]).errno(), refused());
}

#[test]
fn a_service_without_endpoints_refuses_and_a_removed_one_is_left_alone() {
    ferry_tests::require_root!();
    let bench = Bench::new("ebpf-refuse");
    let mut dp = bench.load();
    let empty = ServiceBackends::default();
    let tcp = bench.frontend(80, Protocol::Tcp);
    let udp = bench.frontend(53, Protocol::Udp);
    dp.upsert_service(tcp, &empty).unwrap();
    dp.upsert_service(udp, &empty).unwrap();

    let tcp_vip = format!("{}:80", bench.vip);
    let udp_vip = format!("{}:53", bench.vip);
    assert_eq!(bench.probe(true, &["tcp", &tcp_vip]).errno(), refused());
    assert_eq!(bench.probe(true, &["udp", &udp_vip]).errno(), refused());

    // Removed, the address is nothing special: the node has no route to it.
    assert!(dp.remove_service(&tcp).unwrap());
    assert!(dp.remove_service(&udp).unwrap());
    assert!(!dp.remove_service(&udp).unwrap());
    assert_eq!(bench.probe(true, &["tcp", &tcp_vip]).errno(), unreachable());
}

#[test]
fn a_process_outside_the_cgroup_is_not_translated() {
    ferry_tests::require_root!();
    let bench = Bench::new("ebpf-outside");
    let mut dp = bench.load();
    dp.upsert_service(bench.frontend(80, Protocol::Tcp), &bench.backends())
        .unwrap();
    let vip = format!("{}:80", bench.vip);
    // Same netns, same moment: only cgroup membership differs.
    assert_eq!(bench.probe(false, &["tcp", &vip]).errno(), unreachable());
    assert_eq!(bench.probe(true, &["tcp", &vip]).value("peer"), Some(vip));
}

#[test]
fn session_affinity_keeps_a_client_on_one_endpoint() {
    ferry_tests::require_root!();
    let bench = Bench::new("ebpf-affinity");
    let mut dp = bench.load();
    let backends = ServiceBackends {
        affinity_seconds: Some(60),
        keep_source: false,
        ..bench.backends()
    };
    dp.upsert_service(bench.frontend(80, Protocol::Tcp), &backends)
        .unwrap();
    let vip = format!("{}:80", bench.vip);
    let reached: BTreeSet<_> = (0..10)
        .flat_map(|_| bench.probe(true, &["tcp", &vip]).servers_said())
        .collect();
    assert_eq!(reached.len(), 1, "with affinity, one client reached {reached:?}");
    assert_eq!(dp.dump().unwrap().affinity_entries, 1);

    // The chosen endpoint leaves the Service: the client moves to the other one at once.
    let gone = *reached.first().unwrap();
    let left = ServiceBackends {
        endpoints: bench.endpoints.iter().copied().filter(|e| *e != gone).collect(),
        affinity_seconds: Some(60),
        keep_source: false,
        source_ranges: Vec::new(),
    };
    dp.upsert_service(bench.frontend(80, Protocol::Tcp), &left)
        .unwrap();
    assert_eq!(bench.probe(true, &["tcp", &vip]).servers_said(), left.endpoints);
}

#[test]
fn an_update_is_a_handful_of_map_writes_and_takes_effect_at_once() {
    ferry_tests::require_root!();
    let bench = Bench::new("ebpf-update");
    let mut dp = bench.load();
    let fe = bench.frontend(80, Protocol::Tcp);
    let vip = format!("{}:80", bench.vip);
    let (a, b) = (bench.endpoints[0], bench.endpoints[1]);
    let only = |ep: SocketAddr| ServiceBackends {
        endpoints: vec![ep],
        affinity_seconds: None,
        keep_source: false,
        source_ranges: Vec::new(),
    };

    // New frontend: one slot and the entry.
    assert_eq!(dp.upsert_service(fe, &only(a)).unwrap(), 2);
    assert_eq!(bench.probe(true, &["tcp", &vip]).servers_said(), vec![a]);
    // Same again: nothing to write.
    assert_eq!(dp.upsert_service(fe, &only(a)).unwrap(), 0);
    // Endpoint replaced: one slot, the count is unchanged.
    assert_eq!(dp.upsert_service(fe, &only(b)).unwrap(), 1);
    assert_eq!(bench.probe(true, &["tcp", &vip]).servers_said(), vec![b]);
    // One more endpoint: its slot and the count. One fewer: the last endpoint moves into
    // the leaver's slot, the count drops, the last slot goes.
    assert_eq!(dp.upsert_service(fe, &bench.backends()).unwrap(), 2);
    assert_eq!(dp.upsert_service(fe, &only(a)).unwrap(), 3);
    assert_eq!(bench.probe(true, &["tcp", &vip]).servers_said(), vec![a]);

    // However many endpoints, one changed is one write.
    let big = bench.frontend(81, Protocol::Tcp);
    let mut many = ServiceBackends {
        endpoints: (1..=500).map(|p| SocketAddr::from(([10, 1, 0, 1], p))).collect(),
        affinity_seconds: None,
        keep_source: false,
        source_ranges: Vec::new(),
    };
    assert_eq!(dp.upsert_service(big, &many).unwrap(), 501);
    many.endpoints[250] = SocketAddr::from(([10, 1, 0, 2], 1));
    assert_eq!(dp.upsert_service(big, &many).unwrap(), 1);
    many.endpoints.remove(10);
    assert_eq!(dp.upsert_service(big, &many).unwrap(), 3);
    assert!(dp.remove_service(&big).unwrap());

    let dump = dp.dump().unwrap();
    assert_eq!(dump.services.len(), 1);
    assert_eq!(dump.services[0].frontend, fe);
    assert_eq!(dump.services[0].backends, only(a));
    // A UDP socket connected to the Service, then straight to the endpoint the Service
    // gave it: its peer is the Service, then the endpoint (the second connect must not
    // read as the first one's frontend).
    let udp = bench.frontend(80, Protocol::Udp);
    assert_eq!(dp.upsert_service(udp, &only(a)).unwrap(), 2);
    let p = bench.probe(true, &["udp-reconnect", &vip, &a.to_string()]);
    assert_eq!(p.values("peer"), vec![vip.clone(), a.to_string()], "{}", p.stdout);
    assert!(dp.remove_service(&udp).unwrap());

    // The TCP probes' sockets kept their frontend in their own storage (ferry_sock_peer,
    // which getpeername reads: the tests above), not in the LRU map of unconnected UDP.
    assert_eq!(dump.revnat_entries, 0, "{dump:?}");
}

#[test]
fn maps_and_programs_survive_a_restart_and_cleanup_leaves_nothing() {
    ferry_tests::require_root!();
    let bench = Bench::new("ebpf-restart");
    let fe = bench.frontend(80, Protocol::Tcp);
    let vip = format!("{}:80", bench.vip);
    let cgroup = bench.cgroup.path();
    {
        let mut dp = bench.load();
        dp.upsert_service(fe, &bench.backends()).unwrap();
        assert_eq!(ferry_programs_attached(cgroup).unwrap().len(), PROGRAMS.len());
    }
    // The daemon is gone: pinned links keep the programs attached and the maps alive.
    assert_eq!(bench.probe(true, &["tcp", &vip]).value("peer"), Some(vip.clone()));

    // A new daemon finds the Service in the pinned maps, without reprogramming it, and
    // replaces the links rather than adding to them.
    let dp = bench.load();
    let dump = dp.dump().unwrap();
    assert_eq!(dump.services.len(), 1, "{dump:?}");
    assert_eq!(dump.services[0].backends, bench.backends());
    assert_eq!(ferry_programs_attached(cgroup).unwrap().len(), PROGRAMS.len());
    assert_eq!(bench.probe(true, &["tcp", &vip]).value("peer"), Some(vip.clone()));
    drop(dp);

    let report = EbpfDataplane::cleanup(&bench.pins.pin_dir, cgroup).unwrap();
    assert_eq!(report.links_detached, PROGRAMS.len());
    assert!(
        !bench.pins.pin_dir.exists(),
        "pins left in {}",
        bench.pins.pin_dir.display()
    );
    assert_eq!(ferry_programs_attached(cgroup).unwrap(), Vec::<String>::new());
    assert_eq!(bench.probe(true, &["tcp", &vip]).errno(), unreachable());
    // A second cleanup has nothing to do and does not fail.
    assert_eq!(
        EbpfDataplane::cleanup(&bench.pins.pin_dir, cgroup).unwrap(),
        Default::default()
    );
}

#[test]
fn bad_input_is_refused_with_what_to_fix() {
    ferry_tests::require_root!();
    let bench = Bench::new("ebpf-bad");
    let mut dp = bench.load();
    let fe = bench.frontend(80, Protocol::Tcp);
    let v6 = ServiceBackends {
        endpoints: vec!["[fd00::1]:80".parse().unwrap()],
        affinity_seconds: None,
        keep_source: false,
        source_ranges: Vec::new(),
    };
    let err = dp.upsert_service(fe, &v6).unwrap_err().to_string();
    assert!(err.contains("address family"), "{err}");
    let err = dp
        .upsert_service(bench.frontend(0, Protocol::Tcp), &bench.backends())
        .unwrap_err()
        .to_string();
    assert!(err.contains("port 0"), "{err}");
    // Nothing was programmed by the refused calls.
    assert!(dp.dump().unwrap().services.is_empty());

    let err = EbpfDataplane::load(&bench.pins.pin_dir, std::path::Path::new("/tmp"))
        .err()
        .expect("/tmp is no cgroup")
        .to_string();
    assert!(err.contains("not a cgroup v2 directory"), "{err}");
    let err = EbpfDataplane::load(std::path::Path::new("/tmp/ferry-not-bpffs"), bench.cgroup.path())
        .err()
        .expect("/tmp is no bpffs")
        .to_string();
    assert!(err.contains("not on a bpf file system"), "{err}");
}
