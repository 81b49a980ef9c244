#!/usr/bin/env bash
# Runs Debian's containerd 1.6 on a test node, and its `ctr run --cni`, with nothing shared
# with the machine: a private config, root and state under the given state directory, and
# the daemon, its shims, the containers and every ctr inside a sandbox (sandbox.sh) in the
# node's network namespace.
#
# `ctr run --cni` has no flags for the CNI directories: it loads the first network config
# in /etc/cni/net.d and looks for plugins in /opt/cni/bin, and keeps libcni's cache in
# /var/lib/cni. In the sandbox those three paths are bind mounts of the test's own
# directories (/opt/cni/bin does not exist on the machine: it is made in a private overlay
# of /opt), so the machine's directories are never read nor written.
#
# Usage:
#   containerd.sh STATE start NETNS CNI_CONF_DIR CNI_PLUGIN_DIR
#       Writes STATE/config.toml, starts the sandbox in /run/netns/NETNS and containerd in
#       it, and imports the busybox image (build-image.sh) as
#       localhost/ferry/busybox:latest into the containerd namespace named after the
#       sandbox (sandbox.sh id).
#   containerd.sh STATE ctr ARG ...
#       Runs `ctr --address <socket> --namespace ferry ARG ...` in the sandbox, e.g.
#       `ctr run --cni --rm localhost/ferry/busybox:latest NAME wget ...`.
#       The CNI calls of `ctr run --cni` are made by that ctr process, not by containerd:
#       ADD after the task is created, DEL (with an empty CNI_NETNS) after it exits, so a
#       container gets its DEL only if its `ctr run` lives until the task ends.
#   containerd.sh STATE stop
#       Kills every task, waits up to 10 s for their `ctr run` to finish (and run DEL),
#       removes what is left, stops containerd, then the sandbox. Idempotent.
#
# Notes for this machine kind: the CRI plugin is disabled (it is not needed for ctr, and
# its restrict_oom_score_adj setting only matters through the CRI); the snapshotter is
# overlayfs (the state directory is on ext4; overlay works on it); tasks use the runc v2
# shim with runc and cgroupfs (cgroups v1 here). The sandbox's /run is a private tmpfs,
# which holds the shims' sockets (/run/containerd/s/...), fixed paths in containerd 1.6.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() {
    echo "containerd.sh: $*" >&2
    exit 1
}

(($# >= 2)) || die "usage: containerd.sh STATE start|ctr|stop ..."
state=$1
cmd=$2
shift 2
mkdir -p "$state"
state=$(cd "$state" && pwd)
sandbox=$state/sandbox
# The sandbox lives no longer than whoever runs `start` (a test process, a shell).
export FERRY_SANDBOX_OWNER=${FERRY_SANDBOX_OWNER:-$PPID}
socket=$state/run/containerd.sock

# The containerd namespace is the sandbox's id (sandbox.sh): ctr puts a task's cgroup at
# /<namespace>/<container>, so the cgroups are the sandbox's own, and `sandbox.sh stop`
# removes them. CNI_CONTAINERID is <namespace>-<container>.
ctr_in_sandbox() {
    local namespace
    namespace=$("$here/sandbox.sh" id "$sandbox")
    "$here/sandbox.sh" exec "$sandbox" ctr --address "$socket" --namespace "$namespace" "$@"
}

start() {
    (($# == 3)) || die "usage: containerd.sh STATE start NETNS CNI_CONF_DIR CNI_PLUGIN_DIR"
    local netns=$1 conf_dir plugin_dir
    conf_dir=$(cd "$2" && pwd) || die "no CNI config directory $2"
    plugin_dir=$(cd "$3" && pwd) || die "no CNI plugin directory $3"
    command -v containerd >/dev/null || die "containerd missing: install it (scripts/setup.sh does)"
    ((${#socket} < 100)) || die "socket path $socket is too long for a unix socket: use a shorter TMPDIR"
    mkdir -p "$state"/{root,run,cni-cache}

    cat >"$state/config.toml" <<EOF
# Written by scripts/runtimes/containerd.sh for one test node; see that script.
version = 2
root = "$state/root"
state = "$state/run"
oom_score = 0
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "$socket"

[ttrpc]
  address = "$socket.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$state/opt"
EOF

    "$here/sandbox.sh" start "$sandbox" "$netns" \
        "$state/cni-cache:/var/lib/cni" "$conf_dir:/etc/cni/net.d" "$plugin_dir:/opt/cni/bin"
    # Started from a shell inside the sandbox, so that containerd's parent is the sandbox's
    # init and no process outside waits for it; its pid (in the sandbox) goes to a file.
    "$here/sandbox.sh" exec "$sandbox" sh -c \
        'containerd --config "$1" </dev/null >>"$2" 2>&1 & echo $! >"$3"' \
        sh "$state/config.toml" "$state/containerd.log" "$state/containerd.pid"
    local i
    for ((i = 0; i < 200; i++)); do
        if ctr_in_sandbox version >/dev/null 2>&1; then break; fi
        if ! "$here/sandbox.sh" exec "$sandbox" kill -0 "$(cat "$state/containerd.pid")" 2>/dev/null; then
            die "containerd exited at start; its log ($state/containerd.log) ends with: $(tail -n 20 "$state/containerd.log")"
        fi
        sleep 0.05
    done
    ctr_in_sandbox version >/dev/null ||
        die "containerd does not answer on $socket; its log ($state/containerd.log) ends with: $(tail -n 20 "$state/containerd.log")"

    local image_dir
    image_dir=$("$here/build-image.sh")
    ctr_in_sandbox images import "$image_dir/oci.tar" >/dev/null || die "ctr images import failed (see above)"
}

stop() {
    if [[ -z $("$here/sandbox.sh" pid "$sandbox" 2>/dev/null) ]]; then
        "$here/sandbox.sh" stop "$sandbox"
        return 0
    fi
    local tasks containers i id
    tasks=$(ctr_in_sandbox tasks list --quiet 2>/dev/null || true)
    for id in $tasks; do
        ctr_in_sandbox tasks kill --signal SIGKILL "$id" >/dev/null 2>&1 || true
    done
    # A `ctr run --rm` that is still attached sees its task exit, runs the CNI DEL and
    # removes the container; give those a moment before removing what is left.
    for ((i = 0; i < 100; i++)); do
        containers=$(ctr_in_sandbox containers list --quiet 2>/dev/null || true)
        [[ -n $containers ]] || break
        # No ctr left in the sandbox: nobody will remove them.
        "$here/sandbox.sh" exec "$sandbox" pgrep -x ctr >/dev/null || break
        sleep 0.1
    done
    for id in $containers; do
        echo "containerd.sh: container $id had no ctr run left to remove it (no CNI DEL for it)" >&2
        ctr_in_sandbox tasks delete --force "$id" >/dev/null 2>&1 || true
        ctr_in_sandbox containers delete "$id" >/dev/null 2>&1 || true
    done
    if [[ -f $state/containerd.pid ]]; then
        "$here/sandbox.sh" exec "$sandbox" kill -TERM "$(cat "$state/containerd.pid")" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            "$here/sandbox.sh" exec "$sandbox" kill -0 "$(cat "$state/containerd.pid")" 2>/dev/null || break
            sleep 0.1
        done
    fi
    "$here/sandbox.sh" stop "$sandbox"
}

case $cmd in
start) start "$@" ;;
ctr) ctr_in_sandbox "$@" ;;
stop) stop ;;
*) die "unknown command $cmd: use start, ctr or stop" ;;
esac
