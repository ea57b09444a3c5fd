"""One slide to tile rows: open it, choose the read level (once), lay the grid, let the tile rule decide which
tiles are kept (`rules.py`), score the focus of each kept tile (`focus.py`, read at the tile's read resolution
from the focal plane `plane` asks for: `planes.py`), drop those under `min_focus`, and list them.

Nothing here writes: `cytoretrieve.jobs.tile` (the `tile` job) stores the rows, the preview and the overview.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.ids import tile_id
from cytoretrieve.sources.cohort.labels import SlideLabel
from cytoretrieve.sources.slides.backends import SlideReadError
from cytoretrieve.sources.slides.focus import BLURRED, focus_score
from cytoretrieve.sources.slides.grid import Grid, GridSpec, make_grid
from cytoretrieve.sources.slides.planes import PlaneSetting
from cytoretrieve.sources.slides.reader import Slide, SlideInfo
from cytoretrieve.sources.slides.rules import RULES, Decision, Params, rule_params

SLIDE_ERRORS = (CytoError, SlideReadError, OSError)  # skip the slide, not the job
FOCUS_THREADS = 2  # tiles read and scored at once
PLANES_CACHE_BYTES = 256 << 20  # decoded-tile cache when every plane of a tile is read (best, edf)


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
    blurred: int = 0  # kept tiles under the blur threshold (`min_focus`, dropped; else `focus.BLURRED`, kept)
    focus_median: float | None = None  # of the tiles kept
    planes: int = 1  # the slide's focal planes
    grey: bool = False  # grey-level pixels


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
    elif grid.n_kept == 0 and grid.blurred is not None and grid.blurred.any():
        result.status, result.reason = "empty", f"all {int(grid.blurred.sum())} tiles are under `min_focus`: 0 tiles"
    elif grid.n_kept == 0:
        result.status, result.reason = "empty", RULES[spec.rule].empty(spec)
    elif c.level_mpp > spec.target_mpp * 1.02:
        result.reason = f"slide is {c.level_mpp:.3g} um/px at its finest level: tiles upsampled to {spec.target_mpp:g}"


def score_focus(slide: Slide, grid: Grid, plane: PlaneSetting = None, min_focus: float | None = None,
                threads: int = FOCUS_THREADS) -> None:
    """Read every kept tile of `grid` (at its read resolution, from the planes `plane` asks for) and set
    `grid.focus` (NaN: not kept, or too little stain to score), `grid.plane` (the plane read) and `grid.blurred`
    (kept tiles under `min_focus`, which are no longer kept; under `focus.BLURRED` when it is None)."""
    c = grid.choice
    idx = np.flatnonzero(grid.kept)

    def one(i: int) -> tuple[float, int]:
        image, used = slide.read_tile_plane(grid.xs[i], grid.ys[i], c.level, c.read_size, c.read_size, plane=plane)
        value = focus_score(np.asarray(image))
        return (math.nan if value is None else value), used

    with ThreadPoolExecutor(max(1, min(threads, idx.size))) as pool:
        found = list(pool.map(one, idx))
    grid.focus = np.full(grid.xs.size, np.nan)
    grid.plane = np.zeros(grid.xs.size, np.int16)
    if found:
        grid.focus[idx] = [f for f, _ in found]
        grid.plane[idx] = [p for _, p in found]
    with np.errstate(invalid="ignore"):
        grid.blurred = grid.kept & (grid.focus < (BLURRED if min_focus is None else min_focus))
    if min_focus is not None:
        grid.kept = grid.kept & ~grid.blurred


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
    focus: bool = True,
    plane: PlaneSetting = None,
    min_focus: float | None = None,
) -> TiledSlide:
    """Tile one slide with `spec.rule` (`params`: that rule's settings, its defaults when None): its summary
    line, its rows, and the rule's decision (for the preview and the stored overview). Nothing is written.
    Errors propagate (see SLIDE_ERRORS). `cache_bytes` sizes the per-process cache of decoded tiles.

    With `focus`, each kept tile is read from the focal plane(s) `plane` asks for (`planes.py`) and scored
    (`score_focus`); tiles under `min_focus` are dropped (a tile with too little stain to score is kept)."""
    start = time.perf_counter()
    params = rule_params(spec, params)
    if min_focus is not None and not focus:
        raise CytoError("`min_focus` needs focus scores: leave `focus` on")
    if plane in ("best", "edf"):  # a tile's planes are read one after another: keep them decoded
        cache_bytes = max(cache_bytes or 0, PLANES_CACHE_BYTES)
    with Slide(path, mpp=mpp, objective=objective, cache_bytes=cache_bytes) as slide:
        info = slide.info
        c = slide.choose_level(spec.target_mpp, spec.tile_size)  # a slide too coarse fails before reading
        decision = RULES[spec.rule].apply(slide, make_grid(info, spec, c), spec, params, on_progress)
        if focus:
            score_focus(slide, decision.grid, plane, min_focus)
    grid = decision.grid
    result = SlideResult(
        slide=info.id, path=info.path, status="tiled", tiles=grid.n_kept, grid_tiles=int(grid.xs.size),
        region_tiles=grid.n_region, rule=spec.rule, deposit_mm2=decision.region_mm2,
        foreground_mm2=decision.foreground_mm2, artefact_mm2=decision.artefact_mm2, thresholds=decision.thresholds,
        level=c.level, read_size=c.read_size, tile_mpp=c.tile_mpp, slide_mpp=info.mpp, mpp_source=info.mpp_source,
        label=label.label if label else None, planes=info.planes, grey=info.grey,
    )
    _status(result, decision, spec)
    kept = np.flatnonzero(grid.kept)
    focus_of = grid.focus[kept] if grid.focus is not None else np.full(kept.size, np.nan)
    plane_of = grid.plane[kept] if grid.plane is not None else np.zeros(kept.size, np.int16)
    if grid.blurred is not None:
        result.blurred = int(grid.blurred.sum())
    if np.isfinite(focus_of).any():
        result.focus_median = float(np.nanmedian(focus_of))
    rows = [
        {
            "id": tile_id(info.id, x, y, c.extent), "dataset": table, "path": info.path,
            "label": label.label if label else None, "binary": label.binary if label else None,
            "group": info.id, "slide": info.id, "x": x, "y": y, "level": c.level, "tile_size": spec.tile_size,
            "mpp": c.tile_mpp, "read_size": c.read_size, "extent": c.extent, "coverage": cov, "source": "grid",
            "annotation": None, "focus": None if math.isnan(f) else float(f), "plane": int(p), "grey": info.grey,
        }
        for (x, y, cov), f, p in zip(grid.tiles(), focus_of, plane_of)
    ]
    result.seconds = time.perf_counter() - start
    return TiledSlide(result, rows, decision, info)
