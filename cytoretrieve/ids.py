"""Ids derived from the source, so that every job is idempotent: a slide's id is its file name without its suffix,
a tile's id is its slide and its square."""

from __future__ import annotations

import os
import re
from pathlib import Path

# File suffixes taken as slides when a folder is given (the slide backends decide what they can read): whole-slide
# formats, then camera fields (a PNG / JPEG / BMP field with `mpp` is tiled like a one-level slide).
WSI_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".btf")
FIELD_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
SLIDE_EXTENSIONS = WSI_EXTENSIONS + FIELD_EXTENSIONS


def slide_id(path: str | Path) -> str:
    """A slide's id: its file name without a known slide suffix (`a/CMU-1.svs` -> `CMU-1`)."""
    name = Path(str(path)).name
    stem, suffix = os.path.splitext(name)
    return stem if suffix.lower() in SLIDE_EXTENSIONS else name


def tile_id(slide: str, x: int, y: int, extent: int) -> str:
    """The stable id of a tile: slide id and its square in level-0 px."""
    return f"{slide}@{int(x)},{int(y)},{int(extent)}"


_TILE_ID = re.compile(r"^(.*)@(-?\d+),(-?\d+),(\d+)$")


def parse_tile_id(row_id: str) -> tuple[str, int, int, int] | None:
    """(slide, x, y, extent) of an id made by `tile_id`, or None for any other id."""
    m = _TILE_ID.match(row_id)
    return (m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))) if m else None
