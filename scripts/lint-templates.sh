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

# Fargate accepts only these task CPU / memory pairs ("Troubleshoot Amazon ECS task definition invalid CPU or
# memory errors", https://docs.aws.amazon.com/AmazonECS/latest/developerguide/task-cpu-memory-error.html).
# cfn-lint does not check pairs that come from Mappings, so check Mappings.TaskSizes here.
"$TOOLS_HOME/venv/bin/python" - infra/gateway.yaml <<'EOF'
import sys
from cfnlint.decode import decode

VALID = {  # CPU units: the memory sizes (MiB) allowed with them
    256: [512, 1024, 2048],
    512: list(range(1024, 4096 + 1, 1024)),
    1024: list(range(2048, 8192 + 1, 1024)),
    2048: list(range(4096, 16384 + 1, 1024)),
    4096: list(range(8192, 30720 + 1, 1024)),
    8192: list(range(16384, 61440 + 1, 4096)),
    16384: list(range(32768, 122880 + 1, 8192)),
}
template, matches = decode(sys.argv[1])
if matches:
    sys.exit(f"[fargate] cannot parse {sys.argv[1]}: {matches}")
sizes = template.get("Mappings", {}).get("TaskSizes", {})
offered = template["Parameters"]["TaskSize"]["AllowedValues"]
bad = [f"{name}: cpu {v['Cpu']} memory {v['Memory']}" for name, v in sizes.items()
       if int(v["Memory"]) not in VALID.get(int(v["Cpu"]), [])]
bad += [f"TaskSize {name} has no Mappings.TaskSizes entry" for name in offered if name not in sizes]
for b in bad:
    print(f"[fargate] {b}: not a Fargate CPU/memory pair", file=sys.stderr)
print(f"[fargate] {len(sizes)} task sizes checked, {len(bad)} problem(s)")
sys.exit(1 if bad else 0)
EOF
