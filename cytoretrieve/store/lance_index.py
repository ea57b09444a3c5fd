"""The `lance` index kind: LanceDB's own vector index inside a table, searched through LanceDB's query.

Where the FAISS kinds keep an index file in each machine's cache (`store/index.py`), this one lives in the store
beside the table's data: built once (`create_index`, IVF-RQ on cosine distance), it serves every machine that reads
the store, and LanceDB loads its partitions as queries touch them, so no reader holds the whole index. Searches
re-rank `REFINE_FACTOR` x k candidates on the stored vectors (RQ codes alone rank coarsely) and visit `NPROBES`
partitions. Rows appended since the index was built or last folded are searched flat by LanceDB beside it (its
`fast_search` stays off), so they are found on the next query; once they pass `FOLD_FRACTION` of the indexed rows
the next search folds them in with `optimize` (new rows assigned to the trained partitions, no retraining), as
every writer's `Table.finish` does. Tables under `MIN_INDEXED_ROWS` rows get no index under `auto`: LanceDB
searches them flat. Figures: BENCHMARKS.md (search latency, the lance kind).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.store.ann import l2_normalise

if TYPE_CHECKING:
    from cytoretrieve.store.tables import VectorTable

COLUMN = "vector"
NPROBES = 64  # IVF partitions visited per query
# candidates re-ranked on the stored vectors, per neighbour wanted: the 1-bit RQ codes rank coarsely, so recall
# follows this factor, not the partitions visited (benchmarks/lance_probes.py at 10M x 384: 20 -> 0.90, 40 -> 0.97)
REFINE_FACTOR = 40
MIN_INDEXED_ROWS = 5_000  # `auto` builds no index below this: LanceDB's flat search is fast enough there
MIN_TRAIN_ROWS = 256  # fewer rows cannot train the partitions: `index build --kind lance` refuses
FOLD_FRACTION = 0.05  # unindexed rows beyond this x the indexed rows are folded in by the next search
MAX_PARTITIONS = 4096
FEW_QUERIES = 8  # searches of up to this many queries keep their hits' metadata for `row_metadata`
SCALE_SAMPLE = 256  # rows whose nearest neighbour makes the similarity scale (`queries.search`: 2,000 for FAISS)
METADATA_CACHE = 65_536  # hit rows' metadata kept per table (what `row_metadata` answers without a query)
ROW_COLUMNS = ["id", "label", "binary", "path", "group", "slide", "x", "y", "dataset", "tile_size"]
log = logging.getLogger("cytoretrieve")


def partitions(rows: int) -> int:
    """IVF partitions for `rows` rows: sqrt(rows), within 1..MAX_PARTITIONS."""
    return int(min(max(1, round(math.sqrt(max(rows, 1)))), MAX_PARTITIONS))


def vector_index(table: VectorTable) -> Any | None:  # noqa: ANN401 - lancedb's IndexConfig
    """The table's LanceDB index on its vector column, or None."""
    for config in table.tbl.list_indices():
        if list(config.columns) == [COLUMN]:
            return config
    return None


def build(table: VectorTable) -> None:
    """Train and write the table's vector index from all its rows (replacing any earlier one)."""
    from lancedb.index import IvfRq

    n = table.count()
    if n < MIN_TRAIN_ROWS:
        raise CytoError(f"table '{table.name}' has {n} rows: a lance index needs at least {MIN_TRAIN_ROWS} to train "
                        "(smaller tables are searched flat by the `auto` kind)")
    config = IvfRq(distance_type="cosine", num_partitions=partitions(n))
    table._write(lambda: table.tbl.create_index(COLUMN, config=config, replace=True))
    log.info("lance index of table %s built: %d rows, %d partitions", table.name, n, partitions(n))


