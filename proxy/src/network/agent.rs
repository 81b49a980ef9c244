//! The Pod network's own loop, on a thread of its own (netlink and file writes block): it
//! keeps the Nodes it is told about, and after each burst of changes (and every
//! [`RESYNC`], to repair what someone else changed) plans this node's network and puts
//! it in place. It acts only once a complete list of Nodes has arrived, so a restarted
//! daemon never deletes a peer's route for not having heard of the peer yet.
//!
//! Its input is [`NodeUpdate`]s: [`Agent::observe`] picks them out of the source's
//! events (a manifests directory gives every Node), and with the API server a watcher of
//! every Node feeds it ([`Agent::sender`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_netlink::route::Route;
use ferry_netlink::Socket;
use tracing::{debug, info, warn};

use super::{conflist, masquerade, plan, routes, vxlan, NetworkError, NetworkSettings, NodeNetwork, Via};
use crate::source::{Event, Kind, Object};
use crate::store::objects::NodeInfo;

/// How often the network is re-checked without changes.
pub const RESYNC: Duration = Duration::from_secs(30);
/// The first retry after a failure; doubles up to [`MAX_RETRY`].
const MIN_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(10);

/// A change of the Nodes the network is made from.
#[derive(Debug, Clone)]
pub enum NodeUpdate {
    /// Every Node there is.
    Snapshot(Vec<Arc<NodeInfo>>),
    Upsert(Arc<NodeInfo>),
    Delete(Arc<str>),
}

impl NodeUpdate {
    /// The Node part of a source event, if it has one.
    pub fn from_event(event: &Event) -> Option<NodeUpdate> {
        match event {
            Event::Snapshot { kinds, objects } if kinds.contains(&Kind::Node) => Some(NodeUpdate::Snapshot(
                objects
                    .iter()
                    .filter_map(|o| match o {
                        Object::Node(n) => Some(n.clone()),
                        _ => None,
                    })
                    .collect(),
            )),
            Event::Upsert(Object::Node(n)) => Some(NodeUpdate::Upsert(n.clone())),
            Event::Delete(Object::Node(n)) => Some(NodeUpdate::Delete(n.name.clone())),
            _ => None,
        }
    }
}

/// The handle of the running loop. Dropping every sender stops it; what it programmed
/// stays.
#[derive(Clone)]
pub struct Agent {
    tx: Sender<NodeUpdate>,
}

impl Agent {
    pub fn start(settings: NetworkSettings) -> std::io::Result<Agent> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("ferry-network".into())
            .spawn(move || Loop::new(settings).run(rx))?;
        Ok(Agent { tx })
    }

    /// Passes on the Node part of a source event.
    pub fn observe(&self, event: &Event) {
        if let Some(update) = NodeUpdate::from_event(event) {
            let _ = self.tx.send(update);
        }
    }

    pub fn sender(&self) -> Sender<NodeUpdate> {
        self.tx.clone()
    }
}

struct Loop {
    settings: NetworkSettings,
    nodes: BTreeMap<Arc<str>, Arc<NodeInfo>>,
    synced: bool,
    sock: Option<Socket<Route>>,
    nft: Option<ferry_nft::Socket>,
    /// What was last put in place, to log only what changed and to skip the nftables
    /// commit when the rules are the same.
    applied: Option<NodeNetwork>,
    /// Pod CIDRs whose route belongs to someone else, as last logged.
    foreign: Vec<ipnetwork::IpNetwork>,
}

impl Loop {
    fn new(settings: NetworkSettings) -> Loop {
        Loop {
            settings,
            nodes: BTreeMap::new(),
            synced: false,
            sock: None,
            nft: None,
            applied: None,
            foreign: Vec::new(),
        }
    }

