"""Focal planes: reading one region of a z-stack as one picture. The one place planes are reduced; the reader
(`reader.py`), tiling, `cells` and `embed` all go through `read_region`.

A plane setting (`plane`, `--plane`) is one of:

- None: plane 0, as every single-plane slide is read (the default);
- N: focal plane N (0-based, in the backend's order);
- `best`: per region (tile or cell crop), the plane with the highest focus score (`focus.focus_score`; where no
  plane has enough stain to score, the plane with the largest plain variance of the Laplacian);
- `edf`: an extended-depth-of-field composite: for every pixel, the plane where the local Laplacian energy
  (the squared Laplacian, Gaussian-averaged over `EDF_WINDOW_PX`) is highest. That depth map is smoothed
  (a Gaussian of `EDF_SMOOTH_PX`, weighted by each pixel's best energy, so glass takes the depth of the cells
  around it instead of noise) and each pixel blended between the two planes around its smoothed depth, so the
  composite has no seams.

Tables record the plane each row was read from (`plane` column): its index, or `EDF` (-1) for a composite, which
the reader rebuilds from the planes when it reads the row again. A single-plane slide reads the same under every
setting but N > 0. The reduction runs at the read resolution, before any resize to the tile size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.slides.backends.base import SlideBackend
from cytoretrieve.sources.slides.focus import focus_score, grey_levels, laplacian, sharpness

EDF = -1  # the `plane` column's value for an EDF composite
REDUCTIONS = ("best", "edf")
EDF_WINDOW_PX = 4.0  # Gaussian sigma of the local Laplacian energy
EDF_SMOOTH_PX = 8.0  # Gaussian sigma of the smoothing of the depth map

PlaneSetting = int | str | None


def parse_plane(value: object) -> PlaneSetting:
    """A plane setting from the user: None, `best`, `edf` or a plane number >= 0 (a string of one)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in REDUCTIONS:
            return text
        if not text.lstrip("-").isdigit():
            raise CytoError(f"`plane` must be best, edf or a focal plane number, not {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise CytoError(f"`plane` must be best, edf or a focal plane number >= 0, not {value!r}")
    return int(value)


def read_planes(backend: SlideBackend, x: int, y: int, level: int, size: tuple[int, int]) -> list[np.ndarray]:
    """The region in every focal plane of the slide, uint8 RGB arrays."""
    return [np.asarray(backend.read_region(x, y, level, size, plane=p).convert("RGB")) for p in range(backend.planes)]


def best_plane(images: Sequence[np.ndarray]) -> int:
    """The index of the sharpest image: the highest focus score, else (no image scores) the highest plain
    variance of the Laplacian."""
    scores = [focus_score(im) for im in images]
    if any(s is not None for s in scores):
        return int(np.argmax([-np.inf if s is None else s for s in scores]))
    return int(np.argmax([sharpness(im) for im in images]))


def depth_map(images: Sequence[np.ndarray], window_px: float = EDF_WINDOW_PX,
              smooth_px: float = EDF_SMOOTH_PX) -> np.ndarray:
    """Per pixel, the (fractional) plane index where the image is sharpest, smoothed (see the module docstring)."""
    best = np.zeros(images[0].shape[:2], np.float32)
    depth = np.zeros(images[0].shape[:2], np.float32)
    for i, im in enumerate(images):
        energy = ndimage.gaussian_filter(laplacian(grey_levels(im)) ** 2, window_px, mode="reflect")
        better = energy > best
        best[better] = energy[better]
        depth[better] = i
    if smooth_px <= 0:
        return depth
    weight = ndimage.gaussian_filter(best, smooth_px, mode="reflect")
    smoothed = ndimage.gaussian_filter(depth * best, smooth_px, mode="reflect") / np.maximum(weight, 1e-12)
    return np.clip(np.where(weight > 1e-12, smoothed, depth), 0, len(images) - 1)


def edf(images: Sequence[np.ndarray], window_px: float = EDF_WINDOW_PX, smooth_px: float = EDF_SMOOTH_PX) -> np.ndarray:
    """The extended-depth-of-field composite of same-size uint8 RGB images of one region (see the module docstring)."""
    if len(images) == 1:
        return np.asarray(images[0])
    depth = depth_map(images, window_px, smooth_px)
    low = np.floor(depth).astype(np.intp)
    high = np.minimum(low + 1, len(images) - 1)
    t = (depth - low)[..., None]
    stack = np.stack(images)  # (planes, H, W, 3)
    rows, cols = np.indices(depth.shape)
    out = stack[low, rows, cols] * (1 - t) + stack[high, rows, cols] * t
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def read_region(backend: SlideBackend, x: int, y: int, level: int, size: tuple[int, int],
                plane: PlaneSetting = None) -> tuple[Image.Image, int]:
    """The region read with `plane` (None, N, best, edf, or `EDF`), as an RGB image, and the plane it came from
    (`EDF` for a composite)."""
    if plane is None:
        return backend.read_region(x, y, level, size, plane=0), 0
    if isinstance(plane, str):
        plane = parse_plane(plane)
    if isinstance(plane, int) and plane != EDF:
        return backend.read_region(x, y, level, size, plane=plane), plane
    if backend.planes == 1:
        return backend.read_region(x, y, level, size, plane=0), 0
    images = read_planes(backend, x, y, level, size)
    if plane == "best":
        i = best_plane(images)
        return Image.fromarray(images[i], "RGB"), i
    return Image.fromarray(edf(images), "RGB"), EDF
