//! `ferry-ipam`: run by a CNI main plugin (or a runtime) with the CNI protocol.
fn main() {
    cni::run(&ferry_ipam::HostLocal)
}
