"""`cells` end to end: real Cervix93 and ISBI fields (grey PNGs with `mpp`) and a synthetic smear slide -> cell
tables of crops with measurements, resumable; the cell table embeds like a tile table and is searched; QuPath
cell objects out; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cytoretrieve.cli import run
from cytoretrieve.errors import CytoError
from cytoretrieve.jobs.cells import Source, expand_sources, find_cells_in, read_points
from cytoretrieve.sources.slides.cells import CellSpec
from cytoretrieve.store.tables import Store
from cytoretrieve.store.tiles import CELL_COLUMNS, open_tile_table
from helpers.paths import SHARED_DATA

CERVIX93 = SHARED_DATA / "cervix93"
ISBI = SHARED_DATA / "isbi2015_zstack"
MPP = 0.25  # Cervix93 / ISBI fields: 40x, no pixel size in the files (an estimate; see their SOURCE.md)
FIELDS = ("frame000", "frame004")  # training fields


@pytest.fixture(scope="module")
def cervix93() -> Path:
    if not (CERVIX93 / "EDF" / "frame000.png").is_file():
        pytest.skip(f"Cervix93 not found at {CERVIX93}")
    return CERVIX93


@pytest.fixture(scope="module")
def fields_store(cervix93: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, object]:
    tmp = tmp_path_factory.mktemp("cells")
    labels = tmp / "grades.csv"
    grade = {r.split(",")[0]: r.split(",")[1] for r in (cervix93 / "labels.csv").read_text().split()[1:]}
    labels.write_text("slide,label,binary\n" + "".join(f"{f},{grade[f]},{int(grade[f] != 'N')}\n" for f in FIELDS))
    points = tmp / "points.csv"
    lines = [r for r in (cervix93 / "points.csv").read_text().splitlines()[1:] if r.split(",")[0] in FIELDS]
    points.write_text("frame,x,y,frame_grade,set\n" + "\n".join(lines) + "\n")
    store = Store(tmp / "store")
    code = run(["cells", *(str(cervix93 / "EDF" / f"{f}.png") for f in FIELDS), "--mpp", str(MPP),
                "--table", "c93", "--store", str(store.uri), "--labels", str(labels), "--points", str(points),
                "--preview", str(tmp / "qc"), "--geojson", str(tmp / "qupath"), "--json", str(tmp / "cells.json")])
    assert code == 0
    return store, tmp


def test_fields_become_cell_rows_with_measurements(fields_store) -> None:
    store, tmp = fields_store
    table = open_tile_table(store, "c93")
    assert table.cells and table.meta["detector"]["name"] == "classic" and table.meta["crop_um"] == 48.0
    rows = table.rows()
    assert set(CELL_COLUMNS) <= set(rows[0])
    per_field = {f: [r for r in rows if r["slide"] == f] for f in FIELDS}
    assert all(len(v) >= 10 for v in per_field.values())
    for r in rows[:50]:
        nx, ny = (int(v) for v in r["id"].split("@")[1].split(","))
        assert (r["nucleus_x"], r["nucleus_y"]) == (nx, ny)
        assert r["x"] + r["extent"] // 2 == nx and r["tile_size"] == 128 and r["source"] == "cells"
        assert 5 < r["nucleus_area_um2"] < 800 and 0 <= r["confidence"] <= 1 and r["darkness"] > 0
        assert r["label"] in ("N", "L", "H") and r["binary"] in (0, 1) and r["tile"] is None and r["grey"]
    report = json.loads((tmp / "cells.json").read_text())
    assert {s["slide"] for s in report["slides"]} == set(FIELDS)
    assert all(s["kind"] == "field" and s["grey"] for s in report["slides"])
    e = report["evaluation"]
    assert e["tp"] + e["fn"] == sum(1 for r in (tmp / "points.csv").read_text().splitlines()[1:])
    assert e["recall"] > 0.3 and e["precision"] > 0.3  # the default detector on real smears; Cervix93 figures in BENCHMARKS.md
    preview = Image.open(tmp / "qc" / "frame000.png")
    assert preview.width >= 1000 and len({tuple(p) for p in np.asarray(preview.convert("RGB")).reshape(-1, 3)[::97].tolist()}) > 3


def test_rerun_adds_nothing(fields_store, cervix93: Path) -> None:
    store, _ = fields_store
    before = open_tile_table(store, "c93").count()
    report = find_cells_in(expand_sources([cervix93 / "EDF" / f"{f}.png" for f in FIELDS], mpp=MPP), store,
                           table="c93")
    assert [r.status for r in report.results] == ["done", "done"]
    assert open_tile_table(store, "c93").count() == before


def test_qupath_cell_objects(fields_store) -> None:
    _, tmp = fields_store
    features = json.loads((tmp / "qupath" / "frame000.geojson").read_text())["features"]
    props = features[0]["properties"]
    assert props["objectType"] == "cell" and props["nucleusGeometry"]["type"] == "Polygon"
    assert {"nucleus_area_um2", "confidence"} <= set(props["measurements"])
    ring = features[0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) > 10


def test_a_cell_table_embeds_and_is_searched_across_fields(fields_store) -> None:
    from cytoretrieve.jobs.embed import embed
    from cytoretrieve.models.backbones import load_backbone
    from cytoretrieve.queries.search import search

    store, _ = fields_store
    report = embed("c93", load_backbone("resnet18", "random", image_size=64), store, table="c93_r18", workers=0)
    table = store.open("c93_r18")
    assert report.added == open_tile_table(store, "c93").count() and not report.failed
    assert table.meta["dataset"]["layout"] == "cells" and "nucleus_area_um2" in table.columns
    query = table.vectors(["id"], where="slide = 'frame000'")[1].column("id")[0].as_py()
    hits = search(table, row_id=query, k=5, where="slide != 'frame000'")
    assert len(hits.hits) == 5 and all(h.slide == "frame004" for h in hits.hits)


def test_the_isbi_field_is_read_and_its_nuclei_found(tmp_path: Path) -> None:
    field = ISBI / "frame011.png"
    if not field.is_file():
        pytest.skip(f"ISBI field not found at {field}")
    mask, n = ndimage.label(np.asarray(Image.open(ISBI / "frame011_NUGT.png").convert("L")) > 0)
    truth = np.array(ndimage.center_of_mass(mask > 0, mask, range(1, n + 1)))[:, ::-1]
    report = find_cells_in([Source(field, MPP)], Store(tmp_path), table="isbi", points={"frame011": truth})
    assert report.results[0].status == "found" and report.results[0].grey
    assert report.evaluation["recall"] > 0.5


def test_a_smear_slide_is_searched_only_on_its_kept_tiles(tmp_path: Path) -> None:
    from cytoretrieve.sources.slides.synthetic_smears import HERLEV, write_smear

    if not HERLEV.is_dir():
        pytest.skip("the real crops the synthetic smear is made of are not here")
    smear = write_smear(tmp_path / "smear.tiff", "sparse", deposit_mm=0.6, margin_mm=0.1, seed=1)
    store = Store(tmp_path / "store")
    report = find_cells_in([Source(smear.path)], store, table="smear_cells", spec=CellSpec())
    result = report.results[0]
    assert result.kind == "slide" and result.tiles > 0 and result.cells > len(smear.centres) // 4
    rows = open_tile_table(store, "smear_cells").rows()
    tiles = {r["tile"] for r in rows}
    assert None not in tiles and len(tiles) <= result.tiles
    for r in rows:  # each nucleus lies in the tile it is said to lie in, and on a drawn cell
        tx, ty, ext = (int(v) for v in r["tile"].split("@")[1].split(","))
        assert tx <= r["nucleus_x"] < tx + ext and ty <= r["nucleus_y"] < ty + ext
    on_cells = np.mean([smear.cells[r["nucleus_y"], r["nucleus_x"]] for r in rows])
    assert on_cells > 0.9


def test_a_slide_shared_among_worker_processes_gives_the_same_cells(tmp_path: Path, monkeypatch) -> None:
    """Tiles (and then crops) in chunks over two worker processes: the same rows, focus scores included, in the
    same order as one process finds them."""
    from cytoretrieve.sources.slides import cells as cells_module
    from cytoretrieve.sources.slides.detectors import get_detector
    from cytoretrieve.sources.slides.synthetic_smears import HERLEV, write_smear

    if not HERLEV.is_dir():
        pytest.skip("the real crops the synthetic smear is made of are not here")
    smear = write_smear(tmp_path / "smear.tiff", "sparse", deposit_mm=0.6, margin_mm=0.1, seed=2)
    monkeypatch.setattr(cells_module, "CHUNK_TILES", 3)
    monkeypatch.setattr(cells_module, "CHUNK_CELLS", 7)
    monkeypatch.setattr(cells_module, "MIN_PARALLEL_TILES", 2)
    seen: list[tuple[int, int]] = []
    found = {w: cells_module.find_cells(smear.path, get_detector("classic"), table="t", workers=w,
                                        on_progress=(lambda d, n: seen.append((d, n))) if w == 2 else None)
             for w in (1, 2)}
    alone, shared = found[1], found[2]
    assert alone.result.tiles > 6 and len(alone.rows) > 10  # several chunks of each kind
    assert [r["id"] for r in shared.rows] == [r["id"] for r in alone.rows]
    assert shared.rows == alone.rows and shared.result.blurred == alone.result.blurred
    assert seen[0][0] == 3 and seen[-1] == (alone.result.tiles, alone.result.tiles)  # chunk by chunk: in workers


def test_bad_input_is_one_line(tmp_path: Path, capsys, cervix93: Path) -> None:
    field = cervix93 / "EDF" / "frame000.png"
    assert run(["cells", str(field), "--store", str(tmp_path / "s")]) == 2  # no pixel size for a plain PNG
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--mpp" in err
    assert run(["cells", str(tmp_path / "nothing.png"), "--mpp", "0.25", "--store", str(tmp_path / "s")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert run(["cells", str(field), "--mpp", "0.25", "--detector", "nope", "--store", str(tmp_path / "s")]) == 2
    assert "--detector" in capsys.readouterr().err
    with pytest.raises(CytoError, match="two sources share the id"):
        expand_sources([field, field], mpp=MPP)
    bad = tmp_path / "points.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(CytoError, match="slide"):
        read_points(bad)


def test_cells_train_then_find_with_the_trained_model(fields_store, cervix93: Path, capsys) -> None:
    """`cells train` learns from point annotations (a few steps here), writes a model file that records its
    training data, and `cells --detector FILE` uses it."""
    from cytoretrieve.sources.slides.detectors import get_detector

    _, tmp = fields_store
    model = tmp / "nuclei.pt"
    fields = [str(cervix93 / "EDF" / f"{f}.png") for f in FIELDS]
    code = run(["cells", "train", "--points", str(tmp / "points.csv"), "--images", fields[0], "--images", fields[1],
                "--mpp", str(MPP), "--steps", "20", "--out", str(model)])
    assert code == 0 and model.is_file() and model.stat().st_size < 8 << 20
    detector = get_detector(str(model))
    assert detector.name != "classic" and "frame000.png" in json.dumps(detector.settings, default=str) + json.dumps(
        getattr(detector, "record", {}), default=str)
    store = tmp / "store2"
    assert run(["cells", fields[0], "--mpp", str(MPP), "--detector", str(model), "--store", str(store),
                "--table", "learned"]) == 0
    assert open_tile_table(Store(store), "learned").meta["detector"]["name"] == detector.name


def _qupath_points(points: np.ndarray, **props: object) -> list[dict]:
    """QuPath's export of point annotations: one MultiPoint annotation per class (two classes here)."""
    half = len(points) // 2
    return [{"type": "Feature", "id": f"pts{i}", "geometry": {"type": "MultiPoint", "coordinates": part.tolist()},
             "properties": {"objectType": "annotation", "classification": {"name": cls, "color": [0, 0, 255]},
                            **props}}
            for i, (cls, part) in enumerate((("Nucleus", points[:half]), ("Other", points[half:])))]


