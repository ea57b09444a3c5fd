"""FAISS indexes over a table: exact and approximate kinds, the where-selector, caching keyed to the table version."""

from __future__ import annotations

import numpy as np
import pytest

from cytoretrieve.store.index import build, table_index
from cytoretrieve.store.index import l2_normalise
from cytoretrieve.store.tables import Store, row_key

DIM = 32


def clustered(n: int, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    return (centres[rng.integers(0, clusters, n)] + 0.1 * rng.normal(size=(n, DIM))).astype(np.float32)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_kinds_agree_with_brute_force(kind: str) -> None:
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


def test_auto_is_flat_for_small_tables() -> None:
    _, kind = build(clustered(500), np.arange(500), "auto")
    assert kind == "flat"


def _table(tmp_path, n: int = 300):
    store = Store(tmp_path / "s")
    t = store.create_or_open("t", {"arch": "x", "fingerprint": "f" * 64, "dim": DIM}, {"name": "toy"})
    x = clustered(n)
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
