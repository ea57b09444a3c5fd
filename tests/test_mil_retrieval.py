"""The training-free retrieval score ranks positive slides first, and its tile scores find the positive tiles."""

from __future__ import annotations

import numpy as np
import pytest

from cytoretrieve.mil.evaluate import auc
from cytoretrieve.mil.retrieval import RetrievalConfig, fit_retrieval, slide_score
from mil_synthetic import synthetic_bags


@pytest.fixture(autouse=True)
def _one_thread():
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


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
    assert scorer.pos.ntotal == len(annotated)
    s, _ = scorer.predict(test.vectors)
    assert auc(test.y, s) == 1.0


def test_slide_score_is_mean_of_top_m() -> None:
    assert slide_score(np.array([0.1, 0.9, 0.5, 0.7]), 2) == 0.8
    assert slide_score(np.array([0.3]), 5) == 0.3
