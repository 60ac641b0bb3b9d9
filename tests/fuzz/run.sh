#!/bin/bash
# Runs every fuzz target (or those named as arguments) for a bounded time each, growing the
# corpus kept in the repo (tests/fuzz/corpus/<target>/). Exits non-zero when a target crashes,
# leaks, times out or fails to build; the crashing input is in artifacts/<target>/.
#
#   FUZZ_SECS=30        seconds per target (default 30)
#   FUZZ_JOBS=1         parallel fuzzing jobs per target (default 1: the machine has 2 cores)
#   FUZZ_SANITIZER=address   cargo fuzz --sanitizer (address, none, ...)
#   CARGO_TARGET_DIR    where to build (default: cargo's own under tests/fuzz/target)
#
# Needs nightly and cargo-fuzz (`cargo install cargo-fuzz`). Seeds: `cargo run --bin gen_seeds`.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
secs="${FUZZ_SECS:-30}"
jobs="${FUZZ_JOBS:-1}"
sanitizer="${FUZZ_SANITIZER:-address}"
all=(virtio_block virtio_net virtio_vsock api_http api_bodies snapshot_state agent_proto)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all[@]}")

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "run.sh: cargo-fuzz on nightly is needed: rustup toolchain install nightly; cargo install cargo-fuzz" >&2
  exit 2
fi

fuzz() { cargo +nightly fuzz "$1" --fuzz-dir "$here" --sanitizer "$sanitizer" "${@:2}"; }

echo "run.sh: building the fuzz targets (sanitizer $sanitizer)"
if ! fuzz build >/dev/null 2>"$here/build.log"; then
  tail -n 30 "$here/build.log" >&2
  echo "run.sh: build failed (log: $here/build.log)" >&2
  exit 2
fi
rm -f "$here/build.log"

failed=()
summary=()
for t in "${targets[@]}"; do
  corpus="$here/corpus/$t"
  artifacts="$here/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  log="$artifacts/run.log"
  echo "run.sh: $t for ${secs}s (corpus $(ls "$corpus" | wc -l) files)"
  # -timeout: one input taking more than 10 s is a hang; -rss_limit_mb: leaks abort.
  fuzz run "$t" "$corpus" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -jobs="$jobs" -workers="$jobs" \
      -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1
  rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s+=$2} END {print s+0}')
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | awk '{s+=$2} END {print s+0}')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | awk '{print $2}')
  line="$t: exit $rc, $execs execs, ${rate}/s, cov ${cov:-?}, corpus $(ls "$corpus" | wc -l)"
  summary+=("$line")
  if [ $rc -ne 0 ]; then
    failed+=("$t")
    echo "run.sh: $t FAILED (exit $rc); log $log; artifacts:" >&2
    ls "$artifacts" | grep -v run.log >&2
    grep -m1 -A 30 -E 'panicked|ERROR: (AddressSanitizer|libFuzzer)|==ERROR' "$log" >&2
  fi
done

echo
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -ne 0 ]; then
  echo "run.sh: crashed: ${failed[*]}" >&2
  exit 1
fi
