"""The index of a table's vectors, cached beside the table and keyed to its version: what `search` and the viewer
query. Everything that depends on the index kind (building, ids, filtered search, removal, retraining, the GPU
move, `auto`) is read from the kind's record in `store/ann.py`; this module only keeps a table's index current.

A table's index maps FAISS ids to the table's int64 `key` column, so hits resolve to rows without a side list. It
is built from streamed batches of the table (never all its vectors at once), and a cached one is loaded
memory-mapped (flat codes, IVF lists and re-ranking codes are paged in as searches touch them), so a fresh process
answers its first query without reading the whole file. Beside it, a mapped rows file (`RowMap`) holds the rows'
metadata for hits, and rows appended since it was written sit in a small side index of the same training
(searched beside it, folded in past `SIDE_FRACTION`), so an append never rewrites the big file. A change of the
table is caught up (rows added, deleted rows removed) unless the kind cannot remove rows, has outgrown its
training (`IndexKind.retrain_growth`), or `auto` now picks another kind: then the index is rebuilt. Build and
search figures: BENCHMARKS.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import pyarrow as pa

from cytoretrieve.errors import CytoError
from cytoretrieve.faults import failpoint
from cytoretrieve.store import ann

if TYPE_CHECKING:
    from cytoretrieve.store.lance_index import LanceTableIndex
    from cytoretrieve.store.tables import VectorTable

ASSIGN_BUDGET = 1 << 20  # a table index's lists x dimension: the multiply-adds to assign one row to its list
TABLE_MAX_LISTS = 1024  # and at most this many lists (more lists built slower: BENCHMARKS.md)
MEMORY_CACHE_TABLES = 4  # indexes kept loaded per process (most recently used); each holds all its vectors
TABLE_TRAIN_PER_LIST = 40  # a table index's k-means: fewer rows (FAISS warns below 39) and iterations ...
TABLE_KMEANS_ITERATIONS = 5  # ... than `ann.IndexParams`' defaults, for the same recall (BENCHMARKS.md)
UPDATE_SLICE = 4096  # rows per LanceDB take when an index picks up appended rows
SORT_BEFORE_SEARCH = 4096  # `RowMap.find` sorts more keys than this before its binary searches
SIDE_FRACTION = 0.05  # appended rows wait in a side index (the main file untouched) up to this x the main's rows
CACHE_FORMAT = 2  # of a table's cache files; a cache of another format is rebuilt
MAPPED = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE  # how a cached index is read (`_read_cache`)
# the metadata of a table's rows kept in a mapped file beside its index: what a search hit shows
ROW_COLUMNS = ["id", "label", "binary", "path", "group", "slide", "x", "y", "dataset", "tile_size"]
log = logging.getLogger("cytoretrieve")


def table_nlist(n: int, dim: int) -> int:
    """IVF lists of a table's index: `ann.auto_nlist(n)`, capped so that assigning a row to its list costs at most
    `ASSIGN_BUDGET` multiply-adds and at most `TABLE_MAX_LISTS` (1024 lists at 384-d, 512 at 2048-d): a build's
    time is dominated by that assignment."""
    cap = min(2 ** int(math.log2(max(ASSIGN_BUDGET // max(dim, 1), 16))), TABLE_MAX_LISTS)
    return min(ann.auto_nlist(n), cap)


class RowMap:
    """`ROW_COLUMNS` of an index's rows sorted by key, with each row's position in its id-mapped index (-1 where
    the index finds rows by key itself): kept in an Arrow file beside the index and memory-mapped, so a hit's
    metadata is a binary search and a take, and a fresh process reads only the pages its hits touch (reading
    every row's metadata took 1-2 s at 1.5M rows)."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table.combine_chunks()  # one chunk: a mapped file holds one batch
        self.keys = _column(self.table, "key")
        self.positions = _column(self.table, "pos")

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, keys: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(mask of the `keys` held here, the row of each held one)."""
        wanted = np.asarray(keys, dtype=np.int64)
        if not len(self.keys):
            return np.zeros(len(wanted), bool), np.zeros(0, np.int64)
        if len(wanted) > SORT_BEFORE_SEARCH:  # searchsorted walks sorted needles in order: ~5x faster at 10M
            order = np.argsort(wanted)
            at = np.empty(len(wanted), np.int64)
            at[order] = np.searchsorted(self.keys, wanted[order])
        else:
            at = np.searchsorted(self.keys, wanted)
        at = np.minimum(at, len(self.keys) - 1)
        found = self.keys[at] == wanted
        return found, at[found]

    def lookup(self, keys: Sequence[int]) -> dict[int, dict[str, Any]]:
        """{key: row dict of ROW_COLUMNS} of the keys held here."""
        found, rows = self.find(keys)
        data = self.table.select(ROW_COLUMNS).take(pa.array(rows, pa.int64())).to_pylist()
        return dict(zip(np.asarray(keys, dtype=np.int64)[found].tolist(), data))

    def position(self, key: int) -> int | None:
        found, rows = self.find([key])
        return int(self.positions[rows[0]]) if found[0] and self.positions[rows[0]] >= 0 else None


def _column(table: pa.Table, name: str) -> np.ndarray:
    """An int64 column as numpy, zero-copy over a mapped file."""
    chunks = table.column(name).chunks
    return chunks[0].to_numpy() if len(chunks) == 1 else np.zeros(0, np.int64)


def _row_table(meta: pa.Table, index: faiss.Index) -> pa.Table:
    """The rows file's content: `key` + ROW_COLUMNS of `meta` sorted by key, and each key's position in an
    id-mapped `index` (-1 for an IVF index, which finds a key itself)."""
    keys = meta.column("key").to_numpy().astype(np.int64)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    positions = np.full(len(keys), -1, np.int64)
    ids = ann.mapped_ids(index)
    if ids is not None and len(keys):
        by_id = np.argsort(ids, kind="stable")
        positions = by_id[np.minimum(np.searchsorted(ids[by_id], keys), len(ids) - 1)].astype(np.int64)
    columns = meta.select(ROW_COLUMNS).take(pa.array(order)).combine_chunks()
    return pa.Table.from_arrays([pa.array(keys), pa.array(positions), *columns.columns],
                                names=["key", "pos", *ROW_COLUMNS])


@dataclass
class TableIndex:
    """A FAISS index of one table version; `index` ids are the table's `key` column. Rows appended since `index`
    was cached sit in `side` (an index of the same kind and training, searched beside it; None when there are
    none); `row_map` / `side_rows` hold those rows' metadata (None for an index built outside a table cache)."""

    index: faiss.Index
    kind: str
    version: int
    rows: int
    derived: dict[str, Any] = field(default_factory=dict)  # data of this table version kept as long as the index
    row_map: RowMap | None = None
    side: faiss.Index | None = None
    side_rows: RowMap | None = None
    build: str = ""  # the main index's build id (new at each build or fold); "" for an index outside a cache

    @property
    def scale_version(self) -> str | int:
        """What `queries.search.similarity_scale` keys the table's similarity scale to: the main index's build, so
        that appended rows (the side index: a few percent of the main's at most) do not cost a new scale of
        thousands of queries at their first search; the table version for an index outside a cache."""
        return f"faiss-{self.build}" if self.build else self.version

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, keys) for L2-normalised queries; `allowed` restricts hits to these keys. With a side
        index, both are searched and the hits merged by score (both score on the same codes)."""
        k = min(k, self.rows)
        with ann.search_threads(self.kind, len(queries)):
            found = ann.search(self.index, self.kind, queries, min(k, max(int(self.index.ntotal), 1)), allowed)
            if self.side is None or not self.side.ntotal:
                return found
            side = ann.search(self.side, self.kind, queries, min(k, int(self.side.ntotal)), allowed)
            return _merge(found, side, k)

    def stored_vector(self, key: int) -> np.ndarray | None:
        """The L2-normalised vector stored under `key`, or None when the key is not in the index or this index
        cannot look vectors up by key (a GPU copy, an IVF index without its key map). IVF-PQ + re-ranking returns
        its re-ranking copy (float16, or 8-bit from `ann.HIGH_DIM` dimensions)."""
        if self.side is not None:
            vector = ann.stored_vector(self.kind, self.side, int(key), _row_finder(self.side, self.side_rows, {}))
            if vector is not None:
                return vector
        return ann.stored_vector(self.kind, self.index, int(key), _row_finder(self.index, self.row_map, self.derived))

    def row_metadata(self, keys: Sequence[int]) -> dict[int, dict[str, Any]] | None:
        """{key: ROW_COLUMNS} of the rows with these keys (from the mapped rows files), or None when this index
        keeps no row map (the caller asks the table)."""
        if self.row_map is None:
            return None
        out = self.row_map.lookup(keys)
        if self.side_rows is not None and len(out) < len(keys):
            out.update(self.side_rows.lookup([k for k in keys if k not in out]))
        return out


def _merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k of two (scores, keys) results per query, best first (missing hits, key -1, last)."""
    scores, keys = np.hstack([a[0], b[0]]), np.hstack([a[1], b[1]])
    order = np.argsort(-np.where(keys != -1, scores, -np.inf), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(keys, order, 1)


def _row_finder(index: faiss.Index, rows: RowMap | None, derived: dict[str, Any]) -> Callable[[int], int | None]:
    """key -> its row in an id-mapped `index` (from its rows file, else from a sorted copy of its keys)."""
    return rows.position if rows is not None else lambda key: _row_of(index, key, derived)


def _row_of(index: faiss.Index, key: int, derived: dict[str, Any]) -> int | None:
    """The row of `key` in an id-mapped index without a row map, from a sorted copy of its keys made on first
    use and kept with the index."""
    if "key_order" not in derived:
        keys = ann.mapped_ids(index)
        order = np.argsort(keys, kind="stable")
        derived["key_order"] = (keys[order], order)
    sorted_keys, order = derived["key_order"]
    at = int(np.searchsorted(sorted_keys, key))
    return int(order[at]) if at < len(sorted_keys) and sorted_keys[at] == key else None


@dataclass(frozen=True)
class _Paths:
    """A table's cache files. The main index: `index` (FAISS), `rows` (its RowMap), `trained` (the index as
    trained, before any row was added: what a side index starts from) and `meta` (.json, written last, with the
    others' sizes). The side index of rows appended since: `side`, `side_rows`, `side_meta` (likewise)."""

    index: Path
    meta: Path
    rows: Path
    trained: Path
    side: Path
    side_rows: Path
    side_meta: Path


def _paths(table: VectorTable) -> _Paths:
    base = str(table.store.index_dir() / table.name)
    return _Paths(*(Path(base + s) for s in (".faiss", ".faiss.json", ".rows.arrow", ".trained.faiss",
                                             ".side.faiss", ".side.rows.arrow", ".side.json")))


def _table_params(n: int, dim: int) -> ann.IndexParams:
    return ann.IndexParams(nlist=table_nlist(n, dim), niter=TABLE_KMEANS_ITERATIONS, train_per_list=TABLE_TRAIN_PER_LIST)


def build(vectors: np.ndarray, keys: np.ndarray, kind: str = "auto") -> tuple[faiss.Index, str]:
    """A table's index of `vectors` with ids `keys` (`auto`: by rows x dimension, see `ann.auto_kind`)."""
    n, dim = vectors.shape
    if kind == "auto":
        kind = ann.auto_kind(n, dim)
    index, info = ann.build_index(vectors, kind, _table_params(n, dim), ids=keys)
    return index, info["kind"]


def _table_sample(table: VectorTable, n: int, rows: int, seed: int) -> np.ndarray:
    """`rows` of the table's `n` vectors drawn uniformly without replacement, picked from one streamed scan."""
    pick = np.sort(np.random.default_rng(seed).choice(n, min(rows, n), replace=False))
    parts, a = [], 0
    for batch in table.scan(["vector"]):
        lo, hi = np.searchsorted(pick, [a, a + batch.num_rows])
        if hi > lo:
            vec = batch.column("vector")
            parts.append(vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), table.dim)[pick[lo:hi] - a])
        a += batch.num_rows
    return ann.l2_normalise(np.concatenate(parts))


