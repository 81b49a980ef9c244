//! `ferry-bridge`: run by a container runtime with the CNI protocol.
fn main() {
    cni::run(&ferry_bridge::Bridge)
}
