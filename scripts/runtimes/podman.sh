#!/usr/bin/env bash
# Runs Debian's podman 4.3 (rootful, CNI network backend) on a test node, with nothing
# shared with the machine: its own containers.conf and storage.conf, storage under the
# given state directory, and every podman process inside a sandbox (sandbox.sh) in the
# node's network namespace, so CNI plugins make cni0, veths and firewall rules there.
#
# Usage:
#   podman.sh STATE start NETNS CNI_CONF_DIR CNI_PLUGIN_DIR
#       Writes STATE/containers.conf and STATE/storage.conf, starts the sandbox in
#       /run/netns/NETNS, and imports the busybox image (build-image.sh) as
#       localhost/ferry/busybox:latest. Networks are the conflists in CNI_CONF_DIR (run a
#       container on one with `--network <its name>`); plugins come from CNI_PLUGIN_DIR.
#   podman.sh STATE podman ARG ...
#       Runs `podman ARG ...` in the sandbox with the private configuration (`run` and
#       `create` get --cgroup-parent=/<sandbox id>, see sandbox.sh).
#   podman.sh STATE stop
#       Removes every container (podman runs the CNI DELs), then stops the sandbox, which
#       kills whatever is left (conmon, containers). Idempotent.
#   podman.sh STATE env
#       Prints the environment podman runs with (to paste into a shell when debugging:
#       then `scripts/runtimes/sandbox.sh exec STATE/sandbox podman ...`).
#
# What podman needs on a machine like the test machines (no systemd, no journald,
# cgroups v1 with a cgroup2 hierarchy at /sys/fs/cgroup/unified, a low hard nofile limit):
#   cgroup_manager = "cgroupfs"  there is no systemd to ask for scopes;
#   events_logger = "file"       there is no journald;
#   default_ulimits              podman's default nofile is 1048576, above the hard limit
#                                here, and runc fails setting it;
#   runtime = "runc"             crun works too, but runc is what containerd uses as well;
#   network_backend = "cni"      Debian's podman 4.3 has no netavark; cni_plugin_dirs and
#                                network_config_dir point at the test's directories.
# The sandbox gives podman a private /run (tmp_dir, runc's state, netns bind mounts in
# /run/netns) and /dev/shm (its SHM lock segment), and a private /var/lib/cni (libcni's
# result cache, which podman uses and does not let one configure).
# `ip netns exec` would remount /sys and hide the cgroup mounts runc needs: the sandbox
# enters the netns with nsenter instead.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMAGE=localhost/ferry/busybox:latest

die() {
    echo "podman.sh: $*" >&2
    exit 1
}

(($# >= 2)) || die "usage: podman.sh STATE start|podman|stop|env ..."
state=$1
cmd=$2
shift 2
mkdir -p "$state"
state=$(cd "$state" && pwd)
sandbox=$state/sandbox
# The sandbox lives no longer than whoever runs `start` (a test process, a shell).
export FERRY_SANDBOX_OWNER=${FERRY_SANDBOX_OWNER:-$PPID}

export CONTAINERS_CONF=$state/containers.conf
export CONTAINERS_STORAGE_CONF=$state/storage.conf
export CONTAINERS_REGISTRIES_CONF=$state/registries.conf

podman_in_sandbox() {
    "$here/sandbox.sh" exec "$sandbox" podman "$@"
}

# `podman run` and `podman create` get the sandbox's own cgroup parent (instead of the
# shared /libpod_parent), which `sandbox.sh stop` removes; other commands pass unchanged.
podman_cmd() {
    case ${1:-} in
    run | create)
        local sub=$1
        shift
        podman_in_sandbox "$sub" --cgroup-parent="/$("$here/sandbox.sh" id "$sandbox")" "$@"
        ;;
    *) podman_in_sandbox "$@" ;;
    esac
}

start() {
    (($# == 3)) || die "usage: podman.sh STATE start NETNS CNI_CONF_DIR CNI_PLUGIN_DIR"
    local netns=$1 conf_dir plugin_dir
    conf_dir=$(cd "$2" && pwd) || die "no CNI config directory $2"
    plugin_dir=$(cd "$3" && pwd) || die "no CNI plugin directory $3"
    command -v podman >/dev/null || die "podman missing: install it (scripts/setup.sh does)"
    mkdir -p "$state"/{storage,run,tmp,volumes,cni-cache}

    cat >"$CONTAINERS_CONF" <<EOF
# Written by scripts/runtimes/podman.sh for one test node; see that script.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
log_driver = "k8s-file"
# conmon stays in the caller's cgroup rather than one of its own.
cgroups = "no-conmon"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$state/events.log"
runtime = "runc"
tmp_dir = "$state/tmp"
static_dir = "$state/storage/libpod"
volume_path = "$state/volumes"
num_locks = 128

[network]
network_backend = "cni"
cni_plugin_dirs = ["$plugin_dir"]
network_config_dir = "$conf_dir"
EOF

    cat >"$CONTAINERS_STORAGE_CONF" <<EOF
# Written by scripts/runtimes/podman.sh for one test node; see that script.
[storage]
driver = "overlay"
graphroot = "$state/storage"
runroot = "$state/run"
EOF
    # No registry is reachable, and none is needed: images are imported from local files.
    echo 'unqualified-search-registries = []' >"$CONTAINERS_REGISTRIES_CONF"

    "$here/sandbox.sh" start "$sandbox" "$netns" \
        "$state/cni-cache:/var/lib/cni" "$conf_dir:/etc/cni/net.d" "$plugin_dir:/opt/cni/bin"
    local image_dir
    image_dir=$("$here/build-image.sh")
    podman_in_sandbox import --quiet "$image_dir/rootfs.tar" "$IMAGE" >/dev/null ||
        die "podman import failed (see above)"
}

stop() {
    [[ -n $("$here/sandbox.sh" pid "$sandbox" 2>/dev/null) ]] || { "$here/sandbox.sh" stop "$sandbox"; return 0; }
    # rm -f stops each container (SIGKILL after 0 s) and tears its network down: this is
    # where podman calls the plugins' DEL.
    if ! podman_in_sandbox rm --all --force --time 0 >/dev/null; then
        echo "podman.sh: podman rm --all failed; killing the sandbox anyway" >&2
    fi
    # Not `podman system prune`: it would also remove the test's network (with the CNI
    # backend that deletes the conflist and the bridge). Image layer mounts go away with
    # the sandbox's mount namespace.
    "$here/sandbox.sh" stop "$sandbox"
}

case $cmd in
start) start "$@" ;;
podman) podman_cmd "$@" ;;
stop) stop ;;
env) echo "CONTAINERS_CONF=$CONTAINERS_CONF CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF CONTAINERS_REGISTRIES_CONF=$CONTAINERS_REGISTRIES_CONF" ;;
*) die "unknown command $cmd: use start, podman, stop or env" ;;
esac
