"""A table's 2-D map (PCA or t-SNE of its vectors), cached beside the table and keyed to its version: what the
viewer draws for lasso selection.

The map methods are a small registry (`register_map_method`): a name -> a function `(vectors) -> (n, 2)` and the
most points it is given. A table over that many rows is mapped on a seeded sample of its rows (the same sample
for the same table version), so a large table stays quick to map and to draw; the answer says so.

The cache is one Arrow file per (table, method) in the store's index folder (`Store.index_dir`, where the FAISS
indexes are cached): `<table>.map.<method>.arrow` holding `id`, `x`, `y` and the stored `label`, with the table version, the table's
row count (a table dropped and made again can reach the same version) and the method in its schema metadata. A map of another table version is recomputed; the file is
written through a temporary one renamed into place, so a kill never leaves half a map.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from cytoretrieve.registry import Registry

if TYPE_CHECKING:
    from cytoretrieve.store.tables import VectorTable

SEED = 0
MAP_FORMAT = 2  # of the cache files; a file of another format is recomputed


@dataclass(frozen=True)
class MapMethod:
    """A 2-D embedding: `fit(vectors (n, d) float32) -> (n, 2)`, given at most `max_points` rows."""

    name: str
    fit: Callable[[np.ndarray], np.ndarray]
    max_points: int
    help: str = ""


MAP_METHODS: Registry[MapMethod] = Registry("map method")


def register_map_method(name: str, fit: Callable[[np.ndarray], np.ndarray], max_points: int, help: str = "") -> None:
    """Make `name` a map method (`GET /api/tables/{name}/map?method=NAME`)."""
    MAP_METHODS.add(name, MapMethod(name, fit, max_points, help))


def _pca(vectors: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    if len(vectors) < 2 or vectors.shape[1] < 2:
        return np.zeros((len(vectors), 2), np.float32)
    return PCA(n_components=2, random_state=SEED).fit_transform(vectors)


def _tsne(vectors: np.ndarray) -> np.ndarray:
    """t-SNE on the first 50 principal components (the usual speed-up); perplexity shrunk for tiny tables."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(vectors)
    if n < 4:
        return _pca(vectors)
    dims = min(50, vectors.shape[1], n)
    reduced = PCA(n_components=dims, random_state=SEED).fit_transform(vectors) if dims < vectors.shape[1] else vectors
    return TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=SEED).fit_transform(reduced)


# the caps: PCA is cheap per point; t-SNE costs far more (its neighbour search and gradient steps), so its cap is
# lower, to keep a table's first t-SNE map (computed once per version) within a page's patience
register_map_method("pca", _pca, 20_000, "the first two principal components (fast, linear)")
register_map_method("tsne", _tsne, 3_000, "t-SNE of the first 50 principal components (neighbourhoods kept)")


@dataclass
class TableMap:
    """A table version's map: row `ids` with their `x`, `y` (scaled into [0, 1]) and stored `labels`; `sampled` when
    `ids` are a sample of the table's `total` rows."""

    table: str
    method: str
    version: int
    total: int
    ids: list[str]
    x: np.ndarray
    y: np.ndarray
    labels: list[str | None]

    @property
    def sampled(self) -> bool:
        return len(self.ids) < self.total


def _path(table: VectorTable, method: str) -> Path:
    return table.store.index_dir() / f"{table.name}.map.{method}.arrow"


def _sample(table: VectorTable, cap: int) -> tuple[list[str], list[str | None], np.ndarray, int]:
    """(ids, stored labels, vectors, total rows) of `cap` rows at most, a seeded sample streamed batch by batch (never all the
    table's vectors in memory at once)."""
    total = table.count()
    keep_share = 1.0 if total <= cap else cap / total
    rng = np.random.default_rng(SEED)
    ids: list[str] = []
    labels: list[str | None] = []
    chunks: list[np.ndarray] = [np.zeros((0, table.dim), np.float32)]
    for batch in table.scan(["id", "label", "vector"]):
        mask = rng.random(batch.num_rows) < keep_share if keep_share < 1.0 else np.ones(batch.num_rows, bool)
        if not mask.any():
            continue
        picked = batch.filter(pa.array(mask))
        vec = picked.column("vector")
        ids.extend(picked.column("id").to_pylist())
        labels.extend(picked.column("label").to_pylist())
        chunks.append(vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), table.dim))
    vectors = np.concatenate(chunks).astype(np.float32, copy=False)
    return ids[:cap], labels[:cap], vectors[:cap], total


def _scaled(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x, y each scaled into [0, 1] (float32): each axis fills the canvas, as a plot's autoscale does (PCA's first
    component spreads far wider than its second, and kept in proportion the points would crowd into a band)."""
    points = np.asarray(points, np.float64)
    if not len(points):
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    low, high = points.min(0), points.max(0)
    span = np.where(high - low > 0, high - low, 1.0)
    scaled = np.where(high - low > 0, (points - low) / span, 0.5)
    return scaled[:, 0].astype(np.float32), scaled[:, 1].astype(np.float32)


def _read(path: Path, table: VectorTable, method: str) -> TableMap | None:
    """The cached map when it is of this table version (and format), else None."""
    if not path.exists():
        return None
    try:
        with pa.memory_map(str(path)) as source:
            data = pa.ipc.open_file(source).read_all()
        meta = json.loads((data.schema.metadata or {}).get(b"cytoretrieve_map", b"{}"))
    except (OSError, ValueError, pa.ArrowException):
        return None
    stale = meta.get("version") != table.version or meta.get("total") != table.count()  # a table dropped and remade
    if stale or meta.get("format") != MAP_FORMAT or meta.get("method") != method:
        return None
    return TableMap(table.name, method, table.version, int(meta["total"]), data.column("id").to_pylist(),
                    data.column("x").to_numpy(), data.column("y").to_numpy(), data.column("label").to_pylist())


def _write(path: Path, found: TableMap) -> None:
    meta = {"version": found.version, "total": found.total, "method": found.method, "format": MAP_FORMAT,
            "table": found.table}
    data = pa.table({"id": pa.array(found.ids, pa.string()), "x": pa.array(found.x), "y": pa.array(found.y),
                     "label": pa.array(found.labels, pa.string())})
    data = data.replace_schema_metadata({"cytoretrieve_map": json.dumps(meta)})
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, data.schema) as writer:
        writer.write_table(data)
    tmp.replace(path)


_computing: dict[str, threading.Lock] = {}
_computing_lock = threading.Lock()


def table_map(table: VectorTable, method: str = "pca") -> TableMap:
    """The map of the table's current version by `method`: read from the cache, or computed and cached (one
    computation at a time per map in this process: two viewers asking at once compute it once)."""
    spec = MAP_METHODS.lookup(method)
    path = _path(table, method)
    found = _read(path, table, method)
    if found is not None:
        return found
    with _computing_lock:
        lock = _computing.setdefault(str(path), threading.Lock())
    with lock:
        found = _read(path, table, method)
        if found is not None:
            return found
        ids, labels, vectors, total = _sample(table, spec.max_points)
        x, y = _scaled(spec.fit(vectors) if len(ids) else np.zeros((0, 2)))
        found = TableMap(table.name, method, table.version, total, ids, x, y, labels)
        _write(path, found)
        return found


def map_info(found: TableMap) -> dict[str, Any]:
    """What a map's answer says about it besides its points."""
    note = (f"a seeded sample of {len(found.ids):,} of the table's {found.total:,} rows"
            if found.sampled else f"all {found.total:,} rows")
    return {"table": found.table, "method": found.method, "version": found.version, "total": found.total,
            "points": len(found.ids), "sampled": found.sampled, "note": note}
