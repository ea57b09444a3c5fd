"""The `lance` index kind (LanceDB's own vector index inside a table): same hits as exact search, appended rows
found before and after they are folded in, filters and deletes, `auto`'s choice of it, the CLI, and what it
refuses. Its S3 test with two readers is in test_s3.py."""

from __future__ import annotations

import numpy as np
import pytest

from cytoretrieve.errors import CytoError
from cytoretrieve.store import ann, lance_index
from cytoretrieve.store.ann import Where, l2_normalise
from cytoretrieve.store.index import forget_loaded, prewarm, table_index
from cytoretrieve.store.tables import Store, row_key

DIM = 32
ROWS = 3000


def clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(20, DIM))
    return (centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, DIM))).astype(np.float32)


@pytest.fixture
def table(tmp_path, monkeypatch):
    from cytoretrieve.queries import search

    monkeypatch.setattr(search, "SCALE_SAMPLE", 200)  # the similarity scale's queries: few, for speed
    forget_loaded()
    t = Store(tmp_path / "s").create_or_open("t", {"arch": "x", "fingerprint": "f" * 64, "dim": DIM}, {"name": "toy"})
    x = clustered(ROWS)
    t.add(t.make_rows([{"id": f"r{i}", "label": "AB"[i % 2]} for i in range(ROWS)], x))
    yield t, x
    forget_loaded()


def _exact(x: np.ndarray, queries: np.ndarray, k: int, keys: np.ndarray) -> np.ndarray:
    return keys[np.argsort(-(queries @ l2_normalise(x).T), axis=1, kind="stable")[:, :k]]


def _keys(n: int, prefix: str = "r") -> np.ndarray:
    return np.array([row_key(f"{prefix}{i}") for i in range(n)])


def test_same_hits_as_exact_search_and_recall_at_the_default_setting(table, monkeypatch) -> None:
    t, x = table
    index = table_index(t, "lance", rebuild=True)
    assert index.kind == "lance" and index.rows == ROWS and index.indexed == ROWS
    assert lance_index.vector_index(t).index_type == "IvfRq"
    q = l2_normalise(clustered(40, seed=5))
    truth = _exact(x, q, 10, _keys(ROWS))
    monkeypatch.setattr(lance_index, "NPROBES", lance_index.partitions(ROWS))  # every partition: exact after refine
    scores, found = index.search(q, 10)
    assert all(set(f) == set(t_) for f, t_ in zip(found, truth))
    np.testing.assert_allclose(scores[:, 0], (q @ l2_normalise(x).T).max(axis=1), atol=1e-5)  # cosine similarities
    monkeypatch.undo()
    _, found = index.search(q, 10)  # the shipped setting (NPROBES of sqrt(rows) partitions, refine)
    assert np.mean([len(set(f) & set(t_)) / 10 for f, t_ in zip(found, truth)]) >= 0.95


def test_appended_rows_are_found_before_and_after_they_are_folded_in(table, monkeypatch) -> None:
    from cytoretrieve.queries.search import search

    t, x = table
    table_index(t, "lance", rebuild=True)
    near = x[7] + 0.01 * np.random.default_rng(1).normal(size=(20, DIM)).astype(np.float32)
    t.add(t.make_rows([{"id": f"n{i}", "label": "C"} for i in range(20)], near))
    index = table_index(t)  # auto follows the index in the table
    assert index.kind == "lance" and index.rows == ROWS + 20 and index.indexed == ROWS  # 20 rows not folded in
    hits = {h.id for h in search(t, row_id="r7", k=10).hits}
    assert {f"n{i}" for i in range(20)} & hits  # searched flat beside the index (fast_search off)
    monkeypatch.setattr(lance_index, "FOLD_FRACTION", 0.001)  # now past the fold threshold: the next search folds
    forget_loaded()  # (a handle is kept per table version: a fresh process)
    t2 = Store(t.store.uri).open("t")
    folded = table_index(t2)
    assert folded.indexed == ROWS + 20 and lance_index.vector_index(t2).index_type == "IvfRq"
    assert hits == {h.id for h in search(Store(t.store.uri).open("t"), row_id="r7", k=10).hits}
    exact = _exact(np.concatenate([x, near]), l2_normalise(x[7:8]), 11, np.r_[_keys(ROWS), _keys(20, "n")])[0]
    assert len(set(exact) & {row_key(h) for h in hits} | {row_key("r7")}) >= 10


