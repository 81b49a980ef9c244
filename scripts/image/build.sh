#!/usr/bin/env bash
# Builds Ferry's container image without a registry: no base image is pulled; the root
# filesystem is assembled from the repository's binaries and this machine's Debian files.
#
# Usage: scripts/image/build.sh [BIN_DIR [OUT_TAR]]
#   BIN_DIR  where ferry-proxy, ferry-bridge and ferry-ipam are (default target/release;
#            `make image` builds them first)
#   OUT_TAR  the image archive (default target/image/ferry-image.tar), named $FERRY_IMAGE
#            (default localhost/ferry:dev, the name conf/ferry.yaml runs)
#
# Load the archive on every node, then `kubectl apply -f conf/ferry.yaml`:
#   kind load image-archive target/image/ferry-image.tar    (kind)
#   k3s ctr images import target/image/ferry-image.tar      (k3s, on each node)
#   ctr -n k8s.io images import target/image/ferry-image.tar (containerd)
#
# What is in it:
#   /usr/local/bin/ferry-proxy          the node daemon (the entrypoint)
#   /opt/ferry/cni/ferry-{bridge,ipam}  the CNI plugins the init container installs
#   /opt/ferry/cni-if-missing/loopback  the reference loopback plugin (Debian's
#                                       containernetworking-plugins), installed only where
#                                       the node has none: containerd's CRI runs it for every
#                                       Pod sandbox, and a node without a CNI network may lack it
#   /usr/local/bin/ferry-install-cni    that installer (scripts/image/install-cni.sh)
#   /bin/busybox and its applets        a shell for the installer and for operators
#   /usr/sbin/nft                       to look at the rules: `nft list table inet ferry-proxy`
#   the shared libraries all of these need (from ldd), at their Debian paths
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin_dir=${1:-$repo/target/release}
out=${2:-$repo/target/image/ferry-image.tar}
name=${FERRY_IMAGE:-localhost/ferry:dev}
busybox=/bin/busybox
nft=/usr/sbin/nft

die() {
    echo "image: $*" >&2
    exit 1
}

for b in ferry-proxy ferry-bridge ferry-ipam; do
    [[ -x $bin_dir/$b ]] || die "$bin_dir/$b is missing: run \`make release\` (or give the directory with the binaries)"
done
[[ -x $busybox ]] && "$busybox" --list >/dev/null 2>&1 || die "$busybox is missing: install busybox-static (scripts/setup.sh does)"
[[ -x $nft ]] || die "$nft is missing: install nftables (scripts/setup.sh does)"
loopback=/usr/lib/cni/loopback
[[ -x $loopback ]] || die "$loopback is missing: install containernetworking-plugins (scripts/setup.sh does)"

mkdir -p "$(dirname "$out")"
work=$(mktemp -d "$(dirname "$out")/.image.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,etc,proc,sys,dev,tmp,run,root,usr/local/bin,usr/sbin,opt/ferry/cni,opt/ferry/cni-if-missing,var/run}
chmod 1777 "$root/tmp"

install -m 0755 "$bin_dir/ferry-proxy" "$root/usr/local/bin/ferry-proxy"
install -m 0755 "$bin_dir/ferry-bridge" "$root/opt/ferry/cni/ferry-bridge"
install -m 0755 "$bin_dir/ferry-ipam" "$root/opt/ferry/cni/ferry-ipam"
install -m 0755 "$loopback" "$root/opt/ferry/cni-if-missing/loopback"
install -m 0755 "$here/install-cni.sh" "$root/usr/local/bin/ferry-install-cni"
install -m 0755 "$nft" "$root/usr/sbin/nft"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [[ $applet == busybox || -e $root/bin/$applet ]] || ln -s busybox "$root/bin/$applet"
done
ln -s ../bin "$root/usr/bin"
ln -s bin "$root/sbin"

# Shared libraries, at the paths the dynamic loader looks in (the binaries were linked on
# this Debian, so its glibc is the one they need). Symlinks (lib64 -> ...) are resolved so
# that each file lands where ldd says it is.
for b in "$bin_dir/ferry-proxy" "$bin_dir/ferry-bridge" "$bin_dir/ferry-ipam" "$nft"; do
    ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
done | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done

printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
touch "$root/etc/hosts" "$root/etc/resolv.conf" "$root/etc/hostname"

tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$root" -cf "$work/rootfs.tar" .

# shellcheck source=../lib/oci-archive.sh
source "$here/../lib/oci-archive.sh"
mkdir -p "$work/oci"
oci_archive "$name" "$work/rootfs.tar" \
    '{"Env":["PATH=/usr/local/bin:/usr/sbin:/bin"],"Entrypoint":["/usr/local/bin/ferry-proxy"],"WorkingDir":"/"}' \
    "$work/oci" "$work/image.tar"
mv -f "$work/image.tar" "$out"
echo "$out ($name, $(du -h "$out" | cut -f1))"
