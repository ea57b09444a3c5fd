"""The package's shape, as rules a change cannot break silently (docs/architecture.md explains them):
sources never write or read the store, queries read only the store, only the CLI speaks to the terminal, only the
store touches LanceDB, imports go one way through the pipeline's folders (followed transitively, no cycles), and
long functions say why they are long."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cytoretrieve"
MAX_LINES = 80
LONG_REASON = "Long because"  # a function over MAX_LINES says why in its docstring, starting with these words


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE.parent)): ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py")}


def _imports(tree: ast.Module) -> set[str]:
    """Every module imported anywhere in the file (inside functions too: lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


MODULES = _modules()


def _offenders(under: str, forbidden: tuple[str, ...], allowed: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    bad = []
    for path, tree in MODULES.items():
        if not path.startswith(under):
            continue
        ok = (allowed or {}).get(path, ())
        for name in sorted(_imports(tree)):
            if name.startswith(forbidden) and not name.startswith(ok):
                bad.append(f"{path} imports {name}")
    return bad


def test_sources_know_nothing_of_the_store_or_the_views() -> None:
    assert _offenders("cytoretrieve/sources/", ("cytoretrieve.store", "cytoretrieve.views", "lancedb")) == []


def test_queries_read_only_the_store() -> None:
    # queries may read the cohort's small files (slide labels, splits), never images, slides or a model; the one
    # exception: search embeds a new query image with the table's own backbone
    cohort = ("cytoretrieve.sources.cohort",)
    allowed = {p: cohort for p in MODULES if p.startswith("cytoretrieve/queries/")}
    allowed["cytoretrieve/queries/search.py"] = (*cohort, "cytoretrieve.models")
    forbidden = ("cytoretrieve.sources", "cytoretrieve.models", "cytoretrieve.jobs", "openslide")
    assert _offenders("cytoretrieve/queries/", forbidden, allowed) == []


def test_only_the_cli_speaks_to_the_terminal() -> None:
    assert _offenders("cytoretrieve/", ("typer", "rich", "click"),
                      {p: ("typer", "rich", "click") for p in MODULES if p.startswith("cytoretrieve/cli/")}) == []
    printing = [f"{p}:{n.lineno}" for p, tree in MODULES.items() if not p.startswith("cytoretrieve/cli/")
                for n in ast.walk(tree)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
    assert printing == []


def test_only_the_store_touches_lancedb() -> None:
    allowed = {p: ("lancedb",) for p in MODULES if p.startswith("cytoretrieve/store/")}
    assert _offenders("cytoretrieve/", ("lancedb",), allowed) == []


def test_only_the_openslide_backend_imports_openslide() -> None:
    allowed = {"cytoretrieve/sources/slides/backends/openslide.py": ("openslide",)}
    assert _offenders("cytoretrieve/", ("openslide",), allowed) == []


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of the body after the signature and docstring (a CLI command's options are its signature)."""
    body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
    return node.end_lineno - body[0].lineno + 1


def test_long_functions_say_why() -> None:
    long = []
    for path, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = _body_lines(node)
                if lines > MAX_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
                    long.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


@pytest.mark.parametrize("rule", [test_sources_know_nothing_of_the_store_or_the_views, test_queries_read_only_the_store])
def test_the_rules_can_fail(rule, monkeypatch) -> None:
    """The checks see a forbidden import, even one made lazily inside a function."""
    bad = ast.parse("def f():\n    from cytoretrieve.store.tables import Store\n    import cytoretrieve.sources.cells\n")
    name = "cytoretrieve/sources/x.py" if "sources" in rule.__name__ else "cytoretrieve/queries/x.py"
    monkeypatch.setitem(MODULES, name, bad)
    with pytest.raises(AssertionError):
        rule()


# ------------------------------------------------------------------------------------------ the import graph

# The pipeline's folders in order: a module imports only from its own folder, a lower rank, or the base modules
# (rank 0: errors, ids, faults, runtime, distributed). Type-only imports (under TYPE_CHECKING) do not count.
RANKS = {"sources": 1, "models": 1, "store": 2, "queries": 3, "views": 4, "jobs": 5, "train": 5, "api": 6, "cli": 7}


def _module_name(path: str) -> str:
    parts = list(Path(path).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


NAMES = {_module_name(p): p for p in MODULES}


def _own(name: str) -> str | None:
    """The package module an imported name lives in (`cytoretrieve.a.b.func` -> `cytoretrieve.a.b`)."""
    while name and name not in NAMES:
        name = name.rpartition(".")[0]
    return name or None


def _runtime_nodes(tree: ast.Module, top_level: bool) -> list[ast.AST]:
    """Import statements that run: all of them (functions included), or only the module-level ones; never those
    under `if TYPE_CHECKING:`."""
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    nodes = tree.body if top_level else list(ast.walk(tree))
    return [n for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def _graph(top_level: bool = False) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(package module -> package modules it imports, package module -> outside top-level packages it imports).
    An import that names a package (`from cytoretrieve import x`, `from cytoretrieve.store import Store`) is an edge
    to that package's `__init__`, whatever the importer."""
    inner: dict[str, set[str]] = {}
    outer: dict[str, set[str]] = {}
    for name, path in NAMES.items():
        deps, ext = set(), set()
        for node in _runtime_nodes(MODULES[path], top_level):
            if isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            elif node.module and node.level == 0:
                imported = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for full in imported:
                if full.startswith("cytoretrieve"):
                    own = _own(full)
                    if own and own != name:
                        deps.add(own)
                else:
                    ext.add(full.split(".")[0])
        inner[name], outer[name] = deps, ext
    return inner, outer


GRAPH, EXTERNAL = _graph()


def _reach(start: str, graph: dict[str, set[str]] | None = None) -> set[str]:
    """Every package module `start` can end up importing, directly or through others."""
    graph = GRAPH if graph is None else graph
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _rank(name: str) -> int:
    if name.endswith("__main__"):  # entry points (`python -m cytoretrieve.train`) stand with the CLI
        return RANKS["cli"]
    parts = name.split(".")
    return RANKS.get(parts[1], 0) if len(parts) > 1 else 0


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                  if _rank(d) > _rank(m) and m != "cytoretrieve")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_go_one_way_through_the_pipeline() -> None:
    assert _upward(GRAPH) == []


def test_no_import_cycles_at_import_time() -> None:
    assert _cycles(_graph(top_level=True)[0]) == []


def test_queries_reach_no_slide_library_or_model_even_transitively() -> None:
    """A query must not reach OpenSlide (or a model, or a job) through a cohort reader or a helper it imports;
    `queries/search.py` alone may reach `models` (a new query image is embedded), still never a slide library."""
    bad = []
    for name in (n for n in NAMES if n.startswith("cytoretrieve.queries")):
        reached = _reach(name) | {name}
        libs = set().union(*(EXTERNAL[m] for m in reached))
        for lib in sorted(libs & {"openslide", "tifffile", "typer", "rich"}):
            bad.append(f"{name} reaches {lib}")
        for mod in sorted(reached):
            if mod.startswith(("cytoretrieve.jobs", "cytoretrieve.views", "cytoretrieve.cli", "cytoretrieve.train")):
                bad.append(f"{name} reaches {mod}")
            if mod.startswith("cytoretrieve.sources") and not mod.startswith("cytoretrieve.sources.cohort"):
                bad.append(f"{name} reaches {mod}")
            if mod.startswith("cytoretrieve.models") and not name.startswith("cytoretrieve.queries.search"):
                bad.append(f"{name} reaches {mod}")
    assert bad == []


def test_the_graph_rules_can_fail() -> None:
    """An upward import, a cycle and a transitive path are each seen."""
    graph = {"cytoretrieve.store.a": {"cytoretrieve.queries.b"}, "cytoretrieve.queries.b": {"cytoretrieve.store.a"},
             "cytoretrieve.queries.c": {"cytoretrieve.queries.d"}, "cytoretrieve.queries.d": {"cytoretrieve.sources.x"}}
    assert _upward(graph) == ["cytoretrieve.store.a imports cytoretrieve.queries.b"]
    assert _cycles(graph) == [["cytoretrieve.queries.b", "cytoretrieve.store.a"]]
    assert "cytoretrieve.sources.x" in _reach("cytoretrieve.queries.c", graph)
