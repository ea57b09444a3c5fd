"""The training-free retrieval score ranks positive slides first, and its tile scores find the positive tiles."""

from __future__ import annotations

import numpy as np
import pytest

from cytoretrieve.queries.mil.metrics import auc
from cytoretrieve.queries.mil.retrieval import RetrievalConfig, fit_retrieval, slide_score
from helpers.mil_synthetic import synthetic_bags

pytestmark = pytest.mark.usefixtures("faiss_one_thread")


def test_retrieval_ranks_positive_slides_first() -> None:
    # without annotations the positives are every tile of the positive slides, mostly normal: a clear signal is needed
    train, _ = synthetic_bags(40, shift=8.0, seed=0)
    test, masks = synthetic_bags(30, shift=8.0, seed=1)
    scorer = fit_retrieval(train, config=RetrievalConfig(k=5, top_m=2))
    s, tiles = scorer.predict(test.vectors)
    assert auc(test.y, s) == 1.0
    order = np.argsort(-s)
    assert set(order[: int(test.y.sum())]) == set(np.flatnonzero(test.y == 1))
    pos = np.concatenate([t[m] for t, m in zip(tiles, masks)])
    neg = np.concatenate([t[~m] for t, m in zip(tiles, masks)])
    assert pos.min() > np.median(neg)


def test_annotated_positives_are_used_instead_of_positive_slide_tiles() -> None:
    train, masks = synthetic_bags(40, seed=0)
    annotated = np.concatenate([v[m] for v, m in zip(train.vectors, masks)])
    test, _ = synthetic_bags(30, seed=1)
    scorer = fit_retrieval(train, annotated, RetrievalConfig(k=3, top_m=1))
    assert scorer.pos.index.ntotal == len(annotated) and scorer.pos.counts is None
    s, _ = scorer.predict(test.vectors)
    assert auc(test.y, s) == 1.0


def test_slide_score_is_mean_of_top_m() -> None:
    assert slide_score(np.array([0.1, 0.9, 0.5, 0.7]), 2) == 0.8
    assert slide_score(np.array([0.3]), 5) == 0.3


def _clustered(n: int, dim: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    return centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)


def test_compressed_index_tile_scores_match_exact_search() -> None:
    """Above `exact_max` references the IVF-PQ index (re-ranked with float16 copies) is used; its tile scores stay
    within a small error of exact search on clustered data."""
    from cytoretrieve.queries.mil.retrieval import RetrievalScorer

    pos, neg, queries = _clustered(6000, seed=1), _clustered(8000, seed=2), _clustered(1500, seed=3)
    approx = RetrievalScorer(pos, neg, RetrievalConfig(k=5, references="tiles", exact_max=1000, nlist=128))
    exact = RetrievalScorer(pos, neg, RetrievalConfig(k=5, index="flat"))
    assert approx.describe()["negatives"]["kind"] == "ivfpq" and exact.describe()["negatives"]["kind"] == "flat"
    a, e = approx.tile_scores(queries), exact.tile_scores(queries)
    assert np.corrcoef(a, e)[0, 1] > 0.99 and np.abs(a - e).mean() < 0.1 * e.std()


def test_query_order_does_not_change_the_scores() -> None:
    from cytoretrieve.queries.mil.retrieval import RetrievalScorer

    pos, neg = _clustered(6000, seed=1), _clustered(8000, seed=2)
    bags = [_clustered(int(n), seed=10 + i) for i, n in enumerate([300, 50, 700, 5])]
    scores = []
    for sort in (True, False):
        scorer = RetrievalScorer(pos, neg, RetrievalConfig(k=5, references="tiles", exact_max=1000, nlist=128, sort_queries=sort,
                                                           query_batch=800))
        assert (scorer.describe()["sorted_queries"]) == sort
        slide, tiles = scorer.predict(bags)
        assert [len(t) for t in tiles] == [len(b) for b in bags]
        alone = [scorer.tile_scores(b) for b in bags]  # bag by bag: the same numbers as batched across bags
        for t, a in zip(tiles, alone):
            np.testing.assert_allclose(t, a, atol=1e-6)
        scores.append(np.concatenate(tiles))
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-6)


def test_unknown_index_is_a_user_error() -> None:
    from cytoretrieve.errors import CytoError
    from cytoretrieve.queries.mil.retrieval import RetrievalScorer

    with pytest.raises(CytoError, match="unknown retrieval index 'hnsw'"):
        RetrievalScorer(_clustered(100), _clustered(100), RetrievalConfig(index="hnsw"))


