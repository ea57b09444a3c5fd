"""The quality-control preview of a tiled slide: what the tile rule decided, visible tile by tile.

On the slide's thumbnail: the deposit region's outline (green), the kept tiles (blue squares), the tiles that
touch the region but hold too little (cells rule: foreground under `min_foreground_um2`; coverage rule: coverage
under `min_coverage`; orange), the other tiles of the region (light grey), and the artefacts the cells rule
excluded (ink, debris, label, coverslip edge) tinted magenta, and the blurred tiles in red: those under `min_focus`
(dropped), or, without it, kept tiles under `focus.BLURRED`. The caption gives the counts. One PNG per slide,
`<slide id>.png`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from cytoretrieve.sources.slides.rules import Decision

OUTLINE = (0, 200, 0)
TILE = (30, 90, 255)
TOO_SMALL = (255, 140, 0)
GRID = (200, 200, 200)
EXCLUDED = (255, 0, 255)
BLURRED = (220, 0, 0)
LEGEND = ("blue: kept, orange: too little to keep, grey: rest of the region, green: deposit region, magenta: excluded, "
          "red: blurred")
LINE_PX = 14


def _scale(h: int, w: int) -> float:
    """Small thumbnails are enlarged to about 1200 px, large ones shrunk to at most 2048 px."""
    side = max(h, w)
    return 1200 / side if side < 1200 else min(1.0, 2048 / side)


def _resized(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0


def _pixels(decision: Decision, size: tuple[int, int]) -> np.ndarray:
    """The thumbnail at `size`, artefacts tinted."""
    pixels = np.asarray(Image.fromarray(decision.thumbnail).resize(size, Image.Resampling.BILINEAR)).copy()
    if decision.artefacts is not None and decision.artefacts.any():
        excluded = _resized(decision.artefacts > 0, size)
        pixels[excluded] = (pixels[excluded] * 0.45 + np.array(EXCLUDED) * 0.55).astype(np.uint8)
    return pixels


def _outline(decision: Decision, size: tuple[int, int]) -> np.ndarray:
    """The region's inner edge, 2 px wide, at `size`."""
    region = _resized(decision.region, size)
    return region & ~ndimage.binary_erosion(region, structure=np.ones((3, 3), bool), iterations=2, border_value=0)


def _draw_tiles(draw: ImageDraw.ImageDraw, decision: Decision, f: float) -> None:
    """Region tiles in grey, then too-small ones in orange, then kept ones in blue, then blurred ones in red."""
    grid = decision.grid
    extent = grid.choice.extent * f
    width = 2 if extent >= 24 else 1
    blurred = grid.blurred if grid.blurred is not None else np.zeros(grid.xs.size, bool)
    too_small = grid.in_region & ~grid.kept & (grid.coverage > 0) & ~blurred
    for which, colour, w in ((grid.in_region & ~grid.kept & ~too_small & ~blurred, GRID, 1),
                             (too_small, TOO_SMALL, 1), (grid.kept & ~blurred, TILE, width),
                             (blurred, BLURRED, width)):
        for x, y in zip(grid.xs[which], grid.ys[which]):
            x0, y0 = x * f, y * f
            draw.rectangle([x0, y0, x0 + extent - 1, y0 + extent - 1], outline=colour, width=w)


def render_preview(decision: Decision, caption: str) -> Image.Image:
    """The preview image: the decision drawn on the thumbnail, `caption` (lines) and the legend above it."""
    h, w = decision.thumbnail.shape[:2]
    s = _scale(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    image = Image.fromarray(_pixels(decision, size))
    _draw_tiles(ImageDraw.Draw(image), decision, s / decision.downsample)
    pixels = np.asarray(image).copy()
    pixels[_outline(decision, size)] = OUTLINE  # on top of the tiles: the region's edge stays visible
    image = Image.fromarray(pixels)
    lines = [*caption.splitlines(), LEGEND]
    top = LINE_PX * len(lines) + 6
    canvas = Image.new("RGB", (image.width, image.height + top), "white")
    canvas.paste(image, (0, top))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 3 + i * LINE_PX), line, fill=(0, 0, 0))
    return canvas


def write_preview(decision: Decision, caption: str, folder: str | Path, slide: str) -> Path:
    """Write `<folder>/<slide>.png` and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{slide}.png"
    render_preview(decision, caption).save(out)
    return out
