"""Saved tile scores (`score --save-scores NAME`, `store/scores.py`) and `score --where`: a run's out-of-fold tile
scores kept in the store with their place on the slide, a name saved once (refused again without --overwrite,
replaced, never doubled, with --overwrite), a save killed before its run row invisible, and `--where` taking only
the rows it matches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.cli import run
from cytoretrieve.errors import CytoError
from cytoretrieve.ids import tile_id
from cytoretrieve.queries.mil.bags import write_group_labels
from cytoretrieve.sources.cohort.labels import read_labels
from cytoretrieve.sources.cohort.split import make_split, write_split
from cytoretrieve.store import scores
from cytoretrieve.store.tables import Store
from helpers.mil_synthetic import synthetic_bags

SIDE = 256


pytestmark = pytest.mark.usefixtures("faiss_one_thread")


@pytest.fixture
def cohort(tmp_path: Path):
    """16 synthetic slides whose tiles sit on a grid (ids `slide@x,y,256`), their labels and a 4-fold split."""
    bags, _ = synthetic_bags(16, shift=8.0, seed=3)
    store = Store(tmp_path / "store")
    table = store.create_or_open("tiles", {"arch": "test", "fingerprint": "f", "dim": bags.dim}, {"name": "tiles"})
    records, vectors = [], []
    for name, x in zip(bags.names, bags.vectors):
        for i, v in enumerate(x):
            px, py = (i % 4) * SIDE, (i // 4) * SIDE
            records.append({"id": tile_id(name, px, py, SIDE), "dataset": "tiles", "group": name, "slide": name,
                            "x": px, "y": py, "level": 0, "tile_size": SIDE, "mpp": 0.5})
            vectors.append(v)
    table.add(table.make_rows(records, np.stack(vectors)))
    table.finish()
    labels = write_group_labels(bags, tmp_path / "slides.csv")
    split, _ = make_split(read_labels(labels), folds=4)
    write_split(split, tmp_path / "split.json")
    base = ["score", "--tiles", "tiles", "--labels", str(labels), "--split", str(tmp_path / "split.json"),
            "--store", store.uri, "--method", "retrieval", "--neighbours", "3", "--top-m", "2"]
    return store, bags, base


def test_saved_scores_are_the_runs_tile_scores_placed_on_their_slides(cohort, tmp_path: Path, capsys) -> None:
    store, bags, base = cohort
    out = tmp_path / "out"
    assert run([*base, "--save-scores", "ret-1", "--out", str(out), "--n-top", "100"]) == 0
    assert "saved" in capsys.readouterr().out
    top = json.loads((out / "top_tiles.json").read_text())  # every tile's out-of-fold score, by id
    saved = scores.find_run(store, "ret-1")
    assert saved is not None and saved.method == "retrieval" and saved.table_name == "tiles"
    assert saved.tiles == bags.instances and saved.slides == len(bags) and saved.lo <= saved.hi
    assert saved.table_version == store.open("tiles").version
    slide = bags.names[1]
    run_, tiles = scores.run_tiles(store, "ret-1", slide)
    assert run_ == saved and tiles.num_rows == len(bags.vectors[1])
    rows = tiles.to_pylist()
    assert all(r["side"] == SIDE and r["x"] % SIDE == 0 and r["tile_id"].startswith(slide + "@") for r in rows)
    # the stored scores are the run's out-of-fold tile scores (retrieval: shown as they are), tile by tile
    got = {r["tile_id"]: r["score"] for r in rows}
    assert got == pytest.approx({t["id"]: t["score"] for t in top[slide]["top_tiles"]})
    assert [r["slide_score"] for r in rows] == pytest.approx([top[slide]["score"]] * len(rows))
    assert [(r.run, n) for r, n in scores.slide_runs(store, slide)] == [("ret-1", len(bags.vectors[1]))]
    assert scores.slide_runs(store, "no-such-slide") == []


def test_a_name_is_saved_once_unless_overwritten(cohort, capsys) -> None:
    store, bags, base = cohort
    assert run([*base, "--save-scores", "r"]) == 0
    first = scores.find_run(store, "r")
    capsys.readouterr()
    assert run([*base, "--save-scores", "r", "--method", "max"]) == 2  # refused before any work
    err = capsys.readouterr().err
    assert "already saved" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert scores.find_run(store, "r") == first
    assert run([*base, "--save-scores", "r", "--overwrite"]) == 0
    second = scores.find_run(store, "r")
    assert second.save != first.save
    slide = bags.names[0]
    assert len(scores.run_tiles(store, "r", slide)[1]) == len(bags.vectors[0])  # the new save only: never doubled
    assert [r.save for r, _ in scores.slide_runs(store, slide)] == [second.save]
    assert run([*base, "--overwrite"]) == 2 and "--save-scores" in capsys.readouterr().err
    assert run([*base, "--save-scores", "../bad name"]) == 2 and "not a run name" in capsys.readouterr().err
    with pytest.raises(CytoError, match="already saved"):  # the store refuses too (a race the CLI's check lost)
        scores.save_scores(store, "r", "tiles", 1, "retrieval", [{"slide": "s", "tile_id": "t", "score": 1.0}])


def test_a_save_killed_before_its_run_row_is_not_seen(cohort, monkeypatch) -> None:
    store, _, _ = cohort
    tiles = [{"slide": "s", "tile_id": f"t{i}", "x": i, "y": 0, "side": 1.0, "score": float(i)} for i in range(5)]

    def die(name: str) -> None:
        if name == "scores-commit":
            raise KeyboardInterrupt

    monkeypatch.setattr(scores, "failpoint", die)
    with pytest.raises(KeyboardInterrupt):
        scores.save_scores(store, "half", "tiles", 1, "mean", tiles)
    assert scores.find_run(store, "half") is None and scores.slide_runs(store, "s") == []
    monkeypatch.setattr(scores, "failpoint", lambda name: None)
    saved = scores.save_scores(store, "half", "tiles", 1, "mean", tiles)  # the name is free: saved whole, once
    assert scores.run_tiles(store, "half", "s")[1].num_rows == 5 and (saved.lo, saved.hi) == pytest.approx((0.04, 3.96))


def test_where_scores_only_the_rows_it_matches(cohort, tmp_path: Path, capsys) -> None:
    store, bags, base = cohort
    assert run([*base, "--where", "x < 512", "--json", str(tmp_path / "w.json"), "--save-scores", "left"]) == 0
    result = json.loads((tmp_path / "w.json").read_text())
    kept = sum(sum(1 for i in range(len(v)) if (i % 4) * SIDE < 512) for v in bags.vectors)
    assert kept < bags.instances and f"{kept} tiles of dimension" in capsys.readouterr().out
    assert result["config"]["where"] == "x < 512"
    assert scores.find_run(store, "left").tiles == kept
    assert all(r["x"] < 512 for r in scores.run_tiles(store, "left", bags.names[0])[1].to_pylist())
    assert run([*base, "--where", "no_such_column > 1"]) == 2
    err = capsys.readouterr().err
    assert "where" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert run([*base, "--where", f"slide != '{bags.names[0]}'"]) == 2  # a labelled slide left without rows
    assert "without rows matching --where" in capsys.readouterr().err


def test_writers_racing_for_one_name_save_it_once(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store = Store(tmp_path / "store")
    tiles = [{"slide": "s", "tile_id": f"t{i}", "x": i, "y": 0, "side": 1.0, "score": float(i)} for i in range(3)]

    def save(i: int) -> str:
        try:
            return scores.save_scores(store, "race", "tiles", i, "mean", tiles).save
        except CytoError:
            return ""

    with ThreadPoolExecutor(4) as pool:
        won = [s for s in pool.map(save, range(4)) if s]
    assert len(won) == 1 and scores.find_run(store, "race").save == won[0]
    assert scores.run_tiles(store, "race", "s")[1].num_rows == 3
