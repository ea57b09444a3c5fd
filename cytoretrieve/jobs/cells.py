"""The `cells` job: slides and microscope fields -> every nucleus found (`sources.slides.cells`) -> one row per
cell in a cell table, with a preview PNG per slide or field and its overview picture for the views.

A cell table is a tile table whose rows are cell crops (`source` "cells"): `embed` reads it like any tile table,
so `classify`, `transfer`, `search`, `score` and the viewer take cell vectors with no other code path. Per slide,
in order: open (clear error if it is not a slide or image, or has no pixel size), detect, optional evaluation
against a points file, optional preview, then its rows in one commit and its overview. A slide that fails is
skipped (reported); mistakes in the command as a whole raise `CytoError` before anything is written. A rerun
skips the slides the table already holds; under torchrun each process takes its share of the slides, and a
whole slide's tiles are shared among worker processes (`workers`: by default this process's share of the cores).
A script that calls `find_cells_in` on whole slides needs the `if __name__ == "__main__":` guard, as for any
process pool that starts fresh interpreters (forkserver).
"""

from __future__ import annotations

import csv
import datetime
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytoretrieve.distributed import barrier, rank_world, shard
from cytoretrieve.errors import CytoError
from cytoretrieve.ids import SLIDE_EXTENSIONS, slide_id
from cytoretrieve.jobs.tile import quality_settings
from cytoretrieve.sources.cohort.labels import SlideLabel
from cytoretrieve.sources.slides.backends.image import is_plane_folder
from cytoretrieve.sources.slides.cells import CellSpec, CellsResult, FoundCells, find_cells
from cytoretrieve.sources.slides.detectors import Detector, get_detector
from cytoretrieve.sources.slides.detectors.evaluate import Counts, matches
from cytoretrieve.sources.slides.planes import PlaneSetting, parse_plane
from cytoretrieve.sources.slides.tiling import SLIDE_ERRORS
from cytoretrieve.store.overviews import make_overview, write_overviews
from cytoretrieve.store.tables import Store
from cytoretrieve.store.tiles import CELLS_SOURCE, TILES_KIND, BagWriter
from cytoretrieve.version import __version__
from cytoretrieve.views.cells_preview import write_cells_preview
from cytoretrieve.views.geojson import write_cells_geojson

DEFAULT_TABLE = "cells"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # microscope fields
MATCH_UM = 6.0  # a detection within this of a marked point finds it (about one nucleus radius)
SOURCE_COLUMNS = ("path", "mpp", "label", "binary")  # a CSV of sources: path, then optional columns


@dataclass(frozen=True)
class Source:
    """One slide or field to search: its file, its pixel size when the user gives it, its label."""

    path: Path
    mpp: float | None = None
    label: SlideLabel | None = None


@dataclass
class CellsReport:
    table: str
    store: str
    detector: str
    results: list[CellsResult] = field(default_factory=list)
    seconds: float = 0.0
    evaluation: dict[str, float] = field(default_factory=dict)  # over every slide with points

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def cells_added(self) -> int:
        return sum(r.cells for r in self.results if r.status in ("found", "empty"))

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "store": self.store, "detector": self.detector,
                "seconds": round(self.seconds, 3), "evaluation": self.evaluation,
                "slides": [asdict(r) for r in self.results]}


def _is_source_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in (*SLIDE_EXTENSIONS, *IMAGE_EXTENSIONS) and not p.name.startswith(".")


def _read_source_csv(path: Path, mpp: float | None, labels: dict[str, SlideLabel]) -> list[Source]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "path" not in fields:
            raise CytoError(f"sources file {path} needs a header with columns path[,mpp][,label][,binary] "
                            f"(found: {','.join(reader.fieldnames or []) or 'nothing'})")
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    out = []
    for line, row in enumerate(rows, start=2):
        file = (path.parent / row["path"]).absolute()
        if not file.is_file():
            raise CytoError(f"{path}:{line}: no such file {row['path']}")
        try:
            own_mpp = float(row["mpp"]) if row.get("mpp") else mpp
        except ValueError:
            raise CytoError(f"{path}:{line}: mpp must be a number, not {row['mpp']!r}") from None
        binary = row.get("binary", "")
        if binary not in ("", "0", "1"):
            raise CytoError(f"{path}:{line}: binary must be 1, 0 or empty, not {binary!r}")
        sid = slide_id(file)
        label = labels.get(sid) or (SlideLabel(sid, row.get("label") or None, int(binary) if binary else None)
                                    if row.get("label") or binary else None)
        out.append(Source(file, own_mpp, label))
    return out


