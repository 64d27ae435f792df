#!/usr/bin/env bash
# Installs what the test suite and benchmarks need. Idempotent: apt runs
# only when a tool is missing. Runs as root (the machines and CI do).
#   scripts/setup.sh          everything the tests and benchmarks use
#   scripts/setup.sh --demo   only what scripts/demo.sh uses (fuse3, curl, jq;
#                             no cargo-nextest)
set -euo pipefail

DEMO=0
if [[ ${1:-} == --demo ]]; then DEMO=1; fi

# tool -> Debian package providing it
declare -A TOOLS=(
  [docker-registry]=docker-registry
  [skopeo]=skopeo
  [umoci]=umoci
  [fusermount3]=fuse3
  [ctr-remote]=stargz-snapshotter
  [containerd]=containerd
  [runc]=runc
  [podman]=podman
  [git]=git
  [htpasswd]=apache2-utils
  [setfattr]=attr
  [getfattr]=attr
  [hyperfine]=hyperfine
  [jq]=jq
  [curl]=curl
  [openssl]=openssl
  # benchmark scripts (scripts/bench/)
  [bc]=bc
  [/usr/bin/time]=time
)

# The demo's subset of the above.
if ((DEMO)); then
  declare -A TOOLS=(
    [fusermount3]=fuse3
    [curl]=curl
    [jq]=jq
  )
fi

missing=()
for tool in "${!TOOLS[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${TOOLS[$tool]}")
done

if ((${#missing[@]})); then
  # Unique package names, stable order.
  mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "setup: installing ${pkgs[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

# The FUSE daemon needs the device node; containers sometimes lack it.
if [[ ! -c /dev/fuse ]]; then
  echo "setup: /dev/fuse missing, creating it" >&2
  mknod -m 0666 /dev/fuse c 10 229 || echo "setup: WARNING: cannot create /dev/fuse; mount tests will fail" >&2
fi

if ((!DEMO)) && ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
