"""The cell-deposit mask: where on the glass the cells are, found on a low-resolution thumbnail.

Standard image processing, sized in micrometres so it behaves the same at any scan resolution:
1. a thumbnail at about `mask_mpp` um/px (box-averaged from the nearest pyramid level, read in chunks so a
   single-level slide of any size fits in memory);
2. a channel: HSV saturation (stained cells are coloured, glass is grey-white) or grey level (cells are darker);
3. median blur (separable: a 1 x k then a k x 1 median, which removes specks but keeps straight edges and corners);
4. Otsu threshold, bounded so an empty slide stays empty (saturation > at least `min_saturation`, grey < at most
   `max_grey`);
5. closing then opening with squares, removal of objects smaller than `min_object_um2` and filling of holes
   smaller than `min_hole_um2`.

`DepositMask.coverage` gives the exact fraction of each tile's area inside the mask (area-weighted over mask
pixels, from a summed-area table), which the grid compares with its threshold.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.slides.reader import Slide

CHUNK = 2048  # level px per side read at a time for the thumbnail
READ_THREADS = min(2, os.cpu_count() or 1)  # chunks read at once
METHODS = ("saturation", "grey")


@dataclass(frozen=True)
class DepositParams:
    """Settings of the deposit detection; lengths in um, areas in um^2, so they hold at any resolution."""

    method: str = "saturation"  # or "grey"
    mask_mpp: float = 4.0  # thumbnail pixel size (coarser when the slide would exceed max_side)
    max_side: int = 4096
    median_um: float = 20.0
    close_um: float = 20.0
    open_um: float = 12.0
    min_object_um2: float = 1000.0  # about one squamous cell
    min_hole_um2: float = 5000.0
    min_saturation: int = 20  # 0-255: the saturation threshold is never below this
    max_grey: int = 220  # 0-255: the grey threshold is never above this

    def validate(self) -> None:
        if self.method not in METHODS:
            raise CytoError(f"unknown deposit method '{self.method}': use saturation or grey")
        if self.mask_mpp <= 0 or self.max_side < 16:
            raise CytoError("the mask resolution must be positive (and max_side at least 16)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DepositMask:
    """The mask (True = deposit) and the thumbnail it was computed on; one mask pixel = `downsample` level-0 px."""

    mask: np.ndarray  # bool (h, w)
    thumbnail: np.ndarray  # uint8 (h, w, 3)
    downsample: float  # level-0 px per mask px
    mpp: float  # um per mask px
    threshold: float
    method: str

    @property
    def area_um2(self) -> float:
        return float(self.mask.sum()) * self.mpp * self.mpp

    @property
    def area_mm2(self) -> float:
        return self.area_um2 / 1e6

    def coverage(self, xs: np.ndarray, ys: np.ndarray, extent: float) -> np.ndarray:
        """Fraction of each square [x, x+extent) x [y, y+extent) (level-0 px) that lies in the deposit."""
        return area_fraction(self.mask, self.downsample, xs, ys, extent)


def area_fraction(mask: np.ndarray, downsample: float, xs: np.ndarray, ys: np.ndarray, extent: float) -> np.ndarray:
    """Fraction of each square [x, x+extent) x [y, y+extent) (level-0 px) covered by `mask` (one mask px =
    `downsample` level-0 px): exact, area-weighted over mask pixels, from a summed-area table."""
    xs = np.asarray(xs, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.float64)
    if xs.size == 0:
        return np.zeros(0, np.float64)
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.int64 if h * w >= 2**31 else np.int32)  # int32, in place: half the traffic
    np.cumsum(mask, axis=1, dtype=sat.dtype, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=0, out=sat[1:, 1:])

    def integral(px: np.ndarray, py: np.ndarray) -> np.ndarray:
        # the integral of a pixel-constant image is the bilinear interpolation of its summed-area table
        px = np.clip(px, 0, w)
        py = np.clip(py, 0, h)
        i = np.minimum(np.floor(px).astype(np.int64), w - 1)
        j = np.minimum(np.floor(py).astype(np.int64), h - 1)
        fx, fy = px - i, py - j
        return (sat[j, i] * (1 - fx) * (1 - fy) + sat[j, i + 1] * fx * (1 - fy)
                + sat[j + 1, i] * (1 - fx) * fy + sat[j + 1, i + 1] * fx * fy)

    d = downsample
    x0, y0, x1, y1 = xs / d, ys / d, (xs + extent) / d, (ys + extent) / d
    inside = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    return np.clip(inside / ((x1 - x0) * (y1 - y0)), 0.0, 1.0)


def otsu_threshold(channel: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image: the t maximising the between-class variance of (<= t, > t)."""
    hist = np.bincount(channel.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    p = hist / total
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    denom = omega * (1 - omega)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where(denom > 0, (mu[-1] * omega - mu) ** 2 / denom, 0.0)
    if not between.any():  # one grey level only
        return int(channel.max())
    return int(np.argmax(between))


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 else k + 1


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of a uint8 RGB image, 0-255."""
    mx = rgb.max(axis=2).astype(np.int32)
    mn = rgb.min(axis=2).astype(np.int32)
    return np.where(mx > 0, (mx - mn) * 255 // np.maximum(mx, 1), 0).astype(np.uint8)


def grey(rgb: np.ndarray) -> np.ndarray:
    return (rgb @ np.array([0.299, 0.587, 0.114])).round().clip(0, 255).astype(np.uint8)


def detect_deposit(rgb: np.ndarray, pixel_um: float, params: DepositParams = DepositParams()) -> tuple[np.ndarray, float]:
    """The deposit mask of an RGB thumbnail whose pixels are `pixel_um` um wide, and the threshold used."""
    params.validate()
    if params.method == "saturation":
        channel = saturation(rgb)
    else:
        channel = grey(rgb)
    k = _odd(params.median_um / pixel_um)
    if k > 1:
        channel = ndimage.median_filter(channel, size=(1, k), mode="nearest")
        channel = ndimage.median_filter(channel, size=(k, 1), mode="nearest")
    t = otsu_threshold(channel)
    if params.method == "saturation":
        t = max(t, params.min_saturation)
        mask = channel > t
    else:
        t = min(t, params.max_grey)
        mask = channel <= t
    c = _odd(params.close_um / pixel_um)
    if c > 1:  # closing: dilate then erode (squares: separable and exact on straight edges)
        mask = ndimage.minimum_filter(ndimage.maximum_filter(mask, size=c, mode="nearest"), size=c, mode="nearest")
    o = _odd(params.open_um / pixel_um)
    if o > 1:  # opening: erode then dilate
        mask = ndimage.maximum_filter(ndimage.minimum_filter(mask, size=o, mode="nearest"), size=o, mode="nearest")
    px_area = pixel_um * pixel_um
    mask = _remove_small(mask, params.min_object_um2 / px_area)
    mask = ~_remove_small(~mask, params.min_hole_um2 / px_area, keep_border=True)
    return mask, float(t)


def _remove_small(mask: np.ndarray, min_pixels: float, keep_border: bool = False) -> np.ndarray:
    """Drop 8-connected components of fewer than `min_pixels` pixels (those touching the border too, unless
    `keep_border`: the background around a deposit is not a hole)."""
    if min_pixels <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    small = sizes < min_pixels
    small[0] = False
    if keep_border:
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        small[border] = False
    return mask & ~small[labels]


def thumbnail(
    slide: Slide, mask_mpp: float, max_side: int, on_progress: Callable[[int, int], None] | None = None,
    threads: int = READ_THREADS, coarsest_mpp: float | None = None,
) -> tuple[np.ndarray, float]:
    """An RGB thumbnail at about `mask_mpp` um/px (at most `max_side` px), and its downsample from level 0.

    A pyramid level between `mask_mpp` and `coarsest_mpp` (when given) is read as it is, the finest such;
    otherwise the level just finer than needed is box-averaged by an integer factor `k` (a 4x pyramid's 2 um/px
    level decodes 16x the pixels of its 8 um/px one). Read in chunks of about `CHUNK` px so memory stays bounded
    whatever the slide, by `threads` threads (OpenSlide and Pillow's reduce release the GIL, and an OpenSlide
    handle may be read from several threads at once).
    """
    info = slide.info
    w0, h0 = info.dimensions
    want = max(mask_mpp / info.mpp, max(w0, h0) / max_side, 1.0)
    limit = max(want, (coarsest_mpp or 0) / info.mpp) * (1 + 1e-6)
    as_is = [i for i, d in enumerate(info.level_downsamples) if want * (1 - 1e-6) <= d <= limit]
    level = min(as_is, key=lambda i: info.level_downsamples[i]) if as_is else max(
        (i for i, d in enumerate(info.level_downsamples) if d <= want * (1 + 1e-6)), default=0,
        key=lambda i: info.level_downsamples[i])
    ds = info.level_downsamples[level]
    wl, hl = info.level_dimensions[level]
    k = max(1, int(want / ds + 0.5), math.ceil(max(wl, hl) / max_side))
    out_w, out_h = math.ceil(wl / k), math.ceil(hl / k)
    out = np.empty((out_h, out_w, 3), np.uint8)
    step = max(k, (CHUNK // k) * k)
    chunks = [(cx, cy) for cy in range(0, hl, step) for cx in range(0, wl, step)]

    def read(cx: int, cy: int) -> None:
        cw, ch = min(step, out_w * k - cx), min(step, out_h * k - cy)
        region = slide.read_rgb(round(cx * ds), round(cy * ds), level, (cw, ch))
        small = np.asarray(region.reduce(k) if k > 1 else region)
        out[cy // k: cy // k + small.shape[0], cx // k: cx // k + small.shape[1]] = small

    with ThreadPoolExecutor(max(1, min(threads, len(chunks)))) as pool:
        for n, done in enumerate(as_completed([pool.submit(read, cx, cy) for cx, cy in chunks])):
            done.result()  # an OpenSlide error in a chunk propagates
            if on_progress:
                on_progress(n + 1, len(chunks))
    return out, ds * k


def deposit_mask(
    slide: Slide, params: DepositParams = DepositParams(), on_progress: Callable[[int, int], None] | None = None
) -> DepositMask:
    """The cell-deposit mask of an open slide (reads a thumbnail; OpenSlide errors propagate)."""
    params.validate()
    if params.method == "saturation" and slide.info.grey:  # a grey image has no saturation: nothing would be found
        raise CytoError("`deposit` saturation needs colour, and this slide's pixels are grey levels: "
                        "use `deposit` grey")
    rgb, downsample = thumbnail(slide, params.mask_mpp, params.max_side, on_progress)
    pixel_um = slide.info.mpp * downsample
    mask, t = detect_deposit(rgb, pixel_um, params)
    return DepositMask(mask=mask, thumbnail=rgb, downsample=downsample, mpp=pixel_um, threshold=t, method=params.method)


def to_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255)
