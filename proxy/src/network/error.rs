//! The Pod network's errors: which step failed, on what, and what to do about it.

use std::path::PathBuf;

#[derive(Debug)]
pub enum NetworkError {
    /// A netlink request (link, route, neighbour) failed; `doing` says which step.
    Netlink {
        doing: &'static str,
        source: ferry_netlink::Error,
    },
    /// The nftables socket or commit of table `inet ferry-network` failed.
    Nftables { doing: &'static str, message: String },
    /// The conflist could not be written.
    Conflist { path: PathBuf, source: std::io::Error },
    /// This node's IPv4 InternalIP, the VXLAN underlay address, is on none of its links.
    NoUnderlay { ip: std::net::Ipv4Addr },
}

impl NetworkError {
    pub fn netlink(doing: &'static str) -> impl FnOnce(ferry_netlink::Error) -> NetworkError {
        move |source| NetworkError::Netlink { doing, source }
    }

    pub fn nftables<E: std::fmt::Display>(doing: &'static str) -> impl FnOnce(E) -> NetworkError {
        move |e| NetworkError::Nftables {
            doing,
            message: e.to_string(),
        }
    }
}

impl std::fmt::Display for NetworkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetworkError::Netlink { doing, source } => write!(f, "{doing}: {source}"),
            NetworkError::Nftables { doing, message } => write!(f, "{doing}: {message}"),
            NetworkError::Conflist { path, source } => write!(
                f,
                "cannot write {}: {source} (the directory must be writable: mount the host's CNI \
                 configuration directory, or pass --write-cni-conf=false)",
                path.display()
            ),
            NetworkError::NoUnderlay { ip } => write!(
                f,
                "this node's InternalIP {ip} is on none of its links, so VXLAN has no underlay: \
                 check the Node's status.addresses, or use --pod-network-mode host-gw"
            ),
        }
    }
}

impl std::error::Error for NetworkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NetworkError::Netlink { source, .. } => Some(source),
            NetworkError::Conflist { source, .. } => Some(source),
            _ => None,
        }
    }
}
