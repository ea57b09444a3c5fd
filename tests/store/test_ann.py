"""The FAISS toolkit: each registered kind against brute force, `auto`'s choice from the records, normalisation,
samples of chunked sets, and a kind added by one record (registered in this test only) that a table index built
by `index build` and `search` use end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cytoretrieve.errors import CytoError
from cytoretrieve.store import ann
from cytoretrieve.store.ann import INDEX_KINDS, IndexKind, build_index, l2_normalise
from cytoretrieve.store.tables import Store, row_key

DIM = 32


def clustered(n: int, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    return (centres[rng.integers(0, clusters, n)] + 0.1 * rng.normal(size=(n, DIM))).astype(np.float32)


def _recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth)]))


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw"])
def test_every_kind_agrees_with_brute_force(kind: str) -> None:
    x = clustered(4000) + np.random.default_rng(9).normal(size=(4000, DIM)).astype(np.float32)  # that 4-bit PQ resolves
    keys = np.arange(4000, dtype=np.int64) * 7 - 1000  # ids are keys, not positions
    q = l2_normalise(x[:50])
    truth = np.argsort(-(q @ l2_normalise(x).T), axis=1)[:, :10]
    floor = {"flat": 1.0, "ivf": 0.9, "ivfpq": 0.9, "hnsw": 0.9}[kind]
    by_position, info = build_index([x[:1500], x[1500:]], kind)  # chunks, ids = rows in chunk order
    assert info["kind"] == kind and info["rows"] == 4000 and by_position.ntotal == 4000
    assert _recall(by_position.search(q, 10)[1], truth) >= floor
    by_key, _ = build_index(x, kind, ids=keys)
    with ann.search_threads(kind, len(q)):
        _, got = ann.search(by_key, kind, q, 10)
    assert _recall(got, keys[truth]) >= floor
    assert (got[:, 0] == keys[:50]).mean() >= 0.9  # a stored vector finds itself
    allowed = keys[::2]
    _, only = ann.search(by_key, kind, q, 10, allowed)
    assert set(only.ravel().tolist()) <= set(allowed.tolist())
    row_of = {int(k): i for i, k in enumerate(keys)}.get
    np.testing.assert_allclose(ann.stored_vector(kind, by_key, int(keys[7]), row_of), l2_normalise(x[7:8])[0],
                               atol=1e-3)


def test_the_records_keep_each_kinds_behaviour() -> None:
    assert list(INDEX_KINDS)[:5] == ["flat", "ivf", "ivfpq", "ivfpq8", "hnsw"]
    assert [k for k in INDEX_KINDS if not INDEX_KINDS[k].removable] == ["ivfpq", "ivfpq8", "hnsw"]
    assert [k for k in INDEX_KINDS if INDEX_KINDS[k].retrain_growth] == ["ivf", "ivfpq", "ivfpq8"]
    assert [k for k in INDEX_KINDS if INDEX_KINDS[k].one_thread] == ["ivf", "ivfpq", "ivfpq8"]
    assert [k for k in INDEX_KINDS if INDEX_KINDS[k].gpu] == ["flat", "ivf"]
    assert {k: r.ids for k, r in INDEX_KINDS.items()} == {"flat": "map2", "ivf": "native", "ivfpq": "map",
                                                          "ivfpq8": "map", "hnsw": "map2", "lance": "native"}
    with pytest.raises(CytoError, match="unknown index kind 'nope'"):
        ann.index_kind("nope")
    with pytest.raises(ValueError, match="ids must be one of"):
        IndexKind("bad", "", ann._flat, ids="positions")


def test_only_kinds_that_move_go_to_the_gpu(monkeypatch) -> None:
    import faiss

    monkeypatch.setattr(ann, "gpu_available", lambda: True)  # a faiss-gpu build that sees a GPU, as far as to_gpu asks
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: None, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, device, index: ("gpu", index), raising=False)
    index = ann.flat_index(np.eye(4, dtype=np.float32))
    assert ann.to_gpu(index, "flat") == ("gpu", index) and ann.to_gpu(index, "ivf") == ("gpu", index)
    assert ann.to_gpu(index, "ivfpq") is index and ann.to_gpu(index, "hnsw") is index
    assert ann.to_gpu(None, "flat") is None


def test_auto_picks_from_the_records_by_rows_times_dimension(monkeypatch) -> None:
    assert ann.auto_kind(1_500_000, 384) == "ivfpq" and ann.auto_kind(1_500_000, 2048) == "ivfpq"
    assert ann.auto_kind(200_000, 2048) == "ivf" and ann.auto_kind(50_000, 2048) == "flat"
    assert ann.auto_kind(500, DIM) == "flat"
    monkeypatch.setattr(ann, "AUTO_FLAT_MAX", 1000)
    monkeypatch.setattr(ann, "AUTO_COMPRESSED_VALUES", 2000 * DIM)
    assert ann.auto_kind(1500, DIM) == "ivf" and ann.auto_kind(3000, DIM) == "ivfpq"
    monkeypatch.setitem(INDEX_KINDS, "ivfpq", IndexKind("ivfpq", "", ann._flat))  # no auto rule: never picked
    with pytest.raises(CytoError, match="no index kind suits"):
        ann.auto_kind(3000, DIM)


def test_normalise_exact_neighbours_and_samples() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(l2_normalise(x), [[0.6, 0.8], [0.0, 0.0]])  # zero rows stay zero
    assert l2_normalise(np.array([1.0, 0.0])).shape == (1, 2)
    refs = l2_normalise(clustered(200))
    sims, idx = ann.exact_neighbours(refs, refs[:5], 3)
    assert (idx[:, 0] == np.arange(5)).all() and np.allclose(sims[:, 0], 1.0, atol=1e-5)
    chunks = [np.full((n, 2), i, np.float32) + 1 for i, n in enumerate([5, 0, 7, 3])]
    sizes = ann.chunk_sizes(chunks)
    rows, positions = ann.sample_positions(chunks, sizes, 6, seed=1)
    assert sizes == [5, 0, 7, 3] and len(rows) == 6 and (np.diff(positions) > 0).all()
    owner = np.searchsorted(np.cumsum(sizes), positions, side="right")
    np.testing.assert_allclose(rows, l2_normalise(np.stack([chunks[i][0] for i in owner])))
    assert len(ann.sample_rows(chunks, sizes, 100, seed=1)) == 15  # all rows when asked for more
    picked = ann.ChunkRows(chunks, sizes, positions)
    assert picked.sizes() == [int((owner == i).sum()) for i in range(4)] and len(picked) == 4


# -- a kind added by one record ----------------------------------------------------------------------------------


def _toy_flat(dim: int, n: int, p: ann.IndexParams):  # noqa: ANN202
    import faiss

    return faiss.index_factory(dim, "Flat", faiss.METRIC_INNER_PRODUCT)


TOY = IndexKind("toy", "exact search in a plain IndexIDMap, rebuilt when rows are deleted", _toy_flat, ids="map",
                removable=False, gpu=False, auto_priority=-1, fits=lambda rows, dim: rows <= 1000)


def _table(tmp_path, n: int):  # noqa: ANN202
    store = Store(tmp_path / "s")
    t = store.create_or_open("t", {"arch": "x", "fingerprint": "f" * 64, "dim": DIM}, {"name": "toy"})
    x = clustered(n)
    t.add(t.make_rows([{"id": f"r{i}", "label": "AB"[i % 2]} for i in range(n)], x))
    return store, t, x


def test_a_kind_registered_by_one_record_serves_index_build_and_search(tmp_path, monkeypatch, capsys) -> None:
    """The toy kind, added to the registry only here, is built by `cytoretrieve index build --kind toy`, reloaded
    from the cache, and answers `search` (by id, and filtered) with the hits of exact search; appended rows go to
    its side index, a delete rebuilds it (not removable), and `auto` picks it by its own rule."""
    from cytoretrieve.cli import run
    from cytoretrieve.queries.search import search
    from cytoretrieve.store.index import forget_loaded, table_index

    monkeypatch.setitem(INDEX_KINDS, "toy", TOY)
    store, t, x = _table(tmp_path, 600)
    assert run(["index", "build", "--table", "t", "--store", store.uri, "--kind", "toy"]) == 0
    assert "index of t: toy, 600 rows" in capsys.readouterr().out
    meta = json.loads((tmp_path / "s" / "t.faiss.json").read_text())
    assert meta["kind"] == "toy" and not meta["auto"]
    forget_loaded()
    unit = l2_normalise(x)
    keys = np.array([row_key(f"r{i}") for i in range(600)])
    exact = np.argsort(-(unit @ unit[3]), kind="stable")
    found = search(t, row_id="r3", k=5)
    assert table_index(t).kind == "toy"
    assert [h.id for h in found.hits] == [f"r{i}" for i in exact[exact != 3][:5]]
    label_a = [i for i in exact if i % 2 == 0 and i != 3][:5]
    assert [h.id for h in search(t, row_id="r3", k=5, where="label = 'A'").hits] == [f"r{i}" for i in label_a]
    index = table_index(t)
    np.testing.assert_allclose(index.stored_vector(row_key("r9")), unit[9], atol=1e-6)  # key -> row: rows file

    more = clustered(20, seed=3)
    t.add(t.make_rows([{"id": f"n{i}", "label": "C"} for i in range(20)], more))
    appended = table_index(t)
    assert appended.kind == "toy" and appended.side is not None and appended.rows == 620
    both = l2_normalise(np.concatenate([x, more]))
    all_keys = np.concatenate([keys, [row_key(f"n{i}") for i in range(20)]])
    q = both[[0, 5, 605]]
    _, got = appended.search(q, 10)
    assert (got == all_keys[np.argsort(-(q @ both.T), axis=1, kind="stable")[:, :10]]).all()
    np.testing.assert_allclose(appended.stored_vector(row_key("n4")), both[604], atol=1e-6)

    trained = meta["build"]
    t.tbl.delete("id = 'r1'")  # a kind that cannot remove rows is rebuilt
    rebuilt = table_index(t, "toy")
    assert rebuilt.kind == "toy" and rebuilt.rows == 619 and rebuilt.side is None
    assert json.loads((tmp_path / "s" / "t.faiss.json").read_text())["build"] != trained
    assert row_key("r1") not in set(rebuilt.search(q, 10)[1].ravel().tolist())

    assert table_index(t, "auto", rebuild=True).kind == "toy"  # its auto rule: up to 1,000 rows, tried first
    assert run(["index", "build", "--table", "t", "--store", store.uri, "--kind", "nope"]) == 2
    assert "unknown index kind 'nope'" in capsys.readouterr().err


def test_reserve_sizes_the_refine_codes_once_and_changes_no_result() -> None:
    """`ann.reserve` gives an IndexRefine's re-ranking codes their final capacity before the adds (no doubling
    while both buffers are held); the index answers exactly as one built without it."""
    import faiss

    rng = np.random.default_rng(0)
    x = ann.l2_normalise(rng.normal(size=(3000, 32)).astype(np.float32))
    built = []
    for reserved in (False, True):
        index = faiss.index_factory(32, "IVF8,PQ8x4fs,Refine(SQfp16)", faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        if reserved:
            ann.reserve(index, len(x))
            codes = faiss.downcast_index(index.refine_index)
            assert codes.ntotal == 0 and codes.codes.size() == 0
        for b in range(0, len(x), 500):
            index.add(x[b:b + 500])
        built.append(index.search(x[:20], 5))
    assert np.array_equal(built[0][1], built[1][1]) and np.allclose(built[0][0], built[1][0])
    ann.reserve(faiss.IndexFlatIP(4), 10)  # other kinds: nothing to do
