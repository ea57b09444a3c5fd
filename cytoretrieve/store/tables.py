"""The store's tables: one base `Table` (metadata, scans, appends, compaction) and its kinds: `VectorTable` here
(vectors + metadata + thumbnails, one table per (dataset, backbone)), `TileTable` (`tiles.py`) and the slide
overviews (`overviews.py`). Schema and metadata live here; nothing outside `store/` writes LanceDB.

A table's schema metadata (key ``cytoretrieve``) records which backbone made its vectors, so that queries never
mix backbones and a query image can be embedded with the table's own model. Row ids are derived from the source
(path relative to the dataset root, or slide + location), which makes every embed job idempotent and resumable.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import BTree

from cytoretrieve.errors import CytoError
from cytoretrieve.faults import failpoint
from cytoretrieve.store.filters import equals
from cytoretrieve.store.lease import Lease, acquire
from cytoretrieve.store.summary import TableInfo, version_key, write_state, write_summary
from cytoretrieve.store.vector_meta import VectorMeta
from cytoretrieve.version import __version__

DEFAULT_STORE = "indexes"
META_KEY = b"cytoretrieve"
READ_BATCH = 65_536
KEEP_VERSIONS = datetime.timedelta(minutes=10)
COMMIT_RETRIES = 8  # a commit that lost a race to another writer is retried, with backoff from 0.1 s
log = logging.getLogger("cytoretrieve")
T = TypeVar("T")

# Columns every table has, in order; `vector` is appended with the table's dimension.
BASE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("key", pa.int64(), nullable=False),  # int64 hash of id: the FAISS id of the row
    pa.field("dataset", pa.string()),
    pa.field("path", pa.string()),
    pa.field("label", pa.string()),
    pa.field("binary", pa.int8()),  # 1 positive, 0 negative, null neither / unknown
    pa.field("group", pa.string()),  # slide or patient id when known
    pa.field("slide", pa.string()),  # tiles only: slide id ...
    pa.field("x", pa.int64()),  # ... and level-0 location of the tile
    pa.field("y", pa.int64()),
    pa.field("level", pa.int32()),
    pa.field("tile_size", pa.int32()),
    pa.field("mpp", pa.float32()),
    pa.field("thumbnail", pa.binary()),  # small JPEG, so hits can be shown without the source files
]
COLUMNS = [f.name for f in BASE_FIELDS] + ["vector"]


def default_store_uri() -> str:
    """`CYTORETRIEVE_STORE` when set, else `indexes/` in the current folder."""
    return os.environ.get("CYTORETRIEVE_STORE", DEFAULT_STORE)


def row_key(row_id: str) -> int:
    """A stable signed int64 derived from a row id (FAISS ids are int64)."""
    return int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "little", signed=True)


def table_schema(dim: int, meta: dict[str, Any], extra: Sequence[pa.Field] = ()) -> pa.Schema:
    """The Arrow schema of a table of `dim`-dimensional vectors, carrying `meta` as JSON; `extra` columns (a cell
    table's measurements) come after the base ones."""
    fields = [*BASE_FIELDS, *extra, pa.field("vector", pa.list_(pa.float32(), dim), nullable=False)]
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta, sort_keys=True).encode()})


