"""`cytoretrieve labels`: the expert's label log (add, list, history, undo, import, export) and the next rows worth
a review (suggest). Events are appended to the store's `label_log` table; stored labels are never changed, and
`classify`, `transfer`, `score --row-labels`, `search --evaluate` use the reviews with `--labels reviewed`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cytoretrieve.cli import options

app = typer.Typer(help="Expert labels: an append-only log of reviews that the queries can use (--labels reviewed).",
                  no_args_is_help=True)

Reviewer = Annotated[str | None, typer.Option("--reviewer", envvar="CYTORETRIEVE_REVIEWER", help="Who labels (default: the login name).")]
NewClass = Annotated[bool, typer.Option("--new-class", help="Accept labels that are not among the table's classes.")]
Binary = Annotated[int | None, typer.Option("--binary", help="With --new-class: the binary value (1 positive, 0 negative) of the new classes.")]


def _table(store: str, name: str):  # noqa: ANN202 - a store Table (vector or tile table)
    from cytoretrieve.store.tables import Store, Table

    st = Store(store)
    return Table(st, st.open_raw(name))


def _echo_events(events: list, action: str) -> None:  # noqa: ANN001 - LabelEvents
    for e in events[:20]:
        typer.echo(f"{action} {e.row_id}: {e.label if e.label is not None else '(no review)'} "
                   f"by {e.reviewer or '?'} ({e.source}, event {e.event[:8]})")
    if len(events) > 20:
        typer.echo(f"... and {len(events) - 20} more")


def add(
    table: options.Table,
    row_id: Annotated[list[str], typer.Option("--id", help="Row id(s) to label; repeat for several.")],
    label: Annotated[str, typer.Option("--label", "-l", help="The class (one of the table's, or `unsure`).")],
    reviewer: Reviewer = None,
    note: Annotated[str | None, typer.Option("--note", help="A note kept with the event.")] = None,
    source: Annotated[str, typer.Option("--source", help="expert, import or model (model events are never reviews).")] = "expert",
    new_class: NewClass = False,
    binary: Binary = None,
    store: options.Store = options.DEFAULT_STORE,
) -> None:
    """Label rows (one event each, one commit); the label stored at embed time is kept.

    Example: cytoretrieve labels add --table herlev_resnet50 --id carcinoma_in_situ/1.jpg --label SD --reviewer ana
    """
    from cytoretrieve.store.labels import LabelInput, default_reviewer, record_labels

    t = _table(store, table)
    events = record_labels(t.store, table, [LabelInput(r, label, note=note) for r in row_id],
                           reviewer=reviewer or default_reviewer(), source=source, new_class=new_class, binary=binary)
    _echo_events(events, "labelled")


def undo(
    table: options.Table,
    row_id: Annotated[str, typer.Option("--id", help="The row whose latest review is undone.")],
    reviewer: Reviewer = None,
    store: options.Store = options.DEFAULT_STORE,
) -> None:
    """Undo a row's latest review (itself an event: the history keeps both)."""
    from cytoretrieve.store.labels import default_reviewer
    from cytoretrieve.store.labels import undo as run_undo

    t = _table(store, table)
    _echo_events([run_undo(t.store, table, row_id, reviewer or default_reviewer())], "undone")


def list_reviews(
    table: options.Table,
    reviewer: Annotated[str | None, typer.Option("--reviewer", help="Only this reviewer's reviews.")] = None,
    disagree: Annotated[bool, typer.Option("--disagree", help="Only reviews that differ from the stored label.")] = False,
    store: options.Store = options.DEFAULT_STORE,
    json_out: options.JsonOut = None,
) -> None:
    """The current review of every reviewed row (latest first) and the counts."""
    from cytoretrieve.queries.labels import current_reviews, review_counts

    t = _table(store, table)
    rows = [r for r in current_reviews(t, reviewer) if r["disagrees"] or not disagree]
    counts = review_counts(t.store, table)
    if json_out:
        options.write_json({"counts": counts, "reviews": rows}, json_out)
    if json_out == "-":
        return
    for r in rows:
        mark = " (stored: " + str(r["stored_label"]) + ")" if r["disagrees"] else ""
        typer.echo(f"{r['id']}\t{r['label']}{mark}\t{r['reviewer'] or ''}\t{r['source']}\t{r['time']}")
    typer.echo(f"{counts['reviewed_rows']} reviewed row(s), {counts['events']} event(s) in {table}; "
               f"labels {counts['labels']}; reviewers {counts['reviewers']}")


