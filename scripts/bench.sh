#!/usr/bin/env bash
# Throughput, CPU and memory benchmark: the gateway against DCMTK's storescp, same machine, same run.
#
#   scripts/bench.sh                 # everything (starts LocalStack for the S3 rows if needed)
#   BENCH_S3=0 scripts/bench.sh      # skip the LocalStack rows
#   BENCH_S3S=0 scripts/bench.sh     # skip the s3s-fs rows (and the 20 ms link rows, which use it)
#   BENCH_LINK=0 scripts/bench.sh    # skip the 20 ms link rows
#   BENCH_COUNT=500 BENCH_LARGE_MB=1024 scripts/bench.sh
#   BENCH_BIN=/path/to/dicom-gateway scripts/bench.sh   # measure that binary instead of building
#
# Corpus: BENCH_COUNT (default 2000) CT-like instances of 0.5 MB (512x512x16 bit, explicit VR LE),
# and one instance of BENCH_LARGE_MB (default 1100) MB, generated in tmpfs. Every receiver writes to
# tmpfs (or LocalStack). Each row restarts its receiver, so "peak RSS" is that run's VmHWM
# (for storescp --fork: the parent; its children are not summed). This prints numbers; it asserts
# nothing. TCP_NODELAY=1 is set for DCMTK (it leaves Nagle's algorithm on otherwise).
#
# "CPU s/GB" is the receiver's CPU time (user + system, from /proc/PID/stat, children included)
# while the corpus was sent, per GB sent. Unlike the wall-clock columns it hardly moves when other
# work shares the machine, which makes it the figure to compare between versions (issue 11).
#
# s3s-fs rows: a small S3 server (the s3s-fs crate) storing into tmpfs, fast enough that the
# gateway's own cost shows; it is installed into ~/.cache/dicom-gateway-bench on first use. The
# "via TLS" rows reach it over HTTPS, as the gateway reaches S3 in production: the proxy below
# terminates TLS with a throw-away CA made by openssl, which the gateway trusts via SSL_CERT_FILE.
# 20 ms link rows (issue 11): examples/latency_proxy.rs delays every byte by 20 ms each way between
# the gateway and s3s-fs (over TLS, as above), and the small corpus goes over one association in direct mode and in edge
# mode (--spool-dir: acknowledged once spooled on local disk, uploaded behind). The edge row's CPU is
# read once every instance has reached the bucket. Builds without --spool-dir skip that row.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${BENCH_COUNT:-2000}
LARGE_MB=${BENCH_LARGE_MB:-1100}
BENCH_S3=${BENCH_S3:-1}
BENCH_S3S=${BENCH_S3S:-1}
BENCH_LINK=${BENCH_LINK:-1}
ROOT=${BENCH_DIR:-/dev/shm/dicom-gateway-bench}
PORT=${BENCH_PORT:-11190}
S3S_PORT=${BENCH_S3S_PORT:-11191}
LINK_PORT=${BENCH_LINK_PORT:-11192}
TLS_PORT=${BENCH_TLS_PORT:-11193}
LINK_DELAY_MS=20
# s3s-fs 0.14.1: the newest release that builds with the toolchain here (0.17 needs rustc 1.96).
S3S_VERSION=0.14.1
S3S_HOME=${BENCH_S3S_HOME:-$HOME/.cache/dicom-gateway-bench/s3s-$S3S_VERSION}
export TCP_NODELAY=1
command -v storescu >/dev/null || { echo "DCMTK is missing: run scripts/test.sh once, or apt-get install dcmtk" >&2; exit 1; }

if [ -n "${BENCH_BIN:-}" ]; then
  BIN=$BENCH_BIN
else
  cargo build --release --quiet
  BIN=target/release/dicom-gateway
fi
if [ "$BENCH_S3S" = 1 ] && [ ! -x "$S3S_HOME/bin/s3s-fs" ]; then
  echo "installing s3s-fs $S3S_VERSION into $S3S_HOME ..." >&2
  cargo install --quiet --locked s3s-fs --version "$S3S_VERSION" --features binary --root "$S3S_HOME"
fi
if [ "$BENCH_S3S" = 1 ]; then
  # The first build compiles tokio with the dev-dependency features examples get (a few minutes).
  cargo build --release --quiet --example latency_proxy
fi
PROXY=target/release/examples/latency_proxy
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
CLK_TCK=$(getconf CLK_TCK)
# utime + stime + cutime + cstime of the receiver, in clock ticks (proc(5): fields 14 to 17).
cpu_ticks() { awk '{print $14 + $15 + $16 + $17}' "/proc/$RECEIVER_PID/stat" 2>/dev/null || echo 0; }
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

