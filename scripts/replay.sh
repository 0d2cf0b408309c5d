#!/usr/bin/env bash
# Replays a directory of DICOM files to a Store SCP with DCMTK storescu (usage below).
set -euo pipefail
usage() {
  cat >&2 <<'EOT'
Replays a directory of DICOM files (or a DICOMDIR tree) to a Store SCP with DCMTK storescu,
over N parallel associations, showing progress and ending with a summary.

  scripts/replay.sh [-n ASSOCIATIONS] [-a CALLED_AE] [-c CALLING_AE] HOST PORT DIR...
  scripts/replay.sh -n 4 gateway.example.org 11112 /data/studies/

  -n  parallel associations (default 4)
  -a  called AE title (default $DICOM_GATEWAY_AE_TITLE or DICOM_GATEWAY)
  -c  calling AE title (default REPLAY)

Every file is sent in its own transfer syntax: files are grouped by transfer syntax and each group
is sent with the storescu flag that proposes it, so nothing is transcoded on the way (storescu
3.6.7 otherwise proposes uncompressed syntaxes only). Files that are not DICOM, and the DICOMDIR
index itself, are skipped and counted. TCP_NODELAY=1 is set (DCMTK leaves Nagle's algorithm on
otherwise, ~40 ms per instance). Exit status: 0 if every instance got Success, 1 otherwise.
EOT
  exit 2
}
N=4 CALLED=${DICOM_GATEWAY_AE_TITLE:-DICOM_GATEWAY} CALLING=REPLAY
while getopts "n:a:c:h" opt; do
  case $opt in
    n) N=$OPTARG ;; a) CALLED=$OPTARG ;; c) CALLING=$OPTARG ;; *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 3 ] || usage
HOST=$1 PORT=$2
shift 2
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "replay: -n must be a positive number" >&2; exit 2; }
command -v storescu >/dev/null || { echo "replay: storescu not found: install DCMTK (apt-get install dcmtk)" >&2; exit 2; }
export TCP_NODELAY=1
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# 1. Find files and classify them by transfer syntax (one dcmdump run per 500 files).
find "$@" -type f ! -name DICOMDIR -print0 | sort -z > "$work/files"
total=$(tr -cd '\0' < "$work/files" | wc -c)
xargs -0 -n 500 dcmdump -q +F -Un +P 0002,0010 < "$work/files" 2>/dev/null \
  | awk '/^# dcmdump \([0-9]+\/[0-9]+\): / { sub(/^# dcmdump \([0-9]+\/[0-9]+\): /, ""); file = $0; next }
         /^\(0002,0010\) UI \[/ { ts = $0; sub(/^[^[]*\[/, "", ts); sub(/\].*$/, "", ts); sub(/\0$/, "", ts); print ts "\t" file }' \
  > "$work/classified" || true   # dcmdump exits non-zero when some files are not DICOM: they are counted as skipped
dicom=$(wc -l < "$work/classified")
skipped=$((total - dicom))

flag_for() {
  case $1 in
    1.2.840.10008.1.2) echo -xi ;;           1.2.840.10008.1.2.1) echo -xe ;;
    1.2.840.10008.1.2.2) echo -xb ;;         1.2.840.10008.1.2.1.99) echo -xd ;;
    1.2.840.10008.1.2.4.50) echo -xy ;;      1.2.840.10008.1.2.4.51) echo -xx ;;
    1.2.840.10008.1.2.4.57|1.2.840.10008.1.2.4.70) echo -xs ;;
    1.2.840.10008.1.2.4.80) echo -xt ;;      1.2.840.10008.1.2.4.81) echo -xu ;;
    1.2.840.10008.1.2.4.90) echo -xv ;;      1.2.840.10008.1.2.4.91) echo -xw ;;
    1.2.840.10008.1.2.5) echo -xr ;;         1.2.840.10008.1.2.4.100) echo -xm ;;
    1.2.840.10008.1.2.4.101) echo -xh ;;     1.2.840.10008.1.2.4.102) echo -xn ;;
    1.2.840.10008.1.2.4.103) echo -xl ;;     1.2.840.10008.1.2.4.104) echo -x2 ;;
    1.2.840.10008.1.2.4.105) echo -x3 ;;     1.2.840.10008.1.2.4.106) echo -xo ;;
    1.2.840.10008.1.2.4.107) echo -x4 ;;     1.2.840.10008.1.2.4.108) echo -x5 ;;
    *) echo -x= ;;  # storescu's default: uncompressed (it may transcode or refuse such files)
  esac
}

# 2. Split each transfer-syntax group into N lists of at most 1000 files (one storescu each).
i=0
while IFS= read -r ts; do
  flag=$(flag_for "$ts")
  awk -F'\t' -v ts="$ts" '$1 == ts { print $2 }' "$work/classified" \
    | awk -v n="$N" -v dir="$work" -v flag="$flag" -v base="$i" '
        { k = (NR - 1) % n; c = int((NR - 1) / (n * 1000)); f = dir "/list." base "." k "." c; print > f; lists[f] = 1 }
        END { for (f in lists) print f "\t" flag }' >> "$work/lists"
  i=$((i + 1))
done < <(cut -f1 "$work/classified" | sort -u)
[ -s "$work/lists" ] || { echo "replay: no DICOM files found in $* ($skipped other files)"; exit 1; }

echo "replay: $dicom DICOM file(s) in $(cut -f1 "$work/classified" | sort -u | wc -l) transfer syntax(es), $skipped skipped; sending to $CALLED@$HOST:$PORT over $N association(s)"

# 3. Send, N storescu at a time, with a progress line.
progress() {
  while sleep 2; do
    done_n=$(cat "$work"/log.* 2>/dev/null | grep -c "Received Store Response" || true)
    printf '\rreplay: %d/%d answered' "$done_n" "$dicom" >&2
  done
}
progress & progress_pid=$!
j=0
while IFS=$'\t' read -r list flag; do
  j=$((j + 1))
  printf '%s\t%s\t%s\n' "$list" "$flag" "$work/log.$j"
done < "$work/lists" > "$work/runs"
export CALLED CALLING HOST PORT
xargs -P "$N" -L 1 sh -c 'list=$1 flag=$2 log=$3; xargs -a "$list" -d "\n" storescu -v -nh "$flag" -aet "$CALLING" -aec "$CALLED" "$HOST" "$PORT" > "$log" 2>&1 || true' _ < <(tr '\t' ' ' < "$work/runs")
kill "$progress_pid" 2>/dev/null || true
printf '\r' >&2

# 4. Summary.
cat "$work"/log.* > "$work/all.log"
succeeded=$(grep -c "Received Store Response (Success)" "$work/all.log" || true)
answered=$(grep -c "Received Store Response" "$work/all.log" || true)
failed=$((answered - succeeded))
not_sent=$((dicom - answered))
echo "replay summary:"
echo "  files found:          $total"
echo "  skipped (not DICOM):  $skipped"
echo "  sent:                 $dicom"
echo "  succeeded:            $succeeded"
echo "  failed:               $failed"
echo "  not answered:         $not_sent"
if [ "$failed" -gt 0 ]; then
  echo "  failure statuses:"
  grep -o "Received Store Response ([^)]*)" "$work/all.log" | grep -v "(Success)" | sed 's/Received Store Response //' | sort | uniq -c | sed 's/^/    /'
fi
if [ "$not_sent" -gt 0 ]; then
  echo "  association errors:"
  grep -hE "^[EF]: " "$work"/log.* | sort | uniq -c | head -10 | sed 's/^/    /'
fi
[ "$succeeded" -eq "$dicom" ]
