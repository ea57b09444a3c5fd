"""`cytoretrieve classify`: the paper's k-NN protocol over stored vectors (no image opened, no model loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table as RichTable

from cytoretrieve.cli import options
from cytoretrieve.cli.messages import incomplete_tables
from cytoretrieve.queries.knn import votes_help

if TYPE_CHECKING:
    from cytoretrieve.store.snapshot import Snapshot
    from cytoretrieve.store.tables import VectorTable


def _pm(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:.3f} ± {std:.3f}"


def classify(
    table: Annotated[list[str], typer.Option("--table", "-t", help="Table(s) to evaluate; repeat to compare backbones side by side.")],
    store: options.Store = options.DEFAULT_STORE,
    runs: Annotated[int, typer.Option("--runs", help="Seeded random stratified splits.")] = 4,
    train_fraction: Annotated[float, typer.Option("--train-fraction", help="Fraction of each class used as k-NN support.")] = 0.75,
    k: Annotated[str, typer.Option("--k", help="k values to sweep: 1-100, 20, or 1,5,10,20.")] = "1-100",
    vote: Annotated[str, typer.Option("--vote", help=f"{votes_help()}.")] = "majority",
    temperature: Annotated[float, typer.Option("--temperature", help="T of the weighted vote.")] = 0.07,
    seed: Annotated[int, typer.Option("--seed", help="Seed of run 0; run r uses seed + r.")] = 0,
    labels: options.Labels = "stored",
    json_out: options.JsonOut = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG: weighted F1 vs k and the confusion matrix at k*.")] = None,
) -> None:
    """k-NN classification of a table's vectors, as in the paper (Tables 1-2).

    For each of --runs seeded stratified splits, every test vector takes the vote of its k nearest training
    vectors (cosine similarity, FAISS), for every k of --k. k* is the k with the best mean weighted F1; at k*
    the class-wise F1, the F1 of positives and negatives (binary mapping of the dataset) and the weighted F1
    are reported as mean ± std over runs.

    Example: cytoretrieve classify --table herlev_resnet50 --table herlev_dino_vits --vote weighted --json out.json
    """
    with Console(stderr=True).status("loading the store and the k-NN protocol", spinner="dots"):
        from cytoretrieve.queries.knn import classify_table, parse_ks

        ks = parse_ks(k)
        tables = _open(store, table)
    with incomplete_tables(store, table), Console(stderr=True).status(f"k-NN over {', '.join(table)}", spinner="dots"):
        results = [classify_table(t, runs=runs, train_fraction=train_fraction, ks=ks, vote=vote,
                                  temperature=temperature, seed=seed, labels=labels) for t in tables]

    classes = list(dict.fromkeys(c for r in results for c in r.classes))
    view = RichTable(title=f"k-NN F1, mean ± std over {runs} runs ({vote} vote, k in {k})", box=box.SIMPLE_HEAD)
    view.add_column("")
    for t in tables:
        view.add_column(t.name, justify="right", overflow="fold")
    view.add_row("k*", *[str(r.k_best) for r in results])
    for c in classes:
        view.add_row(f"F1 {c}", *[_pm(r.class_f1_mean.get(c), r.class_f1_std.get(c)) for r in results])
    view.add_row("F1 positives", *[_pm(r.pos_f1_mean, r.pos_f1_std) for r in results])
    view.add_row("F1 negatives", *[_pm(r.neg_f1_mean, r.neg_f1_std) for r in results])
    view.add_row("weighted F1", *[_pm(r.weighted_f1_mean, r.weighted_f1_std) for r in results], style="bold")
    console = Console()
    console.print(view)
    for t, r in zip(tables, results):
        console.print(f"{t.name}: {r.n_train} train / {r.n_test} test vectors per run, "
                      f"backbone {t.meta['backbone']['arch']} {t.fingerprint[:12]}; {r.labels} labels, "
                      f"{r.reviewed_rows} row(s) carry a review")

    if json_out:
        options.write_json({"results": [{"table": t.name, "backbone": t.meta["backbone"], **r.to_dict()}
                                        for t, r in zip(tables, results)]}, json_out)
    if plot:
        from cytoretrieve.views.plots import plot_classify

        for t, r in zip(tables, results):
            path = plot if len(tables) == 1 else plot.with_name(f"{plot.stem}_{t.name}{plot.suffix or '.png'}")
            plot_classify(r, path, title=f"{t.name} ({vote} vote)")
            console.print(f"plot written to {path}")
    _keep_snapshots(tables)


def _open(store: str, names: list[str]) -> list[Snapshot | VectorTable]:
    """Each table's current snapshot (`queries/labelled_snapshot.py`: its labelled vectors, read without importing
    LanceDB), else the table itself through LanceDB."""
    from cytoretrieve.queries.labelled_snapshot import read

    found = {name: read(store, name) for name in dict.fromkeys(names)}
    if all(found.values()):
        return [found[name] for name in names]
    from cytoretrieve.store.tables import Store

    st = Store(store)
    opened = {name: found[name] or st.open(name) for name in found}
    return [opened[name] for name in names]


def _keep_snapshots(tables: list[Snapshot | VectorTable]) -> None:
    """Snapshot the tables read through LanceDB, so that the next `classify` of them skips its import."""
    from cytoretrieve.queries.labelled_snapshot import keep
    from cytoretrieve.store.snapshot import Snapshot

    for t in {t.name: t for t in tables if not isinstance(t, Snapshot)}.values():
        keep(t)
