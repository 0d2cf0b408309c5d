#!/usr/bin/env bash
# Installs what the tests need, starts LocalStack (offline, no Docker), runs every test, stops LocalStack.
#   - DCMTK (storescu, echoscu, dcmdump...) from Debian's dcmtk package, when missing;
#   - Java 17 for DynamoDB Local, when missing (installed by the LocalStack script);
#   - LocalStack 4.8.1 in a venv under $LS_HOME (default ~/.cache/localstack-offline), see scripts/localstack/.
# Extra arguments go to `cargo test` (e.g. scripts/test.sh --test local_store).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v storescu >/dev/null || ! command -v dcmdump >/dev/null; then
  echo "[test] installing DCMTK from Debian" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq dcmtk >/dev/null
fi

export LS_HOME="${LS_HOME:-$HOME/.cache/localstack-offline}"
scripts/localstack/start-localstack.sh >/dev/null
trap 'scripts/localstack/stop-localstack.sh >/dev/null 2>&1 || true' EXIT

export AWS_ENDPOINT_URL=http://127.0.0.1:4566 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
export DICOM_GATEWAY_TEST_LOCALSTACK=1 TCP_NODELAY=1
cargo test --locked "$@"
