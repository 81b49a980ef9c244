#!/usr/bin/env bash
# A private place for a container runtime on a test node: the node's network namespace,
# plus a new mount namespace and a new PID namespace, so that
#   - every link, route and nftables/iptables rule the runtime (and the CNI plugins it
#     calls) makes lands in the node's netns, never in the machine's root netns;
#   - /sys is the node netns's sysfs (the cgroup mounts carried over), so /sys/class/net
#     lists the node's devices, not the machine's;
#   - the fixed paths runtimes insist on (/etc/cni/net.d, /opt/cni/bin, /var/lib/cni,
#     /run/containerd, /run/netns, /dev/shm, ...) are private: bind mounts of the test's
#     own directories, or fresh tmpfs, visible to nobody outside;
#   - nothing outlives `stop`: killing the PID namespace's init kills every process in it
#     (daemons, shims, conmon, containers, whose PID namespaces are nested in it), and the
#     mount namespace with all its mounts goes away with its last process.
#
# Usage:
#   sandbox.sh start DIR NETNS [SRC:DST ...]
#       Starts the sandbox, inside /run/netns/NETNS, keeping its bookkeeping in DIR.
#       /run and /dev/shm get fresh tmpfs; each SRC:DST bind-mounts directory SRC over
#       DST. A DST that does not exist on the machine (e.g. /opt/cni/bin) is made inside
#       a private overlay of its nearest existing parent (writes go to DIR, never to the
#       machine's files). Returns when the sandbox is ready.
#       With FERRY_SANDBOX_OWNER=<pid> set, a watcher kills the sandbox once that process
#       is gone, so a test process killed with SIGKILL leaves nothing running.
#   sandbox.sh exec DIR CMD [ARG ...]
#       Runs CMD inside the sandbox (its netns, mounts and PID namespace) with the caller's
#       environment; exits with CMD's status.
#   sandbox.sh stop DIR
#       Kills everything in the sandbox (SIGKILL; stop runtimes gracefully before, so
#       that they run their CNI DELs). Idempotent.
#   sandbox.sh pid DIR
#       Prints the machine-side pid of the sandbox's init.
#   sandbox.sh id DIR
#       Prints the sandbox's unique name, ferry-<netns>-<8 hex digits>. Runtimes use it as
#       their cgroup parent (podman's --cgroup-parent, containerd's namespace), and `stop`
#       removes the cgroups of that name it finds at the top of each hierarchy: runc
#       creates cgroups in the machine's cgroup filesystem, and this way none is left.
#
# Needs root, util-linux (nsenter, unshare) and catatonit (the sandbox's init, which
# reaps orphaned processes such as conmon and containerd shims).
set -euo pipefail

self=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")

die() {
    echo "sandbox: $*" >&2
    exit 1
}

# The sandbox's first process (PID 1 in its PID namespace, already in the new mount
# namespace and the node's netns): makes the private mounts, then becomes catatonit.
init() {
    local dir=$1
    shift
    # unshare --propagation private made every mount private already; say it again, as
    # this is what keeps the mounts below from ever reaching the machine's namespace.
    mount --make-rprivate /
    # A /sys of the node's netns: the inherited one shows the machine's root netns
    # devices in /sys/class/net, which a plugin or runtime writing there would change.
    # The cgroup hierarchies runc needs are carried over (`ip netns exec` remounts /sys
    # too, but drops them, which is why the sandbox enters the netns with nsenter).
    mkdir -p "$dir/cgroup-move"
    mount --rbind /sys/fs/cgroup "$dir/cgroup-move"
    mount -t sysfs ferry-sandbox-sys /sys
    mount --move "$dir/cgroup-move" /sys/fs/cgroup
    mount -t tmpfs -o mode=755,size=64m ferry-sandbox-run /run
    mkdir -p /run/netns /run/lock
    mount -t tmpfs -o mode=1777,size=64m ferry-sandbox-shm /dev/shm
    local -A overlaid=()
    local n=0 bind src dst anc
    # Overlays first, binds after: an overlay mounted over a parent would hide a bind made
    # below it earlier (e.g. /etc/cni/net.d bound, then /etc overlaid for /etc/kubernetes).
    for bind in "$@"; do
        src=${bind%%:*}
        dst=${bind#*:}
        [[ -d $src ]] || die "bind source $src is not a directory"
        if [[ ! -d $dst ]]; then
            anc=$dst
            while [[ ! -d $anc ]]; do anc=$(dirname "$anc"); done
            [[ $anc != / ]] || die "cannot make $dst: no parent to overlay but /"
            if [[ -z ${overlaid[$anc]:-} ]]; then
                n=$((n + 1))
                mkdir -p "$dir/overlay/$n/upper" "$dir/overlay/$n/work"
                mount -t overlay ferry-sandbox-overlay \
                    -o "lowerdir=$anc,upperdir=$dir/overlay/$n/upper,workdir=$dir/overlay/$n/work" "$anc"
                overlaid[$anc]=1
            fi
            mkdir -p "$dst"
        fi
    done
    for bind in "$@"; do
        mount --bind "${bind%%:*}" "${bind#*:}"
    done
    touch "$dir/sandbox.ready"
    exec catatonit -P
}

# Whether pid $1 is a live process (not gone, not a zombie).
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# The machine-side pid of the init, or nothing when the sandbox is not running.
init_pid() {
    local dir=$1 outer
    [[ -f $dir/sandbox.pid ]] || return 0
    outer=$(cat "$dir/sandbox.pid")
    # Only our own unshare (its command line names this DIR), never a reused pid.
    [[ -r /proc/$outer/cmdline ]] && tr '\0' ' ' <"/proc/$outer/cmdline" | grep -qF -- "__init $dir " || return 0
    local children
    children=$(cat "/proc/$outer/task/$outer/children" 2>/dev/null || pgrep -P "$outer" || true)
    children=${children%% *}
    echo "${children//[!0-9]/}"
}

start() {
    local dir=$1 netns=$2
    shift 2
    [[ -e /run/netns/$netns ]] || die "no network namespace /run/netns/$netns"
    command -v catatonit >/dev/null || die "catatonit missing: install it (scripts/setup.sh does)"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ -n $(init_pid "$dir") ]]; then die "a sandbox is running in $dir already"; fi
    rm -f "$dir/sandbox.ready" "$dir/sandbox.pid"
    echo "ferry-$netns-$(echo "$dir" | sha256sum | cut -c1-8)" >"$dir/sandbox.id"
    # Not setsid: a Ctrl-C of the test run reaches unshare too, and --kill-child then takes
    # the whole sandbox down. The trailing "" keeps "__init DIR " matchable in cmdline.
    nsenter --net="/run/netns/$netns" -- \
        unshare --mount --propagation private --pid --fork --kill-child --mount-proc -- \
        "$self" __init "$dir" "$@" "" </dev/null >>"$dir/sandbox.log" 2>&1 &
    echo $! >"$dir/sandbox.pid"
    local i
    for ((i = 0; i < 200; i++)); do
        if [[ -f $dir/sandbox.ready ]]; then
            local pid
            pid=$(init_pid "$dir")
            [[ -n $pid ]] || break
            echo "$pid" >"$dir/sandbox.init"
            [[ -z ${FERRY_SANDBOX_OWNER:-} ]] || watch_owner "$FERRY_SANDBOX_OWNER" "$dir"
            return 0
        fi
        alive "$(cat "$dir/sandbox.pid")" || break
        sleep 0.05
    done
    stop "$dir"
    die "the sandbox did not start; its log ($dir/sandbox.log) says: $(cat "$dir/sandbox.log")"
}

