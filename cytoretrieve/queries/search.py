"""Similar-cell search: the nearest stored rows to a query image (embedded with the table's own backbone) or row.

The query image may be a file, raw bytes (an upload: decoded here under a pixel limit, so a decompression bomb is a
user error, not a crash) or a PIL image. The backbone of each table is built once per process and kept
(`BACKBONE_CACHE` of them), so a long-lived server embeds an upload without rebuilding its model. Filters are the
SQL `where` of the table's columns, or structured `Filters` turned into one (values quoted, never raw SQL).

A cosine similarity alone says little (a random backbone gives 0.99 to every pair), so each hit also carries its
**percentile**: where its similarity falls among the similarities of the table's rows to their own nearest
neighbour (up to `SCALE_SAMPLE` rows sampled, computed once per table version and cached beside the index as
`<table>.nnsim.json`). 50 means "as close as a typical stored row is to its nearest neighbour", 95 "closer than
95% of those", 5 "further apart than nearly every such pair". Ties among the neighbours' labels are reported as
ties (`SearchResult.tied`), never as a majority.
"""

from __future__ import annotations

import io
import json
import os
import threading
import warnings
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from cytoretrieve.errors import CytoError
from cytoretrieve.ids import parse_tile_id
from cytoretrieve.queries.knn import majority_label, tied_labels
from cytoretrieve.store.ann import l2_normalise
from cytoretrieve.store.filters import Filters
from cytoretrieve.store.index import ROW_COLUMNS, TableIndex, table_index
from cytoretrieve.store.tables import VectorTable, row_key

if TYPE_CHECKING:
    from cytoretrieve.models.backbones import Backbone

HIT_COLUMNS = ROW_COLUMNS  # a hit's metadata: the columns a table's index keeps beside it
MAX_PIXELS = 50_000_000  # a query image larger than this (w x h) is refused: PIL's decompression-bomb guard
BACKBONE_CACHE = 4  # backbones kept built per process (one per table fingerprint)
SCALE_SAMPLE = 2000  # rows whose nearest-neighbour similarity makes a table's similarity scale


class UnknownRow(CytoError):
    """The query id is not in the table (a web app answers 404 to it, the CLI exits 2)."""


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
    dataset: str | None = None
    tile_size: int | None = None
    side: int | None = None  # tiles: the tile's level-0 side (from its id), for drawing it on its slide
    percentile: float | None = None  # the score's percentile among the table's nearest-neighbour similarities

    def __post_init__(self) -> None:
        parsed = parse_tile_id(self.id) if self.slide is not None else None
        if parsed is not None and self.side is None and (parsed[1], parsed[2]) == (self.x, self.y):
            self.side = parsed[3]

    @property
    def binary_name(self) -> str:
        """positive, negative or unknown: the binary class in words."""
        return binary_name(self.binary)


def binary_name(binary: int | None) -> str:
    return {1: "positive", 0: "negative"}.get(binary, "unknown") if binary is not None else "unknown"


@dataclass
class SearchResult:
    """The hits, best first, the neighbours' majority label when the table is labelled, and the query row (by id)."""

    table: str
    query: str
    hits: list[Hit]
    majority_label: str | None
    query_id: str | None = None
    where: str | None = None
    tied: list[str] | None = None  # labels sharing the most votes, best first; more than one = a tie, no majority

    @property
    def is_tie(self) -> bool:
        """True when several labels share the most votes (then `majority_label` is only the tie rule's pick)."""
        return bool(self.tied) and len(self.tied) > 1

    def label_counts(self) -> dict[str, int]:
        """How many hits carry each label, most common first (unlabelled hits under "(none)")."""
        return dict(Counter(h.label or "(none)" for h in self.hits).most_common())

    def binary_counts(self) -> dict[str, int]:
        """How many hits are positive, negative, unknown."""
        return dict(Counter(h.binary_name for h in self.hits).most_common())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["label_counts"] = self.label_counts()
        out["binary_counts"] = self.binary_counts()
        return out


