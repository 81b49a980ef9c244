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
# never touched. The plugins in /opt/ferry/cni-if-missing (the reference `loopback`, which
# containerd's CRI runs for every Pod sandbox) are installed only where DEST has none: the
# node's own copy wins.
set -eu

SRC=/opt/ferry/cni
IF_MISSING=/opt/ferry/cni-if-missing
dest=${1:?usage: ferry-install-cni DEST (the node CNI plugin directory, mounted)}
[ -d "$dest" ] || { echo "ferry-install-cni: $dest is not a directory: mount the node's CNI plugin directory there" >&2; exit 1; }

# put PLUGIN: copies PLUGIN into DEST under its name, atomically.
put() {
    name=${1##*/}
    tmp="$dest/.$name.ferry-install.$$"
    cp "$1" "$tmp"
    chmod 0755 "$tmp"
    sync "$tmp" 2>/dev/null || sync
    mv -f "$tmp" "$dest/$name"
    echo "ferry-install-cni: installed $dest/$name"
}

for plugin in "$SRC"/*; do
    if cmp -s "$plugin" "$dest/${plugin##*/}"; then
        echo "ferry-install-cni: $dest/${plugin##*/} is up to date"
    else
        put "$plugin"
    fi
done
for plugin in "$IF_MISSING"/*; do
    if [ -e "$dest/${plugin##*/}" ]; then
        echo "ferry-install-cni: $dest/${plugin##*/} is there already: left as it is"
    else
        put "$plugin"
    fi
done
