"""Reading whole-slide images with OpenSlide (any format it reads: Aperio, Hamamatsu, generic tiled TIFF, ...).

- `Slide` opens one file with errors a user can act on (missing file, not a slide, truncated TIFF) and knows the
  slide's level-0 pixel size (`mpp`, um/px): from `openslide.mpp-x`, else from the user's `mpp=` or
  `objective=` (objective power P means 10 / P um/px: 20x = 0.5), else a `CytoError` that says what to pass.
- `choose_level` picks the level to read for a target mpp: the coarsest level that is still at least as fine as
  the target (within `MPP_TOLERANCE`), reading a larger region and resizing when no level matches.
- `SlideReader` is what DataLoader workers hold: picklable, it opens slides lazily in whichever process calls
  it (one handle per process, never shared across a fork), keeps at most `max_open` handles, and shares one
  bounded `OpenSlideCache` between them, so memory stays flat over hundreds of slides.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openslide
from PIL import Image

from cytoretrieve.errors import CytoError
from cytoretrieve.ids import slide_id

PLAUSIBLE_MPP = (0.05, 20.0)  # um/px a slide scanner can produce; other metadata values are ignored
MAX_UPSAMPLE = 4.0  # tiles are not made by enlarging a slide more than this
MPP_TOLERANCE = 0.02  # a level within 2% of the target mpp is read as is (scanners say 0.499 or 0.5025 for 20x)
DEFAULT_CACHE_BYTES = 64 << 20  # one OpenSlide tile cache per process, shared by all open slides
DEFAULT_MAX_OPEN = 8  # slide handles a reader keeps open per process (least recently used are closed)
RESAMPLE = Image.Resampling.LANCZOS


def _tiff_problem(path: Path, size: int) -> str | None:
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


def diagnose(path: Path) -> str:
    """A one-line reason why OpenSlide cannot open `path`."""
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return "is a folder, not a slide file"
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    problem = _tiff_problem(path, size)
    if problem:
        return problem
    with path.open("rb") as f:
        head = f.read(8)
    if head[:2] in (b"II", b"MM"):
        return "a TIFF OpenSlide cannot read as a slide (not tiled, or damaged)"
    kinds = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"BM": "a BMP image", b"%PDF": "a PDF"}
    kind = next((k for magic, k in kinds.items() if head.startswith(magic)), "not a format OpenSlide reads")
    return f"not a whole-slide image ({kind})"


def resolve_mpp(
    properties: Mapping[str, str], mpp: float | None = None, objective: float | None = None
) -> tuple[float, str]:
    """Level-0 um/px and where it came from: the slide's `openslide.mpp-x`, else `mpp`, else 10 / `objective`.

    A metadata value outside `PLAUSIBLE_MPP` counts as missing: generic TIFFs often carry a screen or print
    resolution (72 dpi = 352.8 um/px) that says nothing about the microscope. Raises `CytoError` when no value
    is available, naming the slide's objective power when it reports one.
    """
    value = properties.get(openslide.PROPERTY_NAME_MPP_X)
    note = ""
    if value:
        try:
            found = float(value)
        except ValueError:
            found = 0.0
        if PLAUSIBLE_MPP[0] <= found <= PLAUSIBLE_MPP[1]:
            return found, "slide"
        note = f"implausible pixel size {value} um/px in the slide's metadata (a scanner's is {PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g})"
    if mpp is not None:
        if mpp <= 0:
            raise CytoError(f"`mpp` must be positive, not {mpp}")
        return float(mpp), "--mpp"
    if objective is not None:
        if objective <= 0:
            raise CytoError(f"`objective` must be positive, not {objective}")
        return 10.0 / float(objective), "--objective"
    power = properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    hint = f" (it reports objective power {power}: `objective` {power} assumes {10 / float(power):g} um/px)" if _positive(power) else ""
    raise CytoError(
        f"{note or 'no pixel size (openslide.mpp-x) in the slide metadata'}: pass `mpp` (um per level-0 pixel) "
        f"or `objective` (20 for 20x = 0.5 um/px){hint}"
    )


def _int(properties: Mapping[str, str], key: str, default: int) -> int:
    try:
        return int(properties.get(key, default))
    except ValueError:
        return default


def _positive(value: str | None) -> bool:
    try:
        return value is not None and float(value) > 0
    except ValueError:
        return False


@dataclass(frozen=True)
class LevelChoice:
    """How to read one `tile_size` px tile at `target_mpp`: `read_size` px at `level`, resized when they differ.

    `extent` is the tile's side in level-0 px (the grid step when tiles do not overlap); `tile_mpp` the pixel
    size of the delivered tile (the target, or the level's own mpp when it is within tolerance of the target).
    """

    level: int
    downsample: float
    level_mpp: float
    read_size: int
    tile_size: int
    extent: int
    tile_mpp: float

    @property
    def resized(self) -> bool:
        return self.read_size != self.tile_size

    def scaled(self, size: int) -> tuple[int, int]:
        """(read_size, extent) for a tile of `size` output px at the same level and scale (cell crops)."""
        read = max(1, round(size * self.read_size / self.tile_size))
        return read, max(1, round(read * self.downsample))


def choose_level(
    downsamples: tuple[float, ...] | list[float],
    mpp: float,
    target_mpp: float,
    tile_size: int,
    tolerance: float = MPP_TOLERANCE,
) -> LevelChoice:
    """The level to read `tile_size` px tiles at `target_mpp` from, for a slide of level-0 pixel size `mpp`.

    The coarsest level whose mpp is at most the target (within `tolerance`): no detail is invented, and no more
    pixels are decoded than needed. When the slide is coarser than the target even at level 0, level 0 is read
    and upsampled (at most `MAX_UPSAMPLE` times, else `CytoError`).
    """
    if target_mpp <= 0 or tile_size <= 0:
        raise CytoError("the target mpp and the tile size must be positive")
    level_mpps = [mpp * d for d in downsamples]
    fine_enough = [i for i, m in enumerate(level_mpps) if m <= target_mpp * (1 + tolerance)]
    level = max(fine_enough, key=lambda i: level_mpps[i]) if fine_enough else 0
    scale = target_mpp / level_mpps[level]  # level px per output px
    if scale < 1 / MAX_UPSAMPLE:
        raise CytoError(f"the slide is {level_mpps[level]:.3g} um/px at its finest level: tiles at {target_mpp:g} um/px "
                        f"would enlarge it {1 / scale:.1f}x (at most {MAX_UPSAMPLE:g}x)")
    if abs(scale - 1) <= tolerance:
        read_size, tile_mpp = tile_size, level_mpps[level]
    else:
        read_size, tile_mpp = max(1, round(tile_size * scale)), target_mpp
    extent = max(1, round(read_size * downsamples[level]))
    return LevelChoice(level, float(downsamples[level]), level_mpps[level], read_size, tile_size, extent, tile_mpp)


@dataclass(frozen=True)
class SlideInfo:
    """What the tiling job needs to know about a slide."""

    path: str
    id: str
    vendor: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float  # level-0 um/px
    mpp_source: str  # "slide", "--mpp" or "--objective"
    objective: float | None
    bounds: tuple[int, int, int, int]  # (x, y, width, height) of the scanned area in level-0 px
    background: str  # hex RGB of the area outside the scan

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _composite(region: Image.Image, background: str) -> Image.Image:
    """RGBA from OpenSlide -> RGB; transparent pixels (outside the scan) take the slide's background colour."""
    alpha = region.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return region.convert("RGB")
    out = Image.new("RGB", region.size, "#" + background)
    out.paste(region, None, alpha)
    return out


class Slide:
    """One open slide: an OpenSlide handle and its `SlideInfo`. Use as a context manager, or `close()` it."""

    def __init__(
        self,
        path: str | Path,
        *,
        mpp: float | None = None,
        objective: float | None = None,
        cache: openslide.OpenSlideCache | None = None,
    ) -> None:
        path = Path(path)
        try:
            self.handle = openslide.OpenSlide(path)
        except openslide.OpenSlideUnsupportedFormatError:
            raise CytoError(diagnose(path)) from None
        except openslide.OpenSlideError as e:
            raise CytoError(f"OpenSlide cannot open it: {e}".splitlines()[0]) from None
        try:
            if cache is not None:
                self.handle.set_cache(cache)
            props = self.handle.properties
            level_mpp, source = resolve_mpp(props, mpp, objective)
            w, h = self.handle.dimensions
            bx, by = _int(props, openslide.PROPERTY_NAME_BOUNDS_X, 0), _int(props, openslide.PROPERTY_NAME_BOUNDS_Y, 0)
            bw = _int(props, openslide.PROPERTY_NAME_BOUNDS_WIDTH, w)
            bh = _int(props, openslide.PROPERTY_NAME_BOUNDS_HEIGHT, h)
            power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
            self.info = SlideInfo(
                path=str(path.absolute()),
                id=slide_id(path),
                vendor=props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
                dimensions=(int(w), int(h)),
                level_dimensions=tuple((int(a), int(b)) for a, b in self.handle.level_dimensions),
                level_downsamples=tuple(float(d) for d in self.handle.level_downsamples),
                mpp=level_mpp,
                mpp_source=source,
                objective=float(power) if _positive(power) else (objective if source == "--objective" else None),
                bounds=(bx, by, bw, bh),
                background=props.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "ffffff"),
            )
        except BaseException:
            self.handle.close()
            raise

    def choose_level(self, target_mpp: float, tile_size: int) -> LevelChoice:
        return choose_level(self.info.level_downsamples, self.info.mpp, target_mpp, tile_size)

    def read_rgb(self, x: int, y: int, level: int, size: tuple[int, int]) -> Image.Image:
        """An RGB region: `size` px of `level`, its top-left at level-0 (`x`, `y`). OpenSlide errors propagate."""
        return _composite(self.handle.read_region((int(x), int(y)), int(level), (int(size[0]), int(size[1]))), self.info.background)

    def read_tile(self, x: int, y: int, level: int, read_size: int, tile_size: int) -> Image.Image:
        """A `tile_size` px RGB tile: `read_size` px read at `level` from level-0 (`x`, `y`), resized if needed."""
        im = self.read_rgb(x, y, level, (read_size, read_size))
        return im if read_size == tile_size else im.resize((tile_size, tile_size), RESAMPLE)

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlideReader:
    """Reads tiles of many slides; give one to a DataLoader dataset and every worker reads with its own handles.

    Picklable: only its settings travel. Handles open lazily in the process that reads, at most `max_open` at a
    time (least recently used closed first), all sharing one `OpenSlideCache` of `cache_bytes`. A forked child
    never reuses its parent's handles. `mpp` / `objective` are not needed to read: tile rows carry the level
    and read size.

        reader = SlideReader()
        image = reader.read_tile(row["path"], row["x"], row["y"], row["level"], row["read_size"], row["tile_size"])
        image = reader.read_row(row)   # the same, from a tile-table row dict
    """

    def __init__(self, cache_bytes: int = DEFAULT_CACHE_BYTES, max_open: int = DEFAULT_MAX_OPEN) -> None:
        self.cache_bytes = int(cache_bytes)
        self.max_open = max(1, int(max_open))
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._handles: OrderedDict[str, openslide.OpenSlide] = OrderedDict()
        self._backgrounds: dict[str, str] = {}
        self._cache: openslide.OpenSlideCache | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cache_bytes": self.cache_bytes, "max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.cache_bytes = state["cache_bytes"]
        self.max_open = state["max_open"]
        self._reset()

    def handle(self, path: str | Path) -> openslide.OpenSlide:
        """The open handle of `path` in this process (opened on first use)."""
        if os.getpid() != self._pid:  # forked: the parent's handles belong to the parent
            self._reset()
        key = str(path)
        osr = self._handles.get(key)
        if osr is not None:
            self._handles.move_to_end(key)
            return osr
        try:
            osr = openslide.OpenSlide(key)
        except openslide.OpenSlideUnsupportedFormatError:
            raise CytoError(f"{key}: {diagnose(Path(key))}") from None
        if self._cache is None:
            self._cache = openslide.OpenSlideCache(self.cache_bytes)
        osr.set_cache(self._cache)
        self._handles[key] = osr
        self._backgrounds[key] = osr.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "ffffff")
        while len(self._handles) > self.max_open:
            old, h = self._handles.popitem(last=False)
            self._backgrounds.pop(old, None)
            h.close()
        return osr

    def read_tile(self, path: str | Path, x: int, y: int, level: int, read_size: int, tile_size: int) -> Image.Image:
        """A `tile_size` px RGB tile: `read_size` px at `level` from level-0 (`x`, `y`) of `path`, resized if needed.

        OpenSlide errors (a corrupt tile inside a slide) propagate as `openslide.OpenSlideError`; after one, the
        handle is dropped so the next read reopens the slide.
        """
        osr = self.handle(path)
        try:
            region = osr.read_region((int(x), int(y)), int(level), (int(read_size), int(read_size)))
        except openslide.OpenSlideError:
            self.discard(path)  # an OpenSlide handle in error state fails every later read
            raise
        im = _composite(region, self._backgrounds[str(path)])
        return im if read_size == tile_size else im.resize((int(tile_size), int(tile_size)), RESAMPLE)

    def read_row(self, row: Mapping[str, Any]) -> Image.Image:
        """`read_tile` from a tile-table row (`path`, `x`, `y`, `level`, `read_size`, `tile_size`)."""
        return self.read_tile(row["path"], row["x"], row["y"], row["level"], row["read_size"], row["tile_size"])

    def discard(self, path: str | Path) -> None:
        h = self._handles.pop(str(path), None)
        self._backgrounds.pop(str(path), None)
        if h is not None:
            h.close()

    def close(self) -> None:
        """Close every handle this process opened."""
        if os.getpid() == self._pid:
            for h in self._handles.values():
                h.close()
        self._reset()

    @property
    def open_count(self) -> int:
        return len(self._handles) if os.getpid() == self._pid else 0
