"""Slides like this slide: signatures per slide (mean, mosaic), cached per table version, the slide's own group
left out, and the mosaic telling apart slides whose populations differ but whose means agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.errors import CytoError
from cytoretrieve.queries import slides
from cytoretrieve.queries.slides import evaluate_slide_retrieval, similar_slides, slide_signatures
from cytoretrieve.store.tables import Store


def _cohort(store: Store, n: int = 24, seed: int = 0):
    """`n` slides of 60 tiles, each a mix of two cell populations: negatives of B1 and B2, positives of C1 and C2,
    placed so that B1 + B2 = C1 + C2: every slide has the same mean, only the populations differ. Two slides share
    each group (patient)."""
    rng = np.random.default_rng(seed)
    dim = 32
    u, v = rng.normal(size=dim), rng.normal(size=dim)
    modes = {"neg": (u, -u), "pos": (v, -v)}  # antipodal: after L2 normalisation too, every mean is ~0
    rows, vectors = [], []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        a, b = modes[label]
        x = np.concatenate([a + 0.3 * rng.normal(size=(30, dim)), b + 0.3 * rng.normal(size=(30, dim))])
        for t in range(60):
            rows.append({"id": f"s{i}@{t}", "slide": f"s{i}", "group": f"p{i // 2}", "label": label,
                         "binary": int(label == "pos")})
        vectors.append(x)
    table = store.create_or_open("cohort", {"arch": "x", "fingerprint": "c" * 64, "dim": dim}, {"name": "cohort"})
    table.add(table.make_rows(rows, np.concatenate(vectors).astype(np.float32)))
    return table


def test_mosaic_tells_apart_populations_that_share_a_mean(tmp_path: Path) -> None:
    table = _cohort(Store(tmp_path))
    mosaic = evaluate_slide_retrieval(slide_signatures(table, "mosaic"))
    mean = evaluate_slide_retrieval(slide_signatures(table, "mean"))
    assert mosaic.slides == mean.slides == 24
    assert mosaic.top1 > mean.top1 and mosaic.top1 >= 0.9


def test_mosaic_similarity_is_yottixels_rule_pair_by_pair() -> None:
    """The stacked computation gives, for every pair, 1 - the mean of both directions' median minimum distance."""
    rng = np.random.default_rng(3)

    def unit(n: int) -> np.ndarray:
        x = rng.normal(size=(n, 16)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def median_min(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.median(1.0 - (a @ b.T).max(axis=1)))

    queries, refs = [unit(n) for n in (1, 4, 7)], [unit(n) for n in (3, 1, 8, 2)]
    expected = [[1 - (median_min(q, r) + median_min(r, q)) / 2 for r in refs] for q in queries]
    np.testing.assert_allclose(slides._mosaic_similarity(queries, refs), expected, atol=1e-5)


def test_similar_slides_leave_out_the_own_group_and_cache(tmp_path: Path, monkeypatch) -> None:
    table = _cohort(Store(tmp_path))
    found = similar_slides(table, "s1", kind="mosaic", k=4)
    assert found.label == "pos" and len(found.hits) == 4
    assert all(h.slide not in ("s0", "s1") for h in found.hits)  # s0 shares s1's group p0
    assert [h.score for h in found.hits] == sorted((h.score for h in found.hits), reverse=True)
    assert list(tmp_path.glob("cohort.slides-mosaic-slide-v*.npz"))
    monkeypatch.setitem(slides.SIGNATURES, "mosaic", slides.SignatureKind(
        "mosaic", lambda x: (_ for _ in ()).throw(AssertionError("rebuilt")), slides._mosaic_similarity, "x"))
    again = similar_slides(table, "s1", kind="mosaic", k=4)  # read from the cache, not rebuilt
    assert [h.slide for h in again.hits] == [h.slide for h in found.hits]


def test_a_toy_signature_is_one_registration(tmp_path: Path, monkeypatch) -> None:
    table = _cohort(Store(tmp_path))
    toy = slides.SignatureKind("first", lambda x: x[:1], slides._mean_similarity, "the first tile")
    monkeypatch.setitem(slides.SIGNATURES, "first", toy)
    assert len(similar_slides(table, "s2", kind="first", k=3).hits) == 3


def test_mistakes_are_one_line(tmp_path: Path) -> None:
    table = _cohort(Store(tmp_path))
    with pytest.raises(CytoError, match="no slide 'nope'"):
        similar_slides(table, "nope")
    with pytest.raises(CytoError, match="unknown slide signature"):
        similar_slides(table, "s1", kind="median")
    with pytest.raises(CytoError, match="`k`"):
        similar_slides(table, "s1", k=0)


def test_cli_search_slide(tmp_path: Path, capsys) -> None:
    import json

    from cytoretrieve.cli import run

    _cohort(Store(tmp_path))
    out = tmp_path / "slides.json"
    assert run(["search", "--slide", "s3", "--table", "cohort", "--store", str(tmp_path), "-k", "3", "--evaluate",
                "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["slide"] == "s3" and len(got["hits"]) == 3 and got["evaluation"]["slides"] == 24
    assert "slides like s3" in capsys.readouterr().out
    assert run(["search", "--slide", "s3", "--id", "x", "--table", "cohort", "--store", str(tmp_path)]) == 2
