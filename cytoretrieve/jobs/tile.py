"""The `tile` job: slides -> tile rows (`sources.slides.tiling`) -> one bag per slide in a tile table, with a
preview PNG (`views.slide_preview`) and the slide's overview picture (`store.overviews`) for the views.

Per slide, in order: open (clear error if it is not a slide, is truncated, or has no mpp), thumbnail + deposit
mask, grid + coverage, optional preview, then its rows in one commit and its overview. Whatever goes wrong with
one slide skips that slide (reported, nothing written for it) and the job goes on; mistakes in the command as a
whole (missing files, labels naming slides that are not given, settings that clash with the table) raise
`CytoError` before anything is written. A rerun skips the slides the table already holds.

`import_annotations` is the same job for QuPath annotations: (slide, GeoJSON) pairs -> a cell-crop table and a
tile table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cytoretrieve.distributed import barrier, rank_world, shard
from cytoretrieve.errors import CytoError
from cytoretrieve.faults import failpoint
from cytoretrieve.ids import slide_id
from cytoretrieve.sources.cells.labels import BETHESDA, LabelMap
from cytoretrieve.sources.cohort.labels import SlideLabel, expand_slides, match_labels, slides_from_labels
from cytoretrieve.sources.slides.annotations import (
    CELL_SIZE,
    MARGIN,
    AnnotationReport,
    AnnotationResult,
    annotation_rows,
    read_geojson,
)
from cytoretrieve.sources.slides.backends import SlideReadError
from cytoretrieve.sources.slides.backends.image import is_plane_folder
from cytoretrieve.sources.slides.focus import METHOD as FOCUS_METHOD
from cytoretrieve.sources.slides.grid import GridSpec
from cytoretrieve.sources.slides.planes import PlaneSetting, parse_plane
from cytoretrieve.sources.slides.reader import Slide
from cytoretrieve.sources.slides.rules import Params, table_settings
from cytoretrieve.sources.slides.tiling import SLIDE_ERRORS, SlideResult, TiledSlide, tile_slide
from cytoretrieve.store.overviews import make_overview, write_overviews
from cytoretrieve.store.tables import Store
from cytoretrieve.store.tiles import FOCUS_KEY, BagWriter, tile_table_meta
from cytoretrieve.views.slide_preview import write_preview

DEFAULT_TABLE = "tiles"
DEFAULT_ANNOTATIONS_TABLE = "annotations"
CACHE_BYTES = 16 << 20  # thumbnails read each region once: the cache only spares JPEG tiles shared by two chunks


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


def quality_settings(focus: bool, plane: PlaneSetting, min_focus: float | None) -> dict[str, Any]:
    """What a tile or cell table records of its image-quality settings: the focus score's method (`focus`,
    which also gives the table its `focus` and `plane` columns), the plane setting and `min_focus` when given."""
    if min_focus is not None and (not focus or not min_focus >= 0):
        raise CytoError(f"`min_focus` must be a focus score >= 0 with focus scores on, not {min_focus}")
    out: dict[str, Any] = {FOCUS_KEY: dict(FOCUS_METHOD)} if focus else {}
    if plane is not None:
        out["plane"] = plane
    if min_focus is not None:
        out["min_focus"] = float(min_focus)
    return out


def write_overview(store: Store, tiled: TiledSlide) -> None:
    """Store the slide's overview picture (the thumbnail its tile rule worked on) for the views."""
    info, d = tiled.info, tiled.decision
    write_overviews(store, [make_overview(info.id, info.path, *info.dimensions, info.mpp, d.thumbnail, d.downsample)])


def preview_caption(result: SlideResult, spec: GridSpec, grid: Any) -> str:
    """The preview's caption: kept / region / grid tiles, their size and pixel size, the level read, the deposit
    area; then the rule, its threshold, the foreground and what was excluded."""
    c = grid.choice
    if grid.blurred is not None:
        median = "" if result.focus_median is None else f", median focus {result.focus_median:.2f}"
        planes = f", {result.planes} focal planes" if result.planes > 1 else ""
        focus = f"\nfocus: {result.blurred} blurred tiles{median}{planes}{', grey' if result.grey else ''}"
    else:
        focus = ""
    first = (f"{result.slide}: {grid.n_kept} kept / {grid.n_region} in the region / {grid.xs.size} tiles of "
             f"{spec.tile_size} px at {c.tile_mpp:.3g} um/px (level {c.level}, read {c.read_size} px), "
             f"deposit region {result.deposit_mm2:.3g} mm2")
    if spec.rule == "coverage":
        return f"{first}\nrule coverage: keep >= {spec.min_coverage:g} of the tile in the deposit{focus}"
    excluded = ", ".join(f"{k} {v:.3g}" for k, v in result.artefact_mm2.items() if v > 0) or "none"
    return (f"{first}\nrule cells: keep >= {spec.min_foreground_um2:g} um2 of cells per tile in the region; "
            f"cells {result.foreground_mm2:.3g} mm2; excluded (mm2): {excluded}{focus}")


