#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ (AFL++ through cargo-afl: it works on the
# stable toolchain, where cargo-fuzz needs nightly) and runs each one for
# SECONDS_PER_TARGET (default 10), one after the other, from its seed corpus
# in fuzz/corpus/<target>/. Exits non-zero if any target crashed (a panic,
# a failed invariant, an abort), printing each crashing input's path; a
# crashing input reproduces with `fuzz/target/release/<target> < FILE`.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# FUZZ_EXECS=N stops each target after N executions instead (SECONDS_PER_TARGET
# still caps it): `FUZZ_EXECS=10000000 scripts/fuzz.sh 3600` is the campaign.
#
# Installs cargo-afl (and lets it build AFL++) only when missing. Findings
# stay in fuzz/out/<target>/default/ (crashes/, hangs/, queue/, fuzzer_stats)
# until the next run of that target.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-10}
shift || true

if ! cargo afl --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-afl" >&2
  cargo install --locked cargo-afl
fi
# AFL++ and its runtime for this rustc: built once (`config --build` refuses
# to build them again, which is fine).
if ! out=$(cargo afl config --build 2>&1); then
  if ! grep -q 'already built' <<<"$out"; then
    echo "$out" >&2
    echo "fuzz: building AFL++ failed" >&2
    exit 1
  fi
fi

targets=("$@")
if ((${#targets[@]} == 0)); then
  for f in fuzz/src/bin/*.rs; do
    t=${f##*/}
    targets+=("${t%.rs}")
  done
fi

echo "fuzz: building ${#targets[@]} targets" >&2
(cd fuzz && cargo afl build --release --locked --quiet)

# No UI in logs; do not insist on the CPU governor, a core of our own, or a
# core_pattern that keeps cores (crashes are caught all the same).
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 \
  AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_QUIET=1

field() { awk -F' *: *' -v k="$1" '$1 == k {print $2}' "$2" 2>/dev/null; }

failed=()
for t in "${targets[@]}"; do
  corpus=fuzz/corpus/$t
  out=fuzz/out/$t
  if [[ ! -d $corpus ]] || [[ -z $(ls -A "$corpus") ]]; then
    echo "fuzz: $t has no seeds in $corpus" >&2
    failed+=("$t")
    continue
  fi
  rm -rf "$out"
  mkdir -p "$out"
  echo "fuzz: $t for ${secs}s" >&2
  limit=(-V "$secs")
  if [[ -n ${FUZZ_EXECS:-} ]]; then limit+=(-E "$FUZZ_EXECS"); fi
  if ! cargo afl fuzz -i "$corpus" -o "$out" "${limit[@]}" -- "fuzz/target/release/$t" \
    >"$out/afl.log" 2>&1; then
    # A seed that crashes stops AFL++ before it fuzzes.
    tail -n 20 "$out/afl.log" >&2
    echo "fuzz: $t: afl-fuzz failed (log: $out/afl.log)" >&2
    failed+=("$t")
    continue
  fi
  s=$out/default/fuzzer_stats
  printf 'fuzz: %-16s %10s execs %8s/s  corpus %5s  crashes %s  hangs %s\n' "$t" \
    "$(field execs_done "$s")" "$(field execs_per_sec "$s")" "$(field corpus_count "$s")" \
    "$(field saved_crashes "$s")" "$(field saved_hangs "$s")" >&2
  crashes=("$out"/default/crashes/id:*)
  if [[ -e ${crashes[0]} ]]; then
    for c in "${crashes[@]}"; do
      echo "fuzz: $t CRASH: $c" >&2
    done
    failed+=("$t")
  fi
done

if ((${#failed[@]})); then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: no crashes" >&2
