"""The viewer's slides at full resolution: Deep Zoom descriptions, JPEG tiles and the overlays drawn over them.

A slide is named by its id only; its file is the path the store recorded when it was tiled (the `slide_overviews`
table, else any tile table's rows of that slide), never a path from the request. Files are opened by the
`SlideOpener` `cli/serve.py` passes in (views open no slide library: it is `open_slide_file` of the slide
backends), at most `max_open` at a time (least recently used closed first, once no read uses them).

Tiles are read in a small thread pool of their own (`workers`), so a burst of tile requests never takes the
threads or the event loop that searches run on; encoded tiles are kept in a bounded byte cache. Its threads run
`nice` steps below the server's other threads (Linux: a thread's own nice value), so on a machine with few cores
decoding tiles yields the CPU to searches instead of sharing it evenly (BENCHMARKS.md, "The viewer's slide tiles").
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from cytoretrieve.errors import CytoError
from cytoretrieve.store.filters import equals
from cytoretrieve.store.overviews import read_overview
from cytoretrieve.store.tables import Store
from cytoretrieve.views.web.deepzoom import OVERLAP, TILE_SIZE, DeepZoom, OutsideSlide

DEFAULT_QUALITY = 80  # JPEG quality of tiles
DEFAULT_MAX_OPEN = 8  # slide handles kept open
DEFAULT_WORKERS = 2  # threads reading tiles (as many as the cores this was measured on: more slow searches down)
TILE_CACHE_BYTES = 32 << 20  # encoded tiles kept
TILE_NICE = int(os.environ.get("CYTORETRIEVE_TILE_NICE", "10"))  # tile threads' nice steps above the server's
BASE_SIDE = 1024  # px: Deep Zoom levels up to the last that fits this are cut from one picture of that level
MAX_BASE_READ = 64_000_000  # px read (once) to make that picture; a slide needing more reads every tile
MAX_OVERLAY_ROWS = 50_000  # tiles or cells per layer sent to the page
TILE_CACHE_CONTROL = "private, max-age=86400"
_SLIDE_ID = re.compile(r"^[^/\\\x00-\x1f]{1,255}$")


class SlideHandle(Protocol):
    """What the viewer needs of an open slide (a slide backend: `sources.slides.backends.SlideBackend`)."""

    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    planes: int
    background: str

    def read_region(self, x: int, y: int, level: int, size: tuple[int, int], *, plane: int = 0) -> Any: ...

    def close(self) -> None: ...


SlideOpener = Callable[[str], SlideHandle]  # a recorded slide path -> an open slide (`open_slide_file`)


class UnknownSlide(LookupError):
    """A slide id the store does not know, or a tile it does not have (HTTP 404)."""


class SlideUnavailable(Exception):
    """The store knows the slide but its file is gone or unreadable (HTTP 410: one line for the page)."""


@dataclass
class _Open:
    path: str
    handle: SlideHandle
    zoom: DeepZoom
    mpp: float | None
    stamp: str  # changes when the file does: part of each tile's ETag
    base_level: int = -1  # Deep Zoom levels up to this one are cut from `pictures` (-1: none)
    pictures: dict[int, dict[int, Any]] = field(default_factory=dict)  # plane -> level -> the whole level (PIL)
    users: int = 0
    closing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while `pictures` are made


def check_slide_id(slide: str) -> str:
    """`slide` if it can be a slide id (no path separator, no control character, not `.` or `..`), else
    `CytoError` (400): ids are looked up in the store, never joined to a path, but such a request is refused early."""
    if not _SLIDE_ID.match(slide) or slide in (".", "..") or ".." in slide.split("."):
        raise CytoError(f"`slide` {slide[:80]!r} is not a slide id")
    return slide


class SlideTiles:
    """Deep Zoom over the slides of one store (see the module docstring)."""

    def __init__(self, store: Store, opener: SlideOpener | None, *, quality: int = DEFAULT_QUALITY,
                 max_open: int = DEFAULT_MAX_OPEN, workers: int = DEFAULT_WORKERS,
                 cache_bytes: int = TILE_CACHE_BYTES, nice: int = TILE_NICE) -> None:
        if not 1 <= quality <= 95:
            raise CytoError(f"`tile_quality` must be between 1 and 95, not {quality}")
        self.store, self.opener, self.quality = store, opener, int(quality)
        self.max_open = max(1, int(max_open))
        self.executor = ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="tiles",
                                           initializer=lower_priority, initargs=(int(nice),))
        self.cache_bytes = int(cache_bytes)
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._tiles: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._tile_bytes = 0
        self._lock = threading.Lock()

    # -- the store: slide id -> recorded path -------------------------------------------------------------------
    def record(self, slide: str) -> dict[str, Any]:
        """The store's record of `slide`: path, width, height, mpp (overview), else the path of one of its tiles."""
        check_slide_id(slide)
        found = read_overview(self.store, slide)
        if found is not None and found.path:
            return {"path": found.path, "width": found.width, "height": found.height, "mpp": found.mpp}
        for table in tile_tables(self.store):
            rows = table.read(["path", "mpp"], equals("slide", slide)).slice(0, 1).to_pylist()
            if rows and rows[0]["path"]:
                return {"path": rows[0]["path"], "width": None, "height": None, "mpp": None}
        raise UnknownSlide(f"no slide '{slide}' in this store")

    # -- open handles -------------------------------------------------------------------------------------------
    def _acquire(self, slide: str) -> _Open:
        with self._lock:
            found = self._open.get(slide)
            if found is not None:
                self._open.move_to_end(slide)
                found.users += 1
                return found
        record = self.record(slide)
        entry = self._open_file(slide, record)
        with self._lock:
            raced = self._open.get(slide)
            if raced is not None:  # another thread opened it meanwhile: keep theirs
                entry.handle.close()
                raced.users += 1
                return raced
            entry.users = 1
            self._open[slide] = entry
            while len(self._open) > self.max_open:
                _, old = self._open.popitem(last=False)
                old.closing = True
                if old.users == 0:
                    old.handle.close()
        return entry

    def _release(self, entry: _Open, broken: bool = False) -> None:
        with self._lock:
            entry.users -= 1
            if broken:  # an OpenSlide handle that failed a read fails every later one: reopen next time
                for key in [k for k, v in self._open.items() if v is entry]:
                    del self._open[key]
                entry.closing = True
            close = entry.closing and entry.users == 0
        if close:
            entry.handle.close()

    def _open_file(self, slide: str, record: dict[str, Any]) -> _Open:
        path = Path(record["path"])
        if self.opener is None:
            raise SlideUnavailable("this server reads no slide files (started without a slide reader)")
        if not path.exists():
            raise SlideUnavailable(f"the file of slide '{slide}' is no longer where it was tiled ({path.name}): "
                                   "move it back or tile it again")
        try:
            handle = self.opener(str(path))
        except (CytoError, OSError, ValueError) as e:
            raise SlideUnavailable(f"slide '{slide}' ({path.name}) cannot be read: {e}") from None
        st = path.stat()
        stamp = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        mpp = record.get("mpp") or handle.mpp
        zoom = DeepZoom(handle.level_dimensions, handle.level_downsamples)
        base = zoom.base_level(BASE_SIDE)
        read = zoom.whole_level(base).size
        return _Open(str(path), handle, zoom, float(mpp) if mpp else None, stamp,
                     base_level=base if read[0] * read[1] <= MAX_BASE_READ else -1)

    # -- what the routes answer ---------------------------------------------------------------------------------
    def info(self, slide: str) -> dict[str, Any]:
        """What the page needs to open a slide: size, mpp, planes, the Deep Zoom layout and URLs."""
        entry = self._acquire(slide)
        try:
            if entry.base_level >= 0:  # the low levels' picture, made now rather than under the first tiles
                with entry.lock:
                    self._pictures(entry, 0)
            w, h = entry.zoom.dimensions
            base = f"/api/slides/{quote(slide, safe='')}"
            return {"slide": slide, "width": w, "height": h, "mpp": entry.mpp, "planes": int(entry.handle.planes or 1),
                    "tile_size": entry.zoom.tile_size, "overlap": entry.zoom.overlap, "levels": entry.zoom.level_count,
                    "format": "jpeg", "dzi": f"{base}/dzi", "tiles": f"{base}/tiles/", "overlays": f"{base}/overlays"}
        finally:
            self._release(entry)

    def dzi(self, slide: str) -> str:
        entry = self._acquire(slide)
        try:
            return entry.zoom.dzi("jpeg", f"/api/slides/{quote(slide, safe='')}/tiles/")
        finally:
            self._release(entry)

    def tile(self, slide: str, level: int, col: int, row: int, plane: int = 0) -> tuple[bytes, str]:
        """The JPEG of one Deep Zoom tile and its ETag; `UnknownSlide` for a tile the slide does not have."""
        entry = self._acquire(slide)
        broken = False
        try:
            planes = int(entry.handle.planes or 1)
            if not 0 <= plane < planes:
                raise UnknownSlide(f"no plane {plane} in slide '{slide}' (it has {planes})")
            try:
                region = entry.zoom.region(level, col, row)
            except OutsideSlide as e:
                raise UnknownSlide(str(e)) from None
            key = (entry.stamp, level, col, row, plane, self.quality)
            etag = '"' + hashlib.sha1(repr(key).encode()).hexdigest()[:20] + '"'
            with self._lock:
                cached = self._tiles.get(key)
                if cached is not None:
                    self._tiles.move_to_end(key)
                    return cached, etag
            try:
                if level <= entry.base_level:  # a low level: cut from one picture of the whole level
                    image = self._cut(entry, level, region, plane)
                else:
                    image = entry.handle.read_region(region.x, region.y, region.level, region.size, plane=plane)
            except (OSError, CytoError, ValueError) as e:
                broken = True
                raise SlideUnavailable(f"slide '{slide}' could not be read there: {e}") from None
            data = encode(image, region.out, self.quality)
            self._keep(key, data)
            return data, etag
        finally:
            self._release(entry, broken)

    @staticmethod
    def _cut(entry: _Open, level: int, region: Any, plane: int) -> Any:
        """Tile `region` of a low Deep Zoom `level` cut from the whole level's picture, made once per open slide
        (from one read of the base level: a single-level slide would otherwise be read whole for each such tile)."""
        from PIL import Image

        with entry.lock:
            pictures = SlideTiles._pictures(entry, plane)
            picture = pictures.get(level)
            if picture is None:
                picture = pictures[level] = pictures[entry.base_level].resize(entry.zoom.level_dimensions[level],
                                                                              Image.Resampling.LANCZOS)
        w, h = region.out
        return picture.crop((region.zx, region.zy, region.zx + w, region.zy + h))

    @staticmethod
    def _pictures(entry: _Open, plane: int) -> dict[int, Any]:
        """The whole-level pictures of `plane` (call with `entry.lock` held), the base level's made on first use."""
        pictures = entry.pictures.get(plane)
        if pictures is None:
            whole = entry.zoom.whole_level(entry.base_level)
            image = entry.handle.read_region(0, 0, whole.level, whole.size, plane=plane)
            pictures = entry.pictures[plane] = {entry.base_level: resized(image, whole.out)}
        return pictures

    def _keep(self, key: tuple[Any, ...], data: bytes) -> None:
        with self._lock:
            if key in self._tiles or len(data) > self.cache_bytes:
                return
            self._tiles[key] = data
            self._tile_bytes += len(data)
            while self._tile_bytes > self.cache_bytes:
                _, old = self._tiles.popitem(last=False)
                self._tile_bytes -= len(old)

    def overlays(self, slide: str) -> dict[str, Any]:
        """What the page draws over a slide: the tiles its tile tables kept (x, y, side, level-0 px) and the cells
        its cell tables found (nucleus x, y and the crop's square), each table a layer, at most
        `MAX_OVERLAY_ROWS` rows each (`truncated` says when more)."""
        check_slide_id(slide)
        tiles, cells = [], []
        for table in tile_tables(self.store):
            where = equals("slide", slide)
            n = table.count(where)
            if n == 0:
                continue
            if table.cells:
                data = table.read(["nucleus_x", "nucleus_y", "x", "y", "extent"], where).slice(0, MAX_OVERLAY_ROWS)
                cells.append({"table": table.name, "rows": n, "truncated": n > MAX_OVERLAY_ROWS,
                              "cells": [list(r.values()) for r in data.to_pylist()]})
            else:
                data = table.read(["x", "y", "extent"], where).slice(0, MAX_OVERLAY_ROWS)
                tiles.append({"table": table.name, "rows": n, "truncated": n > MAX_OVERLAY_ROWS,
                              "tiles": [list(r.values()) for r in data.to_pylist()]})
        if not tiles and not cells and read_overview(self.store, slide) is None:
            raise UnknownSlide(f"no slide '{slide}' in this store")
        return {"slide": slide, "tiles": tiles, "cells": cells}

    def score_runs(self, slide: str) -> dict[str, Any]:
        """The saved score runs (`score --save-scores`) with tiles on `slide`, newest first."""
        from cytoretrieve.store.scores import slide_runs

        check_slide_id(slide)
        return {"slide": slide, "runs": [{**r.to_dict(), "slide_tiles": n} for r, n in slide_runs(self.store, slide)]}

    def score_layer(self, slide: str, run: str) -> dict[str, Any]:
        """Run `run`'s tile scores on `slide` ([x, y, side, score] level-0, at most `MAX_OVERLAY_ROWS`) with the
        run's colour scale (`lo`, `hi`, shared by its slides); `UnknownSlide` when the run has no tile there."""
        from cytoretrieve.store.scores import check_run_name, run_tiles

        check_slide_id(slide)
        check_run_name(run)
        found, rows = run_tiles(self.store, run, slide, limit=MAX_OVERLAY_ROWS + 1)
        if found is None or rows.num_rows == 0:
            raise UnknownSlide(f"no score run '{run}' on slide '{slide}'")
        data = rows.slice(0, MAX_OVERLAY_ROWS).select(["x", "y", "side", "score"]).to_pylist()
        slide_score = rows.column("slide_score")[0].as_py()
        return {"slide": slide, **found.to_dict(), "slide_score": slide_score, "truncated": rows.num_rows > MAX_OVERLAY_ROWS,
                "tiles": [[r["x"], r["y"], r["side"], r["score"]] for r in data]}

    @property
    def open_count(self) -> int:
        return len(self._open)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            entries, self._open = list(self._open.values()), OrderedDict()
        for entry in entries:
            entry.closing = True
            if entry.users == 0:
                entry.handle.close()


