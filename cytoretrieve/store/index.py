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
process answers its first query without reading the whole file.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.faults import failpoint

if TYPE_CHECKING:
    from cytoretrieve.store.tables import VectorTable

AUTO_FLAT_MAX = 100_000  # above this many rows `auto` builds an IVF index for a table
AUTO_COMPRESSED_VALUES = 1 << 29  # above rows x dim this many float32 values (2 GiB), `auto` builds `ivfpq`
HIGH_DIM = 1024  # from this dimension `ivfpq` re-ranks on 8-bit codes (1 byte / dimension), below on float16
ASSIGN_BUDGET = 1 << 20  # a table index's lists x dimension: the multiply-adds to assign one row to its list
EF_SEARCH = 128  # HNSW candidate list per query
NPROBE = 16  # IVF lists visited per query: recall ~1.0 on clustered embeddings (see STACK.md)
MEMORY_CACHE_TABLES = 4  # indexes kept loaded per process (most recently used); each holds all its vectors
ADD_BATCH = 16_384  # rows normalised and added at once
TRAIN_PER_LIST = 64  # IVF k-means sample: this many rows per list (FAISS's default is 256; 64 loses no recall)
KMEANS_ITERATIONS = 10
RETRAIN_GROWTH = 2.0  # an IVF table index is rebuilt (quantiser retrained) once the table has this x its rows
UPDATE_SLICE = 4096  # keys per LanceDB query when an index picks up appended rows
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
    `ASSIGN_BUDGET` multiply-adds (2048 lists at 384-d, 512 at 2048-d): a build's time is dominated by that
    assignment (1.5M x 2048 lists x 2048-d is 6.4e12 multiply-adds, ~30 min on two cores)."""
    cap = 2 ** int(math.log2(max(ASSIGN_BUDGET // max(dim, 1), 16)))
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
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf.cp.max_points_per_centroid = TRAIN_PER_LIST
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


def _rows(chunks: Sequence[np.ndarray]) -> list[int]:
    sizes = getattr(chunks, "sizes", None)  # a lazy sequence of bags tells its sizes without reading them
    return sizes() if callable(sizes) else [len(c) for c in chunks]


def _sample(chunks: Sequence[np.ndarray], sizes: list[int], n: int, seed: int) -> np.ndarray:
    """`n` rows drawn uniformly (without replacement) from the chunks, reading only chunks that hold one."""
    total = sum(sizes)
    pick = np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))
    bounds = np.r_[0, np.cumsum(sizes)]
    parts = []
    for i in range(len(sizes)):
        a, b = np.searchsorted(pick, [bounds[i], bounds[i + 1]])
        if b > a:
            parts.append(np.asarray(chunks[i])[pick[a:b] - bounds[i]])
    return l2_normalise(np.concatenate(parts))


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
    return index, info, max(TRAIN_PER_LIST * ivf.nlist, 10_000)


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
    sizes = _rows(chunks)
    n = int(sum(sizes))
    dim = int(np.asarray(chunks[next(i for i, s in enumerate(sizes) if s)]).shape[1]) if n else 0
    index, info, train_rows = _new_index(kind, dim, n, params)
    if train_rows:
        index.train(_sample(chunks, sizes, train_rows, params.seed))
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


@dataclass
class TableIndex:
    """A FAISS index of one table version; `index` ids are the table's `key` column."""

    index: faiss.Index
    kind: str
    version: int
    rows: int
    derived: dict[str, Any] = field(default_factory=dict)  # data of this table version kept as long as the index

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, keys) for L2-normalised queries; `allowed` restricts hits to these keys."""
        k = min(k, self.rows)
        if allowed is None:
            return self.index.search(queries, k)
        if _refined(self.index):
            return _search_refined(self.index, queries, k, allowed)
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
        return self.index.search(queries, k, params=_search_params(self.kind, sel))

    def stored_vector(self, key: int) -> np.ndarray | None:
        """The L2-normalised vector stored under `key`, or None when the key is not in the index or this index
        cannot look vectors up by key (a GPU copy, an IVF index without its key map). IVF-PQ + re-ranking returns
        its re-ranking copy (float16, or 8-bit from `HIGH_DIM` dimensions)."""
        if _refined(self.index):
            row = self._row_of(int(key))
            return None if row is None else faiss.downcast_index(self.index.index).reconstruct(row)
        try:
            return self.index.reconstruct(int(key))
        except (RuntimeError, TypeError):
            return None

    def _row_of(self, key: int) -> int | None:
        """The row of `key` in an id-mapped index, from a sorted copy of its keys made on first use (~0.2 s for
        1.5M keys, kept with the index)."""
        if "key_order" not in self.derived:
            keys = faiss.vector_to_array(self.index.id_map)
            order = np.argsort(keys, kind="stable")
            self.derived["key_order"] = (keys[order], order)
        sorted_keys, order = self.derived["key_order"]
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


def _paths(table: VectorTable) -> tuple[Path, Path]:
    base = table.store.index_dir() / table.name
    return base.with_suffix(".faiss"), base.with_suffix(".faiss.json")


def build(vectors: np.ndarray, keys: np.ndarray, kind: str = "auto") -> tuple[faiss.Index, str]:
    """A table's index of `vectors` with ids `keys` (`auto`: by rows x dimension, see `_auto_kind`)."""
    n, dim = vectors.shape
    if kind == "auto":
        kind = _auto_kind(n, dim)
    index, info = build_index(vectors, kind, IndexParams(nlist=table_nlist(n, dim)), ids=keys)
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