def history(
    table: options.Table,
    row_id: Annotated[str, typer.Option("--id", help="The row.")],
    store: options.Store = options.DEFAULT_STORE,
    json_out: options.JsonOut = None,
) -> None:
    """Every event of one row, oldest first."""
    from cytoretrieve.queries.labels import history as row_history

    t = _table(store, table)
    events = row_history(t.store, table, row_id)
    if json_out:
        options.write_json(events, json_out)
    if json_out == "-":
        return
    for e in events:
        typer.echo(f"{e['time']}  {e['action']:5s} {e['label'] if e['label'] is not None else '(no review)'}  "
                   f"by {e['reviewer'] or '?'} ({e['source']}) event {e['event'][:8]}"
                   + (f" supersedes {e['supersedes'][:8]}" if e["supersedes"] else "")
                   + (f"  note: {e['note']}" if e["note"] else ""))
    if not events:
        typer.echo(f"row {row_id} of {table} has no label event")


def export(
    table: options.Table,
    out: Annotated[Path, typer.Option("--out", help="CSV file, or .geojson for QuPath (rows on a slide).")],
    store: options.Store = options.DEFAULT_STORE,
) -> None:
    """Write the current reviews as CSV (id,label,reviewer,note,...) or QuPath GeoJSON (by the --out suffix)."""
    from cytoretrieve.queries.labels import current_reviews
    from cytoretrieve.views.label_files import write_label_file

    rows = current_reviews(_table(store, table))
    path, left_out = write_label_file(rows, out)
    typer.echo(f"wrote {len(rows) - left_out} review(s) to {path}")
    if left_out:
        typer.echo(f"{left_out} reviewed row(s) sit on no slide and are left out of the GeoJSON (the CSV has them)")


def import_labels(
    file: Annotated[Path, typer.Argument(help="CSV (id,label[,reviewer,note]) or QuPath GeoJSON (properties.name = row id).")],
    table: options.Table,
    reviewer: Reviewer = None,
    source: Annotated[str, typer.Option("--source", help="expert, import or model.")] = "import",
    new_class: NewClass = False,
    binary: Binary = None,
    store: options.Store = options.DEFAULT_STORE,
) -> None:
    """Import labels from a file: every row checked first, then one commit (a refused file writes nothing).

    Example: cytoretrieve labels import reviews.geojson --table cohort_tiles_dino_vits --reviewer ana
    """
    from cytoretrieve.store.labels import default_reviewer, record_labels
    from cytoretrieve.views.label_files import read_label_file

    items = read_label_file(file)
    t = _table(store, table)
    events = record_labels(t.store, table, items, reviewer=reviewer or default_reviewer(), source=source,
                           new_class=new_class, binary=binary)
    typer.echo(f"imported {len(events)} label(s) from {file} into the log of {table} (source {source})")


def suggest(
    table: options.Table,
    n: Annotated[int, typer.Option("-n", "--n", min=1, help="How many rows to suggest.")] = 50,
    klass: Annotated[str | None, typer.Option("--class", help="Only rows labelled (or, unlabelled, predicted) this class.")] = None,
    slide: Annotated[str | None, typer.Option("--slide", help="Only rows of this slide.")] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Neighbours voting.")] = 10,
    vote: Annotated[str, typer.Option("--vote", help="The k-NN vote whose margin ranks the rows.")] = "weighted",
    temperature: Annotated[float, typer.Option("--temperature", help="T of the weighted vote.")] = 0.07,
    store: options.Store = options.DEFAULT_STORE,
    json_out: options.JsonOut = None,
) -> None:
    """The next rows worth a review: unreviewed rows whose k-NN vote on the reviewed labels is least sure.

    Example: cytoretrieve labels suggest --table herlev_resnet50 -n 50 --class CIS
    """
    from cytoretrieve.queries.review_queue import suggest as run_suggest
    from cytoretrieve.store.tables import Store

    result = run_suggest(Store(store).open(table), n, klass=klass, slide=slide, k=k, vote=vote,
                         temperature=temperature)
    if json_out:
        options.write_json(result.to_dict(), json_out)
    if json_out == "-":
        return
    for rank, s in enumerate(result.rows, 1):
        typer.echo(f"{rank:3d}  {s.id}  margin {s.margin:.3f}  predicted {s.predicted}  stored {s.stored_label or '-'}")
    typer.echo(f"{len(result.rows)} of {result.candidates} unreviewed row(s), {result.vote} vote of {result.k} "
               f"neighbours among {result.labelled_rows} labelled rows ({result.used.reviewed_rows} reviewed)")


app.command("add")(add)
app.command("undo")(undo)
app.command("list")(list_reviews)
app.command("history")(history)
app.command("export")(export)
app.command("import")(import_labels)
app.command("suggest")(suggest)
