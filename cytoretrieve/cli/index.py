"""`cytoretrieve index build` and `cytoretrieve dedupe`: store maintenance a user can ask for."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from cytoretrieve.cli import options
from cytoretrieve.store.ann import INDEX_KINDS  # names and help only: faiss is not imported

KIND_HELP = "auto: the kind that suits the table's size, as said below. " + " ".join(
    f"{kind.name}: {kind.help}." for kind in INDEX_KINDS.values())

app = typer.Typer(help="A table's vector index: FAISS, cached on this machine, or LanceDB's own, in the store.",
                  no_args_is_help=True)


@app.command("build")
def build(
    table: options.Table,
    kind: Annotated[str, typer.Option("--kind", help=KIND_HELP)] = "auto",
    store: options.Store = options.DEFAULT_STORE,
) -> None:
    """Rebuild a table's index from scratch, retraining its quantiser.

    Searches keep the cached index up to date by themselves: rows appended to the table are added to it and
    deleted rows removed, and an IVF index is retrained once the table has doubled. Rebuild by hand after a bulk
    change, or to switch `--kind` (later searches with `auto` follow the kind built here). `--kind lance` builds
    LanceDB's own index inside the table: every machine that reads the store shares it, rows appended later are
    searched flat until a search or a writer's finish folds them in.

    Example: `cytoretrieve index build --table herlev_resnet50 --kind ivf`
    """
    import time

    from cytoretrieve.store.ann import index_kind
    from cytoretrieve.store.index import table_index
    from cytoretrieve.store.tables import Store

    if kind != "auto":
        index_kind(kind)  # an unknown kind is a one-line error before the table is opened
    start = time.perf_counter()
    built = table_index(Store(store).open(table), kind, rebuild=True)
    Console().print(f"index of {table}: {built.kind}, {built.rows} rows, built in {time.perf_counter() - start:.1f} s")


def dedupe(table: options.Table, store: options.Store = options.DEFAULT_STORE) -> None:
    """Keep one row per id in a table (the first stored), so that no protocol scores a row twice.

    `classify`, `transfer` and `score` refuse a table that holds an id twice (the copies would sit on both sides
    of a train/test split); `cytoretrieve tables` shows how many duplicated rows a table has.

    Example: `cytoretrieve dedupe --table herlev_resnet18`
    """
    from cytoretrieve.store.tables import Store

    t = Store(store).open(table)
    removed = t.dedupe()
    Console().print(f"{table}: {removed} duplicated row(s) removed, {t.count()} rows, each id once"
                    if removed else f"{table}: no duplicated rows ({t.count()} rows)")
