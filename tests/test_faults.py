"""Nothing lost, nothing doubled, nothing cryptic: concurrent writers, kill -9 at every stage, a full disk,
compaction conflicts, readers beside a writer. Each case asserts the row count, unique ids, the exit code and the
one-line message. Small synthetic cells and resnet18 at 32 px keep them fast."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cytoretrieve.cli import run
from cytoretrieve.sources.cells.synthetic import make_cells
from cytoretrieve.store.tables import Store
from helpers.paths import MIL

EMBED = ["--backbone", "resnet18", "--weights", "random", "--image-size", "32", "--batch-size", "8",
         "--workers", "0", "--commit-rows", "16"]
TABLE = "cells_resnet18"


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    return make_cells(tmp_path_factory.mktemp("cells") / "cells", per_class=12, size=48)


def _n_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*.png"))


def _cli(*args: str, fault: str | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "CYTORETRIEVE_FAILPOINT": fault or ""}
    return subprocess.Popen([sys.executable, "-m", "cytoretrieve", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _embed(cells: Path, store: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    proc = _cli("embed", str(cells), *EMBED, "--table", TABLE, "--store", str(store), *extra, fault=fault)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _ids(store: Path, table: str = TABLE) -> list[str]:
    return Store(store).open(table).read(["id"]).column("id").to_pylist()


def _one_line(err: str) -> str:
    """The one error line of a failed command (progress bars share stderr; a traceback never does)."""
    lines = [line for line in err.splitlines() if line.startswith("cytoretrieve: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("wait", [None, "120"])
def test_two_concurrent_embeds_store_each_id_once(cells: Path, tmp_path: Path, wait: str | None) -> None:
    store = tmp_path / "s"
    extra = ["--wait", wait] if wait else []
    jobs = [_cli("embed", str(cells), *EMBED, "--table", TABLE, "--store", str(store), *extra) for _ in range(2)]
    done = [(job.returncode, err) for job in jobs for _, err in [job.communicate(timeout=300)]]
    ids = _ids(store)
    assert len(ids) == len(set(ids)) == _n_images(cells)
    assert all("Traceback" not in err for _, err in done)
    if wait:  # the second waits for the first, then finds every row stored
        assert [rc for rc, _ in done] == [0, 0], done
    else:  # whichever came second met the first one's lease: one line naming the holder, nothing written
        assert sorted(rc for rc, _ in done) in ([0, 0], [0, 2]), done
        for rc, err in done:
            if rc == 2:
                assert "another job is writing table" in _one_line(err) and "--wait" in err


@pytest.mark.parametrize("fault", ["commit:3", "compact", "compacted"])
def test_embed_killed_at_each_stage_resumes_with_every_row_once(cells: Path, tmp_path: Path, fault: str) -> None:
    store = tmp_path / "s"
    killed = _embed(cells, store, fault=fault)
    assert killed.returncode == -9
    assert Store(store).write_state(TABLE) == "interrupted"  # `tables` says so, until a rerun finishes the job
    table = Store(store).open(TABLE)  # the table opens at its last commit
    stored = table.count()
    assert (0 < stored < _n_images(cells)) if fault.startswith("commit") else stored == _n_images(cells)
    rerun = _embed(cells, store)  # the dead job's lease is stale: taken over
    assert rerun.returncode == 0, rerun.stderr
    assert Store(store).write_state(TABLE) == ""
    ids = _ids(store)
    assert len(ids) == len(set(ids)) == _n_images(cells)


def test_search_killed_while_caching_its_index_rebuilds_it(cells: Path, tmp_path: Path) -> None:
    store = tmp_path / "s"
    assert _embed(cells, store).returncode == 0
    row = _ids(store)[0]
    proc = _cli("search", "--id", row, "--table", TABLE, "--store", str(store), fault="index-written")
    proc.communicate(timeout=120)
    assert proc.returncode == -9
    proc = _cli("search", "--id", row, "--table", TABLE, "--store", str(store), "-k", "3")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
    meta = json.loads((store / f"{TABLE}.faiss.json").read_text())
    assert meta["rows"] == _n_images(cells) and not (store / f"{TABLE}.faiss.tmp").exists()


def test_tile_killed_after_a_slide_resumes_the_rest(tmp_path: Path) -> None:
    from helpers.synthetic_slides import write_standard_slide

    folder = tmp_path / "slides"
    folder.mkdir()
    slides = [write_standard_slide(folder / f"case-{i}.tiff") for i in range(3)]
    store = tmp_path / "s"
    proc = _cli("tile", str(folder), "--store", str(store), fault="slide:1")
    proc.communicate(timeout=300)
    assert proc.returncode == -9
    from cytoretrieve.store.tiles import open_tile_table

    first = open_tile_table(Store(store), "tiles").slide_counts()
    assert len(first) == 1
    proc = _cli("tile", str(folder), "--store", str(store))
    out, err = proc.communicate(timeout=300)
    assert "Traceback" not in err
    table = open_tile_table(Store(store), "tiles")
    again = table.slide_counts()
    assert set(first) < set(again) and again[next(iter(first))] == first[next(iter(first))]
    ids = table.read(["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) and len(again) == len(slides)


def test_a_full_disk_is_one_line_and_a_rerun_completes(cells: Path, tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root): the full-disk case is not exercised")
    try:
        store = mount / "s"
        full = _embed(cells, store, "--commit-rows", "8")
        assert full.returncode == 2, full.stderr
        line = _one_line(full.stderr)
        assert f"no space left on device while writing table {TABLE}" in line and "rows are stored" in line
        stored = int(re.search(r": (\d+) rows are stored", line).group(1))
        table = Store(store).open(TABLE)  # opens at its last commit
        assert table.count() == stored and len(set(_ids(store))) == stored
        moved = tmp_path / "big"
        shutil.copytree(store, moved)  # "free space": the same store on a disk with room
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    rerun = _embed(cells, moved)
    assert rerun.returncode == 0, rerun.stderr
    ids = _ids(moved)
    assert len(ids) == len(set(ids)) == _n_images(cells)


def test_compaction_that_keeps_conflicting_is_left_for_later(cells: Path, tmp_path: Path, monkeypatch,
                                                              capsys) -> None:
    import lancedb.table

    calls = {"n": 0}

    def conflicting(self, *a, **k):  # noqa: ANN001, ANN202
        calls["n"] += 1
        raise RuntimeError("lance error: Retryable commit conflict for version 7: This Rewrite transaction was "
                           "preempted by concurrent transaction Rewrite")

    monkeypatch.setattr(lancedb.table.LanceTable, "optimize", conflicting)
    monkeypatch.setattr("cytoretrieve.store.tables.time.sleep", lambda s: None)
    assert run(["embed", str(cells), *EMBED, "--table", TABLE, "--store", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert calls["n"] > 1 and "compaction left for the next job" in err and "Traceback" not in err
    assert len(_ids(tmp_path / "s")) == _n_images(cells)


def test_readers_keep_answering_while_an_embed_writes_and_compacts(cells: Path, tmp_path: Path) -> None:
    from cytoretrieve.queries.knn import classify_table
    from cytoretrieve.queries.search import search

    store = tmp_path / "s"
    sub = cells / "NILM" if (cells / "NILM").is_dir() else next(p for p in cells.iterdir() if p.is_dir())
    seed = tmp_path / "seed"
    shutil.copytree(sub, seed / sub.name)
    assert _embed(seed, store).returncode == 0  # a first table to read while the rest is written
    writer = _cli("embed", str(cells), *EMBED, "--table", TABLE, "--store", str(store), "--commit-rows", "8")
    failures: list[str] = []
    counts: list[int] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                db = Store(store)
                t = db.open(TABLE)
                counts.append(t.count())
                search(t, row_id=t.read(["id"]).column("id")[0].as_py(), k=3)
                db.describe()
                if t.count() >= 20:
                    classify_table(t, runs=1, ks=[1, 3])
            except Exception as e:  # noqa: BLE001 - the assertion lists them
                failures.append(f"{type(e).__name__}: {e}")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        writer.communicate(timeout=300)
    finally:
        stop.set()
        reader.join(timeout=60)
    assert writer.returncode == 0
    assert failures == [] and len(counts) > 3 and counts[-1] >= counts[0]


# ------------------------------------------------------------------------------------ messages a user sees


@pytest.mark.parametrize("args", [["tables"], ["classify", "--table", "t"], ["search", "--id", "x", "--table", "t"],
                                  ["embed", "{cells}", "--backbone", "resnet18", "--weights", "random"]])
def test_a_store_that_is_a_file_is_one_line(cells: Path, tmp_path: Path, args: list[str]) -> None:
    not_a_folder = tmp_path / "README.md"
    not_a_folder.write_text("# a file\n")
    proc = _cli(*[a.format(cells=cells) for a in args], "--store", str(not_a_folder))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err.startswith("cytoretrieve: error:") and "is a file, not a folder" in _one_line(err)


@pytest.mark.parametrize("command", [["embed", "{missing}", "--backbone", "resnet18", "--weights", "random",
                                      "--store", "{store}"],
                                     ["train", "--data", "{missing}", "--out", "{out}", "--store", "{store}"]])
def test_bad_paths_are_one_line_and_leave_nothing_behind(tmp_path: Path, command: list[str]) -> None:
    names = {"missing": str(tmp_path / "nope"), "store": str(tmp_path / "store"), "out": str(tmp_path / "run")}
    proc = _cli(*[a.format(**names) for a in command])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.startswith("cytoretrieve: error:"), err  # no blank line before it
    assert len(err.strip().splitlines()) == 1 and "nope" in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "run").exists()


def test_tables_and_dedupe_show_and_remove_duplicates(cells: Path, tmp_path: Path, capsys) -> None:
    store = tmp_path / "s"
    assert _embed(cells, store).returncode == 0
    t = Store(store).open(TABLE)
    t.add(t.read([c for c in t.tbl.schema.names]).slice(0, 5))  # a manual append of five stored rows
    assert run(["tables", "--store", str(store)]) == 0
    out = capsys.readouterr()
    assert "duplicated" in out.out and "dedupe" in out.err
    assert run(["classify", "--table", TABLE, "--store", str(store), "--runs", "1"]) == 2
    assert "5 duplicated row(s)" in _one_line(capsys.readouterr().err)
    assert run(["dedupe", "--table", TABLE, "--store", str(store)]) == 0
    assert "5 duplicated row(s) removed" in capsys.readouterr().out
    ids = _ids(store)
    assert len(ids) == len(set(ids)) == _n_images(cells)
    assert run(["classify", "--table", TABLE, "--store", str(store), "--runs", "1", "--k", "1-5"]) == 0


def test_score_out_killed_midway_is_completed_by_a_rerun(tmp_path: Path) -> None:
    from cytoretrieve.queries.mil.bags import bags_to_table, write_group_labels
    from cytoretrieve.sources.cohort.labels import read_labels
    from cytoretrieve.sources.cohort.split import make_split, write_split
    from experiments.mil_data import read_npz

    musk = MIL / "npz" / "musk1.npz"
    if not musk.exists():
        pytest.skip(f"MIL benchmarks not found at {musk}")
    bags = read_npz(musk)
    store = tmp_path / "store"
    bags_to_table(Store(store), "musk1", bags)
    labels = write_group_labels(bags, tmp_path / "musk1.csv")
    split, _ = make_split(read_labels(labels), folds=3, seed=0)
    write_split(split, tmp_path / "split.json")
    out = tmp_path / "out"
    args = ["score", "--tiles", "musk1", "--labels", str(labels), "--split", str(tmp_path / "split.json"),
            "--store", str(store), "--method", "mean", "--epochs", "2", "--out", str(out)]
    killed = _cli(*args, fault="score-output")
    killed.communicate(timeout=300)
    assert killed.returncode == -9 and not (out / "scores.csv").exists()
    rerun = _cli(*args)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "slide,binary,fold,score" and len(rows) == len(bags) + 1
    assert (out / "roc.png").stat().st_size > 0 and json.loads((out / "top_tiles.json").read_text())


def test_search_messages_a_user_sees(cells: Path, tmp_path: Path, capsys) -> None:
    store = tmp_path / "s"
    assert _embed(cells, store).returncode == 0
    row = _ids(store)[0]
    base = ["search", "--id", row, "--table", TABLE, "--store", str(store)]
    assert run([*base, "--where", "label = 'nothing-has-this-label'"]) == 0
    assert "match the filter: no hits" in capsys.readouterr().out
    assert run([*base, "-k", "0"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert run([*base, "--geojson", str(tmp_path / "missing" / "hits.geojson")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--geojson" in err and "does not exist" in err
    assert not (tmp_path / "missing").exists()
    assert run([*base, "-k", "3"]) == 0  # headers whole at 80 columns: label / group are not cut to "labe"
    out = capsys.readouterr().out
    assert "label" in out and "labe " not in out


@pytest.mark.parametrize("flag", ["--mpp", "--objective"])
def test_tile_refuses_a_non_positive_pixel_size_even_for_slides_that_have_one(tmp_path: Path, flag: str,
                                                                                capsys) -> None:
    from helpers.synthetic_slides import write_standard_slide  # its metadata holds a pixel size: the reader never asks

    slide = write_standard_slide(tmp_path / "standard.tiff")
    assert run(["tile", str(slide), "--store", str(tmp_path / "s"), flag, "-1"]) == 2
    assert f"{flag} must be positive" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "s").exists()
