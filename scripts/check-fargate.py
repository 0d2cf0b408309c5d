"""Checks that every Fargate task size a template offers is a CPU/memory pair Fargate accepts.

Fargate accepts only these task CPU / memory pairs ("Troubleshoot Amazon ECS task definition invalid
CPU or memory errors", https://docs.aws.amazon.com/AmazonECS/latest/developerguide/task-cpu-memory-error.html).
cfn-lint does not check pairs that come from Mappings, so Mappings.TaskSizes is checked here, and every
value of the TaskSize parameter must have an entry. Usage: check-fargate.py TEMPLATE (exit 1 on a problem).
"""
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


def main(path):
    template, matches = decode(path)
    if matches:
        sys.exit(f"[fargate] cannot parse {path}: {matches}")
    sizes = template.get("Mappings", {}).get("TaskSizes", {})
    offered = template["Parameters"]["TaskSize"]["AllowedValues"]
    bad = [f"{name}: cpu {v['Cpu']} memory {v['Memory']}" for name, v in sizes.items()
           if int(v["Memory"]) not in VALID.get(int(v["Cpu"]), [])]
    bad += [f"TaskSize {name} has no Mappings.TaskSizes entry" for name in offered if name not in sizes]
    for b in bad:
        print(f"[fargate] {b}: not a Fargate CPU/memory pair", file=sys.stderr)
    print(f"[fargate] {path}: {len(sizes)} task sizes checked, {len(bad)} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
