"""`cytoretrieve import h5` and `cytoretrieve export h5`: CLAM / TRIDENT patch feature files in and out.

`export` was one command (a DINO checkpoint -> safetensors); it is now a group: `export weights CHECKPOINT` is that
command under its own name and `export h5` writes feature files. `export CHECKPOINT ...` (no sub-command) still
runs `export weights`, so existing scripts keep working.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from cytoretrieve.cli import options, train


class _ExportGroup(TyperGroup):
    """`export` sub-commands; a first argument that names none of them is a checkpoint for `export weights`."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["weights", *args]
        return super().resolve_command(ctx, args)


import_app = typer.Typer(help="Bring vectors made elsewhere into the store.", no_args_is_help=True)
export_app = typer.Typer(cls=_ExportGroup, no_args_is_help=True,
                         help="Write what the store holds in other tools' formats (`export CKPT` = `export weights CKPT`).")
export_app.command("weights")(train.export)

Layout = Annotated[str, typer.Option("--layout", help="clam or trident.")]


@import_app.command("h5")
def import_h5(
    folder: Annotated[Path, typer.Argument(help="Folder of per-slide .h5 feature files (CLAM's FEATURES_DIRECTORY or its h5_files/, or TRIDENT's features_<encoder>/).")],
    table: Annotated[str, typer.Option("--table", "-t", help="Vector table to create or append to.")],
    slides: Annotated[Path | None, typer.Option("--slides", help="Folder of the slide files (sets each row's path, so heat maps show the slide, and the pixel size).")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="Slide labels CSV (slide,label[,binary]): each patch gets its slide's label.")] = None,
    encoder: Annotated[str | None, typer.Option("--encoder", help="The model that made the vectors, when the files do not name it (CLAM's do not).")] = None,
    layout: Annotated[str, typer.Option("--layout", help="auto, clam or trident (auto: trident when the files carry its attributes).")] = "auto",
    patches: Annotated[Path | None, typer.Option("--patches", help="CLAM's patches folder (RESULTS_DIRECTORY/patches), whose files carry the patch geometry.")] = None,
    store: options.Store = options.DEFAULT_STORE,
    json_out: options.JsonOut = None,
) -> None:
    """Import a folder of CLAM or TRIDENT patch feature files as a vector table: one row per patch.

    Each row: the vector from `features`, level-0 x, y from `coords`, the patch size and level (or magnification)
    from the attributes, the slide id from the file name, the slide's label from --labels. The table records the
    encoder (from the files, else --encoder), so classify, transfer, score and search --id work on it; search by
    image needs that encoder. Files are all checked before anything is written; a rerun skips imported slides.

    Example: cytoretrieve import h5 job/20x_256px_0px_overlap/features_uni_v1 --table cohort_uni --labels slides.csv
    """
    from rich.console import Console

    from cytoretrieve.jobs.import_h5 import import_h5 as run_import
    from cytoretrieve.store.tables import Store

    report = run_import(folder, Store(store), table, layout=layout, encoder=encoder, slides=slides, labels=labels,
                        patches=patches)
    console = Console(stderr=json_out == "-")  # stdout is the JSON then
    console.print(f"{report.table}: {report.slides} slides, {report.rows} patches of {report.dim}-d "
                  f"{report.encoder} vectors in {report.seconds:.1f} s ({report.rows_per_second:,.0f} rows/s)"
                  + (f"; {report.skipped} slide(s) already there, skipped" if report.skipped else ""))
    for note in report.notes:
        console.print(f"note: {note}")
    if json_out:
        options.write_json(report.to_dict(), json_out)


@export_app.command("h5")
def export_h5(
    table: options.Table,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write into (created if needed).")],
    layout: Layout = "trident",
    where: Annotated[str | None, typer.Option("--where", help="SQL filter on the rows to export.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace files of the same names already in --out.")] = False,
    store: options.Store = options.DEFAULT_STORE,
    json_out: options.JsonOut = None,
) -> None:
    """Write a tile table as one .h5 feature file per slide, in CLAM's or TRIDENT's layout.

    trident: OUT/<slide>.h5 (features + coords with TRIDENT's attributes). clam: OUT/h5_files/<slide>.h5 and
    OUT/patches/<slide>.h5 (coords with patch_size, patch_level, downsample). Same dataset names, dtypes and
    attributes as the tools write, so their own readers (and `import h5`) take the files back unchanged.

    Example: cytoretrieve export h5 --table cohort_tiles_uni --out features_uni/ --layout clam
    """
    from rich.console import Console

    from cytoretrieve.jobs.export_h5 import export_h5 as run_export
    from cytoretrieve.store.tables import Store

    report = run_export(Store(store).open(table), out, layout=layout, overwrite=overwrite, where=where)
    console = Console(stderr=json_out == "-")  # stdout is the JSON then
    console.print(f"{report.slides} slides, {report.rows} patches -> {len(report.files)} {layout} files in {out} "
                  f"in {report.seconds:.1f} s ({report.to_dict()['rows_per_second']:,.0f} rows/s)")
    for note in report.notes:
        console.print(f"note: {note}")
    if json_out:
        options.write_json(report.to_dict(), json_out)
