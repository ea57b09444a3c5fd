"""A table's FAISS index: built per kind, the where-selector, caching keyed to the table version, side index and
folding (the kinds themselves and the generic toolkit: test_ann.py)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from cytoretrieve.store import ann
from cytoretrieve.store.ann import l2_normalise
from cytoretrieve.store.index import build, table_index
from cytoretrieve.store.tables import Store, row_key

DIM = 32


def clustered(n: int, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    return (centres[rng.integers(0, clusters, n)] + 0.1 * rng.normal(size=(n, DIM))).astype(np.float32)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_a_table_index_of_each_kind_finds_keys(kind: str) -> None:
    x = clustered(4000)
    keys = np.arange(4000, dtype=np.int64) * 7 - 1000  # ids are keys, not positions
    index, built = build(x, keys, kind)
    assert built == kind
    q = l2_normalise(x[:50])
    _, got = index.search(q, 10)
    truth = np.argsort(-(q @ l2_normalise(x).T), axis=1)[:, :10]
    recall = np.mean([len(set(g) & set(keys[t])) / 10 for g, t in zip(got, truth)])
    assert recall >= (1.0 if kind == "flat" else 0.9)
    assert (got[:, 0] == keys[:50]).mean() >= 0.9  # a stored vector finds itself


def _table(tmp_path, n: int = 300, spread: float = 0.0):
    store = Store(tmp_path / "s")
    t = store.create_or_open("t", {"arch": "x", "fingerprint": "f" * 64, "dim": DIM}, {"name": "toy"})
    x = clustered(n)
    x += spread * np.random.default_rng(9).normal(size=x.shape).astype(np.float32)
    rows = [{"id": f"r{i}", "label": "AB"[i % 2]} for i in range(n)]
    t.add(t.make_rows(rows, x))
    return t, x


def test_cached_per_version_and_rebuilt_when_stale(tmp_path) -> None:
    t, x = _table(tmp_path)
    first = table_index(t)
    index_file = tmp_path / "s" / "t.faiss"
    assert index_file.exists() and first.rows == 300
    mtime = index_file.stat().st_mtime_ns
    again = table_index(t)
    assert index_file.stat().st_mtime_ns == mtime and again.version == first.version
    t.add(t.make_rows([{"id": "new"}], x[:1] + 1))
    stale = table_index(t)
    assert stale.rows == 301 and stale.version > first.version


def test_where_selector_restricts_hits(tmp_path) -> None:
    t, x = _table(tmp_path)
    idx = table_index(t)
    allowed = np.array([row_key(f"r{i}") for i in range(0, 300, 2)])  # label A rows
    _, keys = idx.search(l2_normalise(x[1:2]), 20, allowed)
    assert set(keys[0]) <= set(allowed)
    assert row_key("r1") not in keys[0]


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_stored_vector_is_the_normalised_row(tmp_path, kind: str) -> None:
    x = clustered(2000)
    keys = np.array([row_key(f"r{i}") for i in range(2000)])
    index, _ = build(x, keys, kind)
    from cytoretrieve.store.index import TableIndex

    ti = TableIndex(index, kind, 1, 2000)
    np.testing.assert_allclose(ti.stored_vector(int(keys[7])), l2_normalise(x[7:8])[0], atol=1e-6)
    assert ti.stored_vector(12345) is None


def test_search_by_id_sees_rows_added_after_the_first_search(tmp_path) -> None:
    from cytoretrieve.queries.search import search

    t, x = _table(tmp_path)
    before = search(t, row_id="r0", k=5)
    assert before.hits and all(h.id != "r0" for h in before.hits)
    scores = l2_normalise(x) @ l2_normalise(x[:1])[0]
    expected = [f"r{i}" for i in np.argsort(-scores)[1:6]]
    assert [h.id for h in before.hits] == expected
    t.add(t.make_rows([{"id": "twin", "label": "B"}], x[:1] * 2))  # same direction as r0: the nearest hit
    after = search(t, row_id="r0", k=5)
    assert after.hits[0].id == "twin" and after.hits[0].label == "B"


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_appends_and_deletes_update_the_cached_index_like_a_fresh_build(tmp_path, kind: str) -> None:
    from cytoretrieve.store import index as index_module

    t, x = _table(tmp_path, n=4000)
    first = table_index(t, kind)
    more = clustered(300, seed=1)
    t.add(t.make_rows([{"id": f"n{i}"} for i in range(300)], more))
    t.tbl.delete("id IN ('r1', 'r2', 'r3')")
    index_module.forget_loaded()
    updated = table_index(t, kind)
    assert updated.version > first.version and updated.rows == 4000 + 300 - 3
    meta = json.loads((tmp_path / "s" / "t.faiss.json").read_text())
    # updated in place, the quantiser not retrained (ivfpq cannot remove rows: the deletes made it rebuild)
    assert meta["trained_rows"] == (4297 if kind == "ivfpq" else 4000)
    fresh = table_index(t, kind, rebuild=True)
    q = l2_normalise(np.concatenate([x[:20], more[:20]]))
    _, got = updated.search(q, 10)
    _, want = fresh.search(q, 10)
    assert (got == want).mean() >= (1.0 if kind == "flat" else 0.97)
    gone = {row_key(f"r{i}") for i in (1, 2, 3)}
    assert not gone & set(got.ravel().tolist())


def test_an_ivf_index_is_retrained_once_the_table_doubles(tmp_path) -> None:
    t, x = _table(tmp_path, n=2000)
    table_index(t, "ivf")
    t.add(t.make_rows([{"id": f"n{i}"} for i in range(2500)], clustered(2500, seed=2)))
    table_index(t, "ivf")
    meta = json.loads((tmp_path / "s" / "t.faiss.json").read_text())
    assert meta["rows"] == 4500 and meta["trained_rows"] == 4500


@pytest.mark.parametrize("damage", ["truncated", "garbage-json", "foreign", "json-for-another-file"])
def test_a_damaged_cache_is_rebuilt_with_one_warning(tmp_path, damage: str, caplog) -> None:
    from cytoretrieve.store import index as index_module

    t, x = _table(tmp_path)
    table_index(t)
    index_file, meta_file = tmp_path / "s" / "t.faiss", tmp_path / "s" / "t.faiss.json"
    if damage == "truncated":
        index_file.write_bytes(index_file.read_bytes()[:100])
    elif damage == "garbage-json":
        meta_file.write_text("{not json")
    elif damage == "foreign":
        meta_file.write_text(meta_file.read_text().replace('"table": "t"', '"table": "other"'))
    else:  # a kill between the index and its .json: the .json describes the previous file
        index_file.write_bytes(index_file.read_bytes() + b"\0" * 16)
    index_module.forget_loaded()
    logger = logging.getLogger("cytoretrieve")
    logger.addHandler(caplog.handler)
    propagate, logger.propagate = logger.propagate, False  # each record once, whatever the CLI set before
    try:
        again = table_index(t)
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate
    assert again.rows == 300 and again.search(l2_normalise(x[:1]), 1)[1][0, 0] == row_key("r0")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "index cache of table t is damaged" in warnings[0]
    index_module.forget_loaded()
    caplog.clear()
    table_index(t)  # the rebuilt cache is trusted again: no second warning
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_table_index_built_auto_takes_the_kind_auto_picks(monkeypatch) -> None:
    from cytoretrieve.store import index as index_module

    assert build(clustered(500), np.arange(500), "auto")[1] == "flat"
    monkeypatch.setattr(ann, "AUTO_FLAT_MAX", 1000)
    monkeypatch.setattr(ann, "AUTO_COMPRESSED_VALUES", 2000 * DIM)
    assert build(clustered(1500), np.arange(1500), "auto")[1] == "ivf"
    assert build(clustered(3000), np.arange(3000), "auto")[1] == "ivfpq"
    assert index_module.table_nlist(1_500_000, 2048) == 512 and index_module.table_nlist(1_500_000, 384) == 1024


def test_compressed_table_index_is_streamed_mapped_filtered_and_updated(tmp_path) -> None:
    """ivfpq on a table: built from streamed batches, reloaded memory-mapped, a where-filter honoured, and an
    append after a mapped load updates the cache (FAISS would abort on adding to the mapped copy)."""
    from cytoretrieve.store import index as index_module

    t, x = _table(tmp_path, n=3000, spread=1.0)  # neighbourhoods that 4-bit PQ codes resolve
    built = table_index(t, "ivfpq")
    q = l2_normalise(x[:30])
    _, want = built.search(q, 10)
    index_module.forget_loaded()
    mapped = table_index(t, "ivfpq")
    _, got = mapped.search(q, 10)
    assert mapped.kind == "ivfpq" and (got == want).all()  # the mapped copy answers as the built one
    assert (got[:, 0] == [row_key(f"r{i}") for i in range(30)]).mean() >= 0.9  # a stored vector finds itself
    np.testing.assert_allclose(mapped.stored_vector(row_key("r5")), l2_normalise(x[5:6])[0], atol=1e-3)
    assert mapped.stored_vector(12345) is None
    allowed = np.array([row_key(f"r{i}") for i in range(0, 3000, 2)])
    _, keys = mapped.search(l2_normalise(x[1:2]), 20, allowed)
    assert set(keys[0]) <= set(allowed) and len(set(keys[0])) == 20
    t.add(t.make_rows([{"id": "twin"}], x[1:2] * 3))
    updated = table_index(t)  # auto follows the cached kind
    assert updated.kind == "ivfpq" and updated.rows == 3001
    assert updated.search(l2_normalise(x[1:2]), 2)[1][0].tolist() in ([row_key("r1"), row_key("twin")],
                                                                     [row_key("twin"), row_key("r1")])


def _side_meta(tmp_path) -> dict | None:
    path = tmp_path / "s" / "t.side.json"
    return json.loads(path.read_text()) if path.exists() else None


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_small_appends_go_to_a_side_index_that_answers_like_a_fresh_build(tmp_path, kind: str,
                                                                         monkeypatch) -> None:
    """Appended rows (under SIDE_FRACTION of the main index) go to a side index: the main file is not rewritten,
    a fresh process finds the side index, searches merge both as the main index with the rows folded in (same
    training) and as a fresh build answer, a deleted side row leaves it, and once the side outgrows its fraction
    it is folded into the main index."""
    from cytoretrieve.store import index as index_module

    t, x = _table(tmp_path, n=4000)
    table_index(t, kind)
    main_file = tmp_path / "s" / "t.faiss"
    stamp = main_file.stat().st_mtime_ns
    more = clustered(120, seed=1)
    t.add(t.make_rows([{"id": f"n{i}", "label": "C"} for i in range(120)], more))
    index_module.forget_loaded()
    updated = table_index(t, kind)
    assert main_file.stat().st_mtime_ns == stamp and _side_meta(tmp_path)["rows"] == 120
    assert updated.rows == 4120 and updated.side is not None
    index_module.forget_loaded()  # another process: the side index is read back from its files
    again = table_index(t, kind)
    assert again.side is not None and again.side.ntotal == 120 and again.version == t.version
    assert again.row_metadata([row_key("n7"), row_key("r3")]) == {
        row_key("n7"): {**dict.fromkeys(index_module.ROW_COLUMNS), "id": "n7", "label": "C"},
        row_key("r3"): {**dict.fromkeys(index_module.ROW_COLUMNS), "id": "r3", "label": "B"}}
    tol = 1e-6 if kind != "ivfpq" else 1e-3
    np.testing.assert_allclose(again.stored_vector(row_key("n7")), l2_normalise(more[7:8])[0], atol=tol)
    q = l2_normalise(np.concatenate([x[:20], more[:20]]))
    _, got = again.search(q, 10)
    allowed = np.array([row_key(f"n{i}") for i in range(0, 120, 2)] + [row_key(f"r{i}") for i in range(0, 4000, 2)])
    _, got_allowed = again.search(q, 10, allowed)
    assert set(got_allowed.ravel().tolist()) <= set(allowed.tolist())
    t.tbl.delete("id = 'n5'")  # a side row deleted: the side index is made again without it
    index_module.forget_loaded()
    after_delete = table_index(t, kind)
    assert after_delete.side.ntotal == 119 and main_file.stat().st_mtime_ns == stamp
    scores, got = after_delete.search(q, 10)
    assert row_key("n5") not in set(got.ravel().tolist())
    monkeypatch.setattr(index_module, "SIDE_FRACTION", 0.0)  # the same rows folded into the main index
    t.finish()  # compaction: a new table version with the same rows
    folded = table_index(t, kind)
    assert folded.side is None and _side_meta(tmp_path) is None and folded.rows == 4119
    folded_scores, folded_keys = folded.search(q, 10)
    if kind == "ivfpq":  # each part re-ranks its own short list: a superset of the folded index's candidates
        assert (scores >= folded_scores - 1e-6).all()
    else:
        assert (folded_keys == got).all()
    monkeypatch.undo()
    fresh_keys = table_index(t, kind, rebuild=True).search(q, 10)[1]  # retrained
    held = [i for i in range(120) if i != 5]
    keys = np.array([row_key(f"r{i}") for i in range(4000)] + [row_key(f"n{i}") for i in held])
    truth = keys[np.argsort(-(q @ l2_normalise(np.concatenate([x, more[held]])).T), axis=1)[:, :10]]
    recall = [np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]) for found in (got, fresh_keys)]
    floor = {"flat": 1.0, "ivf": 0.9, "ivfpq": 0.7}[kind]  # 4-bit PQ codes blur these tight clusters' near ties
    assert recall[0] >= recall[1] - 0.02 and recall[0] >= floor  # as good as a fresh build
    t.add(t.make_rows([{"id": f"m{i}"} for i in range(300)], clustered(300, seed=4)))  # > 5% of the main rows
    grown = table_index(t, kind)
    assert grown.side is None and json.loads((tmp_path / "s" / "t.faiss.json").read_text())["rows"] == 4419


@pytest.mark.parametrize("damage", ["truncated", "other-rows"])
def test_a_damaged_side_index_is_rebuilt_never_served(tmp_path, damage: str, caplog) -> None:
    """A side file that does not match its .json, or a side index and rows file of different rows (as a kill
    between their renames could leave), is refused with one warning and made again from the table."""
    from cytoretrieve.store import index as index_module

    t, x = _table(tmp_path, n=2000)
    table_index(t, "ivf")
    t.add(t.make_rows([{"id": f"n{i}"} for i in range(50)], clustered(50, seed=5)))
    table_index(t, "ivf")
    side, side_rows = tmp_path / "s" / "t.side.faiss", tmp_path / "s" / "t.side.rows.arrow"
    if damage == "truncated":
        side.write_bytes(side.read_bytes()[:200])
    else:  # the rows file of another side index with the same number of rows
        saved = side_rows.read_bytes()
        t.tbl.delete("id = 'n1'")
        t.add(t.make_rows([{"id": "n1x"}], clustered(1, seed=6)))
        index_module.forget_loaded()
        table_index(t, "ivf")
        side_rows.write_bytes(saved)
    index_module.forget_loaded()
    caplog.set_level(logging.WARNING, logger="cytoretrieve")
    again = table_index(t, "ivf")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "side index of table t is damaged" in warnings[0]
    want = {row_key(f"n{i}") for i in range(50)} - ({row_key("n1")} if damage != "truncated" else set())
    want |= {row_key("n1x")} if damage != "truncated" else set()
    assert set(ann.index_keys(again.side).tolist()) == want
    assert again.search(l2_normalise(x[:1]), 1)[1][0, 0] == row_key("r0")


def test_row_map_find_gives_the_same_rows_for_many_keys_as_key_by_key() -> None:
    """Past `SORT_BEFORE_SEARCH` keys `RowMap.find` sorts them before its binary searches: same answer."""
    import pyarrow as pa

    from cytoretrieve.store.index import SORT_BEFORE_SEARCH, RowMap

    rng = np.random.default_rng(0)
    held = np.sort(rng.choice(10**9, 3 * SORT_BEFORE_SEARCH, replace=False)).astype(np.int64)
    rows = RowMap(pa.table({"key": held, "pos": np.arange(len(held), dtype=np.int64)}))
    wanted = rng.permutation(np.concatenate([held[::2], rng.integers(10**9, 2 * 10**9, SORT_BEFORE_SEARCH)]))
    found, at = rows.find(wanted)
    one = [rows.find(wanted[i:i + 1]) for i in range(len(wanted))]
    assert len(wanted) > SORT_BEFORE_SEARCH and found.sum() == len(held[::2])
    assert found.tolist() == [bool(f[0]) for f, _ in one]
    assert at.tolist() == [int(a[0]) for f, a in one if f[0]] and (held[at] == wanted[found]).all()
