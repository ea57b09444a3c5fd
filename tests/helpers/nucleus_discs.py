"""Synthetic fields for the learned-segmenter tests (Cellpose, StarDist): dark discs of a known size on pale glass,
with their label image, so a tiny model can be fitted on some and tried on others."""

from __future__ import annotations

import numpy as np

RADIUS_UM = 3.0  # the discs' radius: a 6 um nucleus


def disc_field(mpp: float, seed: int, side_um: float = 48.0, k: int = 5,
               radius_um: float = RADIUS_UM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grey uint8 field at `mpp`, its label image, the discs' centres in px): `k` dark discs at least 3 um apart
    on pale glass, with noise; the same seed gives the same discs at any pixel size."""
    rng = np.random.default_rng(seed)
    n = int(round(side_um / mpp))
    centres: list[np.ndarray] = []
    while len(centres) < k:
        c = rng.uniform(radius_um + 1.5, side_um - radius_um - 1.5, 2)
        if all(np.hypot(*(c - p)) > 2 * radius_um + 3 for p in centres):
            centres.append(c)
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) * mpp
    grey, labels = np.full((n, n), 225.0), np.zeros((n, n), np.int32)
    for i, (cx, cy) in enumerate(centres):
        inside = np.hypot(xx - cx, yy - cy) <= radius_um
        grey[inside], labels[inside] = 80.0, i + 1
    grey += rng.normal(0, 6, grey.shape)
    return np.clip(grey, 0, 255).astype(np.uint8), labels, np.array(centres) / mpp - 0.5
