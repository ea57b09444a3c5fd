"""One slide or microscope field to cell rows: find every nucleus with a detector, and give each cell a crop.

A **field** (one level, at most `FIELD_MAX_PIXELS`: a microscope camera's picture, a Cervix93 or ISBI field) is
read whole at level 0 and the detector runs on it once. A **whole slide** is tiled first with the `cells` tile
rule (`tiling.tile_slide`), and the detector runs only on the tiles that rule keeps, each read at the grid's
pixel size; a nucleus belongs to the tile its centre lies in, so no cell is counted twice.

Each cell becomes one row of a cell table: the tile-table columns (its crop: a square of `crop_um` centred on
the nucleus, delivered at `cell_size` px, so `embed` reads it like a tile) plus the measurements of
`store.tiles.CELL_FIELDS`, plus (with `focus`, the default) the crop's focus score at its read resolution
(`focus.py`) and the focal plane it is read from (`planes.py`; cells under `min_focus` are dropped).

On a whole slide the kept tiles (and then the crops to score) are shared among `workers` processes (by default
this process's share of the cores: `cell_workers`), in chunks of neighbouring tiles each worker reads and
detects on its own; the chunks come back in order, so the rows are those one process finds.

Focal planes (`plane`): N reads plane N everywhere; `best` and `edf` find nuclei on the EDF composite of a field
(every nucleus in focus somewhere is found; on a slide, on each tile read as asked) and then read each crop
from its own sharpest plane (`best`) or as an EDF composite of the crop (`edf`). Its id is `SLIDE@nx,ny` (the nucleus centre in level-0 px): re-running finds the same
ids. Nothing here writes: `cytoretrieve.jobs.cells` stores the rows, the previews and the overview.
"""

from __future__ import annotations

import math
import os
import pickle
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.cohort.labels import SlideLabel
from cytoretrieve.sources.slides.detectors import Detector, Nuclei
from cytoretrieve.sources.slides.focus import BLURRED, focus_score
from cytoretrieve.sources.slides.grid import GridSpec
from cytoretrieve.sources.slides.planes import PlaneSetting, edf, read_planes
from cytoretrieve.sources.slides.reader import Slide, SlideInfo, choose_level
from cytoretrieve.sources.slides.tiling import PLANES_CACHE_BYTES, tile_slide

FIELD_MAX_PIXELS = 64_000_000  # a one-level image up to this size is a field, read whole; larger ones are tiled
CROP_UM = 48.0  # the side of a cell's crop: a Herlev cell image spans ~30-70 um
CELL_SIZE = 128  # px of a delivered crop (0.375 um/px at the default crop)
OVERVIEW_SIDE = 1024  # px: the long side of a field's stored overview
CHUNK_TILES = 48  # kept tiles a worker takes at a time (neighbours: they share the slide's decoded tiles)
CHUNK_CELLS = 400  # crops a worker scores at a time
MIN_PARALLEL_TILES = 8 * CHUNK_TILES  # fewer kept tiles are searched in this process: starting the workers
# (fresh interpreters importing numpy, scipy and the slide readers) costs about what ~100 tiles do


@dataclass(frozen=True)
class CellSpec:
    """How cells are cropped and where they are searched for on a whole slide (`tiles`: the grid and its rule)."""

    crop_um: float = CROP_UM
    cell_size: int = CELL_SIZE
    tiles: GridSpec = GridSpec()

    def validate(self) -> None:
        if self.crop_um <= 0:
            raise CytoError(f"`crop_um` must be positive, not {self.crop_um}")
        if self.cell_size < 8:
            raise CytoError(f"`cell_size` must be at least 8 px, not {self.cell_size}")
        if self.tiles.rule != "cells":
            raise CytoError("cells are searched for on the tiles the `cells` rule keeps: leave `rule` as cells")

    @property
    def crop_mpp(self) -> float:
        return self.crop_um / self.cell_size

    def to_dict(self) -> dict[str, Any]:
        return {"crop_um": self.crop_um, "cell_size": self.cell_size, "tile_size": self.tiles.tile_size,
                "target_mpp": self.tiles.target_mpp, "min_foreground_um2": self.tiles.min_foreground_um2}


