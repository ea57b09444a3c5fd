"""Every FAISS index of the package: the kinds (a small registry name -> builder), L2 normalisation, exact
neighbours, and the index of a table's vectors cached beside the table and keyed to its version.

Vectors are stored as produced and L2-normalised here, once (`l2_normalise`, for references and queries alike),
so inner product = cosine similarity. A table's index maps FAISS ids to the table's int64 `key` column, so hits
resolve to rows without a side list; other indexes (k-NN protocol, retrieval references) use row positions.
Exact search (flat) by default; IVF, IVF-PQ fast-scan with re-ranking, or HNSW for large sets; on the GPU when
faiss reports one.

`auto` picks a table's kind from its size: flat up to `AUTO_FLAT_MAX` rows, IVFFlat while its float32 vectors fit
`AUTO_COMPRESSED_VALUES`, and above that the compressed `ivfpq` (4-bit PQ fast-scan codes in memory, the short list
of `refine` x k candidates re-ranked on float16 copies, or 8-bit ones from `HIGH_DIM` dimensions): 1.5M x 2048
float32 vectors are 12 GB, their compressed index ~4.6 GB on disk, of which a search process touches a small part.
A table's index is built from streamed batches of the table (never all its vectors at once) and a cached one is
loaded memory-mapped (flat codes, IVF lists and re-ranking codes are paged in as searches touch them), so a fresh
process answers its first query without reading the whole file. Beside it, a mapped rows file (`RowMap`) holds the
rows' metadata for hits, and rows appended since it was written sit in a small side index of the same training
(searched beside it, folded in past `SIDE_FRACTION`), so an append never rewrites the big file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import pyarrow as pa

from cytoretrieve.errors import CytoError
from cytoretrieve.faults import failpoint

if TYPE_CHECKING:
    from cytoretrieve.store.tables import VectorTable

AUTO_FLAT_MAX = 100_000  # above this many rows `auto` builds an IVF index for a table
AUTO_COMPRESSED_VALUES = 1 << 29  # above rows x dim this many float32 values (2 GiB), `auto` builds `ivfpq`
HIGH_DIM = 1024  # from this dimension `ivfpq` re-ranks on 8-bit codes (1 byte / dimension), below on float16
ASSIGN_BUDGET = 1 << 20  # a table index's lists x dimension: the multiply-adds to assign one row to its list
TABLE_MAX_LISTS = 1024  # and at most this many lists (1.5M rows: ~1,500 a list; 2048 lists built 2x slower)
EF_SEARCH = 128  # HNSW candidate list per query
NPROBE = 16  # IVF lists visited per query: recall ~1.0 on clustered embeddings (see STACK.md)
MEMORY_CACHE_TABLES = 4  # indexes kept loaded per process (most recently used); each holds all its vectors
ADD_BATCH = 16_384  # rows normalised and added at once
TRAIN_PER_LIST = 64  # IVF k-means sample: this many rows per list (FAISS's default is 256; 64 loses no recall)
KMEANS_ITERATIONS = 10
TABLE_TRAIN_PER_LIST = 40  # a table index's k-means: fewer rows (FAISS warns below 39) and iterations ...
TABLE_KMEANS_ITERATIONS = 5  # ... recall@10 0.999 at 300k x 384, training ~4x faster than 64 x 10
RETRAIN_GROWTH = 2.0  # an IVF table index is rebuilt (quantiser retrained) once the table has this x its rows
FEW_QUERIES = 8  # IVF searches of up to this many queries run on one thread (see `_one_thread`)
UPDATE_SLICE = 4096  # keys per LanceDB query when an index picks up appended rows
SIDE_FRACTION = 0.05  # appended rows wait in a side index (the main file untouched) up to this x the main's rows
CACHE_FORMAT = 2  # of a table's cache files; a cache of another format is rebuilt
# the metadata of a table's rows kept in a mapped file beside its index: what a search hit shows
ROW_COLUMNS = ["id", "label", "binary", "path", "group", "slide", "x", "y", "dataset", "tile_size"]
log = logging.getLogger("cytoretrieve")


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation to float32 (zero rows stay zero): the one place vectors get normalised."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def auto_nlist(n: int) -> int:
    """IVF lists for `n` rows: the power of two nearest 2 sqrt(n), within 16-4096 and >= 39 rows per list
    (370k rows: 1024 lists)."""
    nlist = 2 ** round(math.log2(max(2 * math.sqrt(max(n, 1)), 1)))
    return int(max(1, min(max(16, min(nlist, 4096)), n // 39)))


def table_nlist(n: int, dim: int) -> int:
    """IVF lists of a table's index: `auto_nlist(n)`, capped so that assigning a row to its list costs at most
    `ASSIGN_BUDGET` multiply-adds and at most `TABLE_MAX_LISTS` (1024 lists at 384-d, 512 at 2048-d): a build's
    time is dominated by that assignment (1.5M x 2048 lists x 2048-d is 6.4e12 multiply-adds, ~30 min on two
    cores)."""
    cap = min(2 ** int(math.log2(max(ASSIGN_BUDGET // max(dim, 1), 16))), TABLE_MAX_LISTS)
    return min(auto_nlist(n), cap)


def _refine_codec(dim: int) -> str:
    """The re-ranking codes of `ivfpq`: float16 (exact to ~1e-4), 8-bit per dimension from `HIGH_DIM` dimensions
    (half the bytes: 1.5M x 2048 re-ranking codes are 3 GB instead of 6)."""
    return "SQ8" if dim >= HIGH_DIM else "SQfp16"


def _pq_m(dim: int) -> int:
    """PQ sub-quantizers: 2 dimensions each (1 for an odd dimension). 4 dimensions each scan faster but need ~3x the
    re-ranked candidates for the same recall, which costs more than it saves."""
    return dim // 2 if dim % 2 == 0 else dim


@dataclass(frozen=True)
class IndexParams:
    """Settings of the approximate kinds (ignored by `flat`)."""

    nlist: int = 0  # IVF lists; 0: auto_nlist(rows)
    nprobe: int = NPROBE
    refine: int = 12  # ivfpq: candidates re-ranked (exact, float16 copies) per neighbour wanted
    seed: int = 0  # of the IVF training sample and k-means
    niter: int = KMEANS_ITERATIONS  # k-means iterations of the IVF quantiser
    train_per_list: int = TRAIN_PER_LIST  # training rows per IVF list


def _flat(dim: int, n: int, p: IndexParams) -> faiss.Index:
    return faiss.IndexFlatIP(dim)


def _hnsw(dim: int, n: int, p: IndexParams) -> faiss.Index:
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = EF_SEARCH
    return index


def _ivf_factory(spec: Callable[[int, int], str]) -> Callable[[int, int, IndexParams], faiss.Index]:
    def make(dim: int, n: int, p: IndexParams) -> faiss.Index:
        nlist = min(p.nlist, max(1, n // 39)) if p.nlist else auto_nlist(n)
        index = faiss.index_factory(dim, spec(dim, nlist), faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = p.niter
        ivf.cp.max_points_per_centroid = p.train_per_list
        ivf.cp.seed = p.seed
        ivf.nprobe = min(p.nprobe, nlist)
        if isinstance(index, faiss.IndexRefine):
            index.k_factor = float(p.refine)
        return index

    return make


# name -> builder of an untrained, empty inner-product index for (dim, rows, params)
KINDS: dict[str, Callable[[int, int, IndexParams], faiss.Index]] = {
    "flat": _flat,
    "ivf": _ivf_factory(lambda d, nlist: f"IVF{nlist},Flat"),
    "ivfpq": _ivf_factory(lambda d, nlist: f"IVF{nlist},PQ{_pq_m(d)}x4fs,Refine({_refine_codec(d)})"),
    "hnsw": _hnsw,
}


def chunk_sizes(chunks: Sequence[np.ndarray]) -> list[int]:
    """Rows of each chunk."""
    sizes = getattr(chunks, "sizes", None)  # a lazy sequence of bags tells its sizes without reading them
    return sizes() if callable(sizes) else [len(c) for c in chunks]


def sample_rows(chunks: Sequence[np.ndarray], sizes: list[int], n: int, seed: int) -> np.ndarray:
    """`n` L2-normalised rows drawn uniformly (without replacement) from the chunks, reading only chunks that hold
    one: a training sample (IVF quantisers here, k-means of retrieval references)."""
    return sample_positions(chunks, sizes, n, seed)[0]


def sample_positions(chunks: Sequence[np.ndarray], sizes: list[int], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`sample_rows` and the rows' positions in chunk order (ascending)."""
    pick = draw_positions(sum(sizes), n, seed)
    rows = ChunkRows(chunks, sizes, pick)
    return l2_normalise(np.concatenate([rows[i] for i, m in enumerate(rows.sizes()) if m])), pick


