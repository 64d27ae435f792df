#!/usr/bin/env bash
# The ggfs demo: installs what it needs, builds, starts the embedded registry,
# builds an image from a local directory, pushes it, and shows the CLI and
# the mount at work, reads and a write committed as a new image. Leaves
# nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --workspace --quiet
GGFS=${CARGO_TARGET_DIR:-$PWD/target}/release/ggfs
WORK=$(mktemp -d /tmp/ggfs-demo.XXXXXX)
PORT=${GGFS_DEMO_PORT:-5055}
REG=127.0.0.1:$PORT
MNT=$WORK/mnt

cleanup() {
    "$GGFS" unmount "$MNT" 2>/dev/null || true
    [ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

"$GGFS" registry serve --address "$REG" 2>"$WORK/server.log" &
SERVER=$!
for _ in $(seq 50); do curl -fs "http://$REG/v2/" >/dev/null && break; sleep 0.1; done

# A small image built from a local directory.
mkdir -p "$WORK/app/etc" "$WORK/app/bin"
echo 'PRETTY_NAME="ggfs demo"' >"$WORK/app/etc/os-release"
printf '#!/bin/sh\necho hello from ggfs\n' >"$WORK/app/bin/hello"
chmod +x "$WORK/app/bin/hello"

step "$GGFS" append -f "$WORK/app" -t "$REG/demo/app:v1"
step "$GGFS" catalog "$REG"
step "$GGFS" ls "$REG/demo/app"
step "$GGFS" digest "$REG/demo/app:v1"
step "$GGFS" manifest "$REG/demo/app:v1"
echo
step "$GGFS" copy "$REG/demo/app:v1" "$REG/demo/copy:v1"
step "$GGFS" export "$REG/demo/app:v1" "$WORK/app.tar"
step tar -tvf "$WORK/app.tar"

mkdir -p "$MNT"
step "$GGFS" mount "$REG" "$MNT"
step ls "$MNT" "$MNT/demo" "$MNT/demo/app" "$MNT/demo/app/v1"
step find "$MNT/demo/app/v1/rootfs"
step cat "$MNT/demo/app/v1/rootfs/etc/os-release"
# Writes: the change becomes a new layer on the image, pushed; the tag moves.
step sh -c "echo 'written through the mount' > $MNT/demo/app/v1/rootfs/etc/motd"
step "$GGFS" commit "$MNT/demo/app/v1" -m "motd from the demo"
step "$GGFS" status "$MNT"
step sh -c "$GGFS manifest $REG/demo/app:v1 | jq '.layers | length'"
step sh -c "$GGFS export $REG/demo/app:v1 - | tar -xOf - etc/motd"
step cat "$MNT/.ggfs/stats"
step "$GGFS" unmount "$MNT"
echo
echo "demo done."
