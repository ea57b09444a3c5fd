"""Slide-score metrics, one definition each: AUC and the ROC curve (threshold-free), the threshold chosen on
validation (Youden's J), and sensitivity, specificity, balanced accuracy, F1 and accuracy at a threshold.

Every metric takes binary labels `y` (1 positive) and scores `s` (higher = more positive); a slide is called
positive when its score is >= the threshold. Light to import (numpy only)."""

from __future__ import annotations

import numpy as np

METRICS = ("auc", "balanced_accuracy", "sensitivity", "specificity", "f1", "accuracy")


def auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC = P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney); nan for one class."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # mean of 1-based ranks a+1..b
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(s, dtype=np.float64), kind="mergesort")
    s_sorted = np.asarray(s, dtype=np.float64)[order]
    tp = np.cumsum(y[order])
    fp = np.cumsum(~y[order])
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tpr = np.r_[0, tp[last]] / max(int(y.sum()), 1)
    fpr = np.r_[0, fp[last]] / max(int((~y).sum()), 1)
    return fpr, tpr


def youden_threshold(y: np.ndarray, s: np.ndarray) -> float:
    """The threshold t (predict positive when score >= t) maximising sensitivity + specificity - 1; ties go to
    the midpoint between the chosen score and the next lower one (a margin on both sides)."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    cands = np.unique(s)
    best, best_t = -np.inf, float(cands[0])
    for i, t in enumerate(cands):
        pred = s >= t
        j = pred[y].mean() + (~pred[~y]).mean() - 1 if y.any() and (~y).any() else 0.0
        if j > best + 1e-12:
            best = j
            best_t = float((t + cands[i - 1]) / 2) if i > 0 else float(t)
    return best_t


def accuracy(y: np.ndarray, s: np.ndarray, threshold: float) -> float:
    """Fraction of slides whose call `s >= threshold` is their label; nan for none."""
    y = np.asarray(y).astype(bool)
    return float(((np.asarray(s, dtype=np.float64) >= threshold) == y).mean()) if len(y) else float("nan")


def binary_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, balanced accuracy, F1 (positive class) and accuracy of `s >= threshold`."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(s, dtype=np.float64) >= threshold
    tp, fn = int((pred & y).sum()), int((~pred & y).sum())
    tn, fp = int((~pred & ~y).sum()), int((pred & ~y).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"sensitivity": sens, "specificity": spec, "balanced_accuracy": float(np.nanmean([sens, spec])),
            "f1": f1, "accuracy": accuracy(y, s, threshold)}


def slide_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    """Every metric of METRICS: AUC, and the others at `threshold`."""
    return {"auc": auc(y, s), **binary_metrics(y, s, threshold)}
