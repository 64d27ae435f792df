#!/usr/bin/env bash
# The ggfs demo, the first thing to run (Debian bookworm, as root):
#   1. installs what the demo needs (fuse3, curl, jq) and builds ggfs;
#   2. starts the embedded registry (`ggfs registry serve`) on 127.0.0.1:$GGFS_DEMO_PORT;
#   3. builds an image of real size (~300 MB of this machine's /usr) as plain
#      tar+gzip, and an eStargz copy of it (`ggfs optimize`), and pushes both;
#   4. mounts the registry, reads one file from each image and shows from the
#      mount's own counters (.ggfs/stats) how much of each was fetched;
#   5. writes a file through the mount and commits it: a new image is pushed,
#      the tag moves, the old digest stays;
#   6. shows `ggfs copy` and `ggfs export` at work;
#   7. unmounts and stops everything on exit, Ctrl-C or failure.
#
# Environment:
#   GGFS_DEMO_PORT=5055   port of the embedded registry (127.0.0.1)
#   GGFS=/path/to/ggfs    use these binaries (ggfs-mountd beside it) instead of building
#   CARGO_TARGET_DIR      where the build goes (as cargo's)
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${GGFS_DEMO_PORT:-5055}
REG=127.0.0.1:$PORT
WORK=$(mktemp -d /tmp/ggfs-demo.XXXXXX)
MNT=$WORK/mnt
IMAGE_MB=300          # how much of /usr goes into the image
SERVER=
T_START=$(date +%s)

# --- output -------------------------------------------------------------------

bold() { if [[ -t 1 ]]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }
section() { echo; bold "== $*"; }
say() { printf '   %s\n' "$*"; }
# show CMD...: print the command as a user would type it (ggfs for its full path).
show() { local c="$*"; bold "\$ ${c//"${GGFS:-ggfs}"/ggfs}"; }
# run CMD...: show the command, then run it.
run() { show "$@"; "$@"; }
die() { echo "demo: $*" >&2; exit 1; }
# thousands separators
num() { printf "%'d" "$1" 2>/dev/null || printf '%s' "$1"; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1000000 }'; }

# --- clean-up -----------------------------------------------------------------

