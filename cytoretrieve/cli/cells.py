"""`cytoretrieve cells`: slides and microscope fields -> every nucleus found -> one row per cell (crop +
measurements) in a cell table; `cytoretrieve cells train`: a nucleus detector learned from point annotations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table as RichTable
from typer.core import TyperGroup

from cytoretrieve.cli import options
from cytoretrieve.cli.messages import flag_message


class _FindByDefault(TyperGroup):
    """`cytoretrieve cells SOURCES...` runs `cells find`; `cells train ...` trains a detector."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["find", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_FindByDefault, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Find every cell of slides and microscope fields (`cells SOURCES...`), or train a nucleus "
                       "detector from point annotations (`cells train`).")

Mpp = Annotated[float | None, typer.Option("--mpp", help="um per pixel of fields (and slides) whose files do not say: required for plain PNG/JPEG fields (a 40x camera field is ~0.25).", show_default=False)]


def _detector_settings(options: list[str]) -> dict[str, Any]:
    """`--detector-option KEY=VALUE` pairs as detector settings: each VALUE read as JSON (numbers, true, lists),
    else kept as text."""
    import json

    from cytoretrieve.errors import CytoError

    out: dict[str, Any] = {}
    for item in options:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise CytoError(f"`detector-option`: {item!r} is not KEY=VALUE (e.g. model_mpp=0.5)")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


