#!/usr/bin/env bash
# Builds the workspace and runs the whole test suite (what CI runs).
# Tests start their own registries/containerd/daemons on free loopback ports;
# on exit this script kills whatever of those this run left behind (found
# by a marker in their environment, by pid) and unmounts dead FUSE mounts
# under the tests' temp dirs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

# Every process started by this run inherits the marker.
export GGFS_TEST_RUN="run-$$-$(date +%s%N)"

# Kinds of processes tests start and may leak when a test is killed.
STRAY_NAMES='^(docker-registry|containerd|containerd-shim.*|ctr-remote|ggfs|ggfs-mountd|skopeo|umoci)$'

stray_pids() {
  local env pid comm
  for env in /proc/[0-9]*/environ; do
    pid=${env#/proc/}
    pid=${pid%/environ}
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || continue
    [[ $comm =~ $STRAY_NAMES ]] || continue
    if tr '\0' '\n' 2>/dev/null <"$env" | grep -qxF "GGFS_TEST_RUN=$GGFS_TEST_RUN"; then
      echo "$pid"
    fi
  done
}

# FUSE mounts under /tmp/ggfs-test-* whose daemon is gone (stat fails with
# ENOTCONN); live mounts of other concurrent runs are left alone.
unmount_dead() {
  local m
  awk '$3 ~ /^fuse/ && $2 ~ /^\/tmp\/ggfs-test-/ {print $2}' /proc/self/mounts |
    while read -r m; do
      m=$(printf '%b' "$m") # /proc/mounts escapes blanks as \040
      if ! stat "$m" >/dev/null 2>&1; then
        fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
      fi
    done
}

cleanup() {
  local pids
  pids=$(stray_pids | tr '\n' ' ')
  if [[ -n ${pids// /} ]]; then
    echo "test.sh: killing stray test processes: $pids" >&2
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    sleep 2
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
  fi
  unmount_dead
}
trap cleanup EXIT

cargo build --workspace --all-targets
# The library alone (what a crate depending on ggfs compiles) must build
# without the CLI and server features.
cargo check --lib --no-default-features

status=0
# Doctests first: nextest cannot run them, and its summary should be the
# last thing printed.
if grep -rqE '^\s*//[/!].*```' src mountd/src 2>/dev/null; then
  cargo test --workspace --doc || status=1
fi
cargo nextest run --workspace --no-fail-fast || status=1
exit "$status"
