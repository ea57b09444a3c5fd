"""Pyramidal tiled TIFFs written with tifffile, with a cell deposit of known area at a known pixel size.

OpenSlide (4.0.1) reads them with its generic-tiff driver when every level is its own top-level page, the
reduced ones marked `subfiletype=1` (with `subifds=` it sees one level). It exposes `openslide.mpp-x` /
`mpp-y` from the TIFF XResolution / YResolution tags when ResolutionUnit is centimeter or inch
(mpp = 10,000 / pixels per cm); with no resolution unit there is no mpp. Tiles are deflate-compressed (zlib:
no imagecodecs needed).

The standard slide (`write_standard_slide`): level 0 is 5120 x 3840 px at 0.25 um/px (40x), levels at
downsamples 1, 2, 4 and 16 (0.25, 0.5, 1 and 4 um/px). Everything drawn is aligned to 16 level-0 px, so the
4 um/px thumbnail (level 3) shows it exactly. On the 320 px / 0.5 um/px grid (640 level-0 px per tile, 8 x 6
tiles) the deposit is:
- block A: tiles columns 2-5, rows 1-3 (12 tiles), minus
  - a large hole of exactly one tile (column 3, row 2): 160 x 160 um, bigger than min_hole_um2, stays a hole;
  - a small hole of 32 x 32 um inside tile (4, 1): filled;
- block B: the left half of tile (7, 0): coverage exactly 0.5;
- specks: 8 x 8 um (removed by the median), and a 24 x 24 um blob (576 um^2 < min_object_um2: removed).
So the mask area is 4,710,400 level-0 px^2 = 0.2944 mm^2, 11 tiles have coverage 1, one 0.5, the rest 0.

The cells rule (the default) sees the same slide as cells on glass: it keeps those 12 tiles and the blob's tile
(576 um^2 of stain is more than `min_foreground_um2`, 100: cell-sized), but not the specks' (64 um^2 each) nor the
big hole's (no stain): `CELL_TILES`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

BACKGROUND = (236, 236, 232)
STAIN = (150, 80, 160)
MPP = 0.25
SIZE = (5120, 3840)  # width, height
DOWNSAMPLES = (1, 2, 4, 16)
TILE_L0 = 640  # 320 px at 0.5 um/px

BLOCK_A = (1280, 640, 3840, 2560)  # x0, y0, x1, y1 in level-0 px
BIG_HOLE = (1920, 1280, 2560, 1920)
SMALL_HOLE = (2624, 704, 2752, 832)
BLOCK_B = (4480, 0, 4800, 640)
SPECKS = [(320, 3200, 352, 3232), (640, 3296, 672, 3328)]
BLOB = (4000, 2992, 4096, 3088)

MASK_AREA_L0 = (2560 * 1920) - (640 * 640) + (320 * 640)  # level-0 px^2
MASK_AREA_MM2 = MASK_AREA_L0 * MPP * MPP / 1e6  # 0.2944
FULL_TILES = {(x * TILE_L0, y * TILE_L0) for x in range(2, 6) for y in range(1, 4)} - {(3 * TILE_L0, 2 * TILE_L0)}
HALF_TILE = (7 * TILE_L0, 0)
BLOB_TILE = (6 * TILE_L0, 4 * TILE_L0)
CELL_TILES = FULL_TILES | {HALF_TILE, BLOB_TILE}


def draw_standard(d: int = 1) -> np.ndarray:
    """The standard slide at downsample `d` (1, 2, 4, 8 or 16: everything drawn is aligned to 16 px)."""
    w, h = SIZE[0] // d, SIZE[1] // d
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BACKGROUND
    for x0, y0, x1, y1 in [BLOCK_A, BLOCK_B, *SPECKS, BLOB]:
        img[y0 // d:y1 // d, x0 // d:x1 // d] = STAIN
    for x0, y0, x1, y1 in [BIG_HOLE, SMALL_HOLE]:
        img[y0 // d:y1 // d, x0 // d:x1 // d] = BACKGROUND
    return img


def downsample(img: np.ndarray, d: int) -> np.ndarray:
    if d == 1:
        return img
    h, w = img.shape[0] // d * d, img.shape[1] // d * d
    return img[:h, :w].reshape(h // d, d, w // d, d, 3).mean(axis=(1, 3)).round().astype(np.uint8)


def write_pyramid(
    path: Path,
    img: np.ndarray | Callable[[int], np.ndarray],
    *,
    mpp: float | None = MPP,
    downsamples: tuple[int, ...] = DOWNSAMPLES,
    tile: int = 256,
) -> Path:
    """Write level 0 and its downsamples, each level a top-level tiled page; `img` is level 0 (block-averaged
    for the other levels) or a function drawing the image at a given downsample."""
    with tifffile.TiffWriter(path) as tw:
        for i, d in enumerate(downsamples):
            level = img(d) if callable(img) else downsample(img, d)
            extra = {}
            if mpp is not None:
                ppcm = 1e4 / (mpp * d)
                extra = {"resolution": (ppcm, ppcm), "resolutionunit": "CENTIMETER"}
            else:
                extra = {"resolution": (1, 1), "resolutionunit": "NONE"}
            tw.write(level, tile=(tile, tile), photometric="rgb", compression="zlib", compressionargs={"level": 1},
                     subfiletype=1 if i else 0, **extra)
    return path


def write_standard_slide(path: Path, *, mpp: float | None = MPP) -> Path:
    return write_pyramid(path, draw_standard, mpp=mpp)


def write_empty_slide(path: Path, seed: int = 0) -> Path:
    """Blank glass with mild noise (saturation <= ~10): no deposit."""
    rng = np.random.default_rng(seed)
    img = (np.array(BACKGROUND, np.int16) + rng.integers(-4, 5, (1024, 1536, 3))).clip(0, 255).astype(np.uint8)
    return write_pyramid(path, img, downsamples=(1, 4))


def truncate(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def corrupt(src: Path, dst: Path, page: int = 3) -> Path:
    """A copy of `src` whose first tile of `page` is zeroed: it opens, but reading that tile fails."""
    dst.write_bytes(src.read_bytes())
    with tifffile.TiffFile(dst) as tif:
        offset, count = tif.pages[page].dataoffsets[0], tif.pages[page].databytecounts[0]
    with dst.open("r+b") as f:
        f.seek(offset)
        f.write(b"\0" * count)
    return dst


def slide_folder(base: Path) -> dict[str, Path]:
    """The test slides, written once under `base` (reused when present): standard, nompp (the standard slide
    without resolution tags), empty (blank glass), truncated (half of the standard file), corrupt (a damaged
    tile in the thumbnail level), notslide (a PNG)."""
    base.mkdir(parents=True, exist_ok=True)
    files = {name: base / f"{name}.tiff" for name in ("standard", "nompp", "empty", "truncated", "corrupt")}
    files["notslide"] = base / "notslide.tif"
    if not files["notslide"].exists():
        write_standard_slide(files["standard"])
        write_standard_slide(files["nompp"], mpp=None)
        write_empty_slide(files["empty"])
        truncate(files["standard"], files["truncated"])
        corrupt(files["standard"], files["corrupt"])
        from PIL import Image

        Image.new("RGB", (64, 64), (200, 100, 100)).save(files["notslide"], format="PNG")
    return files