@dataclass
class CellsResult:
    """One line of the `cells` summary. `status`: found, empty (0 cells), done (already in the table) or skipped
    (`reason` says why). `kind`: field or slide; `tiles` searched on a slide; `grey`: the image has one channel."""

    slide: str
    path: str
    status: str
    kind: str = "field"
    cells: int = 0
    tiles: int = 0
    mpp: float | None = None
    mpp_source: str | None = None
    grey: bool = False
    label: str | None = None
    reason: str | None = None
    preview: str | None = None
    seconds: float = 0.0
    evaluation: dict[str, float] = field(default_factory=dict)  # against a points file: tp, fp, fn, recall, ...
    planes: int = 1  # the source's focal planes
    blurred: int = 0  # cells under `min_focus` (dropped), or without it under `focus.BLURRED` (kept)
    focus_median: float | None = None  # of the cells kept


@dataclass
class FoundCells:
    """What one slide or field gives: its summary line, its cell rows, the nuclei (level-0 px) and a picture of
    it (`overview`, uint8 RGB at `downsample` level-0 px per px) for the preview and the stored overview."""

    result: CellsResult
    rows: list[dict[str, Any]]
    nuclei: Nuclei  # positions in level-0 px
    info: SlideInfo
    overview: np.ndarray
    downsample: float


def is_field(info: SlideInfo) -> bool:
    """A one-level image small enough to read whole (a microscope field), not a pyramid to tile."""
    w, h = info.dimensions
    return len(info.level_dimensions) == 1 and w * h <= FIELD_MAX_PIXELS


def is_grey(rgb: np.ndarray) -> bool:
    """True when all three channels are equal (a grey image given as RGB)."""
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def _concat(parts: list[Nuclei], mpp: float) -> Nuclei:
    if not parts:
        return Nuclei.empty(mpp)
    from cytoretrieve.sources.slides.detectors import NUCLEUS_FIELDS

    return Nuclei(*(np.concatenate([getattr(p, name) for p in parts]) for name in NUCLEUS_FIELDS), mpp=mpp)


def _moved(nuclei: Nuclei, x0: float, y0: float, scale: float, mpp: float) -> Nuclei:
    """Nuclei found in a region read at `scale` level-0 px per px, placed at level-0 (`x0`, `y0`)."""
    cols = nuclei.columns()
    cols["x"] = x0 + nuclei.x * scale
    cols["y"] = y0 + nuclei.y * scale
    return Nuclei(**cols, mpp=mpp)


def field_image(slide: Slide, plane: PlaneSetting = None) -> np.ndarray:
    """A whole one-level image (uint8 RGB) as nuclei are searched on it: plane N (None: 0), or for `best` and
    `edf` on a multi-plane field its EDF composite."""
    w, h = slide.info.dimensions
    if plane in ("best", "edf") and slide.info.planes > 1:
        return edf(read_planes(slide.backend, 0, 0, 0, (w, h)))
    return np.asarray(slide.read_rgb(0, 0, 0, (w, h), plane=0 if plane in (None, "best", "edf") else int(plane))
                      .convert("RGB"))


def detect_field(slide: Slide, detector: Detector, plane: PlaneSetting = None) -> tuple[Nuclei, np.ndarray]:
    """The nuclei of a whole one-level image (level-0 px) and the image itself (uint8 RGB; see `field_image`)."""
    rgb = field_image(slide, plane)
    return detector(rgb, slide.info.mpp), rgb


def cell_workers() -> int:
    """Worker processes for one slide's tiles when none are asked for: this process's share of the cores it may
    run on (torchrun's LOCAL_WORLD_SIZE processes share them)."""
    from cytoretrieve.distributed import local_rank_world

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_rank_world()[1]))


