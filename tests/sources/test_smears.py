"""The cells tile rule on synthetic Pap smears made of real cells (`synthetic_smears.py`): every cell's place is
known, so recall and empty tiles are measured, at each density, at the default settings; artefacts drawn on a
smear are excluded and shown."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoretrieve.cli import run
from cytoretrieve.sources.slides.grid import GridSpec
from cytoretrieve.sources.slides.smear import ARTEFACTS, SmearParams, detect_smear
from cytoretrieve.sources.slides.synthetic_smears import CRIC, DENSITIES, HERLEV, Smear, tile_truth, write_smear
from cytoretrieve.sources.slides.tiling import TiledSlide, tile_slide
from cytoretrieve.views.slide_preview import EXCLUDED, OUTLINE, TILE, TOO_SMALL

pytestmark = pytest.mark.skipif(not (HERLEV.is_dir() and CRIC.is_dir()), reason="needs ../shared/data cells")


@pytest.fixture(scope="module")
def smears(tmp_path_factory) -> dict[str, Smear]:
    base = tmp_path_factory.mktemp("smears")
    out = {d: write_smear(base / f"{d}.tiff", d, seed=11) for d in DENSITIES}
    out["artefacts"] = write_smear(base / "artefacts.tiff", "sparse", artefacts=True, seed=12)
    return out


@pytest.fixture(scope="module")
def tiled(smears) -> dict[str, TiledSlide]:
    return {name: tile_slide(s.path, GridSpec(), table="t") for name, s in smears.items()}


def _truth(smear: Smear, t: TiledSlide) -> tuple[np.ndarray, np.ndarray]:
    g = t.grid
    return tile_truth(smear, g.xs, g.ys, g.choice.extent)


@pytest.mark.parametrize("density", DENSITIES)
def test_every_cell_is_kept_and_few_tiles_are_empty(smears, tiled, density) -> None:
    smear, t = smears[density], tiled[density]
    centres, touched = _truth(smear, t)
    kept = t.grid.kept
    recall = centres[kept].sum() / centres.sum()  # share of cells whose centre lies in a kept tile
    empty = (~touched[kept]).mean()  # share of kept tiles with no pixel of any cell
    assert len(smear.centres) >= 250 and recall >= 0.98, (density, recall)
    assert empty <= 0.05, (density, empty)
    assert t.result.status == "tiled" and t.result.tiles == t.grid.n_kept <= t.result.region_tiles


def test_the_tissue_rule_loses_a_sparse_smear(smears) -> None:
    """Why cytology has its own rule: coverage 0.5 of a tile keeps almost none of a sparse smear's cells."""
    smear = smears["sparse"]
    t = tile_slide(smear.path, GridSpec(rule="coverage", min_coverage=0.5), table="t")
    centres, _ = _truth(smear, t)
    assert centres[t.grid.kept].sum() / centres.sum() < 0.5


