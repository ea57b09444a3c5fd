"""Dataset readers: real Herlev and CRIC copies, synthetic Herlev-original / SIPaKMeD trees, manifests, label maps, errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cytoretrieve.cli.datasets import app
from cytoretrieve.errors import CytoError
from cytoretrieve.sources.cells import (
    HERLEV,
    IMAGE_SUFFIXES,
    SIPAKMED,
    CellDataset,
    CellRecord,
    LabelMap,
    load_label_map,
    mask_path,
    open_dataset,
)
from cytoretrieve.sources.cells.herlev import HERLEV_FOLDERS
from cytoretrieve.sources.cells.sipakmed import FOLDER_NAMES

HERLEV_COUNTS = {"NS": 74, "NI": 70, "NC": 98, "LD": 182, "MD": 146, "SD": 197, "CIS": 150}


def touch(path: Path, data: bytes = b"BM") -> Path:
    """Create a small file (readers only list files, they never decode them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- real data


def test_herlev_real_counts_and_binary(herlev_root: Path) -> None:
    ds = open_dataset(herlev_root)
    assert isinstance(ds, CellDataset)
    assert (ds.name, ds.layout, ds.root) == ("herlev", "herlev", herlev_root.resolve())
    assert ds.labels == HERLEV
    assert len(ds.records) == 917
    assert Counter(r.label for r in ds.records) == HERLEV_COUNTS
    assert Counter(r.binary for r in ds.records) == {1: 182 + 146 + 197 + 150, 0: 74 + 70 + 98}
    ids = [r.id for r in ds.records]
    assert len(set(ids)) == 917 and ids == sorted(ids)
    first = ds.records[0]
    assert first == CellRecord(
        "carcinoma_in_situ/149143370-149143378-001.jpg",
        str(herlev_root.resolve() / "carcinoma_in_situ" / "149143370-149143378-001.jpg"),
        "CIS",
        1,
        None,
    )
    assert all(Path(r.path).is_absolute() and r.id.endswith(".jpg") for r in ds.records)
    assert mask_path(first) is None  # the processed copy has no masks


def test_herlev_real_ids_stable(herlev_root: Path) -> None:
    assert open_dataset(herlev_root).records == open_dataset(herlev_root, layout="herlev").records


def test_cric_folders_get_the_bethesda_binary_mapping(cric_root: Path) -> None:
    ds = open_dataset(cric_root)
    assert (ds.layout, ds.name) == ("folders", "cric_crops_100px")
    assert len(ds.records) == 2121
    counts = Counter(r.label for r in ds.records)
    assert counts["Negative for intraepithelial lesion"] == 902 and counts["SCC"] == 43
    assert Counter(r.binary for r in ds.records) == {1: 2121 - 902, 0: 902}
    assert ds.labels is not None and ds.labels.name == "bethesda"
    assert any(r.id.startswith("Negative for intraepithelial lesion/") for r in ds.records)


def test_folders_with_other_class_names_stay_without_binary(tmp_path: Path) -> None:
    for cls in ("HSIL", "blood"):
        touch(tmp_path / "set" / cls / "a.bmp")
    ds = open_dataset(tmp_path / "set")
    assert ds.labels is not None and ds.labels.name != "bethesda" and {r.binary for r in ds.records} == {None}


def test_cric_with_label_map(cric_root: Path, tmp_path: Path) -> None:
    mapping = {"ASC-H": 1, "ASC-US": 1, "HSIL": 1, "LSIL": 1, "SCC": 1, "Negative for intraepithelial lesion": 0}
    lm = tmp_path / "cric.json"
    lm.write_text(json.dumps({"binary": mapping}))
    ds = open_dataset(cric_root, label_map=lm)
    assert Counter(r.binary for r in ds.records) == {1: 2121 - 902, 0: 902}
    assert ds.labels is not None and ds.labels.name == "cric.json"


# ---------------------------------------------------------------- Herlev original layout


@pytest.fixture
def herlev_original(tmp_path: Path) -> Path:
    """Herlev smear2005 shape: <class>/<stem>.BMP with <stem>-d.bmp masks, plus clutter that must be ignored."""
    root = tmp_path / "New database pictures"
    for i, folder in enumerate(HERLEV_FOLDERS):
        for j in range(2):
            touch(root / folder / f"15{i}-00{j}.BMP")
            touch(root / folder / f"15{i}-00{j}-d.bmp")
    touch(root / "normal_columnar" / "nomask-001.BMP")
    touch(root / "normal_columnar" / ".hidden.BMP")
    touch(root / ".cache" / "x.bmp")
    touch(root / "carcinoma_in_situ" / "Thumbs.db")
    touch(root / "manifest.csv", b"file,label\nnot/there.png,x\n")
    return root


def test_herlev_original_skips_masks(herlev_original: Path) -> None:
    ds = open_dataset(herlev_original)
    assert ds.layout == "herlev"
    assert len(ds.records) == 7 * 2 + 1
    assert not any(r.id.lower().endswith("-d.bmp") for r in ds.records)
    assert Counter(r.label for r in ds.records)["NC"] == 3
    cell = next(r for r in ds.records if r.id == "normal_columnar/152-000.BMP")
    assert mask_path(cell) == herlev_original / "normal_columnar" / "152-000-d.bmp"
    assert mask_path(cell.path) == mask_path(cell)
    assert mask_path(next(r for r in ds.records if "nomask" in r.id)) is None


def test_herlev_missing_class_warns_and_keeps_records(herlev_original: Path) -> None:
    for f in (herlev_original / "normal_intermediate").iterdir():
        f.unlink()
    (herlev_original / "normal_intermediate").rmdir()
    with pytest.warns(UserWarning, match="NI"):
        ds = open_dataset(herlev_original)
    assert ds.layout == "herlev" and len(ds.records) == 6 * 2 + 1 and "NI" not in {r.label for r in ds.records}


def test_herlev_label_map_overrides_binary(herlev_original: Path, tmp_path: Path) -> None:
    lm = tmp_path / "hsil.csv"
    lm.write_text("class,binary,name\nNS,0,\nNI,0,\nNC,0,\nLD,,low grade\nMD,1,\nSD,1,\nCIS,1,\n")
    ds = open_dataset(herlev_original, label_map=lm)
    assert ds.labels is not None and ds.labels.name == "hsil.csv"
    assert {r.binary for r in ds.records if r.label == "LD"} == {None}
    assert {r.binary for r in ds.records if r.label == "CIS"} == {1}
    assert ds.labels.long_name("LD") == "low grade"


def test_forced_herlev_on_other_folder(cric_root: Path) -> None:
    with pytest.raises(CytoError, match="no Herlev class folders"):
        open_dataset(cric_root, layout="herlev")


# ---------------------------------------------------------------- SIPaKMeD


def _sipakmed_class(folder: Path, n_images: int = 2, crops_per_image: int = 2) -> None:
    """One SIPaKMeD class folder: full images + .dat beside CROPPED, crops + .dat inside it."""
    for i in range(1, n_images + 1):
        touch(folder / f"{i:03d}.bmp")
        touch(folder / f"{i:03d}_cyt01.dat", b"1,2\n")
        for k in range(1, crops_per_image + 1):
            touch(folder / "CROPPED" / f"{i:03d}_{k:02d}.bmp")
            touch(folder / "CROPPED" / f"{i:03d}_{k:02d}_nuc01.dat", b"1,2\n")


@pytest.fixture
def sipakmed_single(tmp_path: Path) -> Path:
    root = tmp_path / "sipakmed"
    for name in FOLDER_NAMES:
        _sipakmed_class(root / name)
    return root


@pytest.fixture
def sipakmed_double(tmp_path: Path) -> Path:
    root = tmp_path / "sipakmed_kaggle"
    for name in FOLDER_NAMES:
        _sipakmed_class(root / name / name, n_images=1, crops_per_image=3)
    return root


def test_sipakmed_single_nesting(sipakmed_single: Path) -> None:
    ds = open_dataset(sipakmed_single)
    assert (ds.layout, ds.name, ds.labels) == ("sipakmed", "sipakmed", SIPAKMED)
    assert len(ds.records) == 5 * 2 * 2  # only the crops; full images and .dat files are not cells
    assert all("/CROPPED/" in r.id and r.id.endswith(".bmp") for r in ds.records)
    assert Counter(r.label for r in ds.records) == {c: 4 for c in ("SI", "P", "K", "D", "M")}
    by_label = {r.label: r.binary for r in ds.records}
    assert by_label == {"SI": 0, "P": 0, "K": 1, "D": 1, "M": None}
    rec = next(r for r in ds.records if r.id == "im_Dyskeratotic/CROPPED/002_01.bmp")
    assert (rec.label, rec.binary, rec.group) == ("D", 1, "im_Dyskeratotic/002")


def test_sipakmed_double_nesting(sipakmed_double: Path) -> None:
    ds = open_dataset(sipakmed_double)
    assert ds.layout == "sipakmed" and len(ds.records) == 5 * 3
    assert "im_Metaplastic/im_Metaplastic/CROPPED/001_03.bmp" in {r.id for r in ds.records}
    assert {r.label for r in ds.records if r.id.startswith("im_Koilocytotic/")} == {"K"}
    assert {r.binary for r in ds.records if r.label == "M"} == {None}


def test_sipakmed_full_images(sipakmed_single: Path) -> None:
    ds = open_dataset(sipakmed_single, layout="sipakmed-full")
    assert ds.layout == "sipakmed-full" and ds.name == "sipakmed"
    assert len(ds.records) == 5 * 2 and not any("CROPPED" in r.id for r in ds.records)
    assert {r.group for r in ds.records if r.label == "P"} == {"im_Parabasal/001", "im_Parabasal/002"}


def test_sipakmed_without_cropped_folders(tmp_path: Path) -> None:
    touch(tmp_path / "s" / "im_Parabasal" / "001.bmp")
    with pytest.raises(CytoError, match="no CROPPED folder in im_Parabasal"), pytest.warns(UserWarning, match="SI, K, D, M"):
        open_dataset(tmp_path / "s")


# ---------------------------------------------------------------- manifests


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Path:
    root = tmp_path / "my set"
    touch(root / "slides" / "s1" / "a.png")
    touch(root / "slides" / "s1" / "b.PNG")
    touch(root / "slides" / "s2" / "c.jpg")
    touch(tmp_path / "elsewhere" / "d.tif")
    return root


def test_manifest_relative_absolute_and_group(manifest_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "d.tif"
    csv_path = manifest_dir / "cells.csv"
    csv_path.write_text(
        "path,label,group\n"
        "slides/s1/b.PNG,HSIL,s1\n"
        "slides/s1/a.png,NILM,s1\n"
        f"{outside},HSIL,\n"
        "./slides/s2/c.jpg,,s2\n"
    )
    ds = open_dataset(csv_path)
    assert (ds.layout, ds.name, ds.root) == ("manifest", "cells", manifest_dir.resolve())
    assert [r.id for r in ds.records] == [outside.as_posix(), "slides/s1/a.png", "slides/s1/b.PNG", "slides/s2/c.jpg"]
    rec = {r.id: r for r in ds.records}
    assert rec["slides/s1/a.png"].group == "s1" and rec[outside.as_posix()].group is None
    assert rec["slides/s2/c.jpg"].label is None
    assert ds.labels is not None and ds.labels.classes == ("NILM", "HSIL")  # Bethesda names: order and binary
    assert rec["slides/s1/b.PNG"].binary == 1 and rec["slides/s1/a.png"].binary == 0


def test_manifest_file_column_and_label_maps(manifest_dir: Path, tmp_path: Path) -> None:
    csv_path = manifest_dir / "manifest.csv"
    csv_path.write_text("file,label\nslides/s1/a.png,NILM\nslides/s1/b.PNG,HSIL\nslides/s2/c.jpg,ASC-US\n")
    js = tmp_path / "lm.json"
    js.write_text(json.dumps({"classes": ["NILM", "ASC-US", "HSIL"], "binary": {"NILM": 0, "HSIL": 1, "ASC-US": None}}))
    cs = tmp_path / "lm.csv"
    cs.write_text("class,binary,name\nNILM,0,negative\nASC-US,null,\nHSIL,1,high grade\n")
    for lm in (js, cs):
        ds = open_dataset(manifest_dir, layout="manifest", label_map=lm)
        assert ds.name == "my_set"  # a manifest named manifest.csv takes its folder's name
        assert {r.label: r.binary for r in ds.records} == {"NILM": 0, "HSIL": 1, "ASC-US": None}
        assert ds.labels is not None and ds.labels.classes == ("NILM", "ASC-US", "HSIL")
    assert load_label_map(cs).names["HSIL"] == "high grade" and load_label_map(js).names["HSIL"] == "HSIL"


def test_manifest_folder_autodetected_when_nothing_else_matches(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    (tmp_path / "manifest.csv").write_text("path,label\na.jpg,x\nb.jpg,y\n")
    ds = open_dataset(tmp_path)
    assert ds.layout == "manifest" and [r.label for r in ds.records] == ["x", "y"]


def test_manifest_without_labels(manifest_dir: Path) -> None:
    csv_path = manifest_dir / "query.csv"
    csv_path.write_text("path\nslides/s1/a.png\n")
    ds = open_dataset(csv_path)
    assert ds.labels is None and ds.records[0].label is None


def test_manifest_missing_column(manifest_dir: Path) -> None:
    csv_path = manifest_dir / "bad.csv"
    csv_path.write_text("image,label\nslides/s1/a.png,x\n")
    with pytest.raises(CytoError, match=r"no 'path' \(or 'file'\) column; columns found: image, label"):
        open_dataset(csv_path)


def test_manifest_missing_files_listed_up_to_five(manifest_dir: Path) -> None:
    csv_path = manifest_dir / "bad.csv"
    rows = "".join(f"gone/{i}.png,x\n" for i in range(7))
    csv_path.write_text("path,label\nslides/s1/a.png,x\n" + rows)
    with pytest.raises(CytoError) as err:
        open_dataset(csv_path)
    msg = str(err.value)
    assert "7 rows point to missing files" in msg and "gone/4.png" in msg and "gone/5.png" not in msg
    assert "and 2 more" in msg and "\n" not in msg


def test_manifest_non_image_rows(manifest_dir: Path) -> None:
    touch(manifest_dir / "notes.txt")
    csv_path = manifest_dir / "bad.csv"
    csv_path.write_text("path,label\nnotes.txt,x\n")
    with pytest.raises(CytoError, match="not images"):
        open_dataset(csv_path)


def test_manifest_duplicate_ids(manifest_dir: Path) -> None:
    csv_path = manifest_dir / "dup.csv"
    csv_path.write_text("path,label\nslides/s1/a.png,x\n./slides/s1/a.png,y\n")
    with pytest.raises(CytoError, match="more than once: slides/s1/a.png"):
        open_dataset(csv_path)


def test_label_map_must_cover_labels(manifest_dir: Path, tmp_path: Path) -> None:
    csv_path = manifest_dir / "m.csv"
    csv_path.write_text("path,label\nslides/s1/a.png,NILM\nslides/s1/b.PNG,HSLI\n")
    lm = tmp_path / "lm.csv"
    lm.write_text("class,binary\nNILM,0\nHSIL,1\n")
    with pytest.raises(CytoError, match="no entry for HSLI"):
        open_dataset(csv_path, label_map=lm)


# ---------------------------------------------------------------- label maps


def test_label_map_round_trip() -> None:
    for lm in (HERLEV, SIPAKMED):
        d = json.loads(json.dumps(lm.to_dict()))
        assert LabelMap.from_dict(d) == lm
    assert SIPAKMED.binary_of("M") is None and SIPAKMED.binary_of("D") == 1 and HERLEV.binary_of(None) is None
    assert HERLEV.binary_of("unknown") is None and HERLEV.names["NS"] == "normal superficial"


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("broken.json", '{"binary": {"A": 1,', "not valid JSON"),
        ("bad_value.json", '{"binary": {"A": 2}}', "must be 1, 0 or null"),
        ("extra.json", '{"classes": ["A"], "binary": {"A": 1, "B": 0}}', "not in classes"),
        ("list.json", "[1, 2]", "must be a JSON object"),
        ("noheader.csv", "A,1\nB,0\n", "class,binary"),
        ("bad_cell.csv", "class,binary\nA,maybe\n", "row 2"),
        ("dup.csv", "class,binary\nA,1\nA,0\n", "twice"),
        ("map.yaml", "A: 1\n", ".json or .csv"),
    ],
)
def test_label_map_errors(tmp_path: Path, name: str, text: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CytoError, match=match):
        load_label_map(path)


def test_label_map_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CytoError, match="does not exist"):
        load_label_map(tmp_path / "nope.json")
    touch(tmp_path / "a" / "x.png")
    with pytest.raises(CytoError, match="nope.csv does not exist"):
        open_dataset(tmp_path, label_map=tmp_path / "nope.csv")


