"""Synthetic liquid-based Pap smears made of real cells, with every cell's place known (for tests and benchmarks).

Cells are cut out of the real crops in `../shared/data` (Herlev letterboxed JPEGs, CRIC 100 px crops): a
foreground mask (optical density above the crop's glass) inside a jittered ellipse, the component nearest the
crop's centre, holes filled, so no square crop is pasted. Each cut cell becomes a transmission image (its pixels
divided by its glass colour) and is pasted multiplicatively onto clear glass, as light passes through stacked
cells: overlapping cells darken each other and pale cytoplasm stays pale. CRIC crops carry their own glass
(their brightest pixels); Herlev crops are cell-filled, so their brightest 1% is taken as cytoplasm that passes
90% of the light.

`write_smear` lays cells over a round deposit at a density (`sparse`: a few hundred cells far apart; `medium`;
`dense`: overlapping clusters) and writes a pyramidal TIFF with its pixel size (`synthetic_slides.write_pyramid`
conventions); artefacts (a marker line, a slide label, a coverslip edge, dark debris) can be drawn too. It
returns a `Smear`: the cells' centres and a cell-pixel mask, and each artefact's mask, at level 0.
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw
from scipy import ndimage

# the real public crops it cuts cells from: `../shared/data` beside a checkout, or CYTORETRIEVE_DATA
DATA = Path(os.environ.get("CYTORETRIEVE_DATA") or Path(__file__).resolve().parents[4] / "shared" / "data")
HERLEV = DATA / "herlev_derived_jpg"
CRIC = DATA / "cric_crops_100px"
GLASS = (238, 238, 234)
MPP = 0.5  # level 0, um/px (20x)
DOWNSAMPLES = (1, 2, 8, 32)  # 0.5, 1, 4 and 16 um/px
TILE_L0 = 320  # a 320 px tile at 0.5 um/px
MIN_CELL_UM2 = 120.0  # cut pieces smaller than this are not used as cells
DENSITIES = ("sparse", "medium", "dense")
INK = (25, 95, 185)  # a blue marker pen
LABEL = (96, 92, 86)  # a paper label is opaque in transmitted light: dark grey
PRINT = (40, 38, 36)


@dataclass
class Cell:
    """A cut cell at level-0 scale: transmission (h, w, 3) in (0, 1], and its mask."""

    transmission: np.ndarray
    mask: np.ndarray

    @property
    def area_um2(self) -> float:
        return float(self.mask.sum()) * MPP * MPP


@dataclass
class Smear:
    """What was drawn: cell centres (level-0 x, y), the cell-pixel mask and artefact masks (level 0)."""

    path: Path
    size: tuple[int, int]  # width, height (level 0)
    centre: tuple[int, int]
    radius: int  # the deposit's radius, level-0 px
    centres: np.ndarray  # (n, 2) float: x, y
    cells: np.ndarray  # bool (h, w): some cell covers the pixel
    artefacts: dict[str, np.ndarray] = field(default_factory=dict)  # name -> bool (h, w)


def _jittered_ellipse(h: int, w: int, rng: np.random.Generator, fill: float = 0.47) -> np.ndarray:
    """An organic blob inscribed in an h x w box: an ellipse whose radius wobbles with the angle."""
    yy, xx = np.mgrid[0:h, 0:w]
    dy, dx = (yy - (h - 1) / 2) / (h * fill), (xx - (w - 1) / 2) / (w * fill)
    theta = np.arctan2(dy, dx)
    wobble = 1 + sum(rng.uniform(-0.06, 0.06) * np.cos(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5))
    return np.hypot(dx, dy) <= rng.uniform(0.8, 1.0) * wobble


def _content_box(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """The crop without Herlev's flat letterbox border: rows / columns whose pixels all vary."""
    flat_rows = rgb.std(axis=(1, 2)) < 1.5
    flat_cols = rgb.std(axis=(0, 2)) < 1.5
    rows, cols = np.flatnonzero(~flat_rows), np.flatnonzero(~flat_cols)
    if rows.size == 0 or cols.size == 0:
        return 0, 0, rgb.shape[1], rgb.shape[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def cut_cell(rgb: np.ndarray, white: np.ndarray, scale: float, rng: np.random.Generator) -> Cell | None:
    """The cell at the centre of a crop as a `Cell` at level-0 scale (`scale` level-0 px per crop px), or None
    when what is left is smaller than `MIN_CELL_UM2`."""
    x0, y0, x1, y1 = _content_box(rgb)
    rgb = rgb[y0:y1, x0:x1]
    h, w = rgb.shape[:2]
    t = np.clip(rgb / white, 0.02, 1.0)
    od = -np.log10(t).max(axis=2)
    blob = _jittered_ellipse(h, w, rng)
    fg = ndimage.binary_opening((od > 0.05) & blob, iterations=1)
    labels, n = ndimage.label(fg)
    if n == 0:
        return None
    centre = np.zeros((h, w), bool)
    centre[h // 3: 2 * h // 3, w // 3: 2 * w // 3] = True
    overlap = np.bincount(labels[centre], minlength=n + 1)
    overlap[0] = 0
    if overlap.max() == 0:
        return None
    mask = ndimage.binary_fill_holes(labels == int(np.argmax(overlap)))
    size = (max(4, round(w * scale)), max(4, round(h * scale)))
    t_img = Image.fromarray((t * 255).round().astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    m_img = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BILINEAR)
    cell = Cell(np.asarray(t_img).astype(np.float32) / 255, np.asarray(m_img) > 127)
    k = int(rng.integers(4))
    cell = Cell(np.rot90(cell.transmission, k), np.rot90(cell.mask, k))
    if cell.area_um2 < MIN_CELL_UM2:
        return None
    ys, xs = np.nonzero(cell.mask)
    return Cell(cell.transmission[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1],
                cell.mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1])


@functools.lru_cache(maxsize=2)
def cell_library(n_herlev: int = 150, n_cric: int = 250, seed: int = 0) -> tuple[Cell, ...]:
    """Cells cut from real crops: Herlev cells at 30-55 um, CRIC crops (those with a nucleus) at 0.23 um/px."""
    rng = np.random.default_rng(seed)
    cells: list[Cell] = []
    herlev = sorted(HERLEV.glob("*/*.jpg"))
    for p in rng.choice(herlev, min(n_herlev, len(herlev)), replace=False):
        rgb = np.asarray(Image.open(p).convert("RGB")).astype(np.float32)
        white = np.percentile(rgb.reshape(-1, 3), 99, axis=0) / 0.9
        cell = cut_cell(rgb, np.maximum(white, 1), rng.uniform(30, 55) / MPP / max(rgb.shape[:2]), rng)
        if cell is not None:
            cells.append(cell)
    with (CRIC / "manifest.csv").open() as f:
        rows = [r["file"] for r in csv.DictReader(f) if r["likely_no_nucleus"] == "0"]
    for name in rng.choice(rows, min(n_cric, len(rows)), replace=False):
        rgb = np.asarray(Image.open(CRIC / name).convert("RGB")).astype(np.float32)
        white = np.percentile(rgb.reshape(-1, 3), 99.5, axis=0)
        cell = cut_cell(rgb, np.maximum(white, 1), 0.23 / MPP, rng)
        if cell is not None:
            cells.append(cell)
    return tuple(cells)


def scatter(density: str, centre: tuple[int, int], radius: int, rng: np.random.Generator,
            n: int | None = None) -> np.ndarray:
    """Cell positions (level-0 x, y) in the deposit disc: uniform (sparse, medium) or clustered (dense)."""
    def in_disc(k: int, r: float) -> np.ndarray:
        a, d = rng.uniform(0, 2 * np.pi, k), r * np.sqrt(rng.uniform(0, 1, k))
        return np.stack([centre[0] + d * np.cos(a), centre[1] + d * np.sin(a)], axis=1)

    if density == "sparse":
        return in_disc(n or 300, radius)
    if density == "medium":
        return in_disc(n or 1500, radius)
    if density != "dense":
        raise ValueError(density)
    heads = in_disc(n or 70, radius * 0.92)
    sizes = rng.integers(15, 60, len(heads))
    spread = [h + rng.normal(0, rng.uniform(25, 70) / MPP, (s, 2)) for h, s in zip(heads, sizes)]
    pts = np.concatenate([*spread, in_disc(400, radius)])
    keep = np.hypot(pts[:, 0] - centre[0], pts[:, 1] - centre[1]) <= radius
    return pts[keep]


def paste(canvas: np.ndarray, cells_mask: np.ndarray, cell: Cell, x: float, y: float) -> tuple[float, float] | None:
    """Multiply `cell` into `canvas` centred at (x, y); its mask's centroid, or None if it does not fit whole."""
    h, w = cell.mask.shape
    x0, y0 = round(float(x) - w / 2), round(float(y) - h / 2)
    if x0 < 0 or y0 < 0 or x0 + w > canvas.shape[1] or y0 + h > canvas.shape[0]:
        return None
    region = canvas[y0:y0 + h, x0:x0 + w]
    t = np.where(cell.mask[..., None], cell.transmission, 1.0)
    region[:] = (region * t).round().clip(0, 255).astype(np.uint8)
    cells_mask[y0:y0 + h, x0:x0 + w] |= cell.mask
    cy, cx = ndimage.center_of_mass(cell.mask)
    return x0 + cx, y0 + cy


def draw_marker(canvas: np.ndarray, size: tuple[int, int], points: list[tuple[float, float]], width_um: float) -> np.ndarray:
    """A marker-pen stroke through `points` (level-0 px), `width_um` wide: ink multiplied over whatever is under it."""
    w, h = size
    img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(img).line(points, fill=255, width=int(width_um / MPP), joint="curve")
    mask = np.asarray(img) > 0
    ink = np.array(INK, np.float32) / 255
    canvas[mask] = (canvas[mask] * ink).round().astype(np.uint8)
    return mask


def draw_label(canvas: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A paper label (opaque: dark grey in transmitted light) with printed bars, in `box` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    canvas[y0:y1, x0:x1] = LABEL
    for _ in range(12):
        bx, by = int(rng.integers(x0 + 40, x1 - 200)), int(rng.integers(y0 + 40, y1 - 60))
        canvas[by:by + 30, bx:bx + int(rng.integers(40, 180))] = PRINT
    mask = np.zeros(canvas.shape[:2], bool)
    mask[y0:y1, x0:x1] = True
    return mask


def draw_edge(canvas: np.ndarray, x: int, width_um: float = 20) -> np.ndarray:
    """The coverslip's edge: a thin dark vertical line at level-0 column `x`."""
    mask = np.zeros(canvas.shape[:2], bool)
    mask[:, x: x + int(width_um / MPP)] = True
    canvas[mask] = (canvas[mask] * 0.3).astype(np.uint8)
    return mask


def draw_debris(canvas: np.ndarray, points: list[tuple[int, int]], radius_um: float = 14) -> np.ndarray:
    """Black debris: opaque dark specks (dust, pigment) of `radius_um`."""
    yy, xx = np.ogrid[0:canvas.shape[0], 0:canvas.shape[1]]
    mask = np.zeros(canvas.shape[:2], bool)
    r = radius_um / MPP
    for x, y in points:
        mask |= (xx - x) ** 2 + (yy - y) ** 2 <= r * r
    canvas[mask] = (20, 18, 18)
    return mask


def levels(canvas: np.ndarray, downsamples: tuple[int, ...] = DOWNSAMPLES) -> Iterator[np.ndarray]:
    """Level 0 and its box-averaged reductions."""
    img = Image.fromarray(canvas)
    for d in downsamples:
        yield canvas if d == 1 else np.asarray(img.reduce(d))


def write_tiff(path: Path, canvas: np.ndarray, mpp: float = MPP, downsamples: tuple[int, ...] = DOWNSAMPLES) -> Path:
    """A pyramidal tiled TIFF OpenSlide reads (each level a top-level page; `subfiletype=1` for reduced ones)."""
    with tifffile.TiffWriter(path, bigtiff=canvas.nbytes > 3 << 30) as tw:
        for i, (d, level) in enumerate(zip(downsamples, levels(canvas, downsamples))):
            ppcm = 1e4 / (mpp * d)
            tw.write(level, tile=(256, 256), photometric="rgb", compression="zlib", compressionargs={"level": 1},
                     subfiletype=1 if i else 0, resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
    return path


def draw_smear(density: str, *, deposit_mm: float = 2.5, margin_mm: float = 0.3, seed: int = 0,
               n: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int], int]:
    """Level 0 of a smear: canvas, cell mask, cell centres, deposit centre and radius (level-0 px)."""
    rng = np.random.default_rng(seed)
    library = cell_library()
    radius = int(deposit_mm * 500 / MPP)
    side = int(np.ceil((2 * radius + 2 * margin_mm * 1000 / MPP) / TILE_L0)) * TILE_L0
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = GLASS
    cells_mask = np.zeros((side, side), bool)
    centre = (side // 2, side // 2)
    centres = []
    for x, y in scatter(density, centre, radius, rng, n):
        got = paste(canvas, cells_mask, library[int(rng.integers(len(library)))], x, y)
        if got is not None:
            centres.append(got)
    return canvas, cells_mask, np.array(centres), centre, radius


def write_smear(path: Path, density: str, *, artefacts: bool = False, seed: int = 0, **kw: float) -> Smear:
    """Draw a smear (and, with `artefacts`, a marker line, a label, a coverslip edge and debris) and write it."""
    canvas, cells_mask, centres, centre, radius = draw_smear(density, seed=seed, **kw)
    side = canvas.shape[0]
    smear = Smear(path, (side, side), centre, radius, centres, cells_mask)
    if artefacts:
        rng = np.random.default_rng(seed + 1)
        cx, cy = centre
        smear.artefacts["marker"] = draw_marker(canvas, (side, side), [
            (cx + 0.55 * radius, cy - 1.3 * radius), (cx + 0.85 * radius, cy - 0.2 * radius),
            (cx + 1.3 * radius, cy + 0.4 * radius)], width_um=150)
        smear.artefacts["label"] = draw_label(canvas, (40, side - 1600, 2300, side - 40), rng)
        smear.artefacts["edge"] = draw_edge(canvas, 60)
        smear.artefacts["debris"] = draw_debris(canvas, [(side - 300, 300), (side - 500, 420), (side - 300, side - 260)])
    write_tiff(path, canvas)
    return smear


def tile_truth(smear: Smear, xs: np.ndarray, ys: np.ndarray, extent: int) -> tuple[np.ndarray, np.ndarray]:
    """Per grid tile: how many cell centres fall in it, and whether any cell pixel lies in it."""
    centres = np.zeros(len(xs), np.int64)
    touched = np.zeros(len(xs), bool)
    for i, (x, y) in enumerate(zip(xs, ys)):
        inside = ((smear.centres[:, 0] >= x) & (smear.centres[:, 0] < x + extent)
                  & (smear.centres[:, 1] >= y) & (smear.centres[:, 1] < y + extent))
        centres[i] = int(inside.sum())
        touched[i] = bool(smear.cells[y:y + extent, x:x + extent].any())
    return centres, touched
