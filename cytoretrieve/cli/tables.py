"""`cytoretrieve tables`: what the store holds."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table as RichTable

from cytoretrieve.cli import options


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def tables(store: options.Store = options.DEFAULT_STORE) -> None:
    """List the store's tables: rows, vector dimension, backbone (architecture and fingerprint) and size on disk."""
    from cytoretrieve.store.tables import Store

    infos = Store(store).describe()
    if not infos:
        Console().print(f"no tables in {store} yet: `cytoretrieve embed SOURCE` creates one")
        return
    view = RichTable(title=f"tables in {store}", box=box.SIMPLE_HEAD)
    dups = any(i.duplicates for i in infos)
    states = any(i.state for i in infos)
    longest = max(len(i.name) for i in infos)
    columns = ["table", "rows", *(["duplicated"] if dups else []), "dim", "backbone", "fingerprint", "size",
               *(["state"] if states else [])]
    for col in columns:
        # names stay whole (they are copied into other commands); the backbone column folds when space is short
        view.add_column(col, justify="right" if col in ("rows", "duplicated", "dim", "size") else "left",
                        no_wrap=col not in ("backbone", "state"), overflow="fold",
                        min_width=longest if col == "table" else 12 if col == "fingerprint" else len(col))
    for i in infos:
        cells = [i.name, str(i.rows), *([str(i.duplicates or "")] if dups else []), str(i.dim), i.arch,
                 i.fingerprint[:12], _size(i.bytes), *([i.state] if states else [])]
        view.add_row(*cells)
    Console().print(view)
    if any(i.state == "interrupted" for i in infos):
        Console(stderr=True).print("an interrupted table misses the rows its job had not stored yet: rerun that "
                                   "job's command to add them (nothing is stored twice)", markup=False,
                                   highlight=False)
    if dups:
        Console(stderr=True).print("some tables hold an id more than once: `cytoretrieve dedupe --table NAME` keeps "
                                   "one row per id", markup=False, highlight=False)
