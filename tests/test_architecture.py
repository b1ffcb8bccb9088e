"""Structure rules of the ``grads`` package: short functions and no import cycles.

* Every function or method is at most :data:`MAX_LINES` lines, counted from its ``def`` line
  (decorators excluded) to its last line, docstring included: a function a reader can hold in
  their head, and a recipe that reads top to bottom in named steps.
* Module-level imports between ``grads`` modules form no cycle. Imports inside functions are
  allowed (they keep ``grads --cfg job`` free of torch), and ``if TYPE_CHECKING:`` blocks are
  skipped; both are how a cycle is legitimately broken.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

MAX_LINES = 80
PACKAGE = REPO / "grads"


def _modules() -> dict[str, Path]:
    """``dotted name -> file`` of every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def long_functions(max_lines: int = MAX_LINES) -> list[str]:
    """``file:line name (n lines)`` of every function longer than ``max_lines``."""
    out = []
    for path in _modules().values():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > max_lines:
                    rel = path.relative_to(REPO)
                    out.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports executed when the module is imported: module body, ``try``/``if`` blocks at the top
    level (not ``if TYPE_CHECKING:``), never function or class bodies."""
    out: list = []
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            todo.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            todo.extend(node.body + node.orelse + node.finalbody)
            for h in node.handlers:
                todo.extend(h.body)
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a ``grads`` module."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph() -> dict[str, set[str]]:
    """``module -> grads modules it imports at module level``.

    Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``; that implicit edge is
    left out for the importing module's own parent packages (``a.b.d`` importing its sibling
    ``a.b.c``), which Python has already started. ``from a.b import name`` names the package
    itself, so that edge always counts (a submodule must import its siblings directly).
    """
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in _top_level_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join([*pkg, base] if base else pkg)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                hit = _resolve(t, modules)
                if hit and hit != mod:
                    graph[mod].add(hit)
                parts = t.split(".")
                for i in range(1, len(parts)):  # parent packages' __init__ run first ...
                    parent = ".".join(parts[:i])
                    # ... except those of the importing module itself, which already ran
                    if parent in modules and not mod.startswith(parent + ".") and parent != mod:
                        graph[mod].add(parent)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_function_exceeds_80_lines():
    assert long_functions() == [], "split these into named helpers"


def test_no_module_level_import_cycles():
    assert find_cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_length_rule_counts_from_def_to_the_last_line(tmp_path, monkeypatch):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))  # def + 80 lines = 81
    pkg = tmp_path / "grads"
    pkg.mkdir()
    (pkg / "m.py").write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", pkg)
    monkeypatch.setattr(__import__(__name__, fromlist=["REPO"]), "REPO", tmp_path)
    assert long_functions() == [f"grads/m.py:1 long ({MAX_LINES + 1} lines)"]