def draw_positions(total: int, n: int, seed: int) -> np.ndarray:
    """`n` of the positions 0..total-1 (all when n >= total), drawn uniformly without replacement, ascending."""
    return np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))


class ChunkRows(Sequence):
    """The rows at positions `keep` (ascending, in chunk order) of a sequence of chunks, chunk by chunk: a sample of
    a reference set that is never one array (chunks may be bags read from the table on `[i]`)."""

    def __init__(self, chunks: Sequence[np.ndarray], sizes: list[int], keep: np.ndarray) -> None:
        bounds = np.r_[0, np.cumsum(sizes)]
        starts, ends = np.searchsorted(keep, bounds[:-1]), np.searchsorted(keep, bounds[1:])
        self.chunks, self.parts = chunks, [keep[a:b] - bounds[i] for i, (a, b) in enumerate(zip(starts, ends))]

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        part = self.parts[i]  # first: an index past the end is an IndexError whatever the chunks are
        return np.asarray(self.chunks[i])[part]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self.parts)))

    def sizes(self) -> list[int]:
        return [len(p) for p in self.parts]


def _new_index(kind: str, dim: int, n: int, params: IndexParams) -> tuple[faiss.Index, dict[str, Any], int]:
    """An empty, untrained index of `kind` for `n` rows, its description, and the rows its training wants (0: no
    training). Unknown kinds and empty sets are user errors."""
    if kind not in KINDS:
        raise CytoError(f"unknown index kind '{kind}' (one of {', '.join(['auto', *KINDS])})")
    if n == 0:
        raise CytoError("cannot index an empty set of vectors")
    index = KINDS[kind](dim, n, params)
    info: dict[str, Any] = {"kind": kind, "rows": n}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return index, info, 0
    info.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))
    if isinstance(index, faiss.IndexRefine):
        info["refine"] = params.refine
    return index, info, max(params.train_per_list * ivf.nlist, 10_000)


