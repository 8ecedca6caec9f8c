"""The package's import graph has no cycles.

Every ``import`` and ``from ... import`` of a ``breastcnn`` module is an edge,
at module level and inside functions alike (a function-local import hides a
dependency but is one), except under ``if TYPE_CHECKING:`` (never executed).
Importing ``a.b.c`` from outside package ``a.b`` also runs ``a/b/__init__.py``,
so that is an edge too. Lazy imports of third-party modules (TensorFlow, ONNX)
are not edges of this graph, and neither are the registry's
``"module:function"`` factories (resolved by name when a model is built).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import breastcnn

PACKAGE_DIR = Path(breastcnn.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """``{module: {modules it imports}}`` for every module of the package (see the module docstring)."""
    files = {module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    packages = {name for name, p in files.items() if p.name == "__init__.py"}

    def ancestors(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts))]

    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        own_package = name if name in packages else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative import
                anchor = own_package.split(".")[: len(own_package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in files)
        mine = set(ancestors(name)) | {name}
        for target in targets:
            if target not in files:
                continue  # third-party, or a name imported from a module (already counted as that module)
            for module in [*ancestors(target), target]:
                if module in files and module not in mine:  # a package __init__ runs before its submodule
                    graph[name].add(module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_imports_form_no_cycle():
    assert cycles(import_graph()) == [], "import cycles (break them; see tests/test_imports.py for what counts)"


@pytest.mark.parametrize(
    "code, expected",
    [
        ("import breastcnn.models.io", {"breastcnn.models", "breastcnn.models.io"}),
        ("from breastcnn.models import load_model", {"breastcnn.models"}),
        ("from breastcnn import explain", {"breastcnn.explain"}),
        ("def f():\n    from breastcnn.nn.layers import Dense", {"breastcnn.nn", "breastcnn.nn.layers"}),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from breastcnn.data.split import Split", set()),
        ("import numpy\nimport tensorflow", set()),
    ],
)
def test_the_walker_sees_every_kind_of_import(tmp_path, monkeypatch, code, expected):
    """The graph counts function-local imports and package __init__ files, and skips type-only imports."""
    root = tmp_path / "breastcnn"
    for sub in ("models", "nn", "data"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    for module in ("models/io.py", "nn/layers.py", "data/split.py", "explain.py"):
        (root / module).write_text("")
    (root / "probe.py").write_text(code + "\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIR", root)
    assert import_graph()["breastcnn.probe"] == expected


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
