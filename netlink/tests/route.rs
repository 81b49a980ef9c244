//! rtnetlink over `Socket<Route>`, and `Netns::run`, in namespaces each test makes.

use std::io::Write;
use std::ops::ControlFlow;
use std::process::Command;

use ferry_netlink::route::Route;
use ferry_netlink::{Error, Frame, Netns, Socket};
use ferry_tests::{require_root, unique_v4_subnet};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;

/// A test namespace, opened for `Netns::run`.
fn testbed(tag: &str) -> (ferry_tests::Netns, Netns) {
    let ns = ferry_tests::Netns::new(tag);
    let opened = Netns::open(ns.path()).expect("open the test's netns");
    (ns, opened)
}

fn link_names(messages: Vec<RouteNetlinkMessage>) -> Vec<String> {
    messages
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            }),
            _ => None,
        })
        .collect()
}

#[test]
fn a_link_dump_sees_the_links_made_in_that_namespace_only() {
    require_root!();
    let (ns, netns) = testbed("nl-dump");
    ns.exec_ok(&[
        "ip", "link", "add", "fyleft", "type", "veth", "peer", "name", "fyright",
    ]);
    let other = ferry_tests::Netns::new("nl-other");

    let dump_links = |netns: &Netns| {
        let mut names = link_names(
            netns
                .run(|| Socket::<Route>::open()?.dump(RouteNetlinkMessage::GetLink(LinkMessage::default())))
                .unwrap()
                .unwrap(),
        );
        names.sort();
        names
    };
    assert_eq!(dump_links(&netns), ["fyleft", "fyright", "lo"]);
    assert_eq!(
        dump_links(&Netns::open(other.path()).unwrap()),
        ["lo"],
        "the socket follows the thread's netns"
    );
}

#[test]
fn a_dump_spanning_many_datagrams_is_read_to_its_end() {
    require_root!();
    let (ns, netns) = testbed("nl-many");
    // 1,500 addresses (~100 KiB of answers): the kernel splits the dump over several
    // datagrams of at most 32 KiB.
    let subnet = unique_v4_subnet(20);
    let base: std::net::Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
    let mut batch = tempfile::NamedTempFile::new().unwrap();
    for i in 1..=1500u32 {
        writeln!(
            batch,
            "address add {}/32 dev lo",
            std::net::Ipv4Addr::from(u32::from(base) + i)
        )
        .unwrap();
    }
    batch.flush().unwrap();
    let out = Command::new("ip")
        .args(["-n", ns.name(), "-batch"])
        .arg(batch.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let addresses = netns
        .run(|| Socket::<Route>::open()?.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default())))
        .unwrap()
        .unwrap();
    let mut v4 = addresses
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Local(std::net::IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            }),
            _ => None,
        })
        .collect::<Vec<_>>();
    v4.sort();
    v4.dedup();
    // 127.0.0.1 and ours, the first and the last among them.
    assert_eq!(v4.len(), 1501, "{} addresses came back", v4.len());
    for n in [1, 1500] {
        let ip = std::net::Ipv4Addr::from(u32::from(base) + n);
        assert!(v4.binary_search(&ip).is_ok(), "{ip} missing");
    }
}

#[test]
fn a_refused_request_names_itself_and_carries_the_kernels_reason() {
    require_root!();
    let (_ns, netns) = testbed("nl-refused");
    let (exists, missing, unknown_kind, after) = netns
        .run(|| {
            let mut s = Socket::<Route>::open().unwrap();
            // "lo" is there: EEXIST with NLM_F_EXCL.
            let mut lo = LinkMessage::default();
            lo.attributes.push(LinkAttribute::IfName("lo".into()));
            lo.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]));
            let exists = s
                .request(RouteNetlinkMessage::NewLink(lo), NLM_F_CREATE | NLM_F_EXCL)
                .unwrap_err();
            // A GET of a name nobody has.
            let mut get = LinkMessage::default();
            get.attributes.push(LinkAttribute::IfName("fynothere".into()));
            let missing = s.get(RouteNetlinkMessage::GetLink(get)).unwrap_err();
            // A link kind the kernel does not know: it says so in its extended ack.
            let mut odd = LinkMessage::default();
            odd.attributes.push(LinkAttribute::IfName("fyodd".into()));
            odd.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Other(
                    "fynosuchkind".into(),
                ))]));
            let unknown_kind = s
                .request(RouteNetlinkMessage::NewLink(odd), NLM_F_CREATE | NLM_F_EXCL)
                .unwrap_err();
            // The socket is still in step after three errors.
            let after = s
                .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
                .map(link_names);
            (exists, missing, unknown_kind, after)
        })
        .unwrap();

    assert_eq!(exists.errno(), Some(libc::EEXIST));
    assert_eq!(exists.request(), Some("rtnetlink RTM_NEWLINK lo"));
    assert!(
        exists
            .to_string()
            .starts_with("rtnetlink RTM_NEWLINK lo: File exists"),
        "{exists}"
    );

    assert_eq!(missing.errno(), Some(libc::ENODEV), "{missing}");
    assert_eq!(missing.request(), Some("rtnetlink RTM_GETLINK fynothere"));

    match &unknown_kind {
        Error::Kernel { request, message, .. } => {
            assert_eq!(request, "rtnetlink RTM_NEWLINK fyodd");
            let message = message.as_deref().expect("the kernel's extended ack");
            assert!(!message.is_empty());
            assert!(unknown_kind.to_string().contains(message), "{unknown_kind}");
        }
        other => panic!("expected the kernel's refusal, got {other:?}"),
    }
    assert_eq!(after.unwrap(), ["lo"]);
}

