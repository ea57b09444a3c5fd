"""`cytoretrieve split`: slide -> fold, stratified by label, deterministic, read back by `load_split`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cytoretrieve.cli import run
from cytoretrieve.errors import CytoError
from cytoretrieve.sources.cohort.labels import read_labels
from cytoretrieve.sources.cohort.split import load_split, make_split


def _labels(path: Path, n_pos: int = 8, n_neg: int = 12) -> Path:
    rows = [f"case-{i:03d}.svs,HSIL,1" for i in range(n_pos)] + [f"case-{i:03d},NILM,0" for i in range(n_pos, n_pos + n_neg)]
    path.write_text("slide,label,binary\n" + "\n".join(rows) + "\n")
    return path


def test_split_is_stratified_and_deterministic(tmp_path, capsys) -> None:
    labels = _labels(tmp_path / "slides.csv")
    out = tmp_path / "split.json"
    assert run(["split", "--labels", str(labels), "--folds", "4", "--seed", "3", "--out", str(out)]) == 0
    split = load_split(out)
    assert split.folds == 4 and split.seed == 3 and len(split.fold_of) == 20
    assert split.counts() == {f: {"HSIL": 2, "NILM": 3} for f in range(4)}
    assert split.label_of["case-000"] == "HSIL" and split.binary_of["case-019"] == 0
    for fold in range(4):
        test, train = split.test_slides(fold), split.train_slides(fold)
        assert not set(test) & set(train) and len(test) + len(train) == 20
    again, _ = make_split(read_labels(labels), folds=4, seed=3)
    assert again.fold_of == split.fold_of
    other, _ = make_split(read_labels(labels), folds=4, seed=4)
    assert other.fold_of != split.fold_of
    data = json.loads(out.read_text())
    assert data["kind"] == "cytoretrieve-split" and data["slides"][0]["slide"] == "case-000"
    with pytest.raises(CytoError, match="fold 4 does not exist"):
        split.test_slides(4)


def test_small_class_is_a_warning(tmp_path, capsys) -> None:
    labels = _labels(tmp_path / "slides.csv", n_pos=2, n_neg=10)
    assert run(["split", "--labels", str(labels), "--folds", "4", "--out", str(tmp_path / "s.json")]) == 0
    assert "label 'HSIL' has 2 slide(s), fewer than 4 folds" in capsys.readouterr().err


def test_bad_inputs_exit_2(tmp_path, capsys) -> None:
    labels = _labels(tmp_path / "slides.csv")
    slides_dir = tmp_path / "wsi"
    slides_dir.mkdir()
    (slides_dir / "case-000.svs").write_bytes(b"")
    (tmp_path / "paths.csv").write_text("slide,label,path\na,X,a.svs\nb,Y,b.svs\n")
    (tmp_path / "nolabel.csv").write_text("slide,label\na,X\nb,\nc,X\n")
    (tmp_path / "noheader.csv").write_text("a,X\nb,Y\n")
    cases = [
        (["--labels", str(labels), "--slides", str(slides_dir)], "not among the 1 given"),
        (["--labels", str(tmp_path / "paths.csv")], "whose files do not exist: a, b"),
        (["--labels", str(tmp_path / "nolabel.csv")], "have no label"),
        (["--labels", str(tmp_path / "noheader.csv")], "needs a header"),
        (["--labels", str(labels), "--folds", "30"], "20 slides cannot make 30 folds"),
        (["--labels", str(labels), "--folds", "1"], "at least 2"),
    ]
    for argv, message in cases:
        assert run(["split", *argv, "--out", str(tmp_path / "out.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
    assert not (tmp_path / "out.json").exists()
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(CytoError, match="not a cytoretrieve split"):
        load_split(tmp_path / "x.json")


def test_one_reader_for_every_split_format(tmp_path) -> None:
    labels = _labels(tmp_path / "slides.csv")
    made = tmp_path / "split.json"
    assert run(["split", "--labels", str(labels), "--folds", "3", "--out", str(made)]) == 0
    split = load_split(made)
    as_csv = tmp_path / "split.csv"
    as_csv.write_text("Slide,Fold,Label\n" + "".join(f"{s},{f},{split.label_of[s]}\n" for s, f in split.fold_of.items()))
    as_map = tmp_path / "map.json"
    as_map.write_text(json.dumps(split.fold_of))
    for path in (as_csv, as_map):
        simple = load_split(path)
        assert simple.fold_of == split.fold_of and simple.folds == 3
        assert simple.test_slides(1) == split.test_slides(1)
    assert load_split(as_csv).counts() == split.counts()  # labels read where the CSV has them
    assert sum(load_split(as_map).counts()[0].values()) == len(split.test_slides(0))
    for text, message in [("slide,fold\na,-1\n", "negative"), ("slide,fold\na,x\n", "not an integer"),
                          ("name,fold\na,0\n", "slide,fold"), ("slide,fold\n", "lists no slides")]:
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(CytoError, match=message):
            load_split(tmp_path / "bad.csv")
    (tmp_path / "list.json").write_text('{"folds": 2, "slides": []}')
    with pytest.raises(CytoError, match="not a cytoretrieve split"):
        load_split(tmp_path / "list.json")
    with pytest.raises(CytoError, match="no split file"):
        load_split(tmp_path / "missing.csv")