printf '\n%-38s %-14s %6s %9s %8s %9s %8s %9s %12s\n' receiver corpus assocs instances seconds "inst/s" "MB/s" "CPU s/GB" "peak RSS MB"
AFTER_SEND=   # a command run after the send and before the CPU time is read (edge mode: the drain)
LAST_RATE=0   # instances/s of the last row, for the ratios at the end
row() { # label, assocs, what, receiver command...
  local label=$1 assocs=$2 what=$3; shift 3
  LAST_RATE=0
  start_receiver "$@" || return 0
  : >"$ROOT/send.log"
  local secs n bytes corpus failed cpu0 cpu1 drained=
  cpu0=$(cpu_ticks)
  secs=$(send "$assocs" "$what")
  if [ "$what" = large ]; then n=1; bytes=$LARGE_BYTES; corpus="1 x $((LARGE_BYTES / 1000000)) MB"; else n=$COUNT; bytes=$SMALL_BYTES; corpus="$COUNT x 0.5 MB"; fi
  if [ -n "$AFTER_SEND" ]; then $AFTER_SEND "$n" || drained="  (not all uploaded: CPU incomplete)"; fi
  cpu1=$(cpu_ticks)
  local rss; rss=$(peak_rss_mb)
  stop_receiver
  failed=$(grep -ci "failed\|refused" "$ROOT/send.log" || true)
  LAST_RATE=$(awk -v n="$n" -v s="$secs" 'BEGIN{print n/s}')
  printf '%-38s %-14s %6s %9s %8s %9.0f %8.0f %9.2f %12s%s%s\n' "$label" "$corpus" "$assocs" "$n" "$secs" \
    "$LAST_RATE" "$(awk -v b="$bytes" -v s="$secs" 'BEGIN{print b/s/1e6}')" \
    "$(awk -v a="$cpu0" -v b="$cpu1" -v t="$CLK_TCK" -v g="$bytes" 'BEGIN{print (b-a)/t/(g/1e9)}')" "$rss" \
    "$([ "$failed" -gt 0 ] && echo "  ($failed failures, see $ROOT/send.log)")" "$drained"
}

gw_local=("$BIN" serve --listen "127.0.0.1:$PORT" --store-dir "$ROOT/out" --log-level warn)
row "DCMTK storescp (tmpfs)"           1 small storescp -aet DICOM_GATEWAY -od "$ROOT/out" "$PORT"
row "dicom-gateway local (tmpfs)"      1 small "${gw_local[@]}"
LOCAL_RATE=$LAST_RATE
row "DCMTK storescp --fork (tmpfs)"    4 small storescp --fork -aet DICOM_GATEWAY -od "$ROOT/out" "$PORT"
row "dicom-gateway local (tmpfs)"      4 small "${gw_local[@]}"
row "DCMTK storescp (tmpfs)"           1 large storescp -aet DICOM_GATEWAY -od "$ROOT/out" "$PORT"
row "dicom-gateway local (tmpfs)"      1 large "${gw_local[@]}"

if [ "$BENCH_S3" = 1 ]; then
  export LS_HOME="${LS_HOME:-$HOME/.cache/localstack-offline}"
  scripts/localstack/start-localstack.sh >/dev/null
  export AWS_ENDPOINT_URL=http://127.0.0.1:4566 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
  "$LS_HOME/venv/bin/python" -c "import boto3; boto3.client('s3', endpoint_url='$AWS_ENDPOINT_URL').create_bucket(Bucket='dicom-gateway-bench')" 2>/dev/null || true
  gw_s3=("$BIN" serve --listen "127.0.0.1:$PORT" --s3-bucket dicom-gateway-bench --s3-force-path-style --store-dir "$ROOT/out" --log-level warn)
  row "dicom-gateway S3 (LocalStack)"    1 small "${gw_s3[@]}"
  row "dicom-gateway S3 (LocalStack)"    4 small "${gw_s3[@]}"
  row "dicom-gateway S3 (LocalStack)"    1 large "${gw_s3[@]}"
fi

