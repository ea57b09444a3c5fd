"""The tiling job: slides -> cell-deposit mask -> grid -> one bag of tile rows per slide in a tile table.

Per slide, in order: open (clear error if it is not a slide, is truncated, or has no mpp), thumbnail + deposit
mask, grid + coverage, optional preview, then its rows in one commit. Whatever goes wrong with one slide skips
that slide (reported, nothing written for it) and the job goes on; mistakes in the command as a whole (missing
files, labels naming slides that are not given, settings that clash with the table) raise `CytoError` before
anything is written. A rerun skips the slides the table already holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openslide

from cytoretrieve.distributed import barrier, rank_world, shard
from cytoretrieve.errors import CytoError
from cytoretrieve.store.tiles import BagWriter, tile_table_meta, tile_id
from cytoretrieve.sources.slides.deposit import DepositParams, deposit_mask
from cytoretrieve.sources.slides.grid import GridSpec, make_grid
from cytoretrieve.sources.cohort.labels import SlideLabel, expand_slides, match_labels, slides_from_labels
from cytoretrieve.views.slide_preview import write_preview
from cytoretrieve.sources.slides.reader import Slide, slide_id
from cytoretrieve.store.tables import Store

DEFAULT_TABLE = "tiles"
CACHE_BYTES = 16 << 20  # thumbnails read each region once: the cache only spares JPEG tiles shared by two chunks
SLIDE_ERRORS = (CytoError, openslide.OpenSlideError, OSError)  # skip the slide, not the job


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


@dataclass
class TileReport:
    table: str
    store: str
    results: list[SlideResult] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def tiles_added(self) -> int:
        return sum(r.tiles for r in self.results if r.status == "tiled")

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "store": self.store, "seconds": round(self.seconds, 3),
                "slides": [asdict(r) for r in self.results]}


def tile_slide(
    path: Path,
    spec: GridSpec,
    params: DepositParams,
    *,
    table: str,
    label: SlideLabel | None = None,
    mpp: float | None = None,
    objective: float | None = None,
    preview: str | Path | None = None,
    cache: openslide.OpenSlideCache | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[SlideResult, list[dict[str, Any]]]:
    """Tile one slide: its summary line and its rows (nothing written). Errors propagate (see SLIDE_ERRORS)."""
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
    if preview is not None:
        caption = (f"{info.id}: {grid.n_kept}/{grid.xs.size} tiles of {spec.tile_size} px at {c.tile_mpp:.3g} um/px "
                   f"(level {c.level}, read {c.read_size} px), deposit {mask.area_mm2:.3g} mm2")
        result.preview = str(write_preview(mask, grid, caption, preview, info.id))
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
    return result, rows


def tile_slides(
    slides: Sequence[str | Path],
    store: Store,
    *,
    table: str = DEFAULT_TABLE,
    spec: GridSpec = GridSpec(),
    params: DepositParams = DepositParams(),
    labels: dict[str, SlideLabel] | None = None,
    mpp: float | None = None,
    objective: float | None = None,
    preview: str | Path | None = None,
    cache_bytes: int = CACHE_BYTES,
    on_slide: Callable[[int, int, Path], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_result: Callable[[SlideResult], None] | None = None,
) -> TileReport:
    """Tile slides into the tile table `table` of `store` (created on the first slide with tiles).

    `slides` may be empty when every label has a `path`. Callbacks: `on_slide(i, n, path)` before each slide,
    `on_progress(done, total)` while its thumbnail is read, `on_result(result)` after it.
    """
    spec.validate()
    params.validate()
    if mpp is not None and mpp <= 0:
        raise CytoError(f"`mpp` must be positive, not {mpp}")
    if objective is not None and objective <= 0:
        raise CytoError(f"`objective` must be positive, not {objective}")
    start = time.perf_counter()
    if slides:
        paths = expand_slides(slides)
        matched = match_labels(paths, labels) if labels else {}
    elif labels:
        paths = expand_slides(slides_from_labels(labels))
        matched = labels
    else:
        raise CytoError("no slides given")
    paths = shard(paths, lambda p: slide_id(p))  # under torchrun, each process tiles its share of the slides
    if preview is not None:
        try:
            Path(preview).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CytoError(f"cannot write previews to {preview}: {e.strerror or e}") from None
    meta = tile_table_meta("grid", {**spec.to_dict(), "deposit": params.to_dict()})
    writer = BagWriter(store, table, meta)
    report = TileReport(table=table, store=store.uri)
    cache = openslide.OpenSlideCache(cache_bytes)
    for i, path in enumerate(paths):
        sid = slide_id(path)
        label = matched.get(sid)
        if on_slide:
            on_slide(i, len(paths), path)
        if sid in writer.done:
            result = SlideResult(slide=sid, path=str(path.absolute()), status="done", tiles=writer.done[sid],
                                 label=label.label if label else None, reason="already in the table")
        else:
            try:
                result, rows = tile_slide(path, spec, params, table=table, label=label, mpp=mpp,
                                          objective=objective, preview=preview, cache=cache, on_progress=on_progress)
                writer.write(sid, rows)
            except SLIDE_ERRORS as e:
                reason = (str(e).splitlines() or [type(e).__name__])[0]
                if isinstance(e, openslide.OpenSlideError):  # the file opened, its pixels did not decode
                    reason = f"unreadable image data ({reason})"
                result = SlideResult(slide=sid, path=str(path.absolute()), status="skipped",
                                     label=label.label if label else None, reason=reason)
        report.results.append(result)
        if on_result:
            on_result(result)
    barrier()  # every process has committed its slides before one compacts the table
    if rank_world()[0] == 0:
        writer.finish()
    report.seconds = time.perf_counter() - start
    return report