def _hit_rows(table: VectorTable, index: TableIndex, keys: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Metadata of the hit rows, as `table.rows_by_keys(keys, HIT_COLUMNS)` gives it.

    A table's index keeps its rows' metadata in a memory-mapped file sorted by key (`TableIndex.row_metadata`):
    a lookup is a binary search and a take, and a fresh process reads only the pages its hits touch, where a
    LanceDB query per search costs ~8-10 ms and reading every row's metadata first cost 1-2 s at 1.5M rows. An
    index without one (built outside a table cache) asks the table.
    """
    rows = index.row_metadata(keys)
    return table.rows_by_keys(keys, HIT_COLUMNS) if rows is None else rows


def _stored_query(table: VectorTable, row_id: str, index: TableIndex | None) -> tuple[np.ndarray, int]:
    """(L2-normalised vector, key) of the stored row `row_id`; a missing id is a CytoError.

    The vector comes from the table's index when it holds the row: the index stores exactly
    `l2_normalise(vector)`, and a lookup in memory spares a LanceDB query (~5-7 ms of a ~15 ms search at 200k rows).
    Otherwise (a GPU index, an empty table: `index` None) it is read from the table.
    """
    if index is not None:
        key = row_key(row_id)
        vector = index.stored_vector(key)
        if vector is not None and _hit_rows(table, index, [key]).get(key, {}).get("id") == row_id:
            return vector, key
    try:
        row = table.row_by_id(row_id, ["key", "vector"])
    except CytoError as e:
        raise UnknownRow(str(e)) from None
    return l2_normalise(np.asarray(row["vector"], dtype=np.float32)[None, :])[0], int(row["key"])


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An uploaded image's bytes as an RGB PIL image; not an image, or over `max_pixels`, is a one-line CytoError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > max_pixels:
                    raise CytoError(f"`image` is {im.width} x {im.height} px, over the limit of {max_pixels:,} pixels")
                im.load()
                return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CytoError(f"`image` is too large to decode safely: {e}") from None
    except UnidentifiedImageError:
        raise CytoError("`image` is not an image in a format cytoretrieve decodes (PNG, JPEG, TIFF, BMP, ...)") from None
    except (OSError, ValueError, SyntaxError) as e:  # a truncated or corrupt file of a known format
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CytoError(f"`image` cannot be decoded: {reason}") from None


def load_query_image(image: str | Path | bytes | Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The query as an RGB PIL image, from a file, raw bytes or a PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, bytes):
        return decode_image(image, max_pixels)
    path = Path(image)
    if not path.is_file():
        raise CytoError(f"query image not found: {path}")
    try:
        return decode_image(path.read_bytes(), max_pixels)
    except CytoError as e:
        raise CytoError(f"cannot read query image {path}: {e}") from None


_BACKBONES: OrderedDict[str, Backbone] = OrderedDict()
_BACKBONES_LOCK = threading.Lock()


def table_backbone(table: VectorTable) -> Backbone:
    """The backbone that embedded the table, built once per process (fingerprint checked) and kept."""
    from cytoretrieve.models.backbones import backbone_from_metadata

    key = table.fingerprint
    with _BACKBONES_LOCK:
        if key in _BACKBONES:
            _BACKBONES.move_to_end(key)
            return _BACKBONES[key]
        backbone = backbone_from_metadata(table.meta["backbone"])
        _BACKBONES[key] = backbone
        while len(_BACKBONES) > BACKBONE_CACHE:
            _BACKBONES.popitem(last=False)
        return backbone


def query_vector_from_image(table: VectorTable, image: str | Path | bytes | Image.Image, device: str = "auto") -> np.ndarray:
    """Embed one image with the backbone recorded in the table's metadata (its fingerprint is checked)."""
    from cytoretrieve.models.inference import embed_images

    return embed_images(table_backbone(table), [load_query_image(image)], device)[0]


def thumbnails(table: VectorTable, ids: Sequence[str]) -> dict[str, bytes]:
    """{id: stored thumbnail JPEG} of these rows (rows without one are left out): what views show of a hit."""
    wanted = set(ids)
    rows = table.rows_by_keys([row_key(i) for i in wanted], ["id", "thumbnail"])
    return {r["id"]: r["thumbnail"] for r in rows.values() if r["id"] in wanted and r["thumbnail"]}


def search(
    table: VectorTable,
    *,
    image: str | Path | bytes | Image.Image | None = None,
    row_id: str | None = None,
    k: int = 10,
    where: str | Filters | None = None,
    device: str = "auto",
) -> SearchResult:
    """The k rows most similar to `image` (a file, bytes or PIL image) or to the stored row `row_id` (which is left
    out of its own hits).

    `where` is a SQL filter on the table's columns (e.g. "label = 'CIS'") or `Filters`; only matching rows can be hits.
    """
    if isinstance(where, Filters):
        where = where.where()
    if (image is None) == (row_id is None):
        raise CytoError("give either a query image or `id` ROW_ID")
    if k < 1:
        raise CytoError(f"`k` must be at least 1, not {k}")
    allowed = table.read(["key"], where).column("key").to_numpy() if where else None
    try:
        index: TableIndex | None = table_index(table)  # once per search: each asks LanceDB for the table version
    except CytoError:  # an empty table: a query id is reported missing first, else the emptiness below
        index = None
    exclude: int | None = None
    if row_id is not None:
        query, exclude = _stored_query(table, row_id, index)
        label = f"id {row_id}"
    else:
        query = l2_normalise(query_vector_from_image(table, image, device)[None, :])[0]
        label = str(image) if isinstance(image, (str, Path)) else "uploaded image"
    if allowed is not None and exclude is not None:
        allowed = allowed[allowed != exclude]
    index = index or table_index(table)
    hits: list[Hit] = []
    if allowed is None or len(allowed):
        scores, keys = index.search(query[None, :], k + (exclude is not None), allowed)
        pairs = [(float(s), int(key)) for s, key in zip(scores[0], keys[0]) if key != -1 and key != exclude][:k]
        rows = _hit_rows(table, index, [key for _, key in pairs])
        hits = [Hit(score=s, **rows[key]) for s, key in pairs if key in rows]
    scale = similarity_scale(table, index)
    for h in hits:
        h.percentile = percentile_of(scale, h.score)
    labelled = [(h.label, h.score) for h in hits if h.label is not None]
    return SearchResult(table.name, label, hits, majority_label(labelled) if labelled else None, row_id, where,
                        tied_labels(labelled) if labelled else None)


_SCALES: dict[tuple[str, str, int], np.ndarray] = {}
_SCALES_LOCK = threading.Lock()


def _scale_path(table: VectorTable) -> Path:
    return table.store.index_dir() / f"{table.name}.nnsim.json"


def similarity_scale(table: VectorTable, index: TableIndex) -> np.ndarray | None:
    """The 101 percentiles (0..100) of the table's nearest-neighbour similarities: for up to `SCALE_SAMPLE` rows
    drawn with a fixed seed, the cosine similarity to the most similar other row. Computed once per table version
    (kept in memory and in `<table>.nnsim.json` beside the index); None for a table of fewer than 3 rows."""
    # the version the index was brought to (asking LanceDB again costs a round trip), or what the index says its
    # scale is keyed to (the lance kind: its index build, as the scale's thousands of queries cost seconds there)
    version = getattr(index, "scale_version", index.version)
    key = (table.store.uri, table.name, version)
    with _SCALES_LOCK:
        if key in _SCALES:
            return _SCALES[key]
    path = _scale_path(table)
    scale: np.ndarray | None = None
    try:
        saved = json.loads(path.read_text())
        if saved.get("version") == version and len(saved.get("percentiles", [])) == 101:
            scale = np.asarray(saved["percentiles"], dtype=np.float64)
    except (OSError, ValueError):
        pass
    if scale is None:
        scale = _compute_scale(table, index)
        if scale is None:
            return None
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"version": version, "sample": min(SCALE_SAMPLE, index.rows),
                                       "percentiles": [round(float(v), 6) for v in scale]}))
            os.replace(tmp, path)
        except OSError:  # a read-only store: the scale stays in memory only
            tmp.unlink(missing_ok=True)
    with _SCALES_LOCK:
        _SCALES[key] = scale
    return scale


