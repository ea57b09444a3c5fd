"""A table's labelled-vectors snapshot (`store/snapshot.py`, `queries/labelled_snapshot.py`): `classify` from it gives
exactly what it gives through LanceDB, under either label choice; a snapshot made stale by an append, a deletion, a
compaction, a new review or a table made again, a damaged or foreign one, and one of a table too large or holding
an id twice are never used; and `classify` through a snapshot does not import LanceDB."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.errors import CytoError
from cytoretrieve.queries import labelled_snapshot
from cytoretrieve.queries.knn import classify_table
from cytoretrieve.store import snapshot
from cytoretrieve.store.labels import LABELS_TABLE, LabelInput, record_labels
from cytoretrieve.store.tables import Store
from helpers.label_tables import DIM, TABLE, toy_store, toy_table

pytestmark = pytest.mark.usefixtures("faiss_one_thread")
KW = {"runs": 3, "ks": [1, 3, 5], "train_fraction": 0.6}


def _classified(table: object, labels: str = "stored") -> dict:
    return classify_table(table, labels=labels, **KW).to_dict()


def _append(uri: str, rows: int = 3) -> None:
    """Another writer appends `rows` new rows of class A to the toy table."""
    table = Store(uri).open(TABLE)
    records = [{"id": f"A/new{i}", "label": "A", "binary": 0} for i in range(rows)]
    table.add(table.make_rows(records, np.eye(DIM, dtype=np.float32)[:1].repeat(rows, axis=0)))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """The toy table (30 rows, 3 classes) with reviews: C/0-4 relabelled B, A/0 unsure, and its snapshot kept."""
    st = toy_store(tmp_path)
    record_labels(st, TABLE, [LabelInput(f"C/{i}", "B") for i in range(5)] + [LabelInput("A/0", "unsure")],
                  reviewer="ana")
    assert labelled_snapshot.keep(st.open(TABLE))
    return st


def test_the_snapshot_gives_the_same_classification_as_lancedb(store: Store) -> None:
    assert labelled_snapshot.LOG == LABELS_TABLE
    snap = labelled_snapshot.read(store.uri, TABLE)
    assert snap is not None and (snap.name, snap.rows.num_rows, snap.info["reviewed_rows"]) == (TABLE, 30, 6)
    table = store.open(TABLE)
    for labels in ("stored", "reviewed"):
        assert _classified(snap, labels) == _classified(table, labels)
    assert _classified(snap, "stored") != _classified(snap, "reviewed")  # the reviews do change the answer
    assert _classified(snap, "reviewed")["classes"] == ["A", "B", "C"]
    assert _classified(snap, "reviewed")["n_unlabelled"] == 1  # the unsure row, as through LanceDB
    assert (snap.meta, snap.fingerprint, snap.labels) == (table.meta, table.fingerprint, table.labels)
    with pytest.raises(CytoError, match="`labels` must be stored or reviewed, not 'mine'"):
        classify_table(snap, labels="mine", **KW)
    with pytest.raises(CytoError, match="`labels` must be stored or reviewed, not 'mine'"):
        classify_table(table, labels="mine", **KW)


@pytest.mark.parametrize("change", ["append", "delete", "review", "compact"])
def test_a_snapshot_of_an_older_version_is_never_used(store: Store, change: str) -> None:
    if change == "append":
        _append(store.uri)
    elif change == "delete":
        store.open(TABLE).tbl.delete("id = 'A/3'")
    elif change == "review":
        record_labels(store, TABLE, [LabelInput("B/1", "C")], reviewer="ben")
    else:  # two fragments compacted into one: the same rows, a new version
        _append(store.uri)
        assert labelled_snapshot.keep(store.open(TABLE))
        version = store.open(TABLE).version
        store.open(TABLE).tbl.optimize()
        assert store.open(TABLE).version > version
    assert labelled_snapshot.read(store.uri, TABLE) is None
    assert labelled_snapshot.keep(store.open(TABLE))  # read again through LanceDB: current once more
    snap = labelled_snapshot.read(store.uri, TABLE)
    assert snap is not None and _classified(snap, "reviewed") == _classified(store.open(TABLE), "reviewed")


def test_a_table_dropped_and_made_again_at_the_same_version_is_told_apart(store: Store) -> None:
    version = store.open(TABLE).version
    store.db.drop_table(TABLE)
    toy_table(Store(store.uri), seed=5)  # the same ids, other vectors, the same version number
    assert store.open(TABLE).version == version
    assert labelled_snapshot.read(store.uri, TABLE) is None


def test_a_handle_behind_another_writer_keeps_no_snapshot(store: Store) -> None:
    behind = store.open(TABLE)
    _append(store.uri)  # another writer commits: `behind` still holds 30 rows
    assert not labelled_snapshot.keep(behind)
    assert labelled_snapshot.read(store.uri, TABLE) is None


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign", "format"])
def test_a_damaged_or_foreign_snapshot_is_not_used(store: Store, damage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = snapshot.path(store.uri, TABLE)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not an arrow file")
    elif damage == "foreign":  # another table's snapshot under this name
        toy_table(Store(store.uri), "other_r18", per_class=3)
        assert labelled_snapshot.keep(store.open("other_r18"))
        shutil.copy(snapshot.path(store.uri, "other_r18"), path)
    else:  # written by another version of the code
        monkeypatch.setattr(snapshot, "FORMAT", snapshot.FORMAT + 1)
    assert labelled_snapshot.read(store.uri, TABLE) is None


def test_a_table_over_the_size_limit_keeps_none(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot, "MAX_BYTES", 30 * 8 * 4 - 1)
    assert not labelled_snapshot.keep(store.open(TABLE))
    assert not snapshot.path(store.uri, TABLE).exists()  # the old one is dropped, not left to go stale


def test_a_table_with_duplicated_ids_keeps_none(tmp_path: Path) -> None:
    st = toy_store(tmp_path)
    table = st.open(TABLE)
    table.add(table.read([c for c in table.columns]).slice(0, 2))  # two ids stored twice
    assert not labelled_snapshot.keep(st.open(TABLE))
    assert labelled_snapshot.read(st.uri, TABLE) is None


def test_remote_stores_and_missing_tables_have_no_snapshot(store: Store) -> None:
    assert labelled_snapshot.read("s3://bucket/store", TABLE) is None
    assert labelled_snapshot.read(store.uri, "no_such_table") is None


def _classify_in_subprocess(store: str, out: Path, *extra: str) -> bool:
    """`cytoretrieve classify` of the toy table in a fresh interpreter; whether it imported lancedb."""
    argv = ["classify", "--table", TABLE, "--store", store, "--k", "1,3", "--runs", "2", "--json", str(out), *extra]
    code = ("import sys, json; from cytoretrieve.cli import run; code = run(json.loads(sys.argv[1])); "
            "print('LANCEDB', 'lancedb' in sys.modules); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True,
                          check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return done.stdout.rpartition("LANCEDB ")[2].strip() == "True"


def test_classify_through_the_snapshot_imports_no_lancedb(tmp_path: Path) -> None:
    store = toy_store(tmp_path)
    assert _classify_in_subprocess(store.uri, tmp_path / "first.json", "--labels", "reviewed")  # writes it
    assert snapshot.path(store.uri, TABLE).exists()
    assert not _classify_in_subprocess(store.uri, tmp_path / "second.json", "--labels", "reviewed")
    assert (tmp_path / "first.json").read_text() == (tmp_path / "second.json").read_text()
    _append(store.uri, 20)  # appended: the snapshot is stale, LanceDB is read again
    assert _classify_in_subprocess(store.uri, tmp_path / "third.json", "--labels", "reviewed")
    assert json.loads((tmp_path / "third.json").read_text())["results"][0]["n_train"] > \
        json.loads((tmp_path / "first.json").read_text())["results"][0]["n_train"]


def test_embed_keeps_a_snapshot_so_the_first_classify_skips_lancedb(herlev_root: Path, tmp_path: Path) -> None:
    from helpers.herlev_subset import TABLE as HERLEV_TABLE
    from helpers.herlev_subset import herlev_store

    store = herlev_store(herlev_root, tmp_path, per_class=3)
    snap = labelled_snapshot.read(store.uri, HERLEV_TABLE)
    assert snap is not None  # written by `embed` after its rows were committed
    assert _classified(snap) == _classified(store.open(HERLEV_TABLE))
