#!/usr/bin/env bash
# Builds a debian:bookworm-sized image for benchmarks and pushes it to a
# registry as three variants:
#   REG/REPO:gzip         plain OCI tar+gzip (umoci)
#   REG/REPO:estargz      eStargz           (ctr-remote convert --estargz --oci)
#   REG/REPO:zstdchunked  zstd:chunked      (ctr-remote convert --zstdchunked --oci)
#
# usage: scripts/fixtures.sh REGISTRY [REPO]     e.g. 127.0.0.1:5000 bench/debian
#
# The root filesystem is `debootstrap --variant=minbase bookworm` from the
# machine's configured Debian mirror; when no mirror answers, a ~100 MB tree
# of real files copied from this machine's /usr stands in. The OCI layout is
# cached in target/fixtures/bookworm-layout (delete it to rebuild). Not used
# by tests (too slow); benchmark scripts call it.
set -euo pipefail
cd "$(dirname "$0")/.."

REG=${1:?usage: scripts/fixtures.sh REGISTRY [REPO]}
REPO=${2:-bench/debian}
CACHE=target/fixtures
LAYOUT=$CACHE/bookworm-layout
TAG=bookworm
mkdir -p "$CACHE"
WORK=$(mktemp -d /tmp/ggfs-fixtures-XXXXXX)
CTRD_PID=

cleanup() {
  if [[ -n $CTRD_PID ]]; then
    kill "$CTRD_PID" 2>/dev/null || true
    wait "$CTRD_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { echo "fixtures: $*" >&2; }

# The Debian mirror apt uses here (deb822 .sources or a one-line list).
debian_mirror() {
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' |
    grep -v -- '-security' | head -n1 || true)
  if [[ -z $uri ]]; then
    uri=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
      awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

debootstrap_rootfs() {
  local dest=$1 mirror
  command -v debootstrap >/dev/null ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null || return 1
  mirror=$(debian_mirror)
  log "debootstrap --variant=minbase bookworm from $mirror"
  debootstrap --variant=minbase bookworm "$dest" "$mirror" >"$WORK/debootstrap.log" 2>&1 || {
    tail -n 20 "$WORK/debootstrap.log" >&2
    return 1
  }
  # Nothing of the build host should leak into the image.
  rm -rf "$dest"/var/cache/apt/archives/*.deb "$dest"/var/lib/apt/lists/*
}

# ~100 MB of real files from /usr, whole directories at a time.
fallback_rootfs() {
  local dest=$1 total=0 limit=$((100 * 1024 * 1024)) d size
  log "no mirror: copying ~100 MB of /usr instead"
  mkdir -p "$dest"/{etc,tmp,var,root}
  chmod 1777 "$dest/tmp"
  cp -a /etc/os-release /etc/passwd /etc/group "$dest/etc/"
  for d in /usr/bin /usr/sbin /usr/lib/x86_64-linux-gnu /usr/share/doc /usr/share/zoneinfo \
    /usr/share/locale /usr/share/man /usr/lib/python3 /usr/share/perl /usr/include \
    /usr/share/i18n /usr/lib/git-core /usr/share/vim /usr/share/misc /usr/lib/gcc; do
    [[ -d $d ]] || continue
    size=$(du -sb "$d" | cut -f1)
    ((total + size <= limit)) || continue
    (cd / && cp -a --parents "${d#/}" "$dest/")
    total=$((total + size))
  done
  ((total > 0)) || { log "fallback tree is empty"; return 1; }
  ln -s usr/bin "$dest/bin"
  ln -s usr/lib "$dest/lib"
  log "fallback tree: $((total / 1024 / 1024)) MB"
}

build_layout() {
  local rootfs=$WORK/rootfs tmp=$CACHE/.bookworm-layout.$$
  debootstrap_rootfs "$rootfs" || { rm -rf "$rootfs"; fallback_rootfs "$rootfs"; }
  rm -rf "$tmp"
  umoci init --layout "$tmp"
  umoci new --image "$tmp:$TAG"
  umoci unpack --image "$tmp:$TAG" "$WORK/bundle" >/dev/null
  cp -a "$rootfs/." "$WORK/bundle/rootfs/"
  umoci repack --image "$tmp:$TAG" "$WORK/bundle"
  umoci config --image "$tmp:$TAG" --config.cmd /bin/bash --os linux --architecture amd64
  umoci gc --layout "$tmp"
  mv "$tmp" "$LAYOUT"
}

start_containerd() {
  local dir=$WORK/ctrd
  mkdir -p "$dir"
  cat >"$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$dir/c.sock"
[ttrpc]
  address = "$dir/c.sock.ttrpc"
[debug]
  level = "warn"
[metrics]
  address = ""
TOML
  containerd --config "$dir/config.toml" >"$dir/log" 2>&1 &
  CTRD_PID=$!
  CTR=(ctr-remote --address "$dir/c.sock" --namespace ggfs-fixtures)
  for _ in $(seq 100); do
    "${CTR[@]}" version >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  cat "$dir/log" >&2
  return 1
}

# convert FLAG SUFFIX: REG/REPO:gzip -> REG/REPO:SUFFIX
convert() {
  local src=$REG/$REPO:gzip dst=$REG/$REPO:$2
  log "converting to $2"
  "${CTR[@]}" image convert "$1" --oci "$src" "$dst" >/dev/null
  "${CTR[@]}" image push --plain-http "$dst" >/dev/null
}

[[ -f $LAYOUT/index.json ]] || build_layout
log "pushing $REG/$REPO:gzip"
skopeo copy --quiet --dest-tls-verify=false "oci:$LAYOUT:$TAG" "docker://$REG/$REPO:gzip"
start_containerd
"${CTR[@]}" content fetch --plain-http "$REG/$REPO:gzip" >/dev/null
convert --estargz estargz
convert --zstdchunked zstdchunked

# The converter must really have produced eStargz / zstd:chunked layers.
check() {
  skopeo inspect --raw --tls-verify=false "docker://$REG/$REPO:$1" |
    jq -e "$2" >/dev/null || { log "$REG/$REPO:$1 is not $1"; exit 1; }
}
check estargz '.layers | all(.annotations["containerd.io/snapshot/stargz/toc.digest"] != null)'
check zstdchunked '.layers | all(.mediaType == "application/vnd.oci.image.layer.v1.tar+zstd")'
log "done: $REG/$REPO:{gzip,estargz,zstdchunked}"