def expand_sources(sources: Sequence[str | Path], *, mpp: float | None = None,
                   labels: dict[str, SlideLabel] | None = None, planes: bool = False) -> list[Source]:
    """Slides and fields from files, folders (their slide and image files) and CSV lists (`path` column, optional
    `mpp`, `label`, `binary`); two sources with the same id, or labels naming none of them, are user errors.
    With `planes` (a focal plane setting was given), a folder of same-size images is one field, an image per
    focal plane (the image backend's folder of planes), not a folder of fields."""
    labels = labels or {}
    out: list[Source] = []
    for p in map(Path, sources):
        if not p.exists():
            raise CytoError(f"no such file or folder: {p}")
        if planes and is_plane_folder(p):
            out.append(Source(p.absolute(), mpp, labels.get(slide_id(p))))
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if _is_source_file(f))
            if not files:
                raise CytoError(f"no slide or image files ({', '.join(IMAGE_EXTENSIONS)}, slide formats) in {p}")
            out += [Source(f.absolute(), mpp, labels.get(slide_id(f))) for f in files]
        elif p.suffix.lower() == ".csv":
            out += _read_source_csv(p, mpp, labels)
        else:
            out.append(Source(p.absolute(), mpp, labels.get(slide_id(p))))
    ids = [slide_id(s.path) for s in out]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise CytoError(f"two sources share the id {twice[0]!r} (ids are file names without their suffix)")
    unknown = sorted(set(labels) - set(ids))
    if unknown:
        raise CytoError(f"the labels name {len(unknown)} slide(s) or field(s) not given: {', '.join(unknown[:5])}")
    return out


POINT_FILE_SUFFIXES = (".csv", ".geojson", ".json")