@contextmanager
def _one_thread(when: bool = True) -> Iterator[None]:
    """FAISS on one OpenMP thread (of the calling thread only: OpenMP keeps the count per thread) where its
    parallel regions are too short to pay: on a busy machine a waiting OpenMP thread spins for a core it does not
    get. On a loaded 2-core machine this made short IVF-PQ searches and PQ training (many tiny k-means) many
    times faster (BENCHMARKS.md, issue 13: the build and first-search rows before/after)."""
    threads = faiss.omp_get_max_threads()
    if when:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def _train(index: faiss.Index, sample: np.ndarray) -> None:
    """Train on one thread (`_one_thread`; the coarse k-means loses at most ~2x on an idle machine)."""
    with _one_thread():
        index.train(sample)


def _with_ids(index: faiss.Index) -> faiss.Index:
    """An index that takes ids: IVF takes them as is, flat and HNSW sit in an IDMap2 (its key -> row map is
    rebuilt on every load: cheap below `AUTO_FLAT_MAX` rows), IVF-PQ + re-ranking in a plain IDMap (1.5M keys
    took ~2 s to rehash on load; `TableIndex.stored_vector` finds a key's row in a sorted copy instead)."""
    if isinstance(index, faiss.IndexIVF):
        return index
    return faiss.IndexIDMap(index) if isinstance(index, faiss.IndexRefine) else faiss.IndexIDMap2(index)


def _add(index: faiss.Index, x: np.ndarray, ids: np.ndarray | None) -> None:
    """Add the L2-normalised rows of `x` in `ADD_BATCH` batches, with `ids` (int64) or none."""
    for b in range(0, len(x), ADD_BATCH):
        part = l2_normalise(np.asarray(x[b:b + ADD_BATCH]))
        if ids is None:
            index.add(part)
        else:
            index.add_with_ids(part, np.ascontiguousarray(ids[b:b + len(part)], dtype=np.int64))


