"""Tables that stay whole at the terminal's width (80 columns included): ids and headers are never cut.

Each column says how it may give way when the terminal is narrow: `wrap` columns (paths, free text) fold onto
more lines down to `min_width`, and columns with a `drop` rank are left out, highest rank first, until the table
fits. Columns with neither (ids, ranks, labels) keep their full width; if those alone are wider than the
terminal, the widest of them folds rather than being cut with an ellipsis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.table import Table as RichTable


@dataclass(frozen=True)
class Column:
    """One column: its header, alignment, whether it may wrap (and how narrow), and its drop rank (0: kept)."""

    name: str
    justify: str = "left"
    wrap: bool = False
    min_width: int = 10
    drop: int = 0  # when the table does not fit, columns are dropped highest rank first; 0 is never dropped


def _width(col: Column, cells: Sequence[str]) -> int:
    """The column's narrowest width: its header and every cell whole, or `min_width` for a wrapping column."""
    whole = max([len(col.name), *(len(line) for c in cells for line in (c or "").splitlines() or [""])])
    return min(whole, max(col.min_width, len(col.name))) if col.wrap else whole


def table_width(widths: Sequence[int]) -> int:
    """Characters a SIMPLE_HEAD table of these column widths takes: a space of padding each side of every
    column, a (blank) rule between columns, and the left and right edges."""
    return sum(widths) + 3 * len(widths) + 1 if widths else 0


def fitted_table(console: Console, title: str | None, columns: Sequence[Column], rows: Sequence[Sequence[str]],
                 caption: str | None = None, style_rows: Sequence[str | None] | None = None) -> RichTable:
    """A rich table of `rows` (one string per column) that fits `console.width`, dropping columns by rank."""
    keep = [i for i, col in enumerate(columns) if not col.drop or any(r[i] for r in rows)]  # empty ones go first
    widths = {i: _width(columns[i], [r[i] for r in rows]) for i in keep}
    while table_width([widths[i] for i in keep]) > console.width:
        droppable = [i for i in keep if columns[i].drop]
        if not droppable:
            break
        keep.remove(max(droppable, key=lambda i: columns[i].drop))
    fits = table_width([widths[i] for i in keep]) <= console.width
    widest = max(keep, key=lambda i: widths[i]) if keep else -1
    view = RichTable(title=title, caption=caption, box=box.SIMPLE_HEAD, title_justify="left",
                     caption_justify="left")
    for i in keep:
        col = columns[i]
        folds = col.wrap or (not fits and i == widest)
        view.add_column(col.name, justify=col.justify, no_wrap=not folds, overflow="fold",  # type: ignore[arg-type]
                        min_width=len(col.name) if folds else widths[i])
    for n, row in enumerate(rows):
        view.add_row(*[row[i] for i in keep], style=style_rows[n] if style_rows else None)
    return view