@app.command("find")
def find(
    sources: Annotated[list[Path], typer.Argument(help="Slides, field images (PNG, JPEG, TIFF; grey or RGB), folders of them, or a CSV with a path column (and optional mpp, label, binary).", show_default=False)],
    table: Annotated[str, typer.Option("--table", "-t", help="Cell table to write (created if needed; resumable per slide or field).")] = "cells",
    store: options.Store = options.DEFAULT_STORE,
    mpp: Mpp = None,
    objective: Annotated[float | None, typer.Option("--objective", help="Objective power for images without a pixel size: P means 10/P um/px (40 -> 0.25).", show_default=False)] = None,
    detector: Annotated[str, typer.Option("--detector", "-d", help="classic (no weights: darkness, seeds, watershed, size and shape limits in um), a model file from `cells train`, or instanseg / torchscript / cellpose / stardist with --weights (or the TorchScript file itself): your own segmentation model, nothing is downloaded.")] = "classic",
    weights: Annotated[Path | None, typer.Option("--weights", help="Model of a learned segmenter named by --detector: instanseg, torchscript (a TorchScript .pt, e.g. an InstanSeg model), cellpose (a Cellpose 3 model file; the cellpose extra), stardist (a StarDist 2D model folder; the stardist extra).", show_default=False)] = None,
    detector_option: Annotated[list[str] | None, typer.Option("--detector-option", help="A detector setting KEY=VALUE (repeatable; VALUE read as JSON, else as text), e.g. model_mpp=0.5 for a model trained at 0.5 um/px, diameter_um=7 for cellpose, min_area_um2=12 for classic. Recorded with the table.", show_default=False)] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Worker processes sharing a whole slide's tiles (default: one per core this process may use).", show_default=False)] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="CSV slide,label[,binary]: each slide's or field's label, stored with its cells.")] = None,
    crop_um: Annotated[float, typer.Option("--crop-um", help="Side of each cell's crop in um, centred on its nucleus.")] = 48.0,
    cell_size: Annotated[int, typer.Option("--cell-size", help="Side of each crop in px (the crop is resampled to it).")] = 128,
    points: Annotated[Path | None, typer.Option("--points", help="Marked nuclei: a CSV slide (or frame),x,y, a QuPath GeoJSON export of point annotations (its image named by the file, frame012.geojson, or by an image property), or a folder of them. Each slide with points is scored (recall, precision, F1) and its preview shows the missed and extra ones.")] = None,
    preview: Annotated[Path | None, typer.Option("--preview", help="Write one PNG per slide or field here: every nucleus found circled.")] = None,
    geojson: Annotated[Path | None, typer.Option("--geojson", help="Write one QuPath GeoJSON per slide or field here: its cells as QuPath cell objects with their measurements (File > Import objects).")] = None,
    plane: Annotated[str | None, typer.Option("--plane", help="Focal plane of multi-plane scans (z-stacks; with --plane a folder of same-size images is one field, an image per plane): a number, best (each cell's sharpest plane) or edf (extended depth of field). best and edf find nuclei on the field's EDF composite. Default: plane 0.", show_default=False)] = None,
    min_focus: Annotated[float | None, typer.Option("--min-focus", help="Drop cells whose crop's focus score is below this (sharp crops score ~0.5-2, blurred ones under 0.3).", show_default=False)] = None,
    focus: Annotated[bool, typer.Option("--focus/--no-focus", help="Score each cell crop's focus (stored as the focus column).")] = True,
    json_out: options.JsonOut = None,
) -> None:
    """Find every nucleus on slides and microscope fields and store one row per cell: its crop (a --crop-um
    square centred on the nucleus), nucleus area (um2), cell area and N/C ratio where the cell's outline is found,
    darkness, the detector's confidence, and its slide's label.

    A field (a one-level image: a microscope camera's picture) is searched whole; a whole slide only on the tiles
    the `cells` tile rule keeps. The cell table embeds like a tile table: `cytoretrieve embed CELLTABLE`, then
    classify, search, score and the viewer use cell vectors.

    Example: cytoretrieve cells fields/ --mpp 0.25 --labels grades.csv --preview qc/ && cytoretrieve embed cells
    """
    err = Console(stderr=True)
    with err.status("loading the nucleus detector, the slide readers and the store", spinner="dots"):
        from cytoretrieve.errors import CytoError
        from cytoretrieve.jobs.cells import expand_sources, find_cells_in, read_points
        from cytoretrieve.sources.cohort.labels import read_labels
        from cytoretrieve.sources.slides.cells import CellSpec
        from cytoretrieve.sources.slides.detectors import get_detector
        from cytoretrieve.store.tables import Store

    settings = _detector_settings(detector_option or [])
    try:
        found = get_detector(detector, **({"weights": weights} if weights is not None else {}), **settings)
    except (TypeError, ValueError) as e:  # TypeError or "unknown ...": a setting the detector does not take
        unknown = isinstance(e, TypeError) or "unknown" in str(e)
        if unknown and weights is not None and "weights" in str(e):
            raise CytoError(f"`weights`: --detector {detector} takes no weights file (instanseg, torchscript, "
                            "cellpose and stardist do)") from None
        if unknown and settings:
            raise CytoError(f"`detector-option`: --detector {detector} does not take one of "
                            f"{', '.join(settings)} ({e})") from None
        raise CytoError(f"`detector`: {e}") from None
    srcs = expand_sources(sources, mpp=mpp, labels=read_labels(labels) if labels else None, planes=plane is not None)
    left_out: list[str] = []
    marked = read_points(points, left_out) if points else None
    _note_left_out(err, points, left_out)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=err,
                        disable=not err.is_terminal)
    tasks: dict[str, Any] = {}

    def on_slide(i: int, n: int, path: Path) -> None:
        if not tasks:
            progress.start()
            tasks["all"] = progress.add_task("fields", total=n, note="")
        progress.update(tasks["all"], note=path.name[:40])

    def on_result(result: Any) -> None:
        progress.advance(tasks["all"])

    try:
        report = find_cells_in(srcs, Store(store), table=table, detector=found,
                               spec=CellSpec(crop_um=crop_um, cell_size=cell_size), points=marked, objective=objective,
                               preview=preview, geojson=geojson, on_slide=on_slide, on_result=on_result,
                               focus=focus, plane=plane, min_focus=min_focus, workers=workers)
    finally:
        progress.stop()
    failed = bool(report.results) and all(r.status == "skipped" for r in report.results)
    if failed:  # nothing to show: one line says why
        first = report.results[0]
        if len(report.results) == 1:
            raise CytoError(f"{first.slide}: {first.reason}")
        raise CytoError(f"none of the {len(report.results)} slides or fields could be read (first: {first.slide}: "
                        f"{first.reason})")
    _print_report(report)
    for r in report.results:
        if r.status in ("empty", "skipped"):
            word = "skipped" if r.status == "skipped" else "warning:"
            err.print(f"{word} {r.slide}: {flag_message(r.reason or '')}", markup=False, highlight=False,
                      soft_wrap=True)
    if json_out:
        options.write_json(report.to_dict(), json_out)


def _note_left_out(err: Console, points: Path | None, left_out: list[str]) -> None:
    """One line when a points file held features that are not points (regions, other objects)."""
    if left_out:
        err.print(f"note: {len(left_out)} feature(s) of {points} are not point annotations and were left out "
                  f"(first: {left_out[0]})", markup=False, highlight=False, soft_wrap=True)


