"""Fails when the module graph of src/ has a cycle (a module that imports one that imports it back).

Each top-level module's dependencies are the `crate::<module>` paths in its files, outside comments and
outside `#[cfg(test)]` code. Usage: check-modules.py [SRC_DIR] (default src). Prints the graph with -v.
"""
import os
import re
import sys


def graph(root):
    deps = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".rs") or name in ("main.rs", "lib.rs"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, root).split(os.sep)[0].removesuffix(".rs")
            text = open(path, encoding="utf-8").read()
            text = text.split("#[cfg(test)]")[0]
            code = "\n".join(l for l in text.splitlines() if not l.strip().startswith("//"))
            used = set(re.findall(r"crate::(\w+)", code)) - {module}
            deps.setdefault(module, set()).update(used)
    return deps


def cycle(deps):
    """One cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(deps.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(deps):
        if m not in state and (found := visit(m)):
            return found
    return None


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "-v"]
    deps = graph(args[0] if args else "src")
    if "-v" in sys.argv:
        for m in sorted(deps):
            print(f"{m} -> {' '.join(sorted(deps[m]))}")
    found = cycle(deps)
    if found:
        sys.exit(f"[modules] cycle: {' -> '.join(found)} (a module must not import one that imports it back)")
    print(f"[modules] {len(deps)} modules, no cycle")
