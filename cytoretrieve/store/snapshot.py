"""A table's rows kept in one Arrow file beside it, read without importing LanceDB while provably current.

`import lancedb` is most of a short command's time (`classify` on a cell dataset reads a few MB). A snapshot,
`<store>/.snapshots/<table>.arrow`, holds some columns of every row of a table in the table's scan order, with
the table's metadata and, in its schema metadata, the newest manifest (`summary.version_key`) of the table and of
each table its columns were derived from (the label log, for reviewed labels), read before the rows were read.
Every LanceDB commit (an append, a delete, a compaction, a new review) writes a new manifest, so a snapshot whose
keys are not all the newest ones is stale and is never used; neither is a missing, damaged or foreign one: the
caller reads through LanceDB instead (and may write a new snapshot). The file is written through a temporary one
renamed into place. Local stores only, and only tables of at most `MAX_BYTES` of vectors: reading a larger table
takes longer than the import saved, and a copy of it would cost real disk.

This module keeps the file and its freshness; what the columns mean is the caller's (`queries/labelled_snapshot`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from cytoretrieve.store.summary import version_key
from cytoretrieve.store.vector_meta import VectorMeta

if TYPE_CHECKING:
    from cytoretrieve.store.tables import VectorTable

FOLDER = ".snapshots"
FORMAT = 1  # of the snapshot files; a file of another format is not used
MAX_BYTES = 64 << 20  # vectors (rows x dim x 4) of the largest table that keeps a snapshot
META_KEY = b"cytoretrieve-snapshot"

Keys = dict[str, dict[str, Any] | None]  # table name -> its newest manifest (None: no such table in the store)


@dataclass(frozen=True)
class Snapshot(VectorMeta):
    """The rows of table `name` as its snapshot holds them, with the table's metadata (`VectorTable.meta`) and
    what the writer recorded beside them (`info`)."""

    name: str
    meta: dict[str, Any]
    rows: pa.Table
    info: dict[str, Any]

    def vectors(self) -> np.ndarray:
        """All vectors (n, dim) float32 as stored, in the table's row order: a copy of the values buffer (`read`
        refuses null values), since pyarrow's `to_numpy` imports pandas, most of a second of start-up."""
        flat = self.rows.column("vector").combine_chunks().flatten()
        values = np.frombuffer(flat.buffers()[1], np.float32, count=len(flat), offset=flat.offset * 4)
        return values.reshape(-1, self.dim).copy()


def path(uri: str, name: str) -> Path:
    return Path(uri) / FOLDER / f"{name}.arrow"


def local_folder(uri: str) -> Path | None:
    """The store's folder, or None for a URI (s3://, ...) or a path that is not a folder."""
    folder = Path(uri)
    return folder if "://" not in uri and folder.is_dir() else None


def keys(uri: str, names: Sequence[str]) -> Keys | None:
    """The newest manifest of each of these tables (None for a table not in the store), or None when one cannot
    be told: a remote store, or a table folder without a readable manifest (being created, damaged)."""
    folder = local_folder(uri)
    if folder is None:
        return None
    found: Keys = {}
    for name in names:
        if not (folder / f"{name}.lance").exists():
            found[name] = None
            continue
        key = version_key(folder, name)
        if key is None:
            return None
        found[name] = key
    return found


def fits(table: VectorTable) -> bool:
    """Whether `table` may keep a snapshot: a local store and at most `MAX_BYTES` of vectors."""
    return table.store.local and table.count() * table.dim * 4 <= MAX_BYTES


def write(table: VectorTable, before: Keys, rows: pa.Table, info: dict[str, Any] | None = None) -> bool:
    """Keep `rows` (read from `table` after `before = keys(...)` of the table and the tables they derive from) as
    the table's snapshot. Only when they are provably that version's: `table` holds the version `before` names
    and no table of `before` has committed since. Best effort (a read-only folder or a full disk only means the
    next command reads LanceDB); True when written."""
    uri = table.store.uri
    own = before.get(table.name)
    if own is None or own["version"] != table.version or keys(uri, list(before)) != before:
        return False
    if "vector" not in rows.column_names or rows.num_rows * table.dim * 4 > MAX_BYTES:
        return False
    header = {"format": FORMAT, "table": table.name, "keys": before, "rows": rows.num_rows, "meta": table.meta,
              "info": info or {}}
    rows = rows.replace_schema_metadata({META_KEY: json.dumps(header).encode()}).combine_chunks()
    target = path(uri, table.name)
    tmp = target.with_name(f".{table.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(exist_ok=True)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, rows.schema) as writer:
            writer.write_table(rows, max_chunksize=max(rows.num_rows, 1))
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    return True


def drop(uri: str, name: str) -> None:
    """Remove table `name`'s snapshot, if any (a table grown past `MAX_BYTES` keeps none)."""
    if local_folder(uri) is not None:
        with contextlib.suppress(OSError):
            path(uri, name).unlink(missing_ok=True)


def read(uri: str, name: str, columns: Sequence[str]) -> Snapshot | None:
    """Table `name`'s snapshot when it holds exactly `columns` (`vector` among them) and every key it was written
    with is still the newest manifest of its table; else None (the caller reads LanceDB)."""
    if local_folder(uri) is None:
        return None
    try:
        rows = pa.ipc.open_file(pa.memory_map(str(path(uri, name)), "r")).read_all()
        header = json.loads(rows.schema.metadata[META_KEY])
        saved = header["keys"]
        if header["format"] != FORMAT or header["table"] != name or name not in saved or saved[name] is None:
            return None
        if keys(uri, list(saved)) != saved:
            return None  # stale: a table it was read from has committed since
        snap = Snapshot(name, header["meta"], rows.replace_schema_metadata(None), header["info"])
        vector = pa.list_(pa.float32(), snap.dim)
        if rows.column_names != list(columns) or rows.schema.field("vector").type != vector \
                or rows.num_rows != header["rows"] or rows.column("vector").combine_chunks().flatten().null_count:
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException):
        return None
    return snap