    fn run(mut self, rx: Receiver<NodeUpdate>) {
        let mut retry: Option<(Instant, Duration)> = None;
        let mut next_resync = Instant::now() + RESYNC;
        loop {
            let wake = retry.map_or(next_resync, |(at, _)| at.min(next_resync));
            let mut changed = false;
            match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(update) => {
                    changed |= self.apply(update);
                    while let Ok(update) = rx.try_recv() {
                        changed |= self.apply(update);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            let due = changed || retry.is_some_and(|(at, _)| now >= at) || now >= next_resync;
            if !due || !self.synced {
                continue;
            }
            next_resync = now + RESYNC;
            match self.sync() {
                Ok(()) => retry = None,
                Err(e) => {
                    let wait = retry.map_or(MIN_RETRY, |(_, w)| (w * 2).min(MAX_RETRY));
                    warn!("Pod network: {e}; what is in place stays, retrying in {wait:?}");
                    // The socket may be what broke.
                    self.sock = None;
                    self.nft = None;
                    retry = Some((Instant::now() + wait, wait));
                }
            }
        }
    }

    /// Whether the Nodes changed.
    fn apply(&mut self, update: NodeUpdate) -> bool {
        match update {
            NodeUpdate::Snapshot(nodes) => {
                let new: BTreeMap<_, _> = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
                let changed = !self.synced || new != self.nodes;
                self.nodes = new;
                self.synced = true;
                changed
            }
            NodeUpdate::Upsert(n) => self.nodes.insert(n.name.clone(), n.clone()).as_ref() != Some(&n),
            NodeUpdate::Delete(name) => self.nodes.remove(&name).is_some(),
        }
    }

    fn sync(&mut self) -> Result<(), NetworkError> {
        let started = Instant::now();
        if self.sock.is_none() {
            self.sock = Some(Socket::open().map_err(NetworkError::netlink("opening the rtnetlink socket"))?);
        }
        let sock = self.sock.as_mut().expect("just opened");
        let facts =
            routes::host_facts(sock).map_err(NetworkError::netlink("listing the node's addresses"))?;
        let want = plan(&self.settings, self.nodes.values().map(|n| &**n), &facts);

        // A conflist that cannot be written does not hold back the routes: Pods already
        // there still need them. Its error is returned once the rest is in place.
        let mut conflist_error = None;
        if let (Some(dir), Some(bytes)) = (&self.settings.cni_conf_dir, &want.conflist) {
            let path = dir.join(conflist::FILE_NAME);
            match conflist::write_if_changed(dir, bytes) {
                Ok(true) => info!(path = %path.display(), "CNI configuration written"),
                Ok(false) => {}
                Err(source) => conflist_error = Some(NetworkError::Conflist { path, source }),
            }
        }

        // The VXLAN device first: routes over it need its index.
        let vxlan_index = match &want.vxlan {
            Some(dev) => {
                let underlay = facts
                    .holding(dev.local.into())
                    .map(|a| a.link)
                    .ok_or(NetworkError::NoUnderlay { ip: dev.local })?;
                Some(
                    vxlan::ensure(sock, dev, underlay)
                        .map_err(NetworkError::netlink("making the VXLAN device"))?,
                )
            }
            None => None,
        };
        let changes = routes::converge(sock, &want.routes, vxlan_index)
            .map_err(NetworkError::netlink("routing to other nodes' Pods"))?;
        match vxlan_index {
            Some(index) => {
                let mut fdb = BTreeSet::new();
                let mut neighbours = BTreeSet::new();
                for route in want.routes.values() {
                    if let Via::Vxlan { gateway, mac, remote } = route.via {
                        fdb.insert((mac, remote));
                        neighbours.insert((gateway, mac));
                    }
                }
                vxlan::converge_fdb(sock, index, &fdb)
                    .map_err(NetworkError::netlink("writing VXLAN FDB entries"))?;
                vxlan::converge_neighbours(sock, index, &neighbours)
                    .map_err(NetworkError::netlink("writing VXLAN neighbour entries"))?;
            }
            None => {
                if vxlan::remove(sock).map_err(NetworkError::netlink("removing the VXLAN device"))? {
                    info!(
                        device = super::VXLAN_DEVICE,
                        "VXLAN device removed: no peer needs it"
                    );
                }
            }
        }

        let rules_changed = self
            .applied
            .as_ref()
            .is_none_or(|a| a.masquerade != want.masquerade);
        if rules_changed {
            if self.nft.is_none() {
                self.nft = Some(
                    ferry_nft::Socket::open()
                        .map_err(NetworkError::nftables("opening the nftables socket"))?,
                );
            }
            let nft = self.nft.as_mut().expect("just opened");
            let exists = nft
                .list_tables()
                .map_err(NetworkError::nftables("listing nftables tables"))?
                .iter()
                .any(|t| t == masquerade::TABLE);
            nft.commit(&masquerade::batch(&want.masquerade, exists))
                .map_err(NetworkError::nftables("committing table inet ferry-network"))?;
            if !want.masquerade.is_empty() {
                info!(rules = ?masquerade::text(&want.masquerade), "Pod masquerade in place");
            }
        }

        if self
            .applied
            .as_ref()
            .is_none_or(|a| a.unreachable != want.unreachable)
        {
            for why in &want.unreachable {
                warn!("Pod network: {why}");
            }
        }
        // Logged when the set changes, not at every resync.
        if changes.foreign != self.foreign {
            for cidr in changes.foreign.iter().filter(|c| !self.foreign.contains(c)) {
                warn!(
                    dst = %cidr,
                    "Pod network: a route to this Pod CIDR exists that Ferry does not own (another protocol \
                     than {}); it is left alone: remove it for Ferry to route there",
                    super::ROUTE_PROTOCOL
                );
            }
            self.foreign = changes.foreign.clone();
        }
        debug!(
            added = changes.added,
            replaced = changes.replaced,
            deleted = changes.deleted,
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "Pod network synced"
        );
        self.applied = Some(want);
        conflist_error.map_or(Ok(()), Err)
    }
}

/// Removes what the Pod network put in the node's kernel: Ferry's routes, the VXLAN
/// device (its FDB and neighbour entries with it) and table `inet ferry-network`. The
/// conflist stays: without it the runtime could make no Pod at all.
pub fn cleanup() -> Result<String, NetworkError> {
    let mut sock = Socket::<Route>::open().map_err(NetworkError::netlink("opening the rtnetlink socket"))?;
    let routes = routes::remove_all(&mut sock).map_err(NetworkError::netlink("removing Ferry's routes"))?;
    let device = vxlan::remove(&mut sock).map_err(NetworkError::netlink("removing the VXLAN device"))?;
    let mut nft = ferry_nft::Socket::open().map_err(NetworkError::nftables("opening the nftables socket"))?;
    let exists = nft
        .list_tables()
        .map_err(NetworkError::nftables("listing nftables tables"))?
        .iter()
        .any(|t| t == masquerade::TABLE);
    if exists {
        nft.commit(&masquerade::batch(&[], true))
            .map_err(NetworkError::nftables("deleting table inet ferry-network"))?;
    }
    Ok(format!(
        "{routes} route(s), {} VXLAN device, {} masquerade table",
        if device { "the" } else { "no" },
        if exists { "the" } else { "no" }
    ))
}
