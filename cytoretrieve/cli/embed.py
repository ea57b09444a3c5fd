"""`cytoretrieve embed`: embed a cell dataset, a tile table or a slide into a store table (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from cytoretrieve.cli import options


class RateColumn(ProgressColumn):
    """Images per second."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:6.1f} img/s" if task.speed else "   ... img/s", style="progress.data.speed")


def embed(
    source: Annotated[Path, typer.Argument(help="Dataset: a Herlev or SIPaKMeD folder, class folders, a CSV manifest (path,label[,group]), the name of a tile table of the store (`cytoretrieve tile`), or one slide file (tiled first as `cytoretrieve tile` does by default).")],
    backbone: Annotated[str | None, typer.Option("--backbone", "-b", help="Any timm model name: resnet50, vit_small_patch16_224, resnet18... Default: the arch in the JSON beside --weights FILE, else resnet50.")] = None,
    weights: Annotated[str, typer.Option("--weights", "-w", help="'timm' (pretrained, needs internet), 'random' (seeded, for tests), or a file: .safetensors or a cytoretrieve/DINO checkpoint (teacher).")] = "timm",
    table: Annotated[str | None, typer.Option("--table", "-t", help="Table to write; default: the dataset name and the backbone joined by an underscore, e.g. herlev_resnet18.")] = None,
    store: options.Store = options.DEFAULT_STORE,
    layout: Annotated[str, typer.Option("--layout", help="auto, herlev, sipakmed, folders or manifest.")] = "auto",
    label_map: Annotated[Path | None, typer.Option("--label-map", help="JSON or CSV (class,binary[,name]) mapping classes to positive (1) / negative (0).")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Input side in px; default the model's.")] = None,
    resize: Annotated[str | None, typer.Option("--resize", help="letterbox (keep aspect, pad with background), stretch, or center-crop.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, metavar="N", help="Images per forward pass.")] = 64,
    workers: Annotated[int | None, typer.Option("--workers", min=0, metavar="N", help="DataLoader worker processes; default half the cores (at most 8), or 0 (decode in-process) for a CPU run on 2 or fewer cores.")] = None,
    device: options.Device = "auto",
    commit_rows: Annotated[int, typer.Option("--commit-rows", min=1, metavar="ROWS", help="Rows per store commit (a killed job loses at most one commit's work).")] = 2048,
    wait: Annotated[float, typer.Option("--wait", min=0, metavar="SECONDS", help="If another job is writing the table, wait up to this many seconds for it (default: stop at once with who holds it). torchrun processes of one job write together.")] = 0.0,
    stain: Annotated[str, typer.Option("--stain", help="Stain normalisation before the model: none, macenko or reinhard (onto a target fitted on Herlev cells, or --stain-target). Recorded in the table and its fingerprint; never mixed; refused for grey images.")] = "none",
    stain_target: Annotated[Path | None, typer.Option("--stain-target", metavar="IMAGE", help="Reference image whose stain --stain maps every image onto (default: the shipped Herlev target).", show_default=False)] = None,
    plane: Annotated[str | None, typer.Option("--plane", help="Slides and tile tables of multi-plane scans: read every tile from focal plane N, its sharpest plane (best) or an extended-depth-of-field composite (edf) instead of the plane its row records. Recorded in the table; never mixed.", show_default=False)] = None,
) -> None:
    """Embed every image of SOURCE with a backbone into a store table.

    Resumable: rerun the same command after Ctrl-C or a crash and only the missing images are embedded; a
    finished job adds nothing. A table holds one backbone's vectors: another backbone needs another table.
    Unreadable images are skipped, counted and listed.

    Example: cytoretrieve embed data/herlev --backbone resnet50 --weights dino_teacher.safetensors
    """
    console = Console(stderr=True)
    if backbone is None and weights in ("timm", "random"):
        backbone = "resnet50"
    with console.status(f"checking {source}", spinner="dots") as status:  # a first line before any heavy import
        from cytoretrieve.errors import CytoError
        from cytoretrieve.sources.resolve import resolve_source
        from cytoretrieve.sources.slides.planes import parse_plane

        resolve_source(source)  # a bad path fails here, in well under a second, before torch and timm load
        parse_plane(plane)  # as a bad --plane does
        from cytoretrieve.models.stain import NONE, check_stain

        stain = check_stain(stain)  # as a bad --stain or --stain-target does
        if stain_target is not None and stain == NONE:
            raise CytoError("`stain_target` needs a `stain` normaliser (macenko, reinhard), not none")
        if stain_target is not None and not stain_target.is_file():
            raise CytoError(f"`stain_target` image not found: {stain_target}")
        status.update(f"loading torch, timm and {backbone or 'the backbone'} ({weights} weights)")
        from cytoretrieve.jobs.embed import embed as run_embed
        from cytoretrieve.models.backbones import load_backbone
        from cytoretrieve.store.tables import Store

        bb = load_backbone(backbone, weights, image_size=image_size, resize=resize)
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        TextColumn("{task.fields[failed]} failed"), TimeRemainingColumn(), console=console,
    )
    task = None

    def on_start(what: str, images: int, cell_table) -> None:  # noqa: ANN001
        normalised = "" if stain == NONE else f", stain {stain}"
        console.print(f"{what}, {images} images -> table [bold]{cell_table.name}[/] in {store}; "
                      f"backbone {bb.arch} {cell_table.fingerprint[:12]} ({bb.dim}-d){normalised}")

    def on_progress(done: int, todo: int, failed: int) -> None:
        nonlocal task
        if task is None:  # started only once there is work, so an early error prints no empty bar
            progress.start()
            task = progress.add_task("embedding", total=todo, failed=0)
        progress.update(task, completed=done, failed=failed)

    try:
        report = run_embed(source, bb, Store(store, wait=wait), table=table, layout=layout, label_map=label_map,
                           batch_size=batch_size, workers=workers, device=device, commit_rows=commit_rows,
                           on_progress=on_progress, on_start=on_start, plane=plane, stain=stain,
                           stain_target=stain_target)
    finally:
        if task is not None:  # a progress bar never started would print an empty line on stop
            progress.stop()
    out = Console()
    out.print(f"table [bold]{report.table}[/]: {report.added} added, {report.skipped} already stored, "
              f"{len(report.failed)} unreadable; {report.images_per_second:.1f} img/s")
    for row_id, reason in report.failed:
        out.print(f"  skipped {row_id}: {reason}", markup=False, highlight=False)
    from cytoretrieve.ids import parse_tile_id

    partial = sorted({tile[0] for row_id, _ in report.failed if (tile := parse_tile_id(row_id))})
    if partial:
        out.print(f"partial slides (some tiles unreadable): {', '.join(partial)}", markup=False, highlight=False)
    if report.interrupted:
        console.print("interrupted: what was embedded is stored; rerun the same command to finish")
        raise typer.Exit(130)