if [ "$BENCH_S3S" = 1 ]; then
  S3S_ROOT="$ROOT/s3s"
  mkdir -p "$S3S_ROOT"
  "$S3S_HOME/bin/s3s-fs" --host 127.0.0.1 --port "$S3S_PORT" --access-key test --secret-key test "$S3S_ROOT" >"$ROOT/s3s.log" 2>&1 &
  # s3s-fs keeps each bucket as a directory, and its objects' metadata beside the buckets.
  empty_bucket() { rm -rf "$S3S_ROOT/bench"; find "$S3S_ROOT" -maxdepth 1 -name '.bucket-*' -delete; mkdir -p "$S3S_ROOT/bench"; }
  # Waits (up to 10 minutes) until the bucket holds $1 instances: edge mode uploads after the ack.
  wait_uploaded() {
    local want=$1 _
    for _ in $(seq 1 6000); do
      [ "$(find "$S3S_ROOT/bench" -name '*.dcm' -type f | wc -l)" -ge "$want" ] && return 0
      sleep 0.1
    done
    return 1
  }
  s3s_env=(env AWS_ENDPOINT_URL="http://127.0.0.1:$S3S_PORT" AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1)
  gw_s3s=("${s3s_env[@]}" "$BIN" serve --listen "127.0.0.1:$PORT" --s3-bucket bench --s3-force-path-style --store-dir "$ROOT/out" --log-level warn)
  empty_bucket; row "dicom-gateway S3 (s3s-fs tmpfs)"  1 small "${gw_s3s[@]}"
  empty_bucket; row "dicom-gateway S3 (s3s-fs tmpfs)"  4 small "${gw_s3s[@]}"
  empty_bucket; row "dicom-gateway S3 (s3s-fs tmpfs)"  1 large "${gw_s3s[@]}"

  TLS_DIR="$ROOT/tls"; mkdir -p "$TLS_DIR"
  (
    cd "$TLS_DIR"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=bench-ca -keyout ca.key -out ca.pem
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost -keyout key.pem -out leaf.csr
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >leaf.ext
    openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile leaf.ext -out cert.pem
  ) >"$ROOT/tls.log" 2>&1 || { echo "openssl failed: $(tail -3 "$ROOT/tls.log")" >&2; exit 1; }
  "$PROXY" "$TLS_PORT" "127.0.0.1:$S3S_PORT" 0 "$TLS_DIR/cert.pem" "$TLS_DIR/key.pem" >"$ROOT/tls-proxy.log" 2>&1 &
  tls_env=(env AWS_ENDPOINT_URL="https://localhost:$TLS_PORT" SSL_CERT_FILE="$TLS_DIR/ca.pem" AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1)
  gw_tls=("${tls_env[@]}" "$BIN" serve --listen "127.0.0.1:$PORT" --s3-bucket bench --s3-force-path-style --store-dir "$ROOT/out" --log-level warn)
  empty_bucket; row "dicom-gateway S3 (s3s-fs via TLS)"  1 small "${gw_tls[@]}"
  empty_bucket; row "dicom-gateway S3 (s3s-fs via TLS)"  1 large "${gw_tls[@]}"

  if [ "$BENCH_LINK" = 1 ]; then
    "$PROXY" "$LINK_PORT" "127.0.0.1:$S3S_PORT" "$LINK_DELAY_MS" "$TLS_DIR/cert.pem" "$TLS_DIR/key.pem" >"$ROOT/proxy.log" 2>&1 &
    link_env=(env AWS_ENDPOINT_URL="https://localhost:$LINK_PORT" SSL_CERT_FILE="$TLS_DIR/ca.pem" AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1)
    gw_link=("${link_env[@]}" "$BIN" serve --listen "127.0.0.1:$PORT" --s3-bucket bench --s3-force-path-style --store-dir "$ROOT/out" --log-level warn)
    empty_bucket; row "dicom-gateway S3 direct, ${LINK_DELAY_MS} ms link" 1 small "${gw_link[@]}"
    DIRECT_RATE=$LAST_RATE
    if "$BIN" serve --help | grep -q -- '--spool-dir'; then
      empty_bucket; rm -rf "$ROOT/spool"; mkdir -p "$ROOT/spool"
      AFTER_SEND=wait_uploaded
      row "dicom-gateway S3 edge, ${LINK_DELAY_MS} ms link" 1 small "${gw_link[@]}" --spool-dir "$ROOT/spool"
      AFTER_SEND=
      EDGE_RATE=$LAST_RATE
      echo
      awk -v e="$EDGE_RATE" -v d="$DIRECT_RATE" -v l="$LOCAL_RATE" 'BEGIN{
        printf "edge / direct over the %s ms link: %.1fx instances/s (issue 11 target: 5x or more)\n", '"$LINK_DELAY_MS"', (d > 0 ? e / d : 0)
        printf "edge over the link / local store:  %.2fx instances/s (issue 11 target: 0.8x or more)\n", (l > 0 ? e / l : 0) }'
    else
      printf '%-38s skipped: this build has no --spool-dir\n' "dicom-gateway S3 edge, ${LINK_DELAY_MS} ms link"
    fi
  fi
fi
echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1e6}' /proc/meminfo); $(storescu --version | head -1 | tr -d '$')"