def test_qupath_geojson_points_read_like_the_csv(fields_store, tmp_path: Path) -> None:
    """QuPath GeoJSON points (a file per image named after it, or one file whose features name their image) give
    the same points as the CSV; regions and other objects are left out and reported; no points is one error."""
    _, tmp = fields_store
    csv_points = read_points(tmp / "points.csv")
    folder = tmp_path / "qupath_points"
    folder.mkdir()
    region = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]},
              "properties": {"objectType": "annotation", "name": "area of interest"}}
    (folder / "frame000.geojson").write_text(json.dumps(
        {"type": "FeatureCollection", "features": [*_qupath_points(csv_points["frame000"]), region]}))
    (folder / "frame004.png.geojson").write_text(json.dumps(_qupath_points(csv_points["frame004"])))  # a bare list
    left_out: list[str] = []
    from_folder = read_points(folder, left_out)
    assert set(from_folder) == set(FIELDS) and len(left_out) == 1 and "area of interest" in left_out[0]
    for f in FIELDS:
        np.testing.assert_array_equal(from_folder[f], csv_points[f])
    combined = tmp_path / "all.geojson"
    combined.write_text(json.dumps({"type": "FeatureCollection", "features": [
        *_qupath_points(csv_points["frame000"], image="frame000.png"),
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10.0, 20.0]},
         "properties": {"objectType": "detection", "image": "frame004"}}]}))
    named = read_points(combined)
    np.testing.assert_array_equal(named["frame000"], csv_points["frame000"])
    assert named["frame004"].tolist() == [[10.0, 20.0]]
    empty = tmp_path / "regions.geojson"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": [region]}))
    with pytest.raises(CytoError, match="no point annotations"):
        read_points(empty)
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(CytoError, match="not JSON"):
        read_points(tmp_path / "bad.geojson")


