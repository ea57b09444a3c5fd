"""Row filters: the one place SQL `where` text is made from values, so every value is quoted the same way.

Queries and views say which rows they want (`equals("slide", s)`, `one_of("slide", names)`, `Filters(label=...)`)
and the store turns that into LanceDB's SQL; no other module quotes a value or writes a `where` from one.

    >>> equals("label", "O'Brien")
    "`label` = 'O''Brien'"
    >>> all_of(equals("binary", 1), "x IS NOT NULL", None)
    '(`binary` = 1) AND (x IS NOT NULL)'
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from cytoretrieve.errors import CytoError

HAS_LOCATION = "x IS NOT NULL AND y IS NOT NULL"  # rows placed on a slide (tiles and cells, not cell-dataset rows)


def literal(value: str | int | float | bool) -> str:
    """A SQL literal: strings single-quoted with quotes doubled, numbers as they print, booleans as TRUE/FALSE."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def column(name: str) -> str:
    """A column name quoted for SQL (backticks), refusing names that could break out of the quotes."""
    if "`" in name:
        raise CytoError(f"invalid column name {name!r}")
    return f"`{name}`"


def equals(name: str, value: str | int | float | bool) -> str:
    return f"{column(name)} = {literal(value)}"


def one_of(name: str, values: Iterable[str | int]) -> str:
    """`name IN (...)`; an empty list matches nothing."""
    values = list(values)
    if not values:
        return "FALSE"
    return f"{column(name)} IN ({', '.join(literal(v) for v in values)})"


def all_of(*conditions: str | None) -> str | None:
    """The conditions joined by AND (each in parentheses), None when there are none."""
    parts = [c for c in conditions if c]
    if len(parts) == 1:
        return parts[0]
    return " AND ".join(f"({c})" for c in parts) or None


@dataclass(frozen=True)
class Filters:
    """Structured hit filters (a web form's fields): each set field must equal its value; None = any."""

    label: str | None = None
    binary: int | None = None
    dataset: str | None = None
    slide: str | None = None
    extra: tuple[str, ...] = field(default=())  # further SQL conditions written by code, never by a request

    def where(self) -> str | None:
        """The SQL `where` these filters mean, with every value quoted; None when nothing is filtered."""
        parts = [equals(name, value) for name, value in
                 (("label", self.label), ("dataset", self.dataset), ("slide", self.slide)) if value is not None]
        if self.binary is not None:
            if self.binary not in (0, 1):
                raise CytoError(f"`binary` must be 0 or 1, not {self.binary}")
            parts.append(equals("binary", int(self.binary)))
        parts.extend(f"({c})" for c in self.extra)
        return " AND ".join(parts) or None
