"""What the viewer's endpoints answer, without the web framework: tables, facets, rows, searches, pictures.

Every request opens its table afresh (~1 ms), so rows an `embed` job appends while the server runs are seen on
the next query (the FAISS index and hit metadata are cached per table version in `store.index`), and a dropped
table is a `NotFound`. No request names a file: tables by name, rows by id, slides by id, all looked up in the store.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.search import MAX_PIXELS, SearchResult, decode_image, search, thumbnails
from cytoretrieve.store.filters import Filters
from cytoretrieve.store.overviews import read_overviews
from cytoretrieve.store.tables import Store, VectorTable

FACET_COLUMNS = ("label", "binary", "dataset", "slide")
MAX_K = 200
MAX_ROWS_PAGE = 500
LARGE_SIDE = 1024  # px: the longest side of a picture opened large
RowReader = Callable[[dict[str, Any]], Any]  # a tile-table row -> its full-resolution PIL image (SlideReader.read_row)


class NotFound(Exception):
    """A table, row, picture or slide the store does not hold (HTTP 404)."""


@dataclass
class SearchRequest:
    """One query from the page: a stored row id or an uploaded image's bytes, k and the filters."""

    k: int = 12
    row_id: str | None = None
    image: bytes | None = None
    filters: Filters = Filters()
    name: str | None = None  # the upload's file name, shown as the query


