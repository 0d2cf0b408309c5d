"""Checks that every IAM policy in the CloudFormation templates names specific resources.

A statement that allows actions on Resource "*" (or NotResource) is refused unless the template
carries a comment on the lines of that statement saying why AWS requires it. Run by
scripts/lint-templates.sh with the cfn-lint venv's Python (cfn-lint's decoder keeps line numbers).

    python scripts/check-iam.py infra/*.yaml
"""
import sys

from cfnlint.decode import decode

def branches(value):
    """The possible values of a property that may be wrapped in Fn::If (both branches, minus AWS::NoValue)."""
    if isinstance(value, dict) and "Fn::If" in value:
        for branch in value["Fn::If"][1:]:
            yield from branches(branch)
    elif isinstance(value, dict) and value.get("Ref") == "AWS::NoValue":
        return
    elif value is not None:
        yield value


def role_policies(props):
    for policies in branches(props.get("Policies", [])):
        for pol in policies:
            for p in branches(pol):
                yield p.get("PolicyDocument", {})


POLICY_HOLDERS = {
    "AWS::IAM::Role": lambda p: list(role_policies(p)),
    "AWS::IAM::Policy": lambda p: [p.get("PolicyDocument", {})],
    "AWS::IAM::ManagedPolicy": lambda p: [p.get("PolicyDocument", {})],
}


def statements(doc):
    stmts = doc.get("Statement", [])
    if isinstance(stmts, dict):
        stmts = [stmts]
    for st in stmts:
        # Fn::If wraps optional statements: check both branches.
        if isinstance(st, dict) and "Fn::If" in st:
            for branch in st["Fn::If"][1:]:
                if isinstance(branch, dict) and "Ref" not in branch:
                    yield branch
        elif isinstance(st, dict):
            yield st


def wildcard(resource):
    if resource == "*":
        return True
    if isinstance(resource, list):
        return any(r == "*" for r in resource)
    return False


def main(paths):
    problems, checked = [], 0
    for path in paths:
        template, matches = decode(path)
        if matches:
            problems.extend(f"{path}: cannot parse: {m}" for m in matches)
            continue
        lines = open(path).read().splitlines()
        for name, res in template.get("Resources", {}).items():
            holder = POLICY_HOLDERS.get(res.get("Type"))
            if not holder:
                continue
            for doc in holder(res.get("Properties", {})):
                for st in statements(doc):
                    checked += 1
                    if st.get("Effect") != "Allow":
                        continue
                    if "NotResource" in st:
                        problems.append(f"{path}:{st.start_mark.line + 1}: {name}: Allow with NotResource")
                        continue
                    if "Resource" not in st:
                        problems.append(f"{path}:{st.start_mark.line + 1}: {name}: Allow without Resource")
                        continue
                    if wildcard(st["Resource"]):
                        first, last = st.start_mark.line, st.end_mark.line
                        if not any("#" in line for line in lines[first:last + 1]):
                            sid = st.get("Sid", "?")
                            problems.append(f"{path}:{first + 1}: {name}/{sid}: Resource \"*\" without a comment saying why AWS requires it")
    for p in problems:
        print(p)
    print(f"[iam] {checked} policy statements checked, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
