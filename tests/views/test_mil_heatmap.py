"""Heat maps of out-of-fold tile scores over slide thumbnails (`cytoretrieve score --out`): one PNG per slide, a colour
scale shared by the run, drawn on the overview stored at tiling time (slide files are never reopened), a plain
background for a slide without one, nothing for tables without tile coordinates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from cytoretrieve.ids import tile_id
from cytoretrieve.queries.mil.bags import Bags, bags_to_table, load_bags, write_group_labels
from cytoretrieve.queries.mil.evaluate import CVResult
from cytoretrieve.store.overviews import make_overview, write_overviews
from cytoretrieve.store.tables import Store
from cytoretrieve.views.heatmap import (
    ALPHA,
    BAR_PX,
    LONG_SIDE,
    PLAIN_BACKGROUND,
    TITLE_PX,
    _lut,
    render,
    safe_names,
    write_heatmaps,
)
from helpers.mil_synthetic import synthetic_bags
from helpers.synthetic_slides import FULL_TILES, SIZE, STAIN, TILE_L0, write_standard_slide

ODD = "x:y 1'b*"  # a slide id unsafe in a file name, with a quote the SQL filter must escape
HOT, COLD = (2 * TILE_L0, 1 * TILE_L0), (5 * TILE_L0, 3 * TILE_L0)  # both inside block A, away from its holes
GHOST_TILES = [(0, 0), (3 * TILE_L0, TILE_L0)]


def _result(bags: Bags, scores: dict[str, dict[str, float]], method: str = "retrieval") -> CVResult:
    tiles = {n: [scores[n][t] for t in ids] for n, ids in zip(bags.names, bags.ids)}
    return CVResult(method=method, folds=[], mean={}, std={}, slides=list(bags.names), y=bags.y.astype(int).tolist(),
                    scores=[0.5] * len(bags), fold_of=list(range(len(bags))), tile_scores=tiles)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Slides A and ODD (the synthetic slide file: 5120 x 3840 level-0 px, tiles of 640 px at its deposit; their
    overviews stored as `tile` stores them), and GHOST (no overview in the store); a vector table of their tiles; bags read back from it; the tile scores chosen per id."""
    base = tmp_path_factory.mktemp("heat")
    slide = write_standard_slide(base / "standard.tiff")
    store = Store(base / "store")
    table = store.create_or_open("tiles_x", {"arch": "test", "fingerprint": "f", "dim": 4}, {"name": "tiles"})
    records, scores = [], {}
    placed = {"A": sorted(FULL_TILES), ODD: sorted(FULL_TILES), "GHOST": GHOST_TILES}
    for name, spots in placed.items():
        path = str(base / "moved.svs") if name == "GHOST" else str(slide)
        scores[name] = {}
        for x, y in spots:
            tid = tile_id(name, x, y, TILE_L0)
            records.append({"id": tid, "dataset": "tiles", "path": path, "group": name, "slide": name, "x": x, "y": y,
                            "level": 1, "tile_size": 320, "mpp": 0.5})
            scores[name][tid] = 0.0
    scores["A"][tile_id("A", *HOT, TILE_L0)] = 10.0
    scores["A"][tile_id("A", *COLD, TILE_L0)] = -10.0
    for tid in scores["GHOST"]:
        scores["GHOST"][tid] = 10.0  # every tile high: hot on the shared scale, though the slide alone is constant
    with openslide.OpenSlide(str(slide)) as osr:  # what `tile` stores for each slide it tiles
        thumb = np.asarray(osr.get_thumbnail((LONG_SIDE, LONG_SIDE)).convert("RGB"))
        size = osr.dimensions
    write_overviews(store, [make_overview(name, str(slide), *size, None, thumb, size[0] / thumb.shape[1])
                            for name in ("A", ODD)])
    rng = np.random.default_rng(0)
    table.add(table.make_rows(records[::-1], rng.normal(size=(len(records), 4)).astype(np.float32)))
    labels = write_group_labels(Bags(names=["A", ODD, "GHOST"], y=np.array([1, 0, 1], np.int8), vectors=[]),
                                base / "slides.csv")
    bags = load_bags(table, labels)
    return table, bags, scores, base


def _level(pixel: np.ndarray, under: tuple[int, int, int]) -> int:
    """The colour-map index whose blend over `under` is nearest `pixel`."""
    blend = (1 - ALPHA) * np.asarray(under, np.float64) + ALPHA * _lut().astype(np.float64)
    return int(np.argmin(((blend - pixel.astype(np.float64)) ** 2).sum(axis=1)))


def _at(image: np.ndarray, x_l0: float, y_l0: float, scale: float, origin: tuple[float, float] = (0, 0)) -> np.ndarray:
    return image[TITLE_PX + int((y_l0 - origin[1]) * scale), int((x_l0 - origin[0]) * scale)]


