"""Tile tables: one row per tile (no vector yet), each slide's rows being its bag.

A tile table lives in the same store as the vector tables. Its columns use the names and types of
`cytoretrieve.store.tables.BASE_FIELDS` where they overlap (`id`, `key`, `dataset`, `path`, `label`, `binary`,
`group` = slide id, `slide`, `x`, `y`, `level`, `tile_size`, `mpp`), so the embed job copies them into its
vector rows as they are; the columns only tiles need follow:

| column | meaning |
|---|---|
| `id` | `"{slide}@{x},{y},{extent}"`: the slide id and the tile's square in level-0 px; stable across runs |
| `path` | the slide file (absolute, as given: a symlink stays a symlink) |
| `x`, `y` | top-left corner in level-0 px |
| `level`, `read_size` | the pyramid level read and the side read there (level px) |
| `tile_size`, `mpp` | the side of the delivered tile (px) and its pixel size (um/px) |
| `extent` | the tile's side in level-0 px |
| `coverage` | cells rule: fraction of the tile covered by cell foreground; coverage rule: fraction inside the deposit (null for annotation rows) |
| `source`, `annotation` | `grid` or `annotation`; the annotation's id (annotation rows) |
| `label`, `binary` | the slide label (grid rows) or the annotation's class (annotation rows) |
| `focus`, `plane`, `grey` | tables made with focus scores (metadata key `focus`, the score's method): the tile's focus score (`sources.slides.focus`; null: too little stain to judge), the focal plane read (-1: an EDF composite), a grey-level slide (cell tables have `grey` among their measurements) |

Reading a tile: `SlideReader().read_row(row)` (see `reader.py`).

The schema metadata (key `cytoretrieve`) is JSON with `"kind": "tiles"`, `source` (`grid` or `annotations`),
`tile_size`, `target_mpp`, `stride`, the tile rule's settings (`rule`, `min_foreground_um2` and `cells`; or
`min_coverage` and `deposit`: see `sources.slides.rules.table_settings`), the cytoretrieve version and the
creation time. A table keeps the settings it was created with: writing other settings into it is refused, except
that a table made before focus scores existed (no `focus` key, no `focus` column) takes new rows without them.

Each slide's rows are written in one commit, so a slide is either entirely in the table or not at all: a rerun
skips the slides the table holds and does the rest (resumable per slide).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from cytoretrieve.errors import CytoError
from cytoretrieve.ids import parse_tile_id, tile_id  # noqa: F401 - re-exported: the tile table's id rule
from cytoretrieve.store.tables import BASE_FIELDS, META_KEY, Store, Table, build_rows
from cytoretrieve.version import __version__

TILES_KIND = "tiles"
_SHARED = ["id", "key", "dataset", "path", "label", "binary", "group", "slide", "x", "y", "level", "tile_size", "mpp"]
TILE_FIELDS = [next(f for f in BASE_FIELDS if f.name == name) for name in _SHARED] + [
    pa.field("read_size", pa.int32()),
    pa.field("extent", pa.int32()),
    pa.field("coverage", pa.float32()),
    pa.field("source", pa.string()),
    pa.field("annotation", pa.string()),
]
TILE_COLUMNS = [f.name for f in TILE_FIELDS]
SHARED_COLUMNS = list(_SHARED)  # what a vector table row copies from a tile row
CELLS_SOURCE = "cells"  # a tile table of detected cells (`cytoretrieve cells`): one crop per nucleus
CELL_FIELDS = [  # the measurements a cell table adds to the tile columns; its vector table copies them
    pa.field("nucleus_x", pa.int64()),  # the nucleus centre, level-0 px
    pa.field("nucleus_y", pa.int64()),
    pa.field("nucleus_area_um2", pa.float32()),
    pa.field("cell_area_um2", pa.float32()),  # null where the cell's outline was not found
    pa.field("nc_ratio", pa.float32()),  # nucleus area / cell area, null likewise
    pa.field("darkness", pa.float32()),  # mean optical density inside the nucleus
    pa.field("confidence", pa.float32()),  # the detector's, 0..1
    pa.field("tile", pa.string()),  # id of the grid tile the nucleus lies in (whole slides; null for a field)
    pa.field("grey", pa.bool_()),  # cut from a one-channel image (its RGB crop repeats the grey level)
]
CELL_COLUMNS = [f.name for f in CELL_FIELDS]
FOCUS_KEY = "focus"  # metadata key of a table made with focus scores: the score's method (`sources.slides.focus`)
FOCUS_FIELDS = [  # the image-quality columns of tables made with focus scores (their metadata has `focus`)
    pa.field("focus", pa.float32()),  # focus score at the read resolution; null where too little stain to judge
    pa.field("plane", pa.int16()),  # focal plane read (0 on single-plane slides; -1: an EDF composite)
]
GREY_FIELD = pa.field("grey", pa.bool_())  # tile tables with focus: the slide's pixels are grey levels
_VOLATILE = ("cytoretrieve", "created")  # metadata that may differ between runs writing one table
_OPTIONAL = (FOCUS_KEY,)  # settings a table made before them lacks: such a table stays appendable


def table_fields(meta: dict[str, Any]) -> list[pa.Field]:
    """The columns of a tile table made with `meta`: the tile columns, plus the cell measurements for cells,
    plus `focus` and `plane` (and `grey` for tiles) for a table made with focus scores."""
    return TILE_FIELDS + extra_fields(meta)


def extra_fields(meta: dict[str, Any]) -> list[pa.Field]:
    """The columns beyond the tile columns of a tile table made with `meta` (see `table_fields`)."""
    cells = meta.get("source") == CELLS_SOURCE
    quality = (FOCUS_FIELDS + ([] if cells else [GREY_FIELD])) if FOCUS_KEY in meta else []
    return (CELL_FIELDS if cells else []) + quality


def tile_schema(meta: dict[str, Any]) -> pa.Schema:
    return pa.schema(table_fields(meta), metadata={META_KEY: json.dumps(meta, sort_keys=True).encode()})


def tile_table_meta(source: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Metadata of a new tile table: kind, source, the settings that made its rows, version and time."""
    return {
        "kind": TILES_KIND,
        "source": source,
        **settings,
        "cytoretrieve": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def make_rows(records: Sequence[dict[str, Any]], fields: Sequence[pa.Field] = TILE_FIELDS) -> pa.Table:
    """An Arrow table of `fields` (no metadata) from row dicts; `key` is derived from `id`."""
    return pa.Table.from_pydict(build_rows(fields, records), schema=pa.schema(list(fields)))


def _settings(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in _VOLATILE}


class TileTable(Table):
    """A tile table of the store: rows without vectors, each slide's rows being its bag."""

    INDEXED = ("id", "slide")

    def __init__(self, store: Store, tbl: Any) -> None:
        super().__init__(store, tbl)
        if self.meta.get("kind") != TILES_KIND:
            raise CytoError(f"table '{tbl.name}' is not a tile table (it holds vectors: embed writes those)")

    @property
    def cells(self) -> bool:
        """A table of detected cells (with their measurements), not of grid tiles."""
        return self.meta.get("source") == CELLS_SOURCE

    @property
    def extra_fields(self) -> list[pa.Field]:
        """Columns beyond the tile columns that a vector table made from this one copies (cell measurements,
        focus and plane)."""
        return extra_fields(self.meta)

    def read(self, columns: Sequence[str] | None = None, where: str | None = None) -> pa.Table:
        return super().read(list(columns or self.columns), where)

    def rows(self, columns: Sequence[str] | None = None, where: str | None = None) -> list[dict[str, Any]]:
        """Rows as dicts, ordered by slide then position (what the embed job iterates)."""
        table = self.read(columns, where)
        if {"slide", "y", "x"} <= set(table.column_names):
            table = table.sort_by([("slide", "ascending"), ("y", "ascending"), ("x", "ascending")])
        return table.to_pylist()

    def slide_counts(self) -> dict[str, int]:
        """Tiles per slide the table holds (a slide present is complete: it was written in one commit)."""
        if self.count() == 0:
            return {}
        counts = pc.value_counts(self.read(["slide"]).column("slide")).to_pylist()
        return {c["values"]: int(c["counts"]) for c in counts}

    def add_slide(self, rows: Sequence[dict[str, Any]]) -> None:
        """One slide's rows in one commit."""
        if rows:
            self.add(make_rows(rows, table_fields(self.meta)))


def open_tile_table(store: Store, name: str) -> TileTable:
    """An existing tile table; a missing one, or a vector table, is a user error."""
    return TileTable(store, store.open_raw(name))


class BagWriter:
    """Writes bags into a tile table that is created on the first slide with rows (so a command that writes
    nothing leaves the store unchanged). An existing table must have been made with the same settings."""

    def __init__(self, store: Store, name: str, meta: dict[str, Any], wait: float | None = None) -> None:
        self.store = store
        self.name = name
        self.meta = meta
        self.lease = store.lease(name, wait)  # one job at a time writes the table (released by `finish`)
        self.table: TileTable | None = None
        self.done: dict[str, int] = {}
        self.written = 0  # rows written by this writer
        if name in store.table_names():
            self.table = TileTable(store, store.db.open_table(name))
            self.table.lease = self.lease
            try:
                self._check(self.table.meta)
            except CytoError:
                self.lease.release()
                raise
            self.done = self.table.slide_counts()

    def _check(self, have: dict[str, Any]) -> None:
        want = {k: v for k, v in _settings(self.meta).items() if k in have or k not in _OPTIONAL}
        if _settings(have) != want:
            diff = sorted(k for k in set(want) | set(_settings(have)) if have.get(k) != want.get(k))
            shown = ", ".join(f"{k}={json.dumps(have.get(k))}" for k in diff)
            raise CytoError(f"table '{self.name}' was made with other settings ({shown}): pass another `table`")

    def write(self, slide: str, rows: Sequence[dict[str, Any]]) -> None:
        """Commit one slide's rows (nothing for no rows)."""
        if not rows:
            return
        if self.table is None:
            tbl = self.store.db.create_table(self.name, schema=tile_schema(self.meta), exist_ok=True)
            self.table = TileTable(self.store, tbl)
            self.table.lease = self.lease
            self._check(self.table.meta)  # another process may have created it first
        self.table.add_slide(rows)
        self.done[slide] = len(rows)
        self.written += len(rows)

    def finish(self) -> None:
        """Compact and index once, if this writer wrote anything (a rerun with nothing to do changes nothing)."""
        if self.table is not None and self.written:
            self.table.finish()
        self.lease.release()
