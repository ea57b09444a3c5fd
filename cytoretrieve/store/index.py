"""FAISS indexes over a table's vectors, cached beside the table and keyed to its version.

Vectors are L2-normalised here (and in `knn.l2_normalise` for queries), so inner product = cosine similarity.
Each index maps FAISS ids to the table's int64 `key` column, so hits resolve to rows without a side list.
Exact search (flat) by default; IVF or HNSW for large tables; on the GPU when faiss reports one.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.knn import l2_normalise
from cytoretrieve.store.tables import VectorTable

KINDS = ("auto", "flat", "ivf", "hnsw")
AUTO_FLAT_MAX = 100_000  # above this many rows `auto` builds an IVF index
EF_SEARCH = 128  # HNSW candidate list per query
NPROBE = 16  # IVF lists visited per query: recall ~1.0 on clustered embeddings (see STACK.md)
MEMORY_CACHE_TABLES = 4  # indexes kept loaded per process (most recently used); each holds all its vectors


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
        params = None
        if allowed is not None:
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            params = _search_params(self.kind, sel)
        k = min(k, self.rows)
        if params is None:
            return self.index.search(queries, k)
        return self.index.search(queries, k, params=params)

    def stored_vector(self, key: int) -> np.ndarray | None:
        """The L2-normalised vector stored under `key`, or None when the key is not in the index or this index
        cannot look vectors up by key (a GPU copy, an IVF index without its key map)."""
        try:
            return self.index.reconstruct(int(key))
        except (RuntimeError, TypeError):
            return None


def _search_params(kind: str, sel: faiss.IDSelector) -> faiss.SearchParameters:
    if kind == "ivf":
        return faiss.SearchParametersIVF(sel=sel, nprobe=NPROBE)
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(sel=sel, efSearch=EF_SEARCH)
    return faiss.SearchParameters(sel=sel)


def _paths(table: VectorTable) -> tuple[Path, Path]:
    base = table.store.index_dir() / table.name
    return base.with_suffix(".faiss"), base.with_suffix(".faiss.json")


def build(vectors: np.ndarray, keys: np.ndarray, kind: str = "auto") -> tuple[faiss.Index, str]:
    """Build an index of L2-normalised `vectors` with ids `keys`; `auto` = flat up to 100k rows, else IVF."""
    if kind not in KINDS:
        raise CytoError(f"unknown index kind '{kind}' (one of {', '.join(KINDS)})")
    n, d = vectors.shape
    if kind == "auto":
        kind = "flat" if n <= AUTO_FLAT_MAX else "ivf"
    x = l2_normalise(vectors)
    if kind == "flat":
        index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    elif kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = NPROBE
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # key -> stored vector, for `stored_vector`
    else:
        hnsw = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = EF_SEARCH
        index = faiss.IndexIDMap2(hnsw)
    index.add_with_ids(x, np.ascontiguousarray(keys, dtype=np.int64))
    return index, kind


def _with_key_map(index: faiss.Index) -> faiss.Index:
    """An IVF index cached before it kept a key -> vector map gets one (flat and HNSW sit in an IndexIDMap2)."""
    if isinstance(index, faiss.IndexIVF) and index.direct_map.type == faiss.DirectMap.NoMap:
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def to_gpu(index: faiss.Index) -> faiss.Index:
    """Move a flat or IVF index to GPU 0 when one is there; HNSW stays on the CPU (faiss has no GPU HNSW)."""
    if not gpu_available() or isinstance(index, faiss.IndexIDMap2) and isinstance(
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


def table_index(table: VectorTable, kind: str = "auto") -> TableIndex:
    """The index of the table's current version: from memory (loaded earlier in this process), loaded from the
    cache file, or built (and cached) when stale.

    A loaded index is reused only while the table's version and the cache file's .json are those it was loaded
    with, so it is never staler than the file cache.
    """
    index_path, meta_path = _paths(table)
    version = table.version
    held = _LOADED.get(str(index_path))
    if held is not None:
        stamp, loaded = held
        if loaded.version == version and kind in ("auto", loaded.kind) and stamp == _meta_stamp(meta_path):
            with _LOADED_LOCK:
                if str(index_path) in _LOADED:
                    _LOADED.move_to_end(str(index_path))
            return loaded
    if meta_path.exists() and index_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("version") == version and kind in ("auto", meta.get("kind")):
            index = _with_key_map(faiss.read_index(str(index_path)))
            loaded = TableIndex(to_gpu(index), meta["kind"], version, int(meta["rows"]))
            return _remember(index_path, meta_path, loaded)
    vectors, ids = table.vectors(["key"])
    if len(vectors) == 0:
        raise CytoError(f"table '{table.name}' is empty: embed something into it first")
    index, built_kind = build(vectors, ids.column("key").to_numpy(), kind)
    tmp = index_path.with_suffix(".faiss.tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(index_path)
    meta_path.write_text(json.dumps({"version": version, "kind": built_kind, "rows": len(vectors), "table": table.name}))
    return _remember(index_path, meta_path, TableIndex(to_gpu(index), built_kind, version, len(vectors)))
