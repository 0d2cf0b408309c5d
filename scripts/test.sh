#!/usr/bin/env bash
# Installs what the tests need, starts LocalStack (offline, no Docker), runs every test, stops LocalStack.
#   - DCMTK (storescu, echoscu, dcmdump...) from Debian's dcmtk package, when missing;
#   - Orthanc from Debian's orthanc package and pynetdicom (pinned, from PyPI) in a venv under
#     $DICOM_GATEWAY_TEST_VENV (default ~/.cache/dicom-gateway-test/venv), when missing: the
#     modalities of the Storage Commitment tests (tests/commitment.rs runs Orthanc itself, on free
#     ports with its own configuration, not the system service);
#   - cfn-lint from PyPI (scripts/lint-templates.sh), which lints every template in infra/;
#   - Java 17 for DynamoDB Local, when missing (installed by the LocalStack script);
#   - LocalStack 4.8.1 in a venv under $LS_HOME (default ~/.cache/localstack-offline), see scripts/localstack/.
# Then it deploys infra/gateway.yaml to LocalStack with scripts/deploy.sh (the production template,
# not a test copy) and hands its outputs to the tests in DICOM_GATEWAY_TEST_STACK_<OutputKey>.
# A second deployment of the same template checks that KmsKeyArn, TLS pass-through and the
# HealthImaging preset deploy.
# Before all that, it fails fast when `cargo fmt --all -- --check` or clippy (warnings denied) fails.
# Tests that need LocalStack are #[ignore]d in a plain `cargo test`; this script runs them too
# (--include-ignored). Extra arguments go to `cargo test`, those after a `--` to the test binaries
# (e.g. scripts/test.sh --test local_store, or scripts/test.sh --test s3_store -- --nocapture).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo_args=() test_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do cargo_args+=("$1"); shift; done
[ $# -gt 0 ] && shift   # the `--` itself
test_args=("$@")
# --ignored (only the ignored ones) and --include-ignored cannot be given together.
case " ${test_args[*]-} " in
  *" --ignored "* | *" --include-ignored "*) ;;
  *) test_args=(--include-ignored "${test_args[@]}") ;;
esac