def build_index(chunks: np.ndarray | Sequence[np.ndarray], kind: str, params: IndexParams = IndexParams(),
                ids: np.ndarray | None = None) -> tuple[faiss.Index, dict[str, Any]]:
    """An index of the L2-normalised rows of `chunks` (one array or a sequence of arrays, added in batches: no
    concatenated copy) and a description of it. Ids are `ids` (int64) or row positions in chunk order. IVF kinds
    train on a sample sized to their list count, not on every row."""
    chunks = [chunks] if isinstance(chunks, np.ndarray) else chunks
    sizes = chunk_sizes(chunks)
    n = int(sum(sizes))
    dim = int(np.asarray(chunks[next(i for i, s in enumerate(sizes) if s)]).shape[1]) if n else 0
    index, info, train_rows = _new_index(kind, dim, n, params)
    if train_rows:
        _train(index, sample_rows(chunks, sizes, train_rows, params.seed))
    if ids is not None:
        index = _with_ids(index)
    a = 0
    for c in chunks:
        _add(index, c, None if ids is None else ids[a:a + len(c)])
        a += len(c)
    return (index if ids is None else _with_key_map(index)), info


def exact_neighbours(references: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product neighbours of already-normalised rows: (similarities, row indices), best first."""
    index = KINDS["flat"](references.shape[1], len(references), IndexParams())
    index.add(np.ascontiguousarray(references, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def gpu_available() -> bool:
    """True when the installed faiss is a GPU build and sees a GPU (faiss-gpu imports fine without one)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


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
        at = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
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
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) and len(keys):
        ids = faiss.vector_to_array(index.id_map)
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

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, keys) for L2-normalised queries; `allowed` restricts hits to these keys. With a side
        index, both are searched and the hits merged by score (both score on the same codes)."""
        k = min(k, self.rows)
        with _one_thread(len(queries) <= FEW_QUERIES and self.kind in ("ivf", "ivfpq")):
            found = _search(self.index, self.kind, queries, min(k, max(int(self.index.ntotal), 1)), allowed)
            if self.side is None or not self.side.ntotal:
                return found
            return _merge(found, _search(self.side, self.kind, queries, min(k, int(self.side.ntotal)), allowed), k)

    def stored_vector(self, key: int) -> np.ndarray | None:
        """The L2-normalised vector stored under `key`, or None when the key is not in the index or this index
        cannot look vectors up by key (a GPU copy, an IVF index without its key map). IVF-PQ + re-ranking returns
        its re-ranking copy (float16, or 8-bit from `HIGH_DIM` dimensions)."""
        if self.side is not None:
            vector = _stored(self.side, self.side_rows, int(key), {})
            if vector is not None:
                return vector
        return _stored(self.index, self.row_map, int(key), self.derived)

    def row_metadata(self, keys: Sequence[int]) -> dict[int, dict[str, Any]] | None:
        """{key: ROW_COLUMNS} of the rows with these keys (from the mapped rows files), or None when this index
        keeps no row map (the caller asks the table)."""
        if self.row_map is None:
            return None
        out = self.row_map.lookup(keys)
        if self.side_rows is not None and len(out) < len(keys):
            out.update(self.side_rows.lookup([k for k in keys if k not in out]))
        return out


def _search(index: faiss.Index, kind: str, queries: np.ndarray, k: int,
            allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if allowed is None:
        return index.search(queries, k)
    if _refined(index):
        return _search_refined(index, queries, k, allowed)
    sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
    return index.search(queries, k, params=_search_params(kind, sel))


def _merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k of two (scores, keys) results per query, best first (missing hits, key -1, last)."""
    scores, keys = np.hstack([a[0], b[0]]), np.hstack([a[1], b[1]])
    order = np.argsort(-np.where(keys != -1, scores, -np.inf), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(keys, order, 1)


def _stored(index: faiss.Index, rows: RowMap | None, key: int, derived: dict[str, Any]) -> np.ndarray | None:
    """The vector `index` stores under `key` (see `TableIndex.stored_vector`)."""
    if _refined(index):
        row = rows.position(key) if rows is not None else _row_of(index, key, derived)
        return None if row is None else faiss.downcast_index(index.index).reconstruct(row)
    try:
        return index.reconstruct(key)
    except (RuntimeError, TypeError):
        return None


def _row_of(index: faiss.Index, key: int, derived: dict[str, Any]) -> int | None:
    """The row of `key` in an id-mapped index without a row map, from a sorted copy of its keys made on first
    use and kept with the index."""
    if "key_order" not in derived:
        keys = faiss.vector_to_array(index.id_map)
        order = np.argsort(keys, kind="stable")
        derived["key_order"] = (keys[order], order)
    sorted_keys, order = derived["key_order"]
    at = int(np.searchsorted(sorted_keys, key))
    return int(order[at]) if at < len(sorted_keys) and sorted_keys[at] == key else None


def _search_params(kind: str, sel: faiss.IDSelector) -> faiss.SearchParameters:
    if kind == "ivf":
        return faiss.SearchParametersIVF(sel=sel, nprobe=NPROBE)
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(sel=sel, efSearch=EF_SEARCH)
    return faiss.SearchParameters(sel=sel)


def _refined(index: faiss.Index) -> bool:
    """An id map around IVF-PQ + re-ranking (the `ivfpq` kind of a table)."""
    return isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) and isinstance(
        faiss.downcast_index(index.index), faiss.IndexRefine)


