"""The shape of the code base: the fastppo import graph has no cycle (module-level and function-local
imports alike), and no Python file of the library is over 500 lines."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 500


def _modules():
    """{dotted name: path} of every module of the package, kernels/ included as fastppo.kernels."""
    out = {}
    for base, prefix in ((ROOT / "fastppo", "fastppo"), (ROOT / "kernels", "fastppo.kernels")):
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            if base.name == "fastppo" and rel.parts[0] == "kernels":
                continue   # the symlink to ../kernels, walked as its own base
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


def _package(name, path):
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def _imports(name, path, modules):
    """The fastppo modules `name` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _package(name, path).split(".")
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            # `from pkg import name`: the submodule pkg.name if there is one, else pkg (name is its attribute)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:      # `import fastppo.kernels.gae` -> that module; attributes -> owner
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def test_import_graph_is_acyclic():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert "fastppo.logprobs" in graph and "fastppo.kernels.loss_agg" in graph   # the walk saw the package


def test_no_file_over_500_lines():
    modules = _modules()
    long = {str(p.relative_to(ROOT)): n for p in modules.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
