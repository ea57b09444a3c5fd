"""Summaries over runs and folds, one definition for every protocol: mean and population std (ddof=0, defined
for a single run; the paper does not say which it used), NaN entries (a metric undefined in one fold) left out."""

from __future__ import annotations

import warnings

import numpy as np


def mean_std(values) -> tuple:  # noqa: ANN001 - a list of floats or an array with runs on axis 0
    """(mean, std) over axis 0, ignoring NaN: floats for a 1-D input, arrays otherwise (NaN where all are NaN)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column is NaN, as it should be
        mean, std = np.nanmean(v, axis=0), np.nanstd(v, axis=0)
    return (float(mean), float(std)) if v.ndim == 1 else (mean, std)
