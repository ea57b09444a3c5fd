"""`cytoretrieve search`: the stored cells (or tiles) most similar to an image or to a stored row."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table as RichTable

from cytoretrieve.cli import options


def search(
    table: options.Table,
    image: Annotated[Path | None, typer.Argument(help="Query image; embedded with the table's own backbone.")] = None,
    row_id: Annotated[str | None, typer.Option("--id", help="Query by a stored row id instead of an image (the row itself is left out).")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of neighbours.")] = 10,
    where: Annotated[str | None, typer.Option("--where", help="SQL filter on the rows, e.g. \"label = 'CIS'\" or \"binary = 1\".")] = None,
    store: options.Store = options.DEFAULT_STORE,
    device: options.Device = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print the hits as JSON instead of a table.")] = False,
) -> None:
    """Find the k stored cells most similar to IMAGE (or to --id ROW_ID).

    Each hit shows its cosine similarity, label, source and group (slide location for tiles); for a labelled
    table the neighbours' majority label is given too.

    By image: cytoretrieve search cell.png --table herlev_resnet50 -k 5

    By id, among positives only: cytoretrieve search --id carcinoma_in_situ/149143370-149143378-001.jpg
    --table herlev_resnet50 --where "binary = 1"
    """
    from cytoretrieve.queries.search import search as run_search
    from cytoretrieve.store.tables import Store

    t = Store(store).open(table)
    result = run_search(t, image=image, row_id=row_id, k=k, where=where, device=device)
    if json_out:
        options.write_json(result.to_dict(), "-")
        return
    console = Console()
    tiles = any(h.slide is not None for h in result.hits)
    view = RichTable(title=f"{len(result.hits)} nearest to {result.query} in {t.name}", box=box.SIMPLE_HEAD)
    labelled = any(h.label for h in result.hits)
    columns = ("#", "score", *(("label",) if labelled else ()), "id", *(("x", "y") if tiles else ("group", "source")))
    for col in columns:
        view.add_column(col, justify="right" if col in ("#", "score", "x", "y") else "left",
                        no_wrap=col != "source", overflow="fold")
    for rank, h in enumerate(result.hits, 1):
        cells = {"#": str(rank), "score": f"{h.score:.4f}", "label": h.label or "", "id": h.id, "group": h.group or "",
                 "source": h.path or "", "slide": h.slide or "", "x": str(h.x), "y": str(h.y)}
        view.add_row(*[cells[c] for c in columns])
    console.print(view)
    if result.majority_label is not None:
        votes = Counter(h.label for h in result.hits)[result.majority_label]
        console.print(f"majority label of the neighbours: [bold]{result.majority_label}[/] ({votes}/{len(result.hits)})")