def lower_priority(steps: int) -> None:
    """Raise the calling thread's nice value by `steps` (Linux threads have their own; elsewhere, or without the
    right, nothing changes): the tile threads then take the CPU only when searches leave it."""
    if steps <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
    except OSError:
        pass


def resized(image: Any, size: tuple[int, int]) -> Any:
    """An RGB PIL image of `size` px, resized as `DeepZoomGenerator.get_tile` does (`thumbnail`, Lanczos), then to
    the exact size should the aspect ratio have rounded otherwise."""
    from PIL import Image

    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != tuple(size):
        image.thumbnail(tuple(size), Image.Resampling.LANCZOS)
        if image.size != tuple(size):
            image = image.resize(tuple(size), Image.Resampling.LANCZOS)
    return image


def encode(image: Any, size: tuple[int, int], quality: int) -> bytes:
    """A PIL image as a JPEG of `size` px (`resized`)."""
    image = resized(image, size)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def tile_tables(store: Store) -> list[Any]:
    """The store's tile and cell tables (tables without vectors holding slide rows)."""
    from cytoretrieve.store.tables import read_meta
    from cytoretrieve.store.tiles import TILES_KIND, TileTable

    found = []
    for name in store.table_names():
        try:
            tbl = store.db.open_table(name)
        except (ValueError, FileNotFoundError, OSError):  # dropped meanwhile
            continue
        if read_meta(tbl).get("kind") == TILES_KIND:
            found.append(TileTable(store, tbl))
    return found


def nuclei(store: Store, table: str, ids: list[str]) -> dict[str, tuple[int, int]]:
    """{id: (nucleus_x, nucleus_y)} of these rows of vector table `table`, when its rows are cells on slides."""
    from cytoretrieve.store.filters import one_of

    if not ids:
        return {}
    try:
        vectors = store.open(table)
    except (CytoError, ValueError, FileNotFoundError):
        return {}
    if "nucleus_x" not in vectors.columns:
        return {}
    rows = vectors.read(["id", "nucleus_x", "nucleus_y"], one_of("id", ids)).to_pylist()
    return {r["id"]: (r["nucleus_x"], r["nucleus_y"]) for r in rows if r["nucleus_x"] is not None}


__all__ = ["DEFAULT_QUALITY", "OVERLAP", "TILE_CACHE_CONTROL", "TILE_SIZE", "SlideOpener", "SlideTiles",
           "SlideUnavailable", "UnknownSlide", "check_slide_id", "nuclei"]