@dataclass(frozen=True)
class SlideRef:
    """How a worker process opens the slide the parent has open (`Slide`'s arguments)."""

    path: str
    mpp: float | None = None
    objective: float | None = None
    cache_bytes: int | None = None

    def open(self) -> Slide:
        return Slide(self.path, mpp=self.mpp, objective=self.objective, cache_bytes=self.cache_bytes)


_WORKER_SLIDES: dict[SlideRef, Slide] = {}  # in a worker process: the slides it has open (and their tile caches)


def _worker_slide(ref: SlideRef) -> Slide:
    """The slide `ref` names, opened once per worker process and kept open for its later chunks (the pool ends
    with the slide's search, and the worker with it)."""
    if ref not in _WORKER_SLIDES:
        _WORKER_SLIDES[ref] = ref.open()
    return _WORKER_SLIDES[ref]


def _worker_init() -> None:
    """A worker computes on one core: a detector with torch inside must not start a thread per core."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


@contextmanager
def worker_pool(workers: int, detector: Detector) -> Iterator[Executor | None]:
    """A pool of `workers` processes (forkserver: nothing of this process's threads or handles is inherited),
    or None where one process is asked for or the detector cannot be sent to another process (a TorchScript
    model): the caller then works alone."""
    if workers <= 1:
        yield None
        return
    try:
        pickle.dumps(detector)
    except Exception:  # noqa: BLE001 - whatever cannot be pickled runs here
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"), initializer=_worker_init)
    try:
        yield pool
    except BaseException:  # an error or Ctrl-C: the chunks not started are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _detect_rows(slide: Slide, rows: list[dict[str, Any]], detector: Detector, plane: PlaneSetting,
                 done: Callable[[int], None] | None = None) -> tuple[Nuclei, list[str]]:
    parts: list[Nuclei] = []
    owners: list[str] = []
    for i, row in enumerate(rows):
        image = slide.read_tile(row["x"], row["y"], row["level"], row["read_size"], row["tile_size"], plane=plane)
        found = detector(np.asarray(image.convert("RGB")), float(row["mpp"]))
        scale = row["extent"] / row["tile_size"]
        placed = _moved(found, row["x"], row["y"], scale, slide.info.mpp)
        inside = ((placed.x >= row["x"]) & (placed.x < row["x"] + row["extent"])
                  & (placed.y >= row["y"]) & (placed.y < row["y"] + row["extent"]))
        placed = placed.subset(inside)
        parts.append(placed)
        owners += [row["id"]] * len(placed)
        if done:
            done(i + 1)
    return _concat(parts, slide.info.mpp), owners


def _detect_chunk(ref: SlideRef, rows: list[dict[str, Any]], detector: Detector,
                  plane: PlaneSetting) -> tuple[Nuclei, list[str]]:
    return _detect_rows(_worker_slide(ref), rows, detector, plane)


def detect_tiles(slide: Slide, rows: list[dict[str, Any]], detector: Detector,
                 on_progress: Callable[[int, int], None] | None = None,
                 plane: PlaneSetting = None, pool: Executor | None = None,
                 ref: SlideRef | None = None) -> tuple[Nuclei, list[str]]:
    """The nuclei of a slide's kept tiles (level-0 px), each read at the grid's pixel size (from the focal
    plane(s) `plane` asks for), and the id of the tile each lies in. A nucleus whose centre falls outside its
    tile's square is left to the neighbouring tile. With a `pool`, chunks of `CHUNK_TILES` tiles go to its
    workers, which open the slide as `ref` says; the result is the same."""
    if pool is None or ref is None:
        return _detect_rows(slide, rows, detector, plane, on_progress and (lambda i: on_progress(i, len(rows))))
    futures = [pool.submit(_detect_chunk, ref, chunk, detector, plane) for chunk in _chunks(rows, CHUNK_TILES)]
    parts, owners, done = [], [], 0
    for future, chunk in zip(futures, _chunks(rows, CHUNK_TILES)):
        nuclei, chunk_owners = future.result()
        parts.append(nuclei)
        owners += chunk_owners
        done += len(chunk)
        if on_progress:
            on_progress(done, len(rows))
    return _concat(parts, slide.info.mpp), owners


def _number(value: float) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def cell_rows(info: SlideInfo, nuclei: Nuclei, spec: CellSpec, *, table: str, label: SlideLabel | None,
              tiles: list[str] | None = None, grey: bool = False) -> list[dict[str, Any]]:
    """One row per nucleus: its crop (a `crop_um` square centred on it, read at the level `choose_level` picks
    for `cell_size` px) and its measurements. Two detections on the same level-0 pixel keep the surer one."""
    c = choose_level(info.level_downsamples, info.mpp, spec.crop_mpp, spec.cell_size)
    order = np.argsort(-nuclei.confidence, kind="stable")
    seen: set[tuple[int, int]] = set()
    rows = []
    for i in order:
        nx, ny = int(round(nuclei.x[i])), int(round(nuclei.y[i]))
        if (nx, ny) in seen:
            continue
        seen.add((nx, ny))
        rows.append({
            "id": f"{info.id}@{nx},{ny}", "dataset": table, "path": info.path,
            "label": label.label if label else None, "binary": label.binary if label else None,
            "group": info.id, "slide": info.id, "x": nx - c.extent // 2, "y": ny - c.extent // 2, "level": c.level,
            "tile_size": spec.cell_size, "mpp": c.tile_mpp, "read_size": c.read_size, "extent": c.extent,
            "coverage": None, "source": "cells", "annotation": None,
            "nucleus_x": nx, "nucleus_y": ny, "nucleus_area_um2": _number(nuclei.area_um2[i]),
            "cell_area_um2": _number(nuclei.cell_area_um2[i]), "nc_ratio": _number(nuclei.nc_ratio[i]),
            "darkness": _number(nuclei.darkness[i]), "confidence": _number(nuclei.confidence[i]),
            "tile": tiles[i] if tiles else None, "grey": grey,
        })
    return sorted(rows, key=lambda r: (r["nucleus_y"], r["nucleus_x"]))


def _focus_rows(slide: Slide, rows: list[dict[str, Any]], plane: PlaneSetting) -> list[tuple[float | None, int]]:
    out = []
    for row in rows:
        image, used = slide.read_tile_plane(row["x"], row["y"], row["level"], row["read_size"], row["read_size"],
                                            plane=plane)
        out.append((focus_score(np.asarray(image)), used))
    return out


def _focus_chunk(ref: SlideRef, rows: list[dict[str, Any]], plane: PlaneSetting) -> list[tuple[float | None, int]]:
    return _focus_rows(_worker_slide(ref), rows, plane)


def score_cells(slide: Slide, rows: list[dict[str, Any]], plane: PlaneSetting = None,
                min_focus: float | None = None, pool: Executor | None = None,
                ref: SlideRef | None = None) -> tuple[list[dict[str, Any]], int]:
    """Read each cell's crop at its read resolution (from the plane(s) `plane` asks for), set its `focus` and
    `plane`, and drop those under `min_focus` (a crop with too little stain to score stays); the rows kept and
    the number of blurred cells (dropped, or without `min_focus` under `focus.BLURRED`). With a `pool`, chunks
    of `CHUNK_CELLS` crops are read and scored by its workers (opening the slide as `ref` says)."""
    if pool is None or ref is None:
        scores = _focus_rows(slide, rows, plane)
    else:
        # only what a crop is read by travels to the workers
        keys = ("x", "y", "level", "read_size")
        chunks = _chunks([{k: r[k] for k in keys} for r in rows], CHUNK_CELLS)
        scores = [s for f in [pool.submit(_focus_chunk, ref, c, plane) for c in chunks] for s in f.result()]
    kept, blurred = [], 0
    limit = BLURRED if min_focus is None else min_focus
    for row, (score, used) in zip(rows, scores):
        row["focus"], row["plane"] = score, used
        low = row["focus"] is not None and row["focus"] < limit
        blurred += low
        if not (low and min_focus is not None):
            kept.append(row)
    return kept, blurred


def _shrink(rgb: np.ndarray, side: int = OVERVIEW_SIDE) -> tuple[np.ndarray, float]:
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = max(1.0, max(h, w) / side)
    if scale == 1.0:
        return rgb, 1.0
    im = Image.fromarray(rgb).resize((max(1, round(w / scale)), max(1, round(h / scale))), Image.Resampling.BILINEAR)
    return np.asarray(im), w / im.width


def find_cells(path: Path, detector: Detector, spec: CellSpec = CellSpec(), *, table: str,
               label: SlideLabel | None = None, mpp: float | None = None, objective: float | None = None,
               on_progress: Callable[[int, int], None] | None = None, focus: bool = True,
               plane: PlaneSetting = None, min_focus: float | None = None, workers: int | None = None) -> FoundCells:
    """Find the cells of one slide or field: its summary line, rows, nuclei and overview. Nothing is written.
    Errors propagate (`tiling.SLIDE_ERRORS`: the job skips the slide). With `focus`, each crop is scored and
    read from the plane(s) `plane` asks for (see the module docstring); cells under `min_focus` are dropped.
    A slide's tiles are shared among `workers` processes (None: `cell_workers()`; 1: this process alone)."""
    start = time.perf_counter()
    spec.validate()
    cache = PLANES_CACHE_BYTES if plane in ("best", "edf") else None  # every plane of a crop is read in turn
    with Slide(path, mpp=mpp, objective=objective, cache_bytes=cache) as slide:
        info = slide.info
        if is_field(info):
            nuclei, rgb = detect_field(slide, detector, plane)
            overview, downsample = _shrink(rgb)
            kind, n_tiles, owners, grey = "field", 0, None, bool(info.grey) or is_grey(rgb)
            rows = cell_rows(info, nuclei, spec, table=table, label=label, tiles=owners, grey=grey)
            blurred = 0
            if focus:
                rows, blurred = score_cells(slide, rows, plane, min_focus)
        else:
            tiled = tile_slide(path, spec.tiles, table=table, label=label, mpp=mpp, objective=objective,
                               focus=False)
            n = cell_workers() if workers is None else int(workers)
            ref = SlideRef(str(Path(path).absolute()), mpp, objective, cache)
            with worker_pool(n if len(tiled.rows) >= MIN_PARALLEL_TILES else 1, detector) as pool:
                nuclei, owners = detect_tiles(slide, tiled.rows, detector, on_progress, plane, pool, ref)
                overview, downsample = tiled.decision.thumbnail, tiled.decision.downsample
                kind, n_tiles, grey = "slide", len(tiled.rows), bool(getattr(info, "grey", False))
                rows = cell_rows(info, nuclei, spec, table=table, label=label, tiles=owners, grey=grey)
                blurred = 0
                if focus:
                    rows, blurred = score_cells(slide, rows, plane, min_focus, pool, ref)
    scores = [r["focus"] for r in rows if r.get("focus") is not None]
    why = "no nucleus found" if not len(nuclei) else f"all {blurred} cells are under `min_focus`"
    result = CellsResult(slide=info.id, path=info.path, status="found" if rows else "empty", kind=kind,
                         cells=len(rows), tiles=n_tiles, mpp=info.mpp, mpp_source=info.mpp_source, grey=grey,
                         label=label.label if label else None, reason=None if rows else why,
                         planes=info.planes, blurred=blurred,
                         focus_median=float(np.median(scores)) if scores else None)
    result.seconds = time.perf_counter() - start
    return FoundCells(result, rows, nuclei, info, overview, downsample)