def test_heat_maps_colour_tiles_by_score_on_a_shared_scale(cohort, tmp_path: Path) -> None:
    table, bags, scores, _ = cohort
    written, notes = write_heatmaps(table, _result(bags, scores), bags, tmp_path)
    assert len(written) == 3 and len(set(written)) == 3
    assert all(p.parent == tmp_path / "heatmaps" and p.read_bytes()[:4] == b"\x89PNG" for p in written)
    by_slide = dict(zip(bags.names, written))
    assert by_slide["A"].name == "A.png" and not set(":' *") & set(by_slide[ODD].name)

    a = np.asarray(Image.open(by_slide["A"]).convert("RGB"))
    scale = LONG_SIDE / SIZE[0]  # the thumbnail of the 5120 x 3840 slide is 1024 x 768
    assert a.shape == (round(SIZE[1] * scale) + TITLE_PX, LONG_SIDE + BAR_PX, 3)
    half = TILE_L0 / 2
    hot = _level(_at(a, HOT[0] + half, HOT[1] + half, scale), STAIN)
    cold = _level(_at(a, COLD[0] + half, COLD[1] + half, scale), STAIN)
    middle = _level(_at(a, 4 * TILE_L0 + half, 3 * TILE_L0 + half, scale), STAIN)  # a tile scoring 0
    assert hot > 230 and cold < 25 and cold < middle < hot
    for glass in ((100, 3000), (HOT[0] - half, HOT[1] + half), (COLD[0] + half, COLD[1] + TILE_L0 + half)):
        assert np.abs(_at(a, *glass, scale).astype(int) - (236, 236, 232)).max() <= 3  # no tile there: untouched

    # no stored overview: a plain background spanning its tiles, the tiles hot on the run's scale, one note
    assert any("1 slide(s) have no overview" in n and "GHOST" in n for n in notes)
    g = np.asarray(Image.open(by_slide["GHOST"]).convert("RGB"))
    span = (4 * TILE_L0, 2 * TILE_L0)  # tiles at (0, 0) and (3, 1), 640 px each
    gscale = LONG_SIDE / span[0]
    assert g.shape == (round(span[1] * gscale) + TITLE_PX, LONG_SIDE + BAR_PX, 3)
    assert _level(_at(g, half, half, gscale), PLAIN_BACKGROUND) > 230
    assert tuple(_at(g, 3 * TILE_L0 + half, half, gscale)) == PLAIN_BACKGROUND  # no tile there

    # attention weights are shown times the tile count: a uniform slide sits at 1, whatever its size
    att = {n: {t: 1.0 / len(s) for t in s} for n, s in scores.items()}
    att["A"][tile_id("A", *HOT, TILE_L0)] = 0.5
    written, _ = write_heatmaps(table, _result(bags, att, "abmil"), bags, tmp_path / "abmil")
    a = np.asarray(Image.open(dict(zip(bags.names, written))["A"]).convert("RGB"))
    assert _level(_at(a, HOT[0] + half, HOT[1] + half, scale), STAIN) > 230
    assert _level(_at(a, COLD[0] + half, COLD[1] + half, scale), STAIN) < 25
    g = np.asarray(Image.open(dict(zip(bags.names, written))["GHOST"]).convert("RGB"))
    assert _level(_at(g, half, half, gscale), PLAIN_BACKGROUND) < 25  # raw weight 0.5 = A's hot tile, but uniform


def test_a_table_without_tile_coordinates_writes_nothing(tmp_path: Path) -> None:
    bags, _ = synthetic_bags(6, seed=1)
    store = Store(tmp_path / "store")
    table = bags_to_table(store, "musk", bags)
    loaded = load_bags(table, write_group_labels(bags, tmp_path / "bags.csv"))
    scores = {n: {t: float(i) for i, t in enumerate(ids)} for n, ids in zip(loaded.names, loaded.ids)}
    written, notes = write_heatmaps(table, _result(loaded, scores), loaded, tmp_path / "out")
    assert written == [] and len(notes) == 1 and "tile table" in notes[0]
    assert not (tmp_path / "out").exists()


def test_safe_names_are_file_names_and_unique() -> None:
    names = ["a/b", "a_b", "A_B", "..", "", "ok-1.2", "\u00e9t\u00e9"]
    stems = safe_names(names)
    assert stems["a_b"] == "a_b" and stems["ok-1.2"] == "ok-1.2"
    assert len({s.lower() for s in stems.values()}) == len(names)
    assert all(s and s not in (".", "..") and "/" not in s and s.isascii() for s in stems.values())


def test_overlapping_tiles_show_the_highest_score() -> None:
    thumb = Image.new("RGB", (100, 80), PLAIN_BACKGROUND)
    boxes = np.array([[0, 0, 60, 60], [40, 20, 100, 80]])
    image = np.asarray(render(thumb, boxes, np.array([1.0, 0.0]), 0.0, 1.0, ["s", "", ""]))
    assert _level(image[TITLE_PX + 50, 50], PLAIN_BACKGROUND) > 250  # both cover it: the high one shows
    assert _level(image[TITLE_PX + 70, 90], PLAIN_BACKGROUND) < 5
    assert tuple(image[TITLE_PX + 70, 10]) == PLAIN_BACKGROUND
