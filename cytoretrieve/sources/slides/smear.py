"""Cell foreground, artefacts and the deposit region of a cytology slide (a liquid-based Pap smear).

Pap smears are cells scattered on clear glass, often far apart, with pale cytoplasm around a dark nucleus: a rule
made for tissue (what fraction of a tile is stained) drops most of them. This module finds, on one detection
image of 4-8 um/px (`detect_mpp` 4: a 20 um cell is 5 px across; a pyramid level up to `coarsest_mpp` 8 is read
as it is, else the level just finer is box-averaged to 4; never level 0 of a large slide):

1. **glass**: the colour of clear glass, per channel the most common value among the brighter half of the pixels;
2. **not glass**: any channel at least `min_od` optical density darker than glass (pale cytoplasm absorbs in one
   channel: cyan cytoplasm in red), or HSV saturation at least `min_saturation` above the glass's;
3. **artefacts**, excluded from the foreground and grown by `margin_um` (their pale fringes):
   - `ink`: pen and marker (saturation >= `ink_saturation`, not the orange of Orange G, in pieces of at least
     `ink_min_um2`: a hyperchromatic nucleus is as saturated, never that large);
   - `debris`: dark grey-black objects (HSV value <= `dark_value`, saturation below `dark_saturation`: stained
     nuclei are blue-purple even where darkest) mostly surrounded by glass (a dark cell cluster is surrounded by
     cytoplasm, debris and pigment by glass), so dense cell groups stay;
   - `label`: a large solid block (>= `block_min_mm2`, filling >= `block_fill` of its bounding box: a slide label
     is opaque in transmitted light; a round deposit fills at most pi/4 of its box);
   - `edge`: a long thin line (>= `line_min_mm` long, on average <= `line_max_width_um` wide: the coverslip edge);
4. **foreground**: not glass, minus artefacts, minus specks smaller than `min_object_um2`;
5. **region** (where cells were deposited): the foreground pooled to `region_mpp`, closed with a disc of radius
   `region_close_um` (bridging the glass between sparse cells), holes filled, pieces smaller than
   `min_region_mm2` dropped: the envelope of the spot, not the cells' outlines.

Grey-level slides and fields (`SlideInfo.grey`: Cervix93, the ISBI stack) work on purpose: their saturation is 0,
so the saturation tests (stain, ink) find nothing and the optical density test alone finds the cells; ink cannot
be told from cells there. The `coverage` rule's `saturation` method, which has nothing else, refuses them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.slides.deposit import thumbnail
from cytoretrieve.sources.slides.reader import Slide

ARTEFACTS = ("ink", "debris", "label", "edge")  # artefact codes are 1 + their index here
ORANGE_HUE = (10.0, 50.0)  # degrees: Orange G, the one strongly saturated Pap stain


@dataclass(frozen=True)
class SmearParams:
    """Settings of the cell-foreground detection; lengths in um, areas in um^2 or mm^2, so they hold at any
    scan resolution; colour levels 0-255."""

    detect_mpp: float = 4.0
    coarsest_mpp: float = 8.0  # a pyramid level up to this coarse is read as is rather than averaging a finer one
    max_side: int = 8192  # the detection image is coarser than detect_mpp when the slide would exceed this
    min_od: float = 0.04
    min_saturation: int = 18
    min_object_um2: float = 50.0
    ink_saturation: int = 160
    ink_min_um2: float = 20000.0
    dark_value: int = 45
    dark_saturation: int = 80
    debris_glass: float = 0.6
    block_min_mm2: float = 0.5
    block_fill: float = 0.9
    block_open_um: float = 100.0
    line_min_mm: float = 1.5
    line_max_width_um: float = 60.0
    margin_um: float = 12.0
    region_mpp: float = 32.0
    region_close_um: float = 400.0
    min_region_mm2: float = 0.2

    def validate(self) -> None:
        for name in ("detect_mpp", "coarsest_mpp", "min_od", "region_mpp", "line_min_mm"):
            if getattr(self, name) <= 0:
                raise CytoError(f"`{name}` must be positive, not {getattr(self, name)}")
        if self.max_side < 16:
            raise CytoError(f"`max_side` must be at least 16 px, not {self.max_side}")
        if not 0 <= self.debris_glass <= 1 or not 0 < self.block_fill <= 1:
            raise CytoError("`debris_glass` must be in [0, 1] and `block_fill` in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SmearMask:
    """The detection image and what was found on it; one pixel = `downsample` level-0 px = `mpp` um.

    `artefacts` holds 0 (none) or 1 + the index of the artefact kind in `ARTEFACTS`; `region` is at its own
    resolution (`region_downsample` level-0 px per px)."""

    thumbnail: np.ndarray  # uint8 (h, w, 3)
    downsample: float
    mpp: float
    glass: tuple[int, int, int]
    foreground: np.ndarray  # bool (h, w)
    artefacts: np.ndarray  # uint8 (h, w)
    region: np.ndarray  # bool (rh, rw)
    region_downsample: float

    @property
    def foreground_mm2(self) -> float:
        return float(self.foreground.sum()) * self.mpp * self.mpp / 1e6

    @property
    def region_mm2(self) -> float:
        um = self.region_downsample * self.mpp / self.downsample
        return float(self.region.sum()) * um * um / 1e6

    def artefact_mm2(self) -> dict[str, float]:
        counts = np.bincount(self.artefacts.ravel(), minlength=len(ARTEFACTS) + 1)
        return {name: float(counts[i + 1]) * self.mpp * self.mpp / 1e6 for i, name in enumerate(ARTEFACTS)}


def glass_colour(rgb: np.ndarray) -> np.ndarray:
    """Per channel, the most common value among pixels at or above that channel's median (glass is the one tight
    peak of a smear's histogram), on every 4th pixel of every 4th row: plenty for one colour."""
    out = np.empty(3, np.int64)
    sample = rgb[::4, ::4]
    for c in range(3):
        hist = np.bincount(sample[..., c].ravel(), minlength=256)
        median = int(np.searchsorted(np.cumsum(hist), hist.sum() / 2))
        out[c] = median + int(np.argmax(hist[median:]))
    return out


