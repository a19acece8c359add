"""kompakt.serve imports run one way: no module reaches back up to one that imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import kompakt.serve

PACKAGE = Path(kompakt.serve.__file__).parent


def _serve_imports(path: Path) -> set[str]:
    """Modules of kompakt.serve that `path` imports anywhere (top level, functions, TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "kompakt.serve":  # `from kompakt.serve import x`: x is a submodule
                found.update(f"kompakt.serve.{alias.name}" for alias in node.names)
            elif node.module.startswith("kompakt.serve."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("kompakt.serve."))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {f"kompakt.serve.{path.stem}": path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    return {name: _serve_imports(path) & modules.keys() for name, path in modules.items()}


def test_no_import_cycles_in_serve():
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            cycle = trail[trail.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*trail, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_backend_interface_is_at_the_bottom():
    graph = _graph()
    assert graph["kompakt.serve.backend"] == set()
    assert "kompakt.serve.backend_transformers" not in graph["kompakt.serve.backend_llamacpp"]
    assert graph["kompakt.serve.chat_session"] == {"kompakt.serve.backend"}
