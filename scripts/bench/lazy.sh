#!/usr/bin/env bash
# The lazy read path over a simulated WAN (issue 10): the same cold
# measurements through scripts/bench/wanproxy.py (10 ms each way, 200 Mbit/s
# shared, one round trip per new TCP connection; no TLS) and straight on
# loopback, ggfs against today's way (skopeo copy + umoci unpack, then the same
# work on the unpacked tree):
#   - mount + first file (eStargz, cold): `ggfs mount` + cat etc/os-release
#   - mount + whole-tree read: tar -cf - rootfs | wc -c (tar's exit status kept)
#   - mount + container-start style: chroot rootfs bash -c 'apt-get --version; ls -R /usr/lib'
#     (>/dev/null outside the chroot: FUSE mounts are nodev, so the image's own
#     /dev/null can't be opened there; a container runtime mounts its own /dev)
#   - mount + `ls -la` of a plain-gzip tag directory (must not stream the layer)
#   - warm, loopback: find | wc -l, tar | wc -c, 50 MB sequential read, vs native
# Requests and bytes are what the proxy saw cross the link. Cold = fresh empty
# --cache-dir and a fresh mount; times include the `ggfs mount` command.
# Medians of N runs, ggfs and the baseline alternating (the order flips every
# run). Prints a markdown table, then the proxy's request sequence for
# "mount + first file" and for the gzip `ls -la`.
#
# Usage: scripts/bench/lazy.sh [N]     (default 3; needs a release build)
#   GGFS=/path/to/ggfs        use these binaries (ggfs-mountd must sit beside it);
#                             otherwise target/release/{ggfs,ggfs-mountd} are copied
#                             first, so a rebuild during the run changes nothing
#   DELAY_MS=10 RATE_MBIT=200 the simulated link
#   LAZY_KEEP=DIR             also copy the proxy and daemon logs to DIR
USER_GGFS=${GGFS:-}
source "$(dirname "$0")/common.sh"

RUNS=${1:-3}
DELAY_MS=${DELAY_MS:-10}
RATE_MBIT=${RATE_MBIT:-200}
PORT=5403            # the registry (loopback)
PROXY_PORT=5413      # wanproxy in front of it
REG=127.0.0.1:$PORT
WAN=127.0.0.1:$PROXY_PORT
MNT=$WORK/mnt
PX_PID=
PX_LOG=
mkdir -p "$MNT" "$WORK/logs"

if [[ -z $USER_GGFS ]]; then
    mkdir -p "$WORK/bin"
    cp "$GGFS" "$(dirname "$GGFS")/ggfs-mountd" "$WORK/bin/"
    GGFS=$WORK/bin/ggfs
fi
[[ -x $(dirname "$GGFS")/ggfs-mountd ]] || { echo "no ggfs-mountd beside $GGFS" >&2; exit 1; }

# --- cleanup: unmount before common.sh's cleanup removes $WORK ------------

unmount_mnt() {
    mountpoint -q "$MNT" 2>/dev/null || return 0
    "$GGFS" unmount "$MNT" >/dev/null 2>&1 ||
        fusermount3 -uz "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
}
lazy_cleanup() {
    local st=$?
    unmount_mnt
    if [[ -n $PX_PID ]]; then kill "$PX_PID" 2>/dev/null || true; fi
    if [[ -n ${LAZY_KEEP:-} ]]; then
        mkdir -p "$LAZY_KEEP" && cp -r "$WORK/logs/." "$LAZY_KEEP/" 2>/dev/null || true
    fi
    # Never let rm -rf walk into a mount that refused to go.
    if mountpoint -q "$MNT" 2>/dev/null; then
        echo "lazy.sh: $MNT is still mounted; leaving $WORK in place" >&2
        for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
        exit "$st"
    fi
    cleanup
    exit "$st"
}
trap lazy_cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }
rec() { echo "$1 $2" >>"$WORK/results"; }   # median LABEL reads these back
note() { echo "$*" >>"$WORK/notes"; echo "lazy.sh: $*" >&2; }

