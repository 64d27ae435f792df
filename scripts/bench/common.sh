# Shared helpers for the benchmark scripts: start throwaway registries,
# time commands (wall seconds and peak RSS), clean up on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GGFS=${GGFS:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ggfs}
WORK=$(mktemp -d /tmp/ggfs-bench.XXXXXX)
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# start_registry PORT: the CNCF distribution registry on 127.0.0.1:PORT.
start_registry() {
    local port=$1 dir=$WORK/registry-$1
    mkdir -p "$dir"
    cat >"$dir/config.yml" <<YML
version: 0.1
log: {level: ${REGISTRY_LOG_LEVEL:-error}}
storage:
  filesystem: {rootdirectory: $dir/data}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$port}
YML
    docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do
        curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && return 0
        sleep 0.1
    done
    echo "registry on $port did not start" >&2
    return 1
}

# measure LABEL CMD...: prints "LABEL wall_s peak_rss_kib" and appends to $WORK/results.
measure() {
    local label=$1; shift
    local t0 t1 rss
    t0=$(date +%s.%N)
    /usr/bin/time -f '%M' -o "$WORK/rss" "$@" >/dev/null 2>"$WORK/stderr" || {
        cat "$WORK/stderr" >&2; return 1; }
    t1=$(date +%s.%N)
    rss=$(tail -1 "$WORK/rss")
    printf '%s %.3f %s\n' "$label" "$(echo "$t1 - $t0" | bc -l)" "$rss" | tee -a "$WORK/results"
}

# median LABEL: median wall time of the runs recorded under LABEL.
median() {
    awk -v l="$1" '$1==l {print $2}' "$WORK/results" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}

max_rss() {
    awk -v l="$1" '$1==l {print $3}' "$WORK/results" | sort -n | tail -1
}

# A ~100 MB single-layer test image as an OCI layout at $WORK/img (tag "bench"):
# real files from this machine's /usr, so compression behaves as on real images.
make_image() {
    local src=${1:-/usr/lib/x86_64-linux-gnu}
    umoci init --layout "$WORK/img" >/dev/null
    umoci new --image "$WORK/img:bench" >/dev/null
    umoci unpack --rootless --image "$WORK/img:bench" "$WORK/bundle" >/dev/null 2>&1 ||
        umoci unpack --image "$WORK/img:bench" "$WORK/bundle" >/dev/null
    mkdir -p "$WORK/bundle/rootfs/usr"
    # Copy until ~120 MB of real files are in.
    (cd / && find "${src#/}" -type f -size -8M 2>/dev/null | head -4000 |
        tar -cf - -T - 2>/dev/null) | tar -xf - -C "$WORK/bundle/rootfs" 2>/dev/null || true
    du -sh "$WORK/bundle/rootfs" >&2
    umoci repack --image "$WORK/img:bench" "$WORK/bundle" >/dev/null
    rm -rf "$WORK/bundle"
}