@dataclass
class _Built:
    """A freshly built table index: the index, its kind, the index as trained (serialised) and its RowMap."""

    index: faiss.Index
    kind: str
    trained: np.ndarray
    rows: pa.Table


def build_table(table: VectorTable, kind: str = "auto") -> _Built:
    """The table's index, streamed: one scan for the training sample (IVF kinds), one to add the rows batch by
    batch (their `ROW_COLUMNS` kept for the rows file), so that memory holds the index, the metadata and one
    batch, never all the vectors."""
    n, dim = table.count(), table.dim
    if n == 0:
        raise CytoError(f"table '{table.name}' is empty: embed something into it first")
    kind = _faiss_auto(table, n) if kind == "auto" else kind
    params = _table_params(n, dim)
    index, _, train_rows = ann.new_index(kind, dim, n, params)
    if train_rows:
        ann.train(index, _table_sample(table, n, train_rows, params.seed))
    trained = faiss.serialize_index(index)
    ann.reserve(index, n)
    index = ann.with_ids(kind, index)
    meta = []
    for batch in table.scan(["key", "vector", *ROW_COLUMNS]):
        vec = batch.column("vector")
        ann.add(index, vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), dim),
                batch.column("key").to_numpy())
        # a copy, holding none of the batch's buffers (slices of them kept every vector: +2.2 GB at 1.5M x 384)
        meta.append(batch.select(["key", *ROW_COLUMNS]).take(np.arange(batch.num_rows)))
    return _Built(ann.with_key_map(index), kind, trained, _row_table(pa.Table.from_batches(meta), index))


