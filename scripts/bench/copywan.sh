#!/usr/bin/env bash
# ggfs copy vs skopeo copy between two registries across a simulated WAN:
# each registry behind its own scripts/bench/wanproxy.py (10 ms each way,
# 200 Mbit/s down and up, one round trip per new TCP connection), so the
# copy pulls across one link and pushes across the other. The image is a
# ~100 MB gzip layer of real files plus six 3 MB layers (incompressible):
# one long transfer and several short ones, as real images have.
# Every run copies into an empty target registry; ggfs and skopeo alternate.
# Prints a markdown table: median wall time, requests and connections each
# link saw, bytes up to the target.
#
# Usage: scripts/bench/copywan.sh [RUNS]   (default 3; needs a release build)
#   DELAY_MS=10 RATE_MBIT=200   the simulated links
source "$(dirname "$0")/common.sh"
RUNS=${1:-3}
DELAY_MS=${DELAY_MS:-10}
RATE_MBIT=${RATE_MBIT:-200}
SRC=127.0.0.1:5331 DST_PORT=5332
SRC_WAN=127.0.0.1:5341 DST_WAN=127.0.0.1:5342

start_registry 5331
make_image
skopeo copy -q --dest-tls-verify=false oci:"$WORK/img":bench docker://$SRC/bench/src:v0
base=$SRC/bench/src:v0
for i in 1 2 3 4 5 6; do
    mkdir -p "$WORK/layer$i"
    head -c 3000000 /dev/urandom >"$WORK/layer$i/data$i"
    "$GGFS" append -f "$WORK/layer$i" --base "$base" -t "$SRC/bench/src:v$i" >/dev/null
    base=$SRC/bench/src:v$i
done
IMAGE=bench/src:v6
echo "layers (bytes): $("$GGFS" manifest "$SRC/$IMAGE" | python3 -c \
    'import json,sys; print(*[l["size"] for l in json.load(sys.stdin)["layers"]])')" >&2

# proxy NAME LISTEN UPSTREAM: a wanproxy logging to $WORK/NAME.log.
proxy() {
    rm -f "$WORK/$1.out"
    python3 "$ROOT/scripts/bench/wanproxy.py" --listen "$2" --upstream "$3" \
        --delay-ms "$DELAY_MS" --rate-mbit "$RATE_MBIT" --log "$WORK/$1.log" >"$WORK/$1.out" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do
        grep -q ready "$WORK/$1.out" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "wanproxy $1 did not start" >&2
    return 1
}

# run LABEL CMD...: one copy into an empty target, both links fresh.
run() {
    local label=$1; shift
    local dir=$WORK/registry-$DST_PORT
    if [[ -f $dir/pid ]]; then kill "$(cat "$dir/pid")" 2>/dev/null || true; sleep 0.3; fi
    rm -rf "$dir"
    start_registry $DST_PORT
    echo "${PIDS[-1]}" >"$dir/pid"
    rm -f "$WORK/src.log" "$WORK/dst.log"
    proxy src $SRC_WAN $SRC
    local psrc=${PIDS[-1]}
    proxy dst $DST_WAN 127.0.0.1:$DST_PORT
    local pdst=${PIDS[-1]}
    measure "$label" "$@"
    kill "$psrc" "$pdst"
    wait "$psrc" "$pdst" 2>/dev/null || true
    local s d
    s=$(grep '^# requests ' "$WORK/src.log" | tail -1 | awk '{print $3, $9}')
    d=$(grep '^# requests ' "$WORK/dst.log" | tail -1 | awk '{print $3, $9, $7}')
    echo "$label-links $s $d" >>"$WORK/links"
}

# skopeo keeps a blob-info cache that would let it mount blobs it saw in
# an earlier run's target; every target is a new registry, so it cannot.
for i in $(seq "$RUNS"); do
    if ((i % 2)); then order="ggfs skopeo"; else order="skopeo ggfs"; fi
    for tool in $order; do
        case $tool in
        ggfs) run ggfs "$GGFS" copy "$SRC_WAN/$IMAGE" "$DST_WAN/bench/dst:v1" ;;
        skopeo) run skopeo skopeo copy -q --src-tls-verify=false --dest-tls-verify=false \
            "docker://$SRC_WAN/$IMAGE" "docker://$DST_WAN/bench/dst:v1" ;;
        esac
    done
done

g=$(median ggfs); s=$(median skopeo)
links() { grep "^$1-links " "$WORK/links" | tail -1 | cut -d' ' -f2-; }
read -r gsr gsc gdr gdc gup <<<"$(links ggfs)"
read -r ssr ssc sdr sdc sup <<<"$(links skopeo)"
echo
echo "| copy across a ${DELAY_MS} ms / ${RATE_MBIT} Mbit/s link each side (median of $RUNS) | ggfs | skopeo | ratio |"
echo "|---|---|---|---|"
printf '| wall time | %.2f s | %.2f s | %.2fx |\n' "$g" "$s" "$(echo "$g / $s" | bc -l)"
echo "| source link: requests, connections | $gsr, $gsc | $ssr, $ssc | |"
echo "| target link: requests, connections | $gdr, $gdc | $sdr, $sdc | |"
echo "| bytes up to the target | $gup | $sup | |"
printf '| peak RSS | %s MiB | %s MiB | |\n' "$(($(max_rss ggfs) / 1024))" "$(($(max_rss skopeo) / 1024))"