def _cohort(n_bags: int, seed: int, tiles: int = 150, dim: int = 32) -> tuple[list[np.ndarray], np.ndarray]:
    """Bags of clustered tiles (20 normal clusters); odd bags are positive and hold 8 tiles of an abnormal cluster."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).normal(size=(21, dim)).astype(np.float32)
    bags, y = [], np.arange(n_bags) % 2
    for label in y:
        cl = rng.integers(0, 20, tiles)
        cl[:8] = 20 if label else cl[:8]
        bags.append(centres[cl] + 0.4 * rng.normal(size=(tiles, dim)).astype(np.float32))
    return bags, y


def test_centroid_references_rank_positive_slides_first_and_agree_with_tiles() -> None:
    from cytoretrieve.queries.mil.bags import Bags

    train, y = _cohort(40, seed=0)
    test, y_test = _cohort(20, seed=1)
    bags = Bags(names=[f"s{i}" for i in range(len(train))], y=y.astype(np.int8), vectors=train)
    cfg = RetrievalConfig(k=5, top_m=3, references="centroids", centroids=48, rank=16, exact_max=1000)
    compressed = fit_retrieval(bags, config=cfg)
    pos, neg = compressed.describe()["positives"], compressed.describe()["negatives"]
    assert pos["kind"] == neg["kind"] == "centroids" and pos["rows"] == neg["rows"] == 3000
    # one k-means of both sides (<= 48 cells each) plus clusters of the salient positives: the abnormal tiles
    assert neg["centroids"] <= 48 and pos["centroids"] - pos["salient_centroids"] <= 48 and pos["salient_centroids"] >= 1
    assert 160 * 0.9 <= pos["salient"] <= 160 * 1.5  # 20 positive bags x 8 abnormal tiles
    assert 16 < pos["rank"] <= 32 and compressed.basis.shape == (32, pos["rank"])
    tiles = fit_retrieval(bags, config=RetrievalConfig(k=5, top_m=3, references="tiles", index="flat"))
    (s, ts), (s_ref, ts_ref) = compressed.predict(test), tiles.predict(test)
    assert auc(y_test, s) == 1.0 and auc(y_test, s_ref) == 1.0
    a, b = np.concatenate(ts), np.concatenate(ts_ref)
    assert np.corrcoef(a, b)[0, 1] > 0.9
    abnormal = np.concatenate([np.arange(len(t)) < 8 if label else np.zeros(len(t), bool) for t, label in zip(test, y_test)])
    assert a[abnormal].min() > np.percentile(a[~abnormal], 99)


def test_cluster_weights_make_the_mean_of_the_k_nearest_members() -> None:
    """A side of cluster means scores as the k nearest of its references each replaced by its cluster's mean."""
    from cytoretrieve.queries.mil.retrieval import _rows_needed, _weighted_mean

    counts = np.array([3, 1, 7, 2])
    means = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    q = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    k = 6
    rows = _rows_needed(counts, k)
    assert rows == 3  # the three smallest clusters hold 1 + 2 + 3 = 6 members
    sims = q @ means.T
    ids = np.argsort(-sims, 1)[:, :rows]
    got = _weighted_mean(np.take_along_axis(sims, ids, 1), ids, counts, k)
    copies = np.repeat(sims, counts, axis=1)  # every reference as its own row
    np.testing.assert_allclose(got, np.sort(copies, 1)[:, ::-1][:, :k].mean(1), rtol=1e-5)


def test_unknown_references_are_a_user_error() -> None:
    from cytoretrieve.errors import CytoError
    from cytoretrieve.queries.mil.retrieval import RetrievalScorer

    with pytest.raises(CytoError, match="unknown retrieval references 'pq'"):
        RetrievalScorer(_clustered(100), _clustered(100), RetrievalConfig(references="pq"))


def test_pad_standardises_like_numpy() -> None:
    from cytoretrieve.queries.mil.models import pad

    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(n, 6)).astype(np.float16 if n == 3 else np.float32) for n in (5, 3, 1)]
    mean, std = rng.normal(size=6).astype(np.float32), rng.uniform(0.5, 2, 6).astype(np.float32)
    x, mask = pad(bags, "cpu", mean, std)
    assert x.shape == (3, 5, 6) and mask.sum(1).tolist() == [5, 3, 1]
    for i, b in enumerate(bags):
        np.testing.assert_array_equal(x[i, : len(b)].numpy(), (b.astype(np.float32) - mean) / std)
        assert not x[i, len(b):].any()


