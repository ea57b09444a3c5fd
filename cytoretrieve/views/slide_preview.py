"""The quality-control preview of a tiled slide: its thumbnail, the deposit outline (green), the kept tiles (blue
squares) and the rest of the grid (light grey), with a caption line. One PNG per slide, `<slide id>.png`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from cytoretrieve.sources.slides.deposit import DepositMask
from cytoretrieve.sources.slides.grid import Grid

OUTLINE = (0, 200, 0)
TILE = (30, 90, 255)
GRID = (200, 200, 200)
CAPTION_PX = 18


def _scale(h: int, w: int) -> float:
    """Small thumbnails are enlarged to about 1200 px, large ones shrunk to at most 2048 px."""
    side = max(h, w)
    return 1200 / side if side < 1200 else min(1.0, 2048 / side)


def render_preview(mask: DepositMask, grid: Grid | None, caption: str) -> Image.Image:
    h, w = mask.mask.shape
    s = _scale(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    image = Image.fromarray(mask.thumbnail).resize(size, Image.Resampling.BILINEAR)
    big = np.asarray(Image.fromarray(mask.mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    edge = big & ~ndimage.binary_erosion(big, structure=np.ones((3, 3), bool), iterations=2, border_value=0)
    pixels = np.asarray(image).copy()
    pixels[edge] = OUTLINE
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    if grid is not None:
        f = s / mask.downsample
        extent = grid.choice.extent * f
        width = 2 if extent >= 24 else 1
        for x, y, kept in zip(grid.xs, grid.ys, grid.kept):  # the whole grid, faint
            if not kept:
                x0, y0 = x * f, y * f
                draw.rectangle([x0, y0, x0 + extent - 1, y0 + extent - 1], outline=GRID, width=1)
        for x, y, _ in grid.tiles():
            x0, y0 = x * f, y * f
            draw.rectangle([x0, y0, x0 + extent - 1, y0 + extent - 1], outline=TILE, width=width)
    canvas = Image.new("RGB", (image.width, image.height + CAPTION_PX), "white")
    canvas.paste(image, (0, CAPTION_PX))
    ImageDraw.Draw(canvas).text((4, 3), caption, fill=(0, 0, 0))
    return canvas


def write_preview(mask: DepositMask, grid: Grid | None, caption: str, folder: str | Path, slide: str) -> Path:
    """Write `<folder>/<slide>.png` and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{slide}.png"
    render_preview(mask, grid, caption).save(out)
    return out