def test_filters_deletes_stored_vectors_and_prewarm(table) -> None:
    from cytoretrieve.queries.search import search

    t, x = table
    assert not prewarm(t)  # no index yet
    table_index(t, "lance", rebuild=True)
    assert prewarm(t)
    from cytoretrieve.views.web.service import Viewer

    assert Viewer(t.store).prewarm() == ["t"]  # what `serve` starts in the background
    only_a = search(t, row_id="r3", k=5, where="label = 'A'")
    assert len(only_a.hits) == 5 and all(h.label == "A" for h in only_a.hits)
    gone = [h.id for h in search(t, row_id="r3", k=3).hits]
    t.tbl.delete(f"id IN ({', '.join(repr(g) for g in gone)})")
    after = search(Store(t.store.uri).open("t"), row_id="r3", k=3)
    assert not set(gone) & {h.id for h in after.hits}
    index = table_index(Store(t.store.uri).open("t"))
    np.testing.assert_allclose(index.stored_vector(row_key("r9")), l2_normalise(x[9:10])[0], atol=1e-6)
    assert index.stored_vector(row_key("nope")) is None
    assert index.row_metadata([row_key("r9")])[row_key("r9")]["id"] == "r9"


def test_auto_picks_lance_on_object_storage_or_past_memory(monkeypatch) -> None:
    assert ann.auto_kind(1_500_000, 384) == "ivfpq"  # local, RAM unknown: FAISS as before
    assert ann.auto_kind(1_500_000, 384, Where(remote=True)) == "lance"
    assert ann.auto_kind(ann.AUTO_FLAT_MAX, 384, Where(remote=True)) == "flat"  # small: each reader's exact copy
    assert ann.auto_kind(10_000_000, 384, Where(memory=24 << 30)) == "ivfpq"  # ~8.7 GB of FAISS fits in 24 GiB
    assert ann.auto_kind(100_000_000, 384, Where(memory=24 << 30)) == "lance"
    assert Where.of("s3://bucket/x").remote and Where.of("gs://b/x").remote and not Where.of("/data/store").remote
    assert ann.index_kind("lance").engine == "lance" and not ann.index_kind("lance").gpu
    with pytest.raises(CytoError, match="indexes a table inside its store"):
        ann.build_index(np.eye(4, dtype=np.float32), "lance")


def test_auto_on_a_table_follows_the_engine_built_by_hand(table, monkeypatch, capsys) -> None:
    from cytoretrieve.cli import run

    t, _ = table
    uri = t.store.uri
    assert table_index(t).kind == "flat"  # 3,000 local rows: FAISS
    assert run(["index", "build", "--table", "t", "--store", uri, "--kind", "lance"]) == 0
    assert "index of t: lance, 3000 rows" in capsys.readouterr().out
    assert table_index(Store(uri).open("t")).kind == "lance"
    assert run(["index", "build", "--table", "t", "--store", uri, "--kind", "ivf"]) == 0
    forget_loaded()
    assert table_index(Store(uri).open("t")).kind == "ivf"  # a FAISS kind chosen by hand wins on this machine


def test_a_tiny_table_is_refused_by_hand_and_searched_flat_by_auto(tmp_path, monkeypatch) -> None:
    t = Store(tmp_path / "s").create_or_open("t", {"arch": "x", "fingerprint": "f" * 64, "dim": DIM}, {"name": "toy"})
    t.add(t.make_rows([{"id": f"r{i}"} for i in range(50)], clustered(50)))
    with pytest.raises(CytoError, match="needs at least 256"):
        table_index(t, "lance", rebuild=True)  # `index build --kind lance`
    monkeypatch.setattr(ann, "AUTO_FLAT_MAX", 10)
    monkeypatch.setattr(ann, "Where", type("Remote", (Where,), {"of": classmethod(lambda cls, uri: Where(True))}))
    forget_loaded()
    index = table_index(t)  # auto on "object storage": lance, no index under MIN_INDEXED_ROWS, searched flat
    assert index.kind == "lance" and index.indexed == 0 and lance_index.vector_index(t) is None
    q = l2_normalise(clustered(50)[:3])
    assert (index.search(q, 1)[1][:, 0] == _keys(3)).all()
