#!/usr/bin/env bash
# Writes through the mount against what a user would otherwise do, side by
# side on the debian:bookworm-sized image (scripts/fixtures.sh):
#  1. a one-file change, committed: ggfs mount + the change + ggfs commit,
#     against skopeo copy + umoci unpack + the same change + umoci repack +
#     skopeo copy back; with the bytes that landed in the registry's storage
#     (new blob files) for each;
#  2. `cp -a` of a ~100 MB tree into the mount + ggfs commit, against
#     `ggfs append -f` of the same tree on the same base.
# Runs alternate ggfs and the other tool; each pushes to a tag of its own so
# every run starts from the same base.
# Usage: scripts/bench/commit.sh [RUNS]     (needs: cargo build --release --workspace)
source "$(dirname "$0")/common.sh"

RUNS=${1:-3}
PORT=5402
REG=127.0.0.1:$PORT
MNT=$WORK/mnt
STORE=$WORK/registry-$PORT/data/docker/registry/v2/blobs
mkdir -p "$MNT"

start_registry $PORT
"$ROOT/scripts/fixtures.sh" "$REG" bench/debian >&2

# Bytes of the blob files that appeared in the registry's storage since MARKER.
landed() {
    find "$STORE" -type f -name data -newer "$1" -printf '%s\n' | paste -sd+ | bc
}
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }

# A ~100 MB tree of real files, as /opt/tree of an image.
mkdir -p "$WORK/wrap/opt/tree"
(cd / && find usr/lib/x86_64-linux-gnu -type f -size -8M -printf '%s %p\n' 2>/dev/null |
    awk '{ if (sum + $1 > 100000000) exit; sum += $1; print $2 }' |
    tar -cf - -T - 2>/dev/null) | tar -xf - -C "$WORK/wrap/opt/tree" 2>/dev/null || true
TREE_MB=$(du -sm "$WORK/wrap/opt/tree" | cut -f1)
echo "tree for cp -a: ${TREE_MB} MB" >&2

mount_fresh() {
    "$GGFS" unmount "$MNT" 2>/dev/null || true
    rm -rf "$WORK/cache"
    "$GGFS" mount "$REG" "$MNT" --cache-dir "$WORK/cache" --commit-delay manual
}

# ggfs_change VARIANT RUN: mount, change one file, commit to a tag of its own.
ggfs_change() {
    mount_fresh
    echo "changed by run $2" >"$MNT/bench/debian/$1/rootfs/etc/motd"
    "$GGFS" commit "$MNT/bench/debian/$1" --tag "g$2-$1" >/dev/null
    "$GGFS" unmount "$MNT"
}

# umoci_change VARIANT RUN: the same change the way it is done without ggfs.
umoci_change() {
    local d=$WORK/u$2
    rm -rf "$d"
    mkdir -p "$d"
    skopeo copy -q --src-tls-verify=false "docker://$REG/bench/debian:$1" "oci:$d/layout:t"
    umoci unpack --image "$d/layout:t" "$d/bundle" >/dev/null
    echo "changed by run $2" >"$d/bundle/rootfs/etc/motd"
    umoci repack --image "$d/layout:t" "$d/bundle" >/dev/null
    skopeo copy -q --dest-tls-verify=false "oci:$d/layout:t" "docker://$REG/bench/debian:u$2-$1"
    rm -rf "$d"
}

ggfs_cp() {
    mount_fresh
    mkdir -p "$MNT/bench/debian/gzip/rootfs/opt"
    cp -a "$WORK/wrap/opt/tree" "$MNT/bench/debian/gzip/rootfs/opt/tree"
    "$GGFS" commit "$MNT/bench/debian/gzip" --tag "cp$1" >/dev/null
    "$GGFS" unmount "$MNT"
}

# To a repository of its own each run: the registry must be sent the layer
# (its storage may still hold the bytes: "landed" then counts nothing new).
ggfs_append() {
    "$GGFS" append -b "$REG/bench/debian:gzip" -f "$WORK/wrap" -t "$REG/bench/app$1:t" >/dev/null
}

declare -A T B
run() { # LABEL CMD...: time it, count the bytes that landed
    local label=$1 t0 t1
    shift
    touch "$WORK/marker"
    sleep 1.1 # -newer has a one-second grain on some file systems
    t0=$(now)
    "$@"
    t1=$(now)
    T[$label]="${T[$label]:-} $(secs "$t0" "$t1")"
    B[$label]=$(landed "$WORK/marker")
    printf '%s %.3f s, %s bytes landed\n' "$label" "$(secs "$t0" "$t1")" "${B[$label]}" >&2
}
med() { tr ' ' '\n' <<<"${T[$1]}" | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

for i in $(seq "$RUNS"); do
    for v in gzip estargz; do
        run "ggfs-$v" ggfs_change "$v" "$i"
        run "umoci-$v" umoci_change "$v" "$i"
    done
    run ggfs-cp ggfs_cp "$i"
    run ggfs-append ggfs_append "$i"
done

layer() { "$GGFS" manifest "$REG/bench/debian:$1" | jq '.layers[-1].size'; }
echo
echo "| measurement (median of $RUNS) | ggfs | other tool | ratio |"
echo "|---|---|---|---|"
for v in gzip estargz; do
    g=$(med "ggfs-$v"); u=$(med "umoci-$v")
    printf '| one-file change committed, %s base | %.2f s, %s bytes landed (new layer %s B) | skopeo + umoci unpack/repack + skopeo: %.2f s, %s bytes | %.1f× faster |\n' \
        "$v" "$g" "${B[ggfs-$v]}" "$(layer "g1-$v")" "$u" "${B[umoci-$v]}" "$(echo "$u / $g" | bc -l)"
done
c=$(med ggfs-cp); a=$(med ggfs-append)
printf '| cp -a of a %s MB tree + commit | %.2f s (new layer %s B) | ggfs append -f: %.2f s (layer %s B) | %.2f× the time |\n' \
    "$TREE_MB" "$c" "$(layer cp1)" "$a" "$("$GGFS" manifest "$REG/bench/app1:t" | jq '.layers[-1].size')" \
    "$(echo "$c / $a" | bc -l)"
