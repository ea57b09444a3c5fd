"""`cytoretrieve tile`: bags in a tile table, exact on the synthetic slide, resumable, bad inputs as the issue says."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoretrieve.cli import run
from cytoretrieve.sources.slides.reader import SlideReader
from cytoretrieve.store.tables import BASE_FIELDS, META_KEY, Store
from cytoretrieve.store.tiles import SHARED_COLUMNS, TILE_COLUMNS, open_tile_table
from helpers.paths import WSI
from helpers.synthetic_slides import BLOB_TILE, CELL_TILES, FULL_TILES, HALF_TILE, STAIN, slide_folder


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    return slide_folder(tmp_path_factory.getbasetemp() / "slides")


def _tiles(store: Path, table: str = "tiles") -> list[dict]:
    return open_tile_table(Store(store), table).rows()


def test_tile_rows_are_exact_and_readable(slides, tmp_path, capsys) -> None:
    """The tissue rule (coverage) on the block slide: the kept tiles and their coverages are exact."""
    store = tmp_path / "store"
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label,binary\nstandard.tiff,HSIL,1\n")
    argv = ["tile", str(slides["standard"]), "--labels", str(labels), "--store", str(store), "--rule", "coverage"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "standard" in out and "tiled" in out and "0.294" in out  # deposit area in the summary
    rows = _tiles(store)
    assert {(r["x"], r["y"]) for r in rows} == FULL_TILES | {HALF_TILE}
    r = next(r for r in rows if (r["x"], r["y"]) == (1280, 640))
    assert r["id"] == "standard@1280,640,640" and r["slide"] == r["group"] == "standard"
    assert (r["level"], r["read_size"], r["tile_size"], r["extent"]) == (1, 320, 320, 640)
    assert r["mpp"] == pytest.approx(0.5) and r["coverage"] == 1.0 and r["source"] == "grid"
    assert (r["label"], r["binary"], r["path"]) == ("HSIL", 1, str(slides["standard"].absolute()))
    assert next(r for r in rows if (r["x"], r["y"]) == HALF_TILE)["coverage"] == 0.5
    # the tile table speaks the vector tables' language where they overlap
    table = open_tile_table(Store(store), "tiles")
    types = {f.name: f.type for f in table.tbl.schema}
    assert all(types[f.name] == f.type for f in BASE_FIELDS if f.name in SHARED_COLUMNS)
    assert set(TILE_COLUMNS) | {"focus", "plane", "grey"} == set(types) and "vector" not in types
    meta = json.loads(table.tbl.schema.metadata[META_KEY])
    assert meta["kind"] == "tiles" and meta["source"] == "grid"
    assert (meta["tile_size"], meta["target_mpp"], meta["stride"], meta["min_coverage"]) == (320, 0.5, 320, 0.05)
    assert meta["deposit"]["method"] == "saturation" and "rule" not in meta  # as tables made before the rules
    # what the embed job will do with a row
    image = SlideReader().read_row(r)
    assert image.size == (320, 320) and image.mode == "RGB"
    assert np.asarray(image).reshape(-1, 3).min(0).tolist() == list(STAIN)


def test_rerun_skips_finished_slides(slides, tmp_path, capsys) -> None:
    store = str(tmp_path / "store")
    assert run(["tile", str(slides["standard"]), "--store", store]) == 0
    version = open_tile_table(Store(store), "tiles").tbl.version
    assert run(["tile", str(slides["standard"]), "--store", store]) == 0
    assert "1 already in the table" in capsys.readouterr().out
    table = open_tile_table(Store(store), "tiles")
    assert table.count() == len(CELL_TILES) and table.tbl.version == version
    # other settings into the same table: refused, nothing changes
    assert run(["tile", str(slides["standard"]), "--store", store, "--tile-size", "256"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert open_tile_table(Store(store), "tiles").tbl.version == version


def test_bad_slides_are_skipped_and_reported(slides, tmp_path, capsys) -> None:
    store = tmp_path / "store"
    names = ("standard", "truncated", "notslide", "empty", "nompp", "corrupt")
    assert run(["tile", *(str(slides[n]) for n in names), "--store", str(store)]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert any(line.startswith("skipped truncated: truncated") for line in err)
    assert any(line.startswith("skipped notslide: not a whole-slide image (a PNG image)") for line in err)
    assert any(line.startswith("skipped nompp: ") and "--mpp" in line for line in err)
    assert any(line.startswith("skipped corrupt: unreadable image data (") for line in err)
    assert any(line.startswith("warning: empty: no cell deposit found: 0 tiles") for line in err)
    assert f"1 tiled ({len(CELL_TILES)} tiles added), 1 empty" in captured.out and "4 skipped" in captured.out
    assert {r["slide"] for r in _tiles(store)} == {"standard"}  # nothing written for what failed


def test_slide_without_mpp(slides, tmp_path, capsys) -> None:
    store = tmp_path / "store"
    assert run(["tile", str(slides["nompp"]), "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 2 and "--mpp" in err.splitlines()[-1]  # the skip line, then the error
    assert err.splitlines()[-1].startswith("cytoretrieve: error: nompp: no pixel size")
    assert not store.exists() or not Store(store).table_names()
    assert run(["tile", str(slides["nompp"]), "--store", str(store), "--mpp", "0.25"]) == 0
    assert len(_tiles(store)) == len(CELL_TILES)


def test_whole_command_errors_exit_2_and_write_nothing(slides, tmp_path, capsys) -> None:
    store = tmp_path / "store"
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\nstandard,HSIL\nghost,NILM\n")
    cases = [
        (["tile", str(slides["standard"]), "--labels", str(labels)], "not among the 1 given: ghost"),
        (["tile", str(tmp_path / "missing.svs")], "no such slide"),
        (["tile", str(slides["standard"]), "--min-coverage", "2"], "--min-coverage"),
        (["tile", str(slides["standard"]), "--labels", str(tmp_path / "none.csv")], "no labels file"),
        (["tile"], "no slides given"),
    ]
    for argv, message in cases:
        assert run([*argv, "--store", str(store)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
    assert Store(store).table_names() == []


def test_labels_with_paths_list_the_slides(slides, tmp_path, capsys) -> None:
    (tmp_path / "csv").mkdir()
    labels = tmp_path / "csv" / "labels.csv"  # paths are relative to the CSV
    labels.write_text(f"slide,label,path\nstandard,NILM,{os.path.relpath(slides['standard'], labels.parent)}\n")
    assert run(["tile", "--labels", str(labels), "--store", str(tmp_path / "s")]) == 0
    assert {r["label"] for r in _tiles(tmp_path / "s")} == {"NILM"}
    labels.write_text("slide,label,path\nghost,NILM,ghost.svs\n")
    assert run(["tile", "--labels", str(labels), "--store", str(tmp_path / "s2")]) == 2
    assert "do not exist: ghost" in capsys.readouterr().err


def test_real_svs_with_preview(tmp_path, capsys) -> None:
    """The tissue rule on a real H&E slide: the kept tiles hold the tissue the preview outlines, thin strands and
    edges included (every tile with 5% tissue is kept)."""
    from cytoretrieve.sources.slides.deposit import deposit_mask
    from cytoretrieve.sources.slides.reader import Slide

    svs = WSI / "CMU-1-Small-Region.svs"
    if not svs.is_file():
        pytest.skip(f"{svs} not found")
    store, preview = tmp_path / "store", tmp_path / "qc"
    argv = ["tile", str(svs), "--rule", "coverage", "--preview", str(preview), "--store", str(store)]
    assert run([*argv, "--json", str(tmp_path / "r.json")]) == 0
    rows = _tiles(store)
    assert 10 <= len(rows) <= 54  # 6 x 9 grid positions; the tissue covers about a third
    assert all(r["level"] == 0 and r["read_size"] == 320 and r["x"] % 320 == 0 and r["y"] % 320 == 0 for r in rows)
    assert all(r["coverage"] >= 0.05 for r in rows)
    with Slide(svs) as slide:
        mask = deposit_mask(slide)
    ys, xs = np.nonzero(mask.mask)  # the outlined tissue, as level-0 pixel centres
    x0, y0 = (xs + 0.5) * mask.downsample, (ys + 0.5) * mask.downsample
    on_grid = (x0 < 6 * 320) & (y0 < 9 * 320)  # whole tiles only: the slide's last 300 / 87 px carry none
    kept = {(r["x"], r["y"]) for r in rows}
    in_kept = np.array([((int(x) // 320) * 320, (int(y) // 320) * 320) in kept for x, y in zip(x0, y0)])
    assert in_kept[on_grid].mean() >= 0.99
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["slides"][0]["tiles"] == len(rows) and report["slides"][0]["deposit_mm2"] > 0.3
    assert report["slides"][0]["rule"] == "coverage" and report["slides"][0]["thresholds"]["min_coverage"] == 0.05
    png = Image.open(preview / "CMU-1-Small-Region.png").convert("RGB")
    pixels = np.asarray(png).reshape(-1, 3)
    assert png.width >= 800
    assert ((pixels == (0, 200, 0)).all(1)).sum() > 500  # the deposit outline
    assert ((pixels == (30, 90, 255)).all(1)).sum() > 500  # the kept tiles


def test_cells_rule_on_the_block_slide(slides, tmp_path) -> None:
    """The default rule keeps what holds cell-sized stain: the blocks and the blob, not the specks."""
    store = tmp_path / "store"
    assert run(["tile", str(slides["standard"]), "--store", str(store), "--json", str(tmp_path / "r.json")]) == 0
    rows = _tiles(store)
    assert {(r["x"], r["y"]) for r in rows} == CELL_TILES
    blob = next(r for r in rows if (r["x"], r["y"]) == BLOB_TILE)
    assert 0 < blob["coverage"] < 0.05  # the blob covers a small part of its tile
    meta = json.loads(open_tile_table(Store(store), "tiles").tbl.schema.metadata[META_KEY])
    assert meta["rule"] == "cells" and meta["min_foreground_um2"] == 100 and "min_coverage" not in meta
    assert meta["cells"]["detect_mpp"] == 4.0 and "deposit" not in meta
    result = json.loads((tmp_path / "r.json").read_text())["slides"][0]
    assert result["tiles"] == len(CELL_TILES) < result["region_tiles"] <= result["grid_tiles"]


@pytest.mark.parametrize(
    "command, expected",
    [
        (["tile"], ["--labels", "--store", "--table", "--mpp", "--objective", "--tile-size", "--stride", "--target-mpp",
                    "--rule", "--min-foreground-um2", "--min-coverage", "--deposit", "--preview", "--json", "cytology"]),
        (["split"], ["--labels", "--folds", "--seed", "--out", "--slides"]),
        (["annotations", "import"], ["--slide", "--table", "--cell-size", "--target-mpp", "--mpp"]),
    ],
)
def test_help(command, expected, capsys) -> None:
    assert run([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert all(word in out for word in expected)


def test_cli_import_loads_no_slide_library() -> None:
    import subprocess
    import sys

    code = "import sys, cytoretrieve.cli; print(','.join(m for m in ('openslide', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_tile_ids_parse_back() -> None:
    from cytoretrieve.ids import parse_tile_id, tile_id

    assert parse_tile_id(tile_id("case@7", 1280, -64, 640)) == ("case@7", 1280, -64, 640)
    assert parse_tile_id("carcinoma_in_situ/149143370.jpg") is None and parse_tile_id("a@1,2") is None
