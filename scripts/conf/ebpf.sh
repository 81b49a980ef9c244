#!/usr/bin/env bash
# Writes the eBPF variant of a Ferry manifest: the same DaemonSet running
# `ferry-proxy run --backend=ebpf`, with what that back end needs of the node and nothing
# more. Run after every change to conf/ferry.yaml (proxy/tests/conf.rs fails until the
# files agree):
#
#   scripts/conf/k3s.sh && scripts/conf/ebpf.sh   # conf/ferry-ebpf.yaml and conf/ferry-k3s-ebpf.yaml
#   scripts/conf/ebpf.sh IN OUT                    # one manifest
#
# What it adds (each with its reason, in the output's comments):
#   - an init container `prepare-node`, the only privileged one: sets
#     net.ipv4.conf.all.accept_local=1 and mounts a bpf file system at the host's
#     /sys/fs/bpf when there is none (Bidirectional, so the mount is the host's);
#   - the daemon's --backend=ebpf and --cgroup=/host/sys/fs/cgroup;
#   - the host's /sys/fs/bpf (read-write, HostToContainer) and /sys/fs/cgroup (read-only)
#     in the daemon's container;
#   - the daemon's capabilities: NET_ADMIN, BPF and PERFMON instead of NET_ADMIN alone.
#
# Usage: scripts/conf/ebpf.sh [IN OUT] (default: both pairs above)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if (($# == 0)); then
    "$0" "$repo/conf/ferry.yaml" "$repo/conf/ferry-ebpf.yaml"
    exec "$0" "$repo/conf/ferry-k3s.yaml" "$repo/conf/ferry-k3s-ebpf.yaml"
fi
(($# == 2)) || { echo "usage: scripts/conf/ebpf.sh [IN OUT]" >&2; exit 2; }
in=$1
out=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Each block goes in at one anchor line of the input; the anchors must each be there once.
cat >"$work/init" <<'EOF'
        # The eBPF back end needs two things of the node that the daemon's unprivileged
        # container cannot do; this container does them (each only when not done yet) and
        # exits. It is the manifest's only privileged container.
        # - net.ipv4.conf.all.accept_local=1: the tc program's translated packets carry the
        #   node's own address as their source, which the kernel drops as martian without
        #   it; /proc/sys is read-only in an unprivileged container.
        # - a bpf file system at the host's /sys/fs/bpf (systemd mounts one; a bare node may
        #   have none): the pins must be the host's, so that a replaced Pod finds the maps
        #   and the links (the programs stay attached and open connections keep their
        #   translation through a restart); a bpffs the daemon mounted in its own container
        #   would go with the container. Bidirectional propagation makes this mount the
        #   host's.
        - name: prepare-node
          image: localhost/ferry:dev
          imagePullPolicy: IfNotPresent
          command:
            - /bin/sh
            - -ec
            - |
              f=/proc/sys/net/ipv4/conf/all/accept_local
              [ "$(cat $f)" = 1 ] || { echo 1 >$f; echo "set net.ipv4.conf.all.accept_local=1"; }
              grep -q ' /host/sys/fs/bpf bpf ' /proc/mounts || {
                mount -t bpf bpf /host/sys/fs/bpf; echo "mounted a bpf file system at the host's /sys/fs/bpf"; }
          securityContext:
            privileged: true
            readOnlyRootFilesystem: true
            runAsUser: 0
          volumeMounts:
            - name: bpffs
              mountPath: /host/sys/fs/bpf
              mountPropagation: Bidirectional
EOF
cat >"$work/args" <<'EOF'
            # Services in eBPF: cgroup socket programs pick the endpoint at connect() and
            # sendmsg() (no per-packet NAT), a tc program serves NodePorts from outside.
            # Pins: /sys/fs/bpf/ferry/<node> (the host's bpffs, mounted below).
            - --backend=ebpf
            # Whose sockets are translated: every process in this cgroup v2 tree. The host's
            # /sys/fs/cgroup (mounted below) holds every Pod, the kubelet and the node's
            # own processes: on pure cgroup v2 hosts it is the cgroup2 root itself; on
            # hybrid hosts (v1 controllers beside /sys/fs/cgroup/unified) the daemon uses
            # its `unified` directory and logs so; on cgroup v1 only hosts it stops with an
            # error (use conf/ferry.yaml there).
            - --cgroup=/host/sys/fs/cgroup
EOF
cat >"$work/caps" <<'EOF'
            # The minimum for --backend=ebpf, found by trying (Linux 6.18): without any one
            # of these it stops at start. NET_ADMIN: loading and attaching the socket and tc
            # programs, the policy table in nftables, conntrack, routes, the VXLAN device; BPF:
            # loading programs, making and pinning maps and links; PERFMON: the verifier
            # refuses the tc program's packet pointer arithmetic to a loader without it.
            # Not SYS_ADMIN (it would stand for BPF and PERFMON, and for much else): the
            # bpffs is mounted by the init container above, which also sets the sysctl, so
            # the daemon is not privileged. Health check node ports come from the NodePort
            # range (30000+ by default), so no NET_BIND_SERVICE: add it if your range goes
            # below 1024.
            capabilities:
              drop: ["ALL"]
              add: ["NET_ADMIN", "BPF", "PERFMON"]
EOF
cat >"$work/mounts" <<'EOF'
            # The host's bpffs (the pins); HostToContainer: a bpffs the init container (or
            # the host) mounts shows here.
            - name: bpffs
              mountPath: /sys/fs/bpf
              mountPropagation: HostToContainer
            # The host's cgroup tree, for --cgroup; opening the directory is all an attach
            # needs, so read-only.
            - name: cgroup
              mountPath: /host/sys/fs/cgroup
              readOnly: true
EOF
cat >"$work/volumes" <<'EOF'
        # The host's pins live here (a bpf file system; the init container mounts one when
        # the host has none).
        - name: bpffs
          hostPath:
            path: /sys/fs/bpf
            type: Directory
        - name: cgroup
          hostPath:
            path: /sys/fs/cgroup
            type: Directory
EOF

awk -v dir="$work" -v outname="$(basename "$out")" -v inname="conf/$(basename "$in")" '
function put(name,   line) { while ((getline line < (dir "/" name)) > 0) print line; close(dir "/" name); done[name]++ }
# The header: what this file is and how it is made.
NR == 1 {
    print "# GENERATED by scripts/conf/ebpf.sh from " inname ": edit that file, then run the script."
    print "# The eBPF back end (README.md, \"Services in eBPF\"): Linux >= 5.18 with BTF,"
    print "# cgroup v2 (pure or hybrid), bpffs; the daemon runs with more capabilities than"
    print "# the nftables DaemonSet and one init container is privileged (see below)."
    print "#"
}
# The capability comment of the nftables DaemonSet and its list: replaced by the eBPF ones.
/# NET_ADMIN is all it needs:/ { skipping = 1 }
skipping && /add: \["NET_ADMIN"\]/ { skipping = 0; put("caps"); next }
skipping { next }
/^            - --healthz-bind-address=/ { put("args") }
/^          ports:$/ { put("mounts") }
{ sub(/kubectl apply -f conf\/ferry(-k3s)?\.yaml/, "kubectl apply -f conf/" outname) }
{ print }
/^      initContainers:$/ { put("init") }
END {
    put("volumes")
    for (b in want) if (done[b] != 1) { print "ebpf.sh: anchor for " b " found " done[b] + 0 " times" > "/dev/stderr"; exit 1 }
}
BEGIN { split("init args caps mounts volumes", w, " "); for (i in w) want[w[i]] = 1 }
' "$in" >"$work/out"
mv "$work/out" "$out"
