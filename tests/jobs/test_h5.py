"""CLAM / TRIDENT patch feature files in and out (`import h5`, `export h5`).

The files written here follow the writing code of the tools themselves (TRIDENT: `trident.IO.save_h5` as called
by `coords_to_h5` and `WSI.extract_features`; CLAM: `utils.file_utils.save_hdf5` from `extract_features_fp.py`
and `WholeSlideImage.process_contour`), and the exported files are read back with the tools' reading code
(`trident.IO.read_coords`, TRIDENT's slide-encoder reader, CLAM's `Generic_MIL_Dataset` h5 branch and
`Whole_Slide_Bag_FP`), replicated below with the same dataset names, attributes and dtypes.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from cytoretrieve.cli import run
from cytoretrieve.errors import CytoError
from cytoretrieve.jobs.export_h5 import export_h5
from cytoretrieve.jobs.import_h5 import import_h5
from cytoretrieve.store.tables import Store
from helpers.cli_lines import one_line_exit_2

DIM = 16
SIDE = 8  # patches per slide: SIDE x SIDE grid
POSITIVE = ("s00", "s01", "s02", "s03", "s04", "s05")
NEGATIVE = ("s06", "s07", "s08", "s09", "s10", "s11")


# --- the tools' own writers and readers, replicated --------------------------------------------------------


def trident_save_h5(path, assets, attributes, mode="w") -> None:
    """`trident.IO.save_h5`: resizable datasets chunked by one row, dict attributes as JSON, None as 'None'."""
    with h5py.File(path, mode) as file:
        for key, val in assets.items():
            dset = file.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                                       chunks=(1,) + val.shape[1:], dtype=val.dtype)
            dset[:] = val
            for attr_key, attr_val in (attributes or {}).get(key, {}).items():
                dset.attrs[attr_key] = json.dumps(attr_val) if isinstance(attr_val, dict) else (
                    "None" if attr_val is None else attr_val)


def clam_save_hdf5(path, asset_dict, attr_dict=None, mode="a", chunk_size=32) -> None:
    """`CLAM utils.file_utils.save_hdf5`: appendable datasets chunked by 32 rows."""
    with h5py.File(path, mode) as file:
        for key, val in asset_dict.items():
            if key not in file:
                dset = file.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                                           chunks=(chunk_size,) + val.shape[1:], dtype=val.dtype)
                dset[:] = val
                for attr_key, attr_val in (attr_dict or {}).get(key, {}).items():
                    dset.attrs[attr_key] = attr_val
            else:
                dset = file[key]
                dset.resize(len(dset) + val.shape[0], axis=0)
                dset[-val.shape[0]:] = val


def trident_read_coords(path):
    """`trident.IO.read_coords`, plus the check `WSI.extract_features` makes on the attributes it needs."""
    with h5py.File(path, "r") as f:
        attrs = dict(f["coords"].attrs)
        coords = f["coords"][:]
    if None in (attrs.get("patch_size"), attrs.get("level0_magnification"), attrs.get("target_magnification")):
        raise KeyError("Missing essential attributes in coords_attrs.")
    return attrs, coords


def trident_read_features(path):
    """What TRIDENT's slide encoders read from a patch feature file."""
    with h5py.File(path, "r") as f:
        return f["features"][:], f["coords"][:], dict(f["coords"].attrs), dict(f["features"].attrs)


def clam_read_bag(data_dir, slide_id):
    """`Generic_MIL_Dataset.__getitem__` with use_h5: h5_files/<slide>.h5 -> features, coords."""
    full_path = os.path.join(data_dir, "h5_files", f"{slide_id}.h5")
    with h5py.File(full_path, "r") as hdf5_file:
        return hdf5_file["features"][:], hdf5_file["coords"][:]


def clam_read_pt(data_dir, slide_id):
    """`Generic_MIL_Dataset.__getitem__` without h5 (CLAM's default for training): pt_files/<slide>.pt."""
    import torch

    full_path = os.path.join(data_dir, "pt_files", f"{slide_id}.pt")
    return torch.load(full_path)


def clam_read_patch_geometry(patches_file):
    """`Whole_Slide_Bag_FP.__init__` (and TRIDENT's `read_coords_legacy`): patch_level, patch_size, length."""
    with h5py.File(patches_file, "r") as f:
        dset = f["coords"]
        return int(f["coords"].attrs["patch_level"]), int(f["coords"].attrs["patch_size"]), len(dset), \
            f["coords"].attrs.get("custom_downsample", 1)