def test_score_cli_rejects_unknown_references(tmp_path, capsys) -> None:
    from cytoretrieve.cli import run

    code = run(["score", "--tiles", "t", "--labels", str(tmp_path / "l.csv"), "--split", str(tmp_path / "s.json"),
                "--store", str(tmp_path), "--method", "retrieval", "--references", "pq"])
    assert code == 2 and "unknown --references 'pq' (one of centroids, tiles)" in capsys.readouterr().err


def test_flat_sides_score_raw_rows_as_their_unit_vectors() -> None:
    """Flat sides search the raw rows and divide by their norms: the same as the k nearest of the unit vectors."""
    from cytoretrieve.queries.mil.retrieval import RetrievalScorer

    scorer = RetrievalScorer(_clustered(3000, seed=1), _clustered(3000, seed=2), RetrievalConfig(k=5, index="flat"))
    q = _clustered(400, seed=3) * np.random.default_rng(4).uniform(0.1, 10, (400, 1)).astype(np.float32)
    q[7] = 0
    (dp, _), (dn, _) = scorer.neighbours(q)
    np.testing.assert_allclose(scorer.tile_scores(q), dp.mean(1) - dn.mean(1), atol=1e-5)
    assert scorer.tile_scores(q)[7] == 0


def test_centroids_leave_a_small_reference_set_as_it_is() -> None:
    """Annotated positives under `exact_max` stay exact tiles; only the large negative set is summarised."""
    from cytoretrieve.queries.mil.bags import Bags

    train, y = _cohort(40, seed=0)
    test, y_test = _cohort(20, seed=1)
    bags = Bags(names=[f"s{i}" for i in range(len(train))], y=y.astype(np.int8), vectors=train)
    annotated = np.concatenate([b[:8] for b, label in zip(train, y) if label])
    cfg = RetrievalConfig(k=5, top_m=3, references="centroids", centroids=48, exact_max=1000)
    scorer = fit_retrieval(bags, annotated, cfg)
    info = scorer.describe()
    assert info["positives"]["kind"] == "flat" and info["negatives"]["kind"] == "centroids" and scorer.basis is None
    s, _ = scorer.predict(test)
    assert auc(y_test, s) == 1.0


