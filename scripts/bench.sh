#!/usr/bin/env bash
# Throughput and memory benchmark: the gateway against DCMTK's storescp, same machine, same run.
#
#   scripts/bench.sh                 # everything (starts LocalStack for the S3 rows if needed)
#   BENCH_S3=0 scripts/bench.sh      # skip the S3 rows
#   BENCH_COUNT=500 BENCH_LARGE_MB=1024 scripts/bench.sh
#
# Corpus: BENCH_COUNT (default 2000) CT-like instances of 0.5 MB (512x512x16 bit, explicit VR LE),
# and one instance of BENCH_LARGE_MB (default 1100) MB, generated in tmpfs. Every receiver writes to
# tmpfs (or LocalStack). Each row restarts its receiver, so "peak RSS" is that run's VmHWM
# (for storescp --fork: the parent; its children are not summed). This prints numbers; it asserts
# nothing. TCP_NODELAY=1 is set for DCMTK (it leaves Nagle's algorithm on otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${BENCH_COUNT:-2000}
LARGE_MB=${BENCH_LARGE_MB:-1100}
BENCH_S3=${BENCH_S3:-1}
ROOT=${BENCH_DIR:-/dev/shm/dicom-gateway-bench}
PORT=${BENCH_PORT:-11190}
export TCP_NODELAY=1
command -v storescu >/dev/null || { echo "DCMTK is missing: run scripts/test.sh once, or apt-get install dcmtk" >&2; exit 1; }

cargo build --release --quiet
BIN=target/release/dicom-gateway
rm -rf "$ROOT"; mkdir -p "$ROOT/corpus" "$ROOT/large"
trap 'pkill -P $$ 2>/dev/null || true; rm -rf "$ROOT"' EXIT

echo "generating $COUNT x 0.5 MB instances and one ${LARGE_MB} MB instance in $ROOT ..." >&2
python3 - "$ROOT" "$COUNT" "$LARGE_MB" <<'PY'
import os, struct, sys
root, count, large_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
CT, TS = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
def el(tag, vr, val):
    if len(val) % 2: val += b"\0" if vr == b"UI" else b" "
    g, e = tag
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", g, e, vr, 0, len(val)) + val
    return struct.pack("<HH2sH", g, e, vr, len(val)) + val
def meta(sop):
    body = el((2,1), b"OB", b"\0\1") + el((2,2), b"UI", CT.encode()) + el((2,3), b"UI", sop.encode()) \
         + el((2,0x10), b"UI", TS.encode()) + el((2,0x12), b"UI", b"1.2.3.4") + el((2,0x13), b"SH", b"BENCH")
    return b"\0"*128 + b"DICM" + el((2,0), b"UL", struct.pack("<I", len(body))) + body
def header(sop, study, series, rows, cols, frames):
    return (el((8,0x16), b"UI", CT.encode()) + el((8,0x18), b"UI", sop.encode()) + el((8,0x60), b"CS", b"CT")
          + el((0x10,0x10), b"PN", b"BENCH^PATIENT") + el((0x20,0xd), b"UI", study.encode())
          + el((0x20,0xe), b"UI", series.encode()) + el((0x28,2), b"US", struct.pack("<H",1))
          + el((0x28,4), b"CS", b"MONOCHROME2") + el((0x28,8), b"IS", str(frames).encode())
          + el((0x28,0x10), b"US", struct.pack("<H",rows)) + el((0x28,0x11), b"US", struct.pack("<H",cols))
          + el((0x28,0x100), b"US", struct.pack("<H",16)) + el((0x28,0x101), b"US", struct.pack("<H",12))
          + el((0x28,0x102), b"US", struct.pack("<H",11)) + el((0x28,0x103), b"US", struct.pack("<H",0)))
