#!/usr/bin/env bash
# Builds the tiny image the runtime tests run: Debian's static busybox and a symlink per
# applet (sh, nc, httpd, wget, ip, ping, sleep, ...), plus /www/index.html for httpd.
# No registry is needed (none is reachable from the test machines).
#
# Usage: build-image.sh [OUT_DIR]
#   OUT_DIR defaults to $FERRY_IMAGE_DIR, else <repo>/target/runtimes-image.
# Produces, and prints the path of, OUT_DIR:
#   rootfs.tar  the root filesystem, for `podman import rootfs.tar <name>`
#   oci.tar     an image archive named $IMAGE_NAME (scripts/lib/oci-archive.sh), for `ctr images import`
#               (containerd takes the name from the io.containerd.image.name annotation)
#
# Cached: rebuilt only when busybox or this script changed (a stamp file records both), and
# safe to run from parallel tests (one flock; the new files are renamed into place).
set -euo pipefail

IMAGE_NAME=localhost/ferry/busybox:latest
BUSYBOX=/bin/busybox

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-${FERRY_IMAGE_DIR:-$here/../../target/runtimes-image}}
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [[ ! -x $BUSYBOX ]] || ! "$BUSYBOX" --list >/dev/null 2>&1; then
    echo "build-image: $BUSYBOX missing: install busybox-static (scripts/setup.sh does)" >&2
    exit 1
fi

# The stamp: what the outputs were built from.
stamp="busybox $(sha256sum <"$BUSYBOX" | cut -d' ' -f1) script $(cat "${BASH_SOURCE[0]}" "$here/../lib/oci-archive.sh" | sha256sum | cut -d' ' -f1) name $IMAGE_NAME"

exec 9>"$out/.lock"
flock 9
if [[ -f $out/stamp && "$(cat "$out/stamp")" == "$stamp" && -f $out/rootfs.tar && -f $out/oci.tar ]]; then
    echo "$out"
    exit 0
fi

work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The root filesystem. Runtimes mount /proc, /sys, /dev and write /etc/hosts,
# /etc/resolv.conf, /etc/hostname themselves; the directories just need to exist.
root=$work/rootfs
mkdir -p "$root"/{bin,etc,proc,sys,dev,tmp,run,root,www,var/log}
chmod 1777 "$root/tmp"
cp "$BUSYBOX" "$root/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"
done
mkdir -p "$root/usr"
ln -s ../bin "$root/usr/bin"
ln -s bin "$root/sbin"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
touch "$root/etc/hosts" "$root/etc/resolv.conf" "$root/etc/hostname"
echo "hello from ferry-busybox" >"$root/www/index.html"

# Reproducible tar: sorted, fixed owner and mtime, so the layer digest only changes
# when the content does.
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
    -C "$root" -cf "$work/rootfs.tar" .

# The image archive (OCI layout, plus Docker's manifest.json), for `ctr images import`.
# shellcheck source=../lib/oci-archive.sh
source "$here/../lib/oci-archive.sh"
mkdir -p "$work/oci"
oci_archive "$IMAGE_NAME" "$work/rootfs.tar" \
    '{"Env":["PATH=/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/"}' "$work/oci" "$work/oci.tar"

mv -f "$work/rootfs.tar" "$out/rootfs.tar"
mv -f "$work/oci.tar" "$out/oci.tar"
echo "$IMAGE_NAME" >"$out/name"
echo "$stamp" >"$out/stamp"
echo "$out"
