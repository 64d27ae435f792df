#!/usr/bin/env bash
# Writing eStargz and zstd:chunked: ggfs against ctr-remote, on the same
# ~100 MB single-layer image of real files (common.sh make_image), side by side.
#  - ggfs: `ggfs append -f LAYER.tar.gz --layer-format F -t oci:DIR` (the gzip
#    layer decompressed, re-encoded with a TOC, written to an OCI layout);
#  - ctr-remote: the image fetched into a private containerd first (not
#    timed), then `ctr-remote image convert --estargz|--zstdchunked --oci`
#    (decompressed from the content store, re-encoded into it).
# End to end (pull, convert, push), registry to registry:
#  - ggfs: `ggfs optimize REG/src -t REG/dst --format F`;
#  - ctr-remote: `ctr content fetch` + `image convert` + `images push` into a
#    containerd namespace of its own per run, so every run pulls.
# Runs alternate the two. Prints wall seconds and peak RSS per run, medians,
# and the blob sizes.
# Usage: scripts/bench/estargz.sh [RUNS]     (needs: cargo build --release)
source "$(dirname "$0")/common.sh"

RUNS=${1:-3}
PORT=5403
REG=127.0.0.1:$PORT

start_registry $PORT
make_image
LAYER=$(python3 - "$WORK/img" <<'PY'
import json, sys
d = sys.argv[1]
blob = lambda dg: f"{d}/blobs/{dg.replace(':', '/')}"
idx = json.load(open(f"{d}/index.json"))
m = json.load(open(blob(idx["manifests"][0]["digest"])))
print(blob(m["layers"][0]["digest"]))
PY
)
echo "layer: $(stat -c %s "$LAYER") bytes gzip, $(gzip -dc "$LAYER" | wc -c) bytes tar" >&2
skopeo copy --quiet --dest-tls-verify=false "oci:$WORK/img:bench" "docker://$REG/bench/src:latest"

# A private containerd (no CRI), as tests/common/convert.rs starts it.
CTRD=$WORK/ctrd
mkdir -p "$CTRD"
cat >"$CTRD/config.toml" <<TOML
version = 2
root = "$CTRD/root"
state = "$CTRD/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$CTRD/c.sock"
[ttrpc]
  address = "$CTRD/c.sock.ttrpc"
[debug]
  address = ""
  level = "warn"
[metrics]
  address = ""
TOML
containerd --config "$CTRD/config.toml" >"$CTRD/log" 2>&1 &
PIDS+=($!)
CTR=(ctr-remote --address "$CTRD/c.sock" --namespace bench)
ctr() { "${CTR[@]}" "$@"; }
for _ in $(seq 300); do ctr version >/dev/null 2>&1 && break; sleep 0.1; done
ctr content fetch --plain-http "$REG/bench/src:latest" >/dev/null

for i in $(seq "$RUNS"); do
    measure ggfs-estargz "$GGFS" append -f "$LAYER" --layer-format estargz -t "oci:$WORK/g-esgz-$i:t"
    measure ctr-remote-estargz "${CTR[@]}" image convert --estargz --oci "$REG/bench/src:latest" "$REG/bench/esgz-$i:t"
    measure ggfs-zstdchunked "$GGFS" append -f "$LAYER" --layer-format zstd:chunked -t "oci:$WORK/g-zc-$i:t"
    measure ctr-remote-zstdchunked "${CTR[@]}" image convert --zstdchunked --oci "$REG/bench/src:latest" "$REG/bench/zc-$i:t"
done

ctr_optimize() {
    local ns=$1 flag=$2 dst=$3
    local c=(ctr-remote --address "$CTRD/c.sock" --namespace "$ns")
    "${c[@]}" content fetch --plain-http "$REG/bench/src:latest" >/dev/null &&
        "${c[@]}" image convert "$flag" --oci "$REG/bench/src:latest" "$dst" >/dev/null &&
        "${c[@]}" images push --plain-http "$dst" >/dev/null
}
export -f ctr_optimize
export CTRD REG
for i in $(seq "$RUNS"); do
    measure ggfs-optimize-estargz "$GGFS" optimize "$REG/bench/src:latest" -t "$REG/bench/gopt-esgz-$i:t"
    measure ctr-remote-optimize-estargz bash -c "ctr_optimize e2e-esgz-$i --estargz $REG/bench/copt-esgz-$i:t"
    measure ggfs-optimize-zstdchunked "$GGFS" optimize "$REG/bench/src:latest" --format zstd:chunked -t "$REG/bench/gopt-zc-$i:t"
    measure ctr-remote-optimize-zstdchunked bash -c "ctr_optimize e2e-zc-$i --zstdchunked $REG/bench/copt-zc-$i:t"
done

# Layer sizes: ggfs's from its layout, ctr-remote's from its content store.
ggfs_size() { python3 -c 'import json,sys; d=sys.argv[1]; i=json.load(open(d+"/index.json")); m=json.load(open(d+"/blobs/"+i["manifests"][0]["digest"].replace(":","/"))); print(m["layers"][-1]["size"])' "$1"; }
ctr_size() {
    local m
    m=$(ctr image ls | awk -v r="$1" '$1==r {print $3}')
    ctr content get "$m" | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["size"])'
}
echo
printf '%-24s %8s %10s %12s\n' tool median_s max_rss_kib layer_bytes
printf '%-24s %8s %10s %12s\n' ggfs-estargz "$(median ggfs-estargz)" "$(max_rss ggfs-estargz)" "$(ggfs_size "$WORK/g-esgz-1")"
printf '%-24s %8s %10s %12s\n' ctr-remote-estargz "$(median ctr-remote-estargz)" "$(max_rss ctr-remote-estargz)" "$(ctr_size "$REG/bench/esgz-1:t")"
printf '%-24s %8s %10s %12s\n' ggfs-zstdchunked "$(median ggfs-zstdchunked)" "$(max_rss ggfs-zstdchunked)" "$(ggfs_size "$WORK/g-zc-1")"
printf '%-24s %8s %10s %12s\n' ctr-remote-zstdchunked "$(median ctr-remote-zstdchunked)" "$(max_rss ctr-remote-zstdchunked)" "$(ctr_size "$REG/bench/zc-1:t")"
for t in optimize-estargz optimize-zstdchunked; do
    printf '%-32s %8s %10s\n' "ggfs-$t" "$(median "ggfs-$t")" "$(max_rss "ggfs-$t")"
    printf '%-32s %8s %10s\n' "ctr-remote-$t" "$(median "ctr-remote-$t")" "$(max_rss "ctr-remote-$t")"
done