# --- the proxy --------------------------------------------------------------

# px_start NAME: a fresh proxy (and log) for one measurement.
px_start() {
    PX_LOG=$WORK/logs/$1.proxy.log
    rm -f "$WORK/px.out"
    python3 "$ROOT/scripts/bench/wanproxy.py" --listen "$WAN" --upstream "$REG" \
        --delay-ms "$DELAY_MS" --rate-mbit "$RATE_MBIT" --log "$PX_LOG" \
        >"$WORK/px.out" 2>>"$WORK/px.err" &
    PX_PID=$!
    for _ in $(seq 100); do
        grep -q ready "$WORK/px.out" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "wanproxy did not start" >&2; cat "$WORK/px.err" >&2
    return 1
}
# px_snapshot: "requests bytes_down" so far (the proxy keeps running).
px_snapshot() {
    local n0 n
    n0=$(grep -c '^# stats ' "$PX_LOG" || true)
    kill -USR1 "$PX_PID"
    for _ in $(seq 100); do
        n=$(grep -c '^# stats ' "$PX_LOG" || true)
        ((n > n0)) && break
        sleep 0.02
    done
    grep '^# stats ' "$PX_LOG" | tail -1 | awk '{print $4, $6}'
}
# px_stop: PX_TOTAL="requests bytes_down" in total (not in a subshell: it waits).
px_stop() {
    kill -TERM "$PX_PID"
    wait "$PX_PID" 2>/dev/null || true
    PX_PID=
    PX_TOTAL=$(grep '^# requests ' "$PX_LOG" | tail -1 | awk '{print $3, $5}')
}
# px_sequence LOG: one line per request, in the order the proxy saw them:
#   +ms_at_proxy conn METHOD PATH RANGE -> status bytes (+ms_last_byte)
px_sequence() {
    awk '
    function short(s,   i) {
        while ((i = index(s, "sha256:")) > 0 && length(s) >= i + 70)
            s = substr(s, 1, i + 6) substr(s, i + 7, 12) "…" substr(s, i + 71)
        return s
    }
    function kv(s, k,   i, r) {
        i = index(s, k "="); if (!i) return ""
        r = substr(s, i + length(k) + 1); sub(/[ \t].*/, "", r); return r
    }
    /^# resp / {
        c = kv($0, "conn"); j = q[c, head[c]++]
        if (j) resp[j] = sprintf("-> %s %s B (+%.0f ms)", kv($0, "status"), kv($0, "bytes"), (kv($0, "t") - t0) * 1000)
        next
    }
    /^#/ { next }
    {
        c = kv($0, "conn"); t = kv($0, "t"); if (!n) t0 = t
        n++; q[c, tail[c]++] = n
        split($0, f, "\t"); line[n] = sprintf("+%5.0f ms  c%-3s %s", (t - t0) * 1000, c, short(f[1]))
    }
    END { for (i = 1; i <= n; i++) print line[i], resp[i] }' "$1"
}

# --- ggfs -------------------------------------------------------------------

# mount_cold ADDR NAME: a mount with the (new, empty) cache $WORK/cache-NAME;
# prints when the mount command started and ended. No commits: nothing here may push.
mount_cold() {
    local t0 t1
    t0=$(now)
    "$GGFS" mount "$1" "$MNT" --cache-dir "$WORK/cache-$2" --commit-delay manual \
        --log "$WORK/logs/$2.mountd.log" || { note "$2: ggfs mount failed"; return 1; }
    t1=$(now)
    echo "$t0 $t1" # the subtraction (bc) waits until the timed work is done
}
# The daemon's ERROR/WARN lines.
unmount_and_check() { # NAME
    local bad
    "$GGFS" unmount "$MNT" >/dev/null 2>&1 || { note "$1: ggfs unmount failed"; unmount_mnt; }
    bad=$(grep -E ' (ERROR|WARN) ' "$WORK/logs/$1.mountd.log" 2>/dev/null |
        head -3 | tr '\n' ' ' || true)
    if [[ -n $bad ]]; then note "$1: daemon log: $bad"; fi
}