# Loaded indexes of this process: {index file: (stats of its .json files when loaded, index)}. Reading a 200k x
# 384 IVF index back from disk takes ~0.1 s (far more at 2048-d), which every search in a long-lived process paid.
_LOADED: OrderedDict[str, tuple[tuple[Any, ...], TableIndex]] = OrderedDict()
_LOADED_LOCK = threading.Lock()  # searches may run in several threads of one process


def _meta_stamp(paths: _Paths) -> tuple[Any, ...] | None:
    """(mtime_ns, size) of the main and side .json files, which are written last: they change whenever the
    index is rebuilt or takes appended rows."""
    stamps = []
    for path in (paths.meta, paths.side_meta):
        try:
            st = path.stat()
        except OSError:
            if path == paths.meta:
                return None
            stamps.append(None)
            continue
        stamps.append((st.st_mtime_ns, st.st_size))
    return tuple(stamps)


def forget_loaded() -> None:
    """Drop the indexes this process holds in memory (frees their RAM; the next search reloads the cache file)."""
    from cytoretrieve.store import lance_index

    with _LOADED_LOCK:
        _LOADED.clear()
    lance_index.forget_loaded()


def _remember(paths: _Paths, loaded: TableIndex) -> TableIndex:
    stamp = _meta_stamp(paths)
    if stamp is not None:
        with _LOADED_LOCK:
            _LOADED[str(paths.index)] = (stamp, loaded)
            _LOADED.move_to_end(str(paths.index))
            while len(_LOADED) > MEMORY_CACHE_TABLES:
                _LOADED.popitem(last=False)
    return loaded