def _compute_scale(table: VectorTable, index: TableIndex) -> np.ndarray | None:
    rows = table.scan(["key"], row_id=True).read_all()
    if rows.num_rows < 3:
        return None
    sample = min(SCALE_SAMPLE, getattr(index, "scale_sample", SCALE_SAMPLE))  # fewer where each query costs more
    pick = np.sort(np.random.default_rng(0).choice(rows.num_rows, min(sample, rows.num_rows), replace=False))
    row_ids = rows.column("_rowid").to_numpy()[pick]
    keys = rows.column("key").to_numpy()[pick]
    order = np.argsort(row_ids, kind="stable")  # take_vectors answers in ascending row-id order
    vectors = l2_normalise(table.take_vectors(row_ids[order]))
    scores, found = index.search(vectors, 2)
    own = keys[order][:, None]
    best = np.where((found != own) & (found != -1), scores, -np.inf).max(axis=1)
    best = best[np.isfinite(best)]
    return np.percentile(best, np.arange(101)) if len(best) else None


def percentile_of(scale: np.ndarray | None, score: float) -> float | None:
    """`score`'s percentile (0-100) on a table's similarity scale (None without one)."""
    if scale is None:
        return None
    lo = np.searchsorted(scale, score, side="left")
    hi = np.searchsorted(scale, score, side="right")
    return float(np.clip((lo + hi) / 2, 0, 100))


def query_picture(table: VectorTable, *, image: str | Path | bytes | Image.Image | None = None,
                  row_id: str | None = None, size: int = 192) -> bytes | None:
    """A JPEG of the query for the views: the image shrunk to `size` px, or the stored row's thumbnail."""
    if row_id is not None:
        return thumbnails(table, [row_id]).get(row_id)
    if image is None:
        return None
    pil = load_query_image(image)
    pil.thumbnail((size, size))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=88)
    return buf.getvalue()
