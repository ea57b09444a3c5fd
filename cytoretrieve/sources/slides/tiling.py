"""One slide to tile rows: open it, choose the read level (once), lay the grid, let the tile rule decide which
tiles are kept (`rules.py`), and list them.

Nothing here writes: `cytoretrieve.jobs.tile` (the `tile` job) stores the rows, the preview and the overview.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cytoretrieve.errors import CytoError
from cytoretrieve.ids import tile_id
from cytoretrieve.sources.cohort.labels import SlideLabel
from cytoretrieve.sources.slides.backends import SlideReadError
from cytoretrieve.sources.slides.grid import Grid, GridSpec, make_grid
from cytoretrieve.sources.slides.reader import Slide, SlideInfo
from cytoretrieve.sources.slides.rules import RULES, Decision, Params, rule_params

SLIDE_ERRORS = (CytoError, SlideReadError, OSError)  # skip the slide, not the job


@dataclass
class SlideResult:
    """One line of the summary. `status`: tiled, empty (0 tiles: a warning), done (already in the table) or
    skipped (`reason` says why). `tiles` kept of `grid_tiles`, `region_tiles` of them touching the deposit
    region (`deposit_mm2`); `foreground_mm2` of cells and `artefact_mm2` excluded (cells rule); `thresholds`:
    the values the rule used on this slide (the glass colour it measured, ...)."""

    slide: str
    path: str
    status: str
    tiles: int = 0
    grid_tiles: int = 0
    region_tiles: int = 0
    rule: str | None = None
    deposit_mm2: float | None = None
    foreground_mm2: float | None = None
    artefact_mm2: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    level: int | None = None
    read_size: int | None = None
    tile_mpp: float | None = None
    slide_mpp: float | None = None
    mpp_source: str | None = None
    label: str | None = None
    reason: str | None = None
    preview: str | None = None
    seconds: float = 0.0


@dataclass
class TiledSlide:
    """What tiling one slide gives: its summary line, its rows, and what they came from (preview, overview)."""

    result: SlideResult
    rows: list[dict[str, Any]]
    decision: Decision
    info: SlideInfo

    @property
    def grid(self) -> Grid:
        return self.decision.grid


def _status(result: SlideResult, decision: Decision, spec: GridSpec) -> None:
    """Mark a slide empty (with why) or note that its tiles are upsampled."""
    grid, c = decision.grid, decision.grid.choice
    if grid.xs.size == 0:
        result.status, result.reason = "empty", "slide smaller than one tile: 0 tiles"
    elif not decision.region.any():
        result.status, result.reason = "empty", "no cell deposit found: 0 tiles"
    elif grid.n_kept == 0:
        result.status, result.reason = "empty", RULES[spec.rule].empty(spec)
    elif c.level_mpp > spec.target_mpp * 1.02:
        result.reason = f"slide is {c.level_mpp:.3g} um/px at its finest level: tiles upsampled to {spec.target_mpp:g}"


def tile_slide(
    path: Path,
    spec: GridSpec,
    params: Params | None = None,
    *,
    table: str,
    label: SlideLabel | None = None,
    mpp: float | None = None,
    objective: float | None = None,
    cache_bytes: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> TiledSlide:
    """Tile one slide with `spec.rule` (`params`: that rule's settings, its defaults when None): its summary
    line, its rows, and the rule's decision (for the preview and the stored overview). Nothing is written.
    Errors propagate (see SLIDE_ERRORS). `cache_bytes` sizes the per-process cache of decoded tiles."""
    start = time.perf_counter()
    params = rule_params(spec, params)
    with Slide(path, mpp=mpp, objective=objective, cache_bytes=cache_bytes) as slide:
        info = slide.info
        c = slide.choose_level(spec.target_mpp, spec.tile_size)  # a slide too coarse fails before reading
        decision = RULES[spec.rule].apply(slide, make_grid(info, spec, c), spec, params, on_progress)
    grid = decision.grid
    result = SlideResult(
        slide=info.id, path=info.path, status="tiled", tiles=grid.n_kept, grid_tiles=int(grid.xs.size),
        region_tiles=grid.n_region, rule=spec.rule, deposit_mm2=decision.region_mm2,
        foreground_mm2=decision.foreground_mm2, artefact_mm2=decision.artefact_mm2, thresholds=decision.thresholds,
        level=c.level, read_size=c.read_size, tile_mpp=c.tile_mpp, slide_mpp=info.mpp, mpp_source=info.mpp_source,
        label=label.label if label else None,
    )
    _status(result, decision, spec)
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
    return TiledSlide(result, rows, decision, info)