def _rare_cohort(n_bags: int, seed: int, tiles: int = 300, dim: int = 64) -> tuple[list[np.ndarray], np.ndarray, list]:
    """Bags of 20 normal clusters; a positive bag (odd) holds 3 tiles of an abnormal pattern lying close to normal
    cluster 3 (its centre moved by 0.3 of that centre's norm), the case k-means alone folds into a normal cell."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).normal(size=(20, dim)).astype(np.float32)
    u = np.random.default_rng(8).normal(size=dim).astype(np.float32)
    abnormal = centres[3] + 0.3 * np.linalg.norm(centres[3]) * u / np.linalg.norm(u)
    bags, y, masks = [], np.arange(n_bags) % 2, []
    for label in y:
        x = centres[rng.integers(0, 20, tiles)] + 0.4 * rng.normal(size=(tiles, dim)).astype(np.float32)
        mask = np.zeros(tiles, bool)
        if label:
            mask[:3] = True
            x[:3] = abnormal + 0.4 * rng.normal(size=(3, dim))
        bags.append(x.astype(np.float32))
        masks.append(mask)
    return bags, y, masks


def test_centroids_keep_a_rare_pattern_close_to_a_normal_one(monkeypatch) -> None:
    """The salient positives (those the tile score itself flags) keep clusters of their own: the centroids rank the
    slides like the tile references; without them the rare pattern is averaged into a normal cell and lost."""
    from cytoretrieve.queries.mil import retrieval
    from cytoretrieve.queries.mil.bags import Bags

    train, y, train_masks = _rare_cohort(40, seed=0)
    test, y_test, masks = _rare_cohort(30, seed=1)
    bags = Bags(names=[f"s{i}" for i in range(len(train))], y=y.astype(np.int8), vectors=train)
    cfg = RetrievalConfig(k=5, top_m=3, references="centroids", centroids=48, rank=16, exact_max=1000)
    tiles = fit_retrieval(bags, config=RetrievalConfig(k=5, top_m=3, references="tiles", index="flat"))
    assert auc(y_test, tiles.predict(test)[0]) == 1.0

    pos = [b for b, label in zip(train, y) if label]
    salient, found = retrieval._salient_positives(pos, [b for b, label in zip(train, y) if not label], 64, cfg)
    abnormal = np.concatenate([m for m, label in zip(train_masks, y) if label])
    assert salient[abnormal].mean() >= 0.5 and found["salient"] <= 2 * abnormal.sum()  # most, and few others

    s, ts = fit_retrieval(bags, config=cfg).predict(test)
    assert auc(y_test, s) == 1.0 and auc(np.concatenate(masks), np.concatenate(ts)) > 0.99

    monkeypatch.setattr(retrieval, "_salient_positives", lambda p, n, d, c: (np.zeros(sum(map(len, p)), bool), {}))
    s_plain, _ = fit_retrieval(bags, config=cfg).predict(test)
    assert auc(y_test, s_plain) < 0.8


def test_leave_out_mean_skips_the_query_itself() -> None:
    import faiss

    from cytoretrieve.queries.mil.retrieval import _leave_out_mean
    from cytoretrieve.store.ann import l2_normalise

    refs = l2_normalise(_clustered(500, seed=5))
    index = faiss.IndexFlatIP(refs.shape[1])
    index.add(refs)
    own = np.array([3, 10, 499])
    got = _leave_out_mean(index, refs[own], own, 4)
    sims = refs[own] @ refs.T
    sims[np.arange(3), own] = -np.inf
    np.testing.assert_allclose(got, np.sort(sims, 1)[:, ::-1][:, :4].mean(1), rtol=1e-5)
    outside = l2_normalise(_clustered(2, seed=6))  # rows not in the index: the k nearest, the (k+1)-th dropped
    np.testing.assert_allclose(_leave_out_mean(index, outside, np.array([-5, -5]), 4),
                               np.sort(outside @ refs.T, 1)[:, ::-1][:, :4].mean(1), rtol=1e-5)


def test_centroids_keep_a_rare_pattern_with_fewer_positive_slides() -> None:
    """5 positive and 25 negative training slides: the screen indexes a sample of the negatives as large as the
    positives (a denser side scores its own tiles higher; unbalanced, its null sat above every positive)."""
    from cytoretrieve.queries.mil.bags import Bags

    bags, y, _ = _rare_cohort(60, seed=0)
    keep = [i for i in range(60) if y[i]][:5] + [i for i in range(60) if not y[i]][:25]
    train = Bags(names=[f"s{i}" for i in keep], y=y[keep].astype(np.int8), vectors=[bags[i] for i in keep])
    test, y_test, _ = _rare_cohort(40, seed=1)
    tiles = fit_retrieval(train, config=RetrievalConfig(k=5, top_m=3, references="tiles", index="flat"))
    assert auc(y_test, tiles.predict(test)[0]) > 0.99
    scorer = fit_retrieval(train, config=RetrievalConfig(k=5, top_m=3, centroids=48, rank=16, exact_max=1000))
    assert scorer.describe()["positives"]["salient"] > 0
    assert auc(y_test, scorer.predict(test)[0]) > 0.99


def test_at_most_samples_rows_chunk_by_chunk_with_their_ids() -> None:
    from cytoretrieve.queries.mil.retrieval import _at_most
    from cytoretrieve.store.ann import chunk_sizes

    chunks = [_clustered(n, seed=i) for i, n in enumerate([30, 0, 55, 15])]
    rows, ids = _at_most(chunks, 40, seed=0)
    assert chunk_sizes(rows) == [len(rows[i]) for i in range(len(rows))] and sum(chunk_sizes(rows)) == 40
    drawn = np.concatenate([rows[i] for i in range(len(rows))])
    whole = np.concatenate(chunks)
    assert sorted(ids[ids >= 0].tolist()) == list(range(40))
    np.testing.assert_array_equal(drawn[ids[ids >= 0]], whole[ids >= 0])
    same, all_ids = _at_most(chunks, 100, seed=0)
    assert same is chunks and all_ids.tolist() == list(range(100))


def test_subset_reads_each_chunk_once_and_only_in_range() -> None:
    """Iterating a sample reads each chunk once and never asks the chunks for an index past their end (bags read
    from a table need not raise IndexError there)."""
    from cytoretrieve.queries.mil.retrieval import _at_most

    class Bags:
        def __init__(self, arrays: list[np.ndarray]) -> None:
            self.arrays, self.reads = arrays, []

        def __len__(self) -> int:
            return len(self.arrays)

        def __getitem__(self, i: int) -> np.ndarray:
            self.reads.append(i)
            return self.arrays[i % len(self.arrays)]  # no IndexError past the end, as a lazy reader may do

        def sizes(self) -> list[int]:
            return [len(a) for a in self.arrays]

    bags = Bags([_clustered(n, seed=i) for i, n in enumerate([20, 35, 10])])
    rows, _ = _at_most(bags, 30, seed=1)
    parts = list(rows)
    assert len(parts) == 3 and sum(map(len, parts)) == 30 and bags.reads == [0, 1, 2]