def build_table(table: VectorTable, kind: str = "auto") -> tuple[faiss.Index, str, int]:
    """(index, kind, rows) of the table's vectors, streamed: one scan for the training sample (IVF kinds), one to
    add the rows batch by batch, so that memory holds the index and one batch, never all the vectors."""
    n, dim = table.count(), table.dim
    if n == 0:
        raise CytoError(f"table '{table.name}' is empty: embed something into it first")
    kind = _auto_kind(n, dim) if kind == "auto" else kind
    params = IndexParams(nlist=table_nlist(n, dim))
    index, _, train_rows = _new_index(kind, dim, n, params)
    if train_rows:
        index.train(_table_sample(table, n, train_rows, params.seed))
    index = _with_ids(index)
    for batch in table.scan(["key", "vector"]):
        vec = batch.column("vector")
        _add(index, vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), dim),
             batch.column("key").to_numpy())
    return _with_key_map(index), kind, int(index.ntotal)


def _with_key_map(index: faiss.Index) -> faiss.Index:
    """An IVF index gets a key -> vector map, for `stored_vector` (one built or cached without it; flat and HNSW
    sit in an IndexIDMap2)."""
    if isinstance(index, faiss.IndexIVF) and index.direct_map.type == faiss.DirectMap.NoMap:
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def to_gpu(index: faiss.Index) -> faiss.Index:
    """Move a flat or IVF index to GPU 0 when one is there; HNSW and IVF-PQ + re-ranking stay on the CPU (faiss has
    no GPU HNSW, nor a GPU copy of fast-scan codes inside a re-ranking index)."""
    if not gpu_available() or _refined(index) or isinstance(index, faiss.IndexIDMap2) and isinstance(
        faiss.downcast_index(index.index), faiss.IndexHNSWFlat
    ):
        return index
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


# Loaded indexes of this process: {index file: (stat of its .json when loaded, index)}. Reading a 200k x 384 IVF
# index back from disk takes ~0.1 s (far more at 2048-d), which every search in a long-lived process paid.
_LOADED: OrderedDict[str, tuple[tuple[int, int], TableIndex]] = OrderedDict()
_LOADED_LOCK = threading.Lock()  # searches may run in several threads of one process


def _meta_stamp(meta_path: Path) -> tuple[int, int] | None:
    """(mtime_ns, size) of the index's .json, which is written last: it changes whenever the index is rebuilt."""
    try:
        st = meta_path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def forget_loaded() -> None:
    """Drop the indexes this process holds in memory (frees their RAM; the next search reloads the cache file)."""
    with _LOADED_LOCK:
        _LOADED.clear()


def _remember(index_path: Path, meta_path: Path, loaded: TableIndex) -> TableIndex:
    stamp = _meta_stamp(meta_path)
    if stamp is not None:
        with _LOADED_LOCK:
            _LOADED[str(index_path)] = (stamp, loaded)
            _LOADED.move_to_end(str(index_path))
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


