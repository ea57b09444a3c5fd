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
    for col in ("table", "rows", "dim", "backbone", "fingerprint", "size"):
        view.add_column(col, justify="right" if col in ("rows", "dim", "size") else "left", no_wrap=col != "table",
                        overflow="fold", min_width=12 if col == "fingerprint" else len(col))
    for i in infos:
        view.add_row(i.name, str(i.rows), str(i.dim), i.arch, i.fingerprint[:12], _size(i.bytes))
    Console().print(view)
