"""The import graph of the repository: no circle anywhere, and the floors' arrows point down.

Every `import` / `from ... import` statement of twinv2/, pipelines/, dags/ and bench/ counts, at module level or
inside a function (a lazy import is still an arrow; a circle of lazy imports is still a circle), except those
under `if TYPE_CHECKING:` (annotations only: they never run). Read from the
source with `ast`: nothing is imported. `from a.b import c` is an arrow to a.b.c when c is a module of the
repository, else to a.b; importing a package's submodule does not count as an arrow to the package's
__init__ (Python runs it first, but that is nesting, not a dependency of the submodule's code)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("twinv2", "pipelines", "dags", "bench")

# (importer prefix, imported prefix, why it is forbidden): the floors of docs/architecture.md
LAYER_RULES = [
    ("twinv2", "pipelines", "the library never imports the pipelines floor"),
    ("twinv2", "dags", "the library never imports the DAGs"),
    ("twinv2", "bench", "the library never imports the benches"),
    ("pipelines", "dags", "the pipelines floor never imports the DAGs"),
    ("pipelines", "bench", "the pipelines floor never imports the benches"),
    ("twinv2.clustering", "twinv2.training", "clustering sits below training (a trained run is read through "
                                             "twinv2.artifacts)"),
    ("twinv2.data", "twinv2.clustering", "the data floor sits below clustering"),
    ("twinv2.data", "twinv2.training", "the data floor sits below training"),
    ("twinv2.data", "twinv2.models", "the data floor sits below the models"),
    ("twinv2.artifacts", "twinv2.training", "the artifact readers sit below training"),
    ("twinv2.artifacts", "twinv2.clustering", "the artifact readers sit below clustering"),
    ("twinv2.metrics", "twinv2.training", "metrics sit below training"),
    ("twinv2.models", "twinv2.training", "the models sit below training"),
]
THIRD_PARTY_FORBIDDEN = {"twinv2": ("airflow", "dvc", "mlflow")}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def repo_modules(root: Path = REPO, roots=ROOTS) -> dict[str, Path]:
    out = {}
    for r in roots:
        for p in sorted((root / r).rglob("*.py")):
            if "__pycache__" not in p.parts:
                out[module_name(p, root)] = p
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The repository module `name` denotes (itself, or its nearest enclosing module), None if outside."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _typing_only(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or typing.TYPE_CHECKING): imports for annotations only, never run."""
    t = getattr(node, "test", None)
    return isinstance(node, ast.If) and (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING"
                                         or isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node of the tree except the bodies of `if TYPE_CHECKING:` blocks (their `else:` still runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if _typing_only(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(mod: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """{imported repository module: first line} of one source file; plus external top-level names under
    the key 'ext:NAME'."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: dict[str, int] = {}

    def add(target: str | None, line: int) -> None:
        if target and target != mod:
            out.setdefault(target, line)

    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                r = _resolve(a.name, modules)
                add(r if r else "ext:" + a.name.split(".")[0], node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod if is_pkg else mod.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                src = f"{base}.{node.module}" if node.module else base
            else:
                src = node.module or ""
            r = _resolve(src, modules)
            if r is None:
                add("ext:" + src.split(".")[0], node.lineno)
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                add(sub if sub in modules else r, node.lineno)
    return out


def import_graph(root: Path = REPO, roots=ROOTS) -> dict[str, dict[str, int]]:
    modules = repo_modules(root, roots)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, out = set(), [], []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter([t for t in graph[start] if t in graph]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter([t for t in graph[nxt] if t in graph])))
                elif nxt in on:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def _under(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def layer_violations(graph: dict[str, dict[str, int]], modules: dict[str, Path], root: Path = REPO) -> list[str]:
    bad = []
    for src, targets in graph.items():
        for dst, line in targets.items():
            for a, b, why in LAYER_RULES:
                if _under(src, a) and _under(dst, b):
                    bad.append(f"{modules[src].relative_to(root)}:{line}: {src} imports {dst} ({why})")
            for a, names in THIRD_PARTY_FORBIDDEN.items():
                if _under(src, a) and dst.startswith("ext:") and dst[4:] in names:
                    bad.append(f"{modules[src].relative_to(root)}:{line}: {src} imports {dst[4:]} "
                               f"({a}/ never imports {', '.join(names)})")
    return bad


def _describe(cycle: list[str], graph) -> str:
    edges = [f"{a} -> {b} (line {graph[a][b]})" for a in cycle for b in graph[a] if b in cycle]
    return " ; ".join(edges)


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50, "the walk found too few modules: wrong repository root?"
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_describe(c, graph) for c in found)


def test_floors_point_down():
    modules = repo_modules()
    bad = layer_violations(import_graph(), modules)
    assert not bad, "imports against the floors:\n" + "\n".join(bad)


# --------------------------------------------------------------------------- the checker itself
def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_finds_lazy_and_relative_cycles(tmp_path):
    _write(tmp_path, {
        "pipelines/__init__.py": "",
        "pipelines/a.py": "def f():\n    from pipelines import b\n",       # lazy import: still an arrow
        "pipelines/b.py": "from .c import x\n",                           # relative import
        "pipelines/c.py": "import pipelines.a\nx = 1\n",
        "pipelines/d.py": "from pipelines.a import f\n",                  # depends on the cycle, not in it
        "pipelines/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipelines.d import f\n",
        "twinv2/__init__.py": "",
        "twinv2/m.py": "import numpy\n",
    })
    g = import_graph(tmp_path, ("pipelines", "twinv2"))
    assert g["pipelines.a"] == {"pipelines.b": 2}
    assert g["pipelines.b"] == {"pipelines.c": 1}
    assert cycles(g) == [["pipelines.a", "pipelines.b", "pipelines.c"]]
    assert "pipelines.d" not in g["pipelines.e"]                        # annotations only: no arrow
    _write(tmp_path, {"pipelines/c.py": "x = 1\n"})
    assert cycles(import_graph(tmp_path, ("pipelines", "twinv2"))) == []


def test_checker_resolves_submodules_not_parent_packages(tmp_path):
    _write(tmp_path, {
        "twinv2/__init__.py": "",
        "twinv2/models/__init__.py": "from twinv2.models.twin import T\n",
        "twinv2/models/base.py": "",
        "twinv2/models/twin.py": "from twinv2.models import base\nT = 1\n",   # -> models.base, not models
    })
    g = import_graph(tmp_path, ("twinv2",))
    assert g["twinv2.models.twin"] == {"twinv2.models.base": 1}
    assert cycles(g) == []
    _write(tmp_path, {"twinv2/models/twin.py": "from twinv2.models import REGISTRY\nT = 1\n"})   # the __init__
    assert cycles(import_graph(tmp_path, ("twinv2",))) == [["twinv2.models", "twinv2.models.twin"]]


@pytest.mark.parametrize("src,imp,ok", [
    ("twinv2/clustering/embeddings.py", "from twinv2.training.checkpoint import x", False),
    ("twinv2/clustering/embeddings.py", "from twinv2.artifacts import x", True),
    ("twinv2/io.py", "import mlflow", False),
    ("twinv2/io.py", "def f():\n    from pipelines import tracking", False),
    ("pipelines/cli.py", "from twinv2.config import x", True),
])
def test_layer_rules_bite(tmp_path, src, imp, ok):
    files = {f: "x = 1\n" for f in ("twinv2/__init__.py", "twinv2/io.py", "twinv2/artifacts.py",
                                    "twinv2/config.py", "twinv2/clustering/__init__.py",
                                    "twinv2/clustering/embeddings.py", "twinv2/training/__init__.py",
                                    "twinv2/training/checkpoint.py", "pipelines/__init__.py", "pipelines/cli.py",
                                    "pipelines/tracking.py")}
    files[src] = imp + "\n"
    _write(tmp_path, files)
    g = import_graph(tmp_path, ("twinv2", "pipelines"))
    bad = layer_violations(g, repo_modules(tmp_path, ("twinv2", "pipelines")), tmp_path)
    assert (bad == []) is ok, bad