@dataclass
class _Cached:
    """One index read back from the cache (main or side), with its .json and RowMap."""

    meta: dict[str, Any]
    index: faiss.Index
    rows: RowMap


def _read_rows(path: Path) -> RowMap:
    return RowMap(pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all())


def _check_sizes(meta: dict[str, Any], files: dict[str, Path]) -> None:
    """Each file must have the size its .json recorded (a kill between writing a file and its .json leaves a
    .json that describes the previous file)."""
    for name, path in files.items():
        if path.stat().st_size != meta[name]:
            raise ValueError(f"its {path.name} has {path.stat().st_size} bytes, its .json says {meta[name]}")


def _read_cache(table: VectorTable, paths: _Paths, mapped: bool = True) -> _Cached | None:
    """The cached main index, or None when there is none, it predates the rows file, or it cannot be trusted
    (truncated, foreign, not the files its .json describes): a cache is disposable, so a damaged one is rebuilt
    with a warning.

    It is memory-mapped (`MAPPED`: flat codes, IVF lists, re-ranking codes stay in the file's pages until a search
    touches them; 4-bit fast-scan lists are read whole, 8-bit PQ lists (`ivfpq8`) are mapped; no precomputed
    tables are made at load), or read into memory (`mapped` False) to be added to (FAISS aborts the process on
    adding to a mapped index). Cache files are replaced by rename, never rewritten in place, so a mapped file
    stays valid while another process updates it.
    """
    if not paths.meta.exists() or not paths.index.exists():
        return None
    try:
        meta = json.loads(paths.meta.read_text())
        if meta.get("table") != table.name:
            raise ValueError(f"it belongs to table {meta.get('table')!r}")
        if meta.get("format") != CACHE_FORMAT:
            log.info("index cache of table %s predates this version's cache format: rebuilding it", table.name)
            return None
        _check_sizes(meta, {"bytes": paths.index, "rows_bytes": paths.rows, "trained_bytes": paths.trained})
        index = ann.with_key_map(faiss.read_index(str(paths.index), MAPPED if mapped else 0))
        rows = _read_rows(paths.rows)
        if index.ntotal != int(meta["rows"]) or len(rows) != int(meta["rows"]):
            raise ValueError(f"it holds {index.ntotal} rows ({len(rows)} in its rows file), its .json says "
                             f"{meta['rows']}")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pa.ArrowException) as e:
        _damaged(table, "index cache", e)
        return None
    return _Cached(meta, index, rows)