# --- synthetic cohorts -------------------------------------------------------------------------------------


def _slide_data(slide: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """SIDE x SIDE patches of 512 level-0 px; a positive slide has 6 patches pushed along one direction."""
    xs, ys = np.meshgrid(np.arange(SIDE) * 512 + 1000, np.arange(SIDE) * 512 + 2000)
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    feats = rng.normal(size=(len(coords), DIM)).astype(np.float32)
    if slide in POSITIVE:
        feats[rng.choice(len(coords), 6, replace=False), 0] += 6.0
    return feats, coords


def write_trident_folder(folder, rng, encoder="uni_v1", slides=POSITIVE + NEGATIVE):
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for slide in slides:
        feats, coords = _slide_data(slide, rng)
        coords_attrs = {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                        "target_magnification": 20, "overlap": 0, "name": slide, "savetodir": "job/patches",
                        "level0_width": 8000, "level0_height": 7000}
        trident_save_h5(folder / f"{slide}.h5", {"features": feats, "coords": coords},
                        {"features": {"name": slide, "savetodir": str(folder), "encoder": encoder},
                         "coords": coords_attrs})
        data[slide] = (feats, coords)
    return data


def write_clam_dirs(root, rng, slides=POSITIVE + NEGATIVE):
    """RESULTS_DIRECTORY/patches/<slide>.h5 (create_patches_fp) and FEATURES_DIRECTORY/h5_files/<slide>.h5."""
    (root / "patches").mkdir(parents=True)
    (root / "feats" / "h5_files").mkdir(parents=True)
    data = {}
    for slide in slides:
        feats, coords = _slide_data(slide, rng)
        attr = {"patch_size": 256, "patch_level": 1, "downsample": (2.0, 2.0), "downsampled_level_dim": (4000, 3500),
                "level_dim": (4000, 3500), "name": slide, "save_path": str(root / "patches")}
        clam_save_hdf5(root / "patches" / f"{slide}.h5", {"coords": coords}, {"coords": attr}, mode="w")
        for start in range(0, len(coords), 24):  # compute_w_loader: one append per batch, coords as int32
            clam_save_hdf5(root / "feats" / "h5_files" / f"{slide}.h5",
                           {"features": feats[start:start + 24], "coords": coords[start:start + 24].astype(np.int32)},
                           mode="w" if start == 0 else "a")
        data[slide] = (feats, coords)
    return data


def write_labels(path, slides=POSITIVE + NEGATIVE):
    path.write_text("slide,label,binary\n" + "".join(
        f"{s},{'HSIL' if s in POSITIVE else 'NILM'},{int(s in POSITIVE)}\n" for s in slides))
    return path


@pytest.fixture
def trident(tmp_path):
    rng = np.random.default_rng(0)
    data = write_trident_folder(tmp_path / "features_uni_v1", rng)
    return tmp_path / "features_uni_v1", data, write_labels(tmp_path / "slides.csv")


def _by_slide(table):
    vectors, meta = table.vectors(["id", "slide", "x", "y", "label", "binary"])
    out = {}
    for i, row in enumerate(meta.to_pylist()):
        out.setdefault(row["slide"], []).append((row, vectors[i]))
    return out


# --- import ------------------------------------------------------------------------------------------------


def test_trident_folder_becomes_a_table_with_every_patch(trident, tmp_path) -> None:
    folder, data, labels = trident
    store = Store(tmp_path / "store")
    report = import_h5(folder, store, "cohort_uni", labels=labels)
    assert (report.slides, report.rows, report.encoder, report.dim) == (12, 12 * SIDE * SIDE, "uni_v1", DIM)
    table = store.open("cohort_uni")
    assert table.meta["backbone"]["weights"] == "external" and table.meta["backbone"]["arch"] == "uni_v1"
    rows = _by_slide(table)
    for slide, (feats, coords) in data.items():
        got = rows[slide]
        np.testing.assert_array_equal(np.stack([v for _, v in got]), feats)
        np.testing.assert_array_equal(np.array([[r["x"], r["y"]] for r, _ in got]), coords)
        assert {r["label"] for r, _ in got} == {"HSIL" if slide in POSITIVE else "NILM"}
        assert got[0][0]["id"] == f"{slide}@{coords[0][0]},{coords[0][1]},512"
    again = import_h5(folder, store, "cohort_uni", labels=labels)  # a rerun skips what is there
    assert (again.slides, again.skipped, store.open("cohort_uni").count()) == (0, 12, 12 * SIDE * SIDE)


def test_imported_table_serves_classify_score_and_search_by_id(trident, tmp_path, capsys) -> None:
    from cytoretrieve.queries.knn import classify_table
    from cytoretrieve.queries.search import search
    from cytoretrieve.sources.cohort.labels import read_labels
    from cytoretrieve.sources.cohort.split import make_split, write_split

    folder, _, labels = trident
    store = Store(tmp_path / "store")
    assert run(["import", "h5", str(folder), "--table", "cohort_uni", "--labels", str(labels),
                "--store", store.uri]) == 0
    table = store.open("cohort_uni")
    result = classify_table(table, runs=2, ks=(5,))
    assert result.n_test > 0
    hit_table = search(table, row_id="s00@1000,2000,512", k=5)
    assert len(hit_table.hits) == 5 and all(h.slide for h in hit_table.hits)
    split, _ = make_split(read_labels(labels), folds=3, seed=0)
    write_split(split, tmp_path / "split.json")
    assert run(["score", "--tiles", "cohort_uni", "--labels", str(labels), "--split", str(tmp_path / "split.json"),
                "--store", store.uri, "--method", "max", "--epochs", "20", "--device", "cpu",
                "--json", str(tmp_path / "score.json")]) == 0
    scored = json.loads((tmp_path / "score.json").read_text())
    assert sorted(scored["slides"]) == sorted(POSITIVE + NEGATIVE)
    image = tmp_path / "query.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(image)
    capsys.readouterr()
    assert run(["search", str(image), "--table", "cohort_uni", "--store", store.uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "uni_v1" in err and "--id" in err


def test_clam_folders_import_with_their_patches_geometry(tmp_path) -> None:
    data = write_clam_dirs(tmp_path, np.random.default_rng(1))
    store = Store(tmp_path / "store")
    with pytest.raises(CytoError, match="names no encoder.*`encoder`"):
        import_h5(tmp_path / "feats", store, "clam_t", patches=tmp_path / "patches")
    with pytest.raises(CytoError, match="no patch geometry.*`patches`"):
        import_h5(tmp_path / "feats", store, "clam_t", encoder="resnet50_trunc")
    report = import_h5(tmp_path / "feats", store, "clam_t", encoder="resnet50_trunc", patches=tmp_path / "patches")
    assert report.rows == 12 * SIDE * SIDE
    rows = _by_slide(store.open("clam_t"))
    feats, coords = data["s03"]
    np.testing.assert_array_equal(np.stack([v for _, v in rows["s03"]]), feats)
    assert rows["s03"][0][0]["id"] == f"s03@{coords[0][0]},{coords[0][1]},512"  # 256 px at level 1, downsample 2
    level = store.open("clam_t").read(["level", "tile_size"]).to_pylist()[0]
    assert level == {"level": 1, "tile_size": 256}


# --- export ------------------------------------------------------------------------------------------------


def test_export_trident_is_read_by_tridents_readers_and_round_trips(trident, tmp_path) -> None:
    folder, data, labels = trident
    store = Store(tmp_path / "store")
    import_h5(folder, store, "cohort_uni", labels=labels)
    out = tmp_path / "out"
    assert run(["export", "h5", "--table", "cohort_uni", "--out", str(out), "--layout", "trident",
                "--store", store.uri]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.h5" for s in data)
    for slide, (feats, coords) in data.items():
        attrs, got_coords = trident_read_coords(out / f"{slide}.h5")
        got_feats, _, _, feat_attrs = trident_read_features(out / f"{slide}.h5")
        np.testing.assert_array_equal(got_feats, feats)
        np.testing.assert_array_equal(got_coords, coords)
        assert got_feats.dtype == np.float32 and got_coords.dtype == np.int64
        assert feat_attrs["encoder"] == "uni_v1" and feat_attrs["name"] == slide
        assert (attrs["patch_size"], attrs["patch_size_level0"], attrs["level0_magnification"],
                attrs["target_magnification"], attrs["overlap"]) == (256, 512, 40, 20, 0)
    # and back: the same vectors, coordinates and ids
    import_h5(out, store, "again", labels=labels)
    a, b = _by_slide(store.open("cohort_uni")), _by_slide(store.open("again"))
    for slide in data:
        assert [r for r, _ in a[slide]] == [r for r, _ in b[slide]]
        np.testing.assert_array_equal(np.stack([v for _, v in a[slide]]), np.stack([v for _, v in b[slide]]))


def test_export_clam_is_read_by_clams_readers_and_round_trips(tmp_path) -> None:
    data = write_clam_dirs(tmp_path / "src", np.random.default_rng(2))
    store = Store(tmp_path / "store")
    import_h5(tmp_path / "src" / "feats", store, "clam_t", encoder="resnet50_trunc", patches=tmp_path / "src" / "patches")
    out = tmp_path / "out"
    report = export_h5(store.open("clam_t"), out, layout="clam")
    assert report.slides == 12 and len(report.files) == 36
    for slide, (feats, coords) in data.items():
        got_feats, got_coords = clam_read_bag(out, slide)
        np.testing.assert_array_equal(got_feats, feats)
        np.testing.assert_array_equal(got_coords, coords)
        assert got_feats.dtype == np.float32 and got_coords.dtype == np.int32
        np.testing.assert_array_equal(clam_read_pt(out, slide).numpy(), feats)
        level, size, length, custom = clam_read_patch_geometry(out / "patches" / f"{slide}.h5")
        assert (level, size, length, custom) == (1, 256, SIDE * SIDE, 1)
    import_h5(out, store, "again", encoder="resnet50_trunc")  # the feature file's coords carry the geometry
    a, b = _by_slide(store.open("clam_t")), _by_slide(store.open("again"))
    assert {s: [r["id"] for r, _ in v] for s, v in a.items()} == {s: [r["id"] for r, _ in v] for s, v in b.items()}


def test_export_of_a_tiled_table_computes_tridents_magnifications(tmp_path) -> None:
    """A table made here (tile rows: tile_size, mpp, level, ids with their level-0 side) gets TRIDENT's
    magnification attributes from its pixel size: 320 px at 0.5 um/px from a 0.25 um/px slide = 20x from 40x."""
    store = Store(tmp_path / "store")
    table = store.create_or_open("tiles_x", {"arch": "resnet18", "fingerprint": "f" * 64, "dim": DIM}, {"name": "t"})
    rows = [{"id": f"a@{640 * i},0,640", "slide": "a", "x": 640 * i, "y": 0, "tile_size": 320, "mpp": 0.5, "level": 0}
            for i in range(5)]
    vectors = np.random.default_rng(3).normal(size=(5, DIM)).astype(np.float32)
    table.add(table.make_rows(rows, vectors))
    export_h5(table, tmp_path / "out", layout="trident")
    attrs, coords = trident_read_coords(tmp_path / "out" / "a.h5")
    assert (attrs["patch_size"], attrs["patch_size_level0"], attrs["level0_magnification"],
            attrs["target_magnification"]) == (320, 640, 40, 20)
    np.testing.assert_array_equal(coords[:, 0], [640 * i for i in range(5)])


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, message", [
    ("no_features", "has no 'features' dataset"),
    ("no_coords", "has no 'coords' dataset"),
    ("lengths", "'features' has 64 rows but 'coords' has 63"),
    ("nan", "3 of 64 patch vectors hold NaN or inf"),
    ("dims", "8-d features, but"),
    ("repeats", "2 patches repeat the coordinates of another"),
    ("encoder", "encoder 'conch_v1', but"),
])
def test_bad_feature_files_are_refused_with_one_line_and_nothing_written(trident, tmp_path, capsys, damage, message) -> None:
    folder, data, _ = trident
    target = folder / "s07.h5"
    feats, coords = data["s07"]
    if damage == "nan":
        feats = feats.copy()
        feats[[1, 5, 9], 2] = [np.nan, np.inf, -np.inf]
    if damage == "repeats":
        coords = coords.copy()
        coords[[3, 4]] = coords[0]
    assets = {"no_features": {"coords": coords}, "no_coords": {"features": feats},
              "lengths": {"features": feats, "coords": coords[:-1]},
              "dims": {"features": feats[:, :8], "coords": coords}}.get(damage, {"features": feats, "coords": coords})
    encoder = "conch_v1" if damage == "encoder" else "uni_v1"
    trident_save_h5(target, assets, {"features": {"encoder": encoder},
                                     "coords": {"patch_size": 256, "patch_size_level0": 512,
                                                "level0_magnification": 40, "target_magnification": 20}})
    store = tmp_path / "store"
    err = one_line_exit_2(["import", "h5", str(folder), "--table", "t", "--store", str(store)], capsys)
    assert message in err and ("s07.h5" in err)
    assert "t" not in Store(store).table_names()


def test_import_flags_in_messages_and_labels_for_unknown_slides(trident, tmp_path, capsys) -> None:
    folder, _, _ = trident
    store = str(tmp_path / "store")
    err = one_line_exit_2(["import", "h5", str(folder), "--table", "t", "--store", store, "--encoder", "virchow2"], capsys)
    assert "--encoder" in err and "uni_v1" in err
    labels = tmp_path / "extra.csv"
    labels.write_text("slide,label,binary\ns00,HSIL,1\nzz,NILM,0\n")
    err = one_line_exit_2(["import", "h5", str(folder), "--table", "t", "--store", store, "--labels", str(labels)], capsys)
    assert "--labels" in err and "zz" in err
    err = one_line_exit_2(["import", "h5", str(tmp_path / "nowhere"), "--table", "t", "--store", store], capsys)
    assert "nowhere" in err
    assert Store(store).table_names() == []


def test_export_refuses_to_overwrite_without_the_flag(trident, tmp_path, capsys) -> None:
    folder, _, _ = trident
    store = Store(tmp_path / "store")
    import_h5(folder, store, "t")
    out = tmp_path / "out"
    out.mkdir()
    (out / "s03.h5").write_bytes(b"someone else's file")
    err = one_line_exit_2(["export", "h5", "--table", "t", "--out", str(out), "--store", store.uri], capsys)
    assert "--overwrite" in err and "s03.h5" in err
    assert sorted(p.name for p in out.iterdir()) == ["s03.h5"]  # nothing written, the other file untouched
    assert run(["export", "h5", "--table", "t", "--out", str(out), "--store", store.uri, "--overwrite"]) == 0
    assert trident_read_coords(out / "s03.h5")[1].shape == (SIDE * SIDE, 2)
    assert not list(out.glob("*.partial"))


def test_export_needs_tile_rows(tmp_path, capsys) -> None:
    store = Store(tmp_path / "store")
    table = store.create_or_open("cells", {"arch": "resnet18", "fingerprint": "e" * 64, "dim": 4}, {"name": "c"})
    table.add(table.make_rows([{"id": f"c{i}", "label": "x"} for i in range(3)], np.ones((3, 4), np.float32)))
    err = one_line_exit_2(["export", "h5", "--table", "cells", "--out", str(tmp_path / "o"), "--store", store.uri], capsys)
    assert "no slide" in err and "tile rows" in err
    assert not (tmp_path / "o").exists()


def test_export_checkpoint_keeps_working_without_the_subcommand(capsys) -> None:
    assert run(["export", "--help"]) == 0
    out = capsys.readouterr().out
    assert "weights" in out and "h5" in out
    assert run(["export", "no-such-checkpoint.pth", "--out", "x.safetensors"]) == 2  # routed to `export weights`
    assert "no-such-checkpoint.pth" in capsys.readouterr().err


# --- QuPath out (score --out) ------------------------------------------------------------------------------


def test_score_out_writes_qupath_objects_that_read_back_the_same(trident, tmp_path) -> None:
    from cytoretrieve.sources.cohort.labels import read_labels
    from cytoretrieve.sources.cohort.split import make_split, write_split
    from cytoretrieve.sources.slides.annotations import read_geojson

    folder, data, labels = trident
    store = Store(tmp_path / "store")
    import_h5(folder, store, "cohort_uni", labels=labels)
    split, _ = make_split(read_labels(labels), folds=3, seed=0)
    write_split(split, tmp_path / "split.json")
    out = tmp_path / "scored"
    assert run(["score", "--tiles", "cohort_uni", "--labels", str(labels), "--split", str(tmp_path / "split.json"),
                "--store", store.uri, "--method", "retrieval", "--out", str(out), "--objects", "detection",
                "--json", str(tmp_path / "score.json")]) == 0
    files = sorted((out / "geojson").glob("*.geojson"))
    assert [f.stem for f in files] == sorted(data)
    for path in files:
        feats, coords = data[path.stem]
        doc = json.loads(path.read_text())
        assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(coords)
        by_name = {f["properties"]["name"]: f for f in doc["features"]}
        for x, y in coords[:5]:
            f = by_name[f"{path.stem}@{x},{y},512"]
            assert f["type"] == "Feature" and f["properties"]["objectType"] == "detection"
            assert f["geometry"]["coordinates"][0][0] == [x, y] and f["geometry"]["coordinates"][0][2] == [x + 512, y + 512]
            assert f["properties"]["classification"]["name"] in ("Positive", "Negative")
            assert set(f["properties"]["measurements"]) >= {"tile score", "slide score"}
        read, problems = read_geojson(path)  # what `annotations import` reads
        assert not problems and len(read) == len(coords)
        for a in read:
            f = by_name[a.id] if a.id in by_name else next(g for g in doc["features"] if g["id"] == a.id)
            x0, y0 = f["geometry"]["coordinates"][0][0]
            assert a.label == f["properties"]["classification"]["name"] and a.geometry == "polygon"
            assert a.bbox == (x0, y0, x0 + 512, y0 + 512) and (a.cx, a.cy) == pytest.approx((x0 + 256, y0 + 256))
    positives = [f for path in files for f in json.loads(path.read_text())["features"]
                 if f["properties"]["classification"]["name"] == "Positive"]
    assert positives  # the pushed patches of positive slides score above 0


def test_transfer_between_imports_of_one_encoder_and_not_across_encoders(tmp_path) -> None:
    from cytoretrieve.queries.transfer import transfer

    store = Store(tmp_path / "store")
    rng = np.random.default_rng(5)
    for name, encoder, slides in (("a", "uni_v1", POSITIVE[:3] + NEGATIVE[:3]), ("b", "uni_v1", POSITIVE[3:] + NEGATIVE[3:]),
                                  ("c", "conch_v1", POSITIVE[3:] + NEGATIVE[3:])):
        write_trident_folder(tmp_path / name, rng, encoder=encoder, slides=slides)
        import_h5(tmp_path / name, store, name, labels=write_labels(tmp_path / f"{name}.csv", slides))
    result = transfer([store.open("a")], store.open("b"), k=5)
    assert result.fingerprint == store.open("a").fingerprint == store.open("b").fingerprint
    with pytest.raises(CytoError, match="different backbones"):
        transfer([store.open("a")], store.open("c"), k=5)
    with pytest.raises(CytoError, match="uni_v1"):  # one table, one encoder: conch files are refused
        import_h5(tmp_path / "c", store, "a")


def test_an_export_that_fails_midway_leaves_nothing(trident, tmp_path, monkeypatch) -> None:
    import cytoretrieve.jobs.export_h5 as ex

    folder, _, _ = trident
    store = Store(tmp_path / "store")
    import_h5(folder, store, "t")
    real, calls = ex._write_block, []

    def failing(plan, vectors, xy):  # noqa: ANN001, ANN202 - the disk fills up after a few slides
        calls.append(plan.slide)
        if len(calls) == 3:
            raise OSError("No space left on device")
        real(plan, vectors, xy)

    monkeypatch.setattr(ex, "_write_block", failing)
    out = tmp_path / "new" / "clam_out"
    with pytest.raises(OSError, match="No space"):
        export_h5(store.open("t"), out, layout="clam")
    assert not (tmp_path / "new").exists()  # no partial files, no folders made for them


def test_slides_folder_gives_rows_their_slide_file_and_pixel_size(tmp_path) -> None:
    from helpers.synthetic_slides import write_standard_slide  # 0.25 um/px at level 0

    write_clam_dirs(tmp_path, np.random.default_rng(4), slides=("s00", "s06"))
    (tmp_path / "wsis").mkdir()
    slide = write_standard_slide(tmp_path / "wsis" / "s00.tiff")
    store = Store(tmp_path / "store")
    report = import_h5(tmp_path / "feats", store, "t", encoder="resnet50_trunc", patches=tmp_path / "patches",
                       slides=tmp_path / "wsis")
    rows = {r["slide"]: r for r in store.open("t").read(["slide", "path", "mpp"]).to_pylist()}
    assert rows["s00"]["path"] == str(slide.absolute()) and rows["s00"]["mpp"] == pytest.approx(0.5)  # 256 px, level-0 side 512
    assert rows["s06"]["path"] is None and rows["s06"]["mpp"] is None
    assert any("1 slide(s) have no slide file" in n for n in report.notes)
