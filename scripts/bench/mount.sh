#!/usr/bin/env bash
# The mount against what a user does today (skopeo copy + unpack), side by
# side on a debian:bookworm-sized image (scripts/fixtures.sh): time to the
# first file (eStargz, zstd:chunked, plain gzip), bytes the registry served
# (from its own log), a second random read of a plain-gzip layer once the
# index exists, warm sequential read of a 50 MB file vs local disk, warm
# `find | wc -l` vs native find, and the daemon's peak RSS.
# Usage: scripts/bench/mount.sh            (needs: cargo build --release --workspace)
source "$(dirname "$0")/common.sh"

PORT=5401
REG=127.0.0.1:$PORT
LOG=$WORK/registry-$PORT/log
MNT=$WORK/mnt
mkdir -p "$MNT"

REGISTRY_LOG_LEVEL=info start_registry $PORT
"$ROOT/scripts/fixtures.sh" "$REG" bench/debian >&2

# A 50 MB file in its own image, for sequential reads.
mkdir -p "$WORK/big"
head -c 50000000 /dev/urandom >"$WORK/big/blob.bin"
"$GGFS" append -f "$WORK/big" -t "$REG/bench/big:v1" >/dev/null

# Bytes the registry wrote in responses since the last call.
served() {
    local total
    total=$(grep -o 'http.response.written=[0-9]*' "$LOG" | cut -d= -f2 | paste -sd+ | bc)
    echo $(( ${total:-0} - ${SERVED_BEFORE:-0} ))
    SERVED_BEFORE=${total:-0}
}
layer_size() {
    "$GGFS" manifest "$REG/bench/debian:$1" | jq '[.layers[].size] | add'
}
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }

mount_fresh() {
    "$GGFS" unmount "$MNT" 2>/dev/null || true
    rm -rf "$WORK/cache"
    "$GGFS" mount "$REG" "$MNT" --cache-dir "$WORK/cache"
}

# Baseline: full pull and unpack, then read the file.
served >/dev/null
t0=$(now)
skopeo copy -q --src-tls-verify=false "docker://$REG/bench/debian:gzip" "oci:$WORK/pulled:t"
umoci unpack --image "$WORK/pulled:t" "$WORK/unpacked" >/dev/null
cat "$WORK/unpacked/rootfs/etc/os-release" >/dev/null
t1=$(now)
BASE=$(secs "$t0" "$t1"); BASE_BYTES=$(served)
echo "baseline skopeo copy + umoci unpack + cat: ${BASE}s, ${BASE_BYTES} bytes"

declare -A FIRST BYTES
for variant in estargz zstdchunked gzip; do
    mount_fresh
    served >/dev/null
    t0=$(now)
    cat "$MNT/bench/debian/$variant/rootfs/etc/os-release" >/dev/null
    t1=$(now)
    FIRST[$variant]=$(secs "$t0" "$t1")
    sleep 0.5 # let background fetches show in the log before counting
    BYTES[$variant]=$(served)
    echo "$variant first file: ${FIRST[$variant]}s, ${BYTES[$variant]} bytes of $(layer_size $variant)"
done

# Plain gzip, second mount: the index is cached, only the needed span moves.
"$GGFS" unmount "$MNT"
"$GGFS" mount "$REG" "$MNT" --cache-dir "$WORK/cache"
served >/dev/null
t0=$(now)
cat "$MNT/bench/debian/gzip/rootfs/usr/share/doc/bash/copyright" >/dev/null 2>&1 ||
    cat "$(find "$MNT/bench/debian/gzip/rootfs/usr/share" -type f -size +8k | sed -n 200p)" >/dev/null
t1=$(now)
RANDOM_READ=$(secs "$t0" "$t1"); RANDOM_BYTES=$(served)
echo "gzip random read with index: ${RANDOM_READ}s, ${RANDOM_BYTES} bytes"

# Warm sequential read of 50 MB vs local disk (both page-cache warm).
F=$MNT/bench/big/v1/rootfs/blob.bin
cat "$F" >/dev/null; cat "$WORK/big/blob.bin" >/dev/null
t0=$(now); cat "$F" >/dev/null; t1=$(now); SEQ_G=$(secs "$t0" "$t1")
t0=$(now); cat "$WORK/big/blob.bin" >/dev/null; t1=$(now); SEQ_L=$(secs "$t0" "$t1")

# Warm find vs native find on the unpacked tree.
R=$MNT/bench/debian/gzip/rootfs
find "$R" | wc -l >/dev/null; find "$WORK/unpacked/rootfs" | wc -l >/dev/null
t0=$(now); NG=$(find "$R" | wc -l); t1=$(now); FIND_G=$(secs "$t0" "$t1")
t0=$(now); NL=$(find "$WORK/unpacked/rootfs" | wc -l); t1=$(now); FIND_L=$(secs "$t0" "$t1")

PID=$(pgrep -f "ggfs-mountd mount .*$MNT" | head -1)
RSS=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
"$GGFS" unmount "$MNT"

ratio() { echo "$1 / $2" | bc -l; }
echo
echo "| measurement | ggfs | today's way | ratio |"
echo "|---|---|---|---|"
for v in estargz zstdchunked gzip; do
    printf '| first file, %s (cold) | %.3f s, %s bytes | skopeo copy + unpack %.2f s, %s bytes | %.1fx faster, %.2f%% of the bytes |\n' \
        "$v" "${FIRST[$v]}" "${BYTES[$v]}" "$BASE" "$BASE_BYTES" "$(ratio "$BASE" "${FIRST[$v]}")" "$(echo "100 * ${BYTES[$v]} / $BASE_BYTES" | bc -l)"
done
printf '| second random read, plain gzip, index cached | %.3f s, %s bytes | | |\n' "$RANDOM_READ" "$RANDOM_BYTES"
printf '| warm sequential read, 50 MB | %.3f s | local disk %.3f s | %.2fx of local speed |\n' "$SEQ_G" "$SEQ_L" "$(ratio "$SEQ_L" "$SEQ_G")"
printf '| warm find | wc -l (%s / %s entries) | %.3f s | native %.3f s | %.2fx native time |\n' "$NG" "$NL" "$FIND_G" "$FIND_L" "$(ratio "$FIND_G" "$FIND_L")"
printf '| daemon peak RSS | %d MiB | | |\n' "$((RSS / 1024))"
