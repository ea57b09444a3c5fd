"""The tifffile backend: plain TIFF and OME-TIFF, for the TIFFs OpenSlide refuses (untiled, OME focal planes).

Levels are the first series' pyramid levels and the other series that are smaller copies of it (reduced pages
written one after another). Every page of a level is one focal plane (a z-stack: same-size pages or an
OME series with Z). Only the tiles or strips a region touches are decoded, and kept in the per-process cache
shared with the other array-based backends. mpp comes from OME `PhysicalSizeX`, ImageJ's unit, or the
resolution tags in centimetres or inches (a 72 dpi tag is passed on: the reader finds it implausible).
JPEG, LZW or JPEG 2000 compressed files need `imagecodecs`.
"""

from __future__ import annotations

import itertools
import math
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.slides.backends.base import (
    SlideBackend,
    SlideReadError,
    downsamples,
    is_tiff,
    region_from_pieces,
    shared_cache,
    tiff_problem,
    to_rgb8,
)

_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "\\u00B5m": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
_PER_UNIT_UM = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}  # TIFF ResolutionUnit -> um: inch, cm, mm, um
_PHOTOMETRIC = {0, 1, 2, 6}  # min-is-white, min-is-black, RGB, YCbCr
_TOKENS = itertools.count()


def _same_field(big: tuple[int, int], small: tuple[int, int]) -> bool:
    """Whether a `small` image can be a reduced copy of a `big` one (same aspect, within rounding)."""
    (W, H), (w, h) = big, small
    return w < W and h < H and abs(W / w - H / h) <= 0.05 * (W / w) + 2 / min(w, h)


def _shape(page: Any) -> tuple[int, int]:
    kf = page.keyframe
    return int(kf.imagewidth), int(kf.imagelength)


