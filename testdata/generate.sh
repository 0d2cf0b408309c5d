#!/usr/bin/env bash
# Regenerates the small synthetic test instances in testdata/ with DCMTK (Debian package dcmtk).
# All data is synthetic: fixed UIDs under a 2.25 root, a made-up patient, generated pixels.
#   ct-implicit-le.dcm     CT Image Storage, Implicit VR Little Endian
#   ct-explicit-le.dcm     CT Image Storage, Explicit VR Little Endian (with a sequence; explicit lengths, as storescu re-encodes sequences when it sends)
#   mr-explicit-be.dcm     MR Image Storage, Explicit VR Big Endian
#   mr-deflated.dcm        MR Image Storage, Deflated Explicit VR Little Endian
#   sc-jpeg-baseline.dcm   Secondary Capture, JPEG Baseline (encapsulated pixel data)
set -euo pipefail
cd "$(dirname "$0")"
command -v dump2dcm >/dev/null || { echo "dump2dcm not found: apt-get install dcmtk" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
ROOT=2.25.311420171180473612498023164377015521
STUDY=$ROOT.1

pixels16() { python3 -c "print('\\\\'.join('%04x' % ((x*7+y*13) % 4096) for y in range(32) for x in range(32)))"; }
pixels8() { python3 -c "print('\\\\'.join('%02x' % ((x*8+y*4) % 256) for y in range(32) for x in range(32)))"; }

# $1 name, $2 SOP class, $3 series number, $4 modality, $5 bits (8|16), $6 extra dump lines
dump() {
  local name=$1 cls=$2 series=$3 modality=$4 bits=$5 extra=${6:-}
  {
    echo "(0008,0005) CS [ISO_IR 100]"
    echo "(0008,0008) CS [ORIGINAL\\PRIMARY\\AXIAL]"
    echo "(0008,0016) UI [$cls]"
    echo "(0008,0018) UI [$ROOT.2.$series.1]"
    echo "(0008,0020) DA [20260101]"
    echo "(0008,0060) CS [$modality]"
    echo "(0008,0070) LO [dicom-gateway test data]"
    printf '%b' "$extra"
    echo "(0010,0010) PN [SYNTHETIC^PATIENT]"
    echo "(0010,0020) LO [SYNTH-0001]"
    echo "(0010,0030) DA [19700101]"
    echo "(0020,000d) UI [$STUDY]"
    echo "(0020,000e) UI [$ROOT.3.$series]"
    echo "(0020,0011) IS [$series]"
    echo "(0020,0013) IS [1]"
    echo "(0028,0002) US 1"
    echo "(0028,0004) CS [MONOCHROME2]"
    echo "(0028,0010) US 32"
    echo "(0028,0011) US 32"
    if [ "$bits" = 8 ]; then
      echo "(0028,0100) US 8"; echo "(0028,0101) US 8"; echo "(0028,0102) US 7"; echo "(0028,0103) US 0"
      echo "(7fe0,0010) OB $(pixels8)"
    else
      echo "(0028,0100) US 16"; echo "(0028,0101) US 12"; echo "(0028,0102) US 11"; echo "(0028,0103) US 0"
      echo "(7fe0,0010) OW $(pixels16)"
    fi
  } > "$tmp/$name.dump"
  dump2dcm -q +l 100000 +te "$tmp/$name.dump" "$tmp/$name.dcm"
}

CT=1.2.840.10008.5.1.4.1.1.2
MR=1.2.840.10008.5.1.4.1.1.4
SC=1.2.840.10008.5.1.4.1.1.7
SEQ='(0008,1032) SQ (Sequence with undefined length #=1)\n(fffe,e000) na (Item with undefined length #=1)\n(0008,0100) SH [T-0001]\n(fffe,e00d) na (ItemDelimitationItem)\n(fffe,e0dd) na (SequenceDelimitationItem)\n'

dump ct1 $CT 1 CT 16
dump ct2 $CT 2 CT 16 "$SEQ"
dump mr1 $MR 3 MR 16
dump mr2 $MR 4 MR 16
dump sc1 $SC 5 OT 8 '(0008,0064) CS [WSD]\n'

dcmconv -q +ti "$tmp/ct1.dcm" ct-implicit-le.dcm
dcmconv -q +te "$tmp/ct2.dcm" ct-explicit-le.dcm
dcmconv -q +tb "$tmp/mr1.dcm" mr-explicit-be.dcm
dcmconv -q +td "$tmp/mr2.dcm" mr-deflated.dcm
dcmcjpeg -q +un +eb "$tmp/sc1.dcm" sc-jpeg-baseline.dcm
ls -l ./*.dcm
