//! What the eBPF back end reads from and sets on the node's network namespace (the one of
//! the thread that syncs): its interfaces and addresses, the SNAT address, and the one
//! sysctl the tc program needs.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;

use ipnetwork::IpNetwork;

/// The node's interfaces (but `lo`), by name: where the tc program goes.
///
/// Every one, bridge ports included: packets from outside arrive on the uplinks, and the
/// endpoints' replies to SNATed or DNATed flows arrive on the Pods' veths (before the
/// bridge) or on the bridge itself; a packet already translated at a port does not match
/// again on the bridge.
pub fn interfaces() -> std::io::Result<BTreeSet<String>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    Ok(addrs
        .map(|a| a.interface_name)
        .filter(|name| name != "lo")
        .collect())
}

/// The node's addresses NodePorts answer on: every address but loopback and IPv6
/// link-local ones, inside `--nodeport-addresses` when given.
pub fn nodeport_ips(nodeport_addresses: &[IpNetwork]) -> std::io::Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    let ips: BTreeSet<IpAddr> = addrs
        .filter_map(|a| {
            let a = a.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| !ip.is_loopback())
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80))
        .filter(|ip| nodeport_addresses.is_empty() || nodeport_addresses.iter().any(|n| n.contains(*ip)))
        .collect();
    Ok(ips.into_iter().collect())
}

/// The address the node itself would use to reach `endpoint` (a route lookup by a
/// connected UDP socket, which sends nothing): what packets from outside are SNATed to,
/// so that the endpoint's replies come back through the node.
pub fn source_address_towards(endpoint: SocketAddr) -> std::io::Result<IpAddr> {
    let socket = UdpSocket::bind(SocketAddr::new(
        if endpoint.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        },
        0,
    ))?;
    socket.connect(endpoint)?;
    Ok(socket.local_addr()?.ip())
}

/// The tc program's SNATed packets and translated replies carry the node's own address
/// as their source on the wire; without `accept_local` the kernel drops them as martians.
/// (A FIB lookup and redirect in the program would avoid it, but `bpf_fib_lookup` needs a
/// GPL-compatible program licence.)
///
/// Written only when not 1 already: in an unprivileged container /proc/sys is read-only,
/// and the eBPF DaemonSet sets it from a privileged init container instead.
pub fn allow_local_sources() -> std::io::Result<()> {
    ensure_sysctl(Path::new("/proc/sys/net/ipv4/conf/all/accept_local"), "1")
}

/// Makes the sysctl file `path` read `value`, writing it only when it does not already.
fn ensure_sysctl(path: &Path, value: &str) -> std::io::Result<()> {
    if std::fs::read_to_string(path)?.trim() == value {
        return Ok(());
    }
    std::fs::write(path, value)
}

/// Whether the node forwards IPv4 (NodePorts from outside need it; the CNI plugin or the
/// node's configuration sets it, as for kube-proxy).
pub fn forwards_ipv4() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "1")
}

/// Whether the node forwards IPv6 (IPv6 NodePorts from outside need it).
pub fn forwards_ipv6() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").is_ok_and(|v| v.trim() == "1")
}