# ggfs_run KIND LINK I: one cold measurement. KIND: first tree chroot ls.
ggfs_run() {
    local kind=$1 link=$2 i=$3 name=ggfs-$1-$2-$i addr=$REG m t0 t1 st snap fin
    local R=$MNT/bench/debian/estargz/rootfs
    unmount_mnt
    if [[ $link == wan ]]; then addr=$WAN; px_start "$name"; fi
    t0=$(now)
    m=$(mount_cold "$addr" "$name")
    case $kind in
    first) cat "$R/etc/os-release" >"$WORK/os-release.ggfs" && st=0 || st=$? ;;
    tree)
        { tar -cf - -C "$R" . 2>"$WORK/tar.err" && echo 0 >"$WORK/tar.st" || echo $? >"$WORK/tar.st"; } |
            wc -c >"$WORK/tar.bytes"
        st=$(cat "$WORK/tar.st") ;;
    chroot) # >/dev/null outside: the mount is nodev, the image's /dev/null can't be opened
        chroot "$R" /bin/bash -c 'apt-get --version; ls -R /usr/lib' \
            >/dev/null 2>"$WORK/chroot.err" && st=0 || st=$? ;;
    ls) ls -la "$MNT/bench/debian/gzip/" >"$WORK/ls.out" 2>&1 && st=0 || st=$? ;;
    esac
    t1=$(now)
    rec "$kind-$link-ggfs" "$(secs "$t0" "$t1")"
    if [[ $kind == first ]]; then rec "mount-$link-ggfs" "$(secs ${m% *} ${m#* })"; fi
    if ((st != 0)); then
        note "$name: exit status $st$( [[ $kind == tree ]] && echo ": $(head -3 "$WORK/tar.err" | tr '\n' ' ')")$( [[ $kind == chroot ]] && echo ": $(head -3 "$WORK/chroot.err" | tr '\n' ' ')")"
    fi
    if [[ $kind == tree ]]; then
        rec "tarstatus-$link-ggfs" "$st"
        rec "tarbytes-$link-ggfs" "$(cat "$WORK/tar.bytes")"
        if [[ -s $WORK/tar.err ]]; then cp "$WORK/tar.err" "$WORK/logs/$name.tar.err"; fi
        if [[ $link == lo ]]; then warm "$i"; fi
    fi
    if [[ $kind == first && -f $WORK/os-release.native ]] &&
        ! cmp -s "$WORK/os-release.ggfs" "$WORK/os-release.native"; then
        note "$name: os-release differs from the unpacked one"
    fi
    if [[ $link == wan ]]; then
        snap=$(px_snapshot)
        sleep 1 # background fetches the command started
        unmount_and_check "$name"
        px_stop; fin=$PX_TOTAL
        rm -rf "$WORK/cache-$name" # untimed: ~10 s for the whole tree's cache here
        rec "$kind-req-ggfs" "${snap% *}"; rec "$kind-bytes-ggfs" "${snap#* }"
        rec "$kind-req-ggfs-all" "${fin% *}"; rec "$kind-bytes-ggfs-all" "${fin#* }"
    else
        unmount_and_check "$name"
        rm -rf "$WORK/cache-$name"
    fi
}

