#!/usr/bin/env bash
# Writes conf/ferry-k3s.yaml: conf/ferry.yaml with k3s's paths and Pod network. k3s keeps
# its CNI plugins and configuration, and the kubelet's kubeconfig, under its data
# directory rather than where kubeadm and kind put them, and its default cluster CIDR is
# 10.42.0.0/16. Run after every change to conf/ferry.yaml (proxy/tests/conf.rs fails
# until the two agree).
#
#   /opt/cni/bin                  -> /var/lib/rancher/k3s/data/cni (k3s >= 1.31.7 and
#                                    1.32.3; older releases: data/current/bin)
#   /etc/cni/net.d                -> /var/lib/rancher/k3s/agent/etc/cni/net.d
#   /etc/kubernetes/kubelet.conf  -> /var/lib/rancher/k3s/agent/kubelet.kubeconfig
#   --cluster-cidr=10.244.0.0/16  -> --cluster-cidr=10.42.0.0/16
#
# Usage: scripts/conf/k3s.sh [OUT] (default conf/ferry-k3s.yaml)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${1:-$repo/conf/ferry-k3s.yaml}
{
    echo "# GENERATED from conf/ferry.yaml by scripts/conf/k3s.sh: edit that file, then run the script."
    echo "# For k3s started with --flannel-backend=none --disable-kube-proxy --disable-network-policy."
    echo "#"
    sed -e 's#path: /opt/cni/bin#path: /var/lib/rancher/k3s/data/cni#' \
        -e 's#path: /etc/cni/net.d#path: /var/lib/rancher/k3s/agent/etc/cni/net.d#' \
        -e 's#path: /etc/kubernetes/kubelet.conf#path: /var/lib/rancher/k3s/agent/kubelet.kubeconfig#' \
        -e 's#--cluster-cidr=10.244.0.0/16#--cluster-cidr=10.42.0.0/16#' \
        -e 's#kind load image-archive target/image/ferry-image.tar \# or, on each node: ctr -n k8s.io images import ...#k3s ctr images import target/image/ferry-image.tar     \# on each node#' \
        "$repo/conf/ferry.yaml"
} >"$out.tmp"
mv "$out.tmp" "$out"
