//! ADD, DEL, CHECK, STATUS and GC of ferry-bridge.

use std::collections::HashSet;
use std::net::IpAddr;

use cni::delegate::{delegate, delegate_add};
use cni::{Attachment, CniResult, Code, Command, Error, Interface, IpConfig, Plugin, Request, Route};
use ipnetwork::IpNetwork;
use netlink_packet_route::link::{BridgeVlanInfoFlags, InfoBridgePort, InfoKind, LinkFlags};
use sha2::{Digest, Sha256};

use crate::config::BridgeConfig;
use crate::detached;
use crate::firewall::{self, AttachmentId, AttachmentRules};
use crate::link::{is_exists, is_missing, Link, NameProbe, VethEnd};
use crate::netlink::Socket;
use crate::netns::{sysctl, PodNetns};

/// Codes of ferry-bridge's own failures (the spec leaves 100 and up to plugins).
pub mod codes {
    use cni::Code;
    /// CHECK: the live state differs from `prevResult`; the message says how.
    pub const STATE_DIFFERS: Code = Code::Other(110);
}

/// The plugin. It holds no state: the kernel's is the truth.
pub struct Bridge;

/// The prefix of the host veth's alias, which lets GC find the attachment of a veth.
const ALIAS_PREFIX: &str = "ferry-bridge:";

/// The host-side veth name: derived from the attachment, so DEL and GC find it without
/// the Pod's netns; "fy" and 12 hex digits of a SHA-256 fit the 15-byte limit.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}\0{ifname}"));
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("fy{hex}")
}