class Viewer:
    """The store behind the web app, with small per-table-version caches (facets)."""

    def __init__(self, store: Store, max_pixels: int = MAX_PIXELS, device: str = "cpu",
                 reader: RowReader | None = None) -> None:
        """`reader` reads a tile or cell crop at full resolution from its slide (passed in by `cli/serve.py`:
        views do not open slides); without one, tiles open large as their stored thumbnail."""
        self.store = store
        self.max_pixels = max_pixels
        self.device = device
        self.reader = reader
        self._facets: dict[tuple[str, int], dict[str, Any]] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self.prewarm, name="prewarm-indexes", daemon=True).start()

    def prewarm(self) -> list[str]:
        """Ask LanceDB to load the vector indexes of the store's `lance`-kind tables (`store.index.prewarm`), so
        the server's first searches skip the cold read; a hint: any failure is logged and ignored. The tables
        warmed."""
        from cytoretrieve.store.index import prewarm

        warmed = []
        try:
            for name in self.store.table_names():
                try:
                    if prewarm(self.store.open(name)):
                        warmed.append(name)
                except CytoError:  # not a vector table
                    continue
        except Exception as e:  # noqa: BLE001 - a hint: the searches work without it
            logging.getLogger("cytoretrieve").info("index prewarm stopped: %s", e)
        return warmed

    def open(self, name: str) -> VectorTable:
        """The vector table `name` at its newest version; a missing (or dropped) or non-vector table is NotFound."""
        try:
            return self.store.open(name)  # one listing of the store's tables: a missing name is a CytoError
        except (CytoError, ValueError, FileNotFoundError) as e:  # missing, dropped meanwhile, or without vectors
            raise NotFound(f"no vector table '{name}' in this store") from e

    def tables(self) -> list[dict[str, Any]]:
        """The store's vector tables: name, rows, backbone, dimension, dataset."""
        return [{"name": t.name, "rows": t.rows, "arch": t.arch, "dim": t.dim, "dataset": t.dataset}
                for t in self.store.describe() if t.dim > 0]

    def facets(self, name: str) -> dict[str, Any]:
        """Distinct values (with counts) of label, binary, dataset and slide: the page's filter choices."""
        table = self.open(name)
        key = (name, table.version)
        with self._lock:
            if key in self._facets:
                return self._facets[key]
        data = table.read(list(FACET_COLUMNS))
        out: dict[str, Any] = {"table": name, "rows": data.num_rows}
        for column in FACET_COLUMNS:
            counts = Counter(v for v in data.column(column).to_pylist() if v is not None)
            out[column] = [{"value": v, "count": n} for v, n in sorted(counts.items(), key=lambda vn: str(vn[0]))]
        out["tiles"] = bool(out["slide"])
        out["kind"] = table_kind(table.meta)
        with self._lock:
            self._facets = {k: v for k, v in self._facets.items() if k[0] != name}
            self._facets[key] = out
        return out

    def rows(self, name: str, filters: Filters, offset: int = 0, limit: int = 60) -> dict[str, Any]:
        """A page of stored rows (matching the filters) to browse and click: id, label, binary, place."""
        table = self.open(name)
        limit = max(1, min(limit, MAX_ROWS_PAGE))
        data = table.read(["id", "label", "binary", "dataset", "slide", "x", "y"], filters.where())
        page = data.slice(max(0, offset), limit).to_pylist()
        for row in page:
            row["thumbnail"] = thumbnail_url(name, row["id"])
            row["picture"] = picture_url(name, row["id"])
        return {"table": name, "total": data.num_rows, "offset": offset, "rows": page}

    def search(self, name: str, request: SearchRequest) -> SearchResult:
        """Run one query; unknown ids are NotFound, bad input a CytoError."""
        from cytoretrieve.queries.search import UnknownRow

        if not 1 <= request.k <= MAX_K:
            raise CytoError(f"`k` must be between 1 and {MAX_K}, not {request.k}")
        table = self.open(name)
        image = decode_image(request.image, self.max_pixels) if request.image is not None else None
        try:
            result = search(table, image=image, row_id=request.row_id, k=request.k, where=request.filters,
                            device=self.device)
        except UnknownRow as e:
            raise NotFound(str(e)) from None
        except CytoError:
            raise
        except Exception as e:  # the table was dropped or rewritten under the query
            if name not in self.store.table_names():
                raise NotFound(f"table '{name}' was dropped") from e
            raise
        if image is not None and request.name:
            result.query = f"upload {request.name}"
        return result

    def payload(self, result: SearchResult) -> dict[str, Any]:
        """A search as the page's JSON: hits with their picture URLs, label counts, and overviews for tile hits."""
        hits = []
        for rank, h in enumerate(result.hits, 1):
            hits.append({"rank": rank, "id": h.id, "score": round(h.score, 6), "label": h.label, "binary": h.binary,
                         "binary_name": h.binary_name, "dataset": h.dataset, "group": h.group, "slide": h.slide,
                         "x": h.x, "y": h.y, "side": h.side or h.tile_size, "thumbnail": thumbnail_url(result.table, h.id),
                         "picture": picture_url(result.table, h.id), "percentile": h.percentile})
        query = self._query_place(result)
        self._add_nuclei(result, hits, query)
        slides = sorted({h.slide for h in result.hits if h.slide is not None} | ({query["slide"]} if query else set()))
        overviews = {s: {"url": "/api/overview?" + urlencode({"slide": s}), "width": o.width, "height": o.height}
                     for s, o in read_overviews(self.store, slides).items()}
        return {"table": result.table, "query": result.query, "query_id": result.query_id, "where": result.where,
                "majority_label": result.majority_label, "label_counts": result.label_counts(),
                "binary_counts": result.binary_counts(), "hits": hits, "overviews": overviews,
                "tied": result.tied, "is_tie": result.is_tie, "query_place": query}

    def _add_nuclei(self, result: SearchResult, hits: list[dict[str, Any]], query: dict[str, Any] | None) -> None:
        """Each cell hit's (and a stored query cell's) nucleus centre, level-0 px, for marking it on its slide
        (`nucleus`: [x, y], null for tiles and cell datasets)."""
        from cytoretrieve.views.web.slides import nuclei

        wanted = [h["id"] for h in hits if h["slide"] is not None] + ([result.query_id] if query else [])
        found = nuclei(self.store, result.table, wanted) if wanted else {}
        for h in hits:
            h["nucleus"] = found.get(h["id"])
        if query is not None:
            query["nucleus"] = found.get(result.query_id)

    def _query_place(self, result: SearchResult) -> dict[str, Any] | None:
        """Where the query row sits on its slide (slide, x, y, side), for marking it on the overview; None for an
        upload or a cell dataset."""
        if result.query_id is None:
            return None
        from cytoretrieve.store.filters import equals

        try:
            rows = self.open(result.table).read(["slide", "x", "y", "tile_size"], equals("id", result.query_id))
        except (NotFound, CytoError):
            return None
        row = rows.to_pylist()[0] if rows.num_rows else None
        if row is None or row["slide"] is None or row["x"] is None:
            return None
        from cytoretrieve.ids import parse_tile_id

        parsed = parse_tile_id(result.query_id)
        side = parsed[3] if parsed is not None and (parsed[1], parsed[2]) == (row["x"], row["y"]) else row["tile_size"]
        return {"slide": row["slide"], "x": row["x"], "y": row["y"], "side": side}

    def thumbnail(self, name: str, row_id: str) -> bytes:
        found = thumbnails(self.open(name), [row_id]).get(row_id)
        if found is None:
            raise NotFound(f"no picture of row '{row_id}' in table '{name}'")
        return found

    def picture(self, name: str, row_id: str) -> bytes:
        """A stored row large, as JPEG: a cell dataset's source image, a tile or cell crop read at full resolution
        from its slide. The row is looked up by id; its file comes from the table, never from the request."""
        from PIL import Image

        from cytoretrieve.store.filters import equals

        table = self.open(name)
        rows = table.read(["id", "path", "slide"], equals("id", row_id)).to_pylist()
        if not rows:
            raise NotFound(f"no row '{row_id}' in table '{name}'")
        image = None
        if rows[0]["slide"] is None and rows[0]["path"] and Path(rows[0]["path"]).is_file():
            with Image.open(rows[0]["path"]) as im:
                image = im.convert("RGB")
        elif rows[0]["slide"] is not None and self.reader is not None:
            image = self._read_crop(table, row_id)
        if image is None:  # the source is gone (or no reader): the stored thumbnail is what there is
            return self.thumbnail(name, row_id)
        image.thumbnail((LARGE_SIDE, LARGE_SIDE))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    def _read_crop(self, table: VectorTable, row_id: str) -> Any:
        """The tile (or cell crop) of `row_id` read through `self.reader` from the row of its tile table."""
        from cytoretrieve.store.filters import equals
        from cytoretrieve.store.tiles import open_tile_table

        source = (table.meta.get("dataset") or {}).get("name")
        try:
            tiles = open_tile_table(self.store, source)
            found = tiles.rows(None, equals("id", row_id))
        except (CytoError, ValueError, FileNotFoundError):
            return None
        if not found:
            return None
        try:
            return self.reader(found[0])  # type: ignore[misc]
        except (CytoError, OSError, ValueError):  # the slide moved or cannot be read: fall back to the thumbnail
            return None

    def overview(self, slide: str) -> bytes:
        found = read_overviews(self.store, [slide]).get(slide)
        if found is None:
            raise NotFound(f"no overview of slide '{slide}' in this store")
        return found.image


def table_kind(meta: dict[str, Any]) -> str:
    """What the table's rows are, for the page's words: "tiles", "cells" (cell datasets and cells detected on
    slides) or "fields" (microscope fields)."""
    dataset = meta.get("dataset") or {}
    layout = dataset.get("layout") if isinstance(dataset, dict) else None
    if layout == "tiles":
        return "tiles"
    if layout == "fields":
        return "fields"
    return "cells"


def picture_url(table: str, row_id: str) -> str:
    return f"/api/tables/{quote(table, safe='')}/picture?" + urlencode({"id": row_id})


def thumbnail_url(table: str, row_id: str) -> str:
    return f"/api/tables/{quote(table, safe='')}/thumbnail?" + urlencode({"id": row_id})