# warm I: in the loopback tree mount (the tree was just read once, cold).
# Each figure is taken 5 times, ggfs and native alternating (medians over
# all runs): one take is 20-500 ms here, where a busy neighbour shows.
warm() {
    local R=$MNT/bench/debian/estargz/rootfs U=$WORK/unpacked-lo/rootfs F t0 t1 k
    find "$R" | wc -l >/dev/null; find "$U" | wc -l >/dev/null
    for k in 1 2 3 4 5; do
        t0=$(now); find "$R" | wc -l >"$WORK/find.ggfs"; t1=$(now); rec warm-find-ggfs "$(secs "$t0" "$t1")"
        t0=$(now); find "$U" | wc -l >"$WORK/find.native"; t1=$(now); rec warm-find-native "$(secs "$t0" "$t1")"
    done
    for k in 1 2 3 4 5; do
        t0=$(now); tar -cf - -C "$R" . 2>/dev/null | wc -c >/dev/null; t1=$(now); rec warm-tar-ggfs "$(secs "$t0" "$t1")"
        t0=$(now); tar -cf - -C "$U" . 2>/dev/null | wc -c >/dev/null; t1=$(now); rec warm-tar-native "$(secs "$t0" "$t1")"
    done
    F=$MNT/bench/big/v1/rootfs/blob.bin
    cat "$F" >/dev/null; cat "$WORK/big/blob.bin" >/dev/null # fetch / warm both
    # Once its first reader is gone and the mount has been quiet for 1 s,
    # the daemon copies a cached big file for passthrough (after the big
    # files the cold tar closed): wait until an open of it is passed
    # through, which also warms the copy.
    local pt0 pt k=0
    pt0=$(awk '$1 == "passthrough_opens" {print $2}' "$MNT/.ggfs/stats")
    # (Each look is a request: 2 s apart, so copies get 1 s of quiet.)
    while ((k++ < 40)); do
        sleep 2; cat "$F" >/dev/null
        pt=$(awk '$1 == "passthrough_opens" {print $2}' "$MNT/.ggfs/stats")
        ((pt > pt0)) && break
        pt0=$pt
    done
    ((k <= 40)) || note "warm: the 50 MB file was never passed through"
    # Both files' pages come into the page cache the same way (readahead
    # after a drop), so the timed reads compare the read paths, not how the
    # pages got there: a file written by small writes sits in small folios
    # and reads ~1.5x slower than the same bytes brought in by readahead.
    sync; echo 3 >/proc/sys/vm/drop_caches
    cat "$F" >/dev/null; cat "$WORK/big/blob.bin" >/dev/null
    # One read takes ~3-5 ms, as long as starting a process: read in one
    # process, 1 MiB at a time, 20 times each, alternating.
    python3 - "$F" "$WORK/big/blob.bin" >>"$WORK/results" <<'PY'
import os, sys, time
def take(p):
    t = time.perf_counter(); fd = os.open(p, os.O_RDONLY); b = memoryview(bytearray(1 << 20))
    while os.readv(fd, [b]) > 0:
        pass
    os.close(fd)
    return time.perf_counter() - t
for _ in range(20):
    print("seq-warm-ggfs %.6f" % take(sys.argv[1]))
    print("seq-warm-native %.6f" % take(sys.argv[2]))
PY
    # Page cache dropped on both sides: ggfs reads its disk cache, native its file.
    sync; echo 3 >/proc/sys/vm/drop_caches
    t0=$(now); cat "$F" >/dev/null; t1=$(now); rec seq-dropped-ggfs "$(secs "$t0" "$t1")"
    sync; echo 3 >/proc/sys/vm/drop_caches
    t0=$(now); cat "$WORK/big/blob.bin" >/dev/null; t1=$(now); rec seq-dropped-native "$(secs "$t0" "$t1")"
    [[ $(cat "$WORK/find.ggfs") == $(cat "$WORK/find.native") ]] ||
        note "warm find: $(cat "$WORK/find.ggfs") entries in the mount, $(cat "$WORK/find.native") unpacked"
}

# --- today's way --------------------------------------------------------------

