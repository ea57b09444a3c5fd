"""Similar-cell search: the nearest stored rows to a query image (embedded with the table's own backbone) or row."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from cytoretrieve.errors import CytoError
from cytoretrieve.index import table_index
from cytoretrieve.knn import l2_normalise, majority_label
from cytoretrieve.store import CellTable

HIT_COLUMNS = ["id", "label", "binary", "path", "group", "slide", "x", "y"]


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


def query_vector_from_image(table: CellTable, image: str | Path, device: str = "auto") -> np.ndarray:
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
    table: CellTable,
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
        raise CytoError("give either a query image or --id ROW_ID")
    if k < 1:
        raise CytoError(f"-k must be at least 1, not {k}")
    allowed = table.read(["key"], where).column("key").to_numpy() if where else None
    exclude: int | None = None
    if row_id is not None:
        row = table.row_by_id(row_id, ["key", "vector"])
        query = np.asarray(row["vector"], dtype=np.float32)
        exclude = row["key"]
        label = f"id {row_id}"
    else:
        query = query_vector_from_image(table, image, device)
        label = str(image)
    if allowed is not None and exclude is not None:
        allowed = allowed[allowed != exclude]
    index = table_index(table)
    hits: list[Hit] = []
    if allowed is None or len(allowed):
        scores, keys = index.search(l2_normalise(query[None, :]), k + (exclude is not None), allowed)
        pairs = [(float(s), int(key)) for s, key in zip(scores[0], keys[0]) if key != -1 and key != exclude][:k]
        rows = table.rows_by_keys([key for _, key in pairs], HIT_COLUMNS)
        hits = [Hit(score=s, **rows[key]) for s, key in pairs if key in rows]
    labelled = [(h.label, h.score) for h in hits if h.label is not None]
    return SearchResult(table.name, label, hits, majority_label(labelled) if labelled else None)
