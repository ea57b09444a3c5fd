"""`cytoretrieve tile`: whole slides -> cell foreground and deposit region (or a tissue mask) -> 320 px tiles at
0.5 um/px -> a tile table (one bag per slide)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cytoretrieve.cli import options
from cytoretrieve.cli.messages import flag_message

if TYPE_CHECKING:  # imported inside the command: `cytoretrieve --help` loads no slide library
    from cytoretrieve.sources.slides.deposit import DepositParams
    from cytoretrieve.sources.slides.grid import GridSpec

Mpp = Annotated[float | None, typer.Option("--mpp", help="Level-0 um/px for slides whose metadata has none (camera images, some TIFFs), or an implausible one (72 dpi TIFFs).")]
Objective = Annotated[float | None, typer.Option("--objective", help="Objective power for slides without mpp metadata: P means 10/P um/px (20 -> 0.5).")]
TargetMpp = Annotated[float, typer.Option("--target-mpp", help="Pixel size of the tiles, um/px (0.5 = 20x).")]
TileSize = Annotated[int, typer.Option("--tile-size", help="Tile side in px at --target-mpp.")]


def tile(
    slides: Annotated[list[Path] | None, typer.Argument(help="Slide files (any format OpenSlide reads, plain and OME-TIFF, PNG/JPEG/BMP camera fields with --mpp) or folders of them. May be omitted when --labels has a path column.", show_default=False)] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="CSV slide,label[,binary][,path]: slide labels stored with the tiles.")] = None,
    store: options.Store = options.DEFAULT_STORE,
    table: Annotated[str, typer.Option("--table", "-t", help="Tile table to write (created if needed; resumable per slide).")] = "tiles",
    mpp: Mpp = None,
    objective: Objective = None,
    tile_size: TileSize = 320,
    stride: Annotated[int | None, typer.Option("--stride", help="Grid step in px at --target-mpp; default the tile size (no overlap).")] = None,
    target_mpp: TargetMpp = 0.5,
    rule: Annotated[str, typer.Option("--rule", help="Which tiles to keep: cells (cytology, the default: tiles in the deposit region holding --min-foreground-um2 of cells) or coverage (tissue sections: tiles at least --min-coverage deposit).")] = "cells",
    min_foreground_um2: Annotated[float | None, typer.Option("--min-foreground-um2", help="Cells rule: um2 of cell foreground a tile needs (default 100, about one small cell; 0 keeps every tile of the deposit region).", show_default=False)] = None,
    min_coverage: Annotated[float | None, typer.Option("--min-coverage", help="Coverage rule: keep a tile when at least this fraction of it is deposit (default 0.05: thin strands and tissue edges are kept).", show_default=False)] = None,
    deposit: Annotated[str | None, typer.Option("--deposit", help="Coverage rule: deposit detection, saturation (HSV, default) or grey (Otsu on grey level).", show_default=False)] = None,
    preview: Annotated[Path | None, typer.Option("--preview", help="Write one PNG per slide here: deposit region, kept tiles, tiles with too little to keep, excluded artefacts, blurred tiles.")] = None,
    plane: Annotated[str | None, typer.Option("--plane", help="Focal plane of multi-plane scans (z-stacks, a folder of plane images): a number, best (the sharpest plane per tile) or edf (extended depth of field: the sharpest plane per pixel). Default: plane 0.", show_default=False)] = None,
    min_focus: Annotated[float | None, typer.Option("--min-focus", help="Drop tiles whose focus score is below this (sharp Pap tiles score ~0.5-2, blurred ones under 0.3); tiles with too little stain to score are kept.", show_default=False)] = None,
    focus: Annotated[bool, typer.Option("--focus/--no-focus", help="Score every kept tile's focus (one read per tile; stored as the focus column).")] = True,
    json_out: options.JsonOut = None,
) -> None:
    """Cut whole slides into tiles: lay a grid of 320 px tiles at 0.5 um/px (20x) over the slide, keep the
    tiles the rule picks, and store one row per kept tile (slide, level-0 x/y, read level and size, mpp,
    coverage, slide label) in a tile table. Each slide's rows are its bag.

    The default rule, cells, is for cytology (Pap smears): it finds cells on a ~4 um/px image (pale cytoplasm
    included), excludes marker ink, the label, the coverslip edge and dark debris, and keeps every tile of the
    deposit region that holds at least --min-foreground-um2 of cells. Use --rule coverage for tissue sections.
    --json reports per slide the tiles kept, in the region and on the grid, the region, cell and excluded areas,
    and the thresholds used (the glass colour measured, ...).

    A slide that cannot be read (not a slide, truncated, no mpp without --mpp) is skipped and reported; a
    slide with no deposit gives a warning and 0 tiles. A rerun skips the slides the table already holds.

    Example: cytoretrieve tile slides/ --labels slides.csv --preview qc/
    """
    err = Console(stderr=True)
    with err.status("loading the slide readers and the store", spinner="dots"):  # a first line while they import
        from cytoretrieve.errors import CytoError
        from cytoretrieve.jobs.tile import tile_slides
        from cytoretrieve.sources.cohort.labels import read_labels
        from cytoretrieve.store.tables import Store

    spec, params = _rule_settings(rule, tile_size, target_mpp, stride, min_foreground_um2, min_coverage, deposit)
    slide_labels = read_labels(labels) if labels else None
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"), console=err, disable=not err.is_terminal,
    )
    tasks: dict[str, int] = {}

    def on_slide(i: int, n: int, path: Path) -> None:
        if not tasks:
            progress.start()
            tasks["all"] = progress.add_task("slides", total=n, note="")
            tasks["one"] = progress.add_task("slide", total=1, note="")
        progress.update(tasks["one"], description=path.name[:40], completed=0, total=1, note="thumbnail")

    def on_progress(done: int, total: int) -> None:
        progress.update(tasks["one"], completed=done, total=total)

    def on_result(result) -> None:  # noqa: ANN001
        progress.update(tasks["one"], completed=1, total=1, note=f"{result.status}: {result.tiles} tiles")
        progress.advance(tasks["all"])

    try:
        report = tile_slides(slides or [], Store(store), table=table, spec=spec, params=params, labels=slide_labels,
                             mpp=mpp, objective=objective, preview=preview, on_slide=on_slide,
                             on_progress=on_progress, on_result=on_result, focus=focus, plane=plane,
                             min_focus=min_focus)
    finally:
        progress.stop()

    out = Console()
    from cytoretrieve.cli.fit import Column, fitted_table

    labelled = any(r.label for r in report.results)
    drops = {"blurred": 9, "focus": 8, "read": 7, "level": 6, "grid": 5, "region": 4, "mm2": 3}
    columns = [Column(c, "left" if c in ("slide", "status", "label") else "right", wrap=c == "label",
                      drop=drops.get(c, 0))
               for c in ("slide", "status", "tiles", "region", "grid", "mm2", "level", "read", "um/px", "focus",
                         "blurred", *(("label",) if labelled else ()))]
    rows = [[r.slide, r.status, str(r.tiles), str(r.region_tiles) if r.grid_tiles else "",
             str(r.grid_tiles) if r.grid_tiles else "",
             f"{r.deposit_mm2:.3f}" if r.deposit_mm2 is not None else "", "" if r.level is None else str(r.level),
             "" if r.read_size is None else str(r.read_size), f"{r.tile_mpp:.3f}" if r.tile_mpp else "",
             "" if r.focus_median is None else f"{r.focus_median:.2f}", str(r.blurred) if r.grid_tiles else "",
             *((r.label or "",) if labelled else ())] for r in report.results]
    view = fitted_table(out, f"table {report.table} in {report.store}", columns, rows)
    shown = {c.header for c in view.columns}
    legend = [text for name, text in (("region", "region: tiles touching the deposit region"),
                                      ("grid", "grid: tiles on the slide's grid"), ("mm2", "mm2: the region's area"),
                                      ("read", "read: px read at level"), ("um/px", "um/px: the tiles' pixel size"))
              if name in shown]
    out.print(view, markup=False, highlight=False)
    out.print("; ".join(legend), markup=False, highlight=False)
    out.print(f"{len(report.results)} slides: {report.count('tiled')} tiled ({report.tiles_added} tiles added), "
              f"{report.count('empty')} empty, {report.count('done')} already in the table, "
              f"{report.count('skipped')} skipped; {report.seconds:.1f} s", markup=False, highlight=False)
    for r in report.results:  # why: one line each
        if r.status in ("empty", "skipped") or (r.status == "tiled" and r.reason):
            word = "skipped" if r.status == "skipped" else "warning:"
            err.print(f"{word} {r.slide}: {flag_message(r.reason)}", markup=False, highlight=False, soft_wrap=True)
    if json_out:
        options.write_json(report.to_dict(), json_out)
    if report.results and all(r.status == "skipped" for r in report.results):
        first = report.results[0]
        if len(report.results) == 1:
            raise CytoError(f"{first.slide}: {first.reason}")
        raise CytoError(f"none of the {len(report.results)} slides could be tiled (first: {first.slide}: {first.reason})")


def _rule_settings(rule: str, tile_size: int, target_mpp: float, stride: int | None, min_foreground_um2: float | None,
                   min_coverage: float | None, deposit: str | None) -> tuple[GridSpec, DepositParams | None]:
    """The grid spec and the rule's settings from the options; an option of the other rule is a mistake."""
    from cytoretrieve.errors import CytoError
    from cytoretrieve.sources.slides.deposit import DepositParams
    from cytoretrieve.sources.slides.grid import GridSpec

    if rule == "cells" and (min_coverage is not None or deposit is not None):
        name = "min_coverage" if min_coverage is not None else "deposit"
        raise CytoError(f"`{name}` is a setting of the coverage rule (tissue): add `rule` coverage, or leave it out")
    if rule == "coverage" and min_foreground_um2 is not None:
        raise CytoError("`min_foreground_um2` is a setting of the cells rule: leave it out with `rule` coverage")
    given = {k: v for k, v in (("min_foreground_um2", min_foreground_um2), ("min_coverage", min_coverage)) if v is not None}
    spec = GridSpec(tile_size=tile_size, target_mpp=target_mpp, stride=stride, rule=rule, **given)
    spec.validate()
    params = DepositParams(**({"method": deposit} if deposit else {})) if rule == "coverage" else None
    return spec, params