def read_points(path: str | Path, problems: list[str] | None = None) -> dict[str, np.ndarray]:
    """Marked nuclei per slide or field (level-0 px), the ids matched to the sources' ids (file names without
    their suffix), from any of:

    - a CSV: a `slide` (or `frame`, `image`, `field`) column and `x`, `y`;
    - a QuPath GeoJSON export (`.geojson`, `.json`; `annotations.read_geojson_points`): its Point and MultiPoint
      annotations or detections, each on the image its properties name (`image`, `slide`, ...) or else on the
      image named like the file (`frame012.geojson` -> `frame012`);
    - a folder of such files (QuPath's one export per image).

    Features left out (other geometries or object types) are appended to `problems` when given; a file with no
    point at all is a `CytoError`."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in POINT_FILE_SUFFIXES)
        if not files:
            raise CytoError(f"no points files ({', '.join(POINT_FILE_SUFFIXES)}) in {path}")
        found: dict[str, list[np.ndarray]] = {}
        for f in files:
            for sid, xy in read_points(f, problems).items():
                found.setdefault(sid, []).append(xy)
        return {k: np.concatenate(v) for k, v in found.items()}
    if not path.is_file():
        raise CytoError(f"no points file {path}")
    if path.suffix.lower() in (".geojson", ".json"):
        return _read_geojson_points(path, problems)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        key = next((fields[k] for k in ("slide", "frame", "image", "field") if k in fields), None)
        if key is None or "x" not in fields or "y" not in fields:
            raise CytoError(f"points file {path} needs columns slide (or frame, image), x, y")
        rows: dict[str, list[tuple[float, float]]] = {}
        for line, row in enumerate(reader, start=2):
            try:
                xy = (float(row[fields["x"]]), float(row[fields["y"]]))
            except (TypeError, ValueError):
                raise CytoError(f"{path}:{line}: x and y must be numbers") from None
            rows.setdefault(slide_id(row[key].strip()), []).append(xy)
    return {k: np.asarray(v, dtype=float) for k, v in rows.items()}


def _read_geojson_points(path: Path, problems: list[str] | None) -> dict[str, np.ndarray]:
    from cytoretrieve.sources.slides.annotations import read_geojson_points

    by_image, left_out = read_geojson_points(path)
    if problems is not None:
        problems += [f"{path.name}: {p}" for p in left_out]
    own = slide_id(path.name[: -len(path.suffix)])  # frame012.geojson (or frame012.png.geojson) -> frame012
    out: dict[str, list[tuple[float, float]]] = {}
    for image, xy in by_image.items():
        out.setdefault(own if image is None else slide_id(image), []).extend(xy)
    if not any(out.values()):
        raise CytoError(f"no point annotations (Point or MultiPoint features) in {path}"
                        + (f": {left_out[0]}" if left_out else ""))
    return {k: np.asarray(v, dtype=float).reshape(-1, 2) for k, v in out.items() if v}


def cell_table_meta(detector: Detector, spec: CellSpec, quality: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metadata of a cell table: kind, source, the detector, its settings and (a trained one) its training record,
    the crop, the image-quality settings (`jobs.tile.quality_settings`), version and time."""
    model = {k: v for k, v in getattr(detector, "record", {}).items() if k != "versions"}  # a trained model's data
    return {"kind": TILES_KIND, "source": CELLS_SOURCE,
            "detector": {"name": detector.name, **detector.settings, **({"model": model} if model else {})},
            **spec.to_dict(), **(quality or {}), "cytoretrieve": __version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def evaluate(found: FoundCells, truth: np.ndarray, match_um: float = MATCH_UM) -> tuple[Counts, np.ndarray, np.ndarray]:
    """Counts against the marked points, a matched flag per nucleus, and the points no nucleus reached."""
    det = found.nuclei.xy
    det_i, truth_i = matches(det, truth, match_um / found.info.mpp)
    matched = np.zeros(len(det), bool)
    matched[det_i] = True
    missed = np.ones(len(truth), bool)
    missed[truth_i] = False
    return Counts(len(det_i), len(det) - len(det_i), len(truth) - len(truth_i)), matched, truth[missed]


def _preview(found: FoundCells, folder: Path, matched: np.ndarray | None, missed: np.ndarray | None) -> str:
    r = found.result
    caption = (f"{r.slide}: {r.cells} cells ({r.kind}{f', {r.tiles} tiles searched' if r.tiles else ''}), "
               f"{r.mpp:.3g} um/px{', grey' if r.grey else ''}")
    if r.evaluation:
        e = r.evaluation
        caption += f"; vs points: recall {e['recall']:.2f}, precision {e['precision']:.2f}, F1 {e['f1']:.2f}"
    return str(write_cells_preview(found.overview, found.downsample, found.nuclei.xy, found.nuclei.area_um2,
                                   found.info.mpp, caption, folder, r.slide, matched=matched, missed_xy=missed))


def find_cells_in(
    sources: Sequence[Source],
    store: Store,
    *,
    table: str = DEFAULT_TABLE,
    detector: Detector | str = "classic",
    spec: CellSpec = CellSpec(),
    objective: float | None = None,
    points: dict[str, np.ndarray] | None = None,
    preview: str | Path | None = None,
    geojson: str | Path | None = None,
    on_slide: Callable[[int, int, Path], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_result: Callable[[CellsResult], None] | None = None,
    focus: bool = True,
    plane: PlaneSetting | str = None,
    min_focus: float | None = None,
    workers: int | None = None,
) -> CellsReport:
    """Find the cells of `sources` into the cell table `table` (created on the first slide with cells).

    With `focus` (the default) each cell's crop is scored (`sources.slides.focus`) and read from the focal
    plane(s) `plane` names (`sources.slides.cells`); cells under `min_focus` are dropped.

    A whole slide's tiles are shared among `workers` processes (None: this process's share of the cores,
    `sources.slides.cells.cell_workers`; 1: none besides this one).

    `points` (slide id -> (n, 2) level-0 px) evaluates the detector where given; `geojson` is a folder for one
    QuPath file of `cell` objects per slide. Callbacks: `on_slide(i, n, path)`
    before each slide, `on_progress(done, total)` over a slide's tiles, `on_result(result)` after it.
    """
    spec.validate()
    plane = parse_plane(plane)
    quality = quality_settings(focus, plane, min_focus)
    detector = get_detector(detector) if isinstance(detector, str) else detector
    if not sources:
        raise CytoError("no slides or fields given")
    for folder, what in ((preview, "previews"), (geojson, "QuPath files")):
        if folder is not None:
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CytoError(f"cannot write {what} to {folder}: {e.strerror or e}") from None
    start = time.perf_counter()
    todo = shard(list(sources), lambda s: slide_id(s.path))
    writer = BagWriter(store, table, cell_table_meta(detector, spec, quality))
    report = CellsReport(table=table, store=store.uri, detector=detector.name)
    total = Counts()
    for i, src in enumerate(todo):
        sid = slide_id(src.path)
        if on_slide:
            on_slide(i, len(todo), src.path)
        if sid in writer.done:
            result = CellsResult(slide=sid, path=str(src.path), status="done", cells=writer.done[sid],
                                 label=src.label.label if src.label else None, reason="already in the table")
        else:
            try:
                found = find_cells(src.path, detector, spec, table=table, label=src.label, mpp=src.mpp,
                                   objective=objective, on_progress=on_progress, focus=focus, plane=plane,
                                   min_focus=min_focus, workers=workers)
                result = found.result
                matched = missed = None
                if points is not None and sid in points:
                    counts, matched, missed = evaluate(found, points[sid])
                    result.evaluation = counts.to_dict()
                    total = total + counts
                if preview is not None:
                    result.preview = _preview(found, Path(preview), matched, missed)
                if geojson is not None and found.rows:
                    write_cells_geojson(found.rows, found.info.mpp, Path(geojson) / f"{sid}.geojson")
                writer.write(sid, found.rows)
                if found.rows:
                    info = found.info
                    write_overviews(store, [make_overview(sid, info.path, *info.dimensions, info.mpp, found.overview,
                                                          found.downsample)])
            except (*SLIDE_ERRORS, ValueError) as e:  # ValueError: an image the detector cannot take
                result = CellsResult(slide=sid, path=str(src.path), status="skipped",
                                     label=src.label.label if src.label else None,
                                     reason=(str(e).splitlines() or [type(e).__name__])[0])
        report.results.append(result)
        if on_result:
            on_result(result)
    barrier()
    if rank_world()[0] == 0:
        writer.finish()
    if total != Counts():
        report.evaluation = total.to_dict()
    report.seconds = time.perf_counter() - start
    return report
