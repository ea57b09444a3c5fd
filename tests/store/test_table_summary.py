"""A job's `Table.finish` keeps the table's line of `tables` (its summary, tied to the newest manifest) from the
table it already holds, without reopening it; a handle that another writer's commit has left behind never keys its
line to the newer manifest, and its `keep_summary` reads the newest version instead."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cytoretrieve.store.summary import read_summary, version_key
from cytoretrieve.store.tables import Store
from helpers.label_tables import TABLE, toy_store, toy_table


def test_finish_writes_the_summary_from_its_own_handle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = toy_store(tmp_path)
    table = store.open(TABLE)

    def reopened(*_: object) -> None:
        raise AssertionError("finish reopened the table to describe it")

    with monkeypatch.context() as m:
        m.setattr(Store, "describe_table", reopened)
        table.finish()
    saved = read_summary(Path(store.uri), TABLE)
    assert saved is not None and (saved.rows, saved.dim, saved.arch, saved.dataset) == (30, 8, "resnet18", "toy")
    assert saved == replace(Store(store.uri).describe_table(TABLE), state="")  # the line LanceDB gives, reopened


def test_a_handle_behind_another_writer_never_keys_its_line_to_the_newest(tmp_path: Path) -> None:
    store = toy_store(tmp_path)
    behind = store.open(TABLE)
    toy_table(Store(store.uri), per_class=11, seed=1)  # another writer appends 33 rows: `behind` still sees 30
    folder = Path(store.uri)
    key = version_key(folder, TABLE)
    assert key is not None and key["version"] > behind.version and behind.count() == 30

    assert behind.describe(key).rows == 30
    assert read_summary(folder, TABLE) is None  # its line is not the newest version's: not kept
    behind.keep_summary()
    saved = read_summary(folder, TABLE)
    assert saved is not None and (saved.rows, saved.duplicates) == (63, 30)  # reopened at the newest version
