"""Structure rules of the ``grads`` package: layers that point one way, short functions and modules.

* **Layers.** :data:`LAYERS` lists the package's layers, lowest first, each a set of module
  prefixes; a module belongs to the layer of its longest matching prefix (``grads`` itself only to
  the first). A module imports only from its own layer or lower ones, and the imports between
  ``grads`` modules form no cycle. Both rules count **every** import, inside functions too (they
  keep ``grads --cfg job`` free of torch, not free of structure); only ``if TYPE_CHECKING:`` blocks
  are skipped.
* **Public boundaries.** No module imports a ``_private`` name of another module.
* **Sizes.** Every function or method is at most :data:`MAX_LINES` lines, counted from its ``def``
  line (decorators excluded) to its last line, docstring included; no module of the package is over
  :data:`MAX_MODULE_LINES` lines; no file in ``scripts/`` is over :data:`MAX_SCRIPT_LINES` lines
  except the benchmarks (``bench_*.py``) and ``gpu_check.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

MAX_LINES = 80
MAX_MODULE_LINES = 800
MAX_SCRIPT_LINES = 300
PACKAGE = REPO / "grads"
SCRIPTS = REPO / "scripts"
LONG_SCRIPTS = ("bench_*.py", "gpu_check.py")
# Hashed by content into the evaluate keys: exempt from the public-name rule (see private_imports).
FROZEN = ("grads.evaluation.tasks",)

# Lowest first: a module may import from its own layer and from the layers listed before it.
LAYERS: list[tuple[str, set[str]]] = [
    (
        "foundation",
        {"grads", "grads.constants", "grads.io", "grads.dist", "grads.launch", "grads.locks"}
        | {"grads.config_access", "grads.hashing", "grads.ds_ops", "grads.tracking"}
        | {"grads.errors", "grads.plots"},
    ),
    ("models", {"grads.models"}),
    ("data", {"grads.data"}),
    ("evaluation", {"grads.evaluation"}),
    ("report", {"grads.report"}),
    ("features store", {"grads.features"}),  # the package, its store and gradients modules
    ("selectors", {"grads.selectors"}),
    ("training", {"grads.training"}),
    ("features", {"grads.features.compute", "grads.features.representations"}),
    ("identity", {"grads.identity"}),
    ("stages", {"grads.stages", "grads.export"}),
    ("cache", {"grads.cache"}),  # keeps the work folder of a stage that raised StageInterrupted
    ("config", {"grads.config", "grads.objective"}),
    ("pipeline", {"grads.pipeline", "grads.fanout"}),
    ("paper, verdict", {"grads.paper", "grads.verdict"}),
    ("cli", {"grads.cli"}),
]


def _modules() -> dict[str, Path]:
    """``dotted name -> file`` of every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of the layer holding ``module`` (longest prefix), else ``None``."""
    best, where = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            hit = module == p or (p != "grads" and module.startswith(p + "."))
            if hit and len(p) > best:
                best, where = len(p), i
    return where


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


def _imports(tree: ast.Module, top_level: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """Import statements of a module, skipping ``if TYPE_CHECKING:`` blocks; with ``top_level``
    only those executed when the module is imported (not in function or class bodies)."""
    out: list = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
        elif top_level and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        else:
            todo.extend(ast.iter_child_nodes(node))
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a ``grads`` module."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def _targets(mod: str, is_pkg: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        pkg = pkg[: len(pkg) - node.level + 1]
        base = ".".join([*pkg, base] if base else pkg)
    return [f"{base}.{a.name}" for a in node.names] + [base]


def import_graph(top_level: bool = False) -> dict[str, set[str]]:
    """``module -> grads modules it imports`` (every import; with ``top_level`` only those run at
    import time).

    Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``; that implicit edge is
    left out for the importing module's own parent packages (``a.b.d`` importing its sibling
    ``a.b.c``), which Python has already started. ``from a.b import name`` names the package
    itself, so that edge always counts (a submodule must import its siblings directly).
    """
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _imports(tree, top_level):
            for t in _targets(mod, is_pkg, node):
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


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b (layer of a < layer of b)`` for every import against :data:`LAYERS`."""
    out = []
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            lo, hi = layer_of(mod), layer_of(t)
            if lo is not None and hi is not None and hi > lo:
                out.append(f"{mod} ({LAYERS[lo][0]}) -> {t} ({LAYERS[hi][0]})")
    return out


def private_imports() -> list[str]:
    """``file:line module.name`` of every ``_private`` name imported from another module.

    The evaluation task loaders are exempt: their bytes are hashed into every evaluate stage's cache
    key, so they keep their imports (``grads.data`` re-exports what they use).
    """
    out = []
    for mod, path in _modules().items():
        if mod.startswith(FROZEN):
            continue
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("grads"):
                rel = path.relative_to(REPO)
                out += [
                    f"{rel}:{node.lineno} {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and node.module != mod
                ]
    return out


def long_files() -> list[str]:
    """Package modules over :data:`MAX_MODULE_LINES` and scripts over :data:`MAX_SCRIPT_LINES`."""
    out = []
    for path in _modules().values():
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES:
            out.append(f"{path.relative_to(REPO)} ({n} lines)")
    for path in sorted(SCRIPTS.glob("*.py")):
        n = len(path.read_text().splitlines())
        if n > MAX_SCRIPT_LINES and not any(path.match(p) for p in LONG_SCRIPTS):
            out.append(f"{path.relative_to(REPO)} ({n} lines)")
    return out


def test_every_module_has_a_layer():
    assert [m for m in _modules() if layer_of(m) is None] == [], "add it to LAYERS"


def test_imports_follow_the_layer_order():
    assert upward_imports(import_graph()) == [], "an import points up the layers of LAYERS"


def test_no_import_cycles_not_even_inside_functions():
    assert find_cycles(import_graph()) == []


def test_no_private_name_crosses_a_module_boundary():
    assert private_imports() == [], "give the name a public name where it is defined"


def test_no_function_exceeds_80_lines():
    assert long_functions() == [], "split these into named helpers"


def test_no_module_or_script_is_too_long():
    assert long_files() == [], "split the module (or move the script's logic into grads/)"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_layer_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    pkg = tmp_path / "grads"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli" / "__init__.py").write_text("")
    (pkg / "io.py").write_text("def f():\n    from grads.cli import run\n")
    (pkg / "cli" / "run.py").write_text("import grads.io\n")
    this = __import__(__name__, fromlist=["PACKAGE"])
    monkeypatch.setattr(this, "PACKAGE", pkg)
    monkeypatch.setattr(this, "REPO", tmp_path)
    graph = import_graph()
    assert upward_imports(graph) == [
        "grads.io (foundation) -> grads.cli (cli)",
        "grads.io (foundation) -> grads.cli.run (cli)",
    ]
    assert find_cycles(graph) == [["grads.cli.run", "grads.io"]]
    assert find_cycles(import_graph(top_level=True)) == []  # the cycle is inside a function


def test_the_length_rule_counts_from_def_to_the_last_line(tmp_path, monkeypatch):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))  # def + 80 lines = 81
    pkg = tmp_path / "grads"
    pkg.mkdir()
    (pkg / "m.py").write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", pkg)
    monkeypatch.setattr(__import__(__name__, fromlist=["REPO"]), "REPO", tmp_path)
    assert long_functions() == [f"grads/m.py:1 long ({MAX_LINES + 1} lines)"]