def _read_cache(table: VectorTable, index_path: Path, meta_path: Path) -> tuple[dict[str, Any], faiss.Index] | None:
    """The cached index and its .json, or None when there is none or it cannot be trusted (truncated, foreign,
    not the file its .json describes): a cache is disposable, so a damaged one is rebuilt with a warning.

    A cache of the table's current version is only searched: it is memory-mapped (`IO_FLAG_MMAP_IFC`: flat
    codes, IVF lists, re-ranking codes stay in the file's pages until a search touches them). One that is about
    to be updated is read into memory (FAISS aborts the process on adding to a mapped index). Cache files are
    replaced by rename, never rewritten in place, so a mapped file stays valid while another process updates it.
    """
    if not meta_path.exists() or not index_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("table") != table.name:
            raise ValueError(f"it belongs to table {meta.get('table')!r}")
        if "bytes" in meta and index_path.stat().st_size != meta["bytes"]:
            raise ValueError(f"its file has {index_path.stat().st_size} bytes, its .json says {meta['bytes']}")
        flags = faiss.IO_FLAG_MMAP_IFC if meta.get("version") == table.version else 0
        index = _with_key_map(faiss.read_index(str(index_path), flags))
        if index.ntotal != int(meta["rows"]):
            raise ValueError(f"it holds {index.ntotal} rows, its .json says {meta['rows']}")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        log.warning("index cache of table %s is damaged (%s): rebuilding it", table.name,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    return meta, index


def _write_cache(table: VectorTable, index_path: Path, meta_path: Path, index: faiss.Index,
                 meta: dict[str, Any]) -> None:
    """Write the index, then its .json (each to a temporary file renamed into place: a kill leaves the old pair
    or a pair whose .json does not describe the new file, which `_read_cache` refuses)."""
    tmp = index_path.with_suffix(".faiss.tmp")
    faiss.write_index(index, str(tmp))
    failpoint("index-written")
    tmp.replace(index_path)
    meta = {**meta, "table": table.name, "rows": int(index.ntotal), "bytes": index_path.stat().st_size}
    tmp_meta = meta_path.with_suffix(".json.tmp")
    tmp_meta.write_text(json.dumps(meta))
    tmp_meta.replace(meta_path)


def _rows_by_keys(table: VectorTable, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, keys) of the rows with these keys, read by the table's key index in slices."""
    vecs, got = [np.zeros((0, table.dim), np.float32)], [np.zeros(0, np.int64)]
    for a in range(0, len(keys), UPDATE_SLICE):
        part = ", ".join(str(int(k)) for k in keys[a:a + UPDATE_SLICE])
        v, meta = table.vectors(["key"], where=f"key IN ({part})")
        vecs.append(v)
        got.append(meta.column("key").to_numpy().astype(np.int64))
    return np.concatenate(vecs), np.concatenate(got)


def _update(table: VectorTable, meta: dict[str, Any], index: faiss.Index) -> faiss.Index | None:
    """The cached index brought up to the table's rows (new keys added, gone keys removed), or None when a fresh
    build is due: the kind `auto` would pick has changed, an IVF table has outgrown its quantiser (`RETRAIN_GROWTH`
    x the rows it was trained on), or rows were deleted from a kind that cannot remove them (HNSW, IVF-PQ)."""
    keys = table.read(["key"]).column("key").to_numpy().astype(np.int64)
    held = _index_keys(index)
    new, gone = np.setdiff1d(keys, held), np.setdiff1d(held, keys)
    kind, rows = meta["kind"], len(keys)
    if meta.get("auto") and kind != _auto_kind(rows, table.dim):
        return None
    if kind in ("ivf", "ivfpq") and rows > RETRAIN_GROWTH * int(meta.get("trained_rows", meta["rows"])):
        return None
    if len(gone):
        if kind in ("hnsw", "ivfpq"):  # FAISS cannot remove rows from these (the re-ranking index of ivfpq)
            return None
        gone = np.ascontiguousarray(gone, dtype=np.int64)
        index.remove_ids(faiss.IDSelectorArray(len(gone), faiss.swig_ptr(gone)))  # what a hashtable key map takes
    if len(new):
        vectors, got = _rows_by_keys(table, new)
        index.add_with_ids(l2_normalise(vectors), np.ascontiguousarray(got))
    log.info("index of table %s updated: %d rows added, %d removed", table.name, len(new), len(gone))
    return index


def _auto_kind(rows: int, dim: int) -> str:
    """flat up to `AUTO_FLAT_MAX` rows, IVFFlat up to `AUTO_COMPRESSED_VALUES` float32 values, else `ivfpq`."""
    if rows <= AUTO_FLAT_MAX:
        return "flat"
    return "ivf" if rows * dim <= AUTO_COMPRESSED_VALUES else "ivfpq"


def table_index(table: VectorTable, kind: str = "auto", rebuild: bool = False) -> TableIndex:
    """The index of the table's current version: from memory (loaded earlier in this process), loaded from the
    cache file, updated from an older cache (appended rows added, deleted rows removed), or built and cached.

    A loaded index is reused only while the table's version and the cache file's .json are those it was loaded
    with, so it is never staler than the file cache. `rebuild` forces a fresh build (and retraining).
    """
    index_path, meta_path = _paths(table)
    version = table.version
    held = _LOADED.get(str(index_path))
    if held is not None and not rebuild:
        stamp, loaded = held
        if loaded.version == version and kind in ("auto", loaded.kind) and stamp == _meta_stamp(meta_path):
            with _LOADED_LOCK:
                if str(index_path) in _LOADED:
                    _LOADED.move_to_end(str(index_path))
            return loaded
    cached = None if rebuild else _read_cache(table, index_path, meta_path)
    if cached is not None and kind in ("auto", cached[0].get("kind")):
        meta, index = cached
        if meta.get("version") != version:
            index = _update(table, meta, index)
            if index is not None:
                meta = {**meta, "version": version}
                _write_cache(table, index_path, meta_path, index, meta)
        if index is not None:
            loaded = TableIndex(to_gpu(index), meta["kind"], version, int(index.ntotal))
            return _remember(index_path, meta_path, loaded)
    index, built_kind, rows = build_table(table, kind)
    meta = {"version": version, "kind": built_kind, "auto": kind == "auto", "trained_rows": rows}
    _write_cache(table, index_path, meta_path, index, meta)
    return _remember(index_path, meta_path, TableIndex(to_gpu(index), built_kind, version, rows))
