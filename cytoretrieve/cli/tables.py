"""`cytoretrieve tables`: what the store holds."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from cytoretrieve.cli import options


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def tables(
    store: options.Store = options.DEFAULT_STORE,
    all_tables: Annotated[bool, typer.Option("--all", help="Also list the store's internal tables (slide overviews).")] = False,
) -> None:
    """List the store's tables: what their rows are, rows, vector dimension, backbone and where its weights came
    from (random, timm, or the weights file), the nucleus detector of cell tables, the stain normaliser (when a table
    has one), fingerprint, size, and whether a job left the table incomplete (interrupted: rerun its command to
    finish it).

    Example: cytoretrieve tables --store indexes
    """
    from cytoretrieve.cli.fit import Column, fitted_table
    from cytoretrieve.store.summary import describe_local

    console = Console()
    with Console(stderr=True).status(f"reading {store}", spinner="dots"):
        found = describe_local(store)  # a local store's up-to-date summaries: no LanceDB import
        infos, stale = found if found is not None else ([], None)
        if stale is None or stale:  # a remote store, or tables written since their summary: read through LanceDB
            from cytoretrieve.store.tables import Store

            infos = sorted([*infos, *Store(store).describe(stale)], key=lambda i: i.name)
    hidden = [i for i in infos if i.internal and not all_tables]
    infos = [i for i in infos if all_tables or not i.internal]
    if not infos:
        console.print(f"no tables in {store} yet: `cytoretrieve embed SOURCE` creates one", markup=False)
        return
    dups = any(i.duplicates for i in infos)
    states = any(i.state for i in infos)
    detectors = any(i.detector for i in infos)
    normalisers = any(i.normaliser for i in infos)
    columns = [Column("table"), Column("rows", "right"), Column("kind", wrap=True, min_width=5, drop=3),
               *([Column("duplicated", "right")] if dups else []), Column("dim", "right", drop=2),
               Column("backbone", wrap=True, min_width=8), Column("weights", wrap=True, min_width=7),
               *([Column("detector", drop=4)] if detectors else []),
               *([Column("normaliser", wrap=True, min_width=7, drop=4)] if normalisers else []),
               Column("fingerprint", drop=6),
               Column("size", "right", drop=5), *([Column("state", wrap=True, min_width=11)] if states else [])]
    rows = []
    for i in infos:
        cells = {"table": i.name, "rows": str(i.rows), "kind": i.kind, "duplicated": str(i.duplicates or ""),
                 "dim": str(i.dim) if i.dim else "-", "backbone": i.arch if i.dim else "-",
                 "weights": i.weights or "-", "detector": i.detector, "normaliser": i.normaliser or "none", "fingerprint": i.fingerprint[:12],
                 "size": _size(i.bytes), "state": i.state or "complete"}
        rows.append([cells[c.name] for c in columns])
    console.print(fitted_table(console, f"tables in {store}", columns, rows), markup=False, highlight=False)
    err = Console(stderr=True)
    if hidden:
        err.print(f"{len(hidden)} internal table(s) not shown ({', '.join(i.name for i in hidden)}): --all lists them",
                  markup=False, highlight=False)
    if any(i.state == "interrupted" for i in infos):
        err.print("an interrupted table misses the rows its job had not stored yet: rerun that job's command to add "
                  "them (nothing is stored twice)", markup=False, highlight=False)
    if dups:
        err.print("some tables hold an id more than once: `cytoretrieve dedupe --table NAME` keeps one row per id",
                  markup=False, highlight=False)
