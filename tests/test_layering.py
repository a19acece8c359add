"""Imports run downward only, and no module imports itself back through others (DESIGN.md, "Layout").

Every module under src/kompakt is parsed (AST: imports at the top, inside functions and under
TYPE_CHECKING all count, since each one is a dependency a reader has to hold in their head), and
the graph is checked against LAYERS below: a package may import its own modules, packages of
its layer and any layer below, never one above; and neither modules nor packages may form a
circle. Nothing is imported, so the test is quick and sees code paths no other test runs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Top to bottom. A package may import the packages of its own layer (one way: the circle check
# forbids both ways) and of every layer below. "kompakt" is the root package: its public API
# is imported lazily (only lazy_api statically), so reading `kompakt.__version__` is a read downward.
LAYERS: list[set[str]] = [
    {"cli", "__main__"},
    {"auto"},
    {"recipe", "report"},
    {"analyze", "passes"},
    {"scoring"},
    {"evaluate", "train"},
    {"serve", "export", "calib", "data"},
    {"rundir"},  # run-directory primitives: lineage, hashing, step save, layout
    {"model"},
    {"ops"},
    {"atomic", "callable_package", "process_memory", "units"},
    {"errors", "kompakt", "lazy_api"},
]
LEVEL = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((SRC / "kompakt").rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The kompakt modules `module` imports: `from pkg import name` counts as pkg.name when that is
    a module, else as pkg itself."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            origin = _resolve(module, is_package, node)
            for alias in node.names:
                found.add(f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin)
    return {name for name in found if name in known and name != module}


def _graph() -> dict[str, set[str]]:
    """Module -> the modules it imports. An import of one's own parent package is left out: Python
    imports a package before any module in it, so that edge cannot close a circle (a registry
    module importing its package to fill itself is the pattern)."""
    modules = _modules()
    known = set(modules)
    graph = {m: _imports(m, path.read_text(), path.name == "__init__.py", known) for m, path in modules.items()}
    return {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def _describe(circles: Iterable[list[str]], graph: dict[str, set[str]]) -> str:
    lines = []
    for members in circles:
        inside = set(members)
        edges = [f"{a} -> {b}" for a in members for b in sorted(graph[a]) if b in inside]
        lines.append(f"circle of {len(members)}: " + "; ".join(edges))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return _graph()


def test_every_package_has_a_layer(graph):
    missing = sorted({_package(m) for m in graph} - set(LEVEL))
    assert not missing, f"add these packages to LAYERS in {Path(__file__).name}: {missing}"


def test_no_package_imports_a_layer_above_it(graph):
    upward = [
        f"{module} ({_package(module)}) imports {target} ({_package(target)})"
        for module, targets in graph.items()
        for target in sorted(targets)
        if LEVEL.get(_package(target), 0) < LEVEL.get(_package(module), 0)
    ]
    assert not upward, "imports must run downward (see LAYERS):\n" + "\n".join(upward)


def test_no_circle_between_packages(graph):
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        mine = _package(module)
        packages.setdefault(mine, set()).update(_package(t) for t in targets if _package(t) != mine)
    circles = _circles(packages)
    assert not circles, "packages import each other:\n" + _describe(circles, packages)


def _module_circles(graph: dict[str, set[str]], serve: bool) -> list[list[str]]:
    return [c for c in _circles(graph) if any(_package(m) == "serve" for m in c) == serve]


def test_no_circle_between_modules(graph):
    circles = _module_circles(graph, serve=False)
    assert not circles, "modules import each other:\n" + _describe(circles, graph)


def test_no_circle_between_serve_modules(graph):
    circles = _module_circles(graph, serve=True)
    assert not circles, "modules import each other:\n" + _describe(circles, graph)


def test_the_checker_sees_circles_and_upward_imports():
    """The checks above can fail: a circle and an upward edge in a made-up graph are found."""
    made_up = {"kompakt.a.x": {"kompakt.a.y"}, "kompakt.a.y": {"kompakt.a.z"}, "kompakt.a.z": {"kompakt.a.x"},
               "kompakt.b": set()}  # fmt: skip
    assert _circles(made_up) == [["kompakt.a.x", "kompakt.a.y", "kompakt.a.z"]]
    assert LEVEL[_package("kompakt.passes.train_common")] > LEVEL[_package("kompakt.recipe.runner")]
    source = "import kompakt.errors\ndef f():\n    from kompakt.recipe import runner\n    from ..model import load\n"
    known = {"kompakt.errors", "kompakt.recipe", "kompakt.recipe.runner", "kompakt.model", "kompakt.model.load"}
    found = _imports("kompakt.passes.x", source, False, known)
    assert found == {"kompakt.errors", "kompakt.recipe.runner", "kompakt.model.load"}
