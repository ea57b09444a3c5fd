"""`cytoretrieve search`: the stored cells (or tiles) most similar to an image or to a stored row, as a table, JSON,
an HTML page, a contact sheet or QuPath objects; and `search --evaluate`, search judged as classification."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table as RichTable

from cytoretrieve.cli import options
from cytoretrieve.errors import CytoError

if TYPE_CHECKING:
    from cytoretrieve.queries.search import SearchResult
    from cytoretrieve.queries.search_eval import SearchEvaluation
    from cytoretrieve.store.tables import VectorTable

DEFAULT_K = 10
DEFAULT_EVAL_KS = "1,3,5"


def search(
    table: options.Table,
    image: Annotated[Path | None, typer.Argument(help="Query image; embedded with the table's own backbone.")] = None,
    row_id: Annotated[str | None, typer.Option("--id", help="Query by a stored row id instead of an image (the row itself is left out).")] = None,
    k: Annotated[str | None, typer.Option("-k", "--k", help=f"Number of neighbours ({DEFAULT_K}); with --evaluate the k values to score ({DEFAULT_EVAL_KS}).")] = None,
    where: Annotated[str | None, typer.Option("--where", help="SQL filter on the rows, e.g. \"label = 'CIS'\" or \"binary = 1\".")] = None,
    store: options.Store = options.DEFAULT_STORE,
    device: options.Device = "auto",
    json_out: Annotated[str | None, typer.Option("--json", help="Write the hits (or the evaluation) as JSON to this file ('-' = stdout, instead of the table).")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML page of the query and its hits (pictures inlined).")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="Write a contact sheet PNG: the query, then the hits with their captions.")] = None,
    geojson: Annotated[Path | None, typer.Option("--geojson", help="Write the tile hits as QuPath GeoJSON objects (classification = label, similarity measured).")] = None,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Leave-one-out over the labelled rows: top-k accuracy and mMV@k, per class and overall, labels and binary classes.")] = False,
) -> None:
    """Find the k stored cells most similar to IMAGE (or to --id ROW_ID), or judge the table's search (--evaluate).

    Each hit shows its cosine similarity, label, source and group (slide location for tiles); for a labelled
    table the neighbours' label counts and majority label are given too.

    By image, as pictures: cytoretrieve search cell.png --table herlev_resnet50 -k 8 --html hits.html --png hits.png

    By id, among positives only: cytoretrieve search --id carcinoma_in_situ/149143370-149143378-001.jpg
    --table herlev_resnet50 --where "binary = 1"

    Search as classification: cytoretrieve search --evaluate --table herlev_resnet50 --k 1,3,5 --json eval.json
    (for tables with a group or slide column, each query's own group is left out of its hits).
    """
    from cytoretrieve.store.tables import Store

    if geojson is not None and not geojson.parent.is_dir():
        raise CytoError(f"folder {geojson.parent} of `geojson` does not exist: create it, or give another path")
    t = Store(store).open(table)
    if evaluate:
        if image is not None or row_id is not None or where or html or png or geojson:
            raise CytoError("`evaluate` scores the whole table: give no query image, `id`, `where`, `html`, `png` or `geojson`")
        _evaluate(t, k or DEFAULT_EVAL_KS, json_out)
        return
    from cytoretrieve.queries.search import search as run_search

    n = _int_k(k)
    result = run_search(t, image=image, row_id=row_id, k=n, where=where, device=device)
    console = Console(stderr=json_out == "-")
    if json_out is not None:
        options.write_json(result.to_dict(), json_out)
    if json_out != "-":
        _print_hits(console, result)
    for written in _write_views(t, result, image, row_id, html, png, geojson):
        console.print(f"wrote {written}")


def _int_k(k: str | None) -> int:
    if k is None:
        return DEFAULT_K
    try:
        return int(k)
    except ValueError:
        raise CytoError(f"`k` must be a whole number of neighbours, not {k!r} (k lists are for `evaluate`)") from None


def _print_hits(console: Console, result: SearchResult) -> None:
    if not result.hits:  # a filter that matches nothing is said, not an empty table
        console.print(f"no rows of {result.table} match the filter: no hits", markup=False, highlight=False)
        return
    tiles = any(h.slide is not None for h in result.hits)
    view = RichTable(title=f"{len(result.hits)} nearest to {result.query} in {result.table}", box=box.SIMPLE_HEAD)
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
        from cytoretrieve.views.hits import counts_line

        console.print(f"majority label of the neighbours: [bold]{result.majority_label}[/] (labels: {counts_line(result)})")


def _write_views(t: VectorTable, result: SearchResult, image: Path | None, row_id: str | None,
                 html: Path | None, png: Path | None, geojson: Path | None) -> list[Path]:
    """Write the requested pictures and QuPath file; the paths written."""
    written: list[Path] = []
    if html or png:
        from cytoretrieve.queries.search import query_picture, thumbnails

        thumbs = thumbnails(t, [h.id for h in result.hits])
        query = query_picture(t, image=image, row_id=row_id)
        if html:
            from cytoretrieve.views.search_page import write_search_page

            written.append(write_search_page(result, thumbs, query, html))
        if png:
            from cytoretrieve.views.contact_sheet import write_contact_sheet

            written.append(write_contact_sheet(result, thumbs, query, png))
    if geojson:
        from cytoretrieve.views.geojson import write_geojson
        from cytoretrieve.views.hits import hit_squares

        squares = hit_squares(result)
        if not squares and result.hits:
            raise CytoError(f"table '{t.name}' holds cells, not tiles: its hits have no slide position for `geojson`")
        written.append(write_geojson(squares, geojson))
    return written


def _evaluate(t: VectorTable, k: str, json_out: str | None) -> None:
    from cytoretrieve.queries.knn import parse_ks
    from cytoretrieve.queries.search_eval import evaluate_search

    result = evaluate_search(t, parse_ks(k))
    if json_out is not None:
        options.write_json(result.to_dict(), json_out)
    if json_out != "-":
        _print_evaluation(Console(), result)


def _print_evaluation(console: Console, result: SearchEvaluation) -> None:
    for ev in result.evaluations:
        what = "labels" if ev.kind == "label" else "binary classes"
        view = RichTable(title=f"search as classification: {result.table}, {what} (leave-one-out)",
                         box=box.SIMPLE_HEAD)
        for col in ("class", "n", *(f"top-{k}" for k in result.ks), f"mMV@{result.mv_k}"):
            view.add_column(col, justify="left" if col == "class" else "right")
        for c in [*ev.classes, ev.overall]:
            view.add_row(c.name, str(c.n), *(f"{c.top[k]:.3f}" for k in result.ks), f"{c.mv:.3f}",
                         style="bold" if c is ev.overall else None)
        console.print(view)
        if ev.queries_without_hits:
            console.print(f"{ev.queries_without_hits} queries had no hit outside their own group (counted as wrong)")
    console.print(f"left out of each query's hits: {result.exclusion}")