cleanup() {
    local st=$?
    trap - EXIT INT TERM
    if mountpoint -q "$MNT" 2>/dev/null; then
        "$GGFS" unmount "$MNT" >/dev/null 2>&1 || fusermount3 -uz "$MNT" 2>/dev/null || true
    fi
    if [[ -n $SERVER ]]; then
        kill "$SERVER" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
    fi
    if mountpoint -q "$MNT" 2>/dev/null; then
        echo "demo: $MNT is still mounted; leaving $WORK in place" >&2
    else
        rm -rf "$WORK"
    fi
    if ((st != 0)); then echo "demo: stopped (exit status $st); nothing left running" >&2; fi
    exit "$st"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 1. set-up and build --------------------------------------------------------

install_needs() {
    section "Installing what the demo needs (fuse3, curl, jq; apt only if one is missing)"
    scripts/setup.sh --demo
    say "fuse3, curl and jq are there; /dev/fuse is there"
    command -v cargo >/dev/null || [[ -n ${GGFS:-} ]] ||
        die "cargo not found: install Rust first (https://rustup.rs), then run this again"
}

build() {
    if [[ -n ${GGFS:-} ]]; then
        section "Using the binaries at $GGFS (GGFS is set; not building)"
    else
        section "Building ggfs and ggfs-mountd (cargo build --release; minutes the first time)"
        cargo build --release --workspace
        GGFS=${CARGO_TARGET_DIR:-$PWD/target}/release/ggfs
    fi
    [[ -x $GGFS && -x $(dirname "$GGFS")/ggfs-mountd ]] ||
        die "no ggfs and ggfs-mountd side by side at $(dirname "$GGFS")"
    say "$("$GGFS" version)"
}

# --- 2. the registry --------------------------------------------------------------

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

start_registry() {
    section "Starting the embedded registry on $REG (ggfs registry serve)"
    if ! [[ $PORT =~ ^[0-9]{1,5}$ ]] || ((10#$PORT < 1 || 10#$PORT > 65535)); then
        die "GGFS_DEMO_PORT=$PORT is not a port number (1-65535)"
    fi
    if port_in_use; then
        die "port $PORT on 127.0.0.1 is already in use (another registry, or an earlier demo?);" \
            "pick a free one: GGFS_DEMO_PORT=$((10#$PORT + 1)) scripts/demo.sh"
    fi
    "$GGFS" registry serve --address "$REG" --disk "$WORK/registry" >"$WORK/server.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 100); do
        if ! kill -0 "$SERVER" 2>/dev/null; then
            wait "$SERVER" || true
            SERVER=
            die "the registry did not start on port $PORT: $(tail -1 "$WORK/server.log")" \
                "(pick another port: GGFS_DEMO_PORT=$((10#$PORT + 1)) scripts/demo.sh)"
        fi
        if curl -fs "http://$REG/v2/" >/dev/null; then
            say "listening; blobs and manifests in $WORK/registry (all of $WORK goes at the end)"
            return
        fi
        sleep 0.1
    done
    die "the registry on port $PORT did not answer within 10 s; its log: $(tail -3 "$WORK/server.log")"
}

# --- 3. the images ------------------------------------------------------------------

# layer_bytes IMAGE: the sum of its layers' sizes (compressed, as stored).
layer_bytes() { "$GGFS" manifest "$1" | jq '[.layers[].size] | add'; }

# A tar of ~IMAGE_MB of real files from /usr, in path order (the same files on
# every run on a machine), plus /etc/os-release and the file it links to.
make_tar() {
    (cd / && {
        printf '%s\n' etc etc/os-release etc/debian_version usr usr/lib usr/lib/os-release
        find usr/lib/x86_64-linux-gnu usr/share/perl usr/share/perl5 usr/bin -xdev \
            \( -type f -o -type l \) -size -16M -printf '%s %p\n' 2>/dev/null |
            LC_ALL=C sort -k2 | awk -v max=$((IMAGE_MB * 1000000)) '{ s += $1; if (s > max) exit; print $2 }'
    } | tar --no-recursion -cf "$WORK/usr.tar" -T - 2>/dev/null) || true
    [[ -s $WORK/usr.tar ]] || die "could not build the image's tar from /usr"
}

build_images() {
    section "Building an image of real size from this machine's /usr"
    make_tar
    say "$(tar -tf "$WORK/usr.tar" | wc -l) files, $(mb "$(stat -c %s "$WORK/usr.tar")") uncompressed"
    run "$GGFS" append -f "$WORK/usr.tar" -t "$REG/demo/usr:gzip"
    GZ_DIGEST=$("$GGFS" digest "$REG/demo/usr:gzip")
    say "plain tar+gzip layer: $(mb "$(layer_bytes "$REG/demo/usr:gzip")")"
    run "$GGFS" optimize "$REG/demo/usr:gzip" -t "$REG/demo/usr:estargz"
    say "eStargz layer (gzip members + a table of contents): $(mb "$(layer_bytes "$REG/demo/usr:estargz")")"
    rm -f "$WORK/usr.tar"
    echo
    run "$GGFS" catalog "$REG"
    run "$GGFS" ls "$REG/demo/usr"
}

# --- 4. the mount -----------------------------------------------------------------

# stat_blob DIGEST FIELD: FIELD (fetched, requests) of blob DIGEST in .ggfs/stats
# ("blob sha256:… size N fetched N percent P requests N"); 0 if not listed.
stat_blob() {
    awk -v d="$1" -v f="$2" '
        $1 == "blob" && $2 == d { for (i = 3; i < NF; i += 2) if ($i == f) v = $(i + 1) }
        END { print v + 0 }' "$MNT/.ggfs/stats"
}

# layer_fetched TAG: bytes of the image's layers the mount has fetched.
layer_fetched() {
    local d f=0
    for d in $("$GGFS" manifest "$REG/demo/usr:$1" | jq -r '.layers[].digest'); do
        f=$((f + $(stat_blob "$d" fetched)))
    done
    echo "$f"
}

# fetched_sentence TAG: how much of the image's layers the mount has fetched.
fetched_sentence() {
    local tag=$1 size=0 fetched=0 reqs=0 d s
    while read -r d s; do
        size=$((size + s))
        fetched=$((fetched + $(stat_blob "$d" fetched)))
        reqs=$((reqs + $(stat_blob "$d" requests)))
    done < <("$GGFS" manifest "$REG/demo/usr:$tag" | jq -r '.layers[] | "\(.digest) \(.size)"')
    awk -v t="$tag" -v f="$fetched" -v s="$size" -v r="$reqs" 'BEGIN {
        printf "%s: %.1f MB of its %.1f MB layer fetched (%.2f %%), in %d request%s.\n",
            t, f / 1e6, s / 1e6, 100 * f / s, r, (r == 1 ? "" : "s") }'
}

# timed_cat FILE: its first line, and how long the read took.
timed_cat() {
    local t0 t1 line
    t0=$(date +%s%N)
    line=$(head -1 "$1")
    t1=$(date +%s%N)
    show head -1 "$1"
    say "$line    ($(( (t1 - t0) / 1000000 )) ms)"
}

mount_and_read() {
    section "Mounting the registry: every repository, tag and file as a directory tree"
    mkdir -p "$MNT"
    # A fresh cache, so the counters start at zero; commits only on `ggfs commit`.
    run "$GGFS" mount "$REG" "$MNT" --cache-dir "$WORK/cache" --commit-delay manual --log "$WORK/mountd.log"
    run ls "$MNT" "$MNT/demo/usr" "$MNT/demo/usr/estargz"
    run ls "$MNT/demo/usr/estargz/rootfs" "$MNT/demo/usr/estargz/rootfs/usr"
    say "(and $(find "$MNT/demo/usr/estargz/rootfs" | wc -l) entries below: listing reads the layer's table of contents, no file)"

    section "Reading one file from the eStargz image: only its chunk (and the layer's index) is fetched"
    timed_cat "$MNT/demo/usr/estargz/rootfs/etc/os-release"
    run cat "$MNT/.ggfs/stats"
    say "$(fetched_sentence estargz)"

    section "The same file from the plain tar+gzip image: the first read streams the layer once"
    timed_cat "$MNT/demo/usr/gzip/rootfs/etc/os-release"
    run cat "$MNT/.ggfs/stats"
    say "$(fetched_sentence gzip)"
    ESGZ_FETCHED=$(layer_fetched estargz); GZ_FETCHED=$(layer_fetched gzip)
    say "$(awk -v e="$ESGZ_FETCHED" -v g="$GZ_FETCHED" 'BEGIN {
        printf "The same read cost %.0f times more bytes from the plain image than from the eStargz one.", g / e }')"
    say "(gzip cannot be entered in the middle: ggfs reads it once, verifies it and indexes it;"
    say " later reads of that layer, in this mount or the next, fetch only the spans they need.)"
}

# --- 5. a write becomes an image ---------------------------------------------------

write_and_commit() {
    local new f=$MNT/demo/usr/gzip/rootfs/etc/demo.txt
    section "Writing through the mount, then committing: the change becomes a pushed image"
    show "echo hello from the demo > $f"
    echo hello from the demo >"$f"
    run "$GGFS" status "$MNT"
    show "$GGFS" commit "$MNT/demo/usr/gzip" -m '"demo"'
    new=$("$GGFS" commit "$MNT/demo/usr/gzip" -m "demo")
    NEW_DIGEST=${new#*@}
    say "pushed: $new"
    say "demo/usr:gzip moved from $GZ_DIGEST"
    say "                      to $NEW_DIGEST"
    run "$GGFS" ls "$REG/demo/usr"
    run "$GGFS" digest "$REG/demo/usr:gzip"
    show "$GGFS" manifest "$REG/demo/usr:gzip" "| jq -c '.layers[] | {size, digest}'"
    "$GGFS" manifest "$REG/demo/usr:gzip" | jq -c '.layers[] | {size, digest}'
    show "$GGFS" config "$REG/demo/usr:gzip" "| jq -c '.history[-1]'"
    "$GGFS" config "$REG/demo/usr:gzip" | jq -c '.history[-1]'
    run cat "$f"
    say "the old image is still there by digest ($("$GGFS" manifest "$REG/demo/usr@$GZ_DIGEST" |
        jq '.layers | length') layer), in the registry and in the mount, without the file:"
    run ls "$MNT/demo/usr/$GZ_DIGEST/rootfs/etc"
}