class TiffBackend(SlideBackend):
    name = "tifffile"

    def __init__(self, path: Path, cache_bytes: int | None = None) -> None:
        if path.is_file():
            problem = tiff_problem(path, path.stat().st_size)
            if problem:
                raise CytoError(problem)
        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as e:  # noqa: BLE001 - tifffile raises several kinds for a file it cannot parse
            raise CytoError(f"tifffile cannot read it: {e}".splitlines()[0]) from None
        try:
            self._setup()
        except BaseException:
            self._tif.close()
            raise
        self._cache = shared_cache(cache_bytes)
        self._token = next(_TOKENS)
        self._lock = threading.Lock()

    def _setup(self) -> None:
        tif = self._tif
        if not tif.series:
            raise CytoError("a TIFF without images")
        first = tif.series[0]
        levels = list(first.levels)
        size0, sizes = _shape(first.pages[0]), {_shape(s.pages[0]) for s in levels}
        for other in tif.series[1:]:  # reduced pages tifffile did not take as levels of the first series
            size = _shape(other.pages[0]) if other.pages and other.pages[0] is not None else None
            if size and size not in sizes and len(other.pages) == len(first.pages) and _same_field(size0, size):
                levels.append(other)
                sizes.add(size)
        levels.sort(key=lambda s: -_shape(s.pages[0])[0])
        self._pages: list[list[Any]] = [list(s.pages) for s in levels]
        if any(p is None for pages in self._pages for p in pages):
            raise CytoError("an OME-TIFF with missing planes")
        key = self._pages[0][0].keyframe
        if key.photometric not in _PHOTOMETRIC or key.imagedepth > 1 or (key.planarconfig == 2 and key.samplesperpixel > 1):
            raise CytoError(f"a TIFF the tifffile backend cannot show as RGB ({key.photometric.name}, depth "
                            f"{key.imagedepth}, {key.samplesperpixel} samples per pixel, planar {key.planarconfig})")
        self.planes = len(self._pages[0])
        self.level_dimensions = tuple(_shape(pages[0]) for pages in self._pages)
        self.dimensions = self.level_dimensions[0]
        self.level_downsamples = downsamples(self.level_dimensions)
        self.grey = key.samplesperpixel - len(key.extrasamples) == 1
        self.vendor = "ome-tiff" if tif.is_ome else "imagej" if tif.is_imagej else "generic-tiff"
        self.mpp, self.objective = self._metadata()

    def _metadata(self) -> tuple[float | None, float | None]:
        tif = self._tif
        if tif.is_ome and tif.ome_metadata:
            try:
                root = ET.fromstring(tif.ome_metadata)
            except ET.ParseError:
                root = None
            pixels = root.find(".//{*}Pixels") if root is not None else None
            lens = root.find(".//{*}Objective") if root is not None else None
            power = _number(lens.get("NominalMagnification")) if lens is not None else None
            size = _number(pixels.get("PhysicalSizeX")) if pixels is not None else None
            unit = _UM.get(pixels.get("PhysicalSizeXUnit", "µm")) if pixels is not None else None
            if size and unit:
                return size * unit, power
        page = self._pages[0][0].keyframe
        xres = page.resolution[0] if page.resolution else 0
        if not xres:
            return None, None
        ij = tif.imagej_metadata or {}
        if str(ij.get("unit", "")).lower() in _UM:  # ImageJ: pixels per unit, the unit in its description
            return _UM[str(ij["unit"]).lower()] / xres, None
        per_unit = _PER_UNIT_UM.get(int(page.resolutionunit))
        return (per_unit / xres if per_unit else None), None

    def read_region(self, x: int, y: int, level: int, size: tuple[int, int], *, plane: int = 0) -> Image.Image:
        if not 0 <= plane < self.planes:
            raise CytoError(f"plane {plane}: the slide has {self.planes} focal plane(s)")
        page = self._pages[level][plane]
        ds = self.level_downsamples[level]
        x0, y0 = math.floor(x / ds), math.floor(y / ds)
        w, h = int(size[0]), int(size[1])
        pieces = (self._piece(level, plane, page, i) for i in _segments(page.keyframe, x0, y0, w, h))
        return region_from_pieces(pieces, x0, y0, (w, h), self.background)

    def _piece(self, level: int, plane: int, page: Any, index: int) -> tuple[int, int, np.ndarray]:
        """Segment `index` of a page (a tile or a strip) as RGB, with its top-left in level px."""
        key = (self._token, level, plane, index)
        kf = page.keyframe
        found = self._cache.get(key)
        if found is None:
            with self._lock:
                fh = self._tif.filehandle
                fh.seek(page.dataoffsets[index])
                data = fh.read(page.databytecounts[index])
            try:
                seg, _, _ = kf.decode(data, index, jpegtables=kf.jpegtables, jpegheader=kf.jpegheader)
            except Exception as e:  # noqa: BLE001 - a damaged segment or a codec tifffile lacks
                raise SlideReadError(f"tile {index} of level {level}: {e}".splitlines()[0]) from e
            if seg is None:
                raise SlideReadError(f"tile {index} of level {level} is missing")
            px = np.asarray(seg)[0]
            if kf.photometric == 0:  # min-is-white
                px = ~px if px.dtype == bool or np.issubdtype(px.dtype, np.unsignedinteger) else px.max() - px
            found = to_rgb8(px, self.background)
            found.flags.writeable = False
            self._cache.put(key, found)
        top, left = _origin(kf, index)
        return left, top, found

    def close(self) -> None:
        self._tif.close()


def _origin(kf: Any, index: int) -> tuple[int, int]:
    """(top, left) of segment `index` in level px."""
    if kf.is_tiled:
        across = math.ceil(kf.imagewidth / kf.tilewidth)
        return (index // across) * kf.tilelength, (index % across) * kf.tilewidth
    return index * min(kf.rowsperstrip or kf.imagelength, kf.imagelength), 0


def _segments(kf: Any, x0: int, y0: int, w: int, h: int) -> list[int]:
    """Indices of the tiles or strips of a page that overlap the region (level px)."""
    W, H = kf.imagewidth, kf.imagelength
    ya, yb = max(0, y0), min(H, y0 + h)
    xa, xb = max(0, x0), min(W, x0 + w)
    if ya >= yb or xa >= xb:
        return []
    if kf.is_tiled:
        across = math.ceil(W / kf.tilewidth)
        rows = range(ya // kf.tilelength, (yb - 1) // kf.tilelength + 1)
        cols = range(xa // kf.tilewidth, (xb - 1) // kf.tilewidth + 1)
        return [r * across + c for r in rows for c in cols]
    rps = min(kf.rowsperstrip or H, H)
    return list(range(ya // rps, (yb - 1) // rps + 1))


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number and number > 0 else None


def open_slide(path: Path, cache_bytes: int | None = None) -> TiffBackend:
    return TiffBackend(path, cache_bytes)


def probe(path: Path) -> bool:
    return is_tiff(path)
