#!/usr/bin/env bash
# Lints every CloudFormation template in infra/ with cfn-lint (installed from PyPI into its own venv
# under $TOOLS_HOME, default ~/.cache/dicom-gateway-tools), and checks that the state machine
# definition is valid JSON, and that every IAM policy names specific resources (scripts/check-iam.py).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS_HOME="${TOOLS_HOME:-$HOME/.cache/dicom-gateway-tools}"
CFN_LINT_VERSION=1.38.0
if ! "$TOOLS_HOME/venv/bin/cfn-lint" --version 2>/dev/null | grep -q "$CFN_LINT_VERSION"; then
  echo "[lint] installing cfn-lint $CFN_LINT_VERSION from PyPI into $TOOLS_HOME/venv" >&2
  python3 -m venv "$TOOLS_HOME/venv"
  "$TOOLS_HOME/venv/bin/pip" install -q --disable-pip-version-check "cfn-lint==$CFN_LINT_VERSION"
fi
python3 -m json.tool infra/import-state-machine.asl.json >/dev/null
"$TOOLS_HOME/venv/bin/cfn-lint" --regions us-east-1 eu-west-1 -- infra/*.yaml
echo "[lint] cfn-lint: $(ls infra/*.yaml | tr '\n' ' ')clean"
"$TOOLS_HOME/venv/bin/python" scripts/check-iam.py infra/*.yaml
# The check itself must catch an unexplained wildcard.
if "$TOOLS_HOME/venv/bin/python" scripts/check-iam.py tests/fixtures/iam-wildcard.yaml >/dev/null; then
  echo "[iam] check-iam.py did not flag tests/fixtures/iam-wildcard.yaml" >&2; exit 1
fi