def channels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV value (the brightest channel) and saturation, both uint8 0-255: elementwise over the channel planes,
    several times faster than reducing the interleaved last axis."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    spread = (mx - np.minimum(np.minimum(r, g), b)).astype(np.uint16)
    spread *= 255
    spread //= np.maximum(mx, 1)
    return mx, spread.astype(np.uint8)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees of an (n, 3) array of pixels."""
    v = rgb.astype(np.float64)
    mx, mn = v.max(1), v.min(1)
    d = np.maximum(mx - mn, 1e-9)
    r, g, b = v[:, 0], v[:, 1], v[:, 2]
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return h * 60.0


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(mask, structure=np.ones((3, 3), bool))


def _select(labels: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """The mask of the components whose flag is set (label 0, the background, never); no gather when none is."""
    flags[0] = False
    return flags[labels] if flags.any() else np.zeros(labels.shape, bool)


def _bbox(mask: np.ndarray, pad: int) -> tuple[slice, slice] | None:
    """The bounding box of `mask`'s pixels grown by `pad` (clipped), or None when it has none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(max(0, rows[0] - pad), rows[-1] + 1 + pad), slice(max(0, cols[0] - pad), cols[-1] + 1 + pad)


def grow(mask: np.ndarray, r: int) -> np.ndarray:
    """`mask` dilated by a (2r + 1) px square (a 3 x 3 square `r` times), inside its bounding box only; two 1-D
    passes whatever `r`."""
    box = _bbox(mask, r + 1)
    out = np.zeros(mask.shape, bool)
    if box is not None:
        out[box] = ndimage.maximum_filter(mask[box], size=2 * r + 1, mode="constant")
    return out


def find_ink(rgb: np.ndarray, sat: np.ndarray, params: SmearParams, px_um2: float) -> np.ndarray:
    """Marker and pen: large pieces of strongly saturated colour that is not Orange G."""
    candidate = sat >= params.ink_saturation
    if not candidate.any():
        return candidate
    hue = _hue(rgb[candidate])
    candidate[candidate] = ~((hue >= ORANGE_HUE[0]) & (hue <= ORANGE_HUE[1]))
    labels, n = _components(candidate)
    return _select(labels, np.bincount(labels.ravel(), minlength=n + 1) >= params.ink_min_um2 / px_um2)


def find_debris(mx: np.ndarray, sat: np.ndarray, not_glass: np.ndarray, params: SmearParams) -> np.ndarray:
    """Dark grey-black objects whose surroundings (a 2 px ring) are mostly glass; objects closer than that are
    judged together."""
    dark = (mx <= params.dark_value) & (sat < params.dark_saturation)
    box = _bbox(dark, 3)
    if box is None:
        return dark
    dark_box = dark[box]
    near, n = _components(grow(dark_box, 2))
    at = np.flatnonzero(near)  # the objects and their rings: a small share of the image
    ring = ~dark_box.ravel()[at]
    owner = near.ravel()[at][ring]
    total = np.bincount(owner, minlength=n + 1)
    glass = np.bincount(owner[~not_glass[box].ravel()[at][ring]], minlength=n + 1)
    out = np.zeros(dark.shape, bool)
    out[box] = dark_box & _select(near, glass >= params.debris_glass * np.maximum(total, 1))
    return out


def find_blocks(labels: np.ndarray, area: np.ndarray, slices: list, params: SmearParams, pixel_um: float) -> np.ndarray:
    """Label blocks: inside each large piece of not-glass, what survives an opening of `block_open_um` (thin
    things touching it, such as a coverslip edge, are cut off) and is large and solid."""
    blocks = np.zeros(labels.shape, bool)
    min_px = params.block_min_mm2 * 1e6 / pixel_um**2
    k = max(3, round(params.block_open_um / pixel_um) | 1)
    for i in np.flatnonzero(area >= min_px):
        if i == 0:
            continue
        sy, sx = slices[i - 1]
        piece = labels[sy, sx] == i
        opened = ndimage.maximum_filter(ndimage.minimum_filter(piece, size=k, mode="constant"), size=k)
        sub, n = _components(opened)
        sub_area = np.bincount(sub.ravel(), minlength=n + 1)
        for j, (ry, rx) in enumerate(ndimage.find_objects(sub), start=1):
            box = (ry.stop - ry.start) * (rx.stop - rx.start)
            if sub_area[j] >= min_px and sub_area[j] >= params.block_fill * box:
                blocks[sy, sx] |= sub == j
    return blocks