echo "[test] checking formatting" >&2
cargo fmt --all -- --check || { echo "[test] formatting differs: run \`cargo fmt --all\`" >&2; exit 1; }
python3 scripts/check-modules.py   # the module graph runs one way (README, Architecture)
echo "[test] running clippy" >&2
cargo clippy --locked --all-targets -- -D warnings || {
  echo "[test] clippy found problems: fix what \`cargo clippy --locked --all-targets -- -D warnings\` reports" >&2
  exit 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v storescu >/dev/null && command -v dcmdump >/dev/null || missing+=(dcmtk)
command -v openssl >/dev/null || missing+=(openssl)   # test certificates for the TLS tests
command -v Orthanc >/dev/null || missing+=(orthanc)   # a modality for the Storage Commitment tests
if [ ${#missing[@]} -gt 0 ]; then
  echo "[test] installing ${missing[*]} from Debian" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# pynetdicom, the other Storage Commitment modality (tests/clients/commitment_scu.py), pinned.
export DICOM_GATEWAY_TEST_VENV="${DICOM_GATEWAY_TEST_VENV:-$HOME/.cache/dicom-gateway-test/venv}"
PYNETDICOM_VERSION=3.0.4 PYDICOM_VERSION=3.0.2
if ! "$DICOM_GATEWAY_TEST_VENV/bin/python" -c "import sys, pydicom, pynetdicom; sys.exit(pynetdicom.__version__ != '$PYNETDICOM_VERSION' or pydicom.__version__ != '$PYDICOM_VERSION')" 2>/dev/null; then
  echo "[test] installing pynetdicom $PYNETDICOM_VERSION from PyPI into $DICOM_GATEWAY_TEST_VENV" >&2
  python3 -m venv "$DICOM_GATEWAY_TEST_VENV"
  "$DICOM_GATEWAY_TEST_VENV/bin/pip" install -q --disable-pip-version-check \
    "pynetdicom==$PYNETDICOM_VERSION" "pydicom==$PYDICOM_VERSION"
fi

scripts/lint-templates.sh

export LS_HOME="${LS_HOME:-$HOME/.cache/localstack-offline}"
# HealthImaging is not emulated: its Step Functions tasks are mocked (read by LocalStack per execution).
mkdir -p "$LS_HOME"
cp tests/sfn-mock-config.json "$LS_HOME/sfn-mock-config.json"
# A clean emulator for every run (LocalStack keeps its state in memory only).
scripts/localstack/stop-localstack.sh >/dev/null 2>&1 || true
# LocalStack 4.8.1's default (v2) CloudFormation engine resolves Fn::Sub and Fn::GetAtt inside
# resources whose Condition is false, so the full template with DeployService=false fails there
# ("No deployed instances of resource ..."); its legacy engine evaluates conditions correctly.
LS_EXTRA_ENV="${LS_EXTRA_ENV:-} PROVIDER_OVERRIDE_CLOUDFORMATION=engine-legacy" scripts/localstack/start-localstack.sh >/dev/null
trap 'scripts/localstack/stop-localstack.sh >/dev/null 2>&1 || true' EXIT

export AWS_ENDPOINT_URL=http://127.0.0.1:4566 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export DICOM_GATEWAY_TEST_LOCALSTACK=1 TCP_NODELAY=1

echo "[test] deploying infra/gateway.yaml to LocalStack" >&2
AWS_CLI="$LS_HOME/venv/bin/aws"
"$AWS_CLI" s3 mb s3://dicom-gateway-test-artifacts >/dev/null 2>&1 || true
deploy_log=$(mktemp)
outputs=$(AWS_CLI="$AWS_CLI" scripts/deploy.sh dicom-gateway-test dicom-gateway-test-artifacts \
  DeployService=false DatastoreId=0123456789abcdef0123456789abcdef StateMachineName=dicom-gateway-import-test \
  JobTableName=dicom-gateway-jobs-test InstanceTableName=dicom-gateway-instances-test BucketName=dicom-gateway-test 2>"$deploy_log") || { cat "$deploy_log" >&2; exit 1; }
while IFS='=' read -r key value; do
  [ -n "$key" ] && export "DICOM_GATEWAY_TEST_STACK_$key=$value"
done <<<"$outputs"
[ -n "${DICOM_GATEWAY_TEST_STACK_StateMachineArn:-}" ] || { echo "[test] stack deployment gave no outputs" >&2; exit 1; }

# The same template with the options a hardened deployment uses: a customer managed KMS key (its key
# policy statements and the roles' kms:* grants must be accepted), TLS pass-through and the HealthImaging
# transfer-syntax preset. Deployed only to prove it deploys; the tests use the stack above.
echo "[test] deploying it again with KmsKeyArn, TlsMode=passthrough and the healthimaging preset" >&2
kms_key=$("$AWS_CLI" kms create-key --description "dicom-gateway test key" --query KeyMetadata.Arn --output text)
AWS_CLI="$AWS_CLI" scripts/deploy.sh dicom-gateway-test-kms dicom-gateway-test-artifacts \
  DeployService=false KmsKeyArn="$kms_key" TlsMode=passthrough TransferSyntaxAllow=healthimaging \
  DatastoreId=0123456789abcdef0123456789abcdef StateMachineName=dicom-gateway-import-test-kms \
  JobTableName=dicom-gateway-jobs-test-kms InstanceTableName=dicom-gateway-instances-test-kms BucketName=dicom-gateway-test-kms >/dev/null 2>"$deploy_log" \
  || { cat "$deploy_log" >&2; exit 1; }

cargo test --locked "${cargo_args[@]}" -- "${test_args[@]}"

# The fuzz targets must keep building (scripts/fuzz.sh runs them; that needs cargo-fuzz and time).
echo "[test] building the fuzz targets" >&2
cargo build --locked --quiet --manifest-path fuzz/Cargo.toml --target-dir target