# ---------------------------------------------------------------- source errors


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(CytoError, match="does not exist"):
        open_dataset(tmp_path / "absent")


def test_empty_source_names_path_and_endings(tmp_path: Path) -> None:
    touch(tmp_path / "class_a" / "notes.txt")
    touch(tmp_path / "class_a" / ".hidden.png")
    with pytest.raises(CytoError) as err:
        open_dataset(tmp_path)
    msg = str(err.value)
    assert str(tmp_path.resolve()) in msg and all(s in msg for s in IMAGE_SUFFIXES)


def test_loose_images_are_an_unrecognised_layout(tmp_path: Path) -> None:
    touch(tmp_path / "a.png")
    touch(tmp_path / "b.jpg")
    with pytest.raises(CytoError) as err:
        open_dataset(tmp_path)
    msg = str(err.value)
    assert "unrecognised layout" in msg and "herlev, sipakmed, folders, manifest" in msg and "2 loose images" in msg


def test_wrapper_folder_points_to_nested_root(herlev_original: Path) -> None:
    with pytest.raises(CytoError, match="did you mean .*New database pictures \\(herlev layout\\)"):
        open_dataset(herlev_original.parent)


def test_bad_layout_and_file_sources(tmp_path: Path) -> None:
    touch(tmp_path / "a" / "x.png")
    with pytest.raises(CytoError, match="unknown layout 'tiles'"):
        open_dataset(tmp_path, layout="tiles")
    with pytest.raises(CytoError, match="is a file"):
        open_dataset(tmp_path / "a" / "x.png")
    (tmp_path / "m.csv").write_text("path,label\na/x.png,a\n")
    with pytest.raises(CytoError, match="needs a folder"):
        open_dataset(tmp_path / "m.csv", layout="herlev")
    with pytest.raises(CytoError, match="no manifest.csv"):
        open_dataset(tmp_path, layout="manifest")


