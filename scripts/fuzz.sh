#!/usr/bin/env bash
# Runs the fuzz targets in fuzz/ for a bounded time each (coverage-guided, libFuzzer via cargo fuzz).
#
#   scripts/fuzz.sh                  # every target, 60 s each
#   FUZZ_SECONDS=600 scripts/fuzz.sh sniffer
#
# Targets: pdu (Upper Layer framing), command (DIMSE command sets), sniffer (data set header in every
# transfer syntax). Seeds are in fuzz/corpus/<target>/ (new inputs found are added there); a
# crashing input is written to fuzz/artifacts/<target>/ and the script exits non-zero. Keep every
# fixed crash as a unit test beside the code it broke.
# Only a stable toolchain exists here, so cargo fuzz runs with RUSTC_BOOTSTRAP=1 and without a
# sanitizer (-s none): the gateway is safe Rust, and the fuzzers look for panics, hangs and
# unbounded allocations.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${FUZZ_SECONDS:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(pdu command sniffer)
export RUSTC_BOOTSTRAP=1
status=0
for t in "${targets[@]}"; do
  echo "[fuzz] $t for ${SECONDS_EACH}s" >&2
  if ! cargo fuzz run -s none "$t" "fuzz/corpus/$t" -- -max_total_time="$SECONDS_EACH" -rss_limit_mb=1024 -timeout=10 2> "fuzz/$t.log"; then
    echo "[fuzz] $t FOUND A CRASH: see fuzz/artifacts/$t/ and fuzz/$t.log" >&2
    status=1
  fi
  grep -E "^(#[0-9]+: cov|Done [0-9]+ runs)" "fuzz/$t.log" | tail -1 | sed "s/^/[fuzz] $t: /" >&2
done
exit $status
