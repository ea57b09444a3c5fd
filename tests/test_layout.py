"""The package's shape, as rules a change cannot break silently (docs/architecture.md explains them):
sources never write or read the store, queries read only the store, only the CLI speaks to the terminal, only the
store touches LanceDB, and long functions say why they are long."""

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
    allowed["cytoretrieve/queries/search.py"] = (*cohort, "cytoretrieve.models.backbones", "cytoretrieve.jobs.embed")
    forbidden = ("cytoretrieve.sources", "cytoretrieve.models.backbones", "cytoretrieve.jobs.embed", "openslide")
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