def _damaged(table: VectorTable, what: str, e: BaseException) -> None:
    log.warning("%s of table %s is damaged (%s): rebuilding it", what, table.name,
                str(e).splitlines()[0] if str(e) else type(e).__name__)


def _read_side(table: VectorTable, paths: _Paths, main: dict[str, Any]) -> _Cached | None:
    """The side index of rows appended since the main index was written, or None when there is none, it was made
    for an earlier main index, or it is damaged (then it is rebuilt from the table, with a warning)."""
    if not paths.side_meta.exists():
        return None
    try:
        meta = json.loads(paths.side_meta.read_text())
        if meta.get("main") != main["build"]:
            return None  # left by an earlier main index: replaced when rows are next appended
        _check_sizes(meta, {"bytes": paths.side, "rows_bytes": paths.side_rows})
        index = faiss.read_index(str(paths.side))  # small, and in memory to take the next appended rows
        rows = _read_rows(paths.side_rows)
        if index.ntotal != int(meta["rows"]) or not np.array_equal(np.sort(ann.index_keys(index)), rows.keys):
            raise ValueError(f"its index and rows file do not hold the same {meta['rows']} rows")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pa.ArrowException) as e:
        _damaged(table, "side index", e)
        return None
    return _Cached(meta, ann.with_key_map(index), rows)