def test_artefacts_are_excluded_and_keep_no_tile(smears, tiled) -> None:
    smear, t = smears["artefacts"], tiled["artefacts"]
    d = t.decision
    step = int(d.downsample)
    codes = d.artefacts
    for name, drawn in smear.artefacts.items():  # each drawn artefact is excluded where it lies
        drawn_small = drawn[step // 2::step, step // 2::step][: codes.shape[0], : codes.shape[1]]
        assert (codes[drawn_small] > 0).mean() >= 0.95, name
    assert all(d.artefact_mm2[k] > 0 for k in ARTEFACTS)
    # no tile is kept for an artefact alone: every kept tile holds some cell
    _, touched = _truth(smear, t)
    assert touched[t.grid.kept].all()
    # cells not under an artefact are all found
    under = np.zeros(len(smear.centres), bool)
    for drawn in smear.artefacts.values():
        under |= drawn[smear.centres[:, 1].astype(int), smear.centres[:, 0].astype(int)]
    ext = t.grid.choice.extent
    kept_tiles = {(int(x), int(y)) for x, y in zip(t.grid.xs[t.grid.kept], t.grid.ys[t.grid.kept])}
    found = np.array([((int(x) // ext) * ext, (int(y) // ext) * ext) in kept_tiles for x, y in smear.centres])
    assert found[~under].mean() >= 0.98


def test_preview_and_json_show_the_decision(smears, tmp_path) -> None:
    store, qc, report = tmp_path / "store", tmp_path / "qc", tmp_path / "r.json"
    path = smears["artefacts"].path
    assert run(["tile", str(path), "--store", str(store), "--preview", str(qc), "--json", str(report)]) == 0
    r = json.loads(report.read_text())["slides"][0]
    assert r["rule"] == "cells" and 0 < r["tiles"] <= r["region_tiles"] <= r["grid_tiles"]
    assert r["foreground_mm2"] > 0 and r["deposit_mm2"] > r["foreground_mm2"]
    assert set(r["artefact_mm2"]) == set(ARTEFACTS) and r["artefact_mm2"]["label"] > 0.5
    th = r["thresholds"]
    assert th["min_foreground_um2"] == 100 and th["min_od"] == SmearParams().min_od and len(th["glass"]) == 3
    png = np.asarray(Image.open(Path(r["preview"])).convert("RGB")).reshape(-1, 3)
    for colour in (OUTLINE, TILE, TOO_SMALL):
        assert (png == colour).all(1).sum() > 100, colour
    tinted = (png[:, 0] > 150) & (png[:, 2] > 150) & (png[:, 1] < 110)  # magenta over the artefacts
    assert tinted.sum() > 5000 and EXCLUDED == (255, 0, 255)


def test_min_foreground_zero_tiles_the_whole_region(smears) -> None:
    t = tile_slide(smears["sparse"].path, GridSpec(min_foreground_um2=0), table="t")
    assert t.grid.n_kept == t.grid.n_region > 0


def test_settings_are_recorded_and_others_refused(smears, tmp_path, capsys) -> None:
    store = str(tmp_path / "store")
    path = str(smears["sparse"].path)
    assert run(["tile", path, "--store", store]) == 0
    for other in (["--min-foreground-um2", "50"], ["--rule", "coverage"]):
        assert run(["tile", path, "--store", store, *other]) == 2
        assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["--min-coverage", "0.2"], "--min-coverage"),  # a setting of the other rule
    (["--deposit", "grey"], "--deposit"),
    (["--rule", "coverage", "--min-foreground-um2", "50"], "--min-foreground-um2"),
    (["--rule", "tissue"], "--rule"),
    (["--min-foreground-um2", "-1"], "--min-foreground-um2"),
])
def test_rule_mistakes_name_the_flag(smears, tmp_path, capsys, argv, flag) -> None:
    assert run(["tile", str(smears["sparse"].path), "--store", str(tmp_path / "s"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "`" not in err[0]


def test_the_read_level_is_chosen_once(smears, monkeypatch) -> None:
    from cytoretrieve.sources.slides import reader

    calls = []
    real = reader.choose_level
    monkeypatch.setattr(reader, "choose_level", lambda *a, **k: calls.append(a) or real(*a, **k))
    tile_slide(smears["sparse"].path, GridSpec(), table="t")
    assert len(calls) == 1


def _disc(rgb: np.ndarray, cx: int, cy: int, r: int, colour: tuple[int, int, int]) -> None:
    yy, xx = np.ogrid[: rgb.shape[0], : rgb.shape[1]]
    rgb[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = colour


def test_detection_on_drawn_cases() -> None:
    """At 4 um/px: pale cyan and pale pink cytoplasm are foreground; a small saturated nucleus is not ink, a
    marker stroke is; black debris on glass is debris, a dark purple nucleus and a dark cluster in cytoplasm are
    cells; a solid dark block is a label."""
    rgb = np.full((400, 400, 3), (238, 238, 234), np.uint8)
    _disc(rgb, 40, 40, 6, (214, 232, 230))  # pale cyan cytoplasm: only red is absorbed (OD 0.046)
    _disc(rgb, 80, 40, 6, (232, 214, 222))  # pale pink
    _disc(rgb, 120, 40, 3, (40, 30, 150))  # a saturated nucleus, ~110 um^2
    rgb[100:140, 20:200] = (25, 90, 180)  # a marker stroke, 160 x 720 um
    _disc(rgb, 40, 200, 3, (20, 18, 18))  # black debris on glass
    _disc(rgb, 100, 200, 8, (190, 200, 215))  # a cell with a dark purple nucleus
    _disc(rgb, 100, 200, 3, (34, 20, 40))
    _disc(rgb, 160, 200, 12, (170, 185, 205))  # a dark grey cluster inside cytoplasm
    _disc(rgb, 160, 200, 5, (35, 35, 38))
    rgb[260:390, 220:390] = (96, 92, 86)  # a label: 0.27 mm^2 of opaque paper
    params = SmearParams(block_min_mm2=0.2, min_region_mm2=0.01)
    found = detect_smear(rgb, 4.0, params)
    fg, codes = found["foreground"], found["artefacts"]
    code = {name: i + 1 for i, name in enumerate(ARTEFACTS)}
    assert fg[40, 40] and fg[40, 80] and fg[40, 120] and codes[40, 120] == 0
    assert (codes[105:135, 25:195] == code["ink"]).all() and not fg[100:140, 20:200].any()
    assert codes[200, 40] == code["debris"] and not fg[200, 40]
    assert fg[200, 100] and fg[200, 160] and codes[200, 100] == codes[200, 160] == 0
    assert (codes[265:385, 225:385] == code["label"]).all()
    assert not fg[300:380, 20:200].any() and tuple(found["glass"]) == (238, 238, 234)
    assert found["region"].sum() * (4.0 * found["region_factor"]) ** 2 >= 0.01e6  # the cells' envelope


@pytest.mark.parametrize("density", DENSITIES)
def test_recall_holds_at_the_coarsest_detection(smears, density) -> None:
    """A 4x pyramid (Aperio) has 2 and 8 um/px levels: its 8 um/px level is read as it is (16x fewer pixels to
    decode than averaging the 2 um/px one). Cells stay found there."""
    smear = smears[density]
    t = tile_slide(smear.path, GridSpec(), SmearParams(detect_mpp=8.0), table="t")
    assert t.result.thresholds["detect_mpp"] == 8.0
    centres, touched = _truth(smear, t)
    assert centres[t.grid.kept].sum() / centres.sum() >= 0.98 and (~touched[t.grid.kept]).mean() <= 0.05


def test_a_level_up_to_coarsest_mpp_is_read_as_it_is(tmp_path) -> None:
    from cytoretrieve.sources.slides.deposit import thumbnail
    from cytoretrieve.sources.slides.reader import Slide
    from helpers.synthetic_slides import write_pyramid

    img = np.full((2048, 2048, 3), 230, np.uint8)
    path = write_pyramid(tmp_path / "aperio.tiff", img, mpp=0.5, downsamples=(1, 4, 16))  # 0.5, 2 and 8 um/px
    with Slide(path) as slide:
        assert thumbnail(slide, 4.0, 8192, coarsest_mpp=8.0)[1] == 16  # the 8 um/px level, as it is
        assert thumbnail(slide, 4.0, 8192)[1] == 8  # without: the 2 um/px level averaged by 2
        assert thumbnail(slide, 4.0, 8192, coarsest_mpp=6.0)[1] == 8
