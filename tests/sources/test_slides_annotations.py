"""QuPath GeoJSON annotations -> labelled cell crops and centred tiles; outside-the-slide annotations reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.cli import run
from cytoretrieve.errors import CytoError
from cytoretrieve.sources.slides.annotations import pair_annotations, read_geojson
from cytoretrieve.sources.slides.reader import SlideReader
from cytoretrieve.store.tables import Store
from cytoretrieve.store.tiles import open_tile_table
from helpers.synthetic_slides import STAIN, slide_folder

FEATURES = [
    {"type": "Feature", "id": "p1", "geometry": {"type": "Point", "coordinates": [1600, 960]},
     "properties": {"objectType": "annotation", "classification": {"name": "HSIL", "color": [255, 0, 0]}}},
    {"type": "Feature", "id": "mp", "geometry": {"type": "MultiPoint", "coordinates": [[3520, 2240], [9000, 100]]},
     "properties": {"classification": {"name": "NILM"}}},
    {"type": "Feature", "id": "sq", "properties": {"classification": "LSIL"},
     "geometry": {"type": "Polygon", "coordinates": [[[2000, 700], [2400, 700], [2400, 900], [2000, 900], [2000, 700]]]}},
    {"type": "Feature", "id": "anon", "geometry": {"type": "Point", "coordinates": [10, 10]}, "properties": {}},
    {"type": "Feature", "id": "line", "geometry": {"type": "LineString", "coordinates": [[0, 0], [5, 5]]},
     "properties": {"classification": {"name": "X"}}},
]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    return slide_folder(tmp_path_factory.getbasetemp() / "slides")


@pytest.fixture()
def geojson(tmp_path) -> Path:
    path = tmp_path / "standard.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": FEATURES}))
    return path


def test_read_geojson(geojson, tmp_path) -> None:
    anns, problems = read_geojson(geojson)
    by_id = {a.id: a for a in anns}
    assert set(by_id) == {"p1", "mp#0", "mp#1", "sq"}
    assert (by_id["sq"].cx, by_id["sq"].cy, by_id["sq"].geometry) == (2200, 800, "polygon")
    assert by_id["p1"].label == "HSIL" and by_id["sq"].label == "LSIL"
    assert any("anon: no classification" in p for p in problems)
    assert any("LineString" in p for p in problems)
    (tmp_path / "list.geojson").write_text(json.dumps(FEATURES[:1]))  # a bare Feature list (older QuPath)
    assert [a.id for a in read_geojson(tmp_path / "list.geojson")[0]] == ["p1"]
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(CytoError, match="not JSON"):
        read_geojson(tmp_path / "bad.geojson")


def test_import_writes_labelled_crops_and_tiles(slides, geojson, tmp_path, capsys) -> None:
    store = tmp_path / "store"
    assert run(["annotations", "import", str(geojson), "--slide", str(slides["standard"]), "--store", str(store)]) == 0
    err = capsys.readouterr().err
    assert "mp#1 at (9000, 100) is outside the slide (5120 x 3840 px): not imported" in err
    cells = {r["annotation"]: r for r in open_tile_table(Store(store), "annotations_cells").rows()}
    tiles = {r["annotation"]: r for r in open_tile_table(Store(store), "annotations_tiles").rows()}
    assert set(cells) == set(tiles) == {"p1", "mp#0", "sq"}
    t = tiles["p1"]  # 320 px at 0.5 um/px = 640 level-0 px centred on (1600, 960), read at level 1
    assert (t["x"], t["y"], t["extent"], t["level"], t["read_size"], t["tile_size"]) == (1280, 640, 640, 1, 320, 320)
    assert t["label"] == "HSIL" and t["source"] == "annotation" and t["id"] == "standard@1280,640,640"
    assert {a: r["binary"] for a, r in cells.items()} == {"p1": 1, "mp#0": 0, "sq": 1}  # Bethesda by default
    c = cells["p1"]  # 128 px crop = 256 level-0 px
    assert (c["x"], c["y"], c["extent"], c["tile_size"]) == (1472, 832, 256, 128)
    sq = cells["sq"]  # 400 x 200 level-0 px polygon + 10% a side = 480 level-0 px = 240 px
    assert (sq["tile_size"], sq["extent"], sq["x"], sq["y"]) == (240, 480, 1960, 560)
    image = SlideReader().read_row(c)
    assert image.size == (128, 128) and tuple(np.asarray(image)[64, 64]) == STAIN
    # rerun: nothing new
    assert run(["annotations", "import", str(geojson), "--slide", str(slides["standard"]), "--store", str(store)]) == 0
    assert "done" in capsys.readouterr().out
    assert open_tile_table(Store(store), "annotations_tiles").count() == 3


def test_pairing_and_bad_inputs(slides, geojson, tmp_path, capsys) -> None:
    other = tmp_path / "empty.geojson"
    other.write_text(json.dumps([FEATURES[0]]))
    pairs = pair_annotations([geojson, other], [slides["standard"], slides["empty"]])
    assert {(s.name, g.name) for s, g in pairs} == {("standard.tiff", "standard.geojson"), ("empty.tiff", "empty.geojson")}
    with pytest.raises(CytoError, match="no slide 'empty'"):
        pair_annotations([geojson, other], [slides["standard"], slides["nompp"]])
    store = tmp_path / "store"
    bad = tmp_path / "bad.geojson"
    bad.write_text("[1, 2")
    assert run(["annotations", "import", str(bad), "--slide", str(slides["standard"]), "--store", str(store)]) == 2
    assert "not JSON" in capsys.readouterr().err
    assert run(["annotations", "import", str(geojson), "--slide", str(slides["truncated"]), "--store", str(store)]) == 2
    assert "truncated" in capsys.readouterr().err.splitlines()[-1]
    assert Store(store).table_names() == []


def test_import_label_map_sets_binary(slides, geojson, tmp_path) -> None:
    store = tmp_path / "store"
    (tmp_path / "map.csv").write_text("class,binary\nHSIL,1\nLSIL,\nNILM,0\n")
    assert run(["annotations", "import", str(geojson), "--slide", str(slides["standard"]), "--store", str(store),
                "--label-map", str(tmp_path / "map.csv")]) == 0
    cells = {r["annotation"]: r["binary"] for r in open_tile_table(Store(store), "annotations_cells").rows()}
    assert cells == {"p1": 1, "mp#0": 0, "sq": None}
