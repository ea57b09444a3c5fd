"""What an open slide gives the rest of the package, whatever its file format: geometry, metadata and RGB regions.

A backend is one class deriving from `SlideBackend` (plus one `register_backend` call, see `__init__.py`). Regions
are always PIL RGB images, `size` px of `level` with their top-left at level-0 (`x`, `y`), as OpenSlide reads them;
pixels outside the image take the slide's `background` colour.

Also here, shared by the array-based backends (tifffile, plain images): the RGB conversion of decoded pixels, a
region cut from decoded pieces, a per-process bounded cache of those pieces, and the TIFF directory check that
names a truncated file.
"""

from __future__ import annotations

import os
import struct
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

DEFAULT_CACHE_BYTES = 64 << 20  # decoded pieces kept per process by the array-based backends


class SlideReadError(OSError):
    """The file opened but a region of it did not decode (a damaged tile): skip the slide, drop the handle."""


class SlideBackend(ABC):
    """One open slide file. Subclasses set the geometry in `__init__` and implement `read_region`.

    `mpp` and `objective` are what the file's metadata says (None when it says nothing; plausibility is the
    reader's business); `planes` counts focal planes (a z-stack), read with `read_region(..., plane=)`; `grey`
    says the pixels are grey levels, delivered as RGB with the level repeated.
    """

    name: ClassVar[str] = ""
    no_mpp: ClassVar[str] = "no pixel size in the slide metadata"  # the reader's message when `mpp` is None
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None = None
    objective: float | None = None
    vendor: str = "unknown"
    background: str = "ffffff"  # hex RGB of the area outside the scan
    planes: int = 1
    grey: bool = False

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """(x, y, width, height) of the scanned area in level-0 px."""
        return (0, 0, *self.dimensions)

    @property
    def associated_images(self) -> Mapping[str, Image.Image]:
        """Label, macro, thumbnail ... pictures stored beside the slide (RGB), by name."""
        return {}

    @abstractmethod
    def read_region(self, x: int, y: int, level: int, size: tuple[int, int], *, plane: int = 0) -> Image.Image:
        """An RGB region: `size` px of `level` (and focal `plane`), its top-left at level-0 (`x`, `y`)."""

    @abstractmethod
    def close(self) -> None:
        """Release the file (idempotent)."""

    def __enter__(self) -> SlideBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def downsamples(dims: Iterable[tuple[int, int]]) -> tuple[float, ...]:
    """Each level's downsample from level 0, as OpenSlide computes it (mean of the width and height ratios)."""
    dims = list(dims)
    w0, h0 = dims[0]
    return tuple((w0 / w + h0 / h) / 2 for w, h in dims)


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[0:2], 16), int(colour[2:4], 16), int(colour[4:6], 16)


def to_rgb8(pixels: np.ndarray, background: str = "ffffff") -> np.ndarray:
    """Decoded pixels (H, W) or (H, W, 1-4) of any numeric type -> (H, W, 3) uint8; alpha composited on the
    background, 16-bit and float scaled to 8 bits."""
    a = pixels if pixels.ndim == 3 else pixels[:, :, None]
    if a.dtype != np.uint8:
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif np.issubdtype(a.dtype, np.integer):
            a = (a.astype(np.float64) * (255 / np.iinfo(a.dtype).max)).round().clip(0, 255).astype(np.uint8)
        else:
            scale = 255.0 if np.nanmax(a, initial=0) <= 1 else 1.0
            a = np.nan_to_num(a.astype(np.float64) * scale).round().clip(0, 255).astype(np.uint8)
    channels = a.shape[2]
    if channels <= 2:  # grey, grey + alpha
        colour, alpha = a[:, :, :1].repeat(3, 2), (a[:, :, 1] if channels == 2 else None)
    else:
        colour, alpha = a[:, :, :3], (a[:, :, 3] if channels >= 4 else None)
    if alpha is None or alpha.min() == 255:
        return np.ascontiguousarray(colour)
    w = alpha[:, :, None].astype(np.float32) / 255
    bg = np.array(hex_rgb(background), np.float32)
    return (colour * w + bg * (1 - w)).round().astype(np.uint8)


def region_from_pieces(
    pieces: Iterable[tuple[int, int, np.ndarray]], x0: int, y0: int, size: tuple[int, int], background: str
) -> Image.Image:
    """Paste decoded RGB pieces (left, top, pixels), in level px, into a `size` canvas whose top-left is
    (`x0`, `y0`); what no piece covers keeps the background colour."""
    w, h = size
    out = np.empty((h, w, 3), np.uint8)
    out[:] = hex_rgb(background)
    for left, top, px in pieces:
        ax, ay = max(x0, left), max(y0, top)
        bx, by = min(x0 + w, left + px.shape[1]), min(y0 + h, top + px.shape[0])
        if ax < bx and ay < by:
            out[ay - y0:by - y0, ax - x0:bx - x0] = px[ay - top:by - top, ax - left:bx - left]
    return Image.fromarray(out, "RGB")


class PieceCache:
    """A bounded LRU of decoded pieces (bytes counted), shared by the open slides of one process; thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes += value.nbytes - (old.nbytes if old is not None else 0)
            self._items[key] = value
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes


_CACHES: dict[int, PieceCache] = {}
_CACHES_PID = os.getpid()


def shared_cache(max_bytes: int | None) -> PieceCache:
    """This process's cache of `max_bytes` (one per size; a forked child starts its own)."""
    global _CACHES_PID
    if os.getpid() != _CACHES_PID:
        _CACHES.clear()
        _CACHES_PID = os.getpid()
    size = DEFAULT_CACHE_BYTES if max_bytes is None else int(max_bytes)
    return _CACHES.setdefault(size, PieceCache(size))


def is_tiff(path: Path) -> bool:
    """Whether `path` is a file starting with a TIFF or BigTIFF header."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def tiff_problem(path: Path, size: int) -> str | None:
    """Why a TIFF header cannot be followed (a truncated or damaged file), or None if its directories are intact."""
    with path.open("rb") as f:
        head = f.read(16)
        if head[:2] not in (b"II", b"MM") or len(head) < 8:
            return None
        e = "<" if head[:2] == b"II" else ">"
        magic = struct.unpack(e + "H", head[2:4])[0]
        if magic == 42:
            big, off = False, struct.unpack(e + "I", head[4:8])[0]
        elif magic == 43 and len(head) >= 16:
            big, off = True, struct.unpack(e + "Q", head[8:16])[0]
        else:
            return None
        count_fmt, count_size, entry_size, next_fmt, next_size = (
            ("Q", 8, 20, "Q", 8) if big else ("H", 2, 12, "I", 4)
        )
        seen: set[int] = set()
        while off:
            if off in seen or len(seen) > 100_000:
                return "its directory chain loops"
            seen.add(off)
            if off + count_size > size:
                return f"truncated: directory {len(seen)} starts at byte {off}, beyond the end of the file ({size} bytes)"
            f.seek(off)
            count = struct.unpack(e + count_fmt, f.read(count_size))[0]
            end = off + count_size + count * entry_size + next_size
            if end > size:
                return f"truncated: directory {len(seen)} ends at byte {end}, beyond the end of the file ({size} bytes)"
            f.seek(end - next_size)
            off = struct.unpack(e + next_fmt, f.read(next_size))[0]
    return None