def table_name_for(dataset: str, arch: str) -> str:
    """Default table name for a dataset embedded by a backbone: `herlev_resnet18`."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", f"{dataset}_{arch}").strip("_").lower()


def read_meta(tbl: lancedb.table.Table) -> dict[str, Any]:
    """The cytoretrieve metadata of any table of the store ({} for a table written by something else)."""
    raw = (tbl.schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def _conflict(e: BaseException) -> bool:
    """A commit that lost a race to a concurrent writer: LanceDB says to retry it."""
    return "commit conflict" in str(e).lower()  # "Retryable commit conflict for version N: ..."


def _no_space(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "no space left on device" in str(e).lower() \
        or "os error 28" in str(e).lower()


def retry_commit(action: Callable[[], T]) -> T:
    """Run a LanceDB commit, retrying it with backoff while it loses races to concurrent writers."""
    for attempt in range(COMMIT_RETRIES):
        try:
            return action()
        except (RuntimeError, OSError, ValueError) as e:
            if not _conflict(e) or attempt == COMMIT_RETRIES - 1:
                raise
            time.sleep(0.1 * 2 ** attempt)
    raise AssertionError("unreachable")


def duplicated_rows(ids: pa.ChunkedArray | pa.Array) -> int:
    """Rows beyond the first of each id."""
    import pyarrow.compute as pc

    return len(ids) - int(pc.count_distinct(ids).as_py())


def require_unique(table: str, ids: pa.ChunkedArray | pa.Array) -> None:
    """Refuse a protocol on a table holding some id twice: the copies would land on both sides of a split and
    inflate every score."""
    extra = duplicated_rows(ids)
    if extra:
        raise CytoError(f"table '{table}' holds {extra} duplicated row(s) (an id stored more than once), which would "
                        f"leak between train and test: run `cytoretrieve dedupe --table {table}` first")


class Store:
    """A LanceDB database: a local folder (default `indexes/`) or any LanceDB URI (s3://, gs://, ...)."""

    def __init__(self, uri: str | Path | None = None, *, wait: float = 0.0,
                 storage_options: dict[str, str] | None = None) -> None:
        """`wait`: how long a writer waits for another job's write lease on a table before giving up (s).
        `storage_options`: LanceDB's object-store settings (`aws_endpoint`, `allow_http`, ...) for a remote URI;
        without them the standard environment variables are read (AWS_ACCESS_KEY_ID, AWS_ENDPOINT, ...)."""
        self.uri = str(uri) if uri is not None else default_store_uri()
        self.wait = wait
        self.storage_options = storage_options
        self.local = "://" not in self.uri
        if self.local and Path(self.uri).exists() and not Path(self.uri).is_dir():
            raise CytoError(f"store {self.uri} is a file, not a folder: give `store` a folder (or a LanceDB URI)")
        self._db: Any = None

    @property
    def db(self) -> Any:
        """The LanceDB connection, opened on first use (for a local store this creates its folder: only writers
        and reads of an existing folder get here, so a failed or read-only command leaves nothing behind)."""
        if self._db is None:
            try:
                self._db = lancedb.connect(self.uri, storage_options=self.storage_options)
            except Exception as e:  # noqa: BLE001 - any connection failure is the user's URI or credentials
                raise CytoError(f"cannot open store {self.uri}: {str(e).splitlines()[0] if str(e) else e}") from e
        return self._db

    def exists(self) -> bool:
        """False for a local store whose folder is not there yet (it holds no tables)."""
        return not self.local or Path(self.uri).is_dir()

    def _lease_folder(self) -> Path:
        return Path(self.uri) / ".leases" if self.local else self.index_dir() / "leases"

    def lease(self, name: str, wait: float | None = None, poll: float | None = None) -> Lease:
        """The write lease of table `name` (see `lease.py`): one job at a time writes a table. `wait` defaults to
        the store's; `poll` (seconds between looks) to the lease module's."""
        kwargs = {} if poll is None else {"poll": poll}
        return acquire(self._lease_folder(), name, self.wait if wait is None else wait, **kwargs)

    def write_state(self, name: str) -> str:
        """'' when no job writes table `name`; 'writing (pid P on H)' while one does; 'interrupted' when its
        writer was killed on this machine before finishing (rerun its command to add the rest)."""
        return write_state(self._lease_folder(), name)

    def mark_interrupted(self, name: str, interrupted: bool = True) -> None:
        """Mark table `name` as left incomplete by a stopped job (Ctrl-C: its lease is released on the way out, so
        only this mark says so), or clear the mark once a run of the job has finished."""
        mark = self._lease_folder() / f"{name}.interrupted"
        if interrupted:
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.write_text(datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        else:
            mark.unlink(missing_ok=True)

    def table_names(self) -> list[str]:
        if not self.exists():
            return []
        names: list[str] = []
        page_token = None
        while True:
            resp = self.db.list_tables(page_token=page_token)
            names.extend(resp.tables)
            page_token = resp.page_token
            if not page_token:
                return sorted(names)

    def open_raw(self, name: str) -> lancedb.table.Table:
        """The LanceDB table `name`; a missing one is a user error that lists what exists."""
        names = self.table_names()
        if name not in names:
            raise CytoError(f"no table '{name}' in store {self.uri} (tables: {', '.join(names) or 'none'})")
        return self.db.open_table(name)

    def open(self, name: str) -> VectorTable:
        """Open an existing vector table; a missing one is a user error that lists what exists."""
        return VectorTable(self, self.open_raw(name))

    def create_or_open(self, name: str, backbone: dict[str, Any], dataset: dict[str, Any],
                       wait: float | None = None, extra: Sequence[pa.Field] = ()) -> VectorTable:
        """Open `name` for appending vectors of `backbone`, creating it if needed; refuse another backbone's table.

        Takes the table's write lease (waiting up to `wait` s, default the store's, for another job's), released by
        `finish` or at exit. `extra` columns are added to a new table's schema (rows copy them from their source).
        Safe when several processes of one job (torchrun) call it at once: the first creates, the others open.
        """
        lease = self.lease(name, wait)
        meta = {
            "backbone": backbone,
            "dataset": dataset,
            "cytoretrieve": __version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        if name in self.table_names():
            table = self.open(name)
        else:
            table = VectorTable(self, self.db.create_table(name, schema=table_schema(int(backbone["dim"]), meta, extra),
                                                           exist_ok=True))
        table.lease = lease
        have, want = table.fingerprint, backbone["fingerprint"]
        if have != want:
            lease.release()
            raise CytoError(
                f"table '{name}' holds vectors of backbone {table.meta['backbone']['arch']} "
                f"({have[:16]}), not of {backbone['arch']} ({want[:16]}): pass another `table`"
            )
        return table

    def index_dir(self) -> Path:
        """Where FAISS indexes are cached: beside the tables for a local store, else a per-URI cache folder."""
        if self.local:
            return Path(self.uri)
        digest = hashlib.sha1(self.uri.encode()).hexdigest()[:16]
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cytoretrieve" / digest
        cache.mkdir(parents=True, exist_ok=True)
        return cache

    def describe(self, names: Sequence[str] | None = None) -> list[TableInfo]:
        """One line per table (or per table of `names`); tables without vectors (tile bags) show dimension 0 and
        their kind. A local store keeps each line as its table's summary, which `tables` reads without LanceDB."""
        return [self.describe_table(name) for name in (self.table_names() if names is None else names)]

    def describe_table(self, name: str) -> TableInfo:
        """Table `name`'s line of `tables`, read through LanceDB; a local store's summary of it is rewritten."""
        key = version_key(Path(self.uri), name) if self.local else None  # before opening: the version read is newer
        return Table(self, self.db.open_table(name)).describe(key)


def stain_normaliser(meta: dict[str, Any]) -> str:
    """The stain normaliser a table's images went through before the model ('' for none or not recorded).

    Read defensively: the backbone's preprocessing `stain`, else a top-level `stain`; a mapping gives its name."""
    backbone = meta.get("backbone")
    preprocessing = backbone.get("preprocessing") if isinstance(backbone, dict) else None
    value = preprocessing.get("stain") if isinstance(preprocessing, dict) else None
    value = value or meta.get("stain")
    if isinstance(value, dict):
        value = value.get("name") or value.get("method")
    return "" if not value or str(value).lower() == "none" else str(value)


def _table_kind(meta: dict[str, Any]) -> str:
    """What a table's rows are, in a pathologist's words: cells (a cell dataset), tiles, cells (detected on slides or
    fields), overviews; a tile or cell table without vectors says "(no vectors)"."""
    dataset = meta.get("dataset") or {}
    layout = dataset.get("layout") if isinstance(dataset, dict) else None
    if meta.get("kind") == "overviews":
        return "overviews"
    if meta.get("kind") == "tiles":
        return "cells" if meta.get("source") == "cells" else "tiles"
    if layout in ("tiles", "cells"):
        return "tiles" if layout == "tiles" else "cells on slides"
    return "cells" if layout else ""


class Table:
    """One LanceDB table of the store and its cytoretrieve metadata: what every kind of table shares."""

    INDEXED: tuple[str, ...] = ("id",)  # columns given a BTree index by `finish`

    def __init__(self, store: Store, tbl: lancedb.table.Table) -> None:
        self.store = store
        self.tbl = tbl
        self.meta: dict[str, Any] = read_meta(tbl)
        self.lease: Lease | None = None  # held while this process writes the table

    @property
    def name(self) -> str:
        return self.tbl.name

    @property
    def version(self) -> int:
        return int(self.tbl.version)

    def count(self, where: str | None = None) -> int:
        """Rows in the table, or those matching a SQL `where` (made with `store.filters`)."""
        return int(self.tbl.count_rows(where) if where else self.tbl.count_rows())

    @property
    def columns(self) -> list[str]:
        """The table's column names."""
        return list(self.tbl.schema.names)

    def scan(self, columns: Sequence[str], where: str | None = None, row_id: bool = False) -> pa.RecordBatchReader:
        """Stream the given columns in batches, optionally filtered by a SQL `where`; `row_id` adds LanceDB's
        `_rowid` (the address `take_vectors` reads by; valid for this table version)."""
        query = self.tbl.search().select(list(columns)).limit(None)
        if row_id:
            query = query.with_row_id(True)
        if where:
            query = query.where(where)
        try:
            return query.to_batches(READ_BATCH)
        except ValueError as e:
            raise CytoError(f"invalid `where` filter {where!r}: {str(e).splitlines()[0]}") from e

    def read(self, columns: Sequence[str], where: str | None = None) -> pa.Table:
        """The given columns of all rows (matching `where`) as one Arrow table."""
        return self.scan(columns, where).read_all()

    def add(self, rows: pa.Table) -> None:
        """Append one batch of rows (one LanceDB commit: a kill leaves whole batches only). A lost race with a
        concurrent writer is retried; a full disk is one line saying what is stored."""
        rows = rows.cast(self.tbl.schema) if rows.schema != self.tbl.schema else rows
        failpoint("commit")
        self._write(lambda: self.tbl.add(rows))

    def _write(self, action: Callable[[], T]) -> T:
        """One commit to this table: retried while it loses races to concurrent writers; a full disk is one line
        saying what the table holds at its last commit."""
        try:
            return retry_commit(action)
        except (RuntimeError, OSError, ValueError) as e:
            if not _no_space(e):
                raise
            stored = self.store.db.open_table(self.name).count_rows()
            raise CytoError(f"no space left on device while writing table {self.name}: {stored} rows are stored; "
                            "free space and rerun to add the rest") from None

    def duplicates(self) -> int:
        """Rows beyond the first of each id (0 for a table every writer kept clean)."""
        return duplicated_rows(self.read(["id"]).column("id"))

    def dedupe(self) -> int:
        """Keep one row per id (the first stored) and return how many were removed. Extra copies are deleted by
        row address, in slices (each one commit): a kill midway leaves some copies, never loses a row."""
        meta = self.scan(["id"], row_id=True).read_all()
        seen: set[str] = set()
        extra = []
        order = np.argsort(meta.column("_rowid").to_numpy(), kind="stable")
        ids = meta.column("id").to_pylist()
        rids = meta.column("_rowid").to_numpy()
        for i in order:
            if ids[i] in seen:
                extra.append(int(rids[i]))
            else:
                seen.add(ids[i])
        for a in range(0, len(extra), 10_000):
            part = ", ".join(map(str, extra[a:a + 10_000]))
            self._write(lambda p=part: self.tbl.delete(f"_rowid IN ({p})"))
        return len(extra)

    def finish(self) -> None:
        """After a job: compact small fragments, drop versions older than a few minutes, index `INDEXED`, and
        release this process's write lease.

        Versions a concurrent writer (another shard of the same job) may still read are kept: only those older
        than `KEEP_VERSIONS` go. Compaction is housekeeping: when it keeps losing races to other writers it is left
        for the next job (a warning says so) and the job still succeeds.
        """
        failpoint("compact")
        try:
            self._write(lambda: self.tbl.optimize(cleanup_older_than=KEEP_VERSIONS))
            failpoint("compacted")
            if self.count():
                for column in self.INDEXED:
                    self._write(lambda c=column: self.tbl.create_index(c, config=BTree(), replace=True))
        except (RuntimeError, OSError, ValueError) as e:
            if not _conflict(e):
                raise
            log.warning("table %s: compaction left for the next job (other writers kept committing)", self.name)
        finally:
            if self.lease is not None:
                self.lease.release()
        self.keep_summary()

    def describe(self, key: dict[str, Any] | None = None) -> TableInfo:
        """This table's line of `tables` at the version this handle holds (its own commits move it, other writers'
        do not). `key` is the table's newest manifest, read before (`summary.version_key`): when it names this
        version, the line is kept as the table's summary, which is tied to the newest manifest."""
        meta = read_meta(self.tbl)
        backbone = meta.get("backbone") or {}
        stats = self.tbl.stats()
        tiles = meta if meta.get("kind") == "tiles" else (meta.get("dataset") or {}).get("tiles") or {}
        detector = (tiles.get("detector") or {}).get("name", "") if isinstance(tiles, dict) else ""
        weights = str(backbone.get("weights") or "")
        info = TableInfo(
            weights=weights if weights in ("timm", "random", "") else Path(weights).name,
            detector=detector,
            kind=_table_kind(meta),
            internal=meta.get("kind") == "overviews",
            name=self.name,
            rows=int(stats["num_rows"]),
            dim=int(backbone.get("dim", 0)),
            arch=backbone.get("arch", f"({meta.get('kind', 'no vectors')})"),
            fingerprint=backbone.get("fingerprint", ""),
            dataset=(meta.get("dataset") or {}).get("name", ""),
            bytes=int(stats["total_bytes"]),
            duplicates=self.duplicates() if "id" in self.columns else 0,
            normaliser=stain_normaliser(meta),
        )
        if key is not None and key["version"] == self.version:  # no commit in between: the key is what was read
            write_summary(Path(self.store.uri), info, key)
        return replace(info, state=self.store.write_state(self.name))

    def keep_summary(self) -> None:
        """Write this table's line of `tables` as its summary (local stores), so that the next `tables` answers
        without importing LanceDB (see `store/summary.py`). Read from this handle when it holds the newest version
        (the usual case after `finish`: no reopening); when another writer has committed since, the table is
        reopened at its newest version instead. Housekeeping: a failure only leaves that to `tables`."""
        if not self.store.local:
            return
        try:
            key = version_key(Path(self.store.uri), self.name)
            if key is not None and key["version"] == self.version:
                self.describe(key)
            else:
                self.store.describe_table(self.name)
        except Exception as e:  # noqa: BLE001 - the job's rows are stored; `tables` reads LanceDB instead
            log.warning("table %s: its summary for `tables` was not written (%s)", self.name, e)


def build_rows(fields: Sequence[pa.Field], records: Sequence[dict[str, Any]]) -> dict[str, pa.Array]:
    """Arrow columns for `fields` from row dicts; `key` is derived from `id` (one rule for every kind of table)."""
    cols: dict[str, pa.Array] = {}
    for f in fields:
        values = [row_key(r["id"]) for r in records] if f.name == "key" else [r.get(f.name) for r in records]
        cols[f.name] = pa.array(values, type=f.type)
    return cols


class VectorTable(Table, VectorMeta):
    """A table of vectors: rows of metadata + vector, and the backbone metadata of its vectors."""

    INDEXED = ("id", "key")

    def __init__(self, store: Store, tbl: lancedb.table.Table) -> None:
        super().__init__(store, tbl)
        if "backbone" not in self.meta:
            what = f"a {self.meta['kind']} table" if "kind" in self.meta else "not a table of vectors"
            raise CytoError(f"table '{tbl.name}' is {what}: it holds no vectors (embed it into a table first)")


    def ids(self) -> set[str]:
        """Every row id already stored: what a resumed job skips."""
        return set(self.read(["id"]).column("id").to_pylist())

    def vectors(self, columns: Sequence[str] = ("id",), where: str | None = None) -> tuple[np.ndarray, pa.Table]:
        """All vectors (n, dim) float32 as stored, with the requested metadata columns in the same order."""
        chunks: list[np.ndarray] = [np.zeros((0, self.dim), np.float32)]
        meta: list[pa.RecordBatch] = []
        reader = self.scan([*columns, "vector"], where)
        for batch in reader:
            vec = batch.column("vector")
            chunks.append(vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), self.dim))
            meta.append(batch.select(list(columns)))
        schema = pa.schema([reader.schema.field(c) for c in columns])
        return np.concatenate(chunks).astype(np.float32, copy=False), pa.Table.from_batches(meta, schema)

    def take(self, row_ids: np.ndarray, columns: Sequence[str]) -> tuple[np.ndarray, pa.Table]:
        """(vectors (n, dim) float32, the `columns`) of the rows at these `_rowid`s, in ascending row-id order
        (LanceDB's take returns them so): random access to rows, e.g. the ones appended since an index was built,
        without a filtered query per slice of them."""
        if not len(row_ids):
            return np.zeros((0, self.dim), np.float32), pa.table({c: [] for c in columns})
        got = self.tbl.take_row_ids(np.asarray(row_ids, dtype=np.uint64).tolist()).select([*columns, "vector"])
        got = got.to_arrow()
        vec = got.column("vector").combine_chunks()
        vectors = vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), self.dim).astype(np.float32, copy=False)
        return vectors, got.select(list(columns))

    def take_vectors(self, row_ids: np.ndarray) -> np.ndarray:
        """Vectors (n, dim) float32 of the rows at these `_rowid`s, in ascending row-id order: random access to a
        few thousand rows without scanning the table."""
        return self.take(row_ids, [])[0]

    def rows_by_keys(self, keys: Sequence[int], columns: Sequence[str]) -> dict[int, dict[str, Any]]:
        """Metadata of the rows with these FAISS keys, as {key: row dict}."""
        if not len(keys):
            return {}
        table = self.read(["key", *columns], f"key IN ({', '.join(str(int(k)) for k in keys)})")
        return {row.pop("key"): row for row in table.to_pylist()}

    def row_by_id(self, row_id: str, columns: Sequence[str]) -> dict[str, Any]:
        """One row by id; a missing id is a user error."""
        table = self.read(columns, equals("id", row_id))
        if table.num_rows == 0:
            raise CytoError(f"no row with id '{row_id}' in table '{self.name}'")
        return table.to_pylist()[0]

    def make_rows(self, records: Sequence[dict[str, Any]], vectors: np.ndarray) -> pa.Table:
        """Build an Arrow table in this table's schema from row dicts (its columns but the vector) and their vectors."""
        n = len(records)
        if vectors.shape != (n, self.dim):
            raise ValueError(f"vectors of shape {vectors.shape} for {n} rows of dimension {self.dim}")
        cols = build_rows([f for f in self.tbl.schema if f.name != "vector"], records)
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
        cols["vector"] = pa.FixedSizeListArray.from_arrays(flat, self.dim)
        return pa.Table.from_pydict(cols, schema=self.tbl.schema)