def _search_refined(index: faiss.Index, queries: np.ndarray, k: int,
                    allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A filtered search of an id map around IVF-PQ + re-ranking: FAISS's id map translates a selector for the
    index it wraps, but the re-ranking index does not pass it on to its IVF, so the allowed keys are translated
    to row positions here and given to the IVF search directly."""
    keys = faiss.vector_to_array(index.id_map)
    positions = np.flatnonzero(np.isin(keys, np.asarray(allowed, dtype=np.int64))).astype(np.int64)
    refine = faiss.downcast_index(index.index)
    ivf = faiss.extract_index_ivf(refine)
    params = faiss.IndexRefineSearchParameters(k_factor=refine.k_factor, base_index_params=faiss.SearchParametersIVF(
        sel=faiss.IDSelectorBatch(positions), nprobe=ivf.nprobe))
    scores, rows = refine.search(queries, k, params=params)
    return scores, np.where(rows >= 0, keys[np.maximum(rows, 0)], -1)


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


def _table_params(n: int, dim: int) -> IndexParams:
    return IndexParams(nlist=table_nlist(n, dim), niter=TABLE_KMEANS_ITERATIONS, train_per_list=TABLE_TRAIN_PER_LIST)


def build(vectors: np.ndarray, keys: np.ndarray, kind: str = "auto") -> tuple[faiss.Index, str]:
    """A table's index of `vectors` with ids `keys` (`auto`: by rows x dimension, see `_auto_kind`)."""
    n, dim = vectors.shape
    if kind == "auto":
        kind = _auto_kind(n, dim)
    index, info = build_index(vectors, kind, _table_params(n, dim), ids=keys)
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
    return l2_normalise(np.concatenate(parts))


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
    kind = _auto_kind(n, dim) if kind == "auto" else kind
    params = _table_params(n, dim)
    index, _, train_rows = _new_index(kind, dim, n, params)
    if train_rows:
        _train(index, _table_sample(table, n, train_rows, params.seed))
    trained = faiss.serialize_index(index)
    index = _with_ids(index)
    meta = []
    for batch in table.scan(["key", "vector", *ROW_COLUMNS]):
        vec = batch.column("vector")
        _add(index, vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), dim),
             batch.column("key").to_numpy())
        # a copy, holding none of the batch's buffers (slices of them kept every vector: +2.2 GB at 1.5M x 384)
        meta.append(batch.select(["key", *ROW_COLUMNS]).take(np.arange(batch.num_rows)))
    return _Built(_with_key_map(index), kind, trained, _row_table(pa.Table.from_batches(meta), index))


def _with_key_map(index: faiss.Index) -> faiss.Index:
    """An IVF index gets a key -> vector map, for `stored_vector` (one built or cached without it; flat and HNSW
    sit in an IndexIDMap2)."""
    if isinstance(index, faiss.IndexIVF) and index.direct_map.type == faiss.DirectMap.NoMap:
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def to_gpu(index: faiss.Index | None) -> faiss.Index | None:
    """Move a flat or IVF index to GPU 0 when one is there; HNSW and IVF-PQ + re-ranking stay on the CPU (faiss has
    no GPU HNSW, nor a GPU copy of fast-scan codes inside a re-ranking index)."""
    if index is None or not gpu_available() or _refined(index) or isinstance(index, faiss.IndexIDMap2) and isinstance(
        faiss.downcast_index(index.index), faiss.IndexHNSWFlat
    ):
        return index
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


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
    with _LOADED_LOCK:
        _LOADED.clear()


def _remember(paths: _Paths, loaded: TableIndex) -> TableIndex:
    stamp = _meta_stamp(paths)
    if stamp is not None:
        with _LOADED_LOCK:
            _LOADED[str(paths.index)] = (stamp, loaded)
            _LOADED.move_to_end(str(paths.index))
            while len(_LOADED) > MEMORY_CACHE_TABLES:
                _LOADED.popitem(last=False)
    return loaded


