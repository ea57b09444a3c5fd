"""A focus score for a tile or a cell crop: how sharp its stained content is, at the resolution it was read.

    focus = 1000 * mean(L^2 over the stain) / mean((g - glass)^2 over the stain)

where `g` is the grey level (mean of R, G, B, 0-1) smoothed with a Gaussian of `SMOOTH_PX` (so camera noise,
which survives defocus, is not taken for detail), `L` the 3x3 Laplacian of `g`, `glass` the tile's brightest
grey (its `GLASS_PERCENTILE`), and "the stain" the pixels at least `MIN_OD` optical density darker than that
glass, grown by `EDGE_PX` so their edges count. It is the variance-of-the-Laplacian measure of HistoQC's blur
module and of autofocus work, divided by the stain's own contrast: both terms scale with the square of the
contrast, so a pale but sharp cytoplasm scores as a dark sharp nucleus does, and mostly glass around a few cells
does not pull the score down (glass is not counted). Defocus removes fine detail faster than contrast, so the
score falls with blur (the factor 1000 only makes the numbers readable). Measured: Herlev cell images score
0.2-2.1 sharp and 0.04-0.4 after a Gaussian blur of 2 px; the ISBI z-stack (0.25 um/px) 0.1 at its most
defocused plane, 1.3 at its sharpest, 2.1 for its EDF image. `BLURRED` (0.3) is where the tiling preview calls a
tile blurred when no `min_focus` is given. Where less than `MIN_STAIN` of the pixels are stain (glass, an empty tile) there is nothing to
judge: the score is None (null in the tables), never "blurred".

Scores depend on the pixel size they were read at: compare tiles of one table (one `target_mpp`), not across.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

SMOOTH_PX = 1.0  # Gaussian sigma (px) applied before the Laplacian: noise is not detail
MIN_OD = 0.05  # optical density above the glass that counts as stain
EDGE_PX = 2  # the stain mask is grown by this so the edges of cells count
MIN_STAIN = 0.01  # fraction of stained pixels below which a tile has no focus score (None)
GLASS_PERCENTILE = 99.0
SCALE = 1000.0
BLURRED = 0.3  # the preview's "blurred" colour below this (when no `min_focus` is given)
METHOD = {"name": "laplacian", "scale": SCALE, "smooth_px": SMOOTH_PX, "min_od": MIN_OD, "min_stain": MIN_STAIN, "version": 1}
_LAPLACE = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)


def grey_levels(image: np.ndarray) -> np.ndarray:
    """An RGB (H, W, 3) or grey (H, W) uint8 image as float32 grey levels 0-1."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] >= 3:  # the mean of R, G, B: numpy's mean over a short last axis is slow
        a = (a[..., 0].astype(np.float32) + a[..., 1] + a[..., 2]) / np.float32(3)
    elif a.ndim == 3:
        a = a.mean(axis=2, dtype=np.float32)
    return a.astype(np.float32) / 255.0


def laplacian(grey: np.ndarray, smooth_px: float = SMOOTH_PX) -> np.ndarray:
    """The 3x3 Laplacian of `grey` smoothed with a Gaussian of `smooth_px` (0: none); edges reflected."""
    g = ndimage.gaussian_filter(grey, smooth_px, mode="reflect") if smooth_px > 0 else grey
    return ndimage.convolve(g, _LAPLACE, mode="reflect")


def stain_mask(grey: np.ndarray, min_od: float = MIN_OD) -> tuple[np.ndarray, float]:
    """Pixels at least `min_od` darker (optical density) than the tile's glass, and that glass grey level."""
    glass = float(max(np.percentile(grey, GLASS_PERCENTILE), 1.0 / 255))
    od = -np.log10(np.clip(grey, 1.0 / 255, None) / glass)
    return od >= min_od, glass


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """`binary_dilation(mask, iterations=steps)` (4-neighbour steps: a diamond of radius `steps`), by OR-ing
    shifted views: the same pixels, without scipy's per-call cost on a crop."""
    if steps <= 0:
        return mask
    h, w = mask.shape
    pad = np.zeros((h + 2 * steps, w + 2 * steps), dtype=bool)
    pad[steps : steps + h, steps : steps + w] = mask
    out = mask.copy()
    for dr in range(-steps, steps + 1):
        for dc in range(-(steps - abs(dr)), steps - abs(dr) + 1):
            if dr or dc:
                out |= pad[steps + dr : steps + dr + h, steps + dc : steps + dc + w]
    return out


def focus_score(image: np.ndarray, *, smooth_px: float = SMOOTH_PX, min_od: float = MIN_OD,
                min_stain: float = MIN_STAIN) -> float | None:
    """The focus score of an RGB or grey tile (see the module docstring); None where it holds too little stain."""
    grey = grey_levels(image)
    if grey.size == 0:
        return None
    stained, glass = stain_mask(grey, min_od)
    if stained.mean() < min_stain:
        return None
    mask = _grow(stained, EDGE_PX)
    lap = laplacian(grey, smooth_px)[mask]
    contrast = float(np.mean((grey[mask] - glass) ** 2))
    if contrast <= 1e-8:
        return None
    value = SCALE * float(np.mean(lap.astype(np.float64) ** 2) / contrast)
    return value if math.isfinite(value) else None


def sharpness(image: np.ndarray, smooth_px: float = SMOOTH_PX) -> float:
    """The plain variance of the Laplacian of the whole image (grey 0-1, no normalisation): for comparing
    pictures of the same content, such as the focal planes of one field."""
    return float(np.var(laplacian(grey_levels(image), smooth_px), dtype=np.float64))
