"""The image backend: a field from a microscope camera (PNG, JPEG, BMP, TIFF), one level, no pixel size (the user
passes `mpp`). Grey images are delivered as RGB with the level repeated, and `grey` says so.

A folder of same-size images of one field (`fov000.png ... fov019.png`, in natural name order) is one field
with a focal plane per image. A file is taken only when its content is the format its extension says (a PNG
named `.tif` is not a slide). Each plane is decoded whole on first read and kept in the per-process cache shared
with the other array-based backends.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.slides.backends.base import (
    SlideBackend,
    SlideReadError,
    region_from_pieces,
    shared_cache,
    to_rgb8,
)

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
_TOKENS = itertools.count()


def _natural(path: Path) -> list[object]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def plane_files(folder: Path) -> list[Path]:
    """The image files of a folder of planes: those of its most common extension, in natural name order."""
    files = [f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in FORMATS]
    if not files:
        return []
    common = max({f.suffix.lower() for f in files}, key=lambda s: sum(f.suffix.lower() == s for f in files))
    return sorted((f for f in files if f.suffix.lower() == common), key=_natural)


def _header(path: Path) -> tuple[str, tuple[int, int], str]:
    """(format, size, mode) from the file's header, without decoding its pixels."""
    try:
        with Image.open(path) as im:
            return str(im.format), im.size, im.mode
    except (UnidentifiedImageError, OSError) as e:
        raise CytoError(f"not an image Pillow reads ({e})".splitlines()[0]) from None


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        if im.mode == "P":
            im = im.convert("RGBA")
        elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        elif im.mode.startswith("I;16"):
            return np.asarray(im).astype(np.uint16)
        return np.asarray(im)


class ImageBackend(SlideBackend):
    name = "image"
    no_mpp = "a camera image carries no pixel size"

    def __init__(self, path: Path, cache_bytes: int | None = None) -> None:
        files = plane_files(path) if path.is_dir() else [path]
        if not files:
            raise CytoError(f"no images ({', '.join(sorted(FORMATS))}) in folder {path}" if path.is_dir() else "no such file")
        headers = [_header(f) for f in files]
        sizes = {size for _, size, _ in headers}
        if len(sizes) > 1:
            raise CytoError(f"the planes in {path} differ in size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))})")
        self.files = files
        self.dimensions = headers[0][1]
        self.level_dimensions = (self.dimensions,)
        self.level_downsamples = (1.0,)
        self.planes = len(files)
        self.grey = all(mode in GREY_MODES for _, _, mode in headers)
        self.vendor = "folder" if path.is_dir() else headers[0][0].lower()
        self._cache = shared_cache(cache_bytes)
        self._token = next(_TOKENS)

    def plane(self, plane: int) -> np.ndarray:
        """Plane `plane`, decoded, as RGB (cached)."""
        if not 0 <= plane < self.planes:
            raise CytoError(f"plane {plane}: the field has {self.planes} focal plane(s)")
        key = (self._token, plane)
        found = self._cache.get(key)
        if found is None:
            try:
                found = to_rgb8(_decode(self.files[plane]), self.background)
            except (OSError, ValueError, SyntaxError) as e:  # a truncated or damaged image
                raise SlideReadError(f"{self.files[plane].name}: {e}".splitlines()[0]) from e
            found.flags.writeable = False
            self._cache.put(key, found)
        return found

    def read_region(self, x: int, y: int, level: int, size: tuple[int, int], *, plane: int = 0) -> Image.Image:
        if level != 0:
            raise CytoError(f"level {level}: a camera image has one level")
        return region_from_pieces([(0, 0, self.plane(plane))], int(x), int(y), (int(size[0]), int(size[1])), self.background)

    def close(self) -> None:
        """Nothing stays open: planes are read whole, then cached."""


def is_plane_folder(path: Path) -> bool:
    """A folder of same-size images and nothing else: one field, an image per focal plane."""
    try:
        return path.is_dir() and not any(f.is_dir() for f in path.iterdir()) and probe(path)
    except CytoError:
        return False


def open_slide(path: Path, cache_bytes: int | None = None) -> ImageBackend:
    return ImageBackend(path, cache_bytes)


def probe(path: Path) -> bool:
    """An image whose content is the format its extension names, or a folder of same-size images."""
    if path.is_dir():
        files = plane_files(path)
        return bool(files) and len({_header(f)[1] for f in files}) == 1
    fmt = FORMATS.get(path.suffix.lower())
    return fmt is not None and _header(path)[0] == fmt
