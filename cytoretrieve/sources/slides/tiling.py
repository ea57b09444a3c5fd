"""One slide to tile rows: open it, find the cell deposit, lay the grid, and list the tiles it keeps.

Nothing here writes: `cytoretrieve.tile` (the `tile` job) stores the rows, the preview and the overview.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openslide

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.cohort.labels import SlideLabel
from cytoretrieve.sources.slides.deposit import DepositMask, DepositParams, deposit_mask
from cytoretrieve.sources.slides.grid import Grid, GridSpec, make_grid
from cytoretrieve.sources.slides.reader import Slide, SlideInfo
from cytoretrieve.ids import tile_id

SLIDE_ERRORS = (CytoError, openslide.OpenSlideError, OSError)  # skip the slide, not the job


@dataclass
class TiledSlide:
    """What tiling one slide gives: its summary line, its rows, and what they came from (preview, overview)."""

    result: SlideResult
    rows: list[dict[str, Any]]
    mask: DepositMask
    grid: Grid
    info: SlideInfo


@dataclass
class SlideResult:
    """One line of the summary. `status`: tiled, empty (0 tiles: a warning), done (already in the table) or
    skipped (`reason` says why)."""

    slide: str
    path: str
    status: str
    tiles: int = 0
    grid_tiles: int = 0
    deposit_mm2: float | None = None
    level: int | None = None
    read_size: int | None = None
    tile_mpp: float | None = None
    slide_mpp: float | None = None
    mpp_source: str | None = None
    label: str | None = None
    reason: str | None = None
    preview: str | None = None
    seconds: float = 0.0



def tile_slide(
    path: Path,
    spec: GridSpec,
    params: DepositParams,
    *,
    table: str,
    label: SlideLabel | None = None,
    mpp: float | None = None,
    objective: float | None = None,
    cache: openslide.OpenSlideCache | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> TiledSlide:
    """Tile one slide: its summary line, its rows, and the deposit mask and grid they came from (for the preview
    and the stored overview). Nothing is written. Errors propagate (see SLIDE_ERRORS)."""
    start = time.perf_counter()
    with Slide(path, mpp=mpp, objective=objective, cache=cache) as slide:
        info = slide.info
        slide.choose_level(spec.target_mpp, spec.tile_size)  # a slide too coarse for the target fails before reading
        mask = deposit_mask(slide, params, on_progress)
    grid = make_grid(info, spec, mask)
    c = grid.choice
    result = SlideResult(
        slide=info.id, path=info.path, status="tiled", tiles=grid.n_kept, grid_tiles=int(grid.xs.size),
        deposit_mm2=mask.area_mm2, level=c.level, read_size=c.read_size, tile_mpp=c.tile_mpp,
        slide_mpp=info.mpp, mpp_source=info.mpp_source, label=label.label if label else None,
    )
    if grid.xs.size == 0:
        result.status, result.reason = "empty", "slide smaller than one tile: 0 tiles"
    elif not mask.mask.any():
        result.status, result.reason = "empty", "no cell deposit found: 0 tiles"
    elif grid.n_kept == 0:
        result.status = "empty"
        result.reason = f"no tile reaches coverage {spec.min_coverage:g} of the deposit: 0 tiles"
    elif c.level_mpp > spec.target_mpp * 1.02:
        result.reason = f"slide is {c.level_mpp:.3g} um/px at its finest level: tiles upsampled to {spec.target_mpp:g}"
    rows = [
        {
            "id": tile_id(info.id, x, y, c.extent), "dataset": table, "path": info.path,
            "label": label.label if label else None, "binary": label.binary if label else None,
            "group": info.id, "slide": info.id, "x": x, "y": y, "level": c.level, "tile_size": spec.tile_size,
            "mpp": c.tile_mpp, "read_size": c.read_size, "extent": c.extent, "coverage": cov, "source": "grid",
            "annotation": None,
        }
        for x, y, cov in grid.tiles()
    ]
    result.seconds = time.perf_counter() - start
    return TiledSlide(result, rows, mask, grid, info)
