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
    labels: Annotated[str, typer.Option("--labels", help="With --evaluate: stored labels, or reviewed (a row's latest expert review where it has one, `cytoretrieve labels`).")] = "stored",
    slide: Annotated[str | None, typer.Option("--slide", help="Slides like this slide: the nearest slides (or fields) of a tile or cell table to SLIDE, with their labels (its own group left out); with --evaluate, slide retrieval judged leave-one-slide-out.", show_default=False)] = None,
    signature: Annotated[str, typer.Option("--signature", help="With --slide: how a slide is summarised: mosaic (k-means representatives, median of minimum distances, Yottixel) or mean (the mean vector).")] = "mosaic",
) -> None:
    """Find the k stored cells most similar to IMAGE (or to --id ROW_ID), or judge the table's search (--evaluate).

    Each hit shows its cosine similarity, label, source and group (slide location for tiles); for a labelled
    table the neighbours' label counts and majority label are given too.

    By image, as pictures: cytoretrieve search cell.png --table herlev_resnet50 -k 8 --html hits.html --png hits.png

    By id, among positives only: cytoretrieve search --id carcinoma_in_situ/149143370-149143378-001.jpg
    --table herlev_resnet50 --where "binary = 1"

    Search as classification: cytoretrieve search --evaluate --table herlev_resnet50 --k 1,3,5 --json eval.json
    (for tables with a group or slide column, each query's own group is left out of its hits).

    Slides like this slide: cytoretrieve search --slide case-017 --table cohort_resnet50 -k 5 (add --evaluate for
    Top-1, Top-3 and majority vote at 5 over every slide).
    """
    console = Console(stderr=json_out == "-")
    status = Console(stderr=True).status("opening the store", spinner="dots")
    status.start()
    try:
        from cytoretrieve.store.tables import Store
    finally:
        status.stop()

    if geojson is not None and not geojson.parent.is_dir():
        raise CytoError(f"folder {geojson.parent} of `geojson` does not exist: create it, or give another path")
    t = Store(store).open(table)
    if slide is not None:
        if image is not None or row_id is not None or where or html or png or geojson:
            raise CytoError("`slide` searches whole slides: give no query image, `id`, `where`, `html`, `png` or `geojson`")
        _slides(console, t, slide, signature, _int_k(k), evaluate, json_out)
        return
    if evaluate:
        if image is not None or row_id is not None or where or html or png or geojson:
            raise CytoError("`evaluate` scores the whole table: give no query image, `id`, `where`, `html`, `png` or `geojson`")
        _evaluate(t, k or DEFAULT_EVAL_KS, json_out, labels)
        return
    n = _int_k(k)
    what = f"loading {t.meta['backbone']['arch']} and embedding {image}" if image is not None else f"searching {t.name}"
    with Console(stderr=True).status(what, spinner="dots"):
        from cytoretrieve.queries.search import search as run_search

        result = run_search(t, image=image, row_id=row_id, k=n, where=where, device=device)
    if json_out is not None:
        options.write_json(result.to_dict(), json_out)
    if json_out != "-":
        _print_hits(console, result)
    for written in _write_views(t, result, image, row_id, html, png, geojson):
        console.print(f"wrote {written}")


def _slides(console: Console, t: VectorTable, slide: str, signature: str, k: int, evaluate: bool,
            json_out: str | None) -> None:
    """`--slide`: the nearest slides by signature, or (with --evaluate) retrieval judged leave-one-slide-out."""
    from cytoretrieve.queries.slides import evaluate_slide_retrieval, similar_slides, slide_signatures

    with Console(stderr=True).status(f"slide signatures ({signature}) of {t.name}", spinner="dots"):
        found = similar_slides(t, slide, kind=signature, k=k)
        judged = evaluate_slide_retrieval(slide_signatures(t, signature)).to_dict() if evaluate else None
    if json_out is not None:
        options.write_json({**found.to_dict(), **({"evaluation": judged} if judged else {})}, json_out)
    if json_out == "-":
        return
    view = RichTable(title=f"slides like {slide} ({found.label or 'no label'}) in {t.name}, by {signature} signature",
                     box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("#", "slide", "similarity", "label"):
        view.add_column(col, justify="right" if col in ("#", "similarity") else "left", no_wrap=col == "slide")
    for i, h in enumerate(found.hits, 1):
        view.add_row(str(i), h.slide, f"{h.score:.4f}", h.label or "")
    console.print(view)
    if judged:
        console.print(f"leave-one-slide-out over {judged['slides']} labelled slides: Top-1 {judged['top1']:.3f}, "
                      f"Top-3 {judged['top3']:.3f}, majority vote at 5 {judged['mv5']:.3f}", soft_wrap=True)


def _int_k(k: str | None) -> int:
    if k is None:
        return DEFAULT_K
    try:
        return int(k)
    except ValueError:
        raise CytoError(f"`k` must be a whole number of neighbours, not {k!r} (k lists are for `evaluate`)") from None


def _print_hits(console: Console, result: SearchResult) -> None:
    """The hits as a table that stays whole at the terminal's width (the source path wraps, then goes first)."""
    from cytoretrieve.cli.fit import Column, fitted_table
    from cytoretrieve.views.hits import SIMILARITY_MEANING, counts_line, majority_words

    if not result.hits:  # a filter that matches nothing is said, not an empty table
        console.print(f"no rows of {result.table} match the filter: no hits", markup=False, highlight=False)
        return
    tiles = any(h.slide is not None for h in result.hits)
    labelled = any(h.label for h in result.hits)
    scaled = any(h.percentile is not None for h in result.hits)
    columns = [Column("#", "right"), Column("sim", "right"), *([Column("pct", "right", drop=2)] if scaled else []),
               *([Column("label")] if labelled else []), Column("id"),
               *((Column("x", "right", drop=1), Column("y", "right", drop=1)) if tiles else
                 (Column("group", wrap=True, min_width=8, drop=3), Column("source", wrap=True, min_width=16, drop=4)))]
    rows = []
    for rank, h in enumerate(result.hits, 1):
        cells = {"#": str(rank), "sim": f"{h.score:.4f}", "pct": "" if h.percentile is None else f"{h.percentile:.0f}",
                 "label": h.label or "", "id": h.id, "group": h.group or "", "source": h.path or "",
                 "x": str(h.x), "y": str(h.y)}
        rows.append([cells[c.name] for c in columns])
    title = f"{len(result.hits)} nearest to {result.query} in {result.table}"
    console.print(fitted_table(console, title, columns, rows), markup=False, highlight=False)
    if scaled:
        console.print(SIMILARITY_MEANING, markup=False, highlight=False)
    words = majority_words(result)
    if words is not None:
        console.print(f"neighbours' labels: {counts_line(result)}; {words}", markup=False, highlight=False)


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


def _evaluate(t: VectorTable, k: str, json_out: str | None, labels: str = "stored") -> None:
    from cytoretrieve.queries.knn import parse_ks
    from cytoretrieve.queries.search_eval import evaluate_search

    result = evaluate_search(t, parse_ks(k), labels)
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
    console.print(f"{result.labels} labels; {result.reviewed_rows} row(s) carry a review")