# base_run LINK I: skopeo copy + umoci unpack + cat, then tar and chroot of the
# unpacked tree (each added to the pull + unpack time).
base_run() {
    local link=$1 i=$2 addr=$REG t0 t1 t2 t3 pu fin st U=$WORK/unpacked-$1
    if [[ $link == wan ]]; then addr=$WAN; px_start "base-$link-$i"; fi
    rm -rf "$WORK/pulled" "$U"
    t0=$(now)
    skopeo copy -q --src-tls-verify=false "docker://$addr/bench/debian:gzip" "oci:$WORK/pulled:t"
    t1=$(now)
    umoci unpack --image "$WORK/pulled:t" "$U" >/dev/null
    t2=$(now)
    cat "$U/rootfs/etc/os-release" >"$WORK/os-release.native"
    t3=$(now)
    if [[ $link == wan ]]; then px_stop; fin=$PX_TOTAL; rec pull-req "${fin% *}"; rec pull-bytes "${fin#* }"; fi
    pu=$(secs "$t0" "$t2")
    rec "pull-$link" "$(secs "$t0" "$t1")"
    rec "unpack-$link" "$(secs "$t1" "$t2")"
    rec "first-$link-base" "$(secs "$t0" "$t3")"
    t0=$(now)
    { tar -cf - -C "$U/rootfs" . 2>"$WORK/tar.err" && echo 0 >"$WORK/tar.st" || echo $? >"$WORK/tar.st"; } |
        wc -c >"$WORK/tar.bytes"
    t1=$(now)
    st=$(cat "$WORK/tar.st")
    ((st == 0)) || note "base-$link-$i: tar of the unpacked tree: exit status $st"
    rec "tree-$link-base" "$(echo "$pu + $(secs "$t0" "$t1")" | bc -l)"
    rec "tarbytes-$link-base" "$(cat "$WORK/tar.bytes")"
    t0=$(now)
    chroot "$U/rootfs" /bin/bash -c 'apt-get --version; ls -R /usr/lib' >/dev/null ||
        note "base-$link-$i: chroot exit status $?"
    t1=$(now)
    rec "chroot-$link-base" "$(echo "$pu + $(secs "$t0" "$t1")" | bc -l)"
}

# --- fixtures -------------------------------------------------------------------

start_registry $PORT
t0=$(now)
"$ROOT/scripts/fixtures.sh" "$REG" bench/debian >&2
mkdir -p "$WORK/big"
head -c 50000000 /dev/urandom >"$WORK/big/blob.bin"
"$GGFS" append -f "$WORK/big" -t "$REG/bench/big:v1" >/dev/null
echo "lazy.sh: fixtures pushed in $(printf %.0f "$(secs "$t0" "$(now)")") s" >&2
layer_size() { "$GGFS" manifest "$REG/bench/debian:$1" | jq '[.layers[].size] | add'; }
ESGZ_SIZE=$(layer_size estargz); GZ_SIZE=$(layer_size gzip)

# --- the runs --------------------------------------------------------------------

for i in $(seq "$RUNS"); do
    for link in wan lo; do
        echo "lazy.sh: run $i/$RUNS, $link" >&2
        if ((i % 2)); then base_run "$link" "$i"; fi
        for kind in first tree chroot ls; do ggfs_run "$kind" "$link" "$i"; done
        if ! ((i % 2)); then base_run "$link" "$i"; fi
    done
done

# --- the report ------------------------------------------------------------------------

m() { median "$1"; }
f3() { printf '%.3f' "$1"; }
f2() { printf '%.2f' "$1"; }
ratio() { # A / B, two significant digits below 1
    local r; r=$(echo "$1 / $2" | bc -l)
    if (($(echo "$r < 1" | bc))); then printf '%.2f×' "$r"; else printf '%.1f×' "$r"; fi
}
big() { printf "%'d" "$1"; }
mb() { printf '%.2f MB' "$(echo "$1 / 1000000" | bc -l)"; }
traffic() { # KIND: "R req, B" during the command (and by unmount if more)
    local r=$(m "$1-req-ggfs") b=$(m "$1-bytes-ggfs") ra=$(m "$1-req-ggfs-all") ba=$(m "$1-bytes-ggfs-all")
    printf '%s req, %s B' "$r" "$(big "$b")"
    [[ $ra == "$r" && $ba == "$b" ]] || printf ' (by unmount +1 s: %s req, %s B)' "$ra" "$(big "$ba")"
}
row() { # LABEL KIND BASELABEL
    local gw=$(m "$2-wan-ggfs") bw=$(m "$2-wan-base") gl=$(m "$2-lo-ggfs") bl=$(m "$2-lo-base")
    printf '| %s | %s s | %s s | %s | %s s | %s s | %s | %s | %s |\n' "$1" \
        "$(f3 "$gw")" "$(f3 "$bw")" "$(ratio "$bw" "$gw")" "$(f3 "$gl")" "$(f3 "$bl")" "$(ratio "$bl" "$gl")" \
        "$(traffic "$2")" "$3"
}
PULL="$(m pull-req) req, $(big "$(m pull-bytes)") B"
TS_BAD=$(awk '$1 ~ /^tarstatus-/ && $2 != 0' "$WORK/results" | wc -l)

