#!/usr/bin/env bash
# Lints every CloudFormation template in infra/ with cfn-lint and checks it against security policy with
# checkov (both installed from PyPI, pinned, into one venv under $TOOLS_HOME, default
# ~/.cache/dicom-gateway-tools). Also checks that the state machine definition is valid JSON, that every
# IAM policy names specific resources (scripts/check-iam.py), and that every Fargate task size the
# template offers is a CPU/memory pair Fargate accepts.
#
# checkov findings fail the run. A finding that does not apply is suppressed in the template, on the
# resource, with the reason: Metadata.checkov.skip[].{id, comment}.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS_HOME="${TOOLS_HOME:-$HOME/.cache/dicom-gateway-tools}"
CFN_LINT_VERSION=1.38.0
CHECKOV_VERSION=3.3.30
if ! "$TOOLS_HOME/venv/bin/cfn-lint" --version 2>/dev/null | grep -q "$CFN_LINT_VERSION" \
  || ! "$TOOLS_HOME/venv/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
  echo "[lint] installing cfn-lint $CFN_LINT_VERSION and checkov $CHECKOV_VERSION from PyPI into $TOOLS_HOME/venv" >&2
  python3 -m venv "$TOOLS_HOME/venv"
  "$TOOLS_HOME/venv/bin/pip" install -q --disable-pip-version-check "cfn-lint==$CFN_LINT_VERSION" "checkov==$CHECKOV_VERSION"
fi
python3 -m json.tool infra/import-state-machine.asl.json >/dev/null
"$TOOLS_HOME/venv/bin/cfn-lint" --regions us-east-1 eu-west-1 -- infra/*.yaml
echo "[lint] cfn-lint: $(ls infra/*.yaml | tr '\n' ' ')clean"

# Policy as code. --skip-download: no external modules to fetch; nothing is sent anywhere.
for template in infra/*.yaml; do
  "$TOOLS_HOME/venv/bin/checkov" --file "$template" --framework cloudformation --compact --quiet --skip-download
done
echo "[lint] checkov: no unexplained findings"

"$TOOLS_HOME/venv/bin/python" scripts/check-iam.py infra/*.yaml
# The check itself must catch an unexplained wildcard.
if "$TOOLS_HOME/venv/bin/python" scripts/check-iam.py tests/fixtures/iam-wildcard.yaml >/dev/null; then
  echo "[iam] check-iam.py did not flag tests/fixtures/iam-wildcard.yaml" >&2; exit 1
fi

# KmsKeyArn takes a key ARN, never an alias (HealthImaging and the key policy need the key itself);
# LocalStack does not enforce AllowedPattern, so the pattern is checked here.
"$TOOLS_HOME/venv/bin/python" - infra/gateway.yaml <<'EOF'
import re, sys
from cfnlint.decode import decode
template, _ = decode(sys.argv[1])
pattern = re.compile(template["Parameters"]["KmsKeyArn"]["AllowedPattern"])
ok = ["", "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"]
bad = ["arn:aws:kms:eu-west-1:123456789012:alias/gateway", "alias/gateway", "1234abcd-12ab-34cd-56ef-1234567890ab"]
wrong = [v for v in ok if not pattern.fullmatch(v)] + [v for v in bad if pattern.fullmatch(v)]
if wrong:
    sys.exit(f"[kms] KmsKeyArn's AllowedPattern misjudges: {wrong}")
print("[kms] KmsKeyArn accepts key ARNs only")
EOF
# Fargate task sizes: every TaskSize the template offers maps to a pair Fargate accepts.
"$TOOLS_HOME/venv/bin/python" scripts/check-fargate.py infra/gateway.yaml
# The check itself must catch an invalid pair.
if "$TOOLS_HOME/venv/bin/python" scripts/check-fargate.py tests/fixtures/fargate-invalid.yaml >/dev/null 2>&1; then
  echo "[fargate] check-fargate.py did not flag tests/fixtures/fargate-invalid.yaml" >&2; exit 1
fi
