"""Slide overviews: `tile` stores one picture per slide in the store, once per slide however often it is tiled,
so views (heat maps, the viewer) never reopen a slide file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import openslide

from cytoretrieve.cli import run
from cytoretrieve.store.overviews import LONG_SIDE, OVERVIEWS_TABLE, read_overview, read_overviews
from cytoretrieve.store.tables import Store
from helpers.synthetic_slides import SIZE, STAIN, write_standard_slide


def test_tile_stores_one_overview_per_slide(tmp_path: Path) -> None:
    (tmp_path / "slides").mkdir()
    slide = write_standard_slide(tmp_path / "slides" / "standard.tiff")
    store = tmp_path / "store"
    assert run(["tile", str(slide), "--store", str(store)]) == 0
    assert run(["tile", str(slide), "--store", str(store), "--table", "again"]) == 0  # tiled twice: stored once
    db = Store(store)
    assert db.db.open_table(OVERVIEWS_TABLE).count_rows() == 1
    ov = read_overview(db, "standard")
    assert ov is not None and (ov.width, ov.height) == SIZE and ov.path == str(slide.absolute())
    pic = np.asarray(ov.picture())
    assert max(pic.shape[:2]) <= LONG_SIDE
    assert abs(pic.shape[1] * ov.downsample - SIZE[0]) < ov.downsample  # overview px x downsample = level-0 px
    with openslide.OpenSlide(str(slide)) as osr:  # the same picture as the slide's own thumbnail
        ref = np.asarray(osr.get_thumbnail(pic.shape[1::-1]).convert("RGB").resize(pic.shape[1::-1]))
    assert np.abs(pic.astype(int) - ref.astype(int)).mean() < 6
    # the stain of the deposit is there in the stored picture, far from the glass colour
    assert np.abs(pic.reshape(-1, 3).astype(int) - np.array(STAIN)).sum(axis=1).min() < 30
    assert read_overviews(db, ["standard", "nope"]).keys() == {"standard"}


def test_overview_outlives_the_slide_file(tmp_path: Path) -> None:
    slide = write_standard_slide(tmp_path / "standard.tiff")
    store = tmp_path / "store"
    assert run(["tile", str(slide), "--store", str(store)]) == 0
    moved = tmp_path / "elsewhere"
    shutil.move(str(slide), moved)  # the slide leaves this machine: its overview stays readable
    ov = read_overview(Store(store), "standard")
    assert ov is not None and ov.picture().size[0] > 0