# --- 6. copy and export -------------------------------------------------------------

copy_and_export() {
    local t0 t1 n
    section "Copying: registry to registry (blobs mounted, not moved), and to an OCI layout on disk"
    t0=$(date +%s%N)
    run "$GGFS" copy "$REG/demo/usr:estargz" "$REG/demo/copy:estargz"
    t1=$(date +%s%N)
    say "demo/copy:estargz is $("$GGFS" digest "$REG/demo/copy:estargz"), the same digest;"
    say "its $(mb "$(layer_bytes "$REG/demo/copy:estargz")") of layers were mounted from demo/usr in" \
        "$(( (t1 - t0) / 1000000 )) ms, no byte moved"
    run "$GGFS" copy "$REG/demo/usr:gzip" "oci:$WORK/layout:gzip"
    say "OCI layout written: $(du -sh "$WORK/layout" | cut -f1) on disk, $(find "$WORK/layout/blobs" -type f | wc -l)" \
        "blobs (manifest, config, layers), tags in its index.json: $(jq -r '[.manifests[].annotations["org.opencontainers.image.ref.name"]] | join(" ")' "$WORK/layout/index.json")"

    section "Exporting the committed image's flattened filesystem as a tar"
    run "$GGFS" export "$REG/demo/usr:gzip" "$WORK/usr-export.tar"
    n=$(tar -tf "$WORK/usr-export.tar" | wc -l)
    say "wrote $(mb "$(stat -c %s "$WORK/usr-export.tar")"), $(num "$n") entries; etc/demo.txt in it says:" \
        "$(tar -xOf "$WORK/usr-export.tar" etc/demo.txt)"
    rm -f "$WORK/usr-export.tar"
}

# --- main -----------------------------------------------------------------------------

install_needs
build
start_registry
build_images
mount_and_read
write_and_commit
copy_and_export
section "Unmounting and stopping the registry"
run "$GGFS" unmount "$MNT"
echo
bold "demo done in $(($(date +%s) - T_START)) s."
