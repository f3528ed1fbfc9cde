"""The package's import graph: no circles, and the layers import downward only (core <- serve, core <- cli).

Imports inside functions and under ``TYPE_CHECKING`` count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of lntune it imports}`` for every module under ``src/lntune``."""
    modules = {_module_name(p): p for p in (SRC / "lntune").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            # A module's own packages are initialised before it runs: importing from them is no circle.
            imported |= {c for c in candidates if c in modules and c != name and not name.startswith(c + ".")}
        # Importing a.b.c runs the packages a and a.b too (except the importer's own packages).
        for target in list(imported):
            parts = target.split(".")
            for i in range(1, len(parts)):
                package = ".".join(parts[:i])
                if package in modules and not name.startswith(package + "."):
                    imported.add(package)
        graph[name] = imported
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_circles():
    assert cycles(import_graph()) == []


def test_cycles_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_import_downward_only():
    graph = import_graph()
    layer = {"lntune.cli": "cli", "lntune.__main__": "cli", "lntune.serve": "serve"}

    def of(module: str) -> str:
        return next((v for k, v in layer.items() if module == k or module.startswith(k + ".")), "core")

    allowed = {"core": {"core"}, "serve": {"core", "serve"}, "cli": {"core", "serve", "cli"}}
    wrong = [
        f"{source} -> {target}"
        for source, targets in graph.items()
        for target in targets
        if of(target) not in allowed[of(source)]
    ]
    assert wrong == []
