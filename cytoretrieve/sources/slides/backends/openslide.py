"""The OpenSlide backend (the default): every format OpenSlide reads (Aperio, Hamamatsu, MIRAX, Leica, Ventana,
Philips, DICOM, generic tiled TIFF). The one module that imports `openslide`.

Regions come as RGBA and are composited on the slide's background colour; the scanned area (`bounds`), mpp and
objective power come from OpenSlide's standard properties. Open slides of one process share one bounded
`OpenSlideCache` per size, so memory stays flat over hundreds of slides. Generic TIFFs carrying OME-XML are left to
the tifffile backend (OpenSlide would see their first plane only, without its pixel size).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import openslide
from PIL import Image

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.slides.backends.base import SlideBackend, SlideReadError, tiff_problem

_CACHES: dict[int, openslide.OpenSlideCache] = {}
_CACHES_PID = os.getpid()


def shared_cache(max_bytes: int) -> openslide.OpenSlideCache:
    """This process's OpenSlide tile cache of `max_bytes` (one per size; a forked child starts its own)."""
    global _CACHES_PID
    if os.getpid() != _CACHES_PID:
        _CACHES.clear()
        _CACHES_PID = os.getpid()
    cache = _CACHES.get(int(max_bytes))
    if cache is None:
        cache = _CACHES[int(max_bytes)] = openslide.OpenSlideCache(int(max_bytes))
    return cache


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def metadata(properties: Mapping[str, str]) -> tuple[float | None, float | None]:
    """(mpp, objective power) as the slide's OpenSlide properties state them (None when absent or not a number)."""
    power = _float(properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    return _float(properties.get(openslide.PROPERTY_NAME_MPP_X)), power if power and power > 0 else None


def _int(properties: Mapping[str, str], key: str, default: int) -> int:
    try:
        return int(properties.get(key, default))
    except ValueError:
        return default


def composite(region: Image.Image, background: str) -> Image.Image:
    """RGBA from OpenSlide -> RGB; transparent pixels (outside the scan) take the slide's background colour."""
    alpha = region.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return region.convert("RGB")
    out = Image.new("RGB", region.size, "#" + background)
    out.paste(region, None, alpha)
    return out


class OpenSlideBackend(SlideBackend):
    name = "openslide"

    def __init__(self, path: Path, cache_bytes: int | None = None) -> None:
        try:
            self.handle = openslide.OpenSlide(path)
        except openslide.OpenSlideUnsupportedFormatError:
            raise CytoError(diagnose(path)) from None
        except openslide.OpenSlideError as e:
            raise CytoError(f"OpenSlide cannot open it: {e}".splitlines()[0]) from None
        if cache_bytes is not None:
            self.handle.set_cache(shared_cache(cache_bytes))
        props = self.handle.properties
        self.properties = props
        w, h = self.handle.dimensions
        self.dimensions = (int(w), int(h))
        self.level_dimensions = tuple((int(a), int(b)) for a, b in self.handle.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self.handle.level_downsamples)
        self.mpp, self.objective = metadata(props)
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
        self.background = props.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "ffffff")

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        p, (w, h) = self.properties, self.dimensions
        return (_int(p, openslide.PROPERTY_NAME_BOUNDS_X, 0), _int(p, openslide.PROPERTY_NAME_BOUNDS_Y, 0),
                _int(p, openslide.PROPERTY_NAME_BOUNDS_WIDTH, w), _int(p, openslide.PROPERTY_NAME_BOUNDS_HEIGHT, h))

    @property
    def associated_images(self) -> Mapping[str, Image.Image]:
        return {k: composite(v, self.background) for k, v in self.handle.associated_images.items()}

    def read_region(self, x: int, y: int, level: int, size: tuple[int, int], *, plane: int = 0) -> Image.Image:
        if plane != 0:
            raise CytoError(f"plane {plane}: an OpenSlide slide has one focal plane")
        try:
            region = self.handle.read_region((int(x), int(y)), int(level), (int(size[0]), int(size[1])))
        except openslide.OpenSlideError as e:  # a damaged tile; the handle fails every later read
            raise SlideReadError(str(e)) from e
        return composite(region, self.background)

    def close(self) -> None:
        self.handle.close()


def open_slide(path: Path, cache_bytes: int | None = None) -> OpenSlideBackend:
    return OpenSlideBackend(path, cache_bytes)


def probe(path: Path) -> bool:
    """A format OpenSlide detects, except generic TIFFs that carry OME-XML (the tifffile backend's)."""
    vendor = openslide.OpenSlide.detect_format(str(path))
    if vendor != "generic-tiff":
        return vendor is not None
    try:
        with openslide.OpenSlide(path) as osr:
            return "<OME" not in osr.properties.get("tiff.ImageDescription", "")
    except openslide.OpenSlideError:
        return True  # opening will say what is wrong


def diagnose(path: Path) -> str:
    """A one-line reason why no backend (OpenSlide first) can open `path`."""
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return "is a folder, not a slide file"
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    problem = tiff_problem(path, size)
    if problem:
        return problem
    with path.open("rb") as f:
        head = f.read(8)
    if head[:2] in (b"II", b"MM"):
        return "a TIFF OpenSlide cannot read as a slide (not tiled, or damaged)"
    kinds = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"BM": "a BMP image", b"%PDF": "a PDF"}
    kind = next((k for magic, k in kinds.items() if head.startswith(magic)), "not a format the slide backends read")
    return f"not a whole-slide image ({kind})"
