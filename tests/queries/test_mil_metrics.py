"""MIL metrics against sklearn, and the threshold chosen on validation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from cytoretrieve.queries.mil.metrics import auc, binary_metrics, roc_curve, youden_threshold
from cytoretrieve.queries.stats import mean_std


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_roc_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    s = np.round(rng.normal(size=40) + y, 1)  # rounded: many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr = roc_curve(y, s)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 50)
    s = rng.normal(size=50) + y
    m = binary_metrics(y, s, 0.3)
    pred = (s >= 0.3).astype(int)
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["accuracy"] == pytest.approx((pred == y).mean())


def test_auc_of_one_class_is_nan_and_skipped_in_mean() -> None:
    assert np.isnan(auc(np.ones(4), np.arange(4)))
    assert mean_std([0.5, float("nan"), 1.0]) == (0.75, 0.25)


def test_youden_threshold_separates_a_separable_validation_set() -> None:
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.4, 0.6, 0.9])
    t = youden_threshold(y, s)
    assert 0.4 < t <= 0.6
    m = binary_metrics(y, s, t)
    assert m["sensitivity"] == m["specificity"] == 1.0