def _index_keys(index: faiss.Index) -> np.ndarray:
    """Every key a table index holds (from its id map, or from an IVF index's inverted lists)."""
    if isinstance(index, faiss.IndexIDMap2) or isinstance(index, faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
             for i in range(ivf.nlist) if lists.list_size(i)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


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

    It is memory-mapped (`IO_FLAG_MMAP_IFC`: flat codes, IVF lists, re-ranking codes stay in the file's pages
    until a search touches them), or read into memory (`mapped` False) to be added to (FAISS aborts the process
    on adding to a mapped index). Cache files are replaced by rename, never rewritten in place, so a mapped file
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
        index = _with_key_map(faiss.read_index(str(paths.index), faiss.IO_FLAG_MMAP_IFC if mapped else 0))
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
        if index.ntotal != int(meta["rows"]) or not np.array_equal(np.sort(_index_keys(index)), rows.keys):
            raise ValueError(f"its index and rows file do not hold the same {meta['rows']} rows")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pa.ArrowException) as e:
        _damaged(table, "side index", e)
        return None
    return _Cached(meta, _with_key_map(index), rows)


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
                 trained: np.ndarray | None = None) -> None:
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


def _write_side(table: VectorTable, paths: _Paths, index: faiss.Index, rows: pa.Table,
                meta: dict[str, Any]) -> None:
    """Write the side index and its rows file, then its .json (as `_write_cache` does for the main one)."""
    sizes = {"rows_bytes": _write_rows(paths.side_rows, rows)}
    sizes["bytes"] = _replace(paths.side, lambda tmp: faiss.write_index(index, str(tmp)))
    failpoint("side-written")
    meta = {**meta, **sizes, "table": table.name, "rows": int(index.ntotal)}
    _replace(paths.side_meta, lambda tmp: tmp.write_text(json.dumps(meta)))


def _rows_by_keys(table: VectorTable, keys: np.ndarray) -> tuple[np.ndarray, pa.Table]:
    """(vectors, key + ROW_COLUMNS) of the rows with these keys, read by the table's key index in slices."""
    vecs, meta = [np.zeros((0, table.dim), np.float32)], []
    for a in range(0, len(keys), UPDATE_SLICE):
        part = ", ".join(str(int(k)) for k in keys[a:a + UPDATE_SLICE])
        v, m = table.vectors(["key", *ROW_COLUMNS], where=f"key IN ({part})")
        vecs.append(v)
        meta.append(m)
    return np.concatenate(vecs), pa.concat_tables(meta)


def _update(table: VectorTable, meta: dict[str, Any], index: faiss.Index) -> faiss.Index | None:
    """The cached index brought up to the table's rows (new keys added, gone keys removed), or None when a fresh
    build is due: rows were deleted from a kind that cannot remove them (HNSW, IVF-PQ)."""
    keys = table.read(["key"]).column("key").to_numpy().astype(np.int64)
    held = _index_keys(index)
    new, gone = np.setdiff1d(keys, held), np.setdiff1d(held, keys)
    if len(gone):
        if meta["kind"] in ("hnsw", "ivfpq"):  # FAISS cannot remove rows from these (the re-ranking index of ivfpq)
            return None
        gone = np.ascontiguousarray(gone, dtype=np.int64)
        index.remove_ids(faiss.IDSelectorArray(len(gone), faiss.swig_ptr(gone)))  # what a hashtable key map takes
    if len(new):
        vectors, got = _rows_by_keys(table, new)
        index.add_with_ids(l2_normalise(vectors), np.ascontiguousarray(got.column("key").to_numpy(), np.int64))
    log.info("index of table %s updated: %d rows added, %d removed", table.name, len(new), len(gone))
    return index


def _auto_kind(rows: int, dim: int) -> str:
    """flat up to `AUTO_FLAT_MAX` rows, IVFFlat up to `AUTO_COMPRESSED_VALUES` float32 values, else `ivfpq`."""
    if rows <= AUTO_FLAT_MAX:
        return "flat"
    return "ivf" if rows * dim <= AUTO_COMPRESSED_VALUES else "ivfpq"


