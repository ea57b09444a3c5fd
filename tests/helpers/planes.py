"""Synthetic focal-plane fields for the focus and plane tests: grey cells on glass, and a folder of planes whose
left half is in focus at plane 1 and right half at plane 3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

ISBI = Path(__file__).resolve().parents[3] / "shared" / "data" / "isbi2015_zstack"  # the real 20-plane field


def sharp_field(size: int = 256, seed: int = 0, cells: int = 25) -> np.ndarray:
    """Grey cells (pale cytoplasm, dark textured nucleus) on bright glass, float 0-255."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size), 225.0)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(cells):
        cx, cy, r = rng.uniform(10, size - 10), rng.uniform(10, size - 10), rng.uniform(5, 10)
        d = np.hypot(xx - cx, yy - cy)
        img[d < 3 * r] = np.minimum(img[d < 3 * r], 190)
        img[d < r] = 70
    return img + rng.normal(0, 6, img.shape)


def u8(a: np.ndarray) -> np.ndarray:
    return np.clip(a, 0, 255).round().astype(np.uint8)


def write_planes(folder: Path, n: int = 5, size: int = 256, seed: int = 0) -> Path:
    """A folder of `n` grey planes: the left half in focus at plane 1, the right half at plane 3."""
    sharp = sharp_field(size, seed)
    rng = np.random.default_rng(seed + 1)
    left = np.mgrid[:size, :size][1] < size // 2
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        a = ndimage.gaussian_filter(sharp, 0.3 + 1.8 * abs(k - 1))
        b = ndimage.gaussian_filter(sharp, 0.3 + 1.8 * abs(k - 3))
        Image.fromarray(u8(np.where(left, a, b) + rng.normal(0, 1.5, sharp.shape)), "L").save(folder / f"z{k:02d}.png")
    return folder
