"""The product's import graph (issue 29): packages import only downwards (deploy -> routing, scoring,
settlement -> cluster), and no modules import each other in a circle, not even through imports inside
functions (imports under `if TYPE_CHECKING:` are annotations only and do not count)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGES = ("cluster", "routing", "scoring", "settlement", "deploy")
# Each package may import only the packages listed for it.
ALLOWED = {
    "cluster": set(),
    "routing": {"cluster"},
    "scoring": {"cluster"},
    "settlement": {"cluster"},
    "deploy": {"cluster", "routing", "scoring", "settlement"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}

    class Imports(ast.NodeVisitor):
        def __init__(self, module: str) -> None:
            self.module = module

        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            for alias in node.names if node.module else ():
                target = f"{node.module}.{alias.name}"
                if target in mods or node.module in mods:
                    graph[self.module].add(target if target in mods else node.module)

        def visit_Import(self, node: ast.Import) -> None:
            graph[self.module].update(a.name for a in node.names if a.name in mods)

    for module, path in mods.items():
        Imports(module).visit(ast.parse(path.read_text()))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_another_in_a_circle():
    assert _cycles(_graph()) == []


def test_packages_import_only_downwards():
    wrong = sorted(
        (a, b)
        for a, targets in _graph().items()
        for b in targets
        if (pa := a.split(".")[0]) != (pb := b.split(".")[0]) and pb not in ALLOWED[pa]
    )
    assert wrong == []


def test_the_checker_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
