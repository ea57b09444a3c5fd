"""`cytoretrieve annotations import`: QuPath GeoJSON exports -> labelled cell crops and tiles (module `annotate`:
`annotations` would clash with `from __future__ import annotations` in the CLI package)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table as RichTable

from cytoretrieve.cli import options
from cytoretrieve.cli.messages import flag_message
from cytoretrieve.cli.tile import Mpp, Objective, TargetMpp, TileSize

app = typer.Typer(help="Annotations made on whole slides (QuPath GeoJSON exports).", no_args_is_help=True)


@app.command("import")
def import_(
    annotations: Annotated[list[Path], typer.Argument(help="QuPath GeoJSON exports, one per slide, named SLIDE_ID.geojson when there are several.", show_default=False)],
    slide: Annotated[list[Path], typer.Option("--slide", help="The annotated slide, or a folder of slides (repeatable).", show_default=False)],
    store: options.Store = options.DEFAULT_STORE,
    table: Annotated[str, typer.Option("--table", "-t", help="Writes TABLE_cells (a crop around each annotation) and TABLE_tiles (a tile centred on it).")] = "annotations",
    mpp: Mpp = None,
    objective: Objective = None,
    target_mpp: TargetMpp = 0.5,
    tile_size: TileSize = 320,
    cell_size: Annotated[int, typer.Option("--cell-size", help="Crop side in px around a point (a polygon gets its bounding box plus 10% a side, at least this).")] = 128,
    label_map: Annotated[Path | None, typer.Option("--label-map", help="JSON or CSV label map giving each class its binary label (default: Bethesda categories; HSIL, LSIL, ASC-US, ASC-H, SCC positive). `score --positives` uses the positive rows.")] = None,
    json_out: options.JsonOut = None,
) -> None:
    """Import annotations (points or polygons with a classification) into two labelled tile tables: a cell
    crop around each annotation and a 320 px tile centred on it, both at --target-mpp (0.5 um/px = 20x).

    Annotations outside the slide, without a classification or with another geometry are reported, not
    imported; the rest goes on. A rerun skips the slides already imported.

    Example: cytoretrieve annotations import case-001.geojson --slide slides/case-001.svs
    """
    from cytoretrieve.errors import CytoError
    from cytoretrieve.jobs.tile import import_annotations
    from cytoretrieve.sources.cells.labels import BETHESDA, load_label_map
    from cytoretrieve.sources.slides.annotations import pair_annotations
    from cytoretrieve.store.tables import Store

    labels = load_label_map(label_map) if label_map is not None else BETHESDA
    pairs = pair_annotations(annotations, slide)
    report = import_annotations(pairs, Store(store), table=table, target_mpp=target_mpp, tile_size=tile_size,
                                cell_size=cell_size, mpp=mpp, objective=objective, labels=labels)
    out = Console()
    view = RichTable(title=f"{report.cells_table} + {report.tiles_table} in {store}", box=box.SIMPLE_HEAD)
    for col in ("slide", "status", "cells", "tiles", "outside", "left out", "note"):
        view.add_column(col, justify="right" if col in ("cells", "tiles", "outside", "left out") else "left")
    for r in report.results:
        view.add_row(r.slide, r.status, str(r.cells), str(r.tiles), str(len(r.outside)), str(len(r.problems)), r.reason or "")
    out.print(view)
    err = Console(stderr=True)
    for r in report.results:
        for line in r.outside:
            err.print(f"warning: {r.slide}: annotation {line}: not imported", markup=False, highlight=False, soft_wrap=True)
        for line in r.problems:
            err.print(f"warning: {r.slide}: {line}: not imported", markup=False, highlight=False, soft_wrap=True)
        if r.status == "skipped":
            err.print(f"skipped {r.slide}: {flag_message(r.reason)}", markup=False, highlight=False, soft_wrap=True)
    if json_out:
        options.write_json(report.to_dict(), json_out)
    if report.results and all(r.status == "skipped" for r in report.results):
        first = report.results[0]
        raise CytoError(f"{first.slide}: {first.reason}" if len(report.results) == 1
                        else f"none of the {len(report.results)} slides could be read (first: {first.slide}: {first.reason})")