def fold(table: VectorTable) -> bool:
    """Fold rows appended since the index was built into it (LanceDB's `optimize`: compaction, and new rows
    assigned to the trained partitions); False when it kept losing races to writers or the store is read-only
    (the rows stay searched flat meanwhile)."""
    from cytoretrieve.store.tables import KEEP_VERSIONS

    try:
        table._write(lambda: table.tbl.optimize(cleanup_older_than=KEEP_VERSIONS))
    except (RuntimeError, OSError, ValueError) as e:
        log.warning("lance index of table %s: appended rows not folded in (%s); they are searched flat",
                    table.name, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    return True


def prewarm(table: VectorTable) -> bool:
    """Ask LanceDB to load the table's vector index into its cache (a server's first query then skips the cold
    read); False when the table has none."""
    config = vector_index(table)
    if config is None:
        return False
    table.tbl.prewarm_index(config.name)
    return True


@dataclass
class LanceTableIndex:
    """A table's LanceDB vector index at one table version, with the interface of `store.index.TableIndex`:
    `search`, `stored_vector`, `row_metadata`. Hits' metadata come back with the search (one query) and are kept
    for `row_metadata`."""

    table: VectorTable
    version: int
    rows: int
    indexed: int  # rows in the vector index (0: none, searched flat); the rest are searched flat beside it
    build: str = ""  # the vector index's uuid (new at each build or fold); "" without one
    kind: str = "lance"
    derived: dict[str, Any] = field(default_factory=dict)
    _metadata: OrderedDict[int, dict[str, Any]] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    scale_sample: int = SCALE_SAMPLE  # `queries.search.similarity_scale`: each LanceDB query costs milliseconds

    @property
    def scale_version(self) -> str | int:
        """What `queries.search.similarity_scale` keys a table's similarity scale to: the index build, so that the
        scale's thousands of queries (seconds here) are not repeated at every append (a few appended rows barely
        move the distribution); the table version for a table without an index."""
        return f"lance-{self.build}" if self.build else self.version

    def _query(self, vectors: np.ndarray, k: int, where: str | None) -> Any:  # noqa: ANN401 - a lancedb query
        query = (self.table.tbl.search(vectors, vector_column_name=COLUMN).distance_type("cosine").limit(k)
                 .select(["key", *ROW_COLUMNS, "_distance"]))
        if self.indexed:
            query = query.nprobes(NPROBES).refine_factor(REFINE_FACTOR)
        return query.where(where, prefilter=True) if where else query

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (cosine similarities, keys) of L2-normalised queries, -1 keys where fewer rows match; `allowed`
        restricts hits to these keys (a prefilter)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(min(k, self.rows), 1)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        keys = np.full((len(queries), k), -1, np.int64)
        if allowed is not None and not len(allowed):
            return scores, keys
        where = None if allowed is None else f"key IN ({', '.join(str(int(a)) for a in allowed)})"
        if len(queries) == 1:
            found = self._query(queries[0], k, where).to_arrow()
            at, rank = np.zeros(found.num_rows, np.int64), np.arange(found.num_rows)
        else:  # one LanceDB query for the batch (~3x faster than one each); rows come grouped by query
            found = self._query(queries, k, where).to_arrow()
            at = found.column("query_index").to_numpy().astype(np.int64)
            order = np.lexsort((found.column("_distance").to_numpy(), at))
            found, at = found.take(order), at[order]
            rank = np.arange(len(at)) - np.searchsorted(at, at)
        keys[at, rank] = found.column("key").to_numpy()
        scores[at, rank] = 1.0 - found.column("_distance").to_numpy()
        if len(queries) <= FEW_QUERIES:  # a user's search: its hits' metadata are asked for next
            self._keep(found.select(["key", *ROW_COLUMNS]).to_pylist())
        return scores, keys

    def _keep(self, rows: Sequence[dict[str, Any]]) -> None:
        with self._lock:
            for row in rows:
                self._metadata[int(row.pop("key"))] = row
            while len(self._metadata) > METADATA_CACHE:
                self._metadata.popitem(last=False)

    def stored_vector(self, key: int) -> np.ndarray | None:
        """The L2-normalised stored vector of `key` (its metadata kept for `row_metadata`), or None."""
        found = self.table.read(["key", COLUMN, *ROW_COLUMNS], f"key = {int(key)}")
        if not found.num_rows:
            return None
        self._keep(found.select(["key", *ROW_COLUMNS]).slice(0, 1).to_pylist())
        return l2_normalise(np.asarray(found.column(COLUMN)[0].as_py(), dtype=np.float32))[0]

    def row_metadata(self, keys: Sequence[int]) -> dict[int, dict[str, Any]]:
        """{key: ROW_COLUMNS} of these keys: those of recent hits from memory, the others read from the table."""
        with self._lock:
            out = {int(k): dict(self._metadata[int(k)]) for k in keys if int(k) in self._metadata}
        missing = [int(k) for k in keys if int(k) not in out]
        if missing:
            out.update(self.table.rows_by_keys(missing, ROW_COLUMNS))
        return out


_OPEN: dict[tuple[str, str], LanceTableIndex] = {}
_OPEN_LOCK = threading.Lock()


def forget_loaded() -> None:
    """Drop this process's lance index handles (the next search asks the table afresh)."""
    with _OPEN_LOCK:
        _OPEN.clear()


def table_index(table: VectorTable, rebuild: bool = False, build_below: bool = False) -> LanceTableIndex:
    """The table's lance index at its current version: built when missing (from `MIN_INDEXED_ROWS` rows, or from
    `MIN_TRAIN_ROWS` with `build_below`; `rebuild` retrains it), with appended rows folded in past
    `FOLD_FRACTION`. The handle is kept per table version in this process."""
    where = (table.store.uri, table.name)
    version = table.version
    with _OPEN_LOCK:
        held = _OPEN.get(where)
    if held is not None and held.version == version and not rebuild:
        return held
    rows = table.count()
    if rows == 0:
        raise CytoError(f"table '{table.name}' is empty: embed something into it first")
    config = None if rebuild else vector_index(table)
    if config is None and (rebuild or rows >= (MIN_TRAIN_ROWS if build_below else MIN_INDEXED_ROWS)):
        build(table)
        config = vector_index(table)
    indexed, build_id = 0, ""
    if config is not None:
        stats = table.tbl.index_stats(config.name)
        indexed, unindexed = int(stats.num_indexed_rows), int(stats.num_unindexed_rows)
        if unindexed > FOLD_FRACTION * max(indexed, 1) and fold(table):
            stats = table.tbl.index_stats(config.name)
            indexed = int(stats.num_indexed_rows)
            log.info("lance index of table %s: %d appended rows folded in", table.name, unindexed)
            config = vector_index(table)
        build_id = str(config.index_uuid)
    loaded = LanceTableIndex(table, table.version, rows, indexed, build_id)
    with _OPEN_LOCK:
        _OPEN[where] = loaded
    return loaded
