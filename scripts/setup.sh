#!/usr/bin/env bash
# Installs what building and testing Ferry needs on a Debian 12 machine. Idempotent and
# quiet when everything is there already; needs root only when something is missing.
set -euo pipefail

# iproute2, nftables: the testbed and the plugins' own tests; containernetworking-plugins:
# the reference plugins (/usr/lib/cni) Ferry is compared with; clang, libbpf-dev: building
# the eBPF programs; hyperfine: benchmarks; procps, util-linux: ps/kill, nsenter/unshare;
# podman, conmon, containerd, runc, catatonit, busybox-static: the real runtimes the tests
# run on a Ferry network (scripts/runtimes/; catatonit is their sandbox's init, busybox
# the image's only binary).
PACKAGES=(make iproute2 iputils-ping nftables containernetworking-plugins clang libbpf-dev hyperfine procps util-linux
    podman conmon containerd runc catatonit busybox-static)
RUST_COMPONENTS=(rustfmt clippy)

installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done

if ((${#missing[@]})); then
    if ((EUID != 0)); then
        echo "setup: missing Debian packages: ${missing[*]}; run as root (sudo make setup) to install them" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found: install the Rust toolchain with rustup first" >&2
    exit 1
fi
if command -v rustup >/dev/null; then
    have=$(rustup component list --installed 2>/dev/null)
    for component in "${RUST_COMPONENTS[@]}"; do
        if ! grep -q "^${component}" <<<"$have"; then
            echo "setup: adding rustup component $component"
            rustup component add "$component"
        fi
    done
else
    for tool in rustfmt cargo-clippy; do
        command -v "$tool" >/dev/null ||
            { echo "setup: $tool not found and no rustup to add it" >&2; exit 1; }
    done
fi
