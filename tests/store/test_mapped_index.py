"""Cached FAISS indexes read back memory-mapped (`store.index.MAPPED`) answer exactly as the same file read into
memory, for every FAISS kind of a table, and the `ivfpq8` layout (8-bit PQ lists, not fast-scan) is a table kind
like the others: built, mapped, filtered, appended to."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from cytoretrieve.store import ann
from cytoretrieve.store.ann import l2_normalise
from cytoretrieve.store.index import MAPPED, forget_loaded, table_index
from cytoretrieve.store.tables import Store, row_key

DIM = 32


def clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(20, DIM))
    return (centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, DIM))).astype(np.float32)


def test_the_installed_faiss_maps_index_files() -> None:
    assert hasattr(faiss, "IO_FLAG_MMAP_IFC") and MAPPED & faiss.IO_FLAG_MMAP_IFC
    assert MAPPED & faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "ivfpq8", "hnsw"])
def test_a_mapped_index_answers_as_the_one_read_into_memory(tmp_path, kind: str) -> None:
    forget_loaded()
    t = Store(tmp_path / "s").create_or_open("t", {"arch": "x", "fingerprint": "f" * 64, "dim": DIM}, {"name": "t"})
    x = clustered(6000)
    t.add(t.make_rows([{"id": f"r{i}", "label": "AB"[i % 2]} for i in range(6000)], x))
    built = table_index(t, kind, rebuild=True)
    path = str(tmp_path / "s" / "t.faiss")
    mapped, read = faiss.read_index(path, MAPPED), faiss.read_index(path)
    q = l2_normalise(clustered(50, seed=3))
    (ms, mk), (rs, rk) = ann.search(mapped, kind, q, 10), ann.search(read, kind, q, 10)
    np.testing.assert_array_equal(mk, rk)
    np.testing.assert_allclose(ms, rs, atol=1e-6)
    np.testing.assert_array_equal(built.search(q, 10)[1], rk)  # what the table's index (mapped) answers
    keys = np.array([row_key(f"r{i}") for i in range(6000)])
    truth = keys[np.argsort(-(q @ l2_normalise(x).T), axis=1)[:, :10]]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rk, truth)]) >= (1.0 if kind == "flat" else 0.5)  # sane
    forget_loaded()


def test_ivfpq8_is_a_table_kind_like_the_others(tmp_path) -> None:
    from cytoretrieve.queries.search import search

    forget_loaded()
    t = Store(tmp_path / "s").create_or_open("t", {"arch": "x", "fingerprint": "f" * 64, "dim": DIM}, {"name": "t"})
    x = clustered(6000)
    t.add(t.make_rows([{"id": f"r{i}", "label": "AB"[i % 2]} for i in range(6000)], x))
    assert table_index(t, "ivfpq8").kind == "ivfpq8"
    forget_loaded()
    assert table_index(Store(tmp_path / "s").open("t")).kind == "ivfpq8"  # auto follows the kind built by hand
    only_a = search(t, row_id="r3", k=5, where="label = 'A'")
    assert len(only_a.hits) == 5 and all(h.label == "A" for h in only_a.hits)
    t.add(t.make_rows([{"id": "new", "label": "B"}], x[3:4] * 1.0001))
    again = table_index(t)
    assert again.kind == "ivfpq8" and again.side is not None and again.rows == 6001
    assert search(t, row_id="r3", k=1).hits[0].id == "new"
    np.testing.assert_allclose(again.stored_vector(row_key("r9")), l2_normalise(x[9:10])[0], atol=1e-2)
    forget_loaded()