def _fold(table: VectorTable, paths: _Paths, meta: dict[str, Any], version: int) -> TableIndex | None:
    """The main index read into memory, brought up to the table (side rows and new ones added, deleted ones
    removed) and rewritten, the side index dropped; None when a fresh build is due."""
    index = _update(table, meta, _with_key_map(faiss.read_index(str(paths.index))))
    if index is None:
        return None
    meta = {k: v for k, v in meta.items() if k in ("kind", "auto", "trained_rows", "trained_bytes")}
    rows = _row_table(table.read(["key", *ROW_COLUMNS]), index)
    _write_cache(table, paths, index, rows, {**meta, "version": version})
    return TableIndex(to_gpu(index), meta["kind"], version, int(index.ntotal), row_map=RowMap(rows))


def _catch_up(table: VectorTable, paths: _Paths, main: _Cached, side: _Cached | None,
              version: int) -> TableIndex | None:
    """The cached index brought to the table's current version, or None when a fresh build is due (the kind
    `auto` would pick has changed, or an IVF table has outgrown its quantiser: `RETRAIN_GROWTH` x the rows it was
    trained on). Appended rows go to the side index (the main file is not rewritten) until they are
    `SIDE_FRACTION` of the main rows; then, or when rows were deleted from the main index, it is folded."""
    keys = table.read(["key"]).column("key").to_numpy().astype(np.int64)
    kind, rows = main.meta["kind"], len(keys)
    if main.meta.get("auto") and kind != _auto_kind(rows, table.dim):
        return None
    if kind in ("ivf", "ivfpq") and rows > RETRAIN_GROWTH * int(main.meta.get("trained_rows", main.meta["rows"])):
        return None
    in_main = main.rows.find(keys)[0]
    extra = keys[~in_main]
    if int(in_main.sum()) < len(main.rows) or len(extra) > SIDE_FRACTION * len(main.rows):
        return _fold(table, paths, main.meta, version)
    if not len(extra):  # no rows beyond the main index's (a compaction or a deleted side row moved the version)
        _replace(paths.meta, lambda tmp: tmp.write_text(json.dumps({**main.meta, "version": version})))
        paths.side_meta.unlink(missing_ok=True)
        return _loaded(main, None, version)
    kept = side is not None and int(side.rows.find(extra)[0].sum()) == len(side.rows)
    new = extra[~side.rows.find(extra)[0]] if kept else extra
    if kept and not len(new):  # the side index still holds exactly the appended rows
        _replace(paths.side_meta, lambda tmp: tmp.write_text(json.dumps({**side.meta, "version": version})))
        return _loaded(main, side, version)
    if kept:
        index, held = side.index, side.rows.table.select(["key", *ROW_COLUMNS])
    else:  # none yet, or some of its rows were deleted: a fresh one of all rows the main index does not hold
        index, held = _with_ids(faiss.deserialize_index(np.fromfile(paths.trained, dtype=np.uint8))), None
    vectors, meta = _rows_by_keys(table, new)
    _add(index, vectors, meta.column("key").to_numpy())
    rows_table = _row_table(meta if held is None else pa.concat_tables([held, meta]), index)
    _write_side(table, paths, index, rows_table, {"main": main.meta["build"], "version": version})
    log.info("index of table %s: %d appended rows in its side index", table.name, index.ntotal)
    return _loaded(main, _Cached({}, _with_key_map(index), RowMap(rows_table)), version)


def _loaded(main: _Cached, side: _Cached | None, version: int) -> TableIndex:
    side_index = None if side is None or not side.index.ntotal else side.index
    return TableIndex(to_gpu(main.index), main.meta["kind"], version,
                      int(main.index.ntotal) + (0 if side_index is None else int(side_index.ntotal)),
                      row_map=main.rows, side=to_gpu(side_index), side_rows=None if side is None else side.rows)


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


def table_index(table: VectorTable, kind: str = "auto", rebuild: bool = False) -> TableIndex:
    """The index of the table's current version: from memory (loaded earlier in this process), loaded from the
    cache files, caught up from an older cache (appended rows put in the side index, or folded into the main one
    with deleted rows removed), or built and cached.

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
    cached = None if rebuild else _from_cache(table, paths, kind, version)
    if cached is not None:
        return _remember(paths, cached)
    built = build_table(table, kind)
    rows = int(built.index.ntotal)
    meta = {"version": version, "kind": built.kind, "auto": kind == "auto", "trained_rows": rows}
    _write_cache(table, paths, built.index, built.rows, meta, built.trained)
    loaded = TableIndex(to_gpu(built.index), built.kind, version, rows, row_map=RowMap(built.rows))
    return _remember(paths, loaded)