/// Whether `name` has the form of [`host_veth_name`]: "fy" and 12 lower-case hex digits.
fn is_host_veth_name(name: &str) -> bool {
    name.len() == 14
        && name.starts_with("fy")
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The alias of a veth pair retired by an earlier version of DEL (renamed "fyr..." and left
/// to a reaper process): GC deletes those whose reaper did not.
const RETIRED_ALIAS: &str = "ferry-bridge:retired";

/// How long GC waits before it deletes a host veth with no alias: an ADD in flight labels
/// its veth right after creating it; a killed one never does.
const UNLABELLED_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// The start of the alias of every host veth of `network`: how GC tells the network's
/// veths from others'. A network name longer than 64 bytes is replaced by 16 hex digits of
/// its SHA-256, so that with a container id of at most 128 bytes
/// ([`cni::env::MAX_CONTAINER_ID_LEN`]) and an ifname of at most 15, an alias stays within
/// the kernel's 255 bytes.
fn alias_prefix(network: &str) -> String {
    if network.len() <= 64 {
        return format!("{ALIAS_PREFIX}{network}:");
    }
    let digest = Sha256::digest(network.as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{ALIAS_PREFIX}#{hex}:")
}

fn alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("{}{container_id}:{ifname}", alias_prefix(network))
}

/// Wraps a netlink failure into a CNI error saying what was being done.
fn nl(what: impl Into<String>) -> impl FnOnce(crate::netlink::Error) -> Error {
    let what = what.into();
    move |e| Error::new(Code::Io, format!("{what}: {e}"), "")
}

impl Plugin for Bridge {
    const ARGS: &'static [&'static str] = &["MAC", "IP"];

    fn add(&self, req: &Request) -> Result<CniResult, Error> {
        let cfg = BridgeConfig::from_request(req)?;
        let env = &req.env;
        let pod = PodNetns::open(
            env.netns
                .as_deref()
                .expect("the dispatcher requires CNI_NETNS for ADD"),
        )?;
        let ifname = env.ifname.as_str();
        // Refuse before creating anything: the spec wants an error when the name is taken.
        pod.run(|| match Socket::new().and_then(|mut s| s.link_by_name(ifname)) {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(Error::new(
                Code::InvalidEnvironment,
                format!("CNI_IFNAME {ifname} already exists in {}", pod.path()),
                "choose another interface name, or DEL the attachment that holds it",
            )),
            Err(e) => Err(nl(format!("looking up {ifname} in {}", pod.path()))(e)),
        })?;

        // A missing IPAM plugin is known before anything is made.
        if let Some(ipam_type) = &cfg.ipam_type {
            cni::delegate::find_plugin(ipam_type, &env.path)?;
        }

        let mut node = Socket::new().map_err(nl("opening a netlink socket"))?;
        let mut undo = Rollback::new(req, &cfg);
        let bridge = ensure_bridge(&mut node, &cfg, &mut undo)?;
        let host_name = host_veth_name(&env.container_id, ifname);

        // The IPAM plugin is a process of its own: it allocates while we build the veth
        // pair, since neither needs the other, and the Pod's side gets ready as soon as its
        // end exists. Every outcome is registered for rollback before an error is returned.
        let (host, ipam, pod_side) = std::thread::scope(|s| {
            let ipam_job = cfg
                .ipam_type
                .as_deref()
                .map(|t| s.spawn(move || delegate_add(env, t, &req.stdin)));
            let created = create_veth(&mut node, &cfg, req, &pod, &host_name, &mut undo);
            let pod_job = created
                .is_ok()
                .then(|| pod.spawn(s, || prepare_pod(&cfg, ifname)));
            let host = created.and_then(|()| {
                attach_port(
                    &mut node,
                    &cfg,
                    &host_name,
                    &bridge,
                    &alias(&req.config.name, &env.container_id, ifname),
                )
            });
            let ipam = match ipam_job {
                Some(job) => job
                    .join()
                    .unwrap_or_else(|_| Err(Error::new(Code::INTERNAL, "the IPAM call panicked", ""))),
                None => Ok(CniResult::default()),
            };
            undo.ipam = ipam.is_ok() && cfg.ipam_type.is_some();
            (host, ipam, pod_job.map(|job| pod.join(job)))
        });
        let (host, ipam) = (host?, ipam?);
        let mut pod_side = pod_side.expect("prepared once the veth pair exists")?;
        if let (Some(ipam_type), true) = (&cfg.ipam_type, ipam.ips.is_empty()) {
            return Err(Error::new(
                Code::INTERNAL,
                format!("IPAM plugin {ipam_type} returned no address"),
                "",
            ));
        }
        let gateways = gateways(&ipam.ips);
        let mut routes = ipam.routes.clone();
        if cfg.is_default_gateway {
            for gw in &gateways {
                let default = IpNetwork::new(
                    if gw.is_ipv4() {
                        [0u8; 4].into()
                    } else {
                        [0u8; 16].into()
                    },
                    0,
                )
                .expect("prefix 0 is valid");
                if !routes.iter().any(|r| r.dst == default) {
                    routes.push(Route::new(default, Some(*gw)));
                }
            }
        }

        // The Pod's addresses and routes, and the node's gateway address and rules, need
        // nothing of each other: both at once (the Pod's socket stays in its namespace
        // whichever thread uses it).
        let container_mac = pod_side.link.mac.clone();
        let rules = attachment_rules(req, &cfg, &ipam.ips, &host_name, container_mac.as_deref());
        let (pod_done, node_done) = std::thread::scope(|s| {
            let pod_job =
                s.spawn(|| configure_pod(&mut pod_side, &cfg, ifname, &ipam.ips, &routes, &gateways));
            let mut node_done = || -> Result<(), Error> {
                if cfg.is_gateway {
                    for ip in &ipam.ips {
                        if let Some(gw) = ip.gateway {
                            let gw_net =
                                IpNetwork::new(gw, ip.address.prefix()).expect("prefix of a valid address");
                            ensure_gateway_address(&mut node, &bridge, gw_net, cfg.force_address)?;
                        }
                    }
                    enable_forwarding(&gateways)?;
                }
                if !rules.is_empty() {
                    firewall::add(&rules)?;
                    undo.firewall = true;
                }
                Ok(())
            };
            let node_done = node_done();
            let pod_done = pod_job
                .join()
                .unwrap_or_else(|_| Err(Error::new(Code::INTERNAL, "configuring the Pod panicked", "")));
            (pod_done, node_done)
        });
        pod_done?;
        node_done?;

        // The bridge's MAC is fixed at creation, the veth's at creation: read them once.
        let bridge_now = node
            .link_by_name(&cfg.bridge)
            .map_err(nl("reading the bridge"))?
            .unwrap_or(bridge);
        let mut result = req.config.prev_result.clone().unwrap_or_default();
        let first = result.interfaces.len();
        result.interfaces.push(Interface {
            name: bridge_now.name,
            mac: bridge_now.mac,
            ..Default::default()
        });
        result.interfaces.push(Interface {
            name: host.name,
            mac: host.mac,
            mtu: host.mtu,
            ..Default::default()
        });
        result.interfaces.push(Interface {
            name: ifname.to_string(),
            mac: container_mac,
            mtu: cfg.mtu,
            sandbox: Some(pod.path().to_string()),
            ..Default::default()
        });
        result.ips.extend(ipam.ips.into_iter().map(|ip| IpConfig {
            interface: Some(first + 2),
            ..ip
        }));
        result.routes.extend(routes);
        let conf_dns = req
            .config
            .raw
            .get("dns")
            .and_then(|d| serde_json::from_value::<cni::Dns>(d.clone()).ok());
        result.dns = conf_dns.filter(|d| !d.is_empty()).unwrap_or(ipam.dns);

        undo.disarm();
        Ok(result)
    }

    fn del(&self, req: &Request) -> Result<(), Error> {
        let cfg = BridgeConfig::from_request(req)?;
        let env = &req.env;
        // Best effort, in full: every step runs whatever fails in another. The three are
        // independent, so they run at once.
        let id = AttachmentId {
            network: &req.config.name,
            container_id: &env.container_id,
            ifname: &env.ifname,
        };
        let host_name = host_veth_name(&env.container_id, &env.ifname);
        let results: Vec<Result<(), Error>> = std::thread::scope(|s| {
            let ipam = cfg
                .ipam_type
                .as_deref()
                .map(|t| s.spawn(move || delegate(env, Command::Del, t, &req.stdin)));
            let rules = s.spawn(|| firewall::remove(&id));
            let veth = retire_veth(env, &host_name).map_err(nl(format!("deleting {host_name}")));
            let panicked = |_| Err(Error::new(Code::INTERNAL, "a DEL step panicked", ""));
            let mut results = vec![veth, rules.join().unwrap_or_else(panicked)];
            if let Some(job) = ipam {
                results.push(job.join().map(|r| r.map(|_| ())).unwrap_or_else(panicked));
            }
            results
        });
        results
            .into_iter()
            .collect::<Result<Vec<()>, Error>>()
            .map(|_| ())
    }

    fn check(&self, req: &Request) -> Result<(), Error> {
        let cfg = BridgeConfig::from_request(req)?;
        let env = &req.env;
        let Some(prev) = &req.config.prev_result else {
            return Err(Error::invalid_config(
                "CHECK needs prevResult in the network configuration",
                "the runtime passes the result of the ADD as prevResult",
            ));
        };
        if let Some(ipam_type) = &cfg.ipam_type {
            delegate(env, Command::Check, ipam_type, &req.stdin)?;
        }
        let differs =
            |what: String| Error::new(codes::STATE_DIFFERS, what, "DEL and ADD the attachment again");

        let mut node = Socket::new().map_err(nl("opening a netlink socket"))?;
        let bridge = node.link_by_name(&cfg.bridge).map_err(nl("reading the bridge"))?;
        let bridge = bridge.filter(|l| l.kind == Some(InfoKind::Bridge));
        let Some(bridge) = bridge else {
            return Err(differs(format!("bridge {} is missing", cfg.bridge)));
        };
        let host_name = host_veth_name(&env.container_id, &env.ifname);
        let Some(host) = node
            .link_by_name(&host_name)
            .map_err(nl("reading the host veth"))?
        else {
            return Err(differs(format!("host veth {host_name} is missing")));
        };
        if host.controller != Some(bridge.index) {
            return Err(differs(format!(
                "host veth {host_name} is not a port of {}",
                cfg.bridge
            )));
        }
        if host.hairpin.is_some_and(|h| h != cfg.hairpin) {
            return Err(differs(format!(
                "hairpin mode of {host_name} is not {}",
                cfg.hairpin
            )));
        }

        let pod = PodNetns::open(
            env.netns
                .as_deref()
                .expect("the dispatcher requires CNI_NETNS for CHECK"),
        )?;
        let sandbox = pod.path().to_string();
        let index = prev
            .interfaces
            .iter()
            .position(|i| i.name == env.ifname && i.sandbox.as_deref() == Some(&sandbox));
        let expected_mac = index.and_then(|i| prev.interfaces[i].mac.clone());
        let expected_ips: Vec<IpNetwork> = prev
            .ips
            .iter()
            .filter(|ip| ip.interface.is_none() || ip.interface == index)
            .map(|ip| ip.address)
            .collect();
        let problem = pod.run(|| {
            let mut s = Socket::new().map_err(nl("opening a netlink socket in the Pod"))?;
            let Some(link) = s
                .link_by_name(&env.ifname)
                .map_err(nl("reading the Pod's interface"))?
            else {
                return Ok(Some(format!(
                    "interface {} is missing from {sandbox}",
                    env.ifname
                )));
            };
            if let (Some(want), Some(have)) = (&expected_mac, &link.mac) {
                if !want.eq_ignore_ascii_case(have) {
                    return Ok(Some(format!(
                        "{} has MAC {have}, prevResult says {want}",
                        env.ifname
                    )));
                }
            }
            let have = s
                .addresses(link.index)
                .map_err(nl("reading the Pod's addresses"))?;
            if let Some(missing) = expected_ips.iter().find(|a| !have.contains(a)) {
                return Ok(Some(format!(
                    "address {missing} is missing from {} in {sandbox}",
                    env.ifname
                )));
            }
            // One dump per family, however many routes prevResult lists.
            let mut dumps: [Option<Vec<crate::link::RouteEntry>>; 2] = [None, None];
            for route in &prev.routes {
                let v4 = route.dst.is_ipv4();
                let routes = match &mut dumps[usize::from(v4)] {
                    Some(routes) => routes,
                    slot => slot.insert(s.routes(v4).map_err(nl("reading the Pod's routes"))?),
                };
                if !routes
                    .iter()
                    .any(|r| r.dst == route.dst && (route.gw.is_none() || r.gw == route.gw))
                {
                    return Ok(Some(format!("route to {} is missing in {sandbox}", route.dst)));
                }
            }
            Ok(None)
        })?;
        if let Some(p) = problem {
            return Err(differs(p));
        }
        let ips: Vec<IpConfig> = prev
            .ips
            .iter()
            .filter(|ip| expected_ips.contains(&ip.address))
            .cloned()
            .collect();
        let rules = attachment_rules(req, &cfg, &ips, &host_name, expected_mac.as_deref());
        if !rules.is_empty() {
            firewall::check(&rules).map_err(|e| differs(e.msg))?;
        }
        Ok(())
    }

    fn status(&self, req: &Request) -> Result<(), Error> {
        let cfg = BridgeConfig::from_request(req)?;
        match &cfg.ipam_type {
            Some(ipam_type) => delegate(&req.env, Command::Status, ipam_type, &req.stdin).map(|_| ()),
            None => Ok(()),
        }
    }

    fn gc(&self, req: &Request, valid: &[Attachment]) -> Result<(), Error> {
        let cfg = BridgeConfig::from_request(req)?;
        let mut first_error = None;
        if let Some(ipam_type) = &cfg.ipam_type {
            if let Err(e) = delegate(&req.env, Command::Gc, ipam_type, &req.stdin) {
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = firewall::remove_stale(&req.config.name, valid) {
            first_error.get_or_insert(e);
        }
        // A host veth's name is derived from its attachment, so the names of the valid
        // ones say which veths to keep. The network's are those whose alias says so, and
        // those with no alias: an ADD killed between creating the pair and labelling it
        // leaves one, never a bridge port, never usable. A live ADD labels its veth two
        // netlink requests after creating it, so an unlabelled one counts only if still
        // unlabelled after UNLABELLED_GRACE: GC of one network spares another's ADD in flight.
        let prefix = alias_prefix(&req.config.name);
        let keep: HashSet<String> = valid
            .iter()
            .map(|a| host_veth_name(&a.container_id, &a.ifname))
            .collect();
        let unlabelled = |link: &Link| {
            link.alias.is_none()
                && link.kind == Some(InfoKind::Veth)
                && is_host_veth_name(&link.name)
                && !keep.contains(&link.name)
        };
        let stale_links = Socket::new().and_then(|mut s| {
            let delete = |s: &mut Socket, link: &Link| match s.delete_link(link.index) {
                Err(e) if !is_missing(&e) => Err(e), // a reaper may be first
                _ => Ok(()),
            };
            let mut suspects = Vec::new();
            for link in s.links()? {
                match link.alias.as_deref() {
                    Some(RETIRED_ALIAS) => delete(&mut s, &link)?,
                    Some(alias) if alias.starts_with(&prefix) && !keep.contains(&link.name) => {
                        delete(&mut s, &link)?
                    }
                    _ if unlabelled(&link) => suspects.push(link),
                    _ => {}
                }
            }
            if suspects.is_empty() {
                return Ok(());
            }
            std::thread::sleep(UNLABELLED_GRACE);
            for link in s.links()? {
                if unlabelled(&link) && suspects.iter().any(|x| x.index == link.index) {
                    delete(&mut s, &link)?;
                }
            }
            Ok(())
        });
        if let Err(e) = stale_links {
            first_error.get_or_insert(nl("deleting stale veths")(e));
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Deletes an attachment's veth pair, returning as soon as both names are free (`CNI_IFNAME`
/// in the Pod, the host name on the node), before the kernel has finished the deletion.
///
/// What the kernel makes the sender of a request wait for (Linux 6.18, `perf trace -f
/// --duration` on DEL, 2 loaded cores): a link going down and a rename each wait for an
/// RCU grace period under the RTNL lock (`synchronize_net`; one rename took 9 ms), and a
/// deletion waits for two of them, then, after the RTNL lock is released, for every pending
/// RCU callback (`rcu_barrier`): 11-14 ms in all, ~19 ms measured before. The previous
/// way, retiring the pair (both ends down and renamed so the names were free, then deleted
/// by a reaper process started with exec), cost four grace periods and an exec on the
/// critical path: DEL median 0.17-0.18x the reference plugin's.
///
/// So the request is sent from a detached grandchild of this process, which exits when
/// the kernel is done, and this process only watches the names with [`NameProbe`] (an
/// ioctl that does not wait for the RTNL lock, unlike an rtnetlink GET): the kernel
/// unlists both ends together, right after closing them, the Pod's end last. Should the
/// grandchild fail to start, or exit with a name still there, the pair is deleted here.
/// GC still deletes the retired pairs (`ferry-bridge:retired`) that earlier versions'
/// reapers left.
fn retire_veth(env: &cni::Env, host_name: &str) -> crate::netlink::Result<()> {
    let mut node = Socket::new()?;
    let Some(host) = node.link_by_name(host_name)? else {
        return Ok(()); // Gone already: DEL is idempotent.
    };
    // Probes of the names in both namespaces (the Pod's, when its end is there).
    let host_probe = NameProbe::open().ok();
    let pod_probe = env
        .netns
        .as_deref()
        .and_then(|p| PodNetns::open(p).ok())
        .and_then(|pod| {
            pod.run(|| {
                let mut s = Socket::new().map_err(nl("netlink in the Pod"))?;
                let end = s
                    .link_by_name(&env.ifname)
                    .map_err(nl("looking up the Pod's end"))?;
                Ok(end
                    .filter(|l| l.kind == Some(InfoKind::Veth))
                    .and_then(|_| NameProbe::open().ok()))
            })
            .ok()
            .flatten()
        });
    let request = node.delete_link_request(host.index);
    if let (Some(host_probe), Some(sender)) = (host_probe, detached::send_rtnetlink(&request)) {
        let deadline = std::time::Instant::now() + RETIRE_WAIT;
        loop {
            // The host's end is unlisted first, the Pod's right after it.
            let taken = |probe: &NameProbe, name: &str| probe.exists(name).unwrap_or(true);
            let free =
                !taken(&host_probe, host_name) && pod_probe.as_ref().is_none_or(|p| !taken(p, &env.ifname));
            if free {
                return Ok(());
            }
            // The grandchild exits once the kernel is done: if it did and a name is still
            // there, its request failed (or never went out).
            if detached::exited(&sender, RETIRE_POLL) || std::time::Instant::now() > deadline {
                break;
            }
        }
    }
    match node.delete_link(host.index) {
        Err(e) if is_missing(&e) => Ok(()),
        other => other,
    }
}

/// How often [`retire_veth`] looks whether the names are free, and for how long at most.
const RETIRE_POLL: std::time::Duration = std::time::Duration::from_micros(250);
const RETIRE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Finds or creates the bridge, up, with the options the configuration needs. The bridge
/// is shared by every Pod of the network: a DEL never removes it, and a rollback only when
/// this ADD created it and no port is on it (see [`Rollback`]).
fn ensure_bridge(node: &mut Socket, cfg: &BridgeConfig, undo: &mut Rollback) -> Result<Link, Error> {
    let name = &cfg.bridge;
    let link = match node
        .link_by_name(name)
        .map_err(nl(format!("looking up bridge {name}")))?
    {
        Some(link) => link,
        None => {
            match node.create_bridge(name, cfg.mtu, cfg.uses_vlans(), bridge_mac(name)) {
                Ok(()) => undo.bridge = Some(name.clone()),
                Err(e) if is_exists(&e) => {} // another ADD made it first
                Err(e) if cfg.uses_vlans() && is_unsupported(&e) => return Err(no_vlan_filtering(cfg)),
                Err(e) => return Err(nl(format!("creating bridge {name}"))(e)),
            }
            node.link_by_name(name)
                .map_err(nl(format!("looking up bridge {name}")))?
                .ok_or_else(|| {
                    Error::new(
                        Code::Io,
                        format!("bridge {name} vanished after it was created"),
                        "",
                    )
                })?
        }
    };
    if link.kind != Some(InfoKind::Bridge) {
        return Err(Error::invalid_config(
            format!("bridge = {name:?}, but {name} exists and is not a bridge"),
            "choose another bridge name, or remove that interface",
        ));
    }
    if cfg.uses_vlans() && link.vlan_filtering != Some(true) {
        node.set_vlan_filtering(link.index)
            .map_err(|e| match is_unsupported(&e) {
                true => no_vlan_filtering(cfg),
                false => nl(format!("turning on VLAN filtering on {name}"))(e),
            })?;
    }
    let mut flags = LinkFlags::Up;
    let mut mask = LinkFlags::Up;
    if cfg.promisc {
        flags |= LinkFlags::Promisc;
        mask |= LinkFlags::Promisc;
    }
    if !link.up || (cfg.promisc && !link.promisc) {
        node.set_flags(link.index, flags, mask)
            .map_err(nl(format!("bringing {name} up")))?;
    }
    Ok(link)
}

fn is_unsupported(e: &crate::netlink::Error) -> bool {
    e.errno() == Some(libc::EOPNOTSUPP)
}

/// Kernels built without CONFIG_BRIDGE_VLAN_FILTERING refuse VLAN filtering outright.
fn no_vlan_filtering(cfg: &BridgeConfig) -> Error {
    Error::new(
        Code::UnsupportedField,
        format!(
            "vlan = {}, vlanTrunk = {:?}: this kernel has no bridge VLAN filtering",
            cfg.vlan, cfg.vlan_trunk
        ),
        "the kernel lacks CONFIG_BRIDGE_VLAN_FILTERING; remove vlan and vlanTrunk, or use a bridge per VLAN",
    )
}

/// A fixed, locally administered MAC for the bridge, derived from its name. A Linux bridge
/// otherwise takes the lowest MAC of its ports, so the gateway's MAC would change as Pods
/// come and go and every Pod's ARP entry for it would go stale.
fn bridge_mac(name: &str) -> [u8; 6] {
    let d = Sha256::digest(name.as_bytes());
    [(d[0] & 0xfe) | 0x02, d[1], d[2], d[3], d[4], d[5]]
}

/// Creates the veth pair, the Pod's end directly inside its namespace.
fn create_veth(
    node: &mut Socket,
    cfg: &BridgeConfig,
    req: &Request,
    pod: &PodNetns,
    host_name: &str,
    undo: &mut Rollback,
) -> Result<(), Error> {
    let (env, ifname) = (&req.env, req.env.ifname.as_str());
    let host_end = VethEnd {
        name: host_name,
        mtu: cfg.mtu,
        mac: None,
    };
    let pod_end = VethEnd {
        name: ifname,
        mtu: cfg.mtu,
        mac: cfg.mac,
    };
    node.create_veth(&host_end, &pod_end, pod.file()).map_err(|e| {
        if is_exists(&e) {
            Error::new(
                Code::InvalidEnvironment,
                format!(
                    "host interface {host_name} for {}/{ifname} already exists",
                    env.container_id
                ),
                "another attachment with this container id and ifname is live: DEL it first",
            )
        } else {
            nl(format!("creating veth pair {host_name}/{ifname}"))(e)
        }
    })?;
    undo.veth = Some(host_name.to_string());
    Ok(())
}

/// Makes the host end a port of the bridge with the port options, and up.
fn attach_port(
    node: &mut Socket,
    cfg: &BridgeConfig,
    name: &str,
    bridge: &Link,
    alias: &str,
) -> Result<Link, Error> {
    let host = node
        .link_by_name(name)
        .map_err(nl(format!("looking up {name}")))?
        .ok_or_else(|| Error::new(Code::Io, format!("{name} vanished after it was created"), ""))?;
    node.set_alias(host.index, alias)
        .map_err(nl(format!("labelling {name}")))?;
    node.set_controller(host.index, bridge.index)
        .map_err(nl(format!("adding {name} to {}", cfg.bridge)))?;
    let mut port = vec![InfoBridgePort::HairpinMode(cfg.hairpin)];
    if cfg.port_isolation {
        port.push(InfoBridgePort::Isolated(true));
    }
    node.set_bridge_port(host.index, port)
        .map_err(nl(format!("setting port options of {name}")))?;
    if cfg.uses_vlans() {
        let vlan = |s: &mut Socket, vid: u16, flags: BridgeVlanInfoFlags, add: bool| {
            s.bridge_vlan(host.index, vid, flags, add)
                .map_err(nl(format!("setting VLAN {vid} on {name}")))
        };
        if !cfg.preserve_default_vlan {
            vlan(node, 1, BridgeVlanInfoFlags::empty(), false)?;
        }
        if cfg.vlan != 0 {
            vlan(
                node,
                cfg.vlan,
                BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged,
                true,
            )?;
        }
        for vid in &cfg.vlan_trunk {
            vlan(node, *vid, BridgeVlanInfoFlags::empty(), true)?;
        }
    }
    node.set_up(host.index)
        .map_err(nl(format!("bringing {name} up")))?;
    node.link_by_name(name)
        .map_err(nl(format!("looking up {name}")))?
        .ok_or_else(|| Error::new(Code::Io, format!("{name} vanished"), ""))
}

/// The gateway of each family: the IPAM's, or the first address of the subnet.
fn gateways(ips: &[IpConfig]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in ips {
        let gw = ip.gateway.unwrap_or_else(|| {
            let net = ip.address.network();
            match net {
                IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
                IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
            }
        });
        if !out.iter().any(|g| g.is_ipv4() == gw.is_ipv4()) {
            out.push(gw);
        }
    }
    out
}

/// The Pod's side of an ADD: a socket in the Pod's namespace (it stays bound there, so any
/// thread can use it) and the Pod's end of the veth pair.
struct PodSide {
    socket: Socket,
    link: Link,
}

/// Runs inside the Pod's namespace as soon as the veth pair exists, while the IPAM plugin
/// runs: finds the Pod's end, and writes the sysctls that only a thread inside the
/// namespace can (`/proc/sys/net` is the namespace of the thread that opens it), before
/// any address is added.
fn prepare_pod(cfg: &BridgeConfig, ifname: &str) -> Result<PodSide, Error> {
    let mut socket = Socket::new().map_err(nl("opening a netlink socket in the Pod"))?;
    let link = socket
        .link_by_name(ifname)
        .map_err(nl(format!("looking up {ifname} in the Pod")))?
        .ok_or_else(|| {
            Error::new(
                Code::Io,
                format!("{ifname} is missing from the Pod after creation"),
                "",
            )
        })?;
    // With an IPAM plugin the Pod gets addresses (an ADD whose IPAM returns none fails).
    if cfg.ipam_type.is_some() {
        // Without DAD an IPv6 address is usable at once; arp_notify tells the bridge our MAC.
        let _ = sysctl(
            &format!("net/ipv6/conf/{ifname}/accept_dad"),
            if cfg.enable_dad { "1" } else { "0" },
        );
        let _ = sysctl(&format!("net/ipv4/conf/{ifname}/arp_notify"), "1");
    }
    Ok(PodSide { socket, link })
}

/// Addresses, link up, routes, over the Pod's socket.
fn configure_pod(
    pod: &mut PodSide,
    cfg: &BridgeConfig,
    ifname: &str,
    ips: &[IpConfig],
    routes: &[Route],
    gateways: &[IpAddr],
) -> Result<(), Error> {
    let (s, link) = (&mut pod.socket, &pod.link);
    for ip in ips {
        s.add_address(link.index, ip.address, !cfg.enable_dad)
            .map_err(nl(format!("adding {} to {ifname}", ip.address)))?;
    }
    if !cfg.disable_container_interface {
        s.set_up(link.index)
            .map_err(nl(format!("bringing {ifname} up")))?;
    }
    for route in routes {
        let gw = route.gw.or_else(|| {
            gateways
                .iter()
                .copied()
                .find(|g| g.is_ipv4() == route.dst.is_ipv4())
        });
        let with_gw = Route { gw, ..route.clone() };
        match s.add_route(&with_gw, link.index) {
            Ok(()) => {}
            Err(e) if is_exists(&e) => {}
            Err(e) => return Err(nl(format!("adding route to {} via {gw:?} in the Pod", route.dst))(e)),
        }
    }
    Ok(())
}

/// Puts `gw` on the bridge. Another address of the same subnet there is an error, unless
/// `forceAddress` says to replace it.
fn ensure_gateway_address(node: &mut Socket, bridge: &Link, gw: IpNetwork, force: bool) -> Result<(), Error> {
    let have = node
        .addresses(bridge.index)
        .map_err(nl("reading the bridge's addresses"))?;
    if have.contains(&gw) {
        return Ok(());
    }
    let same_subnet =
        |a: &IpNetwork| a.is_ipv4() == gw.is_ipv4() && (a.contains(gw.ip()) || gw.contains(a.ip()));
    for other in have.iter().filter(|a| same_subnet(a)) {
        if !force {
            return Err(Error::invalid_config(
                format!("bridge {} has address {other}, not gateway {gw}", bridge.name),
                "set \"forceAddress\": true to replace it, or fix the gateway in the IPAM configuration",
            ));
        }
        node.delete_address(bridge.index, *other)
            .map_err(nl(format!("removing {other} from the bridge")))?;
    }
    match node.add_address(bridge.index, gw, true) {
        Ok(()) => Ok(()),
        Err(e) if is_exists(&e) => Ok(()), // a parallel ADD put it there
        Err(e) => Err(nl(format!("adding gateway {gw} to {}", bridge.name))(e)),
    }
}

fn enable_forwarding(gateways: &[IpAddr]) -> Result<(), Error> {
    for gw in gateways {
        let key = if gw.is_ipv4() {
            "net/ipv4/ip_forward"
        } else {
            "net/ipv6/conf/all/forwarding"
        };
        sysctl(key, "1").map_err(|e| Error::io(format!("enabling forwarding ({key})"), &e))?;
    }
    Ok(())
}

fn attachment_rules<'a>(
    req: &'a Request,
    cfg: &BridgeConfig,
    ips: &[IpConfig],
    host_veth: &str,
    container_mac: Option<&str>,
) -> AttachmentRules<'a> {
    let id = AttachmentId {
        network: &req.config.name,
        container_id: &req.env.container_id,
        ifname: &req.env.ifname,
    };
    let masquerade = if cfg.ip_masq {
        ips.iter().map(|ip| ip.address).collect()
    } else {
        Vec::new()
    };
    let port_mappings = req
        .config
        .runtime_config
        .port_mappings
        .iter()
        .filter_map(|pm| {
            let family_v4 = pm.host_ip.is_none_or(|h| h.is_ipv4());
            // Without a hostIP a mapping applies to each family the Pod has.
            let targets: Vec<IpAddr> = ips
                .iter()
                .map(|ip| ip.address.ip())
                .filter(|a| pm.host_ip.is_none() || a.is_ipv4() == family_v4)
                .collect();
            (!targets.is_empty()).then(|| targets.into_iter().map(move |a| (pm.clone(), a)))
        })
        .flatten()
        .collect();
    let mac_spoof_check = match (cfg.mac_spoof_check, container_mac) {
        (true, Some(mac)) => Some((host_veth.to_string(), mac.to_string())),
        _ => None,
    };
    AttachmentRules {
        id,
        masquerade,
        port_mappings,
        mac_spoof_check,
    }
}

/// Undoes what a failing ADD did, in reverse: rules, lease, veth. Disarmed on success.
struct Rollback<'a> {
    req: &'a Request,
    ipam_type: Option<String>,
    /// The bridge, when this call created it: a failed ADD leaves the node as it found it.
    bridge: Option<String>,
    veth: Option<String>,
    ipam: bool,
    firewall: bool,
    armed: bool,
}

impl<'a> Rollback<'a> {
    fn new(req: &'a Request, cfg: &BridgeConfig) -> Rollback<'a> {
        Rollback {
            req,
            ipam_type: cfg.ipam_type.clone(),
            bridge: None,
            veth: None,
            ipam: false,
            firewall: false,
            armed: true,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let env = &self.req.env;
        if self.firewall {
            let id = AttachmentId {
                network: &self.req.config.name,
                container_id: &env.container_id,
                ifname: &env.ifname,
            };
            let _ = firewall::remove(&id);
        }
        if let (true, Some(ipam_type)) = (self.ipam, &self.ipam_type) {
            let _ = delegate(env, Command::Del, ipam_type, &self.req.stdin);
        }
        if let Some(name) = &self.veth {
            let _ = Socket::new().and_then(|mut s| match s.link_by_name(name)? {
                Some(l) => s.delete_link(l.index),
                None => Ok(()),
            });
        }
        // Only while no port is on it: a parallel ADD may have found the bridge this call
        // made and be using it already. (One that attaches between the look and the delete
        // fails with "no such device" and rolls back; its runtime retries.)
        if let Some(name) = &self.bridge {
            let _ = Socket::new().and_then(|mut s| {
                let Some(bridge) = s.link_by_name(name)? else {
                    return Ok(());
                };
                if s.links()?.iter().any(|l| l.controller == Some(bridge.index)) {
                    return Ok(());
                }
                s.delete_link(bridge.index)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_stable_short_and_distinct() {
        let a = host_veth_name(
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "eth0",
        );
        assert_eq!(
            a,
            host_veth_name(
                "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "eth0"
            )
        );
        assert!(a.len() <= 15 && a.starts_with("fy"), "{a}");
        assert_ne!(
            a,
            host_veth_name(
                "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "eth1"
            )
        );
    }

    #[test]
    fn the_bridge_mac_is_unicast_and_locally_administered() {
        let m = bridge_mac("cni0");
        assert_eq!(m[0] & 0x03, 0x02);
        assert_eq!(m, bridge_mac("cni0"));
    }

    #[test]
    fn gateways_default_to_the_first_address_of_the_subnet() {
        let ips = vec![
            IpConfig {
                address: "10.1.2.7/24".parse().unwrap(),
                gateway: None,
                interface: None,
            },
            IpConfig {
                address: "fd00::7/64".parse().unwrap(),
                gateway: Some("fd00::fe".parse().unwrap()),
                interface: None,
            },
        ];
        assert_eq!(
            gateways(&ips),
            vec!["10.1.2.1".parse::<IpAddr>().unwrap(), "fd00::fe".parse().unwrap()]
        );
    }
}