def find_shapes(not_glass: np.ndarray, params: SmearParams, pixel_um: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pieces of not-glass by shape: (label blocks, coverslip-edge lines, specks)."""
    labels, n = _components(not_glass)
    area = np.bincount(labels.ravel(), minlength=n + 1)
    slices = ndimage.find_objects(labels)
    block = find_blocks(labels, area, slices, params, pixel_um)
    if block.any():  # what was attached to a block is looked at on its own
        labels, n = _components(not_glass & ~block)
        area = np.bincount(labels.ravel(), minlength=n + 1)
        slices = ndimage.find_objects(labels)
    line = np.zeros(n + 1, bool)
    min_long = params.line_min_mm * 1e3 / pixel_um
    for i in np.flatnonzero(area >= min_long):  # a line at least 1 px wide has at least its length in px
        if i:
            sy, sx = slices[i - 1]
            long_px = max(sy.stop - sy.start, sx.stop - sx.start)
            line[i] = long_px >= min_long and area[i] * pixel_um / long_px <= params.line_max_width_um
    return block, _select(labels, line), _select(labels, area * pixel_um**2 < params.min_object_um2)


def find_region(foreground: np.ndarray, params: SmearParams, pixel_um: float) -> tuple[np.ndarray, int]:
    """The deposit region at about `region_mpp` um/px (max-pooled, so every foreground pixel's cell is in it),
    and the pooling factor."""
    f = max(1, round(params.region_mpp / pixel_um))
    h, w = foreground.shape
    ph, pw = -(-h // f) * f, -(-w // f) * f
    padded = np.zeros((ph, pw), bool)
    padded[:h, :w] = foreground
    pooled = padded.reshape(ph // f, f, pw // f, f).any(axis=(1, 3))
    r = params.region_close_um / (pixel_um * f)
    pad = int(np.ceil(r)) + 2
    big = np.pad(pooled, pad)
    if big.any():
        dilated = ndimage.distance_transform_edt(~big) <= r
        big = ndimage.distance_transform_edt(dilated) > r
    region = ndimage.binary_fill_holes(big[pad:-pad, pad:-pad] | pooled)
    labels, n = _components(region)
    keep = np.bincount(labels.ravel(), minlength=n + 1) * (pixel_um * f) ** 2 >= params.min_region_mm2 * 1e6
    keep[0] = False
    return keep[labels], f


def detect_smear(rgb: np.ndarray, pixel_um: float, params: SmearParams = SmearParams()) -> dict[str, Any]:
    """Glass colour, foreground, artefact codes and the region of an RGB detection image whose pixels are
    `pixel_um` um wide (see the module docstring); a dict of `SmearMask`'s fields but the image's own."""
    params.validate()
    glass = glass_colour(rgb)
    mx, sat = channels(rgb)
    limit = glass * 10.0 ** -params.min_od
    not_glass = (rgb[..., 0] <= limit[0]) | (rgb[..., 1] <= limit[1]) | (rgb[..., 2] <= limit[2])
    glass_sat = (glass.max() - glass.min()) * 255 / max(int(glass.max()), 1)
    not_glass |= sat >= glass_sat + params.min_saturation
    px_um2 = pixel_um * pixel_um
    codes = np.zeros(rgb.shape[:2], np.uint8)
    block, line, speck = find_shapes(not_glass, params, pixel_um)
    for code, found in enumerate((find_ink(rgb, sat, params, px_um2), find_debris(mx, sat, not_glass, params),
                                  block, line), start=1):
        if found.any():
            codes[grow(found, max(1, round(params.margin_um / pixel_um))) & (codes == 0)] = code
    foreground = not_glass & (codes == 0) & ~speck
    region, f = find_region(foreground, params, pixel_um)
    return {"glass": tuple(int(g) for g in glass), "foreground": foreground, "artefacts": codes,
            "region": region, "region_factor": f}


def smear_mask(
    slide: Slide, params: SmearParams = SmearParams(), on_progress: Callable[[int, int], None] | None = None
) -> SmearMask:
    """The cell foreground, artefacts and deposit region of an open slide (reads one detection image)."""
    params.validate()
    rgb, downsample = thumbnail(slide, params.detect_mpp, params.max_side, on_progress,
                                coarsest_mpp=params.coarsest_mpp)
    pixel_um = slide.info.mpp * downsample
    found = detect_smear(rgb, pixel_um, params)
    return SmearMask(thumbnail=rgb, downsample=downsample, mpp=pixel_um, glass=found["glass"],
                     foreground=found["foreground"], artefacts=found["artefacts"], region=found["region"],
                     region_downsample=downsample * found["region_factor"])