#[test]
fn netns_errors_say_which_namespace_and_why() {
    require_root!();
    let missing = Netns::open("/run/netns/fy-no-such-namespace").unwrap_err();
    assert!(matches!(missing, Error::NetnsOpen { .. }), "{missing:?}");
    assert!(
        missing.to_string().contains("/run/netns/fy-no-such-namespace"),
        "{missing}"
    );

    // A namespace, but not a network one: setns(CLONE_NEWNET) refuses it.
    let uts = Netns::open("/proc/self/ns/uts").unwrap();
    let not_net = uts.run(|| ()).unwrap_err();
    assert!(matches!(not_net, Error::NetnsEnter { .. }), "{not_net:?}");
    assert!(not_net.to_string().contains("/proc/self/ns/uts"), "{not_net}");

    let (_ns, netns) = testbed("nl-panic");
    let panicked = netns.run(|| panic!("boom in the netns")).unwrap_err();
    assert!(panicked.to_string().contains("boom in the netns"), "{panicked}");
}

/// The raw layer an nf_tables batch needs: several framed requests in one send, each
/// answered under its own sequence number, read until the answer of the last.
#[test]
fn raw_requests_in_one_send_are_answered_per_sequence_number() {
    require_root!();
    let (ns, netns) = testbed("nl-raw");
    ns.exec_ok(&[
        "ip",
        "link",
        "add",
        "fyraw",
        "type",
        "veth",
        "peer",
        "name",
        "fyraw-peer",
    ]);
    let answers = netns
        .run(|| {
            let mut s = Socket::<Route>::open().unwrap();
            let mut bytes = Vec::new();
            let mut seqs = Vec::new();
            // Delete a link that is not there, then one that is, then the missing one again.
            for name in ["fynothere", "fyraw", "fynothere"] {
                let mut link = LinkMessage::default();
                link.attributes.push(LinkAttribute::IfName(name.into()));
                let mut header = NetlinkHeader::default();
                header.flags = NLM_F_REQUEST | NLM_F_ACK;
                header.sequence_number = s.next_seq();
                seqs.push(header.sequence_number);
                let mut m =
                    NetlinkMessage::new(header, NetlinkPayload::from(RouteNetlinkMessage::DelLink(link)));
                m.finalize();
                let start = bytes.len();
                bytes.resize(start + m.buffer_len(), 0);
                m.serialize(&mut bytes[start..]);
            }
            s.send_raw(&bytes).unwrap();
            let last = seqs[2];
            let mut answers = Vec::new();
            s.receive(|frame| {
                let (seq, errno) = match frame {
                    Frame::Ack { seq } => (seq, 0),
                    Frame::Error { seq, errno, .. } => (seq, errno),
                    _ => return ControlFlow::Continue(()),
                };
                answers.push((seq, errno));
                if seq == last {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap();
            seqs.iter()
                .map(|seq| answers.iter().find(|(s, _)| s == seq).map(|(_, errno)| *errno))
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert_eq!(answers, [Some(libc::ENODEV), Some(0), Some(libc::ENODEV)]);
    let links = ns.exec_ok(&["ip", "-o", "link", "show"]);
    assert!(
        !links.contains("fyraw"),
        "the middle request was applied: {links}"
    );
}
