#!/usr/bin/env bash
# Records every CNI call a runtime makes: wraps the plugins of a plugin directory so that
# each call's environment, stdin, stdout, stderr and exit status are written to a log
# directory, then runs the real plugin with exactly what the runtime sent.
#
# Usage:
#   cni-log-wrapper.sh wrap PLUGIN_DIR LOG_DIR
#       Moves each plugin of PLUGIN_DIR into PLUGIN_DIR/.real/ and puts a symlink to this
#       script in its place. Calls through CNI_PATH (a main plugin delegating to its IPAM
#       plugin) are recorded too, as they find the wrapper first.
#   cni-log-wrapper.sh show LOG_DIR
#       Prints the recorded calls in order, one block per call.
#
# Each call becomes a directory LOG_DIR/<nanoseconds>-<pid>-<plugin>-<verb>/ holding
#   env     the whole environment, sorted, one VAR=value a line
#   stdin   what the runtime wrote (the network config, with runtimeConfig, prevResult)
#   stdout  what the plugin answered (result or error JSON)
#   stderr  the plugin's stderr
#   exit    its exit status
#   ms      how long the real plugin took, in milliseconds
# Directory names sort in call order. Invoked through the symlink, the script finds the
# real plugin in <dir of the symlink>/.real/<name> and the log directory in
# <dir of the symlink>/.real/.log-dir.
set -euo pipefail

die() {
    echo "cni-log-wrapper: $*" >&2
    exit 1
}

self=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
name=$(basename "$0")

if [[ $name == cni-log-wrapper.sh ]]; then
    case ${1:-} in
    wrap)
        (($# == 3)) || die "usage: cni-log-wrapper.sh wrap PLUGIN_DIR LOG_DIR"
        plugin_dir=$(cd "$2" && pwd)
        mkdir -p "$3"
        log_dir=$(cd "$3" && pwd)
        mkdir -p "$plugin_dir/.real"
        echo "$log_dir" >"$plugin_dir/.real/.log-dir"
        for plugin in "$plugin_dir"/*; do
            [[ -x $plugin && ! -d $plugin ]] || continue
            [[ $(readlink "$plugin" || true) != "$self" ]] || continue # wrapped already
            mv "$plugin" "$plugin_dir/.real/"
            ln -s "$self" "$plugin"
        done
        ;;
    show)
        (($# == 2)) || die "usage: cni-log-wrapper.sh show LOG_DIR"
        for call in "$2"/*/; do
            [[ -d $call ]] || continue
            echo "=== $(basename "$call")  exit $(cat "$call/exit" 2>/dev/null || echo '?') in $(cat "$call/ms" 2>/dev/null || echo '?') ms"
            grep -E '^(CNI_|PATH=)' "$call/env" | sed 's/^/  env  /'
            echo "  stdin  $(cat "$call/stdin")"
            echo "  stdout $(cat "$call/stdout" 2>/dev/null)"
            [[ ! -s $call/stderr ]] || echo "  stderr $(cat "$call/stderr")"
        done
        ;;
    *) die "usage: cni-log-wrapper.sh wrap PLUGIN_DIR LOG_DIR | show LOG_DIR" ;;
    esac
    exit 0
fi

# Invoked as a plugin.
dir=$(dirname "$0")
real=$dir/.real/$name
[[ -x $real ]] || die "no real plugin at $real"
log_dir=$(cat "$dir/.real/.log-dir")
call=$log_dir/$(date +%s%N)-$$-$name-${CNI_COMMAND:-none}
mkdir -p "$call"
env | LC_ALL=C sort >"$call/env"
cat >"$call/stdin"
start=$(date +%s%N)
status=0
"$real" "$@" <"$call/stdin" >"$call/stdout" 2>"$call/stderr" || status=$?
echo $((($(date +%s%N) - start) / 1000000)) >"$call/ms"
echo "$status" >"$call/exit"
cat "$call/stdout"
cat "$call/stderr" >&2
exit "$status"