# Stops the sandbox in DIR ($2) when process $1 is gone; ends by itself when the sandbox
# is stopped otherwise.
watch_owner() {
    local owner=$1 dir=$2 outer
    [[ $owner =~ ^[0-9]+$ ]] || die "FERRY_SANDBOX_OWNER=$owner is not a pid"
    outer=$(cat "$dir/sandbox.pid")
    (
        while alive "$owner" && alive "$outer"; do sleep 1; done
        if alive "$outer"; then "$self" stop "$dir"; fi
    ) </dev/null >>"$dir/sandbox.log" 2>&1 &
}

run_in() {
    local dir=$1
    shift
    local pid
    pid=$(init_pid "$dir")
    [[ -n $pid ]] || die "no sandbox running in $dir"
    exec nsenter --target "$pid" --mount --net --pid --wd=/ -- "$@"
}

stop() {
    local dir=$1 outer pid i
    [[ -f $dir/sandbox.pid ]] || return 0
    outer=$(cat "$dir/sandbox.pid")
    pid=$(init_pid "$dir")
    if [[ -n $pid ]]; then
        # SIGKILL to a PID namespace's init kills every process in the namespace.
        kill -KILL "$pid" 2>/dev/null || true
        kill -KILL "$outer" 2>/dev/null || true
        for ((i = 0; i < 200; i++)); do
            alive "$pid" || alive "$outer" || break
            sleep 0.05
        done
        ! alive "$pid" || die "sandbox init $pid still alive after SIGKILL"
    fi
    remove_cgroups "$dir"
    rm -f "$dir/sandbox.pid" "$dir/sandbox.ready" "$dir/sandbox.init"
}

# Removes the (now empty) cgroups named after the sandbox, in every hierarchy.
remove_cgroups() {
    local dir=$1 id top i left
    [[ -f $dir/sandbox.id ]] || return 0
    id=$(cat "$dir/sandbox.id")
    [[ $id == ferry-* ]] || return 0
    for ((i = 0; i < 50; i++)); do
        left=0
        for top in /sys/fs/cgroup /sys/fs/cgroup/*; do
            [[ -d $top/$id ]] || continue
            # Depth first: a cgroup goes once its children have; its files are not removable
            # (and need not be), rmdir of the directory is all it takes.
            find "$top/$id" -depth -type d -exec rmdir {} + 2>/dev/null || left=1
        done
        ((left)) || return 0
        sleep 0.1
    done
    echo "sandbox: could not remove cgroups named $id (still in use?)" >&2
}

cmd=${1:-}
case $cmd in
__init) shift; dir=$1; shift; args=("$@"); unset 'args[-1]'; init "$dir" "${args[@]}" ;;
start) (($# >= 3)) || die "usage: sandbox.sh start DIR NETNS [SRC:DST ...]"; shift; start "$@" ;;
exec) (($# >= 3)) || die "usage: sandbox.sh exec DIR CMD [ARG ...]"; shift; d=$(cd "$1" && pwd); shift; run_in "$d" "$@" ;;
stop) (($# == 2)) || die "usage: sandbox.sh stop DIR"; stop "$(cd "$2" 2>/dev/null && pwd || echo "$2")" ;;
pid) (($# == 2)) || die "usage: sandbox.sh pid DIR"; init_pid "$(cd "$2" && pwd)" ;;
id) (($# == 2)) || die "usage: sandbox.sh id DIR"; cat "$2/sandbox.id" ;;
*) die "usage: sandbox.sh start|exec|stop|pid|id DIR ..." ;;
esac
