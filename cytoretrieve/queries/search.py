"""Similar-cell search: the nearest stored rows to a query image (embedded with the table's own backbone) or row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from cytoretrieve.errors import CytoError
from cytoretrieve.store.index import TableIndex, table_index
from cytoretrieve.queries.knn import l2_normalise, majority_label
from cytoretrieve.store.tables import VectorTable, row_key

HIT_COLUMNS = ["id", "label", "binary", "path", "group", "slide", "x", "y"]
HIT_CACHE_MAX_ROWS = 2_000_000  # tables up to this size keep their hits' metadata in memory (~90 B a row)


@dataclass
class Hit:
    """One neighbour: cosine similarity and the row's metadata (slide location for tiles, null for cells)."""

    id: str
    score: float
    label: str | None
    binary: int | None
    path: str | None
    group: str | None
    slide: str | None = None
    x: int | None = None
    y: int | None = None


@dataclass
class SearchResult:
    """The hits, best first, and the neighbours' majority label when the table is labelled."""

    table: str
    query: str
    hits: list[Hit]
    majority_label: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _HitMetadata:
    """HIT_COLUMNS of every row of one table version, with its keys sorted for lookups."""

    sorted_keys: np.ndarray
    rows: np.ndarray  # row number in `columns` of each sorted key
    columns: pa.Table

    def lookup(self, keys: Sequence[int]) -> dict[int, dict[str, Any]]:
        wanted = np.asarray(keys, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.sorted_keys, wanted), len(self.sorted_keys) - 1)
        found = self.sorted_keys[pos] == wanted
        rows = self.columns.take(pa.array(self.rows[pos[found]])).to_pylist()
        return dict(zip(wanted[found].tolist(), rows))


def _hit_rows(table: VectorTable, index: TableIndex, keys: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Metadata of the hit rows, as `table.rows_by_keys(keys, HIT_COLUMNS)` gives it.

    Read once per loaded index (~40 ms and ~17 MB for 200k rows, instead of a LanceDB query per search, ~8-10 ms)
    and kept on it, so it is exactly as fresh as the index and leaves memory with it; tables above
    HIT_CACHE_MAX_ROWS are queried each time.
    """
    if index.rows > HIT_CACHE_MAX_ROWS:
        return table.rows_by_keys(keys, HIT_COLUMNS)
    held = index.derived.get("hits")
    if held is None:
        data = table.read(["key", *HIT_COLUMNS]).combine_chunks()
        all_keys = data.column("key").to_numpy()
        order = np.argsort(all_keys, kind="stable")
        held = index.derived["hits"] = _HitMetadata(all_keys[order], order, data.drop_columns(["key"]))
    return held.lookup(keys)


def _stored_query(table: VectorTable, row_id: str) -> tuple[np.ndarray, int]:
    """(L2-normalised vector, key) of the stored row `row_id`; a missing id is a CytoError.

    The vector comes from the table's index when it holds the row: the index stores exactly
    `l2_normalise(vector)`, and a lookup in memory spares a LanceDB query (~5-7 ms of a ~15 ms search at 200k rows).
    Otherwise (a GPU index, a very large table, an empty one) it is read from the table.
    """
    try:
        index: TableIndex | None = table_index(table)
    except CytoError:  # an empty table: row_by_id below reports the missing id
        index = None
    if index is not None and index.rows <= HIT_CACHE_MAX_ROWS:
        key = row_key(row_id)
        vector = index.stored_vector(key)
        if vector is not None and _hit_rows(table, index, [key]).get(key, {}).get("id") == row_id:
            return vector, key
    row = table.row_by_id(row_id, ["key", "vector"])
    return l2_normalise(np.asarray(row["vector"], dtype=np.float32)[None, :])[0], int(row["key"])


def query_vector_from_image(table: VectorTable, image: str | Path, device: str = "auto") -> np.ndarray:
    """Embed one image with the backbone recorded in the table's metadata (its fingerprint is checked)."""
    from cytoretrieve.backbones import backbone_from_metadata
    from cytoretrieve.embed import embed_images

    path = Path(image)
    if not path.is_file():
        raise CytoError(f"query image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            pil = im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise CytoError(f"cannot read query image {path}: {e}") from e
    backbone = backbone_from_metadata(table.meta["backbone"])
    return embed_images(backbone, [pil], device)[0]


def search(
    table: VectorTable,
    *,
    image: str | Path | None = None,
    row_id: str | None = None,
    k: int = 10,
    where: str | None = None,
    device: str = "auto",
) -> SearchResult:
    """The k rows most similar to `image` or to the stored row `row_id` (which is left out of its own hits).

    `where` is a SQL filter on the table's columns (e.g. "label = 'CIS'"); only matching rows can be hits.
    """
    if (image is None) == (row_id is None):
        raise CytoError("give either a query image or `id` ROW_ID")
    if k < 1:
        raise CytoError(f"-k must be at least 1, not {k}")
    allowed = table.read(["key"], where).column("key").to_numpy() if where else None
    exclude: int | None = None
    if row_id is not None:
        query, exclude = _stored_query(table, row_id)
        label = f"id {row_id}"
    else:
        query = l2_normalise(query_vector_from_image(table, image, device)[None, :])[0]
        label = str(image)
    if allowed is not None and exclude is not None:
        allowed = allowed[allowed != exclude]
    index = table_index(table)
    hits: list[Hit] = []
    if allowed is None or len(allowed):
        scores, keys = index.search(query[None, :], k + (exclude is not None), allowed)
        pairs = [(float(s), int(key)) for s, key in zip(scores[0], keys[0]) if key != -1 and key != exclude][:k]
        rows = _hit_rows(table, index, [key for _, key in pairs])
        hits = [Hit(score=s, **rows[key]) for s, key in pairs if key in rows]
    labelled = [(h.label, h.score) for h in hits if h.label is not None]
    return SearchResult(table.name, label, hits, majority_label(labelled) if labelled else None)
