#!/usr/bin/env bash
# ggfs copy vs skopeo copy of the same ~100 MB image between two local CNCF
# registries, side by side, alternating runs; then a same-registry copy
# (should mount, moving no blob bytes); then ggfs export vs umoci unpack + tar.
# Usage: scripts/bench/copy.sh [RUNS]   (needs: cargo build --release)
source "$(dirname "$0")/common.sh"
RUNS=${1:-3}

start_registry 5301
make_image
skopeo copy -q --dest-tls-verify=false oci:"$WORK/img":bench docker://127.0.0.1:5301/bench/src:v1
size=$(du -sb "$WORK/registry-5301/data" | cut -f1)
echo "image in registry: $((size / 1000000)) MB"

# Every run gets an empty destination registry: skopeo's blob-info cache
# would otherwise mount blobs it saw pushed there by an earlier run.
for i in $(seq "$RUNS"); do
    start_registry $((5310 + i)); start_registry $((5320 + i))
    measure ggfs-copy "$GGFS" copy 127.0.0.1:5301/bench/src:v1 "127.0.0.1:$((5310 + i))/bench/dst:v1"
    measure skopeo-copy skopeo copy -q --src-tls-verify=false --dest-tls-verify=false \
        docker://127.0.0.1:5301/bench/src:v1 "docker://127.0.0.1:$((5320 + i))/bench/dst:v1"
done

# Same registry, other repository: blobs must be mounted, not moved.
before=$(find "$WORK/registry-5301/data/docker/registry/v2/blobs" -type f | wc -l)
measure ggfs-copy-mount "$GGFS" copy 127.0.0.1:5301/bench/src:v1 127.0.0.1:5301/bench/other:v1
after=$(find "$WORK/registry-5301/data/docker/registry/v2/blobs" -type f | wc -l)
echo "same-registry copy: blob files before $before, after $after (new blobs: $((after - before)))"

for i in $(seq "$RUNS"); do
    measure ggfs-export "$GGFS" export oci:"$WORK/img":bench "$WORK/ggfs-export.tar"
    measure umoci-unpack-tar bash -c "rm -rf '$WORK/b' && umoci unpack --image '$WORK/img':bench '$WORK/b' >/dev/null && tar -C '$WORK/b/rootfs' -cf '$WORK/umoci-export.tar' ."
done

g=$(median ggfs-copy); s=$(median skopeo-copy)
ge=$(median ggfs-export); ue=$(median umoci-unpack-tar)
echo
echo "| measurement | ggfs | other tool | ratio |"
echo "|---|---|---|---|"
printf '| copy between two registries (median of %s) | %.2f s | skopeo %.2f s | %.2fx |\n' "$RUNS" "$g" "$s" "$(echo "$g / $s" | bc -l)"
printf '| peak RSS during copy | %d MiB | skopeo %d MiB | |\n' "$(( $(max_rss ggfs-copy) / 1024 ))" "$(( $(max_rss skopeo-copy) / 1024 ))"
printf '| same-registry copy | %.2f s, %d new blob files | | |\n' "$(median ggfs-copy-mount)" "$((after - before))"
printf '| export flattened tar (median of %s) | %.2f s | umoci unpack + tar %.2f s | %.2fx |\n' "$RUNS" "$ge" "$ue" "$(echo "$ge / $ue" | bc -l)"
