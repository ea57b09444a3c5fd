"""Focus scores and focal planes in tile and cell tables: `tile` / `cells --plane --min-focus`, old tables still
appendable, `embed` copies `focus` and `search --where "focus > ..."` filters on it, and the preview colour."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoretrieve.jobs.cells import expand_sources, find_cells_in
from cytoretrieve.jobs.tile import tile_slides
from cytoretrieve.sources.slides.grid import GridSpec
from cytoretrieve.sources.slides.planes import EDF
from cytoretrieve.sources.slides.reader import SlideReader
from cytoretrieve.sources.slides.smear import SmearParams
from cytoretrieve.store.tables import META_KEY, Store
from cytoretrieve.store.tiles import open_tile_table
from helpers.planes import ISBI, sharp_field, u8, write_planes

SPEC = GridSpec(tile_size=64, target_mpp=0.5, min_foreground_um2=0)
FIELD = SmearParams(min_region_mm2=0, detect_mpp=1)  # a 128 um field is one small deposit


def _tile(store: Store, sources: list[Path], table: str, **kw):
    return tile_slides(sources, store, table=table, spec=SPEC, params=FIELD, mpp=0.5, **kw)


def test_tile_planes_focus_and_min_focus(tmp_path) -> None:
    stack = write_planes(tmp_path / "stack")
    store = Store(tmp_path / "store")
    plane0 = _tile(store, [stack], "p0", plane=0, preview=tmp_path / "qc").results[0]
    assert plane0.status == "tiled" and plane0.planes == 5 and plane0.grey and plane0.tiles >= 12
    n = plane0.tiles
    rows0 = {r["id"]: r for r in open_tile_table(store, "p0").rows()}
    assert {r["plane"] for r in rows0.values()} == {0} and all(r["grey"] for r in rows0.values())
    best = _tile(store, [stack], "best", plane="best").results[0]
    rows = {r["id"]: r for r in open_tile_table(store, "best").rows()}
    assert {r["plane"] for r in rows.values()} == {1, 3}  # each tile from its own sharp plane
    for r in rows.values():
        assert r["plane"] == (1 if r["x"] < 128 else 3)
        assert r["focus"] > rows0[r["id"]]["focus"]  # plane 0 is defocused everywhere
    assert best.focus_median > plane0.focus_median
    edf = _tile(store, [stack], "edf", plane="edf").results[0]
    assert {r["plane"] for r in open_tile_table(store, "edf").rows()} == {EDF} and edf.tiles == n
    # --min-focus drops the blurred tiles and says so; the table records its settings
    cut = float(np.median([r["focus"] for r in rows0.values()]))
    kept = _tile(store, [stack], "sharp", plane=0, min_focus=cut, preview=tmp_path / "qc").results[0]
    assert 0 < kept.tiles < n and kept.blurred == n - kept.tiles
    assert all(r["focus"] >= cut for r in open_tile_table(store, "sharp").rows())
    meta = json.loads(open_tile_table(store, "sharp").tbl.schema.metadata[META_KEY])
    assert meta["plane"] == 0 and meta["min_focus"] == cut and meta["focus"]["name"] == "laplacian"
    # the preview shows the dropped tiles in their own colour (red)
    pixels = np.asarray(Image.open(tmp_path / "qc" / "stack.png").convert("RGB")).reshape(-1, 3)
    assert ((pixels[:, 0] == 220) & (pixels[:, 1] == 0) & (pixels[:, 2] == 0)).sum() > 100
    # the reader reads a row back from its plane (an EDF row as a composite, the same each time)
    reader = SlideReader()
    r = open_tile_table(store, "edf").rows()[0]
    assert np.array_equal(np.asarray(reader.read_row(r)), np.asarray(reader.read_row(r)))
    assert not np.array_equal(np.asarray(reader.read_row(r)), np.asarray(reader.read_row({**r, "plane": 0})))
    with pytest.raises(Exception, match="min_focus"):
        _tile(store, [stack], "bad", min_focus=-1.0)


def test_old_tile_table_without_focus_stays_appendable(tmp_path) -> None:
    store = Store(tmp_path / "store")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(u8(sharp_field(256, seed=1))).save(a)
    Image.fromarray(u8(sharp_field(256, seed=2))).save(b)
    old = _tile(store, [a], "t", focus=False)  # as tables were made before focus scores
    assert old.results[0].status == "tiled"
    table = open_tile_table(store, "t")
    assert "focus" not in table.columns and "focus" not in table.meta
    new = _tile(store, [a, b], "t")  # a rerun with focus scores appends to it
    assert [r.status for r in new.results] == ["done", "tiled"]
    table = open_tile_table(store, "t")
    assert "focus" not in table.columns and set(table.slide_counts()) == {"a", "b"}
    # a new table has the columns
    _tile(store, [a], "t2")
    assert {"focus", "plane", "grey"} <= set(open_tile_table(store, "t2").columns)


def test_embed_copies_focus_and_search_filters_on_it(tmp_path) -> None:
    from cytoretrieve.jobs.embed import embed
    from cytoretrieve.models.backbones import load_backbone
    from cytoretrieve.queries.search import search

    stack = write_planes(tmp_path / "stack")
    store = Store(tmp_path / "store")
    _tile(store, [stack], "tiles", plane=0)
    backbone = load_backbone("resnet18", "random", image_size=32)
    report = embed("tiles", backbone, store, workers=0)
    n = open_tile_table(store, "tiles").count()
    assert report.added == n >= 12
    table = store.open(report.table)
    rows = table.read(["id", "focus", "plane"]).to_pylist()
    assert all(r["plane"] == 0 and r["focus"] is not None for r in rows)
    cut = float(np.median([r["focus"] for r in rows]))
    result = search(table, row_id=rows[0]["id"], k=n, where=f"focus > {cut}")
    sharp = {r["id"] for r in rows if r["focus"] > cut}
    assert result.hits and {h.id for h in result.hits} <= sharp
    # --plane at embed is recorded and never mixed in one table
    with pytest.raises(Exception, match="focal plane setting"):
        embed("tiles", backbone, store, table=report.table, workers=0, plane="best")
    assert embed("tiles", backbone, store, table="best_vectors", workers=0, plane="best").added == n
    assert store.open("best_vectors").meta["dataset"]["plane"] == "best"


@pytest.mark.skipif(not (ISBI / "stack").is_dir(), reason="ISBI 2015 stack not in ../shared/data")
def test_cells_on_the_isbi_stack_with_best_planes(tmp_path) -> None:
    """`cells --plane best` on the real 20-plane folder: one field, nuclei found on its EDF, each crop from its
    own sharpest plane, focus stored; --min-focus drops the blurred crops."""
    sources = expand_sources([ISBI / "stack"], mpp=0.25, planes=True)
    assert len(sources) == 1 and sources[0].path.name == "stack"
    assert len(expand_sources([ISBI / "stack"], mpp=0.25)) == 20  # without a plane setting: 20 fields
    store = Store(tmp_path / "store")
    report = find_cells_in(sources, store, table="cells", plane="best")
    r = report.results[0]
    assert r.status == "found" and r.planes == 20 and r.grey and r.cells >= 40
    rows = open_tile_table(store, "cells").rows()
    assert all(0 <= row["plane"] < 20 for row in rows) and len({row["plane"] for row in rows}) > 1
    focus = [row["focus"] for row in rows if row["focus"] is not None]
    assert len(focus) > 0.9 * len(rows) and all(math.isfinite(f) for f in focus)
    cut = float(np.percentile(focus, 25))
    fewer = find_cells_in(sources, store, table="sharp_cells", plane="best", min_focus=cut).results[0]
    assert fewer.cells < r.cells and fewer.blurred == r.cells - fewer.cells


def test_grey_fields_are_recorded_and_a_colour_only_rule_refuses_them(tmp_path) -> None:
    from cytoretrieve.sources.slides.deposit import DepositParams

    field = tmp_path / "grey.png"
    Image.fromarray(u8(sharp_field(256, seed=4))).save(field)  # mode L
    store = Store(tmp_path / "store")
    done = _tile(store, [field], "t").results[0]
    assert done.status == "tiled" and done.grey
    assert all(r["grey"] for r in open_tile_table(store, "t").rows())
    spec = GridSpec(tile_size=64, target_mpp=0.5, rule="coverage", min_coverage=0.01)
    refused = tile_slides([field], store, table="c", spec=spec, params=DepositParams(), mpp=0.5).results[0]
    assert refused.status == "skipped" and "`deposit` saturation needs colour" in refused.reason
    grey_rule = tile_slides([field], store, table="c", spec=spec, params=DepositParams(method="grey"), mpp=0.5)
    assert grey_rule.results[0].status == "tiled"