def _print_report(report: Any) -> None:
    """One line per slide or field, whole at any width: ids are never cut; when the terminal is narrow the least
    needed columns go first (evaluation, focus, pixel size)."""
    out = Console()
    evaluated = any(r.evaluation for r in report.results)
    rows = []
    for r in report.results:
        e = r.evaluation
        kind = r.kind + (" grey" if r.grey else "") + (f" {r.planes}pl" if getattr(r, "planes", 1) > 1 else "")
        focus = getattr(r, "focus_median", None)
        rows.append({"slide": r.slide, "status": r.status, "kind": kind, "cells": str(r.cells),
                     "um/px": f"{r.mpp:.3g}" if r.mpp else "", "focus": "" if focus is None else f"{focus:.2f}",
                     "blurred": str(getattr(r, "blurred", "")),
                     "recall": f"{e['recall']:.3f}" if e else "", "prec": f"{e['precision']:.3f}" if e else "",
                     "F1": f"{e['f1']:.3f}" if e else ""})
    order = ["slide", "status", "cells", "kind", *(["recall", "prec", "F1"] if evaluated else []), "um/px", "focus",
             "blurred"]  # most needed first: columns drop from the end until the table fits
    width = lambda c: max([len(c), *(len(row[c]) for row in rows)]) + 2  # noqa: E731
    while len(order) > 3 and sum(width(c) for c in order) > out.width:
        order.pop()
    view = RichTable(title=f"cells in table {report.table} ({report.detector} detector)", box=box.SIMPLE_HEAD,
                     title_justify="left")
    for c in order:
        view.add_column(c, justify="left" if c in ("slide", "status", "kind") else "right", no_wrap=True,
                        min_width=width(c) - 2)
    for row in rows:
        view.add_row(*(row[c] for c in order))
    out.print(view)
    line = (f"{len(report.results)} slides/fields: {report.count('found')} with cells ({report.cells_added} cells "
            f"added), {report.count('empty')} empty, {report.count('done')} already in the table, "
            f"{report.count('skipped')} skipped; {report.seconds:.1f} s")
    out.print(line, soft_wrap=True)
    if report.evaluation:
        e = report.evaluation
        out.print(f"against the points: recall {e['recall']:.3f}, precision {e['precision']:.3f}, F1 {e['f1']:.3f} "
                  f"({e['tp']} found, {e['fp']} extra, {e['fn']} missed)", soft_wrap=True)


# Networks per `cells train` model: on Cervix93 an ensemble of three steadied the held-out training fields but did
# not beat single networks on the test fields, at three times the training and detection time (BENCHMARKS.md, "Cells").
DEFAULT_ENSEMBLE = 1


@app.command("train")
def train(
    points: Annotated[Path, typer.Option("--points", help="One point inside each nucleus, in px of its image: a CSV slide (or frame),x,y, a QuPath GeoJSON export of point annotations (Point / MultiPoint; its image named by the file, frame012.geojson, or by an image property), or a folder of them.", show_default=False)],
    images: Annotated[list[Path], typer.Option("--images", help="The annotated fields (files or folders); each file's name without suffix is its id in the points file.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model file to write (a few MB): use it with `cells --detector FILE`.")] = Path("nucleus_detector.pt"),
    mpp: Mpp = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps (batches of patches) per network; default the detector's own.", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (the same seed gives the same model).")] = 0,
    ensemble: Annotated[int, typer.Option("--ensemble", min=1, help="Networks trained (seeds --seed, --seed + 1, ...) and averaged in the one model file: steadier than one network, N times the training and detection time.")] = DEFAULT_ENSEMBLE,
) -> None:
    """Learn a nucleus detector from point annotations (the clicks a pathologist makes in QuPath: export the
    points as GeoJSON, or a CSV). The model is small and trains on the CPU in minutes; with `--ensemble N`, N
    networks whose heat maps are averaged. One file records the training data, the members and the settings.

    Example: cytoretrieve cells train --points points.csv --images fields/ --mpp 0.25 --out nuclei.pt
    """
    import numpy as np

    from cytoretrieve.errors import CytoError
    from cytoretrieve.ids import slide_id
    from cytoretrieve.jobs.cells import expand_sources, read_points
    from cytoretrieve.sources.slides.detectors.learned import train_point_detector
    from cytoretrieve.sources.slides.reader import Slide

    err = Console(stderr=True)
    left_out: list[str] = []
    marked = read_points(points, left_out)
    _note_left_out(err, points, left_out)
    samples, names = [], []
    for src in expand_sources(images, mpp=mpp):
        sid = slide_id(src.path)
        if sid not in marked:
            continue
        with Slide(src.path, mpp=src.mpp) as slide:
            w, h = slide.info.dimensions
            rgb = np.asarray(slide.read_rgb(0, 0, 0, (w, h)).convert("RGB"))
            samples.append((rgb, marked[sid], slide.info.mpp))
            names.append(src.path.name)
    if not samples:
        raise CytoError(f"none of the images is named in {points} (ids are file names without their suffix)")
    err.print(f"training {ensemble} network{'s' if ensemble > 1 else ''} on {len(samples)} fields, "
              f"{sum(len(s[1]) for s in samples)} points")
    with err.status("training the nucleus detector"):
        model = train_point_detector(samples, names=names, seed=seed, ensemble=ensemble,
                                     **({"steps": steps} if steps else {}))
    model.save(out)
    Console().print(f"wrote {out}: use it with `cytoretrieve cells SOURCES --detector {out}`")
