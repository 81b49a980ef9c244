//! `ferry-bridge`: run by a container runtime with the CNI protocol.
fn main() {
    // DEL leaves the slow deletion of a veth pair to a detached copy of this binary.
    if let Ok(name) = std::env::var(ferry_bridge::plugin::REAP_VAR) {
        return ferry_bridge::plugin::reap(&name);
    }
    cni::run(&ferry_bridge::Bridge)
}