def tile_slides(
    slides: Sequence[str | Path],
    store: Store,
    *,
    table: str = DEFAULT_TABLE,
    spec: GridSpec = GridSpec(),
    params: Params | None = None,
    labels: dict[str, SlideLabel] | None = None,
    mpp: float | None = None,
    objective: float | None = None,
    preview: str | Path | None = None,
    cache_bytes: int = CACHE_BYTES,
    on_slide: Callable[[int, int, Path], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_result: Callable[[SlideResult], None] | None = None,
    focus: bool = True,
    plane: PlaneSetting | str = None,
    min_focus: float | None = None,
) -> TileReport:
    """Tile slides into the tile table `table` of `store` (created on the first slide with tiles).

    `params` are the settings of `spec.rule` (its defaults when None). `slides` may be empty when every label has
    a `path`. With `focus` (the default) every kept tile is scored (`sources.slides.focus`) and read from the
    focal plane(s) `plane` names (None: plane 0; N; best; edf: see `sources.slides.planes`); tiles under
    `min_focus` are dropped. Callbacks: `on_slide(i, n, path)` before each slide,
    `on_progress(done, total)` while its thumbnail is read, `on_result(result)` after it.
    """
    settings = table_settings(spec, params)  # the rule's name, the grid and the rule's settings, before anything else
    plane = parse_plane(plane)
    quality = quality_settings(focus, plane, min_focus)
    if mpp is not None and mpp <= 0:  # checked here for every slide: the reader looks at it only without metadata
        raise CytoError(f"`mpp` must be positive, not {mpp}")
    if objective is not None and objective <= 0:
        raise CytoError(f"`objective` must be positive, not {objective}")
    meta = tile_table_meta("grid", {**settings, **quality})
    start = time.perf_counter()
    if slides:  # with a plane setting, a folder of same-size images is one field of focal planes
        planes = [Path(s) for s in slides if plane is not None and is_plane_folder(Path(s))]
        paths = planes + (expand_slides([s for s in slides if Path(s) not in planes]) if len(planes) < len(slides) else [])
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
    writer = BagWriter(store, table, meta)
    report = TileReport(table=table, store=store.uri)
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
                tiled = tile_slide(path, spec, params, table=table, label=label, mpp=mpp, objective=objective,
                                   cache_bytes=cache_bytes, on_progress=on_progress, focus=focus, plane=plane,
                                   min_focus=min_focus)
                result = tiled.result
                if preview is not None:
                    caption = preview_caption(result, spec, tiled.grid)
                    result.preview = str(write_preview(tiled.decision, caption, preview, result.slide))
                writer.write(sid, tiled.rows)
                if tiled.rows:
                    write_overview(store, tiled)
                    failpoint("slide")
            except SLIDE_ERRORS as e:
                reason = (str(e).splitlines() or [type(e).__name__])[0]
                if isinstance(e, SlideReadError):  # the file opened, its pixels did not decode
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


def import_annotations(
    pairs: Sequence[tuple[str | Path, str | Path]],
    store: Store,
    *,
    table: str = DEFAULT_ANNOTATIONS_TABLE,
    target_mpp: float = 0.5,
    tile_size: int = 320,
    cell_size: int = CELL_SIZE,
    margin: float = MARGIN,
    mpp: float | None = None,
    objective: float | None = None,
    on_result: Callable[[AnnotationResult], None] | None = None,
    labels: LabelMap = BETHESDA,
) -> AnnotationReport:
    """Import (slide, GeoJSON) pairs into `<table>_cells` and `<table>_tiles`, one commit per slide and table.

    Every GeoJSON is parsed before anything is written (a file that is not GeoJSON stops the import); a slide
    that cannot be read is skipped and reported; a rerun skips the slides both tables already hold.
    """
    if target_mpp <= 0 or tile_size < 8 or cell_size < 8 or margin < 0:
        raise CytoError("`target_mpp` must be positive, `tile_size` and `cell_size` at least 8 px, the margin >= 0")
    start = time.perf_counter()
    parsed = [(Path(s), Path(g), *read_geojson(g)) for s, g in pairs]
    names = (f"{table}_cells", f"{table}_tiles")
    settings = {"target_mpp": target_mpp, "cell_size": cell_size, "margin": margin}
    cells_w = BagWriter(store, names[0], tile_table_meta("annotations", {"content": "cells", **settings}))
    tiles_w = BagWriter(store, names[1], tile_table_meta("annotations", {"content": "tiles", "target_mpp": target_mpp,
                                                                      "tile_size": tile_size}))
    report = AnnotationReport(cells_table=names[0], tiles_table=names[1])
    for path, geojson, anns, problems in parsed:
        sid = slide_id(path)
        result = AnnotationResult(slide=sid, path=str(path.absolute()), annotations=str(geojson), status="imported",
                                  problems=list(problems))
        if sid in cells_w.done and sid in tiles_w.done:
            result.status, result.reason = "done", "already in both tables"
            result.cells, result.tiles = cells_w.done[sid], tiles_w.done[sid]
        else:
            try:
                with Slide(path, mpp=mpp, objective=objective) as slide:
                    cells, tiles, outside, dups = annotation_rows(
                        slide, anns, target_mpp=target_mpp, tile_size=tile_size, cell_size=cell_size,
                        margin=margin, tables=names, labels=labels)
                result.outside, result.problems = outside, result.problems + dups
                if sid not in cells_w.done:
                    cells_w.write(sid, cells)
                if sid not in tiles_w.done:
                    tiles_w.write(sid, tiles)
                result.cells, result.tiles = len(cells), len(tiles)
            except (CytoError, OSError) as e:
                result.status, result.reason = "skipped", str(e).splitlines()[0]
        report.results.append(result)
        if on_result:
            on_result(result)
    cells_w.finish()
    tiles_w.finish()
    report.seconds = time.perf_counter() - start
    return report