pixels = bytes((i * 7) % 251 for i in range(512 * 512 * 2))
study = "2.25.77777.1"
for i in range(count):
    sop = f"2.25.77777.2.{i+1}"
    d = os.path.join(root, "corpus", f"part{i % 4}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"ct{i:05d}.dcm"), "wb") as f:
        f.write(meta(sop) + header(sop, study, f"2.25.77777.3.{i // 100}", 512, 512, 1))
        f.write(struct.pack("<HH2sHI", 0x7fe0, 0x10, b"OW", 0, len(pixels)) + pixels)
frames = (large_mb * 1000 * 1000) // (512 * 512 * 2) + 1
sop = "2.25.77777.9.1"
with open(os.path.join(root, "large", "large.dcm"), "wb") as f:
    f.write(meta(sop) + header(sop, "2.25.77777.9", "2.25.77777.9.2", 512, 512, frames))
    f.write(struct.pack("<HH2sHI", 0x7fe0, 0x10, b"OW", 0, frames * len(pixels)))
    for _ in range(frames):
        f.write(pixels)
PY
SMALL_BYTES=$(du -sb "$ROOT/corpus" | cut -f1)
LARGE_BYTES=$(stat -c %s "$ROOT/large/large.dcm")

RECEIVER_PID=
start_receiver() { # name, command...
  local out="$ROOT/out"; rm -rf "$out"; mkdir -p "$out"
  "$@" >"$ROOT/receiver.log" 2>&1 &
  RECEIVER_PID=$!
  for _ in $(seq 1 100); do
    echoscu -aec DICOM_GATEWAY 127.0.0.1 "$PORT" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "receiver did not start: $(tail -5 "$ROOT/receiver.log")" >&2; return 1
}
peak_rss_mb() { awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$RECEIVER_PID/status" 2>/dev/null || echo "?"; }
stop_receiver() { kill -TERM "$RECEIVER_PID" 2>/dev/null || true; wait "$RECEIVER_PID" 2>/dev/null || true; }

send() { # assocs, what (small|large) -> prints seconds
  local assocs=$1 what=$2 t0 t1 pids=()
  t0=$(date +%s.%N)
  if [ "$what" = large ]; then
    storescu -aec DICOM_GATEWAY -xe 127.0.0.1 "$PORT" "$ROOT/large/large.dcm" >>"$ROOT/send.log" 2>&1
  elif [ "$assocs" = 1 ]; then
    storescu -aec DICOM_GATEWAY -xe -nh +sd +r 127.0.0.1 "$PORT" "$ROOT/corpus" >>"$ROOT/send.log" 2>&1
  else
    for p in 0 1 2 3; do
      storescu -aec DICOM_GATEWAY -xe -nh +sd +r 127.0.0.1 "$PORT" "$ROOT/corpus/part$p" >>"$ROOT/send.log" 2>&1 & pids+=($!)
    done
    wait "${pids[@]}"
  fi
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}'
}

printf '\n%-34s %-14s %6s %9s %8s %9s %8s %12s\n' receiver corpus assocs instances seconds "inst/s" "MB/s" "peak RSS MB"
row() { # label, assocs, what, receiver command...
  local label=$1 assocs=$2 what=$3; shift 3
  start_receiver "$@" || return 0
  : >"$ROOT/send.log"
  local secs n bytes corpus failed
  secs=$(send "$assocs" "$what")
  local rss; rss=$(peak_rss_mb)
  stop_receiver
  if [ "$what" = large ]; then n=1; bytes=$LARGE_BYTES; corpus="1 x $((LARGE_BYTES / 1000000)) MB"; else n=$COUNT; bytes=$SMALL_BYTES; corpus="$COUNT x 0.5 MB"; fi
  failed=$(grep -ci "failed\|refused" "$ROOT/send.log" || true)
  printf '%-34s %-14s %6s %9s %8s %9.0f %8.0f %12s%s\n' "$label" "$corpus" "$assocs" "$n" "$secs" \
    "$(awk -v n="$n" -v s="$secs" 'BEGIN{print n/s}')" "$(awk -v b="$bytes" -v s="$secs" 'BEGIN{print b/s/1e6}')" "$rss" \
    "$([ "$failed" -gt 0 ] && echo "  ($failed failures, see $ROOT/send.log)")"
}

gw_local=("$BIN" serve --listen "127.0.0.1:$PORT" --store-dir "$ROOT/out" --log-level warn)
row "DCMTK storescp (tmpfs)"           1 small storescp -aet DICOM_GATEWAY -od "$ROOT/out" "$PORT"
row "dicom-gateway local (tmpfs)"      1 small "${gw_local[@]}"
row "DCMTK storescp --fork (tmpfs)"    4 small storescp --fork -aet DICOM_GATEWAY -od "$ROOT/out" "$PORT"
row "dicom-gateway local (tmpfs)"      4 small "${gw_local[@]}"
row "DCMTK storescp (tmpfs)"           1 large storescp -aet DICOM_GATEWAY -od "$ROOT/out" "$PORT"
row "dicom-gateway local (tmpfs)"      1 large "${gw_local[@]}"

if [ "$BENCH_S3" = 1 ]; then
  export LS_HOME="${LS_HOME:-$HOME/.cache/localstack-offline}"
  scripts/localstack/start-localstack.sh >/dev/null
  export AWS_ENDPOINT_URL=http://127.0.0.1:4566 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
  "$LS_HOME/venv/bin/python" -c "import boto3; boto3.client('s3', endpoint_url='$AWS_ENDPOINT_URL').create_bucket(Bucket='dicom-gateway-bench')" 2>/dev/null || true
  gw_s3=("$BIN" serve --listen "127.0.0.1:$PORT" --s3-bucket dicom-gateway-bench --s3-force-path-style --log-level warn)
  row "dicom-gateway S3 (LocalStack)"    1 small "${gw_s3[@]}"
  row "dicom-gateway S3 (LocalStack)"    4 small "${gw_s3[@]}"
  row "dicom-gateway S3 (LocalStack)"    1 large "${gw_s3[@]}"
fi
echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1e6}' /proc/meminfo); $(storescu --version | head -1 | tr -d '$')"
