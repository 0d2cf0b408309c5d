#!/usr/bin/env bash
# Deploys (or updates) the dicom-gateway stack from infra/gateway.yaml (usage below).
set -euo pipefail
cd "$(dirname "$0")/.."
usage() {
  cat >&2 <<'EOT'
Deploys (or updates) the dicom-gateway stack from infra/gateway.yaml.

  scripts/deploy.sh STACK_NAME ARTIFACT_BUCKET [ParameterKey=Value ...]
  scripts/deploy.sh dicom-gateway my-artifacts-bucket DatastoreId=0123456789abcdef0123456789abcdef

ARTIFACT_BUCKET is an existing bucket for the packaged state machine definition (the template
loads infra/import-state-machine.asl.json through `aws cloudformation package`).
Prints the stack outputs as OutputKey=Value lines on stdout, and on stderr the matching gateway
settings. AWS_CLI overrides the CLI command (e.g. "aws --endpoint-url http://127.0.0.1:4566").
EOT
  exit 2
}
if [ $# -lt 2 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  usage
fi
read -r -a AWS <<<"${AWS_CLI:-aws}"
stack=$1 artifacts=$2
shift 2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "[deploy] packaging infra/gateway.yaml into s3://$artifacts/$stack/" >&2
"${AWS[@]}" cloudformation package --template-file infra/gateway.yaml --s3-bucket "$artifacts" --s3-prefix "$stack" \
  --output-template-file "$tmp/packaged.yaml" >/dev/null
echo "[deploy] deploying stack $stack" >&2
deploy_args=(cloudformation deploy --stack-name "$stack" --template-file "$tmp/packaged.yaml" --capabilities CAPABILITY_IAM --no-fail-on-empty-changeset
  --s3-bucket "$artifacts" --s3-prefix "$stack")
if [ $# -gt 0 ]; then deploy_args+=(--parameter-overrides "$@"); fi
"${AWS[@]}" "${deploy_args[@]}" >&2
"${AWS[@]}" cloudformation describe-stacks --stack-name "$stack" --query 'Stacks[0].Outputs[].[OutputKey,OutputValue]' --output text \
  | awk -F'\t' '{print $1 "=" $2}' > "$tmp/outputs"
cat "$tmp/outputs"

declare -A opt=([BucketName]=S3_BUCKET [ImportPrefix]=S3_PREFIX [ResultsPrefix]=RESULTS_PREFIX [JobTableName]=JOB_TABLE
                [InstanceTableName]=INSTANCE_TABLE
                [StateMachineArn]=STATE_MACHINE_ARN [DataAccessRoleArn]=DATA_ACCESS_ROLE_ARN [DatastoreId]=DATASTORE_ID)
{
  echo
  echo "Gateway settings for this stack:"
  while IFS='=' read -r key value; do
    if [ -n "${opt[$key]:-}" ]; then echo "  DICOM_GATEWAY_${opt[$key]}=$value"; fi
  done < "$tmp/outputs"
  host=$(sed -n 's/^LoadBalancerDnsName=//p' "$tmp/outputs")
  port=$(sed -n 's/^DicomPort=//p' "$tmp/outputs")
  ae=$(sed -n 's/^AeTitle=//p' "$tmp/outputs")
  if [ -n "$host" ]; then
    echo
    echo "Test the deployment (from an allowed network; DCMTK installed):"
    echo "  export TCP_NODELAY=1"
    echo "  echoscu -aec $ae $host $port"
    echo "  storescu -aec $ae -nh +sd +r $host $port path/to/study/"
    echo "  scripts/replay.sh -n 4 -a $ae $host $port path/to/studies/"
    echo "Then follow the batch: dicom-gateway jobs list --job-table $(sed -n 's/^JobTableName=//p' "$tmp/outputs")"
  fi
} >&2
