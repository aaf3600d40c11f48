"""The layout's rules (docs/architecture.md), read from the source: who may import whom, and no import-time cycles."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lida_cli", "lida_core", "pipelines", "flows", "schemas")
# `python -m lida_core` (CONTRACT.md) must run the command, which lives on the top floor: a three-line shim.
SHIM = {"lida_core.__main__"}
# What each floor must never import, at module level or inside a function (lida_cli, the top floor, may import all).
FORBIDDEN = {
    "lida_core": ("lida_cli", "pipelines", "flows", "apache_beam", "prefect"),
    "schemas": ("lida_cli", "lida_core", "pipelines", "flows", "apache_beam", "prefect"),
    "pipelines": ("lida_cli", "flows", "prefect"),
    "flows": ("lida_cli",),
}


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def test_each_floor_imports_only_the_floors_below_it():
    broken = []
    for name, path in modules().items():
        floor = name.split(".")[0]
        if name in SHIM or floor not in FORBIDDEN:
            continue
        for target, line in imports(path):
            if target.split(".")[0] in FORBIDDEN[floor]:
                broken.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not broken, "\n".join(broken)


def test_no_import_time_cycles():
    """Module-level imports between the project's modules form no cycle (lazy imports inside functions may)."""
    names = modules()
    graph = {name: sorted({t for t, _ in imports(path, top_level_only=True) if t in names and t != name})
             for name, path in names.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]) if nxt in trail else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)
