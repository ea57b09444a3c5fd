"""Scoring point detections against point annotations: one-to-one (Hungarian) matching within a radius.

A ground-truth point is found when a detection lies within `radius_px` of it; each point and each detection is
used at most once, and the assignment maximises the number of matches (ties broken by the smaller total
distance), so two detections on one nucleus count one hit and one false positive, never two hits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist


@dataclass(frozen=True)
class Counts:
    """True positives, false positives and false negatives, summed over any number of images."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def precision(self) -> float:
        return precision(self.tp, self.fp)

    @property
    def recall(self) -> float:
        return recall(self.tp, self.fn)

    @property
    def f1(self) -> float:
        return f1(self.tp, self.fp, self.fn)

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "precision": self.precision, "recall": self.recall, "f1": self.f1}


def _as_points(points: np.ndarray) -> np.ndarray:
    arr = np.asarray(points, dtype=float)
    if arr.size == 0:
        return np.zeros((0, 2))
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"points must be an (n, 2) array of x, y; got shape {arr.shape}")
    return arr


def matches(detections_xy: np.ndarray, truth_xy: np.ndarray, radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """The matched pairs as (detection indices, ground-truth indices), one-to-one within `radius_px`."""
    det, gt = _as_points(detections_xy), _as_points(truth_xy)
    if len(det) == 0 or len(gt) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    dist = cdist(gt, det)
    close = dist <= radius_px
    # Maximise the number of matches first (a large reward per pair in range), then prefer the shorter distances.
    cost = np.where(close, dist / (radius_px + 1e-9) - 2.0, 0.0)
    rows, cols = linear_sum_assignment(cost)
    keep = close[rows, cols]
    return cols[keep], rows[keep]


def match_points(detections_xy: np.ndarray, truth_xy: np.ndarray, radius_px: float) -> tuple[int, int, int]:
    """(tp, fp, fn) of detections against ground-truth points, matched one-to-one within `radius_px`."""
    n_det, n_gt = len(_as_points(detections_xy)), len(_as_points(truth_xy))
    tp = len(matches(detections_xy, truth_xy, radius_px)[0])
    return tp, n_det - tp, n_gt - tp


def count(detections_xy: np.ndarray, truth_xy: np.ndarray, radius_px: float) -> Counts:
    """`match_points` as a `Counts`, to sum over images."""
    return Counts(*match_points(detections_xy, truth_xy, radius_px))


def precision(tp: int, fp: int) -> float:
    """tp / (tp + fp); 1.0 when nothing was detected (no false claim was made)."""
    return tp / (tp + fp) if tp + fp else 1.0


def recall(tp: int, fn: int) -> float:
    """tp / (tp + fn); 1.0 when there was nothing to find."""
    return tp / (tp + fn) if tp + fn else 1.0


def f1(tp: int, fp: int, fn: int) -> float:
    """Harmonic mean of precision and recall, 2 tp / (2 tp + fp + fn); 1.0 when nothing was there and nothing found."""
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
