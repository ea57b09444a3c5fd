"""`cytoretrieve datasets ...`: download the public datasets and show what a dataset folder or manifest holds.

CytoError is not caught here: the main app prints it as one line and exits 2. Warnings (a missing class folder, an
unverified download) are printed as notes on stderr.
"""

from __future__ import annotations

import shlex
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="Download cell datasets and inspect dataset folders or CSV manifests.", no_args_is_help=True)

_BINARY = {1: "1 positive", 0: "0 negative", None: "- neither"}


@contextmanager
def _notes(err: Console) -> Iterator[None]:
    """Show warnings raised inside the block as one-line notes on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                err.print(f"[yellow]note:[/] {escape(str(w.message))}", highlight=False, soft_wrap=True)


@app.command()
def download(
    name: Annotated[str, typer.Argument(help="Dataset to fetch: herlev or sipakmed.")],
    to: Annotated[Path, typer.Option("--to", help="Folder to download and unpack into.")],
    url: Annotated[
        str | None, typer.Option("--url", help="Use this archive instead (http(s), file:// or a local path).")
    ] = None,
    sha256: Annotated[
        str | None, typer.Option("--sha256", help="Expected sha256 (comma-separated, one per archive, for several).")
    ] = None,
) -> None:
    """Download NAME into --to, verify its checksum, unpack it, and print the dataset root."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from cytoretrieve.sources.cells.download import SOURCES, download_dataset

    err = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    bar = Progress(*columns, console=err)
    tasks: dict[str, int] = {}

    def on_progress(file_name: str, done: int, total: int | None) -> None:
        if not tasks:
            bar.start()  # only once bytes flow, so an argument error prints no empty bar
        if file_name not in tasks:
            tasks[file_name] = bar.add_task(escape(file_name), total=total)
        bar.update(tasks[file_name], completed=done, total=total)

    with _notes(err):
        try:
            root = download_dataset(name, to, url=url, sha256=sha256, progress=on_progress)
        finally:
            if tasks:
                bar.stop()
    typer.echo(str(root))
    source = SOURCES[name.lower()]
    err.print(f"source: {source.homepage}; please cite {source.cite}", highlight=False, soft_wrap=True)
    err.print(f"next: cytoretrieve datasets info {shlex.quote(str(root))}", highlight=False, soft_wrap=True)


@app.command()
def info(
    source: Annotated[Path, typer.Argument(help="Dataset folder or CSV manifest.")],
    layout: Annotated[
        str, typer.Option("--layout", help="auto, herlev, sipakmed, sipakmed-full, folders or manifest.")
    ] = "auto",
    label_map: Annotated[
        Path | None, typer.Option("--label-map", help="JSON or CSV file: class -> binary (1/0/null) [and name].")
    ] = None,
) -> None:
    """Show the layout, dataset name and per-class counts (code, long name, binary) of SOURCE."""
    from cytoretrieve.sources.cells import open_dataset

    out, err = Console(), Console(stderr=True)
    with _notes(err):
        ds = open_dataset(source, layout=layout, label_map=label_map)
    counts = Counter(r.label for r in ds.records)
    binaries = Counter(r.binary for r in ds.records)
    out.print(f"layout:    {ds.layout}", highlight=False)
    out.print(f"dataset:   {ds.name}", highlight=False)
    out.print(f"root:      {ds.root}", highlight=False)
    if ds.labels is not None:
        out.print(f"label map: {ds.labels.name}", highlight=False)
    table = Table()
    table.add_column("code")
    table.add_column("name")
    table.add_column("binary")
    table.add_column("cells", justify="right")
    classes = ds.labels.classes if ds.labels is not None else ()
    for code in classes:
        table.add_row(code, ds.labels.long_name(code), _BINARY[ds.labels.binary_of(code)], str(counts.get(code, 0)))
    if counts.get(None):
        table.add_row("(none)", "unlabelled", _BINARY[None], str(counts[None]))
    table.add_section()
    table.add_row("total", "", "", str(len(ds.records)))
    out.print(table)
    out.print(
        f"positive {binaries.get(1, 0)}, negative {binaries.get(0, 0)}, neither {binaries.get(None, 0)}",
        highlight=False,
    )
    groups = {r.group for r in ds.records if r.group is not None}
    if groups:
        out.print(f"groups:    {len(groups)}", highlight=False)