def test_folders_loose_images_warn(tmp_path: Path) -> None:
    touch(tmp_path / "a" / "x.png")
    touch(tmp_path / "stray.png")
    with pytest.warns(UserWarning, match="1 images outside the class folders"):
        ds = open_dataset(tmp_path)
    assert [r.id for r in ds.records] == ["a/x.png"]


# ---------------------------------------------------------------- CLI


def test_cli_info_herlev(herlev_root: Path) -> None:
    result = CliRunner().invoke(app, ["info", str(herlev_root)])
    assert result.exit_code == 0, result.output
    assert "herlev" in result.output and "carcinoma in situ" in result.output
    assert "917" in result.output and "positive 675, negative 242, neither 0" in result.output


def test_cli_info_manifest_with_label_map(manifest_dir: Path, tmp_path: Path) -> None:
    csv_path = manifest_dir / "m.csv"
    csv_path.write_text("path,label,group\nslides/s1/a.png,NILM,s1\nslides/s2/c.jpg,HSIL,s2\n")
    lm = tmp_path / "lm.csv"
    lm.write_text("class,binary\nNILM,0\nHSIL,1\n")
    result = CliRunner().invoke(app, ["info", str(csv_path), "--label-map", str(lm)])
    assert result.exit_code == 0, result.output
    assert "manifest" in result.output and "positive 1, negative 1, neither 0" in result.output
    assert "groups:    2" in result.output


def test_cli_info_error_is_cytoerror(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["info", str(tmp_path / "absent")])
    assert isinstance(result.exception, CytoError)