def _replace(path: Path, write: Callable[[Path], None]) -> int:
    """Write a file through a temporary one renamed into place (never half a file under the real name); its size."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)
    return path.stat().st_size


def _write_rows(path: Path, rows: pa.Table) -> int:
    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, rows.schema) as writer:
            writer.write_table(rows.combine_chunks(), max_chunksize=max(rows.num_rows, 1))

    return _replace(path, write)


def _write_cache(table: VectorTable, paths: _Paths, index: faiss.Index, rows: pa.Table, meta: dict[str, Any],
                 trained: np.ndarray | None = None) -> dict[str, Any]:
    """Write the main index's files, then its .json (a kill leaves the old .json, or one that does not describe
    the new files, which `_read_cache` refuses); any side index belonged to the previous main index."""
    sizes = {"rows_bytes": _write_rows(paths.rows, rows)}
    if trained is not None:
        sizes["trained_bytes"] = _replace(paths.trained, lambda tmp: trained.tofile(tmp))
    tmp = paths.index.with_suffix(".faiss.tmp")
    faiss.write_index(index, str(tmp))
    failpoint("index-written")
    tmp.replace(paths.index)
    meta = {**meta, **sizes, "table": table.name, "rows": int(index.ntotal), "bytes": paths.index.stat().st_size,
            "format": CACHE_FORMAT, "build": os.urandom(8).hex()}
    _replace(paths.meta, lambda tmp: tmp.write_text(json.dumps(meta)))
    paths.side_meta.unlink(missing_ok=True)
    return meta


def _write_side(table: VectorTable, paths: _Paths, index: faiss.Index, rows: pa.Table,
                meta: dict[str, Any]) -> None:
    """Write the side index and its rows file, then its .json (as `_write_cache` does for the main one)."""
    sizes = {"rows_bytes": _write_rows(paths.side_rows, rows)}
    sizes["bytes"] = _replace(paths.side, lambda tmp: faiss.write_index(index, str(tmp)))
    failpoint("side-written")
    meta = {**meta, **sizes, "table": table.name, "rows": int(index.ntotal)}
    _replace(paths.side_meta, lambda tmp: tmp.write_text(json.dumps(meta)))


def _table_keys(table: VectorTable) -> tuple[np.ndarray, np.ndarray]:
    """(key, `_rowid`) of every row of the table, in scan order: the keys say which rows an index lacks, the row
    ids fetch just those (`VectorTable.take`)."""
    got = table.scan(["key"], row_id=True).read_all()
    return got.column("key").to_numpy().astype(np.int64), got.column("_rowid").to_numpy()


def _rows_at(table: VectorTable, row_ids: np.ndarray) -> tuple[np.ndarray, pa.Table]:
    """(vectors, key + ROW_COLUMNS) of the rows at these row ids, taken in slices of `UPDATE_SLICE`."""
    row_ids = np.sort(row_ids)
    parts = [table.take(row_ids[a:a + UPDATE_SLICE], ["key", *ROW_COLUMNS]) for a in range(0, len(row_ids), UPDATE_SLICE)]
    if not parts:
        return table.take(row_ids, ["key", *ROW_COLUMNS])
    return np.concatenate([v for v, _ in parts]), pa.concat_tables([m for _, m in parts])


def _update(table: VectorTable, meta: dict[str, Any], index: faiss.Index) -> faiss.Index | None:
    """The cached index brought up to the table's rows (new keys added, gone keys removed), or None when a fresh
    build is due: rows were deleted from a kind that cannot remove them (`IndexKind.removable`)."""
    keys, row_ids = _table_keys(table)
    held = ann.index_keys(index)
    new, gone = ~np.isin(keys, held), np.setdiff1d(held, keys)
    if len(gone):
        if not ann.index_kind(meta["kind"]).removable:
            return None
        ann.remove_keys(index, gone)
    if new.any():
        vectors, got = _rows_at(table, row_ids[new])
        ann.add(index, vectors, got.column("key").to_numpy())
    log.info("index of table %s updated: %d rows added, %d removed", table.name, int(new.sum()), len(gone))
    return index


def _fold(table: VectorTable, paths: _Paths, meta: dict[str, Any], version: int) -> TableIndex | None:
    """The main index read into memory, brought up to the table (side rows and new ones added, deleted ones
    removed) and rewritten, the side index dropped; None when a fresh build is due."""
    index = _update(table, meta, ann.with_key_map(faiss.read_index(str(paths.index))))
    if index is None:
        return None
    meta = {k: v for k, v in meta.items() if k in ("kind", "auto", "trained_rows", "trained_bytes")}
    rows = _row_table(table.read(["key", *ROW_COLUMNS]), index)
    written = _write_cache(table, paths, index, rows, {**meta, "version": version})
    return TableIndex(ann.to_gpu(index, meta["kind"]), meta["kind"], version, int(index.ntotal), row_map=RowMap(rows),
                      build=written["build"])


def _catch_up(table: VectorTable, paths: _Paths, main: _Cached, side: _Cached | None,
              version: int) -> TableIndex | None:
    """The cached index brought to the table's current version, or None when a fresh build is due (the kind
    `auto` would pick has changed, or the table has outgrown the index's training: `IndexKind.retrain_growth` x the
    rows it was trained on). Appended rows go to the side index (the main file is not rewritten) until they are
    `SIDE_FRACTION` of the main rows; then, or when rows were deleted from the main index, it is folded."""
    keys, row_ids = _table_keys(table)
    kind, rows = main.meta["kind"], len(keys)
    if main.meta.get("auto") and kind != _faiss_auto(table, rows):
        return None
    growth = ann.index_kind(kind).retrain_growth
    if growth is not None and rows > growth * int(main.meta.get("trained_rows", main.meta["rows"])):
        return None
    in_main = main.rows.find(keys)[0]
    extra, extra_ids = keys[~in_main], row_ids[~in_main]
    if int(in_main.sum()) < len(main.rows) or len(extra) > SIDE_FRACTION * len(main.rows):
        return _fold(table, paths, main.meta, version)
    if not len(extra):  # no rows beyond the main index's (a compaction or a deleted side row moved the version)
        _replace(paths.meta, lambda tmp: tmp.write_text(json.dumps({**main.meta, "version": version})))
        paths.side_meta.unlink(missing_ok=True)
        return _loaded(main, None, version)
    kept = side is not None and int(side.rows.find(extra)[0].sum()) == len(side.rows)
    new = ~side.rows.find(extra)[0] if kept else np.ones(len(extra), bool)
    if kept and not new.any():  # the side index still holds exactly the appended rows
        _replace(paths.side_meta, lambda tmp: tmp.write_text(json.dumps({**side.meta, "version": version})))
        return _loaded(main, side, version)
    if kept:
        index, held = side.index, side.rows.table.select(["key", *ROW_COLUMNS])
    else:  # none yet, or some of its rows were deleted: a fresh one of all rows the main index does not hold
        index, held = ann.with_ids(kind, faiss.deserialize_index(np.fromfile(paths.trained, dtype=np.uint8))), None
    vectors, meta = _rows_at(table, extra_ids[new])
    ann.add(index, vectors, meta.column("key").to_numpy())
    rows_table = _row_table(meta if held is None else pa.concat_tables([held, meta]), index)
    _write_side(table, paths, index, rows_table, {"main": main.meta["build"], "version": version})
    log.info("index of table %s: %d appended rows in its side index", table.name, index.ntotal)
    return _loaded(main, _Cached({}, ann.with_key_map(index), RowMap(rows_table)), version)


def _loaded(main: _Cached, side: _Cached | None, version: int) -> TableIndex:
    side_index = None if side is None or not side.index.ntotal else side.index
    kind = main.meta["kind"]
    return TableIndex(ann.to_gpu(main.index, kind), kind, version,
                      int(main.index.ntotal) + (0 if side_index is None else int(side_index.ntotal)),
                      row_map=main.rows, side=ann.to_gpu(side_index, kind), side_rows=None if side is None else side.rows,
                      build=main.meta.get("build", ""))


def _from_cache(table: VectorTable, paths: _Paths, kind: str, version: int) -> TableIndex | None:
    """The cached index of the table's current version (caught up when the table changed), or None when there is
    no usable cache of this kind."""
    main = _read_cache(table, paths)
    if main is None or kind not in ("auto", main.meta.get("kind")):
        return None
    if main.meta.get("version") == version:
        return _loaded(main, None, version)
    side = _read_side(table, paths, main.meta)
    if side is not None and side.meta.get("version") == version:
        return _loaded(main, side, version)
    return _catch_up(table, paths, main, side, version)


def _engine(table: VectorTable, kind: str, paths: _Paths) -> str:
    """The engine that serves the table's index of `kind`. For `auto`: a FAISS kind built by hand (`index build
    --kind`) keeps the table on FAISS; else a LanceDB vector index already in the table is used (every reader of
    the store shares it); else `ann.auto_kind` decides by rows, dimension and where the store lives."""
    if kind != "auto":
        return ann.index_kind(kind).engine
    try:
        meta = json.loads(paths.meta.read_text())
        if meta.get("table") == table.name and not meta.get("auto") and meta.get("kind") in ann.INDEX_KINDS:
            return ann.index_kind(meta["kind"]).engine
    except (OSError, ValueError):
        pass
    from cytoretrieve.store import lance_index

    if lance_index.vector_index(table) is not None:
        return "lance"
    return ann.index_kind(ann.auto_kind(table.count(), table.dim, _where(table))).engine


def _where(table: VectorTable) -> ann.Where:
    return ann.Where.of(table.store.uri)


def _faiss_auto(table: VectorTable, rows: int) -> str:
    """The FAISS kind `auto` picks for the table at `rows` rows (its rule as if the store were local and the RAM
    unknown, where it would now pick `lance`: the next search moves the table to LanceDB's index)."""
    kind = ann.auto_kind(rows, table.dim, _where(table))
    return kind if ann.index_kind(kind).engine == "faiss" else ann.auto_kind(rows, table.dim)


def prewarm(table: VectorTable) -> bool:
    """Load what the first search of the table would otherwise wait for: its LanceDB vector index (lance kind)
    into LanceDB's cache; a FAISS index is memory-mapped at its first search, nothing to do. True when warmed."""
    from cytoretrieve.store import lance_index

    return lance_index.prewarm(table)


def table_index(table: VectorTable, kind: str = "auto", rebuild: bool = False) -> TableIndex | LanceTableIndex:
    """The index of the table's current version: from memory (loaded earlier in this process), loaded from the
    cache files, caught up from an older cache (appended rows put in the side index, or folded into the main one
    with deleted rows removed), or built and cached. The `lance` kind (LanceDB's own index, in the table) is
    served by `store/lance_index.py`.

    A loaded index is reused only while the table's version and the cache's .json files are those it was loaded
    with, so it is never staler than the file cache. `rebuild` forces a fresh build (and retraining).
    """
    paths = _paths(table)
    version = table.version
    held = _LOADED.get(str(paths.index))
    if held is not None and not rebuild:
        stamp, loaded = held
        if loaded.version == version and kind in ("auto", loaded.kind) and stamp == _meta_stamp(paths):
            with _LOADED_LOCK:
                if str(paths.index) in _LOADED:
                    _LOADED.move_to_end(str(paths.index))
            return loaded
    if _engine(table, kind, paths) == "lance":
        from cytoretrieve.store import lance_index

        if kind == "lance":  # chosen by hand: `auto` follows it, not an older FAISS cache of this machine
            paths.meta.unlink(missing_ok=True)
        return lance_index.table_index(table, rebuild=rebuild, build_below=kind == "lance")
    cached = None if rebuild else _from_cache(table, paths, kind, version)
    if cached is not None:
        return _remember(paths, cached)
    built = build_table(table, kind)
    rows = int(built.index.ntotal)
    meta = {"version": version, "kind": built.kind, "auto": kind == "auto", "trained_rows": rows}
    written = _write_cache(table, paths, built.index, built.rows, meta, built.trained)
    loaded = TableIndex(ann.to_gpu(built.index, built.kind), built.kind, version, rows, row_map=RowMap(built.rows),
                        build=written["build"])
    return _remember(paths, loaded)
