"""A new view is one module over the store's public API: a toy view, defined only here, draws one slide's tile
positions from a table through `Table.read` and `store.filters` (no SQL of its own, no `.tbl`), and the layout
rule holds the real views to the same."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cytoretrieve.store.filters import HAS_LOCATION, all_of, equals
from cytoretrieve.store.tables import Store, Table

PACKAGE = Path(__file__).resolve().parents[2] / "cytoretrieve"


def toy_positions_view(table: Table, slide: str, path: Path, size: int = 200) -> Path:
    """Each located row of `slide` as a dot, scaled to the slide's extent: the whole of a view's contract."""
    rows = table.read(["x", "y"], all_of(equals("slide", slide), HAS_LOCATION)).to_pylist()
    canvas = Image.new("RGB", (size, size), "white")
    if rows:
        xs, ys = np.array([r["x"] for r in rows], float), np.array([r["y"] for r in rows], float)
        scale = (size - 10) / max(xs.max() + 1, ys.max() + 1)
        draw = ImageDraw.Draw(canvas)
        for x, y in zip(xs * scale + 5, ys * scale + 5):
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill="black")
    canvas.save(path)
    return path


def test_a_toy_view_draws_from_the_store_api(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    table = store.create_or_open("t", {"arch": "x", "fingerprint": "f" * 64, "dim": 2}, {"name": "toy"})
    rows = [{"id": f"s{s}@{x},{y},10", "slide": f"s{s}", "x": x, "y": y} for s in (1, 2) for x, y in ((0, 0), (90, 40))]
    rows.append({"id": "cell-without-place", "slide": "s1", "x": None, "y": None})
    table.add(table.make_rows(rows, np.ones((len(rows), 2), np.float32)))
    picture = np.asarray(Image.open(toy_positions_view(table, "s1", tmp_path / "s1.png")).convert("L"))
    assert (picture < 128).sum() > 0  # dots drawn ...
    assert table.count(all_of(equals("slide", "s1"), HAS_LOCATION)) == 2  # ... for the two located rows of s1 only
    assert table.count(equals("slide", "O'Brien")) == 0  # quoting handled by the store


def test_nothing_outside_the_store_reaches_through_tbl() -> None:
    bad = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent)
        if rel.parts[1] == "store":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "tbl":
                bad.append(f"{rel}:{node.lineno}")
    assert bad == []
