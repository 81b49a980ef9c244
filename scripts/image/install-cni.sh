#!/bin/sh
# Runs in the DaemonSet's init container (busybox sh): installs the CNI plugins shipped in
# the image into the node's CNI plugin directory, mounted at DEST.
#
# Usage: ferry-install-cni DEST
#
# Each plugin is copied to a hidden temporary name in DEST and renamed over the old one:
# the runtime may exec a plugin at any moment, and a rename is atomic where a copy over a
# running binary is not (it fails with ETXTBSY, or a reader sees half a file). A plugin
# already identical is left alone, so a restart rewrites nothing. Other files in DEST are
# never touched.
set -eu

SRC=/opt/ferry/cni
dest=${1:?usage: ferry-install-cni DEST (the node CNI plugin directory, mounted)}
[ -d "$dest" ] || { echo "ferry-install-cni: $dest is not a directory: mount the node's CNI plugin directory there" >&2; exit 1; }

for plugin in "$SRC"/*; do
    name=${plugin##*/}
    if cmp -s "$plugin" "$dest/$name"; then
        echo "ferry-install-cni: $dest/$name is up to date"
        continue
    fi
    tmp="$dest/.$name.ferry-install.$$"
    cp "$plugin" "$tmp"
    chmod 0755 "$tmp"
    sync "$tmp" 2>/dev/null || sync
    mv -f "$tmp" "$dest/$name"
    echo "ferry-install-cni: installed $dest/$name"
done