echo
echo "Link: wanproxy, ${DELAY_MS} ms each way, ${RATE_MBIT} Mbit/s shared, +1 RTT per new connection, no TLS; loopback: straight to the registry."
echo "Image: bench/debian (eStargz layer $(big "$ESGZ_SIZE") B, gzip layer $(big "$GZ_SIZE") B). Median of $RUNS; times include \`ggfs mount\`; baseline = skopeo copy + umoci unpack + the same command on the unpacked tree."
echo
echo "| measurement (cold) | ggfs WAN | pull+extract WAN | speedup | ggfs loopback | pull+extract loopback | speedup | ggfs over WAN: requests, bytes | pull over WAN |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '| `ggfs mount` alone | %s s | | | %s s | | | | |\n' "$(f3 "$(m mount-wan-ggfs)")" "$(f3 "$(m mount-lo-ggfs)")"
row 'mount + `cat etc/os-release`, eStargz' first "$PULL"
row "mount + \`tar -cf - rootfs | wc -c\` (tar exit ≠ 0 in $TS_BAD of $((2 * RUNS)) runs)" tree "$PULL"
row 'mount + `chroot rootfs bash -c "apt-get --version; ls -R /usr/lib"`' chroot "$PULL"
printf '| mount + `ls -la bench/debian/gzip/` (plain gzip tag dir) | %s s | | | %s s | | | %s | |\n' \
    "$(f3 "$(m ls-wan-ggfs)")" "$(f3 "$(m ls-lo-ggfs)")" "$(traffic ls)"
printf '| (pull alone / unpack alone) | | %s s / %s s | | | %s s / %s s | | | |\n' \
    "$(f2 "$(m pull-wan)")" "$(f2 "$(m unpack-wan)")" "$(f2 "$(m pull-lo)")" "$(f2 "$(m unpack-lo)")"
echo
echo "| warm, loopback (same mount, after one cold tar; medians of 5 takes a run, 20 for the read) | ggfs | native | ggfs ÷ native time |"
echo "|---|---|---|---|"
wrow() { printf '| %s | %s s | %s s | %.2f× |\n' "$1" "$(f3 "$(m "$2-ggfs")")" "$(f3 "$(m "$2-native")")" "$(echo "$(m "$2-ggfs") / $(m "$2-native")" | bc -l)"; }
wrow "\`find rootfs | wc -l\` ($(cat "$WORK/find.ggfs") entries)" warm-find
wrow '`tar -cf - rootfs | wc -c`' warm-tar
wrow 'sequential read of a 50 MB file, page cache warm (1 MiB reads in one process)' seq-warm
wrow 'the same after `drop_caches` (ggfs: its disk cache; native: the file on disk)' seq-dropped
echo
tb_g=$(m tarbytes-lo-ggfs); tb_b=$(m tarbytes-lo-base)
echo "tar of the mount: $(big "$tb_g") bytes; tar of umoci's unpack: $(big "$tb_b") bytes$([[ $tb_g == "$tb_b" ]] || echo ' (DIFFER)')."
if [[ -s $WORK/notes ]]; then
    echo
    echo "Problems seen:"
    sed 's/^/- /' "$WORK/notes"
fi
echo
echo "Requests for mount + first file over WAN (run 1; ms since the first request as the proxy read it):"
echo '```'
px_sequence "$WORK/logs/ggfs-first-wan-1.proxy.log"
echo '```'
echo "Requests for mount + \`ls -la\` of the gzip tag directory over WAN (run 1):"
echo '```'
px_sequence "$WORK/logs/ggfs-ls-wan-1.proxy.log"
echo '```'
