"""The preview of a `cells` run on one slide or field: every nucleus found, circled on the picture, and, when a
points file was given, the points it missed and the detections no point matches.

Drawn on the field itself (or the slide's overview), enlarged or shrunk to about `LONG_SIDE` px: found nuclei in
blue (circle radius from the nucleus area), matched ones in green, detections without a point in orange, and
points no detection reached as red crosses. The caption gives the counts. One PNG per slide, `<slide id>.png`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FOUND = (30, 90, 255)
MATCHED = (0, 170, 0)
EXTRA = (255, 140, 0)
MISSED = (230, 0, 0)
LONG_SIDE = 1400
CAPTION_PX = 34


def write_cells_preview(image: np.ndarray, downsample: float, nuclei_xy: np.ndarray, areas_um2: np.ndarray,
                        mpp: float, caption: str, folder: str | Path, name: str, *,
                        matched: np.ndarray | None = None, missed_xy: np.ndarray | None = None) -> Path:
    """Draw nuclei (level-0 px `nuclei_xy`, `areas_um2`) on `image` (uint8 RGB or grey at `downsample` level-0 px
    per px); `matched` (bool per nucleus) and `missed_xy` (level-0 px) come from a points file. Returns the PNG."""
    rgb = np.asarray(image)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    h, w = rgb.shape[:2]
    scale = LONG_SIDE / max(h, w)
    canvas = Image.fromarray(np.ascontiguousarray(rgb[..., :3])).resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    out = Image.new("RGB", (canvas.width, canvas.height + CAPTION_PX), (255, 255, 255))
    out.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(out)
    px = scale / downsample  # preview px per level-0 px
    for i, (x, y) in enumerate(np.asarray(nuclei_xy, dtype=float).reshape(-1, 2)):
        area = float(areas_um2[i]) if i < len(areas_um2) and math.isfinite(float(areas_um2[i])) else 30.0
        r = max(3.0, math.sqrt(area / math.pi) / mpp * px)
        colour = FOUND if matched is None else (MATCHED if matched[i] else EXTRA)
        draw.ellipse((x * px - r, y * px - r, x * px + r, y * px + r), outline=colour, width=2)
    for x, y in np.asarray(missed_xy if missed_xy is not None else np.zeros((0, 2)), dtype=float).reshape(-1, 2):
        d = 6
        draw.line((x * px - d, y * px - d, x * px + d, y * px + d), fill=MISSED, width=3)
        draw.line((x * px - d, y * px + d, x * px + d, y * px - d), fill=MISSED, width=3)
    legend = ("blue: nucleus found" if matched is None else
              "green: found and marked, orange: found, no point, red x: point missed")
    draw.text((6, canvas.height + 4), caption, fill=(0, 0, 0))
    draw.text((6, canvas.height + 18), legend, fill=(80, 80, 80))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    out.save(path)
    return path