def test_cells_train_and_evaluate_from_qupath_geojson_points(fields_store, cervix93: Path, tmp_path: Path,
                                                            capsys) -> None:
    """`cells train --points` and `cells --points` take QuPath GeoJSON exports: the model records the fields it
    was trained on, and the evaluation against GeoJSON points equals the one against the same points as CSV."""
    from cytoretrieve.sources.slides.detectors import get_detector

    store, tmp = fields_store
    csv_points = read_points(tmp / "points.csv")
    geo = tmp_path / "frame000.geojson"
    geo.write_text(json.dumps({"type": "FeatureCollection", "features": _qupath_points(csv_points["frame000"])}))
    model = tmp_path / "from_geojson.pt"
    fields = [str(cervix93 / "EDF" / f"{f}.png") for f in FIELDS]
    assert run(["cells", "train", "--points", str(geo), "--images", *fields[:1], "--images", fields[1],
                "--mpp", str(MPP), "--steps", "4", "--out", str(model)]) == 0
    record = get_detector(str(model)).record
    assert record["names"] == ["frame000.png"] and record["points"] == len(csv_points["frame000"])
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert run(["cells", fields[0], "--mpp", str(MPP), "--points", str(geo), "--store", str(tmp_path / "s"),
                "--table", "geo", "--no-focus", "--json", str(out)]) == 0
    from_geojson = json.loads(out.read_text())["evaluation"]
    from_csv = json.loads((tmp / "cells.json").read_text())["slides"][0]["evaluation"]
    assert from_geojson == from_csv and from_geojson["tp"] + from_geojson["fn"] == len(csv_points["frame000"])

